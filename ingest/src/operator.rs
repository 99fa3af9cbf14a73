//! SHELL. The operator API: the catalogue changed while the server runs (`meterline serve` in
//! the embedded default, `ingest` in distributed mode).
//!
//! - `GET  /v1/catalogue`: the version in force and the whole book (a seller sees its own part);
//! - `GET  /v1/catalogue/export`: the book as price-book TOML (what `check-price-book` reads);
//! - `POST /v1/catalogue/changes`: `{"if_version": "…", "changes": [{"op": …}, …]}`, applied all
//!   or none by [`common::catalogue::change::apply`], recorded durably by the shell's
//!   [`CatalogueRecorder`] (the embedded store's catalogue log, or the distributed catalogue
//!   topic every stage follows), then in force for the next call and the next batch;
//! - `GET  /v1/catalogue/audit?after=N&limit=M`: who changed what, when.
//!
//! Credentials are the operators file's (`serve --operators`, `[ingest] operators`), not the sellers' metering keys:
//! `operator` changes anything, `seller` only its own products (and its own keys), `analyst`
//! reads. Changes are serialised here; `if_version` refuses a change made against a version
//! that is no longer in force (409).

use crate::auth::{KeySources, SharedKeys};
use crate::clock::Clock;
use crate::throttle::AuthThrottle;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use common::catalogue::change::{apply, AuditEntry, Change, ChangeError};
use common::catalogue::{LiveBook, PriceBook, PriceBookDoc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Any change.
    Operator,
    /// Changes of its own products, offers, agreements and keys; customers.
    Seller,
    /// Reads only.
    Analyst,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Seller => "seller",
            Role::Analyst => "analyst",
        }
    }
}

/// One operator credential, as the operators file lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Who (the audit log's actor).
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// For `seller`: which seller.
    #[serde(default)]
    pub seller: Option<String>,
    /// SHA-256 (hex) of the credential's key; the key itself is never stored.
    pub api_key_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorsFile {
    #[serde(default)]
    operators: Vec<Credential>,
}

/// Reads the operators file (`[[operators]]` with name, role, optional seller, api_key_sha256).
/// The error names the file, the entry and what to fix.
pub fn load_operators(path: &Path, book: &PriceBook) -> Result<Vec<Credential>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let file: OperatorsFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for (i, c) in file.operators.iter().enumerate() {
        let bad = |why: String| format!("{}: operator {} (`{}`): {why}", path.display(), i + 1, c.name);
        if hex::decode(c.api_key_sha256.trim()).map_or(true, |h| h.len() != 32) {
            return Err(bad("api_key_sha256 is not 64 hex digits".into()));
        }
        match (c.role, &c.seller) {
            (Role::Seller, None) => return Err(bad("role `seller` needs `seller = \"<seller id>\"`".into())),
            (Role::Seller, Some(s)) if !book.doc().sellers.iter().any(|x| &x.id == s) => {
                return Err(bad(format!("seller `{s}` is not in the price book")))
            }
            (Role::Operator | Role::Analyst, Some(_)) => return Err(bad("only role `seller` names a seller".into())),
            _ => {}
        }
    }
    Ok(file.operators)
}

/// Why a change could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Another change to the same version was recorded first (another server): nothing of this
    /// one is in force; read the catalogue again and retry.
    #[error("{0}")]
    Conflict(String),
    /// The log did not take it (store or broker unavailable): nothing of it is in force.
    #[error("{0}")]
    Unavailable(String),
    /// Sent to the log but not confirmed: whether it goes in force is not known yet (the
    /// message says where to look).
    #[error("{0}")]
    Unconfirmed(String),
}

/// Where the shell keeps the catalogue's history, durably: every applied change and the book it
/// made. The embedded store's catalogue log, or the distributed catalogue topic.
pub trait CatalogueRecorder: Send + Sync + 'static {
    /// Records `entry` (its `seq` is assigned here and returned) and the `book` it made; once it
    /// returns `Ok`, `book` is in force in this process and in every later start.
    fn record(&self, entry: AuditEntry, book: Arc<PriceBook>) -> impl Future<Output = Result<i64, RecordError>> + Send;
    /// Up to `limit` entries after `after`, oldest first.
    fn entries(&self, after: i64, limit: usize) -> impl Future<Output = Result<Vec<AuditEntry>, String>> + Send;
}

/// Everything the operator handlers need.
#[derive(Debug)]
pub struct OperatorState<R> {
    /// The book in force, replaced by each applied change.
    pub book: LiveBook,
    /// The metering keys, rebuilt from the new book after a change (keys added or revoked).
    pub keys: SharedKeys,
    /// Where the metering keys come from besides the book.
    pub key_sources: KeySources,
    /// Where every change is recorded (and from where it goes in force).
    pub recorder: R,
    /// Operator credentials.
    pub credentials: Vec<Credential>,
    /// "Now" of a change.
    pub clock: Arc<dyn Clock>,
    /// Failed-authentication throttle (shared with the other routes).
    pub throttle: Option<Arc<AuthThrottle>>,
    /// One change at a time: apply, record, put in force.
    pub serial: tokio::sync::Mutex<()>,
}

