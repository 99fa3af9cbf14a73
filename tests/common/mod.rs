//! Shared by the integration tests: a generated price book with many customers.
#![allow(dead_code)]

use ::common::catalogue::{
    Agreement, Customer, Delivery, Dimension, Offer, PriceBookDoc, PriceVersion, Product, Seller, UsageCategory,
    UsagePrice, Visibility,
};
use ::common::time::Timestamp;

/// The account id of customer `i`.
pub fn account(i: usize) -> String {
    format!("{:012}", 500_000 + i)
}

/// The test seller's API key.
pub const KEY: &str = "crash-test-key";
/// Dimensions and their rates.
pub const RATES: [(&str, &str); 4] = [("d0", "0.01234567"), ("d1", "0.5"), ("d2", "1.25"), ("d3", "0.00000003")];

/// A dimension priced by graduated tiers over the month: the fold, not the record, prices it.
pub const TIERED: &str = "t0";

/// `t0`'s price: the first 5,000 units of the month at $0.01, the rest at $0.002.
pub fn tiered_price() -> UsagePrice {
    use ::common::pricing::Tier;
    UsagePrice::Graduated(vec![
        Tier { up_to: Some("5000".parse().unwrap()), rate: "0.01".parse().unwrap() },
        Tier { up_to: None, rate: "0.002".parse().unwrap() },
    ])
}

/// One seller (`s1`, key [`KEY`]), one product `p` with the dimensions of [`RATES`], and
/// `customers` customers `c0000…` (account ids `000000500000 + i`) holding open-ended agreements.
pub fn price_book(customers: usize) -> PriceBookDoc {
    let since = Timestamp::parse_rfc3339("2020-01-01T00:00:00Z").unwrap();
    PriceBookDoc {
        version: "crash-test".into(),
        marketplace: loadtest::scenario::aws_profile(),
        sellers: vec![Seller {
            id: "s1".into(),
            name: "s1".into(),
            api_key_sha256: vec![::common::catalogue::api_key_hash(KEY).iter().map(|b| format!("{b:02x}")).collect()],
        }],
        products: vec![Product {
            code: "p".into(),
            seller: "s1".into(),
            name: "p".into(),
            delivery: Delivery::Saas,
            dimensions: RATES
                .iter()
                .map(|(k, _)| *k)
                .chain([TIERED])
                .map(|k| Dimension { key: k.into(), name: k.into(), category: UsageCategory::Units, unit: "u".into() })
                .collect(),
        }],
        offers: vec![Offer::usage_only(
            "o",
            "p",
            Visibility::Public,
            ::common::money::Currency::USD,
            vec![],
            vec![PriceVersion {
                effective_from: since,
                notified_at: None,
                usage: RATES
                    .iter()
                    .map(|(k, r)| ((*k).to_owned(), UsagePrice::PerUnit(r.parse().unwrap())))
                    .chain([(TIERED.to_owned(), tiered_price())])
                    .collect(),
            }],
        )],
        customers: (0..customers)
            .map(|i| Customer {
                id: format!("c{i:04}"),
                name: String::new(),
                customer_identifier: None,
                aws_account_id: Some(format!("{:012}", 500_000 + i)),
            })
            .collect(),
        agreements: (0..customers)
            .map(|i| Agreement {
                id: format!("a{i:04}"),
                customer: format!("c{i:04}"),
                product: "p".into(),
                offer: "o".into(),
                start: since,
                end: None,
                annual: vec![],
                signed: None,
                contract: None,
                renewal: false,
                license_arn: None,
            })
            .collect(),
        resale: vec![],
        fx_rates: vec![],
        deployments: vec![],
        refunds: vec![],
    }
}
