//! SHELL (with its decisions as small pure functions). AWS Marketplace Metering's semantics on the
//! AWS-shaped routes, so seller code written for AWS behaves the same here:
//!
//! - **Answering.** By default a `BatchMeterUsage` call answers as AWS does: a record refused for
//!   a reason AWS raises as a modeled exception fails the whole call with that exception (and
//!   nothing of the call is stored); per-record `Status` stays within the model's enum
//!   (`Success`, `CustomerNotSubscribed`, `DuplicateRecord`). A seller that wants one bad record
//!   never to refuse its neighbours asks for it with the `X-Meterline-Per-Record: true` header
//!   (or uses the native bulk route), and then gets every record's own status and `Reason`.
//! - **Identity.** `MeterUsage` and `RegisterUsage` are called from the buyer's deployment, so
//!   their caller may be a *deployment key* (price book `[[deployments]]`, hashed): the customer
//!   comes from the key, never from the body.
//! - **`ResolveCustomer`** looks up registration tokens the operator issued with
//!   `meterline issue-token` into a tokens file ([`RegistrationTokens`]).
//! - **`RegisterUsage`** answers a paid container's entitlement check.
//! - Every answer carries `x-amzn-RequestId`; a `Retry-After` is mirrored as
//!   `x-amz-retry-after` (milliseconds), the header AWS SDKs read for their back-off.

use crate::http::{authenticate, ApiError, IngestState};
use crate::validate::truncate;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use common::catalogue::{Deployment, PriceBook};
use common::reject::RejectCode;
use common::time::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// The opt-in header for per-record isolation on the AWS-shaped routes.
pub const PER_RECORD_HEADER: &str = "x-meterline-per-record";

/// How a `BatchMeterUsage` call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answering {
    /// As AWS: whole-call exceptions, statuses within the model's enum.
    Aws,
    /// Every record on its own, with Meterline's statuses and `Reason` (the opt-in).
    PerRecord,
}

/// The answering mode a request asked for (`X-Meterline-Per-Record: true` or `1`).
pub fn answering(headers: &HeaderMap) -> Answering {
    match headers.get(PER_RECORD_HEADER).and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Answering::PerRecord,
        _ => Answering::Aws,
    }
}

/// The modeled `BatchMeterUsage` exception that a record refused for `code` raises for the whole
/// call, or `None` when AWS answers it per record (`CustomerNotSubscribed`, `DuplicateRecord`).
pub fn batch_exception(code: RejectCode) -> Option<&'static str> {
    Some(match code {
        RejectCode::DuplicateRecord | RejectCode::CustomerNotSubscribed | RejectCode::NotPriced => return None,
        RejectCode::InvalidProductCode => "InvalidProductCodeException",
        RejectCode::InvalidUsageDimension => "InvalidUsageDimensionException",
        RejectCode::InvalidCustomerIdentifier => "InvalidCustomerIdentifierException",
        RejectCode::TimestampOutOfBounds => "TimestampOutOfBoundsException",
        RejectCode::InvalidUsageAllocations => "InvalidUsageAllocationsException",
        RejectCode::InvalidTag => "InvalidTagException",
        RejectCode::InvalidLicense => "InvalidLicenseException",
        // Shape violations (a wrong type, a missing or null member, a fraction or a negative
        // number where the model wants an integer) are what AWS's request validation refuses.
        RejectCode::InvalidQuantity | RejectCode::InvalidRecord => "ValidationException",
    })
}

/// A per-record `Status` within the model's enum for a record the sink refused. `NotPriced` (the
/// customer's agreement prices nothing for this dimension at that hour) is what AWS reports as
/// `CustomerNotSubscribed`: the buyer holds no subscription that covers the usage.
pub fn batch_status(code: RejectCode) -> &'static str {
    match code {
        RejectCode::DuplicateRecord => "DuplicateRecord",
        _ => "CustomerNotSubscribed",
    }
}

