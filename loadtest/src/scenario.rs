//! A seeded, realistic month of marketplace usage.
//!
//! The catalogue: Acme sells a SaaS analytics product (the worked example of domain-rules §3.5)
//! and an AMI priced per instance-hour with annual subscriptions (§3.4); Globex sells a platform
//! with all 24 dimensions and rates down to 8 decimal places; Initech sells an ML product, with a
//! private offer in EUR for a few buyers. Customers subscribe to one to three products; a few
//! subscribe or cancel mid-month.
//!
//! The traffic: every hour, for every active agreement, one record per dimension the customer
//! uses, with a daily cycle and noise, in batches of at most 25 per product (as AWS requires).
//! Sellers misbehave in known shares: whole batches resent (identical), records resent with
//! another quantity (conflicting), and invalid records of every kind ingest must name.

use common::catalogue::{
    Agreement, AnnualCoverage, Customer, Delivery, Dimension, FxRate, LateUsage, ListingFees, MarketplaceProfile,
    Offer, PriceBookDoc, PriceVersion, Product, QuantityKind, Seller, UsageCategory, UsagePrice, Visibility,
};
use common::money::Currency;
use common::time::{Hour, Month, Timestamp, HOUR_MS};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Scenario knobs.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// Number of customers.
    pub customers: usize,
    /// Month to generate.
    pub month: Month,
    /// RNG seed: the same seed gives the same catalogue and traffic.
    pub seed: u64,
    /// Share of batches resent identically (a seller retrying after a timeout).
    pub identical_resend_share: f64,
    /// Share of records resent later with another quantity.
    pub conflict_share: f64,
    /// Share of records that are invalid.
    pub invalid_share: f64,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            customers: 300,
            month: Month { year: 2026, month: 10 },
            seed: 7,
            identical_resend_share: 0.01,
            conflict_share: 0.002,
            invalid_share: 0.003,
        }
    }
}

/// A seller's API key in clear (the price book holds only its hash).
#[derive(Debug, Clone)]
pub struct SellerKey {
    /// Seller id.
    pub seller: String,
    /// API key.
    pub key: String,
}

/// The 24 dimensions of Globex's platform: (key, category, rate, largest typical hourly quantity).
const GLOBEX_DIMENSIONS: [(&str, UsageCategory, &str, u32); 24] = [
    ("api_calls", UsageCategory::Requests, "0.00001250", 200_000),
    ("storage_gb", UsageCategory::Data, "0.000032", 50_000),
    ("egress_gb", UsageCategory::Bandwidth, "0.09", 40),
    ("ingress_gb", UsageCategory::Bandwidth, "0.01", 100),
    ("compute_hrs", UsageCategory::Hosts, "0.048", 30),
    ("gpu_hrs", UsageCategory::Hosts, "1.20", 4),
    ("seats", UsageCategory::Users, "0.0125", 300),
    ("admins", UsageCategory::Users, "0.025", 10),
    ("projects", UsageCategory::Units, "0.002", 200),
    ("pipelines", UsageCategory::Units, "0.015", 50),
    ("queries", UsageCategory::Requests, "0.0004", 5_000),
    ("reports", UsageCategory::Units, "0.05", 20),
    ("alerts", UsageCategory::Units, "0.001", 500),
    ("dashboards", UsageCategory::Units, "0.003", 100),
    ("webhooks", UsageCategory::Requests, "0.00002", 20_000),
    ("backups", UsageCategory::Data, "0.004", 500),
    ("snapshots", UsageCategory::Data, "0.0025", 800),
    ("replicas", UsageCategory::Hosts, "0.035", 12),
    ("regions", UsageCategory::Tiers, "0.10", 3),
    ("tenants", UsageCategory::Units, "0.0075", 100),
    ("events_k", UsageCategory::Requests, "0.00035", 10_000),
    ("logs_gb", UsageCategory::Data, "0.00000275", 2_000),
    ("traces_k", UsageCategory::Requests, "0.00012", 3_000),
    ("metrics_k", UsageCategory::Requests, "0.00000001", 100_000),
];

