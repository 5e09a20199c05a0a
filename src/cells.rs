//! H3 cell handling: validation, coarsening to the finest resolution hexveil keeps, areas.
//!
//! Only H3 cells ever enter hexveil, never coordinates. A cell finer than
//! `location.max_resolution` is coarsened here before anything else sees it (or rejected).

use h3o::{CellIndex, Resolution};

use crate::config::FinerCells;

/// Why a cell was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    #[error("{0:#x} is not a valid H3 cell index")]
    NotACell(u64),
    #[error("cell resolution {found} is finer than the maximum {max} this deployment keeps")]
    TooFine { found: u8, max: u8 },
}

/// Parses a raw H3 index and brings it to at most `max_resolution`.
pub fn admit(raw: u64, max_resolution: u8, finer: FinerCells) -> Result<CellIndex, CellError> {
    let cell = CellIndex::try_from(raw).map_err(|_| CellError::NotACell(raw))?;
    let res = u8::from(cell.resolution());
    if res <= max_resolution {
        return Ok(cell);
    }
    match finer {
        FinerCells::Reject => Err(CellError::TooFine {
            found: res,
            max: max_resolution,
        }),
        FinerCells::Coarsen => {
            let target = resolution(max_resolution);
            // Unwrap safety: `target` is coarser than the cell's own resolution, so a parent
            // always exists.
            Ok(cell.parent(target).expect("coarser parent exists"))
        }
    }
}

/// A resolution from a validated config value (0..=15).
pub fn resolution(r: u8) -> Resolution {
    Resolution::try_from(r.min(15)).unwrap_or(Resolution::Fifteen)
}

/// Average area of one cell at `res`, in km².
pub fn average_area_km2(res: u8) -> f64 {
    resolution(res).area_km2()
}

#[cfg(test)]
mod tests {
    use super::*;
    use h3o::LatLng;

    fn cell_at(res: Resolution) -> CellIndex {
        LatLng::new(48.8566, 2.3522).unwrap().to_cell(res)
    }

    #[test]
    fn coarsens_fine_cells_to_their_parent() {
        let fine = cell_at(Resolution::Twelve);
        let got = admit(u64::from(fine), 8, FinerCells::Coarsen).unwrap();
        assert_eq!(got, fine.parent(Resolution::Eight).unwrap());
        assert_eq!(u8::from(got.resolution()), 8);
    }

    #[test]
    fn keeps_cells_at_or_above_the_limit_and_rejects_by_config() {
        let ok = cell_at(Resolution::Seven);
        assert_eq!(admit(u64::from(ok), 8, FinerCells::Reject).unwrap(), ok);
        let fine = cell_at(Resolution::Nine);
        assert_eq!(
            admit(u64::from(fine), 8, FinerCells::Reject),
            Err(CellError::TooFine { found: 9, max: 8 })
        );
    }

    #[test]
    fn refuses_non_cells() {
        assert_eq!(
            admit(0, 8, FinerCells::Coarsen),
            Err(CellError::NotACell(0))
        );
        assert!(admit(u64::MAX, 8, FinerCells::Coarsen).is_err());
    }

    #[test]
    fn resolution_eight_is_under_one_square_km() {
        let a = average_area_km2(8);
        assert!(a > 0.5 && a < 1.0, "{a}");
    }
}

/// Whether `cell` touches a sensitive exclusion area: it lies inside one (an excluded cell
/// is its ancestor or itself), or it contains one (a coarse cell holding an excluded area is
/// ambiguous, and when unsure hexveil sends less).
pub fn excluded(cell: u64, exclusions: &[crate::config::CellSpec]) -> bool {
    let Ok(c) = CellIndex::try_from(cell) else {
        return true;
    };
    exclusions.iter().any(|e| {
        let Ok(e) = CellIndex::try_from(e.0) else {
            return false;
        };
        if c.resolution() >= e.resolution() {
            c.parent(e.resolution()) == Some(e)
        } else {
            e.parent(c.resolution()) == Some(c)
        }
    })
}

#[cfg(test)]
mod exclusion_tests {
    use super::*;
    use crate::config::CellSpec;

    #[test]
    fn inside_and_containing_cells_are_excluded() {
        let clinic = h3o::LatLng::new(40.7, -74.0)
            .unwrap()
            .to_cell(Resolution::Nine);
        let ex = [CellSpec(clinic.into())];
        assert!(excluded(clinic.into(), &ex));
        let child = clinic.center_child(Resolution::Eleven).unwrap();
        assert!(excluded(child.into(), &ex));
        let parent = clinic.parent(Resolution::Seven).unwrap();
        assert!(
            excluded(parent.into(), &ex),
            "a coarse cell containing it is ambiguous"
        );
        let elsewhere = h3o::LatLng::new(41.7, -74.0)
            .unwrap()
            .to_cell(Resolution::Nine);
        assert!(!excluded(elsewhere.into(), &ex));
    }
}
