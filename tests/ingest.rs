//! Ingest at wire speed, and what it must not cost: a report that changes no durable fact is
//! answered from memory (the database does not change), `kill -9` right after acknowledged
//! consents, notifications and contributions loses none of them, a device under MIN_INTERVAL
//! or mid-dwell is offered no more after a restart than without it, and a short run of the
//! load generator (with its empty-handler baseline) ends with no error.

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::*;
use hexveil::api::pb;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use hexveil::clock::Timestamp;
use tonic::transport::Channel;

const T0: i64 = 1_790_000_000_000;

fn at(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn report(
    ch: &Channel,
    token: &str,
    cell: h3o::CellIndex,
    ms: i64,
) -> pb::ReportPresenceReply {
    PresenceServiceClient::new(ch.clone())
        .report_presence(pb::ReportPresenceRequest {
            device_token: token.into(),
            cell: cell.into(),
            observed_at: Some(at(ms)),
            utc_offset_minutes: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

fn lisbon() -> h3o::CellIndex {
    h3o::LatLng::new(38.7139, -9.1394)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
}

#[tokio::test]
async fn a_report_that_changes_no_durable_fact_leaves_the_database_as_it_was() {
    let (clock, shared) = manual_clock(T0);
    let server = TestServer::start(
        "[rate_limits]\ndevice_reports_per_hour = 36000\ndevice_burst = 100\n",
        shared,
    )
    .await;
    let ch = server.channel().await;
    let here = lisbon();
    hexveil::merchants::add(
        &server.app.store,
        "Bica",
        vec![here.into()],
        8,
        Timestamp(T0),
    )
    .await
    .unwrap();
    server.app.insights.refresh_domain().await.unwrap();
    grant(&ch, &token(1), BOTH).await;
    // The first report starts a dwell and counts the device in this hour: durable.
    let first = report(&ch, &token(1), here, T0).await;
    assert!(first.offers.is_empty());
    let before = dump_db(&server.db()).await;
    assert!(
        before.iter().any(|r| r.starts_with("contributions:")),
        "the first report's contribution is on disk"
    );
    // Fifty more from the same cell in the same bucket, within a minute: nothing new.
    for i in 1..=50 {
        clock.advance(Duration::from_millis(1_000));
        let r = report(&ch, &token(1), here, T0 + i * 1_000).await;
        assert!(r.offers.is_empty());
    }
    assert_eq!(
        dump_db(&server.db()).await,
        before,
        "reports that change no durable fact write nothing"
    );
    // A move to a neighbouring cell is a new current cell: written before the reply.
    let next = here.grid_disk::<Vec<_>>(1)[1];
    clock.advance(Duration::from_millis(1_000));
    report(&ch, &token(1), next, T0 + 51_000).await;
    let after = dump_db(&server.db()).await;
    assert_ne!(after, before, "a new cell is a new fact");
    server.stop().await;
}

/// Registers a merchant with the CLI (before the server starts, so its released domain is
/// loaded at start), starts the binary and gives the merchant an offer.
async fn start_with_offer(dir: &std::path::Path, args: &[&str]) -> (BinServer, Channel) {
    let store = format!("sqlite://{}/hexveil.db", dir.display());
    let key = cli_merchant_add(&store, "Pastelaria", lisbon());
    let server = BinServer::spawn(dir, args);
    let ch = connect(server.grpc).await;
    upsert_offer_now(&ch, &key, "Pastel de nata", lisbon()).await;
    (server, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_fact_and_grants_no_extra_offer() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    // A dwell of 10 s: long enough that a restart (seconds on a loaded machine) lands
    // inside it, short enough to wait out.
    std::fs::write(
        &config,
        "[caps]\nmin_dwell = \"10s\"\nquiet_hours = \"\"\nmin_interval = \"2h\"\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let (server, ch) = start_with_offer(dir.path(), &args).await;
    let here = lisbon();
    let (m, d) = ("ingest-device-notified", "ingest-device-dwelling");
    let mut receipts = Vec::new();
    for t in [m, d] {
        let r = consent_client(ch.clone())
            .set_consent(consent_request(t, BOTH))
            .await
            .unwrap()
            .into_inner();
        receipts.push((t, r.receipt_id));
    }
    // M dwells, then is notified.
    let m_start = now_ms();
    assert_eq!(
        report(&ch, m, here, m_start).await.reason,
        pb::NoOfferReason::DwellNotMet as i32
    );
    // (A dwell's start is kept rounded up to the second: at most a second longer.)
    tokio::time::sleep(Duration::from_millis(11_200)).await;
    let notified = report(&ch, m, here, now_ms()).await;
    assert_eq!(notified.reason, pb::NoOfferReason::None as i32);
    let offer_id = notified.offers[0].offer_id.clone();
    // D starts a dwell, and reports again from memory (nothing new to write).
    let d_start = now_ms();
    assert_eq!(
        report(&ch, d, here, d_start).await.reason,
        pb::NoOfferReason::DwellNotMet as i32
    );
    assert_eq!(
        report(&ch, d, here, now_ms()).await.reason,
        pb::NoOfferReason::DwellNotMet as i32
    );
    drop(ch);
    server.kill9();

    let restarted = BinServer::spawn(dir.path(), &args);
    let ch = connect(restarted.grpc).await;
    for (t, receipt_id) in &receipts {
        let got = consent_client(ch.clone())
            .get_consent(pb::GetConsentRequest {
                device_token: t.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.receipt_id, receipt_id, "{t}'s consent survives");
    }
    let mine = |t: &'static str| {
        let ch = ch.clone();
        async move {
            transparency_client(ch)
                .get_my_data(pb::GetMyDataRequest {
                    device_token: t.into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let m_data = mine(m).await;
    assert!(
        m_data.notifications.iter().any(|n| n.offer_id == offer_id),
        "the acknowledged notification survives"
    );
    for t in [m, d] {
        let pending = mine(t)
            .await
            .pending_contributions
            .unwrap_or_default()
            .count;
        assert!(pending >= 1, "{t}'s acknowledged contribution survives");
    }

    // M gets nothing now (its dwell starts again) ...
    assert!(report(&ch, m, here, now_ms()).await.offers.is_empty());
    // D's dwell did not survive as continuous: a restart cannot prove it was, so it starts
    // again at D's first report after the restart — never an offer before 10 s of dwell
    // seen by this process, and so never earlier than without the kill.
    let first_after = now_ms();
    let r = report(&ch, d, here, first_after).await;
    assert_eq!(
        r.reason,
        pb::NoOfferReason::DwellNotMet as i32,
        "mid-dwell before the kill, dwell restarts after it"
    );
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    assert_eq!(
        report(&ch, d, here, now_ms()).await.reason,
        pb::NoOfferReason::DwellNotMet as i32,
        "5 s into the new dwell (and {} ms after the first): still none",
        now_ms() - d_start
    );
    // Once the new dwell has run, the offer comes, once.
    let wait = (first_after + 11_200 - now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let r = report(&ch, d, here, now_ms()).await;
    assert_eq!(r.reason, pb::NoOfferReason::None as i32, "{r:?}");
    assert_eq!(
        report(&ch, d, here, now_ms()).await.reason,
        pb::NoOfferReason::MinInterval as i32
    );
    // ... and once its new dwell has run too, it is still under MIN_INTERVAL from the
    // notification it got before the kill.
    assert_eq!(
        report(&ch, m, here, now_ms()).await.reason,
        pb::NoOfferReason::MinInterval as i32
    );
}

#[test]
fn a_short_loadgen_run_against_both_servers_has_no_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--devices", "200", "--duration", "0.5", "--rounds", "1"])
        .args(["--concurrency", "8", "--channels", "2", "--streams", "2"])
        .args(["--mode", "both", "--half-load", "--json"])
        .args(["--hexveil", env!("CARGO_BIN_EXE_hexveil")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report:#}");
    let rounds = report["rounds"].as_array().unwrap();
    // unary, stream and half load, each on baseline and hexveil.
    assert_eq!(rounds.len(), 6, "{report:#}");
    for r in rounds {
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    }
    for mode in ["unary", "stream"] {
        let ratio = report["summary"][mode]["ratio"].as_f64().unwrap();
        assert!(ratio > 0.0, "{mode}: {ratio}");
    }
    // Both servers took the half load, and each has its tail measured.
    for target in ["baseline", "hexveil"] {
        let half = &report["half_load"][target];
        assert!(half["per_second"].as_f64().unwrap() > 0.0, "{half}");
        assert!(half["p99_ms"].as_f64().unwrap() > 0.0, "{half}");
    }
}