/// The routes.
pub fn router<R: CatalogueRecorder>(state: Arc<OperatorState<R>>) -> Router {
    Router::new()
        .route("/v1/catalogue", get(catalogue))
        .route("/v1/catalogue/export", get(export))
        .route("/v1/catalogue/changes", post(changes))
        .route("/v1/catalogue/audit", get(audit))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authorize::<R>))
        .with_state(state)
}

/// An error answer, in the API's `__type` / `message` shape.
#[derive(Debug)]
pub struct OpError(StatusCode, &'static str, String);

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "__type": self.1, "message": self.2 }))).into_response()
    }
}

fn forbidden(why: String) -> OpError {
    OpError(StatusCode::FORBIDDEN, "AccessDeniedException", why)
}

fn internal(what: &str, e: impl std::fmt::Display) -> OpError {
    OpError(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailableException",
        format!("{what}: {e}; nothing was changed, retry when it is available again"),
    )
}

/// The authenticated operator.
#[derive(Debug, Clone)]
struct Actor {
    name: String,
    role: Role,
    seller: Option<String>,
}

async fn authorize<R: CatalogueRecorder>(
    State(st): State<Arc<OperatorState<R>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let key = crate::http::presented_key(req.headers()).map(str::to_owned);
    let throttle = st.throttle.as_deref();
    if let Some(t) = throttle {
        if let Err(wait) = t.before(addr, key.as_deref()) {
            let secs = crate::limit::retry_after_secs(wait);
            let mut r = OpError(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                format!("too many failed authentications from this address; retry after {secs} s"),
            )
            .into_response();
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
            return r;
        }
    }
    let Some(key) = key else {
        return OpError(
            StatusCode::UNAUTHORIZED,
            "MissingAuthenticationTokenException",
            "an operator key is required: `Authorization: Bearer <key>` (the operators file of `serve --operators`)"
                .into(),
        )
        .into_response();
    };
    let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    // Every credential is compared, so the time taken does not say which one nearly matched.
    let mut found = None;
    for c in &st.credentials {
        let mut want = [0u8; 32];
        if hex::decode_to_slice(c.api_key_sha256.trim(), &mut want).is_ok() && bool::from(want.ct_eq(&presented)) {
            found = Some(c);
        }
    }
    let Some(c) = found else {
        if let Some(t) = throttle {
            t.failed(addr, Some(&key));
        }
        let why = if st.credentials.is_empty() {
            "the operator API is off: give the server an operators file (`meterline serve --operators`, `[ingest] operators`)"
        } else {
            "the operator key is not valid"
        };
        return OpError(StatusCode::UNAUTHORIZED, "UnrecognizedClientException", why.into()).into_response();
    };
    if let Some(t) = throttle {
        t.succeeded(addr, &key);
    }
    req.extensions_mut().insert(Actor { name: c.name.clone(), role: c.role, seller: c.seller.clone() });
    next.run(req).await
}

#[derive(Serialize)]
struct CatalogueAnswer {
    version: String,
    catalogue: PriceBookDoc,
}

/// The book, or for a seller its own part: its seller entry, products, their offers,
/// agreements and resale authorisations, and the customers those agreements name.
fn visible(book: &PriceBook, actor: &Actor) -> PriceBookDoc {
    let mut doc = book.doc().clone();
    let Some(seller) = actor.seller.as_deref().filter(|_| actor.role == Role::Seller) else { return doc };
    let own: BTreeSet<String> = doc.products.iter().filter(|p| p.seller == seller).map(|p| p.code.clone()).collect();
    doc.sellers.retain(|s| s.id == seller);
    doc.products.retain(|p| own.contains(&p.code));
    doc.offers.retain(|o| own.contains(&o.product));
    doc.agreements.retain(|a| own.contains(&a.product));
    doc.resale.retain(|r| own.contains(&r.product));
    doc.deployments.retain(|d| own.contains(&d.product));
    let customers: BTreeSet<&str> = doc.agreements.iter().map(|a| a.customer.as_str()).collect();
    doc.customers.retain(|c| customers.contains(c.id.as_str()));
    doc.refunds.clear();
    doc
}

async fn catalogue<R: CatalogueRecorder>(
    State(st): State<Arc<OperatorState<R>>>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let book = st.book.current();
    Json(CatalogueAnswer { version: book.version().to_owned(), catalogue: visible(&book, &actor) }).into_response()
}

async fn export<R: CatalogueRecorder>(
    State(st): State<Arc<OperatorState<R>>>,
    Extension(actor): Extension<Actor>,
) -> Result<Response, OpError> {
    if actor.role == Role::Seller {
        return Err(forbidden(
            "the whole catalogue's export is for operators and analysts; use GET /v1/catalogue".into(),
        ));
    }
    let text = st.book.current().to_toml().map_err(|e| internal("rendering the catalogue", e))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/toml")], text).into_response())
}

