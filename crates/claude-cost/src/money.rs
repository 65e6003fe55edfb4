//! Money as integers: [`Usd`] (nano-dollars) and [`TokenPrice`] (nano-dollars per token).
//!
//! # Why nano-dollars
//!
//! Every figure of the published price table (API reference §5.2), and every figure derived
//! from it by the batch discount (×0.5) and the long-context rates, is a whole number of
//! nano-dollars (10⁻⁹ USD) per token: a price of `$X` per million tokens is `X × 1000`
//! nano-dollars per token, so any price with at most three decimals per MTok is exact. The
//! smallest one, Haiku 3's batch cache read ($0.03 × 0.5 = $0.015/MTok), is 15 nano-dollars
//! per token. A request's cost is then `Σ tokens × price`, an exact integer: no float is
//! ever summed, and no rounding happens anywhere. Prices that would need a finer unit (a
//! user file with `$0.0005`/MTok, or a discount that does not divide a price exactly) are
//! refused when the file is loaded, never rounded.
//!
//! A `u64` of nano-dollars holds $18.4 billion; sums saturate instead of wrapping.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nano-dollars in one dollar.
pub const NANOS_PER_USD: u64 = 1_000_000_000;

/// An amount of US dollars, held exactly as an integer number of nano-dollars (10⁻⁹ USD).
///
/// `Display` writes it for people (`$12.50`, `$0.000015`); serde writes the same decimal
/// without the `$` as a string (`"12.50"`), so JSON keeps every nano-dollar, and reads a
/// string (`"12.5"`, `"$12.50"`) or a whole number of dollars (`10`). Arithmetic saturates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(u64);

impl Usd {
    /// Zero dollars.
    pub const ZERO: Self = Self(0);
    /// The largest amount representable.
    pub const MAX: Self = Self(u64::MAX);

    /// An amount of nano-dollars.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// A whole number of dollars (saturating).
    pub const fn from_dollars(dollars: u64) -> Self {
        Self(dollars.saturating_mul(NANOS_PER_USD))
    }

    /// The amount in nano-dollars.
    pub const fn nanos(self) -> u64 {
        self.0
    }

    /// Whether the amount is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self + rhs`, saturating at [`Usd::MAX`].
    #[must_use]
    pub const fn saturating_add(self, rhs: Self) -> Self {
        Self(self.0.saturating_add(rhs.0))
    }

    /// `self - rhs`, saturating at zero.
    #[must_use]
    pub const fn saturating_sub(self, rhs: Self) -> Self {
        Self(self.0.saturating_sub(rhs.0))
    }

    /// Parses a dollar amount: `"12.5"`, `"$12.50"`, `"0.000000001"` (at most nine decimals).
    pub fn parse(s: &str) -> Result<Self, DecimalError> {
        let t = s.trim();
        let t = t.strip_prefix('$').unwrap_or(t);
        Decimal::parse(t)?.scaled(9).map(Self)
    }
}

impl Add for Usd {
    type Output = Self;
    fn add(self, rhs: Self) -> Self {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Usd {
    fn add_assign(&mut self, rhs: Self) {
        *self = self.saturating_add(rhs);
    }
}

impl Sum for Usd {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, Add::add)
    }
}

impl FromStr for Usd {
    type Err = DecimalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Writes `nanos` as a decimal of dollars with at least two decimals and no trailing zeros
/// beyond them (`12.50`, `0.000000015`).
fn write_decimal(f: &mut fmt::Formatter<'_>, nanos: u64) -> fmt::Result {
    let whole = nanos / NANOS_PER_USD;
    let frac = nanos % NANOS_PER_USD;
    let digits = format!("{frac:09}");
    let trimmed = digits.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &digits[..2]
    } else {
        trimmed
    };
    write!(f, "{whole}.{frac}")
}

struct Plain(u64);

