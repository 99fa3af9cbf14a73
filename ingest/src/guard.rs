//! SHELL. The request guards in front of the handlers: who is calling (keys), how much they may
//! send (per-seller limits), and how long their body may take to arrive.
//!
//! Hostile JSON is handled by these documented rules (docs/api.md, "Hostile input"):
//! - a body that does not arrive within `body_timeout` gets 408 and the connection is closed;
//! - a body over the route's limit gets 413 before it is buffered whole;
//! - a body that is not UTF-8 anywhere (even inside an unknown field) gets 400;
//! - nesting deeper than [`MAX_JSON_DEPTH`] (anywhere, even in an unknown field) gets 400;
//! - truncated or invalid JSON, and a
//!   duplicated key in the request envelope get 400 `SerializationException` naming the parser's
//!   reason and position; the same inside one record refuses that record alone (`InvalidRecord`);
//! - numbers are never read as floats: quantities and timestamps are parsed exactly from their
//!   text, and one too large is refused by name.

use crate::auth::{KeyRing, SharedKeys};
use crate::http::{ApiError, IngestState};
use crate::limit::{SellerLimiter, SellerLimits};
use crate::sink::UsageSink;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use common::catalogue::PriceBook;
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
}

impl Security {
    /// The price book's keys, no per-seller limit, the default body deadline.
    pub fn for_book(book: &PriceBook) -> Self {
        Security { keys: SharedKeys::new(KeyRing::from_book(book)), limiter: None, body_timeout: DEFAULT_BODY_TIMEOUT }
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

/// The request body, read under the route's size limit and the body deadline.
#[derive(Debug)]
pub struct ReadBody(pub Bytes);

impl<S: UsageSink> FromRequest<Arc<IngestState<S>>> for ReadBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<IngestState<S>>) -> Result<Self, ApiError> {
        let deadline = state.security.body_timeout;
        // NDJSON: every line is its own document (a raw newline cannot occur inside a JSON string).
        let per_line = req.uri().path() == "/v1/usage";
        match tokio::time::timeout(deadline, Bytes::from_request(req, state)).await {
            // Every route takes JSON text. serde_json skips unknown fields without checking their
            // UTF-8, so the whole body is checked here (found by the `api_decoder` fuzz target).
            Ok(Ok(body)) => match std::str::from_utf8(&body) {
                Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "SerializationException", format!("the body is not UTF-8: {e}"))),
                Ok(_) => match json_too_deep(&body, MAX_JSON_DEPTH, per_line) {
                    Some(at) => Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "SerializationException",
                        format!("JSON nested deeper than {MAX_JSON_DEPTH} levels at byte {at}"),
                    )),
                    None => Ok(ReadBody(body)),
                },
            },
            Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLargeException",
                "the request body is over this route's limit (see docs/api.md); split the call",
            )),
            Ok(Err(rejection)) => Err(ApiError::new(rejection.status(), "SerializationException", rejection.body_text())),
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
