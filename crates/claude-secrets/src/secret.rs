//! A secret value with what is known about it, its loggable fingerprint, and the errors of
//! secret sources.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroize;

/// The loggable identity of a key: the first 32 bits of its BLAKE3 hash, shown as 8 hex
/// digits (`Fingerprint(3fa4c2d1)`).
///
/// Logs, `Debug` output and errors of this crate show a fingerprint where they refer to a key,
/// never the key. Operators compare it with `b3sum` of the key file (first 8 digits) to tell
/// which key a process uses. Equality compares the whole 256-bit hash, so two different keys
/// never compare equal even when their 8 shown digits do.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `key`.
    pub fn of(key: &str) -> Self {
        Self(*blake3::hash(key.as_bytes()).as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A secret as a [`SecretSource`](crate::SecretSource) returns it: the value, zeroed on drop,
/// and what the source knows about it.
///
/// `Debug` shows the [`Fingerprint`], the version and the creation time, never the value.
/// The value is reached through [`ExposeSecret`], so every place that reads it is greppable.
///
/// ```
/// use claude_secrets::Secret;
/// use secrecy::ExposeSecret;
///
/// let s = Secret::new("sk-ant-api03-example").with_version("7");
/// assert_eq!(s.expose_secret(), "sk-ant-api03-example");
/// assert!(!format!("{s:?}").contains("sk-ant"));
/// ```
#[derive(Clone)]
pub struct Secret {
    value: SecretString,
    fingerprint: Fingerprint,
    version: Option<String>,
    created_at: Option<SystemTime>,
}

impl Secret {
    /// A secret with no version and no creation time.
    pub fn new(value: impl Into<SecretString>) -> Self {
        let value = value.into();
        let fingerprint = Fingerprint::of(value.expose_secret());
        Self {
            value,
            fingerprint,
            version: None,
            created_at: None,
        }
    }

    /// Sets the version the source gave (Vault's version number, AWS's `VersionId`).
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets when this value was created (Vault's `created_time`, AWS's `CreatedDate`).
    #[must_use]
    pub fn with_created_at(mut self, created_at: SystemTime) -> Self {
        self.created_at = Some(created_at);
        self
    }

    /// The fingerprint of the value.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The version, when the source has versions.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// When the value was created, when the source knows it.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.created_at
    }
}

impl ExposeSecret<str> for Secret {
    fn expose_secret(&self) -> &str {
        self.value.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("fingerprint", &self.fingerprint)
            .field("version", &self.version)
            .field("created_at", &self.created_at.map(httpdate::fmt_http_date))
            .finish_non_exhaustive()
    }
}

/// Trims surrounding ASCII whitespace (a trailing newline from `echo key > file`, a `\r\n`)
/// and refuses an empty value, without leaving an untrimmed copy behind.
pub(crate) fn secret_from_text(mut text: String) -> Result<SecretString, SecretError> {
    let trimmed = text.trim_ascii();
    if trimmed.is_empty() {
        text.zeroize();
        return Err(SecretError::new(
            SecretErrorKind::Invalid,
            "the secret is empty",
        ));
    }
    if trimmed.len() == text.len() {
        return Ok(SecretString::from(text));
    }
    let owned = trimmed.to_owned();
    text.zeroize();
    Ok(SecretString::from(owned))
}

/// What kind of failure a [`SecretError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SecretErrorKind {
    /// The secret does not exist (unset variable, missing file, no such Vault path or AWS
    /// secret, a deleted version).
    NotFound,
    /// The source refused access (Vault 403, AWS `AccessDenied`, an unreadable file).
    Denied,
    /// The secret exists but cannot be used (empty, not UTF-8, not valid in an HTTP header,
    /// missing JSON field, malformed answer, bad configuration).
    Invalid,
    /// The source could not be reached or failed (connection, timeout, 5xx, sealed Vault).
    Unavailable,
}

impl SecretErrorKind {
    /// A short lowercase name (`not_found`, `denied`, `invalid`, `unavailable`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
            Self::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for SecretErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A secret source failed.
///
/// Its message never contains a secret: sources build it from names, paths, statuses and
/// the source's own error messages, and JSON parse errors are reduced to their category and
/// position (serde's messages can quote the offending value). It is `Clone` so that the
/// [`KeyRing`](crate::KeyRing) can keep the last one and hand it to every caller.
#[derive(Clone, thiserror::Error)]
#[error("{message}")]
pub struct SecretError {
    kind: SecretErrorKind,
    message: Cow<'static, str>,
    #[source]
    cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl SecretError {
    /// A new error.
    pub fn new(kind: SecretErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            cause: None,
        }
    }

    /// Attaches the underlying cause (a transport error; never one that may quote a secret).
    #[must_use]
    pub fn with_cause(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Arc::new(cause));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> SecretErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SecretError");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(c) = &self.cause {
            d.field("cause", &format_args!("{c}"));
        }
        d.finish()
    }
}

