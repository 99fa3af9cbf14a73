//! PURE. Turns one wire record into a canonical [`UsageRecord`] or a named [`Rejection`].
//!
//! Rules: domain-rules §1.2–1.7 with Meterline's decisions on top. Time is an argument; nothing
//! here reads a clock, a socket or a file. Each check names the field and the value it refused so
//! that the seller can fix the record without reading our code.

use crate::wire::{WireAllocation, WireRecord};
use common::catalogue::{Deployment, PriceBook, QuantityKind, Seller};
use common::reject::{RejectCode, Rejection};
use common::time::Timestamp;
use common::usage::{Allocation, CustomerRef, Tag, UsageRecord};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashSet;

/// Largest quantity under the AWS profile (2^31 − 1).
pub const MAX_INTEGER_QUANTITY: i64 = 2_147_483_647;
/// Largest quantity under decimal profiles (keeps amounts far from `Decimal`'s limits).
pub const MAX_DECIMAL_QUANTITY: i64 = common::usage::MAX_QUANTITY;
/// Most decimal places of a quantity under decimal profiles.
pub const MAX_QUANTITY_SCALE: u32 = common::usage::MAX_QUANTITY_SCALE;

fn reject(code: RejectCode, msg: impl Into<String>) -> Rejection {
    Rejection::new(code, msg)
}

/// Who is asking: the authenticated seller, or nobody (offline rating of a trusted file).
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A seller authenticated by API key; it may meter only its own products.
    Seller(&'a Seller),
    /// One customer's deployment authenticated by its key (`MeterUsage`): the customer comes from
    /// the key, never from the body, and the record is scoped to the deployment.
    Deployment(&'a Deployment),
    /// Offline tooling (the `rate` command): ownership is not checked.
    Trusted,
}

/// What validation needs besides the record.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The price book in force.
    pub book: &'a PriceBook,
    /// The caller.
    pub caller: Caller<'a>,
    /// Current time; `None` skips the acceptance-window checks (offline rating of history).
    pub now: Option<Timestamp>,
    /// Arrival time stamped on accepted records.
    pub received_at: Timestamp,
}

