//! Transport bounds on both listeners, so that no client holds more of the server than the
//! config allows: connections per listener, HTTP/2 streams per connection, idle and
//! header-read time, keep-alive pings, and (gRPC) calls in flight, shed at once beyond it.
//!
//! Built from what hyper, tonic and tower already provide; what is here is the glue:
//! - [`incoming`] accepts connections under a per-listener limit, and backs off instead of
//!   spinning when `accept` fails (out of file descriptors);
//! - [`Tracked`] is an accepted connection that knows how many requests it has in flight and
//!   closes itself once it has had none for `server.idle_timeout` — HTTP/2 has no idle timeout
//!   of its own, and hyper's keep-alive pings keep a silent client's connection busy forever;
//! - [`TrackLayer`] (gRPC) and [`serve_http`] (HTTP) count each request in flight until its
//!   response body is finished, so a long `StreamPresence` is not "idle";
//! - [`ShedLayer`] is tower's `GlobalConcurrencyLimit` under `LoadShed`, answering an
//!   over-limit call RESOURCE_EXHAUSTED at once; `grpc.health.v1` passes around it so health
//!   checks answer under any load.
//!
//! Architecture invariant: every listener is served through [`incoming`], so every accepted
//! connection holds a slot of `server.max_connections` and has an idle deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShed;
use tower::load_shed::error::Overloaded;
use tower::{Layer, Service, ServiceExt};

use crate::config::ServerConfig;

/// Longest pause after a failed `accept` (doubling from [`ACCEPT_BACKOFF_MIN`]).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// First pause after a failed `accept`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// HTTP/2 streams a client may reset (or have reset) before its connection is closed; hyper's
/// own default, set explicitly because tonic otherwise leaves it unlimited.
const MAX_RESET_STREAMS: usize = 1024;
/// Largest reply of a hexveil service: the biggest answer (a foot-traffic query at its
/// 100,000-point cap) is about 5 MB, and a reply waiting for a slow reader stays in memory.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// The one gRPC service that is never shed: load balancers must be able to ask.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The bounds of one listener, from the `[server]` config keys.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Limits {
    pub fn from_config(s: &ServerConfig) -> Limits {
        Limits {
            max_connections: s.max_connections as usize,
            max_concurrent_streams: s.max_concurrent_streams,
            max_in_flight: s.max_in_flight as usize,
            request_timeout: s.request_timeout.get(),
            idle_timeout: s.idle_timeout.get(),
            header_read_timeout: s.header_read_timeout.get(),
            keepalive_interval: s.keepalive_interval.get(),
            keepalive_timeout: s.keepalive_timeout.get(),
        }
    }

    /// The gRPC server builder with these bounds.
    pub fn grpc_server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .http2_max_pending_accept_reset_streams(Some(MAX_RESET_STREAMS))
            .http2_max_local_error_reset_streams(Some(MAX_RESET_STREAMS))
            .timeout(self.request_timeout)
    }
}

/// Milliseconds since the first use, for atomics (an `Instant` is not atomic).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
        })
    }

    /// Counts a request until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// One request in flight on a connection (see [`Activity::start`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle clock is set before the count drops, so a reader that sees zero also sees
        // a time no earlier than this request's end.
        self.0.idle_since_ms.store(now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// When a connection with `in_flight` requests, idle since `idle_since`, may be closed: never
/// while a request is in flight (so, a timeout from now), else a timeout after the last one.
fn idle_deadline_ms(in_flight: usize, idle_since: u64, now: u64, timeout: Duration) -> u64 {
    let timeout = timeout.as_millis() as u64;
    if in_flight > 0 {
        now + timeout
    } else {
        idle_since + timeout
    }
}

/// What tonic puts in each request's extensions about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub activity: Arc<Activity>,
}

/// An accepted connection: holds a slot of the listener's connection limit until dropped,
/// and reads end-of-stream once it has had no request in flight for the idle timeout.
#[derive(Debug)]
pub struct Tracked {
    stream: TcpStream,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Tracked {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
        idle_timeout: Duration,
    ) -> Tracked {
        Tracked {
            stream,
            info: ConnInfo {
                remote,
                activity: Activity::new(),
            },
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
        }
    }

