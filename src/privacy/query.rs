//! Merchant queries: read released tables only (free to query, no extra privacy loss), by
//! hour (the hourly releases) or day (the daily release, never sums of hours), for cells at
//! `insights.resolution` or coarser. Sums of released values (coarser areas) carry intervals
//! widened for the number of noisy terms they add.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use h3o::CellIndex;

use crate::cells;
use crate::clock::Timestamp;
use crate::config::{Config, InsightsScope};
use crate::model::Merchant;
use crate::settings::Settings;
use crate::store::{Store, StoreError};

use super::accounting::{self, Mechanism};
use super::daily::DAY_MS;
use super::domain;
use super::release::mechanism_of;

/// Most cells in one query.
pub const MAX_CELLS: usize = 500;
/// Most released cells one query may cover, all query cells' children together.
pub const MAX_MEMBERS: u64 = 50_000;
/// Most points (series × periods) one answer may hold: a 5 KB request must not ask for a
/// 300 MB answer (500 copies of one cell over 400 days of hours).
pub const MAX_POINTS: u64 = 100_000;
/// Longest time range in one query.
pub const MAX_RANGE_DAYS: i64 = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

/// One point of a foot-traffic series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub cell: u64,
    pub bucket_start: Timestamp,
    /// The noisy count (0 when suppressed).
    pub count: i64,
    pub suppressed: bool,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

