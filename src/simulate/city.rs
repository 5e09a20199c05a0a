//! The simulated city: merchants, their offers and the population's shape, either the demo
//! city of `hexveil serve --demo` or an operator's JSON file (format in the README).
//!
//! A JSON city is checked field by field; every error names the JSON path at fault
//! (`merchants[1].offers[0].radius_k: ...`), so an operator can fix the file without reading
//! code.

use std::path::Path;

use h3o::{CellIndex, LatLng, Resolution};
use serde::{Deserialize, Serialize};

use crate::demo::{ACTIVITY, Routine, SHOPS};
use crate::model::OpeningHours;

/// A city could not be read; the message names the file or the JSON path.
#[derive(Debug, thiserror::Error)]
pub enum CityError {
    /// The file could not be read.
    #[error("--city {path}: cannot read it: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or a field is wrong; `path` is the JSON path (`""` for the root).
    #[error("--city {file}: {path}: {message}")]
    Field {
        file: String,
        path: String,
        message: String,
    },
}

/// The city to simulate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct City {
    /// Shown in the report.
    #[serde(default = "unnamed")]
    pub name: String,
    /// At least one merchant; each is registered through `merchants::add`.
    pub merchants: Vec<MerchantSpec>,
    /// How people move and react; every field has the demo's default.
    #[serde(default)]
    pub population: PopulationSpec,
}

fn unnamed() -> String {
    "unnamed city".into()
}

/// One merchant: a location (an H3 cell, or a latitude and longitude) and its offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSpec {
    pub name: String,
    /// An H3 index in hex; coarsened to `location.max_resolution` like any merchant's cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// Degrees (WGS84); used when `cell` is absent, at resolution 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lng: Option<f64>,
    #[serde(default)]
    pub offers: Vec<OfferSpec>,
}

/// One offer at its merchant's location.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferSpec {
    pub title: String,
    #[serde(default)]
    pub body: String,
    /// Grid rings around the merchant's cell where the offer is eligible.
    #[serde(default = "one")]
    pub radius_k: u32,
    /// The offer's own daily budget.
    #[serde(default = "hundred")]
    pub max_per_day: u32,
    /// Local opening hours every day, `"HH:MM-HH:MM"`; absent: always open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<String>,
}

fn one() -> u32 {
    1
}
fn hundred() -> u32 {
    100
}

/// The population's shape: when people are out, where they live and work, what they
/// consent to and how they react to an offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopulationSpec {
    /// Share of people out and reporting in each local hour (24 values, 0..=1).
    pub activity: Vec<f64>,
    /// Share of people living near a shop (the others anywhere in the released areas).
    pub home_near_shop: f64,
    /// Share of people working near a shop.
    pub work_near_shop: f64,
    /// Share of outings followed by a second place half an hour later.
    pub second_place: f64,
    /// Every device's offset from UTC (its quiet hours are local).
    pub utc_offset_minutes: i32,
    /// Share of devices consenting to nearby offers.
    pub consent_offers: f64,
    /// Share of devices consenting to foot-traffic counting.
    pub consent_foot_traffic: f64,
    /// Share of delivered offers opened, dismissed, or whose merchant is muted (the rest
    /// are ignored); the three add up to at most 1.
    pub opened: f64,
    pub dismissed: f64,
    pub muted: f64,
}

impl Default for PopulationSpec {
    fn default() -> Self {
        let r = Routine::DEMO;
        PopulationSpec {
            activity: ACTIVITY.to_vec(),
            home_near_shop: r.home_near_shop,
            work_near_shop: r.work_near_shop,
            second_place: r.second_place,
            utc_offset_minutes: 0,
            consent_offers: 1.0,
            consent_foot_traffic: 1.0,
            opened: 0.15,
            dismissed: 0.25,
            muted: 0.02,
        }
    }
}

impl PopulationSpec {
    /// The daily routine the demo's model runs on.
    pub(crate) fn routine(&self) -> Routine {
        let mut activity = [0.0; 24];
        activity.copy_from_slice(&self.activity);
        Routine {
            activity,
            home_near_shop: self.home_near_shop,
            work_near_shop: self.work_near_shop,
            second_place: self.second_place,
        }
    }
}

