//! `hexveil serve --demo`: a synthetic city that makes the dashboard come alive at once.
//!
//! Everything goes through the real paths — merchants through [`merchants::add`], offers
//! through [`crate::offers::Offers::upsert`], consent through
//! [`crate::consent::Consents::set`], every simulated report through
//! [`crate::presence::Presence::report`] (caps, contribution bounding, the notification log)
//! and every bucket through [`crate::privacy::Insights::release_due`] (opendp noise, ledger,
//! release-once). Nothing writes a table directly.
//!
//! How it gets a day of released data in seconds: the server runs on a [`DemoClock`], the
//! system clock plus an offset. Seeding sets the offset so that "now" is about a day ago, then
//! moves it forward through the simulated day — devices report at the
//! simulated "now", and the release job releases each hour once it is due on that clock.
//! When the simulated day has caught up, the offset returns to zero and the server runs on
//! real time, before any request is served. Time only ever moves forward.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use h3o::{CellIndex, LatLng, Resolution};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::clock::{Clock, SystemClock, Timestamp, duration_millis};
use crate::merchants;
use crate::model::{Merchant, Offer, Purpose, Purposes};
use crate::presence::Report;
use crate::server::App;

/// Simulated devices.
pub const DEVICES: usize = 3000;
/// Simulated hours of history, released before the server starts serving (all within the
/// last 24 hours, so "shown in the last 24 h" covers the whole simulated day).
pub const HOURS: i64 = 23;
/// Reports processed at once (they share group-commit transactions).
const CONCURRENCY: usize = 1024;

/// The system clock shifted by a settable offset; seeding moves it forward through the past.
#[derive(Debug, Default)]
pub struct DemoClock {
    offset_ms: AtomicI64,
}

impl DemoClock {
    /// Makes "now" read `t` (the clock then runs on from there at real speed).
    pub fn set(&self, t: Timestamp) {
        self.offset_ms
            .store(t.millis() - SystemClock.now().millis(), Ordering::SeqCst);
    }

    /// Back to real time.
    pub fn reset(&self) {
        self.offset_ms.store(0, Ordering::SeqCst);
    }
}

impl Clock for DemoClock {
    fn now(&self) -> Timestamp {
        Timestamp(SystemClock.now().millis() + self.offset_ms.load(Ordering::SeqCst))
    }
}

/// What the demo seeded.
#[derive(Debug, Clone)]
pub struct DemoCity {
    /// (name, API key) of each demo merchant.
    pub merchants: Vec<(String, String)>,
    pub devices: usize,
    pub reports: u64,
    pub offers_shown: u64,
    pub buckets_released: usize,
    pub took: Duration,
}

/// (name, lat, lng, offers as (title, body, radius_k, max per day)).
pub(crate) type Shop = (
    &'static str,
    f64,
    f64,
    &'static [(&'static str, &'static str, u32, u32)],
);

/// A few shops in central Lisbon, about 2 km apart so their areas overlap a little.
pub(crate) const SHOPS: &[Shop] = &[
    (
        "Café Aurora",
        38.7107,
        -9.1366,
        &[
            (
                "Pastel de nata and a coffee for €2",
                "Show this at the counter before 11:00.",
                1,
                150,
            ),
            (
                "Afternoon tea for two",
                "Weekdays from 15:00, while tables last.",
                0,
                40,
            ),
        ],
    ),
    (
        "Mercado Verde",
        38.7190,
        -9.1590,
        &[(
            "10% off fresh fruit",
            "On everything from Portugal.",
            2,
            200,
        )],
    ),
    (
        "Bicicletas Tejo",
        38.7300,
        -9.1400,
        &[(
            "Free bike check-up",
            "Tyres, brakes and chain in ten minutes.",
            1,
            40,
        )],
    ),
];

/// Share of devices out and about (reporting) in each local hour.
pub(crate) const ACTIVITY: [f64; 24] = [
    0.03, 0.02, 0.01, 0.01, 0.02, 0.05, 0.15, 0.35, 0.55, 0.45, 0.40, 0.45, 0.60, 0.55, 0.40, 0.40,
    0.45, 0.60, 0.65, 0.50, 0.35, 0.20, 0.10, 0.05,
];

/// A simulated person's places (`hexveil simulate` uses the same daily routine).
pub(crate) struct Person {
    pub(crate) id: crate::pseudonym::DeviceId,
    home: CellIndex,
    work: CellIndex,
    favourite: CellIndex,
}

