//! Two nodes on one store (as behind a load balancer): the store is the truth, each node's
//! memory a cache. Reports, feedback and consent changes of the same devices reach both
//! nodes, at once too, under one manual clock; what the store holds must keep every promise
//! a single node keeps. The second node always opens the first one's store URL, so these
//! tests run unchanged on any backend.

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::*;
use hexveil::caps::{DAY, Reason, WEEK};
use hexveil::clock::{Clock, SharedClock, Timestamp};
use hexveil::config::{CapsConfig, Config, QuietHours};
use hexveil::model::{Feedback, Merchant, Offer, Purpose, Purposes};
use hexveil::presence::Report;
use hexveil::pseudonym::DeviceId;
use hexveil::server::App;
use hexveil::settings::Settings;
use proptest::prelude::*;

const T0: i64 = 1_767_614_400_000; // 2026-01-05 12:00 UTC

const DEVICES: usize = 8;
const MERCHANTS: usize = 4;

fn both() -> Purposes {
    [Purpose::NearbyOffers, Purpose::FootTraffic]
        .into_iter()
        .collect()
}

fn centre() -> h3o::CellIndex {
    h3o::LatLng::new(35.68, 139.76)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
}

fn cells() -> Vec<h3o::CellIndex> {
    let ring: Vec<_> = centre().grid_ring_fast(1).flatten().collect();
    vec![centre(), ring[0], ring[3]]
}

/// A cell far from every offer (not within one ring of the centre).
fn elsewhere() -> h3o::CellIndex {
    centre().grid_ring_fast(4).flatten().next().unwrap()
}

/// Two apps on one store: the second opens the first one's store URL (and shares its data
/// dir, for the device key). Background jobs do not run: the tests drive them.
async fn open_pair(mut config: Config, clock: SharedClock) -> (App, App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    config.store.url = format!("sqlite://{}/n.db", dir.path().display());
    config.store.data_dir = dir.path().to_path_buf();
    let a = App::open(Settings::new(config.clone()).unwrap(), clock.clone())
        .await
        .unwrap();
    config.store.url = a.settings.current().config.store.url.clone();
    let b = App::open(Settings::new(config).unwrap(), clock)
        .await
        .unwrap();
    (a, b, dir)
}

fn base_config() -> Config {
    let mut config = Config::default();
    config.rate_limits.device_reports_per_hour = 3_600_000;
    config.rate_limits.device_burst = 1000;
    config
}

