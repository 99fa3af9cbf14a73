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

use crate::money::{decimal_places, decimal_text, Currency};
use crate::time::{parse_duration_ms, Hour, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

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

/// Whether quantities must be integers (AWS) or may be decimals (own profiles).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantityKind {
    /// Integers 0…2,147,483,647 (AWS profile).
    Integer,
    /// Non-negative decimals with at most 9 decimal places.
    Decimal,
}

/// The rules of a marketplace (AWS-compatible or a Softline-style one). Every parameter is
/// explicit: nothing is inherited silently from the AWS defaults (edge case 59).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketplaceProfile {
    /// Profile id, e.g. `aws` or `softline`.
    pub id: String,
    /// Listing currency of public offers.
    pub currency: Currency,
    /// How long after its hour a record is still accepted, e.g. `6h` (MET-7).
    pub acceptance_window: String,
    /// Clock skew tolerated for records from the current hour's future, e.g. `5m`.
    pub future_skew: String,
    /// After an agreement ends, how long final records are still accepted, e.g. `1h` (MET-8).
    pub final_records_grace: String,
    /// Integer or decimal quantities.
    pub quantity: QuantityKind,
    /// Most records per `BatchMeterUsage` call (AWS: 25).
    pub max_batch_records: usize,
    /// Request body limit of the AWS-shaped endpoints in bytes (AWS: < 1 MB).
    pub max_request_bytes: usize,
    /// Most allocations per record (AWS: 2,500).
    pub max_allocations: usize,
    /// Most tags per allocation (AWS: 5).
    pub max_tags: usize,
    /// Most decimal places of a usage rate (AWS since 2025: 8).
    pub usage_rate_decimals: u32,
}

/// Acceptance rules of a profile in milliseconds, parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Acceptance window after the record's hour.
    pub acceptance_ms: i64,
    /// Future skew allowed.
    pub future_skew_ms: i64,
    /// Grace after an agreement's end.
    pub final_grace_ms: i64,
}

/// A seller (ISV or reseller) that may meter its own products.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seller {
    /// Seller id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// SHA-256 (hex) of each API key the seller may use; the keys themselves are never stored.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
}

impl fmt::Debug for Seller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seller").field("id", &self.id).field("keys", &self.api_key_sha256.len()).finish()
    }
}

/// The kind of usage a dimension measures (PRC-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageCategory {
    /// Users.
    Users,
    /// Hosts / instances (instance types for the Y−X rule).
    Hosts,
    /// Bandwidth.
    Bandwidth,
    /// Data volume.
    Data,
    /// Tiers.
    Tiers,
    /// Requests.
    Requests,
    /// Generic units.
    Units,
}

/// A priced dimension of a product.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// API name sellers meter against (case-sensitive, ≤ 15 chars of `[A-Za-z0-9_]`).
    pub key: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Usage category.
    pub category: UsageCategory,
    /// Unit shown on invoices, e.g. `user-hour`.
    #[serde(default)]
    pub unit: String,
}

/// How a product is delivered (domain-rules 0.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Software as a service.
    Saas,
    /// Machine image.
    Ami,
    /// Container.
    Container,
    /// Machine-learning model.
    Ml,
}

/// A product and its published dimensions.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Product code (`ProductCode` on the API).
    pub code: String,
    /// Owning seller id.
    pub seller: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Delivery type.
    pub delivery: Delivery,
    /// Up to 24 dimensions.
    pub dimensions: Vec<Dimension>,
}

/// Whether anyone may subscribe (public) or only named buyers (private).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Public listing.
    Public,
    /// Private offer for named customers.
    Private,
}

/// The price of one usage dimension. A tagged variant per pricing model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum UsagePrice {
    /// A rate per unit per hour (PRC-13, PRC-10); hourly instance prices use this too, and
    /// annual coverage (Y−X) nets the quantity before the rate applies.
    PerUnit(#[serde(with = "decimal_text")] Decimal),
}

/// One effective-dated version of an offer's prices.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceVersion {
    /// First instant these prices apply.
    #[serde(with = "crate::time::rfc3339")]
    pub effective_from: Timestamp,
    /// Usage prices by dimension key.
    pub usage: std::collections::BTreeMap<String, UsagePrice>,
}

