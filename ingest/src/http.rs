//! SHELL. The HTTP API sellers call.
//!
//! Routes:
//! - `POST /` with `X-Amz-Target: AWSMPMeteringService.BatchMeterUsage` or `…MeterUsage`: the AWS
//!   JSON protocol, so SDK-based seller code only changes its endpoint URL.
//! - `POST /v1/BatchMeterUsage`, `POST /v1/MeterUsage`: the same by path.
//! - `POST /v1/usage`: native bulk, one JSON record per line (`ProductCode` on each), no
//!   25-record limit, same per-record semantics.
//! - `GET /health`.
//!
//! - `ResolveCustomer` and `RegisterUsage` by `X-Amz-Target` or by path ([`crate::aws`]).
//!
//! Authentication is an API key per seller (`X-Api-Key: …` or `Authorization: Bearer …`), checked
//! against the price book's SHA-256 hashes; a key meters only its seller's products. `MeterUsage`
//! and `RegisterUsage` also take a customer deployment's key ([`crate::aws`]). Keys never reach a
//! log line. The AWS-shaped routes answer as AWS does (whole-call exceptions, the model's
//! statuses) unless the call opts into per-record answers; the native bulk route always answers
//! per record. A call that fails as a whole stored nothing of it.

use crate::aws::{self, Answering};
use crate::clock::Clock;
use crate::guard::{ReadBody, Security};
use crate::limit::{retry_after_secs, Limited};
use crate::sink::{RefusedRecord, SinkError, SinkOutcome, UsageSink};
use crate::validate::{validate, Caller, Context};
use crate::wire::{
    parse_record, BatchMeterUsageRequest, BatchMeterUsageResponse, BulkResponse, BulkResult, ErrorBody,
    MeterUsageFlags, UsageRecordResult,
};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use common::catalogue::{PriceBook, Seller};
use common::id::RecordId;
use common::reject::{RejectCode, Rejection};
use common::usage::UsageRecord;
use serde_json::value::RawValue;
use std::sync::Arc;

/// Limits of the HTTP layer not set by the marketplace profile.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Body limit of the native bulk endpoint in bytes.
    pub max_bulk_bytes: usize,
    /// Most records in one bulk request.
    pub max_bulk_records: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { max_bulk_bytes: 32 * 1024 * 1024, max_bulk_records: 100_000 }
    }
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct IngestState<S> {
    /// The price book (products, keys, windows).
    pub book: common::catalogue::LiveBook,
    /// Where validated records go.
    pub sink: S,
    /// "Now" for the acceptance window.
    pub clock: Arc<dyn Clock>,
    /// HTTP limits.
    pub limits: HttpLimits,
    /// Keys, per-seller limits, body deadline.
    pub security: Security,
    /// Registration tokens for `ResolveCustomer`.
    pub tokens: aws::RegistrationTokens,
}

/// Builds the router.
pub fn router<S: UsageSink>(state: Arc<IngestState<S>>) -> Router {
    // Body limits per route are `guard::route_limit`, enforced by `guard::gate` (declared length,
    // before the key is even checked to be worth reading for) and `ReadBody` (as bytes arrive).
    let gate = axum::middleware::from_fn_with_state(Arc::clone(&state), crate::guard::gate::<S>);
    Router::new()
        .route("/", post(aws_json::<S>))
        .route("/v1/BatchMeterUsage", post(batch_meter_usage::<S>))
        .route("/v1/MeterUsage", post(meter_usage::<S>))
        .route("/v1/ResolveCustomer", post(resolve_customer::<S>))
        .route("/v1/RegisterUsage", post(register_usage::<S>))
        .route("/v1/usage", post(bulk::<S>))
        // Only the routes above pass the gate (media type, throttle, key, declared length).
        .route_layer(gate)
        .route("/health", get(|| async { "ok" }))
        .layer(axum::middleware::map_response(aws::stamp))
        .with_state(state)
}

