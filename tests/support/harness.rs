//! Shared test harness: an in-process server on port 0 (with an injectable clock), the real
//! binary as a child process, gRPC clients, and a raw view of the store.
//!
//! The store is SQLite (a file in the test's temp dir) unless `HEXVEIL_TEST_BACKEND=postgres`,
//! then it is a fresh schema of the PostgreSQL at `HEXVEIL_TEST_POSTGRES_URL`, one per data
//! dir (a server restarted on the same dir finds its data again, as with the file).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hexveil::api::pb::consent_service_client::ConsentServiceClient;
use hexveil::api::pb::merchant_service_client::MerchantServiceClient;
use hexveil::api::pb::transparency_service_client::TransparencyServiceClient;
use hexveil::api::pb::{self, Purpose};
use hexveil::clock::SharedClock;
use hexveil::config::Config;
use hexveil::reload::ConfigSource;
use hexveil::server::{self, App};
use hexveil::settings::Settings;
use tonic::transport::Channel;

/// A server running inside the test process.
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub app: App,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with `extra_toml` appended to a config that puts data in a temp dir.
    pub async fn start(extra_toml: &str, clock: SharedClock) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("{}\n{extra_toml}", store_toml(dir.path()),);
        Self::start_with(&toml, dir, clock).await
    }

    /// The URL of this server's store, for a second node to share (whatever the backend).
    pub fn store_url(&self) -> String {
        self.app.settings.current().config.store.url.clone()
    }

    /// Starts another node on this server's store (nodes behind a load balancer share one
    /// database): its own memory, listeners and data dir, the same device key.
    pub async fn join(&self, extra_toml: &str, clock: SharedClock) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let key = self.dir.path().join("device.key");
        if key.exists() {
            std::fs::copy(&key, dir.path().join("device.key")).unwrap();
        }
        let toml = format!(
            "[store]\nurl = \"{}\"\ndata_dir = \"{}\"\n{extra_toml}",
            self.store_url(),
            dir.path().display()
        );
        Self::start_with(&toml, dir, clock).await
    }

    /// Waits until this node serves reports: a node joining live ones waits until each of
    /// them has lowered its share of the rate limit (a few heartbeats).
    pub async fn wait_admitted(&self) {
        wait_admitted(&self.app).await;
    }

    async fn start_with(toml: &str, dir: tempfile::TempDir, clock: SharedClock) -> TestServer {
        let config = Config::from_toml(toml).unwrap();
        let settings = Settings::new(config).unwrap();
        let app = App::open(settings, clock).await.unwrap();
        let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, http) = (grpc_l.local_addr().unwrap(), http_l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            app.clone(),
            ConfigSource::default(),
            grpc_l,
            http_l,
            async move {
                let _ = rx.await;
            },
        ));
        TestServer {
            grpc,
            http,
            app,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        connect(self.grpc).await
    }

    /// The SQLite file (meaningful on SQLite only; see [`TestServer::db`]).
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("hexveil.db")
    }

    /// The store, whichever backend it is on.
    pub fn db(&self) -> Db {
        db_for(self.dir.path())
    }

    /// Stops the server, waits for it to drain, and hands back its data dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.dir
    }
}

