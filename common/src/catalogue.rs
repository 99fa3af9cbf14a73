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
//! Layout: this file holds the document and its indexes; rules with their own module are
//! `annual` (annual purchases and their price-change rules), `entitlement` (how a contract's
//! entitlement meets metered usage; BYOL's paid option) and `refund` (refunds' load-time rules).

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
mod entitlement;
mod refund;
pub use annual::{annual_purchase, AnnualPrice, AnnualPurchase, AnnualTerm};
pub use entitlement::ContractUsage;
pub use refund::Refund;

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
    /// Most decimal places of a contract rate or monthly fee (AWS: 3).
    #[serde(default = "default_contract_decimals")]
    pub contract_rate_decimals: u32,
    /// Days of notice before a price change reaches existing subscribers (AWS: 90). Required as
    /// soon as a price version carries `notified_at`: never assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_change_notice_days: Option<u32>,
    /// What happens to usage for a month already closed (month close needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_usage: Option<LateUsage>,
    /// Listing-fee schedule, the marketplace's cut (month close needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing_fees: Option<ListingFees>,
    /// Billing entity printed on invoice lines (`AWS_INC`, `AWS_EUROPE` …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_id: Option<String>,
    /// Currency reports convert into with the `fx_rates` table (reporting only, never billing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_currency: Option<Currency>,
}

impl ListingFees {
    /// AWS's schedule effective 5 Jan 2024 (PRC-22), for profiles that choose it explicitly.
    pub fn aws_2024() -> Self {
        let d = |s: &str| s.parse().unwrap_or_default();
        ListingFees {
            public_saas: d("0.03"),
            public_server: d("0.20"),
            private: d("0.03"),
            tier_1_from: d("1000000"),
            private_tier_1: d("0.02"),
            tier_2_from: d("10000000"),
            private_tier_2: d("0.015"),
            renewal: d("0.015"),
            channel_uplift: d("0.005"),
        }
    }
}

fn default_contract_decimals() -> u32 {
    3
}

/// Policy for usage that arrives for a month already closed (domain-rules HR-7, edge case 34).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateUsage {
    /// Refused (the AWS profile: its acceptance window has passed anyway).
    Refuse,
    /// Booked on the next open month as a correction line (own profiles).
    CorrectionNextMonth,
}

/// The marketplace's listing fees as fractions of the pre-tax contract value (PRC-22). Every
/// rate is explicit; the AWS schedule is in `docs/price-book.md`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListingFees {
    /// Public SaaS and data offers (AWS: 0.03).
    #[serde(with = "decimal_text")]
    pub public_saas: Decimal,
    /// Public server offers: AMI, container, ML (AWS: 0.20).
    #[serde(with = "decimal_text")]
    pub public_server: Decimal,
    /// Private offers with total contract value below `tier_1_from` (AWS: 0.03).
    #[serde(with = "decimal_text")]
    pub private: Decimal,
    /// TCV from which `private_tier_1` applies (AWS: 1,000,000).
    #[serde(with = "decimal_text")]
    pub tier_1_from: Decimal,
    /// Private offers with TCV in [tier_1_from, tier_2_from) (AWS: 0.02).
    #[serde(with = "decimal_text")]
    pub private_tier_1: Decimal,
    /// TCV from which `private_tier_2` applies (AWS: 10,000,000).
    #[serde(with = "decimal_text")]
    pub tier_2_from: Decimal,
    /// Private offers with TCV ≥ tier_2_from (AWS: 0.015).
    #[serde(with = "decimal_text")]
    pub private_tier_2: Decimal,
    /// Any renewal (AWS: 0.015).
    #[serde(with = "decimal_text")]
    pub renewal: Decimal,
    /// Added for channel resale, CPPO and DSOR (AWS: 0.005).
    #[serde(with = "decimal_text")]
    pub channel_uplift: Decimal,
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

/// One effective-dated version of an offer's prices.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceVersion {
    /// First instant these prices apply.
    #[serde(with = "crate::time::rfc3339")]
    pub effective_from: Timestamp,
    /// When existing subscribers were notified of this version. Without it the version applies
    /// to everyone from `effective_from`; with it, subscribers who signed before
    /// `effective_from` get it on the first day of the month after `notified_at` + the
    /// profile's notice days (PRC-18), except container price decreases, which apply at once.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::time::rfc3339_opt")]
    pub notified_at: Option<Timestamp>,
    /// Usage prices by dimension key.
    pub usage: std::collections::BTreeMap<String, UsagePrice>,
}

/// The upfront price of one contract dimension for one duration (PRC-14).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractPrice {
    /// Duration in months (public: 1, 12, 24 or 36; private: 1–60).
    pub months: u32,
    /// Contract dimension.
    pub dimension: String,
    /// Price per unit for the whole duration (≤ 3 decimal places on AWS).
    #[serde(with = "decimal_text")]
    pub rate: Decimal,
}

/// How a contract is bought (PRC-14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractShape {
    /// The buyer picks exactly one dimension (tier), quantity 1.
    Tiered,
    /// A quantity per dimension.
    MultiDimension,
}