/// An error answer for the whole call, in AWS's `__type` / `message` shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u32>,
    close: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), retry_after: None, close: false }
    }

    /// Asks the server to close the connection after this answer (the client may still be sending).
    pub(crate) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Adds `Retry-After: secs`.
    pub(crate) fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            serde_json::to_vec(&ErrorBody { kind: self.kind.to_owned(), message: self.message }).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<SinkError> for ApiError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Overloaded { retry_after_secs, .. } => ApiError {
                retry_after: Some(retry_after_secs),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "ThrottlingException", e.to_string())
            },
            SinkError::Unavailable(_) | SinkError::Undecided(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "InternalServiceErrorException", e.to_string())
            },
        }
    }
}

pub(crate) fn json_response<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = (StatusCode::OK, body).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"));
            resp
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServiceErrorException", e.to_string())
            .into_response(),
    }
}

/// The API key the request presents: `X-Api-Key`, else `Authorization: Bearer` (the scheme
/// name is case-insensitive, RFC 9110 §11.1).
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = || {
        let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim_start();
        let (scheme, rest) = v.split_once([' ', '\t'])?;
        scheme.eq_ignore_ascii_case("bearer").then_some(rest)
    };
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).or_else(bearer).map(str::trim).filter(|k| !k.is_empty())
}

/// The seller behind the request's API key.
pub(crate) fn authenticate<'b, S>(
    headers: &HeaderMap,
    st: &IngestState<S>,
    book: &'b PriceBook,
) -> Result<&'b Seller, ApiError> {
    let Some(key) = presented_key(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "MissingAuthenticationTokenException",
            "an API key is required: send `X-Api-Key: <key>` or `Authorization: Bearer <key>`",
        ));
    };
    st.security.keys.seller(key, book, st.clock.now()).ok_or_else(|| {
        ApiError::new(StatusCode::UNAUTHORIZED, "UnrecognizedClientException", "the API key is not valid")
    })
}

/// Takes `records` from the seller's budget (429 with `Retry-After` when it is spent).
fn admit_seller<S>(st: &IngestState<S>, seller: &Seller, records: usize) -> Result<(), ApiError> {
    let Some(limiter) = &st.security.limiter else { return Ok(()) };
    match limiter.check(&seller.id, records) {
        Ok(()) => Ok(()),
        Err(Limited::RetryAfter(wait)) => {
            let secs = retry_after_secs(wait);
            Err(ApiError {
                retry_after: Some(secs),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "ThrottlingException",
                    format!(
                        "seller `{}` is over its rate of {} records/s; retry after {secs} s",
                        seller.id,
                        limiter.limits().records_per_sec
                    ),
                )
            })
        }
        Err(Limited::TooLarge { burst }) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ValidationException",
            format!("{records} records in one call exceed seller `{}`'s burst of {burst}; split the call", seller.id),
        )),
    }
}

/// The media types a JSON body may declare, matched exactly (parameters such as `charset` aside):
/// a prefix match accepted `application/jsonp`.
const JSON_MEDIA_TYPES: [&str; 5] = [
    "application/json",
    "application/x-amz-json-1.0",
    "application/x-amz-json-1.1",
    "application/x-ndjson",
    "text/plain",
];

pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    let ok = JSON_MEDIA_TYPES.contains(&essence);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "SerializationException",
            format!("content type `{ct}` is not accepted; send application/json"),
        ))
    }
}

/// On the AWS-shaped routes an unknown or foreign product is AWS's `InvalidProductCodeException`
/// (the same answer for both, so a key cannot probe the catalogue).
fn owns_aws(book: &PriceBook, seller: &Seller, product: &str) -> Result<(), ApiError> {
    owns(book, seller, product).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "InvalidProductCodeException",
        ..e
    })
}

fn owns(book: &PriceBook, seller: &Seller, product: &str) -> Result<(), ApiError> {
    match book.product(product) {
        Some(p) if p.seller == seller.id => Ok(()),
        // Unknown and foreign products get the same answer so a key cannot probe the catalogue.
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            format!("product `{}` is not one of this API key's products", crate::validate::truncate(product, 64)),
        )),
    }
}