/// Validates one record. `product_code` is the batch's `ProductCode` when the record has none.
pub fn validate(
    wire: &WireRecord<'_>,
    batch_product: Option<&str>,
    cx: &Context<'_>,
) -> Result<UsageRecord, Rejection> {
    let book = cx.book;
    let profile = book.marketplace();

    // Product and ownership.
    let product_code = match (wire.product_code.as_deref(), batch_product) {
        (Some(p), Some(b)) if p != b => {
            return Err(reject(
                RejectCode::InvalidProductCode,
                format!(
                    "record ProductCode `{}` differs from the call's `{}`; one product per call",
                    truncate(p, 64),
                    truncate(b, 64)
                ),
            ))
        }
        (Some(p), _) => p,
        (None, Some(b)) => b,
        // The current model: a call without ProductCode meters by LicenseArn, which names both the
        // product and the agreement.
        (None, None) => match wire.license_arn.as_deref().map(|arn| (arn, book.agreement_by_license(arn))) {
            Some((_, Some(agreement))) => agreement.product.as_str(),
            Some((arn, None)) => {
                return Err(reject(
                    RejectCode::InvalidLicense,
                    format!("LicenseArn `{}` is not a licence of this seller", truncate(arn, 96)),
                ))
            }
            None => {
                return Err(reject(
                    RejectCode::InvalidProductCode,
                    "ProductCode is missing (or send LicenseArn on each record)",
                ))
            }
        },
    };
    let by_license = wire.product_code.is_none() && batch_product.is_none();
    let Some(product) = book.product(product_code) else {
        return Err(reject(
            RejectCode::InvalidProductCode,
            format!("product `{}` is unknown", truncate(product_code, 64)),
        ));
    };
    let seller = match cx.caller {
        Caller::Seller(s) => {
            if product.seller != s.id {
                // A licence of another seller answers like an unknown one (no probing).
                let code = if by_license { RejectCode::InvalidLicense } else { RejectCode::InvalidProductCode };
                return Err(reject(code, format!("product `{product_code}` is not one of this API key's products")));
            }
            s.id.clone()
        }
        Caller::Deployment(d) => {
            if product.code != d.product {
                return Err(reject(
                    RejectCode::InvalidProductCode,
                    format!("product `{product_code}` is not the product this deployment's key meters"),
                ));
            }
            product.seller.clone()
        }
        Caller::Trusted => product.seller.clone(),
    };

    // Dimension: exact, case-sensitive API name.
    let dimension = match wire.dimension.as_deref() {
        None | Some("") => return Err(reject(RejectCode::InvalidUsageDimension, "Dimension is missing")),
        Some(d) => d,
    };
    if book.dimension(product_code, dimension).is_none() {
        let hint = product
            .dimensions
            .iter()
            .find(|d| d.key.eq_ignore_ascii_case(dimension))
            .map(|d| format!("; dimension names are case-sensitive, did you mean `{}`?", d.key))
            .unwrap_or_default();
        return Err(reject(
            RejectCode::InvalidUsageDimension,
            format!("dimension `{}` is not published on product `{product_code}`{hint}", truncate(dimension, 64)),
        ));
    }

    // Timestamp: required, within the window, not in the future.
    let timestamp = parse_timestamp(wire.timestamp)?;

    // Customer: from the deployment's key, the licence, or exactly one identifier.
    let (customer, customer_ref) = match (cx.caller, wire.license_arn.as_deref()) {
        (Caller::Deployment(d), _) => {
            if names_customer(wire) {
                return Err(reject(
                    RejectCode::InvalidCustomerIdentifier,
                    "a deployment's key names its customer; send no CustomerIdentifier or CustomerAWSAccountId",
                ));
            }
            (d.customer.clone(), CustomerRef::Deployment(d.id.clone()))
        }
        (_, Some(arn)) => resolve_license(wire, arn, product_code, timestamp, book)?,
        (_, None) => resolve_customer(wire, book)?,
    };
    if let Some(now) = cx.now {
        let w = book.windows();
        if timestamp.millis() < now.millis() - w.acceptance_ms {
            return Err(reject(
                RejectCode::TimestampOutOfBounds,
                format!(
                    "Timestamp {timestamp} is older than the acceptance window of {} (now {now})",
                    profile.acceptance_window
                ),
            ));
        }
        if timestamp.hour() > now.plus_millis(w.future_skew_ms).hour() {
            return Err(reject(
                RejectCode::TimestampOutOfBounds,
                format!("Timestamp {timestamp} is in a future hour (now {now})"),
            ));
        }
    }

    // Agreement covering the record's time.
    let agreement = book.agreement_at(&customer, product_code, timestamp);
    let Some(agreement) = agreement else {
        let mut all = book.agreements(&customer, product_code).peekable();
        if all.peek().is_none() {
            return Err(reject(
                RejectCode::CustomerNotSubscribed,
                format!("customer `{customer}` has no agreement for product `{product_code}`"),
            ));
        }
        let mut why = format!("customer `{customer}` has no agreement for `{product_code}` active at {timestamp}");
        if let Some(next) = book.agreements(&customer, product_code).find(|a| a.start > timestamp) {
            why = format!("Timestamp {timestamp} is before agreement `{}` starts at {}", next.id, next.start);
        } else if let Some(prev) =
            book.agreements(&customer, product_code).filter(|a| a.end.is_some_and(|e| e <= timestamp)).last()
        {
            why = format!("Timestamp {timestamp} is after agreement `{}` ended", prev.id);
        }
        return Err(reject(RejectCode::TimestampOutOfBounds, why));
    };
    // Annual / contract units net the customer's hour total (Y − X); rating nets each record on
    // its own, so per-deployment records would each be netted in full. Refused until the netting
    // spans deployments: a wrong (lower) charge must never be the answer.
    if let Caller::Deployment(d) = cx.caller {
        if PriceBook::annual_units(agreement, dimension, timestamp.hour()) > 0 {
            return Err(reject(
                RejectCode::InvalidRecord,
                format!(
                    "dimension `{dimension}` is netted against annual units of agreement `{}`, which per-deployment MeterUsage (deployment `{}`) cannot net yet; meter the customer's hour total with the seller's key",
                    agreement.id, d.id
                ),
            ));
        }
    }
    if let (Some(now), Some(end)) = (cx.now, agreement.end) {
        let due = end.plus_millis(book.windows().final_grace_ms);
        if now > due {
            return Err(reject(
                RejectCode::TimestampOutOfBounds,
                format!("agreement `{}` ended at {end}; its final records were due by {due}", agreement.id),
            ));
        }
    }

    // Quantity and allocations.
    let quantity = record_quantity(wire, profile.quantity)?;
    let allocations = match &wire.usage_allocations {
        None => Vec::new(),
        Some(list) => validate_allocations(list, quantity, cx)?,
    };

    let mut record = UsageRecord {
        seller,
        product: product_code.to_owned(),
        customer,
        customer_ref,
        dimension: dimension.to_owned(),
        timestamp,
        quantity,
        allocations,
        received_at: cx.received_at,
    };
    record.canonicalise();
    Ok(record)
}

