//! SHELL + PURE helpers. The read-only query API (issue 16 item 3): what a customer used, owes
//! month to date, and would be invoiced for the open month, per tag, and what it is entitled to.
//!
//! Routes (documented in `docs/api.md`, "Query API"), all `GET`, all JSON:
//! - `/v1/customers/{customer}/usage?month=YYYY-MM&by=hour|day[&product][&dimension][&agreement][&limit][&page_token]`:
//!   per customer, or per agreement with `agreement=`.
//! - `/v1/customers/{customer}/charges?month=YYYY-MM`: the month-to-date lines of `monthly_charges`.
//! - `/v1/customers/{customer}/invoice-preview?month=YYYY-MM`: the lines the month's close would
//!   write for the customer, from the same close core ([`crate::close::close_month`], over the
//!   mode's store), which writes nothing.
//! - `/v1/customers/{customer}/usage/tags?month=..&key=<tag key>`: quantity per tag value.
//! - `/v1/customers/{customer}/entitlements`: the customer's agreements in the price book.
//!
//! Who may read: a seller's metering key (the ingest key ring, reloaded as it is, and its
//! failed-authentication throttle), which sees only its own products' data. The routes do not
//! pass the metering `gate` (there is no body to bound); [`authorize`] is their own check and
//! answers 401 in the ingest routes' JSON error shape.
//!
//! Mode-neutral: the handlers read through [`QueryStore`], called in a blocking task. The
//! embedded mode implements it over SQLite (`meterline::query::SqliteQueries`, one read-only
//! connection per request, so a read never holds the writer: the store is in WAL mode); the
//! distributed mode over ClickHouse (`crate::query_clickhouse`, served by the `aggregator`
//! binary on `aggregator.query_listen`). Everything between the rows and the JSON
//! (grouping, pagination tokens, tag splits, totals) is pure and unit-tested below.
//!
//! Money and quantities are exact decimals, serialised as strings; no float is involved.

use crate::close::{InvoiceLine, MonthClose};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use common::catalogue::{Agreement, PriceBook};
use common::money::Currency;
use common::rated::ChargeLine;
use common::time::{Hour, Month, Timestamp};
use common::usage::Allocation;
use ingest::clock::Clock;
use ingest::guard::Security;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

/// Items per page when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;
/// The tag value of usage that carries no value for the asked key (no allocations, or an
/// allocation without that key).
pub const UNTAGGED: &str = "(untagged)";

// ---------------------------------------------------------------------------------------------
// Reading: the one seam between the routes and a mode's store.

/// One rated record as the query API reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The usage hour.
    pub hour: Hour,
    /// Product code.
    pub product: String,
    /// Dimension key.
    pub dimension: String,
    /// Agreement the record was rated under.
    pub agreement_id: String,
    /// Currency of `amount`.
    pub currency: Currency,
    /// Quantity sent.
    pub quantity: Decimal,
    /// Quantity left to bill after coverage.
    pub billable_quantity: Decimal,
    /// The record-priced amount, exact (0 for month-priced models, priced by the monthly fold).
    pub amount: Decimal,
    /// The canonical allocations (empty when none were sent).
    pub allocations: Vec<Allocation>,
}

/// What a store failed to read (the call gets 500 naming it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

/// The reads the query routes need. The embedded mode implements it over SQLite; the
/// distributed mode's ClickHouse tables hold the same rows.
pub trait QueryStore: Send + Sync + std::fmt::Debug + 'static {
    /// The rated records of `customer` whose usage hour falls in `month`.
    fn usage_rows(&self, customer: &str, month: Month) -> Result<Vec<UsageRow>, ReadError>;
    /// The month-to-date invoice lines of `month` (every customer).
    fn charge_lines(&self, month: Month) -> Result<Vec<ChargeLine>, ReadError>;
    /// What closing `month` now would bill (every customer), computed by the close core.
    fn preview(&self, book: &PriceBook, month: Month) -> Result<MonthClose, ReadError>;
}

// ---------------------------------------------------------------------------------------------
// PURE: parameters, grouping, pagination, tags, totals.

/// The bucket of `GET …/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// One item per usage hour.
    Hour,
    /// One item per UTC day.
    Day,
}

