//! The process environment.

use std::env::VarError;

use crate::secret::{Secret, SecretError, SecretErrorKind, secret_from_text};
use crate::source::{FetchFuture, SecretSource};

/// Reads the key from an environment variable, e.g. `ANTHROPIC_API_KEY`.
///
/// The variable is read at every fetch, so a process that changes its own environment is
/// seen; in practice an environment key changes with a restart, and this source is the
/// simplest one for development and for platforms that inject keys as variables. Surrounding
/// whitespace is trimmed. The source knows no version and no creation time.
///
/// Errors: [`SecretErrorKind::NotFound`] when the variable is unset,
/// [`SecretErrorKind::Invalid`] when it is empty or not UTF-8.
///
/// ```
/// use claude_secrets::{EnvSource, SecretSource};
///
/// let source = EnvSource::new("ANTHROPIC_API_KEY");
/// assert_eq!(source.name(), "env:ANTHROPIC_API_KEY");
/// ```
#[derive(Debug, Clone)]
pub struct EnvSource {
    var: String,
    name: String,
}

impl EnvSource {
    /// A source reading `var`.
    pub fn new(var: impl Into<String>) -> Self {
        let var = var.into();
        let name = format!("env:{var}");
        Self { var, name }
    }

    /// The variable's name.
    pub fn var(&self) -> &str {
        &self.var
    }

    fn read(&self) -> Result<Secret, SecretError> {
        match std::env::var(&self.var) {
            Ok(v) => secret_from_text(v).map(Secret::new).map_err(|e| {
                SecretError::new(
                    e.kind(),
                    format!("environment variable {}: {}", self.var, e.message()),
                )
            }),
            Err(VarError::NotPresent) => Err(SecretError::new(
                SecretErrorKind::NotFound,
                format!("environment variable {} is not set", self.var),
            )),
            Err(VarError::NotUnicode(_)) => Err(SecretError::new(
                SecretErrorKind::Invalid,
                format!("environment variable {} is not valid UTF-8", self.var),
            )),
        }
    }
}

impl SecretSource for EnvSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> FetchFuture<'_> {
        let res = self.read();
        Box::pin(async move { res })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Setting variables needs `unsafe` in edition 2024 (forbidden here): the integration
    // test `tests/env.rs` runs a child process with the variable set.
    #[tokio::test]
    async fn unset_variable_is_not_found() {
        let s = EnvSource::new("CLAUDE_SECRETS_SURELY_UNSET_6d1f0c");
        let e = s.fetch().await.unwrap_err();
        assert_eq!(e.kind(), SecretErrorKind::NotFound);
        assert!(e.message().contains("CLAUDE_SECRETS_SURELY_UNSET_6d1f0c"));
    }
}
