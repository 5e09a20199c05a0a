//! Revocation against the real binary, exactly as an operator does it: phones keep reporting
//! next to a shop's offer while `hexveil merchant revoke` runs as its own process on the same
//! store file. Once that command has returned, no report started afterwards gets the offer —
//! although the server's offer index only re-reads the store every 5 seconds.

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use harness::*;
use hexveil::api::pb;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;

const CONFIG: &str = "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\nmin_interval = \"0s\"\n\
    per_device_per_day = 100\nper_device_per_week = 700\nper_merchant_per_device_per_week = 100\n\
    ignore_fatigue_after = 0\n\
    [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";

fn now_ts() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_delivery_after_the_revoke_command_has_returned() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let server = BinServer::spawn(dir.path(), &["--config", config.to_str().unwrap()]);
    let store = store_url(dir.path());
    let cell = h3o::LatLng::new(40.4168, -3.7038)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let hexveil = env!("CARGO_BIN_EXE_hexveil");
    let out = std::process::Command::new(hexveil)
        .args(["merchant", "add", "--store", &store, "--name", "Churros"])
        .args(["--cell", &format!("{cell:x}"), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, key) = (
        added["merchant_id"].as_str().unwrap().to_string(),
        added["api_key"].as_str().unwrap().to_string(),
    );
    let ch = connect(server.grpc).await;
    let now = now_ts();
    merchant_client(ch.clone(), Some(&key))
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(pb::Offer {
                title: "Churros".into(),
                body: "Two for one".into(),
                cell: cell.into(),
                radius_k: 1,
                valid_from: Some(prost_types::Timestamp {
                    seconds: now.seconds - 3600,
                    nanos: 0,
                }),
                valid_until: Some(prost_types::Timestamp {
                    seconds: now.seconds + 86_400,
                    nanos: 0,
                }),
                max_notifications_per_day: 100_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap();

    let phones = 8u32;
    for p in 0..phones {
        grant(&ch, &token(p), BOTH).await;
    }
    let revoked: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (before, late) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flowing = Arc::new(tokio::sync::Notify::new());
    let tasks: Vec<_> = (0..phones)
        .map(|p| {
            let (ch, revoked, stop) = (ch.clone(), revoked.clone(), stop.clone());
            let (before, late, flowing) = (before.clone(), late.clone(), flowing.clone());
            tokio::spawn(async move {
                let mut c = PresenceServiceClient::new(ch);
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let reply = c
                        .report_presence(pb::ReportPresenceRequest {
                            device_token: token(p),
                            cell: cell.into(),
                            observed_at: Some(now_ts()),
                            utc_offset_minutes: 0,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    if reply.offers.is_empty() {
                        continue;
                    }
                    if revoked.lock().unwrap().is_some_and(|at| started >= at) {
                        late.fetch_add(1, Ordering::SeqCst);
                    } else if before.fetch_add(1, Ordering::SeqCst) == 29 {
                        flowing.notify_one();
                    }
                }
            })
        })
        .collect();
    flowing.notified().await;
    let (store2, id2) = (store.clone(), id.clone());
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(hexveil)
            .args(["merchant", "revoke", "--store", &store2, &id2])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    *revoked.lock().unwrap() = Some(Instant::now());
    assert!(status.success());
    // Keep reporting well inside the 5 s the index takes to notice on its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(before.load(Ordering::SeqCst) >= 30);
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "offers delivered after `hexveil merchant revoke` returned"
    );
    assert!(server.terminate().success());
}