/// A sink outcome as (id, refusal code or `None` for success, reason).
fn status_of(outcome: &SinkOutcome) -> (Option<RecordId>, Option<RejectCode>, Option<String>) {
    match outcome {
        SinkOutcome::Accepted { record_id } | SinkOutcome::AlreadyAccepted { record_id } => {
            (Some(*record_id), None, None)
        }
        SinkOutcome::Refused { record_id, rejection } => {
            (Some(*record_id), Some(rejection.code), Some(rejection.message.clone()))
        }
    }
}

/// One record's fate while a call is processed.
enum Slot {
    /// Index into the accepted list handed to the sink.
    Accepted(usize),
    /// Refused before the sink.
    Refused(Option<RecordId>, Rejection),
}

/// Validates raw records of one call; returns per-record slots plus what to hand the sink.
fn validate_all<'a>(
    raws: impl Iterator<Item = &'a str>,
    batch_product: Option<&str>,
    seller: &Seller,
    book: &PriceBook,
    clock: &dyn Clock,
) -> (Vec<Slot>, Vec<UsageRecord>, Vec<RefusedRecord>) {
    let now = clock.now();
    let cx = Context { book, caller: Caller::Seller(seller), now: Some(now), received_at: now };
    let mut slots = Vec::new();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for raw in raws {
        let outcome = parse_record(raw)
            .map_err(|e| Rejection::new(RejectCode::InvalidRecord, format!("record does not parse: {e}")))
            .and_then(|w| validate(&w, batch_product, &cx));
        match outcome {
            Ok(record) => {
                slots.push(Slot::Accepted(accepted.len()));
                accepted.push(record);
            }
            Err(rejection) => {
                refused.push(RefusedRecord {
                    received_at: now,
                    seller: seller.id.clone(),
                    product: batch_product.unwrap_or_default().to_owned(),
                    raw: RefusedRecord::clip(raw),
                    record_id: None,
                    rejection: rejection.clone(),
                });
                slots.push(Slot::Refused(None, rejection));
            }
        }
    }
    (slots, accepted, refused)
}

async fn aws_json<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("");
    match target.rsplit('.').next() {
        Some("BatchMeterUsage") => batch_meter_usage(State(st), headers, ReadBody(body)).await,
        Some("MeterUsage") => meter_usage(State(st), headers, ReadBody(body)).await,
        Some("ResolveCustomer") => resolve_customer(State(st), headers, ReadBody(body)).await,
        Some("RegisterUsage") => register_usage(State(st), headers, ReadBody(body)).await,
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            format!(
                "X-Amz-Target `{}` is not an operation here; use AWSMPMeteringService.BatchMeterUsage, .MeterUsage, .ResolveCustomer or .RegisterUsage",
                crate::validate::truncate(target, 96)
            ),
        )
        .into_response(),
    }
}

