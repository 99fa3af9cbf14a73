//! Exact money: ISO-4217 currencies and `rust_decimal` amounts.
//!
//! Every amount carries its currency; amounts in different currencies are never added
//! (domain-rules §4.2). Arithmetic is exact; rounding happens once, per invoice line, half-up to the
//! currency's minor unit ([`round_to_minor`]), and the unrounded amount is always kept beside it.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// An ISO-4217 currency code, three upper-case ASCII letters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

/// Currencies we know the minor unit of (ISO 4217). The marketplace currencies of domain-rules
/// BIL-3 plus a few storefront currencies a Softline-style profile uses; others must be declared
/// in the price book with their minor unit.
const KNOWN_MINOR_UNITS: &[(&str, u32)] = &[
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("AUD", 2),
    ("JPY", 0),
    ("INR", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("SEK", 2),
    ("NOK", 2),
    ("DKK", 2),
    ("PLN", 2),
    ("BRL", 2),
    ("MXN", 2),
    ("KZT", 2),
    ("RUB", 2),
    ("TRY", 2),
    ("KRW", 0),
    ("CLP", 0),
    ("BHD", 3),
    ("KWD", 3),
];

impl Currency {
    /// US dollars.
    pub const USD: Currency = Currency(*b"USD");

    /// Parses a three-letter upper-case code. Whether it is a currency the price book may use is
    /// decided by [`Currency::minor_units`].
    pub fn new(code: &str) -> Result<Self, String> {
        let b = code.as_bytes();
        if b.len() != 3 || !b.iter().all(u8::is_ascii_uppercase) {
            return Err(format!("`{code}` is not an ISO-4217 currency code (three upper-case letters)"));
        }
        Ok(Currency([b[0], b[1], b[2]]))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Constructed only from ASCII upper-case letters.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Decimal places of the minor unit (USD 2, JPY 0, KWD 3), if the code is known.
    pub fn minor_units(&self) -> Option<u32> {
        KNOWN_MINOR_UNITS.iter().find(|(c, _)| c.as_bytes() == self.0).map(|(_, u)| *u)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An exact amount in a currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// The amount, exact (never rounded unless it is a rounded invoice figure).
    pub amount: Decimal,
    /// What the amount is in.
    pub currency: Currency,
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// Rounds half-up (away from zero at exactly half, as invoices do) to `minor_units` places.
/// `0.005 → 0.01`, `-0.005 → -0.01`, `0.0000072 → 0.00`.
pub fn round_to_minor(amount: Decimal, minor_units: u32) -> Decimal {
    let mut r = amount.round_dp_with_strategy(minor_units, RoundingStrategy::MidpointAwayFromZero);
    // Keep a fixed scale so that `1` prints as `1.00` on an invoice.
    r.rescale(minor_units);
    r
}

/// Parses an exact decimal from text; rejects anything that is not plain decimal notation.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    Decimal::from_str_exact(s.trim()).map_err(|e| format!("`{s}` is not an exact decimal: {e}"))
}

/// Number of decimal places actually used (trailing zeros ignored): `0.0140 → 3`.
pub fn decimal_places(d: Decimal) -> u32 {
    d.normalize().scale()
}

/// serde helper for decimals in human-written files: accepts a string (`"0.014"`) or an integer,
/// refuses floating-point literals, which would not be exact.
pub mod decimal_text {
    use super::*;
    use serde::de::{self, Visitor};

    /// Writes the decimal as a string.
    pub fn serialize<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }

    /// Reads a string or an integer; a float is an error naming the value.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Decimal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal written as a string, e.g. \"0.014\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
                parse_decimal(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
                Ok(Decimal::from(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
                Ok(Decimal::from(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
                Err(E::custom(format!(
                    "{v} is a floating-point number; write money and rates as strings (\"{v}\") so they stay exact"
                )))
            }
        }
        // Binary codecs (the topic payloads) are not self-describing: ask for the string.
        if d.is_human_readable() {
            d.deserialize_any(V)
        } else {
            d.deserialize_str(V)
        }
    }
}

/// Like [`decimal_text`] for `Option<Decimal>`.
pub mod opt_decimal_text {
    use super::*;

    /// Writes the decimal as a string, or nothing.
    pub fn serialize<S: Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.to_string()),
            None => s.serialize_none(),
        }
    }

    /// Reads an optional string or integer decimal.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "decimal_text")] Decimal);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

impl FromStr for Currency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Currency::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        parse_decimal(s).unwrap()
    }

    #[test]
    fn rounds_half_up_to_minor_units() {
        assert_eq!(round_to_minor(d("1011.695"), 2).to_string(), "1011.70");
        assert_eq!(round_to_minor(d("0.005"), 2).to_string(), "0.01");
        assert_eq!(round_to_minor(d("0.0049999"), 2).to_string(), "0.00");
        assert_eq!(round_to_minor(d("-0.005"), 2).to_string(), "-0.01");
        assert_eq!(round_to_minor(d("1"), 2).to_string(), "1.00");
        assert_eq!(round_to_minor(d("1234.5"), 0).to_string(), "1235");
    }

    #[test]
    fn tiny_rate_month_rounds_to_zero_not_negative() {
        let amount = Decimal::from(720) * d("0.00000001");
        assert_eq!(amount.to_string(), "0.00000720");
        assert_eq!(round_to_minor(amount, 2).to_string(), "0.00");
    }

    #[test]
    fn currency_codes_are_checked() {
        assert_eq!(Currency::new("USD").unwrap().minor_units(), Some(2));
        assert_eq!(Currency::new("JPY").unwrap().minor_units(), Some(0));
        assert!(Currency::new("usd").is_err());
        assert!(Currency::new("US").is_err());
        assert_eq!(Currency::new("XYZ").unwrap().minor_units(), None);
    }

    #[test]
    fn decimal_places_ignore_trailing_zeros() {
        assert_eq!(decimal_places(d("0.0140")), 3);
        assert_eq!(decimal_places(d("0.00000001")), 8);
        assert_eq!(decimal_places(d("5")), 0);
    }

    #[test]
    fn floats_are_refused_in_files() {
        #[derive(Deserialize)]
        struct R {
            #[serde(with = "decimal_text")]
            rate: Decimal,
        }
        let ok: R = serde_json::from_str(r#"{"rate":"0.014"}"#).unwrap();
        assert_eq!(ok.rate, d("0.014"));
        let err = serde_json::from_str::<R>(r#"{"rate":0.014}"#).err().unwrap().to_string();
        assert!(err.contains("floating-point"), "{err}");
    }
}
