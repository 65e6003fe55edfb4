//! [`Toggle`]: a layer section that is either switched (`retry = false`, `cache = true`) or
//! configured (`[retry]` table). Errors inside a table keep naming the field.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A layer that is off, or on with its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toggle<T> {
    /// The layer is not in the stack.
    Off,
    /// The layer is in the stack with this configuration.
    On(T),
}

impl<T> Toggle<T> {
    /// The configuration, when the layer is on.
    pub fn as_on(&self) -> Option<&T> {
        match self {
            Self::Off => None,
            Self::On(t) => Some(t),
        }
    }

    /// Whether the layer is on.
    pub fn is_on(&self) -> bool {
        matches!(self, Self::On(_))
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for Toggle<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for V<T> {
            type Value = Toggle<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`true`, `false`, or a table of settings")
            }
            fn visit_bool<E: de::Error>(self, on: bool) -> Result<Toggle<T>, E> {
                Ok(if on {
                    Toggle::On(T::default())
                } else {
                    Toggle::Off
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Toggle<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Toggle::On)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Eq, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        n: u32,
    }

    #[derive(Debug, Deserialize)]
    struct Outer {
        a: Toggle<Inner>,
    }

    #[test]
    fn forms() {
        let o: Outer = serde_json::from_str(r#"{"a":false}"#).unwrap();
        assert_eq!(o.a, Toggle::Off);
        let o: Outer = serde_json::from_str(r#"{"a":true}"#).unwrap();
        assert_eq!(o.a, Toggle::On(Inner { n: 0 }));
        let o: Outer = serde_json::from_str(r#"{"a":{"n":3}}"#).unwrap();
        assert_eq!(o.a, Toggle::On(Inner { n: 3 }));
        let e = serde_json::from_str::<Outer>(r#"{"a":{"m":3}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `m`"), "{e}");
    }
}
