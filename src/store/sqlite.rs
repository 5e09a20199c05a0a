//! The embedded backend: one SQLite file in WAL mode with `synchronous = FULL`, a dedicated
//! writer connection fed by the group-commit queue, and a small pool of readers.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, SqlSafeStr};
use tokio::sync::mpsc;

use super::StoreError;
use super::group_commit::{self, Pending};
use super::health::Health;
use writer::{FileSet, SqliteWriter, file_identity};

/// Numbered migrations, embedded in the binary and run at start.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "devices and consent",
        include_str!("migrations/sqlite/0001_devices_and_consent.sql"),
    ),
    (
        2,
        "offers and caps",
        include_str!("migrations/sqlite/0002_offers_and_caps.sql"),
    ),
    (
        3,
        "foot traffic",
        include_str!("migrations/sqlite/0003_foot_traffic.sql"),
    ),
    (
        4,
        "store probe",
        include_str!("migrations/sqlite/0004_store_probe.sql"),
    ),
    (
        5,
        "privacy accounting",
        include_str!("migrations/sqlite/0005_privacy_accounting.sql"),
    ),
    (
        6,
        "daily release",
        include_str!("migrations/sqlite/0006_daily_release.sql"),
    ),
    (
        7,
        "offer deliveries",
        include_str!("migrations/sqlite/0007_offer_deliveries.sql"),
    ),
    (8, "nodes", include_str!("migrations/sqlite/0008_nodes.sql")),
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
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

pub(crate) struct SqliteStore {
    readers: SqlitePool,
    /// The writer, until [`Backend::start_writer`](crate::store::Backend) moves it to its
    /// thread.
    writer: std::sync::Mutex<Option<SqliteWriter>>,
}

crate::store::forward_backend!(SqliteStore, "sqlite");

impl SqliteStore {
    /// Opens (creating if needed) the file named by `url`, migrates it and prepares the
    /// writer (started by `start_writer_now`).
    pub(crate) async fn open(url: &str, min_free_bytes: u64) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("store.url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Config(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let mut writer = SqliteConnection::connect_with(&options).await?;
        migrator()
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Config(format!("migration failed: {e}")))?;
        // Every reader is opened now and kept for the store's life: SQLite opens the
        // write-ahead log with O_CREAT on every new connection (read-only ones too), so a
        // reader opened after the log was removed would put a fresh, empty one in its place.
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone().read_only(true))
            .await?;
        let path = options.get_filename().to_path_buf();
        // A connection that stays open for the store's life: SQLite deletes the write-ahead
        // log when its last connection closes, and the writer closes its connection after a
        // fault — the log must keep the identity it had when the store was opened.
        let sentinel = match file_identity(&path) {
            Some(_) => {
                Some(SqliteConnection::connect_with(&options.clone().read_only(true)).await?)
            }
            None => None,
        };
        let identity = FileSet::of(&path);
        let writer = SqliteWriter {
            conn: Some(writer),
            // A reconnect after a fault must never create a fresh, empty database in place of
            // the one that went missing.
            options: options.create_if_missing(false),
            path,
            identity,
            min_free_bytes,
            _sentinel: sentinel,
        };
        Ok(SqliteStore {
            readers,
            writer: std::sync::Mutex::new(Some(writer)),
        })
    }

    /// Moves the writer to its own thread, draining `rx`.
    fn start_writer_now(
        &self,
        rx: mpsc::Receiver<Pending>,
        health: std::sync::Arc<Health>,
    ) -> Result<(), StoreError> {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| StoreError::Config("the writer was started already".into()))?;
        group_commit::spawn_writer(writer, rx, health)
    }
}

mod daily;
mod reads;
mod rows;
#[cfg(test)]
mod tests;
mod writer;
mod writes;
