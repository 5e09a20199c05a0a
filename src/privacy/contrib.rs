//! Contribution bounding: a device counts at most once per (cell, bucket), in at most
//! `privacy.max_cells_per_bucket` cells per bucket and `privacy.max_contributions_per_day`
//! (cell, bucket) pairs per UTC day. The sensitivity in the accounting follows from these
//! bounds, so they are enforced before anything is stored.

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
    /// The device already counts in the maximum number of pairs of this UTC day.
    DayBound,
}

const DAY_MS: i64 = 86_400_000;

/// Decides about `(bucket, cell)` given the device's unreleased contributions, and records
/// it in `held` when new.
pub fn admit(
    held: &mut Vec<(Timestamp, u64)>,
    bucket: Timestamp,
    cell: u64,
    max_cells_per_bucket: u32,
    max_per_day: u32,
) -> Admission {
    if held.iter().any(|(b, c)| *b == bucket && *c == cell) {
        return Admission::Duplicate;
    }
    let in_bucket = held.iter().filter(|(b, _)| *b == bucket).count() as u32;
    if in_bucket >= max_cells_per_bucket {
        return Admission::CellBound;
    }
    let day = bucket.millis().div_euclid(DAY_MS);
    let in_day = held
        .iter()
        .filter(|(b, _)| b.millis().div_euclid(DAY_MS) == day)
        .count() as u32;
    if in_day >= max_per_day {
        return Admission::DayBound;
    }
    held.push((bucket, cell));
    Admission::New
}

/// Start of the bucket holding `t`.
pub fn bucket_of(t: Timestamp, bucket_ms: i64) -> Timestamp {
    Timestamp(t.millis().div_euclid(bucket_ms) * bucket_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_per_bucket_and_per_day() {
        let mut held = Vec::new();
        let b0 = Timestamp(0);
        assert_eq!(admit(&mut held, b0, 1, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b0, 1, 2, 3), Admission::Duplicate);
        assert_eq!(admit(&mut held, b0, 2, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b0, 3, 2, 3), Admission::CellBound);
        let b1 = Timestamp(3_600_000);
        assert_eq!(admit(&mut held, b1, 3, 2, 3), Admission::New);
        assert_eq!(admit(&mut held, b1, 4, 2, 3), Admission::DayBound);
        // The next UTC day starts afresh.
        let next_day = Timestamp(DAY_MS);
        assert_eq!(admit(&mut held, next_day, 4, 2, 3), Admission::New);
        assert_eq!(held.len(), 4);
    }
}
