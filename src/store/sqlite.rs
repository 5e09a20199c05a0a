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

use super::group_commit::{self, BatchFailure, BatchWriter, OpResult, Pending};
use super::health::Health;
use super::{DeliveryLimits, NOTIFICATIONS_KEPT, RECEIPTS_KEPT, StoreError, WriteOp, WriteResult};
use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, CurrentCell, DeliveryRow, DeviceRow, DeviceSnapshot, Dwell, Feedback,
    LedgerEntry, Merchant, MerchantId, Notification, Offer, OfferId, OfferStatRow,
    OfferStatsLedgerEntry, OpeningHours, Purpose, Purposes, ReleasedCount, Restriction,
};
use crate::pseudonym::DeviceId;

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
}

impl SqliteStore {
    /// Opens (creating if needed) the file named by `url`, migrates it and starts the writer
    /// task draining `rx`.
    pub(crate) async fn open(
        url: &str,
        rx: mpsc::Receiver<Pending>,
        health: std::sync::Arc<Health>,
        min_free_bytes: u64,
    ) -> Result<Self, StoreError> {
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
        // The writer drives its statements from its own thread: on the server's runtime, every
        // statement's answer from sqlx's SQLite worker waited in the run queue behind request
        // work, which stretched each commit (and every durable reply) under load.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the writer's runtime: {e}")))?;
        std::thread::Builder::new()
            .name("hexveil-writer".into())
            .spawn(move || runtime.block_on(group_commit::run(writer, rx, health)))
            .map_err(|e| StoreError::Config(format!("cannot start the writer thread: {e}")))?;
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
        let notifications = sqlx::query(
            "SELECT notification_id, device, offer_id, merchant_id, cell, sent_at, feedback
             FROM notifications WHERE device = ? ORDER BY sent_at DESC",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(notification_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let restrictions = sqlx::query(
            "SELECT device, merchant_id, muted, dismissals, backoff_until
             FROM restrictions WHERE device = ? ORDER BY merchant_id",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(restriction_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let pending = sqlx::query(
            "SELECT COUNT(*) AS n, MAX(bucket) AS latest FROM contributions WHERE device = ?",
        )
        .bind(&device.0[..])
        .fetch_one(&mut *tx)
        .await?;
        let spend = sqlx::query(
            "SELECT COALESCE(SUM(pairs), 0) AS n, MAX(bucket) AS latest
             FROM contribution_spend WHERE device = ?",
        )
        .bind(&device.0[..])
        .fetch_one(&mut *tx)
        .await?;
        let daily = sqlx::query(
            "SELECT COUNT(*) AS n, MAX(day) AS latest FROM daily_contributions WHERE device = ?",
        )
        .bind(&device.0[..])
        .fetch_one(&mut *tx)
        .await?;
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
            notifications,
            restrictions,
            pending_contributions: pending.try_get::<i64, _>("n")? as u64,
            latest_pending_bucket: opt_ts(&pending, "latest")?,
            contribution_spend: spend.try_get::<i64, _>("n")? as u64,
            latest_spend_bucket: opt_ts(&spend, "latest")?,
            pending_daily_contributions: daily.try_get::<i64, _>("n")? as u64,
            latest_pending_day: opt_ts(&daily, "latest")?,
        }))
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    pub(crate) async fn load_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        sqlx::query(
            "SELECT device, purposes, last_activity, cell, cell_since, cell_last_seen, dwell_anchor
             FROM devices",
        )
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            let cell: Option<i64> = r.try_get("cell")?;
            let dwell = match cell {
                Some(c) => Some(Dwell {
                    cell: c as u64,
                    anchor: r.try_get::<Option<i64>, _>("dwell_anchor")?.unwrap_or(c) as u64,
                    since: Timestamp(r.try_get::<Option<i64>, _>("cell_since")?.unwrap_or(0)),
                    last_seen: Timestamp(
                        r.try_get::<Option<i64>, _>("cell_last_seen")?.unwrap_or(0),
                    ),
                }),
                None => None,
            };
            Ok(DeviceRow {
                device: device_id(r, "device")?,
                purposes: Purposes::from_bits(r.try_get::<i64, _>("purposes")? as u8),
                last_activity: Timestamp(r.try_get("last_activity")?),
                dwell,
            })
        })
        .collect()
    }

    pub(crate) async fn load_notifications(
        &self,
        since: Timestamp,
    ) -> Result<Vec<Notification>, StoreError> {
        sqlx::query(
            "SELECT notification_id, device, offer_id, merchant_id, cell, sent_at, feedback
             FROM notifications WHERE sent_at >= ? ORDER BY sent_at",
        )
        .bind(since.millis())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(notification_from_row)
        .collect()
    }

    pub(crate) async fn load_deliveries(
        &self,
        since: Timestamp,
    ) -> Result<Vec<(OfferId, u64, Timestamp)>, StoreError> {
        sqlx::query(
            "SELECT offer_id, cell, sent_at FROM offer_deliveries WHERE sent_at >= ?
             ORDER BY sent_at",
        )
        .bind(since.millis())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok((
                uuid_col(r, "offer_id")?,
                r.try_get::<i64, _>("cell")? as u64,
                Timestamp(r.try_get("sent_at")?),
            ))
        })
        .collect()
    }

    pub(crate) async fn load_restrictions(&self) -> Result<Vec<Restriction>, StoreError> {
        sqlx::query(
            "SELECT device, merchant_id, muted, dismissals, backoff_until FROM restrictions",
        )
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(restriction_from_row)
        .collect()
    }

    pub(crate) async fn load_offers(&self) -> Result<Vec<Offer>, StoreError> {
        sqlx::query(
            "SELECT offer_id, merchant_id, title, body, cell, radius_k, valid_from, valid_until,
                    max_per_day, opening_hours, updated_at
             FROM offers ORDER BY updated_at",
        )
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(offer_from_row)
        .collect()
    }

    pub(crate) async fn offers_of(&self, merchant: MerchantId) -> Result<Vec<Offer>, StoreError> {
        sqlx::query(
            "SELECT offer_id, merchant_id, title, body, cell, radius_k, valid_from, valid_until,
                    max_per_day, opening_hours, updated_at
             FROM offers WHERE merchant_id = ? ORDER BY updated_at DESC",
        )
        .bind(merchant.to_string())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(offer_from_row)
        .collect()
    }

    pub(crate) async fn merchant(&self, id: MerchantId) -> Result<Option<Merchant>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT merchant_id, name, key_hash, created_at, revoked_at FROM merchants
             WHERE merchant_id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.readers)
        .await?
        else {
            return Ok(None);
        };
        let cells = self.merchant_cells(id).await?;
        merchant_from_row(&row, cells).map(Some)
    }

    async fn merchant_cells(&self, id: MerchantId) -> Result<Vec<u64>, StoreError> {
        Ok(
            sqlx::query("SELECT cell FROM merchant_cells WHERE merchant_id = ? ORDER BY cell")
                .bind(id.to_string())
                .fetch_all(&self.readers)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("cell").map(|c| c as u64))
                .collect::<Result<Vec<_>, _>>()?,
        )
    }

    pub(crate) async fn bucket_counts(
        &self,
        bucket: Timestamp,
        max_cells_per_device: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        // Each device counts in at most `max_cells_per_device` cells (its lowest), whatever
        // bound admitted its rows: the noise is calibrated for this one.
        sqlx::query(
            "SELECT cell, COUNT(*) AS n FROM
               (SELECT cell, ROW_NUMBER() OVER (PARTITION BY device ORDER BY cell) AS rank
                FROM contributions WHERE bucket = ?)
             WHERE rank <= ? GROUP BY cell",
        )
        .bind(bucket.millis())
        .bind(i64::from(max_cells_per_device))
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<i64, _>("cell")? as u64,
                r.try_get::<i64, _>("n")? as u64,
            ))
        })
        .collect()
    }

    pub(crate) async fn unreleased_buckets(&self) -> Result<Vec<Timestamp>, StoreError> {
        sqlx::query("SELECT DISTINCT bucket FROM contributions ORDER BY bucket")
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| Ok(Timestamp(r.try_get("bucket")?)))
            .collect()
    }

    pub(crate) async fn load_contributions(
        &self,
    ) -> Result<Vec<(DeviceId, u64, Timestamp)>, StoreError> {
        sqlx::query("SELECT device, cell, bucket FROM contributions")
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    device_id(r, "device")?,
                    r.try_get::<i64, _>("cell")? as u64,
                    Timestamp(r.try_get("bucket")?),
                ))
            })
            .collect()
    }

    pub(crate) async fn load_contribution_spend(
        &self,
        through: Timestamp,
    ) -> Result<Vec<(DeviceId, Timestamp, u32)>, StoreError> {
        sqlx::query("SELECT device, bucket, pairs FROM contribution_spend WHERE bucket <= ?")
            .bind(through.millis())
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    device_id(r, "device")?,
                    Timestamp(r.try_get("bucket")?),
                    u32::try_from(r.try_get::<i64, _>("pairs")?).unwrap_or(u32::MAX),
                ))
            })
            .collect()
    }

    pub(crate) async fn last_release(&self) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query("SELECT MAX(bucket) AS b FROM ledger")
            .fetch_one(&self.readers)
            .await?;
        opt_ts(&row, "b")
    }

    pub(crate) async fn ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        sqlx::query("SELECT * FROM ledger WHERE bucket >= ? AND bucket < ? ORDER BY bucket")
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                Ok(LedgerEntry {
                    bucket: Timestamp(r.try_get("bucket")?),
                    bucket_len_ms: r.try_get("bucket_len_ms")?,
                    released_at: Timestamp(r.try_get("released_at")?),
                    mechanism: r.try_get("mechanism")?,
                    scale: r.try_get("scale")?,
                    rho: r.try_get("rho")?,
                    epsilon: r.try_get("epsilon")?,
                    l1_sensitivity: r.try_get("l1_sensitivity")?,
                    l2_sensitivity: r.try_get("l2_sensitivity")?,
                    threshold: r.try_get::<i64, _>("threshold")? as u32,
                    cells: r.try_get::<i64, _>("cells")? as u64,
                })
            })
            .collect()
    }

    pub(crate) async fn released(
        &self,
        cells: &[u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<ReleasedCount>, StoreError> {
        let mut out = Vec::new();
        if cells.len() > 32 {
            // Many cells: one scan of the time range, filtered here.
            let wanted: std::collections::HashSet<u64> = cells.iter().copied().collect();
            let rows = sqlx::query(
                "SELECT bucket, cell, noisy, suppressed FROM releases
                 WHERE bucket >= ? AND bucket < ? ORDER BY bucket, cell",
            )
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?;
            for r in rows {
                let cell = r.try_get::<i64, _>("cell")? as u64;
                if wanted.contains(&cell) {
                    out.push(ReleasedCount {
                        bucket: Timestamp(r.try_get("bucket")?),
                        cell,
                        noisy: r.try_get("noisy")?,
                        suppressed: r.try_get::<i64, _>("suppressed")? != 0,
                    });
                }
            }
            return Ok(out);
        }
        // A few cells: one indexed range scan per cell.
        for cell in cells {
            let rows = sqlx::query(
                "SELECT bucket, cell, noisy, suppressed FROM releases
                 WHERE cell = ? AND bucket >= ? AND bucket < ? ORDER BY bucket",
            )
            .bind(*cell as i64)
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?;
            for r in rows {
                out.push(ReleasedCount {
                    bucket: Timestamp(r.try_get("bucket")?),
                    cell: r.try_get::<i64, _>("cell")? as u64,
                    noisy: r.try_get("noisy")?,
                    suppressed: r.try_get::<i64, _>("suppressed")? != 0,
                });
            }
        }
        Ok(out)
    }

    pub(crate) async fn merchants(&self) -> Result<Vec<Merchant>, StoreError> {
        let rows = sqlx::query(
            "SELECT merchant_id, name, key_hash, created_at, revoked_at FROM merchants
             ORDER BY created_at, merchant_id",
        )
        .fetch_all(&self.readers)
        .await?;
        let mut cells: std::collections::HashMap<String, Vec<u64>> =
            std::collections::HashMap::new();
        for r in
            sqlx::query("SELECT merchant_id, cell FROM merchant_cells ORDER BY merchant_id, cell")
                .fetch_all(&self.readers)
                .await?
        {
            cells
                .entry(r.try_get("merchant_id")?)
                .or_default()
                .push(r.try_get::<i64, _>("cell")? as u64);
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("merchant_id")?;
            let c = cells.remove(&id).unwrap_or_default();
            out.push(merchant_from_row(&row, c)?);
        }
        Ok(out)
    }

    pub(crate) async fn deliveries(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        sqlx::query(
            "SELECT device, offer_id, sent_at, feedback FROM notifications
             WHERE sent_at >= ? AND sent_at < ? ORDER BY sent_at, notification_id",
        )
        .bind(start.millis())
        .bind(end.millis())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok(DeliveryRow {
                device: device_id(r, "device")?,
                offer_id: uuid_col(r, "offer_id")?,
                sent_at: Timestamp(r.try_get("sent_at")?),
                opened: r.try_get::<Option<String>, _>("feedback")?.as_deref()
                    == Some(Feedback::Opened.as_str()),
            })
        })
        .collect()
    }

    pub(crate) async fn last_offer_stats_day(&self) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query("SELECT MAX(day) AS d FROM offer_stats_ledger")
            .fetch_one(&self.readers)
            .await?;
        opt_ts(&row, "d")
    }

    pub(crate) async fn offer_stats(
        &self,
        merchant_id: MerchantId,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<OfferStatRow>, StoreError> {
        sqlx::query(
            "SELECT day, offer_id, merchant_id, deliveries, opens FROM offer_stats
             WHERE merchant_id = ? AND day >= ? AND day < ? ORDER BY day, offer_id",
        )
        .bind(merchant_id.to_string())
        .bind(start.millis())
        .bind(end.millis())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok(OfferStatRow {
                day: Timestamp(r.try_get("day")?),
                offer_id: uuid_col(r, "offer_id")?,
                merchant_id: uuid_col(r, "merchant_id")?,
                deliveries: r.try_get("deliveries")?,
                opens: r.try_get("opens")?,
            })
        })
        .collect()
    }

    pub(crate) async fn offer_stats_ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<OfferStatsLedgerEntry>, StoreError> {
        sqlx::query(
            "SELECT day, released_at, mechanism, scale, rho, epsilon, l1_sensitivity,
               l2_sensitivity, offers FROM offer_stats_ledger
             WHERE day >= ? AND day < ? ORDER BY day",
        )
        .bind(start.millis())
        .bind(end.millis())
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|r| {
            Ok(OfferStatsLedgerEntry {
                day: Timestamp(r.try_get("day")?),
                released_at: Timestamp(r.try_get("released_at")?),
                mechanism: r.try_get("mechanism")?,
                scale: r.try_get("scale")?,
                rho: r.try_get("rho")?,
                epsilon: r.try_get("epsilon")?,
                l1_sensitivity: r.try_get("l1_sensitivity")?,
                l2_sensitivity: r.try_get("l2_sensitivity")?,
                offers: r.try_get::<i64, _>("offers")? as u64,
            })
        })
        .collect()
    }
}

