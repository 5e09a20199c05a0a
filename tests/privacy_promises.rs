//! The privacy promise with no side doors, each part tried as an adversary would: the
//! per-day contribution bound holds over any 24 hours across releases and restarts (and the
//! ε `config check` prints bounds what one device can spend); nothing a merchant can read
//! moves when one person is notified, until the next release; a new merchant's area is
//! released from its first whole bucket with nobody seen; naming a cell twice (or a cell and
//! its parent) never multiplies counts; offer statistics are released once per day.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use harness::*;
use hexveil::api::pb;
use hexveil::clock::{SharedClock, Timestamp};
use hexveil::config::Config;
use hexveil::model::{Offer, Purpose, Purposes};
use hexveil::presence::Report;
use hexveil::privacy::accounting;
use hexveil::pseudonym::DeviceId;
use hexveil::server::App;
use hexveil::settings::Settings;

/// 2026-01-05T10:00:00Z.
const T0: i64 = 1_767_607_200_000;
const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

fn cell_at(lat: f64, lng: f64) -> h3o::CellIndex {
    h3o::LatLng::new(lat, lng)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
}

async fn open_app(dir: &std::path::Path, extra: &str, clock: SharedClock) -> App {
    let toml = format!("{}\n{extra}", store_toml(dir));
    let settings = Settings::new(Config::from_toml(&toml).unwrap()).unwrap();
    App::open(settings, clock).await.unwrap()
}