/// Free-trial terms of an offer (PRC-17).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreeTrial {
    /// Trial length from the agreement's start (AMI: 5–31 days, SaaS: 7–90).
    pub days: u32,
    /// How the trial is free.
    pub kind: TrialKind,
}

/// What a free trial makes free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialKind {
    /// AMI: in each hour, one instance of the most expensive instance type running is free; the
    /// rest is charged (a credit line at month close).
    AmiOneInstance,
    /// SaaS: usage during the trial is not charged.
    Saas,
}

/// Whether a sale is direct or through a channel partner (RPT-6 `channel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// The manufacturer sells.
    Direct,
    /// Channel Partner Private Offer: the partner is seller of record (PRC-20).
    Cppo,
    /// Designated Seller of Record (PRC-21).
    Dsor,
}

impl Channel {
    /// The name stored in tables and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Direct => "direct",
            Channel::Cppo => "cppo",
            Channel::Dsor => "dsor",
        }
    }
}

/// A manufacturer's authorisation for a partner to resell a product (PRC-20, PRC-21): the
/// wholesale price is a discount off the list offer, or a custom rate card.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResaleAuthorization {
    /// Authorisation id.
    pub id: String,
    /// Product code.
    pub product: String,
    /// Manufacturer (ISV) seller id.
    pub manufacturer: String,
    /// Partner (seller of record) seller id.
    pub partner: String,
    /// CPPO or DSOR.
    pub channel: Channel,
    /// Currency the partner must use (a mismatch in the chain is refused).
    pub currency: Currency,
    /// Wholesale = list × (1 − discount), as a fraction (0.20 = 20 % off).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal_text")]
    pub discount: Option<Decimal>,
    /// The public offer whose prices are the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_offer: Option<String>,
    /// Custom wholesale usage rate card, instead of a discount.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub wholesale_usage: std::collections::BTreeMap<String, UsagePrice>,
    /// Custom wholesale contract prices, instead of a discount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wholesale_contract: Vec<ContractPrice>,
    /// One-time (one offer to one buyer, one agreement) or recurring (any number of offers).
    #[serde(default, skip_serializing_if = "AuthorizationUse::is_recurring")]
    pub kind: AuthorizationUse,
    /// After this instant the partner can no longer sell under it: agreements accepted later
    /// are refused (those accepted before keep their terms).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::time::rfc3339_opt")]
    pub expires_at: Option<Timestamp>,
    /// Two-level resale (DSOR channel model, PRC-21): the DSOR authorisation this CPPO one is
    /// granted under. Its partner (the DSOR partner) authorises this partner; the wholesale
    /// here is what this partner owes it, and the parent's is what it owes the manufacturer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// How often a resale authorisation may be used (PRC-20).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationUse {
    /// Multi-use: any number of offers and buyers until it expires (the default, AWS's
    /// "recurring" authorisation).
    #[default]
    Recurring,
    /// Single use: one private offer to one buyer, accepted once.
    OneTime,
}

impl AuthorizationUse {
    fn is_recurring(&self) -> bool {
        *self == AuthorizationUse::Recurring
    }
}

/// One effective-dated exchange rate: 1 `from` = `rate` `to` (reporting only).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FxRate {
    /// Source currency.
    pub from: Currency,
    /// Target currency.
    pub to: Currency,
    /// Units of `to` per unit of `from`.
    #[serde(with = "decimal_text")]
    pub rate: Decimal,
    /// First instant the rate applies.
    #[serde(with = "crate::time::rfc3339")]
    pub effective_from: Timestamp,
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
    /// Private offers: the acceptance deadline; an agreement signed later is void (edge 46).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::time::rfc3339_opt")]
    pub expires_at: Option<Timestamp>,
    /// A fee per month, prorated by 1/30 per day at start and cancellation (PRC-11).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal_text")]
    pub monthly_fee: Option<Decimal>,
    /// Upfront contract prices per duration and dimension (PRC-14).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contract_prices: Vec<ContractPrice>,
    /// How the contract is bought; required with `contract_prices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_shape: Option<ContractShape>,
    /// Free-trial terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_trial: Option<FreeTrial>,
    /// For a partner's offer: the resale authorisation it sells under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resale: Option<String>,
    /// Effective-dated annual prices per instance type (PRC-12): coverage bought under this
    /// offer is invoiced at purchase (see [`annual_purchase`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annual_prices: Vec<AnnualPrice>,
    /// What metered usage of a contract dimension is: netted against the entitlement, or the
    /// overage only (PRC-15). Required when a contract dimension also has a usage price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_usage: Option<ContractUsage>,
}

impl Offer {
    /// An offer with usage prices only: no fee, contract, trial, deadline or resale terms.
    pub fn usage_only(
        id: impl Into<String>,
        product: impl Into<String>,
        visibility: Visibility,
        currency: Currency,
        buyers: Vec<String>,
        prices: Vec<PriceVersion>,
    ) -> Self {
        Offer {
            id: id.into(),
            product: product.into(),
            visibility,
            currency,
            buyers,
            prices,
            expires_at: None,
            monthly_fee: None,
            contract_prices: vec![],
            contract_shape: None,
            free_trial: None,
            resale: None,
            annual_prices: vec![],
            contract_usage: None,
        }
    }
}