/// The modeled `MeterUsage` exception for a record refused for `code`.
pub fn meter_usage_exception(code: RejectCode) -> &'static str {
    match code {
        RejectCode::DuplicateRecord => "DuplicateRequestException",
        RejectCode::CustomerNotSubscribed | RejectCode::NotPriced | RejectCode::InvalidLicense => {
            "CustomerNotEntitledException"
        }
        RejectCode::InvalidProductCode => "InvalidProductCodeException",
        RejectCode::InvalidUsageDimension => "InvalidUsageDimensionException",
        // MeterUsage's model has no customer exception: the customer is the caller.
        RejectCode::InvalidCustomerIdentifier => "CustomerNotEntitledException",
        RejectCode::TimestampOutOfBounds => "TimestampOutOfBoundsException",
        RejectCode::InvalidUsageAllocations => "InvalidUsageAllocationsException",
        RejectCode::InvalidTag => "InvalidTagException",
        RejectCode::InvalidQuantity | RejectCode::InvalidRecord => "ValidationException",
    }
}

/// The `DryRunOperation` answer AWS gives a `DryRun` call that would have succeeded.
pub fn dry_run_answer() -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "DryRunOperation",
        "Request would have succeeded, but DryRun flag is set.",
    )
}

/// Adds `x-amzn-RequestId` to every answer, and mirrors `Retry-After` (seconds) as
/// `x-amz-retry-after` (milliseconds), which the AWS SDKs' retry strategies honour.
pub async fn stamp(mut resp: Response) -> Response {
    let headers = resp.headers_mut();
    let id = uuid::Uuid::new_v4().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert("x-amzn-requestid", v);
    }
    let millis =
        headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(secs) = millis {
        headers.insert("x-amz-retry-after", HeaderValue::from(secs.saturating_mul(1000)));
    }
    resp
}

/// The deployment whose key the request presents, if it is one.
pub fn deployment<'b>(headers: &HeaderMap, book: &'b PriceBook) -> Option<&'b Deployment> {
    crate::http::presented_key(headers).and_then(|k| book.deployment_for_key(k))
}

/// One issued registration token, as stored in the tokens file (the token only as SHA-256).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// SHA-256 (hex) of the token.
    pub sha256: String,
    /// The customer the token registers.
    pub customer: String,
    /// The product it was issued for.
    pub product: String,
    /// The licence of the customer's agreement, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_arn: Option<String>,
    /// Not resolvable after this instant (RFC 3339).
    pub expires: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensDoc {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

impl TokenEntry {
    /// The entry for `token`; the token itself is not kept.
    pub fn new(token: &str, customer: &str, product: &str, license_arn: Option<&str>, expires: Timestamp) -> Self {
        TokenEntry {
            sha256: hex::encode(Sha256::digest(token.as_bytes())),
            customer: customer.to_owned(),
            product: product.to_owned(),
            license_arn: license_arn.map(str::to_owned),
            expires: expires.to_string(),
        }
    }

    /// The entry as one `[[tokens]]` table, to append to a tokens file.
    pub fn to_toml(&self) -> String {
        let doc = TokensDoc { tokens: vec![self.clone()] };
        toml::to_string(&doc).unwrap_or_default()
    }
}

/// The registration tokens file `ResolveCustomer` reads (TOML `[[tokens]]`, written by
/// `meterline issue-token`). It is read on each call, so tokens issued while the server runs
/// resolve at once; a missing file means no tokens.
#[derive(Debug, Clone, Default)]
pub struct RegistrationTokens {
    /// The file, if the server has one.
    pub path: Option<PathBuf>,
}

/// Why a token did not resolve.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenProblem {
    /// Unknown, or issued for another seller's product.
    Invalid,
    /// Past its `expires`.
    Expired,
}

