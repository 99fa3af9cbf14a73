//! SHELL (distributed mode). ClickHouse row types, exact decimal conversion, and the reads and
//! writes the aggregator makes.
//!
//! Decimals travel as `i128` mantissas at the column's fixed scale (the `clickhouse` crate does
//! not take `rust_decimal`); a value that would lose digits at that scale is an error, never a
//! rounding. Rows are RowBinary in table column order (`with_validation(false)`: ClickHouse
//! 18.16 lacks `RowBinaryWithNamesAndTypes`).
//!
//! Every [`SinkError`] says what the caller does next ([`SinkError::class`]): ClickHouse
//! unreachable, timing out or answering 5xx without a permanent code is transient (the
//! aggregator retries with back-off); a value that does not fit its column is poison (that
//! record is dead-lettered); bad credentials, missing grants, a missing or differently shaped
//! table, or a corrupt stored row are fatal ([`SinkError::advice`] says what to fix).

use crate::close::{InvoiceLine, Parties, TrialHourUsage};
use crate::rollup::{FoldError, LineAmount, LineSums};
use clickhouse::{Client, Row};
use common::money::Currency;
use common::pricing::UsagePrice;
use common::rated::{ChargeLine, ChargeLineKey, ChargeType, RatedRecord};
use common::shell::ErrorClass;
use common::time::{Hour, Month, Timestamp};
use common::topic::{DeadLetter, RejectedEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Scale of quantity columns.
pub const QTY_SCALE: u32 = 9;
/// Scale of rate columns.
pub const RATE_SCALE: u32 = 12;
/// Scale of exact amount columns.
pub const AMOUNT_SCALE: u32 = 18;
/// Scale of the rounded amount column.
pub const BILLED_SCALE: u32 = 9;

/// Errors of the ClickHouse shell.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// ClickHouse refused or could not be reached.
    #[error("clickhouse ({table}): {source}")]
    ClickHouse {
        /// Table.
        table: &'static str,
        /// Cause.
        source: clickhouse::error::Error,
    },
    /// A value does not fit its column exactly.
    #[error("{what} = {value} does not fit Decimal(38, {scale}) exactly")]
    Precision {
        /// Which value.
        what: &'static str,
        /// The value.
        value: String,
        /// Column scale.
        scale: u32,
    },
    /// A stored row does not parse back.
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What.
        what: String,
    },
}

/// ClickHouse exception codes that retrying cannot fix. Credentials and grants:
const AUTH_CODES: &[u32] = &[
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    497, // ACCESS_DENIED (NOT_ENOUGH_PRIVILEGES on 18.16)
    516, // AUTHENTICATION_FAILED
];
/// The table or the rows do not match what this version writes and reads:
const SCHEMA_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    8,   // THERE_IS_NO_COLUMN
    10,  // NOT_FOUND_COLUMN_IN_BLOCK
    16,  // NO_SUCH_COLUMN_IN_TABLE
    20,  // NUMBER_OF_COLUMNS_DOESNT_MATCH
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA (RowBinary shorter than the table's columns)
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    46,  // UNKNOWN_FUNCTION
    47,  // UNKNOWN_IDENTIFIER
    48,  // NOT_IMPLEMENTED
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    215, // NOT_AN_AGGREGATE
];

/// The exception code in a ClickHouse error text (`Code: 516. DB::Exception: …` on current
/// servers, `Code: 193, e.displayText() = …` on 18.16).
fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What kind of permanent failure a ClickHouse client error is, if it is one.
fn permanent_kind(e: &clickhouse::error::Error) -> Option<Permanent> {
    use clickhouse::error::Error as E;
    match e {
        E::BadResponse(text) => match exception_code(text) {
            Some(c) if AUTH_CODES.contains(&c) => Some(Permanent::Access),
            Some(c) if SCHEMA_CODES.contains(&c) => Some(Permanent::Schema),
            // Other codes (timeouts, too many parts, memory, 5xx without a code) go away.
            _ => None,
        },
        // The rows do not match the table (the client noticed before or while sending).
        E::InvalidParams(_)
        | E::DataFormat(_)
        | E::NotEnoughData
        | E::SchemaMismatch(_)
        | E::Custom(_)
        | E::InvalidUtf8Encoding(_)
        | E::InvalidTagEncoding(_)
        | E::SequenceMustHaveLength
        | E::DeserializeAnyNotSupported
        | E::InvalidColumnsHeader(_)
        | E::Unsupported(_) => Some(Permanent::Schema),
        // Network, timeouts, (de)compression of a cut-off body, anything else: retry.
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permanent {
    Access,
    Schema,
}

impl SinkError {
    /// What the aggregator does about this error (see [`common::shell::ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::ClickHouse { source, .. } => match permanent_kind(source) {
                Some(_) => ErrorClass::Fatal,
                None => ErrorClass::Transient,
            },
            // One record's value: dead-letter the record (a line's value stops the fold).
            SinkError::Precision { .. } => ErrorClass::Poison,
            SinkError::Corrupt { .. } => ErrorClass::Fatal,
        }
    }

    /// The table the error is about, when it is about one.
    pub fn table(&self) -> Option<&'static str> {
        match self {
            SinkError::ClickHouse { table, .. } | SinkError::Corrupt { table, .. } => Some(table),
            SinkError::Precision { .. } => None,
        }
    }

    /// What the operator does about a non-transient error, in one sentence.
    pub fn advice(&self) -> &'static str {
        match self {
            SinkError::ClickHouse { source, .. } => match permanent_kind(source) {
                Some(Permanent::Access) => {
                    "check [clickhouse] user and password (METERLINE__CLICKHOUSE__PASSWORD) and the user's grants on the database, then restart"
                }
                Some(Permanent::Schema) => {
                    "the table does not have the columns and types this version writes: compare it with deploy/clickhouse/ and apply the migrations (`aggregator migrate`), then restart"
                }
                None => "ClickHouse is unavailable; it is retried",
            },
            SinkError::Precision { .. } => "the record went to dead_letters with the value that does not fit",
            SinkError::Corrupt { .. } => "a stored row does not parse back: keep the log and open an issue",
        }
    }
}

