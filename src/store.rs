//! SHELL. The embedded default's durable store: one SQLite database (WAL, `synchronous=FULL`).
//!
//! Tables (documented for analysts in `docs/embedded-store.md`):
//! - `rated_usage`: one row per accepted record: what the seller sent (canonical), its ids, and
//!   how it was rated (coverage, rate, amount, agreement, offer, price-book version).
//!   `(hour, dedup_key)` is UNIQUE: the database itself refuses a second charge for a slot,
//!   behind the in-memory dedup.
//! - `rejected_records`: every refused record with its reason and the JSON as sent.
//! - `monthly_charges`: one row per invoice line, exact sums plus the rounded amount.
//! - `ingest_counts`: records answered, by status (identical resends included).
//!
//! Amounts and quantities are stored as decimal TEXT: exact, and readable by any SQL client.
//! One [`Store::apply`] call is one transaction: a batch is all durable or not at all.

use aggregator::close::{MonthClose, TrialHourUsage, CSV_HEADER, FIELD_COUNT};
use aggregator::rollup::LineSums;
use common::id::{DedupKey, RecordId};
use common::money::Currency;
use common::rated::{ChargeLine, ChargeLineKey, ChargeType, RatedRecord};
use common::time::{Hour, Month, Timestamp};
use rusqlite::{params, Connection, OptionalExtension};
use rust_decimal::Decimal;
use std::path::Path;
use std::str::FromStr;

/// Schema version written to `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS rated_usage (
    record_id          TEXT NOT NULL,
    dedup_key          TEXT NOT NULL,
    seller             TEXT NOT NULL,
    product            TEXT NOT NULL,
    customer           TEXT NOT NULL,
    customer_ref       TEXT NOT NULL,
    dimension          TEXT NOT NULL,
    month              TEXT NOT NULL,
    hour               INTEGER NOT NULL,
    usage_hour         TEXT NOT NULL,
    timestamp_ms       INTEGER NOT NULL,
    received_at_ms     INTEGER NOT NULL,
    quantity           TEXT NOT NULL,
    allocations        TEXT,
    covered_quantity   TEXT NOT NULL,
    billable_quantity  TEXT NOT NULL,
    unit_rate          TEXT NOT NULL,
    currency           TEXT NOT NULL,
    amount             TEXT NOT NULL,
    charge_type        TEXT NOT NULL,
    agreement_id       TEXT NOT NULL,
    offer_id           TEXT NOT NULL,
    price_book_version TEXT NOT NULL,
    pricing_model      TEXT NOT NULL,
    month_price        TEXT,            -- JSON price of month-priced models (tiers, packages)
    booked_month       TEXT,            -- late usage for a closed month: the month it is billed on
    -- One row per (product, customer, dimension, hour) slot, enforced by the database itself.
    -- Leading with the hour keeps inserts on the index's newest pages (ids are random) and serves
    -- the dedup replay's range scan.
    UNIQUE (hour, dedup_key)
);

