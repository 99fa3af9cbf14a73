//! SHELL (distributed mode). The catalogue as every stage follows it: the `meterline.catalogue`
//! topic (one partition, compacted, one key per entry so nothing is compacted away) holds each
//! change an operator made through `ingest`'s operator API, with the whole book it produced.
//!
//! - [`follow`] reads the topic to its end before it returns (a stage decides nothing before it
//!   knows every change published so far), then a background thread follows it and puts each
//!   accepted book in force on the follower's [`LiveBook`].
//! - [`accepts`] (pure) is the chain rule that makes every follower agree: an entry is in force
//!   only if it was made from the version in force when it is read, so of two servers' changes
//!   to the same version the first in the topic wins and the second is refused (409 to its
//!   caller), the same in every stage. The topic's first entry is taken whatever the seed: the
//!   topic, not a process's price-book file, is the catalogue once operators changed it.
//! - The accepted entries are numbered from 1 in topic order: that number (the *catalogue seq*)
//!   is the same in every stage. Ingest stamps it on each raw record ([`SEQ_HEADER`]) and the
//!   rater on each rated record, so a stage that reads a record validated under a newer
//!   catalogue than it has waits for it ([`CatalogueFollower::wait_for_seq`]) rather than rate
//!   a new customer's usage against a book that does not know the customer.

use crate::catalogue::change::AuditEntry;
use crate::catalogue::{LiveBook, PriceBook};
use crate::config::KafkaConfig;
pub use crate::kafka::FollowError;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The header naming the catalogue seq a record was validated (raw) or rated (rated) under.
pub const SEQ_HEADER: &str = "meterline-catalogue-seq";

/// How often the follower thread polls the topic (ms).
const POLL_MS: u64 = 50;

/// Longest the startup read of the topic may take.
const STARTUP_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One message of the topic: an audit entry and the whole book it made (price-book JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct TopicEntry {
    /// Who changed what, from which version to which.
    pub entry: AuditEntry,
    /// The book the changes produced, as `PriceBook::from_json` reads it.
    pub book: String,
}

/// Why a change could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker did not take it.
    #[error("catalogue topic: kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// An entry could not be encoded.
    #[error("encoding a catalogue entry: {0}")]
    Encode(String),
}

/// PURE. Whether an entry read from the topic goes in force on top of `current` (the version in
/// force, `first` when no entry was accepted yet): the chain rule (see the module).
pub fn accepts(current: &str, first: bool, entry: &AuditEntry) -> bool {
    first || entry.previous == current
}

/// What the follower knows, under one lock so a batch reads a book and its seq together.
#[derive(Debug)]
struct State {
    book: Arc<PriceBook>,
    entries: Vec<AuditEntry>,
    /// Topic offset → seq of the entry accepted there (refused offsets are absent).
    accepted_at: HashMap<i64, i64>,
    /// The next offset the follower will read: everything before it is applied.
    next_offset: i64,
}

type OnChange = Box<dyn Fn(&Arc<PriceBook>) + Send + Sync>;

struct Shared {
    topic: String,
    state: Mutex<State>,
    changed: Condvar,
    live: LiveBook,
    on_change: Mutex<Vec<OnChange>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies the message at `offset`: accepted → in force (and every `on_change` told).
    fn apply(&self, offset: i64, payload: Option<&[u8]>) {
        let mut st = self.lock();
        st.next_offset = st.next_offset.max(offset + 1);
        let parsed = payload
            .ok_or_else(|| "no payload".to_owned())
            .and_then(|p| serde_json::from_slice::<TopicEntry>(p).map_err(|e| e.to_string()));
        let accepted = match parsed {
            Err(why) => {
                tracing::error!(offset, why, topic = self.topic, "catalogue entry unreadable: ignored");
                None
            }
            Ok(TopicEntry { mut entry, book }) => {
                if !accepts(st.book.version(), st.entries.is_empty(), &entry) {
                    tracing::info!(
                        offset,
                        version = entry.version,
                        previous = entry.previous,
                        in_force = st.book.version(),
                        "catalogue change refused: made from a version no longer in force"
                    );
                    None
                } else {
                    match PriceBook::from_json(&book) {
                        Err(e) => {
                            tracing::error!(offset, version = entry.version, "catalogue entry's book invalid: {e}");
                            None
                        }
                        Ok(book) => {
                            entry.seq = st.entries.len() as i64 + 1;
                            Some((entry, Arc::new(book)))
                        }
                    }
                }
            }
        };
        if let Some((entry, book)) = accepted {
            tracing::info!(seq = entry.seq, version = entry.version, actor = entry.actor, "catalogue change in force");
            st.accepted_at.insert(offset, entry.seq);
            st.entries.push(entry);
            st.book = Arc::clone(&book);
            self.live.replace(Arc::clone(&book));
            drop(st);
            for f in self.on_change.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
                f(&book);
            }
        } else {
            drop(st);
        }
        self.changed.notify_all();
    }
}

