//! PURE. Changes to a running catalogue: one operator call's list of changes applied to the
//! book in force, all or none, giving the next version.
//!
//! The result is validated by the same rules as a price-book file ([`PriceBook::new`], then
//! [`PriceBook::check_evolution`] against the book it replaces), plus the rules only a live
//! change can break, because usage was already rated under the book in force:
//! - a published price version is never edited or removed, and a new one starts now or later;
//!   existing subscribers get it per the notice rule (its `notified_at` is the change's time
//!   unless given, and may not be in the past);
//! - an agreement's start is not moved, and it ends (unsubscribe, cancellation, renewal) now or
//!   later, never before usage it already took; after its end its final records are accepted
//!   for the profile's final-records grace (the ingest rule that exists);
//! - nothing is deleted: products, offers, customers, agreements and authorisations are added,
//!   or changed where the rules above allow.

use super::{
    Agreement, AnnualCoverage, CatalogueError, Customer, Offer, PriceBook, PriceBookDoc, PriceVersion, Product,
    ResaleAuthorization, Seller,
};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// One applied list of changes, as the audit log shows it: who changed what, when, and which
/// version it made of which. The embedded store and the distributed catalogue topic keep the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1 (assigned by the log; 0 before it is recorded).
    pub seq: i64,
    /// The version the changes produced.
    pub version: String,
    /// The version they were applied to.
    pub previous: String,
    /// When.
    #[serde(with = "crate::time::rfc3339")]
    pub at: Timestamp,
    /// Who (the credential's name).
    pub actor: String,
    /// In which role.
    pub role: String,
    /// What, as sent.
    pub changes: Vec<Change>,
}

/// One change. `op` names it on the wire (`{"op": "subscribe", "agreement": {…}}`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Adds a seller, or changes its name (keys: `add_api_key` / `revoke_api_key`).
    PutSeller {
        /// The seller.
        seller: Seller,
    },
    /// Adds a product, or changes one; published dimensions stay (add-only).
    PutProduct {
        /// The product.
        product: Product,
    },
    /// Adds an offer (its prices then change only by `add_price_version`).
    AddOffer {
        /// The offer.
        offer: Offer,
    },
    /// Adds a price version to an offer.
    AddPriceVersion {
        /// Offer id.
        offer: String,
        /// The version; `notified_at` defaults to the change's time.
        version: PriceVersion,
    },
    /// Adds a customer, or changes its name and identifiers.
    PutCustomer {
        /// The customer.
        customer: Customer,
    },
    /// A subscription: adds an agreement, possibly future-dated (it is in force from its start).
    Subscribe {
        /// The agreement.
        agreement: Agreement,
    },
    /// Ends an agreement at `at` (default: the change's time). Final records are accepted for the
    /// profile's final-records grace after it. AWS's cancellation is the same change.
    #[serde(alias = "cancel")]
    Unsubscribe {
        /// Agreement id.
        agreement: String,
        /// The end; not in the past.
        #[serde(default, with = "crate::time::rfc3339_opt")]
        at: Option<Timestamp>,
    },
    /// Renews an agreement: it ends where `renewal` starts, and `renewal` is added as a renewal.
    Renew {
        /// The agreement renewed.
        agreement: String,
        /// The new agreement (same customer and product).
        renewal: Agreement,
    },
    /// AWS's entitlement-updated event: a contract's quantities change mid-term (an upgrade). The
    /// agreement ends where `updated` starts, and `updated` (same customer and product, with a
    /// contract) is added as its replacement (`contract.replaces`): the close credits the unused
    /// part of the old contract pro rata and invoices the new one (PRC-14).
    UpdateEntitlement {
        /// The agreement whose entitlement changes.
        agreement: String,
        /// The agreement with the new quantities, starting now or later.
        updated: Agreement,
    },
    /// Adds annual coverage bought under an agreement (starting now or later).
    AddAnnualPurchase {
        /// Agreement id.
        agreement: String,
        /// The coverage.
        coverage: AnnualCoverage,
    },
    /// Adds a resale authorisation, or changes one.
    PutResaleAuthorization {
        /// The authorisation.
        authorization: ResaleAuthorization,
    },
    /// Lets a seller use one more API key (its SHA-256, hex; the key itself is never sent here).
    AddApiKey {
        /// Seller id.
        seller: String,
        /// SHA-256 of the key, hex.
        api_key_sha256: String,
    },
    /// Stops a seller's API key.
    RevokeApiKey {
        /// Seller id.
        seller: String,
        /// SHA-256 of the key, hex.
        api_key_sha256: String,
    },
}