CREATE TABLE IF NOT EXISTS rejected_records (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at_ms INTEGER NOT NULL,
    seller         TEXT NOT NULL,
    product        TEXT NOT NULL,
    record_id      TEXT,
    reason         TEXT NOT NULL,
    message        TEXT NOT NULL,
    raw            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejected_records_reason ON rejected_records(reason);

CREATE TABLE IF NOT EXISTS monthly_charges (
    month                 TEXT NOT NULL,
    customer              TEXT NOT NULL,
    product               TEXT NOT NULL,
    agreement_id          TEXT NOT NULL,
    dimension             TEXT NOT NULL,
    charge_type           TEXT NOT NULL,
    currency              TEXT NOT NULL,
    seller                TEXT NOT NULL,
    offer_id              TEXT NOT NULL,
    pricing_model         TEXT NOT NULL,
    quantity              TEXT NOT NULL,
    covered_quantity      TEXT NOT NULL,
    billable_quantity     TEXT NOT NULL,
    unit_rate             TEXT,
    mixed_rates           INTEGER NOT NULL,
    month_price           TEXT,    -- JSON price of the month-priced quantity (latest hour's)
    month_price_hour      INTEGER,
    month_priced_quantity TEXT NOT NULL,
    record_amounts        TEXT NOT NULL, -- exact Σ of record-priced amounts
    amount_unrounded      TEXT NOT NULL, -- record_amounts + month_price(month_priced_quantity)
    amount                TEXT NOT NULL,
    records               INTEGER NOT NULL,
    corrections           TEXT NOT NULL DEFAULT '', -- JSON of an adjustment line's corrected months ('' if none)
    PRIMARY KEY (month, customer, product, agreement_id, dimension, charge_type, currency)
);

-- Months closed by `meterline close`: their invoice lines are final (corrections go to a later month).
CREATE TABLE IF NOT EXISTS closed_months (
    month              TEXT PRIMARY KEY,
    marketplace        TEXT NOT NULL,
    price_book_version TEXT NOT NULL,
    closed_at_ms       INTEGER NOT NULL,
    lines              INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS ingest_counts (
    status  TEXT PRIMARY KEY,
    records INTEGER NOT NULL
);
"#;

/// Store failures: the batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not parse back (the file was edited or is corrupt).
    #[error("corrupt value in {table}.{column}: `{value}`")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// Value.
        value: String,
    },
    /// The database was written by a newer Meterline.
    #[error("database schema version {0} is newer than this build's {SCHEMA_VERSION}")]
    TooNew(i64),
    /// The database was written by an older pre-release Meterline (no migration is provided
    /// before 1.0: re-run the demo or re-ingest into a new data directory).
    #[error("database schema version {0} is older than this build's {SCHEMA_VERSION}; use a new data directory")]
    TooOld(i64),
}

/// A refused record to store.
#[derive(Debug, Clone)]
pub struct RejectedRow {
    /// Arrival time.
    pub received_at_ms: i64,
    /// Seller.
    pub seller: String,
    /// Product as named.
    pub product: String,
    /// Record id if known.
    pub record_id: Option<RecordId>,
    /// Reason code.
    pub reason: &'static str,
    /// Message.
    pub message: String,
    /// JSON as sent (or canonical JSON for records refused after validation).
    pub raw: String,
}

impl From<&rater::batch::Refusal> for RejectedRow {
    /// The batch core's refusal, rendered once for both stores ([`rater::batch::render_as_sent`]).
    fn from(r: &rater::batch::Refusal) -> Self {
        RejectedRow {
            received_at_ms: r.received_at.millis(),
            seller: r.seller.clone(),
            product: r.product.clone(),
            record_id: r.record_id,
            reason: r.rejection.code.as_str(),
            message: r.rejection.message.clone(),
            raw: r.raw.clone(),
        }
    }
}

/// Everything one batch writes.
#[derive(Debug, Default)]
pub struct BatchWrite<'a> {
    /// Newly accepted, rated records (with their canonical allocations JSON).
    pub rated: Vec<(&'a RatedRecord, &'a common::usage::UsageRecord)>,
    /// Refused records.
    pub rejected: Vec<RejectedRow>,
    /// Invoice lines changed by the batch, with their new sums.
    pub lines: Vec<(ChargeLineKey, LineSums)>,
    /// Status counts to add.
    pub counts: Vec<(&'static str, u64)>,
}

/// The SQLite database of the embedded mode.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

fn corrupt(table: &'static str, column: &'static str, value: &str) -> StoreError {
    StoreError::Corrupt { table, column, value: value.to_owned() }
}

fn dec(table: &'static str, column: &'static str, v: &str) -> Result<Decimal, StoreError> {
    Decimal::from_str(v).map_err(|_| corrupt(table, column, v))
}

/// An adjustment line's corrections (`monthly_charges.corrections`, JSON; '' for none).
fn corrections(v: &str) -> Result<Vec<common::rated::Correction>, StoreError> {
    common::rated::parse_corrections(v).map_err(|_| corrupt("monthly_charges", "corrections", v))
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// Opens a read-only connection for queries while a writer runs.
    pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        // WAL: readers never block the writer. synchronous=FULL: a commit is on disk before we
        // answer `Success` (guarantee 1), even across a power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The unique indexes on random 128-bit ids are hot and randomly accessed: keep them in
        // memory (256 MiB page cache) and checkpoint the WAL in large steps.
        conn.pragma_update(None, "cache_size", -262_144)?;
        conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        if version != 0 && version < SCHEMA_VERSION {
            return Err(StoreError::TooOld(version));
        }
        conn.execute_batch(SCHEMA)?;
        // The invoice lines of closed months: one TEXT column per RPT-6 field, named as in the
        // CSV export, so analysts query the same names everywhere.
        let columns: Vec<String> = CSV_HEADER.split(',').map(|c| format!("{c} TEXT NOT NULL")).collect();
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS invoice_lines ({});
             CREATE INDEX IF NOT EXISTS invoice_lines_month ON invoice_lines(billing_month, customer);",
            columns.join(", ")
        ))?;
        // Columns added since the table was first created (`credits_line`, issue 17): a store
        // written by an earlier version gains them, empty for the lines it already holds.
        let existing: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('invoice_lines')")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for c in CSV_HEADER.split(',').filter(|c| !existing.iter().any(|e| e == c)) {
            conn.execute_batch(&format!("ALTER TABLE invoice_lines ADD COLUMN {c} TEXT NOT NULL DEFAULT ''"))?;
        }
        // `monthly_charges.corrections` (issue 17 item 2), the same way: a store written before
        // it gains the column, empty for its lines (none of which carried a correction).
        let has_corrections: bool = conn
            .prepare("SELECT count(*) FROM pragma_table_info('monthly_charges') WHERE name = 'corrections'")?
            .query_row([], |r| r.get::<_, i64>(0))?
            > 0;
        if !has_corrections {
            conn.execute_batch("ALTER TABLE monthly_charges ADD COLUMN corrections TEXT NOT NULL DEFAULT ''")?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Store { conn })
    }

    /// The connection, for read-only queries.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Writes one page in one transaction and commits it (the schema version, rewritten as it
    /// is): whether the store accepts writes now, for start-up and `/ready` (issue 12).
    pub fn probe_write(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    /// Writes one batch in one transaction.
    pub fn apply(&mut self, batch: &BatchWrite<'_>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO rated_usage (record_id, dedup_key, seller, product, customer, customer_ref, dimension, month, hour, usage_hour,
                 timestamp_ms, received_at_ms, quantity, allocations, covered_quantity, billable_quantity, unit_rate, currency, amount,
                 charge_type, agreement_id, offer_id, price_book_version, pricing_model, month_price, booked_month)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
            )?;
            for (r, u) in &batch.rated {
                // NULL when none (the store's convention); else the text ClickHouse keeps too.
                let allocations = (!r.allocations.is_empty()).then(|| common::usage::allocations_text(&r.allocations));
                ins.execute(params![
                    r.record_id.to_string(),
                    r.dedup_key.to_string(),
                    r.seller,
                    r.product,
                    r.customer,
                    format!("{:?}", u.customer_ref),
                    r.dimension,
                    r.month().to_string(),
                    r.hour.0,
                    r.hour.to_string(),
                    u.timestamp.millis(),
                    u.received_at.millis(),
                    r.quantity.to_string(),
                    allocations,
                    r.covered_quantity.to_string(),
                    r.billable_quantity.to_string(),
                    r.unit_rate.to_string(),
                    r.currency.as_str(),
                    r.amount.to_string(),
                    r.charge_type.as_str(),
                    r.agreement_id,
                    r.offer_id,
                    r.price_book_version,
                    r.pricing_model,
                    r.month_price.as_ref().and_then(|p| serde_json::to_string(p).ok()),
                    r.booked_month.map(|m| m.to_string()),
                ])?;
            }
            let mut rej = tx.prepare_cached(
                "INSERT INTO rejected_records (received_at_ms, seller, product, record_id, reason, message, raw)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for r in &batch.rejected {
                rej.execute(params![
                    r.received_at_ms,
                    r.seller,
                    r.product,
                    r.record_id.map(|i| i.to_string()),
                    r.reason,
                    r.message,
                    r.raw
                ])?;
            }
            let mut line = tx.prepare_cached(
                "INSERT OR REPLACE INTO monthly_charges (month, customer, product, agreement_id, dimension, charge_type, currency, seller,
                 offer_id, pricing_model, quantity, covered_quantity, billable_quantity, unit_rate, mixed_rates, month_price,
                 month_price_hour, month_priced_quantity, record_amounts, amount_unrounded, amount, records, corrections)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
            )?;
            for (key, sums) in &batch.lines {
                let rounded =
                    sums.to_line(key).map_err(|_| corrupt("monthly_charges", "currency", key.currency.as_str()))?;
                line.execute(params![
                    key.month.to_string(),
                    key.customer,
                    key.product,
                    key.agreement_id,
                    key.dimension,
                    key.charge_type.as_str(),
                    key.currency.as_str(),
                    sums.seller,
                    sums.offer_id,
                    sums.pricing_model,
                    sums.quantity.to_string(),
                    sums.covered_quantity.to_string(),
                    sums.billable_quantity.to_string(),
                    sums.unit_rate.map(|r| r.to_string()),
                    sums.mixed_rates,
                    sums.month_price.as_ref().and_then(|(_, p)| serde_json::to_string(p).ok()),
                    sums.month_price.as_ref().map(|(h, _)| h.0),
                    sums.month_priced_quantity.to_string(),
                    sums.amount.to_string(),
                    rounded.amount_unrounded.to_string(),
                    rounded.amount.to_string(),
                    sums.records as i64,
                    common::rated::corrections_text(&sums.corrections),
                ])?;
            }
            let mut count = tx.prepare_cached(
                "INSERT INTO ingest_counts (status, records) VALUES (?1, ?2)
                 ON CONFLICT(status) DO UPDATE SET records = records + excluded.records",
            )?;
            for (status, n) in &batch.counts {
                count.execute(params![status, *n as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Dedup claims of every record whose hour is at or after `oldest` (the bounded replay).
    pub fn dedup_claims_since(&self, oldest: Hour) -> Result<Vec<(DedupKey, Hour, RecordId)>, StoreError> {
        let mut st = self.conn.prepare("SELECT dedup_key, hour, record_id FROM rated_usage WHERE hour >= ?1")?;
        let rows =
            st.query_map([oldest.0], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (k, h, id) = row?;
            let k = DedupKey::from_str(&k).map_err(|_| corrupt("rated_usage", "dedup_key", &k))?;
            let id = RecordId::from_str(&id).map_err(|_| corrupt("rated_usage", "record_id", &id))?;
            out.push((k, Hour(h), id));
        }
        Ok(out)
    }

    /// Every invoice line's exact sums (reloaded into the rollup on start).
    pub fn line_sums(&self) -> Result<Vec<(ChargeLineKey, LineSums)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT month, customer, product, dimension, charge_type, currency, seller, quantity, covered_quantity,
                    billable_quantity, unit_rate, mixed_rates, record_amounts, records, agreement_id, offer_id, pricing_model,
                    month_price, month_price_hour, month_priced_quantity, corrections FROM monthly_charges",
        )?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        const T: &str = "monthly_charges";
        while let Some(r) = rows.next()? {
            let month: String = r.get(0)?;
            let charge_type: String = r.get(4)?;
            let currency: String = r.get(5)?;
            let unit_rate: Option<String> = r.get(10)?;
            let key = ChargeLineKey {
                month: Month::parse(&month).map_err(|_| corrupt(T, "month", &month))?,
                customer: r.get(1)?,
                product: r.get(2)?,
                agreement_id: r.get(14)?,
                dimension: r.get(3)?,
                charge_type: ChargeType::parse(&charge_type).ok_or_else(|| corrupt(T, "charge_type", &charge_type))?,
                currency: Currency::new(&currency).map_err(|_| corrupt(T, "currency", &currency))?,
            };
            let month_price = match (r.get::<_, Option<String>>(17)?, r.get::<_, Option<i64>>(18)?) {
                (Some(json), Some(h)) => {
                    Some((Hour(h), serde_json::from_str(&json).map_err(|_| corrupt(T, "month_price", &json))?))
                }
                _ => None,
            };
            let sums = LineSums {
                seller: r.get(6)?,
                offer_id: r.get(15)?,
                pricing_model: r.get(16)?,
                month_price,
                month_priced_quantity: dec(T, "month_priced_quantity", &r.get::<_, String>(19)?)?,
                quantity: dec(T, "quantity", &r.get::<_, String>(7)?)?,
                covered_quantity: dec(T, "covered_quantity", &r.get::<_, String>(8)?)?,
                billable_quantity: dec(T, "billable_quantity", &r.get::<_, String>(9)?)?,
                unit_rate: unit_rate.map(|u| dec(T, "unit_rate", &u)).transpose()?,
                mixed_rates: r.get(11)?,
                amount: dec(T, "record_amounts", &r.get::<_, String>(12)?)?,
                records: r.get::<_, i64>(13)? as u64,
                corrections: corrections(&r.get::<_, String>(20)?)?,
            };
            out.push((key, sums));
        }
        Ok(out)
    }

    /// Invoice lines, optionally for one month, sorted.
    pub fn charge_lines(conn: &Connection, month: Option<&str>) -> Result<Vec<ChargeLine>, StoreError> {
        let mut st = conn.prepare(
            "SELECT month, customer, seller, product, dimension, charge_type, currency, quantity, covered_quantity,
                    billable_quantity, unit_rate, amount_unrounded, amount, records, agreement_id, offer_id, pricing_model,
                    corrections
             FROM monthly_charges WHERE (?1 IS NULL OR month = ?1)
             ORDER BY month, customer, product, agreement_id, dimension, charge_type, currency",
        )?;
        let mut rows = st.query([month])?;
        let mut out = Vec::new();
        const T: &str = "monthly_charges";
        while let Some(r) = rows.next()? {
            let charge_type: String = r.get(5)?;
            let currency: String = r.get(6)?;
            let unit_rate: Option<String> = r.get(10)?;
            out.push(ChargeLine {
                month: r.get(0)?,
                customer: r.get(1)?,
                seller: r.get(2)?,
                product: r.get(3)?,
                agreement_id: r.get(14)?,
                offer_id: r.get(15)?,
                dimension: r.get(4)?,
                charge_type: ChargeType::parse(&charge_type).ok_or_else(|| corrupt(T, "charge_type", &charge_type))?,
                pricing_model: r.get(16)?,
                currency: Currency::new(&currency).map_err(|_| corrupt(T, "currency", &currency))?,
                quantity: dec(T, "quantity", &r.get::<_, String>(7)?)?,
                covered_quantity: dec(T, "covered_quantity", &r.get::<_, String>(8)?)?,
                billable_quantity: dec(T, "billable_quantity", &r.get::<_, String>(9)?)?,
                unit_rate: unit_rate.map(|u| dec(T, "unit_rate", &u)).transpose()?,
                amount_unrounded: dec(T, "amount_unrounded", &r.get::<_, String>(11)?)?,
                amount: dec(T, "amount", &r.get::<_, String>(12)?)?,
                records: r.get::<_, i64>(13)? as u64,
                corrections: corrections(&r.get::<_, String>(17)?)?,
            });
        }
        Ok(out)
    }

    /// Hourly usage items of `agreements` in `month` (for the AMI trial credit at close).
    pub fn trial_hours(
        conn: &Connection,
        month: Month,
        agreements: &[String],
    ) -> Result<Vec<TrialHourUsage>, StoreError> {
        const T: &str = "rated_usage";
        let mut st = conn.prepare_cached(
            "SELECT agreement_id, hour, dimension, billable_quantity, unit_rate FROM rated_usage
             WHERE month = ?1 AND agreement_id = ?2",
        )?;
        let mut out = Vec::new();
        for a in agreements {
            let mut rows = st.query(params![month.to_string(), a])?;
            while let Some(r) = rows.next()? {
                out.push(TrialHourUsage {
                    agreement_id: r.get(0)?,
                    hour: Hour(r.get(1)?),
                    dimension: r.get(2)?,
                    billable_quantity: dec(T, "billable_quantity", &r.get::<_, String>(3)?)?,
                    unit_rate: dec(T, "unit_rate", &r.get::<_, String>(4)?)?,
                });
            }
        }
        Ok(out)
    }

    /// Writes a month's invoice lines and marks it closed for good, in one transaction. A month
    /// is closed once: a second close (even a concurrent one) is refused by the primary key of
    /// `closed_months` and writes nothing.
    pub fn write_close(&mut self, close: &MonthClose, closed_at: Timestamp) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let placeholders: Vec<String> = (1..=FIELD_COUNT).map(|i| format!("?{i}")).collect();
            let mut ins =
                tx.prepare(&format!("INSERT INTO invoice_lines ({CSV_HEADER}) VALUES ({})", placeholders.join(", ")))?;
            for line in &close.lines {
                ins.execute(rusqlite::params_from_iter(line.fields()))?;
            }
        }
        tx.execute(
            "INSERT INTO closed_months (month, marketplace, price_book_version, closed_at_ms, lines)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                close.month,
                close.marketplace,
                close.price_book_version,
                closed_at.millis(),
                close.lines.len() as i64
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// When `month` was closed for good, if it was.
    pub fn closed_at(conn: &Connection, month: Month) -> Result<Option<Timestamp>, StoreError> {
        let mut st = conn.prepare_cached("SELECT closed_at_ms FROM closed_months WHERE month = ?1")?;
        let at = st.query_row([month.to_string()], |r| r.get::<_, i64>(0)).optional()?;
        Ok(at.map(Timestamp::from_millis))
    }

    /// Closed months, oldest first.
    pub fn closed_months(conn: &Connection) -> Result<Vec<Month>, StoreError> {
        let mut st = conn.prepare_cached("SELECT month FROM closed_months ORDER BY month")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for m in rows {
            let m = m?;
            out.push(Month::parse(&m).map_err(|_| corrupt("closed_months", "month", &m))?);
        }
        Ok(out)
    }

    /// Records answered, by status (`Success`, `Success (identical resend)`, reason codes).
    pub fn status_counts(conn: &Connection) -> Result<Vec<(String, u64)>, StoreError> {
        let mut st = conn.prepare("SELECT status, records FROM ingest_counts ORDER BY status")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A stored record id's existence (tests and the crash check).
    pub fn has_record(conn: &Connection, id: RecordId) -> Result<bool, StoreError> {
        Ok(conn
            .query_row("SELECT 1 FROM rated_usage WHERE record_id = ?1 LIMIT 1", [id.to_string()], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::reject::{RejectCode, Rejection};
    use common::usage::{CustomerRef, UsageRecord};
    use rater::batch::Refusal;

    #[test]
    fn the_refused_rendering_is_the_same_in_both_stores() {
        let t = Timestamp::parse_rfc3339("2026-11-02T10:00:00Z").unwrap();
        let record = UsageRecord {
            seller: "acme".into(),
            product: "acme-analytics".into(),
            customer: "cust-b".into(),
            customer_ref: CustomerRef::CustomerId,
            dimension: "users".into(),
            timestamp: t,
            quantity: 4.into(),
            allocations: vec![],
            received_at: t,
        };
        let why = Rejection::new(RejectCode::NotPriced, "cust-b has no agreement for acme-analytics");
        let refusal = Refusal::of_record(&record, record.record_id(), why);
        let (row, event) = (RejectedRow::from(&refusal), refusal.to_event());
        assert_eq!(row.raw, event.raw, "SQLite's rejected_records and the Kafka rejected topic keep one rendering");
        assert_eq!(row.raw, rater::batch::render_as_sent(&record));
        assert_eq!(
            (row.reason, row.record_id, row.received_at_ms, row.message.as_str()),
            (event.code.as_str(), event.record_id, event.received_at.millis(), event.message.as_str())
        );
    }

    #[test]
    fn a_graduated_correction_of_500_late_after_3000_closed_is_stored_and_reloaded_at_25_00() {
        use aggregator::rollup::MonthlyRollup;
        use common::pricing::{Tier, UsagePrice};
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let price = UsagePrice::Graduated(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.10") },
            Tier { up_to: Some(d("10000")), rate: d("0.05") },
            Tier { up_to: None, rate: d("0.01") },
        ]);
        let oct = Month::parse("2026-10").unwrap().first_hour().0;
        let record = |h: i64, q: &str, late: bool| RatedRecord {
            record_id: RecordId(h as u128),
            dedup_key: DedupKey(h as u128),
            seller: "acme".into(),
            product: "saas-tiers".into(),
            customer: "tierco".into(),
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
            agreement_id: "agmnt-tiers".into(),
            offer_id: "tiers-public".into(),
            price_book_version: "v".into(),
            allocations: vec![],
        };
        // October closed at 3,000 calls (200.00); 500 late calls at the 0.05 tier it reached.
        let mut rollup = MonthlyRollup::new();
        let mut lines = Vec::new();
        for h in 0..30 {
            rollup.fold(&record(h, "100", false)).unwrap();
        }
        let late = rollup.fold(&record(743, "500", true)).unwrap();
        for k in [
            late.clone(),
            ChargeLineKey { month: Month::parse("2026-10").unwrap(), charge_type: ChargeType::Usage, ..late.clone() },
        ] {
            lines.push((k.clone(), rollup.sums(&k).unwrap().clone()));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("m.db")).unwrap();
        store.apply(&BatchWrite { lines: lines.clone(), ..Default::default() }).unwrap();
        let mut back = store.line_sums().unwrap();
        back.sort_by(|a, b| b.0.cmp(&a.0));
        assert_eq!(back, lines, "the corrections survive the store");
        let nov = Store::charge_lines(store.conn(), Some("2026-11")).unwrap();
        assert_eq!((nov[0].amount.to_string(), nov[0].corrections.len()), ("25.00".into(), 1));
        let oct_lines = Store::charge_lines(store.conn(), Some("2026-10")).unwrap();
        assert_eq!(oct_lines[0].amount.to_string(), "200.00");
    }

    #[test]
    fn a_store_written_before_corrections_gains_the_column_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        drop(Store::open(&db).unwrap());
        Connection::open(&db).unwrap().execute_batch("ALTER TABLE monthly_charges DROP COLUMN corrections").unwrap();
        let store = Store::open(&db).unwrap();
        let n: i64 = store
            .conn()
            .query_row(
                "SELECT count(*) FROM pragma_table_info('monthly_charges') WHERE name = 'corrections'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
        assert!(store.line_sums().unwrap().is_empty());
    }
}