/// The daily routine's population knobs: the demo's values are [`Routine::DEMO`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routine {
    /// Share of people reporting in each local hour.
    pub(crate) activity: [f64; 24],
    /// Share of people living near a shop (the rest anywhere in the shops' areas).
    pub(crate) home_near_shop: f64,
    /// Share of people working near a shop.
    pub(crate) work_near_shop: f64,
    /// Share of out-and-about hours in which a person also visits a second place.
    pub(crate) second_place: f64,
}

impl Routine {
    pub(crate) const DEMO: Routine = Routine {
        activity: ACTIVITY,
        home_near_shop: 0.75,
        work_near_shop: 0.8,
        second_place: 0.3,
    };
}

/// Places one person: home and work in the shops' areas (`domain`), busiest near the shops
/// (`centres`), and a favourite shop.
pub(crate) fn person(
    rng: &mut StdRng,
    id: crate::pseudonym::DeviceId,
    centres: &[CellIndex],
    domain: &[CellIndex],
    routine: &Routine,
) -> Person {
    let mut somewhere = |p_central: f64| {
        if rng.random_bool(p_central) {
            let c = pick(rng, centres);
            near(rng, c, 1)
        } else {
            pick(rng, domain)
        }
    };
    let home = somewhere(routine.home_near_shop);
    let work = somewhere(routine.work_near_shop);
    Person {
        id,
        home,
        work,
        favourite: pick(rng, centres),
    }
}

/// One hour of the daily routine: minute of the hour -> (person index, cell), in the order
/// the people report. Each outing is two reports six minutes apart (long enough a dwell for
/// an offer), sometimes followed by a second place half an hour later.
pub(crate) fn plan_hour(
    rng: &mut StdRng,
    people: &[Person],
    local_hour: usize,
    routine: &Routine,
) -> BTreeMap<i64, Vec<(usize, CellIndex)>> {
    let mut plan: BTreeMap<i64, Vec<(usize, CellIndex)>> = BTreeMap::new();
    for (i, p) in people.iter().enumerate() {
        if !rng.random_bool(routine.activity[local_hour % 24]) {
            continue;
        }
        let place = match local_hour {
            7..=9 | 17..=18 if rng.random_bool(0.5) => near(rng, p.work, 1),
            7..=9 | 17..=18 => near(rng, p.home, 1),
            12..=13 if rng.random_bool(0.5) => near(rng, p.favourite, 1),
            10..=16 => p.work,
            19..=23 if rng.random_bool(0.35) => near(rng, p.favourite, 1),
            _ => p.home,
        };
        let m0 = 10 * rng.random_range(0..3);
        plan.entry(m0).or_default().push((i, place));
        plan.entry(m0 + 6).or_default().push((i, place));
        if rng.random_bool(routine.second_place) {
            let other = near(rng, place, 2);
            plan.entry(m0 + 30).or_default().push((i, other));
            plan.entry(m0 + 36).or_default().push((i, other));
        }
    }
    plan
}

fn pick<T: Copy>(rng: &mut StdRng, v: &[T]) -> T {
    v[rng.random_range(0..v.len())]
}

fn near(rng: &mut StdRng, c: CellIndex, k: u32) -> CellIndex {
    let disk: Vec<CellIndex> = c.grid_disk(k);
    pick(rng, &disk)
}