fn ch(table: &'static str) -> impl Fn(clickhouse::error::Error) -> SinkError {
    move |source| SinkError::ClickHouse { table, source }
}

/// `d` as a mantissa at `scale`, refusing any loss of digits.
pub fn mantissa(what: &'static str, d: Decimal, scale: u32) -> Result<i128, SinkError> {
    let n = d.normalize();
    if n.scale() > scale {
        return Err(SinkError::Precision { what, value: d.to_string(), scale });
    }
    let factor = 10i128.pow(scale - n.scale());
    n.mantissa().checked_mul(factor).ok_or(SinkError::Precision { what, value: d.to_string(), scale })
}

/// A mantissa at `scale` back to a decimal.
pub fn from_mantissa(m: i128, scale: u32) -> Result<Decimal, SinkError> {
    Decimal::try_from_i128_with_scale(m, scale)
        .map(|d| d.normalize())
        .map_err(|_| SinkError::Corrupt { table: "-", what: format!("mantissa {m} at scale {scale}") })
}

fn days(t: Timestamp) -> u16 {
    (t.millis().div_euclid(86_400_000)).clamp(0, i64::from(u16::MAX)) as u16
}

fn secs(t: Timestamp) -> u32 {
    (t.millis().div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32
}

/// One rated line item (`rated_usage`).
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct RatedRow {
    record_id: String,
    dedup_key: String,
    seller: String,
    product: String,
    customer: String,
    dimension: String,
    usage_hour: u32,
    month: u16,
    quantity: i128,
    covered_quantity: i128,
    billable_quantity: i128,
    unit_rate: i128,
    currency: String,
    amount: i128,
    charge_type: String,
    agreement_id: String,
    offer_id: String,
    price_book_version: String,
    pricing_model: String,
    month_price: String,
    source_partition: i32,
    source_offset: i64,
    inserted_at: u32,
    /// The canonical allocations as JSON ('' when none), as the embedded store keeps them.
    allocations: String,
}

impl RatedRow {
    /// The row for `r`, read from `partition` at `offset`.
    pub fn new(r: &RatedRecord, partition: i32, offset: i64, now: Timestamp) -> Result<Self, SinkError> {
        Ok(RatedRow {
            record_id: r.record_id.to_string(),
            dedup_key: r.dedup_key.to_string(),
            seller: r.seller.clone(),
            product: r.product.clone(),
            customer: r.customer.clone(),
            dimension: r.dimension.clone(),
            usage_hour: secs(r.hour.start()),
            month: days(r.month().start()),
            quantity: mantissa("quantity", r.quantity, QTY_SCALE)?,
            covered_quantity: mantissa("covered_quantity", r.covered_quantity, QTY_SCALE)?,
            billable_quantity: mantissa("billable_quantity", r.billable_quantity, QTY_SCALE)?,
            unit_rate: mantissa("unit_rate", r.unit_rate, RATE_SCALE)?,
            currency: r.currency.to_string(),
            amount: mantissa("amount", r.amount, AMOUNT_SCALE)?,
            charge_type: r.charge_type.as_str().to_owned(),
            agreement_id: r.agreement_id.clone(),
            offer_id: r.offer_id.clone(),
            price_book_version: r.price_book_version.clone(),
            pricing_model: r.pricing_model.clone(),
            month_price: month_price_text(r.month_price.as_ref()),
            source_partition: partition,
            source_offset: offset,
            inserted_at: secs(now),
            allocations: common::usage::allocations_text(&r.allocations),
        })
    }
}

/// One invoice line version (`monthly_charges`).
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct ChargeRow {
    month: u16,
    usage_period_start: u32,
    usage_period_end: u32,
    marketplace: String,
    customer: String,
    seller_of_record: String,
    manufacturer: String,
    channel: String,
    product: String,
    agreement_id: String,
    offer_id: String,
    dimension: String,
    charge_type: String,
    pricing_model: String,
    currency: String,
    quantity: i128,
    covered_quantity: i128,
    billable_quantity: i128,
    unit_rate: i128,
    mixed_rates: u8,
    month_price: String,
    month_price_hour: u32,
    month_priced_quantity: i128,
    record_amounts: i128,
    amount_unrounded: i128,
    customer_billed_amount: i128,
    records: u64,
    source_partition: i32,
    version: i64,
    updated_at: u32,
    /// JSON of the line's corrections of closed months ([`LineSums::corrections`]); '' if none
    /// (migration 005).
    corrections: String,
}

impl ChargeRow {
    /// The current version of a line, owned by `partition`, folded up to `version` (offset);
    /// `parties` are its seller of record, manufacturer and channel
    /// ([`crate::close::line_parties`]).
    pub fn new(
        key: &ChargeLineKey,
        sums: &LineSums,
        marketplace: &str,
        parties: &Parties,
        partition: i32,
        version: i64,
        now: Timestamp,
    ) -> Result<Self, SinkError> {
        // The line's one rounding (the invoice line reads the same).
        let LineAmount { exact, rounded } = sums.amounts(key).map_err(|e| match e {
            FoldError::Overflow(_) => {
                SinkError::Precision { what: "amount_unrounded", value: format!("{key:?}"), scale: AMOUNT_SCALE }
            }
            other => SinkError::Corrupt { table: "monthly_charges", what: other.to_string() },
        })?;
        Ok(ChargeRow {
            month: days(key.month.start()),
            usage_period_start: secs(key.month.start()),
            usage_period_end: secs(key.month.end()),
            marketplace: marketplace.to_owned(),
            customer: key.customer.clone(),
            seller_of_record: parties.seller_of_record.clone(),
            manufacturer: parties.manufacturer.clone(),
            channel: parties.channel.as_str().to_owned(),
            product: key.product.clone(),
            agreement_id: key.agreement_id.clone(),
            offer_id: sums.offer_id.clone(),
            dimension: key.dimension.clone(),
            charge_type: key.charge_type.as_str().to_owned(),
            pricing_model: sums.pricing_model.clone(),
            currency: key.currency.to_string(),
            quantity: mantissa("quantity", sums.quantity, QTY_SCALE)?,
            covered_quantity: mantissa("covered_quantity", sums.covered_quantity, QTY_SCALE)?,
            billable_quantity: mantissa("billable_quantity", sums.billable_quantity, QTY_SCALE)?,
            unit_rate: mantissa("unit_rate", sums.unit_rate.unwrap_or_default(), RATE_SCALE)?,
            mixed_rates: u8::from(sums.mixed_rates),
            month_price: month_price_text(sums.month_price.as_ref().map(|(_, p)| p)),
            month_price_hour: sums.month_price.as_ref().map_or(0, |(h, _)| secs(h.start())),
            month_priced_quantity: mantissa("month_priced_quantity", sums.month_priced_quantity, QTY_SCALE)?,
            record_amounts: mantissa("record_amounts", sums.amount, AMOUNT_SCALE)?,
            amount_unrounded: mantissa("amount_unrounded", exact, AMOUNT_SCALE)?,
            customer_billed_amount: mantissa("customer_billed_amount", rounded, BILLED_SCALE)?,
            records: sums.records,
            source_partition: partition,
            version,
            updated_at: secs(now),
            corrections: common::rated::corrections_text(&sums.corrections),
        })
    }

    /// Back to a key and exact sums.
    pub fn to_state(&self) -> Result<(ChargeLineKey, LineSums), SinkError> {
        let corrupt = |what: String| SinkError::Corrupt { table: "monthly_charges", what };
        let start = Timestamp(i64::from(self.usage_period_start) * 1000);
        let month: Month = start.hour().month();
        let key = ChargeLineKey {
            month,
            customer: self.customer.clone(),
            product: self.product.clone(),
            agreement_id: self.agreement_id.clone(),
            dimension: self.dimension.clone(),
            charge_type: ChargeType::parse(&self.charge_type)
                .ok_or_else(|| corrupt(format!("charge_type {}", self.charge_type)))?,
            currency: Currency::new(&self.currency).map_err(corrupt)?,
        };
        let mixed = self.mixed_rates != 0;
        let month_price = if self.month_price.is_empty() {
            None
        } else {
            let price: UsagePrice =
                serde_json::from_str(&self.month_price).map_err(|e| corrupt(format!("month_price: {e}")))?;
            Some((Timestamp(i64::from(self.month_price_hour) * 1000).hour(), price))
        };
        let sums = LineSums {
            // The metering seller is the manufacturer (for resale the seller of record is the
            // partner; rows written before the channel was filled in hold the seller in both).
            seller: self.manufacturer.clone(),
            offer_id: self.offer_id.clone(),
            pricing_model: self.pricing_model.clone(),
            month_price,
            month_priced_quantity: from_mantissa(self.month_priced_quantity, QTY_SCALE)?,
            quantity: from_mantissa(self.quantity, QTY_SCALE)?,
            covered_quantity: from_mantissa(self.covered_quantity, QTY_SCALE)?,
            billable_quantity: from_mantissa(self.billable_quantity, QTY_SCALE)?,
            amount: from_mantissa(self.record_amounts, AMOUNT_SCALE)?,
            unit_rate: if mixed { None } else { Some(from_mantissa(self.unit_rate, RATE_SCALE)?) },
            mixed_rates: mixed,
            records: self.records,
            corrections: common::rated::parse_corrections(&self.corrections).map_err(corrupt)?,
        };
        Ok((key, sums))
    }
}

/// One invoice line of a month close (`invoice_lines`), columns in table order.
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct InvoiceRow {
    close_version: u64,
    billing_month: u16,
    usage_period_start: u32,
    usage_period_end: u32,
    marketplace: String,
    broker_id: String,
    invoice_id: String,
    invoice_date: u16,
    seller_of_record: String,
    manufacturer: String,
    channel: String,
    customer: String,
    customer_identifier: String,
    payer_account_id: String,
    product: String,
    offer_id: String,
    offer_visibility: String,
    agreement_id: String,
    dimension: String,
    usage_unit: String,
    charge_type: String,
    description: String,
    pricing_model: String,
    quantity: i128,
    unit_rate: Option<i128>,
    currency: String,
    amount_unrounded: i128,
    customer_billed_amount: i128,
    listing_fee_rate: i128,
    listing_fee: i128,
    cost_of_goods: i128,
    manufacturer_listing_fee: i128,
    seller_net: i128,
    manufacturer_net: i128,
    reporting_currency: String,
    reporting_amount: Option<i128>,
    metering_records: u64,
    /// For a refund: the line it credits (003's default derives it from the description; the
    /// close writes it directly).
    credits_line: String,
    /// For a correction: the closed months it corrects (005).
    corrects: String,
    /// Two-level resale (DSOR channel model): the DSOR partner and its share (005); '' and NULL
    /// on other lines.
    distributor: String,
    distributor_cost_of_goods: Option<i128>,
    distributor_listing_fee: Option<i128>,
    distributor_net: Option<i128>,
}

impl InvoiceRow {
    /// The row of `l` in the close made at `close_version` (ms since the epoch).
    pub fn new(l: &InvoiceLine, month: Month, close_version: u64) -> Result<Self, SinkError> {
        let day = |s: &str| {
            Timestamp::parse_rfc3339(&format!("{s}T00:00:00Z"))
                .map(days)
                .map_err(|what| SinkError::Corrupt { table: "invoice_lines", what })
        };
        // Prorations (1/30 of a fee, unused days of a contract) are quotients: the exact
        // column keeps them to 18 places, the invoice figure is rounded from the full value.
        let exact = l.amount_unrounded.round_dp(AMOUNT_SCALE);
        Ok(InvoiceRow {
            close_version,
            billing_month: days(month.start()),
            usage_period_start: secs(month.start()),
            usage_period_end: secs(month.end()),
            marketplace: l.marketplace.clone(),
            broker_id: l.broker_id.clone(),
            invoice_id: l.invoice_id.clone(),
            invoice_date: day(&l.invoice_date)?,
            seller_of_record: l.seller_of_record.clone(),
            manufacturer: l.manufacturer.clone(),
            channel: l.channel.clone(),
            customer: l.customer.clone(),
            customer_identifier: l.customer_identifier.clone(),
            payer_account_id: l.payer_account_id.clone(),
            product: l.product.clone(),
            offer_id: l.offer_id.clone(),
            offer_visibility: l.offer_visibility.clone(),
            agreement_id: l.agreement_id.clone(),
            dimension: l.dimension.clone(),
            usage_unit: l.usage_unit.clone(),
            charge_type: l.charge_type.as_str().to_owned(),
            description: l.description.clone(),
            pricing_model: l.pricing_model.clone(),
            quantity: mantissa("quantity", l.quantity, QTY_SCALE)?,
            unit_rate: l.unit_rate.map(|r| mantissa("unit_rate", r.round_dp(RATE_SCALE), RATE_SCALE)).transpose()?,
            currency: l.currency.to_string(),
            amount_unrounded: mantissa("amount_unrounded", exact, AMOUNT_SCALE)?,
            customer_billed_amount: mantissa("customer_billed_amount", l.customer_billed_amount, BILLED_SCALE)?,
            listing_fee_rate: mantissa("listing_fee_rate", l.listing_fee_rate, RATE_SCALE)?,
            listing_fee: mantissa("listing_fee", l.listing_fee, BILLED_SCALE)?,
            cost_of_goods: mantissa("cost_of_goods", l.cost_of_goods, BILLED_SCALE)?,
            manufacturer_listing_fee: mantissa("manufacturer_listing_fee", l.manufacturer_listing_fee, BILLED_SCALE)?,
            seller_net: mantissa("seller_net", l.seller_net, BILLED_SCALE)?,
            manufacturer_net: mantissa("manufacturer_net", l.manufacturer_net, BILLED_SCALE)?,
            reporting_currency: l.reporting_currency.map(|c| c.to_string()).unwrap_or_default(),
            reporting_amount: l.reporting_amount.map(|a| mantissa("reporting_amount", a, BILLED_SCALE)).transpose()?,
            metering_records: l.metering_records,
            credits_line: l.credits_line.clone(),
            corrects: l.corrects.clone(),
            distributor: l.distributor.as_ref().map(|d| d.party.clone()).unwrap_or_default(),
            distributor_cost_of_goods: share(l, "distributor_cost_of_goods", |d| d.cost_of_goods)?,
            distributor_listing_fee: share(l, "distributor_listing_fee", |d| d.listing_fee)?,
            distributor_net: share(l, "distributor_net", |d| d.net)?,
        })
    }
}

/// One amount of a line's distributor share as a `Nullable(Decimal(38, 9))` mantissa.
fn share(
    l: &InvoiceLine,
    what: &'static str,
    pick: impl Fn(&crate::close::DistributorShare) -> Decimal,
) -> Result<Option<i128>, SinkError> {
    l.distributor.as_ref().map(|d| mantissa(what, pick(d), BILLED_SCALE)).transpose()
}

/// The month's invoice lines as the fold left them in `monthly_charges`.
pub async fn load_month_lines(client: &Client, month: Month) -> Result<Vec<ChargeLine>, SinkError> {
    let rows: Vec<ChargeRow> = client
        .query("SELECT ?fields FROM monthly_charges FINAL WHERE month = toDate(?)")
        .bind(month.start().to_datetime().format("%Y-%m-%d").to_string())
        .fetch_all()
        .await
        .map_err(ch("monthly_charges"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let (key, sums) = row.to_state()?;
        out.push(sums.to_line(&key).map_err(|e| SinkError::Corrupt { table: "monthly_charges", what: e.to_string() })?);
    }
    out.sort_by(|a, b| {
        (&a.customer, &a.product, &a.agreement_id, &a.dimension).cmp(&(
            &b.customer,
            &b.product,
            &b.agreement_id,
            &b.dimension,
        ))
    });
    Ok(out)
}

#[derive(Row, Deserialize)]
struct TrialRow {
    agreement_id: String,
    usage_hour: u32,
    dimension: String,
    billable_quantity: i128,
    unit_rate: i128,
}

/// Hourly items of `agreements` in `month` (the AMI trial credit).
pub async fn load_trial_hours(
    client: &Client,
    month: Month,
    agreements: &[String],
) -> Result<Vec<TrialHourUsage>, SinkError> {
    if agreements.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<TrialRow> = client
        .query(
            "SELECT agreement_id, toUInt32(usage_hour) AS usage_hour, dimension, billable_quantity, unit_rate
             FROM rated_usage FINAL WHERE month = toDate(?) AND has(?, agreement_id)",
        )
        .bind(month.start().to_datetime().format("%Y-%m-%d").to_string())
        .bind(agreements)
        .fetch_all()
        .await
        .map_err(ch("rated_usage"))?;
    rows.into_iter()
        .map(|r| {
            Ok(TrialHourUsage {
                agreement_id: r.agreement_id,
                hour: Timestamp(i64::from(r.usage_hour) * 1000).hour(),
                dimension: r.dimension,
                billable_quantity: from_mantissa(r.billable_quantity, QTY_SCALE)?,
                unit_rate: from_mantissa(r.unit_rate, RATE_SCALE)?,
            })
        })
        .collect()
}

/// A month price as stored in text columns (JSON; empty for record-priced lines).
fn month_price_text(p: Option<&UsagePrice>) -> String {
    p.and_then(|p| serde_json::to_string(p).ok()).unwrap_or_default()
}

/// One refused record (`rejected_records`).
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct RejectedRow {
    rejection_id: String,
    received_at: u32,
    received_at_ms: i64,
    seller: String,
    product: String,
    customer: String,
    record_id: String,
    reason: String,
    message: String,
    raw: String,
}

impl From<&RejectedEvent> for RejectedRow {
    fn from(e: &RejectedEvent) -> Self {
        RejectedRow {
            rejection_id: e.rejection_id.to_string(),
            received_at: secs(e.received_at),
            received_at_ms: e.received_at.millis(),
            seller: e.seller.clone(),
            product: e.product.clone(),
            customer: e.customer.clone(),
            record_id: e.record_id.map(|i| i.to_string()).unwrap_or_default(),
            reason: e.code.as_str().to_owned(),
            message: e.message.clone(),
            raw: e.raw.clone(),
        }
    }
}

/// One dead letter (`dead_letters`).
#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub struct DeadLetterRow {
    at: u32,
    stage: String,
    source_topic: String,
    source_partition: i32,
    source_offset: i64,
    reason: String,
    payload_hex: String,
}

impl From<&DeadLetter> for DeadLetterRow {
    fn from(d: &DeadLetter) -> Self {
        DeadLetterRow {
            at: secs(d.at),
            stage: d.stage.clone(),
            source_topic: d.source_topic.clone(),
            source_partition: d.source_partition,
            source_offset: d.source_offset,
            reason: d.reason.clone(),
            payload_hex: hex::encode(&d.payload[..d.payload.len().min(65_536)]),
        }
    }
}

/// Inserts rows into `table` in one INSERT. Returns when ClickHouse confirmed it.
pub async fn insert_rows<T>(client: &Client, table: &'static str, rows: &[T]) -> Result<(), SinkError>
where
    T: Row + clickhouse::RowWrite + for<'a> clickhouse::RowOwned,
    for<'a> T: Row<Value<'a> = T>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<T>(table).await.map_err(ch(table))?;
    for r in rows {
        insert.write(r).await.map_err(ch(table))?;
    }
    insert.end().await.map_err(ch(table))
}

/// What ClickHouse holds for one rated partition: the newest version of each of its lines, the
/// last offset folded in, and the dedup keys of line items at or after `since_hour`.
#[derive(Debug, Default)]
pub struct PartitionSnapshot {
    /// Last rated offset included in the lines (None: nothing folded yet).
    pub committed: Option<i64>,
    /// Lines owned by the partition.
    pub lines: Vec<(ChargeLineKey, LineSums)>,
    /// (hour, dedup key) of line items folded up to `committed`.
    pub keys: Vec<(Hour, String)>,
}

#[derive(Row, Deserialize)]
struct CommittedRow {
    n: u64,
    v: i64,
}

#[derive(Row, Deserialize)]
struct KeyRow {
    dedup_key: String,
    usage_hour: u32,
}

/// Loads a partition's snapshot (restart and rebalance).
pub async fn load_partition(client: &Client, partition: i32, since_hour: Hour) -> Result<PartitionSnapshot, SinkError> {
    let c: CommittedRow = client
        .query("SELECT count() AS n, max(version) AS v FROM monthly_charges WHERE source_partition = ?")
        .bind(partition)
        .fetch_one()
        .await
        .map_err(ch("monthly_charges"))?;
    if c.n == 0 {
        return Ok(PartitionSnapshot::default());
    }
    let rows: Vec<ChargeRow> = client
        .query("SELECT ?fields FROM monthly_charges FINAL WHERE source_partition = ?")
        .bind(partition)
        .fetch_all()
        .await
        .map_err(ch("monthly_charges"))?;
    let lines = rows.iter().map(ChargeRow::to_state).collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<KeyRow> = client
        .query("SELECT dedup_key, toUInt32(usage_hour) AS usage_hour FROM rated_usage WHERE source_partition = ? AND source_offset <= ? AND usage_hour >= toDateTime(?)")
        .bind(partition)
        .bind(c.v)
        .bind(secs(since_hour.start()))
        .fetch_all()
        .await
        .map_err(ch("rated_usage"))?;
    Ok(PartitionSnapshot {
        committed: Some(c.v),
        lines,
        keys: keys.into_iter().map(|k| (Timestamp(i64::from(k.usage_hour) * 1000).hour(), k.dedup_key)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clickhouse(table: &'static str, source: clickhouse::error::Error) -> SinkError {
        SinkError::ClickHouse { table, source }
    }

    #[test]
    fn connection_refused_timeouts_and_server_overload_are_transient() {
        use clickhouse::error::Error as E;
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        for e in [
            E::Network(Box::new(refused)),
            E::TimedOut,
            // 159 TIMEOUT_EXCEEDED, 252 TOO_MANY_PARTS, 241 MEMORY_LIMIT_EXCEEDED, 243 NOT_ENOUGH_SPACE
            E::BadResponse("Code: 159. DB::Exception: Timeout exceeded: elapsed 30.1 seconds".into()),
            E::BadResponse("Code: 252, e.displayText() = DB::Exception: Too many parts (300)".into()),
            E::BadResponse("Code: 241. DB::Exception: Memory limit (total) exceeded".into()),
            E::BadResponse("Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space".into()),
            // A 5xx from a proxy, without a ClickHouse code.
            E::BadResponse("503 Service Unavailable".into()),
        ] {
            let e = clickhouse("monthly_charges", e);
            assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        }
    }

    #[test]
    fn bad_credentials_and_missing_grants_are_fatal_and_say_check_the_password() {
        use clickhouse::error::Error as E;
        for text in [
            "Code: 516. DB::Exception: default: Authentication failed: password is incorrect",
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user default, e.what() = DB::Exception",
            "Code: 192, e.displayText() = DB::Exception: Unknown user meterline",
            "Code: 497. DB::Exception: meterline: Not enough privileges. To execute this query it's necessary to have grant INSERT",
        ] {
            let e = clickhouse("rated_usage", E::BadResponse(text.into()));
            assert_eq!(e.class(), ErrorClass::Fatal, "{e}");
            assert!(e.advice().contains("password"), "{}", e.advice());
            assert_eq!(e.table(), Some("rated_usage"));
        }
    }

    #[test]
    fn a_table_with_another_schema_is_fatal_and_says_apply_the_migrations() {
        use clickhouse::error::Error as E;
        for e in [
            E::BadResponse("Code: 16. DB::Exception: No such column month in table db.monthly_charges".into()),
            E::BadResponse("Code: 60, e.displayText() = DB::Exception: Table db.monthly_charges doesn't exist.".into()),
            E::BadResponse("Code: 47. DB::Exception: Missing columns: 'version' while processing query".into()),
            E::BadResponse("Code: 53. DB::Exception: Type mismatch in IN or VALUES section".into()),
            E::BadResponse("Code: 33. DB::Exception: Cannot read all data. Bytes read: 3. Bytes expected: 16.".into()),
            E::NotEnoughData,
            E::SchemaMismatch("column `version` is String".into()),
        ] {
            let e = clickhouse("monthly_charges", e);
            assert_eq!(e.class(), ErrorClass::Fatal, "{e}");
            assert!(e.advice().contains("aggregator migrate"), "{}", e.advice());
        }
    }

    #[test]
    fn a_value_that_does_not_fit_is_poison_and_a_corrupt_row_is_fatal() {
        let precision = mantissa("amount", "0.0000000000000000001".parse().unwrap(), AMOUNT_SCALE).unwrap_err();
        assert_eq!(precision.class(), ErrorClass::Poison);
        let corrupt = SinkError::Corrupt { table: "monthly_charges", what: "charge_type x".into() };
        assert_eq!(corrupt.class(), ErrorClass::Fatal);
    }

    #[test]
    fn exception_codes_are_read_from_both_server_generations() {
        assert_eq!(exception_code("Code: 516. DB::Exception: x"), Some(516));
        assert_eq!(exception_code("Code: 193, e.displayText() = x"), Some(193));
        assert_eq!(exception_code("bad response: 502 Bad Gateway"), None);
    }

    #[test]
    fn a_tiered_line_survives_the_clickhouse_row_and_prices_the_same() {
        use crate::rollup::MonthlyRollup;
        use common::id::{DedupKey, RecordId};
        use common::pricing::{Tier, UsagePrice};
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let price = UsagePrice::Graduated(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.10") },
            Tier { up_to: None, rate: d("0.05") },
        ]);
        let mut rollup = MonthlyRollup::new();
        let mut key = None;
        for h in 0..30 {
            let r = RatedRecord {
                record_id: RecordId(h),
                dedup_key: DedupKey(h),
                seller: "s".into(),
                product: "p".into(),
                customer: "c".into(),
                dimension: "api_calls".into(),
                hour: Hour(498_192 + h as i64),
                quantity: d("100"),
                covered_quantity: Decimal::ZERO,
                billable_quantity: d("100"),
                unit_rate: d("0.10"),
                currency: Currency::USD,
                amount: Decimal::ZERO,
                month_price: Some(price.clone()),
                pricing_model: "graduated".into(),
                booked_month: None,
                charge_type: ChargeType::Usage,
                agreement_id: "a".into(),
                offer_id: "o".into(),
                price_book_version: "v".into(),
                allocations: vec![],
            };
            key = Some(rollup.fold(&r).unwrap());
        }
        let key = key.unwrap();
        let sums = rollup.sums(&key).unwrap();
        let row = ChargeRow::new(&key, sums, "aws", &direct("s"), 0, 29, Timestamp(0)).unwrap();
        assert_eq!(row.customer_billed_amount, mantissa("x", d("200"), BILLED_SCALE).unwrap());
        let (back_key, back) = row.to_state().unwrap();
        assert_eq!((&back_key, &back), (&key, sums));
    }

    #[test]
    fn a_graduated_correction_of_500_late_after_3000_closed_survives_the_clickhouse_row_at_25_00() {
        // October closed at 3,000 calls (1,000 × 0.10 + 2,000 × 0.05 = 200.00); 500 late calls
        // are booked on November at the 0.05 tier October had reached: 25.00, not 50.00.
        use crate::rollup::MonthlyRollup;
        use common::id::{DedupKey, RecordId};
        use common::pricing::{Tier, UsagePrice};
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let price = UsagePrice::Graduated(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.10") },
            Tier { up_to: Some(d("10000")), rate: d("0.05") },
            Tier { up_to: None, rate: d("0.01") },
        ]);
        let oct = 498_192 - 744;
        let record = |h: i64, q: &str, late: bool| RatedRecord {
            record_id: RecordId(h as u128),
            dedup_key: DedupKey(h as u128),
            seller: "s".into(),
            product: "p".into(),
            customer: "c".into(),
            dimension: "api_calls".into(),
            hour: Hour(oct + h),
            quantity: d(q),
            covered_quantity: Decimal::ZERO,
            billable_quantity: d(q),
            unit_rate: d("0.10"),
            currency: Currency::USD,
            amount: Decimal::ZERO,
            month_price: Some(price.clone()),
            pricing_model: "graduated".into(),
            booked_month: late.then(|| Month::parse("2026-11").unwrap()),
            charge_type: if late { ChargeType::Adjustment } else { ChargeType::Usage },
            agreement_id: "a".into(),
            offer_id: "o".into(),
            price_book_version: "v".into(),
            allocations: vec![],
        };
        let mut rollup = MonthlyRollup::new();
        for h in 0..30 {
            rollup.fold(&record(h, "100", false)).unwrap();
        }
        let key = rollup.fold(&record(743, "500", true)).unwrap();
        let sums = rollup.sums(&key).unwrap();
        let row = ChargeRow::new(&key, sums, "aws", &direct("s"), 0, 30, Timestamp(0)).unwrap();
        assert_eq!(row.customer_billed_amount, mantissa("x", d("25"), BILLED_SCALE).unwrap());
        assert!(row.corrections.contains("\"closed_quantity\":\"3000\""), "{}", row.corrections);
        let (back_key, back) = row.to_state().unwrap();
        assert_eq!((&back_key, &back), (&key, sums));
        assert_eq!(back.amounts(&back_key).unwrap().rounded, d("25.00"));
    }

    fn direct(seller: &str) -> Parties {
        Parties {
            seller_of_record: seller.into(),
            manufacturer: seller.into(),
            channel: common::catalogue::Channel::Direct,
        }
    }

    #[test]
    fn a_resale_line_writes_its_channel_and_partner_and_reads_back_the_metering_seller() {
        use crate::rollup::MonthlyRollup;
        use common::id::{DedupKey, RecordId};
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let r = RatedRecord {
            record_id: RecordId(1),
            dedup_key: DedupKey(1),
            seller: "acme".into(),
            product: "suite".into(),
            customer: "c".into(),
            dimension: "api_calls".into(),
            hour: Hour(498_192),
            quantity: d("10"),
            covered_quantity: Decimal::ZERO,
            billable_quantity: d("10"),
            unit_rate: d("0.10"),
            currency: Currency::USD,
            amount: d("1.0"),
            month_price: None,
            pricing_model: "per_unit".into(),
            booked_month: None,
            charge_type: ChargeType::Usage,
            agreement_id: "a".into(),
            offer_id: "suite-dsor".into(),
            price_book_version: "v".into(),
            allocations: vec![],
        };
        let mut rollup = MonthlyRollup::new();
        let key = rollup.fold(&r).unwrap();
        let sums = rollup.sums(&key).unwrap();
        let parties = Parties {
            seller_of_record: "resellerco".into(),
            manufacturer: "acme".into(),
            channel: common::catalogue::Channel::Dsor,
        };
        let row = ChargeRow::new(&key, sums, "aws", &parties, 0, 1, Timestamp(0)).unwrap();
        assert_eq!(
            (row.channel.as_str(), row.seller_of_record.as_str(), row.manufacturer.as_str()),
            ("dsor", "resellerco", "acme")
        );
        let (_, back) = row.to_state().unwrap();
        assert_eq!(&back, sums, "the line's own seller survives");
    }

    #[test]
    fn mantissas_are_exact_or_refused() {
        assert_eq!(mantissa("x", "1.5".parse().unwrap(), 9).unwrap(), 1_500_000_000);
        assert_eq!(mantissa("x", "0.00000001".parse().unwrap(), 12).unwrap(), 10_000);
        assert!(mantissa("x", "0.0000000001".parse().unwrap(), 9).is_err());
        assert_eq!(from_mantissa(1_500_000_000, 9).unwrap().to_string(), "1.5");
        let d: Decimal = "123456789.123456789".parse().unwrap();
        assert_eq!(from_mantissa(mantissa("x", d, 18).unwrap(), 18).unwrap(), d);
    }
}
