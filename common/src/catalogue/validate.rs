//! The price book's rules, checked as a whole when a document is loaded ([`PriceBook::new`]):
//! each refusal names the entity and the rule it breaks. The indexes are built here too, from
//! a document that passed.

use super::*;

impl PriceBook {
    /// Validates a document and builds the indexes.
    pub fn new(mut doc: PriceBookDoc) -> Result<Self, CatalogueError> {
        let m = &doc.marketplace;
        let dur = |name: &str, v: &str| parse_duration_ms(v).map_err(|e| invalid(format!("marketplace.{name}: {e}")));
        let windows = Windows {
            acceptance_ms: dur("acceptance_window", &m.acceptance_window)?,
            future_skew_ms: dur("future_skew", &m.future_skew)?,
            final_grace_ms: dur("final_records_grace", &m.final_records_grace)?,
        };
        if m.currency.minor_units().is_none() {
            return Err(invalid(format!("marketplace `{}`: currency {} has no known minor unit", m.id, m.currency)));
        }
        if m.usage_rate_decimals > 12 {
            return Err(invalid("marketplace.usage_rate_decimals: at most 12 (amounts are stored at scale 12)"));
        }
        if doc.version.trim().is_empty() {
            return Err(invalid("version: the price book needs a version label"));
        }

        let mut seller_ids = HashSet::new();
        let mut seller_by_key_hash = HashMap::new();
        for (i, s) in doc.sellers.iter().enumerate() {
            if !seller_ids.insert(s.id.as_str()) {
                return Err(invalid(format!("seller `{}` is defined twice", s.id)));
            }
            for h in &s.api_key_sha256 {
                let bytes: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| invalid(format!("seller `{}`: api_key_sha256 entry is not 64 hex digits", s.id)))?;
                if seller_by_key_hash.insert(bytes, i).is_some() {
                    return Err(invalid(format!("seller `{}`: an API key is listed twice", s.id)));
                }
            }
        }

