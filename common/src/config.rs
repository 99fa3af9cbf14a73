//! Configuration of the distributed mode: one TOML file shared by `ingest`, `rater` and
//! `aggregator`, each reading the sections it needs, with environment overrides
//! (`METERLINE__KAFKA__BOOTSTRAP=…`: double underscore = nesting).
//!
//! Validation is pure and runs before any socket opens. The librdkafka passthrough map may not
//! set the keys our delivery guarantees rest on (idempotence, acks, offset storage, isolation,
//! transactions): config must never silently weaken a guarantee.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Keys the passthrough map may not set.
pub const PROTECTED_KAFKA_KEYS: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "transactional.id",
    "transaction.timeout.ms",
    "partition.assignment.strategy",
    "bootstrap.servers",
    "group.id",
];

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file or environment does not parse into the schema.
    #[error("configuration: {0}")]
    Load(String),
    /// A value breaks a rule.
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Topic names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Validated usage records from ingest, keyed by product + customer.
    pub raw: String,
    /// Rated line items from the rater; partition = the raw record's partition.
    pub rated: String,
    /// Refused records with their reason.
    pub rejected: String,
    /// Undecodable messages with the reason and their source.
    pub dead_letter: String,
    /// The rater's per-record decisions, sent back to the `ingest` instance that asked (each
    /// instance reads one partition of it): distributed ingest answers a call only once every
    /// record's decision is committed. Short-lived; see docs/ARCHITECTURE.md.
    #[serde(default = "default_decisions_topic")]
    pub decisions: String,
    /// The latest closed month, written by `aggregator close` before it reads the month's lines
    /// and followed by every rater, so late usage meets the profile's policy as in the embedded
    /// default. Compacted, one partition; see docs/ARCHITECTURE.md.
    #[serde(default = "default_closed_months_topic")]
    pub closed_months: String,
    /// The catalogue's changes made through the operator API, with the book each made, followed
    /// by every stage. One partition, compacted, one key per entry; see
    /// `common::catalogue_topic`.
    #[serde(default = "default_catalogue_topic")]
    pub catalogue: String,
}

fn default_catalogue_topic() -> String {
    "meterline.catalogue".into()
}

fn default_decisions_topic() -> String {
    "meterline.decisions".into()
}

fn default_closed_months_topic() -> String {
    "meterline.closed-months".into()
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            raw: "meterline.usage.raw".into(),
            rated: "meterline.usage.rated".into(),
            rejected: "meterline.usage.rejected".into(),
            dead_letter: "meterline.dead-letter".into(),
            decisions: default_decisions_topic(),
            closed_months: default_closed_months_topic(),
            catalogue: default_catalogue_topic(),
        }
    }
}

/// Kafka (or any Kafka-protocol broker).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub bootstrap: String,
    /// Topic names.
    #[serde(default)]
    pub topics: Topics,
    /// Partitions of each topic when the binaries create them. Raw and rated must match: the
    /// rater writes a raw partition's output to the same rated partition.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor for created topics.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// Consumer group session timeout (ms). Short in tests; rebalances wait about half of it.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u32,
    /// Extra librdkafka settings (applied first; protected keys are refused).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// librdkafka settings read from files at load (e.g. `"sasl.password" = "/run/secrets/kafka"`),
    /// so secrets stay out of the config file; merged into `client`.
    #[serde(default)]
    pub client_files: BTreeMap<String, PathBuf>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passthrough values may hold SASL passwords: print the keys only.
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("topics", &self.topics)
            .field("partitions", &self.partitions)
            .field("client_keys", &self.client.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn default_partitions() -> i32 {
    4
}
fn default_replication() -> i32 {
    1
}
fn default_session_timeout() -> u32 {
    10_000
}

/// ClickHouse over HTTP.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// `http://host:8123`.
    pub url: String,
    /// Database holding Meterline's tables.
    #[serde(default = "default_database")]
    pub database: String,
    /// User name.
    #[serde(default = "default_user")]
    pub user: String,
    /// Password; set it through `METERLINE__CLICKHOUSE__PASSWORD`, never in the file.
    #[serde(default)]
    pub password: Option<String>,
    /// Or read the password from this file at load (a mounted secret); trailing newline dropped.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn default_database() -> String {
    "meterline".into()
}
fn default_user() -> String {
    "default".into()
}

