//! Offer statistics under differential privacy: per offer and UTC day, how many deliveries
//! and how many of them were opened, released once at `day_end + insights.grace` with opendp
//! noise — the only delivery figures a merchant ever reads.
//!
//! Contribution bounding happens here, not only in the caps: each device counts in at most
//! `n` deliveries of a day (the caps' daily maximum) and `m` of one offer
//! (`caps.per_merchant_per_device_per_week`, at most `n`); an open counts only for a kept
//! delivery. The sensitivity in `config::consequences` follows from those two numbers, so a
//! config reload that raised the caps cannot under-noise a day. The domain is public: every
//! offer valid during the day (of a merchant registered by its end and not revoked before its
//! start) is released, zeros included. The ledger entry and the noisy table commit in one
//! transaction keyed by the day, so no retry, restart or second node releases a day twice.

use std::collections::HashMap;

use crate::clock::Timestamp;
use crate::config::MechanismKind;
use crate::model::{Merchant, OfferId, OfferStatRow, OfferStatsLedgerEntry};
use crate::settings::Settings;
use crate::store::{Store, WriteOp};

use super::accounting::{self, Mechanism};
use super::mechanism;
use super::query::{QueryError, check_range};
use super::release::{InsightsError, Noise, mechanism_of};

/// One UTC day.
pub const DAY_MS: i64 = 86_400_000;
/// Days released per run at most (a long outage catches up over several runs).
const MAX_DAYS_PER_RUN: usize = 400;

/// One released day of one offer, with 95% intervals for the true counts.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferStatPoint {
    pub offer_id: OfferId,
    /// Start of the UTC day.
    pub day: Timestamp,
    /// Noisy deliveries (may be negative: the noise is unbiased, not clamped).
    pub deliveries: i64,
    pub deliveries_ci95: (f64, f64),
    /// Noisy opens.
    pub opens: i64,
    pub opens_ci95: (f64, f64),
}

/// The first day to release when nothing has been: the day the first merchant registered.
pub(crate) fn first_day(merchants: &[Merchant]) -> Option<i64> {
    merchants
        .iter()
        .map(|m| m.created_at.millis().div_euclid(DAY_MS) * DAY_MS)
        .min()
}

/// Days due for release, oldest first: after the watermark (or from the first merchant's
/// day), each at least `grace` after its end.
pub(crate) fn due_days(
    watermark: Option<i64>,
    first: Option<i64>,
    now: i64,
    grace: i64,
) -> Vec<i64> {
    let Some(mut day) = watermark.map(|w| w + DAY_MS).or(first) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while day + DAY_MS + grace <= now && out.len() < MAX_DAYS_PER_RUN {
        out.push(day);
        day += DAY_MS;
    }
    out
}