async fn batch_meter_usage<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    match batch_inner(&st, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn batch_inner<S: UsageSink>(
    st: &IngestState<S>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let book = st.book.current();
    let book = book.as_ref();
    check_content_type(headers)?;
    let seller = authenticate(headers, st, book)?;
    let mode = aws::answering(headers);
    let req: BatchMeterUsageRequest<'_> = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("request body is not valid JSON for BatchMeterUsage: {e}"),
        )
    })?;
    crate::wire::check_field_case(std::str::from_utf8(body).unwrap_or("{}"), &["ProductCode", "UsageRecords"])
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "ValidationException", e))?;
    let Some(records) = req.usage_records.as_deref() else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "ValidationException", "UsageRecords is required"));
    };
    // Without ProductCode (the current model's licence-based calls) each record's LicenseArn
    // names its product; a record without one is refused by name.
    let product = req.product_code.as_deref().filter(|p| !p.is_empty());
    match (product, mode) {
        (None, _) => {}
        (Some(p), Answering::Aws) => owns_aws(book, seller, p)?,
        (Some(p), Answering::PerRecord) => owns(book, seller, p)?,
    }
    let max = book.marketplace().max_batch_records;
    if records.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            format!(
                "{} UsageRecords; at most {max} per BatchMeterUsage call (split the batch, or use POST /v1/usage for bulk)",
                records.len()
            ),
        ));
    }
    admit_seller(st, seller, records.len())?;
    let (slots, accepted, refused) =
        validate_all(records.iter().map(|r| r.get()), product, seller, book, st.clock.as_ref());
    if mode == Answering::Aws {
        // AWS fails the whole call on the first such record; then nothing of the call is stored.
        let first = slots.iter().enumerate().find_map(|(i, s)| match s {
            Slot::Refused(_, rej) => aws::batch_exception(rej.code).map(|kind| (i, kind, rej)),
            Slot::Accepted(_) => None,
        });
        if let Some((i, kind, rej)) = first {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, kind, format!("UsageRecords[{i}]: {}", rej.message)));
        }
    }
    let n_refused = refused.len();
    let outcomes = st.sink.submit(accepted, refused).await?;
    tracing::debug!(seller = %seller.id, product = product.unwrap_or("(by licence)"), records = slots.len(), refused = n_refused, ?mode, "BatchMeterUsage");
    let results = slots
        .into_iter()
        .zip(records.iter())
        .map(|(slot, raw)| {
            let (id, code, reason) = match slot {
                Slot::Accepted(i) => status_of(&outcomes[i]),
                Slot::Refused(id, rej) => (id, Some(rej.code), Some(rej.message)),
            };
            let status = match (code, mode) {
                (None, _) => "Success",
                (Some(c), Answering::PerRecord) => c.as_str(),
                (Some(c), Answering::Aws) => aws::batch_status(c),
            };
            UsageRecordResult { usage_record: raw, metering_record_id: id.map(|i| i.to_string()), status, reason }
        })
        .collect();
    let empty: Vec<&RawValue> = Vec::new();
    Ok(json_response(&BatchMeterUsageResponse { results, unprocessed_records: empty }))
}

async fn meter_usage<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    match meter_inner(&st, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn meter_inner<S: UsageSink>(
    st: &IngestState<S>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let book = st.book.current();
    let book = book.as_ref();
    check_content_type(headers)?;
    // AWS's callers are the buyer's deployments; a seller key (naming the customer in the body)
    // stays accepted for sellers that meter on their customers' behalf.
    let deployment = aws::deployment(headers, book);
    let seller = match deployment {
        Some(d) => book.product(&d.product).and_then(|p| book.doc().sellers.iter().find(|s| s.id == p.seller)),
        None => Some(authenticate(headers, st, book)?),
    };
    let Some(seller) = seller else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "UnrecognizedClientException", "the API key is not valid"));
    };
    let bad_json = |e: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("request body is not valid JSON for MeterUsage: {e}"),
        )
    };
    let raw = std::str::from_utf8(body).map_err(|e| bad_json(e.to_string()))?;
    let flags: MeterUsageFlags = serde_json::from_slice(body).map_err(|e| bad_json(e.to_string()))?;
    let refuse =
        |rej: Rejection| ApiError::new(StatusCode::BAD_REQUEST, aws::meter_usage_exception(rej.code), rej.message);
    let record = parse_record(raw)
        .map_err(|e| refuse(Rejection::new(RejectCode::InvalidRecord, format!("request does not parse: {e}"))))?;
    let Some(product) = record.product_code.as_deref().filter(|p| !p.is_empty()) else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "InvalidProductCodeException", "ProductCode is required"));
    };
    let caller = match deployment {
        Some(d) => Caller::Deployment(d),
        None => {
            owns_aws(book, seller, product)?;
            Caller::Seller(seller)
        }
    };
    admit_seller(st, seller, 1)?;
    let now = st.clock.now();
    let cx = Context { book, caller, now: Some(now), received_at: now };
    let validated = match validate(&record, Some(product), &cx) {
        Ok(r) => r,
        Err(rej) => {
            let refused = RefusedRecord {
                received_at: now,
                seller: seller.id.clone(),
                product: product.to_owned(),
                raw: RefusedRecord::clip(raw),
                record_id: None,
                rejection: rej.clone(),
            };
            if !flags.dry_run {
                st.sink.submit(Vec::new(), vec![refused]).await?;
            }
            return Err(refuse(rej));
        }
    };
    if flags.dry_run {
        // AWS answers a DryRun that would have succeeded with this error, and stores nothing.
        return Err(aws::dry_run_answer());
    }
    let outcome = st.sink.submit(vec![validated], Vec::new()).await?.pop();
    match outcome {
        Some(SinkOutcome::Accepted { record_id } | SinkOutcome::AlreadyAccepted { record_id }) => {
            Ok(json_response(&serde_json::json!({ "MeteringRecordId": record_id.to_string() })))
        }
        Some(SinkOutcome::Refused { rejection, .. }) => Err(refuse(rejection)),
        None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServiceErrorException",
            "sink returned no outcome",
        )),
    }
}

