//! Releases: at `bucket_end + insights.grace` a bucket's counts over the whole domain get
//! opendp noise, counts under the threshold are marked suppressed, and the noisy table, the
//! ledger entry and the deletion of the raw contributions commit in one transaction. The
//! ledger's primary key makes a bucket release at most once, whatever crashes, retries or
//! second nodes do; a crash before the commit leaves the bucket unreleased, to be released
//! (with fresh noise — the lost draw was never seen) on the next run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use super::held::Held;
use super::mechanism::{self, NoiseError};
use super::offer_stats;

/// Buckets released per run at most (a long outage catches up over several runs).
const MAX_BUCKETS_PER_RUN: usize = 1000;

const DAY_MS: i64 = 86_400_000;

/// The bucket grid in force. Which buckets are released must never depend on who was seen,
/// so the job walks this grid in order, and `insights.bucket` changes it only at a UTC
/// midnight: the length is read once, at start (a reload keeps the running value); if it
/// differs from the length of the last released bucket, the old grid runs on until the first
/// UTC midnight after start and the new one applies from there. Every length divides a day,
/// so the two grids meet at midnight without a gap or an overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grid {
    len: i64,
    next_len: i64,
    switch_at: i64,
}

impl Grid {
    fn fixed(len: i64) -> Self {
        Grid {
            len,
            next_len: len,
            switch_at: i64::MAX,
        }
    }

    /// Length of the bucket holding (or starting at) `t`.
    fn len_at(&self, t: i64) -> i64 {
        if t >= self.switch_at {
            self.next_len
        } else {
            self.len
        }
    }
}

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
    /// The current domain, for ingest (releases recompute theirs for the bucket's start).
    domain: Arc<RwLock<Arc<BTreeSet<u64>>>>,
    /// The bucket grid in force (fixed at start, see [`Grid`]).
    grid: Arc<RwLock<Grid>>,
    /// Per-pair cost of the buckets released in the last two days (bucket start → the
    /// release's mechanism and noise scale), for the rolling budget at ingest.
    released_cost: Arc<RwLock<BTreeMap<i64, (String, f64)>>>,
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

/// What one (cell, bucket) pair costs a device under `config` (ρ = 1/(2σ²) or ε = 1/b,
/// from `privacy.rho_per_bucket` or `epsilon_per_bucket` spent on k pairs), and what any 24
/// hours of them may cost: the hourly part of the budget, C pairs' worth.
fn hourly_pair_cost(config: &Config) -> (f64, f64) {
    let p = &config.privacy;
    let k = f64::from(p.max_cells_per_bucket);
    let per_pair = match p.mechanism {
        MechanismKind::Gaussian => p.rho_per_bucket / k,
        MechanismKind::Laplace => p.epsilon_per_bucket / k,
    };
    let buckets_per_day = u32::try_from(86_400 / config.insights.bucket.as_secs().max(1))
        .unwrap_or(u32::MAX)
        .max(1);
    let c = p
        .max_contributions_per_day
        .min(p.max_cells_per_bucket.saturating_mul(buckets_per_day));
    (per_pair, f64::from(c) * per_pair)
}

pub(crate) fn mechanism_of(kind: MechanismKind) -> Mechanism {
    match kind {
        MechanismKind::Gaussian => Mechanism::DiscreteGaussian,
        MechanismKind::Laplace => Mechanism::DiscreteLaplace,
    }
}

impl Insights {
    pub fn new(store: Store, clock: SharedClock, settings: LiveSettings) -> Self {
        let len = duration_millis(settings.current().config.insights.bucket.get());
        Insights {
            store,
            clock,
            settings,
            released_through: Arc::new(AtomicI64::new(i64::MIN)),
            offer_stats_through: Arc::new(AtomicI64::new(i64::MIN)),
            days_through: Arc::new(AtomicI64::new(i64::MIN)),
            domain: Arc::default(),
            grid: Arc::new(RwLock::new(Grid::fixed(len))),
            released_cost: Arc::default(),
            noise: Noise::OpenDp,
        }
    }

