//! The writes: what each [`WriteOp`] does inside the writer's transaction, one function per
//! variant; [`apply_one`] only dispatches.

use sqlx::Row;
use sqlx::sqlite::SqliteConnection;

use super::daily;
use super::rows::encode_hours;
use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, Dwell, Feedback, LedgerEntry, Merchant, MerchantId, Notification, Offer,
    OfferId, OfferStatRow, OfferStatsLedgerEntry, Purpose, ReleasedCount, Restriction,
};
use crate::pseudonym::DeviceId;
use crate::store::{
    DeliveryLimits, DeviceCheck, NOTIFICATIONS_KEPT, RECEIPTS_KEPT, WriteOp, WriteResult,
};

pub(super) async fn apply_one(
    conn: &mut SqliteConnection,
    op: &WriteOp,
) -> Result<WriteResult, sqlx::Error> {
    match op {
        WriteOp::PutConsent { receipt, now } => put_consent(conn, receipt, now).await,
        WriteOp::EraseDevice { device } => erase_device(conn, device).await,
        WriteOp::Touch { device, at } => touch(conn, device, at).await,
        WriteOp::ExpireIdle { cutoff } => expire_idle(conn, cutoff).await,
        WriteOp::Many(ops) => many(conn, ops).await,
        WriteOp::Contribute {
            device,
            cell,
            bucket,
            max_cells,
            max_per_day,
        } => contribute(conn, device, *cell, *bucket, *max_cells, *max_per_day).await,
        WriteOp::Release { entry, counts } => release(conn, entry, counts).await,
        WriteOp::Presence { device, dwell, now } => presence(conn, device, dwell, now).await,
        WriteOp::Seen { device, dwell, now } => seen(conn, device, dwell, now).await,
        WriteOp::Notify(n) => notify(conn, n, None).await,
        WriteOp::Deliver {
            notification,
            limits,
        } => notify(conn, notification, Some(*limits)).await,
        WriteOp::DeliverChecked {
            device,
            check,
            deliveries,
        } => deliver_checked(conn, device, check, deliveries).await,
        WriteOp::Feedback {
            device,
            notification_id,
            feedback,
            restriction,
            now,
        } => record_feedback(conn, device, notification_id, feedback, restriction, now).await,
        WriteOp::ContributeDay { .. } | WriteOp::ReleaseDay { .. } => daily::apply(conn, op).await,
        WriteOp::ReleaseOfferStats { entry, rows } => release_offer_stats(conn, entry, rows).await,
        WriteOp::Heartbeat { node_id, seen } => heartbeat(conn, node_id, *seen).await,
        WriteOp::DropNode { node_id, beats } => drop_node(conn, node_id, *beats).await,
        WriteOp::PutMerchant(m) => put_merchant(conn, m).await,
        WriteOp::RevokeMerchant { merchant_id, at } => revoke_merchant(conn, merchant_id, at).await,
        WriteOp::PutOffer(o) => put_offer(conn, o).await,
        WriteOp::DeleteOffer {
            merchant_id,
            offer_id,
        } => delete_offer(conn, merchant_id, offer_id).await,
    }
}

