//! Contribution bounding: a device counts at most once per (cell, bucket), in at most
//! `privacy.max_cells_per_bucket` cells per bucket and in at most
//! `privacy.max_contributions_per_day` (cell, bucket) pairs in **any 24 hours** (a rolling
//! window over bucket starts, like the caps — not per UTC day, so a day straddling midnight
//! cannot hold twice the bound). The sensitivity in the accounting follows from these bounds,
//! so they are enforced before anything is stored, across releases: pairs of released buckets
//! stay counted (their cell forgotten) until they leave every window a new pair can join.

use crate::clock::Timestamp;

use super::held::Held;

/// What became of one candidate contribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New: record it.
    New,
    /// Already counted in this cell and bucket.
    Duplicate,
    /// The device already counts in the maximum number of cells of this bucket.
    CellBound,
    /// Adding it would put more than the daily bound of pairs into some 24-hour window.
    DayBound,
    /// The bucket's start cannot be held exactly (not a whole second, or outside the years
    /// the compact form covers): refused, for a bound that cannot be checked is not kept.
    Unrepresentable,
}

/// The rolling window of the per-day bound.
pub const WINDOW_MS: i64 = 86_400_000;

/// Decides about `(bucket, cell)` given the device's held pairs (unreleased ones with their
/// cell, released ones of the last day with their count only), and records it in `held`
/// when new. Cells are compared by fingerprint: a collision is taken for a duplicate, so it
/// can only make the device count less.
pub fn admit(
    held: &mut Held,
    bucket: Timestamp,
    cell: u64,
    max_cells_per_bucket: u32,
    max_per_window: u32,
) -> Admission {
    let b = bucket.millis();
    if held.holds(b, cell) {
        return Admission::Duplicate;
    }
    if held.pairs_in(b) >= max_cells_per_bucket {
        return Admission::CellBound;
    }
    if max_in_window_with(held, b) > max_per_window {
        return Admission::DayBound;
    }
    if !held.push_pair(b, cell) {
        return Admission::Unrepresentable;
    }
    Admission::New
}

/// The most pairs any 24-hour window holding `bucket` would contain if `bucket` were added.
/// A window with the most pairs can always be slid right until its start is one of the
/// pairs' buckets (or `bucket` itself), so only those starts are tried.
fn max_in_window_with(held: &Held, b: i64) -> u32 {
    held.buckets()
        .map(|h| h.start)
        .chain(std::iter::once(b))
        .filter(|s| *s > b - WINDOW_MS && *s <= b)
        .map(|s| {
            1 + held
                .buckets()
                .filter(|h| h.start >= s && h.start < s + WINDOW_MS)
                .map(|h| u32::from(h.pairs))
                .sum::<u32>()
        })
        .max()
        .unwrap_or(1)
}

/// Whether adding one pair in `bucket` (costing `cost(bucket)`) keeps every 24-hour window
/// holding it within `budget`, where each held pair costs `cost(its bucket)`: the privacy
/// loss of a pair is fixed by the noise of its bucket's release (the ledger's, once
/// released), so pairs admitted under another config are counted at what they cost, not
/// at what a pair costs today. Costs are zCDP ρ (Gaussian) or ε (Laplace).
pub fn within_budget(
    held: &Held,
    bucket: Timestamp,
    cost: impl Fn(Timestamp) -> f64,
    budget: f64,
) -> bool {
    let b = bucket.millis();
    let own = cost(bucket);
    held.buckets()
        .map(|h| h.start)
        .chain(std::iter::once(b))
        .filter(|s| *s > b - WINDOW_MS && *s <= b)
        .all(|s| {
            let spent: f64 = held
                .buckets()
                .filter(|h| h.start >= s && h.start < s + WINDOW_MS)
                .map(|h| f64::from(h.pairs) * cost(Timestamp(h.start)))
                .sum();
            // A relative tolerance: the budget is itself a sum of the same per-pair costs.
            spent + own <= budget * (1.0 + 1e-9)
        })
}

/// Drops what no future admission can see (pairs more than a window before the oldest
/// bucket that can still be contributed to) and forgets the cells of released buckets.
pub fn prune(held: &mut Held, released_through: i64) {
    held.prune_hourly(released_through.saturating_sub(WINDOW_MS), released_through);
}

