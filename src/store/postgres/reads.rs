//! The reads: every query the dashboards, GetMyData and start-up run (the twins of
//! `sqlite/reads.rs`), on the reader pool; under READ COMMITTED they never wait behind a
//! writer. An unreachable database fails a read within the pool's acquire timeout.

use sqlx::{Connection, Row};

use super::PgStore;
use super::rows::{
    device_id, ledger_entry_from_row, merchant_from_row, notification_from_row, offer_from_row,
    opt_ts, receipt_from_row, restriction_from_row, uuid_col,
};
use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, CurrentCell, DeliveryRow, DeviceRow, DeviceSnapshot, Dwell, Feedback,
    LedgerEntry, Merchant, MerchantId, NodeRow, Notification, Offer, OfferId, OfferStatRow,
    OfferStatsLedgerEntry, Purposes, ReleasedCount, Restriction,
};
use crate::pseudonym::DeviceId;
use crate::store::{StoreError, StoredDevice};

/// Decodes a `devices` row (device, purposes, last_activity and the dwell columns).
fn device_row_from_row(r: &sqlx::postgres::PgRow) -> Result<DeviceRow, StoreError> {
    let cell: Option<i64> = r.try_get("cell")?;
    let dwell = match cell {
        Some(c) => Some(Dwell {
            cell: c as u64,
            anchor: r.try_get::<Option<i64>, _>("dwell_anchor")?.unwrap_or(c) as u64,
            since: Timestamp(r.try_get::<Option<i64>, _>("cell_since")?.unwrap_or(0)),
            last_seen: Timestamp(r.try_get::<Option<i64>, _>("cell_last_seen")?.unwrap_or(0)),
        }),
        None => None,
    };
    Ok(DeviceRow {
        device: device_id(r, "device")?,
        purposes: Purposes::from_bits(r.try_get::<i64, _>("purposes")? as u8),
        last_activity: Timestamp(r.try_get("last_activity")?),
        dwell,
    })
}