/// The `ingest` binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Listen address of the HTTP API.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Records allowed in flight to the broker before callers get 429.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// How long to wait for the broker's acknowledgement before answering 503.
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout_ms: u64,
    /// How long, after the broker acknowledged a call's records, to wait for the raters'
    /// decisions before answering 503 with `Retry-After`. The records stay durable in the raw
    /// topic and are decided later; the seller's identical resend then answers with the same
    /// record ids. Cover a rater failover (session timeout plus a partition rebuild).
    #[serde(default = "default_decision_timeout")]
    pub decision_timeout_ms: u64,
    /// The operators file (`[[operators]]`: name, role, seller, api_key_sha256): turns on the
    /// operator API on this listener; changes go to the catalogue topic every stage follows.
    #[serde(default)]
    pub operators: Option<std::path::PathBuf>,
    /// `[ingest.security]`: TLS, key rotation, per-seller limits, body deadline.
    #[serde(default)]
    pub security: IngestSecurity,
}

/// `ingest` hardening settings (issue 7); all optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSecurity {
    /// PEM certificate chain: serve HTTPS (needs `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Extra API keys (`[[keys]]` TOML), reloaded with the price book's keys on SIGHUP or change.
    #[serde(default)]
    pub keys_file: Option<PathBuf>,
    /// Per-seller records per second (off when absent).
    #[serde(default)]
    pub seller_records_per_sec: Option<u32>,
    /// Per-seller burst in records.
    #[serde(default)]
    pub seller_burst: Option<u32>,
    /// How long a request body may take to arrive (ms) before 408.
    #[serde(default)]
    pub body_timeout_ms: Option<u64>,
    /// Most connections open at once (default 10,000, kept below the open-file limit).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How long a connection may take to send a request head, after opening or after its
    /// previous answer (ms, default 10,000).
    #[serde(default)]
    pub header_timeout_ms: Option<u64>,
    /// How long a connection may stay open with nothing moving either way (ms, default 60,000).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            listen: default_listen(),
            max_in_flight: default_in_flight(),
            delivery_timeout_ms: default_delivery_timeout(),
            decision_timeout_ms: default_decision_timeout(),
            operators: None,
            security: IngestSecurity::default(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_in_flight() -> usize {
    200_000
}
fn default_delivery_timeout() -> u64 {
    10_000
}
fn default_decision_timeout() -> u64 {
    15_000
}

/// The `rater` binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaterSection {
    /// Consumer group.
    #[serde(default = "default_rater_group")]
    pub group: String,
    /// Most records decided per batch (one produce-and-commit cycle).
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Longest a batch waits to fill (ms), from its start (after the previous commit). Past it
    /// the batch is cut as soon as no record is already waiting, so under light load this bounds
    /// what a batch adds to a distributed call's ack.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// Hard cap on a batch's age (ms, since its first record, i.e. its transaction's begin).
    /// Past the linger, a rater that lags keeps taking records already waiting in its consumer
    /// (without waiting for more) until `max_batch` or this age: batches grow under lag instead of
    /// paying one serial transaction commit per linger's worth of records (issue 15). Must be
    /// below `transaction_timeout_ms`; at or below `linger_ms` it turns the growth off (a batch is
    /// cut at the linger, as before).
    #[serde(default = "default_max_batch_age")]
    pub max_batch_age_ms: u64,
    /// Where `/metrics`, `/health` and `/ready` are served (`host:port`); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Memory budgeted for dedup state: the threshold of the "dedup state near its bound"
    /// alert. Not enforced (refusing records would lose billed usage): size it to the share of
    /// the container's memory limit that dedup may take.
    #[serde(default = "default_dedup_budget")]
    pub dedup_memory_budget_bytes: u64,
    /// Stable name of this rater instance. Its Kafka transactional id is `{group}-{instance_id}`,
    /// so an instance restarted under the same name fences its predecessor's open transaction
    /// at once instead of leaving it to `transaction_timeout_ms`. Two live instances must never
    /// share it (the second fences the first). Default: `{hostname}-{pid}` (a pod restarts with
    /// its name and pid 1 in Kubernetes).
    #[serde(default)]
    pub instance_id: Option<String>,
    /// How long one batch's Kafka transaction may stay open before the broker aborts it (ms):
    /// bounds how long a crashed instance's open transaction holds back `read_committed`
    /// readers of its rated partitions. Must exceed the time one batch takes to produce.
    #[serde(default = "default_transaction_timeout")]
    pub transaction_timeout_ms: u32,
}

impl RaterSection {
    /// The transactional id of this instance: `{group}-{instance_id}`.
    pub fn transactional_id(&self) -> String {
        let instance = self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "rater".into());
            format!("{host}-{}", std::process::id())
        });
        format!("{}-{instance}", self.group)
    }
}