/// A merchant with one offer at each of `at`, registered at node `a`; both nodes see them.
async fn merchant(
    a: &App,
    b: &App,
    name: &str,
    at: &[h3o::CellIndex],
    budget: u32,
    now: Timestamp,
) -> (Merchant, Vec<Offer>) {
    let (m, _) = hexveil::merchants::add(
        &a.store,
        name,
        at.iter().map(|c| u64::from(*c)).collect(),
        8,
        now.minus(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut offers = Vec::new();
    for (i, c) in at.iter().enumerate() {
        let offer = Offer {
            offer_id: uuid::Uuid::nil(),
            merchant_id: m.merchant_id,
            title: format!("{name} {i}"),
            body: String::new(),
            cell: u64::from(*c),
            radius_k: 1,
            valid_from: now.minus(Duration::from_secs(3600)),
            valid_until: now.plus(8 * WEEK),
            max_notifications_per_day: budget,
            opening_hours: Vec::new(),
            updated_at: now,
        };
        offers.push(a.offers.upsert(&m, offer).await.unwrap());
    }
    for app in [a, b] {
        app.offers.refresh().await.unwrap();
        app.insights.refresh_domain().await.unwrap();
    }
    (m, offers)
}

fn report(device: DeviceId, cell: h3o::CellIndex, at: Timestamp) -> Report {
    Report {
        device,
        cell,
        observed_at: at,
        utc_offset_minutes: 0,
    }
}

// ---------------------------------------------------------------------------------------
// The caps, by property.

#[derive(Debug, Clone)]
enum Action {
    Report {
        node: usize,
        device: usize,
        cell: usize,
        offset: i32,
    },
    /// The same device reports at both nodes at once.
    Both {
        device: usize,
        cell: usize,
    },
    Advance {
        minutes: u64,
    },
    Feedback {
        node: usize,
        device: usize,
        action: u8,
    },
    Consent {
        node: usize,
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
        5 => (0..2usize, 0..DEVICES, 0..3usize, prop_oneof![Just(0), Just(60), Just(-300)])
            .prop_map(|(node, device, cell, offset)| Action::Report { node, device, cell, offset }),
        4 => (0..DEVICES, 0..3usize).prop_map(|(device, cell)| Action::Both { device, cell }),
        4 => prop_oneof![1..20u64, 20..300u64, 300..3000u64].prop_map(|minutes| Action::Advance { minutes }),
        2 => (0..2usize, 0..DEVICES, 0..3u8).prop_map(|(node, device, action)| Action::Feedback { node, device, action }),
        1 => (0..2usize, 0..DEVICES, proptest::bool::weighted(0.8)).prop_map(|(node, device, on)| Action::Consent { node, device, on }),
        1 => (1..5u32, 2..12u32, prop_oneof![Just(0u64), Just(30), Just(120)], 1..3u32, proptest::bool::ANY)
            .prop_map(|(per_day, per_week, interval_min, per_merchant, quiet)| Action::Reload { per_day, per_week, interval_min, per_merchant, quiet }),
    ]
}

/// One run over two nodes: the number of notifications stored, or the first violation.
async fn run(actions: Vec<Action>) -> Result<usize, String> {
    let (clock, shared) = manual_clock(T0);
    let mut config = base_config();
    config.caps = property_caps(3, 10, 120, 1, true);
    let (a, b, _dir) = open_pair(config.clone(), shared).await;
    let nodes = [&a, &b];
    let cells = cells();
    for m in 0..MERCHANTS {
        merchant(&a, &b, &format!("m{m}"), &cells, 1000, clock.now()).await;
    }
    let ids: Vec<_> = (0..DEVICES)
        .map(|i| a.pseudonyms.device_id(&format!("node-device-{i:06}")))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        // Consent is granted at either node; the other learns of it from the store.
        nodes[i % 2]
            .consents
            .set(*id, both(), "1".into())
            .await
            .unwrap();
    }
    let mut timeline: Vec<(Timestamp, CapsConfig)> = vec![(clock.now(), config.caps.clone())];
    let mut mutes: Vec<(Timestamp, DeviceId, uuid::Uuid)> = Vec::new();
    let mut last_offer: HashMap<usize, (uuid::Uuid, uuid::Uuid)> = HashMap::new();
    fn note(
        last: &mut HashMap<usize, (uuid::Uuid, uuid::Uuid)>,
        device: usize,
        d: &hexveil::presence::Decision,
    ) {
        if let Some((o, _)) = d.offers.first() {
            last.insert(device, (o.offer_id, o.merchant_id));
        }
    }
    for act in actions {
        match act {
            Action::Report {
                node,
                device,
                cell,
                offset,
            } => {
                let r = Report {
                    utc_offset_minutes: offset,
                    ..report(ids[device], cells[cell], clock.now())
                };
                let d = nodes[node]
                    .presence
                    .report(r)
                    .await
                    .map_err(|e| e.to_string())?;
                note(&mut last_offer, device, &d);
            }
            Action::Both { device, cell } => {
                let r = report(ids[device], cells[cell], clock.now());
                let (x, y) = tokio::join!(a.presence.report(r), b.presence.report(r));
                note(&mut last_offer, device, &x.map_err(|e| e.to_string())?);
                note(&mut last_offer, device, &y.map_err(|e| e.to_string())?);
            }
            Action::Advance { minutes } => clock.advance(Duration::from_secs(minutes * 60)),
            Action::Feedback {
                node,
                device,
                action,
            } => {
                if let Some((offer, merchant)) = last_offer.get(&device) {
                    let fb = [
                        Feedback::Dismissed,
                        Feedback::Opened,
                        Feedback::MuteMerchant,
                    ][action as usize];
                    if nodes[node]
                        .presence
                        .feedback(ids[device], *offer, fb)
                        .await
                        .is_ok()
                        && fb == Feedback::MuteMerchant
                    {
                        mutes.push((clock.now(), ids[device], *merchant));
                    }
                }
            }
            Action::Consent { node, device, on } => {
                let p = if on { both() } else { Purposes::NONE };
                nodes[node]
                    .consents
                    .set(ids[device], p, "1".into())
                    .await
                    .unwrap();
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
                clock.advance(Duration::from_millis(1));
                let mut next = a.settings.current().config.clone();
                next.caps = property_caps(per_day, per_week, interval_min, per_merchant, quiet);
                for app in nodes {
                    app.settings.replace(Settings::new(next.clone()).unwrap());
                }
                timeline.push((clock.now(), next.caps));
            }
        }
    }
    check_log(&notifications(&a).await, &timeline, &mutes)
}

type Row = (Vec<u8>, uuid::Uuid, uuid::Uuid, Timestamp);

/// Every stored notification, oldest first, read through the store of the first node.
async fn notifications(app: &App) -> Vec<Row> {
    let mut rows: Vec<Row> = app
        .store
        .load_notifications(Timestamp(0))
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.device.0.to_vec(), n.offer_id, n.merchant_id, n.sent_at))
        .collect();
    rows.sort_by_key(|r| r.3);
    rows
}