/// A stage's follower of the catalogue topic. Cheap to clone; the thread ends with the last clone.
#[derive(Clone)]
pub struct CatalogueFollower(Arc<Shared>);

impl std::fmt::Debug for CatalogueFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (seq, version) = self.seq_and_version();
        f.debug_struct("CatalogueFollower")
            .field("topic", &self.0.topic)
            .field("seq", &seq)
            .field("version", &version)
            .finish()
    }
}

impl CatalogueFollower {
    /// The book in force, shared with every reader of this follower.
    pub fn live(&self) -> LiveBook {
        self.0.live.clone()
    }

    /// The book in force and its catalogue seq (0: the seed, no change yet), read together.
    pub fn snapshot(&self) -> (i64, Arc<PriceBook>) {
        let st = self.0.lock();
        (st.entries.len() as i64, Arc::clone(&st.book))
    }

    fn seq_and_version(&self) -> (i64, String) {
        let st = self.0.lock();
        (st.entries.len() as i64, st.book.version().to_owned())
    }

    /// The catalogue seq in force.
    pub fn seq(&self) -> i64 {
        self.0.lock().entries.len() as i64
    }

    /// Waits until the seq in force is at least `seq`; false if `timeout` passed first.
    pub fn wait_for_seq(&self, seq: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.0.lock();
        while (st.entries.len() as i64) < seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.0.changed.wait_timeout(st, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        true
    }

    /// Waits until the message at `offset` was read: `Some(Some(seq))` if it went in force,
    /// `Some(None)` if the chain rule refused it, `None` if `timeout` passed first.
    pub fn wait_for_offset(&self, offset: i64, timeout: Duration) -> Option<Option<i64>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.0.lock();
        while st.next_offset <= offset {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self.0.changed.wait_timeout(st, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        Some(st.accepted_at.get(&offset).copied())
    }

    /// Up to `limit` accepted entries after seq `after`, oldest first (the audit log).
    pub fn entries(&self, after: i64, limit: usize) -> Vec<AuditEntry> {
        let st = self.0.lock();
        st.entries.iter().filter(|e| e.seq > after).take(limit).cloned().collect()
    }

    /// Calls `f` with each book put in force from now on (on the follower's thread: keep it short).
    pub fn on_change(&self, f: impl Fn(&Arc<PriceBook>) + Send + Sync + 'static) {
        self.0.on_change.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Box::new(f));
    }
}

/// Reads the catalogue topic of `k` to its end on top of `seed` (the price-book file), then
/// follows it in a background thread. Blocking: call it from `block_in_place` or a blocking task.
pub fn follow(k: &KafkaConfig, group: &str, seed: Arc<PriceBook>) -> Result<CatalogueFollower, FollowError> {
    let topic = k.topics.catalogue.clone();
    let seed_version = seed.version().to_owned();
    let shared = Arc::new(Shared {
        topic: topic.clone(),
        state: Mutex::new(State {
            book: Arc::clone(&seed),
            entries: Vec::new(),
            accepted_at: HashMap::new(),
            next_offset: 0,
        }),
        changed: Condvar::new(),
        live: LiveBook::new(seed),
        on_change: Mutex::new(Vec::new()),
    });
    let weak = Arc::downgrade(&shared);
    let poll = Duration::from_millis(POLL_MS);
    crate::kafka::follow_partition(k, &topic, &format!("{group}-catalogue"), poll, STARTUP_READ_TIMEOUT, move |m| {
        // Every handle was dropped: nobody reads what we learn any more.
        let Some(shared) = weak.upgrade() else { return ControlFlow::Break(()) };
        if let Some((offset, _, payload)) = m {
            shared.apply(offset, payload);
        }
        ControlFlow::Continue(())
    })?;
    let follower = CatalogueFollower(shared);
    let (seq, version) = follower.seq_and_version();
    if seq > 0 && version != seed_version {
        tracing::info!(
            in_force = version,
            file = seed_version,
            "the catalogue in force is the topic's newest version (changed through the operator API); the price-book file only seeded it"
        );
    }
    tracing::info!(seq, version, topic, "catalogue read");
    Ok(follower)
}

/// Publishes `entry` and the `book` it made; returns the offset it was written at (then
/// [`CatalogueFollower::wait_for_offset`] says whether it went in force).
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    entry: &AuditEntry,
    book: &PriceBook,
    timeout: Duration,
) -> Result<i64, PublishError> {
    let book = serde_json::to_string(book.doc()).map_err(|e| PublishError::Encode(e.to_string()))?;
    let payload = serde_json::to_vec(&TopicEntry { entry: entry.clone(), book })
        .map_err(|e| PublishError::Encode(e.to_string()))?;
    let key = entry_key(entry, &payload);
    let record = FutureRecord::to(topic).partition(0).key(key.as_bytes()).payload(&payload);
    let delivery = producer.send(record, timeout).await.map_err(|(e, _)| PublishError::Kafka(e))?;
    Ok(delivery.offset)
}

