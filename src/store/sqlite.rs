//! The embedded backend: one SQLite file in WAL mode with `synchronous = FULL`, a dedicated
//! writer connection fed by the group-commit queue, and a small pool of readers.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqlSafeStr};
use tokio::sync::mpsc;

use super::group_commit::{self, BatchWriter, Pending};
use super::{RECEIPTS_KEPT, StoreError, WriteOp, WriteResult};
use crate::clock::Timestamp;
use crate::model::{ConsentReceipt, CurrentCell, DeviceSnapshot, Purposes};
use crate::pseudonym::DeviceId;

/// Numbered migrations, embedded in the binary and run at start.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "devices and consent",
    include_str!("migrations/sqlite/0001_devices_and_consent.sql"),
)];

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
}

impl SqliteStore {
    /// Opens (creating if needed) the file named by `url`, migrates it and starts the writer
    /// task draining `rx`.
    pub(crate) async fn open(url: &str, rx: mpsc::Receiver<Pending>) -> Result<Self, StoreError> {
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
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        tokio::spawn(group_commit::run(SqliteWriter { conn: writer }, rx));
        Ok(SqliteStore { readers })
    }

    pub(crate) async fn latest_consent(
        &self,
        device: DeviceId,
    ) -> Result<Option<ConsentReceipt>, StoreError> {
        let row = sqlx::query(
            "SELECT receipt_id, purposes, granted_at, policy_version, controller
             FROM consent_receipts WHERE device = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(&device.0[..])
        .fetch_optional(&self.readers)
        .await?;
        row.map(|r| receipt_from_row(device, &r)).transpose()
    }

    pub(crate) async fn device_snapshot(
        &self,
        device: DeviceId,
    ) -> Result<Option<DeviceSnapshot>, StoreError> {
        let mut conn = self.readers.acquire().await?;
        // One read transaction so the snapshot is consistent across tables.
        let mut tx = conn.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT created_at, last_activity, cell, cell_since, cell_last_seen
             FROM devices WHERE device = ?",
        )
        .bind(&device.0[..])
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let receipts = sqlx::query(
            "SELECT receipt_id, purposes, granted_at, policy_version, controller
             FROM consent_receipts WHERE device = ? ORDER BY seq DESC",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| receipt_from_row(device, r))
        .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        let cell: Option<i64> = row.try_get("cell")?;
        let current_cell = match cell {
            Some(c) => Some(CurrentCell {
                cell: c as u64,
                since: Timestamp(row.try_get::<Option<i64>, _>("cell_since")?.unwrap_or(0)),
                last_seen: Timestamp(
                    row.try_get::<Option<i64>, _>("cell_last_seen")?
                        .unwrap_or(0),
                ),
            }),
            None => None,
        };
        Ok(Some(DeviceSnapshot {
            device,
            created_at: Timestamp(row.try_get("created_at")?),
            last_activity: Timestamp(row.try_get("last_activity")?),
            receipts,
            current_cell,
        }))
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}

fn receipt_from_row(device: DeviceId, r: &SqliteRow) -> Result<ConsentReceipt, StoreError> {
    let bits: i64 = r.try_get("purposes")?;
    Ok(ConsentReceipt {
        receipt_id: r.try_get("receipt_id")?,
        device,
        purposes: Purposes::from_bits(
            u8::try_from(bits).map_err(|_| {
                StoreError::Corrupt(format!("purposes bit mask {bits} out of range"))
            })?,
        ),
        granted_at: Timestamp(r.try_get("granted_at")?),
        policy_version: r.try_get("policy_version")?,
        controller: r.try_get("controller")?,
    })
}

struct SqliteWriter {
    conn: SqliteConnection,
}

impl BatchWriter for SqliteWriter {
    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<WriteResult>, StoreError> {
        let mut tx = self.conn.begin().await?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(apply_one(&mut tx, op).await?);
        }
        tx.commit().await?;
        Ok(results)
    }
}

async fn apply_one(conn: &mut SqliteConnection, op: &WriteOp) -> Result<WriteResult, StoreError> {
    match op {
        WriteOp::PutConsent { receipt, now } => {
            let device = &receipt.device.0[..];
            sqlx::query(
                "INSERT INTO devices (device, created_at, last_activity) VALUES (?, ?, ?)
                 ON CONFLICT (device) DO UPDATE SET last_activity = excluded.last_activity",
            )
            .bind(device)
            .bind(now.millis())
            .bind(now.millis())
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "INSERT INTO consent_receipts
                   (receipt_id, device, purposes, granted_at, policy_version, controller)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&receipt.receipt_id)
            .bind(device)
            .bind(i64::from(receipt.purposes.bits()))
            .bind(receipt.granted_at.millis())
            .bind(&receipt.policy_version)
            .bind(&receipt.controller)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "DELETE FROM consent_receipts WHERE device = ? AND seq NOT IN
                   (SELECT seq FROM consent_receipts WHERE device = ? ORDER BY seq DESC LIMIT ?)",
            )
            .bind(device)
            .bind(device)
            .bind(RECEIPTS_KEPT)
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::EraseDevice { device } => {
            let mut erased = 0;
            for sql in [
                "DELETE FROM consent_receipts WHERE device = ?",
                "DELETE FROM devices WHERE device = ?",
            ] {
                erased += sqlx::query(sql)
                    .bind(&device.0[..])
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            }
            Ok(WriteResult::Count(erased))
        }
        WriteOp::ExpireIdle { cutoff } => {
            sqlx::query(
                "DELETE FROM consent_receipts WHERE device IN
                   (SELECT device FROM devices WHERE last_activity < ?)",
            )
            .bind(cutoff.millis())
            .execute(&mut *conn)
            .await?;
            let n = sqlx::query("DELETE FROM devices WHERE last_activity < ?")
                .bind(cutoff.millis())
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(WriteResult::Count(n))
        }
    }
}
