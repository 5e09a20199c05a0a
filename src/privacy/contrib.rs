//! Contribution bounding: a device counts at most once per (cell, bucket), in at most
//! `privacy.max_cells_per_bucket` cells per bucket and in at most
//! `privacy.max_contributions_per_day` (cell, bucket) pairs in **any 24 hours** (a rolling
//! window over bucket starts, like the caps — not per UTC day, so a day straddling midnight
//! cannot hold twice the bound). The sensitivity in the accounting follows from these bounds,
//! so they are enforced before anything is stored, across releases: pairs of released buckets
//! stay counted (their cell forgotten) until they leave every window a new pair can join.

use crate::clock::Timestamp;

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
}

/// The rolling window of the per-day bound.
pub const WINDOW_MS: i64 = 86_400_000;

/// A held pair whose bucket has been released: its cell is forgotten, only the spend stays.
pub const FORGOTTEN: u64 = 0;

/// Decides about `(bucket, cell)` given the device's held pairs (unreleased ones with their
/// cell, released ones of the last day with [`FORGOTTEN`]), and records it in `held` when new.
pub fn admit(
    held: &mut Vec<(Timestamp, u64)>,
    bucket: Timestamp,
    cell: u64,
    max_cells_per_bucket: u32,
    max_per_window: u32,
) -> Admission {
    if held.iter().any(|(b, c)| *b == bucket && *c == cell) {
        return Admission::Duplicate;
    }
    let in_bucket = held.iter().filter(|(b, _)| *b == bucket).count() as u32;
    if in_bucket >= max_cells_per_bucket {
        return Admission::CellBound;
    }
    if max_in_window_with(held, bucket) > max_per_window {
        return Admission::DayBound;
    }
    held.push((bucket, cell));
    Admission::New
}

/// The most pairs any 24-hour window holding `bucket` would contain if `bucket` were added.
/// A window with the most pairs can always be slid right until its start is one of the
/// pairs' buckets (or `bucket` itself), so only those starts are tried.
fn max_in_window_with(held: &[(Timestamp, u64)], bucket: Timestamp) -> u32 {
    let b = bucket.millis();
    held.iter()
        .map(|(h, _)| h.millis())
        .chain(std::iter::once(b))
        .filter(|s| *s > b - WINDOW_MS && *s <= b)
        .map(|s| {
            1 + held
                .iter()
                .filter(|(h, _)| h.millis() >= s && h.millis() < s + WINDOW_MS)
                .count() as u32
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
    held: &[(Timestamp, u64)],
    bucket: Timestamp,
    cost: impl Fn(Timestamp) -> f64,
    budget: f64,
) -> bool {
    let b = bucket.millis();
    let own = cost(bucket);
    held.iter()
        .map(|(h, _)| h.millis())
        .chain(std::iter::once(b))
        .filter(|s| *s > b - WINDOW_MS && *s <= b)
        .all(|s| {
            let spent: f64 = held
                .iter()
                .filter(|(h, _)| h.millis() >= s && h.millis() < s + WINDOW_MS)
                .map(|(h, _)| cost(*h))
                .sum();
            // A relative tolerance: the budget is itself a sum of the same per-pair costs.
            spent + own <= budget * (1.0 + 1e-9)
        })
}

/// Drops what no future admission can see (pairs more than a window before the oldest
/// bucket that can still be contributed to) and forgets the cells of released buckets.
pub fn prune(held: &mut Vec<(Timestamp, u64)>, released_through: i64) {
    held.retain(|(b, _)| b.millis() > released_through.saturating_sub(WINDOW_MS));
    for (b, c) in held.iter_mut() {
        if b.millis() <= released_through {
            *c = FORGOTTEN;
        }
    }
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
        let mut held = Vec::new();
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
        let mut held = Vec::new();
        for (i, b) in [0, HOUR, 2 * HOUR].into_iter().enumerate() {
            assert_eq!(
                admit(&mut held, Timestamp(b), i as u64 + 1, 4, 3),
                Admission::New
            );
        }
        prune(&mut held, 2 * HOUR);
        assert!(held.iter().all(|(_, c)| *c == FORGOTTEN));
        assert_eq!(
            admit(&mut held, Timestamp(3 * HOUR), 9, 4, 3),
            Admission::DayBound
        );
        prune(&mut held, WINDOW_MS + HOUR);
        assert_eq!(
            held.len(),
            1,
            "only the pair still inside a reachable window stays"
        );
    }

    #[test]
    fn the_budget_counts_each_pair_at_its_own_cost() {
        // Two pairs released at 0.015 each (an expensive config), today's pairs cost 0.0025
        // and the window's budget is 0.06: 12 more fit, not 22.
        let mut held = vec![(Timestamp(0), FORGOTTEN), (Timestamp(0), FORGOTTEN)];
        let cost = |b: Timestamp| if b.millis() == 0 { 0.015 } else { 0.0025 };
        for i in 0..12 {
            assert!(within_budget(&held, Timestamp(HOUR), cost, 0.06), "{i}");
            held.push((Timestamp(HOUR), i));
        }
        assert!(!within_budget(&held, Timestamp(HOUR), cost, 0.06));
        assert!(within_budget(&held, Timestamp(WINDOW_MS), cost, 0.06));
    }

    #[test]
    fn a_late_pair_is_checked_against_every_window_holding_it() {
        // Pairs at 23 h and 24.5 h; a late pair at 1 h would put all three into [1 h, 25 h),
        // so with the bound 2 it is refused, though its own UTC day holds only one other.
        let mut held = vec![
            (Timestamp(23 * HOUR), 1),
            (Timestamp(24 * HOUR + HOUR / 2), 2),
        ];
        assert_eq!(
            admit(&mut held, Timestamp(HOUR), 3, 4, 2),
            Admission::DayBound
        );
        assert_eq!(admit(&mut held, Timestamp(0), 3, 4, 3), Admission::New);
    }
}