/// Seeds the city into an empty store through the real paths; see the module doc.
///
/// Everything is seeded from a fixed random seed; only the noise (opendp) and the time of day
/// differ between runs.
pub async fn seed(app: &App, clock: &DemoClock) -> anyhow::Result<DemoCity> {
    let started = Instant::now();
    if !app.store.merchants().await?.is_empty() {
        anyhow::bail!(
            "--demo needs an empty store, and this one already has merchants \
             (leave out --store and --data-dir to get a fresh temporary one)"
        );
    }
    let settings = app.settings.current();
    let config = &settings.config;
    let len = duration_millis(config.insights.bucket.get());
    let grace = duration_millis(config.insights.grace.get());
    let real_now = SystemClock.now().millis();
    // The newest bucket already due now, and the first simulated one.
    let last = (real_now - grace - len).div_euclid(len) * len;
    let first = last - (HOURS * 3_600_000 / len - 1).max(0) * len;
    let mut rng = StdRng::seed_from_u64(0x4e58_7665_696c);

    // Merchants and offers exist before the first simulated bucket starts.
    clock.set(Timestamp(first - 120_000));
    let mut shops: Vec<(Merchant, String)> = Vec::new();
    for (name, lat, lng, offers) in SHOPS {
        let cell = LatLng::new(*lat, *lng)
            .context("demo shop coordinates")?
            .to_cell(Resolution::Eight);
        let (merchant, key) = merchants::add(
            &app.store,
            name,
            vec![u64::from(cell)],
            config.location.max_resolution,
            clock.now(),
        )
        .await?;
        for (title, body, radius_k, per_day) in offers.iter() {
            let offer = Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: merchant.merchant_id,
                title: title.to_string(),
                body: body.to_string(),
                cell: u64::from(cell),
                radius_k: (*radius_k).min(config.offers.max_radius_k),
                valid_from: Timestamp(first - 3_600_000),
                valid_until: Timestamp(real_now + 30 * 86_400_000),
                max_notifications_per_day: *per_day,
                opening_hours: Vec::new(),
                updated_at: Timestamp(0),
            };
            app.offers.upsert(&merchant, offer).await?;
        }
        shops.push((merchant, key));
    }
    app.insights.refresh_domain().await?;

    // Where people live and work: the shops' areas, busiest near the shops, so the edges of
    // an area stay quiet (and show suppressed counts) at most hours.
    let domain: Vec<CellIndex> = shops
        .iter()
        .flat_map(|(m, _)| crate::privacy::domain::merchant_area(m, config))
        .filter_map(|c| CellIndex::try_from(c).ok())
        .collect();
    let centres: Vec<CellIndex> = shops
        .iter()
        .filter_map(|(m, _)| CellIndex::try_from(m.cells[0]).ok())
        .collect();
    let people: Vec<Person> = (0..DEVICES)
        .map(|i| {
            let id = app.pseudonyms.device_id(&format!("demo-device-{i:06}"));
            person(&mut rng, id, &centres, &domain, &Routine::DEMO)
        })
        .collect();

    clock.set(Timestamp(first - 60_000));
    let both: Purposes = [Purpose::NearbyOffers, Purpose::FootTraffic]
        .into_iter()
        .collect();
    let consents = futures_util::stream::iter(
        people
            .iter()
            .map(|p| app.consents.set(p.id, both, config.policy.version.clone())),
    )
    .buffer_unordered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await;
    for r in consents {
        r?;
    }

    let mut reports = 0u64;
    let mut offers_shown = 0u64;
    let mut buckets_released = 0usize;
    // Up to the present: the released day, then the hours not yet due, whose contributions
    // wait for the release job like any live report's.
    let until = real_now - 60_000;
    for hour in 0..=(until - first) / 3_600_000 {
        let hour_start = first + hour * 3_600_000;
        let local_hour = ((hour_start.div_euclid(3_600_000)) % 24) as usize;
        let plan = plan_hour(&mut rng, &people, local_hour, &Routine::DEMO);
        for (minute, batch) in plan {
            let at = hour_start + minute * 60_000;
            if at > until {
                break;
            }
            clock.set(Timestamp(at));
            let observed_at = clock.now();
            let results = futures_util::stream::iter(batch.into_iter().map(|(i, cell)| {
                app.presence.report(Report {
                    device: people[i].id,
                    cell,
                    observed_at,
                    utc_offset_minutes: 0,
                })
            }))
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
            for r in results {
                let decision = r?;
                reports += 1;
                offers_shown += decision.offers.len() as u64;
            }
        }
        // The previous hour is due by now (the release job's own call, on the demo clock).
        buckets_released += app.insights.release_due().await?.released;
    }
    clock.reset();
    buckets_released += app.insights.release_due().await?.released;
    Ok(DemoCity {
        merchants: shops.into_iter().map(|(m, key)| (m.name, key)).collect(),
        devices: people.len(),
        reports,
        offers_shown,
        buckets_released,
        took: started.elapsed(),
    })
}

/// A fresh directory for the demo's data (used unless `--store` or `--data-dir` is given).
pub fn fresh_data_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "hexveil-demo-{}-{}",
        std::process::id(),
        SystemClock.now().millis()
    ))
}

/// The clock handle to give the [`App`].
pub fn shared(clock: &Arc<DemoClock>) -> crate::clock::SharedClock {
    clock.clone()
}