/// One device as stored, read on `conn` (a reader's transaction, or the writer's inside the
/// committing transaction — after the device row's lock — where
/// [`WriteOp::DeliverChecked`](crate::store::WriteOp) runs its check on it).
pub(super) async fn stored_device(
    conn: &mut sqlx::PgConnection,
    device: &DeviceId,
) -> Result<Option<StoredDevice>, StoreError> {
    let id = &device.0[..];
    let Some(row) = sqlx::query(
        "SELECT device, purposes, last_activity, cell, cell_since, cell_last_seen, dwell_anchor
         FROM devices WHERE device = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let row = device_row_from_row(&row)?;
    let notifications = sqlx::query(
        "SELECT notification_id, device, offer_id, merchant_id, cell, sent_at, feedback
         FROM notifications WHERE device = $1 ORDER BY sent_at, notification_id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(notification_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let restrictions = sqlx::query(
        "SELECT device, merchant_id, muted, dismissals, backoff_until
         FROM restrictions WHERE device = $1",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(restriction_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let pair = |r: &sqlx::postgres::PgRow, col: &str| -> Result<(Timestamp, i64), StoreError> {
        Ok((Timestamp(r.try_get("bucket")?), r.try_get::<i64, _>(col)?))
    };
    let contributions = sqlx::query("SELECT bucket, cell FROM contributions WHERE device = $1")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| pair(r, "cell").map(|(b, c)| (b, c as u64)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let spend = sqlx::query("SELECT bucket, pairs FROM contribution_spend WHERE device = $1")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| pair(r, "pairs").map(|(b, p)| (b, p as u32)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(StoredDevice {
        row,
        notifications,
        restrictions,
        contributions,
        spend,
    }))
}

impl PgStore {
    pub(crate) async fn live_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        sqlx::query("SELECT seq, node_id, beats, seen FROM nodes ORDER BY seq")
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                Ok(NodeRow {
                    node_id: r.try_get("node_id")?,
                    seq: r.try_get("seq")?,
                    beats: r.try_get("beats")?,
                    seen: r.try_get("seen")?,
                })
            })
            .collect()
    }

    pub(crate) async fn stored_device(
        &self,
        device: DeviceId,
    ) -> Result<Option<StoredDevice>, StoreError> {
        let mut conn = self.readers.acquire().await?;
        // One read-only transaction at REPEATABLE READ: the device is one snapshot across
        // its tables.
        let mut tx = conn.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let stored = stored_device(&mut tx, &device).await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub(crate) async fn latest_consent(
        &self,
        device: DeviceId,
    ) -> Result<Option<ConsentReceipt>, StoreError> {
        let row = sqlx::query(
            "SELECT receipt_id, purposes, granted_at, policy_version, controller
             FROM consent_receipts WHERE device = $1 ORDER BY seq DESC LIMIT 1",
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
        // One snapshot for every table (READ COMMITTED would take one per statement).
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let Some(row) = sqlx::query(
            "SELECT created_at, last_activity, cell, cell_since, cell_last_seen
             FROM devices WHERE device = $1",
        )
        .bind(&device.0[..])
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let receipts = sqlx::query(
            "SELECT receipt_id, purposes, granted_at, policy_version, controller
             FROM consent_receipts WHERE device = $1 ORDER BY seq DESC",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| receipt_from_row(device, r))
        .collect::<Result<Vec<_>, _>>()?;
        let notifications = sqlx::query(
            "SELECT notification_id, device, offer_id, merchant_id, cell, sent_at, feedback
             FROM notifications WHERE device = $1 ORDER BY sent_at DESC",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(notification_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let restrictions = sqlx::query(
            "SELECT device, merchant_id, muted, dismissals, backoff_until
             FROM restrictions WHERE device = $1 ORDER BY merchant_id",
        )
        .bind(&device.0[..])
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(restriction_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let pending = sqlx::query(
            "SELECT COUNT(*) AS n, MAX(bucket) AS latest FROM contributions WHERE device = $1",
        )
        .bind(&device.0[..])
        .fetch_one(&mut *tx)
        .await?;
        let spend = sqlx::query(
            "SELECT COALESCE(SUM(pairs), 0)::BIGINT AS n, MAX(bucket) AS latest
             FROM contribution_spend WHERE device = $1",
        )
        .bind(&device.0[..])
        .fetch_one(&mut *tx)
        .await?;
        let daily = sqlx::query(
            "SELECT COUNT(*) AS n, MAX(day) AS latest FROM daily_contributions WHERE device = $1",
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
        .map(device_row_from_row)
        .collect()
    }

    pub(crate) async fn load_notifications(
        &self,
        since: Timestamp,
    ) -> Result<Vec<Notification>, StoreError> {
        sqlx::query(
            "SELECT notification_id, device, offer_id, merchant_id, cell, sent_at, feedback
             FROM notifications WHERE sent_at >= $1 ORDER BY sent_at",
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
            "SELECT offer_id, cell, sent_at FROM offer_deliveries WHERE sent_at >= $1
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
             FROM offers WHERE merchant_id = $1 ORDER BY updated_at DESC",
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
             WHERE merchant_id = $1",
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
            sqlx::query("SELECT cell FROM merchant_cells WHERE merchant_id = $1 ORDER BY cell")
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
                FROM contributions WHERE bucket = $1) AS ranked
             WHERE rank <= $2 GROUP BY cell",
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
        sqlx::query("SELECT device, bucket, pairs FROM contribution_spend WHERE bucket <= $1")
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
        sqlx::query("SELECT * FROM ledger WHERE bucket >= $1 AND bucket < $2 ORDER BY bucket")
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| ledger_entry_from_row(r, "bucket", None))
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
                 WHERE bucket >= $1 AND bucket < $2 ORDER BY bucket, cell",
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
                 WHERE cell = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket",
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
             WHERE sent_at >= $1 AND sent_at < $2 ORDER BY sent_at, notification_id",
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
             WHERE merchant_id = $1 AND day >= $2 AND day < $3 ORDER BY day, offer_id",
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
             WHERE day >= $1 AND day < $2 ORDER BY day",
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
