//! The in-memory device table: what the hot path needs about every consenting device, kept
//! in sync with the store so that no decision runs SQL.
//!
//! Architecture invariant: every change made here on behalf of a request is also sent to the
//! store in the same request (group commit) before the request is acknowledged; the table is
//! rebuilt from the store at start. Only consenting devices have an entry — a report from an
//! unknown token creates nothing, in memory or on disk.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

use crate::caps::{Sent, Standing};
use crate::clock::Timestamp;
use crate::model::{DeviceRow, Dwell, MerchantId, Notification, Purposes, Restriction};
use crate::pseudonym::DeviceId;

const SHARDS: usize = 64;
/// Notifications kept in memory per device beyond the 7-day window (for fatigue).
pub const LOG_TAIL: usize = 16;

/// A device's hot state (about 80 bytes, plus a boxed log once it has been notified).
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub purposes: Purposes,
    pub last_activity: Timestamp,
    /// GCRA theoretical arrival time, ms.
    pub gcra_tat: i64,
    pub dwell: Option<Dwell>,
    pub log: Option<Box<DeviceLog>>,
    /// Unreleased foot-traffic contributions (bucket, cell), for contribution bounding.
    /// Boxed so a device without any costs 8 bytes, not 24: RAM per device is a target.
    #[allow(clippy::box_collection)]
    pub contrib: Option<Box<Vec<(Timestamp, u64)>>>,
}

/// Notifications (oldest first) and standings, only for devices that were ever notified.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    pub sent: Vec<SentEntry>,
    pub standings: Vec<(MerchantId, Standing)>,
}

/// One notification in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentEntry {
    pub notification_id: uuid::Uuid,
    pub cell: u64,
    pub sent: Sent,
}

impl DeviceState {
    /// The notification log as the caps see it, oldest first.
    pub fn sent(&self) -> Vec<Sent> {
        self.log
            .as_ref()
            .map(|l| l.sent.iter().map(|e| e.sent).collect())
            .unwrap_or_default()
    }

    /// The device's standing towards `merchant`.
    pub fn standing(&self, merchant: MerchantId) -> Standing {
        self.log
            .as_ref()
            .and_then(|l| l.standings.iter().find(|(m, _)| *m == merchant))
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// Sets the standing towards `merchant`.
    pub fn set_standing(&mut self, merchant: MerchantId, standing: Standing) {
        let log = self.log.get_or_insert_with(Default::default);
        match log.standings.iter_mut().find(|(m, _)| *m == merchant) {
            Some((_, s)) => *s = standing,
            None => log.standings.push((merchant, standing)),
        }
    }

    /// Appends a notification, dropping entries that no cap can see any more.
    pub fn push_sent(&mut self, entry: SentEntry, now: Timestamp) {
        let log = self.log.get_or_insert_with(Default::default);
        log.sent.push(entry);
        let week_ago = now.minus(crate::caps::WEEK);
        let old = log
            .sent
            .iter()
            .take_while(|e| e.sent.sent_at <= week_ago)
            .count();
        let removable = old.min(log.sent.len().saturating_sub(LOG_TAIL));
        log.sent.drain(..removable);
    }
}

/// Hashes a [`DeviceId`] by its first 8 bytes: ids are keyed-HMAC outputs, uniformly
/// distributed and unpredictable without the key, so no further mixing is needed.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

type Shard = HashMap<DeviceId, DeviceState, BuildHasherDefault<IdHasher>>;

/// The sharded table.
#[derive(Debug)]
pub struct Devices {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

impl Devices {
    /// The shard holding `id`, locked. Hold it for the whole decision about that device so
    /// two concurrent reports cannot both pass a cap.
    pub fn lock(&self, id: &DeviceId) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[usize::from(id.0[15]) % SHARDS];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a consent change (an empty set removes the device).
    pub fn set_purposes(&self, id: DeviceId, purposes: Purposes, now: Timestamp) {
        let mut shard = self.lock(&id);
        if purposes.is_empty() {
            shard.remove(&id);
            return;
        }
        let state = shard.entry(id).or_default();
        state.purposes = purposes;
        state.last_activity = now;
    }

    /// Forgets a device entirely.
    pub fn remove(&self, id: &DeviceId) {
        self.lock(id).remove(id);
    }

    /// Removes devices idle since before `cutoff`; returns how many.
    pub fn expire_idle(&self, cutoff: Timestamp) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|_, s| s.last_activity >= cutoff);
            n += before - shard.len();
        }
        n
    }

    /// Number of devices held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no device is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Restores contribution bounds from the unreleased contributions in the store.
    pub fn load_contributions(&self, rows: Vec<(DeviceId, u64, Timestamp)>) {
        for (device, cell, bucket) in rows {
            if let Some(state) = self.lock(&device).get_mut(&device) {
                state
                    .contrib
                    .get_or_insert_with(Default::default)
                    .push((bucket, cell));
            }
        }
    }

    /// Rebuilds the table from stored rows, notifications (oldest first) and restrictions.
    pub fn load(
        &self,
        rows: Vec<DeviceRow>,
        notifications: Vec<Notification>,
        restrictions: Vec<Restriction>,
    ) {
        for row in rows {
            if row.purposes.is_empty() {
                continue;
            }
            self.lock(&row.device).insert(
                row.device,
                DeviceState {
                    purposes: row.purposes,
                    last_activity: row.last_activity,
                    gcra_tat: 0,
                    dwell: row.dwell,
                    log: None,
                    contrib: None,
                },
            );
        }
        for n in notifications {
            if let Some(state) = self.lock(&n.device).get_mut(&n.device) {
                let log = state.log.get_or_insert_with(Default::default);
                log.sent.push(SentEntry {
                    notification_id: n.notification_id,
                    cell: n.cell,
                    sent: Sent {
                        offer_id: n.offer_id,
                        merchant_id: n.merchant_id,
                        sent_at: n.sent_at,
                        feedback: n.feedback,
                    },
                });
            }
        }
        for r in restrictions {
            if let Some(state) = self.lock(&r.device).get_mut(&r.device) {
                state.set_standing(
                    r.merchant_id,
                    Standing {
                        muted: r.muted,
                        dismissals: r.dismissals,
                        backoff_until: r.backoff_until,
                    },
                );
            }
        }
    }
}
