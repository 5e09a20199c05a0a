//! The writes: what each [`WriteOp`] does inside the writer's transaction, one function per
//! variant with the same name as in `sqlite/writes.rs` (same semantics, PostgreSQL SQL);
//! [`apply_one`] only dispatches.
//!
//! Across nodes: several writers commit at once (READ COMMITTED), so each conditional write
//! first takes the row locks that serialize it with the other nodes' — the device row
//! (`SELECT … FOR UPDATE`) for per-device bounds, the offer row for its daily budget, and a
//! transaction-scoped advisory lock on the cell for the flood guard — and only then runs its
//! conditional statement, which (a new statement under READ COMMITTED) sees every write
//! committed before the lock was granted. Releases rely on the ledger's key
//! (`ON CONFLICT DO NOTHING`: the second node waits for the first's commit, then yields 0).

use sqlx::Row;
use sqlx::postgres::PgConnection;

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
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
    receipt: &ConsentReceipt,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    let device = &receipt.device.0[..];
    sqlx::query(
        "INSERT INTO devices (device, created_at, last_activity, purposes) VALUES ($1, $2, $3, $4)
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
         VALUES ($1, $2, $3, $4, $5, $6)",
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
        "DELETE FROM consent_receipts WHERE device = $1 AND seq NOT IN
           (SELECT seq FROM consent_receipts WHERE device = $2 ORDER BY seq DESC LIMIT $3)",
    )
    .bind(device)
    .bind(device)
    .bind(RECEIPTS_KEPT)
    .execute(&mut *conn)
    .await?;
    Ok(WriteResult::Done)
}

async fn erase_device(
    conn: &mut PgConnection,
    device: &DeviceId,
) -> Result<WriteResult, sqlx::Error> {
    let mut erased = 0;
    for sql in [
        "DELETE FROM consent_receipts WHERE device = $1",
        "DELETE FROM contributions WHERE device = $1",
        "DELETE FROM contribution_spend WHERE device = $1",
        "DELETE FROM daily_contributions WHERE device = $1",
        "DELETE FROM notifications WHERE device = $1",
        "DELETE FROM restrictions WHERE device = $1",
        "DELETE FROM devices WHERE device = $1",
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
    conn: &mut PgConnection,
    device: &DeviceId,
    at: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query("UPDATE devices SET last_activity = GREATEST(last_activity, $1) WHERE device = $2")
        .bind(at.millis())
        .bind(&device.0[..])
        .execute(&mut *conn)
        .await?;
    Ok(WriteResult::Done)
}

async fn expire_idle(
    conn: &mut PgConnection,
    cutoff: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    // The idle devices' rows are locked first (in key order, like every batch's device locks)
    // and re-checked under the lock: a device another node marks active meanwhile is not
    // swept, and none is half swept (its children deleted, its row kept).
    let idle: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT device FROM devices WHERE last_activity < $1 ORDER BY device FOR UPDATE",
    )
    .bind(cutoff.millis())
    .fetch_all(&mut *conn)
    .await?;
    if idle.is_empty() {
        return Ok(WriteResult::Count(0));
    }
    for table in [
        "consent_receipts",
        "contributions",
        "contribution_spend",
        "daily_contributions",
        "notifications",
        "restrictions",
    ] {
        let sql = format!("DELETE FROM {table} WHERE device = ANY($1)");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&idle)
            .execute(&mut *conn)
            .await?;
    }
    let n = sqlx::query("DELETE FROM devices WHERE device = ANY($1)")
        .bind(&idle)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(WriteResult::Count(n))
}

