//! The daily release: distinct consenting devices per cell and UTC day, each device counted
//! in at most `privacy.max_cells_per_day` cells of a day, released once at
//! `day_end + insights.grace` over the public domain (zeros included) with opendp noise at its
//! own level (`privacy.rho_per_day`, or `privacy.epsilon_per_day` for Laplace).
//!
//! The bound is enforced at ingest twice over: here in memory (so a report that adds nothing
//! writes nothing), and by the store's conditional insert (`WriteOp::ContributeDay`), which
//! counts the device's stored cells of that day in the committing transaction — so it holds
//! across the day's hourly releases (which never touch daily contributions), restarts and
//! nodes. The ledger entry, the noisy table and the deletion of the day's raw contributions
//! commit in one transaction keyed by the day: no retry, restart or second node releases a
//! day twice, and a crash before the commit leaves the day to the next run (fresh noise; the
//! lost draw was never seen).
//!
//! Accounting (`config::consequences`): any 24 hours touches two UTC days, so the promise
//! counts this release's cost twice.

use std::collections::HashMap;

use crate::clock::Timestamp;
use crate::config::MechanismKind;
use crate::model::{LedgerEntry, ReleasedCount};
use crate::settings::Settings;
use crate::store::{Store, WriteOp};

use super::domain;
use super::held::{Held, fingerprint};
use super::mechanism;
use super::release::{InsightsError, Noise, mechanism_of};

/// One UTC day.
pub const DAY_MS: i64 = super::offer_stats::DAY_MS;

/// What became of one candidate daily contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayAdmission {
    /// New: record it.
    New,
    /// Already counted in this cell on this day.
    Duplicate,
    /// The device already counts in `max_cells_per_day` cells of this day (or the day
    /// cannot be held in the compact form: refused, sends less).
    CellBound,
}

/// Start of the UTC day holding `t`.
pub fn day_of(t: Timestamp) -> Timestamp {
    Timestamp(t.millis().div_euclid(DAY_MS) * DAY_MS)
}

/// Decides about `(day, cell)` given the device's held cells of unreleased days (forgetting
/// those of days up to `released_through` first) and records it in `held` when new. Cells
/// are compared by fingerprint: a collision is taken for a duplicate (counts less).
pub fn admit(
    held: &mut Held,
    day: i64,
    cell: u64,
    max_cells: u32,
    released_through: i64,
) -> DayAdmission {
    held.prune_days(released_through);
    let fp = fingerprint(cell);
    let mut n = 0u32;
    for c in held.day_cells(day) {
        if c == fp {
            return DayAdmission::Duplicate;
        }
        n += 1;
    }
    if n >= max_cells || !held.push_day(day, cell) {
        return DayAdmission::CellBound;
    }
    DayAdmission::New
}

/// Releases the UTC day starting at `day`; `Ok(false)` if it had been released already.
pub(crate) async fn release_day(
    store: &Store,
    settings: &Settings,
    noise: Noise,
    day: Timestamp,
    now: Timestamp,
) -> Result<bool, InsightsError> {
    let config = &settings.config;
    let dc = &settings.consequences.privacy.daily;
    let merchants = store.merchants().await?;
    // The public domain of the day: merchants registered before its end and not revoked by
    // then (their cells are released as zeros if nobody came).
    let cells: Vec<u64> = domain::domain(&merchants, config, Timestamp(day.millis() + DAY_MS - 1))
        .into_iter()
        .collect();
    let counts: HashMap<u64, u64> = store.day_counts(day).await?.into_iter().collect();
    tracing::info!(day = day.millis(), cells = cells.len(), "releasing day");
    // The store caps rows per device and day, so the truth needs no clipping here.
    let truth: Vec<i64> = cells
        .iter()
        .map(|c| counts.get(c).copied().unwrap_or(0) as i64)
        .collect();
    let mech = mechanism_of(config.privacy.mechanism);
    let scale = dc.noise_scale;
    let noisy = match noise {
        // Sampling costs microseconds per value: keep it off the async workers.
        Noise::OpenDp => {
            tokio::task::spawn_blocking(move || mechanism::add_noise(mech, scale, &truth))
                .await
                .map_err(|e| InsightsError::Noise(e.to_string()))??
        }
        #[cfg(test)]
        Noise::Disabled => truth,
    };
    let threshold = i64::from(config.privacy.threshold);
    let released: Vec<ReleasedCount> = cells
        .iter()
        .zip(noisy)
        .map(|(cell, n)| ReleasedCount {
            bucket: day,
            cell: *cell,
            noisy: n,
            suppressed: n < threshold,
        })
        .collect();
    let k = f64::from(config.privacy.max_cells_per_day);
    let (rho, epsilon) = match config.privacy.mechanism {
        MechanismKind::Gaussian => (k / (2.0 * scale * scale), 0.0),
        MechanismKind::Laplace => (0.0, k / scale),
    };
    let entry = LedgerEntry {
        bucket: day,
        bucket_len_ms: DAY_MS,
        released_at: now,
        mechanism: settings.consequences.privacy.mechanism.to_string(),
        scale,
        rho,
        epsilon,
        l1_sensitivity: k,
        l2_sensitivity: k.sqrt(),
        threshold: config.privacy.threshold,
        cells: cells.len() as u64,
    };
    let done = store
        .write_count(WriteOp::ReleaseDay {
            entry,
            counts: released,
        })
        .await?;
    if done == 1 {
        metrics::counter!("hexveil_daily_releases_total").increment(1);
        tracing::info!(day = day.millis(), cells = cells.len(), "released day");
    }
    Ok(done == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-05T00:00:00Z.
    const D0: i64 = 1_767_571_200_000;

    #[test]
    fn bounds_cells_per_day_not_per_hour() {
        let mut held = Held::default();
        for cell in 1..=3 {
            assert_eq!(admit(&mut held, D0, cell, 3, i64::MIN), DayAdmission::New);
        }
        assert_eq!(
            admit(&mut held, D0, 2, 3, i64::MIN),
            DayAdmission::Duplicate
        );
        assert_eq!(
            admit(&mut held, D0, 4, 3, i64::MIN),
            DayAdmission::CellBound
        );
        // The next UTC day starts afresh (the accounting counts two days per window).
        assert_eq!(
            admit(&mut held, D0 + DAY_MS, 4, 3, i64::MIN),
            DayAdmission::New
        );
    }

    #[test]
    fn the_in_memory_bound_forgets_released_days_only() {
        let mut held = Held::default();
        assert_eq!(admit(&mut held, D0, 1, 1, i64::MIN), DayAdmission::New);
        assert_eq!(
            admit(&mut held, D0, 2, 1, i64::MIN),
            DayAdmission::CellBound
        );
        assert_eq!(admit(&mut held, D0 + DAY_MS, 2, 1, D0), DayAdmission::New);
        assert_eq!(
            held.day_cells(D0).count(),
            0,
            "the released day is forgotten"
        );
        held.prune_days(D0 + DAY_MS);
        assert!(held.is_empty());
    }

    #[test]
    fn a_day_that_cannot_be_held_is_refused() {
        let mut held = Held::default();
        assert_eq!(
            admit(&mut held, D0 + 1, 1, 8, i64::MIN),
            DayAdmission::CellBound
        );
        assert_eq!(
            admit(&mut held, D0 + 100_000 * DAY_MS, 1, 8, i64::MIN),
            DayAdmission::CellBound
        );
    }
}