/// A merchant ready to register: its cell and offers' opening hours resolved.
#[derive(Debug, Clone)]
pub struct ResolvedMerchant {
    pub name: String,
    pub cell: CellIndex,
    /// (offer, opening hours) in file order.
    pub offers: Vec<(OfferSpec, Vec<OpeningHours>)>,
}

impl City {
    /// The demo city of `hexveil serve --demo` (its shops, offers and daily routine).
    pub fn demo() -> City {
        City {
            name: "demo (Lisbon, as `hexveil serve --demo`)".into(),
            merchants: SHOPS
                .iter()
                .map(|(name, lat, lng, offers)| MerchantSpec {
                    name: name.to_string(),
                    cell: None,
                    lat: Some(*lat),
                    lng: Some(*lng),
                    offers: offers
                        .iter()
                        .map(|(title, body, radius_k, per_day)| OfferSpec {
                            title: title.to_string(),
                            body: body.to_string(),
                            radius_k: *radius_k,
                            max_per_day: *per_day,
                            hours: None,
                        })
                        .collect(),
                })
                .collect(),
            population: PopulationSpec::default(),
        }
    }

    /// `demo`, or a JSON file.
    pub fn load(arg: &str) -> Result<City, CityError> {
        if arg == "demo" {
            return Ok(City::demo());
        }
        let text = std::fs::read_to_string(Path::new(arg)).map_err(|source| CityError::Io {
            path: arg.to_string(),
            source,
        })?;
        City::parse(&text, arg)
    }

    /// Parses and checks a JSON city; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<City, CityError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let city: City = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            CityError::Field {
                file: file.to_string(),
                path: if path == "." { String::new() } else { path },
                message: e.into_inner().to_string(),
            }
        })?;
        city.check().map_err(|(path, message)| CityError::Field {
            file: file.to_string(),
            path,
            message,
        })?;
        Ok(city)
    }

    /// Checks values serde cannot: ranges, cells, hours. Returns the first (path, problem).
    fn check(&self) -> Result<(), (String, String)> {
        if self.merchants.is_empty() {
            return Err(("merchants".into(), "at least one merchant is needed".into()));
        }
        for (i, m) in self.merchants.iter().enumerate() {
            resolve(m, i)?;
        }
        let p = &self.population;
        if p.activity.len() != 24 {
            return Err((
                "population.activity".into(),
                format!(
                    "needs 24 values (one per local hour), got {}",
                    p.activity.len()
                ),
            ));
        }
        for (h, a) in p.activity.iter().enumerate() {
            share(&format!("population.activity[{h}]"), *a)?;
        }
        for (key, v) in [
            ("home_near_shop", p.home_near_shop),
            ("work_near_shop", p.work_near_shop),
            ("second_place", p.second_place),
            ("consent_offers", p.consent_offers),
            ("consent_foot_traffic", p.consent_foot_traffic),
            ("opened", p.opened),
            ("dismissed", p.dismissed),
            ("muted", p.muted),
        ] {
            share(&format!("population.{key}"), v)?;
        }
        if p.opened + p.dismissed + p.muted > 1.0 {
            return Err((
                "population.opened".into(),
                "opened + dismissed + muted must be at most 1".into(),
            ));
        }
        if p.utc_offset_minutes.abs() > 14 * 60 {
            return Err((
                "population.utc_offset_minutes".into(),
                "must be within -840..=840".into(),
            ));
        }
        Ok(())
    }

    /// Every merchant with its cell and opening hours resolved.
    pub fn resolved(&self) -> Result<Vec<ResolvedMerchant>, (String, String)> {
        self.merchants
            .iter()
            .enumerate()
            .map(|(i, m)| resolve(m, i))
            .collect()
    }
}

fn share(path: &str, v: f64) -> Result<(), (String, String)> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err((path.into(), format!("{v} is not a share between 0 and 1")))
    }
}

