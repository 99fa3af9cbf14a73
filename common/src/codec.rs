//! The one codec for topic and store payloads: a format-version byte, then bincode 2 (serde).
//!
//! bincode 3.0.0 as published is an empty crate that only raises `compile_error!`, and upstream
//! is unmaintained (RUSTSEC-2025-0141), so 2.x is pinned here and nowhere else: swapping the format
//! touches this module only. The leading byte lets a reader refuse a payload it does not know
//! (dead-lettering it with that reason) instead of misreading it.

use serde::{de::DeserializeOwned, Serialize};

/// Current payload format.
pub const FORMAT_VERSION: u8 = 2;

/// Why a payload could not be decoded; undecodable messages go to the dead-letter path with this.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// Zero-length payload.
    #[error("empty payload")]
    Empty,
    /// Written by a format this build does not know.
    #[error("payload format version {found}, this build reads {FORMAT_VERSION}")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// The body does not decode.
    #[error("payload does not decode: {0}")]
    Body(String),
    /// Bytes remain after the value.
    #[error("payload has {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    // Cap allocations a hostile payload can ask for.
    bincode::config::standard().with_limit::<{ 16 * 1024 * 1024 }>()
}

/// Encodes a value with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT_VERSION);
    // Encoding into a Vec fails only for types serde cannot express in bincode (none of ours).
    bincode::serde::encode_into_std_write(value, &mut out, config()).expect("domain types always encode");
    out
}

/// Decodes a payload written by [`encode`].
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = payload.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion { found: version });
    }
    let (value, read) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| CodecError::Body(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Trailing(body.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;
    use crate::usage::{Allocation, CustomerRef, Tag, UsageRecord};

    fn record() -> UsageRecord {
        UsageRecord {
            seller: "acme".into(),
            product: "acme-analytics".into(),
            customer: "c1".into(),
            customer_ref: CustomerRef::AwsAccountId,
            dimension: "users".into(),
            timestamp: Timestamp(1_790_000_000_000),
            quantity: "12.5".parse().unwrap(),
            allocations: vec![Allocation {
                tags: vec![Tag { key: "team".into(), value: "a".into() }],
                quantity: "12.5".parse().unwrap(),
            }],
            received_at: Timestamp(1_790_000_001_000),
        }
    }

    #[test]
    fn usage_record_roundtrips() {
        let r = record();
        let bytes = encode(&r);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<UsageRecord>(&bytes).unwrap(), r);
    }

    #[test]
    fn every_price_model_roundtrips_inside_a_rated_record() {
        use crate::pricing::{Package, PerDuration, Tier, UsagePrice};
        use crate::rated::{ChargeType, RatedRecord};
        let d = |s: &str| s.parse().unwrap();
        let prices = [
            None,
            Some(UsagePrice::Graduated(vec![
                Tier { up_to: Some(d("10")), rate: d("0.5") },
                Tier { up_to: None, rate: d("0.1") },
            ])),
            Some(UsagePrice::Volume(vec![Tier { up_to: None, rate: d("0.25") }])),
            Some(UsagePrice::Package(Package { size: d("100"), price: d("5") })),
            Some(UsagePrice::PerDuration(PerDuration {
                rate: d("6"),
                per: d("3600"),
                increment: d("1"),
                minimum: d("60"),
            })),
            Some(UsagePrice::Byol),
        ];
        for month_price in prices {
            let r = RatedRecord {
                record_id: crate::id::RecordId(7),
                dedup_key: crate::id::DedupKey(9),
                seller: "s".into(),
                product: "p".into(),
                customer: "c".into(),
                dimension: "d".into(),
                hour: crate::time::Hour(500_000),
                quantity: d("3"),
                covered_quantity: d("1"),
                billable_quantity: d("2"),
                unit_rate: d("0.5"),
                currency: crate::money::Currency::USD,
                amount: d("1.0"),
                month_price,
                pricing_model: "m".into(),
                booked_month: Some(crate::time::Month { year: 2026, month: 11 }),
                charge_type: ChargeType::Usage,
                agreement_id: "a".into(),
                offer_id: "o".into(),
                price_book_version: "v".into(),
                allocations: vec![],
            };
            assert_eq!(decode::<RatedRecord>(&encode(&r)).unwrap(), r);
            // A record encoded before `allocations` existed (the same bytes without the empty
            // list's length) still decodes, with no allocations.
            let current = encode(&r);
            assert!(r.allocations.is_empty() && current.last() == Some(&0));
            assert!(decode::<RatedRecord>(&current[..current.len() - 1]).is_err());
            assert_eq!(crate::rated::decode(&current[..current.len() - 1]).unwrap(), r);
        }
    }

    #[test]
    fn unknown_version_empty_and_garbage_are_named() {
        let mut bytes = encode(&record());
        bytes[0] = 9;
        assert_eq!(decode::<UsageRecord>(&bytes), Err(CodecError::UnknownVersion { found: 9 }));
        assert_eq!(decode::<UsageRecord>(&[]), Err(CodecError::Empty));
        assert!(matches!(decode::<UsageRecord>(&[FORMAT_VERSION, 0xff, 0xff]), Err(CodecError::Body(_))));
        let mut long = encode(&record());
        long.push(0);
        assert_eq!(decode::<UsageRecord>(&long), Err(CodecError::Trailing(1)));
    }
}
