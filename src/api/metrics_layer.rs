//! A tower layer that counts gRPC requests and times them per method and status code.
//!
//! The code is read from the response headers (tonic sends errors as trailers-only
//! responses); a response without `grpc-status` in its headers is counted as `OK`. For
//! streaming calls that is the status of the stream's start, which is what a latency
//! histogram of stream set-up should show.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
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

/// Label of every call to a method the server does not have.
const UNKNOWN: &str = "unknown";

/// Every method the server serves, as `/package.Service/Method`: read from the descriptor
/// sets it registers (so a new RPC is labelled without touching this file), plus reflection.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known: HashSet<String> = [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for set in [
            super::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // A set that does not decode would be a build error; it then only means fewer
            // labels, never an unbounded one.
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        known
    })
}

/// Bounded label values: a method the server has keeps its path, anything else shares the
/// one `"unknown"` label, so no client can grow the metric set (SPEC: metric memory bounded).
fn method_label(path: &str) -> &'static str {
    match known_methods().get(path) {
        Some(known) => &known[1..],
        None => UNKNOWN,
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
            metrics::counter!("hexveil_grpc_requests_total", "method" => method, "code" => code)
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
        assert_eq!(
            method_label("/hexveil.v1.ConsentService/Made-up-42"),
            "unknown"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(code_label(None), "OK");
        assert_eq!(
            code_label(Some(&http::HeaderValue::from_static("3"))),
            "INVALID_ARGUMENT"
        );
    }
}