fn resolve(m: &MerchantSpec, i: usize) -> Result<ResolvedMerchant, (String, String)> {
    let at = |field: &str| format!("merchants[{i}].{field}");
    let cell = match (&m.cell, m.lat, m.lng) {
        (Some(hex), None, None) => u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .ok()
            .and_then(|raw| CellIndex::try_from(raw).ok())
            .ok_or_else(|| {
                (
                    at("cell"),
                    format!("{hex:?} is not an H3 cell index in hex"),
                )
            })?,
        (None, Some(lat), Some(lng)) => LatLng::new(lat, lng)
            .map_err(|e| (at("lat"), format!("not a valid position: {e}")))?
            .to_cell(Resolution::Eight),
        (None, None, _) | (None, _, None) => {
            return Err((at("cell"), "give either cell, or lat and lng".into()));
        }
        _ => {
            return Err((
                at("cell"),
                "give either cell, or lat and lng, not both".into(),
            ));
        }
    };
    let mut offers = Vec::with_capacity(m.offers.len());
    for (j, o) in m.offers.iter().enumerate() {
        let hours = match &o.hours {
            None => Vec::new(),
            Some(h) => {
                let bad = || {
                    (
                        format!("merchants[{i}].offers[{j}].hours"),
                        format!("{h:?} is not \"HH:MM-HH:MM\" with the opening before the closing"),
                    )
                };
                let (a, b) = h.split_once('-').ok_or_else(bad)?;
                let open = crate::offers::parse_hhmm(a.trim()).ok_or_else(bad)?;
                let close = crate::offers::parse_hhmm(b.trim()).ok_or_else(bad)?;
                if open >= close {
                    return Err(bad());
                }
                (1..=7)
                    .map(|weekday| OpeningHours {
                        weekday,
                        open,
                        close,
                    })
                    .collect()
            }
        };
        offers.push((o.clone(), hours));
    }
    Ok(ResolvedMerchant {
        name: m.name.clone(),
        cell,
        offers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        City::parse(text, "city.json").unwrap_err().to_string()
    }

    #[test]
    fn the_demo_city_passes_its_own_checks() {
        let demo = City::demo();
        demo.check().unwrap();
        let json = serde_json::to_string(&demo).unwrap();
        assert_eq!(City::parse(&json, "demo.json").unwrap(), demo);
    }

    #[test]
    fn the_documented_example_city_parses() {
        let city = City::parse(include_str!("../../docs/city.example.json"), "example").unwrap();
        assert_eq!(city.merchants.len(), 3);
        let resolved = city.resolved().unwrap();
        assert_eq!(resolved[0].offers[0].1.len(), 7, "hours apply every day");
        assert_eq!(u64::from(resolved[2].cell), 0x0883_9336_2bbf_ffff);
    }

    #[test]
    fn errors_name_the_json_path() {
        let m = r#"{"name": "A", "cell": "88283082a7fffff", "offers": [{"title": "t", "radius_k": "x"}]}"#;
        assert!(
            err(&format!(r#"{{"merchants": [{m}]}}"#)).contains("merchants[0].offers[0].radius_k"),
            "{}",
            err(&format!(r#"{{"merchants": [{m}]}}"#))
        );
        let e = err(r#"{"merchants": [{"name": "A", "cell": "zz"}]}"#);
        assert!(e.contains("merchants[0].cell"), "{e}");
        let e = err(
            r#"{"merchants": [{"name": "A", "lat": 1.0, "lng": 2.0}], "population": {"opened": 2}}"#,
        );
        assert!(e.contains("population.opened"), "{e}");
        let e = err(
            r#"{"merchants": [{"name": "A", "lat": 1.0, "lng": 2.0}], "population": {"activity": [0.5]}}"#,
        );
        assert!(e.contains("population.activity"), "{e}");
        let e = err(r#"{"merchants": [{"name": "A", "lat": 1.0, "lng": 2.0, "colour": 1}]}"#);
        assert!(e.contains("merchants[0]") && e.contains("colour"), "{e}");
        let e = err(
            r#"{"merchants": [{"name": "A", "lat": 1.0, "lng": 2.0, "offers": [{"title": "t", "hours": "18:00-09:00"}]}]}"#,
        );
        assert!(e.contains("merchants[0].offers[0].hours"), "{e}");
        let e = err(r#"{"merchants": []}"#);
        assert!(e.starts_with("--city city.json: merchants:"), "{e}");
        let e = err("{");
        assert!(e.starts_with("--city city.json: "), "{e}");
    }
}