/// Waits (up to 20 s) until `app`'s node is admitted to serve reports.
pub async fn wait_admitted(app: &App) {
    for _ in 0..200 {
        let nodes = app.presence.nodes();
        if nodes.joined() && nodes.admitted() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the node was not admitted within 20 s");
}

/// `[store]` settings for data dir `dir` (the store of [`store_url`]).
pub fn store_toml(dir: &Path) -> String {
    format!(
        "[store]\nurl = \"{}\"\ndata_dir = \"{}\"\n",
        store_url(dir),
        dir.display()
    )
}

/// Whether the service tests run on PostgreSQL (`HEXVEIL_TEST_BACKEND=postgres`). Panics when
/// asked for PostgreSQL without `HEXVEIL_TEST_POSTGRES_URL`: such a run must fail, not skip.
pub fn on_postgres() -> bool {
    match std::env::var("HEXVEIL_TEST_BACKEND").as_deref() {
        Ok("postgres") => {
            assert!(
                std::env::var(hexveil::store::pg_testing::URL_ENV).is_ok_and(|u| !u.is_empty()),
                "HEXVEIL_TEST_BACKEND=postgres needs {}",
                hexveil::store::pg_testing::URL_ENV
            );
            true
        }
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("HEXVEIL_TEST_BACKEND={other:?}: use sqlite or postgres"),
    }
}

/// For tests that can only run on SQLite (they remove or fill its file, or compare it byte
/// for byte): on PostgreSQL prints why the test does nothing and returns true.
pub fn sqlite_only(test: &str, why: &str) -> bool {
    if on_postgres() {
        eprintln!("{test}: SQLite only ({why}); nothing to do on PostgreSQL");
        return true;
    }
    false
}

/// The schemas made for data dirs in this process, kept (not dropped) for the process's life:
/// a server restarted on a dir must find its data. `.ci/test` drops them after the run.
static SCHEMAS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// The store URL for data dir `dir`: its SQLite file, or its own PostgreSQL schema.
pub fn store_url(dir: &Path) -> String {
    if !on_postgres() {
        return format!("sqlite://{}/hexveil.db", dir.display());
    }
    let mut schemas = SCHEMAS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, url)) = schemas.iter().find(|(d, _)| d == dir) {
        return url.clone();
    }
    let base = std::env::var(hexveil::store::pg_testing::URL_ENV).unwrap();
    let schema = hexveil::store::pg_testing::TestSchema::create_blocking(&base);
    let url = schema.url.clone();
    // Kept for the process's life (see SCHEMAS).
    std::mem::forget(schema);
    schemas.push((dir.to_path_buf(), url.clone()));
    url
}

/// The store of data dir `dir`, for raw inspection.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The store of data dir `dir`.
pub fn db_for(dir: &Path) -> Db {
    if on_postgres() {
        Db::Postgres(store_url(dir))
    } else {
        Db::Sqlite(dir.join("hexveil.db"))
    }
}

impl From<PathBuf> for Db {
    fn from(p: PathBuf) -> Db {
        Db::Sqlite(p)
    }
}

/// A gRPC channel to `addr`, retrying briefly while the server comes up.
pub async fn connect(addr: SocketAddr) -> Channel {
    let url = format!("http://{addr}");
    for _ in 0..100 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {addr}");
}

pub fn consent_client(ch: Channel) -> ConsentServiceClient<Channel> {
    ConsentServiceClient::new(ch)
}

/// Both purposes, the common case in tests.
pub const BOTH: &[Purpose] = &[Purpose::NearbyOffers, Purpose::FootTraffic];

/// A SetConsent request for `token` (policy version "2026-11").
pub fn consent_request(token: &str, purposes: &[Purpose]) -> pb::SetConsentRequest {
    pb::SetConsentRequest {
        device_token: token.to_string(),
        purposes: purposes.iter().map(|p| *p as i32).collect(),
        policy_version: "2026-11".to_string(),
    }
}

/// Grants `purposes` to `token` and expects success.
pub async fn grant(ch: &Channel, token: &str, purposes: &[Purpose]) {
    consent_client(ch.clone())
        .set_consent(consent_request(token, purposes))
        .await
        .unwrap();
}

/// Adds `authorization: Bearer <key>` to every call (no header for `None`).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

pub type MerchantClient =
    MerchantServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A MerchantService client presenting `key` (or no key at all).
pub fn merchant_client(ch: Channel, key: Option<&str>) -> MerchantClient {
    let header = key.map(|k| format!("Bearer {k}").parse().unwrap());
    MerchantServiceClient::with_interceptor(ch, Bearer(header))
}

pub fn transparency_client(ch: Channel) -> TransparencyServiceClient<Channel> {
    TransparencyServiceClient::new(ch)
}

