//! `hexveil simulate`: replays synthetic traffic through the real pipeline under a config and
//! reports what it does — notifications per device per day, which rule withheld how much,
//! and the accuracy merchants get — so a config change can be judged before it is deployed.
//!
//! Nothing here re-implements a rule. A [`Simulation`] opens a real [`App`] on a temporary
//! SQLite store and a [`ManualClock`], registers the city's merchants and offers through
//! [`merchants::add`] and [`crate::offers::Offers::upsert`], grants consent through
//! [`crate::consent::Consents::set`], and sends every report through
//! [`crate::presence::Presence`] (decide, then the group-commit write), feedback through
//! [`crate::presence::Presence::feedback`] and every bucket through
//! [`crate::privacy::Insights::release_due`] (opendp noise, ledger, release-once). The true
//! count of a bucket is read with [`crate::store::Store::bucket_counts`] when the bucket ends,
//! before its release deletes the raw contributions.
//!
//! Reproducibility: the traffic (who reports where and when, who consents, how people react)
//! comes from `--seed` alone, and each minute's reports are decided in a fixed order, so the
//! decisions repeat exactly. The DP noise does not: opendp draws it fresh on every run.

pub mod city;
pub mod cli;
pub mod html;
pub mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use h3o::CellIndex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clock::{Clock, ManualClock, Timestamp, duration_millis};
use crate::demo::{self, Person, Routine};
use crate::merchants;
use crate::model::{Feedback, Merchant, Offer, Purpose, Purposes};
use crate::presence::{PresenceError, Report};
use crate::pseudonym::DeviceId;
use crate::server::App;
use crate::settings::Settings;

pub use city::{City, CityError};
pub use report::{Comparison, Report as SimReport};

/// The first simulated instant: Monday 2026-01-05 00:00 UTC (fixed, so traffic repeats).
pub const START: Timestamp = Timestamp(1_767_571_200_000);
/// Most devices one run may simulate.
pub const MAX_DEVICES: usize = 1_000_000;
/// Most days one run may simulate.
pub const MAX_DAYS: u32 = 28;
/// Writes awaited at once (they share group-commit transactions).
const CONCURRENCY: usize = 2048;

/// Why a simulation could not run; the message names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The city file could not be read or parsed.
    #[error(transparent)]
    City(#[from] CityError),
    /// The city's merchants or offers were refused by the real registration path.
    #[error("--city {file}: {path}: {message}")]
    Setup {
        file: String,
        path: String,
        message: String,
    },
    /// The pipeline failed (store, noise): a bug or a full disk, not bad input.
    #[error("simulation failed: {0}")]
    Pipeline(String),
}

fn pipeline(e: impl std::fmt::Display) -> SimulateError {
    SimulateError::Pipeline(e.to_string())
}

/// One simulation: a validated config, a city and the population's size.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The config under test (validated exactly as `config check` validates it).
    pub settings: Settings,
    /// How the report names the config (its file name).
    pub label: String,
    pub city: City,
    /// How the report names the city (`demo` or its file).
    pub city_label: String,
    pub devices: usize,
    pub days: u32,
    pub seed: u64,
}

/// The registered city, as the traffic needs it.
#[derive(Debug, Clone)]
pub struct Setup {
    pub merchants: Vec<Merchant>,
    /// Every offer with its merchant's name.
    pub offers: Vec<(String, Offer)>,
    /// The released domain (cells at `insights.resolution`) where people live and work.
    pub domain: Vec<CellIndex>,
    /// The merchants' own cells.
    pub centres: Vec<CellIndex>,
}

