//! The official AWS SDK for Rust (`aws-sdk-marketplacemetering`, a client nobody here wrote)
//! against `meterline serve` on a free loopback port.
//!
//! The only change from seller code written for AWS is the documented one: the endpoint URL,
//! and the `X-Api-Key` header added by an interceptor (the SDK signs with SigV4 using dummy
//! credentials; Meterline authenticates by its key and ignores the signature). Every operation
//! is called, every modeled exception is caught by its variant, and the throttling answer is
//! retried by the SDK's own retry strategy after the server's `Retry-After`.

use aws_sdk_marketplacemetering as mm;
use mm::config::interceptors::BeforeTransmitInterceptorContextMut;
use mm::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use mm::error::ProvideErrorMetadata;
use mm::operation::batch_meter_usage::BatchMeterUsageError;
use mm::operation::meter_usage::MeterUsageError;
use mm::operation::register_usage::RegisterUsageError;
use mm::operation::resolve_customer::ResolveCustomerError;
use mm::operation::RequestId;
use mm::primitives::DateTime;
use mm::types::{Tag, UsageAllocation, UsageRecord, UsageRecordResultStatus};
use std::time::{Duration, Instant};

use crate::aws_fixtures::{issue_token, Served, ACME, GLOBEX, LICENSE};

/// Adds Meterline's key header to every request the SDK sends (after signing, so the signature
/// is the SDK's own; Meterline does not verify it).
#[derive(Debug)]
struct ApiKey(String);

impl Intercept for ApiKey {
    fn name(&self) -> &'static str {
        "MeterlineApiKey"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        context.request_mut().headers_mut().insert("X-Api-Key", self.0.clone());
        Ok(())
    }
}