/// Units of one dimension bought under a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractQuantity {
    /// Contract dimension.
    pub dimension: String,
    /// Units bought (1 for a tiered contract).
    pub quantity: u32,
}

/// One date of a flexible payment schedule (PRC-19).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Installment {
    /// Invoice date; a date before acceptance is invoiced at acceptance.
    #[serde(with = "crate::time::rfc3339")]
    pub date: Timestamp,
    /// Amount in the offer's currency.
    #[serde(with = "decimal_text")]
    pub amount: Decimal,
}

/// The contract an agreement bought (PRC-14, PRC-15, PRC-19).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgreementContract {
    /// Duration in months from the agreement's start.
    pub months: u32,
    /// Units per dimension.
    pub quantities: Vec<ContractQuantity>,
    /// Flexible payment schedule; empty = the whole value upfront at acceptance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installments: Vec<Installment>,
    /// The agreement this one upgrades mid-term: its unused part is credited pro rata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// Set on load from the offer's `contract_usage`: metered usage of a contracted dimension
    /// is netted against the quantity each hour. Never read from or written to the file.
    #[serde(skip)]
    pub nets_metered_usage: bool,
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

/// One customer's running deployment of a product (an instance, task or pod, or a group of them
/// behind one key): what `MeterUsage` and `RegisterUsage` callers are. AWS knows the customer
/// from the caller's IAM role in the buyer's account; Meterline from the deployment's API key,
/// issued by the seller for that deployment and stored, like seller keys, only as SHA-256.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Deployment id, unique in the book; part of `MeterUsage`'s dedup key (MET-12: one record
    /// per hour × dimension × instance/task).
    pub id: String,
    /// The customer running it.
    pub customer: String,
    /// The product it runs.
    pub product: String,
    /// SHA-256 (hex) of each key the deployment may use.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
}

impl fmt::Debug for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployment")
            .field("id", &self.id)
            .field("customer", &self.customer)
            .field("product", &self.product)
            .field("keys", &self.api_key_sha256.len())
            .finish()
    }
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
    /// This term auto-renews the coverage of the same type ending at its `start`: it is priced
    /// by the renewal rule (a price change counts only if made ≥ the notice days before).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renewal: bool,
    /// Private offers: the purchase's payment schedule; empty = invoiced in full at `start`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installments: Vec<Installment>,
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
    /// Annual coverage held under this agreement (also container long-term contract units,
    /// which net the same way). Amendments are entries that end and start mid-term.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annual: Vec<AnnualCoverage>,
    /// When the buyer accepted (defaults to `start`). Future-dated agreements sign before they
    /// start: invoices may precede the start, usage may not (edge 48).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::time::rfc3339_opt")]
    pub signed: Option<Timestamp>,
    /// The contract bought, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<AgreementContract>,
    /// Whether the agreement renews an earlier one (listing fee tier, PRC-22).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renewal: bool,
    /// The licence ARN AWS issues for the purchase (Concurrent Agreements, MET-21): records that
    /// name it are metered against this agreement and its customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_arn: Option<String>,
}