        let mut product_by_code = HashMap::new();
        let mut dimension_by_key = Vec::new();
        for (i, p) in doc.products.iter().enumerate() {
            if product_by_code.insert(p.code.clone(), i).is_some() {
                return Err(invalid(format!("product `{}` is defined twice", p.code)));
            }
            if !valid_product_code(&p.code) {
                return Err(invalid(format!("product `{}`: code must be 1–255 chars of [-a-zA-Z0-9/=:_.@]", p.code)));
            }
            if !seller_ids.contains(p.seller.as_str()) {
                return Err(invalid(format!("product `{}`: seller `{}` is not defined", p.code, p.seller)));
            }
            if p.dimensions.is_empty() {
                return Err(invalid(format!("product `{}` has no dimensions", p.code)));
            }
            if p.dimensions.len() > MAX_DIMENSIONS {
                return Err(invalid(format!(
                    "product `{}` has {} dimensions; a product may have at most {MAX_DIMENSIONS}",
                    p.code,
                    p.dimensions.len()
                )));
            }
            let mut dims = HashMap::new();
            for (j, d) in p.dimensions.iter().enumerate() {
                if d.key.is_empty()
                    || d.key.len() > MAX_DIMENSION_KEY_LEN
                    || !d.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(invalid(format!(
                        "product `{}`: dimension key `{}` must be 1–{MAX_DIMENSION_KEY_LEN} chars of [A-Za-z0-9_]",
                        p.code, d.key
                    )));
                }
                if dims.insert(d.key.clone(), j).is_some() {
                    return Err(invalid(format!("product `{}`: dimension `{}` is defined twice", p.code, d.key)));
                }
            }
            dimension_by_key.push(dims);
        }

        let mut customer_by_id = HashMap::new();
        let mut customer_by_identifier = HashMap::new();
        let mut customer_by_account = HashMap::new();
        for (i, c) in doc.customers.iter().enumerate() {
            if customer_by_id.insert(c.id.clone(), i).is_some() {
                return Err(invalid(format!("customer `{}` is defined twice", c.id)));
            }
            if let Some(ci) = &c.customer_identifier {
                if ci.is_empty() || ci.len() > 255 || customer_by_identifier.insert(ci.clone(), i).is_some() {
                    return Err(invalid(format!(
                        "customer `{}`: customer_identifier is empty, too long or not unique",
                        c.id
                    )));
                }
            }
            if let Some(a) = &c.aws_account_id {
                if a.is_empty() || a.len() > 255 || !a.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(format!("customer `{}`: aws_account_id `{a}` must be digits", c.id)));
                }
                if customer_by_account.insert(a.clone(), i).is_some() {
                    return Err(invalid(format!(
                        "customer `{}`: aws_account_id `{a}` belongs to another customer too",
                        c.id
                    )));
                }
            }
        }

        let mut offer_by_id = HashMap::new();
        let rate_dp = doc.marketplace.usage_rate_decimals;
        for (i, o) in doc.offers.iter_mut().enumerate() {
            if offer_by_id.insert(o.id.clone(), i).is_some() {
                return Err(invalid(format!("offer `{}` is defined twice", o.id)));
            }
            let Some(&pi) = product_by_code.get(&o.product) else {
                return Err(invalid(format!("offer `{}`: product `{}` is not defined", o.id, o.product)));
            };
            if o.currency.minor_units().is_none() {
                return Err(invalid(format!("offer `{}`: currency {} has no known minor unit", o.id, o.currency)));
            }
            if o.prices.is_empty() {
                return Err(invalid(format!("offer `{}` has no prices", o.id)));
            }
            match o.visibility {
                Visibility::Public if !o.buyers.is_empty() => {
                    return Err(invalid(format!("offer `{}` is public but names buyers", o.id)))
                }
                Visibility::Private if o.buyers.is_empty() => {
                    return Err(invalid(format!("offer `{}` is private but names no buyers", o.id)))
                }
                _ => {}
            }
            for b in &o.buyers {
                if !customer_by_id.contains_key(b) {
                    return Err(invalid(format!("offer `{}`: buyer `{b}` is not a defined customer", o.id)));
                }
            }
            o.prices.sort_by_key(|v| v.effective_from);
            for w in o.prices.windows(2) {
                if w[0].effective_from == w[1].effective_from {
                    return Err(invalid(format!(
                        "offer `{}`: two price versions take effect at {}",
                        o.id, w[0].effective_from
                    )));
                }
            }
            for v in &o.prices {
                for (dim, price) in &v.usage {
                    if !dimension_by_key[pi].contains_key(dim) {
                        return Err(invalid(format!(
                            "offer `{}`: price for `{dim}`, which is not a dimension of product `{}`",
                            o.id, o.product
                        )));
                    }
                    price.validate(rate_dp).map_err(|e| invalid(format!("offer `{}`: `{dim}`: {e}", o.id)))?;
                }
                if v.notified_at.is_some() && doc.marketplace.price_change_notice_days.is_none() {
                    return Err(invalid(format!(
                        "offer `{}`: a price version has notified_at but marketplace `{}` sets no price_change_notice_days",
                        o.id, doc.marketplace.id
                    )));
                }
            }
            check_offer_terms(o, &doc.products[pi], &dimension_by_key[pi], &doc.marketplace)?;
            for p in &o.annual_prices {
                if !dimension_by_key[pi].contains_key(&p.dimension) {
                    return Err(invalid(format!(
                        "offer `{}`: annual price for `{}`, which is not a dimension of product `{}`",
                        o.id, p.dimension, o.product
                    )));
                }
            }
            annual::check_offer_annual_prices(o, doc.marketplace.contract_rate_decimals)?;
            let product = &doc.products[pi];
            entitlement::check_contract_usage(o, |d| {
                product.dimensions.iter().find(|x| x.key == d).map(|x| x.category)
            })?;
        }
        check_resale(&doc, &offer_by_id, &product_by_code, &seller_ids)?;
        entitlement::check_byol_paid_option(&doc)?;
        refund::check_refunds(&doc)?;
        entitlement::mark_netting_contracts(&mut doc);

        let mut agreements_by_customer_product: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        let mut agreement_ids = HashSet::new();
        for (i, a) in doc.agreements.iter().enumerate() {
            if !agreement_ids.insert(a.id.as_str()) {
                return Err(invalid(format!("agreement `{}` is defined twice", a.id)));
            }
            if !customer_by_id.contains_key(&a.customer) {
                return Err(invalid(format!("agreement `{}`: customer `{}` is not defined", a.id, a.customer)));
            }
            let Some(&pi) = product_by_code.get(&a.product) else {
                return Err(invalid(format!("agreement `{}`: product `{}` is not defined", a.id, a.product)));
            };
            let Some(&oi) = offer_by_id.get(&a.offer) else {
                return Err(invalid(format!("agreement `{}`: offer `{}` is not defined", a.id, a.offer)));
            };
            let offer = &doc.offers[oi];
            if offer.product != a.product {
                return Err(invalid(format!(
                    "agreement `{}`: offer `{}` is for product `{}`, not `{}`",
                    a.id, a.offer, offer.product, a.product
                )));
            }
            if offer.visibility == Visibility::Private && !offer.buyers.contains(&a.customer) {
                return Err(invalid(format!(
                    "agreement `{}`: private offer `{}` is not extended to customer `{}`",
                    a.id, a.offer, a.customer
                )));
            }
            if a.end.is_some_and(|e| e <= a.start) {
                return Err(invalid(format!("agreement `{}` ends before it starts", a.id)));
            }
            if a.signed_at() > a.start {
                return Err(invalid(format!("agreement `{}` is signed after it starts", a.id)));
            }
            if let Some(deadline) = offer.expires_at {
                if a.signed_at() > deadline {
                    return Err(invalid(format!(
                        "agreement `{}`: offer `{}` expired at {deadline}, before it was accepted at {}; the offer is void",
                        a.id,
                        a.offer,
                        a.signed_at()
                    )));
                }
            }
            if let Some(c) = &a.contract {
                check_agreement_contract(a, c, offer, &doc.marketplace)?;
            }
            for c in &a.annual {
                if !dimension_by_key[pi].contains_key(&c.dimension) {
                    return Err(invalid(format!(
                        "agreement `{}`: annual coverage for `{}`, which is not a dimension of `{}`",
                        a.id, c.dimension, a.product
                    )));
                }
                if c.units == 0 || c.end <= c.start {
                    return Err(invalid(format!(
                        "agreement `{}`: annual coverage of `{}` needs units > 0 and start < end",
                        a.id, c.dimension
                    )));
                }
                annual::check_coverage(&a.id, &a.annual, c, offer, doc.marketplace.price_change_notice_days)?;
            }
            agreements_by_customer_product
                .entry(a.customer.clone())
                .or_default()
                .entry(a.product.clone())
                .or_default()
                .push(i);
        }
        for a in &doc.agreements {
            if let Some(old_id) = a.contract.as_ref().and_then(|c| c.replaces.as_deref()) {
                check_upgrade(a, old_id, &doc)?;
            }
        }
        // A customer holds one agreement per product at a time: public or private, never both (PRC-19).
        for (customer, product, list) in
            agreements_by_customer_product.iter_mut().flat_map(|(c, m)| m.iter_mut().map(move |(p, l)| (c, p, l)))
        {
            list.sort_by_key(|&i| doc.agreements[i].start);
            for w in list.windows(2) {
                let (a, b) = (&doc.agreements[w[0]], &doc.agreements[w[1]]);
                if a.end.is_none_or(|e| e > b.start) {
                    return Err(invalid(format!(
                        "customer `{customer}` holds overlapping agreements `{}` and `{}` for product `{product}`",
                        a.id, b.id
                    )));
                }
            }
        }

        // Month close looks agreements up by id once per line.
        let agreement_by_id = doc.agreements.iter().enumerate().map(|(i, a)| (a.id.clone(), i)).collect();
        let mut agreement_by_license = HashMap::new();
        for (i, a) in doc.agreements.iter().enumerate() {
            if let Some(arn) = &a.license_arn {
                if arn.is_empty() || arn.len() > 2048 {
                    return Err(invalid(format!("agreement `{}`: license_arn must be 1–2048 characters", a.id)));
                }
                if let Some(other) = agreement_by_license.insert(arn.clone(), i) {
                    return Err(invalid(format!(
                        "agreements `{}` and `{}` share license_arn `{arn}`",
                        doc.agreements[other].id, a.id
                    )));
                }
            }
        }
        let mut deployment_ids = HashSet::new();
        let mut deployment_by_key_hash = HashMap::new();
        for (i, d) in doc.deployments.iter().enumerate() {
            if d.id.is_empty() || !deployment_ids.insert(d.id.as_str()) {
                return Err(invalid(format!("deployment `{}`: ids must be non-empty and unique", d.id)));
            }
            if !customer_by_id.contains_key(&d.customer) {
                return Err(invalid(format!("deployment `{}`: unknown customer `{}`", d.id, d.customer)));
            }
            if !product_by_code.contains_key(&d.product) {
                return Err(invalid(format!("deployment `{}`: unknown product `{}`", d.id, d.product)));
            }
            for h in &d.api_key_sha256 {
                let bytes: [u8; 32] = hex::decode(h).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
                    invalid(format!("deployment `{}`: api_key_sha256 entry is not 64 hex digits", d.id))
                })?;
                // One key, one identity: a key that were both a seller's and a deployment's would
                // make the caller ambiguous.
                if seller_by_key_hash.contains_key(&bytes) || deployment_by_key_hash.insert(bytes, i).is_some() {
                    return Err(invalid(format!("deployment `{}`: an API key is listed twice", d.id)));
                }
            }
        }
        Ok(PriceBook {
            doc,
            windows,
            product_by_code,
            dimension_by_key,
            offer_by_id,
            agreement_by_id,
            customer_by_id,
            customer_by_identifier,
            customer_by_account,
            agreements_by_customer_product,
            seller_by_key_hash,
            deployment_by_key_hash,
            agreement_by_license,
        })
    }
}

