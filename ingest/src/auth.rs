//! Who may meter: API keys, stored only as SHA-256, compared in constant time, rotatable without
//! a restart.
//!
//! Keys come from the price book (`api_key_sha256` of each seller) and, optionally, a keys file
//! that the operator edits to rotate keys:
//!
//! ```toml
//! [[keys]]
//! seller = "acme"
//! sha256 = "…64 hex digits…"
//! # Optional end of the key's life: the overlap in which an old and a new key both work.
//! not_after = "2026-12-01T00:00:00Z"
//! ```
//!
//! Rotation: add the new key's hash (the old one stays valid), let clients switch, then remove the
//! old hash or give it a `not_after`. [`watch`] reloads both files on SIGHUP and whenever one of
//! them changes on disk; a file that fails to load keeps the keys in force (and says why in the
//! log), so a typo never locks every seller out. Only keys are reloaded: products, prices and
//! ownership stay as loaded at start.

use common::catalogue::{PriceBook, Seller};
use common::time::Timestamp;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// One accepted key.
#[derive(Clone)]
struct KeyEntry {
    hash: [u8; 32],
    seller: String,
    not_after: Option<Timestamp>,
}

/// Why a keys file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("keys file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not parse or breaks a rule.
    #[error("keys file: {0}")]
    Invalid(String),
    /// The price book could not be reloaded.
    #[error("price book: {0}")]
    Book(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysDoc {
    #[serde(default)]
    keys: Vec<KeyDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyDoc {
    seller: String,
    sha256: String,
    #[serde(default)]
    not_after: Option<String>,
}

/// The keys in force. Lookups hash the presented key and compare it with every stored hash in
/// constant time, so neither the comparison nor the scan says how close a guess came.
#[derive(Clone, Default)]
pub struct KeyRing {
    entries: Vec<KeyEntry>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets, but there is no reason to print them either.
        f.debug_struct("KeyRing").field("keys", &self.entries.len()).finish()
    }
}

impl KeyRing {
    /// The price book's keys.
    pub fn from_book(book: &PriceBook) -> Self {
        let mut ring = KeyRing::default();
        for s in &book.doc().sellers {
            for h in &s.api_key_sha256 {
                // The book validated every hash already; a bad one cannot occur here.
                if let Some(hash) = parse_hash(h) {
                    ring.entries.push(KeyEntry { hash, seller: s.id.clone(), not_after: None });
                }
            }
        }
        ring
    }

    /// Adds the keys of a keys file (TOML, see the module docs).
    pub fn with_keys_toml(mut self, text: &str) -> Result<Self, KeyError> {
        let doc: KeysDoc = toml::from_str(text).map_err(|e| KeyError::Invalid(e.to_string()))?;
        for (i, k) in doc.keys.into_iter().enumerate() {
            let n = i + 1;
            if k.seller.is_empty() {
                return Err(KeyError::Invalid(format!("key {n}: seller is empty")));
            }
            let hash = parse_hash(&k.sha256).ok_or_else(|| {
                KeyError::Invalid(format!("key {n} (seller `{}`): sha256 is not 64 hex digits", k.seller))
            })?;
            let not_after = match k.not_after {
                None => None,
                Some(t) => Some(
                    Timestamp::parse_rfc3339(&t)
                        .map_err(|e| KeyError::Invalid(format!("key {n} (seller `{}`): not_after: {e}", k.seller)))?,
                ),
            };
            if let Some(other) = self.entries.iter().find(|e| e.hash == hash) {
                if other.seller != k.seller {
                    return Err(KeyError::Invalid(format!(
                        "key {n}: the same key is listed for sellers `{}` and `{}`",
                        other.seller, k.seller
                    )));
                }
            }
            self.entries.push(KeyEntry { hash, seller: k.seller, not_after });
        }
        Ok(self)
    }

    /// Keys in force (including expired ones not yet removed).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The seller id a presented key belongs to, if the key is known and not past its `not_after`.
    pub fn seller_for(&self, key: &str, now: Timestamp) -> Option<&str> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Scan all entries without an early exit; `found` is selected in constant time.
        let mut found = u32::MAX;
        for (i, e) in self.entries.iter().enumerate() {
            found.conditional_assign(&(i as u32), e.hash.ct_eq(&presented));
        }
        let e = self.entries.get(found as usize)?;
        match e.not_after {
            Some(t) if now > t => None,
            _ => Some(&e.seller),
        }
    }
}

fn parse_hash(h: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.trim(), &mut out).ok()?;
    Some(out)
}

/// Where keys are loaded from, for reloads.
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    /// The price book file (its sellers' `api_key_sha256`).
    pub price_book: Option<PathBuf>,
    /// An optional keys file.
    pub keys_file: Option<PathBuf>,
}

