//! SHELL. The query API's embedded store: [`SqliteQueries`] reads the SQLite store for the
//! mode-neutral routes of [`aggregator::query`] (re-exported here).

use crate::store::Store;
use aggregator::close::MonthClose;
pub use aggregator::query::*;
use common::catalogue::PriceBook;
use common::money::Currency;
use common::rated::ChargeLine;
use common::time::{Hour, Month};
use rust_decimal::Decimal;
use std::path::PathBuf;

/// The embedded store, read through a fresh read-only connection per call.
#[derive(Debug, Clone)]
pub struct SqliteQueries {
    /// The database file the writer owns.
    pub db: PathBuf,
}

impl SqliteQueries {
    fn conn(&self) -> Result<rusqlite::Connection, ReadError> {
        Store::open_read_only(&self.db).map_err(|e| ReadError(format!("opening the store read-only: {e}")))
    }
}

fn sql(e: rusqlite::Error) -> ReadError {
    ReadError(format!("reading rated_usage: {e}"))
}

impl QueryStore for SqliteQueries {
    fn usage_rows(&self, customer: &str, month: Month) -> Result<Vec<UsageRow>, ReadError> {
        let conn = self.conn()?;
        let first = month.first_hour().0;
        // The hour range leads the table's only index, (hour, dedup_key).
        let mut st = conn
            .prepare(
                "SELECT hour, product, dimension, currency, quantity, billable_quantity, amount, allocations, agreement_id
                 FROM rated_usage WHERE hour >= ?1 AND hour < ?2 AND customer = ?3",
            )
            .map_err(sql)?;
        let mut rows = st.query(rusqlite::params![first, first + month.hours(), customer]).map_err(sql)?;
        let mut out = Vec::new();
        let corrupt = |col: &str, v: &str| ReadError(format!("corrupt value in rated_usage.{col}: `{v}`"));
        let dec = |col: &str, v: String| v.parse::<Decimal>().map_err(|_| corrupt(col, &v));
        while let Some(r) = rows.next().map_err(sql)? {
            let currency: String = r.get(3).map_err(sql)?;
            let allocations: Option<String> = r.get(7).map_err(sql)?;
            out.push(UsageRow {
                hour: Hour(r.get(0).map_err(sql)?),
                product: r.get(1).map_err(sql)?,
                dimension: r.get(2).map_err(sql)?,
                agreement_id: r.get(8).map_err(sql)?,
                currency: Currency::new(&currency).map_err(|_| corrupt("currency", &currency))?,
                quantity: dec("quantity", r.get(4).map_err(sql)?)?,
                billable_quantity: dec("billable_quantity", r.get(5).map_err(sql)?)?,
                amount: dec("amount", r.get(6).map_err(sql)?)?,
                allocations: match allocations {
                    None => vec![],
                    Some(j) => serde_json::from_str(&j).map_err(|_| corrupt("allocations", &j))?,
                },
            });
        }
        Ok(out)
    }

    fn charge_lines(&self, month: Month) -> Result<Vec<ChargeLine>, ReadError> {
        Store::charge_lines(&self.conn()?, Some(&month.to_string()))
            .map_err(|e| ReadError(format!("reading monthly_charges: {e}")))
    }

    fn preview(&self, book: &PriceBook, month: Month) -> Result<MonthClose, ReadError> {
        crate::close::compute_close(&self.conn()?, book, month)
            .map_err(|e| ReadError(format!("computing the close of {month}: {e}")))
    }
}