/// Durations a public contract may have (PRC-14).
const PUBLIC_CONTRACT_MONTHS: [u32; 4] = [1, 12, 24, 36];
/// Longest private contract and most installments (PRC-19).
const MAX_PRIVATE_MONTHS: u32 = 60;

fn check_offer_terms(
    o: &Offer,
    product: &Product,
    dims: &HashMap<String, usize>,
    m: &MarketplaceProfile,
) -> Result<(), CatalogueError> {
    let fee_dp = m.contract_rate_decimals;
    if let Some(fee) = o.monthly_fee {
        if fee.is_sign_negative() || decimal_places(fee) > fee_dp {
            return Err(invalid(format!(
                "offer `{}`: monthly_fee {fee} must be ≥ 0 with at most {fee_dp} decimal places",
                o.id
            )));
        }
        if o.free_trial.is_some() {
            return Err(invalid(format!(
                "offer `{}`: a monthly fee cannot be combined with a free trial (PRC-11)",
                o.id
            )));
        }
    }
    if !o.contract_prices.is_empty() && o.contract_shape.is_none() {
        return Err(invalid(format!(
            "offer `{}`: contract_prices need contract_shape (tiered or multi_dimension)",
            o.id
        )));
    }
    let mut durations_by_dim: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> = Default::default();
    for cp in &o.contract_prices {
        if !dims.contains_key(&cp.dimension) {
            return Err(invalid(format!(
                "offer `{}`: contract price for `{}`, which is not a dimension of `{}`",
                o.id, cp.dimension, product.code
            )));
        }
        let allowed = match o.visibility {
            Visibility::Public => PUBLIC_CONTRACT_MONTHS.contains(&cp.months),
            Visibility::Private => (1..=MAX_PRIVATE_MONTHS).contains(&cp.months),
        };
        if !allowed {
            return Err(invalid(format!(
                "offer `{}`: a {} contract of {} months is not allowed (public: 1, 12, 24, 36; private: 1–60)",
                o.id,
                if o.visibility == Visibility::Public { "public" } else { "private" },
                cp.months
            )));
        }
        if cp.rate.is_sign_negative() || decimal_places(cp.rate) > fee_dp {
            return Err(invalid(format!(
                "offer `{}`: contract rate {} for `{}` has {} decimal places; contract rates allow at most {fee_dp}",
                o.id,
                cp.rate,
                cp.dimension,
                decimal_places(cp.rate)
            )));
        }
        if !durations_by_dim.entry(cp.dimension.as_str()).or_default().insert(cp.months) {
            return Err(invalid(format!(
                "offer `{}`: two contract prices for `{}` over {} months",
                o.id, cp.dimension, cp.months
            )));
        }
    }
    // The set of durations must be identical across dimensions (PRC-14).
    let mut sets = durations_by_dim.values();
    if let Some(first) = sets.next() {
        if sets.any(|s| s != first) {
            return Err(invalid(format!("offer `{}`: every contract dimension must offer the same durations", o.id)));
        }
    }
    if let Some(tr) = &o.free_trial {
        let (lo, hi) = match tr.kind {
            TrialKind::AmiOneInstance => (5, 31),
            TrialKind::Saas => (7, 90),
        };
        if !(lo..=hi).contains(&tr.days) {
            return Err(invalid(format!(
                "offer `{}`: a free trial of {} days is outside {lo}–{hi} days",
                o.id, tr.days
            )));
        }
        if tr.kind == TrialKind::AmiOneInstance && product.delivery != Delivery::Ami {
            return Err(invalid(format!("offer `{}`: the one-instance trial is for AMI products", o.id)));
        }
    }
    if o.visibility == Visibility::Private
        && o.prices.iter().any(|v| v.usage.values().any(|p| matches!(p, UsagePrice::Byol)))
    {
        return Err(invalid(format!("offer `{}`: private offers do not support BYOL (PRC-16)", o.id)));
    }
    if o.resale.is_some() && o.visibility != Visibility::Private {
        return Err(invalid(format!("offer `{}`: a channel partner sells through private offers only", o.id)));
    }
    Ok(())
}