    #[cfg(test)]
    pub(crate) fn without_noise(mut self) -> Self {
        self.noise = Noise::Disabled;
        self
    }

    /// Loads the watermark and the bucket grid from the ledger and the domain from the
    /// merchants.
    pub async fn load(&self) -> Result<(), StoreError> {
        if let Some(last) = self.store.last_release().await? {
            self.released_through
                .fetch_max(last.millis(), Ordering::SeqCst);
            let len = duration_millis(self.settings.current().config.insights.bucket.get());
            let released_len = self
                .store
                .ledger(last, Timestamp(last.millis() + 1))
                .await?
                .first()
                .map_or(len, |e| e.bucket_len_ms);
            if released_len != len {
                let now = self.clock.now().millis();
                let switch_at = (now.div_euclid(DAY_MS) + 1) * DAY_MS;
                tracing::warn!(
                    from_ms = released_len,
                    to_ms = len,
                    switch_at,
                    "insights.bucket changed: the old bucket length applies until the next UTC midnight"
                );
                *self.grid.write().unwrap_or_else(|p| p.into_inner()) = Grid {
                    len: released_len,
                    next_len: len,
                    switch_at,
                };
            }
        }
        let since = self.clock.now().millis() - 2 * contrib::WINDOW_MS;
        for e in self
            .store
            .ledger(Timestamp(since), Timestamp(i64::MAX))
            .await?
        {
            self.remember_cost(&e);
        }
        if let Some(last) = self.store.last_offer_stats_day().await? {
            self.offer_stats_through
                .fetch_max(last.millis(), Ordering::SeqCst);
        }
        if let Some(last) = self.store.last_daily_release().await? {
            self.days_through.fetch_max(last.millis(), Ordering::SeqCst);
        }
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
        // Both bounds live in one compact record per device (`privacy::held`), taken out of
        // the device's state and put back once.
        let mut held = state.take_held();
        let day_op = self.contribute_day(&mut held, device, icell, observed_at, now, config);
        let hour_op = self.contribute_hour(&mut held, device, icell, observed_at, now, config);
        state.put_held(held);
        match (hour_op, day_op) {
            (Some(h), Some(d)) => Some(WriteOp::Many(vec![h, d])),
            (h, d) => h.or(d),
        }
    }