/// The key of an entry: what it holds, and the SHA-256 of its payload. One key per entry, so
/// compaction never removes history: two servers' changes to the same version make the same
/// `version<-previous`, and if compaction kept only the later (refused) one, a stage reading the
/// topic afterwards would put in force a book that never was.
fn entry_key(entry: &AuditEntry, payload: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(payload);
    format!("{}<-{}#{}", entry.version, entry.previous, hex::encode(&digest[..8]))
}

/// The header stamping `seq` on a record (none for the seed: seq 0 needs no wait).
pub fn stamp(seq: i64) -> Option<OwnedHeaders> {
    (seq > 0).then(|| OwnedHeaders::new().insert(Header { key: SEQ_HEADER, value: Some(seq.to_string().as_bytes()) }))
}

/// The catalogue seq a consumed record was stamped with (0 when none).
pub fn required_seq<M: Message>(msg: &M) -> i64 {
    let Some(headers) = msg.headers() else { return 0 };
    headers
        .iter()
        .find(|h| h.key == SEQ_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn entry(version: &str, previous: &str) -> AuditEntry {
        AuditEntry {
            seq: 0,
            version: version.into(),
            previous: previous.into(),
            at: Timestamp::from_millis(0),
            actor: "ops".into(),
            role: "operator".into(),
            changes: Vec::new(),
        }
    }

    #[test]
    fn two_servers_changes_to_one_version_have_two_keys_so_compaction_keeps_both() {
        let a = entry("v+1", "v");
        let b = AuditEntry { actor: "other".into(), ..entry("v+1", "v") };
        let key = |e: &AuditEntry| entry_key(e, &serde_json::to_vec(e).unwrap());
        assert_ne!(key(&a), key(&b));
        assert!(key(&a).starts_with("v+1<-v#"), "{}", key(&a));
    }

    #[test]
    fn of_two_changes_to_one_version_the_first_in_the_topic_wins() {
        // The topic's first entry is taken whatever the seed (a process's file may differ).
        assert!(accepts("file-v1", true, &entry("v+1", "v")));
        // Made from the version in force: taken.
        assert!(accepts("v+1", false, &entry("v+2", "v+1")));
        // A second server's change to `v+1`, read after the first's: refused everywhere alike.
        assert!(!accepts("v+2", false, &entry("v+2", "v+1")));
    }
}