/// Why a query was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("cell {0:x} is outside this merchant's area")]
    OutsideArea(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The released cells (at `insights.resolution`) a requested cell stands for.
fn members(cell: u64, config: &Config, i: usize) -> Result<Vec<u64>, QueryError> {
    let c = CellIndex::try_from(cell)
        .map_err(|_| invalid(format!("cells[{i}]"), "not a valid H3 cell"))?;
    let r = cells::resolution(config.insights.resolution);
    if c.resolution() > r {
        return Err(invalid(
            format!("cells[{i}]"),
            format!(
                "finer than insights.resolution ({}); counts exist only at that resolution or coarser",
                config.insights.resolution
            ),
        ));
    }
    // Checked before expanding: a resolution-0 cell stands for millions of released cells.
    if u8::from(c.resolution()) < config.insights.min_query_resolution {
        return Err(invalid(
            format!("cells[{i}]"),
            format!(
                "coarser than insights.min_query_resolution ({}); query finer cells",
                config.insights.min_query_resolution
            ),
        ));
    }
    Ok(c.children(r).map(u64::from).collect())
}

/// Answers a query of `merchant` from released tables only.
pub async fn foot_traffic(
    store: &Store,
    settings: &Settings,
    merchant: &Merchant,
    cells_in: &[u64],
    start: Timestamp,
    end: Timestamp,
    granularity: Granularity,
) -> Result<Vec<Point>, QueryError> {
    let config = &settings.config;
    if cells_in.is_empty() {
        return Err(invalid("cells", "at least one cell is required"));
    }
    if cells_in.len() > MAX_CELLS {
        return Err(invalid(
            "cells",
            format!("at most {MAX_CELLS} cells per query"),
        ));
    }
    check_range(start, end)?;
    check_points(cells_in.len(), config, start, end, granularity)?;
    let area: Option<BTreeSet<u64>> = match config.insights.scope {
        InsightsScope::OwnArea => Some(domain::merchant_area(merchant, config)),
        InsightsScope::All => None,
    };
    let mut groups = Vec::with_capacity(cells_in.len());
    let mut seen = BTreeSet::new();
    let mut covered = 0_u64;
    for (i, cell) in cells_in.iter().enumerate() {
        let m = members(*cell, config, i)?;
        // A cell listed twice is one series: answers never depend on how often it is named.
        if !seen.insert(*cell) {
            continue;
        }
        covered += m.len() as u64;
        if covered > MAX_MEMBERS {
            return Err(invalid(
                "cells",
                format!(
                    "the cells cover more than {MAX_MEMBERS} released cells; query fewer or finer cells"
                ),
            ));
        }
        if let Some(area) = &area
            && m.iter().any(|c| !area.contains(c))
        {
            return Err(QueryError::OutsideArea(*cell));
        }
        groups.push((*cell, m));
    }
    answer(store, settings, groups, start, end, granularity).await
}

/// The whole of `merchant`'s own area as one series (the sum of its released cells, with the
/// interval widened for every noisy term); points carry `cell = 0`.
pub async fn area_total(
    store: &Store,
    settings: &Settings,
    merchant: &Merchant,
    start: Timestamp,
    end: Timestamp,
    granularity: Granularity,
) -> Result<Vec<Point>, QueryError> {
    check_range(start, end)?;
    check_points(1, &settings.config, start, end, granularity)?;
    let area: Vec<u64> = domain::merchant_area(merchant, &settings.config)
        .into_iter()
        .collect();
    answer(store, settings, vec![(0, area)], start, end, granularity).await
}

/// Refuses a query whose answer could hold more than [`MAX_POINTS`] points, before any read.
fn check_points(
    series: usize,
    config: &Config,
    start: Timestamp,
    end: Timestamp,
    granularity: Granularity,
) -> Result<(), QueryError> {
    let period_ms = match granularity {
        Granularity::Hour => config.insights.bucket.as_secs().max(1) * 1000,
        Granularity::Day => 86_400_000,
    };
    let span = u64::try_from(end.millis() - start.millis()).unwrap_or(0);
    let points = (series as u64).saturating_mul(span.div_ceil(period_ms));
    if points > MAX_POINTS {
        return Err(invalid(
            "end",
            format!(
                "the answer could hold {points} points (cells × periods), more than {MAX_POINTS}; \
                 shorten the range, ask for days, or query fewer cells"
            ),
        ));
    }
    Ok(())
}

/// Checks a query's time range (shared by every merchant read).
pub(crate) fn check_range(start: Timestamp, end: Timestamp) -> Result<(), QueryError> {
    if end <= start {
        return Err(invalid("end", "must be after start"));
    }
    if end.millis() - start.millis() > MAX_RANGE_DAYS * 86_400_000 {
        return Err(invalid(
            "end",
            format!("the range may span at most {MAX_RANGE_DAYS} days"),
        ));
    }
    Ok(())
}

/// Sums released values per (group, period): `groups` are (label, member cells).
async fn answer(
    store: &Store,
    settings: &Settings,
    groups: Vec<(u64, Vec<u64>)>,
    start: Timestamp,
    end: Timestamp,
    granularity: Granularity,
) -> Result<Vec<Point>, QueryError> {
    let config = &settings.config;
    // Each released row is read once, however many requested cells (a cell and its parent,
    // say) it belongs to; each series then sums its own members once.
    let all: Vec<u64> = groups
        .iter()
        .flat_map(|(_, m)| m.iter().copied())
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .collect();
    // Days come from the daily release (distinct devices per UTC day, its own noise), never
    // from sums of hours; a day is in the answer if it overlaps [start, end).
    let (released, ledger) = match granularity {
        Granularity::Hour => (
            store.released(&all, start, end).await?,
            store.ledger(start, end).await?,
        ),
        Granularity::Day => {
            let first = Timestamp(start.millis().div_euclid(DAY_MS) * DAY_MS);
            (
                store.released_days(&all, first, end).await?,
                store.daily_ledger(first, end).await?,
            )
        }
    };
    let ledger: HashMap<i64, (Mechanism, f64)> = ledger
        .into_iter()
        .map(|e| {
            let mech = if e.mechanism == "discrete_laplace" {
                Mechanism::DiscreteLaplace
            } else {
                Mechanism::DiscreteGaussian
            };
            (e.bucket.millis(), (mech, e.scale))
        })
        .collect();
    let by_cell: HashMap<u64, Vec<_>> = released.iter().fold(HashMap::new(), |mut m, r| {
        m.entry(r.cell).or_insert_with(Vec::new).push(*r);
        m
    });
    let threshold = i64::from(config.privacy.threshold);
    let default_noise = (
        mechanism_of(config.privacy.mechanism),
        match granularity {
            Granularity::Hour => settings.consequences.privacy.noise_scale,
            Granularity::Day => settings.consequences.privacy.daily.noise_scale,
        },
    );
    let mut out = Vec::new();
    for (cell, members) in groups {
        // (period start) -> (sum of noisy values, noise terms)
        let mut periods: BTreeMap<i64, (i64, Vec<(Mechanism, f64)>)> = BTreeMap::new();
        for m in &members {
            for r in by_cell.get(m).into_iter().flatten() {
                let period = r.bucket.millis();
                let e = periods.entry(period).or_default();
                e.0 += r.noisy;
                e.1.push(
                    ledger
                        .get(&r.bucket.millis())
                        .copied()
                        .unwrap_or(default_noise),
                );
            }
        }
        for (period, (sum, terms)) in periods {
            let half = half_width(&terms);
            let suppressed = sum < threshold;
            // A suppressed point shows no value, and its interval says only "below the
            // threshold, give or take the noise".
            let (low, high) = if suppressed {
                (0.0, threshold as f64 + half)
            } else {
                ((sum as f64 - half).max(0.0), sum as f64 + half)
            };
            out.push(Point {
                cell,
                bucket_start: Timestamp(period),
                count: if suppressed { 0 } else { sum },
                suppressed,
                ci95_low: low,
                ci95_high: high,
            });
        }
    }
    Ok(out)
}

/// 95% half-width of a sum of independent noise terms: exact for one term, the normal
/// approximation over the summed variances for more.
fn half_width(terms: &[(Mechanism, f64)]) -> f64 {
    match terms {
        [] => 0.0,
        [(Mechanism::DiscreteGaussian, s)] => accounting::ci95_half_width_gaussian(*s),
        [(Mechanism::DiscreteLaplace, s)] => accounting::ci95_half_width_laplace(*s),
        _ => {
            let var: f64 = terms
                .iter()
                .map(|(m, s)| {
                    let sd = match m {
                        Mechanism::DiscreteGaussian => accounting::discrete_gaussian_std(*s),
                        Mechanism::DiscreteLaplace => accounting::discrete_laplace_std(*s),
                    };
                    sd * sd
                })
                .sum();
            (1.96 * var.sqrt()).ceil()
        }
    }
}