fn device_id(r: &SqliteRow, col: &str) -> Result<DeviceId, StoreError> {
    let bytes: Vec<u8> = r.try_get(col)?;
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{col} is not 16 bytes")))?;
    Ok(DeviceId(arr))
}

fn uuid_col(r: &SqliteRow, col: &str) -> Result<uuid::Uuid, StoreError> {
    let s: String = r.try_get(col)?;
    uuid::Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt(format!("{col} is not a UUID")))
}

fn opt_ts(r: &SqliteRow, col: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

fn notification_from_row(r: &SqliteRow) -> Result<Notification, StoreError> {
    let feedback: Option<String> = r.try_get("feedback")?;
    Ok(Notification {
        notification_id: uuid_col(r, "notification_id")?,
        device: device_id(r, "device")?,
        offer_id: uuid_col(r, "offer_id")?,
        merchant_id: uuid_col(r, "merchant_id")?,
        cell: r.try_get::<i64, _>("cell")? as u64,
        sent_at: Timestamp(r.try_get("sent_at")?),
        feedback: feedback.as_deref().and_then(Feedback::parse),
    })
}

fn restriction_from_row(r: &SqliteRow) -> Result<Restriction, StoreError> {
    Ok(Restriction {
        device: device_id(r, "device")?,
        merchant_id: uuid_col(r, "merchant_id")?,
        muted: r.try_get::<i64, _>("muted")? != 0,
        dismissals: r.try_get::<i64, _>("dismissals")? as u32,
        backoff_until: opt_ts(r, "backoff_until")?,
    })
}

/// Opening hours as stored: "weekday,open,close;...".
pub(crate) fn encode_hours(hours: &[OpeningHours]) -> String {
    hours
        .iter()
        .map(|h| format!("{},{},{}", h.weekday, h.open, h.close))
        .collect::<Vec<_>>()
        .join(";")
}

pub(crate) fn decode_hours(s: &str) -> Result<Vec<OpeningHours>, StoreError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(';')
        .map(|part| {
            let mut it = part.split(',').map(str::parse::<u16>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(w)), Some(Ok(o)), Some(Ok(c))) => Ok(OpeningHours {
                    weekday: w as u8,
                    open: o,
                    close: c,
                }),
                _ => Err(StoreError::Corrupt(format!("opening hours {part:?}"))),
            }
        })
        .collect()
}