fn check_resale(
    doc: &PriceBookDoc,
    offer_by_id: &HashMap<String, usize>,
    product_by_code: &HashMap<String, usize>,
    sellers: &HashSet<&str>,
) -> Result<(), CatalogueError> {
    let mut ids = HashSet::new();
    for r in &doc.resale {
        if !ids.insert(r.id.as_str()) {
            return Err(invalid(format!("resale authorisation `{}` is defined twice", r.id)));
        }
        let Some(&pi) = product_by_code.get(&r.product) else {
            return Err(invalid(format!("resale `{}`: product `{}` is not defined", r.id, r.product)));
        };
        for (role, s) in [("manufacturer", &r.manufacturer), ("partner", &r.partner)] {
            if !sellers.contains(s.as_str()) {
                return Err(invalid(format!("resale `{}`: {role} `{s}` is not a defined seller", r.id)));
            }
        }
        if doc.products[pi].seller != r.manufacturer {
            return Err(invalid(format!(
                "resale `{}`: `{}` does not make `{}` (its seller is `{}`)",
                r.id, r.manufacturer, r.product, doc.products[pi].seller
            )));
        }
        if r.channel == Channel::Direct || r.partner == r.manufacturer {
            return Err(invalid(format!(
                "resale `{}`: a resale goes through a partner other than the manufacturer (cppo or dsor)",
                r.id
            )));
        }
        match (r.discount, &r.list_offer, r.wholesale_usage.is_empty() && r.wholesale_contract.is_empty()) {
            (Some(d), Some(list), true) => {
                if d.is_sign_negative() || d >= Decimal::ONE {
                    return Err(invalid(format!("resale `{}`: discount {d} must be a fraction in [0, 1)", r.id)));
                }
                let Some(&li) = offer_by_id.get(list) else {
                    return Err(invalid(format!("resale `{}`: list offer `{list}` is not defined", r.id)));
                };
                let lo = &doc.offers[li];
                if lo.product != r.product || lo.visibility != Visibility::Public {
                    return Err(invalid(format!(
                        "resale `{}`: list offer `{list}` must be a public offer of `{}`",
                        r.id, r.product
                    )));
                }
                if lo.currency != r.currency {
                    return Err(invalid(format!(
                        "resale `{}`: currency mismatch in the resale chain: list offer `{list}` is in {}, the authorisation in {}",
                        r.id, lo.currency, r.currency
                    )));
                }
            }
            (None, None, false) => {
                for (dim, p) in &r.wholesale_usage {
                    p.validate(doc.marketplace.usage_rate_decimals)
                        .map_err(|e| invalid(format!("resale `{}`: wholesale `{dim}`: {e}", r.id)))?;
                }
            }
            _ => {
                return Err(invalid(format!(
                    "resale `{}`: give either discount + list_offer, or a custom wholesale rate card",
                    r.id
                )))
            }
        }
    }
    for o in &doc.offers {
        let Some(rid) = &o.resale else { continue };
        let Some(r) = doc.resale.iter().find(|r| &r.id == rid) else {
            return Err(invalid(format!("offer `{}`: resale authorisation `{rid}` is not defined", o.id)));
        };
        if r.product != o.product {
            return Err(invalid(format!(
                "offer `{}`: resale `{rid}` is for `{}`, not `{}`",
                o.id, r.product, o.product
            )));
        }
        if r.currency != o.currency {
            return Err(invalid(format!(
                "offer `{}`: currency mismatch in the resale chain: the offer is in {}, resale `{rid}` in {}",
                o.id, o.currency, r.currency
            )));
        }
    }
    check_authorization_use(doc)?;
    check_resale_chain(doc)
}

