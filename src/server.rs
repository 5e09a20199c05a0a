//! Wires everything together: opens the store, builds the services, serves gRPC and HTTP on
//! already-bound listeners, runs the background jobs, reloads config, shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::pb::consent_service_server::ConsentServiceServer;
use crate::api::pb::merchant_service_server::MerchantServiceServer;
use crate::api::pb::presence_service_server::PresenceServiceServer;
use crate::api::pb::transparency_service_server::TransparencyServiceServer;
use crate::api::{
    ConsentApi, MerchantApi, MerchantAuthLayer, PresenceApi, TransparencyApi,
    metrics_layer::GrpcMetricsLayer,
};
use crate::clock::SharedClock;
use crate::consent::Consents;
use crate::devices::Devices;
use crate::offers::{OfferIndex, Offers};
use crate::presence::Presence;
use crate::privacy::Insights;
use crate::pseudonym::{DEVICE_KEY_ENV, Pseudonymizer};
use crate::reload::{ConfigSource, Reloader};
use crate::settings::{LiveSettings, Settings};
use crate::store::Store;
use crate::transport::{Limits, MAX_REPLY_BYTES, ShedLayer, TrackLayer};

/// How often idle devices are looked for.
const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often the offer index is reloaded from the store (changes made by other processes,
/// such as `hexveil merchant revoke`, or other nodes).
const OFFER_REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How often due foot-traffic buckets are looked for.
const RELEASE_EVERY: Duration = Duration::from_secs(5);
/// How long in-flight requests get to finish after a shutdown signal. Every acknowledged
/// write is already committed, so cutting idle connections after this loses nothing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The running application's shared parts.
#[derive(Debug, Clone)]
pub struct App {
    pub settings: LiveSettings,
    pub store: Store,
    pub clock: SharedClock,
    pub pseudonyms: Pseudonymizer,
    pub consents: Consents,
    pub devices: Arc<Devices>,
    pub presence: Presence,
    pub offers: Offers,
    pub insights: Insights,
}

impl App {
    /// Opens the store named by `settings` and builds the domain services.
    pub async fn open(settings: Settings, clock: SharedClock) -> anyhow::Result<App> {
        let data_dir = settings.config.store.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("store.data_dir: cannot create {}", data_dir.display()))?;
        let key = std::env::var(DEVICE_KEY_ENV).ok();
        let pseudonyms = Pseudonymizer::load_or_create(key.as_deref(), &data_dir)?;
        let store = Store::open_with_reserve(
            &settings.config.store.url,
            settings.config.store.min_free_mb << 20,
        )
        .await
        .context("store.url: cannot open the store")?;
        let settings = LiveSettings::new(settings);
        let devices = Arc::new(Devices::default());
        let index = Arc::new(OfferIndex::default());
        let consents = Consents::new(
            store.clone(),
            devices.clone(),
            clock.clone(),
            settings.clone(),
        );
        let insights = Insights::new(store.clone(), clock.clone(), settings.clone());
        insights.load().await?;
        let presence = Presence::new(
            devices.clone(),
            index.clone(),
            store.clone(),
            clock.clone(),
            settings.clone(),
            insights.clone(),
        )
        .with_nodes(crate::nodes::Nodes::in_data_dir(store.clone(), &data_dir))
        .with_consent_locks(consents.locks());
        let offers = Offers::new(store.clone(), index, clock.clone(), settings.clone());
        // Rebuild in-memory state so caps hold across restarts.
        let started = std::time::Instant::now();
        let notifications = store.load_notifications(crate::clock::Timestamp(0)).await?;
        // The flood guard (like offer budgets, in `offers.refresh`) counts deliveries, which
        // erasure keeps: a ForgetMe before a restart gives nothing back.
        let minute_ago = clock.now().minus(Duration::from_secs(60));
        presence.load_flood(
            &store
                .load_deliveries(minute_ago)
                .await?
                .into_iter()
                .map(|(_, cell, at)| (cell, at))
                .collect::<Vec<_>>(),
        );
        devices.load(
            store.load_devices().await?,
            notifications,
            store.load_restrictions().await?,
        );
        let released_through = store
            .last_release()
            .await?
            .unwrap_or(crate::clock::Timestamp(i64::MIN));
        devices.load_contributions(
            store.load_contributions().await?,
            store.load_contribution_spend(released_through).await?,
            store.load_daily_contributions().await?,
        );
        offers.refresh().await?;
        tracing::info!(
            devices = devices.len(),
            offers = offers.index().len(),
            took_ms = started.elapsed().as_millis() as u64,
            "state loaded"
        );
        Ok(App {
            settings,
            store,
            clock,
            pseudonyms,
            consents,
            devices,
            presence,
            offers,
            insights,
        })
    }
}

