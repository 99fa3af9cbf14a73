//! How a contract's entitlement meets metered usage (domain-rules §3.7, PRC-15), and BYOL's
//! paid-option rule (§3.8, PRC-16).
//!
//! A contract dimension that also has a usage price is ambiguous: is the metered quantity the
//! total usage (and the entitlement must be netted), or already only the overage (AWS's SaaS
//! rule: the seller meters only the usage beyond the entitlement)? Billing every unit silently
//! is the wrong answer either way, so the offer must say which with `contract_usage`; without
//! it the book is **refused** (not warned): the mistake costs money on every record and is
//! cheap to fix before anything is rated.
//!
//! Netting is per hour, the Y − X rule of annual coverage: the contracted quantity is the
//! hourly entitlement ("Standard tier incl. 20 hosts"). A volume over the whole term (data,
//! requests) cannot be netted per hour, so those categories must be metered as overage only.

use super::{invalid, Agreement, CatalogueError, Offer, PriceBookDoc, UsageCategory, UsagePrice};
use crate::time::{Timestamp, DAY_MS};
use serde::{Deserialize, Serialize};

/// Days after launch during which a BYOL-only product is allowed (PRC-16).
const BYOL_ONLY_GRACE_DAYS: i64 = 90;

/// What the metered usage of a contracted dimension is (PRC-15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractUsage {
    /// The seller meters total usage; each hour the agreement's contracted quantity of that
    /// dimension is netted first (billable = max(0, metered − entitled)), like annual coverage.
    NetAgainstEntitlement,
    /// The seller meters only the usage beyond the entitlement (AWS's SaaS rule): every metered
    /// unit is billed.
    OverageOnly,
}

/// Contract dimensions of `offer` that also have a usage price (the ambiguous form).
fn metered_contract_dimensions(offer: &Offer) -> Vec<&str> {
    let mut dims: Vec<&str> = offer
        .contract_prices
        .iter()
        .map(|c| c.dimension.as_str())
        .filter(|d| offer.prices.iter().any(|v| v.usage.contains_key(*d)))
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// Load-time check of an offer's `contract_usage`; `category` names a dimension's category.
pub(super) fn check_contract_usage(
    offer: &Offer,
    category: impl Fn(&str) -> Option<UsageCategory>,
) -> Result<(), CatalogueError> {
    let metered = metered_contract_dimensions(offer);
    match offer.contract_usage {
        None if !metered.is_empty() => Err(invalid(format!(
            "offer `{}`: `{}` is both a contract dimension and a metered one, which is ambiguous; set contract_usage = \"net_against_entitlement\" (usage is metered in full and the entitled units are netted each hour) or \"overage_only\" (only usage beyond the entitlement is metered, AWS's SaaS rule) (PRC-15)",
            offer.id,
            metered.join("`, `")
        ))),
        Some(_) if offer.contract_prices.is_empty() => Err(invalid(format!(
            "offer `{}`: contract_usage without contract_prices: there is no entitlement to meet usage",
            offer.id
        ))),
        Some(ContractUsage::NetAgainstEntitlement) => {
            if metered.is_empty() {
                return Err(invalid(format!(
                    "offer `{}`: contract_usage = \"net_against_entitlement\" but no contract dimension has a usage price to net",
                    offer.id
                )));
            }
            for d in metered {
                if matches!(category(d), Some(UsageCategory::Data | UsageCategory::Requests)) {
                    return Err(invalid(format!(
                        "offer `{}`: `{d}` is a volume over the contract term, which cannot be netted per hour; meter it as overage only (contract_usage = \"overage_only\")",
                        offer.id
                    )));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Units of `dimension` the agreement's contract entitles per hour at `t`, when its offer nets
/// metered usage against the entitlement (0 otherwise).
pub(super) fn entitled_units(agreement: &Agreement, dimension: &str, t: Timestamp) -> u64 {
    let Some(c) = agreement.contract.as_ref().filter(|c| c.nets_metered_usage) else { return 0 };
    if t < agreement.start || agreement.contract_end().is_some_and(|e| t >= e) {
        return 0;
    }
    c.quantities.iter().filter(|q| q.dimension == dimension).map(|q| u64::from(q.quantity)).sum()
}

/// Marks the contracts whose offer nets metered usage (so the per-record netting needs only the
/// agreement).
pub(super) fn mark_netting_contracts(doc: &mut PriceBookDoc) {
    let nets: std::collections::HashSet<String> = doc
        .offers
        .iter()
        .filter(|o| o.contract_usage == Some(ContractUsage::NetAgainstEntitlement))
        .map(|o| o.id.clone())
        .collect();
    for a in &mut doc.agreements {
        let net = nets.contains(&a.offer);
        if let Some(c) = a.contract.as_mut() {
            c.nets_metered_usage = net;
        }
    }
}

/// From when an offer charges for anything: its first version with a usage price other than
/// BYOL, or its first price at all when it has a monthly fee, a contract or an annual price.
fn paid_from(o: &Offer) -> Option<Timestamp> {
    let first = o.prices.iter().map(|v| v.effective_from).min();
    let usage = o
        .prices
        .iter()
        .filter(|v| v.usage.values().any(|p| !matches!(p, UsagePrice::Byol)))
        .map(|v| v.effective_from)
        .min();
    let terms = (o.monthly_fee.is_some() || !o.contract_prices.is_empty() || !o.annual_prices.is_empty())
        .then_some(first)
        .flatten();
    usage.into_iter().chain(terms).min()
}

/// PRC-16: a product priced BYOL must also have a paid option after its first 90 days. Launch is
/// the earliest price of its offers; the paid option must be in force by launch + 90 days, or
/// no agreement for the product may run past that day (the relaxation of the first 90 days).
pub(super) fn check_byol_paid_option(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    for p in &doc.products {
        let offers: Vec<&Offer> = doc.offers.iter().filter(|o| o.product == p.code).collect();
        let byol =
            offers.iter().any(|o| o.prices.iter().any(|v| v.usage.values().any(|u| matches!(u, UsagePrice::Byol))));
        let Some(launch) = offers.iter().flat_map(|o| o.prices.iter().map(|v| v.effective_from)).min() else {
            continue;
        };
        if !byol {
            continue;
        }
        let grace_end = Timestamp(launch.day() * DAY_MS).plus_millis(BYOL_ONLY_GRACE_DAYS * DAY_MS);
        if offers.iter().filter_map(|o| paid_from(o)).min().is_some_and(|t| t <= grace_end) {
            continue;
        }
        let late = doc.agreements.iter().find(|a| a.product == p.code && a.end.is_none_or(|e| e > grace_end));
        if let Some(a) = late {
            return Err(invalid(format!(
                "product `{}` has no paid option beside BYOL by {grace_end}, 90 days after its launch on {launch} (its first price), yet agreement `{}` runs past that day; AWS requires a paid option beside BYOL after the first 90 days (PRC-16)",
                p.code, a.id
            )));
        }
    }
    Ok(())
}