impl Default for RaterSection {
    fn default() -> Self {
        RaterSection {
            group: default_rater_group(),
            max_batch: default_batch(),
            linger_ms: default_linger(),
            max_batch_age_ms: default_max_batch_age(),
            metrics_listen: None,
            dedup_memory_budget_bytes: default_dedup_budget(),
            instance_id: None,
            transaction_timeout_ms: default_transaction_timeout(),
        }
    }
}

fn default_transaction_timeout() -> u32 {
    30_000
}

/// 2 GiB of dedup state: about 45 M keys at the estimated 48 bytes each.
pub const DEFAULT_DEDUP_BUDGET_BYTES: u64 = 2 << 30;

fn default_dedup_budget() -> u64 {
    DEFAULT_DEDUP_BUDGET_BYTES
}

fn default_rater_group() -> String {
    "meterline-rater".into()
}
fn default_batch() -> usize {
    10_000
}
/// Short: a distributed call is answered when its batch commits, so linger adds to every ack.
fn default_linger() -> u64 {
    20
}
/// A lagging rater's batch: long enough for thousands of records per commit, short enough that
/// a call waiting on it is answered well within a second.
fn default_max_batch_age() -> u64 {
    500
}

/// The `aggregator` binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorSection {
    /// Consumer group.
    #[serde(default = "default_aggregator_group")]
    pub group: String,
    /// Most records per flush to ClickHouse.
    #[serde(default = "default_flush_rows")]
    pub flush_max_records: usize,
    /// Longest a record waits before its flush (ms).
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    /// Rated partitions this instance owns (all when absent). Several aggregators split the
    /// partitions between them with disjoint lists.
    #[serde(default)]
    pub partitions: Option<Vec<i32>>,
    /// Where `/metrics`, `/health` and `/ready` are served (`host:port`); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Where the query API (usage, month-to-date charges, invoice preview, entitlements; sellers'
    /// metering keys) is served from ClickHouse (`host:port`); none when absent.
    #[serde(default)]
    pub query_listen: Option<String>,
}

impl Default for AggregatorSection {
    fn default() -> Self {
        AggregatorSection {
            group: default_aggregator_group(),
            flush_max_records: default_flush_rows(),
            flush_interval_ms: default_flush_interval(),
            partitions: None,
            metrics_listen: None,
            query_listen: None,
        }
    }
}

fn default_aggregator_group() -> String {
    "meterline-aggregator".into()
}
fn default_flush_rows() -> usize {
    50_000
}
fn default_flush_interval() -> u64 {
    1_000
}

/// The whole distributed-mode configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The price book file (TOML or JSON).
    pub price_book: PathBuf,
    /// Broker.
    pub kafka: KafkaConfig,
    /// ClickHouse (the aggregator's sink).
    pub clickhouse: Option<ClickHouseConfig>,
    /// `ingest` settings.
    #[serde(default)]
    pub ingest: IngestSection,
    /// `rater` settings.
    #[serde(default)]
    pub rater: RaterSection,
    /// `aggregator` settings.
    #[serde(default)]
    pub aggregator: AggregatorSection,
}

