//! Exact non-negative rational numbers for privacy budgets (epsilon): written as `"1/10"`,
//! `"0.25"` or `"2"`, compared and added without rounding, so a budget is spent exactly.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative rational number in lowest terms (`den > 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rational {
    num: u64,
    den: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Why a text is not a rational.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not an exact non-negative number: write a fraction like 1/10 or a decimal like 0.1"
)]
pub struct NotRational(pub String);

impl Rational {
    pub const ZERO: Rational = Rational { num: 0, den: 1 };

    /// `num / den` in lowest terms; `None` when `den` is zero.
    pub fn new(num: u64, den: u64) -> Option<Rational> {
        if den == 0 {
            return None;
        }
        let divisor = gcd(num, den).max(1);
        Some(Rational {
            num: num / divisor,
            den: den / divisor,
        })
    }

    pub fn numerator(self) -> u64 {
        self.num
    }

    pub fn denominator(self) -> u64 {
        self.den
    }

    pub fn is_zero(self) -> bool {
        self.num == 0
    }

    /// The sum, or `None` if it does not fit in 64-bit terms.
    /// This value divided by `parts` (e.g. a budget shared between several tables).
    pub fn divided_by(self, parts: u64) -> Option<Rational> {
        Rational::new(self.numerator(), self.denominator().checked_mul(parts)?)
    }

    pub fn checked_add(self, other: Rational) -> Option<Rational> {
        let den = (self.den as u128) * (other.den as u128);
        let num =
            (self.num as u128) * (other.den as u128) + (other.num as u128) * (self.den as u128);
        let divisor = {
            let (mut a, mut b) = (num, den);
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a.max(1)
        };
        let (num, den) = (num / divisor, den / divisor);
        Some(Rational {
            num: u64::try_from(num).ok()?,
            den: u64::try_from(den).ok()?,
        })
    }

    /// The value as a float, for reports only (never for decisions).
    pub fn approximate(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Parses `"a/b"`, a decimal `"0.125"`, or a whole number.
    pub fn parse(text: &str) -> Result<Rational, NotRational> {
        let fail = || NotRational(text.to_string());
        let text_trimmed = text.trim();
        if let Some((num, den)) = text_trimmed.split_once('/') {
            let num: u64 = num.trim().parse().map_err(|_| fail())?;
            let den: u64 = den.trim().parse().map_err(|_| fail())?;
            return Rational::new(num, den).ok_or_else(fail);
        }
        let (whole, fraction) = text_trimmed.split_once('.').unwrap_or((text_trimmed, ""));
        if whole.is_empty() && fraction.is_empty()
            || !whole.bytes().all(|byte| byte.is_ascii_digit())
            || !fraction.bytes().all(|byte| byte.is_ascii_digit())
            || fraction.len() > 18
        {
            return Err(fail());
        }
        let den = 10u64.pow(fraction.len() as u32);
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| fail())?
        };
        let fraction: u64 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| fail())?
        };
        let num = whole
            .checked_mul(den)
            .and_then(|value| value.checked_add(fraction));
        Rational::new(num.ok_or_else(fail)?, den).ok_or_else(fail)
    }
}

impl Ord for Rational {
    fn cmp(&self, other: &Rational) -> Ordering {
        ((self.num as u128) * (other.den as u128)).cmp(&((other.num as u128) * (self.den as u128)))
    }
}

impl PartialOrd for Rational {
    fn partial_cmp(&self, other: &Rational) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

impl Serialize for Rational {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rational {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Rational, D::Error> {
        let text = String::deserialize(deserializer)?;
        Rational::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_and_decimals_parse_exactly_in_lowest_terms() {
        assert_eq!(
            Rational::parse("2/20").unwrap(),
            Rational::new(1, 10).unwrap()
        );
        assert_eq!(
            Rational::parse("0.1").unwrap(),
            Rational::new(1, 10).unwrap()
        );
        assert_eq!(Rational::parse("3").unwrap().to_string(), "3");
        assert_eq!(Rational::parse(".5").unwrap().to_string(), "1/2");
        for bad in ["", "-1", "1/0", "abc", "1.2.3", "1e-3", "."] {
            assert!(Rational::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_share_of_a_budget_is_exact_and_the_shares_add_back_up() {
        let epsilon = Rational::parse("1/10").unwrap();
        let share = epsilon.divided_by(21).unwrap();
        assert_eq!(share.to_string(), "1/210");
        let total = (0..21).try_fold(Rational::parse("0").unwrap(), |sum, _| {
            sum.checked_add(share)
        });
        assert_eq!(total, Some(epsilon));
        assert_eq!(epsilon.divided_by(0), None);
    }

    #[test]
    fn ten_tenths_add_up_to_exactly_one() {
        let tenth = Rational::parse("0.1").unwrap();
        let mut sum = Rational::ZERO;
        for _ in 0..10 {
            sum = sum.checked_add(tenth).unwrap();
        }
        assert_eq!(sum, Rational::new(1, 1).unwrap());
        assert!(Rational::parse("1/3").unwrap() < Rational::parse("0.34").unwrap());
    }
}