/// The body of `POST /v1/catalogue/changes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeRequest {
    /// The version the caller read; a change against an older one is refused (409).
    #[serde(default)]
    if_version: Option<String>,
    changes: Vec<Change>,
}

#[derive(Serialize)]
struct ChangeAnswer {
    version: String,
    previous: String,
    applied: usize,
    audit_seq: i64,
}

/// Whether `actor` may make `change` to `book`.
fn permitted(actor: &Actor, change: &Change, book: &PriceBook) -> Result<(), String> {
    match actor.role {
        Role::Operator => Ok(()),
        Role::Analyst => Err("role `analyst` reads only".into()),
        Role::Seller => {
            let me = actor.seller.as_deref().unwrap_or_default();
            let own_seller = match change {
                Change::PutSeller { seller } => Some(seller.id.as_str()),
                Change::AddApiKey { seller, .. } | Change::RevokeApiKey { seller, .. } => Some(seller.as_str()),
                _ => None,
            };
            if let Some(s) = own_seller {
                return if s == me { Ok(()) } else { Err(format!("seller `{me}` cannot change seller `{s}`")) };
            }
            for product in change.products(book).unwrap_or_default() {
                // A product being added is the caller's if it names the caller as its seller.
                let owner = match change {
                    Change::PutProduct { product: p } if book.product(product).is_none() => Some(p.seller.as_str()),
                    _ => book.product(product).map(|p| p.seller.as_str()),
                };
                if owner != Some(me) {
                    return Err(format!("product `{product}` is not seller `{me}`'s"));
                }
            }
            Ok(())
        }
    }
}

async fn changes<R: CatalogueRecorder>(
    State(st): State<Arc<OperatorState<R>>>,
    Extension(actor): Extension<Actor>,
    body: axum::body::Bytes,
) -> Result<Response, OpError> {
    let req: ChangeRequest = serde_json::from_slice(&body).map_err(|e| {
        OpError(StatusCode::BAD_REQUEST, "SerializationException", format!("the body is not a change request: {e}"))
    })?;
    if req.changes.is_empty() {
        return Err(OpError(StatusCode::BAD_REQUEST, "ValidationException", "`changes` is empty".into()));
    }
    let _serial = st.serial.lock().await;
    let current = st.book.current();
    for (i, c) in req.changes.iter().enumerate() {
        permitted(&actor, c, &current).map_err(|why| forbidden(format!("change {i} ({}): {why}", c.op())))?;
    }
    let now = st.clock.now();
    let next = apply(&current, &req.changes, now, req.if_version.as_deref()).map_err(|e| match e {
        ChangeError::VersionConflict { .. } => OpError(StatusCode::CONFLICT, "ConflictException", e.to_string()),
        _ => OpError(StatusCode::BAD_REQUEST, "InvalidChangeException", format!("{e}; nothing was changed")),
    })?;
    let next = Arc::new(next);
    let entry = AuditEntry {
        seq: 0,
        version: next.version().to_owned(),
        previous: current.version().to_owned(),
        at: now,
        actor: actor.name.clone(),
        role: actor.role.as_str().to_owned(),
        changes: req.changes,
    };
    let applied = entry.changes.len();
    // Durable first: a change in force is one the next start finds.
    let seq = st.recorder.record(entry, Arc::clone(&next)).await.map_err(|e| match e {
        RecordError::Conflict(why) => OpError(StatusCode::CONFLICT, "ConflictException", why),
        RecordError::Unavailable(why) => internal("recording the change", why),
        RecordError::Unconfirmed(why) => OpError(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableException", why),
    })?;
    // From the book in force now, which a later change from another server may already be.
    let in_force = st.book.current();
    match st.key_sources.load(&in_force) {
        Ok(ring) => st.keys.replace(ring),
        Err(e) => tracing::error!("metering keys not rebuilt after catalogue change, the previous keys stay: {e}"),
    }
    tracing::info!(
        version = next.version(),
        previous = current.version(),
        actor = actor.name,
        applied,
        "catalogue changed"
    );
    let answer = ChangeAnswer {
        version: next.version().to_owned(),
        previous: current.version().to_owned(),
        applied,
        audit_seq: seq,
    };
    Ok(Json(answer).into_response())
}

async fn audit<R: CatalogueRecorder>(
    State(st): State<Arc<OperatorState<R>>>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, OpError> {
    if actor.role == Role::Seller {
        return Err(forbidden("the audit log is for operators and analysts".into()));
    }
    let number = |name: &str, default: i64, max: i64| -> Result<i64, OpError> {
        match q.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<i64>().ok().filter(|n| (0..=max).contains(n)).ok_or_else(|| {
                OpError(
                    StatusCode::BAD_REQUEST,
                    "ValidationException",
                    format!("`{name}` must be a number from 0 to {max}"),
                )
            }),
        }
    };
    let after = number("after", 0, i64::MAX)?;
    let limit = number("limit", 100, 1000)? as usize;
    let entries = st.recorder.entries(after, limit).await.map_err(|e| internal("reading the audit log", e))?;
    Ok(Json(serde_json::json!({ "entries": entries })).into_response())
}
