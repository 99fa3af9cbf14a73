//! SHELL. The request guards in front of the handlers: who is calling (keys), how much they may
//! send (per-seller limits), and how long their body may take to arrive.
//!
//! Before any byte of a body is read ([`gate`], issue 12): the media type (415), failed
//! authentication throttled per client address (429, [`crate::throttle`]), the key from the
//! headers (401), and the declared `Content-Length` against the route's limit (413). A call that
//! fails them costs its headers only, and its connection is closed after the answer.
//!
//! Hostile JSON is handled by these documented rules (docs/api.md, "Hostile input"):
//! - a body that does not arrive within `body_timeout` gets 408 and the connection is closed;
//! - a body over the route's limit gets 413 as soon as it is (declared or read) over, never
//!   buffered whole; a bulk body over the record or line limit the same ([`crate::ndjson`]);
//! - a body that is not UTF-8 anywhere (even inside an unknown field) gets 400;
//! - nesting deeper than [`MAX_JSON_DEPTH`] (anywhere, even in an unknown field) gets 400;
//! - truncated or invalid JSON, and a
//!   duplicated key in the request envelope get 400 `SerializationException` naming the parser's
//!   reason and position; the same inside one record refuses that record alone (`InvalidRecord`);
//! - numbers are never read as floats: quantities and timestamps are parsed exactly from their
//!   text, and one too large is refused by name.

use crate::auth::{KeyRing, SharedKeys};
use crate::http::{authenticate, check_content_type, presented_key, ApiError, IngestState};
use crate::limit::{retry_after_secs, SellerLimiter, SellerLimits};
use crate::ndjson::{read_limited, BodyError, LineLimits};
use crate::sink::UsageSink;
use crate::throttle::AuthThrottle;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use common::catalogue::PriceBook;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Deepest JSON nesting accepted. A metering call needs 7 (envelope, records, record, allocations,
/// allocation, tags, tag); serde_json skips unknown fields of any depth without its recursion
/// limit, so the bound is enforced here, before parsing.
pub const MAX_JSON_DEPTH: usize = 32;

/// Default time a request body may take to arrive in full.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Authentication, per-seller limits and the body deadline.
#[derive(Debug, Clone)]
pub struct Security {
    /// API keys in force (reloadable).
    pub keys: SharedKeys,
    /// Per-seller rate limits; `None` = unlimited (the global in-flight bound still applies).
    pub limiter: Option<Arc<SellerLimiter>>,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Failed authentication throttled per client address; `None` = off.
    pub auth_throttle: Option<Arc<AuthThrottle>>,
}

impl Security {
    /// The price book's keys, no per-seller limit, the default body deadline.
    pub fn for_book(book: &PriceBook) -> Self {
        Security {
            keys: SharedKeys::new(KeyRing::from_book(book)),
            limiter: None,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            auth_throttle: Some(Arc::new(AuthThrottle::default())),
        }
    }

    /// With another failed-authentication throttle (`None` = off).
    pub fn with_auth_throttle(mut self, t: Option<AuthThrottle>) -> Self {
        self.auth_throttle = t.map(Arc::new);
        self
    }

    /// With per-seller limits.
    pub fn with_seller_limits(mut self, limits: Option<SellerLimits>) -> Self {
        self.limiter = limits.map(|l| Arc::new(SellerLimiter::new(l)));
        self
    }

    /// With another body deadline.
    pub fn with_body_timeout(mut self, t: Duration) -> Self {
        self.body_timeout = t;
        self
    }
}

/// The body limit of the route at `path`: the bulk limit for `/v1/usage`, the marketplace's
/// request limit for every AWS-shaped route.
pub fn route_limit<S>(path: &str, st: &IngestState<S>) -> usize {
    let book = st.book.current();
    let book = book.as_ref();
    if path == BULK_PATH {
        st.limits.max_bulk_bytes
    } else {
        book.marketplace().max_request_bytes
    }
}

/// The native bulk route, whose body is NDJSON.
const BULK_PATH: &str = "/v1/usage";

/// The declared `Content-Length`, if any (an unparsable one is hyper's to refuse).
fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn too_large(message: String) -> ApiError {
    // The client may still be sending: close rather than read the rest to keep the connection.
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLargeException", message).closing()
}

/// Middleware on the API routes, before any byte of the body is read: media type, failed-auth
/// throttle, key, declared length. The handlers check type and key again (cheap), so their code
/// does not depend on this layer.
pub async fn gate<S: UsageSink>(State(st): State<Arc<IngestState<S>>>, req: Request, next: Next) -> Response {
    let book = st.book.current();
    let book = book.as_ref();
    if let Err(e) = check_content_type(req.headers()) {
        return e.closing().into_response();
    }
    let addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let key = presented_key(req.headers());
    if let Some(t) = &st.security.auth_throttle {
        if let Err(wait) = t.before(addr, key) {
            let secs = retry_after_secs(wait);
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                format!("too many failed authentications from this address; retry after {secs} s with a valid key"),
            )
            .with_retry_after(secs)
            .closing()
            .into_response();
        }
    }
    // A customer deployment's key (MeterUsage, RegisterUsage) is as good as a seller's here; the
    // handler decides what each may call.
    let known = authenticate(req.headers(), &st, book).map(|_| ()).or_else(|e| {
        if crate::aws::deployment(req.headers(), book).is_some() {
            Ok(())
        } else {
            Err(e)
        }
    });
    match known {
        Ok(()) => {
            if let (Some(t), Some(k)) = (&st.security.auth_throttle, key) {
                t.succeeded(addr, k);
            }
        }
        Err(e) => {
            if let Some(t) = &st.security.auth_throttle {
                t.failed(addr, key);
            }
            return e.closing().into_response();
        }
    }
    let limit = route_limit(req.uri().path(), &st);
    if let Some(n) = declared_length(req.headers()).filter(|n| *n > limit) {
        return too_large(format!(
            "Content-Length {n} is over this route's limit of {limit} bytes (see docs/api.md); split the call"
        ))
        .into_response();
    }
    next.run(req).await
}

