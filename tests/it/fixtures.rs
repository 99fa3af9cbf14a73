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

/// `meterline serve --listen 127.0.0.1:0` over `book` and `data`, not started yet.
pub fn serve_command(book: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> std::process::Command {
    let bin = std::env::var("METERLINE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meterline").into());
    let mut c = std::process::Command::new(bin);
    c.args(["serve", "--listen", "127.0.0.1:0", "--price-book"]).arg(book).arg("--data-dir").arg(data).args(extra);
    c
}

/// Starts `meterline serve --listen 127.0.0.1:0` over `book` and `data` (the binary in
/// `METERLINE_BIN`, else this build's), and returns it with the URL its first line names. Its
/// output is drained so it never writes into a closed pipe.
pub fn spawn_serve(book: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = serve_command(book, data, extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting meterline serve");
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    out.read_line(&mut first).expect("reading the first line of meterline serve");
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = first.split_whitespace().find(|w| w.starts_with("http://")).expect("the first line names the address");
    (child, url.to_owned())
}

/// A field of /proc/<pid>/status in kB (VmRSS, VmHWM); 0 when absent.
pub fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
