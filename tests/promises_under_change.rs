//! The promises under change, tried as an adversary would (audit 9): a ForgetMe or a
//! restart never gives an offer back its spent daily budget; a reload or a restart that
//! changes the bucket length, a long catch-up or a failed release never leaves a gap in the
//! released grid (a missing bucket would say "nobody came"); a mid-day reload never lets one
//! device spend two configs' budgets in the same 24 hours.

#[path = "support/harness.rs"]
mod harness;

use harness::*;
use hexveil::clock::{SharedClock, Timestamp};
use hexveil::config::Config;
use hexveil::model::{Offer, Purpose};
use hexveil::presence::Report;
use hexveil::pseudonym::DeviceId;
use hexveil::server::App;
use hexveil::settings::Settings;

/// 2026-01-05T10:00:00Z.
const T0: i64 = 1_767_607_200_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn cell_at(lat: f64, lng: f64) -> h3o::CellIndex {
    h3o::LatLng::new(lat, lng)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
}

fn settings(dir: &std::path::Path, extra: &str) -> Settings {
    let toml = format!("{}\n{extra}", store_toml(dir));
    Settings::new(Config::from_toml(&toml).unwrap()).unwrap()
}

async fn open_app(dir: &std::path::Path, extra: &str, clock: SharedClock) -> App {
    App::open(settings(dir, extra), clock).await.unwrap()
}

async fn grant(app: &App, device: DeviceId, purposes: &[Purpose]) {
    app.consents
        .set(device, purposes.iter().copied().collect(), "1".into())
        .await
        .unwrap();
}

async fn report(app: &App, device: DeviceId, cell: h3o::CellIndex, at: i64) -> usize {
    app.presence
        .report(Report {
            device,
            cell,
            observed_at: Timestamp(at),
            utc_offset_minutes: 0,
        })
        .await
        .unwrap()
        .offers
        .len()
}

