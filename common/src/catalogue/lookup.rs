//! The lookups the per-record cores make on a validated price book: by key, code, id, account
//! and licence, the agreement and price in force at an hour, trials, resale, exchange rates.

use super::*;

impl PriceBook {
    /// The deployment a presented key belongs to (hashed, then looked up by hash: the key itself
    /// is never stored or compared).
    pub fn deployment_for_key(&self, key: &str) -> Option<&Deployment> {
        self.deployment_by_key_hash.get(&api_key_hash(key)).map(|&i| &self.doc.deployments[i])
    }

    /// The agreement a licence ARN was issued for.
    pub fn agreement_by_license(&self, arn: &str) -> Option<&Agreement> {
        self.agreement_by_license.get(arn).map(|&i| &self.doc.agreements[i])
    }

    /// The document.
    pub fn doc(&self) -> &PriceBookDoc {
        &self.doc
    }
    /// Version label.
    pub fn version(&self) -> &str {
        &self.doc.version
    }
    /// Marketplace rules.
    pub fn marketplace(&self) -> &MarketplaceProfile {
        &self.doc.marketplace
    }
    /// Acceptance windows in milliseconds.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// The seller an API key belongs to.
    pub fn seller_for_key(&self, key: &str) -> Option<&Seller> {
        self.seller_by_key_hash.get(&api_key_hash(key)).map(|&i| &self.doc.sellers[i])
    }

    /// A product by code.
    pub fn product(&self, code: &str) -> Option<&Product> {
        self.product_by_code.get(code).map(|&i| &self.doc.products[i])
    }

    /// A dimension of a product by exact (case-sensitive) key.
    pub fn dimension(&self, product: &str, key: &str) -> Option<&Dimension> {
        let &pi = self.product_by_code.get(product)?;
        self.dimension_by_key[pi].get(key).map(|&j| &self.doc.products[pi].dimensions[j])
    }

    /// A customer by catalogue id.
    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.customer_by_id.get(id).map(|&i| &self.doc.customers[i])
    }
    /// A customer by legacy `CustomerIdentifier`.
    pub fn customer_by_identifier(&self, ci: &str) -> Option<&Customer> {
        self.customer_by_identifier.get(ci).map(|&i| &self.doc.customers[i])
    }
    /// A customer by AWS account id.
    pub fn customer_by_account(&self, account: &str) -> Option<&Customer> {
        self.customer_by_account.get(account).map(|&i| &self.doc.customers[i])
    }

    /// An offer by id.
    pub fn offer(&self, id: &str) -> Option<&Offer> {
        self.offer_by_id.get(id).map(|&i| &self.doc.offers[i])
    }

    /// All agreements of a customer for a product, by start.
    pub fn agreements(&self, customer: &str, product: &str) -> impl Iterator<Item = &Agreement> + '_ {
        self.agreements_by_customer_product
            .get(customer)
            .and_then(|by_product| by_product.get(product))
            .into_iter()
            .flatten()
            .map(|&i| &self.doc.agreements[i])
    }

    /// The agreement covering instant `t`, if any.
    pub fn agreement_at(&self, customer: &str, product: &str, t: Timestamp) -> Option<&Agreement> {
        self.agreements(customer, product).find(|a| a.active_at(t))
    }

    /// The price of `dimension` for `customer` at `hour`: agreement, offer, version and price.
    ///
    /// A version reaches a subscriber who signed before it took effect only after its notice
    /// period (PRC-18); a container price decrease reaches everyone at once (edge 44).
    pub fn price_at(&self, customer: &str, product: &str, dimension: &str, hour: Hour) -> Option<PriceLookup<'_>> {
        let t = hour.start();
        let agreement = self.agreement_at(customer, product, t)?;
        let offer = self.offer(&agreement.offer)?;
        let container = self.product(product).is_some_and(|p| p.delivery == Delivery::Container);
        let notice_days = self.doc.marketplace.price_change_notice_days.unwrap_or(0);
        let versions = &offer.prices;
        for i in (0..versions.len()).rev() {
            let version = &versions[i];
            if version.effective_from > t {
                continue;
            }
            let price = version.usage.get(dimension)?;
            let applies_from = match (version.notified_at, i.checked_sub(1).map(|p| &versions[p])) {
                (Some(notified), Some(previous)) if agreement.signed_at() < version.effective_from => {
                    let decrease = container
                        && matches!((previous.usage.get(dimension), price),
                            (Some(UsagePrice::PerUnit(old)), UsagePrice::PerUnit(new)) if new <= old);
                    if decrease {
                        version.effective_from
                    } else {
                        version.effective_from.max(crate::time::existing_subscriber_effective(notified, notice_days))
                    }
                }
                _ => version.effective_from,
            };
            if applies_from <= t {
                return Some(PriceLookup { agreement, offer, version, price });
            }
        }
        None
    }

    /// Whether `hour` falls in a SaaS free trial of `agreement` (usage then is not charged).
    pub fn in_saas_trial(&self, agreement: &Agreement, offer: &Offer, hour: Hour) -> bool {
        offer.free_trial.as_ref().is_some_and(|tr| {
            tr.kind == TrialKind::Saas
                && hour.start() < agreement.start.plus_millis(i64::from(tr.days) * crate::time::DAY_MS)
        })
    }

    /// A resale authorisation by id.
    pub fn resale(&self, id: &str) -> Option<&ResaleAuthorization> {
        self.doc.resale.iter().find(|r| r.id == id)
    }

    /// An agreement by id.
    pub fn agreement(&self, id: &str) -> Option<&Agreement> {
        self.agreement_by_id.get(id).map(|&i| &self.doc.agreements[i])
    }

    /// The FX rate `from` → `to` in force at `t` (identity for the same currency).
    pub fn fx_rate(&self, from: Currency, to: Currency, t: Timestamp) -> Option<Decimal> {
        if from == to {
            return Some(Decimal::ONE);
        }
        self.doc
            .fx_rates
            .iter()
            .filter(|r| r.from == from && r.to == to && r.effective_from <= t)
            .max_by_key(|r| r.effective_from)
            .map(|r| r.rate)
    }

    /// Checks that `self` may replace `previous` over existing data: published dimensions are
    /// never renamed, re-categorised or removed (PRC-3); new ones may be added up to 24.
    pub fn check_evolution(&self, previous: &PriceBook) -> Result<(), CatalogueError> {
        for old in &previous.doc.products {
            let Some(new) = self.product(&old.code) else {
                return Err(invalid(format!("product `{}` was published and cannot be removed", old.code)));
            };
            for d in &old.dimensions {
                match new.dimensions.iter().find(|n| n.key == d.key) {
                    None => {
                        return Err(invalid(format!(
                            "product `{}`: published dimension `{}` was removed or renamed; dimensions are add-only",
                            old.code, d.key
                        )))
                    }
                    Some(n) if n.category != d.category => {
                        return Err(invalid(format!(
                            "product `{}`: published dimension `{}` changed category; that needs a new product",
                            old.code, d.key
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Units (X) of `dimension` covering `hour` under `agreement`: its annual coverage, plus
    /// the contracted quantity when the offer nets metered usage against the entitlement
    /// (`contract_usage = "net_against_entitlement"`, PRC-15).
    pub fn annual_units(agreement: &Agreement, dimension: &str, hour: Hour) -> u64 {
        let t = hour.start();
        let annual: u64 = agreement
            .annual
            .iter()
            .filter(|c| c.dimension == dimension && c.start <= t && t < c.end)
            .map(|c| u64::from(c.units))
            .sum();
        annual + entitlement::entitled_units(agreement, dimension, t)
    }
}