    /// The hourly contribution (bounded per bucket and per any 24 hours).
    fn contribute_hour(
        &self,
        held: &mut Held,
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
        let len = self.grid().len_at(observed_at.millis());
        let bucket = contrib::bucket_of(observed_at, len);
        let due = bucket.millis() + len + duration_millis(ins.grace.get());
        let watermark = self.released_through.load(Ordering::SeqCst);
        if bucket.millis() <= watermark || now.millis() >= due {
            count("late");
            return None;
        }
        contrib::prune(held, watermark);
        // The rolling budget in privacy-loss units: a pair released under another config
        // (a reload or restart mid-day) costs what its release's noise made it cost.
        let (pair_cost, budget) = hourly_pair_cost(config);
        let is_new = !held.holds(bucket.millis(), icell);
        if is_new
            && !contrib::within_budget(held, bucket, |b| self.cost_of(b, config, pair_cost), budget)
        {
            count("bounded_day");
            return None;
        }
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
                    max_cells: config.privacy.max_cells_per_bucket,
                    max_per_day: config.privacy.max_contributions_per_day,
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
            Admission::Unrepresentable => {
                count("unrepresentable");
                None
            }
        }
    }

    /// The daily contribution (bounded to `privacy.max_cells_per_day` cells per UTC day).
    fn contribute_day(
        &self,
        held: &mut Held,
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
        match daily::admit(held, day, icell, max_cells, watermark) {
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
        let grace = duration_millis(settings.config.insights.grace.get());
        let grid = self.grid();
        let now = self.clock.now().millis();
        // Exactly the grid, in order, from the first whole bucket after the first merchant
        // registered, empty ones included, whether or not anyone was ever counted: never a
        // bucket because it has rows, so neither the start of releases, nor a missing
        // bucket, nor the order of a catch-up may say "somebody came" or "nobody was there".
        let watermark = self.released_through.load(Ordering::SeqCst);
        let first = if watermark == i64::MIN {
            self.store
                .merchants()
                .await?
                .iter()
                .map(|m| m.created_at.millis())
                .min()
                .map(|t| {
                    let len = grid.len_at(t);
                    t.div_euclid(len) * len + if t.rem_euclid(len) == 0 { 0 } else { len }
                })
        } else {
            Some(watermark + grid.len_at(watermark))
        };
        let mut run = ReleaseRun::default();
        if let Some(mut b) = first {
            while b + grid.len_at(b) + grace <= now
                && run.released + run.already < MAX_BUCKETS_PER_RUN
            {
                // A failure stops the run here; the watermark has not moved, so the next
                // run starts again from this very bucket.
                if self.release(Timestamp(b)).await? {
                    run.released += 1;
                } else {
                    run.already += 1;
                }
                b += grid.len_at(b);
            }
        }
        run.offer_days = self.release_offer_stats_due().await?;
        run.days = self.release_days_due().await?;
        Ok(run)
    }

    /// Per-pair cost of a held pair in `bucket`: its release's if released (infinite if
    /// released under the other mechanism, whose units do not add up with today's), else
    /// today's.
    fn cost_of(&self, bucket: Timestamp, config: &Config, today: f64) -> f64 {
        let costs = self.released_cost.read().unwrap_or_else(|p| p.into_inner());
        match costs.get(&bucket.millis()) {
            None => today,
            Some((mechanism, scale)) => match (config.privacy.mechanism, mechanism.as_str()) {
                (MechanismKind::Gaussian, "discrete_gaussian") => 1.0 / (2.0 * scale * scale),
                (MechanismKind::Laplace, "discrete_laplace") => 1.0 / scale,
                _ => f64::INFINITY,
            },
        }
    }

    fn remember_cost(&self, e: &LedgerEntry) {
        let mut costs = self
            .released_cost
            .write()
            .unwrap_or_else(|p| p.into_inner());
        costs.insert(e.bucket.millis(), (e.mechanism.clone(), e.scale));
        let keep_from = e.bucket.millis() - 2 * contrib::WINDOW_MS;
        *costs = costs.split_off(&keep_from);
    }

    fn grid(&self) -> Grid {
        *self.grid.read().unwrap_or_else(|p| p.into_inner())
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
            // Each device forgets this day's cells at its next daily admission (the
            // watermark above), as the hourly pairs are pruned: no sweep over the table.
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
        let merchants = self.store.merchants().await?;
        let cells: Vec<u64> = domain::domain(&merchants, config, bucket)
            .into_iter()
            .collect();
        let counts: HashMap<u64, u64> = self
            .store
            .bucket_counts(bucket, config.privacy.max_cells_per_bucket)
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
            bucket_len_ms: self.grid().len_at(bucket.millis()),
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
                entry: entry.clone(),
                counts: released,
            })
            .await?;
        if done == 1 {
            self.remember_cost(&entry);
        } else if let Some(theirs) = self
            .store
            .ledger(bucket, Timestamp(bucket.millis() + 1))
            .await?
            .first()
        {
            // Released by another node, with its noise.
            self.remember_cost(theirs);
        }
        metrics::histogram!("hexveil_release_seconds").record(started.elapsed().as_secs_f64());
        // Only now, committed (here or by another node), is the bucket closed to ingest: a
        // failed release leaves the watermark where it was, so the bucket is retried and no
        // gap is left. (Ingest refuses a due bucket by time anyway; a report that slips in
        // between the count and the commit is deleted uncounted — less data, never more.)
        self.released_through
            .fetch_max(bucket.millis(), Ordering::SeqCst);
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