impl Change {
    /// The `op` name, for messages and the audit log.
    pub fn op(&self) -> &'static str {
        match self {
            Change::PutSeller { .. } => "put_seller",
            Change::PutProduct { .. } => "put_product",
            Change::AddOffer { .. } => "add_offer",
            Change::AddPriceVersion { .. } => "add_price_version",
            Change::PutCustomer { .. } => "put_customer",
            Change::Subscribe { .. } => "subscribe",
            Change::Unsubscribe { .. } => "unsubscribe",
            Change::Renew { .. } => "renew",
            Change::UpdateEntitlement { .. } => "update_entitlement",
            Change::AddAnnualPurchase { .. } => "add_annual_purchase",
            Change::PutResaleAuthorization { .. } => "put_resale_authorization",
            Change::AddApiKey { .. } => "add_api_key",
            Change::RevokeApiKey { .. } => "revoke_api_key",
        }
    }

    /// The products this change concerns (a seller-role caller may change only its own); `None`
    /// for changes of sellers and customers, which name no product.
    pub fn products<'a>(&'a self, book: &'a PriceBook) -> Option<Vec<&'a str>> {
        let of_agreement = |id: &str| book.doc().agreements.iter().find(|a| a.id == id).map(|a| a.product.as_str());
        let of_offer = |id: &str| book.doc().offers.iter().find(|o| o.id == id).map(|o| o.product.as_str());
        Some(match self {
            Change::PutSeller { .. } | Change::PutCustomer { .. } => return None,
            Change::AddApiKey { .. } | Change::RevokeApiKey { .. } => return None,
            Change::PutProduct { product } => vec![product.code.as_str()],
            Change::AddOffer { offer } => vec![offer.product.as_str()],
            Change::AddPriceVersion { offer, .. } => of_offer(offer).into_iter().collect(),
            Change::Subscribe { agreement } => vec![agreement.product.as_str()],
            Change::Unsubscribe { agreement, .. } | Change::AddAnnualPurchase { agreement, .. } => {
                of_agreement(agreement).into_iter().collect()
            }
            Change::Renew { agreement, renewal } | Change::UpdateEntitlement { agreement, updated: renewal } => {
                of_agreement(agreement).into_iter().chain([renewal.product.as_str()]).collect()
            }
            Change::PutResaleAuthorization { authorization } => vec![authorization.product.as_str()],
        })
    }
}

/// Why a list of changes was refused: the first change that breaks a rule, or the rule the
/// resulting book breaks. Nothing was applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeError {
    /// One change cannot be applied to the book as it is.
    #[error("change {index} ({op}): {why}")]
    Change {
        /// Position in the list, from 0.
        index: usize,
        /// Its `op`.
        op: &'static str,
        /// The rule it breaks.
        why: String,
    },
    /// The book the changes make breaks a catalogue rule.
    #[error("the changes make a book that breaks a catalogue rule: {0}")]
    Book(String),
    /// The caller changed an older version than the one in force.
    #[error("the changes were made against version `{expected}` but `{current}` is in force: read it and retry")]
    VersionConflict {
        /// The version the caller read.
        expected: String,
        /// The version in force.
        current: String,
    },
}

/// The version label after `current`: `label+1`, `label+2`, …
pub fn next_version(current: &str) -> String {
    match current.rsplit_once('+') {
        Some((base, n)) if n.parse::<u64>().is_ok() => format!("{base}+{}", n.parse::<u64>().unwrap_or(0) + 1),
        _ => format!("{current}+1"),
    }
}

/// Applies `changes` to `book` at `now`: the next version's book, validated, or why not.
/// `if_version` is the version the caller read (optimistic concurrency); `None` skips the check.
pub fn apply(
    book: &PriceBook,
    changes: &[Change],
    now: Timestamp,
    if_version: Option<&str>,
) -> Result<PriceBook, ChangeError> {
    if let Some(expected) = if_version {
        if expected != book.version() {
            return Err(ChangeError::VersionConflict { expected: expected.to_owned(), current: book.version().into() });
        }
    }
    let mut doc = book.doc().clone();
    for (index, change) in changes.iter().enumerate() {
        apply_one(&mut doc, change, now).map_err(|why| ChangeError::Change { index, op: change.op(), why })?;
    }
    doc.version = next_version(book.version());
    let next = PriceBook::new(doc).map_err(book_error)?;
    next.check_evolution(book).map_err(book_error)?;
    Ok(next)
}