impl Agreement {
    /// Whether the agreement covers the instant `t`.
    pub fn active_at(&self, t: Timestamp) -> bool {
        t >= self.start && self.end.is_none_or(|e| t < e)
    }
    /// When the buyer accepted.
    pub fn signed_at(&self) -> Timestamp {
        self.signed.unwrap_or(self.start)
    }
    /// End of the contract term (start + months), if the agreement bought a contract.
    pub fn contract_end(&self) -> Option<Timestamp> {
        self.contract.as_ref().map(|c| self.start.plus_months(c.months))
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
    /// Resale authorisations (channel partners).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resale: Vec<ResaleAuthorization>,
    /// Exchange rates for reporting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fx_rates: Vec<FxRate>,
    /// Customer deployments that call `MeterUsage` / `RegisterUsage` with their own keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<Deployment>,
    /// Refunds (credit notes) of invoice lines already billed (§4.5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refunds: Vec<Refund>,
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
                    return Err(invalid(format!(
                        "customer `{}`: customer_identifier is empty, too long or not unique",
                        c.id
                    )));
                }
            }
            if let Some(a) = &c.aws_account_id {
                if a.is_empty() || a.len() > 255 || !a.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(format!("customer `{}`: aws_account_id `{a}` must be digits", c.id)));
                }
                if customer_by_account.insert(a.clone(), i).is_some() {
                    return Err(invalid(format!(
                        "customer `{}`: aws_account_id `{a}` belongs to another customer too",
                        c.id
                    )));
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
                    return Err(invalid(format!(
                        "offer `{}`: two price versions take effect at {}",
                        o.id, w[0].effective_from
                    )));
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
                    price.validate(rate_dp).map_err(|e| invalid(format!("offer `{}`: `{dim}`: {e}", o.id)))?;
                }
                if v.notified_at.is_some() && doc.marketplace.price_change_notice_days.is_none() {
                    return Err(invalid(format!(
                        "offer `{}`: a price version has notified_at but marketplace `{}` sets no price_change_notice_days",
                        o.id, doc.marketplace.id
                    )));
                }
            }
            check_offer_terms(o, &doc.products[pi], &dimension_by_key[pi], &doc.marketplace)?;
            for p in &o.annual_prices {
                if !dimension_by_key[pi].contains_key(&p.dimension) {
                    return Err(invalid(format!(
                        "offer `{}`: annual price for `{}`, which is not a dimension of product `{}`",
                        o.id, p.dimension, o.product
                    )));
                }
            }
            annual::check_offer_annual_prices(o, doc.marketplace.contract_rate_decimals)?;
            let product = &doc.products[pi];
            entitlement::check_contract_usage(o, |d| {
                product.dimensions.iter().find(|x| x.key == d).map(|x| x.category)
            })?;
        }
        check_resale(&doc, &offer_by_id, &product_by_code, &seller_ids)?;
        entitlement::check_byol_paid_option(&doc)?;
        refund::check_refunds(&doc)?;
        entitlement::mark_netting_contracts(&mut doc);

        let mut agreements_by_customer_product: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
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
            if a.signed_at() > a.start {
                return Err(invalid(format!("agreement `{}` is signed after it starts", a.id)));
            }
            if let Some(deadline) = offer.expires_at {
                if a.signed_at() > deadline {
                    return Err(invalid(format!(
                        "agreement `{}`: offer `{}` expired at {deadline}, before it was accepted at {}; the offer is void",
                        a.id,
                        a.offer,
                        a.signed_at()
                    )));
                }
            }
            if let Some(c) = &a.contract {
                check_agreement_contract(a, c, offer, &doc.marketplace)?;
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
                annual::check_coverage(&a.id, &a.annual, c, offer, doc.marketplace.price_change_notice_days)?;
            }
            agreements_by_customer_product
                .entry(a.customer.clone())
                .or_default()
                .entry(a.product.clone())
                .or_default()
                .push(i);
        }
        for a in &doc.agreements {
            if let Some(old_id) = a.contract.as_ref().and_then(|c| c.replaces.as_deref()) {
                check_upgrade(a, old_id, &doc)?;
            }
        }
        // A customer holds one agreement per product at a time: public or private, never both (PRC-19).
        for (customer, product, list) in
            agreements_by_customer_product.iter_mut().flat_map(|(c, m)| m.iter_mut().map(move |(p, l)| (c, p, l)))
        {
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

        // Month close looks agreements up by id once per line.
        let agreement_by_id = doc.agreements.iter().enumerate().map(|(i, a)| (a.id.clone(), i)).collect();
        let mut agreement_by_license = HashMap::new();
        for (i, a) in doc.agreements.iter().enumerate() {
            if let Some(arn) = &a.license_arn {
                if arn.is_empty() || arn.len() > 2048 {
                    return Err(invalid(format!("agreement `{}`: license_arn must be 1–2048 characters", a.id)));
                }
                if let Some(other) = agreement_by_license.insert(arn.clone(), i) {
                    return Err(invalid(format!(
                        "agreements `{}` and `{}` share license_arn `{arn}`",
                        doc.agreements[other].id, a.id
                    )));
                }
            }
        }
        let mut deployment_ids = HashSet::new();
        let mut deployment_by_key_hash = HashMap::new();
        for (i, d) in doc.deployments.iter().enumerate() {
            if d.id.is_empty() || !deployment_ids.insert(d.id.as_str()) {
                return Err(invalid(format!("deployment `{}`: ids must be non-empty and unique", d.id)));
            }
            if !customer_by_id.contains_key(&d.customer) {
                return Err(invalid(format!("deployment `{}`: unknown customer `{}`", d.id, d.customer)));
            }
            if !product_by_code.contains_key(&d.product) {
                return Err(invalid(format!("deployment `{}`: unknown product `{}`", d.id, d.product)));
            }
            for h in &d.api_key_sha256 {
                let bytes: [u8; 32] = hex::decode(h).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
                    invalid(format!("deployment `{}`: api_key_sha256 entry is not 64 hex digits", d.id))
                })?;
                // One key, one identity: a key that were both a seller's and a deployment's would
                // make the caller ambiguous.
                if seller_by_key_hash.contains_key(&bytes) || deployment_by_key_hash.insert(bytes, i).is_some() {
                    return Err(invalid(format!("deployment `{}`: an API key is listed twice", d.id)));
                }
            }
        }
        Ok(PriceBook {
            doc,
            windows,
            product_by_code,
            dimension_by_key,
            offer_by_id,
            agreement_by_id,
            customer_by_id,
            customer_by_identifier,
            customer_by_account,
            agreements_by_customer_product,
            seller_by_key_hash,
            deployment_by_key_hash,
            agreement_by_license,
        })
    }

    /// The deployment a presented key belongs to (hashed, then looked up by hash: the key itself
    /// is never stored or compared).
    pub fn deployment_for_key(&self, key: &str) -> Option<&Deployment> {
        self.deployment_by_key_hash.get(&api_key_hash(key)).map(|&i| &self.doc.deployments[i])
    }

    /// The agreement a licence ARN was issued for.
    pub fn agreement_by_license(&self, arn: &str) -> Option<&Agreement> {
        self.agreement_by_license.get(arn).map(|&i| &self.doc.agreements[i])
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
            .get(customer)
            .and_then(|by_product| by_product.get(product))
            .into_iter()
            .flatten()
            .map(|&i| &self.doc.agreements[i])
    }

    /// The agreement covering instant `t`, if any.
    pub fn agreement_at(&self, customer: &str, product: &str, t: Timestamp) -> Option<&Agreement> {
        self.agreements(customer, product).find(|a| a.active_at(t))
    }

    /// The price of `dimension` for `customer` at `hour`: agreement, offer, version and price.
    ///
    /// A version reaches a subscriber who signed before it took effect only after its notice
    /// period (PRC-18); a container price decrease reaches everyone at once (edge 44).
    pub fn price_at(&self, customer: &str, product: &str, dimension: &str, hour: Hour) -> Option<PriceLookup<'_>> {
        let t = hour.start();
        let agreement = self.agreement_at(customer, product, t)?;
        let offer = self.offer(&agreement.offer)?;
        let container = self.product(product).is_some_and(|p| p.delivery == Delivery::Container);
        let notice_days = self.doc.marketplace.price_change_notice_days.unwrap_or(0);
        let versions = &offer.prices;
        for i in (0..versions.len()).rev() {
            let version = &versions[i];
            if version.effective_from > t {
                continue;
            }
            let price = version.usage.get(dimension)?;
            let applies_from = match (version.notified_at, i.checked_sub(1).map(|p| &versions[p])) {
                (Some(notified), Some(previous)) if agreement.signed_at() < version.effective_from => {
                    let decrease = container
                        && matches!((previous.usage.get(dimension), price),
                            (Some(UsagePrice::PerUnit(old)), UsagePrice::PerUnit(new)) if new <= old);
                    if decrease {
                        version.effective_from
                    } else {
                        version.effective_from.max(crate::time::existing_subscriber_effective(notified, notice_days))
                    }
                }
                _ => version.effective_from,
            };
            if applies_from <= t {
                return Some(PriceLookup { agreement, offer, version, price });
            }
        }
        None
    }

    /// Whether `hour` falls in a SaaS free trial of `agreement` (usage then is not charged).
    pub fn in_saas_trial(&self, agreement: &Agreement, offer: &Offer, hour: Hour) -> bool {
        offer.free_trial.as_ref().is_some_and(|tr| {
            tr.kind == TrialKind::Saas
                && hour.start() < agreement.start.plus_millis(i64::from(tr.days) * crate::time::DAY_MS)
        })
    }

    /// A resale authorisation by id.
    pub fn resale(&self, id: &str) -> Option<&ResaleAuthorization> {
        self.doc.resale.iter().find(|r| r.id == id)
    }

    /// An agreement by id.
    pub fn agreement(&self, id: &str) -> Option<&Agreement> {
        self.agreement_by_id.get(id).map(|&i| &self.doc.agreements[i])
    }

    /// The FX rate `from` → `to` in force at `t` (identity for the same currency).
    pub fn fx_rate(&self, from: Currency, to: Currency, t: Timestamp) -> Option<Decimal> {
        if from == to {
            return Some(Decimal::ONE);
        }
        self.doc
            .fx_rates
            .iter()
            .filter(|r| r.from == from && r.to == to && r.effective_from <= t)
            .max_by_key(|r| r.effective_from)
            .map(|r| r.rate)
    }

    /// Checks that `self` may replace `previous` over existing data: published dimensions are
    /// never renamed, re-categorised or removed (PRC-3); new ones may be added up to 24.
    pub fn check_evolution(&self, previous: &PriceBook) -> Result<(), CatalogueError> {
        for old in &previous.doc.products {
            let Some(new) = self.product(&old.code) else {
                return Err(invalid(format!("product `{}` was published and cannot be removed", old.code)));
            };
            for d in &old.dimensions {
                match new.dimensions.iter().find(|n| n.key == d.key) {
                    None => {
                        return Err(invalid(format!(
                            "product `{}`: published dimension `{}` was removed or renamed; dimensions are add-only",
                            old.code, d.key
                        )))
                    }
                    Some(n) if n.category != d.category => {
                        return Err(invalid(format!(
                            "product `{}`: published dimension `{}` changed category; that needs a new product",
                            old.code, d.key
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Units (X) of `dimension` covering `hour` under `agreement`: its annual coverage, plus
    /// the contracted quantity when the offer nets metered usage against the entitlement
    /// (`contract_usage = "net_against_entitlement"`, PRC-15).
    pub fn annual_units(agreement: &Agreement, dimension: &str, hour: Hour) -> u64 {
        let t = hour.start();
        let annual: u64 = agreement
            .annual
            .iter()
            .filter(|c| c.dimension == dimension && c.start <= t && t < c.end)
            .map(|c| u64::from(c.units))
            .sum();
        annual + entitlement::entitled_units(agreement, dimension, t)
    }
}

/// Durations a public contract may have (PRC-14).
const PUBLIC_CONTRACT_MONTHS: [u32; 4] = [1, 12, 24, 36];
/// Longest private contract and most installments (PRC-19).
const MAX_PRIVATE_MONTHS: u32 = 60;

fn check_offer_terms(
    o: &Offer,
    product: &Product,
    dims: &HashMap<String, usize>,
    m: &MarketplaceProfile,
) -> Result<(), CatalogueError> {
    let fee_dp = m.contract_rate_decimals;
    if let Some(fee) = o.monthly_fee {
        if fee.is_sign_negative() || decimal_places(fee) > fee_dp {
            return Err(invalid(format!(
                "offer `{}`: monthly_fee {fee} must be ≥ 0 with at most {fee_dp} decimal places",
                o.id
            )));
        }
        if o.free_trial.is_some() {
            return Err(invalid(format!(
                "offer `{}`: a monthly fee cannot be combined with a free trial (PRC-11)",
                o.id
            )));
        }
    }
    if !o.contract_prices.is_empty() && o.contract_shape.is_none() {
        return Err(invalid(format!(
            "offer `{}`: contract_prices need contract_shape (tiered or multi_dimension)",
            o.id
        )));
    }
    let mut durations_by_dim: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> = Default::default();
    for cp in &o.contract_prices {
        if !dims.contains_key(&cp.dimension) {
            return Err(invalid(format!(
                "offer `{}`: contract price for `{}`, which is not a dimension of `{}`",
                o.id, cp.dimension, product.code
            )));
        }
        let allowed = match o.visibility {
            Visibility::Public => PUBLIC_CONTRACT_MONTHS.contains(&cp.months),
            Visibility::Private => (1..=MAX_PRIVATE_MONTHS).contains(&cp.months),
        };
        if !allowed {
            return Err(invalid(format!(
                "offer `{}`: a {} contract of {} months is not allowed (public: 1, 12, 24, 36; private: 1–60)",
                o.id,
                if o.visibility == Visibility::Public { "public" } else { "private" },
                cp.months
            )));
        }
        if cp.rate.is_sign_negative() || decimal_places(cp.rate) > fee_dp {
            return Err(invalid(format!(
                "offer `{}`: contract rate {} for `{}` has {} decimal places; contract rates allow at most {fee_dp}",
                o.id,
                cp.rate,
                cp.dimension,
                decimal_places(cp.rate)
            )));
        }
        if !durations_by_dim.entry(cp.dimension.as_str()).or_default().insert(cp.months) {
            return Err(invalid(format!(
                "offer `{}`: two contract prices for `{}` over {} months",
                o.id, cp.dimension, cp.months
            )));
        }
    }
    // The set of durations must be identical across dimensions (PRC-14).
    let mut sets = durations_by_dim.values();
    if let Some(first) = sets.next() {
        if sets.any(|s| s != first) {
            return Err(invalid(format!("offer `{}`: every contract dimension must offer the same durations", o.id)));
        }
    }
    if let Some(tr) = &o.free_trial {
        let (lo, hi) = match tr.kind {
            TrialKind::AmiOneInstance => (5, 31),
            TrialKind::Saas => (7, 90),
        };
        if !(lo..=hi).contains(&tr.days) {
            return Err(invalid(format!(
                "offer `{}`: a free trial of {} days is outside {lo}–{hi} days",
                o.id, tr.days
            )));
        }
        if tr.kind == TrialKind::AmiOneInstance && product.delivery != Delivery::Ami {
            return Err(invalid(format!("offer `{}`: the one-instance trial is for AMI products", o.id)));
        }
    }
    if o.visibility == Visibility::Private
        && o.prices.iter().any(|v| v.usage.values().any(|p| matches!(p, UsagePrice::Byol)))
    {
        return Err(invalid(format!("offer `{}`: private offers do not support BYOL (PRC-16)", o.id)));
    }
    if o.resale.is_some() && o.visibility != Visibility::Private {
        return Err(invalid(format!("offer `{}`: a channel partner sells through private offers only", o.id)));
    }
    Ok(())
}

fn check_resale(
    doc: &PriceBookDoc,
    offer_by_id: &HashMap<String, usize>,
    product_by_code: &HashMap<String, usize>,
    sellers: &HashSet<&str>,
) -> Result<(), CatalogueError> {
    let mut ids = HashSet::new();
    for r in &doc.resale {
        if !ids.insert(r.id.as_str()) {
            return Err(invalid(format!("resale authorisation `{}` is defined twice", r.id)));
        }
        let Some(&pi) = product_by_code.get(&r.product) else {
            return Err(invalid(format!("resale `{}`: product `{}` is not defined", r.id, r.product)));
        };
        for (role, s) in [("manufacturer", &r.manufacturer), ("partner", &r.partner)] {
            if !sellers.contains(s.as_str()) {
                return Err(invalid(format!("resale `{}`: {role} `{s}` is not a defined seller", r.id)));
            }
        }
        if doc.products[pi].seller != r.manufacturer {
            return Err(invalid(format!(
                "resale `{}`: `{}` does not make `{}` (its seller is `{}`)",
                r.id, r.manufacturer, r.product, doc.products[pi].seller
            )));
        }
        if r.channel == Channel::Direct || r.partner == r.manufacturer {
            return Err(invalid(format!(
                "resale `{}`: a resale goes through a partner other than the manufacturer (cppo or dsor)",
                r.id
            )));
        }
        match (r.discount, &r.list_offer, r.wholesale_usage.is_empty() && r.wholesale_contract.is_empty()) {
            (Some(d), Some(list), true) => {
                if d.is_sign_negative() || d >= Decimal::ONE {
                    return Err(invalid(format!("resale `{}`: discount {d} must be a fraction in [0, 1)", r.id)));
                }
                let Some(&li) = offer_by_id.get(list) else {
                    return Err(invalid(format!("resale `{}`: list offer `{list}` is not defined", r.id)));
                };
                let lo = &doc.offers[li];
                if lo.product != r.product || lo.visibility != Visibility::Public {
                    return Err(invalid(format!(
                        "resale `{}`: list offer `{list}` must be a public offer of `{}`",
                        r.id, r.product
                    )));
                }
                if lo.currency != r.currency {
                    return Err(invalid(format!(
                        "resale `{}`: currency mismatch in the resale chain: list offer `{list}` is in {}, the authorisation in {}",
                        r.id, lo.currency, r.currency
                    )));
                }
            }
            (None, None, false) => {
                for (dim, p) in &r.wholesale_usage {
                    p.validate(doc.marketplace.usage_rate_decimals)
                        .map_err(|e| invalid(format!("resale `{}`: wholesale `{dim}`: {e}", r.id)))?;
                }
            }
            _ => {
                return Err(invalid(format!(
                    "resale `{}`: give either discount + list_offer, or a custom wholesale rate card",
                    r.id
                )))
            }
        }
    }
    for o in &doc.offers {
        let Some(rid) = &o.resale else { continue };
        let Some(r) = doc.resale.iter().find(|r| &r.id == rid) else {
            return Err(invalid(format!("offer `{}`: resale authorisation `{rid}` is not defined", o.id)));
        };
        if r.product != o.product {
            return Err(invalid(format!(
                "offer `{}`: resale `{rid}` is for `{}`, not `{}`",
                o.id, r.product, o.product
            )));
        }
        if r.currency != o.currency {
            return Err(invalid(format!(
                "offer `{}`: currency mismatch in the resale chain: the offer is in {}, resale `{rid}` in {}",
                o.id, o.currency, r.currency
            )));
        }
    }
    check_authorization_use(doc)?;
    check_resale_chain(doc)
}

/// PRC-21's channel model: a CPPO authorisation under a DSOR one, two levels at most, for the
/// same product, manufacturer and currency, to another partner; the parent's expiry bounds it.
fn check_resale_chain(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    for r in &doc.resale {
        let Some(pid) = &r.parent else { continue };
        let err = |what: String| invalid(format!("resale `{}` under `{pid}`: {what}", r.id));
        let Some(p) = doc.resale.iter().find(|p| &p.id == pid) else {
            return Err(err("the parent authorisation is not defined".into()));
        };
        if p.parent.is_some() {
            return Err(err("resale goes two levels deep at most (ISV → DSOR partner → CPPO partner)".into()));
        }
        if p.channel != Channel::Dsor || r.channel != Channel::Cppo {
            return Err(err(format!(
                "the DSOR channel model is a cppo authorisation under a dsor one, not {} under {}",
                r.channel.as_str(),
                p.channel.as_str()
            )));
        }
        if p.product != r.product || p.manufacturer != r.manufacturer || p.currency != r.currency {
            return Err(err("product, manufacturer and currency must be the parent's".into()));
        }
        if r.partner == p.partner {
            return Err(err(format!("`{}` cannot resell to itself", r.partner)));
        }
        if let Some(pe) = p.expires_at {
            if r.expires_at.is_none_or(|e| e > pe) {
                return Err(err(format!("it must expire no later than the parent, at {pe}")));
            }
        }
    }
    Ok(())
}

/// PRC-20: a one-time authorisation is one private offer to one buyer, accepted once; no
/// agreement is accepted under an authorisation after it expires.
fn check_authorization_use(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    for r in &doc.resale {
        let offers: Vec<&Offer> = doc.offers.iter().filter(|o| o.resale.as_deref() == Some(r.id.as_str())).collect();
        let agreements: Vec<&Agreement> =
            doc.agreements.iter().filter(|a| offers.iter().any(|o| o.id == a.offer)).collect();
        if r.kind == AuthorizationUse::OneTime {
            if offers.len() > 1 || offers.iter().any(|o| o.buyers.len() != 1) {
                return Err(invalid(format!(
                    "resale `{}` is one-time: it allows one offer to one buyer, but {} offer(s) use it ({})",
                    r.id,
                    offers.len(),
                    offers
                        .iter()
                        .map(|o| format!("`{}` for {} buyer(s)", o.id, o.buyers.len()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if agreements.len() > 1 {
                return Err(invalid(format!(
                    "resale `{}` is one-time: it is accepted once, but agreements {} use it",
                    r.id,
                    agreements.iter().map(|a| format!("`{}`", a.id)).collect::<Vec<_>>().join(" and ")
                )));
            }
        }
        if let Some(expiry) = r.expires_at {
            if let Some(a) = agreements.iter().find(|a| a.signed_at() >= expiry) {
                return Err(invalid(format!(
                    "agreement `{}` was accepted at {} under resale `{}`, which expired at {expiry}; an expired authorisation sells nothing more",
                    a.id,
                    a.signed_at(),
                    r.id
                )));
            }
        }
    }
    Ok(())
}

/// The total contract value of `c` under `offer`, if every dimension has a price for its months.
pub fn contract_value(offer: &Offer, c: &AgreementContract) -> Option<Decimal> {
    c.quantities.iter().try_fold(Decimal::ZERO, |acc, q| {
        let cp = offer.contract_prices.iter().find(|p| p.months == c.months && p.dimension == q.dimension)?;
        acc.checked_add(cp.rate.checked_mul(Decimal::from(q.quantity))?)
    })
}

fn check_agreement_contract(
    a: &Agreement,
    c: &AgreementContract,
    offer: &Offer,
    m: &MarketplaceProfile,
) -> Result<(), CatalogueError> {
    let Some(shape) = offer.contract_shape else {
        return Err(invalid(format!("agreement `{}`: offer `{}` has no contract prices", a.id, offer.id)));
    };
    if c.quantities.is_empty()
        || (shape == ContractShape::Tiered && (c.quantities.len() != 1 || c.quantities[0].quantity != 1))
    {
        return Err(invalid(format!(
            "agreement `{}`: a {} contract buys {}",
            a.id,
            if shape == ContractShape::Tiered { "tiered" } else { "multi-dimension" },
            if shape == ContractShape::Tiered {
                "exactly one tier, quantity 1"
            } else {
                "a quantity of at least one dimension"
            }
        )));
    }
    let Some(tcv) = contract_value(offer, c) else {
        return Err(invalid(format!(
            "agreement `{}`: offer `{}` has no {}-month price for every contracted dimension",
            a.id, offer.id, c.months
        )));
    };
    let end = a.start.plus_months(c.months);
    if c.installments.len() > MAX_PRIVATE_MONTHS as usize {
        return Err(invalid(format!(
            "agreement `{}`: {} installments; a payment schedule has at most {MAX_PRIVATE_MONTHS}",
            a.id,
            c.installments.len()
        )));
    }
    if !c.installments.is_empty() {
        if offer.visibility != Visibility::Private {
            return Err(invalid(format!("agreement `{}`: flexible payment schedules are for private offers", a.id)));
        }
        let mut sum = Decimal::ZERO;
        for i in &c.installments {
            if i.date >= end {
                return Err(invalid(format!(
                    "agreement `{}`: installment of {} on {} is after the contract term ends at {end}",
                    a.id, i.amount, i.date
                )));
            }
            if i.amount <= Decimal::ZERO || decimal_places(i.amount) > offer.currency.minor_units().unwrap_or(2) {
                return Err(invalid(format!(
                    "agreement `{}`: installment amount {} is not a positive amount in {}",
                    a.id, i.amount, offer.currency
                )));
            }
            sum += i.amount;
        }
        if let Some(deadline) = offer.expires_at {
            let early = c.installments.iter().filter(|i| i.date < deadline).count();
            if early > 1 {
                return Err(invalid(format!(
                    "agreement `{}`: {early} installments fall before the offer's acceptance deadline {deadline}; at most one may",
                    a.id
                )));
            }
        }
        if sum != tcv {
            return Err(invalid(format!(
                "agreement `{}`: installments sum to {sum} but the contract is worth {tcv} {}",
                a.id, offer.currency
            )));
        }
    }
    if let Some(e) = a.end {
        if e > end {
            return Err(invalid(format!(
                "agreement `{}` runs past its {}-month contract term ({end})",
                a.id, c.months
            )));
        }
    }
    let _ = m;
    Ok(())
}

fn check_upgrade(a: &Agreement, old_id: &str, doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    let Some(old) = doc.agreements.iter().find(|o| o.id == old_id) else {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}`, which is not defined", a.id)));
    };
    let (Some(oc), Some(nc)) = (&old.contract, &a.contract) else {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}`, which has no contract", a.id)));
    };
    if old.customer != a.customer || old.product != a.product {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}` of another customer or product", a.id)));
    }
    let old_end = old.start.plus_months(oc.months);
    if old.end != Some(a.start) || a.start >= old_end {
        return Err(invalid(format!(
            "agreement `{}`: an upgrade starts mid-term of `{old_id}`, which must end when the upgrade starts",
            a.id
        )));
    }
    let offer = |id: &str| doc.offers.iter().find(|o| o.id == id);
    let (Some(oo), Some(no)) = (offer(&old.offer), offer(&a.offer)) else {
        return Ok(());
    };
    let per_month = |o: &Offer, c: &AgreementContract| contract_value(o, c).map(|v| v / Decimal::from(c.months));
    let fewer_units = oc.quantities.iter().any(|q| {
        nc.quantities
            .iter()
            .find(|n| n.dimension == q.dimension)
            .map_or(oo.contract_shape != Some(ContractShape::Tiered), |n| n.quantity < q.quantity)
    });
    if fewer_units || per_month(no, nc) < per_month(oo, oc) {
        return Err(invalid(format!(
            "agreement `{}` would downgrade `{old_id}` mid-term; downgrades happen only at renewal",
            a.id
        )));
    }
    Ok(())
}

fn valid_product_code(code: &str) -> bool {
    !code.is_empty() && code.len() <= 255 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=:_.@".contains(&b))
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