async fn put_consent(
    conn: &mut SqliteConnection,
    receipt: &ConsentReceipt,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
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

async fn erase_device(
    conn: &mut SqliteConnection,
    device: &DeviceId,
) -> Result<WriteResult, sqlx::Error> {
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

async fn touch(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    at: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query("UPDATE devices SET last_activity = MAX(last_activity, ?) WHERE device = ?")
        .bind(at.millis())
        .bind(&device.0[..])
        .execute(&mut *conn)
        .await?;
    Ok(WriteResult::Done)
}

async fn expire_idle(
    conn: &mut SqliteConnection,
    cutoff: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
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

async fn many(conn: &mut SqliteConnection, ops: &[WriteOp]) -> Result<WriteResult, sqlx::Error> {
    // Yields the sum of its parts' counts (e.g. notifications recorded), if any count.
    let mut total = None;
    for op in ops {
        if let WriteResult::Count(n) = Box::pin(apply_one(&mut *conn, op)).await? {
            *total.get_or_insert(0) += n;
        }
    }
    Ok(total.map_or(WriteResult::Done, WriteResult::Count))
}

async fn contribute(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    cell: u64,
    bucket: Timestamp,
    max_cells: u32,
    max_per_day: u32,
) -> Result<WriteResult, sqlx::Error> {
    let id = &device.0[..];
    let known =
        sqlx::query("SELECT 1 FROM contributions WHERE bucket = ? AND cell = ? AND device = ?")
            .bind(bucket.millis())
            .bind(cell as i64)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    if known.is_some() {
        return Ok(WriteResult::Done);
    }
    // The bounds are decided on the device's stored spend (every node's pairs, released
    // buckets' too, within reach of a window holding `bucket`) by the same rule the
    // in-memory tracker applies, in this transaction: two nodes cannot jointly exceed them.
    let window = crate::privacy::contrib::WINDOW_MS;
    let mut held = crate::privacy::held::Held::default();
    for r in sqlx::query(
        "SELECT bucket, pairs FROM contribution_spend
         WHERE device = ? AND bucket > ? AND bucket < ?",
    )
    .bind(id)
    .bind(bucket.millis() - window)
    .bind(bucket.millis() + window)
    .fetch_all(&mut *conn)
    .await?
    {
        let pairs: i64 = r.try_get("pairs")?;
        // Spend that cannot be held exactly refuses the contribution (fewer, never more).
        if !held.push_released(
            r.try_get("bucket")?,
            u32::try_from(pairs).unwrap_or(u32::MAX),
        ) {
            return Ok(WriteResult::Done);
        }
    }
    let admission = crate::privacy::contrib::admit(&mut held, bucket, cell, max_cells, max_per_day);
    if admission != crate::privacy::contrib::Admission::New {
        return Ok(WriteResult::Done);
    }
    // Conditional on the device's consent in this very transaction: a contribution
    // decided just before a withdrawal cannot outlive the erasure; and on the bucket not
    // being released (a report racing another node's release is dropped).
    let added = sqlx::query(
        "INSERT OR IGNORE INTO contributions (bucket, cell, device)
         SELECT ?, ?, ? WHERE EXISTS
           (SELECT 1 FROM devices WHERE device = ? AND (purposes & ?) != 0)
           AND NOT EXISTS (SELECT 1 FROM ledger WHERE bucket = ?)",
    )
    .bind(bucket.millis())
    .bind(cell as i64)
    .bind(id)
    .bind(id)
    .bind(i64::from(Purpose::FootTraffic.bit()))
    .bind(bucket.millis())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if added == 1 {
        sqlx::query(
            "INSERT INTO contribution_spend (device, bucket, pairs) VALUES (?, ?, 1)
             ON CONFLICT (device, bucket) DO UPDATE SET pairs = pairs + 1",
        )
        .bind(id)
        .bind(bucket.millis())
        .execute(&mut *conn)
        .await?;
    }
    Ok(WriteResult::Done)
}

/// The offers of one reply: recorded only if the device's caps, re-decided on its stored
/// state in this transaction, allow all of them (see [`WriteOp::DeliverChecked`]).
async fn deliver_checked(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    check: &DeviceCheck,
    deliveries: &[(Notification, DeliveryLimits)],
) -> Result<WriteResult, sqlx::Error> {
    let stored = super::reads::stored_device(&mut *conn, device)
        .await
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    match stored {
        Some(stored) if (check.0)(&stored) => {}
        _ => return Ok(WriteResult::Count(0)),
    }
    let mut recorded = 0;
    for (n, limits) in deliveries {
        if let WriteResult::Count(k) = notify(conn, n, Some(*limits)).await? {
            recorded += k;
        }
    }
    Ok(WriteResult::Count(recorded))
}

async fn release(
    conn: &mut SqliteConnection,
    entry: &LedgerEntry,
    counts: &[ReleasedCount],
) -> Result<WriteResult, sqlx::Error> {
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

/// Stores the device's dwell. A dwell that continues an earlier one (it did not start with
/// this report) keeps its start only if the stored row is the dwell it continues (same
/// anchor, same start to the second — memory keeps whole seconds): another node may have
/// stored a move since, and a node's stale memory must not resurrect an old dwell over it.
/// Otherwise the dwell is stored as starting at this report (fewer offers, never more); the
/// reply's caps are re-checked on the stored row, and a refused node reloads it.
async fn presence(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    dwell: &Dwell,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET cell = ?1, cell_last_seen = ?3, last_activity = ?5,
           cell_since = CASE WHEN ?2 = ?3 OR (COALESCE(dwell_anchor, cell) = ?4
             AND ABS(cell_since - ?2) < 1000) THEN ?2 ELSE ?3 END,
           dwell_anchor = CASE WHEN ?2 = ?3 OR (COALESCE(dwell_anchor, cell) = ?4
             AND ABS(cell_since - ?2) < 1000) THEN ?4 ELSE ?1 END
         WHERE device = ?6",
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

async fn seen(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    dwell: &Dwell,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET last_activity = MAX(last_activity, ?),
           cell_last_seen = CASE WHEN cell = ? AND COALESCE(dwell_anchor, cell) = ?
             THEN MAX(COALESCE(cell_last_seen, 0), ?) ELSE cell_last_seen END
         WHERE device = ?",
    )
    .bind(now.millis())
    .bind(dwell.cell as i64)
    .bind(dwell.anchor as i64)
    .bind(dwell.last_seen.millis())
    .bind(&device.0[..])
    .execute(&mut *conn)
    .await?;
    Ok(WriteResult::Done)
}

async fn record_feedback(
    conn: &mut SqliteConnection,
    device: &DeviceId,
    notification_id: &uuid::Uuid,
    feedback: &Feedback,
    restriction: &Option<Restriction>,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query("UPDATE notifications SET feedback = ? WHERE notification_id = ? AND device = ?")
        .bind(feedback.as_str())
        .bind(notification_id.to_string())
        .bind(&device.0[..])
        .execute(&mut *conn)
        .await?;
    if let Some(r) = restriction {
        // Conditional on the device row: feedback decided just before a withdrawal
        // cannot leave a restriction behind the erasure. Merged, never lowered: a node whose
        // memory of the standing is stale (another node recorded more dismissals, a longer
        // back-off or a mute) cannot shorten what the store holds.
        sqlx::query(
            "INSERT INTO restrictions (device, merchant_id, muted, dismissals, backoff_until)
             SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM devices WHERE device = ?)
             ON CONFLICT (device, merchant_id) DO UPDATE
               SET muted = MAX(restrictions.muted, excluded.muted),
               dismissals = MAX(restrictions.dismissals, excluded.dismissals),
               backoff_until = CASE
                 WHEN restrictions.backoff_until IS NULL THEN excluded.backoff_until
                 WHEN excluded.backoff_until IS NULL THEN restrictions.backoff_until
                 ELSE MAX(restrictions.backoff_until, excluded.backoff_until) END",
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

async fn release_offer_stats(
    conn: &mut SqliteConnection,
    entry: &OfferStatsLedgerEntry,
    rows: &[OfferStatRow],
) -> Result<WriteResult, sqlx::Error> {
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

async fn heartbeat(
    conn: &mut SqliteConnection,
    node_id: &str,
    seen: i64,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "INSERT INTO nodes (node_id, beats, seen) VALUES (?, 1, ?)
         ON CONFLICT (node_id) DO UPDATE SET beats = nodes.beats + 1, seen = excluded.seen",
    )
    .bind(node_id)
    .bind(seen)
    .execute(&mut *conn)
    .await?;
    Ok(WriteResult::Done)
}

async fn drop_node(
    conn: &mut SqliteConnection,
    node_id: &str,
    beats: i64,
) -> Result<WriteResult, sqlx::Error> {
    let n = sqlx::query("DELETE FROM nodes WHERE node_id = ? AND beats = ?")
        .bind(node_id)
        .bind(beats)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(WriteResult::Count(n))
}

async fn put_merchant(
    conn: &mut SqliteConnection,
    m: &Merchant,
) -> Result<WriteResult, sqlx::Error> {
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
        sqlx::query("INSERT OR IGNORE INTO merchant_cells (merchant_id, cell) VALUES (?, ?)")
            .bind(m.merchant_id.to_string())
            .bind(*cell as i64)
            .execute(&mut *conn)
            .await?;
    }
    Ok(WriteResult::Done)
}

async fn revoke_merchant(
    conn: &mut SqliteConnection,
    merchant_id: &MerchantId,
    at: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
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

async fn put_offer(conn: &mut SqliteConnection, o: &Offer) -> Result<WriteResult, sqlx::Error> {
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

async fn delete_offer(
    conn: &mut SqliteConnection,
    merchant_id: &MerchantId,
    offer_id: &OfferId,
) -> Result<WriteResult, sqlx::Error> {
    let n = sqlx::query("DELETE FROM offers WHERE offer_id = ? AND merchant_id = ?")
        .bind(offer_id.to_string())
        .bind(merchant_id.to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(WriteResult::Count(n))
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
    // The last week is kept whole (the weekly cap is re-checked on it), older entries only
    // up to NOTIFICATIONS_KEPT.
    sqlx::query(
        "DELETE FROM notifications WHERE device = ? AND sent_at <= ? AND notification_id NOT IN
           (SELECT notification_id FROM notifications WHERE device = ?
            ORDER BY sent_at DESC LIMIT ?)",
    )
    .bind(device)
    .bind(n.sent_at.minus(crate::caps::WEEK).millis())
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

/// Inserts released counts with `insert` (`INSERT INTO <table> (<period>, cell, noisy,
/// suppressed) `), in multi-row statements: a 100k-cell release is a few hundred statements,
/// not 100k. Shared by the hourly and the daily release.
pub(super) async fn insert_counts(
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