    /// `Ready` once the connection has been idle for the timeout; otherwise re-arms the
    /// timer for the earliest moment it could be.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.idle.as_mut().poll(cx));
            let activity = &self.info.activity;
            let now = now_ms();
            let deadline = idle_deadline_ms(
                activity.in_flight.load(Ordering::SeqCst),
                activity.idle_since_ms.load(Ordering::SeqCst),
                now,
                self.idle_timeout,
            );
            if deadline <= now {
                return Poll::Ready(());
            }
            let wait = Duration::from_millis(deadline - now);
            self.idle.as_mut().reset(tokio::time::Instant::now() + wait);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // Nothing to read. hyper always has a read pending, so this timer is what ends a
        // connection that holds no request: it reads as closed by the peer.
        match this.poll_idle(cx) {
            Poll::Ready(()) => {
                metrics::counter!("hexveil_connections_idle_closed_total").increment(1);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Whether an `accept` error concerns only the one connection (retry at once) rather than
/// the process (out of descriptors or memory: retrying at once would spin).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Accepts the next connection once a slot is free.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>, limits: &Limits) -> Tracked {
    // At the limit, stop accepting: new clients wait in the kernel's backlog (or time out)
    // rather than costing a descriptor and a task each.
    // Unwrap safety: the semaphore is never closed.
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .expect("connection slots are never closed");
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                return Tracked::new(stream, remote, slot, limits.idle_timeout);
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                metrics::counter!("hexveil_accept_errors_total").increment(1);
                tracing::warn!(error = %e, pause = ?backoff, "accept failed; pausing before the next");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// The connections of `listener`, each within the limits (for tonic's
/// `serve_with_incoming_shutdown`).
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = Result<Tracked, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| async move {
        let conn = accept(&listener, &slots, &limits).await;
        Some((Ok(conn), (listener, slots)))
    })
}

/// A response body that keeps a guard alive until the body is finished or dropped.
#[derive(Debug)]
pub struct Guarded<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> http_body::Body for Guarded<B, G>
where
    B: http_body::Body + Unpin,
    G: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Counts every gRPC call in flight on its connection (see [`Tracked`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackLayer;

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// The service of [`TrackLayer`].
#[derive(Debug, Clone)]
pub struct Track<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Track<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.start());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(match guard {
                Some(guard) => res.map(|inner| {
                    tonic::body::Body::new(Guarded {
                        inner,
                        _guard: guard,
                    })
                }),
                None => res,
            })
        })
    }
}

/// Sheds gRPC calls beyond `server.max_in_flight` (over all connections) with
/// RESOURCE_EXHAUSTED at once, instead of queueing them without bound.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    limit: GlobalConcurrencyLimitLayer,
}

impl ShedLayer {
    pub fn new(max_in_flight: usize) -> ShedLayer {
        ShedLayer {
            limit: GlobalConcurrencyLimitLayer::new(max_in_flight),
        }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            limited: LoadShed::new(self.limit.layer(inner.clone())),
            inner,
        }
    }
}

/// The service of [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    limited: LoadShed<tower::limit::ConcurrencyLimit<S>>,
}

impl<S, B> Service<http::Request<B>> for Shed<S>
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
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is decided per call below (a clone is driven to ready there), so that a
        // health check never waits behind the limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.clone().oneshot(req));
        }
        let limited = self.limited.clone();
        Box::pin(async move {
            match limited.oneshot(req).await {
                Ok(res) => Ok(res),
                Err(e) => {
                    if !e.is::<Overloaded>() {
                        // The inner service is infallible and the limit only ever refuses.
                        tracing::error!(error = %e, "unexpected error from the load shedder");
                    }
                    metrics::counter!("hexveil_grpc_shed_total").increment(1);
                    Ok(overloaded().into_http())
                }
            }
        })
    }
}

/// The status of a shed call: retry after a short pause.
fn overloaded() -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "the server is at capacity; retry shortly",
        ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
    )
}

/// Serves the HTTP router on `listener` within `limits` until `shutdown` resolves, then asks
/// every connection to finish (the caller bounds how long that may take).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_pending_accept_reset_streams(MAX_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_RESET_STREAMS);
    let builder = Arc::new(builder);
    let shed = HttpShed::new(router, limits.max_in_flight);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // `stop` tells connections to finish; `open` counts them (its receivers).
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            conn = accept(&listener, &slots, &limits) => conn,
            () = &mut shutdown => break,
        };
        let service = HttpConn {
            shed: shed.clone(),
            activity: conn.info.activity.clone(),
        };
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            let conn = builder.serve_connection(TokioIo::new(conn), service);
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    changed = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}

