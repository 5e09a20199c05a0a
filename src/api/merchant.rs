//! `hexveil.v1.MerchantService`, and the one place merchant API keys are enforced: the
//! [`MerchantAuthLayer`] wrapped around the whole service. It authenticates
//! `authorization: Bearer <key>` against the store on every call (so a revocation applies at
//! once), applies the per-key rate limit, and hands the merchant to the handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tower::{Layer, Service};

use crate::caps;
use crate::clock::{SharedClock, Timestamp};
use crate::merchants::{self, MerchantError};
use crate::model::{Merchant, MerchantId, Offer};
use crate::offers::Offers;
use crate::privacy::offer_stats;
use crate::privacy::query::{self, Granularity};
use crate::settings::LiveSettings;
use crate::store::Store;

use super::convert;
use super::pb::{self, merchant_service_server::MerchantService};
use super::status::ApiError;
use super::validate::Violations;

/// The merchant a request was authenticated as (a request extension set by the layer).
#[derive(Debug, Clone)]
pub struct AuthenticatedMerchant(pub Arc<Merchant>);

/// Authenticates and rate-limits every call of the wrapped service.
#[derive(Debug, Clone)]
pub struct MerchantAuthLayer {
    store: Store,
    settings: LiveSettings,
    clock: SharedClock,
    limits: Arc<Mutex<HashMap<MerchantId, i64>>>,
}

impl MerchantAuthLayer {
    pub fn new(store: Store, settings: LiveSettings, clock: SharedClock) -> Self {
        MerchantAuthLayer {
            store,
            settings,
            clock,
            limits: Arc::default(),
        }
    }

    /// The merchant for `authorization` metadata, rate-limited per key.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Merchant, ApiError> {
        let key = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(ApiError::Unauthenticated)?;
        let merchant = merchants::authenticate(&self.store, key)
            .await
            .map_err(|e| match e {
                MerchantError::Store(s) => ApiError::Store(s),
                _ => ApiError::Unauthenticated,
            })?;
        let per_minute = self
            .settings
            .current()
            .config
            .rate_limits
            .merchant_queries_per_minute;
        let now: Timestamp = self.clock.now();
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let tat = limits.entry(merchant.merchant_id).or_insert(0);
        // GCRA with a one-minute burst: `per_minute` calls per minute, no more.
        caps::gcra(tat, now, per_minute.saturating_mul(60), per_minute)
            .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
        Ok(merchant)
    }
}

impl<S> Layer<S> for MerchantAuthLayer {
    type Service = MerchantAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MerchantAuth {
            inner,
            auth: self.clone(),
        }
    }
}

/// The service produced by [`MerchantAuthLayer`].
#[derive(Debug, Clone)]
pub struct MerchantAuth<S> {
    inner: S,
    auth: MerchantAuthLayer,
}