async fn many(conn: &mut PgConnection, ops: &[WriteOp]) -> Result<WriteResult, sqlx::Error> {
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
    conn: &mut PgConnection,
    device: &DeviceId,
    cell: u64,
    bucket: Timestamp,
    max_cells: u32,
    max_per_day: u32,
) -> Result<WriteResult, sqlx::Error> {
    // The device row's lock serializes this with the device's other writes on every node, so
    // the spend read below is every node's and stays so until the commit.
    lock_device(conn, device).await?;
    lock_bucket(conn, bucket.millis(), false).await?;
    let id = &device.0[..];
    let known =
        sqlx::query("SELECT 1 FROM contributions WHERE bucket = $1 AND cell = $2 AND device = $3")
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
         WHERE device = $1 AND bucket > $2 AND bucket < $3",
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
        "INSERT INTO contributions (bucket, cell, device)
         SELECT $1, $2, $3 WHERE EXISTS
           (SELECT 1 FROM devices WHERE device = $3 AND (purposes & $4) != 0)
           AND NOT EXISTS (SELECT 1 FROM ledger WHERE bucket = $1)
         ON CONFLICT DO NOTHING",
    )
    .bind(bucket.millis())
    .bind(cell as i64)
    .bind(id)
    .bind(i64::from(Purpose::FootTraffic.bit()))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if added == 1 {
        sqlx::query(
            "INSERT INTO contribution_spend (device, bucket, pairs) VALUES ($1, $2, 1)
             ON CONFLICT (device, bucket) DO UPDATE SET pairs = contribution_spend.pairs + 1",
        )
        .bind(id)
        .bind(bucket.millis())
        .execute(&mut *conn)
        .await?;
    }
    Ok(WriteResult::Done)
}

/// The offers of one reply: recorded only if the device's caps, re-decided on its stored
/// state in this transaction (after the device row's lock, so no other node's delivery to
/// the device can commit in between), allow all of them (see [`WriteOp::DeliverChecked`]).
async fn deliver_checked(
    conn: &mut PgConnection,
    device: &DeviceId,
    check: &DeviceCheck,
    deliveries: &[(Notification, DeliveryLimits)],
) -> Result<WriteResult, sqlx::Error> {
    lock_device(conn, device).await?;
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
    conn: &mut PgConnection,
    entry: &LedgerEntry,
    counts: &[ReleasedCount],
) -> Result<WriteResult, sqlx::Error> {
    // Exclusive: no contribution to this bucket commits while it is released here (it
    // waits, then finds the ledger entry and is dropped), so none is left behind the
    // deletion of the bucket's raw contributions below.
    lock_bucket(conn, entry.bucket.millis(), true).await?;
    let inserted = sqlx::query(
        "INSERT INTO ledger (bucket, bucket_len_ms, released_at, mechanism, scale,
           rho, epsilon, l1_sensitivity, l2_sensitivity, threshold, cells)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
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
    sqlx::query("DELETE FROM contributions WHERE bucket = $1")
        .bind(entry.bucket.millis())
        .execute(&mut *conn)
        .await?;
    // Spend that can no longer share a 24-hour window with a new contribution.
    sqlx::query("DELETE FROM contribution_spend WHERE bucket <= $1")
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
    conn: &mut PgConnection,
    device: &DeviceId,
    dwell: &Dwell,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET cell = $1, cell_last_seen = $3, last_activity = $5,
           cell_since = CASE WHEN $2 = $3 OR (COALESCE(dwell_anchor, cell) = $4
             AND ABS(cell_since - $2) < 1000) THEN $2 ELSE $3 END,
           dwell_anchor = CASE WHEN $2 = $3 OR (COALESCE(dwell_anchor, cell) = $4
             AND ABS(cell_since - $2) < 1000) THEN $4 ELSE $1 END
         WHERE device = $6",
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
    conn: &mut PgConnection,
    device: &DeviceId,
    dwell: &Dwell,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET last_activity = GREATEST(last_activity, $1),
           cell_last_seen = CASE WHEN cell = $2 AND COALESCE(dwell_anchor, cell) = $3
             THEN GREATEST(COALESCE(cell_last_seen, 0), $4) ELSE cell_last_seen END
         WHERE device = $5",
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
    conn: &mut PgConnection,
    device: &DeviceId,
    notification_id: &uuid::Uuid,
    feedback: &Feedback,
    restriction: &Option<Restriction>,
    now: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "UPDATE notifications SET feedback = $1 WHERE notification_id = $2 AND device = $3",
    )
    .bind(feedback.as_str())
    .bind(notification_id.to_string())
    .bind(&device.0[..])
    .execute(&mut *conn)
    .await?;
    if let Some(r) = restriction {
        // Conditional on the device row: feedback decided just before a withdrawal
        // cannot leave a restriction behind the erasure. Merged, never lowered: a node whose
        // memory of the standing is stale (another node recorded more dismissals, a longer
        // back-off or a mute) cannot shorten what the store holds. (GREATEST ignores NULLs.)
        sqlx::query(
            "INSERT INTO restrictions (device, merchant_id, muted, dismissals, backoff_until)
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM devices WHERE device = $6)
             ON CONFLICT (device, merchant_id) DO UPDATE
               SET muted = GREATEST(restrictions.muted, excluded.muted),
               dismissals = GREATEST(restrictions.dismissals, excluded.dismissals),
               backoff_until = GREATEST(restrictions.backoff_until, excluded.backoff_until)",
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
    sqlx::query("UPDATE devices SET last_activity = $1 WHERE device = $2")
        .bind(now.millis())
        .bind(&device.0[..])
        .execute(&mut *conn)
        .await?;
    Ok(WriteResult::Done)
}