fn offer_from_row(r: &SqliteRow) -> Result<Offer, StoreError> {
    Ok(Offer {
        offer_id: uuid_col(r, "offer_id")?,
        merchant_id: uuid_col(r, "merchant_id")?,
        title: r.try_get("title")?,
        body: r.try_get("body")?,
        cell: r.try_get::<i64, _>("cell")? as u64,
        radius_k: r.try_get::<i64, _>("radius_k")? as u32,
        valid_from: Timestamp(r.try_get("valid_from")?),
        valid_until: Timestamp(r.try_get("valid_until")?),
        max_notifications_per_day: r.try_get::<i64, _>("max_per_day")? as u32,
        opening_hours: decode_hours(&r.try_get::<String, _>("opening_hours")?)?,
        updated_at: Timestamp(r.try_get("updated_at")?),
    })
}

fn merchant_from_row(r: &SqliteRow, cells: Vec<u64>) -> Result<Merchant, StoreError> {
    let hash: Vec<u8> = r.try_get("key_hash")?;
    Ok(Merchant {
        merchant_id: uuid_col(r, "merchant_id")?,
        name: r.try_get("name")?,
        key_hash: hash
            .try_into()
            .map_err(|_| StoreError::Corrupt("key_hash is not 32 bytes".into()))?,
        cells,
        created_at: Timestamp(r.try_get("created_at")?),
        revoked_at: opt_ts(r, "revoked_at")?,
    })
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

/// The one writer connection, fed by the group-commit queue.
struct SqliteWriter {
    /// `None` after a failed batch: the connection is discarded (whatever state SQLite left it
    /// in) and a fresh one is opened for the next batch.
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    path: std::path::PathBuf,
    /// The database's files as they were when it was opened; `None` for an in-memory one.
    identity: Option<FileSet>,
    /// Free space the file system must keep (`store.min_free_mb`); 0 disables the check.
    min_free_bytes: u64,
    /// Keeps the write-ahead log (and shared-memory file) alive between writer connections.
    _sentinel: Option<SqliteConnection>,
}

/// (device, inode) of `path`, if it exists.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The identities of a database file, its write-ahead log and its shared-memory index.
/// Deleting the log loses every acknowledged write since the last checkpoint at the next
/// restart, so it is as much "the database" as the main file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSet {
    main: (u64, u64),
    wal: Option<(u64, u64)>,
    shm: Option<(u64, u64)>,
}

