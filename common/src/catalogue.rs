//! The price book: everything rating needs, as data (domain-rules §0, §3; docs/price-book.md).
//!
//! One document holds the marketplace profile, the sellers (with their hashed API keys), the
//! products and their ≤ 24 dimensions, the offers with effective-dated prices, the customers and
//! their agreements (including annual coverage for the Y−X rule). It is read from TOML or JSON,
//! validated as a whole ([`PriceBook::from_toml`] / [`PriceBook::from_json`]), and then indexed for
//! the lookups the ingest and rating cores make on every record.
//!
//! Pricing models are tagged variants of [`UsagePrice`], so new models (tiers, packages,
//! contracts …) are new variants and new fields, never a new file format.
//!
//! Layout, by concern: `types` (the document as written), `validate` (the rules checked at load,
//! and the indexes built from a document that passed), `lookup` (what the cores ask per record),
//! and rules with their own module: `annual` (annual purchases and their price-change rules),
//! `entitlement` (how a contract's entitlement meets metered usage; BYOL's paid option) and
//! `refund` (refunds' load-time rules). This file holds the error, the indexed [`PriceBook`] and
//! its loaders.

use crate::money::{decimal_places, decimal_text, opt_decimal_text, Currency};
pub use crate::pricing::UsagePrice;
use crate::time::{parse_duration_ms, Hour, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

mod annual;
pub mod change;
mod live;
pub use live::LiveBook;
mod entitlement;
mod lookup;
mod refund;
mod types;
mod validate;
pub use annual::{annual_purchase, AnnualPrice, AnnualPurchase, AnnualTerm};
pub use entitlement::ContractUsage;
pub use refund::Refund;
pub use types::*;
pub use validate::contract_value;

/// The most dimensions a product may have (PRC-3).
pub const MAX_DIMENSIONS: usize = 24;
/// Longest dimension API name the catalogue accepts (PRC-4).
pub const MAX_DIMENSION_KEY_LEN: usize = 15;

/// Why a price book was refused. Each names the entity and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogueError {
    /// The file could not be read.
    #[error("reading price book {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The document does not parse.
    #[error("parsing price book: {0}")]
    Parse(String),
    /// The document parses but breaks a rule.
    #[error("invalid price book: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> CatalogueError {
    CatalogueError::Invalid(msg.into())
}

/// A validated, indexed price book. Cheap lookups for the per-record cores.
#[derive(Debug)]
pub struct PriceBook {
    doc: PriceBookDoc,
    windows: Windows,
    product_by_code: HashMap<String, usize>,
    /// Per product: dimension key → index.
    dimension_by_key: Vec<HashMap<String, usize>>,
    offer_by_id: HashMap<String, usize>,
    agreement_by_id: HashMap<String, usize>,
    customer_by_id: HashMap<String, usize>,
    customer_by_identifier: HashMap<String, usize>,
    customer_by_account: HashMap<String, usize>,
    /// (customer id, product code) → agreement indexes sorted by start.
    /// customer → product → agreement indexes sorted by start (nested so the per-record lookup
    /// borrows its keys instead of allocating a tuple).
    agreements_by_customer_product: HashMap<String, HashMap<String, Vec<usize>>>,
    seller_by_key_hash: HashMap<[u8; 32], usize>,
    deployment_by_key_hash: HashMap<[u8; 32], usize>,
    agreement_by_license: HashMap<String, usize>,
}

/// The SHA-256 of an API key, as stored in `api_key_sha256`.
pub fn api_key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// What rating needs from the price book for one record.
#[derive(Debug, Clone, Copy)]
pub struct PriceLookup<'a> {
    /// The agreement in force.
    pub agreement: &'a Agreement,
    /// Its offer.
    pub offer: &'a Offer,
    /// The price version in force at the record's hour.
    pub version: &'a PriceVersion,
    /// The dimension's price.
    pub price: &'a UsagePrice,
}

