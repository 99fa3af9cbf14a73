//! Inputs shared by the criterion benches in `benches/benches/`: the example price book and
//! deterministic usage records over many customers, dimensions and hours.

use common::catalogue::PriceBook;
use common::time::{Timestamp, HOUR_MS};
use common::usage::{CustomerRef, UsageRecord};
use rust_decimal::Decimal;

/// The example price book shipped in `docs/examples/`.
pub const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

/// The example price book, validated.
pub fn book() -> PriceBook {
    PriceBook::from_toml(BOOK).expect("the example price book is valid")
}

/// `n` distinct usage records of cust-a over `acme-analytics` and `acme-vm`, spread over hours.
pub fn records(n: usize) -> Vec<UsageRecord> {
    let t0 = Timestamp::parse_rfc3339("2026-11-01T00:00:00Z").expect("constant parses");
    let dims = [("acme-analytics", "users"), ("acme-analytics", "gb_ingest"), ("acme-vm", "m5_large"), ("acme-vm", "c5_xlarge")];
    (0..n)
        .map(|i| {
            let (product, dimension) = dims[i % dims.len()];
            UsageRecord {
                seller: "acme".into(),
                product: product.into(),
                customer: "cust-a".into(),
                customer_ref: CustomerRef::CustomerId,
                dimension: dimension.into(),
                // Distinct slots: each hour holds one record per dimension.
                timestamp: t0.plus_millis((i / dims.len()) as i64 * HOUR_MS),
                quantity: Decimal::from(1 + i % 97),
                allocations: vec![],
                received_at: t0,
            }
        })
        .collect()
}

/// A wire record line as sellers send it (native bulk format).
pub fn wire_line(i: usize) -> String {
    format!(
        r#"{{"ProductCode":"acme-analytics","Timestamp":{},"CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":{}}}"#,
        1_793_577_600 + (i % 720) * 3600,
        i % 1000
    )
}