impl KeySources {
    /// Loads the keys from the files, or the book already in memory when there is no book path.
    pub fn load(&self, loaded_book: &PriceBook) -> Result<KeyRing, KeyError> {
        let ring = match &self.price_book {
            Some(p) => KeyRing::from_book(&PriceBook::load(p).map_err(|e| KeyError::Book(e.to_string()))?),
            None => KeyRing::from_book(loaded_book),
        };
        match &self.keys_file {
            None => Ok(ring),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| KeyError::Read { path: p.clone(), source })?;
                ring.with_keys_toml(&text)
            }
        }
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [&self.price_book, &self.keys_file]
            .into_iter()
            .map(|p| p.as_deref().and_then(|p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok()))
            .collect()
    }
}

/// The keys in force, shared by the request handlers and swapped whole on reload.
#[derive(Debug, Clone)]
pub struct SharedKeys(Arc<RwLock<Arc<KeyRing>>>);

impl SharedKeys {
    /// Starts with `ring`.
    pub fn new(ring: KeyRing) -> Self {
        SharedKeys(Arc::new(RwLock::new(Arc::new(ring))))
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<KeyRing> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `ring` in force.
    pub fn replace(&self, ring: KeyRing) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
    }

    /// The seller of a key in the book, if the key is in force and its seller is in the book.
    pub fn seller<'b>(&self, key: &str, book: &'b PriceBook, now: Timestamp) -> Option<&'b Seller> {
        let ring = self.current();
        let id = ring.seller_for(key, now)?;
        book.doc().sellers.iter().find(|s| s.id == id)
    }
}

/// Reloads `keys` from `sources` on SIGHUP and whenever a source file's modification time
/// changes (checked every `poll`), until the returned task is aborted. A failed reload keeps the
/// keys in force.
pub fn watch(
    keys: SharedKeys,
    sources: KeySources,
    book: common::catalogue::LiveBook,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = sources.stamps();
        loop {
            #[cfg(unix)]
            let signalled = match hup.as_mut() {
                Some(h) => tokio::select! {
                    _ = h.recv() => true,
                    _ = tokio::time::sleep(poll) => false,
                },
                None => {
                    tokio::time::sleep(poll).await;
                    false
                }
            };
            #[cfg(not(unix))]
            let signalled = {
                tokio::time::sleep(poll).await;
                false
            };
            let now = sources.stamps();
            if !signalled && now == seen {
                continue;
            }
            seen = now;
            let (src, bk) = (sources.clone(), book.current());
            match tokio::task::spawn_blocking(move || src.load(&bk)).await {
                Ok(Ok(ring)) => {
                    tracing::info!(keys = ring.len(), "API keys reloaded");
                    keys.replace(ring);
                }
                Ok(Err(e)) => {
                    tracing::error!("API keys not reloaded, the previous keys stay in force: {e}")
                }
                Err(e) => tracing::error!("API key reload task failed: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    fn hash(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn at(t: &str) -> Timestamp {
        Timestamp::parse_rfc3339(t).unwrap()
    }

    #[test]
    fn book_keys_resolve_and_wrong_keys_do_not() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let ring = KeyRing::from_book(&book);
        let now = at("2026-11-02T12:00:00Z");
        assert_eq!(ring.seller_for("demo-key-acme", now), Some("acme"));
        assert_eq!(ring.seller_for("demo-key-acmE", now), None);
        assert_eq!(ring.seller_for("", now), None);
    }

    #[test]
    fn keys_file_adds_keys_with_an_overlap_end() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let file = format!(
            "[[keys]]\nseller = \"acme\"\nsha256 = \"{}\"\n\n[[keys]]\nseller = \"acme\"\nsha256 = \"{}\"\nnot_after = \"2026-11-03T00:00:00Z\"\n",
            hash("new-acme"),
            hash("old-acme")
        );
        let ring = KeyRing::from_book(&book).with_keys_toml(&file).unwrap();
        let during = at("2026-11-02T12:00:00Z");
        let after = at("2026-11-03T00:00:01Z");
        assert_eq!(ring.seller_for("new-acme", during), Some("acme"));
        assert_eq!(ring.seller_for("old-acme", during), Some("acme"), "both keys work during the overlap");
        assert_eq!(ring.seller_for("old-acme", after), None, "the old key ends at not_after");
        assert_eq!(ring.seller_for("new-acme", after), Some("acme"));
    }

    #[test]
    fn keys_file_errors_name_the_entry() {
        let bad = "[[keys]]\nseller = \"acme\"\nsha256 = \"abc\"\n";
        let e = KeyRing::default().with_keys_toml(bad).unwrap_err().to_string();
        assert!(e.contains("key 1") && e.contains("64 hex"), "{e}");
        let shared = format!(
            "[[keys]]\nseller = \"a\"\nsha256 = \"{h}\"\n[[keys]]\nseller = \"b\"\nsha256 = \"{h}\"\n",
            h = hash("k")
        );
        let e = KeyRing::default().with_keys_toml(&shared).unwrap_err().to_string();
        assert!(e.contains("sellers `a` and `b`"), "{e}");
    }
}