impl PriceBook {
    /// Reads and validates a price book from a `.toml` or `.json` file.
    pub fn load(path: &Path) -> Result<Self, CatalogueError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogueError::Read { path: path.display().to_string(), source })?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        }
    }

    /// Parses and validates TOML.
    pub fn from_toml(text: &str) -> Result<Self, CatalogueError> {
        let doc: PriceBookDoc = toml::from_str(text).map_err(|e| CatalogueError::Parse(e.to_string()))?;
        Self::new(doc)
    }

    /// Parses and validates JSON.
    pub fn from_json(text: &str) -> Result<Self, CatalogueError> {
        let doc: PriceBookDoc = serde_json::from_str(text).map_err(|e| CatalogueError::Parse(e.to_string()))?;
        Self::new(doc)
    }

    /// The document as TOML (what `load` reads back).
    pub fn to_toml(&self) -> Result<String, CatalogueError> {
        toml::to_string_pretty(&self.doc).map_err(|e| CatalogueError::Parse(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
version = "test-1"

[marketplace]
id = "aws"
currency = "USD"
acceptance_window = "6h"
future_skew = "5m"
final_records_grace = "1h"
quantity = "integer"
max_batch_records = 25
max_request_bytes = 1048575
max_allocations = 2500
max_tags = 5
usage_rate_decimals = 8

[[sellers]]
id = "acme"
api_key_sha256 = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]

[[products]]
code = "acme-analytics"
seller = "acme"
delivery = "saas"
dimensions = [
  { key = "users", category = "users", unit = "user-hour" },
  { key = "gb_ingest", category = "data", unit = "GB" },
]

[[offers]]
id = "public"
product = "acme-analytics"
visibility = "public"
currency = "USD"
prices = [ { effective_from = "2020-01-01T00:00:00Z", usage = { users = { per_unit = "0.014" }, gb_ingest = { per_unit = "0.10" } } } ]

[[customers]]
id = "c1"
customer_identifier = "cid-1"
aws_account_id = "111122223333"

[[agreements]]
id = "agmnt-1"
customer = "c1"
product = "acme-analytics"
offer = "public"
start = "2020-01-01T00:00:00Z"
"#;

    #[test]
    fn sample_loads_and_resolves_customers_both_ways() {
        let b = PriceBook::from_toml(SAMPLE).unwrap();
        assert_eq!(b.customer_by_identifier("cid-1").unwrap().id, "c1");
        assert_eq!(b.customer_by_account("111122223333").unwrap().id, "c1");
        assert_eq!(b.seller_for_key("test").unwrap().id, "acme");
        assert!(b.seller_for_key("wrong").is_none());
        let p = b.price_at("c1", "acme-analytics", "users", Hour(500_000)).unwrap();
        assert_eq!(p.price, &UsagePrice::PerUnit("0.014".parse().unwrap()));
        assert!(b.dimension("acme-analytics", "Users").is_none(), "keys are case-sensitive");
    }

    #[test]
    fn twenty_fifth_dimension_is_refused() {
        let dims: Vec<String> = (0..25).map(|i| format!("{{ key = \"d{i}\", category = \"units\" }}")).collect();
        let text = SAMPLE.replace(
            "{ key = \"users\", category = \"users\", unit = \"user-hour\" },",
            &format!("{},", dims.join(",")),
        );
        let err = PriceBook::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("26 dimensions") && err.contains("at most 24"), "{err}");
    }

    #[test]
    fn rate_with_nine_decimals_is_refused_eight_accepted() {
        let ok = SAMPLE.replace("\"0.014\"", "\"0.00000001\"");
        PriceBook::from_toml(&ok).unwrap();
        let bad = SAMPLE.replace("\"0.014\"", "\"0.000000001\"");
        let err = PriceBook::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("9 decimal places"), "{err}");
    }

    #[test]
    fn sixteen_char_dimension_key_is_refused() {
        let bad = SAMPLE.replace("key = \"gb_ingest\"", "key = \"abcdefghijklmnop\"");
        let err = PriceBook::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("abcdefghijklmnop"), "{err}");
    }

    #[test]
    fn float_rate_is_refused_with_a_reason() {
        let bad = SAMPLE.replace("\"0.014\"", "0.014");
        let err = PriceBook::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("floating-point"), "{err}");
    }

    #[test]
    fn overlapping_agreements_are_refused() {
        let bad = format!(
            "{SAMPLE}\n[[agreements]]\nid = \"agmnt-2\"\ncustomer = \"c1\"\nproduct = \"acme-analytics\"\noffer = \"public\"\nstart = \"2021-01-01T00:00:00Z\"\n"
        );
        let err = PriceBook::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("overlapping agreements"), "{err}");
    }

    #[test]
    fn roundtrips_through_toml() {
        let b = PriceBook::from_toml(SAMPLE).unwrap();
        let again = PriceBook::from_toml(&b.to_toml().unwrap()).unwrap();
        assert_eq!(again.version(), "test-1");
    }
}
