//! The dashboard's JSON API under `/api/v1/`: the merchant's area (with cell boundaries for
//! the map), released foot traffic, its offers, their released (noisy) delivery and open
//! statistics per day, and the privacy parameters in plain words. Every number here comes
//! from a released table or the config — none is computed from raw rows.
//!
//! Every route authenticates `Authorization: Bearer <key>` through the gRPC service's own
//! [`crate::api::MerchantAuthLayer`] (same keys, same per-key rate limit) and answers from the
//! same domain calls ([`query::foot_traffic`], [`crate::offers::Offers::list`]), so the
//! browser can never see more than a gRPC client could. Errors are JSON
//! `{"error": "...", "field": ...}` with 400, 401, 403, 404, 429 (and `Retry-After`) or 503.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use h3o::CellIndex;
use serde::Serialize;
use serde_json::json;

use crate::api::ApiError;
use crate::cells;
use crate::clock::{Timestamp, duration_millis};
use crate::model::Merchant;
use crate::privacy::query::{self, Granularity, Point};
use crate::privacy::{domain, offer_stats};
use crate::store::StoreError;

use super::WebState;

/// The JSON routes (nested under `/api/v1`).
pub(super) fn routes() -> axum::Router<WebState> {
    axum::Router::new()
        .route("/me", get(me))
        .route("/foot-traffic", get(foot_traffic))
        .route("/foot-traffic/area", get(area_traffic))
        .route("/offers", get(offers))
        .route("/offer-stats", get(offer_stats))
        .route("/privacy", get(privacy))
        .fallback(|| async {
            JsonError(ApiError::NotFound(
                "no such API route (see /api/v1/me, /foot-traffic, /foot-traffic/area, /offers, /offer-stats, /privacy)",
            ))
        })
}

/// An API error as an HTTP response: the one map from [`ApiError`] to status codes here.
pub(super) struct JsonError(ApiError);

impl From<ApiError> for JsonError {
    fn from(e: ApiError) -> Self {
        JsonError(e)
    }
}

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        let body = |status: StatusCode, error: String, field: Option<String>| {
            (status, Json(json!({ "error": error, "field": field }))).into_response()
        };
        let mut res = match self.0 {
            ApiError::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|(f, d)| format!("{f}: {d}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let field = violations.into_iter().next().map(|(f, _)| f);
                body(StatusCode::BAD_REQUEST, message, field)
            }
            ApiError::NotFound(what) => body(StatusCode::NOT_FOUND, what.to_string(), None),
            ApiError::Unauthenticated => {
                let mut r = body(
                    StatusCode::UNAUTHORIZED,
                    "missing or invalid API key (send Authorization: Bearer <key>)".into(),
                    None,
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::PermissionDenied(why) => {
                body(StatusCode::FORBIDDEN, why, Some("cells".into()))
            }
            ApiError::RateLimited { retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut r = body(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("rate limited; retry after {secs} s"),
                    None,
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                r
            }
            ApiError::Store(err) => {
                metrics::counter!("hexveil_store_errors_total", "kind" => err.error_code())
                    .increment(1);
                match err {
                    StoreError::Unavailable(detail) => {
                        tracing::warn!(%detail, "store unavailable");
                        body(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the store is unavailable; try again shortly".into(),
                            None,
                        )
                    }
                    StoreError::Config(detail)
                    | StoreError::Corrupt(detail)
                    | StoreError::Rejected(detail) => {
                        tracing::error!(%detail, "internal store error");
                        body(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal error".into(),
                            None,
                        )
                    }
                }
            }
        };
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res
    }
}

/// The merchant a request authenticated as.
pub(super) struct Authed(Merchant);

impl FromRequestParts<WebState> for Authed {
    type Rejection = JsonError;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> Result<Self, JsonError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let merchant = state.deps.auth.authenticate(header).await?;
        Ok(Authed(merchant))
    }
}