/// An offer: terms under which customers buy a product.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// Offer id.
    pub id: String,
    /// Product code.
    pub product: String,
    /// Public or private.
    pub visibility: Visibility,
    /// Currency of every price in the offer.
    pub currency: Currency,
    /// For private offers: the customer ids it is extended to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buyers: Vec<String>,
    /// Price versions, any order in the file; sorted by `effective_from` on load.
    pub prices: Vec<PriceVersion>,
}

/// A buyer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    /// Catalogue customer id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Legacy AWS `CustomerIdentifier`, if the customer is known by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_identifier: Option<String>,
    /// AWS account id (digits), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_account_id: Option<String>,
}

/// Annual subscriptions held under an agreement: `units` instances of one instance-type
/// dimension are covered each hour between `start` and `end` (PRC-12, the Y−X rule).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnualCoverage {
    /// Instance-type dimension covered (only that type: coverage never transfers).
    pub dimension: String,
    /// Number of annual subscriptions (X).
    pub units: u32,
    /// First covered instant.
    #[serde(with = "crate::time::rfc3339")]
    pub start: Timestamp,
    /// End of coverage (exclusive); from this hour on, hourly prices apply.
    #[serde(with = "crate::time::rfc3339")]
    pub end: Timestamp,
}

/// A customer's subscription to a product under an offer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// Agreement id (`agmnt-…`).
    pub id: String,
    /// Customer id.
    pub customer: String,
    /// Product code.
    pub product: String,
    /// Offer id.
    pub offer: String,
    /// Usage is accepted from this instant.
    #[serde(with = "crate::time::rfc3339")]
    pub start: Timestamp,
    /// Usage is accepted before this instant (open-ended when absent).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::time::rfc3339_opt")]
    pub end: Option<Timestamp>,
    /// Annual coverage held under this agreement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annual: Vec<AnnualCoverage>,
}

impl Agreement {
    /// Whether the agreement covers the instant `t`.
    pub fn active_at(&self, t: Timestamp) -> bool {
        t >= self.start && self.end.is_none_or(|e| t < e)
    }
}