/// Paths never shed: health for load balancers, metrics for whoever watches the overload.
const HTTP_NEVER_SHED: [&str; 2] = ["/healthz", "/metrics"];

/// The router behind tower's `GlobalConcurrencyLimit` + `LoadShed`: past `max_in_flight`
/// requests (over all connections) a request is answered 503 at once.
#[derive(Clone)]
struct HttpShed {
    router: axum::Router,
    limited: LoadShed<tower::limit::ConcurrencyLimit<axum::Router>>,
}

impl HttpShed {
    fn new(router: axum::Router, max_in_flight: usize) -> HttpShed {
        HttpShed {
            limited: LoadShed::new(
                GlobalConcurrencyLimitLayer::new(max_in_flight).layer(router.clone()),
            ),
            router,
        }
    }

    async fn call<B>(self, req: http::Request<B>) -> http::Response<axum::body::Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if HTTP_NEVER_SHED.contains(&req.uri().path()) {
            let Ok(res) = self.router.oneshot(req).await;
            return res;
        }
        match self.limited.oneshot(req).await {
            Ok(res) => res,
            Err(e) => {
                if !e.is::<Overloaded>() {
                    tracing::error!(error = %e, "unexpected error from the load shedder");
                }
                metrics::counter!("hexveil_http_shed_total").increment(1);
                // Built here, outside the router, so the router's headers are set by hand.
                let mut res = http::Response::new(axum::body::Body::from(
                    "the server is at capacity; retry shortly\n",
                ));
                *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                let h = res.headers_mut();
                h.insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                h.insert(
                    http::header::X_CONTENT_TYPE_OPTIONS,
                    http::HeaderValue::from_static("nosniff"),
                );
                h.insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                res
            }
        }
    }
}

/// The router as one connection's service: sheds past capacity and counts requests in
/// flight on the connection.
#[derive(Clone)]
struct HttpConn {
    shed: HttpShed,
    activity: Arc<Activity>,
}

impl<B> Service<http::Request<B>> for HttpConn
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<axum::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = self.activity.start();
        let shed = self.shed.clone();
        Box::pin(async move {
            let res = shed.call(req).await;
            Ok(res.map(|inner| {
                axum::body::Body::new(Guarded {
                    inner,
                    _guard: guard,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> http::Request<axum::body::Body> {
        http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn http_requests_past_capacity_are_shed_but_health_is_not() {
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let entered = Arc::new(std::sync::Mutex::new(Some(entered_tx)));
        let release = Arc::new(tokio::sync::Notify::new());
        let held = release.clone();
        let router = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(move || {
                    let (entered, held) = (entered.clone(), held.clone());
                    async move {
                        if let Some(tx) = entered.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        held.notified().await;
                        "done"
                    }
                }),
            )
            .route("/fast", axum::routing::get(|| async { "fast" }))
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        let shed = HttpShed::new(router, 1);
        let slow = tokio::spawn(shed.clone().call(get("/slow")));
        entered_rx.await.unwrap();

        let refused = shed.clone().call(get("/fast")).await;
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[http::header::RETRY_AFTER], "1");
        let health = shed.clone().call(get("/healthz")).await;
        assert_eq!(health.status(), http::StatusCode::OK);

        release.notify_one();
        assert_eq!(slow.await.unwrap().status(), http::StatusCode::OK);
        let fast = shed.clone().call(get("/fast")).await;
        assert_eq!(fast.status(), http::StatusCode::OK);
    }

    #[test]
    fn a_connection_is_idle_only_without_requests_in_flight() {
        let timeout = Duration::from_secs(10);
        // A request in flight pushes the deadline out, however long it runs.
        assert_eq!(idle_deadline_ms(1, 0, 30_000, timeout), 40_000);
        // Without one, the deadline counts from when the last one ended.
        assert_eq!(idle_deadline_ms(0, 25_000, 30_000, timeout), 35_000);
        assert_eq!(idle_deadline_ms(0, 0, 30_000, timeout), 10_000);
    }
}