/// Releases one UTC day starting at `day`; `Ok(false)` if it had been released already.
pub(crate) async fn release_day(
    store: &Store,
    settings: &Settings,
    noise: Noise,
    day: Timestamp,
    now: Timestamp,
) -> Result<bool, InsightsError> {
    let config = &settings.config;
    let dp = &settings.consequences.privacy;
    let os = &dp.offer_stats;
    let (start, end) = (day.millis(), day.millis() + DAY_MS);
    let merchants: HashMap<_, _> = store
        .merchants()
        .await?
        .into_iter()
        .filter(|m| m.created_at.millis() < end && m.revoked_at.is_none_or(|r| r.millis() > start))
        .map(|m| (m.merchant_id, m))
        .collect();
    // The public domain: offers valid during the day, of merchants active in it.
    let mut offers: Vec<_> = store
        .load_offers()
        .await?
        .into_iter()
        .filter(|o| {
            merchants.contains_key(&o.merchant_id)
                && o.valid_from.millis() < end
                && o.valid_until.millis() > start
        })
        .map(|o| (o.offer_id, o.merchant_id))
        .collect();
    offers.sort();
    let index: HashMap<OfferId, usize> = offers
        .iter()
        .enumerate()
        .map(|(i, (o, _))| (*o, i))
        .collect();
    // Contribution bounding, oldest delivery first.
    let (n, m) = (
        os.max_deliveries_per_device_per_day,
        os.max_deliveries_per_device_per_offer,
    );
    let mut per_device: HashMap<_, u32> = HashMap::new();
    let mut per_device_offer: HashMap<_, u32> = HashMap::new();
    let mut truth = vec![0_i64; 2 * offers.len()];
    for d in store.deliveries(day, Timestamp(end)).await? {
        let Some(&i) = index.get(&d.offer_id) else {
            continue;
        };
        let total = per_device.entry(d.device).or_insert(0);
        let one = per_device_offer.entry((d.device, d.offer_id)).or_insert(0);
        if *total >= n || *one >= m {
            continue;
        }
        *total += 1;
        *one += 1;
        truth[2 * i] += 1;
        truth[2 * i + 1] += i64::from(d.opened);
    }
    let mech = mechanism_of(config.privacy.mechanism);
    let scale = os.noise_scale;
    let noisy = match noise {
        Noise::OpenDp => {
            tokio::task::spawn_blocking(move || mechanism::add_noise(mech, scale, &truth))
                .await
                .map_err(|e| InsightsError::Noise(e.to_string()))??
        }
        #[cfg(test)]
        Noise::Disabled => truth,
    };
    let rows: Vec<OfferStatRow> = offers
        .iter()
        .enumerate()
        .map(|(i, (offer_id, merchant_id))| OfferStatRow {
            day,
            offer_id: *offer_id,
            merchant_id: *merchant_id,
            deliveries: noisy[2 * i],
            opens: noisy[2 * i + 1],
        })
        .collect();
    let (rho, epsilon) = match config.privacy.mechanism {
        MechanismKind::Gaussian => (os.l2_sensitivity_sq / (2.0 * scale * scale), 0.0),
        MechanismKind::Laplace => (0.0, os.l1_sensitivity / scale),
    };
    let entry = OfferStatsLedgerEntry {
        day,
        released_at: now,
        mechanism: dp.mechanism.to_string(),
        scale,
        rho,
        epsilon,
        l1_sensitivity: os.l1_sensitivity,
        l2_sensitivity: os.l2_sensitivity_sq.sqrt(),
        offers: offers.len() as u64,
    };
    let done = store
        .write_count(WriteOp::ReleaseOfferStats { entry, rows })
        .await?;
    if done == 1 {
        metrics::counter!("hexveil_offer_stats_releases_total").increment(1);
        tracing::info!(
            day = day.millis(),
            offers = offers.len(),
            "released offer statistics"
        );
    }
    Ok(done == 1)
}

/// A merchant's released offer statistics for days starting in `[start, end)`: released
/// tables only (free to query, no extra privacy loss).
pub async fn query(
    store: &Store,
    merchant: &Merchant,
    start: Timestamp,
    end: Timestamp,
) -> Result<Vec<OfferStatPoint>, QueryError> {
    check_range(start, end)?;
    let ledger: HashMap<i64, (Mechanism, f64)> = store
        .offer_stats_ledger(start, end)
        .await?
        .into_iter()
        .map(|e| {
            let mech = if e.mechanism == "discrete_laplace" {
                Mechanism::DiscreteLaplace
            } else {
                Mechanism::DiscreteGaussian
            };
            (e.day.millis(), (mech, e.scale))
        })
        .collect();
    let rows = store.offer_stats(merchant.merchant_id, start, end).await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let (mech, scale) = *ledger.get(&r.day.millis())?;
            let half = match mech {
                Mechanism::DiscreteGaussian => accounting::ci95_half_width_gaussian(scale),
                Mechanism::DiscreteLaplace => accounting::ci95_half_width_laplace(scale),
            };
            // A count is never negative, so the interval is cut at 0 below; its top is never
            // cut below the half-width: a released value at or under 0 reads "between 0 and
            // ±half", not "exactly 0" (an interval of [0, 0] would claim a certainty the
            // noise never gives).
            let ci = |v: i64| ((v as f64 - half).max(0.0), (v as f64 + half).max(half));
            Some(OfferStatPoint {
                offer_id: r.offer_id,
                day: r.day,
                deliveries: r.deliveries,
                deliveries_ci95: ci(r.deliveries),
                opens: r.opens,
                opens_ci95: ci(r.opens),
            })
        })
        .collect())
}