impl FileSet {
    fn of(path: &std::path::Path) -> Option<FileSet> {
        let with = |suffix: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            file_identity(std::path::Path::new(&p))
        };
        Some(FileSet {
            main: file_identity(path)?,
            wal: with("-wal"),
            shm: with("-shm"),
        })
    }

    /// Which of the files opened is gone or replaced in `now`, if any.
    fn missing(&self, now: Option<FileSet>) -> Option<&'static str> {
        let Some(now) = now else {
            return Some("database file");
        };
        if now.main != self.main {
            return Some("database file");
        }
        if self.wal.is_some() && now.wal != self.wal {
            return Some("write-ahead log (-wal)");
        }
        if self.shm.is_some() && now.shm != self.shm {
            return Some("shared-memory index (-shm)");
        }
        None
    }
}

/// Bytes available to this process on the file system holding `path`, if it can be read.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to writable
    // memory of the right type, which statvfs fills in when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64); widen both.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Some(u64::from(st.f_bavail).saturating_mul(st.f_frsize as u64))
}

/// How one failed statement is handled: only its operation, or the whole batch.
enum Failure {
    /// This operation breaks a constraint (or is malformed): roll back just it.
    Op(sqlx::Error),
    /// The transaction cannot go on (disk full, I/O, locked, ...): nothing commits.
    Batch(BatchFailure),
}

