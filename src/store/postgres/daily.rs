//! The daily release's SQL (the twin of `sqlite/daily.rs`): daily contributions (bounded per device and UTC day in the
//! inserting transaction), the release of one day in one transaction, and its reads.

use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::PgStore;
use super::rows::{device_id, ledger_entry_from_row, opt_ts};
use super::writes::{lock_day, lock_device};
use crate::clock::Timestamp;
use crate::model::{LedgerEntry, Purpose, ReleasedCount};
use crate::pseudonym::DeviceId;
use crate::store::{StoreError, WriteOp, WriteResult};

/// Applies [`WriteOp::ContributeDay`] and [`WriteOp::ReleaseDay`].
pub(super) async fn apply(
    conn: &mut PgConnection,
    op: &WriteOp,
) -> Result<WriteResult, sqlx::Error> {
    match op {
        WriteOp::ContributeDay {
            device,
            cell,
            day,
            max_cells,
        } => {
            // The bound is checked against the stored rows in this very transaction (and the
            // device row is locked), so it holds whatever memory says: after a restart, on
            // another node, after an hourly release. Conditional on consent, like `Contribute`,
            // and on the day not being released yet (a report racing the release is dropped).
            // It yields `Done`, never a count: a request's `Many` counts the notifications it
            // recorded, and a contribution must never stand in for a refused one.
            // The device row's lock serializes this bound with the same device's writes on
            // every node (without it, two nodes' transactions could each see room for one);
            // the day's shared lock keeps it out of a release of the day in progress.
            lock_device(conn, device).await?;
            lock_day(conn, day.millis(), false).await?;
            sqlx::query(
                "INSERT INTO daily_contributions (day, cell, device)
                 SELECT $1, $2, $3 WHERE EXISTS
                   (SELECT 1 FROM devices WHERE device = $4 AND (purposes & $5) != 0)
                 AND (SELECT COUNT(*) FROM daily_contributions WHERE device = $6 AND day = $7) < $8
                 AND NOT EXISTS (SELECT 1 FROM daily_ledger WHERE day = $9)
                 ON CONFLICT DO NOTHING",
            )
            .bind(day.millis())
            .bind(*cell as i64)
            .bind(&device.0[..])
            .bind(&device.0[..])
            .bind(i64::from(Purpose::FootTraffic.bit()))
            .bind(&device.0[..])
            .bind(day.millis())
            .bind(i64::from(*max_cells))
            .bind(day.millis())
            .execute(&mut *conn)
            .await?;
            Ok(WriteResult::Done)
        }
        WriteOp::ReleaseDay { entry, counts } => {
            lock_day(conn, entry.bucket.millis(), true).await?;
            let inserted = sqlx::query(
                "INSERT INTO daily_ledger (day, released_at, mechanism, scale, rho,
                   epsilon, l1_sensitivity, l2_sensitivity, threshold, cells)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            )
            .bind(entry.bucket.millis())
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
            super::writes::insert_counts(
                conn,
                "INSERT INTO daily_releases (day, cell, noisy, suppressed) ",
                counts,
            )
            .await?;
            sqlx::query("DELETE FROM daily_contributions WHERE day <= $1")
                .bind(entry.bucket.millis())
                .execute(&mut *conn)
                .await?;
            Ok(WriteResult::Count(1))
        }
        _ => unreachable!("daily::apply is called for daily ops only"),
    }
}

impl PgStore {
    pub(crate) async fn day_counts(&self, day: Timestamp) -> Result<Vec<(u64, u64)>, StoreError> {
        sqlx::query(
            "SELECT cell, COUNT(*) AS n FROM daily_contributions WHERE day = $1 GROUP BY cell",
        )
        .bind(day.millis())
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

    pub(crate) async fn load_daily_contributions(
        &self,
    ) -> Result<Vec<(DeviceId, u64, Timestamp)>, StoreError> {
        sqlx::query("SELECT device, cell, day FROM daily_contributions")
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    device_id(r, "device")?,
                    r.try_get::<i64, _>("cell")? as u64,
                    Timestamp(r.try_get("day")?),
                ))
            })
            .collect()
    }

    pub(crate) async fn last_daily_release(&self) -> Result<Option<Timestamp>, StoreError> {
        let row = sqlx::query("SELECT MAX(day) AS d FROM daily_ledger")
            .fetch_one(&self.readers)
            .await?;
        opt_ts(&row, "d")
    }

    pub(crate) async fn daily_ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        sqlx::query("SELECT * FROM daily_ledger WHERE day >= $1 AND day < $2 ORDER BY day")
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(|r| ledger_entry_from_row(r, "day", Some(crate::privacy::daily::DAY_MS)))
            .collect()
    }

    pub(crate) async fn released_days(
        &self,
        cells: &[u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<ReleasedCount>, StoreError> {
        let wanted: std::collections::HashSet<u64> = cells.iter().copied().collect();
        let rows = if cells.len() > 32 {
            // Many cells: one scan of the time range, filtered here.
            sqlx::query(
                "SELECT day, cell, noisy, suppressed FROM daily_releases
                 WHERE day >= $1 AND day < $2 ORDER BY day, cell",
            )
            .bind(start.millis())
            .bind(end.millis())
            .fetch_all(&self.readers)
            .await?
        } else {
            // A few cells: one indexed range scan per cell.
            let mut rows = Vec::new();
            for cell in cells {
                rows.extend(
                    sqlx::query(
                        "SELECT day, cell, noisy, suppressed FROM daily_releases
                         WHERE cell = $1 AND day >= $2 AND day < $3 ORDER BY day",
                    )
                    .bind(*cell as i64)
                    .bind(start.millis())
                    .bind(end.millis())
                    .fetch_all(&self.readers)
                    .await?,
                );
            }
            rows
        };
        let mut out = Vec::new();
        for r in rows {
            let cell = r.try_get::<i64, _>("cell")? as u64;
            if wanted.contains(&cell) {
                out.push(ReleasedCount {
                    bucket: Timestamp(r.try_get("day")?),
                    cell,
                    noisy: r.try_get("noisy")?,
                    suppressed: r.try_get::<i64, _>("suppressed")? != 0,
                });
            }
        }
        Ok(out)
    }
}
