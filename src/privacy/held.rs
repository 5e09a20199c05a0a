//! What one device holds for contribution bounding, compactly: its hourly (bucket, cell)
//! pairs and its cells of unreleased UTC days, as `u16` words, so a device contributing to a
//! few buckets fits one small allocation next to its device-table entry (issue 11).
//!
//! Layout: `words[0]` = number of words of the hourly part, then the hourly records, then
//! the daily records.
//! - Hourly record: `[start_hi, start_lo, meta, fp × n]` — the bucket's exact start in
//!   seconds since 2020 (an `i32`: any bucket length, even one changed by a reload, is kept
//!   exactly, and so is any lookup by bucket start), `meta` = `n | RELEASED`. A released
//!   bucket keeps only its count (the spend that stays in the rolling window); its cells are
//!   forgotten. Several records may share a bucket (their counts add up).
//! - Daily record: `[day, n, fp × n]` — the day as an `i16` count of days since 2020.
//!
//! Cells are kept as 16-bit fingerprints. Two cells with one fingerprint in the same bucket
//! (or day) look like one cell to the bound: the second is taken for a duplicate and not
//! counted. A collision can so only ever make a device count *less*, never more: every
//! bound (cells per bucket, pairs per window, cells per day) counts records and their `n`,
//! not distinct cells. A time that does not fit the layout is refused (sends less).

use smallvec::SmallVec;

/// Compact times count from 2020-01-01T00:00:00Z (a UTC midnight).
const EPOCH_MS: i64 = 1_577_836_800_000;
const DAY_MS: i64 = 86_400_000;
/// Flag in an hourly record's `meta`: the bucket is released, its cells forgotten.
const RELEASED: u16 = 0x8000;
/// Largest `n` of one record.
const MAX_N: u16 = 0x7fff;

/// The 16-bit fingerprint of an H3 cell (a fixed multiplicative mix, top bits).
pub fn fingerprint(cell: u64) -> u16 {
    (cell.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u16
}

/// Words a [`Held`] keeps on the stack while it is worked on (more spill to the heap): a
/// report's bound check allocates nothing for a device holding up to this many.
const STACK_WORDS: usize = 32;

type Words = SmallVec<[u16; STACK_WORDS]>;

/// A device's held contributions (see the module doc for the layout), as worked on during
/// one admission; the device table stores [`Held::words`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    words: Words,
}

/// One hourly record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket<'a> {
    /// Start of the bucket, ms since the Unix epoch.
    pub start: i64,
    /// Pairs counted in it.
    pub pairs: u16,
    /// Fingerprints of its cells (empty once released).
    pub cells: &'a [u16],
    pub released: bool,
}

fn bucket_key(start_ms: i64) -> Option<u32> {
    let ms = start_ms.checked_sub(EPOCH_MS)?;
    if ms % 1000 != 0 {
        return None;
    }
    i32::try_from(ms / 1000).ok().map(|s| s as u32)
}

fn day_key(day_ms: i64) -> Option<u16> {
    let ms = day_ms.checked_sub(EPOCH_MS)?;
    if ms.rem_euclid(DAY_MS) != 0 {
        return None;
    }
    i16::try_from(ms.div_euclid(DAY_MS)).ok().map(|d| d as u16)
}

fn day_ms(key: u16) -> i64 {
    EPOCH_MS + i64::from(key as i16) * DAY_MS
}

impl Held {
    /// From the stored words (as [`Held::words`] gave them).
    pub fn from_words(words: &[u16]) -> Self {
        Held {
            words: Words::from_slice(words),
        }
    }

    /// The encoded form.
    pub fn words(&self) -> &[u16] {
        &self.words
    }

    pub fn is_empty(&self) -> bool {
        self.words.len() <= 1 && self.words.first().is_none_or(|w| *w == 0)
    }

    fn hourly_len(&self) -> usize {
        self.words.first().map_or(0, |w| usize::from(*w))
    }

    fn ensure_header(&mut self) {
        if self.words.is_empty() {
            self.words.push(0);
        }
    }