/// The quantity the seller sent, in whichever field of the current or the previous model.
///
/// Never a default: AWS's model lets an omitted quantity mean 0, but a record without one is far
/// more often a renamed or misspelt field (the current model's `QuantityAsDecimal`, a
/// `"quantity"`) than an idle hour, and a 0 accepted for it would make the real resend a
/// `DuplicateRecord`. So no field and `null` are refused by name (an idle hour is sent as `0`),
/// and so are both fields at once, as the current model says ("you can't specify both"); the
/// reason says whether they even disagreed.
pub fn record_quantity(wire: &WireRecord<'_>, kind: QuantityKind) -> Result<Decimal, Rejection> {
    let int = wire.quantity.map(|raw| parse_quantity(raw, kind, "Quantity")).transpose()?;
    let dec = wire.quantity_as_decimal.map(|raw| parse_decimal_quantity(raw, kind, "QuantityAsDecimal")).transpose()?;
    match (int, dec) {
        (None, None) => Err(reject(
            RejectCode::InvalidQuantity,
            "no quantity: send Quantity or QuantityAsDecimal (UsageQuantity or UsageQuantityAsDecimal on MeterUsage); an idle hour is 0",
        )),
        (Some(q), None) | (None, Some(q)) => Ok(q),
        (Some(a), Some(b)) => Err(reject(
            RejectCode::InvalidQuantity,
            if a == b {
                format!("Quantity {a} and QuantityAsDecimal {b} are both sent; send one of them")
            } else {
                format!("Quantity {a} and QuantityAsDecimal {b} differ; send one of them")
            },
        )),
    }
}

/// `QuantityAsDecimal`: a JSON number, or decimal text in a string (both exact, from the text).
pub fn parse_decimal_quantity(raw: &RawValue, kind: QuantityKind, field: &str) -> Result<Decimal, Rejection> {
    let text = raw.get();
    if !text.starts_with('"') {
        return parse_quantity(raw, kind, field);
    }
    let bad = |why: &str| reject(RejectCode::InvalidQuantity, format!("{field} {}: {why}", truncate(text, 40)));
    let inner: Cow<'_, str> = serde_json::from_str(text).map_err(|_| bad("is not a string"))?;
    // Decimal text only: digits with at most one point, no sign, exponent or spaces.
    let plain = !inner.is_empty()
        && inner.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && inner.bytes().filter(|b| *b == b'.').count() <= 1
        && inner.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && inner.bytes().last().is_some_and(|b| b.is_ascii_digit());
    if !plain {
        return Err(bad("must be decimal text such as \"12.5\""));
    }
    let Ok(number) = serde_json::from_str::<&RawValue>(&inner) else {
        return Err(bad("must be decimal text such as \"12.5\""));
    };
    parse_quantity(number, kind, field)
}