/// PRC-21's channel model: a CPPO authorisation under a DSOR one, two levels at most, for the
/// same product, manufacturer and currency, to another partner; the parent's expiry bounds it.
fn check_resale_chain(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    for r in &doc.resale {
        let Some(pid) = &r.parent else { continue };
        let err = |what: String| invalid(format!("resale `{}` under `{pid}`: {what}", r.id));
        let Some(p) = doc.resale.iter().find(|p| &p.id == pid) else {
            return Err(err("the parent authorisation is not defined".into()));
        };
        if p.parent.is_some() {
            return Err(err("resale goes two levels deep at most (ISV → DSOR partner → CPPO partner)".into()));
        }
        if p.channel != Channel::Dsor || r.channel != Channel::Cppo {
            return Err(err(format!(
                "the DSOR channel model is a cppo authorisation under a dsor one, not {} under {}",
                r.channel.as_str(),
                p.channel.as_str()
            )));
        }
        if p.product != r.product || p.manufacturer != r.manufacturer || p.currency != r.currency {
            return Err(err("product, manufacturer and currency must be the parent's".into()));
        }
        if r.partner == p.partner {
            return Err(err(format!("`{}` cannot resell to itself", r.partner)));
        }
        if let Some(pe) = p.expires_at {
            if r.expires_at.is_none_or(|e| e > pe) {
                return Err(err(format!("it must expire no later than the parent, at {pe}")));
            }
        }
    }
    Ok(())
}