/// An offer with a budget of 2 a day is delivered twice; the first person then calls
/// ForgetMe (erasing their notification) and the server restarts. A third person must still
/// get nothing from this offer within the 24 hours: the budget counts deliveries, not the
/// notifications that survive erasure.
#[tokio::test]
async fn forget_me_and_a_restart_never_refill_an_offers_daily_budget() {
    const CONFIG: &str = "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\n";
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let app = open_app(dir.path(), CONFIG, shared.clone()).await;
    let here = cell_at(59.33, 18.07);
    let (m, _) = hexveil::merchants::add(&app.store, "A", vec![here.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.offers
        .upsert(
            &m,
            Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: m.merchant_id,
                title: "Coffee".into(),
                body: String::new(),
                cell: here.into(),
                radius_k: 0,
                valid_from: Timestamp(T0 - DAY),
                valid_until: Timestamp(T0 + 10 * DAY),
                max_notifications_per_day: 2,
                opening_hours: vec![],
                updated_at: Timestamp(0),
            },
        )
        .await
        .unwrap();
    let visitor = |n: u8| DeviceId([n; 16]);
    for n in 1..=3 {
        grant(&app, visitor(n), &[Purpose::NearbyOffers]).await;
    }
    assert_eq!(report(&app, visitor(1), here, T0).await, 1);
    assert_eq!(report(&app, visitor(2), here, T0).await, 1);
    app.consents.forget(visitor(1)).await.unwrap();
    drop(app);
    clock.set(Timestamp(T0 + HOUR));
    let app = open_app(dir.path(), CONFIG, shared).await;
    grant(&app, visitor(3), &[Purpose::NearbyOffers]).await;
    assert_eq!(
        report(&app, visitor(3), here, T0 + HOUR).await,
        0,
        "a third delivery within 24 hours of a budget of 2"
    );
    // After the 24 hours the budget is free again.
    clock.set(Timestamp(T0 + DAY + MINUTE));
    grant(&app, visitor(4), &[Purpose::NearbyOffers]).await;
    assert_eq!(report(&app, visitor(4), here, T0 + DAY + MINUTE).await, 1);
}

/// Every released bucket starts where the previous one ended, from the first whole bucket
/// after the merchant registered: no gap, no overlap (returns (start, length) in minutes
/// after `T0`).
async fn assert_contiguous(app: &App, first: i64) -> Vec<(i64, i64)> {
    let ledger: Vec<(i64, i64)> = app
        .store
        .ledger(Timestamp(T0 - DAY), Timestamp(T0 + 3 * DAY))
        .await
        .unwrap()
        .iter()
        .map(|e| ((e.bucket.millis() - T0) / MINUTE, e.bucket_len_ms / MINUTE))
        .collect();
    let mut next = first;
    for (start, len) in &ledger {
        assert_eq!(*start, next, "a gap or an overlap at minute {start}");
        next = start + len;
    }
    ledger
}

const CATCH_UP_RATE: &str =
    "[rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";

/// `insights.bucket` goes from 1 minute to 1 hour: first as a hot reload (which must change
/// nothing), then with a restart. Minute buckets — occupied or empty alike — go on being
/// released until the next UTC midnight, and hours from there: the released grid never
/// depends on who was seen, and no report is dropped as "late" for a bucket still open.
#[tokio::test]
async fn a_bucket_length_change_applies_from_the_next_utc_midnight_without_a_gap() {
    let minute = format!("{CATCH_UP_RATE}[insights]\nbucket = \"1m\"\ngrace = \"10m\"\n");
    let hour = format!("{CATCH_UP_RATE}[insights]\nbucket = \"1h\"\ngrace = \"10m\"\n");
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let app = open_app(dir.path(), &minute, shared.clone()).await;
    let home = cell_at(59.33, 18.07);
    hexveil::merchants::add(&app.store, "A", vec![home.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.insights.refresh_domain().await.unwrap();
    let device = DeviceId([6; 16]);
    grant(&app, device, &[Purpose::FootTraffic]).await;
    let contributions = async |app: &App| app.store.load_contributions().await.unwrap().len();
    for m in 0..40 {
        let now = T0 + m * MINUTE + 30_000;
        clock.set(Timestamp(now));
        if m == 30 {
            app.settings.replace(settings(dir.path(), &hour));
        }
        if [22, 25, 35].contains(&m) {
            let before = contributions(&app).await;
            report(&app, device, home, now).await;
            assert_eq!(contributions(&app).await, before + 1, "minute {m} counted");
        }
        app.insights.release_due().await.unwrap();
    }
    drop(app);
    let app = open_app(dir.path(), &hour, shared).await;
    let before = contributions(&app).await;
    report(&app, device, home, T0 + 41 * MINUTE).await;
    assert_eq!(
        contributions(&app).await,
        before + 1,
        "counted after the restart"
    );
    // Release everything due by 03:30 the next day (the UTC midnight is T0 + 14 h).
    clock.set(Timestamp(T0 + 17 * HOUR + 30 * MINUTE));
    while app.insights.release_due().await.unwrap().released > 0 {}
    let ledger = assert_contiguous(&app, 0).await;
    let midnight = 14 * 60;
    assert!(
        ledger
            .iter()
            .all(|(s, len)| *len == if *s < midnight { 1 } else { 60 }),
        "minutes until midnight, hours from there"
    );
    assert_eq!(ledger.last(), Some(&(midnight + 120, 60)));
    assert!(
        contributions(&app).await == 0,
        "every contribution released"
    );
}

/// A long outage with 1-minute buckets: the catch-up releases the grid in order, a bounded
/// number per run, and never jumps past an empty bucket to an occupied one.
#[tokio::test]
async fn a_long_catch_up_releases_the_grid_in_order_without_a_gap() {
    let cfg = "[insights]\nbucket = \"1m\"\ngrace = \"1d\"\n";
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let app = open_app(dir.path(), cfg, shared.clone()).await;
    let home = cell_at(59.33, 18.07);
    hexveil::merchants::add(&app.store, "A", vec![home.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.insights.refresh_domain().await.unwrap();
    let device = DeviceId([5; 16]);
    grant(&app, device, &[Purpose::FootTraffic]).await;
    for m in [100, 1400] {
        let now = T0 + m * MINUTE + 30_000;
        clock.set(Timestamp(now));
        report(&app, device, home, now).await;
    }
    drop(app);
    clock.set(Timestamp(T0 + 1401 * MINUTE + DAY + 1000));
    let app = open_app(dir.path(), cfg, shared).await;
    let run = app.insights.release_due().await.unwrap();
    assert_eq!(run.released, 1000, "bounded per run");
    assert_eq!(assert_contiguous(&app, 0).await.len(), 1000);
    while app.insights.release_due().await.unwrap().released > 0 {}
    let ledger = assert_contiguous(&app, 0).await;
    assert_eq!(
        ledger.len(),
        1401,
        "minutes 0 to 1400 (all that is due), each once"
    );
    assert!(app.store.load_contributions().await.unwrap().is_empty());
}

/// Two accepted configs, each within the promise: B (k = 4, 4 pairs a day, ρ 0.06 a bucket)
/// and A (k = 4, 24 pairs a day, ρ 0.01 a bucket). A reload from B to A a minute into the
/// day must not let one device spend B's day and then A's: the window's spend is counted in
/// ρ at what each released pair cost, against the budget of the config in force.
#[tokio::test]
async fn a_mid_day_reload_never_composes_two_daily_budgets() {
    use std::collections::BTreeMap;
    const FAST: &str = "[insights]\nbucket = \"1m\"\ngrace = \"0s\"\n\
        [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";
    let b_cfg = format!(
        "{FAST}[privacy]\nmax_cells_per_bucket = 4\nmax_contributions_per_day = 4\nrho_per_bucket = 0.04\n"
    );
    let a_cfg = format!(
        "{FAST}[privacy]\nmax_cells_per_bucket = 4\nmax_contributions_per_day = 16\nrho_per_bucket = 0.01\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let app = open_app(dir.path(), &b_cfg, shared).await;
    let hourly_budget = |s: &Settings| s.consequences.privacy.budget[0].rho;
    let promised =
        hourly_budget(&app.settings.current()).max(hourly_budget(&settings(dir.path(), &a_cfg)));
    let home = cell_at(59.33, 18.07);
    hexveil::merchants::add(&app.store, "A", vec![home.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.insights.refresh_domain().await.unwrap();
    let cells: Vec<h3o::CellIndex> = home.grid_disk::<Vec<_>>(1).into_iter().take(4).collect();
    let device = DeviceId([8; 16]);
    grant(&app, device, &[Purpose::FootTraffic]).await;
    // bucket -> pairs recorded, read before each release deletes them.
    let mut recorded: BTreeMap<i64, u32> = BTreeMap::new();
    for m in 0..10 {
        let now = T0 + m * MINUTE + 30_000;
        clock.set(Timestamp(now));
        if m == 1 {
            app.settings.replace(settings(dir.path(), &a_cfg));
        }
        for c in &cells {
            report(&app, device, *c, now).await;
        }
        for (d, _, b) in app.store.load_contributions().await.unwrap() {
            if d == device {
                *recorded.entry(b.millis()).or_default() += 1;
            }
        }
        clock.set(Timestamp(now + MINUTE / 2));
        app.insights.release_due().await.unwrap();
    }
    let scale: BTreeMap<i64, f64> = app
        .store
        .ledger(Timestamp(T0 - DAY), Timestamp(T0 + DAY))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.bucket.millis(), e.scale))
        .collect();
    let rho: f64 = recorded
        .iter()
        .map(|(b, n)| f64::from(*n) / (2.0 * scale[b] * scale[b]))
        .sum();
    assert!(
        rho <= promised * (1.0 + 1e-9),
        "ρ {rho} spent in 10 minutes, the day's hourly budget is {promised}: {recorded:?}"
    );
    assert_eq!(recorded.values().sum::<u32>(), 4, "B's day, nothing more");
}
