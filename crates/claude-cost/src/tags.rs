//! [`CostTags`]: free-form attribution of a request (feature, customer, experiment).

use std::fmt;
use std::sync::Arc;

/// Tags attributing a request's cost (a request extension read by [`CostLayer`]).
///
/// The report has one line per `key=value` pair ([`CostReport::by_tag`]); a request with
/// two tags counts in both lines. Tags are not metric labels (their cardinality is the
/// application's), and a key set twice keeps the last value. Cheap to clone.
///
/// ```
/// use claude_cost::CostTags;
///
/// let req = http::Request::post("/v1/messages")
///     .extension(CostTags::new().with("feature", "summarize").with("customer", "c-42"))
///     .body(bytes::Bytes::new())?;
/// let tags = req.extensions().get::<CostTags>().ok_or("no tags")?;
/// assert_eq!(tags.get("feature"), Some("summarize"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`CostLayer`]: crate::CostLayer
/// [`CostReport::by_tag`]: crate::CostReport::by_tag
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CostTags(Arc<Vec<(Arc<str>, Arc<str>)>>);

impl CostTags {
    /// No tags.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a tag.
    #[must_use]
    pub fn with(mut self, key: impl Into<Arc<str>>, value: impl Into<Arc<str>>) -> Self {
        let (key, value) = (key.into(), value.into());
        let v = Arc::make_mut(&mut self.0);
        match v.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => v.push((key, value)),
        }
        self
    }

    /// The value of a tag.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }

    /// Every tag, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The number of tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no tags.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for CostTags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_and_iterate() {
        let t = CostTags::new().with("a", "1").with("b", "2").with("a", "3");
        assert_eq!(t.iter().collect::<Vec<_>>(), [("a", "3"), ("b", "2")]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("c"), None);
        assert_eq!(format!("{t:?}"), r#"{"a": "3", "b": "2"}"#);
        let u = t.clone().with("c", "4");
        assert_eq!(t.len(), 2, "clones do not share edits");
        assert_eq!(u.len(), 3);
    }
}