impl PipelineConfig {
    /// Loads `path`, then `METERLINE__*` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: PipelineConfig = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("METERLINE__").split("__"))
            .extract()
            .map_err(|e| ConfigError::Load(format!("{} ({})", e, path.display())))?;
        cfg.read_secret_files()?.validate()
    }

    /// Reads `clickhouse.password_file` and `kafka.client_files` into the values they stand for.
    /// Errors name the setting and the file, never the content.
    pub fn read_secret_files(mut self) -> Result<Self, ConfigError> {
        fn secret(setting: &str, path: &Path) -> Result<String, ConfigError> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Load(format!("{setting}: cannot read {}: {e}", path.display())))?;
            Ok(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        if let Some(ch) = self.clickhouse.as_mut() {
            if let Some(p) = ch.password_file.clone() {
                if ch.password.is_some() {
                    return Err(ConfigError::Invalid("clickhouse: set password or password_file, not both".into()));
                }
                ch.password = Some(secret("clickhouse.password_file", &p)?);
            }
        }
        for (key, p) in std::mem::take(&mut self.kafka.client_files) {
            if self.kafka.client.contains_key(&key) {
                return Err(ConfigError::Invalid(format!("kafka: `{key}` is set in both client and client_files")));
            }
            let v = secret(&format!("kafka.client_files.\"{key}\""), &p)?;
            self.kafka.client.insert(key, v);
        }
        Ok(self)
    }

    /// Parses TOML text (no environment), then validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: PipelineConfig =
            Figment::new().merge(Toml::string(text)).extract().map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.validate()
    }

    /// Pure checks.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let k = &self.kafka;
        if k.bootstrap.trim().is_empty() {
            return Err(ConfigError::Invalid("kafka.bootstrap is empty".into()));
        }
        if k.partitions < 1 {
            return Err(ConfigError::Invalid("kafka.partitions must be at least 1".into()));
        }
        for key in k.client.keys() {
            if PROTECTED_KAFKA_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "kafka.client.\"{key}\" is set by Meterline itself (a delivery guarantee rests on it) and may not be overridden"
                )));
            }
        }
        let t = &k.topics;
        let names = [&t.raw, &t.rated, &t.rejected, &t.dead_letter, &t.decisions, &t.closed_months, &t.catalogue];
        for (i, a) in names.iter().enumerate() {
            if a.is_empty() || names[i + 1..].contains(a) {
                return Err(ConfigError::Invalid(format!("kafka.topics: `{a}` is empty or used twice")));
            }
        }
        if self.rater.transaction_timeout_ms <= u32::try_from(self.rater.linger_ms).unwrap_or(u32::MAX) {
            return Err(ConfigError::Invalid(format!(
                "rater.transaction_timeout_ms ({}) must exceed rater.linger_ms ({}): a batch's transaction spans its linger",
                self.rater.transaction_timeout_ms, self.rater.linger_ms
            )));
        }
        if u64::from(self.rater.transaction_timeout_ms) <= self.rater.max_batch_age_ms {
            return Err(ConfigError::Invalid(format!(
                "rater.transaction_timeout_ms ({}) must exceed rater.max_batch_age_ms ({}): a batch's transaction spans its age",
                self.rater.transaction_timeout_ms, self.rater.max_batch_age_ms
            )));
        }
        if self.rater.max_batch == 0 || self.aggregator.flush_max_records == 0 {
            return Err(ConfigError::Invalid("batch sizes must be at least 1".into()));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/meterline.example.toml");

    #[test]
    fn the_example_config_loads() {
        let c = PipelineConfig::from_toml(EXAMPLE).unwrap();
        assert_eq!(c.kafka.topics, Topics::default());
        assert!(c.clickhouse.is_some());
    }

    #[test]
    fn passthrough_cannot_weaken_delivery() {
        let bad = format!("{EXAMPLE}\n[kafka.client]\n\"enable.idempotence\" = \"false\"\n");
        let err = PipelineConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("enable.idempotence"), "{err}");
    }

    #[test]
    fn a_batch_age_must_stay_below_the_transaction_timeout() {
        let with = |age: &str| PipelineConfig::from_toml(&EXAMPLE.replace("max_batch_age_ms = 500", age));
        let c = with("").unwrap();
        assert_eq!((c.rater.linger_ms, c.rater.max_batch_age_ms), (20, 500));
        let err = with("max_batch_age_ms = 30000").unwrap_err().to_string();
        assert!(err.contains("transaction_timeout_ms (30000) must exceed rater.max_batch_age_ms (30000)"), "{err}");
        // At or below the linger: no growth, still valid (a long linger alone keeps working).
        assert_eq!(with("max_batch_age_ms = 0").unwrap().rater.max_batch_age_ms, 0);
        let long_linger = EXAMPLE.replace("linger_ms = 20 ", "linger_ms = 3000 ");
        assert_eq!(PipelineConfig::from_toml(&long_linger).unwrap().rater.linger_ms, 3000);
    }

    #[test]
    fn secrets_are_not_printed() {
        let mut c = PipelineConfig::from_toml(EXAMPLE).unwrap();
        c.clickhouse.as_mut().unwrap().password = Some("hunter2".into());
        c.kafka.client.insert("sasl.password".into(), "hunter3".into());
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("hunter3"), "{s}");
    }

    #[test]
    fn secrets_come_from_files_and_stay_unprinted() {
        let dir = std::env::temp_dir().join(format!("meterline-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ch, kf) = (dir.join("ch"), dir.join("kafka"));
        std::fs::write(&ch, "s3cret-ch\n").unwrap();
        std::fs::write(&kf, "s3cret-kafka").unwrap();
        let text =
            EXAMPLE.replace("[clickhouse]", &format!("[clickhouse]\npassword_file = {:?}", ch.display().to_string()));
        let text = format!("{text}\n[kafka.client_files]\n\"sasl.password\" = {:?}\n", kf.display().to_string());
        let c = PipelineConfig::from_toml(&text).unwrap().read_secret_files().unwrap();
        assert_eq!(c.clickhouse.as_ref().unwrap().password.as_deref(), Some("s3cret-ch"));
        assert_eq!(c.kafka.client.get("sasl.password").map(String::as_str), Some("s3cret-kafka"));
        let s = format!("{c:?}");
        assert!(!s.contains("s3cret"), "{s}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
