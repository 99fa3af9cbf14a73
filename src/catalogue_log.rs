//! SHELL. The catalogue's versions in the embedded store: every change an operator made, who
//! made it and when, and the whole book it produced (the audit log and the durable catalogue in
//! one table). The price-book file seeds the catalogue; once the store holds a version, that
//! version is in force, at every start and for every command that reads the book.

pub use common::catalogue::change::AuditEntry;
use common::catalogue::{LiveBook, PriceBook};
use common::time::Timestamp;
use ingest::operator::{CatalogueRecorder, RecordError};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS catalogue_versions (
    seq       INTEGER PRIMARY KEY,
    version   TEXT NOT NULL UNIQUE,    -- the label rated records carry (price_book_version)
    previous  TEXT NOT NULL,           -- the version the changes were applied to
    at_ms     INTEGER NOT NULL,
    actor     TEXT NOT NULL,           -- the operator credential's name
    role      TEXT NOT NULL,
    changes   TEXT NOT NULL,           -- JSON: the changes as sent
    book      TEXT NOT NULL            -- JSON: the whole price book they produced
);";

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// SQLite refused.
    #[error("catalogue log in the store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not read back.
    #[error("catalogue log row {seq}: {why}")]
    Corrupt {
        /// The row.
        seq: i64,
        /// What is wrong.
        why: String,
    },
}

/// The catalogue log of the store at `db`, on its own connection (the writer has another).
#[derive(Debug)]
pub struct CatalogueLog {
    conn: Connection,
}

impl CatalogueLog {
    /// Opens (and creates) the log.
    pub fn open(db: &Path) -> Result<Self, LogError> {
        let conn = Connection::open(db)?;
        // The writer commits every few milliseconds; wait for its lock rather than fail.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(CatalogueLog { conn })
    }

    /// The log of the store at `db` for reading only: writes nothing, so it opens even while
    /// another process holds the store's write lock.
    pub fn open_read_only(db: &Path) -> Result<Self, LogError> {
        let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(CatalogueLog { conn })
    }

    /// The newest version's book, if operators changed the catalogue.
    pub fn latest(&self) -> Result<Option<PriceBook>, LogError> {
        if !self.has_table()? {
            return Ok(None);
        }
        let row: Option<(i64, String)> = self
            .conn
            .query_row("SELECT seq, book FROM catalogue_versions ORDER BY seq DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        row.map(|(seq, json)| PriceBook::from_json(&json).map_err(|e| LogError::Corrupt { seq, why: e.to_string() }))
            .transpose()
    }

    /// Records `entry`'s changes and the book they made, durably, before the book goes in force.
    /// A second writer of the same version (another process) is refused by the version's key.
    pub fn append(&mut self, entry: &AuditEntry, book: &PriceBook) -> Result<i64, LogError> {
        let changes =
            serde_json::to_string(&entry.changes).map_err(|e| LogError::Corrupt { seq: 0, why: e.to_string() })?;
        let doc = serde_json::to_string(book.doc()).map_err(|e| LogError::Corrupt { seq: 0, why: e.to_string() })?;
        self.conn.execute(
            "INSERT INTO catalogue_versions (version, previous, at_ms, actor, role, changes, book)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![entry.version, entry.previous, entry.at.millis(), entry.actor, entry.role, changes, doc],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Up to `limit` entries after `after_seq`, oldest first.
    pub fn entries(&self, after_seq: i64, limit: usize) -> Result<Vec<AuditEntry>, LogError> {
        if !self.has_table()? {
            return Ok(Vec::new());
        }
        let mut st = self.conn.prepare(
            "SELECT seq, version, previous, at_ms, actor, role, changes FROM catalogue_versions
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![after_seq, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, version, previous, at_ms, actor, role, changes) = row?;
            let changes =
                serde_json::from_str(&changes).map_err(|e| LogError::Corrupt { seq, why: format!("changes: {e}") })?;
            out.push(AuditEntry { seq, version, previous, at: Timestamp::from_millis(at_ms), actor, role, changes });
        }
        Ok(out)
    }
}

impl CatalogueLog {
    /// Whether operators ever changed this store's catalogue (a read-only log does not create it).
    fn has_table(&self) -> Result<bool, LogError> {
        Ok(self.conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'catalogue_versions'",
            [],
            |r| r.get(0),
        )?)
    }
}

/// The book in force for the store at `db`: its newest catalogue version if operators changed
/// the catalogue, else `file` (the seed). Says on stderr when the file is not the one in force.
pub fn in_force(db: &Path, file: Arc<PriceBook>) -> anyhow::Result<Arc<PriceBook>> {
    if !db.exists() {
        return Ok(file);
    }
    let Some(latest) = CatalogueLog::open_read_only(db)?.latest()? else { return Ok(file) };
    if latest.version() != file.version() {
        tracing::info!(
            in_force = latest.version(),
            file = file.version(),
            "the catalogue in force is the store's newest version (changed through the operator API); the price-book file only seeded it"
        );
    }
    Ok(Arc::new(latest))
}

/// The embedded default's [`CatalogueRecorder`]: the store's catalogue log, and the server's
/// [`LiveBook`] it puts each recorded book in force on.
#[derive(Debug)]
pub struct SqliteRecorder {
    /// The store.
    pub db: std::path::PathBuf,
    /// The book in force in this server.
    pub book: LiveBook,
}

impl CatalogueRecorder for SqliteRecorder {
    async fn record(&self, entry: AuditEntry, book: Arc<PriceBook>) -> Result<i64, RecordError> {
        let (db, recorded) = (self.db.clone(), Arc::clone(&book));
        let seq = tokio::task::spawn_blocking(move || CatalogueLog::open(&db)?.append(&entry, &recorded))
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))?
            .map_err(|e| RecordError::Unavailable(e.to_string()))?;
        self.book.replace(book);
        Ok(seq)
    }

    async fn entries(&self, after: i64, limit: usize) -> Result<Vec<AuditEntry>, String> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || CatalogueLog::open_read_only(&db)?.entries(after, limit))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