/// The whole price-book document as written in the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceBookDoc {
    /// Version label recorded on every rated line (which prices produced a charge).
    pub version: String,
    /// Marketplace rules.
    pub marketplace: MarketplaceProfile,
    /// Sellers.
    #[serde(default)]
    pub sellers: Vec<Seller>,
    /// Products.
    #[serde(default)]
    pub products: Vec<Product>,
    /// Offers.
    #[serde(default)]
    pub offers: Vec<Offer>,
    /// Customers.
    #[serde(default)]
    pub customers: Vec<Customer>,
    /// Agreements.
    #[serde(default)]
    pub agreements: Vec<Agreement>,
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
    customer_by_id: HashMap<String, usize>,
    customer_by_identifier: HashMap<String, usize>,
    customer_by_account: HashMap<String, usize>,
    /// (customer id, product code) → agreement indexes sorted by start.
    agreements_by_customer_product: HashMap<(String, String), Vec<usize>>,
    seller_by_key_hash: HashMap<[u8; 32], usize>,
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

    /// Validates a document and builds the indexes.
    pub fn new(mut doc: PriceBookDoc) -> Result<Self, CatalogueError> {
        let m = &doc.marketplace;
        let dur = |name: &str, v: &str| parse_duration_ms(v).map_err(|e| invalid(format!("marketplace.{name}: {e}")));
        let windows = Windows {
            acceptance_ms: dur("acceptance_window", &m.acceptance_window)?,
            future_skew_ms: dur("future_skew", &m.future_skew)?,
            final_grace_ms: dur("final_records_grace", &m.final_records_grace)?,
        };
        if m.currency.minor_units().is_none() {
            return Err(invalid(format!("marketplace `{}`: currency {} has no known minor unit", m.id, m.currency)));
        }
        if m.usage_rate_decimals > 12 {
            return Err(invalid("marketplace.usage_rate_decimals: at most 12 (amounts are stored at scale 12)"));
        }
        if doc.version.trim().is_empty() {
            return Err(invalid("version: the price book needs a version label"));
        }

        let mut seller_ids = HashSet::new();
        let mut seller_by_key_hash = HashMap::new();
        for (i, s) in doc.sellers.iter().enumerate() {
            if !seller_ids.insert(s.id.as_str()) {
                return Err(invalid(format!("seller `{}` is defined twice", s.id)));
            }
            for h in &s.api_key_sha256 {
                let bytes: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| invalid(format!("seller `{}`: api_key_sha256 entry is not 64 hex digits", s.id)))?;
                if seller_by_key_hash.insert(bytes, i).is_some() {
                    return Err(invalid(format!("seller `{}`: an API key is listed twice", s.id)));
                }
            }
        }

        let mut product_by_code = HashMap::new();
        let mut dimension_by_key = Vec::new();
        for (i, p) in doc.products.iter().enumerate() {
            if product_by_code.insert(p.code.clone(), i).is_some() {
                return Err(invalid(format!("product `{}` is defined twice", p.code)));
            }
            if !valid_product_code(&p.code) {
                return Err(invalid(format!("product `{}`: code must be 1–255 chars of [-a-zA-Z0-9/=:_.@]", p.code)));
            }
            if !seller_ids.contains(p.seller.as_str()) {
                return Err(invalid(format!("product `{}`: seller `{}` is not defined", p.code, p.seller)));
            }
            if p.dimensions.is_empty() {
                return Err(invalid(format!("product `{}` has no dimensions", p.code)));
            }
            if p.dimensions.len() > MAX_DIMENSIONS {
                return Err(invalid(format!(
                    "product `{}` has {} dimensions; a product may have at most {MAX_DIMENSIONS}",
                    p.code,
                    p.dimensions.len()
                )));
            }
            let mut dims = HashMap::new();
            for (j, d) in p.dimensions.iter().enumerate() {
                if d.key.is_empty()
                    || d.key.len() > MAX_DIMENSION_KEY_LEN
                    || !d.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(invalid(format!(
                        "product `{}`: dimension key `{}` must be 1–{MAX_DIMENSION_KEY_LEN} chars of [A-Za-z0-9_]",
                        p.code, d.key
                    )));
                }
                if dims.insert(d.key.clone(), j).is_some() {
                    return Err(invalid(format!("product `{}`: dimension `{}` is defined twice", p.code, d.key)));
                }
            }
            dimension_by_key.push(dims);
        }

        let mut customer_by_id = HashMap::new();
        let mut customer_by_identifier = HashMap::new();
        let mut customer_by_account = HashMap::new();
        for (i, c) in doc.customers.iter().enumerate() {
            if customer_by_id.insert(c.id.clone(), i).is_some() {
                return Err(invalid(format!("customer `{}` is defined twice", c.id)));
            }
            if let Some(ci) = &c.customer_identifier {
                if ci.is_empty() || ci.len() > 255 || customer_by_identifier.insert(ci.clone(), i).is_some() {
                    return Err(invalid(format!("customer `{}`: customer_identifier is empty, too long or not unique", c.id)));
                }
            }
            if let Some(a) = &c.aws_account_id {
                if a.is_empty() || a.len() > 255 || !a.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(format!("customer `{}`: aws_account_id `{a}` must be digits", c.id)));
                }
                if customer_by_account.insert(a.clone(), i).is_some() {
                    return Err(invalid(format!("customer `{}`: aws_account_id `{a}` belongs to another customer too", c.id)));
                }
            }
        }

        let mut offer_by_id = HashMap::new();
        let rate_dp = doc.marketplace.usage_rate_decimals;
        for (i, o) in doc.offers.iter_mut().enumerate() {
            if offer_by_id.insert(o.id.clone(), i).is_some() {
                return Err(invalid(format!("offer `{}` is defined twice", o.id)));
            }
            let Some(&pi) = product_by_code.get(&o.product) else {
                return Err(invalid(format!("offer `{}`: product `{}` is not defined", o.id, o.product)));
            };
            if o.currency.minor_units().is_none() {
                return Err(invalid(format!("offer `{}`: currency {} has no known minor unit", o.id, o.currency)));
            }
            if o.prices.is_empty() {
                return Err(invalid(format!("offer `{}` has no prices", o.id)));
            }
            match o.visibility {
                Visibility::Public if !o.buyers.is_empty() => {
                    return Err(invalid(format!("offer `{}` is public but names buyers", o.id)))
                }
                Visibility::Private if o.buyers.is_empty() => {
                    return Err(invalid(format!("offer `{}` is private but names no buyers", o.id)))
                }
                _ => {}
            }
            for b in &o.buyers {
                if !customer_by_id.contains_key(b) {
                    return Err(invalid(format!("offer `{}`: buyer `{b}` is not a defined customer", o.id)));
                }
            }
            o.prices.sort_by_key(|v| v.effective_from);
            for w in o.prices.windows(2) {
                if w[0].effective_from == w[1].effective_from {
                    return Err(invalid(format!("offer `{}`: two price versions take effect at {}", o.id, w[0].effective_from)));
                }
            }
            for v in &o.prices {
                for (dim, price) in &v.usage {
                    if !dimension_by_key[pi].contains_key(dim) {
                        return Err(invalid(format!(
                            "offer `{}`: price for `{dim}`, which is not a dimension of product `{}`",
                            o.id, o.product
                        )));
                    }
                    match price {
                        UsagePrice::PerUnit(r) => {
                            if r.is_sign_negative() {
                                return Err(invalid(format!("offer `{}`: rate {r} for `{dim}` is negative", o.id)));
                            }
                            if decimal_places(*r) > rate_dp {
                                return Err(invalid(format!(
                                    "offer `{}`: rate {r} for `{dim}` has {} decimal places; usage rates allow at most {rate_dp}",
                                    o.id,
                                    decimal_places(*r)
                                )));
                            }
                        }
                    }
                }
            }
        }

        let mut agreements_by_customer_product: HashMap<(String, String), Vec<usize>> = HashMap::new();
        let mut agreement_ids = HashSet::new();
        for (i, a) in doc.agreements.iter().enumerate() {
            if !agreement_ids.insert(a.id.as_str()) {
                return Err(invalid(format!("agreement `{}` is defined twice", a.id)));
            }
            if !customer_by_id.contains_key(&a.customer) {
                return Err(invalid(format!("agreement `{}`: customer `{}` is not defined", a.id, a.customer)));
            }
            let Some(&pi) = product_by_code.get(&a.product) else {
                return Err(invalid(format!("agreement `{}`: product `{}` is not defined", a.id, a.product)));
            };
            let Some(&oi) = offer_by_id.get(&a.offer) else {
                return Err(invalid(format!("agreement `{}`: offer `{}` is not defined", a.id, a.offer)));
            };
            let offer = &doc.offers[oi];
            if offer.product != a.product {
                return Err(invalid(format!(
                    "agreement `{}`: offer `{}` is for product `{}`, not `{}`",
                    a.id, a.offer, offer.product, a.product
                )));
            }
            if offer.visibility == Visibility::Private && !offer.buyers.contains(&a.customer) {
                return Err(invalid(format!(
                    "agreement `{}`: private offer `{}` is not extended to customer `{}`",
                    a.id, a.offer, a.customer
                )));
            }
            if a.end.is_some_and(|e| e <= a.start) {
                return Err(invalid(format!("agreement `{}` ends before it starts", a.id)));
            }
            for c in &a.annual {
                if !dimension_by_key[pi].contains_key(&c.dimension) {
                    return Err(invalid(format!(
                        "agreement `{}`: annual coverage for `{}`, which is not a dimension of `{}`",
                        a.id, c.dimension, a.product
                    )));
                }
                if c.units == 0 || c.end <= c.start {
                    return Err(invalid(format!(
                        "agreement `{}`: annual coverage of `{}` needs units > 0 and start < end",
                        a.id, c.dimension
                    )));
                }
            }
            agreements_by_customer_product.entry((a.customer.clone(), a.product.clone())).or_default().push(i);
        }
        // A customer holds one agreement per product at a time: public or private, never both (PRC-19).
        for ((customer, product), list) in agreements_by_customer_product.iter_mut() {
            list.sort_by_key(|&i| doc.agreements[i].start);
            for w in list.windows(2) {
                let (a, b) = (&doc.agreements[w[0]], &doc.agreements[w[1]]);
                if a.end.is_none_or(|e| e > b.start) {
                    return Err(invalid(format!(
                        "customer `{customer}` holds overlapping agreements `{}` and `{}` for product `{product}`",
                        a.id, b.id
                    )));
                }
            }
        }

        Ok(PriceBook {
            doc,
            windows,
            product_by_code,
            dimension_by_key,
            offer_by_id,
            customer_by_id,
            customer_by_identifier,
            customer_by_account,
            agreements_by_customer_product,
            seller_by_key_hash,
        })
    }

    /// The document.
    pub fn doc(&self) -> &PriceBookDoc {
        &self.doc
    }
    /// Version label.
    pub fn version(&self) -> &str {
        &self.doc.version
    }
    /// Marketplace rules.
    pub fn marketplace(&self) -> &MarketplaceProfile {
        &self.doc.marketplace
    }
    /// Acceptance windows in milliseconds.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// The seller an API key belongs to.
    pub fn seller_for_key(&self, key: &str) -> Option<&Seller> {
        self.seller_by_key_hash.get(&api_key_hash(key)).map(|&i| &self.doc.sellers[i])
    }

    /// A product by code.
    pub fn product(&self, code: &str) -> Option<&Product> {
        self.product_by_code.get(code).map(|&i| &self.doc.products[i])
    }

    /// A dimension of a product by exact (case-sensitive) key.
    pub fn dimension(&self, product: &str, key: &str) -> Option<&Dimension> {
        let &pi = self.product_by_code.get(product)?;
        self.dimension_by_key[pi].get(key).map(|&j| &self.doc.products[pi].dimensions[j])
    }

    /// A customer by catalogue id.
    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.customer_by_id.get(id).map(|&i| &self.doc.customers[i])
    }
    /// A customer by legacy `CustomerIdentifier`.
    pub fn customer_by_identifier(&self, ci: &str) -> Option<&Customer> {
        self.customer_by_identifier.get(ci).map(|&i| &self.doc.customers[i])
    }
    /// A customer by AWS account id.
    pub fn customer_by_account(&self, account: &str) -> Option<&Customer> {
        self.customer_by_account.get(account).map(|&i| &self.doc.customers[i])
    }

    /// An offer by id.
    pub fn offer(&self, id: &str) -> Option<&Offer> {
        self.offer_by_id.get(id).map(|&i| &self.doc.offers[i])
    }

    /// All agreements of a customer for a product, by start.
    pub fn agreements(&self, customer: &str, product: &str) -> impl Iterator<Item = &Agreement> + '_ {
        self.agreements_by_customer_product
            .get(&(customer.to_owned(), product.to_owned()))
            .into_iter()
            .flatten()
            .map(|&i| &self.doc.agreements[i])
    }

    /// The agreement covering instant `t`, if any.
    pub fn agreement_at(&self, customer: &str, product: &str, t: Timestamp) -> Option<&Agreement> {
        self.agreements(customer, product).find(|a| a.active_at(t))
    }

    /// The price of `dimension` for `customer` at `hour`: agreement, offer, version and price.
    pub fn price_at(&self, customer: &str, product: &str, dimension: &str, hour: Hour) -> Option<PriceLookup<'_>> {
        let t = hour.start();
        let agreement = self.agreement_at(customer, product, t)?;
        let offer = self.offer(&agreement.offer)?;
        let version = offer.prices.iter().rev().find(|v| v.effective_from <= t)?;
        let price = version.usage.get(dimension)?;
        Some(PriceLookup { agreement, offer, version, price })
    }

    /// Annual units (X) of `dimension` covering `hour` under `agreement`.
    pub fn annual_units(agreement: &Agreement, dimension: &str, hour: Hour) -> u64 {
        let t = hour.start();
        agreement
            .annual
            .iter()
            .filter(|c| c.dimension == dimension && c.start <= t && t < c.end)
            .map(|c| u64::from(c.units))
            .sum()
    }
}

fn valid_product_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 255
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=:_.@".contains(&b))
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
        let dims: Vec<String> =
            (0..25).map(|i| format!("{{ key = \"d{i}\", category = \"units\" }}")).collect();
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