impl By {
    /// Parses `hour` or `day`.
    pub fn parse(s: &str) -> Result<By, QueryError> {
        match s {
            "hour" => Ok(By::Hour),
            "day" => Ok(By::Day),
            _ => Err(QueryError::bad("by", s, "`hour` or `day`")),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            By::Hour => "hour",
            By::Day => "day",
        }
    }

    /// The period label of `hour`: `2026-11-03T14:00Z` or `2026-11-03` (both sort in time order).
    pub fn period(self, hour: Hour) -> String {
        match self {
            By::Hour => hour.to_string(),
            By::Day => hour.start().to_datetime().format("%Y-%m-%d").to_string(),
        }
    }
}

/// Where an item sits in the stable order of `GET …/usage`, and what a page token encodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ItemKey {
    /// Period label.
    pub period: String,
    /// Product code.
    pub product: String,
    /// Dimension key.
    pub dimension: String,
    /// Currency code.
    pub currency: String,
}

// Unit separator: cannot occur in a period, a product code, a dimension key or a currency.
const SEP: char = '\u{1f}';

/// The opaque token of the item after which the next page starts (hex of the key's fields).
pub fn encode_token(key: &ItemKey) -> String {
    hex::encode(format!("{}{SEP}{}{SEP}{}{SEP}{}", key.period, key.product, key.dimension, key.currency))
}

/// The key a token names; `None` when the token was not made by [`encode_token`].
pub fn decode_token(token: &str) -> Option<ItemKey> {
    let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut parts = text.split(SEP);
    let key = ItemKey {
        period: parts.next()?.to_owned(),
        product: parts.next()?.to_owned(),
        dimension: parts.next()?.to_owned(),
        currency: parts.next()?.to_owned(),
    };
    parts.next().is_none().then_some(key)
}

/// One item of `GET …/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageItem {
    /// `2026-11-03T14:00Z` (by hour) or `2026-11-03` (by day).
    pub period: String,
    /// Product code.
    pub product: String,
    /// Dimension key.
    pub dimension: String,
    /// Σ quantity sent.
    pub quantity: Decimal,
    /// Σ quantity left to bill after annual coverage or contract netting.
    pub billable_quantity: Decimal,
    /// Σ record-priced amounts, exact and unrounded (month-priced models such as tiers are
    /// priced by the monthly fold: see `charges`).
    pub amount: Decimal,
    /// Currency of `amount`.
    pub currency: Currency,
    /// Rated records summed.
    pub records: u64,
}

impl UsageItem {
    fn key(&self) -> ItemKey {
        ItemKey {
            period: self.period.clone(),
            product: self.product.clone(),
            dimension: self.dimension.clone(),
            currency: self.currency.as_str().to_owned(),
        }
    }
}

/// Which rows a usage query keeps: the caller's products, and the optional filters.
#[derive(Debug, Clone, Default)]
pub struct RowFilter {
    /// Only this product.
    pub product: Option<String>,
    /// Only this dimension.
    pub dimension: Option<String>,
    /// Only this agreement.
    pub agreement: Option<String>,
}

impl RowFilter {
    fn keeps(&self, r: &UsageRow) -> bool {
        self.product.as_ref().is_none_or(|p| *p == r.product)
            && self.dimension.as_ref().is_none_or(|d| *d == r.dimension)
            && self.agreement.as_ref().is_none_or(|a| *a == r.agreement_id)
    }
}

/// The rows summed per (period, product, dimension, currency), in that order.
pub fn group_usage<'a>(rows: impl IntoIterator<Item = &'a UsageRow>, by: By) -> Vec<UsageItem> {
    let mut items: BTreeMap<ItemKey, UsageItem> = BTreeMap::new();
    for r in rows {
        let period = by.period(r.hour);
        let key = ItemKey {
            period: period.clone(),
            product: r.product.clone(),
            dimension: r.dimension.clone(),
            currency: r.currency.as_str().to_owned(),
        };
        let item = items.entry(key).or_insert_with(|| UsageItem {
            period,
            product: r.product.clone(),
            dimension: r.dimension.clone(),
            quantity: Decimal::ZERO,
            billable_quantity: Decimal::ZERO,
            amount: Decimal::ZERO,
            currency: r.currency,
            records: 0,
        });
        item.quantity += r.quantity;
        item.billable_quantity += r.billable_quantity;
        item.amount += r.amount;
        item.records += 1;
    }
    items
        .into_values()
        .map(|mut i| {
            // One spelling of a value in both modes' answers (the stores keep different scales).
            i.quantity = i.quantity.normalize();
            i.billable_quantity = i.billable_quantity.normalize();
            i.amount = money(i.amount, i.currency);
            i
        })
        .collect()
}