/// PRC-20: a one-time authorisation is one private offer to one buyer, accepted once; no
/// agreement is accepted under an authorisation after it expires.
fn check_authorization_use(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    for r in &doc.resale {
        let offers: Vec<&Offer> = doc.offers.iter().filter(|o| o.resale.as_deref() == Some(r.id.as_str())).collect();
        let agreements: Vec<&Agreement> =
            doc.agreements.iter().filter(|a| offers.iter().any(|o| o.id == a.offer)).collect();
        if r.kind == AuthorizationUse::OneTime {
            if offers.len() > 1 || offers.iter().any(|o| o.buyers.len() != 1) {
                return Err(invalid(format!(
                    "resale `{}` is one-time: it allows one offer to one buyer, but {} offer(s) use it ({})",
                    r.id,
                    offers.len(),
                    offers
                        .iter()
                        .map(|o| format!("`{}` for {} buyer(s)", o.id, o.buyers.len()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if agreements.len() > 1 {
                return Err(invalid(format!(
                    "resale `{}` is one-time: it is accepted once, but agreements {} use it",
                    r.id,
                    agreements.iter().map(|a| format!("`{}`", a.id)).collect::<Vec<_>>().join(" and ")
                )));
            }
        }
        if let Some(expiry) = r.expires_at {
            if let Some(a) = agreements.iter().find(|a| a.signed_at() >= expiry) {
                return Err(invalid(format!(
                    "agreement `{}` was accepted at {} under resale `{}`, which expired at {expiry}; an expired authorisation sells nothing more",
                    a.id,
                    a.signed_at(),
                    r.id
                )));
            }
        }
    }
    Ok(())
}

/// The total contract value of `c` under `offer`, if every dimension has a price for its months.
pub fn contract_value(offer: &Offer, c: &AgreementContract) -> Option<Decimal> {
    c.quantities.iter().try_fold(Decimal::ZERO, |acc, q| {
        let cp = offer.contract_prices.iter().find(|p| p.months == c.months && p.dimension == q.dimension)?;
        acc.checked_add(cp.rate.checked_mul(Decimal::from(q.quantity))?)
    })
}

fn check_agreement_contract(
    a: &Agreement,
    c: &AgreementContract,
    offer: &Offer,
    m: &MarketplaceProfile,
) -> Result<(), CatalogueError> {
    let Some(shape) = offer.contract_shape else {
        return Err(invalid(format!("agreement `{}`: offer `{}` has no contract prices", a.id, offer.id)));
    };
    if c.quantities.is_empty()
        || (shape == ContractShape::Tiered && (c.quantities.len() != 1 || c.quantities[0].quantity != 1))
    {
        return Err(invalid(format!(
            "agreement `{}`: a {} contract buys {}",
            a.id,
            if shape == ContractShape::Tiered { "tiered" } else { "multi-dimension" },
            if shape == ContractShape::Tiered {
                "exactly one tier, quantity 1"
            } else {
                "a quantity of at least one dimension"
            }
        )));
    }
    let Some(tcv) = contract_value(offer, c) else {
        return Err(invalid(format!(
            "agreement `{}`: offer `{}` has no {}-month price for every contracted dimension",
            a.id, offer.id, c.months
        )));
    };
    let end = a.start.plus_months(c.months);
    if c.installments.len() > MAX_PRIVATE_MONTHS as usize {
        return Err(invalid(format!(
            "agreement `{}`: {} installments; a payment schedule has at most {MAX_PRIVATE_MONTHS}",
            a.id,
            c.installments.len()
        )));
    }
    if !c.installments.is_empty() {
        if offer.visibility != Visibility::Private {
            return Err(invalid(format!("agreement `{}`: flexible payment schedules are for private offers", a.id)));
        }
        let mut sum = Decimal::ZERO;
        for i in &c.installments {
            if i.date >= end {
                return Err(invalid(format!(
                    "agreement `{}`: installment of {} on {} is after the contract term ends at {end}",
                    a.id, i.amount, i.date
                )));
            }
            if i.amount <= Decimal::ZERO || decimal_places(i.amount) > offer.currency.minor_units().unwrap_or(2) {
                return Err(invalid(format!(
                    "agreement `{}`: installment amount {} is not a positive amount in {}",
                    a.id, i.amount, offer.currency
                )));
            }
            sum += i.amount;
        }
        if let Some(deadline) = offer.expires_at {
            let early = c.installments.iter().filter(|i| i.date < deadline).count();
            if early > 1 {
                return Err(invalid(format!(
                    "agreement `{}`: {early} installments fall before the offer's acceptance deadline {deadline}; at most one may",
                    a.id
                )));
            }
        }
        if sum != tcv {
            return Err(invalid(format!(
                "agreement `{}`: installments sum to {sum} but the contract is worth {tcv} {}",
                a.id, offer.currency
            )));
        }
    }
    if let Some(e) = a.end {
        if e > end {
            return Err(invalid(format!(
                "agreement `{}` runs past its {}-month contract term ({end})",
                a.id, c.months
            )));
        }
    }
    let _ = m;
    Ok(())
}

fn check_upgrade(a: &Agreement, old_id: &str, doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    let Some(old) = doc.agreements.iter().find(|o| o.id == old_id) else {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}`, which is not defined", a.id)));
    };
    let (Some(oc), Some(nc)) = (&old.contract, &a.contract) else {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}`, which has no contract", a.id)));
    };
    if old.customer != a.customer || old.product != a.product {
        return Err(invalid(format!("agreement `{}` replaces `{old_id}` of another customer or product", a.id)));
    }
    let old_end = old.start.plus_months(oc.months);
    if old.end != Some(a.start) || a.start >= old_end {
        return Err(invalid(format!(
            "agreement `{}`: an upgrade starts mid-term of `{old_id}`, which must end when the upgrade starts",
            a.id
        )));
    }
    let offer = |id: &str| doc.offers.iter().find(|o| o.id == id);
    let (Some(oo), Some(no)) = (offer(&old.offer), offer(&a.offer)) else {
        return Ok(());
    };
    let per_month = |o: &Offer, c: &AgreementContract| contract_value(o, c).map(|v| v / Decimal::from(c.months));
    let fewer_units = oc.quantities.iter().any(|q| {
        nc.quantities
            .iter()
            .find(|n| n.dimension == q.dimension)
            .map_or(oo.contract_shape != Some(ContractShape::Tiered), |n| n.quantity < q.quantity)
    });
    if fewer_units || per_month(no, nc) < per_month(oo, oc) {
        return Err(invalid(format!(
            "agreement `{}` would downgrade `{old_id}` mid-term; downgrades happen only at renewal",
            a.id
        )));
    }
    Ok(())
}

fn valid_product_code(code: &str) -> bool {
    !code.is_empty() && code.len() <= 255 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/=:_.@".contains(&b))
}