/// A JSON parse error reduced to what cannot quote the input: category, line and column.
#[cfg(any(feature = "vault", feature = "aws"))]
pub(crate) fn json_error(what: &str, e: &serde_json::Error) -> SecretError {
    let category = match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected structure",
        serde_json::error::Category::Eof => "unexpected end",
    };
    SecretError::new(
        SecretErrorKind::Invalid,
        format!(
            "{what} is not the expected JSON ({category} at line {} column {})",
            e.line(),
            e.column()
        ),
    )
}

/// Reads the string field `field` of the JSON object `json` and nothing else: the other
/// members are skipped without being copied, and errors never quote a value.
#[cfg(any(feature = "vault", feature = "aws"))]
pub(crate) fn json_string_field(
    what: &str,
    json: &str,
    field: &str,
) -> Result<SecretString, SecretError> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Seed<'a>(&'a str);

    enum Found {
        Missing,
        NotAString,
        Value(String),
    }

    /// A string, or a marker for any other JSON value (so a non-string never reaches an
    /// error message).
    struct MaybeString(Option<String>);

    impl<'de> serde::Deserialize<'de> for MaybeString {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = MaybeString;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MaybeString, E> {
                    Ok(MaybeString(Some(v.to_owned())))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<MaybeString, E> {
                    Ok(MaybeString(Some(v)))
                }
                fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_none<E: serde::de::Error>(self) -> Result<MaybeString, E> {
                    Ok(MaybeString(None))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<MaybeString, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(MaybeString(None))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(MaybeString(None))
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Found;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Found;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
            let mut found = Found::Missing;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == self.0 && matches!(found, Found::Missing) {
                    found = match map.next_value::<MaybeString>()? {
                        MaybeString(Some(v)) => Found::Value(v),
                        MaybeString(None) => Found::NotAString,
                    };
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }

    let mut de = serde_json::Deserializer::from_str(json);
    let found = Seed(field)
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|()| f))
        .map_err(|e| json_error(what, &e))?;
    match found {
        Found::Value(v) => secret_from_text(v).map_err(|e| {
            SecretError::new(
                e.kind(),
                format!("field `{field}` of {what}: {}", e.message()),
            )
        }),
        Found::Missing => Err(SecretError::new(
            SecretErrorKind::Invalid,
            format!("{what} has no field `{field}`"),
        )),
        Found::NotAString => Err(SecretError::new(
            SecretErrorKind::Invalid,
            format!("field `{field}` of {what} is not a string"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-ant-api03-SECRETVALUE-abcdefgh";

    #[test]
    fn fingerprint_is_short_and_stable() {
        let a = Fingerprint::of(KEY);
        let shown = a.to_string();
        assert_eq!(shown.len(), 8);
        assert!(shown.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, Fingerprint::of(KEY));
        assert_ne!(a, Fingerprint::of("other"));
        // b3sum of the key, first 8 digits.
        assert_eq!(
            shown,
            blake3::hash(KEY.as_bytes()).to_hex()[..8].to_string()
        );
        assert_eq!(format!("{a:?}"), format!("Fingerprint({shown})"));
    }

    #[test]
    fn debug_shows_no_value() {
        let s = Secret::new(KEY)
            .with_version("3")
            .with_created_at(SystemTime::UNIX_EPOCH);
        let d = format!("{s:?} {s:#?}");
        assert!(!d.contains("SECRETVALUE"), "{d}");
        assert!(d.contains(&s.fingerprint().to_string()));
        assert!(d.contains("\"3\""));
        assert_eq!(s.expose_secret(), KEY);
    }

    #[test]
    fn text_is_trimmed_and_must_not_be_empty() {
        let s = secret_from_text(format!("{KEY}\r\n")).unwrap();
        assert_eq!(s.expose_secret(), KEY);
        let s = secret_from_text(KEY.to_owned()).unwrap();
        assert_eq!(s.expose_secret(), KEY);
        let e = secret_from_text(" \n".to_owned()).unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::Invalid);
    }

    #[cfg(any(feature = "vault", feature = "aws"))]
    #[test]
    fn json_field_extraction_never_quotes_values() {
        let json = format!(r#"{{"other":{{"x":[1,2]}},"api_key":"{KEY}\n","n":5}}"#);
        let s = json_string_field("the secret", &json, "api_key").unwrap();
        assert_eq!(s.expose_secret(), KEY);

        let e = json_string_field("the secret", &json, "missing").unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::Invalid);
        assert!(e.message().contains("no field `missing`"));

        let e = json_string_field("the secret", &json, "n").unwrap_err();
        assert!(e.message().contains("not a string"), "{e}");

        // A JSON string (not an object) holding the key: serde would quote it.
        let e = json_string_field("the secret", &format!("\"{KEY}\""), "api_key").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("SECRETVALUE"), "{e:?}");
        // Not JSON at all.
        let e = json_string_field("the secret", KEY, "api_key").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("SECRETVALUE"), "{e:?}");
        // Trailing garbage.
        let e = json_string_field("the secret", &format!("{json} {KEY}"), "api_key").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("SECRETVALUE"), "{e:?}");
        assert_eq!(e.kind(), SecretErrorKind::Invalid);
    }
}
