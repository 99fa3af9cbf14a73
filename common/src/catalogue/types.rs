//! The price book's document types: the marketplace profile, sellers, products and dimensions,
//! offers and their prices, customers, agreements, resale and exchange rates, as written in the
//! file (serde) and read by the cores.

use super::*;

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
