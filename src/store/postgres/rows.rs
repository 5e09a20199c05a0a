//! Row decoding: one function per model type read back from PostgreSQL (the twin of
//! `sqlite/rows.rs`), rejecting malformed columns as [`StoreError::Corrupt`].

use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, Feedback, LedgerEntry, Merchant, Notification, Offer, OpeningHours, Purposes,
    Restriction,
};
use crate::pseudonym::DeviceId;
use crate::store::StoreError;

pub(super) fn device_id(r: &PgRow, col: &str) -> Result<DeviceId, StoreError> {
    let bytes: Vec<u8> = r.try_get(col)?;
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{col} is not 16 bytes")))?;
    Ok(DeviceId(arr))
}

pub(super) fn uuid_col(r: &PgRow, col: &str) -> Result<uuid::Uuid, StoreError> {
    let s: String = r.try_get(col)?;
    uuid::Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt(format!("{col} is not a UUID")))
}

pub(super) fn opt_ts(r: &PgRow, col: &str) -> Result<Option<Timestamp>, StoreError> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

pub(super) fn notification_from_row(r: &PgRow) -> Result<Notification, StoreError> {
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

pub(super) fn restriction_from_row(r: &PgRow) -> Result<Restriction, StoreError> {
    Ok(Restriction {
        device: device_id(r, "device")?,
        merchant_id: uuid_col(r, "merchant_id")?,
        muted: r.try_get::<i64, _>("muted")? != 0,
        dismissals: r.try_get::<i64, _>("dismissals")? as u32,
        backoff_until: opt_ts(r, "backoff_until")?,
    })
}

/// Opening hours as stored: "weekday,open,close;...".
pub(super) fn encode_hours(hours: &[OpeningHours]) -> String {
    hours
        .iter()
        .map(|h| format!("{},{},{}", h.weekday, h.open, h.close))
        .collect::<Vec<_>>()
        .join(";")
}

pub(super) fn decode_hours(s: &str) -> Result<Vec<OpeningHours>, StoreError> {
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

pub(super) fn offer_from_row(r: &PgRow) -> Result<Offer, StoreError> {
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

pub(super) fn merchant_from_row(r: &PgRow, cells: Vec<u64>) -> Result<Merchant, StoreError> {
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

pub(super) fn receipt_from_row(device: DeviceId, r: &PgRow) -> Result<ConsentReceipt, StoreError> {
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

/// A row of `ledger` (keyed by `bucket`, with its `bucket_len_ms`) or of `daily_ledger`
/// (keyed by `day`, every entry one day long: `len_ms`).
pub(super) fn ledger_entry_from_row(
    r: &PgRow,
    key: &str,
    len_ms: Option<i64>,
) -> Result<LedgerEntry, StoreError> {
    Ok(LedgerEntry {
        bucket: Timestamp(r.try_get(key)?),
        bucket_len_ms: match len_ms {
            Some(len) => len,
            None => r.try_get("bucket_len_ms")?,
        },
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
}
