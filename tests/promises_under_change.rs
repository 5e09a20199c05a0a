//! The promises under change, tried as an adversary would (audit 9): a ForgetMe or a
//! restart never gives an offer back its spent daily budget; a reload or a restart that
//! changes the bucket length, a long catch-up or a failed release never leaves a gap in the
//! released grid (a missing bucket would say "nobody came"); a mid-day reload never lets one
//! device spend two configs' budgets in the same 24 hours.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeSet;

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

/// Bucket starts (minutes after `T0`) in the ledger.
async fn ledger_minutes(app: &App) -> BTreeSet<i64> {
    app.store
        .ledger(Timestamp(T0 - DAY), Timestamp(T0 + 3 * DAY))
        .await
        .unwrap()
        .iter()
        .map(|e| (e.bucket.millis() - T0) / MINUTE)
        .collect()
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