/// A client as seller code builds it, pointed at Meterline: plain HTTP on loopback, dummy
/// credentials, `max_attempts` attempts of the standard retry strategy.
fn client(url: &str, key: &str, max_attempts: u32) -> mm::Client {
    let config = mm::Config::builder()
        .behavior_version(mm::config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDEXAMPLE", "dummy-secret", None, None, "meterline-test"))
        .endpoint_url(url)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .retry_config(mm::config::retry::RetryConfig::standard().with_max_attempts(max_attempts))
        .timeout_config(
            mm::config::timeout::TimeoutConfig::builder().operation_timeout(Duration::from_secs(30)).build(),
        )
        .interceptor(ApiKey(key.to_owned()))
        .build();
    mm::Client::from_conf(config)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An instant inside the hour `hours_ago` hours before the current one.
fn hours_ago(hours: i64) -> DateTime {
    let hour_start = now_secs() / 3600 * 3600;
    DateTime::from_secs(hour_start - hours * 3600 + 60)
}

fn record(dimension: &str, quantity: i32, at: DateTime) -> mm::types::builders::UsageRecordBuilder {
    UsageRecord::builder().timestamp(at).dimension(dimension).quantity(quantity)
}

fn by_account(dimension: &str, quantity: i32, at: DateTime) -> UsageRecord {
    record(dimension, quantity, at).customer_aws_account_id("111122223333").build().unwrap()
}

async fn batch(
    c: &mm::Client,
    product: &str,
    records: Vec<UsageRecord>,
) -> Result<mm::operation::batch_meter_usage::BatchMeterUsageOutput, BatchMeterUsageError> {
    c.batch_meter_usage()
        .product_code(product)
        .set_usage_records(Some(records))
        .send()
        .await
        .map_err(|e| e.into_service_error())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_meter_usage_through_the_sdk_answers_as_aws() {
    let s = Served::start(&[]);
    let acme = client(&s.url, ACME, 1);
    let at = hours_ago(1);

    // Success, an identical resend (same id), a conflicting one (DuplicateRecord), an unknown
    // customer (CustomerNotSubscribed): all per-record statuses of the model's enum.
    let first = batch(&acme, "acme-analytics", vec![by_account("users", 100, at), by_account("gb_ingest", 37, at)])
        .await
        .unwrap();
    assert!(first.request_id().is_some_and(|id| !id.is_empty()), "x-amzn-RequestId reaches the SDK");
    let results = first.results();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.status() == Some(&UsageRecordResultStatus::Success)), "{results:?}");
    let id = results[0].metering_record_id().unwrap().to_owned();
    let again = batch(&acme, "acme-analytics", vec![by_account("users", 100, at)]).await.unwrap();
    assert_eq!(again.results()[0].metering_record_id(), Some(id.as_str()));
    assert_eq!(again.results()[0].status(), Some(&UsageRecordResultStatus::Success));
    let unknown = record("users", 5, at).customer_aws_account_id("999999999999").build().unwrap();
    let mixed = batch(&acme, "acme-analytics", vec![by_account("users", 90, at), unknown]).await.unwrap();
    let statuses: Vec<_> = mixed.results().iter().map(|r| r.status().cloned()).collect();
    assert_eq!(
        statuses,
        [Some(UsageRecordResultStatus::DuplicateRecord), Some(UsageRecordResultStatus::CustomerNotSubscribed)]
    );

    // Concurrent Agreements: a record naming only the licence is metered against its agreement,
    // in a call without ProductCode as the current model asks (the licence names the product).
    let licensed = record("users", 7, hours_ago(2)).license_arn(LICENSE).build().unwrap();
    let out = acme.batch_meter_usage().usage_records(licensed.clone()).send().await.unwrap();
    assert_eq!(out.results()[0].status(), Some(&UsageRecordResultStatus::Success), "{out:?}");
    // The same slot by product and account id is the same record, never a second charge.
    let out = batch(&acme, "acme-analytics", vec![by_account("users", 7, hours_ago(2))]).await.unwrap();
    assert_eq!(out.results()[0].status(), Some(&UsageRecordResultStatus::Success), "{out:?}");
    let e = client(&s.url, GLOBEX, 1)
        .batch_meter_usage()
        .usage_records(licensed)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, BatchMeterUsageError::InvalidLicenseException(_)), "another seller's licence: {e:?}");
    let e = acme
        .batch_meter_usage()
        .usage_records(by_account("users", 1, at))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, BatchMeterUsageError::InvalidProductCodeException(_)), "no ProductCode and no licence: {e:?}");

    // Every modeled whole-call exception, caught by its variant; nothing of those calls stored.
    let good = by_account("users", 1, hours_ago(3));
    let e = batch(&client(&s.url, GLOBEX, 1), "acme-analytics", vec![good.clone()]).await.unwrap_err();
    assert!(matches!(e, BatchMeterUsageError::InvalidProductCodeException(_)), "another seller's product: {e:?}");
    assert!(e.meta().code() == Some("InvalidProductCodeException"));
    let e = batch(&acme, "no-such-product", vec![good.clone()]).await.unwrap_err();
    assert!(matches!(e, BatchMeterUsageError::InvalidProductCodeException(_)), "unknown product: {e:?}");
    type Is = fn(&BatchMeterUsageError) -> bool;
    let cases: Vec<(UsageRecord, Is, &str)> = vec![
        (
            by_account("users", 1, hours_ago(8)),
            |e| matches!(e, BatchMeterUsageError::TimestampOutOfBoundsException(_)),
            "stale",
        ),
        (
            by_account("seats", 1, at),
            |e| matches!(e, BatchMeterUsageError::InvalidUsageDimensionException(_)),
            "dimension",
        ),
        (
            record("users", 1, at)
                .customer_identifier("cid-alpha")
                .customer_aws_account_id("111122223333")
                .build()
                .unwrap(),
            |e| matches!(e, BatchMeterUsageError::InvalidCustomerIdentifierException(_)),
            "both identifiers",
        ),
        (
            record("users", 3, at)
                .customer_aws_account_id("111122223333")
                .usage_allocations(UsageAllocation::builder().allocated_usage_quantity(2).build().unwrap())
                .build()
                .unwrap(),
            |e| matches!(e, BatchMeterUsageError::InvalidUsageAllocationsException(_)),
            "allocations",
        ),
        (
            record("users", 3, at)
                .customer_aws_account_id("111122223333")
                .usage_allocations(
                    UsageAllocation::builder()
                        .allocated_usage_quantity(3)
                        .tags(Tag::builder().key("cost#centre").value("web").build().unwrap())
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
            |e| matches!(e, BatchMeterUsageError::InvalidTagException(_)),
            "tag",
        ),
        (
            record("users", 1, at).license_arn("arn:aws:license-manager::1:license:l-nope").build().unwrap(),
            |e| matches!(e, BatchMeterUsageError::InvalidLicenseException(_)),
            "licence",
        ),
    ];
    for (bad, is, what) in cases {
        let e = batch(&acme, "acme-analytics", vec![good.clone(), bad]).await.unwrap_err();
        assert!(is(&e), "{what}: {e:?}");
        assert!(e.message().is_some_and(|m| m.starts_with("UsageRecords[1]: ")), "{what}: {e:?}");
        assert!(e.request_id().is_some(), "{what}: errors carry a request id");
    }

    let lines = s.stop();
    let qty =
        |dim: &str| lines.iter().filter(|l| l.dimension == dim).map(|l| l.quantity).sum::<rust_decimal::Decimal>();
    // 100 (first), 7 (licence, another hour); the refused calls' `good` record is not there.
    assert_eq!(qty("users"), rust_decimal::Decimal::from(107));
    assert_eq!(qty("gb_ingest"), rust_decimal::Decimal::from(37));
}

