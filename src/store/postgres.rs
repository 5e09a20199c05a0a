//! The shared backend for several nodes: PostgreSQL, with a pool of readers and one writer
//! connection per node fed by the group-commit queue (one transaction per batch). Every node
//! runs the migrations at start; sqlx's migrator holds a session advisory lock while it does,
//! so nodes starting together apply each migration once.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, SqlSafeStr};
use tokio::sync::mpsc;

use super::StoreError;
use super::group_commit::{self, Pending};
use super::health::Health;
use writer::PgWriter;

/// Longest wait for a connection (a reader from the pool, or the writer's reconnect): an
/// unreachable database fails a request within this, never hangs it.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Numbered migrations, embedded in the binary and run at start (the twins of SQLite's).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "devices and consent",
        include_str!("migrations/postgres/0001_devices_and_consent.sql"),
    ),
    (
        2,
        "offers and caps",
        include_str!("migrations/postgres/0002_offers_and_caps.sql"),
    ),
    (
        3,
        "foot traffic",
        include_str!("migrations/postgres/0003_foot_traffic.sql"),
    ),
    (
        4,
        "store probe",
        include_str!("migrations/postgres/0004_store_probe.sql"),
    ),
    (
        5,
        "privacy accounting",
        include_str!("migrations/postgres/0005_privacy_accounting.sql"),
    ),
    (
        6,
        "daily release",
        include_str!("migrations/postgres/0006_daily_release.sql"),
    ),
    (
        7,
        "offer deliveries",
        include_str!("migrations/postgres/0007_offer_deliveries.sql"),
    ),
    (
        8,
        "nodes",
        include_str!("migrations/postgres/0008_nodes.sql"),
    ),
];

fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*name),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect::<Vec<_>>();
    // `locking` stays on (the default): the migrator takes `pg_advisory_lock` on a key of the
    // database's name before it reads `_sqlx_migrations`, and frees it when done.
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

/// Parses `url` (a `postgres://` URL; `?options=-c search_path=…` selects a schema).
pub(crate) fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Config(format!("store.url: {e}")))?
        .application_name("hexveil"))
}

/// Opens one connection, failing after [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

pub(crate) struct PgStore {
    readers: PgPool,
    options: PgConnectOptions,
}

crate::store::forward_backend!(PgStore, "postgres");

impl PgStore {
    /// Connects to `url`, runs the migrations (under sqlx's advisory lock) and opens the
    /// reader pool. Fails if the database cannot be reached: a node does not start blind.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        let options = connect_options(url)?;
        let mut conn = connect(&options).await.map_err(|e| {
            StoreError::Unavailable(format!("store.url: cannot connect to PostgreSQL: {e}"))
        })?;
        migrator()
            .run(&mut conn)
            .await
            .map_err(|e| StoreError::Config(format!("migration failed: {e}")))?;
        let _ = conn.close().await;
        let readers = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options.clone());
        Ok(PgStore { readers, options })
    }

    /// Starts the writer on its own thread; its connection is opened there (a PostgreSQL
    /// connection belongs to the runtime that opened it).
    fn start_writer_now(
        &self,
        rx: mpsc::Receiver<Pending>,
        health: std::sync::Arc<Health>,
    ) -> Result<(), StoreError> {
        group_commit::spawn_writer(PgWriter::new(self.options.clone()), rx, health)
    }
}

mod daily;
mod reads;
mod rows;
#[doc(hidden)]
pub mod testing;
mod writer;
mod writes;
