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
    let dims = [
        ("acme-analytics", "users"),
        ("acme-analytics", "gb_ingest"),
        ("acme-vm", "m5_large"),
        ("acme-vm", "c5_xlarge"),
    ];
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

/// A realistic world: the load generator's seeded catalogue (many customers, up to 24
/// dimensions, annual coverage, a EUR private offer) and `hours` hours of its valid traffic from
/// the start of the month, as validated usage records (no resends or invalid records: every
/// record is a distinct slot).
pub fn scenario(customers: usize, hours: i64) -> (PriceBook, Vec<UsageRecord>) {
    use loadtest::scenario::{Scenario, ScenarioConfig};
    use rand::SeedableRng;
    let s = Scenario::generate(ScenarioConfig {
        customers,
        identical_resend_share: 0.0,
        conflict_share: 0.0,
        invalid_share: 0.0,
        ..Default::default()
    });
    let book = PriceBook::new(s.doc.clone()).expect("the generated price book validates");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut out = Vec::new();
    let received = s.config.month.start();
    for h in 0..hours {
        let hour = common::time::Hour(s.config.month.first_hour().0 + h);
        for batch in s.hour_traffic(hour, &mut rng) {
            for r in &batch.records {
                let text = r.to_string();
                let w: ingest::wire::WireRecord<'_> = serde_json::from_str(&text).expect("generated records parse");
                let cx = ingest::validate::Context {
                    book: &book,
                    caller: ingest::validate::Caller::Trusted,
                    now: None,
                    received_at: received,
                };
                if let Ok(mut u) = ingest::validate::validate(&w, Some(&batch.product), &cx) {
                    u.canonicalise();
                    out.push(u);
                }
            }
        }
    }
    (book, out)
}

/// The price-models example book (every pricing model the price book supports).
pub const MODELS_BOOK: &str = include_str!("../../docs/examples/price-models.toml");

/// Records for every (agreement, dimension) of the price-models example book, one per hour of
/// November 2026 in which that agreement prices the dimension, labelled by the model that prices
/// it (`UsagePrice::model`, with `_with_annual_coverage` when annual coverage nets it): the rating bench's input,
/// so a model added to the example book is benched without another line here.
pub fn model_records() -> (PriceBook, Vec<(String, UsageRecord)>) {
    let book = PriceBook::from_toml(MODELS_BOOK).expect("the price-models example book is valid");
    let month = common::time::Month::parse("2026-11").expect("constant month");
    let mut out = Vec::new();
    for a in &book.doc().agreements {
        let Some(product) = book.product(&a.product) else { continue };
        for (i, d) in product.dimensions.iter().enumerate() {
            for h in 0..month.hours() {
                let hour = common::time::Hour(month.first_hour().0 + h);
                let Some(p) = book.price_at(&a.customer, &a.product, &d.key, hour) else { continue };
                if p.agreement.id != a.id {
                    continue;
                }
                let covered = PriceBook::annual_units(p.agreement, &d.key, hour) > 0;
                let label = format!("{}{}", p.price.model(), if covered { "_with_annual_coverage" } else { "" });
                let r = UsageRecord {
                    seller: product.seller.clone(),
                    product: a.product.clone(),
                    customer: a.customer.clone(),
                    customer_ref: CustomerRef::CustomerId,
                    dimension: d.key.clone(),
                    timestamp: hour.start(),
                    quantity: Decimal::from(1 + (h as usize + i) % 7),
                    allocations: vec![],
                    received_at: hour.start(),
                };
                out.push((label, r));
            }
        }
    }
    (book, out)
}
