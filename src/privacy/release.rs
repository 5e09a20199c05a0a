//! Releases: at `bucket_end + insights.grace` a bucket's counts over the whole domain get
//! opendp noise, counts under the threshold are marked suppressed, and the noisy table, the
//! ledger entry and the deletion of the raw contributions commit in one transaction. The
//! ledger's primary key makes a bucket release at most once, whatever crashes, retries or
//! second nodes do; a crash before the commit leaves the bucket unreleased, to be released
//! (with fresh noise — the lost draw was never seen) on the next run.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::clock::{SharedClock, Timestamp, duration_millis};
use crate::config::{Config, MechanismKind};
use crate::devices::DeviceState;
use crate::model::{LedgerEntry, Purpose, ReleasedCount};
use crate::pseudonym::DeviceId;
use crate::settings::LiveSettings;
use crate::store::{Store, StoreError, WriteOp};

use super::accounting::Mechanism;
use super::contrib::{self, Admission};
use super::daily::{self, DayAdmission};
use super::domain;
use super::mechanism::{self, NoiseError};
use super::offer_stats;

/// Buckets released per run at most (a long outage catches up over several runs).
const MAX_BUCKETS_PER_RUN: usize = 1000;

/// Where noise comes from. Production always uses opendp; unit tests of contribution
/// bounding may disable it to see exact counts (the variant does not exist outside tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noise {
    OpenDp,
    #[cfg(test)]
    Disabled,
}

/// Why a release or query failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InsightsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("noise: {0}")]
    Noise(String),
}

impl From<NoiseError> for InsightsError {
    fn from(e: NoiseError) -> Self {
        InsightsError::Noise(e.to_string())
    }
}

/// The foot-traffic service: ingest bounds, the release job and its watermark.
#[derive(Debug, Clone)]
pub struct Insights {
    store: Store,
    clock: SharedClock,
    settings: LiveSettings,
    /// Start of the newest released bucket (ms); contributions at or before it are late.
    released_through: Arc<AtomicI64>,
    /// Start of the newest released day of offer statistics (ms), `i64::MIN` if none.
    offer_stats_through: Arc<AtomicI64>,
    /// Start of the newest released UTC day of the daily release (ms), `i64::MIN` if none;
    /// daily contributions to it or earlier days are late.
    days_through: Arc<AtomicI64>,
    /// The daily release's in-memory bound (cells per device and unreleased day).
    daily: Arc<daily::Held>,
    /// The current domain, for ingest (releases recompute theirs for the bucket's start).
    domain: Arc<RwLock<Arc<BTreeSet<u64>>>>,
    noise: Noise,
}

/// What a release run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseRun {
    /// Foot-traffic buckets released (and found released already).
    pub released: usize,
    pub already: usize,
    /// Days of offer statistics released.
    pub offer_days: usize,
    /// Days of the daily foot-traffic release released.
    pub days: usize,
}

pub(crate) fn mechanism_of(kind: MechanismKind) -> Mechanism {
    match kind {
        MechanismKind::Gaussian => Mechanism::DiscreteGaussian,
        MechanismKind::Laplace => Mechanism::DiscreteLaplace,
    }
}

impl Insights {
    pub fn new(store: Store, clock: SharedClock, settings: LiveSettings) -> Self {
        Insights {
            store,
            clock,
            settings,
            released_through: Arc::new(AtomicI64::new(i64::MIN)),
            offer_stats_through: Arc::new(AtomicI64::new(i64::MIN)),
            days_through: Arc::new(AtomicI64::new(i64::MIN)),
            daily: Arc::default(),
            domain: Arc::default(),
            noise: Noise::OpenDp,
        }
    }

    #[cfg(test)]
    pub(crate) fn without_noise(mut self) -> Self {
        self.noise = Noise::Disabled;
        self
    }

    /// Loads the watermark from the ledger and the domain from the merchants.
    pub async fn load(&self) -> Result<(), StoreError> {
        if let Some(last) = self.store.last_release().await? {
            self.released_through
                .fetch_max(last.millis(), Ordering::SeqCst);
        }
        if let Some(last) = self.store.last_offer_stats_day().await? {
            self.offer_stats_through
                .fetch_max(last.millis(), Ordering::SeqCst);
        }
        if let Some(last) = self.store.last_daily_release().await? {
            self.days_through.fetch_max(last.millis(), Ordering::SeqCst);
        }
        self.daily
            .load(self.store.load_daily_contributions().await?);
        self.refresh_domain().await
    }

    /// Recomputes the ingest domain from the registered merchants.
    pub async fn refresh_domain(&self) -> Result<(), StoreError> {
        let merchants = self.store.merchants().await?;
        let settings = self.settings.current();
        let d = domain::domain(&merchants, &settings.config, self.clock.now());
        *self.domain.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(d);
        Ok(())
    }