/// Query parameters, each taken once; anything left over is refused by name.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(q: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Self, ApiError> {
        let Query(pairs) = q.map_err(|e| ApiError::field("query", e.body_text()))?;
        Ok(Params(pairs))
    }

    fn take(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        let mut found = None;
        let mut i = 0;
        while i < self.0.len() {
            if self.0[i].0 == name {
                if found.is_some() {
                    return Err(ApiError::field(name, "given more than once"));
                }
                found = Some(self.0.remove(i).1);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    fn finish(self) -> Result<(), ApiError> {
        match self.0.first() {
            Some((k, _)) => Err(ApiError::field(k.clone(), "unknown parameter")),
            None => Ok(()),
        }
    }

    fn time(&mut self, name: &str) -> Result<Timestamp, ApiError> {
        let v = self
            .take(name)?
            .ok_or_else(|| ApiError::field(name, "required (milliseconds since the Unix epoch)"))?;
        match v
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(Timestamp::from_unix_millis)
        {
            Some(t) => Ok(t),
            None => Err(ApiError::field(
                name,
                format!("{v:?} is not a time in milliseconds since the Unix epoch (1970-3000)"),
            )),
        }
    }

    fn granularity(&mut self) -> Result<Granularity, ApiError> {
        match self.take("granularity")?.as_deref() {
            None | Some("hour") => Ok(Granularity::Hour),
            Some("day") => Ok(Granularity::Day),
            Some(other) => Err(ApiError::field(
                "granularity",
                format!("{other:?} must be \"hour\" or \"day\""),
            )),
        }
    }
}

fn hex(cell: u64) -> String {
    format!("{cell:x}")
}

#[derive(Serialize)]
struct AreaCell {
    cell: String,
    /// Boundary vertices as `[lat, lng]` in degrees.
    boundary: Vec<[f64; 2]>,
    /// Whether one of the merchant's locations is in this cell.
    location: bool,
}

async fn me(State(state): State<WebState>, Authed(m): Authed) -> Result<Response, JsonError> {
    let settings = state.deps.settings.current();
    let config = &settings.config;
    let r = cells::resolution(config.insights.resolution);
    let locations: BTreeSet<u64> = m
        .cells
        .iter()
        .filter_map(|c| CellIndex::try_from(*c).ok())
        .filter_map(|c| {
            if c.resolution() > r {
                c.parent(r)
            } else {
                c.center_child(r)
            }
        })
        .map(u64::from)
        .collect();
    let area: Vec<AreaCell> = domain::merchant_area(&m, config)
        .into_iter()
        .filter_map(|c| CellIndex::try_from(c).ok())
        .map(|c| AreaCell {
            cell: hex(u64::from(c)),
            boundary: c.boundary().iter().map(|p| [p.lat(), p.lng()]).collect(),
            location: locations.contains(&u64::from(c)),
        })
        .collect();
    let ins = &config.insights;
    Ok(Json(json!({
        "merchant_id": m.merchant_id.to_string(),
        "name": m.name,
        "locations": m.cells.iter().map(|c| hex(*c)).collect::<Vec<_>>(),
        "resolution": ins.resolution,
        "area": area,
        "server_time": state.deps.clock.now().millis(),
        "bucket_ms": duration_millis(ins.bucket.get()),
        "grace_ms": duration_millis(ins.grace.get()),
    }))
    .into_response())
}

fn point_json(p: &Point, cell: Option<String>) -> serde_json::Value {
    json!({
        "cell": cell,
        "bucket_start": p.bucket_start.millis(),
        "count": p.count,
        "suppressed": p.suppressed,
        "ci95_low": p.ci95_low,
        "ci95_high": p.ci95_high,
    })
}

fn parse_cells(v: &str) -> Result<Vec<u64>, ApiError> {
    v.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, s)| {
            u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .ok()
                .filter(|c| CellIndex::try_from(*c).is_ok())
                .ok_or_else(|| {
                    ApiError::field(
                        format!("cells[{i}]"),
                        format!("{s:?} is not an H3 cell index in hex"),
                    )
                })
        })
        .collect()
}

