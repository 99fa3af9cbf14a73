//! Aggregator: turns rated hourly line items into monthly invoice lines.
//!
//! # Layout
//! - [`rollup`]: PURE. Folds [`common::rated::RatedRecord`]s into one exact accumulator per
//!   (month, customer, product, dimension, charge type, currency) and rounds each line once.
//! - [`invoice`]: PURE. Invoice totals per customer and currency as sums of rounded lines.
//!
//! Data enters as rated records (from the embedded store or the rated topic) and leaves as
//! [`common::rated::ChargeLine`]s (to the store or ClickHouse).

pub mod invoice;
pub mod rollup;