impl fmt::Display for Plain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decimal(f, self.0)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("${}", Plain(self.0)))
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&Plain(self.0))
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Usd;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a dollar amount as a string (\"12.50\") or a whole number of dollars")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Usd, E> {
                v.checked_mul(NANOS_PER_USD)
                    .map(Usd)
                    .ok_or_else(|| E::custom("amount too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Usd, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("an amount cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Usd, E> {
                Err(E::custom(
                    "write amounts with decimals as strings (\"12.50\"): floats are not exact",
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Usd, E> {
                Usd::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A price per token, held exactly as nano-dollars per token.
///
/// `Display` writes it per million tokens, as the price page does (`$0.30/MTok`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TokenPrice(u64);

impl TokenPrice {
    /// A price of `nanos` nano-dollars per token.
    pub const fn from_nanos_per_token(nanos: u64) -> Self {
        Self(nanos)
    }

    /// The price in nano-dollars per token.
    pub const fn nanos_per_token(self) -> u64 {
        self.0
    }

    /// Parses a price in dollars per million tokens (`"0.30"` is 300 nano-dollars per
    /// token). At most three decimals are exact; more are refused.
    pub fn per_mtok(s: &str) -> Result<Self, DecimalError> {
        Decimal::parse(s.trim())?.scaled(3).map(Self)
    }

    /// The cost of `tokens` tokens (saturating).
    pub fn times(self, tokens: u64) -> Usd {
        let n = u128::from(self.0) * u128::from(tokens);
        Usd(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// This price multiplied by an exact decimal factor, if the result is still a whole
    /// number of nano-dollars per token.
    pub(crate) fn scale(self, factor: Decimal) -> Option<Self> {
        let num = u128::from(self.0).checked_mul(factor.mantissa)?;
        let den = 10u128.checked_pow(factor.scale)?;
        if !num.is_multiple_of(den) {
            return None;
        }
        u64::try_from(num / den).ok().map(Self)
    }
}

impl fmt::Display for TokenPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // nanos per token × 1e6 tokens = nano-dollars per MTok... shown in dollars per MTok:
        // the value in dollars is self.0 / 1000.
        let whole = self.0 / 1000;
        let frac = self.0 % 1000;
        let s = if frac == 0 {
            format!("${whole}/MTok")
        } else {
            let d = format!("{frac:03}");
            let d = d.trim_end_matches('0');
            let d = if d.len() < 2 {
                format!("{d}0")
            } else {
                d.to_owned()
            };
            format!("${whole}.{d}/MTok")
        };
        f.pad(&s)
    }
}

/// A decimal number read without floats: `mantissa × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decimal {
    pub(crate) mantissa: u128,
    pub(crate) scale: u32,
}

impl Decimal {
    /// Parses `123`, `0.5`, `.5`, `1_000.25` (no sign, no exponent).
    pub(crate) fn parse(s: &str) -> Result<Self, DecimalError> {
        let bad = || DecimalError::Syntax(s.to_owned());
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let mut mantissa: u128 = 0;
        let mut scale = 0u32;
        let mut digits = 0usize;
        for (part, is_frac) in [(int, false), (frac, true)] {
            for b in part.bytes() {
                match b {
                    b'0'..=b'9' => {
                        mantissa = mantissa
                            .checked_mul(10)
                            .and_then(|m| m.checked_add(u128::from(b - b'0')))
                            .ok_or_else(|| DecimalError::TooLarge(s.to_owned()))?;
                        digits += 1;
                        if is_frac {
                            scale += 1;
                        }
                    }
                    b'_' if !is_frac => {}
                    _ => return Err(bad()),
                }
            }
        }
        if digits == 0 {
            return Err(bad());
        }
        // Drop trailing zeros of the fraction: "0.30" is as exact as "0.3".
        while scale > 0 && mantissa.is_multiple_of(10) {
            mantissa /= 10;
            scale -= 1;
        }
        Ok(Self { mantissa, scale })
    }

    /// The value in units of `10^-scale`, if it is a whole number of them.
    pub(crate) fn scaled(self, scale: u32) -> Result<u64, DecimalError> {
        if self.scale > scale {
            return Err(DecimalError::TooPrecise {
                value: self.to_string(),
                decimals: scale,
            });
        }
        let m = 10u128
            .checked_pow(scale - self.scale)
            .and_then(|p| self.mantissa.checked_mul(p))
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| DecimalError::TooLarge(self.to_string()))?;
        Ok(m)
    }

    /// `1 - self`, for a discount given as a fraction; `None` when above 1.
    pub(crate) fn one_minus(self) -> Option<Self> {
        let one = 10u128.checked_pow(self.scale)?;
        let m = one.checked_sub(self.mantissa)?;
        Some(Self {
            mantissa: m,
            scale: self.scale,
        })
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.mantissa.to_string();
        let scale = self.scale as usize;
        if scale == 0 {
            return f.write_str(&s);
        }
        let s = format!("{s:0>width$}", width = scale + 1);
        let (i, fr) = s.split_at(s.len() - scale);
        write!(f, "{i}.{fr}")
    }
}

/// A decimal that could not be read exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// Not a plain decimal number.
    #[error("`{0}` is not a decimal number (digits, an optional `.`, no sign or exponent)")]
    Syntax(String),
    /// More decimals than the unit can hold exactly.
    #[error("`{value}` has more than {decimals} decimals and cannot be held exactly")]
    TooPrecise {
        /// The value as read.
        value: String,
        /// The decimals the unit allows.
        decimals: u32,
    },
    /// Too large for the unit.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_mtok_is_exact() {
        for (s, nanos) in [
            ("5", 5_000),
            ("0.30", 300),
            ("0.3", 300),
            ("0.03", 30),
            ("0.015", 15),
            ("1.25", 1_250),
            ("22.50", 22_500),
            ("1_000", 1_000_000),
            (".5", 500),
        ] {
            assert_eq!(TokenPrice::per_mtok(s), Ok(TokenPrice(nanos)), "{s}");
        }
        assert!(matches!(
            TokenPrice::per_mtok("0.0005"),
            Err(DecimalError::TooPrecise { .. })
        ));
        for bad in ["", ".", "-1", "1e3", "1.2.3", "abc", "1,5"] {
            assert!(
                matches!(TokenPrice::per_mtok(bad), Err(DecimalError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            TokenPrice::per_mtok("99999999999999999999999999"),
            Err(DecimalError::TooLarge(_))
        ));
    }

    #[test]
    fn scaling_by_a_discount_is_exact_or_refused() {
        let half = Decimal::parse("0.5").unwrap().one_minus().unwrap();
        assert_eq!(TokenPrice(30).scale(half), Some(TokenPrice(15)));
        assert_eq!(TokenPrice(15).scale(half), None, "7.5 nano$ is not exact");
        assert_eq!(Decimal::parse("1.5").unwrap().one_minus(), None);
    }

    #[test]
    fn usd_display_and_parse() {
        assert_eq!(Usd::from_dollars(12).to_string(), "$12.00");
        assert_eq!(Usd::from_nanos(12_500_000_000).to_string(), "$12.50");
        assert_eq!(Usd::from_nanos(15).to_string(), "$0.000000015");
        assert_eq!(Usd::from_nanos(1_234_567).to_string(), "$0.001234567");
        assert_eq!(Usd::parse("$12.50"), Ok(Usd::from_nanos(12_500_000_000)));
        assert_eq!(Usd::parse("0.000000001"), Ok(Usd::from_nanos(1)));
        assert!(Usd::parse("0.0000000001").is_err());
        assert_eq!(format!("{:>8}", Usd::from_dollars(1)), "   $1.00");
    }

    #[test]
    fn usd_serde_is_lossless() {
        let v = Usd::from_nanos(123_456_789_012);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "\"123.456789012\"");
        assert_eq!(serde_json::from_str::<Usd>(&json).unwrap(), v);
        assert_eq!(
            serde_json::from_str::<Usd>("10").unwrap(),
            Usd::from_dollars(10)
        );
        assert!(
            serde_json::from_str::<Usd>("10.5").is_err(),
            "floats refused"
        );
        assert!(serde_json::from_str::<Usd>("-1").is_err());
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Usd::MAX + Usd::from_nanos(1), Usd::MAX);
        assert_eq!(Usd::ZERO.saturating_sub(Usd::from_nanos(1)), Usd::ZERO);
        assert_eq!(TokenPrice(u64::MAX).times(2), Usd::MAX);
        assert_eq!(
            TokenPrice(300).times(1_000_000),
            Usd::from_nanos(300_000_000)
        );
    }

    #[test]
    fn token_price_display() {
        assert_eq!(TokenPrice(300).to_string(), "$0.30/MTok");
        assert_eq!(TokenPrice(15).to_string(), "$0.015/MTok");
        assert_eq!(TokenPrice(5_000).to_string(), "$5/MTok");
        assert_eq!(TokenPrice(22_500).to_string(), "$22.50/MTok");
    }
}