/// The customer and agreement of a `LicenseArn` (Concurrent Agreements): the licence must be one
/// of this product's, and may name no other customer than the record's identifier does.
fn resolve_license(
    wire: &WireRecord<'_>,
    arn: &str,
    product: &str,
    at: Timestamp,
    book: &PriceBook,
) -> Result<(String, CustomerRef), Rejection> {
    let bad = |why: String| reject(RejectCode::InvalidLicense, why);
    let shown = truncate(arn, 96);
    let Some(agreement) = book.agreement_by_license(arn) else {
        return Err(bad(format!("LicenseArn `{shown}` is not a licence of this seller")));
    };
    if agreement.product != product {
        return Err(bad(format!("LicenseArn `{shown}` is a licence for another product than `{product}`")));
    }
    if names_customer(wire) {
        let (named, _) = resolve_customer(wire, book)?;
        if named != agreement.customer {
            return Err(bad(format!("LicenseArn `{shown}` belongs to another customer than the record names")));
        }
    }
    if !agreement.active_at(at) {
        return Err(bad(format!("LicenseArn `{shown}` is not active at {at} (agreement `{}`)", agreement.id)));
    }
    Ok((agreement.customer.clone(), CustomerRef::License(arn.to_owned())))
}

/// `CustomerIdentifier`, with `""` read as absent: the current model allows it empty, and the AWS
/// SDK for Rust always sends it (as `""` when the caller set only `CustomerAWSAccountId`).
fn customer_identifier<'w>(wire: &'w WireRecord<'_>) -> Option<&'w str> {
    wire.customer_identifier.as_deref().filter(|s| !s.is_empty())
}

/// Whether the record names a customer by any identifier.
fn names_customer(wire: &WireRecord<'_>) -> bool {
    customer_identifier(wire).is_some() || wire.customer_aws_account_id.is_some() || wire.customer_id.is_some()
}

fn resolve_customer(wire: &WireRecord<'_>, book: &PriceBook) -> Result<(String, CustomerRef), Rejection> {
    let given =
        [customer_identifier(wire).is_some(), wire.customer_aws_account_id.is_some(), wire.customer_id.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
    if given == 0 {
        return Err(reject(
            RejectCode::InvalidCustomerIdentifier,
            "one of CustomerIdentifier or CustomerAWSAccountId is required",
        ));
    }
    if given > 1 {
        return Err(reject(
            RejectCode::InvalidCustomerIdentifier,
            "CustomerIdentifier and CustomerAWSAccountId are mutually exclusive; send one",
        ));
    }
    let found = if let Some(ci) = customer_identifier(wire) {
        if ci.len() > 255 {
            return Err(reject(RejectCode::InvalidCustomerIdentifier, "CustomerIdentifier must be 1–255 characters"));
        }
        book.customer_by_identifier(ci).map(|c| (c.id.clone(), CustomerRef::CustomerIdentifier)).ok_or(ci)
    } else if let Some(acct) = wire.customer_aws_account_id.as_deref() {
        if acct.is_empty() || acct.len() > 255 || !acct.bytes().all(|b| b.is_ascii_digit()) {
            return Err(reject(
                RejectCode::InvalidCustomerIdentifier,
                format!("CustomerAWSAccountId `{}` must be 1–255 digits", truncate(acct, 64)),
            ));
        }
        book.customer_by_account(acct).map(|c| (c.id.clone(), CustomerRef::AwsAccountId)).ok_or(acct)
    } else {
        let id = wire.customer_id.as_deref().unwrap_or_default();
        book.customer(id).map(|c| (c.id.clone(), CustomerRef::CustomerId)).ok_or(id)
    };
    found.map_err(|who| {
        reject(
            RejectCode::CustomerNotSubscribed,
            format!("customer `{}` is not subscribed to anything here", truncate(who, 64)),
        )
    })
}

/// `s` cut to `n` characters (with `…`), so a hostile value cannot bloat a reason or a log line.
pub fn truncate(s: &str, n: usize) -> Cow<'_, str> {
    if s.chars().count() <= n {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{}…", s.chars().take(n).collect::<String>()))
    }
}

