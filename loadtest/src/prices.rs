//! The price book flattened to one row per (customer, product, dimension, hour): the table a
//! query-time billing system (raw events in ClickHouse, prices joined at query time) would join
//! with. It gives the SQL side of BENCHMARKS.md P4 the agreement, offer, version and annual
//! coverage resolution for free, so the comparison favours it.

use common::catalogue::{PriceBook, UsagePrice};
use common::time::Hour;
use std::io::Write;

/// A decimal as a bare JSON number with its exact digits (ClickHouse 18.16 reads quoted decimals
/// in JSONEachRow as errors).
pub fn number(d: rust_decimal::Decimal) -> anyhow::Result<Box<serde_json::value::RawValue>> {
    Ok(serde_json::value::RawValue::from_string(d.to_string())?)
}

/// Writes the rows as JSONEachRow; returns how many. Fails on a pricing model SQL here does not
/// express (the comparison would not be like for like).
pub fn write_rows(book: &PriceBook, hours: &[Hour], w: &mut dyn Write) -> anyhow::Result<u64> {
    let mut n = 0;
    for a in &book.doc().agreements {
        let Some(product) = book.product(&a.product) else { continue };
        for d in &product.dimensions {
            for &h in hours {
                let Some(p) = book.price_at(&a.customer, &a.product, &d.key, h) else { continue };
                if p.agreement.id != a.id {
                    continue;
                }
                #[allow(unreachable_patterns)]
                let rate = match p.price {
                    UsagePrice::PerUnit(rate) => *rate,
                    other => anyhow::bail!("pricing model {other:?} has no SQL form here"),
                };
                let annual = PriceBook::annual_units(p.agreement, &d.key, h);
                let hour = h.start().to_datetime().format("%Y-%m-%d %H:%M:%S").to_string();
                let row = serde_json::json!({
                    "customer": a.customer, "product": a.product, "dimension": d.key, "hour": hour,
                    "rate": number(rate)?, "currency": p.offer.currency.to_string(), "annual_units": annual,
                });
                writeln!(w, "{row}")?;
                n += 1;
            }
        }
    }
    Ok(n)
}