/// How one customer uses one product: the dimensions and the base quantity of each.
#[derive(Debug, Clone)]
pub struct Usage {
    /// Agreement index in the document.
    pub agreement: usize,
    /// (dimension, base hourly quantity).
    pub dimensions: Vec<(String, u32)>,
    /// How the seller names this customer.
    pub customer_ref: (&'static str, String),
}

/// The generated world.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Knobs it was made with.
    pub config: ScenarioConfig,
    /// The price book.
    pub doc: PriceBookDoc,
    /// API keys in clear.
    pub keys: Vec<SellerKey>,
    /// Per-agreement usage profile.
    pub usage: Vec<Usage>,
}

fn ts(t: &str) -> Timestamp {
    Timestamp::parse_rfc3339(t).expect("constant timestamps parse")
}

fn sha256_hex(key: &str) -> String {
    hex_of(&common::catalogue::api_key_hash(key))
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn dims(list: &[(&str, UsageCategory, &str)]) -> Vec<Dimension> {
    list.iter()
        .map(|(k, c, unit)| Dimension { key: (*k).into(), name: (*k).into(), category: *c, unit: (*unit).into() })
        .collect()
}

fn prices(from: Timestamp, list: &[(&str, &str)]) -> Vec<PriceVersion> {
    vec![PriceVersion {
        effective_from: from,
        notified_at: None,
        usage: list
            .iter()
            .map(|(d, r)| ((*d).to_owned(), UsagePrice::PerUnit(r.parse().expect("constant rates parse"))))
            .collect(),
    }]
}

/// The AWS-compatible marketplace profile (domain-rules decisions table).
pub fn aws_profile() -> MarketplaceProfile {
    MarketplaceProfile {
        id: "aws".into(),
        currency: Currency::USD,
        acceptance_window: "6h".into(),
        future_skew: "5m".into(),
        final_records_grace: "1h".into(),
        quantity: QuantityKind::Integer,
        max_batch_records: 25,
        max_request_bytes: 1_048_575,
        max_allocations: 2500,
        max_tags: 5,
        usage_rate_decimals: 8,
        contract_rate_decimals: 3,
        price_change_notice_days: Some(90),
        late_usage: Some(LateUsage::Refuse),
        listing_fees: Some(ListingFees::aws_2024()),
        broker_id: Some("AWS_INC".into()),
        reporting_currency: Some(Currency::USD),
    }
}

impl Scenario {
    /// Generates the catalogue and usage profiles.
    pub fn generate(config: ScenarioConfig) -> Scenario {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let month = config.month;
        let listed = ts("2025-01-01T00:00:00Z");
        let keys: Vec<SellerKey> = ["acme", "globex", "initech"]
            .iter()
            .map(|s| SellerKey { seller: (*s).into(), key: format!("demo-key-{s}") })
            .collect();
        let sellers = keys
            .iter()
            .map(|k| Seller { id: k.seller.clone(), name: k.seller.clone(), api_key_sha256: vec![sha256_hex(&k.key)] })
            .collect();
        let globex_dims: Vec<(&str, UsageCategory, &str)> =
            GLOBEX_DIMENSIONS.iter().map(|(k, c, _, _)| (*k, *c, "unit")).collect();
        let products = vec![
            Product {
                code: "acme-analytics".into(),
                seller: "acme".into(),
                name: "Acme Analytics".into(),
                delivery: Delivery::Saas,
                dimensions: dims(&[
                    ("users", UsageCategory::Users, "user-hour"),
                    ("gb_ingest", UsageCategory::Data, "GB"),
                ]),
            },
            Product {
                code: "acme-vm".into(),
                seller: "acme".into(),
                name: "Acme VM appliance".into(),
                delivery: Delivery::Ami,
                dimensions: dims(&[
                    ("m5_large", UsageCategory::Hosts, "instance-hour"),
                    ("c5_xlarge", UsageCategory::Hosts, "instance-hour"),
                    ("m5_2xlarge", UsageCategory::Hosts, "instance-hour"),
                ]),
            },
            Product {
                code: "globex-platform".into(),
                seller: "globex".into(),
                name: "Globex Platform".into(),
                delivery: Delivery::Saas,
                dimensions: dims(&globex_dims),
            },
            Product {
                code: "initech-ml".into(),
                seller: "initech".into(),
                name: "Initech ML".into(),
                delivery: Delivery::Ml,
                dimensions: dims(&[
                    ("inference_hrs", UsageCategory::Hosts, "instance-hour"),
                    ("training_hrs", UsageCategory::Hosts, "instance-hour"),
                ]),
            },
        ];
        let globex_rates: Vec<(&str, &str)> = GLOBEX_DIMENSIONS.iter().map(|(k, _, r, _)| (*k, *r)).collect();
        let mut offers = vec![
            Offer::usage_only(
                "acme-analytics-public",
                "acme-analytics",
                Visibility::Public,
                Currency::USD,
                vec![],
                prices(listed, &[("users", "0.014"), ("gb_ingest", "0.10")]),
            ),
            Offer::usage_only(
                "acme-vm-public",
                "acme-vm",
                Visibility::Public,
                Currency::USD,
                vec![],
                prices(listed, &[("m5_large", "0.50"), ("c5_xlarge", "0.34"), ("m5_2xlarge", "1.00")]),
            ),
            Offer::usage_only(
                "globex-platform-public",
                "globex-platform",
                Visibility::Public,
                Currency::USD,
                vec![],
                prices(listed, &globex_rates),
            ),
            Offer::usage_only(
                "initech-ml-public",
                "initech-ml",
                Visibility::Public,
                Currency::USD,
                vec![],
                prices(listed, &[("inference_hrs", "0.90"), ("training_hrs", "3.25")]),
            ),
        ];

        let mut customers = Vec::with_capacity(config.customers);
        let mut agreements = Vec::new();
        let mut usage = Vec::new();
        let mut private_buyers = Vec::new();
        let month_start = month.start();
        let month_hours = month.hours();
        for i in 0..config.customers {
            let id = format!("cust-{:04}", i + 1);
            let account = format!("{:012}", 100_000_000_000u64 + (i as u64) * 7_919);
            let legacy = i % 2 == 0;
            customers.push(Customer {
                id: id.clone(),
                name: format!("Customer {}", i + 1),
                customer_identifier: legacy
                    .then(|| format!("cid-{:08x}", (i as u64).wrapping_mul(2_654_435_761) & 0xffff_ffff)),
                aws_account_id: Some(account.clone()),
            });
            let customer_ref: (&'static str, String) = if legacy {
                ("CustomerIdentifier", format!("cid-{:08x}", (i as u64).wrapping_mul(2_654_435_761) & 0xffff_ffff))
            } else {
                ("CustomerAWSAccountId", account)
            };
            // Which products: everyone has at least one, chosen by index so all four are used.
            let mut products_of: Vec<usize> = vec![i % 4];
            for p in 0..4 {
                if p != i % 4 && rng.gen_bool(0.3) {
                    products_of.push(p);
                }
            }
            for p in products_of {
                let code = products[p].code.clone();
                // 4% subscribe mid-month, 3% cancel mid-month.
                let start = if rng.gen_bool(0.04) {
                    month_start.plus_millis(rng.gen_range(24..month_hours - 24) * HOUR_MS)
                } else {
                    ts("2026-01-01T00:00:00Z")
                };
                let end = rng
                    .gen_bool(0.03)
                    .then(|| month_start.plus_millis(rng.gen_range(month_hours / 2..month_hours - 6) * HOUR_MS))
                    .filter(|e| *e > start);
                let private = p == 3 && rng.gen_bool(0.1);
                let offer = if private {
                    private_buyers.push(id.clone());
                    "initech-ml-private-eur".to_owned()
                } else {
                    format!("{code}-public")
                };
                let mut annual = Vec::new();
                let dims: Vec<(String, u32)> = match p {
                    0 => vec![("users".into(), rng.gen_range(5..400)), ("gb_ingest".into(), rng.gen_range(0..20))],
                    1 => {
                        let base = rng.gen_range(1..8);
                        if rng.gen_bool(0.4) {
                            annual.push(AnnualCoverage {
                                dimension: "m5_large".into(),
                                units: rng.gen_range(1..=3),
                                start: ts("2026-03-01T00:00:00Z"),
                                end: if rng.gen_bool(0.2) {
                                    month_start.plus_millis(rng.gen_range(48..month_hours - 48) * HOUR_MS)
                                } else {
                                    ts("2027-03-01T00:00:00Z")
                                },
                                renewal: false,
                                installments: vec![],
                            });
                        }
                        let mut d = vec![("m5_large".to_owned(), base)];
                        if rng.gen_bool(0.5) {
                            d.push(("c5_xlarge".into(), rng.gen_range(1..4)));
                        }
                        if rng.gen_bool(0.2) {
                            d.push(("m5_2xlarge".into(), rng.gen_range(1..3)));
                        }
                        d
                    }
                    2 => {
                        let n = rng.gen_range(4..=10);
                        let mut picked: Vec<(String, u32)> = Vec::new();
                        while picked.len() < n {
                            let (k, _, _, most) = GLOBEX_DIMENSIONS[rng.gen_range(0..24)];
                            if !picked.iter().any(|(d, _)| d == k) {
                                picked.push((k.into(), rng.gen_range(1..=most)));
                            }
                        }
                        picked
                    }
                    _ => vec![
                        ("inference_hrs".into(), rng.gen_range(1..6)),
                        ("training_hrs".into(), rng.gen_range(0..2)),
                    ],
                };
                usage.push(Usage { agreement: agreements.len(), dimensions: dims, customer_ref: customer_ref.clone() });
                agreements.push(Agreement {
                    id: format!("agmnt-{}-{}", &id[5..], p + 1),
                    customer: id.clone(),
                    product: code,
                    offer,
                    start,
                    end,
                    annual,
                    signed: None,
                    contract: None,
                    renewal: false,
                    license_arn: None,
                });
            }
        }
        if !private_buyers.is_empty() {
            offers.push(Offer::usage_only(
                "initech-ml-private-eur",
                "initech-ml",
                Visibility::Private,
                Currency::new("EUR").expect("EUR is a currency"),
                private_buyers,
                prices(listed, &[("inference_hrs", "0.75"), ("training_hrs", "2.80")]),
            ));
        }
        let doc = PriceBookDoc {
            version: format!("demo-{month}"),
            marketplace: aws_profile(),
            sellers,
            products,
            offers,
            customers,
            agreements,
            resale: vec![],
            fx_rates: vec![FxRate {
                from: Currency::new("EUR").expect("EUR is a currency"),
                to: Currency::USD,
                rate: "1.08".parse().expect("constant rate parses"),
                effective_from: listed,
            }],
            deployments: vec![],
            refunds: vec![],
        };
        Scenario { config, doc, keys, usage }
    }

    /// The API key of a seller.
    pub fn key_of(&self, seller: &str) -> &str {
        self.keys.iter().find(|k| k.seller == seller).map(|k| k.key.as_str()).unwrap_or("")
    }

    /// The records sellers send during `hour` (for that hour's usage), in batches.
    pub fn hour_traffic(&self, hour: Hour, rng: &mut SmallRng) -> Vec<Batch> {
        let t0 = hour.start();
        // Daily cycle: busier in the (UTC) working day.
        let hod = (hour.0 % 24) as f64;
        let cycle = 0.55 + 0.45 * (std::f64::consts::PI * (hod - 3.0) / 12.0).sin().max(0.0);
        let mut per_product: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for u in &self.usage {
            let a = &self.doc.agreements[u.agreement];
            if !a.active_at(t0) {
                continue;
            }
            for (dim, base) in &u.dimensions {
                let noise: f64 = rng.gen_range(0.8..1.2);
                let q = ((*base as f64) * cycle * noise).round() as i64;
                let ts_s = t0.millis() / 1000 + rng.gen_range(0..3600);
                let mut rec = json!({
                    "Timestamp": ts_s,
                    u.customer_ref.0: u.customer_ref.1,
                    "Dimension": dim,
                    "Quantity": q,
                });
                if rng.gen_bool(0.05) && q >= 2 {
                    // Cost allocation by team tag.
                    rec["UsageAllocations"] = json!([
                        { "AllocatedUsageQuantity": q / 2, "Tags": [{ "Key": "team", "Value": "data-eng" }] },
                        { "AllocatedUsageQuantity": q - q / 2, "Tags": [{ "Key": "team", "Value": "web" }, { "Key": "env", "Value": "prod" }] },
                    ]);
                }
                if rng.gen_bool(self.config.invalid_share) {
                    rec = self.spoil(rec, hour, rng);
                }
                per_product.entry(a.product.clone()).or_default().push(rec);
            }
        }
        let mut batches = Vec::new();
        for (product, records) in per_product {
            let seller =
                self.doc.products.iter().find(|p| p.code == product).map(|p| p.seller.clone()).unwrap_or_default();
            for chunk in records.chunks(25) {
                let mut chunk = chunk.to_vec();
                // A conflicting resend: the same slot later with another quantity.
                let conflicts: Vec<Value> = chunk
                    .iter()
                    .filter(|_| rng.gen_bool(self.config.conflict_share))
                    .map(|r| {
                        let mut c = r.clone();
                        c["Quantity"] = json!(r["Quantity"].as_i64().unwrap_or(0) + 1);
                        c.as_object_mut().map(|o| o.remove("UsageAllocations"));
                        c
                    })
                    .collect();
                let batch =
                    Batch { product: product.clone(), seller: seller.clone(), records: std::mem::take(&mut chunk) };
                if rng.gen_bool(self.config.identical_resend_share) {
                    batches.push(batch.clone());
                }
                batches.push(batch);
                if !conflicts.is_empty() {
                    batches.push(Batch { product: product.clone(), seller: seller.clone(), records: conflicts });
                }
            }
        }
        batches
    }

    /// Turns a good record into one of the invalid kinds ingest must name.
    fn spoil(&self, mut rec: Value, hour: Hour, rng: &mut SmallRng) -> Value {
        match rng.gen_range(0..8) {
            0 => rec["Dimension"] = json!(rec["Dimension"].as_str().unwrap_or("").to_uppercase()),
            1 => rec["Timestamp"] = json!(hour.start().millis() / 1000 + 9 * 3600),
            2 => rec["Timestamp"] = json!(hour.start().millis() / 1000 - 9 * 3600),
            3 => rec["Quantity"] = json!(-1),
            4 => rec["Quantity"] = json!(2_147_483_648i64),
            5 => {
                rec["UsageAllocations"] = json!([{ "AllocatedUsageQuantity": rec["Quantity"].as_i64().unwrap_or(0) + 1, "Tags": [{ "Key": "team", "Value": "x" }] }])
            }
            6 => {
                rec["UsageAllocations"] = json!([{ "AllocatedUsageQuantity": rec["Quantity"], "Tags": [{ "Key": "cost#center", "Value": "42" }] }])
            }
            _ => {
                let o = rec.as_object_mut().expect("records are objects");
                o.remove("CustomerIdentifier");
                o.insert("CustomerAWSAccountId".into(), json!("999999999999"));
            }
        }
        rec
    }
}

/// One `BatchMeterUsage` call's worth of records for one product.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Product code.
    pub product: String,
    /// Seller (whose key sends it).
    pub seller: String,
    /// Records as JSON.
    pub records: Vec<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::catalogue::PriceBook;

    #[test]
    fn the_demo_catalogue_is_a_valid_price_book_with_24_dimensions() {
        let s = Scenario::generate(ScenarioConfig { customers: 60, ..Default::default() });
        let book = PriceBook::new(s.doc.clone()).expect("generated price book validates");
        assert_eq!(book.product("globex-platform").unwrap().dimensions.len(), 24);
        assert!(s.doc.agreements.iter().any(|a| !a.annual.is_empty()));
        assert!(book.offer("initech-ml-private-eur").is_some());
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic() {
        let s = Scenario::generate(ScenarioConfig { customers: 20, ..Default::default() });
        let h = s.config.month.first_hour();
        let a = s.hour_traffic(h, &mut SmallRng::seed_from_u64(1));
        let b = s.hour_traffic(h, &mut SmallRng::seed_from_u64(1));
        assert_eq!(
            format!("{:?}", a.iter().map(|b| &b.records).collect::<Vec<_>>()),
            format!("{:?}", b.iter().map(|b| &b.records).collect::<Vec<_>>())
        );
        assert!(a.iter().all(|b| b.records.len() <= 25));
    }
}
