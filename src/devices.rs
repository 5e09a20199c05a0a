//! The in-memory device table: what the hot path needs about every consenting device, kept
//! in sync with the store so that no decision runs SQL.
//!
//! Architecture invariant: every change made here on behalf of a request is also sent to the
//! store in the same request (group commit) before the request is acknowledged; the table is
//! rebuilt from the store at start. Only consenting devices have an entry — a report from an
//! unknown token creates nothing, in memory or on disk.

use std::sync::{Mutex, MutexGuard};

use hashbrown::HashTable;

use crate::caps::{Sent, Standing};
use crate::clock::Timestamp;
use crate::model::{DeviceRow, Dwell, MerchantId, Notification, Purposes, Restriction};
use crate::privacy::held::Held;
use crate::pseudonym::DeviceId;

const SHARDS: usize = 64;
/// Notifications kept in memory per device beyond the 7-day window (for fatigue).
pub const LOG_TAIL: usize = 16;
/// Compact times count from 2020-01-01T00:00:00Z.
const EPOCH_MS: i64 = 1_577_836_800_000;

/// A device's hot state: 48 bytes (64 with its key in the shard's dense table). Times are
/// kept compactly (seconds, or tenths for the rate limiter); the cap-relevant ones are
/// rounded in the direction that sends less: dwell starts up, last sightings down.
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
    /// Everything only some devices have: contributions held for bounding, and (rarer)
    /// notifications and standings.
    ext: Option<Box<Ext>>,
}

const _: () = assert!(std::mem::size_of::<DeviceState>() == 48);
const _: () = assert!(std::mem::size_of::<Ext>() == 56);

/// Words of held contributions kept inline: the whole `Ext` is 56 bytes, one 64-byte malloc
/// chunk — room for a device counted in a few buckets and cells of its day.
const INLINE_WORDS: usize = 27;

/// A device's optional part, one allocation: a counted device that was never notified
/// keeps its held contributions (`privacy::held`, a few `u16` words) inline; a notified
/// device, or one holding more words, has the full form.
#[derive(Debug, Clone)]
enum Ext {
    Small { len: u8, words: [u16; INLINE_WORDS] },
    Full(Box<Full>),
}

#[derive(Debug, Clone, Default)]
struct Full {
    extra: Extra,
    held: Vec<u16>,
}