    /// The hourly records, in the order held.
    pub fn buckets(&self) -> impl Iterator<Item = Bucket<'_>> + Clone {
        let part = self.words.get(1..1 + self.hourly_len()).unwrap_or(&[]);
        let mut rest = part;
        std::iter::from_fn(move || {
            let (head, tail) = rest.split_at_checked(3)?;
            let secs = ((u32::from(head[0]) << 16) | u32::from(head[1])) as i32;
            let released = head[2] & RELEASED != 0;
            let pairs = head[2] & MAX_N;
            let n = if released { 0 } else { usize::from(pairs) };
            let (cells, tail) = tail.split_at(n.min(tail.len()));
            rest = tail;
            Some(Bucket {
                start: EPOCH_MS + i64::from(secs) * 1000,
                pairs,
                cells,
                released,
            })
        })
    }

    /// The daily records as (day start in ms, cell fingerprints).
    pub fn days(&self) -> impl Iterator<Item = (i64, &[u16])> {
        let start = (1 + self.hourly_len()).min(self.words.len());
        let mut rest = &self.words[start..];
        std::iter::from_fn(move || {
            let (head, tail) = rest.split_at_checked(2)?;
            let (cells, tail) = tail.split_at(usize::from(head[1]).min(tail.len()));
            rest = tail;
            Some((day_ms(head[0]), cells))
        })
    }

    /// Whether `cell`'s fingerprint is held in an unreleased record of `bucket`.
    pub fn holds(&self, bucket: i64, cell: u64) -> bool {
        let fp = fingerprint(cell);
        self.buckets()
            .any(|b| b.start == bucket && b.cells.contains(&fp))
    }

    /// Pairs held in `bucket`.
    pub fn pairs_in(&self, bucket: i64) -> u32 {
        self.buckets()
            .filter(|b| b.start == bucket)
            .map(|b| u32::from(b.pairs))
            .sum()
    }

    /// Adds one pair `(bucket, cell)`; `false` (nothing added) if the bucket's start cannot
    /// be kept exactly.
    pub fn push_pair(&mut self, bucket: i64, cell: u64) -> bool {
        let Some(key) = bucket_key(bucket) else {
            return false;
        };
        let fp = fingerprint(cell);
        self.ensure_header();
        // Append to an unreleased record of the bucket with room, if any.
        let mut at = 1;
        let end = 1 + self.hourly_len();
        while at + 3 <= end {
            let meta = self.words[at + 2];
            let n = usize::from(meta & MAX_N);
            let own = (u32::from(self.words[at]) << 16 | u32::from(self.words[at + 1])) == key;
            if meta & RELEASED == 0 {
                if own && meta < MAX_N {
                    self.words[at + 2] = meta + 1;
                    self.words.insert(at + 3 + n, fp);
                    self.words[0] += 1;
                    return true;
                }
                at += 3 + n;
            } else {
                at += 3;
            }
        }
        self.insert_hourly(end, &[(key >> 16) as u16, key as u16, 1, fp])
    }

    /// Adds `pairs` released pairs of `bucket` (their spend only, as restored at start);
    /// `false` if the bucket's start cannot be kept exactly.
    pub fn push_released(&mut self, bucket: i64, mut pairs: u32) -> bool {
        let Some(key) = bucket_key(bucket) else {
            return false;
        };
        self.ensure_header();
        while pairs > 0 {
            let n = pairs.min(u32::from(MAX_N)) as u16;
            let end = 1 + self.hourly_len();
            if !self.insert_hourly(end, &[(key >> 16) as u16, key as u16, n | RELEASED]) {
                return false;
            }
            pairs -= u32::from(n);
        }
        true
    }

    fn insert_hourly(&mut self, at: usize, record: &[u16]) -> bool {
        let Some(len) = u16::try_from(self.hourly_len() + record.len()).ok() else {
            return false;
        };
        self.words.insert_many(at, record.iter().copied());
        self.words[0] = len;
        true
    }

    /// Drops hourly records no future admission can see (started at or before
    /// `drop_through`) and forgets the cells of released ones (at or before
    /// `released_through`), keeping their counts.
    pub fn prune_hourly(&mut self, drop_through: i64, released_through: i64) {
        if self.hourly_len() == 0 {
            return;
        }
        let changed = self
            .buckets()
            .any(|b| b.start <= drop_through || (!b.released && b.start <= released_through));
        if !changed {
            return;
        }
        let mut out = Words::from_slice(&[0]);
        for b in self.buckets() {
            if b.start <= drop_through {
                continue;
            }
            let key = bucket_key(b.start).unwrap_or_default();
            let released = b.released || b.start <= released_through;
            let meta = if released {
                b.pairs | RELEASED
            } else {
                b.pairs
            };
            out.extend([(key >> 16) as u16, key as u16, meta]);
            if !released {
                out.extend_from_slice(b.cells);
            }
        }
        // Unwrap safety: the result is no longer than the hourly part it came from.
        out[0] = u16::try_from(out.len() - 1).unwrap_or(u16::MAX);
        out.extend_from_slice(&self.words[1 + self.hourly_len()..]);
        self.words = out;
        self.trim();
    }

    /// The fingerprints held for `day` (ms).
    pub fn day_cells(&self, day: i64) -> impl Iterator<Item = u16> + '_ {
        self.days()
            .filter(move |(d, _)| *d == day)
            .flat_map(|(_, c)| c.iter().copied())
    }

    /// Adds `cell` to `day` (ms, a UTC midnight); `false` if the day cannot be kept.
    pub fn push_day(&mut self, day: i64, cell: u64) -> bool {
        let Some(key) = day_key(day) else {
            return false;
        };
        let fp = fingerprint(cell);
        self.ensure_header();
        let mut at = 1 + self.hourly_len();
        while at + 2 <= self.words.len() {
            let n = self.words[at + 1];
            if self.words[at] == key && n < MAX_N {
                self.words[at + 1] = n + 1;
                self.words.insert(at + 2 + usize::from(n), fp);
                return true;
            }
            at += 2 + usize::from(n);
        }
        self.words.extend([key, 1, fp]);
        true
    }

    /// Drops the cells of days up to `released_through` (ms).
    pub fn prune_days(&mut self, released_through: i64) {
        if !self.days().any(|(d, _)| d <= released_through) {
            return;
        }
        let start = 1 + self.hourly_len();
        let mut out = Words::from_slice(&self.words[..start]);
        let mut at = start;
        while at + 2 <= self.words.len() {
            let n = usize::from(self.words[at + 1]);
            let end = (at + 2 + n).min(self.words.len());
            if day_ms(self.words[at]) > released_through {
                out.extend_from_slice(&self.words[at..end]);
            }
            at = end;
        }
        self.words = out;
        self.trim();
    }

    fn trim(&mut self) {
        if self.is_empty() {
            self.words = Words::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_767_607_200_000;
    const HOUR: i64 = 3_600_000;

    #[test]
    fn pairs_and_days_round_trip_through_the_words() {
        let mut h = Held::default();
        assert!(h.push_pair(T0, 11));
        assert!(h.push_day(T0 - T0.rem_euclid(DAY_MS), 11));
        assert!(h.push_pair(T0 + HOUR, 12));
        assert!(h.push_pair(T0, 13));
        let back = Held::from_words(h.words());
        assert_eq!(back, h);
        let b: Vec<_> = back.buckets().map(|b| (b.start, b.pairs)).collect();
        assert_eq!(b, vec![(T0, 2), (T0 + HOUR, 1)]);
        assert!(back.holds(T0, 13) && back.holds(T0, 11) && !back.holds(T0 + HOUR, 11));
        assert_eq!(
            back.day_cells(T0 - T0.rem_euclid(DAY_MS))
                .collect::<Vec<_>>(),
            vec![fingerprint(11)]
        );
    }

    #[test]
    fn bucket_starts_stay_exact_whatever_the_bucket_length() {
        // A 90 s grid (valid: it divides a day) and a bucket before 2020 (the tests' epoch).
        let mut h = Held::default();
        for start in [T0 + 90_000, T0 + 180_000, 0, 3 * HOUR] {
            assert!(h.push_pair(start, 5));
            assert_eq!(h.pairs_in(start), 1, "{start}");
        }
        // A start that is not a whole second cannot be kept exactly: refused.
        assert!(!h.push_pair(T0 + 500, 5));
        assert!(!h.push_pair(i64::MAX - 10_000, 5));
        assert_eq!(h.buckets().count(), 4);
    }

    #[test]
    fn released_buckets_keep_their_count_and_forget_their_cells() {
        let mut h = Held::default();
        h.push_pair(T0, 1);
        h.push_pair(T0, 2);
        h.push_pair(T0 + HOUR, 3);
        h.push_day(0, 9);
        h.prune_hourly(i64::MIN, T0);
        assert_eq!(h.pairs_in(T0), 2);
        assert!(!h.holds(T0, 1), "the released bucket's cells are forgotten");
        assert!(h.holds(T0 + HOUR, 3));
        assert_eq!(h.day_cells(0).count(), 1, "the daily part is untouched");
        h.prune_hourly(T0 + HOUR, T0 + HOUR);
        assert_eq!(h.buckets().count(), 0);
        h.prune_days(0);
        assert!(h.is_empty() && h.words().is_empty(), "{:?}", h.words());
    }

    #[test]
    fn restored_spend_beyond_one_record_is_kept_whole() {
        let mut h = Held::default();
        assert!(h.push_released(T0, 40_000));
        assert_eq!(h.pairs_in(T0), 40_000);
    }
}