async fn resolve_customer<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    match check_content_type(&headers).and_then(|()| aws::resolve_customer(&st, &headers, &body)) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn register_usage<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    match check_content_type(&headers).and_then(|()| aws::register_usage(&st, &headers, &body)) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn bulk<S: UsageSink>(
    State(st): State<Arc<IngestState<S>>>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    match bulk_inner(&st, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ProductOnly<'a> {
    #[serde(rename = "ProductCode", borrow)]
    product_code: Option<std::borrow::Cow<'a, str>>,
}

async fn bulk_inner<S: UsageSink>(st: &IngestState<S>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let book = st.book.current();
    let book = book.as_ref();
    check_content_type(headers)?;
    let seller = authenticate(headers, st, book)?;
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "SerializationException", format!("body is not UTF-8: {e}"))
    })?;
    // (line number, raw line) of the non-blank lines.
    let lines: Vec<(usize, &str)> =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty()).collect();
    if lines.len() > st.limits.max_bulk_records {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "ValidationException",
            format!("{} records; at most {} per bulk request", lines.len(), st.limits.max_bulk_records),
        ));
    }
    // Ownership first, for the whole call: a key naming a foreign product stores nothing.
    for (n, line) in &lines {
        if let Ok(ProductOnly { product_code: Some(p) }) = serde_json::from_str::<ProductOnly<'_>>(line) {
            owns(book, seller, &p).map_err(|e| ApiError { message: format!("line {n}: {}", e.message), ..e })?;
        }
    }
    admit_seller(st, seller, lines.len())?;
    let now = st.clock.now();
    let cx = Context { book, caller: Caller::Seller(seller), now: Some(now), received_at: now };
    let mut slots = Vec::with_capacity(lines.len());
    let mut accepted = Vec::with_capacity(lines.len());
    let mut refused = Vec::new();
    for (_, line) in &lines {
        let parsed = parse_record(line)
            .map_err(|e| Rejection::new(RejectCode::InvalidRecord, format!("line does not parse: {e}")));
        let (product, outcome) = match parsed {
            Ok(w) => (w.product_code.as_deref().unwrap_or_default().to_owned(), validate(&w, None, &cx)),
            Err(r) => (String::new(), Err(r)),
        };
        match outcome {
            Ok(r) => {
                slots.push(Slot::Accepted(accepted.len()));
                accepted.push(r);
            }
            Err(rej) => {
                refused.push(RefusedRecord {
                    received_at: now,
                    seller: seller.id.clone(),
                    product,
                    raw: RefusedRecord::clip(line),
                    record_id: None,
                    rejection: rej.clone(),
                });
                slots.push(Slot::Refused(None, rej));
            }
        }
    }
    let outcomes = st.sink.submit(accepted, refused).await?;
    let mut resp = BulkResponse { accepted: 0, refused: 0, results: Vec::with_capacity(slots.len()) };
    for (slot, (line, _)) in slots.into_iter().zip(lines.iter()) {
        let (id, code, reason) = match slot {
            Slot::Accepted(i) => status_of(&outcomes[i]),
            Slot::Refused(id, rej) => (id, Some(rej.code), Some(rej.message)),
        };
        let status = code.map_or("Success", RejectCode::as_str);
        if status == "Success" {
            resp.accepted += 1;
        } else {
            resp.refused += 1;
        }
        resp.results.push(BulkResult { line: *line, metering_record_id: id.map(|i| i.to_string()), status, reason });
    }
    Ok(json_response(&resp))
}
