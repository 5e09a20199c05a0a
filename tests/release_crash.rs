//! Kill -9 of the real binary in the middle of a foot-traffic release. In its own test
//! binary because it keeps a core busy for seconds (a ~100k-cell release), which would
//! disturb the timing-sensitive tests next to it.

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use hexveil::api::pb;

fn set(token: &str) -> pb::SetConsentRequest {
    consent_request(token, BOTH)
}

/// Kill -9 in the middle of a release (a ~100k-cell domain keeps it busy for a while), then
/// restart: the bucket is released exactly once, with one ledger entry.
#[tokio::test]
async fn kill_9_during_a_release_still_releases_each_bucket_once() {
    use hexveil::api::pb::presence_service_client::PresenceServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let url = store_url(dir.path());
    let db = db_for(dir.path());
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // 300 far-apart merchants with 331-cell areas, registered before any data.
    let first_cell;
    {
        let store = hexveil::store::Store::open(&url).await.unwrap();
        let mut cells = Vec::new();
        for i in 0..300 {
            let lat = -60.0 + f64::from(i) * 0.4;
            let cell = h3o::LatLng::new(lat, 20.0)
                .unwrap()
                .to_cell(h3o::Resolution::Eight);
            cells.push(cell);
            hexveil::merchants::add(
                &store,
                &format!("m{i}"),
                vec![cell.into()],
                8,
                hexveil::clock::Timestamp(now_ms() - 60_000),
            )
            .await
            .unwrap();
        }
        first_cell = cells[0];
    }
    let config = dir.path().join("hexveil.toml");
    std::fs::write(
        &config,
        "[insights]\nbucket = \"1m\"\ngrace = \"0s\"\nradius_k = 10\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = BinServer::spawn(dir.path(), &args);
    let ch = connect(server.grpc).await;
    consent_client(ch.clone())
        .set_consent(set("dev-release-crash-1"))
        .await
        .unwrap();
    PresenceServiceClient::new(ch.clone())
        .report_presence(pb::ReportPresenceRequest {
            device_token: "dev-release-crash-1".into(),
            cell: first_cell.into(),
            observed_at: Some(prost_types::Timestamp {
                seconds: now_ms() / 1000,
                nanos: 0,
            }),
            utc_offset_minutes: 0,
        })
        .await
        .unwrap();
    drop(ch);
    // Wait (bounded) for the release to start, then kill -9 in the middle of it.
    let log = server.stderr_path.clone();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("releasing bucket")
    {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "release never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill9();
    let crashed_mid_release = !std::fs::read_to_string(&log)
        .unwrap()
        .contains("released bucket");

    let restarted = BinServer::spawn(dir.path(), &args);
    let log = restarted.stderr_path.clone();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("released bucket")
    {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "bucket never released after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the job run again: it must not release anything twice.
    tokio::time::sleep(Duration::from_secs(6)).await;
    restarted.terminate();
    let ledger = query_pairs(&db, "SELECT bucket, cells FROM ledger ORDER BY bucket").await;
    assert!(!ledger.is_empty());
    let buckets: std::collections::BTreeSet<i64> = ledger.iter().map(|(b, _)| *b).collect();
    assert_eq!(buckets.len(), ledger.len(), "one ledger entry per bucket");
    for (bucket, cells) in &ledger {
        let rows = query_i64(
            &db,
            &format!("SELECT COUNT(*) FROM releases WHERE bucket = {bucket}"),
        )
        .await;
        assert_eq!(rows, *cells, "bucket {bucket}: every domain cell once");
        assert!(*cells > 90_000);
    }
    let raw = query_i64(&db, "SELECT COUNT(*) FROM contributions").await;
    assert_eq!(raw, 0, "raw contributions of released buckets are gone");
    eprintln!("kill -9 landed mid-release: {crashed_mid_release}");
}
