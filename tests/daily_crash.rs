//! Kill -9 of the real binary in the middle of a daily release. In its own test binary
//! because it keeps a core busy for a second or two (a ~100k-cell day), which would disturb
//! the timing-sensitive tests next to it.

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;

/// Kill -9 while yesterday's daily release is being written (a ~100k-cell domain keeps it
/// busy for a while), then restart: the day is released exactly once, one ledger entry, every
/// domain cell once (zeros included).
#[tokio::test]
async fn kill_9_during_a_daily_release_still_releases_the_day_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = store_url(dir.path());
    let db = db_for(dir.path());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Merchants registered a minute before today's UTC midnight: yesterday is the first day
    // of the daily release, due at once (grace 0s). With one-day buckets, no hourly bucket is
    // due before tomorrow, so the daily release is the only big job at start.
    let day = 86_400_000;
    let yesterday = now_ms.div_euclid(day) * day - day;
    {
        let store = hexveil::store::Store::open(&url).await.unwrap();
        for i in 0..300 {
            let lat = -60.0 + f64::from(i) * 0.4;
            let cell = h3o::LatLng::new(lat, 20.0)
                .unwrap()
                .to_cell(h3o::Resolution::Eight);
            hexveil::merchants::add(
                &store,
                &format!("m{i}"),
                vec![cell.into()],
                8,
                hexveil::clock::Timestamp(yesterday + day - 60_000),
            )
            .await
            .unwrap();
        }
    }
    let config = dir.path().join("hexveil.toml");
    std::fs::write(
        &config,
        "[insights]\nbucket = \"1d\"\ngrace = \"0s\"\nradius_k = 10\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = BinServer::spawn(dir.path(), &args);
    // Wait (bounded) for the release to start, then kill -9 in the middle of it.
    let log = server.stderr_path.clone();
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("releasing day")
    {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "daily release never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill9();
    let crashed_mid_release = !std::fs::read_to_string(&log)
        .unwrap()
        .contains("released day");

    let restarted = BinServer::spawn(dir.path(), &args);
    let log = restarted.stderr_path.clone();
    let started = Instant::now();
    let released = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("released day")
    };
    while !(released(&log) || (!crashed_mid_release && started.elapsed() > Duration::from_secs(10)))
    {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "day never released after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the job run again: it must not release anything twice.
    tokio::time::sleep(Duration::from_secs(6)).await;
    restarted.terminate();
    let ledger = query_pairs(&db, "SELECT day, cells FROM daily_ledger ORDER BY day").await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].0, yesterday);
    let rows = query_i64(
        &db,
        &format!("SELECT COUNT(*) FROM daily_releases WHERE day = {yesterday}"),
    )
    .await;
    assert_eq!(rows, ledger[0].1, "every domain cell once");
    assert!(ledger[0].1 > 90_000);
    let other = query_i64(
        &db,
        &format!("SELECT COUNT(*) FROM daily_releases WHERE day != {yesterday}"),
    )
    .await;
    assert_eq!(other, 0, "today is not due");
    eprintln!("kill -9 landed mid-release: {crashed_mid_release}");
}