/// Start of the bucket holding `t`.
pub fn bucket_of(t: Timestamp, bucket_ms: i64) -> Timestamp {
    Timestamp(t.millis().div_euclid(bucket_ms) * bucket_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn bounds_per_bucket_and_per_window() {
        let mut held = Held::default();
        let b0 = Timestamp(0);
        assert_eq!(admit(&mut held, b0, 1, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b0, 1, 2, 3), Admission::Duplicate);
        assert_eq!(admit(&mut held, b0, 2, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b0, 3, 2, 3), Admission::CellBound);
        let b1 = Timestamp(HOUR);
        assert_eq!(admit(&mut held, b1, 3, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b1, 4, 2, 3), Admission::DayBound);
        // 23 h later is still inside [b0, b0 + 24 h): the window is rolling, and a UTC-day
        // bound would have started afresh at midnight.
        let late = Timestamp(WINDOW_MS - HOUR);
        assert_eq!(admit(&mut held, late, 4, 2, 3), Admission::DayBound);
        // 24 h after b0, b0's pairs have left every window holding the new pair.
        assert_eq!(
            admit(&mut held, Timestamp(WINDOW_MS), 4, 2, 3),
            Admission::New
        );
        assert_eq!(
            admit(&mut held, Timestamp(WINDOW_MS), 5, 2, 3),
            Admission::New
        );
        assert_eq!(
            admit(&mut held, Timestamp(WINDOW_MS + HOUR), 6, 2, 3),
            Admission::New
        );
        assert_eq!(
            admit(&mut held, Timestamp(WINDOW_MS + HOUR), 7, 2, 3),
            Admission::DayBound
        );
    }

    #[test]
    fn releases_forget_cells_but_keep_the_spend() {
        let mut held = Held::default();
        for (i, b) in [0, HOUR, 2 * HOUR].into_iter().enumerate() {
            assert_eq!(
                admit(&mut held, Timestamp(b), i as u64 + 1, 4, 3),
                Admission::New
            );
        }
        prune(&mut held, 2 * HOUR);
        assert!(held.buckets().all(|b| b.released && b.cells.is_empty()));
        assert_eq!(
            admit(&mut held, Timestamp(3 * HOUR), 9, 4, 3),
            Admission::DayBound
        );
        prune(&mut held, WINDOW_MS + HOUR);
        assert_eq!(
            held.buckets().map(|b| b.pairs).sum::<u16>(),
            1,
            "only the pair still inside a reachable window stays"
        );
    }

    #[test]
    fn the_budget_counts_each_pair_at_its_own_cost() {
        // Two pairs released at 0.015 each (an expensive config), today's pairs cost 0.0025
        // and the window's budget is 0.06: 12 more fit, not 22.
        let mut held = Held::default();
        held.push_released(0, 2);
        let cost = |b: Timestamp| if b.millis() == 0 { 0.015 } else { 0.0025 };
        for i in 0..12 {
            assert!(within_budget(&held, Timestamp(HOUR), cost, 0.06), "{i}");
            held.push_pair(HOUR, i);
        }
        assert!(!within_budget(&held, Timestamp(HOUR), cost, 0.06));
        assert!(within_budget(&held, Timestamp(WINDOW_MS), cost, 0.06));
    }

    #[test]
    fn a_late_pair_is_checked_against_every_window_holding_it() {
        // Pairs at 23 h and 24.5 h; a late pair at 1 h would put all three into [1 h, 25 h),
        // so with the bound 2 it is refused, though its own UTC day holds only one other.
        let mut held = Held::default();
        held.push_pair(23 * HOUR, 1);
        held.push_pair(24 * HOUR + HOUR / 2, 2);
        assert_eq!(
            admit(&mut held, Timestamp(HOUR), 3, 4, 2),
            Admission::DayBound
        );
        assert_eq!(admit(&mut held, Timestamp(0), 3, 4, 3), Admission::New);
    }
}

#[cfg(test)]
mod compact_tests {
    use super::*;
    use crate::privacy::held::fingerprint;

    const HOUR: i64 = 3_600_000;

    /// Two distinct cells whose fingerprints collide.
    fn colliding() -> (u64, u64) {
        let mut seen = std::collections::HashMap::new();
        for c in 1u64.. {
            let cell = 0x0882_8308_2800_0000 | (c << 8);
            if let Some(other) = seen.insert(fingerprint(cell), cell) {
                return (other, cell);
            }
        }
        unreachable!()
    }

    #[test]
    fn a_fingerprint_collision_counts_less_never_more() {
        let (a, b) = colliding();
        assert_ne!(a, b);
        let mut held = Held::default();
        assert_eq!(admit(&mut held, Timestamp(0), a, 4, 16), Admission::New);
        // The second cell looks like the first: skipped, not counted.
        assert_eq!(
            admit(&mut held, Timestamp(0), b, 4, 16),
            Admission::Duplicate
        );
        assert_eq!(held.pairs_in(0), 1);
        // In another bucket they are told apart by the bucket, and both count.
        assert_eq!(admit(&mut held, Timestamp(HOUR), b, 4, 16), Admission::New);
        // Restored rows are never merged: two stored pairs whose cells collide both count
        // towards the bounds (stricter), and the next cell of the bucket is bounded.
        let mut restored = Held::default();
        restored.push_pair(0, a);
        restored.push_pair(0, b);
        assert_eq!(restored.pairs_in(0), 2);
        let other = (1u64..)
            .map(|c| a ^ (c << 20))
            .find(|c| fingerprint(*c) != fingerprint(a))
            .unwrap();
        assert_eq!(
            admit(&mut restored, Timestamp(0), other, 2, 16),
            Admission::CellBound
        );
    }

    #[test]
    fn a_bucket_length_change_at_midnight_keeps_both_grids_exact() {
        // Hourly buckets until midnight, then 15-minute ones (a reload applied at the next
        // UTC midnight): the bound counts the pairs of both grids in one rolling window.
        let day = 86_400_000;
        let mut held = Held::default();
        for h in 20..24 {
            assert_eq!(
                admit(&mut held, Timestamp(h * HOUR), 7, 4, 6),
                Admission::New
            );
        }
        let quarter = 15 * 60_000;
        assert_eq!(admit(&mut held, Timestamp(day), 7, 4, 6), Admission::New);
        assert_eq!(
            admit(&mut held, Timestamp(day + quarter), 7, 4, 6),
            Admission::New
        );
        assert_eq!(
            admit(&mut held, Timestamp(day + 2 * quarter), 7, 4, 6),
            Admission::DayBound
        );
        // Lookups by the new grid's starts are exact: the 00:15 bucket holds one pair, the
        // 00:00 one (same hour on the old grid) one too.
        assert_eq!(held.pairs_in(day + quarter), 1);
        assert_eq!(held.pairs_in(day), 1);
        assert_eq!(
            admit(&mut held, Timestamp(day + quarter), 7, 4, 6),
            Admission::Duplicate
        );
    }

    #[test]
    fn a_bucket_that_cannot_be_held_exactly_is_refused() {
        let mut held = Held::default();
        assert_eq!(
            admit(&mut held, Timestamp(500), 7, 4, 6),
            Admission::Unrepresentable
        );
        assert!(held.buckets().next().is_none());
    }
}