async fn release_offer_stats(
    conn: &mut PgConnection,
    entry: &OfferStatsLedgerEntry,
    rows: &[OfferStatRow],
) -> Result<WriteResult, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO offer_stats_ledger (day, released_at, mechanism, scale,
           rho, epsilon, l1_sensitivity, l2_sensitivity, offers)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
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
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
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
    conn: &mut PgConnection,
    node_id: &str,
    seen: i64,
) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "INSERT INTO nodes (node_id, beats, seen) VALUES ($1, 1, $2)
         ON CONFLICT (node_id) DO UPDATE SET beats = nodes.beats + 1, seen = excluded.seen",
    )
    .bind(node_id)
    .bind(seen)
    .execute(&mut *conn)
    .await?;
    Ok(WriteResult::Done)
}

async fn drop_node(
    conn: &mut PgConnection,
    node_id: &str,
    beats: i64,
) -> Result<WriteResult, sqlx::Error> {
    let n = sqlx::query("DELETE FROM nodes WHERE node_id = $1 AND beats = $2")
        .bind(node_id)
        .bind(beats)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(WriteResult::Count(n))
}

async fn put_merchant(conn: &mut PgConnection, m: &Merchant) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "INSERT INTO merchants (merchant_id, name, key_hash, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, NULL)",
    )
    .bind(m.merchant_id.to_string())
    .bind(&m.name)
    .bind(&m.key_hash[..])
    .bind(m.created_at.millis())
    .execute(&mut *conn)
    .await?;
    for cell in &m.cells {
        sqlx::query(
            "INSERT INTO merchant_cells (merchant_id, cell) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(m.merchant_id.to_string())
        .bind(*cell as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(WriteResult::Done)
}

async fn revoke_merchant(
    conn: &mut PgConnection,
    merchant_id: &MerchantId,
    at: &Timestamp,
) -> Result<WriteResult, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE merchants SET revoked_at = $1 WHERE merchant_id = $2 AND revoked_at IS NULL",
    )
    .bind(at.millis())
    .bind(merchant_id.to_string())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(WriteResult::Count(n))
}

