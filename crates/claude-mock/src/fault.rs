//! Fault plans: the scripted outcome of successive attempts of the same request.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The outcome of one attempt, one entry of a [`FaultPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `ok`: the normal answer.
    Ok,
    /// `400`..=`599`: an error response with this status and the matching Anthropic error
    /// type (see [`error_type_for_status`]).
    Status(u16),
    /// `reset`: the connection is closed without any response.
    Reset,
    /// `spendcap`: 429 `rate_limit_error` with
    /// `"details":{"error_code":"enforced_spend_limit_reached"}` and no `retry-after`.
    SpendCap,
    /// `stream_error`: the normal answer, but a streamed answer carries an `event: error`
    /// after `x-mock-stream-error-after` deltas (0, the first event, when that header is
    /// absent). A non-streaming request gets the status the error would have had (529 for
    /// `overloaded_error`).
    StreamError,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("ok"),
            Self::Status(code) => write!(f, "{code}"),
            Self::Reset => f.write_str("reset"),
            Self::SpendCap => f.write_str("spendcap"),
            Self::StreamError => f.write_str("stream_error"),
        }
    }
}

impl FromStr for Fault {
    type Err = FaultPlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let entry = s.trim();
        let fault = if entry.eq_ignore_ascii_case("ok") {
            Self::Ok
        } else if entry.eq_ignore_ascii_case("reset") {
            Self::Reset
        } else if entry.eq_ignore_ascii_case("spendcap") {
            Self::SpendCap
        } else if entry.eq_ignore_ascii_case("stream_error") {
            Self::StreamError
        } else {
            match entry.parse::<u16>() {
                Ok(code) if (400..=599).contains(&code) => Self::Status(code),
                _ => {
                    return Err(FaultPlanError {
                        entry: entry.to_owned(),
                    });
                }
            }
        };
        Ok(fault)
    }
}

/// A non-empty list of [`Fault`]s: attempt `k` of the same request gets entry `k`, and past
/// the end the last entry repeats (so `500` always fails and `529,ok` fails once).
///
/// Written as comma-separated entries, case-insensitive, spaces ignored:
/// `429,529,500,ok`, `reset,ok`, `spendcap`, `stream_error,ok`.
/// Cloning is cheap (the entries are shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FaultPlan {
    steps: Arc<[Fault]>,
}

impl FaultPlan {
    /// Parses a plan such as `"429,529,ok"`.
    ///
    /// # Errors
    ///
    /// An empty plan or an entry that is neither `ok`, `reset`, `spendcap`, `stream_error`
    /// nor a status in 400..=599.
    pub fn parse(spec: &str) -> Result<Self, FaultPlanError> {
        let steps = spec
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Fault>, _>>()?;
        Self::new(steps)
    }

    /// Builds a plan from its entries.
    ///
    /// # Errors
    ///
    /// When `steps` is empty.
    pub fn new(steps: impl IntoIterator<Item = Fault>) -> Result<Self, FaultPlanError> {
        let steps: Arc<[Fault]> = steps.into_iter().collect();
        if steps.is_empty() {
            return Err(FaultPlanError {
                entry: String::new(),
            });
        }
        Ok(Self { steps })
    }

    /// The entries, in attempt order.
    pub fn steps(&self) -> &[Fault] {
        &self.steps
    }

    /// The outcome of attempt `attempt` (0-based): the entry at that position, or the last
    /// entry past the end.
    pub fn outcome(&self, attempt: u64) -> Fault {
        let last = self.steps.len() - 1;
        let index = usize::try_from(attempt).map_or(last, |a| a.min(last));
        self.steps[index]
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{step}")?;
        }
        Ok(())
    }
}

impl FromStr for FaultPlan {
    type Err = FaultPlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A fault plan entry that does not parse (or an empty plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPlanError {
    entry: String,
}

impl fmt::Display for FaultPlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entry.is_empty() {
            f.write_str(
                "empty fault entry: expected ok, reset, spendcap, stream_error or a status 400-599",
            )
        } else {
            write!(
                f,
                "invalid fault entry `{}`: expected ok, reset, spendcap, stream_error or a status 400-599",
                self.entry
            )
        }
    }
}

impl std::error::Error for FaultPlanError {}

/// The Anthropic `error.type` the mock sends with an HTTP status.
///
/// 400 `invalid_request_error`, 401 `authentication_error`, 402 `billing_error`,
/// 403 `permission_error`, 404 `not_found_error`, 408 `timeout_error` (the API documents no
/// 408; the mock uses its timeout type), 409 `conflict_error`, 413 `request_too_large`,
/// 429 `rate_limit_error`, 504 `timeout_error`, 529 `overloaded_error`; any other 4xx
/// `invalid_request_error` and any other 5xx (500, 502, 503, ...) `api_error`.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// The message the mock writes for an error type it produces on its own.
pub(crate) fn default_message(error_type: &str) -> &'static str {
    match error_type {
        "authentication_error" => "invalid x-api-key",
        "billing_error" => "Your credit balance is too low to access the Anthropic API.",
        "permission_error" => {
            "Your API key does not have permission to use the specified resource."
        }
        "not_found_error" => "The requested resource could not be found.",
        "timeout_error" => "Request timed out.",
        "conflict_error" => "Conflict.",
        "request_too_large" => "Request exceeds the maximum allowed number of bytes.",
        "rate_limit_error" => {
            "Number of requests has exceeded your rate limit (scripted by x-mock-fault)."
        }
        "overloaded_error" => "Overloaded",
        "api_error" => "Internal server error",
        _ => "Invalid request (scripted by x-mock-fault).",
    }
}

/// The status a non-streaming request gets when the stream would have carried an
/// `event: error` of this type.
pub(crate) fn status_for_error_type(error_type: &str) -> u16 {
    match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "conflict_error" => 409,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "timeout_error" => 504,
        _ => 529,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_repeats_last_entry() {
        let plan = FaultPlan::parse(" 429, 529 ,OK").unwrap();
        assert_eq!(
            plan.steps(),
            &[Fault::Status(429), Fault::Status(529), Fault::Ok]
        );
        assert_eq!(plan.outcome(0), Fault::Status(429));
        assert_eq!(plan.outcome(2), Fault::Ok);
        assert_eq!(plan.outcome(99), Fault::Ok);
        assert_eq!(plan.to_string(), "429,529,ok");
        let all = FaultPlan::parse("reset,spendcap,stream_error,500").unwrap();
        assert_eq!(all.to_string(), "reset,spendcap,stream_error,500");
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(FaultPlan::parse("").is_err());
        assert!(FaultPlan::parse("429,").is_err());
        assert!(FaultPlan::parse("200").is_err());
        assert!(FaultPlan::parse("600").is_err());
        assert!(FaultPlan::parse("boom").is_err());
        assert!(FaultPlan::new([]).is_err());
        let err = FaultPlan::parse("ok,teapot").unwrap_err();
        assert!(err.to_string().contains("teapot"));
    }

    #[test]
    fn maps_status_to_type() {
        assert_eq!(error_type_for_status(400), "invalid_request_error");
        assert_eq!(error_type_for_status(418), "invalid_request_error");
        assert_eq!(error_type_for_status(402), "billing_error");
        assert_eq!(error_type_for_status(503), "api_error");
        assert_eq!(error_type_for_status(504), "timeout_error");
        assert_eq!(error_type_for_status(529), "overloaded_error");
        assert_eq!(status_for_error_type("overloaded_error"), 529);
        assert_eq!(status_for_error_type("api_error"), 500);
    }
}
