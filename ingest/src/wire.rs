//! The JSON the seller's software sends and receives.
//!
//! Request shapes follow the AWS Metering Service (API 2016-01-14) so existing seller code only
//! changes its endpoint URL. Records are first split as raw JSON values, then parsed one by one:
//! a record with a wrong-typed field is refused alone (`InvalidRecord`) instead of failing its
//! batch, and the response echoes each record exactly as it was sent.
//!
//! Unknown fields are ignored (newer SDKs add fields such as `ClientToken`), except a field that
//! differs from a known one only by case (`"quantity"`): that is a typo that would otherwise lose
//! the value silently, so [`parse_record`] refuses it by name.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// `BatchMeterUsage` request: one product, up to the profile's batch size of records.
#[derive(Debug, Deserialize)]
pub struct BatchMeterUsageRequest<'a> {
    /// Product of every record in the call.
    #[serde(rename = "ProductCode", borrow)]
    pub product_code: Option<Cow<'a, str>>,
    /// The records, kept raw until each is parsed on its own. Required: an absent list is a
    /// validation error, not an empty call.
    #[serde(rename = "UsageRecords", borrow)]
    pub usage_records: Option<Vec<&'a RawValue>>,
}

/// One usage record as sent (`UsageRecord` in AWS's model, plus the native bulk fields).
#[derive(Debug, Deserialize)]
pub struct WireRecord<'a> {
    /// Event time: epoch seconds (what AWS SDKs send) or RFC 3339 text.
    #[serde(rename = "Timestamp", borrow, default, deserialize_with = "present")]
    pub timestamp: Option<&'a RawValue>,
    /// Legacy customer identifier.
    #[serde(rename = "CustomerIdentifier", borrow)]
    pub customer_identifier: Option<Cow<'a, str>>,
    /// AWS account id of the customer.
    #[serde(rename = "CustomerAWSAccountId", borrow)]
    pub customer_aws_account_id: Option<Cow<'a, str>>,
    /// Native bulk only: the catalogue's customer id.
    #[serde(rename = "CustomerId", borrow)]
    pub customer_id: Option<Cow<'a, str>>,
    /// Dimension API name (`UsageDimension` on `MeterUsage`).
    #[serde(rename = "Dimension", alias = "UsageDimension", borrow)]
    pub dimension: Option<Cow<'a, str>>,
    /// Quantity, kept as raw JSON so it is parsed exactly (`UsageQuantity` on `MeterUsage`).
    /// The previous model's integer field.
    #[serde(rename = "Quantity", alias = "UsageQuantity", borrow, default, deserialize_with = "present")]
    pub quantity: Option<&'a RawValue>,
    /// The current model's decimal quantity (`UsageQuantityAsDecimal` on `MeterUsage`), raw:
    /// a JSON number or decimal text, parsed exactly from its text.
    #[serde(
        rename = "QuantityAsDecimal",
        alias = "UsageQuantityAsDecimal",
        borrow,
        default,
        deserialize_with = "present"
    )]
    pub quantity_as_decimal: Option<&'a RawValue>,
    /// Allocations of the quantity to tag sets.
    #[serde(rename = "UsageAllocations", borrow)]
    pub usage_allocations: Option<Vec<WireAllocation<'a>>>,
    /// Native bulk and `MeterUsage`: the product of this record.
    #[serde(rename = "ProductCode", borrow)]
    pub product_code: Option<Cow<'a, str>>,
    /// Concurrent Agreements licence: the record is metered against the licence's agreement.
    #[serde(rename = "LicenseArn", borrow)]
    pub license_arn: Option<Cow<'a, str>>,
}

/// A present field as its raw JSON, `null` included: serde's `Option` reads `null` as absent,
/// and an absent quantity and a `null` one must be told apart (both are refused, by name).
fn present<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(d).map(Some)
}

/// One `UsageAllocation`.
#[derive(Debug, Deserialize)]
pub struct WireAllocation<'a> {
    /// Allocated quantity, raw.
    #[serde(rename = "AllocatedUsageQuantity", borrow, default, deserialize_with = "present")]
    pub allocated_usage_quantity: Option<&'a RawValue>,
    /// The current model's decimal allocated quantity (decimal text), raw.
    #[serde(rename = "AllocatedUsageQuantityAsDecimal", borrow, default, deserialize_with = "present")]
    pub allocated_usage_quantity_as_decimal: Option<&'a RawValue>,
    /// Tags; absent for the untagged bucket.
    #[serde(rename = "Tags", borrow)]
    pub tags: Option<Vec<WireTag<'a>>>,
}

/// One tag.
#[derive(Debug, Deserialize)]
pub struct WireTag<'a> {
    /// Tag key.
    #[serde(rename = "Key", borrow)]
    pub key: Cow<'a, str>,
    /// Tag value.
    #[serde(rename = "Value", borrow)]
    pub value: Cow<'a, str>,
}