async fn put_offer(conn: &mut PgConnection, o: &Offer) -> Result<WriteResult, sqlx::Error> {
    sqlx::query(
        "INSERT INTO offers (offer_id, merchant_id, title, body, cell, radius_k, valid_from,
           valid_until, max_per_day, opening_hours, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
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
    conn: &mut PgConnection,
    merchant_id: &MerchantId,
    offer_id: &OfferId,
) -> Result<WriteResult, sqlx::Error> {
    let n = sqlx::query("DELETE FROM offers WHERE offer_id = $1 AND merchant_id = $2")
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
    conn: &mut PgConnection,
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
    // Serialize with the other nodes' deliveries that share a limit: the device, the offer's
    // daily budget, the cell's flood guard (always in this order).
    lock_device(conn, &n.device).await?;
    sqlx::query("SELECT 1 FROM offers WHERE offer_id = $1 FOR UPDATE")
        .bind(n.offer_id.to_string())
        .execute(&mut *conn)
        .await?;
    // The merchant row shared: a revocation (an UPDATE of it) waits for this delivery's
    // commit, or this delivery waits for the revocation's and then sees it.
    sqlx::query("SELECT 1 FROM merchants WHERE merchant_id = $1 FOR SHARE")
        .bind(n.merchant_id.to_string())
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(n.cell as i64)
        .execute(&mut *conn)
        .await?;
    let recorded = sqlx::query(
        "INSERT INTO notifications
           (notification_id, device, offer_id, merchant_id, cell, sent_at, feedback)
         SELECT $1, $2, $3, $4, $5, $6, NULL
         WHERE EXISTS (SELECT 1 FROM devices WHERE device = $7 AND (purposes & $8) != 0)
           AND EXISTS (SELECT 1 FROM merchants WHERE merchant_id = $9 AND revoked_at IS NULL)
           AND EXISTS (SELECT 1 FROM offers WHERE offer_id = $10 AND merchant_id = $11)
           AND (SELECT COUNT(*) FROM offer_deliveries WHERE offer_id = $12 AND sent_at > $13) < $14
           AND (SELECT COUNT(*) FROM offer_deliveries
                WHERE cell = $15 AND sent_at >= $16 AND sent_at < $17) < $18",
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
    sqlx::query("INSERT INTO offer_deliveries (offer_id, cell, sent_at) VALUES ($1, $2, $3)")
        .bind(n.offer_id.to_string())
        .bind(n.cell as i64)
        .bind(n.sent_at.millis())
        .execute(&mut *conn)
        .await?;
    // Nothing older than the longest window counted (an offer's 24 hours) is kept.
    sqlx::query("DELETE FROM offer_deliveries WHERE sent_at <= $1")
        .bind(n.sent_at.millis() - 86_400_000)
        .execute(&mut *conn)
        .await?;
    // The last week is kept whole (the weekly cap is re-checked on it), older entries only
    // up to NOTIFICATIONS_KEPT.
    sqlx::query(
        "DELETE FROM notifications WHERE device = $1 AND sent_at <= $2 AND notification_id NOT IN
           (SELECT notification_id FROM notifications WHERE device = $1
            ORDER BY sent_at DESC LIMIT $3)",
    )
    .bind(device)
    .bind(n.sent_at.minus(crate::caps::WEEK).millis())
    .bind(NOTIFICATIONS_KEPT)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE devices SET last_activity = $1 WHERE device = $2")
        .bind(n.sent_at.millis())
        .bind(device)
        .execute(&mut *conn)
        .await?;
    Ok(WriteResult::Count(1))
}

/// Takes, at the start of a batch's transaction, the locks its ops will take, in one global
/// order (device rows by key, then offer rows by key, then merchant rows (shared) by key, then
/// cell advisory locks by cell, then
/// day advisory locks by day — exclusive for a `ReleaseDay`, shared for a `ContributeDay` —,
/// then hourly buckets' likewise for `Release` and `Contribute`): two
/// nodes' batches then never wait for each other in a cycle on them. The ops take the same
/// locks again (a no-op in the same transaction), so correctness never depends on this
/// (PostgreSQL-only: one SQLite writer has nothing to order against).
pub(super) async fn lock_batch(
    conn: &mut PgConnection,
    ops: &[&WriteOp],
) -> Result<(), sqlx::Error> {
    #[derive(Default)]
    struct Keys {
        devices: Vec<Vec<u8>>,
        offers: Vec<String>,
        merchants: Vec<String>,
        cells: Vec<i64>,
        /// (day, exclusive)
        days: Vec<(i64, bool)>,
        /// (hourly bucket, exclusive)
        buckets: Vec<(i64, bool)>,
    }
    fn collect(op: &WriteOp, k: &mut Keys) {
        match op {
            WriteOp::Notify(n)
            | WriteOp::Deliver {
                notification: n, ..
            } => {
                k.devices.push(n.device.0.to_vec());
                k.offers.push(n.offer_id.to_string());
                k.merchants.push(n.merchant_id.to_string());
                k.cells.push(n.cell as i64);
            }
            WriteOp::DeliverChecked {
                device, deliveries, ..
            } => {
                k.devices.push(device.0.to_vec());
                for (n, _) in deliveries {
                    k.offers.push(n.offer_id.to_string());
                    k.merchants.push(n.merchant_id.to_string());
                    k.cells.push(n.cell as i64);
                }
            }
            WriteOp::ContributeDay { device, day, .. } => {
                k.devices.push(device.0.to_vec());
                k.days.push((day.millis(), false));
            }
            WriteOp::ReleaseDay { entry, .. } => k.days.push((entry.bucket.millis(), true)),
            WriteOp::Release { entry, .. } => k.buckets.push((entry.bucket.millis(), true)),
            WriteOp::Contribute { device, bucket, .. } => {
                k.devices.push(device.0.to_vec());
                k.buckets.push((bucket.millis(), false));
            }
            WriteOp::Presence { device, .. }
            | WriteOp::Seen { device, .. }
            | WriteOp::Touch { device, .. }
            | WriteOp::Feedback { device, .. }
            | WriteOp::EraseDevice { device } => k.devices.push(device.0.to_vec()),
            WriteOp::PutConsent { receipt, .. } => k.devices.push(receipt.device.0.to_vec()),
            WriteOp::Many(ops) => {
                for op in ops {
                    collect(op, k);
                }
            }
            _ => {}
        }
    }
    let mut k = Keys::default();
    for op in ops {
        collect(op, &mut k);
    }
    let Keys {
        devices,
        offers,
        merchants,
        mut cells,
        mut days,
        mut buckets,
    } = k;
    if !devices.is_empty() {
        sqlx::query("SELECT 1 FROM devices WHERE device = ANY($1) ORDER BY device FOR UPDATE")
            .bind(devices)
            .execute(&mut *conn)
            .await?;
    }
    if !offers.is_empty() {
        sqlx::query("SELECT 1 FROM offers WHERE offer_id = ANY($1) ORDER BY offer_id FOR UPDATE")
            .bind(offers)
            .execute(&mut *conn)
            .await?;
    }
    if !merchants.is_empty() {
        sqlx::query(
            "SELECT 1 FROM merchants WHERE merchant_id = ANY($1) ORDER BY merchant_id FOR SHARE",
        )
        .bind(merchants)
        .execute(&mut *conn)
        .await?;
    }
    if !cells.is_empty() {
        cells.sort_unstable();
        cells.dedup();
        // One lock at a time in this order (a set-returning query would not promise it).
        for cell in cells {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(cell)
                .execute(&mut *conn)
                .await?;
        }
    }
    // Exclusive first for a day both released and contributed to (then it is held already).
    days.sort_unstable_by_key(|&(day, exclusive)| (day, !exclusive));
    days.dedup_by_key(|(day, _)| *day);
    for (day, exclusive) in days {
        lock_day(conn, day, exclusive).await?;
    }
    buckets.sort_unstable_by_key(|&(bucket, exclusive)| (bucket, !exclusive));
    buckets.dedup_by_key(|(bucket, _)| *bucket);
    for (bucket, exclusive) in buckets {
        lock_bucket(conn, bucket, exclusive).await?;
    }
    Ok(())
}

/// Takes the advisory lock of an hourly bucket until the transaction ends: shared by its
/// contributions, exclusive for its release (like [`lock_day`] for days). Its key is the
/// bucket start negated: day keys are day starts and cell keys H3 indexes, both positive.
pub(super) async fn lock_bucket(
    conn: &mut PgConnection,
    bucket: i64,
    exclusive: bool,
) -> Result<(), sqlx::Error> {
    lock_day(conn, -bucket, exclusive).await
}

/// Takes the advisory lock of a UTC day until the transaction ends: shared by the day's
/// contributions, exclusive for its release, so no contribution commits into a day another
/// node is releasing (it waits, then finds the ledger entry and is dropped, as on SQLite).
pub(super) async fn lock_day(
    conn: &mut PgConnection,
    day: i64,
    exclusive: bool,
) -> Result<(), sqlx::Error> {
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1)"
    };
    sqlx::query(sql).bind(day).execute(&mut *conn).await?;
    Ok(())
}

/// Locks the device's row until the transaction ends (nothing if it has none).
pub(super) async fn lock_device(
    conn: &mut PgConnection,
    device: &DeviceId,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM devices WHERE device = $1 FOR UPDATE")
        .bind(&device.0[..])
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts released counts with `insert` (`INSERT INTO <table> (<period>, cell, noisy,
/// suppressed) `), in multi-row statements: a 100k-cell release is a few hundred statements,
/// not 100k. Shared by the hourly and the daily release.
pub(super) async fn insert_counts(
    conn: &mut PgConnection,
    insert: &'static str,
    counts: &[ReleasedCount],
) -> Result<(), sqlx::Error> {
    for chunk in counts.chunks(500) {
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(insert);
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
