//! Storage faults never lose an acknowledged write: the real binary on a small file system that
//! fills up under load, and a database file removed under the running server.
//!
//! The disk-full test mounts a real tmpfs (real ENOSPC, as in production), which needs root;
//! CI runs as root. Elsewhere it says it is skipped. The SQLite writer's own unit tests
//! (`store::sqlite::tests`) cover the same failure paths with `max_page_count`, without root.

#[path = "support/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::*;
use hexveil::api::pb;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use hexveil::clock::SystemClock;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A tmpfs mounted for the test's lifetime (lazily unmounted on drop, even after a panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "hexveil-test"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed (running as root?)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

async fn health(ch: &Channel) -> ServingStatus {
    let r = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers whatever the store does")
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Polls health until it says `want`; returns how long that took.
async fn wait_health(ch: &Channel, want: ServingStatus, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if health(ch).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health did not become {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fills the file system holding `dir` with a filler file until it refuses another byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xA5u8; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Smaller writes take the last partial block.
    for _ in 0..1024 {
        if f.write(&block[..512]).map(|n| n == 0).unwrap_or(true) {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

/// Which phase of the fault a write was issued in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    Before,
    Fault,
    After,
}

/// What clients were told, to check against the store afterwards.
#[derive(Default)]
struct Ledger {
    /// Acknowledged consents: token → receipt id.
    consents: HashMap<String, String>,
    /// Acknowledged offers: token → offer ids delivered.
    offers: HashMap<String, Vec<String>>,
    /// Outcomes per phase: (phase, "ok" or the status code) → count.
    outcomes: HashMap<(Phase, String), u64>,
    /// Devices that consented but have not reported yet (they report during the fault).
    waiting: Vec<String>,
}

impl Ledger {
    fn count(&mut self, phase: Phase, outcome: String) {
        *self.outcomes.entry((phase, outcome)).or_default() += 1;
    }

    fn outcomes(&self, phase: Phase, outcome: &str) -> u64 {
        self.outcomes
            .get(&(phase, outcome.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

fn outcome<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// Reports `token` at `cell`; records an offer if one is given.
async fn report(
    ch: &Channel,
    ledger: &Mutex<Ledger>,
    phase: &Mutex<Phase>,
    token: &str,
    cell: u64,
) -> Result<(), tonic::Status> {
    let p = *phase.lock().unwrap();
    let r = PresenceServiceClient::new(ch.clone())
        .report_presence(pb::ReportPresenceRequest {
            device_token: token.into(),
            cell,
            observed_at: Some(ts(now_secs())),
            utc_offset_minutes: 0,
        })
        .await;
    let mut l = ledger.lock().unwrap();
    l.count(p, format!("presence {}", outcome(&r)));
    let reply = r?.into_inner();
    if !reply.offers.is_empty() {
        l.offers.entry(token.into()).or_default().extend(
            reply
                .offers
                .iter()
                .map(|o| o.offer_id.clone())
                .collect::<Vec<_>>(),
        );
    }
    Ok(())
}

/// One client: fresh devices, each consents and then reports next to the offer. Every other
/// device holds its report back, for a report during the fault.
async fn client(
    ch: Channel,
    n: u32,
    cell: u64,
    ledger: Arc<Mutex<Ledger>>,
    phase: Arc<Mutex<Phase>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        i += 1;
        let token = format!("fault-device-{n:02}-{i:08}");
        let p = *phase.lock().unwrap();
        let r = consent_client(ch.clone())
            .set_consent(consent_request(&token, BOTH))
            .await;
        {
            let mut l = ledger.lock().unwrap();
            l.count(p, format!("consent {}", outcome(&r)));
            match &r {
                Ok(receipt) => {
                    l.consents
                        .insert(token.clone(), receipt.get_ref().receipt_id.clone());
                    if i.is_multiple_of(2) && p == Phase::Before {
                        l.waiting.push(token.clone());
                        continue;
                    }
                }
                Err(s) => assert_eq!(s.code(), Code::Unavailable, "consent: {s:?}"),
            }
        }
        if r.is_ok()
            && let Err(s) = report(&ch, &ledger, &phase, &token, cell).await
        {
            assert_eq!(s.code(), Code::Unavailable, "presence: {s:?}");
        }
        if r.is_err() {
            // Don't spin on an outage.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Every acknowledged consent and offer is in the store, as the server reads it back.
async fn assert_all_there(ch: &Channel, ledger: &Ledger, when: &str) {
    let mut consent = consent_client(ch.clone());
    for (token, receipt_id) in &ledger.consents {
        let got = consent
            .get_consent(pb::GetConsentRequest {
                device_token: token.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{when}: acknowledged consent of {token} lost: {e}"))
            .into_inner();
        assert_eq!(&got.receipt_id, receipt_id, "{when}: {token}");
    }
    let mut transparency = transparency_client(ch.clone());
    for (token, offers) in &ledger.offers {
        let mine = transparency
            .get_my_data(pb::GetMyDataRequest {
                device_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for offer in offers {
            assert!(
                mine.notifications.iter().any(|n| &n.offer_id == offer),
                "{when}: acknowledged offer {offer} to {token} has no notification record"
            );
        }
    }
}

/// With the default reserve, the store stops taking writes when free space drops below it;
/// the writes never see ENOSPC, and health stays NOT_SERVING until space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_loses_no_acknowledged_write_and_health_follows_it() {
    full_disk(4, true).await;
}

/// With the reserve disabled, SQLite itself meets ENOSPC mid-transaction (in the WAL and in
/// checkpoints): whatever it manages to commit is durable, and nothing else is acknowledged.
/// Health may flap while the WAL reuses space it already has, so only durability, UNAVAILABLE
/// and recovery are asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enospc_inside_sqlite_with_no_reserve_loses_no_acknowledged_write() {
    full_disk(0, false).await;
}

/// Fills the store's file system (a `size`-limited tmpfs) under load; `strict`: nothing at all
/// is acknowledged from the moment health says NOT_SERVING until space returns.
async fn full_disk(reserve_mb: u64, strict: bool) {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _fs = Tmpfs::mount(&data, "24m");
    let config = dir.path().join("hexveil.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nmin_free_mb = {reserve_mb}\n[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\n\
             per_cell_per_minute = 100000\n"
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = BinServer::spawn_in(dir.path(), &data, &args, &[]);
    let ch = connect(server.grpc).await;
    let cell = h3o::LatLng::new(38.7139, -9.1394)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let store_url = format!("sqlite://{}/hexveil.db", data.display());
    let key = cli_merchant_add(&store_url, "Bica", cell);
    upsert_offer_now(&ch, &key, "Bica", cell).await;
    assert_eq!(health(&ch).await, ServingStatus::Serving);

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let phase = Arc::new(Mutex::new(Phase::Before));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..8 {
        clients.spawn(client(
            ch.clone(),
            n,
            cell.into(),
            ledger.clone(),
            phase.clone(),
            stop.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The disk fills while the clients write.
    let filler = fill(&data);
    let took = wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(30)).await;
    eprintln!("NOT_SERVING {took:?} after the disk filled");
    *phase.lock().unwrap() = Phase::Fault;
    // Devices that consented before the fault report during it: no offer without its record.
    let waiting = std::mem::take(&mut ledger.lock().unwrap().waiting);
    for token in waiting.iter().take(200) {
        if let Err(s) = report(&ch, &ledger, &phase, token, cell.into()).await {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if strict {
        assert_eq!(
            health(&ch).await,
            ServingStatus::NotServing,
            "still full: still NOT_SERVING"
        );
        let http = reqwest_healthz(server.http).await;
        assert_eq!(http, 503, "/healthz follows the store too");
    }

    // Space returns; health comes back by itself. (Writes from here on count as "after": they
    // may go through as soon as the store has noticed.)
    *phase.lock().unwrap() = Phase::After;
    std::fs::remove_file(&filler).unwrap();
    let took = wait_health(&ch, ServingStatus::Serving, Duration::from_secs(30)).await;
    eprintln!("SERVING again {took:?} after space returned");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }

    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .expect("clients done")
        .into_inner()
        .unwrap();
    let mut summary: Vec<_> = ledger.outcomes.iter().collect();
    summary.sort_by_key(|(k, _)| format!("{k:?}"));
    eprintln!(
        "acknowledged: {} consents, {} devices with offers; outcomes: {summary:?}",
        ledger.consents.len(),
        ledger.offers.len()
    );
    // What the server said about its store, for whoever reads a failure.
    let log = std::fs::read_to_string(&server.stderr_path).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("the store can")) {
        eprintln!("server: {line}");
    }
    // Durability first: every acknowledged write is there, live and after kill -9.
    assert_all_there(&ch, &ledger, "live").await;
    drop(ch);
    server.kill9();
    let restarted = BinServer::spawn_in(dir.path(), &data, &args, &[]);
    let ch = connect(restarted.grpc).await;
    assert_all_there(&ch, &ledger, "after kill -9 and restart").await;

    for what in ["consent", "presence"] {
        assert!(
            ledger.outcomes(Phase::Before, &format!("{what} ok")) > 0,
            "{what} writes went through before the fault"
        );
        if strict {
            assert_eq!(
                ledger.outcomes(Phase::Fault, &format!("{what} ok")),
                0,
                "no {what} is acknowledged while the disk is full"
            );
        }
        assert!(
            ledger.outcomes(Phase::Fault, &format!("{what} Unavailable")) > 0,
            "{what} writes during the fault get UNAVAILABLE"
        );
        assert!(
            ledger.outcomes(Phase::After, &format!("{what} ok")) > 0,
            "{what} writes go through again once space returns"
        );
    }
    assert!(!ledger.offers.is_empty(), "offers were delivered");
}

/// `GET /healthz` status code, over a plain HTTP/1.1 request.
async fn reqwest_healthz(addr: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_removed_database_file_is_noticed_and_nothing_is_acknowledged_after_it() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    grant(&ch, &token(1), BOTH).await;
    assert_eq!(health(&ch).await, ServingStatus::Serving);

    std::fs::remove_file(server.db_path()).unwrap();
    let took = wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING {took:?} after the file was removed");
    assert_eq!(reqwest_healthz(server.http).await, 503);

    let mut consent = consent_client(ch.clone());
    for n in 2..50 {
        let err = consent
            .set_consent(consent_request(&token(n), BOTH))
            .await
            .expect_err("no write is acknowledged once the file is gone");
        assert_eq!(err.code(), Code::Unavailable);
    }
    // Still refusing a while later: a removed file does not come back by itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(health(&ch).await, ServingStatus::NotServing);
    let err = consent
        .set_consent(consent_request(&token(99), BOTH))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(!server.db_path().exists(), "no empty database was created");
    server.stop().await;
}