/// The page of `items` (sorted by key) after `after`, at most `limit` long, and the token of the
/// next page when items remain.
pub fn page(items: Vec<UsageItem>, after: Option<&ItemKey>, limit: usize) -> (Vec<UsageItem>, Option<String>) {
    let start = after.map_or(0, |k| items.partition_point(|i| i.key() <= *k));
    let rest = items.len() - start;
    let page: Vec<UsageItem> = items.into_iter().skip(start).take(limit).collect();
    let next = (rest > page.len()).then(|| page.last().map(|i| encode_token(&i.key()))).flatten();
    (page, next)
}

/// One item of `GET …/usage/tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagItem {
    /// The tag's value, or [`UNTAGGED`].
    pub value: String,
    /// Product code.
    pub product: String,
    /// Dimension key.
    pub dimension: String,
    /// Σ quantity allocated to the value.
    pub quantity: Decimal,
    /// Records contributing to it.
    pub records: u64,
}

/// Quantity per value of tag `key`, per product and dimension. A record's allocations that carry
/// the key go to their values; the rest of its quantity (no allocations, or allocations without
/// the key) goes to [`UNTAGGED`], so the items of a (product, dimension) sum to its usage.
pub fn tag_breakdown<'a>(rows: impl IntoIterator<Item = &'a UsageRow>, key: &str) -> Vec<TagItem> {
    let mut out: BTreeMap<(String, String, String), (Decimal, u64)> = BTreeMap::new();
    for r in rows {
        let mut rest = r.quantity;
        let mut values: BTreeMap<&str, Decimal> = BTreeMap::new();
        for a in &r.allocations {
            if let Some(t) = a.tags.iter().find(|t| t.key == key) {
                *values.entry(&t.value).or_default() += a.quantity;
                rest -= a.quantity;
            }
        }
        if !rest.is_zero() || values.is_empty() {
            *values.entry(UNTAGGED).or_default() += rest;
        }
        for (v, q) in values {
            let e = out.entry((r.product.clone(), r.dimension.clone(), v.to_owned())).or_default();
            e.0 += q;
            e.1 += 1;
        }
    }
    out.into_iter()
        .map(|((product, dimension, value), (quantity, records))| TagItem {
            value,
            product,
            dimension,
            quantity: quantity.normalize(),
            records,
        })
        .collect()
}

/// A sum per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    /// Currency.
    pub currency: Currency,
    /// Σ of the lines' rounded amounts (each line was rounded once; the sum is exact).
    pub amount: Decimal,
}

/// Σ amount per currency, by currency code.
pub fn totals(amounts: impl IntoIterator<Item = (Currency, Decimal)>) -> Vec<Total> {
    let mut by: BTreeMap<Currency, Decimal> = BTreeMap::new();
    for (c, a) in amounts {
        *by.entry(c).or_default() += a;
    }
    by.into_iter().map(|(currency, amount)| Total { currency, amount: money(amount, currency) }).collect()
}

/// An amount spelt one way whatever scale the store kept: no trailing zeros, but at least the
/// currency's minor units (`2.00`, `2.50`, `0.0123` in USD).
pub fn money(amount: Decimal, currency: Currency) -> Decimal {
    let mut n = amount.normalize();
    if let Some(minor) = currency.minor_units().filter(|m| n.scale() < *m) {
        n.rescale(minor);
    }
    n
}

/// `month`, or the clock's month when absent.
pub fn parse_month(q: &HashMap<String, String>, now: Timestamp) -> Result<Month, QueryError> {
    match q.get("month") {
        None => Ok(now.month()),
        Some(m) => Month::parse(m).map_err(|_| QueryError::bad("month", m, "a month as YYYY-MM, e.g. 2026-11")),
    }
}