impl RegistrationTokens {
    /// The entry of `token` if it is valid for a product of `seller` at `now`.
    pub fn resolve(
        &self,
        token: &str,
        seller: &str,
        book: &PriceBook,
        now: Timestamp,
    ) -> Result<TokenEntry, TokenProblem> {
        let Some(path) = &self.path else { return Err(TokenProblem::Invalid) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TokenProblem::Invalid),
            Err(e) => {
                tracing::error!("registration tokens file {}: {e}", path.display());
                return Err(TokenProblem::Invalid);
            }
        };
        let doc: TokensDoc = toml::from_str(&text).map_err(|e| {
            tracing::error!("registration tokens file {}: {e}", path.display());
            TokenProblem::Invalid
        })?;
        lookup(&doc.tokens, token, seller, book, now)
    }
}

/// PURE. Finds `token` among `entries` for `seller`'s products at `now`.
fn lookup(
    entries: &[TokenEntry],
    token: &str,
    seller: &str,
    book: &PriceBook,
    now: Timestamp,
) -> Result<TokenEntry, TokenProblem> {
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    let entry = entries.iter().find(|e| e.sha256.eq_ignore_ascii_case(&hash)).ok_or(TokenProblem::Invalid)?;
    // Another seller's token answers like an unknown one: a key cannot probe other sellers.
    if book.product(&entry.product).is_none_or(|p| p.seller != seller) {
        return Err(TokenProblem::Invalid);
    }
    match Timestamp::parse_rfc3339(&entry.expires) {
        Ok(t) if now <= t => Ok(entry.clone()),
        Ok(_) => Err(TokenProblem::Expired),
        Err(_) => Err(TokenProblem::Invalid),
    }
}

#[derive(Deserialize)]
struct ResolveCustomerRequest {
    #[serde(rename = "RegistrationToken")]
    registration_token: Option<String>,
}

#[derive(Serialize)]
struct ResolveCustomerResponse<'a> {
    #[serde(rename = "CustomerIdentifier")]
    customer_identifier: &'a str,
    #[serde(rename = "ProductCode")]
    product_code: &'a str,
    #[serde(rename = "CustomerAWSAccountId", skip_serializing_if = "Option::is_none")]
    customer_aws_account_id: Option<&'a str>,
    #[serde(rename = "LicenseArn", skip_serializing_if = "Option::is_none")]
    license_arn: Option<&'a str>,
}

fn bad_json(op: &str) -> impl Fn(serde_json::Error) -> ApiError + '_ {
    move |e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("request body is not valid JSON for {op}: {e}"),
        )
    }
}

/// `ResolveCustomer`: a registration token (from the buyer's browser) → the customer.
pub(crate) fn resolve_customer<S>(st: &IngestState<S>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let book = st.book.current();
    let book = book.as_ref();
    let seller = authenticate(headers, st, book)?;
    let req: ResolveCustomerRequest = serde_json::from_slice(body).map_err(bad_json("ResolveCustomer"))?;
    let Some(token) = req.registration_token.filter(|t| !t.is_empty()) else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "ValidationException", "RegistrationToken is required"));
    };
    let entry = st.tokens.resolve(&token, &seller.id, book, st.clock.now()).map_err(|p| match p {
        TokenProblem::Invalid => {
            ApiError::new(StatusCode::BAD_REQUEST, "InvalidTokenException", "the registration token is not valid")
        }
        TokenProblem::Expired => {
            ApiError::new(StatusCode::BAD_REQUEST, "ExpiredTokenException", "the registration token has expired")
        }
    })?;
    let Some(customer) = book.customer(&entry.customer) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidTokenException",
            "the registration token's customer is unknown",
        ));
    };
    Ok(crate::http::json_response(&ResolveCustomerResponse {
        // AWS always answers an identifier; a customer known only by id is identified by it.
        customer_identifier: customer.customer_identifier.as_deref().unwrap_or(&customer.id),
        product_code: &entry.product,
        customer_aws_account_id: customer.aws_account_id.as_deref(),
        license_arn: entry.license_arn.as_deref(),
    }))
}

#[derive(Deserialize)]
struct RegisterUsageRequest {
    #[serde(rename = "ProductCode")]
    product_code: Option<String>,
    #[serde(rename = "PublicKeyVersion")]
    public_key_version: Option<i64>,
    #[serde(rename = "Nonce")]
    nonce: Option<String>,
}

