//! Test support (used by the unit tests and the integration tests' harness; not part of the
//! product): which PostgreSQL to test against, and a fresh schema per test.
//!
//! `HEXVEIL_TEST_POSTGRES_URL` selects the PostgreSQL runs. Unset, they are skipped (with a
//! printed note); set but unreachable, they fail — a CI that asked for PostgreSQL never
//! passes without it.
//!
//! Unwrap safety (the whole module): only tests call it, and a panic is how a test that
//! cannot get its database, schema or proxy fails; no product code path reaches it.

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The environment variable naming the test database.
pub const URL_ENV: &str = "HEXVEIL_TEST_POSTGRES_URL";

/// The test database's URL, or `None` (and a note on stderr that `what` is skipped).
pub fn url_or_skip(what: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{what}: skipped on PostgreSQL ({URL_ENV} is not set)");
            None
        }
    }
}

/// A schema of its own in the test database; dropped (with everything in it) on drop.
#[derive(Debug)]
pub struct TestSchema {
    /// The database URL with `search_path` set to the schema: what a store opens.
    pub url: String,
    /// The schema's name (`hv_<random>`).
    pub name: String,
    base: String,
}

impl TestSchema {
    /// Creates a fresh schema in the database at `base`. Panics if the database cannot be
    /// reached: a test asked to run on PostgreSQL fails without it.
    pub async fn create(base: &str) -> TestSchema {
        let name = format!("hv_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(base).await.unwrap_or_else(|e| {
            panic!("{URL_ENV}={base}: cannot connect to the test PostgreSQL: {e}")
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create schema {name}: {e}"));
        let _ = conn.close().await;
        TestSchema {
            url: with_search_path(base, &name),
            name,
            base: base.to_string(),
        }
    }

    /// [`TestSchema::create`] for synchronous callers (must not be called on a runtime's
    /// thread).
    pub fn create_blocking(base: &str) -> TestSchema {
        let base = base.to_string();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(TestSchema::create(&base))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Runs `sql` in the schema (test inspection) and returns the first column of every row
    /// as text.
    pub async fn query_text(&self, sql: &str) -> Vec<Option<String>> {
        use sqlx::Row;
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
        rows.iter()
            .map(|r| r.try_get::<Option<String>, _>(0).expect("a text column"))
            .collect()
    }

    /// `SELECT COUNT(*) FROM <table> [WHERE …]` in the schema.
    pub async fn count(&self, table_and_filter: &str) -> i64 {
        let sql = format!("SELECT COUNT(*)::TEXT FROM {table_and_filter}");
        self.query_text(&sql).await[0]
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("a count")
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Best effort, on a thread of its own (drop may run inside a runtime): a schema left
        // behind by a crashed test is harmless (its name is random).
        let (base, name) = (self.base.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&base).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {name} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// `base` with `search_path` set to `schema` (sqlx's `options` URL parameter).
pub fn with_search_path(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// A TCP proxy the test controls between a store and PostgreSQL: [`Proxy::cut`] drops every
/// connection through it and refuses new ones (the database "goes away"), [`Proxy::restore`]
/// lets connections through again. Runs on the runtime that starts it.
#[derive(Debug)]
pub struct Proxy {
    /// `url` with its host and port replaced by the proxy's.
    pub url: String,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to the PostgreSQL named by `url`.
    pub async fn start(url: &str) -> Proxy {
        let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a postgres URL");
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let open = std::sync::Arc::new(tokio::sync::watch::channel(true).0);
        let state = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut gate = state.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = gate.wait_for(|open| !*open) => {}
                    }
                    // Dropping both ends resets the connection: the store sees it lost.
                });
            }
        });
        Proxy {
            url: with_authority(url, &local.to_string()),
            open,
            task,
        }
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// `url` with its `host:port` replaced by `authority` (user and password kept).
fn with_authority(url: &str, authority: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    let user = auth.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{authority}{tail}", user.unwrap_or_default())
}