/// One device reports in five cells every minute for 30 hours, with 1-minute buckets released
/// as they fall due and one restart on the way. Every (cell, bucket) pair ever recorded is
/// read before its bucket's release deletes it; no 24-hour window may hold more than the
/// bound, and the privacy loss those pairs cause — summed over the released buckets with the
/// ledger's own noise scales — must stay within the ε `config check` prints.
#[tokio::test]
async fn the_daily_bound_holds_in_any_24_hours_across_releases_and_restarts() {
    const CONFIG: &str = "[insights]\nbucket = \"1m\"\ngrace = \"0s\"\n\
        [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n\
        [privacy]\nmax_cells_per_bucket = 4\nmax_contributions_per_day = 16\n";
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let mut app = open_app(dir.path(), CONFIG, shared.clone()).await;
    let home = cell_at(59.33, 18.07);
    hexveil::merchants::add(&app.store, "A", vec![home.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.insights.refresh_domain().await.unwrap();
    let cells: Vec<h3o::CellIndex> = home.grid_disk::<Vec<_>>(1).into_iter().take(5).collect();
    let device = DeviceId([7; 16]);
    app.consents
        .set(
            device,
            Purposes::from_iter([Purpose::FootTraffic]),
            "1".into(),
        )
        .await
        .unwrap();

    let consequences = app.settings.current().consequences.clone();
    let bound = consequences.privacy.contributions_per_day;
    assert_eq!(bound, 16);
    let mut recorded: BTreeMap<i64, u32> = BTreeMap::new(); // bucket -> pairs
    let minutes = 30 * 60;
    for minute in 0..minutes {
        let now = T0 + minute * MINUTE + 30_000;
        clock.set(Timestamp(now));
        if minute == 17 * 60 {
            // A restart: the bound must survive it (released spend is durable).
            app = open_app(dir.path(), CONFIG, shared.clone()).await;
        }
        for c in &cells {
            app.presence
                .report(Report {
                    device,
                    cell: *c,
                    observed_at: Timestamp(now),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap();
        }
        let mut now_held: BTreeMap<i64, u32> = BTreeMap::new();
        for (_, _, bucket) in app.store.load_contributions().await.unwrap() {
            *now_held.entry(bucket.millis()).or_default() += 1;
        }
        for (b, n) in now_held {
            let e = recorded.entry(b).or_default();
            *e = (*e).max(n);
        }
        clock.set(Timestamp(now + MINUTE / 2));
        app.insights.release_due().await.unwrap();
    }
    recorded.retain(|_, n| *n > 0);
    let total: u32 = recorded.values().sum();
    assert!(
        total >= 2 * bound,
        "the device kept contributing: {total} pairs"
    );
    let ledger: BTreeMap<i64, f64> = app
        .store
        .ledger(Timestamp(T0 - DAY), Timestamp(T0 + 2 * DAY))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.bucket.millis(), e.scale))
        .collect();
    let delta = consequences.privacy.delta;
    let mut worst = (0u32, 0.0f64);
    for start in recorded.keys() {
        let window: Vec<(i64, u32)> = recorded
            .range(*start..*start + DAY)
            .map(|(b, n)| (*b, *n))
            .collect();
        let pairs: u32 = window.iter().map(|(_, n)| n).sum();
        assert!(
            pairs <= bound,
            "{pairs} pairs in the 24 h from {start}: more than the bound {bound}"
        );
        // Each pair moves one count of its bucket's release by one: ρ = pairs / (2σ²).
        let rho: f64 = window
            .iter()
            .map(|(b, n)| {
                let sigma = ledger[b];
                f64::from(*n) / (2.0 * sigma * sigma)
            })
            .sum();
        if rho > worst.1 {
            worst = (pairs, rho);
        }
    }
    let spent = accounting::zcdp_to_epsilon(worst.1, delta).unwrap();
    let hourly_part = consequences
        .privacy
        .budget
        .iter()
        .find(|p| p.release == "hourly_foot_traffic")
        .unwrap();
    assert!(
        worst.1 <= hourly_part.rho * (1.0 + 1e-9),
        "{worst:?} vs {hourly_part:?}"
    );
    assert!(
        spent <= consequences.privacy.epsilon_per_device_per_day,
        "a device spent ε = {spent} in 24 h; config check promises {}",
        consequences.privacy.epsilon_per_device_per_day
    );
}

/// The daily release's bound, as an adversary who roams: one device reports in three new
/// cells every hour for 30 hours (two UTC days), with each hourly bucket released as it falls
/// due and two restarts on the way (one in each day). Every daily contribution ever stored is
/// read before its day's release deletes it: no day may hold more than
/// `privacy.max_cells_per_day` cells of the device, and any 24 hours — which touches two
/// days — may cost it no more than the daily part of the budget `config check` prints.
#[tokio::test]
async fn the_daily_bound_holds_per_day_across_hourly_releases_and_restarts() {
    const CONFIG: &str = "[insights]\nradius_k = 4\n\
        [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";
    let dir = tempfile::tempdir().unwrap();
    let (clock, shared) = manual_clock(T0);
    let mut app = open_app(dir.path(), CONFIG, shared.clone()).await;
    let home = cell_at(48.85, 2.35);
    hexveil::merchants::add(&app.store, "A", vec![home.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    app.insights.refresh_domain().await.unwrap();
    let cells: Vec<h3o::CellIndex> = home.grid_disk::<Vec<_>>(4).into_iter().collect();
    assert_eq!(cells.len(), 61);
    let device = DeviceId([9; 16]);
    app.consents
        .set(
            device,
            Purposes::from_iter([Purpose::FootTraffic]),
            "1".into(),
        )
        .await
        .unwrap();
    let consequences = app.settings.current().consequences.clone();
    let k = consequences.privacy.daily.max_cells_per_day as usize;
    assert_eq!(k, 8);
    let day0 = T0.div_euclid(DAY) * DAY;
    let mut per_day: BTreeMap<i64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for hour in 0..30_i64 {
        if hour == 5 || hour == 20 {
            // Restarts: fresh memory, loaded from the store.
            app = open_app(dir.path(), CONFIG, shared.clone()).await;
        }
        for j in 0..3 {
            let now = T0 + hour * 3_600_000 + j * MINUTE;
            clock.set(Timestamp(now));
            app.presence
                .report(Report {
                    device,
                    cell: cells[((hour * 3 + j) % 61) as usize],
                    observed_at: Timestamp(now),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap();
        }
        for (d, cell, day) in app.store.load_daily_contributions().await.unwrap() {
            assert_eq!(d, device);
            per_day.entry(day.millis()).or_default().insert(cell);
        }
        clock.set(Timestamp(T0 + (hour + 1) * 3_600_000 + 10 * MINUTE));
        app.insights.release_due().await.unwrap();
    }
    clock.set(Timestamp(day0 + 2 * DAY + 10 * MINUTE));
    assert_eq!(app.insights.release_due().await.unwrap().days, 1);
    assert_eq!(
        per_day.keys().copied().collect::<Vec<_>>(),
        [day0, day0 + DAY]
    );
    for (day, held) in &per_day {
        assert_eq!(held.len(), k, "day {day}: {held:?}");
    }
    // What any 24 hours costs: two consecutive days, each day's cells over its own release's
    // noise (from the ledger), against the daily part `config check` prints.
    let ledger: BTreeMap<i64, f64> = app
        .store
        .daily_ledger(Timestamp(day0), Timestamp(day0 + 2 * DAY))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.bucket.millis(), e.scale))
        .collect();
    assert_eq!(ledger.len(), 2);
    let rho: f64 = per_day
        .iter()
        .map(|(d, held)| held.len() as f64 / (2.0 * ledger[d] * ledger[d]))
        .sum();
    let part = consequences
        .privacy
        .budget
        .iter()
        .find(|p| p.release == "daily_foot_traffic")
        .unwrap();
    assert!(rho <= part.rho * (1.0 + 1e-9), "{rho} vs {part:?}");
}

/// A merchant registered before a bucket starts gets that bucket released over its whole
/// area, zeros included, although no device was ever seen anywhere.
#[tokio::test]
async fn a_new_merchant_gets_its_first_whole_bucket_released_with_nobody_seen() {
    let (clock, shared) = manual_clock(T0 + 20 * MINUTE);
    let server = TestServer::start("", shared).await;
    let here = cell_at(59.33, 18.07);
    let (m, key) = hexveil::merchants::add(
        &server.app.store,
        "A",
        vec![here.into()],
        8,
        Timestamp(T0 + 20 * MINUTE),
    )
    .await
    .unwrap();
    // The partial bucket it registered in is not its own; the next one is.
    clock.set(Timestamp(T0 + 2 * 3_600_000 + 11 * MINUTE));
    // The server's own release job (every 5 s of real time) may get there first, on a busy
    // machine: what counts is the ledger, not which caller released it.
    server.app.insights.release_due().await.unwrap();
    let ledger = server
        .app
        .store
        .ledger(Timestamp(0), Timestamp(i64::MAX))
        .await
        .unwrap();
    assert_eq!(
        ledger.iter().map(|e| e.bucket).collect::<Vec<_>>(),
        vec![Timestamp(T0 + 3_600_000)]
    );
    let config = server.app.settings.current().config.clone();
    let area: Vec<u64> = hexveil::privacy::domain::merchant_area(&m, &config)
        .into_iter()
        .collect();
    let released = server
        .app
        .store
        .released(&area, Timestamp(T0), Timestamp(T0 + 3 * 3_600_000))
        .await
        .unwrap();
    assert_eq!(
        released.len(),
        area.len(),
        "every cell of the area, zeros included"
    );
    assert!(
        released
            .iter()
            .all(|r| r.bucket == Timestamp(T0 + 3_600_000))
    );
    // The merchant reads it over gRPC.
    let reply = merchant_client(server.channel().await, Some(&key))
        .get_foot_traffic(pb::GetFootTrafficRequest {
            cells: area.clone(),
            start: Some(ts(T0)),
            end: Some(ts(T0 + 3 * 3_600_000)),
            granularity: pb::Granularity::Hour as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.points.len(), area.len());
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    }
}

/// Naming a cell twice, or a cell and its parent, gives the numbers of the de-duplicated
/// query: one series per distinct cell, each released row counted once — on gRPC and JSON,
/// for few cells (one indexed read per cell) and many (one scan).
#[tokio::test]
async fn duplicate_and_overlapping_cells_give_the_deduplicated_numbers() {
    let (clock, shared) = manual_clock(T0 - 1);
    let server = TestServer::start("[privacy]\nthreshold = 0\n", shared).await;
    let here = cell_at(59.33, 18.07);
    let (_, key) = hexveil::merchants::add(
        &server.app.store,
        "A",
        vec![here.into()],
        8,
        Timestamp(T0 - 1),
    )
    .await
    .unwrap();
    clock.set(Timestamp(T0 + 2 * 3_600_000));
    server.app.insights.release_due().await.unwrap();
    let parent = u64::from(here.parent(h3o::Resolution::Seven).unwrap());
    let c = u64::from(here);
    let mut client = merchant_client(server.channel().await, Some(&key));
    let mut ask = async |cells: Vec<u64>| {
        let mut points: Vec<(u64, i64, i64, bool, i64, i64)> = client
            .get_foot_traffic(pb::GetFootTrafficRequest {
                cells,
                start: Some(ts(T0)),
                end: Some(ts(T0 + 3_600_000)),
                granularity: pb::Granularity::Hour as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .points
            .into_iter()
            .map(|p| {
                (
                    p.cell,
                    p.bucket_start.unwrap().seconds,
                    p.count,
                    p.suppressed,
                    (p.ci95_low * 1000.0) as i64,
                    (p.ci95_high * 1000.0) as i64,
                )
            })
            .collect();
        points.sort();
        points
    };
    let once = ask(vec![c]).await;
    assert_eq!(once.len(), 1);
    assert_eq!(ask(vec![c, c, c]).await, once);
    let both = ask(vec![c, parent]).await;
    assert_eq!(ask(vec![parent, c, c, parent]).await, both);
    let parent_alone = ask(vec![parent]).await;
    assert_eq!(both.iter().find(|p| p.0 == parent), parent_alone.first());
    // Many cells take the scan path: the same numbers.
    let area: Vec<u64> = here
        .grid_disk::<Vec<_>>(2)
        .into_iter()
        .map(u64::from)
        .collect();
    let mut many = area.clone();
    many.extend(area.iter().copied());
    many.push(parent);
    assert!(many.len() > 32);
    let mut dedup = area.clone();
    dedup.push(parent);
    assert_eq!(ask(many).await, ask(dedup).await);

    // JSON, likewise.
    let path = |cells: &[u64]| {
        let list: Vec<String> = cells.iter().map(|c| format!("{c:x}")).collect();
        format!(
            "/api/v1/foot-traffic?cells={}&start={T0}&end={}",
            list.join(","),
            T0 + 3_600_000
        )
    };
    let a = http_get(server.http, &path(&[c, parent]), &key).await;
    let b = http_get(server.http, &path(&[c, parent, c, parent, c]), &key).await;
    assert_eq!(a.0, 200);
    assert_eq!(a, b);
}

async fn http_get(addr: SocketAddr, path: &str, key: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_string())
}

/// Everything a merchant can read — gRPC (offers, foot traffic, offer statistics), the JSON
/// API and the dashboard's own files — is polled before and after one person is notified of
/// its offer: nothing changes until the next release, which is the first place the delivery
/// shows, as a noisy number.
#[tokio::test]
async fn nothing_a_merchant_reads_moves_with_one_notification_until_the_next_release() {
    let (clock, shared) = manual_clock(T0 - 1);
    let server =
        TestServer::start("[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\n", shared).await;
    let here = cell_at(59.33, 18.07);
    let (m, key) = hexveil::merchants::add(
        &server.app.store,
        "A",
        vec![here.into()],
        8,
        Timestamp(T0 - 1),
    )
    .await
    .unwrap();
    server
        .app
        .offers
        .upsert(
            &m,
            Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: m.merchant_id,
                title: "Coffee".into(),
                body: String::new(),
                cell: here.into(),
                radius_k: 1,
                valid_from: Timestamp(T0 - DAY),
                valid_until: Timestamp(T0 + 10 * DAY),
                max_notifications_per_day: 10,
                opening_hours: vec![],
                updated_at: Timestamp(0),
            },
        )
        .await
        .unwrap();
    server.app.insights.refresh_domain().await.unwrap();
    clock.set(Timestamp(T0 + 30 * MINUTE));
    server.app.insights.release_due().await.unwrap();

    let ch = server.channel().await;
    let area: Vec<u64> = here
        .grid_disk::<Vec<_>>(2)
        .into_iter()
        .map(u64::from)
        .collect();
    let everything = async || {
        let mut seen: Vec<String> = Vec::new();
        let mut client = merchant_client(ch.clone(), Some(&key));
        seen.push(format!(
            "{:?}",
            client
                .list_offers(pb::ListOffersRequest {})
                .await
                .unwrap()
                .into_inner()
        ));
        for g in [pb::Granularity::Hour, pb::Granularity::Day] {
            seen.push(format!(
                "{:?}",
                client
                    .get_foot_traffic(pb::GetFootTrafficRequest {
                        cells: area.clone(),
                        start: Some(ts(T0 - DAY)),
                        end: Some(ts(T0 + 2 * DAY)),
                        granularity: g as i32,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            ));
        }
        seen.push(format!(
            "{:?}",
            client
                .get_offer_stats(pb::GetOfferStatsRequest {
                    start: Some(ts(T0 - DAY)),
                    end: Some(ts(T0 + 2 * DAY)),
                })
                .await
                .unwrap()
                .into_inner()
        ));
        let range = format!("start={}&end={}", T0 - DAY, T0 + 2 * DAY);
        for path in [
            "/".to_string(),
            "/assets/app.js".to_string(),
            "/api/v1/me".to_string(),
            format!("/api/v1/foot-traffic?{range}"),
            format!("/api/v1/foot-traffic?{range}&granularity=day"),
            format!("/api/v1/foot-traffic/area?{range}"),
            "/api/v1/offers".to_string(),
            format!("/api/v1/offer-stats?{range}"),
            "/api/v1/privacy".to_string(),
            "/metrics".to_string(),
        ] {
            let (status, body) = http_get(server.http, &path, &key).await;
            seen.push(format!("{path} {status} {body}"));
        }
        seen
    };
    let before = everything().await;

    let token = token(1);
    grant(&ch, &token, BOTH).await;
    let reply = presence_client(ch.clone())
        .report_presence(pb::ReportPresenceRequest {
            device_token: token.clone(),
            cell: here.into(),
            observed_at: Some(ts(T0 + 30 * MINUTE)),
            utc_offset_minutes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.offers.len(), 1, "{reply:?}");
    let after = everything().await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            b, a,
            "a merchant-readable answer moved with one notification"
        );
    }

    // The day's release is the first place the delivery can show — as a noisy figure.
    clock.set(Timestamp(T0.div_euclid(DAY) * DAY + DAY + 11 * MINUTE));
    let run = server.app.insights.release_due().await.unwrap();
    assert_eq!(run.offer_days, 1, "{run:?}");
    let stats = merchant_client(ch.clone(), Some(&key))
        .get_offer_stats(pb::GetOfferStatsRequest {
            start: Some(ts(T0 - DAY)),
            end: Some(ts(T0 + 2 * DAY)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.stats.len(), 1, "one offer, one released day");
    let s = &stats.stats[0];
    assert!(s.deliveries_ci95_low <= s.deliveries_ci95_high);
    assert!(stats.noise_std_dev > 1.0);
    // Released once: a second run (a retry, another node) releases nothing.
    assert_eq!(
        server.app.insights.release_due().await.unwrap().offer_days,
        0
    );
    assert_eq!(
        server
            .app
            .store
            .offer_stats_ledger(Timestamp(T0 - DAY), Timestamp(T0 + 2 * DAY))
            .await
            .unwrap()
            .len(),
        1
    );
}

fn presence_client(
    ch: tonic::transport::Channel,
) -> hexveil::api::pb::presence_service_client::PresenceServiceClient<tonic::transport::Channel> {
    hexveil::api::pb::presence_service_client::PresenceServiceClient::new(ch)
}

/// ForgetMe and the retention sweep erase everything a device left: its consent, the
/// notification it got, the restriction its dismissal set, its unreleased contributions and
/// the spend kept after a release — and GetMyData shows each of them before.
#[tokio::test]
async fn forget_me_and_retention_erase_notifications_restrictions_contributions_and_spend() {
    let (clock, shared) = manual_clock(T0 - 1);
    let server = TestServer::start(
        "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\n[retention]\ndevice_days = 1\n",
        shared,
    )
    .await;
    let here = cell_at(59.33, 18.07);
    let (m, _) = hexveil::merchants::add(
        &server.app.store,
        "A",
        vec![here.into()],
        8,
        Timestamp(T0 - 1),
    )
    .await
    .unwrap();
    let offer = server
        .app
        .offers
        .upsert(
            &m,
            Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: m.merchant_id,
                title: "Coffee".into(),
                body: String::new(),
                cell: here.into(),
                radius_k: 1,
                valid_from: Timestamp(T0 - DAY),
                valid_until: Timestamp(T0 + 10 * DAY),
                max_notifications_per_day: 10,
                opening_hours: vec![],
                updated_at: Timestamp(0),
            },
        )
        .await
        .unwrap();
    server.app.insights.refresh_domain().await.unwrap();
    let ch = server.channel().await;
    let db = server.db();
    let leave_traces = async |token: &str, at: i64| {
        grant(&ch, token, BOTH).await;
        let id = server.app.pseudonyms.device_id(token);
        let reply = presence_client(ch.clone())
            .report_presence(pb::ReportPresenceRequest {
                device_token: token.into(),
                cell: here.into(),
                observed_at: Some(ts(at)),
                utc_offset_minutes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.offers.len(), 1);
        presence_client(ch.clone())
            .send_feedback(pb::SendFeedbackRequest {
                device_token: token.into(),
                offer_id: offer.offer_id.to_string(),
                action: pb::FeedbackAction::Dismissed as i32,
            })
            .await
            .unwrap();
        for table in [
            "notifications",
            "restrictions",
            "contributions",
            "contribution_spend",
        ] {
            assert!(
                rows_in(&db, table, &id).await > 0,
                "{table} holds nothing to erase"
            );
        }
        id
    };
    clock.set(Timestamp(T0));
    let forgotten = leave_traces(&token(1), T0).await;
    // Release the bucket: the raw contribution goes, the spend stays (and is shown).
    clock.set(Timestamp(T0 + 3_600_000 + 11 * MINUTE));
    server.app.insights.release_due().await.unwrap();
    assert_eq!(rows_in(&db, "contributions", &forgotten).await, 0);
    assert!(rows_in(&db, "contribution_spend", &forgotten).await > 0);
    let my_data =
        hexveil::api::pb::transparency_service_client::TransparencyServiceClient::new(ch.clone())
            .get_my_data(pb::GetMyDataRequest {
                device_token: token(1),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(my_data.contribution_spend.unwrap().count, 1);
    assert_eq!(my_data.notifications.len(), 1);
    assert_eq!(my_data.restrictions.len(), 1);
    let expiring = leave_traces(&token(2), T0 + 3_600_000 + 11 * MINUTE).await;
    hexveil::api::pb::transparency_service_client::TransparencyServiceClient::new(ch.clone())
        .forget_me(pb::ForgetMeRequest {
            device_token: token(1),
        })
        .await
        .unwrap();
    assert_eq!(
        rows_of_device(&db, &forgotten).await,
        0,
        "ForgetMe left rows"
    );
    assert!(rows_of_device(&db, &expiring).await > 0);
    clock.set(Timestamp(T0 + 3 * DAY));
    assert_eq!(server.app.consents.expire_idle().await.unwrap(), 1);
    assert_eq!(
        rows_of_device(&db, &expiring).await,
        0,
        "retention left rows"
    );
}
