//! UTC calendar arithmetic for budget windows and daily reports, without a date crate.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar day, as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Day(pub(crate) i64);

/// A UTC calendar month, as `year × 12 + month − 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Month(pub(crate) i64);

impl Day {
    pub(crate) fn of(t: SystemTime) -> Self {
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => {
                // Before 1970: round towards the earlier day.
                let s = i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX);
                let s = if e.duration().subsec_nanos() > 0 {
                    s.saturating_add(1)
                } else {
                    s
                };
                -s
            }
        };
        Self(secs.div_euclid(86_400))
    }

    /// (year, month 1–12, day 1–31), by Howard Hinnant's `civil_from_days`.
    pub(crate) fn civil(self) -> (i64, u32, u32) {
        let z = self.0.saturating_add(719_468);
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d)
    }

    pub(crate) fn month(self) -> Month {
        let (y, m, _) = self.civil();
        Month(y * 12 + i64::from(m) - 1)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let y = self.0.div_euclid(12);
        let m = self.0.rem_euclid(12) + 1;
        write!(f, "{y:04}-{m:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn calendar() {
        assert_eq!(Day::of(at(0)).to_string(), "1970-01-01");
        assert_eq!(Day::of(at(86_399)).to_string(), "1970-01-01");
        assert_eq!(Day::of(at(86_400)).to_string(), "1970-01-02");
        // 2024-02-29T23:59:59Z = 1709251199 (leap day), then March.
        assert_eq!(Day::of(at(1_709_251_199)).to_string(), "2024-02-29");
        assert_eq!(Day::of(at(1_709_251_200)).to_string(), "2024-03-01");
        assert_eq!(Day::of(at(1_709_251_199)).month().to_string(), "2024-02");
        assert_eq!(Day::of(at(1_709_251_200)).month().to_string(), "2024-03");
        // 2025-12-31T23:59:59Z = 1767225599, then a new year.
        assert_eq!(Day::of(at(1_767_225_599)).to_string(), "2025-12-31");
        assert_eq!(Day::of(at(1_767_225_600)).month().to_string(), "2026-01");
        assert_eq!(
            Day::of(UNIX_EPOCH - Duration::from_secs(1)).to_string(),
            "1969-12-31"
        );
        // Every day for 1,000 years maps to a valid, increasing date.
        let mut prev = (0, 0, 0);
        for d in (-200_000..200_000).step_by(37) {
            let c = Day(d).civil();
            assert!(c > prev, "{d}");
            assert!((1..=12).contains(&c.1) && (1..=31).contains(&c.2));
            prev = c;
        }
    }
}