/// The real `hexveil` binary running as a child process.
pub struct BinServer {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The operator-only metrics listener.
    pub metrics: SocketAddr,
    pub stderr_path: PathBuf,
}

impl BinServer {
    /// Runs `hexveil serve` with its data in `dir` and the given extra arguments; waits for
    /// the "listening" line. Logs go to `dir/stderr-N.log`.
    pub fn spawn(dir: &Path, extra: &[&str]) -> BinServer {
        Self::spawn_with_env(dir, extra, &[])
    }

    pub fn spawn_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> BinServer {
        Self::spawn_in(dir, dir, extra, env)
    }

    /// Like [`BinServer::spawn_with_env`], with the logs in `log_dir` and the data (database,
    /// key) in `dir`: for tests that fill the data's file system.
    pub fn spawn_in(log_dir: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> BinServer {
        Self::spawn_store(log_dir, dir, &store_url(dir), extra, env)
    }

    /// Like [`BinServer::spawn_in`], on the store at `store` (e.g. through a proxy).
    pub fn spawn_store(
        log_dir: &Path,
        dir: &Path,
        store: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BinServer {
        let n = std::fs::read_dir(log_dir).map(|d| d.count()).unwrap_or(0);
        let stderr_path = log_dir.join(format!("stderr-{n}.log"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hexveil"));
        cmd.args([
            "serve",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--store", store, "--data-dir", &dir.display().to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hexveil");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("hexveil listening") => break l,
                Some(Ok(_)) => continue,
                _ => {
                    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("hexveil exited before listening:\n{log}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        BinServer {
            grpc: addr("grpc="),
            http: addr("http="),
            metrics: addr("metrics="),
            child,
            stderr_path,
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every row of every table of the store, as text, for before/after comparisons — except
/// `nodes`, the membership heartbeat every running server renews each second.
pub async fn dump_db(db: &Db) -> Vec<String> {
    match db {
        Db::Sqlite(path) => dump_sqlite(path).await,
        Db::Postgres(url) => dump_postgres(url).await,
    }
}

async fn dump_postgres(url: &str) -> Vec<String> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::TEXT FROM information_schema.tables
         WHERE table_schema = current_schema() AND table_name NOT LIKE '\\_sqlx%'
           AND table_name <> 'nodes'
         ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    let mut out = Vec::new();
    for t in tables {
        let sql = sqlx::AssertSqlSafe(format!("SELECT t::TEXT FROM \"{t}\" t ORDER BY 1"));
        for row in sqlx::query(sql).fetch_all(&mut conn).await.unwrap() {
            out.push(format!("{t}: {}", row.get::<String, _>(0)));
        }
    }
    let _ = conn.close().await;
    out
}

async fn dump_sqlite(path: &Path) -> Vec<String> {
    use sqlx::{Connection, Row};
    let url = format!("sqlite://{}?mode=ro", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name NOT LIKE '_sqlx%' AND name != 'nodes' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    let mut out = Vec::new();
    for t in tables {
        let sql = format!("SELECT quote(t.rowid) || '' AS r, * FROM \"{t}\" t");
        let sql = sqlx::AssertSqlSafe(sql);
        let rows = match sqlx::query(sql).fetch_all(&mut conn).await {
            Ok(rows) => rows,
            // WITHOUT ROWID tables have no rowid column.
            Err(_) => sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM \"{t}\"")))
                .fetch_all(&mut conn)
                .await
                .unwrap(),
        };
        for row in rows {
            let mut cols = Vec::new();
            for i in 0..row.len() {
                let v: Option<Vec<u8>> = row.try_get_unchecked(i).ok();
                cols.push(format!("{v:?}"));
            }
            out.push(format!("{t}: {}", cols.join(",")));
        }
    }
    out
}

/// Rows that name `device` in every per-device table of the store.
pub async fn rows_of_device(db: &Db, device: &hexveil::pseudonym::DeviceId) -> usize {
    let mut n = 0;
    for t in [
        "devices",
        "consent_receipts",
        "notifications",
        "restrictions",
        "contributions",
        "contribution_spend",
        "daily_contributions",
    ] {
        n += rows_in(db, t, device).await as usize;
    }
    n
}

/// Rows of `table` that name `device`.
pub async fn rows_in(db: &Db, table: &str, device: &hexveil::pseudonym::DeviceId) -> i64 {
    use sqlx::Connection;
    match db {
        Db::Sqlite(path) => {
            let url = format!("sqlite://{}?mode=ro", path.display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let sql = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table} WHERE device = ?"));
            sqlx::query_scalar(sql)
                .bind(&device.0[..])
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
        Db::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            let sql =
                sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table} WHERE device = $1"));
            let n = sqlx::query_scalar(sql)
                .bind(&device.0[..])
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let _ = conn.close().await;
            n
        }
    }
}

/// Registers a merchant at `cell` with the real CLI (`hexveil merchant add --json`) on the
/// store at `store_url`; returns its API key.
pub fn cli_merchant_add(store_url: &str, name: &str, cell: h3o::CellIndex) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args(["merchant", "add", "--store", store_url, "--name", name])
        .args(["--cell", &format!("{cell:x}"), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    added["api_key"].as_str().unwrap().to_string()
}

/// Upserts one offer at `cell` (radius 1, valid from a minute ago for a day, a budget of a
/// million a day) for the merchant holding `key`, against the real system time.
pub async fn upsert_offer_now(ch: &Channel, key: &str, title: &str, cell: h3o::CellIndex) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    merchant_client(ch.clone(), Some(key))
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(pb::Offer {
                title: title.into(),
                cell: cell.into(),
                radius_k: 1,
                valid_from: at(now - 60),
                valid_until: at(now + 86_400),
                max_notifications_per_day: 1_000_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// A token that passes validation, unique per `n`.
pub fn token(n: u32) -> String {
    format!("test-device-token-{n:08}")
}

/// Shared clock helper.
pub fn manual_clock(start_ms: i64) -> (hexveil::clock::ManualClock, SharedClock) {
    let c = hexveil::clock::ManualClock::new(hexveil::clock::Timestamp(start_ms));
    let shared: SharedClock = Arc::new(c.clone());
    (c, shared)
}

/// A plain HTTP/1.1 GET over TCP (no HTTP client dependency): (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The rows of a parameterless `sql` of two integer columns, on either backend (the SQL must
/// mean the same in both: inline integer literals, no placeholders).
pub async fn query_pairs(db: &Db, sql: &str) -> Vec<(i64, i64)> {
    use sqlx::{Connection, Row};
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match db {
        Db::Sqlite(path) => {
            let url = format!("sqlite://{}?mode=ro", path.display());
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        }
        Db::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
            let _ = conn.close().await;
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        }
    }
}

/// The one integer a parameterless `sql` returns (e.g. a `COUNT(*)`), on either backend.
pub async fn query_i64(db: &Db, sql: &str) -> i64 {
    query_pairs(db, &format!("SELECT ({sql}), CAST(0 AS BIGINT)")).await[0].0
}

/// The caps the property tests draw (`tests/caps_property.rs` on one node, `tests/nodes.rs`
/// on two): a 5-minute dwell and the given limits.
pub fn property_caps(
    per_day: u32,
    per_week: u32,
    interval_min: u64,
    per_merchant: u32,
    quiet: bool,
) -> hexveil::config::CapsConfig {
    hexveil::config::CapsConfig {
        min_dwell: hexveil::config::Dur::mins(5),
        quiet_hours: if quiet {
            "21:00-09:00".parse().unwrap()
        } else {
            hexveil::config::QuietHours(None)
        },
        min_interval: hexveil::config::Dur::mins(interval_min),
        per_device_per_day: per_day,
        per_device_per_week: per_week,
        per_merchant_per_device_per_week: per_merchant,
        ..hexveil::config::CapsConfig::default()
    }
}
