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
/// Compact times count from 2020-01-01T00:00:00Z.
const EPOCH_MS: i64 = 1_577_836_800_000;

/// A device's hot state: 48 bytes (64 with its key), so a million active devices fit in
/// well under 150 MB whatever the hash table's fill. Times are kept compactly (seconds, or
/// tenths for the rate limiter); the cap-relevant ones are rounded in the direction that
/// sends less: dwell starts up, last sightings down.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub purposes: Purposes,
    /// Seconds since 2020, rounded down.
    last_activity_s: u32,
    /// GCRA theoretical arrival time, tenths of a second since 2020, rounded down.
    gcra_ds: u32,
    /// When the device row (dwell, last activity) was last queued for the store, seconds
    /// since 2020: reports in between that change no durable fact are not written.
    persisted_s: u32,
    dwell: CompactDwell,
    /// Everything only some devices have: notifications, standings, contributions.
    pub extra: Option<Box<Extra>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct CompactDwell {
    /// 0: no dwell yet (0 is not a valid H3 index).
    anchor: u64,
    cell: u64,
    since_s: u32,
    last_seen_s: u32,
}

/// The parts of a device's state that only notified or counted devices have.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Notifications as the caps see them, oldest first.
    pub sent: Vec<Sent>,
    /// Per notification (same order): its id and the cell it was sent in.
    pub meta: Vec<(uuid::Uuid, u64)>,
    pub standings: Vec<(MerchantId, Standing)>,
    /// Foot-traffic contributions (bucket, cell) for contribution bounding: unreleased ones,
    /// and released ones of the last day with their cell forgotten.
    pub contrib: Vec<(Timestamp, u64)>,
}

fn to_secs(t: Timestamp, round_up: bool) -> u32 {
    let ms = (t.millis() - EPOCH_MS).max(0);
    let s = if round_up {
        (ms + 999) / 1000
    } else {
        ms / 1000
    };
    u32::try_from(s).unwrap_or(u32::MAX)
}

fn from_secs(s: u32) -> Timestamp {
    Timestamp(EPOCH_MS + i64::from(s) * 1000)
}

impl DeviceState {
    /// When the device was last active.
    pub fn last_activity(&self) -> Timestamp {
        from_secs(self.last_activity_s)
    }

    pub fn set_last_activity(&mut self, t: Timestamp) {
        self.last_activity_s = to_secs(t, false);
    }

    /// Whether the device row was last written at least `every` before `now`.
    pub fn persist_due(&self, now: Timestamp, every: std::time::Duration) -> bool {
        let age = i64::from(to_secs(now, false)) - i64::from(self.persisted_s);
        age >= every.as_secs() as i64
    }

    /// Notes that the device row, as it is now, has been queued for the store.
    pub fn mark_persisted(&mut self, now: Timestamp) {
        self.persisted_s = to_secs(now, false);
    }

    /// The device's dwell, if it has reported.
    pub fn dwell(&self) -> Option<Dwell> {
        let d = self.dwell;
        (d.anchor != 0).then(|| Dwell {
            anchor: d.anchor,
            cell: d.cell,
            since: from_secs(d.since_s),
            last_seen: from_secs(d.last_seen_s),
        })
    }

    pub fn set_dwell(&mut self, d: Dwell) {
        self.dwell = CompactDwell {
            anchor: d.anchor,
            cell: d.cell,
            since_s: to_secs(d.since, true),
            last_seen_s: to_secs(d.last_seen, false),
        };
    }

    /// The per-device GCRA rate limit; a refusal changes nothing.
    pub fn rate_limit(
        &mut self,
        now: Timestamp,
        per_hour: u32,
        burst: u32,
    ) -> Result<(), std::time::Duration> {
        let mut tat = EPOCH_MS + i64::from(self.gcra_ds) * 100;
        crate::caps::gcra(&mut tat, now, per_hour, burst)?;
        // Rounded down: rounding up would add up over a burst and refuse its last request.
        // The limiter may so be lenient by under 0.1 s per request — never a privacy rule.
        let ds = (tat - EPOCH_MS).max(0) / 100;
        self.gcra_ds = u32::try_from(ds).unwrap_or(u32::MAX);
        Ok(())
    }

    /// The notification log as the caps see it, oldest first.
    pub fn sent(&self) -> &[Sent] {
        self.extra
            .as_ref()
            .map(|e| e.sent.as_slice())
            .unwrap_or(&[])
    }

    /// The device's standing towards `merchant`.
    pub fn standing(&self, merchant: MerchantId) -> Standing {
        self.extra
            .as_ref()
            .and_then(|l| l.standings.iter().find(|(m, _)| *m == merchant))
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// Sets the standing towards `merchant`.
    pub fn set_standing(&mut self, merchant: MerchantId, standing: Standing) {
        let extra = self.extra.get_or_insert_with(Default::default);
        match extra.standings.iter_mut().find(|(m, _)| *m == merchant) {
            Some((_, s)) => *s = standing,
            None => extra.standings.push((merchant, standing)),
        }
    }

    /// Appends a notification, dropping entries that no cap can see any more.
    pub fn push_sent(
        &mut self,
        notification_id: uuid::Uuid,
        cell: u64,
        sent: Sent,
        now: Timestamp,
    ) {
        let extra = self.extra.get_or_insert_with(Default::default);
        extra.sent.push(sent);
        extra.meta.push((notification_id, cell));
        let week_ago = now.minus(crate::caps::WEEK);
        let old = extra
            .sent
            .iter()
            .take_while(|e| e.sent_at <= week_ago)
            .count();
        let removable = old.min(extra.sent.len().saturating_sub(LOG_TAIL));
        extra.sent.drain(..removable);
        extra.meta.drain(..removable);
    }

    /// Mutable access to the contributions held for bounding.
    pub fn contributions(&mut self) -> &mut Vec<(Timestamp, u64)> {
        &mut self.extra.get_or_insert_with(Default::default).contrib
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
        state.set_last_activity(now);
        // The consent write stores this activity with the receipt.
        state.mark_persisted(now);
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
            shard.retain(|_, s| s.last_activity() >= cutoff);
            n += before - shard.len();
        }
        n
    }