/// `limit`: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
pub fn parse_limit(q: &HashMap<String, String>) -> Result<usize, QueryError> {
    match q.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(QueryError::bad("limit", l, &format!("a whole number from 1 to {MAX_LIMIT}"))),
        },
    }
}

/// Refuses parameters the route does not know (a typo would otherwise silently widen a query).
fn known_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), QueryError> {
    let mut unknown: Vec<&String> = q.keys().filter(|k| !known.contains(&k.as_str())).collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(k) => Err(QueryError::Bad(format!(
            "unknown query parameter `{}`; this route accepts {}",
            ingest::validate::truncate(k, 64),
            known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// SHELL: errors, authentication, handlers.

/// Why a query call failed, answered in the ingest routes' `{"__type", "message"}` shape.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// 400: a parameter is malformed.
    #[error("{0}")]
    Bad(String),
    /// 401: no key was sent.
    #[error("an API key is required: send `X-Api-Key: <key>` or `Authorization: Bearer <key>`")]
    NoKey,
    /// 401: the key is not in force.
    #[error("the API key is not valid")]
    BadKey,
    /// 429: too many failed authentications from the address.
    #[error("too many failed authentications from this address; retry after {0} s with a valid key")]
    Throttled(u32),
    /// 403: the named product is not the caller's.
    #[error("product `{0}` is not one of this API key's products")]
    NotYours(String),
    /// 404: the customer is not in the price book.
    #[error("customer `{0}` is not in the price book")]
    NoCustomer(String),
    /// 500: the store could not answer.
    #[error("{0}")]
    Read(#[from] ReadError),
}

impl QueryError {
    fn bad(param: &str, value: &str, accepted: &str) -> QueryError {
        QueryError::Bad(format!(
            "query parameter `{param}` is `{}`; accepted: {accepted}",
            ingest::validate::truncate(value, 64)
        ))
    }

    fn status_kind(&self) -> (StatusCode, &'static str) {
        match self {
            QueryError::Bad(_) => (StatusCode::BAD_REQUEST, "ValidationException"),
            QueryError::NoKey => (StatusCode::UNAUTHORIZED, "MissingAuthenticationTokenException"),
            QueryError::BadKey => (StatusCode::UNAUTHORIZED, "UnrecognizedClientException"),
            QueryError::Throttled(_) => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
            QueryError::NotYours(_) => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            QueryError::NoCustomer(_) => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            QueryError::Read(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServiceErrorException"),
        }
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_kind();
        if let QueryError::Read(e) = &self {
            tracing::error!("query API: {e}");
        }
        let body = ingest::wire::ErrorBody { kind: kind.to_owned(), message: self.to_string() };
        let mut resp = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let QueryError::Throttled(secs) = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = (StatusCode::OK, body).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => QueryError::Read(ReadError(format!("serialising the answer: {e}"))).into_response(),
    }
}

/// Everything the query handlers need.
#[derive(Debug)]
pub struct QueryState {
    /// The price book in force (customers, products and their sellers, agreements).
    pub book: common::catalogue::LiveBook,
    /// The ingest keys in force and their failed-authentication throttle.
    pub security: Security,
    /// "Now": the default month and which agreements are active.
    pub clock: Arc<dyn Clock>,
    /// Where the rows come from.
    pub store: Arc<dyn QueryStore>,
}

/// The seller a query call authenticated as (set by [`authorize`]).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// The query routes.
pub fn router(state: Arc<QueryState>) -> Router {
    Router::new()
        .route("/v1/customers/{customer}/usage", get(usage))
        .route("/v1/customers/{customer}/usage/tags", get(usage_tags))
        .route("/v1/customers/{customer}/charges", get(charges))
        .route("/v1/customers/{customer}/invoice-preview", get(invoice_preview))
        .route("/v1/customers/{customer}/entitlements", get(entitlements))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authorize))
        .with_state(state)
}

/// The query routes' key check: the ingest key ring (reloads included) and its per-address
/// throttle of failed attempts; a seller's key reads as that seller.
pub async fn authorize(State(st): State<Arc<QueryState>>, mut req: Request, next: Next) -> Response {
    let addr = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let key = ingest::http::presented_key(req.headers()).map(str::to_owned);
    let throttle = st.security.auth_throttle.as_deref();
    if let Some(t) = throttle {
        if let Err(wait) = t.before(addr, key.as_deref()) {
            return QueryError::Throttled(ingest::limit::retry_after_secs(wait)).into_response();
        }
    }
    let Some(key) = key else {
        if let Some(t) = throttle {
            t.failed(addr, None);
        }
        return QueryError::NoKey.into_response();
    };
    let book = st.book.current();
    let Some(seller) = st.security.keys.seller(&key, &book, st.clock.now()) else {
        if let Some(t) = throttle {
            t.failed(addr, Some(&key));
        }
        return QueryError::BadKey.into_response();
    };
    if let Some(t) = throttle {
        t.succeeded(addr, &key);
    }
    req.extensions_mut().insert(Caller(seller.id.clone()));
    next.run(req).await
}

impl QueryState {
    /// Whether `product` belongs to seller `caller`.
    fn owns(&self, caller: &Caller, product: &str) -> bool {
        self.book.current().product(product).is_some_and(|p| p.seller == caller.0)
    }

    fn customer(&self, id: &str) -> Result<(), QueryError> {
        match self.book.current().customer(id) {
            Some(_) => Ok(()),
            None => Err(QueryError::NoCustomer(ingest::validate::truncate(id, 64).into_owned())),
        }
    }

    /// Runs a store read off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn QueryStore) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, QueryError> {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(r) => Ok(r?),
            Err(e) => Err(QueryError::Read(ReadError(format!("the read task failed: {e}")))),
        }
    }

    /// The customer's rows of `month`, of the caller's products only.
    async fn rows(&self, caller: &Caller, customer: &str, month: Month) -> Result<Vec<UsageRow>, QueryError> {
        let c = customer.to_owned();
        let mut rows = self.read(move |s| s.usage_rows(&c, month)).await?;
        rows.retain(|r| self.owns(caller, &r.product));
        Ok(rows)
    }

    /// The optional `product`, `dimension` and `agreement` filters.
    fn filter(&self, caller: &Caller, q: &HashMap<String, String>) -> Result<RowFilter, QueryError> {
        Ok(RowFilter {
            product: self.product_param(caller, q)?,
            dimension: q.get("dimension").cloned(),
            agreement: q.get("agreement").cloned(),
        })
    }

    /// An optional `product` filter, refused (403, as ingest does) when not the caller's.
    fn product_param(&self, caller: &Caller, q: &HashMap<String, String>) -> Result<Option<String>, QueryError> {
        match q.get("product") {
            Some(p) if !self.owns(caller, p) => {
                Err(QueryError::NotYours(ingest::validate::truncate(p, 64).into_owned()))
            }
            p => Ok(p.cloned()),
        }
    }
}

/// `GET …/usage`'s answer.
#[derive(Debug, Serialize)]
struct UsagePage {
    customer: String,
    month: String,
    by: &'static str,
    items: Vec<UsageItem>,
    next_page_token: Option<String>,
}

async fn usage(
    State(st): State<Arc<QueryState>>,
    Extension(caller): Extension<Caller>,
    Path(customer): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, QueryError> {
    known_params(&q, &["month", "by", "product", "dimension", "agreement", "limit", "page_token"])?;
    let month = parse_month(&q, st.clock.now())?;
    let by = By::parse(q.get("by").map_or("day", String::as_str))?;
    let limit = parse_limit(&q)?;
    let after = match q.get("page_token") {
        None => None,
        Some(t) => Some(decode_token(t).ok_or_else(|| {
            QueryError::bad("page_token", t, "the `next_page_token` of an earlier answer, unchanged")
        })?),
    };
    let filter = st.filter(&caller, &q)?;
    st.customer(&customer)?;
    let rows = st.rows(&caller, &customer, month).await?;
    let items = group_usage(rows.iter().filter(|r| filter.keeps(r)), by);
    let (items, next_page_token) = page(items, after.as_ref(), limit);
    Ok(json(&UsagePage { customer, month: month.to_string(), by: by.as_str(), items, next_page_token }))
}

/// `GET …/usage/tags`'s answer.
#[derive(Debug, Serialize)]
struct TagsAnswer {
    customer: String,
    month: String,
    key: String,
    items: Vec<TagItem>,
}

async fn usage_tags(
    State(st): State<Arc<QueryState>>,
    Extension(caller): Extension<Caller>,
    Path(customer): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, QueryError> {
    known_params(&q, &["month", "key", "product", "dimension", "agreement"])?;
    let month = parse_month(&q, st.clock.now())?;
    let key = match q.get("key") {
        Some(k) if !k.is_empty() => k.clone(),
        other => {
            return Err(QueryError::bad("key", other.map_or("", String::as_str), "a tag key, e.g. `key=team`"));
        }
    };
    let filter = st.filter(&caller, &q)?;
    st.customer(&customer)?;
    let rows = st.rows(&caller, &customer, month).await?;
    let items = tag_breakdown(rows.iter().filter(|r| filter.keeps(r)), &key);
    Ok(json(&TagsAnswer { customer, month: month.to_string(), key, items }))
}

/// `GET …/charges`'s answer.
#[derive(Debug, Serialize)]
struct ChargesAnswer {
    customer: String,
    month: String,
    lines: Vec<ChargeLine>,
    totals: Vec<Total>,
}

async fn charges(
    State(st): State<Arc<QueryState>>,
    Extension(caller): Extension<Caller>,
    Path(customer): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, QueryError> {
    known_params(&q, &["month"])?;
    let month = parse_month(&q, st.clock.now())?;
    st.customer(&customer)?;
    let mut lines = st.read(move |s| s.charge_lines(month)).await?;
    lines.retain(|l| l.customer == customer && st.owns(&caller, &l.product));
    let totals = totals(lines.iter().map(|l| (l.currency, l.amount)));
    Ok(json(&ChargesAnswer { customer, month: month.to_string(), lines, totals }))
}

/// `GET …/invoice-preview`'s answer.
#[derive(Debug, Serialize)]
struct PreviewAnswer {
    customer: String,
    month: String,
    marketplace: String,
    price_book_version: String,
    lines: Vec<InvoiceLine>,
    totals: Vec<Total>,
}

async fn invoice_preview(
    State(st): State<Arc<QueryState>>,
    Extension(caller): Extension<Caller>,
    Path(customer): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, QueryError> {
    known_params(&q, &["month"])?;
    let month = parse_month(&q, st.clock.now())?;
    st.customer(&customer)?;
    let book = st.book.current();
    let close = st.read(move |s| s.preview(&book, month)).await?;
    let lines: Vec<InvoiceLine> =
        close.lines.into_iter().filter(|l| l.customer == customer && st.owns(&caller, &l.product)).collect();
    let totals = totals(lines.iter().map(|l| (l.currency, l.customer_billed_amount)));
    Ok(json(&PreviewAnswer {
        customer,
        month: close.month,
        marketplace: close.marketplace,
        price_book_version: close.price_book_version,
        lines,
        totals,
    }))
}

/// One agreement of `GET …/entitlements`.
#[derive(Debug, Serialize)]
struct Entitlement<'a> {
    agreement_id: &'a str,
    product: &'a str,
    offer: &'a str,
    offer_visibility: Option<common::catalogue::Visibility>,
    currency: Option<Currency>,
    /// Dimension keys of the product.
    dimensions: Vec<&'a str>,
    start: String,
    end: Option<String>,
    signed: String,
    /// Whether the agreement covers the clock's now.
    active: bool,
    contract: Option<ContractView<'a>>,
    annual: Vec<AnnualView<'a>>,
    renewal: bool,
}

#[derive(Debug, Serialize)]
struct ContractView<'a> {
    months: u32,
    end: Option<String>,
    quantities: &'a [common::catalogue::ContractQuantity],
}

#[derive(Debug, Serialize)]
struct AnnualView<'a> {
    dimension: &'a str,
    units: u32,
    start: String,
    end: String,
}

#[derive(Debug, Serialize)]
struct EntitlementsAnswer<'a> {
    customer: &'a str,
    agreements: Vec<Entitlement<'a>>,
}

fn entitlement<'a>(book: &'a PriceBook, a: &'a Agreement, now: Timestamp) -> Entitlement<'a> {
    let offer = book.offer(&a.offer);
    Entitlement {
        agreement_id: &a.id,
        product: &a.product,
        offer: &a.offer,
        offer_visibility: offer.map(|o| o.visibility),
        currency: offer.map(|o| o.currency),
        dimensions: book
            .product(&a.product)
            .map(|p| p.dimensions.iter().map(|d| d.key.as_str()).collect())
            .unwrap_or_default(),
        start: a.start.to_string(),
        end: a.end.map(|e| e.to_string()),
        signed: a.signed_at().to_string(),
        active: a.active_at(now),
        contract: a.contract.as_ref().map(|c| ContractView {
            months: c.months,
            end: a.contract_end().map(|e| e.to_string()),
            quantities: &c.quantities,
        }),
        annual: a
            .annual
            .iter()
            .map(|c| AnnualView {
                dimension: &c.dimension,
                units: c.units,
                start: c.start.to_string(),
                end: c.end.to_string(),
            })
            .collect(),
        renewal: a.renewal,
    }
}

async fn entitlements(
    State(st): State<Arc<QueryState>>,
    Extension(caller): Extension<Caller>,
    Path(customer): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, QueryError> {
    known_params(&q, &[])?;
    st.customer(&customer)?;
    let now = st.clock.now();
    let book = st.book.current();
    let agreements = book
        .doc()
        .agreements
        .iter()
        .filter(|a| a.customer == customer && st.owns(&caller, &a.product))
        .map(|a| entitlement(&book, a, now))
        .collect();
    Ok(json(&EntitlementsAnswer { customer: &customer, agreements }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::usage::Tag;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn hour(t: &str) -> Hour {
        Timestamp::parse_rfc3339(t).unwrap().hour()
    }

    fn row(t: &str, product: &str, dim: &str, q: &str) -> UsageRow {
        UsageRow {
            hour: hour(t),
            product: product.into(),
            dimension: dim.into(),
            agreement_id: "a".into(),
            currency: Currency::USD,
            quantity: d(q),
            billable_quantity: d(q),
            amount: d(q) * d("0.1"),
            allocations: vec![],
        }
    }

    fn rows() -> Vec<UsageRow> {
        vec![
            row("2026-11-03T14:10:00Z", "p", "users", "2"),
            row("2026-11-03T15:10:00Z", "p", "users", "3"),
            row("2026-11-03T15:10:00Z", "p", "gb", "0.5"),
            row("2026-11-04T00:00:00Z", "p", "users", "7"),
            row("2026-11-02T23:59:59Z", "q", "users", "1"),
        ]
    }

    #[test]
    fn hours_and_days_group_exact_sums_in_time_order() {
        let hours = group_usage(&rows(), By::Hour);
        let periods: Vec<&str> = hours.iter().map(|i| i.period.as_str()).collect();
        assert_eq!(
            periods,
            ["2026-11-02T23:00Z", "2026-11-03T14:00Z", "2026-11-03T15:00Z", "2026-11-03T15:00Z", "2026-11-04T00:00Z"]
        );
        let days = group_usage(&rows(), By::Day);
        let users_3rd = days.iter().find(|i| i.period == "2026-11-03" && i.dimension == "users").unwrap();
        assert_eq!((users_3rd.quantity, users_3rd.amount, users_3rd.records), (d("5"), d("0.5"), 2));
        assert_eq!(days.len(), 4);
        let total: Decimal = days.iter().map(|i| i.quantity).sum();
        assert_eq!(total, d("13.5"));
    }

    #[test]
    fn pages_cover_every_item_exactly_once_in_order() {
        let items = group_usage(&rows(), By::Hour);
        for limit in 1..=6 {
            let (mut seen, mut after) = (Vec::new(), None::<ItemKey>);
            loop {
                let (p, next) = page(items.clone(), after.as_ref(), limit);
                assert!(p.len() <= limit);
                seen.extend(p);
                match next {
                    Some(t) => after = Some(decode_token(&t).unwrap()),
                    None => break,
                }
            }
            assert_eq!(seen, items, "limit {limit}");
        }
    }

    #[test]
    fn the_last_full_page_has_no_next_token() {
        let items = group_usage(&rows(), By::Day);
        let (p, next) = page(items.clone(), None, items.len());
        assert_eq!((p.len(), next), (items.len(), None));
    }

    #[test]
    fn tokens_round_trip_and_foreign_tokens_are_refused() {
        let k = ItemKey {
            period: "2026-11-03".into(),
            product: "p".into(),
            dimension: "users".into(),
            currency: "USD".into(),
        };
        assert_eq!(decode_token(&encode_token(&k)), Some(k));
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token(&hex::encode("only-one-part")), None);
        assert_eq!(decode_token(""), None);
    }

    #[test]
    fn tag_values_and_the_untagged_rest_sum_to_the_usage() {
        let tag = |k: &str, v: &str| Tag { key: k.into(), value: v.into() };
        let mut tagged = row("2026-11-03T14:10:00Z", "p", "users", "10");
        tagged.allocations = vec![
            Allocation { tags: vec![tag("env", "prod"), tag("team", "a")], quantity: d("6") },
            Allocation { tags: vec![tag("team", "b")], quantity: d("3") },
            Allocation { tags: vec![], quantity: d("1") },
        ];
        let mut other_key = row("2026-11-03T15:10:00Z", "p", "users", "4");
        other_key.allocations = vec![Allocation { tags: vec![tag("env", "dev")], quantity: d("4") }];
        let rows = vec![tagged, other_key, row("2026-11-03T16:10:00Z", "p", "users", "5")];
        let items = tag_breakdown(&rows, "team");
        let got: Vec<(&str, Decimal, u64)> = items.iter().map(|i| (i.value.as_str(), i.quantity, i.records)).collect();
        assert_eq!(got, [(UNTAGGED, d("10"), 3), ("a", d("6"), 1), ("b", d("3"), 1)]);
        let sum: Decimal = items.iter().map(|i| i.quantity).sum();
        assert_eq!(sum, d("19"));
    }

    #[test]
    fn totals_are_per_currency() {
        let t =
            totals([(Currency::USD, d("1.10")), (Currency::new("EUR").unwrap(), d("2")), (Currency::USD, d("0.01"))]);
        let got: Vec<(&str, Decimal)> = t.iter().map(|t| (t.currency.as_str(), t.amount)).collect();
        assert_eq!(got, [("EUR", d("2")), ("USD", d("1.11"))]);
    }

    #[test]
    fn an_amount_reads_the_same_whatever_scale_the_store_kept() {
        let usd = Currency::USD;
        // SQLite keeps the arithmetic's scale, ClickHouse a fixed one: the answer is one text.
        for (stored, shown) in [("2.00", "2.00"), ("2", "2.00"), ("2.000000000000000000", "2.00"), ("2.5", "2.50")] {
            assert_eq!(money(d(stored), usd).to_string(), shown);
        }
        assert_eq!(money(d("0.012345670000"), usd).to_string(), "0.01234567", "unrounded digits stay");
    }

    #[test]
    fn bad_parameters_name_the_parameter_and_what_is_accepted() {
        let e = By::parse("week").unwrap_err().to_string();
        assert!(e.contains("`by`") && e.contains("`hour` or `day`"), "{e}");
        let q = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        let now = Timestamp::parse_rfc3339("2026-11-03T00:00:00Z").unwrap();
        assert!(parse_month(&q("month", "2026-13"), now).unwrap_err().to_string().contains("YYYY-MM"));
        assert_eq!(parse_month(&HashMap::new(), now).unwrap().to_string(), "2026-11");
        assert!(parse_limit(&q("limit", "0")).unwrap_err().to_string().contains("1 to 1000"));
        assert!(parse_limit(&q("limit", "1001")).is_err());
        assert_eq!(parse_limit(&q("limit", "1000")).unwrap(), 1000);
        let e = known_params(&q("moth", "2026-11"), &["month"]).unwrap_err().to_string();
        assert!(e.contains("`moth`") && e.contains("`month`"), "{e}");
    }
}