impl Ext {
    fn held(&self) -> &[u16] {
        match self {
            Ext::Small { len, words } => &words[..usize::from(*len)],
            Ext::Full(f) => &f.held,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct CompactDwell {
    /// 0: no dwell yet (0 is not a valid H3 index).
    anchor: u64,
    cell: u64,
    since_s: u32,
    last_seen_s: u32,
}

/// The parts of a device's state that only notified devices have.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Notifications as the caps see them, oldest first.
    pub sent: Vec<Sent>,
    /// Per notification (same order): its id and the cell it was sent in.
    pub meta: Vec<(uuid::Uuid, u64)>,
    pub standings: Vec<(MerchantId, Standing)>,
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

    /// The notifications and standings, if the device has any.
    pub fn extra(&self) -> Option<&Extra> {
        match self.ext.as_deref() {
            Some(Ext::Full(f)) => Some(&f.extra),
            _ => None,
        }
    }

    /// Mutable access to the notifications and standings, if the device has any.
    pub fn extra_mut(&mut self) -> Option<&mut Extra> {
        match self.ext.as_deref_mut() {
            Some(Ext::Full(f)) => Some(&mut f.extra),
            _ => None,
        }
    }

    /// The notifications and standings, created empty if the device had none.
    fn extra_or_default(&mut self) -> &mut Extra {
        let ext = self
            .ext
            .get_or_insert_with(|| Box::new(Ext::Full(Box::default())));
        if let Ext::Small { .. } = **ext {
            let held = ext.held().to_vec();
            **ext = Ext::Full(Box::new(Full {
                extra: Extra::default(),
                held,
            }));
        }
        match &mut **ext {
            Ext::Full(f) => &mut f.extra,
            // Unwrap safety: made full just above.
            Ext::Small { .. } => unreachable!("made full above"),
        }
    }

    /// The notification log as the caps see it, oldest first.
    pub fn sent(&self) -> &[Sent] {
        self.extra().map(|e| e.sent.as_slice()).unwrap_or(&[])
    }

    /// The device's standing towards `merchant`.
    pub fn standing(&self, merchant: MerchantId) -> Standing {
        self.extra()
            .and_then(|l| l.standings.iter().find(|(m, _)| *m == merchant))
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// Sets the standing towards `merchant`.
    pub fn set_standing(&mut self, merchant: MerchantId, standing: Standing) {
        let extra = self.extra_or_default();
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
        let extra = self.extra_or_default();
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

    /// The contributions held for bounding (a copy; give it back with
    /// [`DeviceState::put_held`]).
    pub fn take_held(&self) -> Held {
        Held::from_words(self.ext.as_deref().map_or(&[], Ext::held))
    }

    /// Stores the contributions held for bounding (nothing is written if unchanged).
    pub fn put_held(&mut self, held: Held) {
        let words = held.words();
        if self.ext.as_deref().map_or(&[][..], Ext::held) == words {
            return;
        }
        match self.ext.as_deref_mut() {
            Some(Ext::Full(f)) => {
                f.held = words.to_vec();
                return;
            }
            None if words.is_empty() => return,
            _ => {}
        }
        // No notifications: inline if it fits, else the full form.
        if words.is_empty() {
            self.ext = None;
        } else if words.len() <= INLINE_WORDS {
            let mut inline = [0u16; INLINE_WORDS];
            inline[..words.len()].copy_from_slice(words);
            let small = Ext::Small {
                // Unwrap safety: at most INLINE_WORDS (27).
                len: u8::try_from(words.len()).unwrap_or(u8::MAX),
                words: inline,
            };
            match self.ext.as_deref_mut() {
                Some(ext) => *ext = small,
                None => self.ext = Some(Box::new(small)),
            }
        } else {
            self.ext = Some(Box::new(Ext::Full(Box::new(Full {
                extra: Extra::default(),
                held: words.to_vec(),
            }))));
        }
    }
}

/// Hashes a [`DeviceId`] by its first 8 bytes: ids are keyed-HMAC outputs, uniformly
/// distributed and unpredictable without the key, so no further mixing is needed.
fn id_hash(id: &DeviceId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_le_bytes(b)
}

/// One shard: the devices in a dense vector and an index from the id's hash to the
/// device's slot (a `u32`, 5 bytes per entry with its control byte at whatever fill),
/// so the per-device cost is the entry's 64 bytes, not 64 bytes over the hash table's
/// load factor. Removal swaps the last device into the freed slot.
#[derive(Debug, Default)]
pub struct Shard {
    slots: Vec<(DeviceId, DeviceState)>,
    index: HashTable<u32>,
}

impl Shard {
    fn slot_of(&self, id: &DeviceId) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(id_hash(id), |&s| slots[s as usize].0 == *id)
            .map(|&s| s as usize)
    }

    pub fn get(&self, id: &DeviceId) -> Option<&DeviceState> {
        self.slot_of(id).map(|s| &self.slots[s].1)
    }

    pub fn get_mut(&mut self, id: &DeviceId) -> Option<&mut DeviceState> {
        self.slot_of(id).map(|s| &mut self.slots[s].1)
    }

    pub fn contains_key(&self, id: &DeviceId) -> bool {
        self.slot_of(id).is_some()
    }

    /// The device's state, inserted as default if absent.
    pub fn get_or_insert_default(&mut self, id: DeviceId) -> &mut DeviceState {
        let slot = match self.slot_of(&id) {
            Some(s) => s,
            None => self.push(id, DeviceState::default()),
        };
        &mut self.slots[slot].1
    }

    /// Inserts or replaces the device's state; returns the previous one.
    pub fn insert(&mut self, id: DeviceId, state: DeviceState) -> Option<DeviceState> {
        match self.slot_of(&id) {
            Some(s) => Some(std::mem::replace(&mut self.slots[s].1, state)),
            None => {
                self.push(id, state);
                None
            }
        }
    }

    fn push(&mut self, id: DeviceId, state: DeviceState) -> usize {
        let slot = self.slots.len();
        // Unwrap safety: a shard never holds 4 billion devices (the table would need
        // 256 GB); refusing here would lose a consent, so this is a hard limit.
        let s = u32::try_from(slot).expect("fewer than 2^32 devices per shard");
        self.slots.push((id, state));
        let slots = &self.slots;
        self.index
            .insert_unique(id_hash(&id), s, |&i| id_hash(&slots[i as usize].0));
        slot
    }

    /// Removes the device; returns its state.
    pub fn remove(&mut self, id: &DeviceId) -> Option<DeviceState> {
        let slot = self.slot_of(id)?;
        Some(self.remove_slot(slot))
    }

    fn remove_slot(&mut self, slot: usize) -> DeviceState {
        let id = self.slots[slot].0;
        if let Ok(entry) = self.index.find_entry(id_hash(&id), |&s| s as usize == slot) {
            entry.remove();
        }
        let last = self.slots.len() - 1;
        let (_, state) = self.slots.swap_remove(slot);
        if slot != last {
            let moved = self.slots[slot].0;
            if let Some(s) = self
                .index
                .find_mut(id_hash(&moved), |&s| s as usize == last)
            {
                *s = slot as u32;
            }
        }
        state
    }

    /// Keeps only the devices for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&DeviceId, &mut DeviceState) -> bool) {
        let mut i = 0;
        while i < self.slots.len() {
            let (id, state) = &mut self.slots[i];
            if keep(id, state) {
                i += 1;
            } else {
                self.remove_slot(i);
            }
        }
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&DeviceId, &mut DeviceState)> {
        self.slots.iter_mut().map(|(id, s)| (&*id, s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &DeviceState)> {
        self.slots.iter().map(|(id, s)| (id, s))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Devices the dense vector has room for without growing.
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

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
        let state = shard.get_or_insert_default(id);
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

    /// Restores contribution bounds from the unreleased contributions in the store (hourly
    /// `(device, cell, bucket)` and daily `(device, cell, day)` rows) and the spend of
    /// released buckets (pairs without their cells) that still counts towards the rolling
    /// per-day bound. Every row is held as its own pair, even when two cells' fingerprints
    /// collide: restored bounds may count more, never less.
    pub fn load_contributions(
        &self,
        rows: Vec<(DeviceId, u64, Timestamp)>,
        released_spend: Vec<(DeviceId, Timestamp, u32)>,
        daily: Vec<(DeviceId, u64, Timestamp)>,
    ) {
        let restore = |device: &DeviceId, add: &mut dyn FnMut(&mut Held) -> bool| {
            let mut shard = self.lock(device);
            if let Some(state) = shard.get_mut(device) {
                let mut held = state.take_held();
                if !add(&mut held) {
                    // A time the compact form cannot hold: the store's own bounds still
                    // apply to what is written, but say so.
                    tracing::warn!("a restored contribution could not be held in memory");
                }
                state.put_held(held);
            }
        };
        for (device, cell, bucket) in rows {
            restore(&device, &mut |h| h.push_pair(bucket.millis(), cell));
        }
        for (device, bucket, pairs) in released_spend {
            restore(&device, &mut |h| h.push_released(bucket.millis(), pairs));
        }
        for (device, cell, day) in daily {
            restore(&device, &mut |h| h.push_day(day.millis(), cell));
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
        let state = shard.get_or_insert_default(id);
        state.purposes = stored.row.purposes;
        if absent {
            state.set_last_activity(stored.row.last_activity);
            state.mark_persisted(stored.row.last_activity);
        }
        match stored.row.dwell {
            Some(d) => state.set_dwell(d),
            None => state.dwell = CompactDwell::default(),
        }
        if !stored.notifications.is_empty() || !stored.restrictions.is_empty() {
            let extra = state.extra_or_default();
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
        } else if let Some(extra) = state.extra_mut() {
            *extra = Extra::default();
        }
        if absent {
            // Unreleased pairs with their cells; the rest of each bucket's spend (released
            // pairs) as counts only. A pair that cannot be held is logged: the store's own
            // check still bounds what is written.
            let mut held = state.take_held();
            let mut complete = true;
            for (bucket, pairs) in &stored.spend {
                let mut cells = 0u32;
                for (_, cell) in stored.contributions.iter().filter(|(b, _)| b == bucket) {
                    complete &= held.push_pair(bucket.millis(), *cell);
                    cells += 1;
                }
                let released = pairs.saturating_sub(cells);
                if released > 0 {
                    complete &= held.push_released(bucket.millis(), released);
                }
            }
            if !complete {
                tracing::warn!("a looked-up device's contribution could not be held in memory");
            }
            state.put_held(held);
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
                let extra = state.extra_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Purpose;
    use crate::privacy::held::fingerprint;

    /// Ids sharing their first 8 bytes (one hash): the index must tell them apart by slot.
    fn id(n: u8, same_hash: bool) -> DeviceId {
        let mut b = [0u8; 16];
        if !same_hash {
            b[0] = n;
        }
        b[8] = n;
        DeviceId(b)
    }

    fn state(purposes: Purposes, at: i64) -> DeviceState {
        let mut s = DeviceState {
            purposes,
            ..DeviceState::default()
        };
        s.set_last_activity(Timestamp(EPOCH_MS + at * 1000));
        s
    }

    #[test]
    fn swap_remove_keeps_every_other_device_findable() {
        let foot = Purposes::from_iter([Purpose::FootTraffic]);
        for same_hash in [false, true] {
            let mut shard = Shard::default();
            for n in 0..50u8 {
                assert!(
                    shard
                        .insert(id(n, same_hash), state(foot, i64::from(n)))
                        .is_none()
                );
            }
            // Remove from the front, the middle and the end: each moves the last device.
            for n in [0u8, 25, 49, 1] {
                let gone = shard.remove(&id(n, same_hash)).unwrap();
                assert_eq!(
                    gone.last_activity(),
                    Timestamp(EPOCH_MS + i64::from(n) * 1000)
                );
                assert!(!shard.contains_key(&id(n, same_hash)));
                assert!(shard.remove(&id(n, same_hash)).is_none());
            }
            assert_eq!(shard.len(), 46);
            for n in (0..50u8).filter(|n| ![0, 25, 49, 1].contains(n)) {
                let s = shard.get(&id(n, same_hash)).unwrap();
                assert_eq!(s.last_activity(), Timestamp(EPOCH_MS + i64::from(n) * 1000));
            }
            // Retain removes while iterating, swapping later devices into freed slots.
            shard.retain(|_, s| s.last_activity().millis() % 2000 == 0);
            assert_eq!(shard.len(), 24);
            for n in 2..49u8 {
                assert_eq!(shard.contains_key(&id(n, same_hash)), n % 2 == 0, "{n}");
            }
            // A replacing insert keeps one entry.
            assert!(shard.insert(id(2, same_hash), state(foot, 7)).is_some());
            assert_eq!(shard.len(), 24);
            assert_eq!(
                shard.get(&id(2, same_hash)).unwrap().last_activity(),
                Timestamp(EPOCH_MS + 7000)
            );
        }
    }

    #[test]
    fn held_contributions_stay_inline_until_a_notification_and_survive_it() {
        let mut s = DeviceState::default();
        let mut held = s.take_held();
        assert!(held.push_pair(EPOCH_MS, 42));
        s.put_held(held);
        assert!(matches!(s.ext.as_deref(), Some(Ext::Small { .. })));
        assert!(
            s.extra().is_none(),
            "a counted device has no notification part"
        );
        s.set_standing(
            uuid::Uuid::nil(),
            Standing {
                muted: true,
                ..Standing::default()
            },
        );
        assert!(
            s.take_held().holds(EPOCH_MS, 42),
            "kept across the change of form"
        );
        assert!(s.standing(uuid::Uuid::nil()).muted);
        s.put_held(Held::default());
        assert!(s.take_held().is_empty());
        assert!(s.standing(uuid::Uuid::nil()).muted);
    }

    #[test]
    fn bounds_are_restored_at_start_from_the_stores_rows() {
        let devices = Devices::default();
        let foot = Purposes::from_iter([Purpose::FootTraffic]);
        let (a, stranger) = (DeviceId([3; 16]), DeviceId([4; 16]));
        devices.set_purposes(a, foot, Timestamp(EPOCH_MS));
        let bucket = Timestamp(EPOCH_MS + 3_600_000);
        let released = Timestamp(EPOCH_MS);
        let day = Timestamp(EPOCH_MS);
        devices.load_contributions(
            vec![(a, 11, bucket), (a, 12, bucket), (stranger, 11, bucket)],
            vec![(a, released, 3)],
            vec![(a, 11, day), (a, 13, day)],
        );
        let held = devices.lock(&a).get(&a).unwrap().take_held();
        assert_eq!(held.pairs_in(bucket.millis()), 2);
        assert!(held.holds(bucket.millis(), 12));
        assert_eq!(held.pairs_in(released.millis()), 3);
        assert!(!held.holds(released.millis(), 11));
        let cells: Vec<u16> = held.day_cells(day.millis()).collect();
        assert_eq!(cells, vec![fingerprint(11), fingerprint(13)]);
        assert!(
            !devices.lock(&stranger).contains_key(&stranger),
            "rows of a device without consent create nothing"
        );
    }
}