    /// Devices seen at or after `cutoff` whose row was last written before it (their last
    /// activity is written lazily), with their last activity; each is marked as written, for
    /// the caller writes them before the store's retention sweep.
    pub fn active_but_stale(&self, cutoff: Timestamp) -> Vec<(DeviceId, Timestamp)> {
        let mut out = Vec::new();
        let cutoff_s = to_secs(cutoff, false);
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (id, s) in shard.iter_mut() {
                if s.last_activity_s >= cutoff_s && s.persisted_s <= cutoff_s {
                    out.push((*id, s.last_activity()));
                    s.persisted_s = s.last_activity_s;
                }
            }
        }
        out
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

    /// Restores contribution bounds from the unreleased contributions in the store and the
    /// spend of released buckets (pairs without their cells) that still counts towards the
    /// rolling per-day bound.
    pub fn load_contributions(
        &self,
        rows: Vec<(DeviceId, u64, Timestamp)>,
        released_spend: Vec<(DeviceId, Timestamp, u32)>,
    ) {
        for (device, cell, bucket) in rows {
            if let Some(state) = self.lock(&device).get_mut(&device) {
                state.contributions().push((bucket, cell));
            }
        }
        for (device, bucket, pairs) in released_spend {
            if let Some(state) = self.lock(&device).get_mut(&device) {
                let held = state.contributions();
                held.extend((0..pairs).map(|_| (bucket, crate::privacy::contrib::FORGOTTEN)));
            }
        }
    }

    /// Takes the store's view of one consenting device (the store is the truth across nodes;
    /// this table is a cache): consent, dwell, notifications and standings. A device not held
    /// is inserted (with its contributions for bounding); one held is replaced only if
    /// `replace` (its rate limiter and contributions stay: the store re-checks the bounds).
    pub fn load_stored(&self, stored: &crate::store::StoredDevice, replace: bool) {
        let id = stored.row.device;
        let mut shard = self.lock(&id);
        if stored.row.purposes.is_empty() {
            shard.remove(&id);
            return;
        }
        let absent = !shard.contains_key(&id);
        if !absent && !replace {
            return;
        }
        let state = shard.entry(id).or_default();
        state.purposes = stored.row.purposes;
        if absent {
            state.set_last_activity(stored.row.last_activity);
            state.mark_persisted(stored.row.last_activity);
        }
        match stored.row.dwell {
            Some(d) => state.set_dwell(d),
            None => state.dwell = CompactDwell::default(),
        }
        let extra = state.extra.get_or_insert_with(Default::default);
        extra.sent = stored.notifications.iter().map(Sent::from).collect();
        extra.meta = stored
            .notifications
            .iter()
            .map(|n| (n.notification_id, n.cell))
            .collect();
        extra.standings = stored
            .restrictions
            .iter()
            .map(|r| (r.merchant_id, Standing::from(r)))
            .collect();
        if absent {
            // Unreleased pairs with their cells; the rest of each bucket's spend (released
            // pairs) without.
            for (bucket, pairs) in &stored.spend {
                let cells: Vec<u64> = stored
                    .contributions
                    .iter()
                    .filter(|(b, _)| b == bucket)
                    .map(|(_, c)| *c)
                    .collect();
                let forgotten = (*pairs as usize).saturating_sub(cells.len());
                extra
                    .contrib
                    .extend(cells.into_iter().map(|c| (*bucket, c)));
                extra
                    .contrib
                    .extend((0..forgotten).map(|_| (*bucket, crate::privacy::contrib::FORGOTTEN)));
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
            let mut state = DeviceState {
                purposes: row.purposes,
                ..DeviceState::default()
            };
            state.set_last_activity(row.last_activity);
            state.mark_persisted(row.last_activity);
            // The stored dwell is not restored: the device's first report after a restart
            // starts a new one. The row cannot prove the dwell was continuous up to the crash
            // (its last sighting is written lazily, and a move whose write failed left an
            // older dwell on disk than memory had) — so recovered state errs toward fewer
            // offers, never more. (The row still shows the current cell to GetMyData.)
            let _ = row.dwell;
            self.lock(&row.device).insert(row.device, state);
        }
        for n in notifications {
            if let Some(state) = self.lock(&n.device).get_mut(&n.device) {
                let extra = state.extra.get_or_insert_with(Default::default);
                extra.sent.push(Sent {
                    offer_id: n.offer_id,
                    merchant_id: n.merchant_id,
                    sent_at: n.sent_at,
                    feedback: n.feedback,
                });
                extra.meta.push((n.notification_id, n.cell));
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