fn book_error(e: CatalogueError) -> ChangeError {
    ChangeError::Book(match e {
        CatalogueError::Invalid(m) | CatalogueError::Parse(m) => m,
        other => other.to_string(),
    })
}

/// Replaces the element `same` finds, or appends `new`.
fn put<T>(list: &mut Vec<T>, new: T, same: impl Fn(&T) -> bool) -> bool {
    match list.iter_mut().find(|x| same(x)) {
        Some(old) => {
            *old = new;
            true
        }
        None => {
            list.push(new);
            false
        }
    }
}

fn not_before_now(what: &str, t: Timestamp, now: Timestamp) -> Result<(), String> {
    if t < now {
        return Err(format!("{what} {t} is in the past (now {now}): usage already rated would change"));
    }
    Ok(())
}

fn apply_one(doc: &mut PriceBookDoc, change: &Change, now: Timestamp) -> Result<(), String> {
    match change {
        Change::PutSeller { seller } => {
            let mut seller = seller.clone();
            if let Some(old) = doc.sellers.iter().find(|s| s.id == seller.id) {
                if !seller.api_key_sha256.is_empty() && seller.api_key_sha256 != old.api_key_sha256 {
                    return Err("keys change by add_api_key / revoke_api_key, not put_seller".into());
                }
                seller.api_key_sha256.clone_from(&old.api_key_sha256);
            }
            let id = seller.id.clone();
            put(&mut doc.sellers, seller, |s| s.id == id);
        }
        Change::PutProduct { product } => {
            put(&mut doc.products, product.clone(), |p| p.code == product.code);
        }
        Change::AddOffer { offer } => {
            if doc.offers.iter().any(|o| o.id == offer.id) {
                return Err(format!(
                    "offer `{}` exists; its prices change by add_price_version, its terms by a new offer",
                    offer.id
                ));
            }
            if let Some(v) = offer.prices.iter().find(|v| v.effective_from < now) {
                not_before_now("a price version's effective_from", v.effective_from, now)?;
            }
            doc.offers.push(offer.clone());
        }
        Change::AddPriceVersion { offer, version } => {
            let Some(o) = doc.offers.iter_mut().find(|o| &o.id == offer) else {
                return Err(format!("offer `{offer}` does not exist"));
            };
            not_before_now("effective_from", version.effective_from, now)?;
            if o.prices.iter().any(|v| v.effective_from == version.effective_from) {
                return Err(format!(
                    "offer `{offer}` has a price version effective from {} already; published versions are not edited",
                    version.effective_from
                ));
            }
            let mut v = version.clone();
            // The change is the notice to existing subscribers, where the profile has a notice rule.
            if doc.marketplace.price_change_notice_days.is_some() {
                let notified = *v.notified_at.get_or_insert(now);
                not_before_now("notified_at", notified, now)?;
            }
            o.prices.push(v);
        }
        Change::PutCustomer { customer } => {
            put(&mut doc.customers, customer.clone(), |c| c.id == customer.id);
        }
        Change::Subscribe { agreement } => add_agreement(doc, agreement.clone(), now)?,
        Change::Unsubscribe { agreement, at } => {
            end_agreement(doc, agreement, at.unwrap_or(now), now)?;
        }
        Change::Renew { agreement, renewal } => {
            let old = find_agreement(doc, agreement)?;
            if (old.customer.as_str(), old.product.as_str()) != (renewal.customer.as_str(), renewal.product.as_str()) {
                return Err(format!(
                    "renewal `{}` is for {} / {}, agreement `{agreement}` for {} / {}",
                    renewal.id, renewal.customer, renewal.product, old.customer, old.product
                ));
            }
            if old.end.is_none_or(|e| e > renewal.start) {
                end_agreement(doc, agreement, renewal.start, now)?;
            }
            add_agreement(doc, Agreement { renewal: true, ..renewal.clone() }, now)?;
        }
        Change::UpdateEntitlement { agreement, updated } => {
            let old = find_agreement(doc, agreement)?;
            if (old.customer.as_str(), old.product.as_str()) != (updated.customer.as_str(), updated.product.as_str()) {
                return Err(format!(
                    "agreement `{}` is for {} / {}, agreement `{agreement}` for {} / {}",
                    updated.id, updated.customer, updated.product, old.customer, old.product
                ));
            }
            if old.contract.is_none() {
                return Err(format!(
                    "agreement `{agreement}` has no contract: an entitlement update changes a contract's quantities"
                ));
            }
            let Some(contract) = updated.contract.clone() else {
                return Err(format!("agreement `{}` needs `contract` with the new quantities", updated.id));
            };
            end_agreement(doc, agreement, updated.start, now)?;
            let contract = super::AgreementContract { replaces: Some(agreement.clone()), ..contract };
            add_agreement(doc, Agreement { contract: Some(contract), renewal: false, ..updated.clone() }, now)?;
        }
        Change::AddAnnualPurchase { agreement, coverage } => {
            not_before_now("the coverage's start", coverage.start, now)?;
            let a = doc.agreements.iter_mut().find(|a| &a.id == agreement).ok_or_else(|| no_agreement(agreement))?;
            a.annual.push(coverage.clone());
        }
        Change::PutResaleAuthorization { authorization } => {
            put(&mut doc.resale, authorization.clone(), |r| r.id == authorization.id);
        }
        Change::AddApiKey { seller, api_key_sha256 } => {
            let s = find_seller(doc, seller)?;
            let hash = api_key_sha256.to_ascii_lowercase();
            if s.api_key_sha256.iter().any(|k| k.eq_ignore_ascii_case(&hash)) {
                return Err(format!("seller `{seller}` has this key already"));
            }
            s.api_key_sha256.push(hash);
        }
        Change::RevokeApiKey { seller, api_key_sha256 } => {
            let s = find_seller(doc, seller)?;
            let before = s.api_key_sha256.len();
            s.api_key_sha256.retain(|k| !k.eq_ignore_ascii_case(api_key_sha256));
            if s.api_key_sha256.len() == before {
                return Err(format!("seller `{seller}` has no such key"));
            }
        }
    }
    Ok(())
}

