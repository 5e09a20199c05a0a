//! The HTTP listeners: the merchant-facing one (the dashboard with its assets embedded in the
//! binary, its JSON API under `/api/v1/` ([`api`]) and `/healthz`), and the operator-only one
//! ([`operator_router`]: Prometheus `/metrics` and `/healthz`, on `server.metrics_listen`).
//!
//! Architecture invariant: exact operational counters (offers delivered, reasons, consents…)
//! are never served on the merchant-facing port — only on the operator listener.
//!
//! Architecture invariants: the JSON API calls the same domain code as the gRPC
//! `MerchantService` and authenticates through the same [`MerchantAuthLayer`] instance (one
//! per-key rate limit across both); every asset is compiled in, and the Content-Security-Policy
//! sent with every page response forbids the browser to load or send anything off the origin.

mod api;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::MerchantAuthLayer;
use crate::clock::SharedClock;
use crate::offers::Offers;
use crate::settings::LiveSettings;
use crate::store::Store;

/// What the HTTP layer needs from the application.
#[derive(Debug, Clone)]
pub struct WebDeps {
    pub store: Store,
    pub settings: LiveSettings,
    pub clock: SharedClock,
    pub offers: Offers,
    /// The same layer instance that guards the gRPC `MerchantService`.
    pub auth: MerchantAuthLayer,
}

#[derive(Clone)]
struct WebState {
    deps: WebDeps,
}

/// Nothing may be fetched from, or sent to, anywhere but this server.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("web/assets/index.html");
const APP_JS: &str = include_str!("web/assets/app.js");
const STYLE_CSS: &str = include_str!("web/assets/style.css");
const FAVICON_SVG: &str = include_str!("web/assets/favicon.svg");

/// The HTTP routes.
pub fn router(deps: WebDeps) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON_SVG) }),
        )
        .route("/healthz", get(healthz))
        // Merchant data in API answers must not sit in any cache, shared or private.
        .nest(
            "/api/v1",
            api::routes().layer(axum::middleware::map_response(no_store)),
        )
        .layer(axum::middleware::map_response(security_headers))
        .with_state(WebState { deps })
}

/// The operator-only routes, for `server.metrics_listen`: Prometheus `/metrics` and
/// `/healthz`. Never merged into [`router`].
pub fn operator_router(store: Store) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|State(s): State<OperatorState>| async move { health(&s.store).await }),
        )
        .layer(axum::middleware::map_response(security_headers))
        .with_state(OperatorState {
            store,
            prometheus: crate::telemetry::prometheus(),
        })
}

/// Headers every response carries, whichever route (or none) produced it: no content-type
/// sniffing, no referrer, and — unless the route set its own — the page policy, which is
/// harmless on non-HTML answers and protects an error page rendered as HTML by mistake.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(CSP));
    res
}

/// `Cache-Control: no-store` on the JSON API's answers.
async fn no_store(mut res: Response) -> Response {
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[derive(Clone)]
struct OperatorState {
    store: Store,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

async fn healthz(State(state): State<WebState>) -> impl IntoResponse {
    health(&state.deps.store).await
}

async fn health(store: &Store) -> impl IntoResponse + use<> {
    // Healthy means the store can both answer reads and take writes (as grpc.health.v1 says).
    if !store.is_writable() {
        return (StatusCode::SERVICE_UNAVAILABLE, "store cannot write\n");
    }
    match store.ping().await {
        Ok(()) => (StatusCode::OK, "ok\n"),
        Err(e) => {
            tracing::warn!(error = %e, "health check: store unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
    }
}

async fn metrics(State(state): State<OperatorState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}
