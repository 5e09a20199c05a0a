//! A tower layer that counts gRPC requests and times them per method and status code.
//!
//! The code is read from the response headers (tonic sends errors as trailers-only
//! responses); a response without `grpc-status` in its headers is counted as `OK`. For
//! streaming calls that is the status of the stream's start, which is what a latency
//! histogram of stream set-up should show.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

/// Adds `hexveil_grpc_requests_total` and `hexveil_grpc_request_duration_seconds`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service produced by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// Bounded label values: known services keep their path, anything else is "unknown", so a
/// client cannot grow the metric set without limit.
fn method_label(path: &str) -> String {
    const KNOWN: [&str; 4] = [
        "/hexveil.v1.",
        "/grpc.health.v1.",
        "/grpc.reflection.v1.",
        "/grpc.reflection.v1alpha.",
    ];
    if KNOWN.iter().any(|p| path.starts_with(p)) && path.len() < 128 {
        path.trim_start_matches('/').to_string()
    } else {
        "unknown".to_string()
    }
}

fn code_label(code: Option<&http::HeaderValue>) -> &'static str {
    let Some(n) = code
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
    else {
        return "OK";
    };
    match tonic::Code::from(n) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => code_label(resp.headers().get("grpc-status")),
                Err(_) => "TRANSPORT_ERROR",
            };
            metrics::counter!("hexveil_grpc_requests_total", "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("hexveil_grpc_request_duration_seconds", "method" => method, "code" => code)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/hexveil.v1.ConsentService/SetConsent"),
            "hexveil.v1.ConsentService/SetConsent"
        );
        assert_eq!(method_label("/evil/with-random-path-123"), "unknown");
        assert_eq!(code_label(None), "OK");
        assert_eq!(
            code_label(Some(&http::HeaderValue::from_static("3"))),
            "INVALID_ARGUMENT"
        );
    }
}