/// Registers the city's merchants and offers through the real paths, on `app`'s clock
/// (`clock`, which it moves a second forward after each offer); `file` names the city in
/// errors.
pub async fn setup(
    app: &App,
    clock: &ManualClock,
    city: &City,
    file: &str,
) -> Result<Setup, SimulateError> {
    let settings = app.settings.current();
    let config = &settings.config;
    let refused = |path: String, message: String| SimulateError::Setup {
        file: file.to_string(),
        path,
        message,
    };
    let resolved = city.resolved().map_err(|(p, m)| refused(p, m))?;
    let mut merchants_out = Vec::new();
    let mut offers_out = Vec::new();
    let until = START.plus(std::time::Duration::from_secs(
        u64::from(MAX_DAYS + 30) * 86_400,
    ));
    for (i, m) in resolved.iter().enumerate() {
        let (merchant, _key) = merchants::add(
            &app.store,
            &m.name,
            vec![u64::from(m.cell)],
            config.location.max_resolution,
            clock.now(),
        )
        .await
        .map_err(|e| refused(format!("merchants[{i}]"), e.to_string()))?;
        for (j, (spec, hours)) in m.offers.iter().enumerate() {
            let offer = Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: merchant.merchant_id,
                title: spec.title.clone(),
                body: spec.body.clone(),
                cell: merchant.cells[0],
                radius_k: spec.radius_k,
                valid_from: START.minus(std::time::Duration::from_secs(3600)),
                valid_until: until,
                max_notifications_per_day: spec.max_per_day,
                opening_hours: hours.clone(),
                updated_at: Timestamp(0),
            };
            let offer = app.offers.upsert(&merchant, offer).await.map_err(|e| {
                let message = match e {
                    crate::offers::OfferError::Invalid(v) => v
                        .iter()
                        .map(|(f, d)| format!("{}: {d}", f.trim_start_matches("offer.")))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                refused(format!("merchants[{i}].offers[{j}]"), message)
            })?;
            offers_out.push((merchant.name.clone(), offer));
            // Offers rank by recency among equals: distinct times keep the ranking fixed.
            clock.advance(std::time::Duration::from_secs(1));
        }
        merchants_out.push(merchant);
    }
    app.insights.refresh_domain().await.map_err(pipeline)?;
    let domain: Vec<CellIndex> = crate::privacy::domain::domain(&merchants_out, config, START)
        .into_iter()
        .filter_map(|c| CellIndex::try_from(c).ok())
        .collect();
    let centres: Vec<CellIndex> = merchants_out
        .iter()
        .filter_map(|m| CellIndex::try_from(m.cells[0]).ok())
        .collect();
    if domain.is_empty() || centres.is_empty() {
        return Err(refused(
            "merchants".into(),
            "no merchant location is inside a released area (are they all in exclusions.cells?)"
                .into(),
        ));
    }
    Ok(Setup {
        merchants: merchants_out,
        offers: offers_out,
        domain,
        centres,
    })
}

/// One planned report.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Index of the device in [`Traffic::devices`].
    pub device: usize,
    pub report: Report,
}

/// The synthetic population and its reports, reproducible from the seed: the demo's daily
/// routine (home, commute, work, lunch, evening) over the city's released areas.
pub struct Traffic {
    people: Vec<Person>,
    purposes: Vec<Purposes>,
    rng: StdRng,
    routine: Routine,
    offset_minutes: i32,
    reactions: [f64; 3],
    seed: u64,
}

impl Traffic {
    /// Places `devices` people (tokens `sim-device-NNNNNN`) and draws their consent.
    pub fn new(app: &App, city: &City, setup: &Setup, devices: usize, seed: u64) -> Traffic {
        let mut rng = StdRng::seed_from_u64(seed);
        let pop = &city.population;
        let routine = pop.routine();
        let mut purposes = Vec::with_capacity(devices);
        let people = (0..devices)
            .map(|i| {
                let id = app.pseudonyms.device_id(&format!("sim-device-{i:06}"));
                let p = demo::person(&mut rng, id, &setup.centres, &setup.domain, &routine);
                let mut granted = Vec::new();
                if rng.random_bool(pop.consent_offers) {
                    granted.push(Purpose::NearbyOffers);
                }
                if rng.random_bool(pop.consent_foot_traffic) {
                    granted.push(Purpose::FootTraffic);
                }
                purposes.push(granted.into_iter().collect());
                p
            })
            .collect();
        Traffic {
            people,
            purposes,
            rng,
            routine,
            offset_minutes: pop.utc_offset_minutes,
            reactions: [pop.opened, pop.dismissed, pop.muted],
            seed,
        }
    }

