//! SHELL (distributed mode). The query API's [`QueryStore`] over ClickHouse: the rated line items
//! of `rated_usage`, the month-to-date lines of `monthly_charges`, and the invoice preview by the
//! same close core `aggregator close` runs ([`crate::closing::compute_close`]), writing nothing.
//!
//! The trait is synchronous (the routes call it in a blocking task); the ClickHouse client is
//! async, so each read runs on the server's runtime through its [`Handle`].

use crate::close::MonthClose;
use crate::query::{QueryStore, ReadError, UsageRow};
use crate::sink::{from_mantissa, load_month_lines, AMOUNT_SCALE, QTY_SCALE};
use clickhouse::{Client, Row};
use common::catalogue::PriceBook;
use common::money::Currency;
use common::rated::ChargeLine;
use common::time::{Hour, Month, HOUR_MS};
use serde::Deserialize;
use tokio::runtime::Handle;

/// ClickHouse, read for the query routes.
#[derive(Clone)]
pub struct ClickHouseQueries {
    /// The client, on the pipeline's database.
    pub client: Client,
    /// The runtime the reads run on.
    pub runtime: Handle,
}

impl std::fmt::Debug for ClickHouseQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseQueries").finish_non_exhaustive()
    }
}

#[derive(Row, Deserialize)]
struct UsageFields {
    usage_hour: u32,
    product: String,
    dimension: String,
    agreement_id: String,
    currency: String,
    quantity: i128,
    billable_quantity: i128,
    amount: i128,
    allocations: String,
}

impl QueryStore for ClickHouseQueries {
    fn usage_rows(&self, customer: &str, month: Month) -> Result<Vec<UsageRow>, ReadError> {
        let read = self
            .client
            .query(
                "SELECT usage_hour, product, dimension, agreement_id, currency, quantity, billable_quantity, amount, allocations \
                 FROM rated_usage FINAL WHERE month = toDate(?) AND customer = ?",
            )
            .bind(month.start().to_datetime().format("%Y-%m-%d").to_string())
            .bind(customer)
            .fetch_all::<UsageFields>();
        let rows = self.runtime.block_on(read).map_err(|e| ReadError(format!("reading rated_usage: {e}")))?;
        let corrupt = |what: String| ReadError(format!("corrupt value in rated_usage: {what}"));
        rows.into_iter()
            .map(|r| {
                Ok(UsageRow {
                    hour: Hour(i64::from(r.usage_hour) * 1000 / HOUR_MS),
                    currency: Currency::new(&r.currency).map_err(|_| corrupt(format!("currency `{}`", r.currency)))?,
                    quantity: from_mantissa(r.quantity, QTY_SCALE).map_err(|e| corrupt(e.to_string()))?,
                    billable_quantity: from_mantissa(r.billable_quantity, QTY_SCALE)
                        .map_err(|e| corrupt(e.to_string()))?,
                    amount: from_mantissa(r.amount, AMOUNT_SCALE).map_err(|e| corrupt(e.to_string()))?,
                    allocations: if r.allocations.is_empty() {
                        Vec::new()
                    } else {
                        serde_json::from_str(&r.allocations)
                            .map_err(|_| corrupt(format!("allocations `{}`", r.allocations)))?
                    },
                    product: r.product,
                    dimension: r.dimension,
                    agreement_id: r.agreement_id,
                })
            })
            .collect()
    }

    fn charge_lines(&self, month: Month) -> Result<Vec<ChargeLine>, ReadError> {
        self.runtime
            .block_on(load_month_lines(&self.client, month))
            .map_err(|e| ReadError(format!("reading monthly_charges: {e}")))
    }

    fn preview(&self, book: &PriceBook, month: Month) -> Result<MonthClose, ReadError> {
        self.runtime
            .block_on(crate::closing::compute_close(&self.client, book, month))
            .map_err(|e| ReadError(format!("computing the close of {month}: {e}")))
    }
}
