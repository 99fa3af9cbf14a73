//! Why a usage record was refused, by name (design guarantee 5).
//!
//! A [`Rejection`] is a value, not an error: one bad record never disturbs its neighbours. The
//! [`RejectCode`] is what the API returns as the record's `Status` and what metrics and the
//! rejected-records table count by; the message says what exactly was wrong with which field.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The reason class of a refused record. Names follow the AWS Metering exception a seller's code
/// already knows, minus the `Exception` suffix; `DuplicateRecord` and `CustomerNotSubscribed` are
/// AWS's own per-record statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// Same (product, customer, dimension, hour) already accepted with another quantity or other
    /// allocations; the first record stands.
    DuplicateRecord,
    /// Unknown customer, or no agreement for this product covering the record's hour.
    CustomerNotSubscribed,
    /// Product unknown.
    InvalidProductCode,
    /// Dimension not published on the product (names are case-sensitive).
    InvalidUsageDimension,
    /// Neither or both of `CustomerIdentifier`/`CustomerAWSAccountId`, or a malformed one.
    InvalidCustomerIdentifier,
    /// Outside the acceptance window, in the future, or outside the agreement's active period.
    TimestampOutOfBounds,
    /// Negative, too large, fractional where integers are required, or not a number.
    InvalidQuantity,
    /// Allocations that do not sum to the quantity, repeat a tag set, or exceed 2,500.
    InvalidUsageAllocations,
    /// A tag key or value that is empty, too long, uses a forbidden character, or more than 5 tags.
    InvalidTag,
    /// The record itself is malformed (wrong type, missing field) in a bulk request.
    InvalidRecord,
    /// The customer's offer has no price for this dimension at this hour.
    NotPriced,
    /// `LicenseArn` unknown, of another product or customer, or outside the licence's active
    /// period (AWS `InvalidLicenseException`). Last, so encoded older codes keep their index.
    InvalidLicense,
}

impl RejectCode {
    /// Every code, for reports that list zero counts too.
    pub const ALL: [RejectCode; 12] = [
        RejectCode::DuplicateRecord,
        RejectCode::CustomerNotSubscribed,
        RejectCode::InvalidProductCode,
        RejectCode::InvalidUsageDimension,
        RejectCode::InvalidCustomerIdentifier,
        RejectCode::TimestampOutOfBounds,
        RejectCode::InvalidQuantity,
        RejectCode::InvalidUsageAllocations,
        RejectCode::InvalidTag,
        RejectCode::InvalidRecord,
        RejectCode::NotPriced,
        RejectCode::InvalidLicense,
    ];

    /// The name used as API status, metric label and table value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::DuplicateRecord => "DuplicateRecord",
            RejectCode::CustomerNotSubscribed => "CustomerNotSubscribed",
            RejectCode::InvalidProductCode => "InvalidProductCode",
            RejectCode::InvalidUsageDimension => "InvalidUsageDimension",
            RejectCode::InvalidCustomerIdentifier => "InvalidCustomerIdentifier",
            RejectCode::TimestampOutOfBounds => "TimestampOutOfBounds",
            RejectCode::InvalidQuantity => "InvalidQuantity",
            RejectCode::InvalidUsageAllocations => "InvalidUsageAllocations",
            RejectCode::InvalidTag => "InvalidTag",
            RejectCode::InvalidRecord => "InvalidRecord",
            RejectCode::NotPriced => "NotPriced",
            RejectCode::InvalidLicense => "InvalidLicense",
        }
    }

    /// Parses [`Self::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one record, as answered and counted: a new record and an identical resend are
/// both `Success` on the wire but are counted apart (only the first is charged); a refusal is
/// its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordStatus {
    /// New and charged.
    Success,
    /// An identical resend of an accepted record: `Success`, charged once.
    IdenticalResend,
    /// Refused, for this reason.
    Refused(RejectCode),
}

impl RecordStatus {
    /// The name it is counted under (the store's `ingest_counts`, `meterline rate`'s counts).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Success => "Success",
            RecordStatus::IdenticalResend => "Success (identical resend)",
            RecordStatus::Refused(code) => code.as_str(),
        }
    }
}

impl fmt::Display for RecordStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused record's reason: the class and a sentence naming the field and value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// Reason class.
    pub code: RejectCode,
    /// What exactly was wrong, for the seller's logs.
    pub message: String,
}

impl Rejection {
    /// A rejection of class `code` with a message.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Rejection { code, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