    /// Every device and what it consents to (an empty set: it never consented).
    pub fn devices(&self) -> impl Iterator<Item = (DeviceId, Purposes)> + '_ {
        self.people
            .iter()
            .zip(&self.purposes)
            .map(|(p, s)| (p.id, *s))
    }

    /// The reports of the hour starting at `hour_start`, by minute, in decision order.
    pub fn hour(&mut self, hour_start: Timestamp) -> BTreeMap<i64, Vec<Event>> {
        let local_min = hour_start.millis().div_euclid(60_000) + i64::from(self.offset_minutes);
        let local_hour = local_min.div_euclid(60).rem_euclid(24) as usize;
        let plan = demo::plan_hour(&mut self.rng, &self.people, local_hour, &self.routine);
        plan.into_iter()
            .map(|(minute, batch)| {
                let at = Timestamp(hour_start.millis() + minute * 60_000);
                let events = batch
                    .into_iter()
                    .map(|(device, cell)| Event {
                        device,
                        report: Report {
                            device: self.people[device].id,
                            cell,
                            observed_at: at,
                            utc_offset_minutes: self.offset_minutes,
                        },
                    })
                    .collect();
                (at.millis(), events)
            })
            .collect()
    }

    /// How device `device` reacts to an offer delivered at `at` (`None`: ignores it). A pure
    /// function of the seed, the device and the time, so any driver gets the same answer.
    pub fn reaction(&self, device: usize, at: Timestamp) -> Option<Feedback> {
        let mixed = self.seed
            ^ (device as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (at.millis() as u64).rotate_left(29);
        let u: f64 = StdRng::seed_from_u64(mixed).random();
        let [opened, dismissed, muted] = self.reactions;
        if u < opened {
            Some(Feedback::Opened)
        } else if u < opened + dismissed {
            Some(Feedback::Dismissed)
        } else if u < opened + dismissed + muted {
            Some(Feedback::MuteMerchant)
        } else {
            None
        }
    }
}