#[derive(Serialize)]
struct RegisterUsageResponse {
    #[serde(rename = "PublicKeyRotationTimestamp")]
    public_key_rotation_timestamp: i64,
    #[serde(rename = "Signature")]
    signature: String,
}

/// `RegisterUsage`: a paid container's entitlement check at start, from its deployment's key.
pub(crate) fn register_usage<S>(st: &IngestState<S>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let book = st.book.current();
    let book = book.as_ref();
    let Some(dep) = deployment(headers, book) else {
        // A seller key (or none) is not a buyer's container: authenticate for the right 401 first.
        authenticate(headers, st, book)?;
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "CustomerNotEntitledException",
            "RegisterUsage is called with a customer deployment's key, not a seller's",
        ));
    };
    let req: RegisterUsageRequest = serde_json::from_slice(body).map_err(bad_json("RegisterUsage"))?;
    let product = req.product_code.unwrap_or_default();
    if product != dep.product {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidProductCodeException",
            format!("product `{}` is not the product this deployment's key registers", truncate(&product, 64)),
        ));
    }
    match req.public_key_version {
        Some(v) if v >= 1 => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidPublicKeyVersionException",
                "PublicKeyVersion is required and must be at least 1",
            ))
        }
    }
    let now = st.clock.now();
    let Some(agreement) = book.agreement_at(&dep.customer, &product, now) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "CustomerNotEntitledException",
            format!("customer `{}` holds no agreement for `{product}` now", dep.customer),
        ));
    };
    Ok(crate::http::json_response(&RegisterUsageResponse {
        public_key_rotation_timestamp: 0,
        signature: entitlement_signature(dep, &agreement.id, req.nonce.as_deref().unwrap_or(""), now),
    }))
}

/// PURE. The `Signature` of a `RegisterUsage` answer: a SHA-256 over what was checked (deployment,
/// agreement, nonce, hour). Meterline holds no AWS signing key, so this is a receipt, not a JWS
/// that AWS's public key verifies (docs/api.md, differences from AWS).
fn entitlement_signature(dep: &Deployment, agreement: &str, nonce: &str, now: Timestamp) -> String {
    let mut h = Sha256::new();
    for part in ["meterline-register-usage-1", &dep.id, &dep.customer, &dep.product, agreement, nonce] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(now.hour().0.to_le_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    #[test]
    fn tokens_resolve_for_their_seller_until_they_expire() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let product = &book.doc().products[0];
        let customer = &book.doc().customers[0].id;
        let expires = Timestamp::parse_rfc3339("2026-11-02T12:00:00Z").unwrap();
        let e = TokenEntry::new("tok-1", customer, &product.code, None, expires);
        let doc: TokensDoc = toml::from_str(&e.to_toml()).unwrap();
        let before = Timestamp::parse_rfc3339("2026-11-02T11:00:00Z").unwrap();
        let after = Timestamp::parse_rfc3339("2026-11-02T12:00:01Z").unwrap();
        assert_eq!(lookup(&doc.tokens, "tok-1", &product.seller, &book, before), Ok(e));
        assert_eq!(lookup(&doc.tokens, "tok-1", &product.seller, &book, after), Err(TokenProblem::Expired));
        assert_eq!(lookup(&doc.tokens, "tok-2", &product.seller, &book, before), Err(TokenProblem::Invalid));
        assert_eq!(lookup(&doc.tokens, "tok-1", "someone-else", &book, before), Err(TokenProblem::Invalid));
    }

    #[test]
    fn aws_answers_keep_statuses_in_the_model_enum() {
        for code in RejectCode::ALL {
            assert!(["DuplicateRecord", "CustomerNotSubscribed"].contains(&batch_status(code)));
            if batch_exception(code).is_none() {
                assert!(matches!(
                    code,
                    RejectCode::DuplicateRecord | RejectCode::CustomerNotSubscribed | RejectCode::NotPriced
                ));
            }
        }
    }
}