/// SQLite primary result codes that belong to one statement, not to the database: TOOBIG,
/// CONSTRAINT, MISMATCH, RANGE.
const PER_OP_CODES: [i64; 4] = [18, 19, 20, 25];

fn classify(e: sqlx::Error) -> Failure {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(1);
        if PER_OP_CODES.contains(&(code & 0xff)) {
            return Failure::Op(e);
        }
    }
    if matches!(e, sqlx::Error::Encode(_)) {
        return Failure::Op(e);
    }
    Failure::Batch(batch_failure(&e))
}

/// A bounded cause label for `e` (SQLite primary result code), with its message.
fn batch_failure(e: &sqlx::Error) -> BatchFailure {
    let cause = match e {
        sqlx::Error::Database(db) => {
            match db.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(1) & 0xff {
                13 => "disk_full",
                10 => "io",
                5 | 6 => "busy",
                8 => "read_only",
                14 => "cannot_open",
                11 | 26 => "corrupt",
                _ => "other",
            }
        }
        sqlx::Error::Io(_) => "io",
        _ => "other",
    };
    BatchFailure {
        cause,
        detail: e.to_string(),
    }
}

impl SqliteWriter {
    /// The writer connection, reopened if the last batch discarded it.
    async fn connection(&mut self) -> Result<&mut SqliteConnection, BatchFailure> {
        if self.conn.is_none() {
            let conn = SqliteConnection::connect_with(&self.options)
                .await
                .map_err(|e| batch_failure(&e))?;
            self.conn = Some(conn);
            // The file may have been swapped between the check and the open.
            self.check_file()?;
        }
        // Unwrap safety: set just above when it was `None`.
        Ok(self.conn.as_mut().expect("connection opened above"))
    }

    /// Rolls back whatever is open and drops the connection; the next batch reconnects.
    async fn discard(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }

    /// One attempt at the batch. With `savepoints`, each op runs inside its own savepoint and
    /// an op that breaks a constraint is rolled back alone; without, the first such op aborts
    /// the attempt (`Err(None)`) so the caller can retry with savepoints — the common case
    /// pays for no savepoints at all.
    async fn attempt(
        &mut self,
        ops: &[&WriteOp],
        savepoints: bool,
    ) -> Result<Vec<OpResult>, Option<BatchFailure>> {
        let conn = self.connection().await.map_err(Some)?;
        exec(conn, "BEGIN IMMEDIATE")
            .await
            .map_err(|e| Some(batch_failure(&e)))?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            if savepoints {
                exec(conn, "SAVEPOINT op")
                    .await
                    .map_err(|e| Some(batch_failure(&e)))?;
            }
            match apply_one(conn, op).await.map_err(classify) {
                Ok(r) => {
                    if savepoints {
                        exec(conn, "RELEASE op")
                            .await
                            .map_err(|e| Some(batch_failure(&e)))?;
                    }
                    results.push(Ok(r));
                }
                Err(Failure::Op(e)) if savepoints => {
                    exec(conn, "ROLLBACK TO op")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    exec(conn, "RELEASE op")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    results.push(Err(StoreError::Rejected(e.to_string())));
                }
                Err(Failure::Op(_)) => {
                    exec(conn, "ROLLBACK")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    return Err(None);
                }
                Err(Failure::Batch(f)) => return Err(Some(f)),
            }
        }
        exec(conn, "COMMIT")
            .await
            .map_err(|e| Some(batch_failure(&e)))?;
        Ok(results)
    }
}

