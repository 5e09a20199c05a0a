//! Issue 12, acceptance 5: the load-balancer example (`examples/haproxy/haproxy.cfg`, run by a
//! real HAProxy) in front of two real `hexveil serve` nodes on one PostgreSQL. Clients keep
//! granting consent and reporting through HAProxy; one node is killed with `kill -9` mid-load.
//! At most the requests in flight at that node fail, the rest are served by the other node, and
//! nothing acknowledged is lost: every consent and every offer a client was given is in
//! GetMyData afterwards.
//!
//! Runs when `HEXVEIL_TEST_POSTGRES_URL` is set (CI sets it, and installs HAProxy); fails, never
//! skips, if it is set but PostgreSQL or HAProxy is missing.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::*;
use hexveil::api::pb::{self, presence_service_client::PresenceServiceClient};
use hexveil::store::pg_testing::{self, TestSchema};

/// Concurrent clients; each has at most one request in flight.
const CLIENTS: usize = 24;

const CONFIG: &str = "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\nmin_interval = \"1m\"\n\
    per_cell_per_minute = 100000\nignore_fatigue_after = 0\n\
    [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";

/// HAProxy running the example configuration with the test's ports; killed when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The example file with its fixed ports replaced by the nodes' and a free front-end port.
fn haproxy_config(front: u16, nodes: [&BinServer; 2]) -> String {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/haproxy/haproxy.cfg"
    ))
    .unwrap();
    let mut cfg = example.replace("bind 127.0.0.1:50051", &format!("bind 127.0.0.1:{front}"));
    for (i, node) in nodes.iter().enumerate() {
        let (grpc, health) = (50061 + i, 9091 + i);
        let from = format!("127.0.0.1:{grpc} proto h2 check port {health}");
        assert!(
            cfg.contains(&from),
            "the example names node {} as {from}",
            i + 1
        );
        let to = format!("{} proto h2 check port {}", node.grpc, node.metrics.port());
        cfg = cfg.replace(&from, &to);
    }
    cfg
}

fn start_haproxy(dir: &std::path::Path, cfg: &str) -> Haproxy {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output();
    let check =
        check.expect("HAProxy is needed with HEXVEIL_TEST_POSTGRES_URL (apt-get install haproxy)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Haproxy(child)
}

/// What the clients saw: acknowledged consents and offers per token, and failures by code.
#[derive(Default)]
struct Seen {
    consented: Vec<String>,
    offered: Vec<String>,
    /// Reports answered without an offer, by reason.
    no_offer: BTreeMap<i32, usize>,
    failures: BTreeMap<String, usize>,
    requests: usize,
}

async fn client(
    n: usize,
    ch: tonic::transport::Channel,
    cell: h3o::CellIndex,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut consent = consent_client(ch.clone());
    let mut presence = PresenceServiceClient::new(ch);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let token = format!("failover-device-{n:03}-{i:05}");
        i += 1;
        seen.requests += 1;
        match consent.set_consent(consent_request(&token, BOTH)).await {
            Ok(_) => seen.consented.push(token.clone()),
            Err(s) => {
                *seen.failures.entry(format!("{:?}", s.code())).or_default() += 1;
                continue;
            }
        }
        seen.requests += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let req = pb::ReportPresenceRequest {
            device_token: token.clone(),
            cell: cell.into(),
            observed_at: Some(prost_types::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: 0,
            }),
            utc_offset_minutes: 0,
        };
        match presence.report_presence(req).await {
            Ok(r) if !r.get_ref().offers.is_empty() => seen.offered.push(token),
            Ok(r) => *seen.no_offer.entry(r.get_ref().reason).or_default() += 1,
            Err(s) => *seen.failures.entry(format!("{:?}", s.code())).or_default() += 1,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_behind_haproxy_lose_only_in_flight_requests_when_one_is_killed() {
    let Some(base) = pg_testing::url_or_skip("two_nodes_behind_haproxy") else {
        return;
    };
    let schema = TestSchema::create(&base).await;
    let store = schema.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let key = [(
        "HEXVEIL_DEVICE_KEY",
        "failover-test-key-0123456789abcdef0123",
    )];
    let node_dir = |n: &str| {
        let d = dir.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (dir_a, dir_b) = (node_dir("a"), node_dir("b"));
    let args = ["--config", config.to_str().unwrap()];
    let (a, b) = tokio::task::block_in_place(|| {
        (
            BinServer::spawn_store(&dir_a, &dir_a, &store, &args, &key),
            BinServer::spawn_store(&dir_b, &dir_b, &store, &args, &key),
        )
    });
    let front = free_port();
    let _haproxy = start_haproxy(dir.path(), &haproxy_config(front, [&a, &b]));
    let lb: std::net::SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let ch = connect(lb).await;

    // One merchant with an offer that every device at `cell` may receive.
    let cell = h3o::LatLng::new(52.52, 13.405)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let merchant_key =
        tokio::task::block_in_place(|| cli_merchant_add(&store, "Failover Bäckerei", cell));
    upsert_offer_now(&ch, &merchant_key, "Brezel", cell).await;
    // Both nodes see the offer (each refreshes its index from the store every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(n, ch.clone(), cell, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Both nodes took reports before one is killed (else this proves nothing).
    for node in [&a, &b] {
        let metrics = http_get(node.metrics, "/metrics").await.1;
        let served = metrics.lines().any(|l| {
            l.contains("ReportPresence") && l.contains("code=\"OK\"") && !l.ends_with(" 0")
        });
        assert!(served, "node {} took no report: {metrics}", node.grpc);
    }
    a.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for c in clients {
        let s = c.await.unwrap();
        all.consented.extend(s.consented);
        all.offered.extend(s.offered);
        all.requests += s.requests;
        for (k, v) in s.no_offer {
            *all.no_offer.entry(k).or_default() += v;
        }
        for (k, v) in s.failures {
            *all.failures.entry(k).or_default() += v;
        }
    }
    let failed: usize = all.failures.values().sum();
    eprintln!(
        "{} requests, {} consents and {} offers acknowledged, failures {:?}",
        all.requests,
        all.consented.len(),
        all.offered.len(),
        all.failures
    );
    assert!(
        failed <= CLIENTS,
        "only requests in flight at the killed node may fail ({CLIENTS} clients): {:?}",
        all.failures
    );
    assert!(
        all.offered.len() > 100,
        "the load ran: {}",
        all.offered.len()
    );

    // Nothing acknowledged is lost: GetMyData (through HAProxy: only node b is left) shows each
    // consent, and each offer a client was shown as a notification.
    let mut transparency = transparency_client(ch.clone());
    let offered: std::collections::HashSet<&String> = all.offered.iter().collect();
    let mut lost = Vec::new();
    for token in &all.consented {
        let data = transparency
            .get_my_data(pb::GetMyDataRequest {
                device_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if data.receipts.is_empty() || (offered.contains(token) && data.notifications.is_empty()) {
            lost.push(token.clone());
        }
    }
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    drop(b);
}
