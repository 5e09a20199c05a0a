//! Property test: random traffic — many devices, merchants and offers, feedback, consent
//! changes, clock jumps and config reloads over simulated weeks — and then a check, from the
//! durable notification log, that no device ever received more than the caps in force
//! allowed at the moment of each notification.

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::*;
use hexveil::caps::{DAY, WEEK};
use hexveil::clock::{Clock, Timestamp};
use hexveil::config::{CapsConfig, Config};
use hexveil::model::{Feedback, Purpose, Purposes};
use hexveil::presence::Report;
use hexveil::settings::Settings;
use proptest::prelude::*;

const DEVICES: usize = 12;
const MERCHANTS: usize = 4;

#[derive(Debug, Clone)]
enum Action {
    Report {
        device: usize,
        cell: usize,
        offset: i32,
    },
    Advance {
        minutes: u64,
    },
    Feedback {
        device: usize,
        action: u8,
    },
    Consent {
        device: usize,
        on: bool,
    },
    Reload {
        per_day: u32,
        per_week: u32,
        interval_min: u64,
        per_merchant: u32,
        quiet: bool,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0..DEVICES, 0..3usize, prop_oneof![Just(0), Just(60), Just(-300)])
            .prop_map(|(device, cell, offset)| Action::Report { device, cell, offset }),
        4 => prop_oneof![1..20u64, 20..300u64, 300..3000u64].prop_map(|minutes| Action::Advance { minutes }),
        1 => (0..DEVICES, 0..3u8).prop_map(|(device, action)| Action::Feedback { device, action }),
        1 => (0..DEVICES, proptest::bool::weighted(0.8)).prop_map(|(device, on)| Action::Consent { device, on }),
        1 => (1..5u32, 2..12u32, prop_oneof![Just(0u64), Just(30), Just(120)], 1..3u32, proptest::bool::ANY)
            .prop_map(|(per_day, per_week, interval_min, per_merchant, quiet)| Action::Reload { per_day, per_week, interval_min, per_merchant, quiet }),
    ]
}

fn cells() -> Vec<h3o::CellIndex> {
    let centre = h3o::LatLng::new(35.68, 139.76)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let ring: Vec<_> = centre.grid_ring_fast(1).flatten().collect();
    vec![centre, ring[0], ring[3]]
}