/// Parses `Timestamp`: epoch seconds as a JSON number (what AWS SDKs send; fractions allowed) or
/// an RFC 3339 string.
pub fn parse_timestamp(raw: Option<&RawValue>) -> Result<Timestamp, Rejection> {
    let bad = |why: String| reject(RejectCode::InvalidRecord, why);
    let Some(raw) = raw else { return Err(bad("Timestamp is missing".into())) };
    let text = raw.get();
    if text.starts_with('"') {
        let s: Cow<'_, str> = serde_json::from_str(text).map_err(|e| bad(format!("Timestamp: {e}")))?;
        return Timestamp::parse_rfc3339(&s).map_err(|e| bad(format!("Timestamp: {e}")));
    }
    if text == "null" {
        return Err(bad("Timestamp is missing".into()));
    }
    let secs = parse_number(text).map_err(|e| bad(format!("Timestamp {}: {e}", truncate(text, 40))))?;
    // Years 1970–9999 in seconds; anything else is a unit mistake (milliseconds sent as seconds).
    if secs.is_sign_negative() || secs > Decimal::from(253_402_300_799i64) {
        return Err(bad(format!("Timestamp {} is not epoch seconds between 1970 and 9999", truncate(text, 40))));
    }
    let ms = (secs * Decimal::from(1000)).floor();
    let ms: i64 = ms.try_into().map_err(|_| bad(format!("Timestamp {} is out of range", truncate(text, 40))))?;
    Ok(Timestamp(ms))
}

fn parse_number(text: &str) -> Result<Decimal, String> {
    let first = text.bytes().next();
    if !matches!(first, Some(b'-' | b'0'..=b'9')) {
        return Err("is not a number".into());
    }
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).map_err(|_| "is not a representable number".into())
    } else {
        Decimal::from_str_exact(text).map_err(|e| match e {
            rust_decimal::Error::Underflow => "has too many decimal places".into(),
            _ => "is too large".into(),
        })
    }
}

/// Parses a quantity exactly under the profile's rules.
pub fn parse_quantity(raw: &RawValue, kind: QuantityKind, field: &str) -> Result<Decimal, Rejection> {
    let text = raw.get();
    let bad = |why: String| reject(RejectCode::InvalidQuantity, format!("{field} {}: {why}", truncate(text, 40)));
    if text == "null" {
        return Err(bad("is null; send a number (0 for an idle hour)".into()));
    }
    if text.starts_with('"') {
        return Err(bad("must be a JSON number, not a string".into()));
    }
    let q = parse_number(text).map_err(bad)?;
    if q.is_sign_negative() && !q.is_zero() {
        return Err(bad("must not be negative".into()));
    }
    match kind {
        QuantityKind::Integer => {
            if !q.fract().is_zero() {
                return Err(bad("must be a whole number under this marketplace".into()));
            }
            if q > Decimal::from(MAX_INTEGER_QUANTITY) {
                return Err(bad(format!("exceeds the maximum of {MAX_INTEGER_QUANTITY}")));
            }
        }
        QuantityKind::Decimal => {
            if q.normalize().scale() > MAX_QUANTITY_SCALE {
                return Err(bad(format!("has more than {MAX_QUANTITY_SCALE} decimal places")));
            }
            if q > Decimal::from(MAX_DECIMAL_QUANTITY) {
                return Err(bad(format!("exceeds the maximum of {MAX_DECIMAL_QUANTITY}")));
            }
        }
    }
    Ok(q.normalize())
}

/// Characters allowed in tag keys and values: the prose list of MET-17 (letters, digits, space and
/// `+ - = . _ : / \ @`), not the regex whose ` -=` range would also let `#`, `%`, `,` through.
fn tag_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || " +-=._:/\\@".contains(c)
}