fn no_agreement(id: &str) -> String {
    format!("agreement `{id}` does not exist")
}

fn find_agreement<'a>(doc: &'a PriceBookDoc, id: &str) -> Result<&'a Agreement, String> {
    doc.agreements.iter().find(|a| a.id == id).ok_or_else(|| no_agreement(id))
}

fn find_seller<'a>(doc: &'a mut PriceBookDoc, id: &str) -> Result<&'a mut Seller, String> {
    doc.sellers.iter_mut().find(|s| s.id == id).ok_or_else(|| format!("seller `{id}` does not exist"))
}

fn add_agreement(doc: &mut PriceBookDoc, agreement: Agreement, now: Timestamp) -> Result<(), String> {
    if doc.agreements.iter().any(|a| a.id == agreement.id) {
        return Err(format!(
            "agreement `{}` exists; agreements are not replaced (end it, then subscribe)",
            agreement.id
        ));
    }
    // A subscription may start at the top of the current hour (AWS meters the hour of
    // subscribing), not earlier: earlier usage was refused as having no agreement.
    not_before_now("the agreement's start", agreement.start, now.hour().start())?;
    doc.agreements.push(agreement);
    Ok(())
}

fn end_agreement(doc: &mut PriceBookDoc, id: &str, at: Timestamp, now: Timestamp) -> Result<(), String> {
    let a = doc.agreements.iter_mut().find(|a| a.id == id).ok_or_else(|| no_agreement(id))?;
    if let Some(end) = a.end.filter(|&e| e <= now) {
        return Err(format!("agreement `{id}` ended at {end} already"));
    }
    not_before_now("the end", at, now)?;
    if at < a.start {
        return Err(format!("the end {at} is before the agreement's start {}", a.start));
    }
    a.end = Some(at);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::tests::SAMPLE;

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }
    fn book() -> PriceBook {
        PriceBook::from_toml(SAMPLE).unwrap()
    }
    fn changes(json: serde_json::Value) -> Vec<Change> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn versions_count_up_from_the_file_label() {
        assert_eq!(next_version("test-1"), "test-1+1");
        assert_eq!(next_version("test-1+1"), "test-1+2");
        assert_eq!(next_version("a+b"), "a+b+1");
    }

    #[test]
    fn a_version_conflict_is_refused_before_anything_is_applied() {
        let b = book();
        let e = apply(&b, &[], at("2026-12-01T00:00:00Z"), Some("old")).unwrap_err();
        assert!(matches!(e, ChangeError::VersionConflict { .. }), "{e}");
        assert!(e.to_string().contains("`test-1` is in force"), "{e}");
        assert_eq!(apply(&b, &[], at("2026-12-01T00:00:00Z"), Some("test-1")).unwrap().version(), "test-1+1");
    }

    #[test]
    fn a_refused_change_names_its_position_and_rule_and_the_book_is_unchanged() {
        let b = book();
        let list = changes(serde_json::json!([
            { "op": "put_customer", "customer": { "id": "newco" } },
            { "op": "unsubscribe", "agreement": "agmnt-nope" },
        ]));
        let e = apply(&b, &list, at("2026-12-01T00:00:00Z"), None).unwrap_err();
        assert_eq!(e.to_string(), "change 1 (unsubscribe): agreement `agmnt-nope` does not exist");
        assert!(b.doc().customers.iter().all(|c| c.id != "newco"));
    }

    #[test]
    fn an_unknown_op_or_field_does_not_parse() {
        assert!(serde_json::from_value::<Change>(serde_json::json!({ "op": "delete_customer", "id": "x" })).is_err());
        let typo = serde_json::json!({ "op": "unsubscribe", "agreement": "a", "att": "2026-12-01T00:00:00Z" });
        assert!(serde_json::from_value::<Change>(typo).is_err());
    }

    #[test]
    fn an_entitlement_update_ends_the_contract_where_the_upgrade_starts() {
        let book = PriceBook::from_toml(include_str!("../../../docs/examples/price-models.toml")).unwrap();
        let now = at("2026-12-02T10:20:00Z");
        let update = |quantities: serde_json::Value| {
            changes(serde_json::json!([{ "op": "update_entitlement", "agreement": "agmnt-standard", "updated": {
                "id": "agmnt-premium", "customer": "standardco", "product": "saas-contract", "offer": "contract-public",
                "start": "2026-12-02T10:20:00Z", "contract": { "months": 12, "quantities": quantities } } }]))
        };
        let next =
            apply(&book, &update(serde_json::json!([{ "dimension": "tier_premium", "quantity": 1 }])), now, None)
                .unwrap();
        let old = next.doc().agreements.iter().find(|a| a.id == "agmnt-standard").unwrap();
        assert_eq!(old.end, Some(at("2026-12-02T10:20:00Z")));
        let new = next.doc().agreements.iter().find(|a| a.id == "agmnt-premium").unwrap();
        assert_eq!(new.contract.as_ref().unwrap().replaces.as_deref(), Some("agmnt-standard"));
        // The close's credit of the unused part: aggregator::close's test of the same change.
        // Not a contract, or not the same customer: refused, naming why.
        let e = apply(
            &book,
            &changes(serde_json::json!([{ "op": "update_entitlement", "agreement": "agmnt-basic",
            "updated": { "id": "x", "customer": "otherco", "product": "saas-contract", "offer": "contract-public",
            "start": "2026-12-02T10:00:00Z" } }])),
            now,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("change 0 (update_entitlement)"), "{e}");
    }

    #[test]
    fn a_customer_subscribed_now_is_in_force_and_a_future_dated_one_from_its_start() {
        let now = at("2026-12-01T10:20:00Z");
        let list = changes(serde_json::json!([
            { "op": "put_customer", "customer": { "id": "newco", "customer_identifier": "cid-new" } },
            { "op": "subscribe", "agreement": { "id": "agmnt-new", "customer": "newco", "product": "acme-analytics",
              "offer": "public", "start": "2026-12-01T10:00:00Z" } },
            { "op": "put_customer", "customer": { "id": "laterco" } },
            { "op": "subscribe", "agreement": { "id": "agmnt-later", "customer": "laterco", "product": "acme-analytics",
              "offer": "public", "start": "2027-01-01T00:00:00Z" } },
        ]));
        let next = apply(&book(), &list, now, Some("test-1")).unwrap();
        assert!(next.agreement_at("newco", "acme-analytics", now).is_some());
        assert!(next.agreement_at("laterco", "acme-analytics", now).is_none());
        let start = at("2027-01-01T00:00:00Z");
        assert_eq!(next.agreement_at("laterco", "acme-analytics", start).unwrap().id, "agmnt-later");
        // A start before the current hour would reach back over usage already refused.
        let early = changes(serde_json::json!([{ "op": "subscribe", "agreement": { "id": "agmnt-x", "customer": "c1",
            "product": "acme-analytics", "offer": "public", "start": "2026-12-01T09:00:00Z" } }]));
        let e = apply(&book(), &early, now, None).unwrap_err().to_string();
        assert!(e.contains("change 0 (subscribe): the agreement's start") && e.contains("in the past"), "{e}");
        // The resulting book is checked as a file would be: an unknown offer is refused.
        let bad = changes(serde_json::json!([{ "op": "subscribe", "agreement": { "id": "agmnt-y", "customer": "c1",
            "product": "acme-analytics", "offer": "no-such-offer", "start": "2026-12-01T11:00:00Z" } }]));
        assert!(matches!(apply(&book(), &bad, now, None).unwrap_err(), ChangeError::Book(_)));
    }

    #[test]
    fn an_unsubscribe_ends_the_agreement_now_or_later_never_before() {
        let now = at("2026-12-01T10:20:00Z");
        let end = changes(serde_json::json!([{ "op": "unsubscribe", "agreement": "agmnt-1" }]));
        let next = apply(&book(), &end, now, None).unwrap();
        let a = next.doc().agreements.iter().find(|a| a.id == "agmnt-1").unwrap();
        assert_eq!(a.end, Some(now));
        let again = apply(&next, &end, at("2026-12-01T11:00:00Z"), None).unwrap_err().to_string();
        assert!(again.contains("ended at 2026-12-01T10:20:00.000Z already"), "{again}");
        let past =
            changes(serde_json::json!([{ "op": "cancel", "agreement": "agmnt-1", "at": "2026-11-30T00:00:00Z" }]));
        assert!(apply(&book(), &past, now, None).unwrap_err().to_string().contains("in the past"));
    }

    #[test]
    fn a_price_version_is_added_for_now_or_later_with_the_change_as_its_notice() {
        let now = at("2026-12-01T10:20:00Z");
        let v = |from: &str| {
            changes(serde_json::json!([{ "op": "add_price_version", "offer": "public", "version": {
                "effective_from": from, "usage": { "users": { "per_unit": "0.02" }, "gb_ingest": { "per_unit": "0.10" } } } }]))
        };
        // Without a notice rule in the profile the version applies to everyone from its start.
        let plain = apply(&book(), &v("2027-01-01T00:00:00Z"), now, None).unwrap();
        assert_eq!(plain.offer("public").unwrap().prices.last().unwrap().notified_at, None);
        // With one, the change is the notice: existing subscribers get it per the notice rule.
        let noticed =
            SAMPLE.replace("usage_rate_decimals = 8", "usage_rate_decimals = 8\nprice_change_notice_days = 90");
        let next = apply(&PriceBook::from_toml(&noticed).unwrap(), &v("2027-01-01T00:00:00Z"), now, None).unwrap();
        let offer = next.offer("public").unwrap();
        assert_eq!(offer.prices.last().unwrap().notified_at, Some(now));
        assert!(apply(&book(), &v("2026-11-01T00:00:00Z"), now, None).unwrap_err().to_string().contains("in the past"));
        let dup = apply(&next, &v("2027-01-01T00:00:00Z"), now, None).unwrap_err().to_string();
        assert!(dup.contains("published versions are not edited"), "{dup}");
    }

    #[test]
    fn a_published_dimension_cannot_be_removed_by_a_product_change() {
        let list = changes(serde_json::json!([{ "op": "put_product", "product": { "code": "acme-analytics",
            "seller": "acme", "delivery": "saas", "dimensions": [ { "key": "users", "category": "users", "unit": "user-hour" } ] } }]));
        let e = apply(&book(), &list, at("2026-12-01T00:00:00Z"), None).unwrap_err();
        assert!(matches!(e, ChangeError::Book(_)) && e.to_string().contains("gb_ingest"), "{e}");
    }
}