/// One run: returns a description of the first violation found, if any.
async fn run(actions: Vec<Action>) -> Result<usize, String> {
    let (clock, shared) = manual_clock(1_767_614_400_000);
    let mut config = Config {
        caps: property_caps(3, 10, 120, 1, true),
        ..Config::default()
    };
    config.rate_limits.device_reports_per_hour = 3_600_000;
    config.rate_limits.device_burst = 1000;
    let dir = tempfile::tempdir().unwrap();
    config.store.url = format!("sqlite://{}/p.db", dir.path().display());
    config.store.data_dir = dir.path().to_path_buf();
    let app = hexveil::server::App::open(Settings::new(config.clone()).unwrap(), shared)
        .await
        .unwrap();
    let cells = cells();
    // Offers: each merchant has one at each cell, with a small own budget.
    let mut budgets = HashMap::new();
    for m in 0..MERCHANTS {
        let (merchant, _) = hexveil::merchants::add(
            &app.store,
            &format!("m{m}"),
            cells.iter().map(|c| u64::from(*c)).collect(),
            8,
            clock.now(),
        )
        .await
        .unwrap();
        for (i, c) in cells.iter().enumerate() {
            let offer = hexveil::model::Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: merchant.merchant_id,
                title: format!("offer {m}/{i}"),
                body: String::new(),
                cell: u64::from(*c),
                radius_k: 1,
                valid_from: clock.now(),
                valid_until: clock.now().plus(8 * WEEK),
                max_notifications_per_day: 2 + (m as u32 % 3),
                opening_hours: Vec::new(),
                updated_at: clock.now(),
            };
            let saved = app.offers.upsert(&merchant, offer).await.unwrap();
            budgets.insert(saved.offer_id, saved.max_notifications_per_day);
        }
    }
    let ids: Vec<_> = (0..DEVICES)
        .map(|i| app.pseudonyms.device_id(&format!("prop-device-{i:06}")))
        .collect();
    let both: Purposes = [Purpose::NearbyOffers, Purpose::FootTraffic]
        .into_iter()
        .collect();
    for id in &ids {
        app.consents.set(*id, both, "1".into()).await.unwrap();
    }
    // The caps in force over time, and feedback given: the oracle's view.
    let mut timeline: Vec<(Timestamp, CapsConfig)> = vec![(clock.now(), config.caps.clone())];
    let mut mutes: Vec<(Timestamp, hexveil::pseudonym::DeviceId, uuid::Uuid)> = Vec::new();
    let mut last_offer: HashMap<usize, (uuid::Uuid, uuid::Uuid)> = HashMap::new();
    for a in actions {
        match a {
            Action::Report {
                device,
                cell,
                offset,
            } => {
                let r = Report {
                    device: ids[device],
                    cell: cells[cell],
                    observed_at: clock.now(),
                    utc_offset_minutes: offset,
                };
                let d = app.presence.report(r).await.map_err(|e| e.to_string())?;
                if let Some((o, _)) = d.offers.first() {
                    last_offer.insert(device, (o.offer_id, o.merchant_id));
                }
            }
            Action::Advance { minutes } => clock.advance(Duration::from_secs(minutes * 60)),
            Action::Feedback { device, action } => {
                if let Some((offer, merchant)) = last_offer.get(&device) {
                    let fb = [
                        Feedback::Dismissed,
                        Feedback::Opened,
                        Feedback::MuteMerchant,
                    ][action as usize];
                    if app.presence.feedback(ids[device], *offer, fb).await.is_ok()
                        && fb == Feedback::MuteMerchant
                    {
                        mutes.push((clock.now(), ids[device], *merchant));
                    }
                }
            }
            Action::Consent { device, on } => {
                let p = if on { both } else { Purposes::NONE };
                app.consents.set(ids[device], p, "1".into()).await.unwrap();
                if !on {
                    last_offer.remove(&device);
                    mutes.retain(|(_, d, _)| *d != ids[device]);
                }
            }
            Action::Reload {
                per_day,
                per_week,
                interval_min,
                per_merchant,
                quiet,
            } => {
                // A reload takes effect strictly after everything before it, so the oracle
                // never attributes a new cap to a notification sent at the same instant.
                clock.advance(Duration::from_millis(1));
                let mut next = app.settings.current().config.clone();
                next.caps = property_caps(per_day, per_week, interval_min, per_merchant, quiet);
                app.settings.replace(Settings::new(next.clone()).unwrap());
                timeline.push((clock.now(), next.caps));
            }
        }
    }
    // The durable log, read back from the database file.
    let rows = notifications(&dir.path().join("p.db")).await;
    let delivered = rows.len();
    let caps_at = |t: Timestamp| -> &CapsConfig {
        &timeline
            .iter()
            .rev()
            .find(|(since, _)| *since <= t)
            .unwrap()
            .1
    };
    let mut per_device: HashMap<Vec<u8>, Vec<(Timestamp, uuid::Uuid, uuid::Uuid)>> = HashMap::new();
    let mut per_offer: HashMap<uuid::Uuid, Vec<Timestamp>> = HashMap::new();
    for (device, offer, merchant, t) in rows {
        per_device
            .entry(device)
            .or_default()
            .push((t, offer, merchant));
        per_offer.entry(offer).or_default().push(t);
    }
    for (device, log) in &per_device {
        for (i, (t, _, merchant)) in log.iter().enumerate() {
            let c = caps_at(*t);
            let window = |len: Duration| {
                log[..=i]
                    .iter()
                    .filter(|(s, _, _)| *s > t.minus(len))
                    .count() as u32
            };
            if window(DAY) > c.per_device_per_day {
                return Err(format!(
                    "device {device:?}: {} in a day at {t:?}, cap {}",
                    window(DAY),
                    c.per_device_per_day
                ));
            }
            if window(WEEK) > c.per_device_per_week {
                return Err(format!(
                    "device {device:?}: {} in a week, cap {}",
                    window(WEEK),
                    c.per_device_per_week
                ));
            }
            if i > 0 && t.millis() - log[i - 1].0.millis() < c.min_interval.get().as_millis() as i64
            {
                return Err(format!(
                    "device {device:?}: two notifications closer than {}",
                    c.min_interval
                ));
            }
            let to_merchant = log[..=i]
                .iter()
                .filter(|(s, _, m)| m == merchant && *s > t.minus(WEEK))
                .count() as u32;
            if to_merchant > c.per_merchant_per_device_per_week {
                return Err(format!(
                    "device {device:?}: {to_merchant} from one merchant in a week"
                ));
            }
            if mutes
                .iter()
                .any(|(at, d, m)| d.0.as_slice() == device.as_slice() && m == merchant && at < t)
            {
                return Err(format!(
                    "device {device:?}: notified by a merchant it muted"
                ));
            }
        }
    }
    for (offer, times) in &per_offer {
        for (i, t) in times.iter().enumerate() {
            let n = times[..=i].iter().filter(|s| **s > t.minus(DAY)).count() as u32;
            if n > budgets[offer] {
                return Err(format!(
                    "offer {offer}: {n} sends in a day, budget {}",
                    budgets[offer]
                ));
            }
        }
    }
    Ok(delivered)
}

async fn notifications(
    path: &std::path::Path,
) -> Vec<(Vec<u8>, uuid::Uuid, uuid::Uuid, Timestamp)> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    sqlx::query(
        "SELECT device, offer_id, merchant_id, sent_at FROM notifications ORDER BY sent_at, rowid",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get::<Vec<u8>, _>(0),
            uuid::Uuid::parse_str(&r.get::<String, _>(1)).unwrap(),
            uuid::Uuid::parse_str(&r.get::<String, _>(2)).unwrap(),
            Timestamp(r.get::<i64, _>(3)),
        )
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_device_ever_gets_more_than_the_caps_allow(actions in proptest::collection::vec(action(), 50..400)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = rt.block_on(run(actions));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

#[test]
fn the_random_traffic_does_deliver_offers() {
    // Guard against a vacuous property: a plain scenario must produce notifications.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut actions = Vec::new();
    for _ in 0..200 {
        for device in 0..DEVICES {
            actions.push(Action::Report {
                device,
                cell: device % 3,
                offset: 0,
            });
        }
        actions.push(Action::Advance { minutes: 7 });
    }
    let delivered = rt.block_on(run(actions)).unwrap();
    // 12 devices over ~23 simulated hours, 3 per day each: the caps, not the test, limit it.
    assert!(
        delivered >= DEVICES * 2,
        "only {delivered} notifications delivered"
    );
}