/// The request body, read under the route's size limit (and, for the bulk route, its record and
/// line limits) as it arrives, within the body deadline.
#[derive(Debug)]
pub struct ReadBody(pub Bytes);

impl<S: UsageSink> FromRequest<Arc<IngestState<S>>> for ReadBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<IngestState<S>>) -> Result<Self, ApiError> {
        let book = state.book.current();
        let book = book.as_ref();
        let deadline = state.security.body_timeout;
        // NDJSON: every line is its own document (a raw newline cannot occur inside a JSON string).
        let per_line = req.uri().path() == BULK_PATH;
        let limit = route_limit(req.uri().path(), state);
        let declared = declared_length(req.headers());
        if let Some(n) = declared.filter(|n| *n > limit) {
            return Err(too_large(format!(
                "Content-Length {n} is over this route's limit of {limit} bytes (see docs/api.md); split the call"
            )));
        }
        // One record per line, each no longer than an AWS request may be.
        let lines = per_line.then(|| LineLimits {
            max_records: state.limits.max_bulk_records,
            max_line_bytes: book.marketplace().max_request_bytes.max(64 * 1024),
        });
        match tokio::time::timeout(deadline, read_limited(req.into_body(), limit, declared, lines)).await {
            // Every route takes JSON text. serde_json skips unknown fields without checking their
            // UTF-8, so the whole body is checked here (found by the `api_decoder` fuzz target).
            Ok(Ok(body)) => match std::str::from_utf8(&body) {
                Err(e) => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "SerializationException",
                    format!("the body is not UTF-8: {e}"),
                )),
                Ok(_) => match json_too_deep(&body, MAX_JSON_DEPTH, per_line) {
                    Some(at) => Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "SerializationException",
                        format!("JSON nested deeper than {MAX_JSON_DEPTH} levels at byte {at}"),
                    )),
                    None => Ok(ReadBody(body)),
                },
            },
            Ok(Err(e @ BodyError::TooLarge { .. })) => Err(too_large(e.to_string())),
            Ok(Err(e @ (BodyError::TooManyRecords { .. } | BodyError::LineTooLong { .. }))) => {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "ValidationException", e.to_string()).closing())
            }
            Ok(Err(e @ BodyError::Read(_))) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "SerializationException", e.to_string()).closing())
            }
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeoutException",
                format!("the request body did not arrive within {} s", deadline.as_secs_f64()),
            )
            .closing()),
        }
    }
}

/// The byte offset where `body` first nests deeper than `max` arrays/objects, if it does.
/// A linear scan that knows strings and escapes; with `per_line`, each line starts at depth 0.
pub fn json_too_deep(body: &[u8], max: usize, per_line: bool) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                b'\n' if per_line => (depth, in_string) = (0, false),
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' if per_line => depth = 0,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::json_too_deep;

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(json_too_deep(br#"{"a":[{"b":"[[[[[[[["}]}"#, 3, false), None);
        assert_eq!(json_too_deep(br#"{"a":[{"b":[1]}]}"#, 3, false), Some(11));
        assert_eq!(json_too_deep(br#"{"a":"\"[[[["}"#, 1, false), None, "an escaped quote does not end the string");
        assert_eq!(json_too_deep(b"[[\n[[\n[[", 2, true), None, "NDJSON lines start over");
        assert_eq!(json_too_deep(b"[[\n[[\n[[", 2, false), Some(3));
    }
}
