//! Logs (tracing) and metrics (Prometheus) set-up, once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
/// How often histogram samples are folded into their buckets when nobody scrapes.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use.
///
/// Several in-process servers (as in tests) share it; a recorder can only be installed once.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let latency_buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &latency_buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("hexveil_store_commit_batch_size".to_string()),
                        &[
                            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                            2048.0,
                        ],
                    )
                })
                // Unwrap safety: the bucket lists above are non-empty constants.
                .expect("static bucket lists are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Histograms keep raw samples until they are folded into buckets; without this
            // upkeep that happens only when /metrics is scraped, so an unscraped server would
            // grow by every request. A thread, because the first caller may have no runtime.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".to_string())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the metrics upkeep thread");
            }
            // Another recorder may already be installed by an embedding program; then our
            // handle still renders what it saw, and we do not fight over the global.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Installs the tracing subscriber: human-readable by default, JSON with
/// `HEXVEIL_LOG_FORMAT=json`; filtered by `RUST_LOG` (default `info`). Logs go to stderr.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::env::var("HEXVEIL_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
}
