//! The released domain: the public set of cells, fixed before data arrives, in which foot
//! traffic is counted and released — the union of `grid_disk(location, insights.radius_k)`
//! over registered merchants' locations, minus sensitive exclusion areas.

use std::collections::BTreeSet;

use h3o::CellIndex;

use crate::cells;
use crate::clock::Timestamp;
use crate::config::Config;
use crate::model::Merchant;

/// `cell` at `res`: its parent if finer; `None` if coarser (it cannot be attributed to one
/// cell at `res`, and when unsure hexveil counts nothing).
pub fn at_resolution(cell: u64, res: u8) -> Option<u64> {
    let c = CellIndex::try_from(cell).ok()?;
    let r = cells::resolution(res);
    match c.resolution().cmp(&r) {
        std::cmp::Ordering::Less => None,
        std::cmp::Ordering::Equal => Some(cell),
        std::cmp::Ordering::Greater => c.parent(r).map(u64::from),
    }
}

/// The cells around one location, at `insights.resolution`.
pub fn area_of(location: u64, config: &Config) -> BTreeSet<u64> {
    let Ok(c) = CellIndex::try_from(location) else {
        return BTreeSet::new();
    };
    let r = cells::resolution(config.insights.resolution);
    let centre = if c.resolution() > r {
        c.parent(r)
    } else {
        c.center_child(r)
    };
    let Some(centre) = centre else {
        return BTreeSet::new();
    };
    centre
        .grid_disk::<Vec<_>>(config.insights.radius_k)
        .into_iter()
        .map(u64::from)
        .filter(|c| !cells::excluded(*c, &config.exclusions.cells))
        .collect()
}

/// A merchant's own area (what `insights.scope = "own_area"` lets it read).
pub fn merchant_area(m: &Merchant, config: &Config) -> BTreeSet<u64> {
    m.cells.iter().flat_map(|c| area_of(*c, config)).collect()
}

/// The domain of a bucket starting at `at`: merchants registered before it and not revoked
/// by then.
pub fn domain(merchants: &[Merchant], config: &Config, at: Timestamp) -> BTreeSet<u64> {
    merchants
        .iter()
        .filter(|m| m.created_at <= at && m.revoked_at.is_none_or(|r| r > at))
        .flat_map(|m| merchant_area(m, config))
        .collect()
}