fn validate_tag(key: &str, value: &str) -> Result<Tag, Rejection> {
    let bad = |why: String| reject(RejectCode::InvalidTag, why);
    let klen = key.chars().count();
    if klen == 0 || klen > 100 {
        return Err(bad(format!("tag key `{}` must be 1–100 characters (has {klen})", truncate(key, 40))));
    }
    let vlen = value.chars().count();
    if vlen == 0 || vlen > 256 {
        return Err(bad(format!("tag `{}` value must be 1–256 characters (has {vlen})", truncate(key, 40))));
    }
    for (what, s) in [("key", key), ("value", value)] {
        if let Some(c) = s.chars().find(|c| !tag_char_ok(*c)) {
            return Err(bad(format!(
                "tag {what} `{}` contains `{c}`; allowed are letters, digits, space and + - = . _ : / \\ @",
                truncate(s, 40)
            )));
        }
    }
    Ok(Tag { key: key.to_owned(), value: value.to_owned() })
}

fn validate_allocations(
    list: &[WireAllocation<'_>],
    quantity: Decimal,
    cx: &Context<'_>,
) -> Result<Vec<Allocation>, Rejection> {
    let profile = cx.book.marketplace();
    let bad = |why: String| reject(RejectCode::InvalidUsageAllocations, why);
    if list.is_empty() {
        return Err(bad("UsageAllocations is empty; omit it or list at least one allocation".into()));
    }
    if list.len() > profile.max_allocations {
        return Err(bad(format!("{} allocations; at most {} per record", list.len(), profile.max_allocations)));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut seen: HashSet<Vec<Tag>> = HashSet::with_capacity(list.len());
    let mut sum = Decimal::ZERO;
    for (i, a) in list.iter().enumerate() {
        let n = i + 1;
        // Exactly one of the two fields, as the current model says (and as for the record).
        let q = match (a.allocated_usage_quantity, a.allocated_usage_quantity_as_decimal) {
            (None, None) => {
                return Err(bad(format!(
                    "allocation {n}: AllocatedUsageQuantity or AllocatedUsageQuantityAsDecimal is required"
                )))
            }
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "allocation {n}: send one of AllocatedUsageQuantity and AllocatedUsageQuantityAsDecimal, not both"
                )))
            }
            (Some(raw), None) => parse_quantity(raw, profile.quantity, "AllocatedUsageQuantity"),
            (None, Some(raw)) => parse_decimal_quantity(raw, profile.quantity, "AllocatedUsageQuantityAsDecimal"),
        }
        .map_err(|r| bad(format!("allocation {n}: {}", r.message)))?;
        let mut tags = match &a.tags {
            None => Vec::new(),
            Some(t) if t.is_empty() => {
                return Err(reject(
                    RejectCode::InvalidTag,
                    format!("allocation {n}: Tags is empty; omit it for the untagged bucket"),
                ))
            }
            Some(t) if t.len() > profile.max_tags => {
                return Err(reject(
                    RejectCode::InvalidTag,
                    format!("allocation {n} has {} tags; at most {}", t.len(), profile.max_tags),
                ))
            }
            Some(t) => t.iter().map(|t| validate_tag(&t.key, &t.value)).collect::<Result<Vec<_>, _>>()?,
        };
        tags.sort();
        if tags.windows(2).any(|w| w[0].key == w[1].key) {
            return Err(reject(RejectCode::InvalidTag, format!("allocation {n} repeats a tag key")));
        }
        if !seen.insert(tags.clone()) {
            return Err(bad(if tags.is_empty() {
                format!("allocation {n} is a second untagged bucket; at most one allocation may omit Tags")
            } else {
                format!("allocation {n} repeats another allocation's tag set; merge them into one")
            }));
        }
        sum = sum.checked_add(q).ok_or_else(|| bad("allocations overflow".into()))?;
        out.push(Allocation { tags, quantity: q });
    }
    if sum != quantity {
        return Err(bad(format!("allocations sum to {sum} but Quantity is {quantity}; they must be equal")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
