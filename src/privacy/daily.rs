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
use std::sync::Mutex;

use crate::clock::Timestamp;
use crate::config::MechanismKind;
use crate::model::{LedgerEntry, ReleasedCount};
use crate::pseudonym::DeviceId;
use crate::settings::Settings;
use crate::store::{Store, WriteOp};

use super::domain;
use super::mechanism;
use super::release::{InsightsError, Noise, mechanism_of};

/// One UTC day.
pub const DAY_MS: i64 = super::offer_stats::DAY_MS;

/// Shards of the in-memory bound (by the pseudonym's first byte).
const SHARDS: usize = 64;

/// What became of one candidate daily contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayAdmission {
    /// New: record it.
    New,
    /// Already counted in this cell on this day.
    Duplicate,
    /// The device already counts in `max_cells_per_day` cells of this day.
    CellBound,
}

/// Start of the UTC day holding `t`.
pub fn day_of(t: Timestamp) -> Timestamp {
    Timestamp(t.millis().div_euclid(DAY_MS) * DAY_MS)
}

/// Decides about `(day, cell)` given the device's held `(day, cell)` pairs and records it in
/// `held` when new.
pub fn admit(held: &mut Vec<(i64, u64)>, day: i64, cell: u64, max_cells: u32) -> DayAdmission {
    if held.iter().any(|(d, c)| *d == day && *c == cell) {
        return DayAdmission::Duplicate;
    }
    if held.iter().filter(|(d, _)| *d == day).count() as u32 >= max_cells {
        return DayAdmission::CellBound;
    }
    held.push((day, cell));
    DayAdmission::New
}

/// One shard of [`Held`]: each device's (day, cell) pairs.
type Shard = HashMap<DeviceId, Vec<(i64, u64)>>;

/// The daily cells each device holds for unreleased days: a few dozen bytes per device seen
/// today, dropped when its day is released.
#[derive(Debug)]
pub struct Held {
    shards: Vec<Mutex<Shard>>,
}

impl Default for Held {
    fn default() -> Self {
        Held {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Held {
    fn shard(&self, device: &DeviceId) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[usize::from(device.0[0]) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `(day, cell)` for `device`, forgetting its days released by `released_through`.
    pub fn admit(
        &self,
        device: DeviceId,
        day: i64,
        cell: u64,
        max_cells: u32,
        released_through: i64,
    ) -> DayAdmission {
        let mut shard = self.shard(&device);
        let held = shard.entry(device).or_default();
        held.retain(|(d, _)| *d > released_through);
        admit(held, day, cell, max_cells)
    }

    /// Restores the bound from the store's unreleased daily contributions.
    pub fn load(&self, rows: Vec<(DeviceId, u64, Timestamp)>) {
        for (device, cell, day) in rows {
            self.shard(&device)
                .entry(device)
                .or_default()
                .push((day.millis(), cell));
        }
    }

    /// Drops every pair of days up to `released_through`.
    pub fn prune(&self, released_through: i64) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, held| {
                held.retain(|(d, _)| *d > released_through);
                !held.is_empty()
            });
        }
    }

    /// Devices holding any pair (for tests and metrics).
    pub fn devices(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
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

    #[test]
    fn bounds_cells_per_day_not_per_hour() {
        let mut held = Vec::new();
        for cell in 1..=3 {
            assert_eq!(admit(&mut held, 0, cell, 3), DayAdmission::New);
        }
        assert_eq!(admit(&mut held, 0, 2, 3), DayAdmission::Duplicate);
        assert_eq!(admit(&mut held, 0, 4, 3), DayAdmission::CellBound);
        // The next UTC day starts afresh (the accounting counts two days per window).
        assert_eq!(admit(&mut held, DAY_MS, 4, 3), DayAdmission::New);
    }

    #[test]
    fn the_in_memory_bound_forgets_released_days_only() {
        let held = Held::default();
        let d = DeviceId([7; 16]);
        assert_eq!(held.admit(d, 0, 1, 1, i64::MIN), DayAdmission::New);
        assert_eq!(held.admit(d, 0, 2, 1, i64::MIN), DayAdmission::CellBound);
        assert_eq!(held.admit(d, DAY_MS, 2, 1, 0), DayAdmission::New);
        held.prune(DAY_MS);
        assert_eq!(held.devices(), 0);
    }
}