    /// The contribution a report makes, if any (called under the device's lock; no I/O).
    pub fn contribute(
        &self,
        state: &mut DeviceState,
        device: DeviceId,
        cell: u64,
        observed_at: Timestamp,
        now: Timestamp,
        config: &Config,
    ) -> Option<WriteOp> {
        if !state.purposes.contains(Purpose::FootTraffic) {
            return None;
        }
        let ins = &config.insights;
        let count = |outcome: &'static str| {
            metrics::counter!("hexveil_contributions_total", "outcome" => outcome).increment(1)
        };
        let Some(icell) = domain::at_resolution(cell, ins.resolution) else {
            count("too_coarse");
            return None;
        };
        if crate::cells::excluded(icell, &config.exclusions.cells) {
            count("excluded");
            return None;
        }
        if !self
            .domain
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&icell)
        {
            count("outside_domain");
            return None;
        }
        let day_op = self.contribute_day(device, icell, observed_at, now, config);
        let hour_op = self.contribute_hour(state, device, icell, observed_at, now, config);
        match (hour_op, day_op) {
            (Some(h), Some(d)) => Some(WriteOp::Many(vec![h, d])),
            (h, d) => h.or(d),
        }
    }

    /// The hourly contribution (bounded per bucket and per any 24 hours).
    fn contribute_hour(
        &self,
        state: &mut DeviceState,
        device: DeviceId,
        icell: u64,
        observed_at: Timestamp,
        now: Timestamp,
        config: &Config,
    ) -> Option<WriteOp> {
        let ins = &config.insights;
        let count = |outcome: &'static str| {
            metrics::counter!("hexveil_contributions_total", "outcome" => outcome).increment(1)
        };
        let len = duration_millis(ins.bucket.get());
        let bucket = contrib::bucket_of(observed_at, len);
        let due = bucket.millis() + len + duration_millis(ins.grace.get());
        let watermark = self.released_through.load(Ordering::SeqCst);
        if bucket.millis() <= watermark || now.millis() >= due {
            count("late");
            return None;
        }
        let held = state.contributions();
        contrib::prune(held, watermark);
        match contrib::admit(
            held,
            bucket,
            icell,
            config.privacy.max_cells_per_bucket,
            config.privacy.max_contributions_per_day,
        ) {
            Admission::New => {
                count("recorded");
                Some(WriteOp::Contribute {
                    device,
                    cell: icell,
                    bucket,
                })
            }
            Admission::Duplicate => None,
            Admission::CellBound => {
                count("bounded_cells");
                None
            }
            Admission::DayBound => {
                count("bounded_day");
                None
            }
        }
    }

    /// The daily contribution (bounded to `privacy.max_cells_per_day` cells per UTC day).
    fn contribute_day(
        &self,
        device: DeviceId,
        icell: u64,
        observed_at: Timestamp,
        now: Timestamp,
        config: &Config,
    ) -> Option<WriteOp> {
        let count = |outcome: &'static str| {
            metrics::counter!("hexveil_daily_contributions_total", "outcome" => outcome)
                .increment(1)
        };
        let day = daily::day_of(observed_at).millis();
        let due = day + daily::DAY_MS + duration_millis(config.insights.grace.get());
        let watermark = self.days_through.load(Ordering::SeqCst);
        if day <= watermark || now.millis() >= due {
            count("late");
            return None;
        }
        let max_cells = config.privacy.max_cells_per_day;
        match self.daily.admit(device, day, icell, max_cells, watermark) {
            DayAdmission::New => {
                count("recorded");
                Some(WriteOp::ContributeDay {
                    device,
                    cell: icell,
                    day: Timestamp(day),
                    max_cells,
                })
            }
            DayAdmission::Duplicate => None,
            DayAdmission::CellBound => {
                count("bounded_cells");
                None
            }
        }
    }

    /// Releases every due bucket; returns how many were released (and found done already).
    pub async fn release_due(&self) -> Result<ReleaseRun, InsightsError> {
        let settings = self.settings.current();
        let ins = &settings.config.insights;
        let len = duration_millis(ins.bucket.get());
        let now = self.clock.now().millis();
        let latest_due = (now - duration_millis(ins.grace.get()) - len).div_euclid(len) * len;
        let mut buckets: BTreeSet<i64> = self
            .store
            .unreleased_buckets()
            .await?
            .into_iter()
            .map(Timestamp::millis)
            .filter(|b| *b <= latest_due)
            .collect();
        // Every bucket from the first whole one after the first merchant registered is
        // released, empty ones included, whether or not anyone was ever counted: neither the
        // start of releases nor a missing one may say "somebody came" or "nobody was there".
        let watermark = self.released_through.load(Ordering::SeqCst);
        let first = if watermark == i64::MIN {
            self.store
                .merchants()
                .await?
                .iter()
                .map(|m| m.created_at.millis())
                .min()
                .map(|t| t.div_euclid(len) * len + if t.rem_euclid(len) == 0 { 0 } else { len })
        } else {
            Some((watermark.div_euclid(len) + 1) * len)
        };
        if let Some(mut b) = first {
            while b <= latest_due && buckets.len() < MAX_BUCKETS_PER_RUN {
                buckets.insert(b);
                b += len;
            }
        }
        let mut run = ReleaseRun::default();
        for b in buckets.into_iter().take(MAX_BUCKETS_PER_RUN) {
            if self.release(Timestamp(b)).await? {
                run.released += 1;
            } else {
                run.already += 1;
            }
        }
        run.offer_days = self.release_offer_stats_due().await?;
        run.days = self.release_days_due().await?;
        Ok(run)
    }

    /// Releases every due UTC day of the daily release; returns how many were released now.
    pub async fn release_days_due(&self) -> Result<usize, InsightsError> {
        let settings = self.settings.current();
        let grace = duration_millis(settings.config.insights.grace.get());
        // Due days follow the ledger, not the ingest watermark: a day whose release failed
        // (a store error, a crash) is the first one the next run tries again.
        let watermark = self
            .store
            .last_daily_release()
            .await?
            .map(Timestamp::millis);
        let first = if watermark.is_none() {
            offer_stats::first_day(&self.store.merchants().await?)
        } else {
            None
        };
        let mut released = 0;
        for day in offer_stats::due_days(watermark, first, self.clock.now().millis(), grace) {
            // From now on no new daily contribution to this day is accepted.
            self.days_through.fetch_max(day, Ordering::SeqCst);
            if daily::release_day(
                &self.store,
                &settings,
                self.noise,
                Timestamp(day),
                self.clock.now(),
            )
            .await?
            {
                released += 1;
            }
            self.daily.prune(day);
        }
        Ok(released)
    }

    /// Releases every due day of offer statistics; returns how many were released now.
    pub async fn release_offer_stats_due(&self) -> Result<usize, InsightsError> {
        let settings = self.settings.current();
        let grace = duration_millis(settings.config.insights.grace.get());
        let watermark = self.offer_stats_through.load(Ordering::SeqCst);
        let watermark = (watermark != i64::MIN).then_some(watermark);
        let first = if watermark.is_none() {
            offer_stats::first_day(&self.store.merchants().await?)
        } else {
            None
        };
        let mut released = 0;
        for day in offer_stats::due_days(watermark, first, self.clock.now().millis(), grace) {
            if offer_stats::release_day(
                &self.store,
                &settings,
                self.noise,
                Timestamp(day),
                self.clock.now(),
            )
            .await?
            {
                released += 1;
            }
            self.offer_stats_through.fetch_max(day, Ordering::SeqCst);
        }
        Ok(released)
    }

    /// Releases one bucket; `Ok(false)` if it had been released already.
    pub async fn release(&self, bucket: Timestamp) -> Result<bool, InsightsError> {
        let settings = self.settings.current();
        let config = &settings.config;
        // From now on no new contribution to this bucket is accepted.
        self.released_through
            .fetch_max(bucket.millis(), Ordering::SeqCst);
        let merchants = self.store.merchants().await?;
        let cells: Vec<u64> = domain::domain(&merchants, config, bucket)
            .into_iter()
            .collect();
        let counts: HashMap<u64, u64> = self
            .store
            .bucket_counts(bucket)
            .await?
            .into_iter()
            .collect();
        let truth: Vec<i64> = cells
            .iter()
            .map(|c| counts.get(c).copied().unwrap_or(0) as i64)
            .collect();
        let dp = &settings.consequences.privacy;
        let mech = mechanism_of(config.privacy.mechanism);
        let scale = dp.noise_scale;
        tracing::info!(
            bucket = bucket.millis(),
            cells = cells.len(),
            "releasing bucket"
        );
        let started = std::time::Instant::now();
        let noisy = match self.noise {
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
                bucket,
                cell: *cell,
                noisy: n,
                suppressed: n < threshold,
            })
            .collect();
        let k = f64::from(config.privacy.max_cells_per_bucket);
        let (rho, epsilon) = match config.privacy.mechanism {
            MechanismKind::Gaussian => (k / (2.0 * scale * scale), 0.0),
            MechanismKind::Laplace => (0.0, k / scale),
        };
        let entry = LedgerEntry {
            bucket,
            bucket_len_ms: duration_millis(config.insights.bucket.get()),
            released_at: self.clock.now(),
            mechanism: dp.mechanism.to_string(),
            scale,
            rho,
            epsilon,
            l1_sensitivity: k,
            l2_sensitivity: k.sqrt(),
            threshold: config.privacy.threshold,
            cells: cells.len() as u64,
        };
        let done = self
            .store
            .write_count(WriteOp::Release {
                entry,
                counts: released,
            })
            .await?;
        metrics::histogram!("hexveil_release_seconds").record(started.elapsed().as_secs_f64());
        if done == 1 {
            metrics::counter!("hexveil_releases_total").increment(1);
            tracing::info!(
                bucket = bucket.millis(),
                cells = cells.len(),
                "released bucket"
            );
        } else {
            metrics::counter!("hexveil_release_already_done_total").increment(1);
        }
        Ok(done == 1)
    }
}