async fn foot_traffic(
    State(state): State<WebState>,
    Authed(m): Authed,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, JsonError> {
    let settings = state.deps.settings.current();
    let mut p = Params::new(q)?;
    let start = p.time("start")?;
    let end = p.time("end")?;
    let granularity = p.granularity()?;
    let cells = match p.take("cells")? {
        Some(v) => parse_cells(&v)?,
        // The whole own area, one series per cell.
        None => domain::merchant_area(&m, &settings.config)
            .into_iter()
            .collect(),
    };
    p.finish()?;
    let points = query::foot_traffic(
        &state.deps.store,
        &settings,
        &m,
        &cells,
        start,
        end,
        granularity,
    )
    .await
    .map_err(ApiError::from)?;
    Ok(Json(json!({
        "points": points.iter().map(|p| point_json(p, Some(hex(p.cell)))).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn area_traffic(
    State(state): State<WebState>,
    Authed(m): Authed,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, JsonError> {
    let settings = state.deps.settings.current();
    let mut p = Params::new(q)?;
    let start = p.time("start")?;
    let end = p.time("end")?;
    let granularity = p.granularity()?;
    p.finish()?;
    let points = query::area_total(&state.deps.store, &settings, &m, start, end, granularity)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(json!({
        "points": points.iter().map(|p| point_json(p, None)).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn offers(State(state): State<WebState>, Authed(m): Authed) -> Result<Response, JsonError> {
    let deps = &state.deps;
    let list = deps.offers.list(&m).await.map_err(ApiError::from)?;
    let offers: Vec<serde_json::Value> = list
        .iter()
        .map(|o| {
            json!({
                "offer_id": o.offer_id.to_string(),
                "title": o.title,
                "body": o.body,
                "cell": hex(o.cell),
                "radius_k": o.radius_k,
                "valid_from": o.valid_from.millis(),
                "valid_until": o.valid_until.millis(),
                "max_notifications_per_day": o.max_notifications_per_day,
            })
        })
        .collect();
    Ok(Json(json!({ "offers": offers })).into_response())
}

/// Released offer statistics per offer and UTC day (`start`/`end` in ms; days starting in
/// the range), with 95% intervals.
async fn offer_stats(
    State(state): State<WebState>,
    Authed(m): Authed,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, JsonError> {
    let mut p = Params::new(q)?;
    let start = p.time("start")?;
    let end = p.time("end")?;
    p.finish()?;
    let points = offer_stats::query(&state.deps.store, &m, start, end)
        .await
        .map_err(ApiError::from)?;
    let os = &state
        .deps
        .settings
        .current()
        .consequences
        .privacy
        .offer_stats;
    Ok(Json(json!({
        "stats": points.iter().map(|p| json!({
            "offer_id": p.offer_id.to_string(),
            "day": p.day.millis(),
            "deliveries": p.deliveries,
            "deliveries_ci95_low": p.deliveries_ci95.0,
            "deliveries_ci95_high": p.deliveries_ci95.1,
            "opens": p.opens,
            "opens_ci95_low": p.opens_ci95.0,
            "opens_ci95_high": p.opens_ci95.1,
        })).collect::<Vec<_>>(),
        "noise_std_dev": os.noise_std_dev,
        "ci95_half_width": os.ci95_half_width,
    }))
    .into_response())
}

async fn privacy(State(state): State<WebState>, Authed(_): Authed) -> Result<Response, JsonError> {
    let s = state.deps.settings.current();
    let c = &s.config;
    let dp = &s.consequences.privacy;
    Ok(Json(json!({
        "mechanism": dp.mechanism,
        "epsilon_per_device_per_day": dp.epsilon_per_device_per_day,
        "max_epsilon_per_device_per_day": c.privacy.max_epsilon_per_device_per_day,
        "delta": dp.delta,
        "noise_std_dev": dp.noise_std_dev,
        "ci95_half_width": dp.ci95_half_width,
        "day_total_ci95_half_width": dp.day_total_ci95_half_width,
        "threshold": dp.threshold,
        "bucket": c.insights.bucket.to_string(),
        "resolution": c.insights.resolution,
        "cell_area_km2": cells::average_area_km2(c.insights.resolution),
        "max_cells_per_bucket": c.privacy.max_cells_per_bucket,
        "contributions_per_day": dp.contributions_per_day,
        "offer_stats_noise_std_dev": dp.offer_stats.noise_std_dev,
        "offer_stats_ci95_half_width": dp.offer_stats.ci95_half_width,
        "daily_noise_std_dev": dp.daily.noise_std_dev,
        "daily_ci95_half_width": dp.daily.ci95_half_width,
        "max_cells_per_day": c.privacy.max_cells_per_day,
        "budget": dp.budget,
        "budget_explanation": crate::policy::budget_explanation(&s),
        "explanation": crate::policy::foot_traffic_explanation(&s),
    }))
    .into_response())
}