/// Inserts released counts with `insert` (`INSERT INTO <table> (<period>, cell, noisy,
/// suppressed) `), in multi-row statements: a 100k-cell release is a few hundred statements,
/// not 100k. Shared by the hourly and the daily release.
pub(crate) async fn insert_counts(
    conn: &mut SqliteConnection,
    insert: &'static str,
    counts: &[ReleasedCount],
) -> Result<(), sqlx::Error> {
    for chunk in counts.chunks(500) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(insert);
        q.push_values(chunk, |mut row, c| {
            row.push_bind(c.bucket.millis())
                .push_bind(c.cell as i64)
                .push_bind(c.noisy)
                .push_bind(i64::from(c.suppressed));
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Runs one fixed statement (transaction control) on the writer.
async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(conn).await.map(|_| ())
}

impl BatchWriter for SqliteWriter {
    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<OpResult>, BatchFailure> {
        let outcome = match self.attempt(ops, false).await {
            Err(None) => self.attempt(ops, true).await,
            other => other,
        };
        match outcome {
            Ok(results) => Ok(results),
            Err(failure) => {
                // Whatever SQLite left open (a failed COMMIT can leave the transaction
                // active), the next batch starts on a fresh connection.
                self.discard().await;
                Err(failure.unwrap_or_else(|| BatchFailure {
                    cause: "other",
                    detail: "a write was rejected even inside its own savepoint".into(),
                }))
            }
        }
    }

    fn check_file(&mut self) -> Result<(), BatchFailure> {
        let Some(opened) = self.identity else {
            return Ok(());
        };
        match opened.missing(FileSet::of(&self.path)) {
            None => {
                if self.min_free_bytes > 0
                    && let Some(free) = free_bytes(&self.path)
                    && free < self.min_free_bytes
                {
                    return Err(BatchFailure {
                        cause: "disk_reserve",
                        detail: format!(
                            "{free} bytes free on the file system of {}, below the reserve of \
                             {} bytes (store.min_free_mb)",
                            self.path.display(),
                            self.min_free_bytes
                        ),
                    });
                }
                Ok(())
            }
            Some(which) => Err(BatchFailure {
                cause: "file_removed",
                detail: format!(
                    "the {which} of {} was removed or replaced under the running server",
                    self.path.display(),
                ),
            }),
        }
    }

    async fn probe(&mut self) -> Result<(), BatchFailure> {
        let result = async {
            let conn = self.connection().await?;
            // 64 KiB that must fit: fresh pages in the file (or the WAL), handed back at once.
            sqlx::raw_sql(
                "BEGIN IMMEDIATE;
                 INSERT INTO store_probe (id, filler) VALUES (1, randomblob(65536));
                 DELETE FROM store_probe;
                 COMMIT;",
            )
            .execute(conn)
            .await
            .map(|_| ())
            .map_err(|e| batch_failure(&e))
        }
        .await;
        if result.is_err() {
            self.discard().await;
        }
        result
    }
}

async fn apply_one(conn: &mut SqliteConnection, op: &WriteOp) -> Result<WriteResult, sqlx::Error> {
    match op {
        WriteOp::PutConsent { receipt, now } => {
            let device = &receipt.device.0[..];
            sqlx::query(
                "INSERT INTO devices (device, created_at, last_activity, purposes) VALUES (?, ?, ?, ?)
                 ON CONFLICT (device) DO UPDATE SET last_activity = excluded.last_activity,
                   purposes = excluded.purposes",
            )
            .bind(device)
            .bind(now.millis())
            .bind(now.millis())
            .bind(i64::from(receipt.purposes.bits()))
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
                "DELETE FROM contributions WHERE device = ?",
                "DELETE FROM contribution_spend WHERE device = ?",
                "DELETE FROM daily_contributions WHERE device = ?",
                "DELETE FROM notifications WHERE device = ?",
                "DELETE FROM restrictions WHERE device = ?",
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
        WriteOp::Touch { device, at } => {
            sqlx::query(
                "UPDATE devices SET last_activity = MAX(last_activity, ?) WHERE device = ?",
            )
            .bind(at.millis())
            .bind(&device.0[..])
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::ExpireIdle { cutoff } => {
            for table in [
                "consent_receipts",
                "contributions",
                "contribution_spend",
                "daily_contributions",
                "notifications",
                "restrictions",
            ] {
                let sql = format!(
                    "DELETE FROM {table} WHERE device IN
                       (SELECT device FROM devices WHERE last_activity < ?)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cutoff.millis())
                    .execute(&mut *conn)
                    .await?;
            }
            let n = sqlx::query("DELETE FROM devices WHERE last_activity < ?")
                .bind(cutoff.millis())
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(WriteResult::Count(n))
        }
        WriteOp::Many(ops) => {
            // Yields the sum of its parts' counts (e.g. notifications recorded), if any count.
            let mut total = None;
            for op in ops {
                if let WriteResult::Count(n) = Box::pin(apply_one(&mut *conn, op)).await? {
                    *total.get_or_insert(0) += n;
                }
            }
            Ok(total.map_or(WriteResult::Done, WriteResult::Count))
        }
        WriteOp::Contribute {
            device,
            cell,
            bucket,
        } => {
            // Conditional on the device's consent in this very transaction: a contribution
            // decided just before a withdrawal cannot outlive the erasure.
            let added = sqlx::query(
                "INSERT OR IGNORE INTO contributions (bucket, cell, device)
                 SELECT ?, ?, ? WHERE EXISTS
                   (SELECT 1 FROM devices WHERE device = ? AND (purposes & ?) != 0)",
            )
            .bind(bucket.millis())
            .bind(*cell as i64)
            .bind(&device.0[..])
            .bind(&device.0[..])
            .bind(i64::from(Purpose::FootTraffic.bit()))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if added == 1 {
                sqlx::query(
                    "INSERT INTO contribution_spend (device, bucket, pairs) VALUES (?, ?, 1)
                     ON CONFLICT (device, bucket) DO UPDATE SET pairs = pairs + 1",
                )
                .bind(&device.0[..])
                .bind(bucket.millis())
                .execute(&mut *conn)
                .await?;
            }
            Ok(WriteResult::Done)
        }
        WriteOp::Release { entry, counts } => {
            let inserted = sqlx::query(
                "INSERT OR IGNORE INTO ledger (bucket, bucket_len_ms, released_at, mechanism, scale,
                   rho, epsilon, l1_sensitivity, l2_sensitivity, threshold, cells)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(entry.bucket.millis())
            .bind(entry.bucket_len_ms)
            .bind(entry.released_at.millis())
            .bind(&entry.mechanism)
            .bind(entry.scale)
            .bind(entry.rho)
            .bind(entry.epsilon)
            .bind(entry.l1_sensitivity)
            .bind(entry.l2_sensitivity)
            .bind(i64::from(entry.threshold))
            .bind(entry.cells as i64)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if inserted == 0 {
                // Already released (a retry, or another node): change nothing.
                return Ok(WriteResult::Count(0));
            }
            insert_counts(
                conn,
                "INSERT INTO releases (bucket, cell, noisy, suppressed) ",
                counts,
            )
            .await?;
            sqlx::query("DELETE FROM contributions WHERE bucket = ?")
                .bind(entry.bucket.millis())
                .execute(&mut *conn)
                .await?;
            // Spend that can no longer share a 24-hour window with a new contribution.
            sqlx::query("DELETE FROM contribution_spend WHERE bucket <= ?")
                .bind(entry.bucket.millis() - crate::privacy::contrib::WINDOW_MS)
                .execute(&mut *conn)
                .await?;
            Ok(WriteResult::Count(1))
        }
        WriteOp::Presence { device, dwell, now } => {
            sqlx::query(
                "UPDATE devices SET cell = ?, cell_since = ?, cell_last_seen = ?, dwell_anchor = ?,
                   last_activity = ? WHERE device = ?",
            )
            .bind(dwell.cell as i64)
            .bind(dwell.since.millis())
            .bind(dwell.last_seen.millis())
            .bind(dwell.anchor as i64)
            .bind(now.millis())
            .bind(&device.0[..])
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::Notify(n) => notify(conn, n, None).await,
        WriteOp::Deliver {
            notification,
            limits,
        } => notify(conn, notification, Some(*limits)).await,
        WriteOp::Feedback {
            device,
            notification_id,
            feedback,
            restriction,
            now,
        } => {
            sqlx::query(
                "UPDATE notifications SET feedback = ? WHERE notification_id = ? AND device = ?",
            )
            .bind(feedback.as_str())
            .bind(notification_id.to_string())
            .bind(&device.0[..])
            .execute(&mut *conn)
            .await?;
            if let Some(r) = restriction {
                // Conditional on the device row: feedback decided just before a withdrawal
                // cannot leave a restriction behind the erasure.
                sqlx::query(
                    "INSERT INTO restrictions (device, merchant_id, muted, dismissals, backoff_until)
                     SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM devices WHERE device = ?)
                     ON CONFLICT (device, merchant_id) DO UPDATE SET muted = excluded.muted,
                       dismissals = excluded.dismissals, backoff_until = excluded.backoff_until",
                )
                .bind(&r.device.0[..])
                .bind(r.merchant_id.to_string())
                .bind(i64::from(r.muted))
                .bind(i64::from(r.dismissals))
                .bind(r.backoff_until.map(Timestamp::millis))
                .bind(&r.device.0[..])
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query("UPDATE devices SET last_activity = ? WHERE device = ?")
                .bind(now.millis())
                .bind(&device.0[..])
                .execute(&mut *conn)
                .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::ContributeDay { .. } | WriteOp::ReleaseDay { .. } => daily::apply(conn, op).await,
        WriteOp::ReleaseOfferStats { entry, rows } => {
            let inserted = sqlx::query(
                "INSERT OR IGNORE INTO offer_stats_ledger (day, released_at, mechanism, scale,
                   rho, epsilon, l1_sensitivity, l2_sensitivity, offers)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(entry.day.millis())
            .bind(entry.released_at.millis())
            .bind(&entry.mechanism)
            .bind(entry.scale)
            .bind(entry.rho)
            .bind(entry.epsilon)
            .bind(entry.l1_sensitivity)
            .bind(entry.l2_sensitivity)
            .bind(entry.offers as i64)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if inserted == 0 {
                // Already released (a retry, or another node): change nothing.
                return Ok(WriteResult::Count(0));
            }
            for chunk in rows.chunks(500) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "INSERT INTO offer_stats (day, offer_id, merchant_id, deliveries, opens) ",
                );
                q.push_values(chunk, |mut row, r| {
                    row.push_bind(r.day.millis())
                        .push_bind(r.offer_id.to_string())
                        .push_bind(r.merchant_id.to_string())
                        .push_bind(r.deliveries)
                        .push_bind(r.opens);
                });
                q.build().execute(&mut *conn).await?;
            }
            Ok(WriteResult::Count(1))
        }
        WriteOp::PutMerchant(m) => {
            sqlx::query(
                "INSERT INTO merchants (merchant_id, name, key_hash, created_at, revoked_at)
                 VALUES (?, ?, ?, ?, NULL)",
            )
            .bind(m.merchant_id.to_string())
            .bind(&m.name)
            .bind(&m.key_hash[..])
            .bind(m.created_at.millis())
            .execute(&mut *conn)
            .await?;
            for cell in &m.cells {
                sqlx::query(
                    "INSERT OR IGNORE INTO merchant_cells (merchant_id, cell) VALUES (?, ?)",
                )
                .bind(m.merchant_id.to_string())
                .bind(*cell as i64)
                .execute(&mut *conn)
                .await?;
            }
            Ok(WriteResult::Done)
        }
        WriteOp::RevokeMerchant { merchant_id, at } => {
            let n = sqlx::query(
                "UPDATE merchants SET revoked_at = ? WHERE merchant_id = ? AND revoked_at IS NULL",
            )
            .bind(at.millis())
            .bind(merchant_id.to_string())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(WriteResult::Count(n))
        }
        WriteOp::PutOffer(o) => {
            sqlx::query(
                "INSERT INTO offers (offer_id, merchant_id, title, body, cell, radius_k, valid_from,
                   valid_until, max_per_day, opening_hours, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (offer_id) DO UPDATE SET title = excluded.title, body = excluded.body,
                   cell = excluded.cell, radius_k = excluded.radius_k,
                   valid_from = excluded.valid_from, valid_until = excluded.valid_until,
                   max_per_day = excluded.max_per_day, opening_hours = excluded.opening_hours,
                   updated_at = excluded.updated_at
                 WHERE offers.merchant_id = excluded.merchant_id",
            )
            .bind(o.offer_id.to_string())
            .bind(o.merchant_id.to_string())
            .bind(&o.title)
            .bind(&o.body)
            .bind(o.cell as i64)
            .bind(i64::from(o.radius_k))
            .bind(o.valid_from.millis())
            .bind(o.valid_until.millis())
            .bind(i64::from(o.max_notifications_per_day))
            .bind(encode_hours(&o.opening_hours))
            .bind(o.updated_at.millis())
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::DeleteOffer {
            merchant_id,
            offer_id,
        } => {
            let n = sqlx::query("DELETE FROM offers WHERE offer_id = ? AND merchant_id = ?")
                .bind(offer_id.to_string())
                .bind(merchant_id.to_string())
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(WriteResult::Count(n))
        }
    }
}

/// Records a delivered notification if the conditions below hold; yields 1, or 0 (and
/// changes nothing) if it was refused.
async fn notify(
    conn: &mut SqliteConnection,
    n: &Notification,
    limits: Option<DeliveryLimits>,
) -> Result<WriteResult, sqlx::Error> {
    let device = &n.device.0[..];
    // Recorded only if, in this transaction, the device still consents to offers, the
    // merchant is not revoked and the offer exists: whatever another process or node changed
    // since the decision, nothing refused here is ever shown. With limits, also only if the
    // offer's daily budget and the cell's flood guard still have room among the stored
    // deliveries, which every node writes: the in-memory reservations hold them on one
    // node, this holds them across nodes. Deliveries carry no device, so no ForgetMe,
    // retention sweep or log trim gives a budget back.
    let (per_day, per_minute) = limits.map_or((i64::MAX, i64::MAX), |l| {
        (i64::from(l.offer_per_day), i64::from(l.cell_per_minute))
    });
    let minute = n.sent_at.millis().div_euclid(60_000) * 60_000;
    let recorded = sqlx::query(
        "INSERT INTO notifications
           (notification_id, device, offer_id, merchant_id, cell, sent_at, feedback)
         SELECT ?, ?, ?, ?, ?, ?, NULL
         WHERE EXISTS (SELECT 1 FROM devices WHERE device = ? AND (purposes & ?) != 0)
           AND EXISTS (SELECT 1 FROM merchants WHERE merchant_id = ? AND revoked_at IS NULL)
           AND EXISTS (SELECT 1 FROM offers WHERE offer_id = ? AND merchant_id = ?)
           AND (SELECT COUNT(*) FROM offer_deliveries WHERE offer_id = ? AND sent_at > ?) < ?
           AND (SELECT COUNT(*) FROM offer_deliveries
                WHERE cell = ? AND sent_at >= ? AND sent_at < ?) < ?",
    )
    .bind(n.notification_id.to_string())
    .bind(device)
    .bind(n.offer_id.to_string())
    .bind(n.merchant_id.to_string())
    .bind(n.cell as i64)
    .bind(n.sent_at.millis())
    .bind(device)
    .bind(i64::from(Purpose::NearbyOffers.bit()))
    .bind(n.merchant_id.to_string())
    .bind(n.offer_id.to_string())
    .bind(n.merchant_id.to_string())
    .bind(n.offer_id.to_string())
    .bind(n.sent_at.millis() - 86_400_000)
    .bind(per_day)
    .bind(n.cell as i64)
    .bind(minute)
    .bind(minute + 60_000)
    .bind(per_minute)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if recorded == 0 {
        return Ok(WriteResult::Count(0));
    }
    sqlx::query("INSERT INTO offer_deliveries (offer_id, cell, sent_at) VALUES (?, ?, ?)")
        .bind(n.offer_id.to_string())
        .bind(n.cell as i64)
        .bind(n.sent_at.millis())
        .execute(&mut *conn)
        .await?;
    // Nothing older than the longest window counted (an offer's 24 hours) is kept.
    sqlx::query("DELETE FROM offer_deliveries WHERE sent_at <= ?")
        .bind(n.sent_at.millis() - 86_400_000)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "DELETE FROM notifications WHERE device = ? AND notification_id NOT IN
           (SELECT notification_id FROM notifications WHERE device = ?
            ORDER BY sent_at DESC LIMIT ?)",
    )
    .bind(device)
    .bind(device)
    .bind(NOTIFICATIONS_KEPT)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE devices SET last_activity = ? WHERE device = ?")
        .bind(n.sent_at.millis())
        .bind(device)
        .execute(&mut *conn)
        .await?;
    Ok(WriteResult::Count(1))
}

mod daily;
#[cfg(test)]
mod tests;