impl<S: NamedService> NamedService for MerchantAuth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for MerchantAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready service handles this call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match auth.authenticate(header.as_deref()).await {
                Ok(merchant) => {
                    req.extensions_mut()
                        .insert(AuthenticatedMerchant(Arc::new(merchant)));
                    inner.call(req).await
                }
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

fn merchant_of<T>(req: &Request<T>) -> Result<Arc<Merchant>, Status> {
    // Defence in depth: without the layer's extension the call is refused.
    req.extensions()
        .get::<AuthenticatedMerchant>()
        .map(|m| m.0.clone())
        .ok_or_else(|| ApiError::Unauthenticated.into())
}

/// The gRPC face of [`Offers`] and of released foot traffic.
#[derive(Debug, Clone)]
pub struct MerchantApi {
    offers: Offers,
    store: Store,
    settings: LiveSettings,
}

impl MerchantApi {
    pub fn new(offers: Offers, store: Store, settings: LiveSettings) -> Self {
        MerchantApi {
            offers,
            store,
            settings,
        }
    }
}

/// Most opening-hours entries on one offer (four windows on each day of the week).
pub const OPENING_HOURS_MAX: usize = 28;

fn timestamp(v: &mut Violations, field: &str, ts: &Option<prost_types::Timestamp>) -> Timestamp {
    match ts {
        None => {
            v.add(field, "required");
            Timestamp(0)
        }
        Some(t) => Timestamp::from_unix(t.seconds, t.nanos).unwrap_or_else(|| {
            v.add(field, "must be a valid time between 1970 and 3000");
            Timestamp(0)
        }),
    }
}

/// The wire offer as a domain offer, with every field checked that does not need the
/// merchant or the config (those checks are in [`crate::offers::validate`]).
fn offer_from_wire(o: Option<pb::Offer>) -> Result<Offer, ApiError> {
    let mut v = Violations::default();
    let Some(o) = o else {
        return Err(ApiError::field("offer", "required"));
    };
    let offer_id = if o.offer_id.is_empty() {
        uuid::Uuid::nil()
    } else {
        uuid::Uuid::try_parse(&o.offer_id).unwrap_or_else(|_| {
            v.add(
                "offer.offer_id",
                "must be empty (new offer) or the UUID of one of your offers",
            );
            uuid::Uuid::nil()
        })
    };
    let valid_from = timestamp(&mut v, "offer.valid_from", &o.valid_from);
    let valid_until = timestamp(&mut v, "offer.valid_until", &o.valid_until);
    let mut opening_hours = Vec::new();
    if o.opening_hours.len() > OPENING_HOURS_MAX {
        // Refused as a whole, before looking at any entry.
        return Err(ApiError::field(
            "offer.opening_hours",
            format!("at most {OPENING_HOURS_MAX} entries"),
        ));
    }
    for (i, h) in o.opening_hours.iter().enumerate() {
        match crate::offers::opening_hours(h.weekday, &h.open, &h.close) {
            Ok(h) => opening_hours.push(h),
            Err(part) => v.add(
                format!("offer.opening_hours[{i}].{part}"),
                "must be \"HH:MM\" (weekday 1-7)",
            ),
        }
    }
    v.finish()?;
    Ok(Offer {
        offer_id,
        merchant_id: uuid::Uuid::nil(),
        title: o.title,
        body: o.body,
        cell: o.cell,
        radius_k: o.radius_k,
        valid_from,
        valid_until,
        max_notifications_per_day: o.max_notifications_per_day,
        opening_hours,
        updated_at: Timestamp(0),
    })
}

#[tonic::async_trait]
impl MerchantService for MerchantApi {
    async fn upsert_offer(
        &self,
        request: Request<pb::UpsertOfferRequest>,
    ) -> Result<Response<pb::Offer>, Status> {
        let merchant = merchant_of(&request)?;
        let offer = offer_from_wire(request.into_inner().offer)?;
        let saved = self
            .offers
            .upsert(&merchant, offer)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::offer(&saved)))
    }

    async fn list_offers(
        &self,
        request: Request<pb::ListOffersRequest>,
    ) -> Result<Response<pb::ListOffersReply>, Status> {
        let merchant = merchant_of(&request)?;
        let offers = self.offers.list(&merchant).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListOffersReply {
            offers: offers.iter().map(convert::offer).collect(),
        }))
    }

    async fn delete_offer(
        &self,
        request: Request<pb::DeleteOfferRequest>,
    ) -> Result<Response<pb::DeleteOfferReply>, Status> {
        let merchant = merchant_of(&request)?;
        let id = uuid::Uuid::try_parse(&request.get_ref().offer_id)
            .map_err(|_| ApiError::field("offer_id", "must be the UUID of one of your offers"))?;
        self.offers
            .delete(&merchant, id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteOfferReply {}))
    }

    async fn get_foot_traffic(
        &self,
        request: Request<pb::GetFootTrafficRequest>,
    ) -> Result<Response<pb::GetFootTrafficReply>, Status> {
        let merchant = merchant_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let start = timestamp(&mut v, "start", &req.start);
        let end = timestamp(&mut v, "end", &req.end);
        let granularity = match pb::Granularity::try_from(req.granularity) {
            Ok(pb::Granularity::Day) => Granularity::Day,
            Ok(pb::Granularity::Hour | pb::Granularity::Unspecified) => Granularity::Hour,
            Err(_) => {
                v.add("granularity", "must be HOUR or DAY");
                Granularity::Hour
            }
        };
        v.finish()?;
        let settings = self.settings.current();
        let points = query::foot_traffic(
            &self.store,
            &settings,
            &merchant,
            &req.cells,
            start,
            end,
            granularity,
        )
        .await
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetFootTrafficReply {
            points: points
                .iter()
                .map(|p| pb::FootTrafficPoint {
                    cell: p.cell,
                    bucket_start: Some(convert::timestamp(p.bucket_start)),
                    count: p.count,
                    suppressed: p.suppressed,
                    ci95_low: p.ci95_low,
                    ci95_high: p.ci95_high,
                })
                .collect(),
            params: Some(convert::privacy_params(&settings)),
        }))
    }

    async fn get_offer_stats(
        &self,
        request: Request<pb::GetOfferStatsRequest>,
    ) -> Result<Response<pb::GetOfferStatsReply>, Status> {
        let merchant = merchant_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        let start = timestamp(&mut v, "start", &req.start);
        let end = timestamp(&mut v, "end", &req.end);
        v.finish()?;
        let settings = self.settings.current();
        let stats = offer_stats::query(&self.store, &merchant, start, end)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::GetOfferStatsReply {
            stats: stats
                .iter()
                .map(|p| pb::OfferStats {
                    offer_id: p.offer_id.to_string(),
                    day: Some(convert::timestamp(p.day)),
                    deliveries: p.deliveries,
                    deliveries_ci95_low: p.deliveries_ci95.0,
                    deliveries_ci95_high: p.deliveries_ci95.1,
                    opens: p.opens,
                    opens_ci95_low: p.opens_ci95.0,
                    opens_ci95_high: p.opens_ci95.1,
                })
                .collect(),
            params: Some(convert::privacy_params(&settings)),
            noise_std_dev: settings.consequences.privacy.offer_stats.noise_std_dev,
        }))
    }
}