impl Simulation {
    /// Runs on a fresh temporary store, deleted afterwards.
    pub async fn run(&self) -> Result<SimReport, SimulateError> {
        let dir = std::env::temp_dir().join(format!(
            "hexveil-simulate-{}-{}",
            std::process::id(),
            crate::clock::SystemClock.now().millis()
        ));
        let result = self.run_in(&dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// Runs with its store (`simulate.db`) and pseudonym key in `dir`, which is kept, so a
    /// test can read what the pipeline wrote.
    pub async fn run_in(&self, dir: &Path) -> Result<SimReport, SimulateError> {
        let started = Instant::now();
        let mut settings = self.settings.clone();
        settings.config.store.url = format!("sqlite://{}", store_path(dir).display());
        settings.config.store.data_dir = dir.to_path_buf();
        // A throwaway store: the disk reserve guards production data, not this.
        settings.config.store.min_free_mb = 0;
        let clock = ManualClock::new(START.minus(std::time::Duration::from_secs(600)));
        let app = App::open(settings.clone(), Arc::new(clock.clone()))
            .await
            .map_err(|e| pipeline(format!("{e:#}")))?;
        let setup = setup(&app, &clock, &self.city, &self.city_label).await?;
        let mut traffic = Traffic::new(&app, &self.city, &setup, self.devices, self.seed);

        clock.set(START.minus(std::time::Duration::from_secs(60)));
        let version = settings.config.policy.version.clone();
        let grants: Vec<_> = traffic
            .devices()
            .filter(|(_, p)| !p.is_empty())
            .map(|(id, p)| app.consents.set(id, p, version.clone()))
            .collect();
        let granted = futures_util::stream::iter(grants)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for r in granted {
            r.map_err(pipeline)?;
        }

        let config = &settings.config;
        let len = duration_millis(config.insights.bucket.get());
        let grace = duration_millis(config.insights.grace.get());
        let end = START.millis() + i64::from(self.days) * 86_400_000;
        let mut tally = report::Tally::new(self.devices, self.days, &setup);
        let mut truth: HashMap<(i64, u64), u64> = HashMap::new();
        let mut pending: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
        let last = end + len + grace;
        // Bucket ends and release times need not fall on a minute: each is handled at the
        // first simulated minute at or after it.
        let (mut next_end, mut next_due) = (START.millis() + len, START.millis() + len + grace);
        let mut t = START.millis();
        while t < last + 60_000 {
            clock.set(Timestamp(t));
            while next_end <= t {
                // The bucket that just ended is final: read its true counts before release.
                let bucket = next_end - len;
                // The truth the release is held to: each device at most k cells per bucket.
                let k = app.settings.current().config.privacy.max_cells_per_bucket;
                for (cell, n) in app
                    .store
                    .bucket_counts(Timestamp(bucket), k)
                    .await
                    .map_err(pipeline)?
                {
                    truth.insert((bucket, cell), n);
                }
                next_end += len;
            }
            if next_due <= t {
                app.insights.release_due().await.map_err(pipeline)?;
                while next_due <= t {
                    next_due += len;
                }
            }
            if t > START.millis() && (t - START.millis()) % 86_400_000 == 0 {
                app.consents.expire_idle().await.map_err(pipeline)?;
            }
            if t < end && t % 3_600_000 == 0 {
                pending.extend(traffic.hour(Timestamp(t)));
            }
            if let Some(batch) = pending.remove(&t) {
                self.minute(&app, &traffic, batch, &mut tally).await?;
            }
            t += 60_000;
        }
        let released = app
            .store
            .released(
                &setup
                    .domain
                    .iter()
                    .map(|c| u64::from(*c))
                    .collect::<Vec<_>>(),
                START,
                Timestamp(end),
            )
            .await
            .map_err(pipeline)?;
        Ok(tally.finish(
            self,
            &settings,
            &released,
            &truth,
            started.elapsed().as_secs_f64(),
        ))
    }

    /// One minute's reports: decided one by one in plan order (in memory, deterministic),
    /// committed together (the group commit batches them; the commit has the last word on
    /// what is shown), then the reactions to delivered offers sent as feedback.
    async fn minute(
        &self,
        app: &App,
        traffic: &Traffic,
        batch: Vec<Event>,
        tally: &mut report::Tally,
    ) -> Result<(), SimulateError> {
        let mut decided = Vec::with_capacity(batch.len());
        for e in batch {
            match app.presence.decide(e.report) {
                Ok((decision, commit)) => decided.push((e, decision, commit)),
                Err(PresenceError::RateLimited { .. }) => tally.rate_limited(),
                Err(e) => return Err(pipeline(e)),
            }
        }
        // `buffered` keeps the plan order, so the tally sees the decisions in that order.
        let events: Vec<Event> = decided.iter().map(|(e, _, _)| *e).collect();
        let written = futures_util::stream::iter(
            decided
                .into_iter()
                .map(|(_, decision, commit)| app.presence.commit(decision, commit)),
        )
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        let mut feedback = Vec::new();
        for (e, r) in events.iter().zip(written) {
            // What may be shown is what the commit says (it can withhold an offer).
            let decision = r.map_err(pipeline)?;
            tally.record(e.device, e.report.observed_at, &decision);
            for (offer, _) in &decision.offers {
                if let Some(f) = traffic.reaction(e.device, e.report.observed_at) {
                    feedback.push((e.report.device, offer.offer_id, f));
                }
            }
        }
        let given = futures_util::stream::iter(
            feedback
                .into_iter()
                .map(|(device, offer, f)| app.presence.feedback(device, offer, f)),
        )
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        for r in given {
            r.map_err(pipeline)?;
        }
        Ok(())
    }
}

/// Where [`Simulation::run_in`] puts its store.
pub fn store_path(dir: &Path) -> PathBuf {
    dir.join("simulate.db")
}