/// The names health reports on ("" is the whole server).
const SERVICES: [&str; 5] = [
    "",
    "hexveil.v1.ConsentService",
    "hexveil.v1.TransparencyService",
    "hexveil.v1.PresenceService",
    "hexveil.v1.MerchantService",
];

/// Resolves once `rx` says the server is stopping.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs `job` every `period` until the server stops (a late tick is delayed, not bunched).
fn periodic<F, Fut>(
    jobs: &mut tokio::task::JoinSet<()>,
    period: Duration,
    stop: watch::Receiver<bool>,
    mut job: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    jobs.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = stopped(stop);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => job().await,
                () = &mut stop => break,
            }
        }
    });
}

/// Addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// Serves `app` on the given listeners until `shutdown` resolves, then drains and returns
/// (without the operator's metrics listener; see [`run_with_metrics`]).
pub async fn run(
    app: App,
    source: ConfigSource,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_metrics(app, source, grpc, http, None, shutdown).await
}

/// Like [`run`], also serving Prometheus `/metrics` on the operator-only `metrics` listener
/// (`server.metrics_listen`) — never on the merchant-facing HTTP port.
pub async fn run_with_metrics(
    app: App,
    source: ConfigSource,
    grpc: TcpListener,
    http: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Metrics are recorded from the first request whether or not a metrics listener is
    // served (an embedding program or a test may render them itself).
    let _ = crate::telemetry::prometheus();
    let (stop_tx, stop_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let consent = ConsentApi::new(app.consents.clone(), app.pseudonyms.clone());
    let transparency = TransparencyApi::new(
        app.consents.clone(),
        app.pseudonyms.clone(),
        app.settings.clone(),
    );
    let presence = PresenceApi::new(
        app.presence.clone(),
        app.pseudonyms.clone(),
        app.settings.clone(),
        app.clock.clone(),
    );
    // One auth layer for gRPC and the dashboard's JSON API: same keys, one rate limit per key.
    let merchant_auth =
        MerchantAuthLayer::new(app.store.clone(), app.settings.clone(), app.clock.clone());
    // Transport bounds are read once, like the listen addresses (a reload keeps them).
    let server_config = app.settings.current().config.server.clone();
    let limits = Limits::from_config(&server_config);
    let device_max = server_config.max_device_message_bytes as usize;
    let merchant = tower::ServiceBuilder::new()
        .layer(merchant_auth.clone())
        .service(
            MerchantServiceServer::new(MerchantApi::new(
                app.offers.clone(),
                app.store.clone(),
                app.settings.clone(),
            ))
            .max_decoding_message_size(server_config.max_merchant_message_bytes as usize)
            .max_encoding_message_size(MAX_REPLY_BYTES),
        );
    let grpc_server = limits
        .grpc_server()
        .layer(TrackLayer)
        .layer(GrpcMetricsLayer)
        .layer(ShedLayer::new(limits.max_in_flight))
        .add_service(health_service.max_decoding_message_size(device_max))
        .add_service(reflection_v1.max_decoding_message_size(device_max))
        .add_service(reflection_v1alpha.max_decoding_message_size(device_max))
        .add_service(
            ConsentServiceServer::new(consent)
                .max_decoding_message_size(device_max)
                .max_encoding_message_size(MAX_REPLY_BYTES),
        )
        .add_service(
            TransparencyServiceServer::new(transparency)
                .max_decoding_message_size(device_max)
                .max_encoding_message_size(MAX_REPLY_BYTES),
        )
        .add_service(
            PresenceServiceServer::new(presence)
                .max_decoding_message_size(device_max)
                .max_encoding_message_size(MAX_REPLY_BYTES),
        )
        .add_service(merchant)
        .serve_with_incoming_shutdown(
            crate::transport::incoming(grpc, limits),
            stopped(stop_rx.clone()),
        );

    let web = crate::web::router(crate::web::WebDeps {
        store: app.store.clone(),
        settings: app.settings.clone(),
        clock: app.clock.clone(),
        offers: app.offers.clone(),
        auth: merchant_auth,
    });
    let http_server = async {
        crate::transport::serve_http(http, web, limits, stopped(stop_rx.clone())).await;
        anyhow::Ok(())
    };
    // The operator's listener (metrics) gets the same transport bounds as the merchant one.
    let metrics_server = {
        let stop = stopped(stop_rx.clone());
        let store = app.store.clone();
        async move {
            if let Some(l) = metrics {
                crate::transport::serve_http(l, crate::web::operator_router(store), limits, stop)
                    .await;
            }
            anyhow::Ok(())
        }
    };

    let mut jobs = tokio::task::JoinSet::new();
    {
        let consents = app.consents.clone();
        periodic(
            &mut jobs,
            RETENTION_SWEEP_EVERY,
            stop_rx.clone(),
            move || {
                let consents = consents.clone();
                async move {
                    if let Err(e) = consents.expire_idle().await {
                        tracing::warn!(error = %e, "retention sweep failed; will retry");
                    }
                }
            },
        );
    }
    {
        let (insights, store) = (app.insights.clone(), app.store.clone());
        periodic(&mut jobs, RELEASE_EVERY, stop_rx.clone(), move || {
            let (insights, store) = (insights.clone(), store.clone());
            async move {
                // The store being down means nothing is released: never fail open. (The
                // release's own write would be refused too; this skips the noise drawing.)
                if !store.is_writable() {
                    return;
                }
                if let Err(e) = insights.release_due().await {
                    tracing::warn!(error = %e, "foot-traffic release failed; will retry");
                }
            }
        });
    }
    {
        // Membership of the nodes sharing the store: a first beat before serving (a node
        // joining live ones learns it must wait for them), then one every HEARTBEAT.
        let nodes = app.presence.nodes().clone();
        nodes.start_serving();
        if let Err(e) = nodes.beat().await {
            tracing::warn!(error = %e, "node heartbeat failed; will retry");
        }
        periodic(
            &mut jobs,
            crate::nodes::HEARTBEAT,
            stop_rx.clone(),
            move || {
                let nodes = nodes.clone();
                async move {
                    if let Err(e) = nodes.beat().await {
                        tracing::warn!(error = %e, "node heartbeat failed; will retry");
                    }
                }
            },
        );
    }
    {
        let (offers, insights) = (app.offers.clone(), app.insights.clone());
        periodic(&mut jobs, OFFER_REFRESH_EVERY, stop_rx.clone(), move || {
            let (offers, insights) = (offers.clone(), insights.clone());
            async move {
                if let Err(e) = offers.refresh().await {
                    tracing::warn!(error = %e, "offer index refresh failed; will retry");
                }
                if let Err(e) = insights.refresh_domain().await {
                    tracing::warn!(error = %e, "domain refresh failed; will retry");
                }
            }
        });
    }
    {
        // The store's writer finds out whether it can write (failed commits, a periodic probe,
        // the file's identity); health follows it both ways without a restart.
        let mut writable = app.store.writable_changes();
        let health = health.clone();
        let stop = stop_rx.clone();
        jobs.spawn(async move {
            let stop = stopped(stop);
            tokio::pin!(stop);
            loop {
                let ok = *writable.borrow_and_update();
                let status = if ok {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                for name in SERVICES {
                    health.set_service_status(name, status).await;
                }
                tokio::select! {
                    changed = writable.changed() => if changed.is_err() { break },
                    () = &mut stop => break,
                }
            }
        });
    }
    {
        let data_dir = app.settings.current().config.store.data_dir.clone();
        let reloader = Arc::new(Reloader::new(
            source,
            app.settings.clone(),
            app.clock.clone(),
            &data_dir,
        ));
        jobs.spawn(reloader.watch(stopped(stop_rx.clone())));
    }

    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: draining requests");
        let _ = stop_tx.send(true);
    });

    let servers = async { tokio::join!(grpc_server, http_server, metrics_server) };
    tokio::pin!(servers);
    let drain_deadline = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        (g, h, m) = &mut servers => {
            g.context("gRPC server failed")?;
            h.context("HTTP server failed")?;
            m.context("metrics server failed")?;
        }
        () = drain_deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "clients kept connections open; closing them");
        }
    }
    // Jobs stop at the signal; one stuck in a store call must not hold the process past the
    // drain timeout, so what is left after another drain period is cancelled.
    let joined = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while jobs.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("background jobs did not stop in time; cancelling them");
        jobs.abort_all();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