/// The oracle: no device got more than the caps in force at each notification allowed.
fn check_log(
    rows: &[Row],
    timeline: &[(Timestamp, CapsConfig)],
    mutes: &[(Timestamp, DeviceId, uuid::Uuid)],
) -> Result<usize, String> {
    let caps_at = |t: Timestamp| -> &CapsConfig {
        &timeline
            .iter()
            .rev()
            .find(|(since, _)| *since <= t)
            .unwrap()
            .1
    };
    let mut per_device: HashMap<Vec<u8>, Vec<(Timestamp, uuid::Uuid)>> = HashMap::new();
    for (device, _, merchant, t) in rows {
        per_device
            .entry(device.clone())
            .or_default()
            .push((*t, *merchant));
    }
    for (device, log) in &per_device {
        for (i, (t, merchant)) in log.iter().enumerate() {
            let c = caps_at(*t);
            let window =
                |len: Duration| log[..=i].iter().filter(|(s, _)| *s > t.minus(len)).count() as u32;
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
            // Offers of one reply share an instant; different replies must keep the interval.
            if i > 0
                && log[i - 1].0 != *t
                && t.millis() - log[i - 1].0.millis() < c.min_interval.get().as_millis() as i64
            {
                return Err(format!(
                    "device {device:?}: two notifications closer than {}",
                    c.min_interval
                ));
            }
            let to_merchant = log[..=i]
                .iter()
                .filter(|(s, m)| m == merchant && *s > t.minus(WEEK))
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
    Ok(rows.len())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn no_device_gets_more_than_the_caps_allow_across_two_nodes(
        actions in proptest::collection::vec(action(), 50..300)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = rt.block_on(run(actions));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

#[test]
fn reports_at_both_nodes_at_once_still_deliver_offers() {
    // Against a vacuous property: the same devices at both nodes at once must still get
    // offers, as many as the caps allow (3 a day, 2 h apart) and no more.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut actions = Vec::new();
    for _ in 0..150 {
        for device in 0..DEVICES {
            actions.push(Action::Both {
                device,
                cell: device % 3,
            });
        }
        actions.push(Action::Advance { minutes: 7 });
    }
    let delivered = rt.block_on(run(actions)).unwrap();
    // ~17.5 simulated hours from noon, quiet from 21:00 to 09:00: the caps, not the test,
    // limit it — at least 2 a device.
    assert!(
        delivered >= DEVICES * 2,
        "only {delivered} notifications delivered"
    );
}

// ---------------------------------------------------------------------------------------
// Dwell, consent and feedback across nodes.

fn open_caps() -> Config {
    let mut config = base_config();
    config.caps.quiet_hours = QuietHours(None);
    config.caps.per_cell_per_minute = 1000;
    config.caps.ignore_fatigue_after = 0;
    config
}

async fn consenting(app: &App, token: &str) -> DeviceId {
    let id = app.pseudonyms.device_id(token);
    app.consents.set(id, both(), "1".into()).await.unwrap();
    id
}

#[tokio::test]
async fn a_device_that_moved_at_one_node_is_not_offered_on_a_stale_dwell_at_the_other() {
    let (clock, shared) = manual_clock(T0);
    let (a, b, _dir) = open_pair(open_caps(), shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let moved = consenting(&a, "device-that-moves-0001").await;
    let stayed = consenting(&a, "device-that-stays-0001").await;
    for d in [moved, stayed] {
        let first = a
            .presence
            .report(report(d, centre(), clock.now()))
            .await
            .unwrap();
        assert_eq!(first.reason, Some(Reason::DwellNotMet));
    }
    clock.advance(Duration::from_secs(120));
    // `moved` is seen far away at node B; node A's memory still has it at the café.
    b.presence
        .report(report(moved, elsewhere(), clock.now()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(240));
    let control = a
        .presence
        .report(report(stayed, centre(), clock.now()))
        .await
        .unwrap();
    assert_eq!(
        control.offers.len(),
        1,
        "a device that stayed 6 min is offered"
    );
    let stale = a
        .presence
        .report(report(moved, centre(), clock.now()))
        .await
        .unwrap();
    assert!(
        stale.offers.is_empty(),
        "A decided on its stale dwell (since 6 min), but the device was elsewhere 4 min ago"
    );
    let stored = a.store.stored_device(moved).await.unwrap().unwrap();
    assert!(stored.notifications.is_empty());
    // A took the store's view: the dwell at the café starts afresh now.
    clock.advance(Duration::from_secs(60));
    let again = a
        .presence
        .report(report(moved, centre(), clock.now()))
        .await
        .unwrap();
    assert_eq!(again.reason, Some(Reason::DwellNotMet));
}

/// The audit's variant: back at a cell *next to* the café (which a dwell tolerates), node A's
/// stale memory would continue its old dwell and its cell-change write would put that old
/// start over node B's newer dwell elsewhere; the store keeps a continued dwell's start only
/// if the stored row is the dwell it continues.
#[tokio::test]
async fn a_stale_node_cannot_resurrect_an_old_dwell_from_a_neighbouring_cell() {
    let (clock, shared) = manual_clock(T0);
    let (a, b, _dir) = open_pair(open_caps(), shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let moved = consenting(&a, "device-that-hops-00001").await;
    let first = a
        .presence
        .report(report(moved, centre(), clock.now()))
        .await
        .unwrap();
    assert_eq!(first.reason, Some(Reason::DwellNotMet));
    clock.advance(Duration::from_secs(120));
    b.presence
        .report(report(moved, elsewhere(), clock.now()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(240));
    let next_door = centre()
        .grid_disk::<Vec<_>>(1)
        .into_iter()
        .find(|c| *c != centre())
        .unwrap();
    let stale = a
        .presence
        .report(report(moved, next_door, clock.now()))
        .await
        .unwrap();
    assert!(
        stale.offers.is_empty(),
        "A continued its 6-minute dwell from memory; the device was elsewhere 4 minutes ago"
    );
    let stored = a.store.stored_device(moved).await.unwrap().unwrap();
    assert!(stored.notifications.is_empty());
    let dwell = stored.row.dwell.unwrap();
    assert_eq!(
        (dwell.cell, dwell.since),
        (u64::from(next_door), clock.now()),
        "the stored dwell starts at this report"
    );
}

#[tokio::test]
async fn consent_given_at_one_node_is_honoured_at_the_other_without_a_restart() {
    let (clock, shared) = manual_clock(T0);
    let mut config = open_caps();
    // Only the mute may stop the second offer from the café.
    config.caps.per_merchant_per_device_per_week = 10;
    let (a, b, _dir) = open_pair(config, shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let id = a.pseudonyms.device_id("late-consenting-device-01");
    // Unknown everywhere: NO_CONSENT, and B remembers the miss for a short while.
    let r = b.presence.report(report(id, centre(), clock.now())).await;
    assert_eq!(r.unwrap().reason, Some(Reason::NoConsent));
    a.consents.set(id, both(), "1".into()).await.unwrap();
    let cached = b.presence.report(report(id, centre(), clock.now())).await;
    assert_eq!(
        cached.unwrap().reason,
        Some(Reason::NoConsent),
        "within the negative cache's TTL B does not ask the store again"
    );
    clock.advance(hexveil::presence::MISS_TTL);
    let known = b
        .presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    assert_eq!(
        known.reason,
        Some(Reason::DwellNotMet),
        "B now knows the device"
    );
    clock.advance(Duration::from_secs(360));
    let offered = b
        .presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    assert_eq!(offered.offers.len(), 1);
    let offer = offered.offers[0].0.clone();
    // Feedback on B's notification arrives at A, which never saw it: A looks it up.
    a.presence
        .feedback(id, offer.offer_id, Feedback::MuteMerchant)
        .await
        .unwrap();
    let stored = b.store.stored_device(id).await.unwrap().unwrap();
    assert!(stored.restrictions.iter().any(|r| r.muted));
    assert_eq!(
        stored.notifications[0].feedback,
        Some(Feedback::MuteMerchant)
    );
    // B's memory does not know the mute; the store does: no offer from that merchant again.
    clock.advance(Duration::from_secs(3 * 3600));
    b.presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(360));
    let muted = b
        .presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    assert!(
        muted.offers.is_empty(),
        "B offered a merchant the device muted at A"
    );
}

#[tokio::test]
async fn a_withdrawal_at_one_node_stops_the_other_and_it_forgets_the_device() {
    let (clock, shared) = manual_clock(T0);
    let (a, b, _dir) = open_pair(open_caps(), shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let id = consenting(&b, "withdrawing-device-000001").await;
    b.presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    a.consents
        .set(id, Purposes::NONE, "1".into())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(360));
    let d = b
        .presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    assert!(d.offers.is_empty(), "an offer after the withdrawal at A");
    assert!(
        !b.devices.lock(&id).contains_key(&id),
        "B still holds a device that withdrew at A"
    );
    assert!(a.store.stored_device(id).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------
// Contribution bounds across nodes.

#[tokio::test]
async fn the_contribution_bounds_hold_across_two_nodes() {
    let (clock, shared) = manual_clock(T0);
    let mut config = open_caps();
    config.privacy.max_cells_per_bucket = 2;
    config.privacy.max_contributions_per_day = 5;
    let (a, b, _dir) = open_pair(config, shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let domain: Vec<h3o::CellIndex> = centre().grid_disk(2);

    let ids: Vec<DeviceId> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(consenting(&a, &format!("contributing-device-{i:04}")).await);
        }
        v
    };
    // 40 hours; every 10 minutes each device is seen in two different cells, one at each
    // node, at the same moment.
    let mut step = 0usize;
    for _ in 0..(40 * 6) {
        for id in &ids {
            let x = domain[step % domain.len()];
            let y = domain[(step + 7) % domain.len()];
            step += 1;
            let (p, q) = tokio::join!(
                a.presence.report(report(*id, x, clock.now())),
                b.presence.report(report(*id, y, clock.now()))
            );
            p.unwrap();
            q.unwrap();
        }
        clock.advance(Duration::from_secs(600));
    }
    let mut counted = 0;
    for id in &ids {
        let stored = a.store.stored_device(*id).await.unwrap().unwrap();
        let spend: Vec<(i64, u32)> = stored.spend.iter().map(|(b, n)| (b.millis(), *n)).collect();
        for (bucket, pairs) in &spend {
            assert!(*pairs <= 2, "{pairs} cells in bucket {bucket} (bound 2)");
            let window: u32 = spend
                .iter()
                .filter(|(b, _)| *b >= *bucket && *b < bucket + 86_400_000)
                .map(|(_, n)| n)
                .sum();
            assert!(
                window <= 5,
                "{window} pairs in the 24 h from {bucket} (bound 5)"
            );
            counted += pairs;
        }
        for (bucket, _) in &stored.contributions {
            let in_bucket = stored
                .contributions
                .iter()
                .filter(|(b, _)| b == bucket)
                .count();
            assert!(in_bucket <= 2);
        }
    }
    // Not vacuous: each device reached its bound in the first day.
    assert!(counted >= 4 * 5, "only {counted} pairs counted");
}

// ---------------------------------------------------------------------------------------
// Releases.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_nodes_releasing_the_same_buckets_release_each_once() {
    let (clock, shared) = manual_clock(T0);
    let (a, b, _dir) = open_pair(open_caps(), shared).await;
    let (_, offers) = merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let _ = offers;
    // The released domain: the café's cell and two rings around it (insights.radius_k).
    let domain: Vec<u64> = centre()
        .grid_disk::<Vec<_>>(2)
        .into_iter()
        .map(u64::from)
        .collect();
    let ids: Vec<DeviceId> = {
        let mut v = Vec::new();
        for i in 0..6 {
            v.push(consenting(&b, &format!("released-device-{i:06}")).await);
        }
        v
    };
    for hour in 0..30 {
        for (i, id) in ids.iter().enumerate() {
            let node = if (hour + i) % 2 == 0 { &a } else { &b };
            node.presence
                .report(report(*id, centre(), clock.now()))
                .await
                .unwrap();
        }
        clock.advance(Duration::from_secs(3600));
    }
    clock.advance(Duration::from_secs(2 * 86_400));
    let (x, y) = tokio::join!(a.insights.release_due(), b.insights.release_due());
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x.released + y.released > 0 && x.days + y.days > 0);
    let (start, end) = (Timestamp(T0 - 86_400_000), clock.now());
    let ledger = a.store.ledger(start, end).await.unwrap();
    let mut buckets: Vec<i64> = ledger.iter().map(|e| e.bucket.millis()).collect();
    let n = buckets.len();
    buckets.dedup();
    assert_eq!(buckets.len(), n, "a bucket has two ledger entries");
    let released = a.store.released(&domain, start, end).await.unwrap();
    let mut seen = HashMap::new();
    for r in &released {
        *seen.entry((r.bucket.millis(), r.cell)).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "a cell released twice");
    assert_eq!(
        seen.len(),
        buckets.len() * domain.len(),
        "every domain cell once"
    );
    let days = a.store.daily_ledger(start, end).await.unwrap();
    let mut day_keys: Vec<i64> = days.iter().map(|e| e.bucket.millis()).collect();
    let nd = day_keys.len();
    day_keys.dedup();
    assert!(nd > 0);
    assert_eq!(day_keys.len(), nd, "a day has two daily ledger entries");
    let daily = a.store.released_days(&domain, start, end).await.unwrap();
    assert_eq!(
        daily.len(),
        nd * domain.len(),
        "every domain cell once a day"
    );
    let stats = a.store.offer_stats_ledger(start, end).await.unwrap();
    let mut stat_days: Vec<i64> = stats.iter().map(|e| e.day.millis()).collect();
    let ns = stat_days.len();
    stat_days.dedup();
    assert_eq!(
        stat_days.len(),
        ns,
        "a day of offer statistics released twice"
    );
}

// ---------------------------------------------------------------------------------------
// The per-device rate limit across nodes.

#[tokio::test]
async fn the_rate_limit_holds_across_two_nodes() {
    let (clock, shared) = manual_clock(T0);
    let mut config = open_caps();
    config.rate_limits.device_reports_per_hour = 60;
    config.rate_limits.device_burst = 4;
    let (a, b, _dir) = open_pair(config, shared).await;
    let id = a.pseudonyms.device_id("rate-limited-device-0001");
    a.consents
        .set(
            id,
            [Purpose::NearbyOffers].into_iter().collect(),
            "1".into(),
        )
        .await
        .unwrap();
    let (na, nb) = (a.presence.nodes(), b.presence.nodes());
    na.beat().await.unwrap();
    assert!(na.admitted(), "a node alone serves at once");
    nb.beat().await.unwrap();
    // B joined while A was live: B serves nothing until A has lowered its share.
    for _ in 0..2 {
        assert!(!nb.admitted());
        let refused = b.presence.report(report(id, centre(), clock.now())).await;
        assert!(
            matches!(
                refused,
                Err(hexveil::presence::PresenceError::RateLimited { .. })
            ),
            "a joining node served before the others counted it"
        );
        na.beat().await.unwrap();
        nb.beat().await.unwrap();
    }
    assert!(
        nb.admitted(),
        "B is admitted once A has applied a view counting it"
    );
    assert_eq!((na.live(), nb.live()), (2, 2));
    // One hour of reports of one device at both nodes at once, every 10 s.
    let mut accepted = 0u32;
    for round in 0..360 {
        if round % 60 == 0 {
            na.beat().await.unwrap();
            nb.beat().await.unwrap();
        }
        let r = report(id, centre(), clock.now());
        let (x, y) = tokio::join!(a.presence.report(r), b.presence.report(r));
        for outcome in [x, y] {
            match outcome {
                Ok(_) => accepted += 1,
                Err(hexveil::presence::PresenceError::RateLimited { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        clock.advance(Duration::from_secs(10));
    }
    // burst + rate·t = 4 + 60 over the hour (each node: 2 + 30); the limiter keeps times
    // in tenths of a second, lenient by under 0.1 s a request: at most one more per node.
    assert!(
        accepted <= 4 + 60 + 2,
        "{accepted} reports accepted in an hour across two nodes (limit 4 + 60)"
    );
    assert!(
        accepted >= 50,
        "only {accepted} accepted: the test is vacuous"
    );
}

#[tokio::test]
async fn a_node_that_stops_beating_stops_serving_before_the_others_drop_it() {
    use hexveil::nodes::{NoShare, Nodes};
    let (_, shared) = manual_clock(T0);
    let (a, b, _dir) = open_pair(open_caps(), shared).await;
    // Membership alone, with short timings (drop after 600 ms, lease 300 ms).
    let timing = |app: &App| {
        Nodes::new(app.store.clone())
            .with_timing(Duration::from_millis(600), Duration::from_millis(300))
    };
    let (na, nb) = (timing(&a), timing(&b));
    na.start_serving();
    nb.start_serving();
    na.beat().await.unwrap();
    nb.beat().await.unwrap();
    na.beat().await.unwrap();
    na.beat().await.unwrap();
    nb.beat().await.unwrap();
    assert!(na.admitted() && nb.admitted());
    assert_eq!(na.share(60, 4), Ok((30, 2)));
    assert_eq!(nb.share(60, 4), Ok((30, 2)));
    // B stops beating (a crash, a pause, a partition). A drops it after the timeout; from
    // the moment A's share rises, B (had it survived) serves nothing: its lease lapsed first.
    let started = std::time::Instant::now();
    while na.live() > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        na.beat().await.unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "dropped before the timeout"
    );
    assert_eq!(
        na.share(60, 4),
        Ok((60, 4)),
        "A alone takes the whole limit"
    );
    assert_eq!(
        nb.share(60, 4),
        Err(NoShare::LeaseLapsed),
        "B still served after A's share rose"
    );
    // B comes back: its row is gone, so it rejoins and waits until A has counted it.
    nb.beat().await.unwrap();
    assert!(!nb.admitted());
    na.beat().await.unwrap();
    na.beat().await.unwrap();
    nb.beat().await.unwrap();
    assert!(nb.admitted());
    assert_eq!((na.live(), nb.live()), (2, 2));
    // A serving node alone needs its lease too (the audit's case): cut off from the store,
    // it cannot know that another node did not drop it and take the whole limit.
    let alone = timing(&a);
    alone.start_serving();
    assert_eq!(alone.share(60, 4), Err(NoShare::LeaseLapsed), "no beat yet");
    // A and B stop beating; the new node drops them after the timeout and is alone.
    let started = std::time::Instant::now();
    alone.beat().await.unwrap();
    while alone.live() > 1 || alone.share(60, 4).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "never alone");
        tokio::time::sleep(Duration::from_millis(50)).await;
        alone.beat().await.unwrap();
    }
    assert_eq!(alone.share(60, 4), Ok((60, 4)));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(alone.share(60, 4), Err(NoShare::LeaseLapsed));
}

#[tokio::test]
async fn a_restarted_node_keeps_its_id_and_a_second_process_on_its_dir_does_not() {
    use hexveil::nodes::Nodes;
    let (_, shared) = manual_clock(T0);
    let (a, _b, dir) = open_pair(open_caps(), shared).await;
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let first = Nodes::in_data_dir(a.store.clone(), &node_dir);
    let second = Nodes::in_data_dir(a.store.clone(), &node_dir);
    assert_ne!(first.id(), second.id(), "two running nodes share an id");
    let id = first.id().to_string();
    drop(second);
    drop(first);
    let restarted = Nodes::in_data_dir(a.store.clone(), &node_dir);
    assert_eq!(restarted.id(), id, "a restarted node is a new one");
}

#[tokio::test]
async fn a_node_with_a_stale_standing_cannot_shorten_a_back_off_set_at_another() {
    let (clock, shared) = manual_clock(T0);
    let mut config = open_caps();
    config.caps.per_merchant_per_device_per_week = 10;
    let (a, b, _dir) = open_pair(config, shared).await;
    merchant(&a, &b, "cafe", &[centre()], 1000, clock.now()).await;
    let id = consenting(&a, "dismissing-device-000001").await;
    a.presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(360));
    let offered = a
        .presence
        .report(report(id, centre(), clock.now()))
        .await
        .unwrap();
    let offer = offered.offers[0].0.offer_id;
    // Two dismissals at B (which looks the notification up): the back-off escalates to 3 days.
    b.presence
        .feedback(id, offer, Feedback::Dismissed)
        .await
        .unwrap();
    b.presence
        .feedback(id, offer, Feedback::Dismissed)
        .await
        .unwrap();
    let escalated = b
        .store
        .stored_device(id)
        .await
        .unwrap()
        .unwrap()
        .restrictions[0];
    assert_eq!(escalated.dismissals, 2);
    // A, whose memory knows of no dismissal, records one: 1 day from its stale standing.
    a.presence
        .feedback(id, offer, Feedback::Dismissed)
        .await
        .unwrap();
    let stored = a
        .store
        .stored_device(id)
        .await
        .unwrap()
        .unwrap()
        .restrictions[0];
    assert!(stored.dismissals >= 2, "{stored:?}");
    assert!(
        stored.backoff_until >= escalated.backoff_until,
        "A shortened B's back-off: {stored:?} after {escalated:?}"
    );
}