/// The `MeterUsage`-only fields; the record fields themselves parse as a [`WireRecord`]
/// (`UsageDimension` and `UsageQuantity` are its aliases).
#[derive(Debug, Deserialize)]
pub struct MeterUsageFlags {
    /// Permission check only: validate, store nothing, answer `DryRunOperation`.
    #[serde(rename = "DryRun", default)]
    pub dry_run: bool,
}

/// Field names of a usage record in any shape (AWS `UsageRecord`, `MeterUsage`, native bulk).
pub const RECORD_FIELDS: &[&str] = &[
    "Timestamp",
    "CustomerIdentifier",
    "CustomerAWSAccountId",
    "CustomerId",
    "Dimension",
    "UsageDimension",
    "Quantity",
    "UsageQuantity",
    "QuantityAsDecimal",
    "UsageQuantityAsDecimal",
    "UsageAllocations",
    "ProductCode",
    "LicenseArn",
    "DryRun",
    "ClientToken",
];

/// Collects an object's keys, skipping the values unparsed.
struct Keys<'a>(Vec<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Keys<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses one record (the error is the parser's reason, for the caller to prefix). Besides serde's own refusals (wrong types, a key given twice), refuses an
/// unknown key that equals a known one but for case, naming both: `"quantity": 250` must never
/// become a record without a quantity.
pub fn parse_record(raw: &str) -> Result<WireRecord<'_>, String> {
    let record: WireRecord<'_> = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    check_field_case(raw, RECORD_FIELDS)?;
    Ok(record)
}

/// Refuses keys of the JSON object `raw` that match one of `known` only case-insensitively.
pub fn check_field_case(raw: &str, known: &[&str]) -> Result<(), String> {
    let Keys(keys) = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    for k in &keys {
        if known.contains(&k.as_ref()) {
            continue;
        }
        if let Some(right) = known.iter().find(|n| n.eq_ignore_ascii_case(k)) {
            return Err(format!(
                "unknown field `{}`: field names are case-sensitive, did you mean `{right}`?",
                crate::validate::truncate(k, 64)
            ));
        }
    }
    Ok(())
}

/// One entry of `Results` in the `BatchMeterUsage` response.
#[derive(Debug, Serialize)]
pub struct UsageRecordResult<'a> {
    /// The record exactly as sent.
    #[serde(rename = "UsageRecord")]
    pub usage_record: &'a RawValue,
    /// Deterministic record id (same for an identical resend). Absent only when the record
    /// could not be parsed far enough to have one.
    #[serde(rename = "MeteringRecordId", skip_serializing_if = "Option::is_none")]
    pub metering_record_id: Option<String>,
    /// `Success`, `DuplicateRecord`, `CustomerNotSubscribed`; with the per-record opt-in also
    /// another rejection code.
    #[serde(rename = "Status")]
    pub status: &'static str,
    /// Meterline extension: why a record was not a `Success`.
    #[serde(rename = "Reason", skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `BatchMeterUsage` response.
#[derive(Debug, Serialize)]
pub struct BatchMeterUsageResponse<'a> {
    /// One result per processed record, in request order.
    #[serde(rename = "Results")]
    pub results: Vec<UsageRecordResult<'a>>,
    /// Records to resend as they are (transient failures). Meterline answers 503 for the whole
    /// call instead, so this is always empty; kept for the response shape SDKs expect.
    #[serde(rename = "UnprocessedRecords")]
    pub unprocessed_records: Vec<&'a RawValue>,
}

/// Result of one line of the native bulk endpoint.
#[derive(Debug, Serialize)]
pub struct BulkResult {
    /// 1-based line number in the request body.
    #[serde(rename = "Line")]
    pub line: usize,
    /// Deterministic record id.
    #[serde(rename = "MeteringRecordId", skip_serializing_if = "Option::is_none")]
    pub metering_record_id: Option<String>,
    /// Status as in `BatchMeterUsage`.
    #[serde(rename = "Status")]
    pub status: &'static str,
    /// Why it was not a `Success`.
    #[serde(rename = "Reason", skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The native bulk response.
#[derive(Debug, Serialize)]
pub struct BulkResponse {
    /// Records answered `Success` (new or identical resends).
    #[serde(rename = "Accepted")]
    pub accepted: usize,
    /// Records refused (any other status).
    #[serde(rename = "Refused")]
    pub refused: usize,
    /// Per-line results, in order.
    #[serde(rename = "Results")]
    pub results: Vec<BulkResult>,
}

/// An AWS-style error body (`__type` + `message`).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// Exception name, e.g. `InvalidProductCodeException`.
    #[serde(rename = "__type")]
    pub kind: String,
    /// What went wrong.
    pub message: String,
}