async fn meter(
    c: &mm::Client,
    product: &str,
    dimension: &str,
    quantity: i32,
    at: DateTime,
    dry_run: bool,
) -> Result<String, MeterUsageError> {
    c.meter_usage()
        .product_code(product)
        .timestamp(at)
        .usage_dimension(dimension)
        .usage_quantity(quantity)
        .dry_run(dry_run)
        .send()
        .await
        .map(|o| o.metering_record_id().unwrap_or_default().to_owned())
        .map_err(|e| e.into_service_error())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_usage_from_the_buyers_deployments() {
    let s = Served::start(&[]);
    let (a1, a2) = (client(&s.url, "dep-key-a1", 1), client(&s.url, "dep-key-a2", 1));
    let at = hours_ago(1);

    // Two deployments of one customer in the same hour: two records (MET-12), summed in charges.
    let id1 = meter(&a1, "acme-vm", "c5_xlarge", 3, at, false).await.unwrap();
    let id2 = meter(&a2, "acme-vm", "c5_xlarge", 4, at, false).await.unwrap();
    assert_ne!(id1, id2, "per-deployment records are not collapsed");
    assert_eq!(
        meter(&a1, "acme-vm", "c5_xlarge", 3, at, false).await.unwrap(),
        id1,
        "an identical call returns the same id"
    );
    let e = meter(&a1, "acme-vm", "c5_xlarge", 5, at, false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::DuplicateRequestException(_)), "{e:?}");

    // DryRun answers as AWS (DryRunOperation, not modeled, so checked by its code) and stores nothing.
    let e = meter(&a1, "acme-vm", "c5_xlarge", 9, hours_ago(2), true).await.unwrap_err();
    assert_eq!(e.code(), Some("DryRunOperation"), "{e:?}");
    // ...so the same slot is still free for a real call.
    meter(&a1, "acme-vm", "c5_xlarge", 1, hours_ago(2), false).await.unwrap();

    let e = meter(&a1, "acme-analytics", "users", 1, at, false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::InvalidProductCodeException(_)), "not the deployment's product: {e:?}");
    let e = meter(&a1, "acme-vm", "c5_2xlarge", 1, at, false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::InvalidUsageDimensionException(_)), "{e:?}");
    let e = meter(&a1, "acme-vm", "c5_xlarge", 1, hours_ago(8), false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::TimestampOutOfBoundsException(_)), "{e:?}");
    let e = meter(&client(&s.url, "dep-key-b1", 1), "acme-vm", "c5_xlarge", 1, at, false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::CustomerNotEntitledException(_)), "no agreement: {e:?}");
    let e = meter(&client(&s.url, "dep-key-c1", 1), "acme-analytics", "users", 1, at, false).await.unwrap_err();
    assert!(
        matches!(
            e,
            MeterUsageError::TimestampOutOfBoundsException(_) | MeterUsageError::CustomerNotEntitledException(_)
        ),
        "{e:?}"
    );
    let alloc = |q: i32, tag: &str| {
        UsageAllocation::builder()
            .allocated_usage_quantity(q)
            .tags(Tag::builder().key(tag).value("v").build().unwrap())
            .build()
            .unwrap()
    };
    let e = a1
        .meter_usage()
        .product_code("acme-vm")
        .timestamp(hours_ago(3))
        .usage_dimension("c5_xlarge")
        .usage_quantity(2)
        .usage_allocations(alloc(1, "team"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, MeterUsageError::InvalidUsageAllocationsException(_)), "{e:?}");
    let e = a1
        .meter_usage()
        .product_code("acme-vm")
        .timestamp(hours_ago(3))
        .usage_dimension("c5_xlarge")
        .usage_quantity(2)
        .usage_allocations(alloc(2, "te%m"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, MeterUsageError::InvalidTagException(_)), "{e:?}");
    // A seller's key on another seller's product.
    let e = meter(&client(&s.url, GLOBEX, 1), "acme-vm", "c5_xlarge", 1, at, false).await.unwrap_err();
    assert!(matches!(e, MeterUsageError::InvalidProductCodeException(_)), "{e:?}");
    // A dimension netted against annual units cannot be metered per deployment (yet): refused,
    // never netted twice.
    let e = meter(&a1, "acme-vm", "m5_large", 1, at, false).await.unwrap_err();
    assert_eq!(e.code(), Some("ValidationException"), "{e:?}");

    let lines = s.stop();
    let c5: Vec<_> = lines.iter().filter(|l| l.dimension == "c5_xlarge").collect();
    assert_eq!(c5.len(), 1, "one invoice line per customer and dimension: {lines:?}");
    assert_eq!(c5[0].customer, "cust-a");
    assert_eq!(
        c5[0].quantity,
        rust_decimal::Decimal::from(3 + 4 + 1),
        "summed across deployments, the dry run not stored"
    );
    assert_eq!(
        c5[0].amount_unrounded,
        rust_decimal::Decimal::from(8) * "0.34".parse::<rust_decimal::Decimal>().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_customer_and_register_usage() {
    let s = Served::start(&[]);
    // Issued while the server runs: resolvable at once.
    let token = issue_token(&s.dir.path().join("book.toml"), &s.data(), "cust-a", "acme-analytics");
    assert!(token.starts_with("mlrt-"), "{token}");
    let acme = client(&s.url, ACME, 1);
    let r = acme.resolve_customer().registration_token(&token).send().await.unwrap();
    assert_eq!(r.customer_identifier(), Some("cid-alpha"));
    assert_eq!(r.customer_aws_account_id(), Some("111122223333"));
    assert_eq!(r.product_code(), Some("acme-analytics"));
    assert_eq!(r.license_arn(), Some(LICENSE));
    let tokens = std::fs::read_to_string(s.data().join("registration-tokens.toml")).unwrap();
    assert!(!tokens.contains(&token), "the tokens file keeps only hashes");

    let e = acme.resolve_customer().registration_token("mlrt-forged").send().await.unwrap_err().into_service_error();
    assert!(matches!(e, ResolveCustomerError::InvalidTokenException(_)), "{e:?}");
    let e = client(&s.url, GLOBEX, 1)
        .resolve_customer()
        .registration_token(&token)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, ResolveCustomerError::InvalidTokenException(_)), "another seller's token: {e:?}");
    let expired = ingest::aws::TokenEntry::new(
        "mlrt-old",
        "cust-a",
        "acme-analytics",
        None,
        common::time::Timestamp::from_millis(0),
    );
    std::fs::write(s.data().join("registration-tokens.toml"), format!("{tokens}\n{}", expired.to_toml())).unwrap();
    let e = acme.resolve_customer().registration_token("mlrt-old").send().await.unwrap_err().into_service_error();
    assert!(matches!(e, ResolveCustomerError::ExpiredTokenException(_)), "{e:?}");

    // RegisterUsage from a paid container's deployment.
    let a1 = client(&s.url, "dep-key-a1", 1);
    let ok = a1.register_usage().product_code("acme-vm").public_key_version(1).nonce("n-1").send().await.unwrap();
    assert!(ok.signature().is_some_and(|s| s.len() == 64), "{ok:?}");
    assert!(ok.public_key_rotation_timestamp().is_some());
    let e = client(&s.url, "dep-key-c1", 1)
        .register_usage()
        .product_code("acme-analytics")
        .public_key_version(1)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, RegisterUsageError::CustomerNotEntitledException(_)), "cust-c's agreement ended: {e:?}");
    let e = a1
        .register_usage()
        .product_code("acme-analytics")
        .public_key_version(1)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, RegisterUsageError::InvalidProductCodeException(_)), "{e:?}");
    let e = a1
        .register_usage()
        .product_code("acme-vm")
        .public_key_version(0)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, RegisterUsageError::InvalidPublicKeyVersionException(_)), "{e:?}");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_by_the_sdk_after_retry_after() {
    // One record per second per seller: a second call at once is answered 429 with Retry-After 1.
    let s = Served::start(&["--seller-records-per-sec", "1", "--seller-burst", "1"]);
    let at = hours_ago(1);
    let no_retry = client(&s.url, ACME, 1);
    batch(&no_retry, "acme-analytics", vec![by_account("users", 1, at)]).await.unwrap();
    let e = batch(&no_retry, "acme-analytics", vec![by_account("gb_ingest", 1, at)]).await.unwrap_err();
    assert!(matches!(e, BatchMeterUsageError::ThrottlingException(_)), "caught by its variant: {e:?}");

    // With the SDK's standard retries, the same call succeeds after the server's wait.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retrying = client(&s.url, ACME, 3);
    batch(&retrying, "acme-analytics", vec![by_account("users", 2, hours_ago(2))]).await.unwrap();
    let started = Instant::now();
    let out = batch(&retrying, "acme-analytics", vec![by_account("gb_ingest", 2, hours_ago(2))]).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(out.results()[0].status(), Some(&UsageRecordResultStatus::Success));
    assert!(
        waited >= Duration::from_millis(800),
        "the SDK waited for Retry-After (x-amz-retry-after), not less: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    s.stop();
}
