//! Tests of the real `hexveil` binary: durability under SIGKILL, hot reload, `config check`,
//! health and reflection, and that raw device tokens never reach the disk or the logs.

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use hexveil::api::pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn set(token: &str) -> pb::SetConsentRequest {
    consent_request(token, BOTH)
}

#[tokio::test]
async fn acknowledged_consents_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::spawn(dir.path(), &[]);
    let ch = connect(server.grpc).await;

    let single = consent_client(ch.clone())
        .set_consent(set(&token(1)))
        .await
        .unwrap()
        .into_inner();
    // A burst of 200 concurrent grants; kill -9 the moment the last acknowledgement is in.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..200 {
        let mut c = consent_client(ch.clone());
        tasks.spawn(async move {
            let r = c.set_consent(set(&token(100 + n))).await;
            (n, r.map(|r| r.into_inner()))
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (n, r) = done.unwrap();
        acked.push((n, r.expect("grant acknowledged")));
    }
    server.kill9();
    assert_eq!(acked.len(), 200);

    let restarted = BinServer::spawn(dir.path(), &[]);
    let ch = connect(restarted.grpc).await;
    let mut c = consent_client(ch);
    let got = c
        .get_consent(pb::GetConsentRequest {
            device_token: token(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.receipt_id, single.receipt_id);
    assert_eq!(got.purposes, single.purposes);
    for (n, receipt) in acked {
        let got = c
            .get_consent(pb::GetConsentRequest {
                device_token: token(100 + n),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged grant {n} lost after kill -9: {e}"))
            .into_inner();
        assert_eq!(got.receipt_id, receipt.receipt_id);
    }
}

#[tokio::test]
async fn raw_tokens_never_reach_the_database_or_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::spawn_with_env(dir.path(), &[], &[("RUST_LOG", "debug")]);
    let ch = connect(server.grpc).await;
    let secret = "SeCrEt-device-token-2f9a7c41d3";
    consent_client(ch.clone())
        .set_consent(set(secret))
        .await
        .unwrap();
    consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest {
            device_token: secret.into(),
        })
        .await
        .unwrap();
    transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: secret.into(),
        })
        .await
        .unwrap();
    // A bad request that echoes nothing of the token either.
    let bad = format!("{secret}!");
    let err = consent_client(ch.clone())
        .set_consent(set(&bad))
        .await
        .unwrap_err();
    assert!(!err.message().contains(secret));
    let log_path = server.stderr_path.clone();
    drop(ch);
    // SIGTERM so logs are flushed and the WAL checkpointed into the main file too.
    assert!(server.terminate().success());

    let mut scanned = 0;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        scanned += 1;
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "raw token found in {}",
            entry.display()
        );
    }
    if on_postgres() {
        // The database is not in the dir: scan every row of it as text (BYTEA as hex).
        let dump = dump_db(&db_for(dir.path())).await.join("\n");
        assert!(dump.contains("devices: "), "the database was scanned");
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(
            !dump.contains(secret) && !dump.contains(&hex),
            "raw token found in PostgreSQL"
        );
        assert!(scanned >= 2, "key and log files scanned");
    } else {
        assert!(scanned >= 3, "database, key and log files scanned");
    }
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("hexveil listening"), "debug log was captured");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn policy_cap(ch: tonic::transport::Channel) -> u32 {
    transparency_client(ch)
        .get_privacy_policy(pb::GetPrivacyPolicyRequest {})
        .await
        .unwrap()
        .into_inner()
        .caps
        .unwrap()
        .per_device_per_day
}

#[tokio::test]
async fn hot_reload_applies_valid_edits_and_refuses_broken_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    std::fs::write(&config, "[caps]\nper_device_per_day = 3\n").unwrap();
    let server = BinServer::spawn(dir.path(), &["--config", config.to_str().unwrap()]);
    let ch = connect(server.grpc).await;
    assert_eq!(policy_cap(ch.clone()).await, 3);

    std::fs::write(&config, "[caps]\nper_device_per_day = 2\n").unwrap();
    let changed = Instant::now();
    loop {
        if policy_cap(ch.clone()).await == 2 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "reload not seen within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken file is refused: the old value stays, and the refusal is logged and audited.
    std::fs::write(&config, "[caps]\nper_device_per_day = \"many\"\n").unwrap();
    let audit = dir.path().join("config-audit.jsonl");
    let written = Instant::now();
    loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.contains("\"refused\"") {
            assert!(text.contains("caps.per_device_per_day"), "{text}");
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "refusal not audited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(policy_cap(ch.clone()).await, 2);
    let http = reqwest_metrics(server.metrics).await;
    assert!(
        http.contains("hexveil_config_reloads_total{result=\"refused\"} 1"),
        "{http}"
    );
    assert!(
        http.contains("hexveil_config_reloads_total{result=\"accepted\"} 1"),
        "{http}"
    );

    // SIGHUP reloads too.
    std::fs::write(&config, "[caps]\nper_device_per_day = 1\n").unwrap();
    let pid = server.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let sent = Instant::now();
    while policy_cap(ch.clone()).await != 1 {
        assert!(sent.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(&server.stderr_path).unwrap();
    assert!(
        log.contains("caps.per_device_per_day"),
        "refusal logged with its key"
    );
}

/// GET /metrics over a plain TCP socket (no HTTP client dependency needed).
async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await.1
}

#[tokio::test]
async fn health_reflection_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::spawn(dir.path(), &[]);
    let ch = connect(server.grpc).await;
    let mut health = HealthClient::new(ch.clone());
    for service in [
        "",
        "hexveil.v1.ConsentService",
        "hexveil.v1.TransparencyService",
        "hexveil.v1.PresenceService",
        "hexveil.v1.MerchantService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    // Reflection v1 and v1alpha both list the services.
    use tonic_reflection::pb::{v1, v1alpha};
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "hexveil.v1.ConsentService",
        "hexveil.v1.TransparencyService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(format!("{resp:?}").contains("hexveil.v1.ConsentService"));

    consent_client(ch.clone())
        .set_consent(set(&token(5)))
        .await
        .unwrap();
    drop(ch);
    let (status, body) = http_get(server.http, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let metrics = reqwest_metrics(server.metrics).await;
    assert!(
        metrics.contains("hexveil_grpc_requests_total{method=\"hexveil.v1.ConsentService/SetConsent\",code=\"OK\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("hexveil_grpc_request_duration_seconds_bucket"));
    assert!(server.terminate().success(), "SIGTERM shuts down cleanly");
}

/// Exact deployment-wide counters are the operator's: the merchant-facing HTTP port (the
/// dashboard's) never serves them, with or without a merchant key; only the operator's own
/// listener (`server.metrics_listen`, loopback by default) does.
#[tokio::test]
async fn metrics_are_served_only_on_the_operator_listener() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::spawn(dir.path(), &[]);
    let ch = connect(server.grpc).await;
    consent_client(ch.clone())
        .set_consent(set(&token(6)))
        .await
        .unwrap();
    drop(ch);
    let (status, body) = http_get(server.http, "/metrics").await;
    assert_eq!(status, 404, "merchant port must not serve /metrics: {body}");
    assert!(!body.contains("hexveil_"), "{body}");
    let (status, body) = http_get(server.metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("hexveil_consent_grants_total"), "{body}");
    assert_ne!(server.metrics.port(), server.http.port());
    assert!(server.terminate().success());
}

#[test]
fn config_check_names_bad_values_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_hexveil"))
            .args(["config", "check", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run("[caps]\nmin_interval = \"two hours\"\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("caps.min_interval"));
    let out = run("[privacy]\nepsilon_per_budget = 1.0\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("privacy.epsilon_per_budget"));
    let out = run("[privacy]\nrho_per_bucket = 5.0\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("privacy.max_epsilon_per_device_per_day")
    );
    // The daily release is part of the same promise: overspending through it is refused too.
    let out = run("[privacy]\nrho_per_day = 0.05\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("privacy.max_epsilon_per_device_per_day")
            && err.contains("privacy.rho_per_day"),
        "{err}"
    );

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/hexveil.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args(["config", "check", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("at most 3 per day, 10 per week"), "{text}");
    assert!(text.contains("epsilon = "), "{text}");
    assert!(text.contains("95% interval of one count"), "{text}");
    // The defaults: hourly ±28, daily ±30, and every part with the total within ε 2.0.
    assert!(text.contains("95% interval of one count: ±28"), "{text}");
    assert!(
        text.contains("95% interval of one daily count: ±30"),
        "{text}"
    );
    assert!(
        text.contains("hourly_foot_traffic rho 0.0400 + daily_foot_traffic rho 0.0350 + offer_stats rho 0.0100"),
        "{text}"
    );
    assert!(
        text.contains("epsilon = 1.961 per device per day"),
        "{text}"
    );
}

#[tokio::test]
async fn a_device_notified_before_kill_9_gets_min_interval_after_restart() {
    use hexveil::api::pb::presence_service_client::PresenceServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    std::fs::write(
        &config,
        "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\nmin_interval = \"2h\"\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let server = BinServer::spawn(dir.path(), &args);

    // Register a merchant with the CLI while the server runs.
    let cell = h3o::LatLng::new(40.4168, -3.7038)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let store = store_url(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args([
            "merchant",
            "add",
            "--store",
            &store,
            "--name",
            "Churros",
            "--cell",
            &format!("{cell:x}"),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = added["api_key"].as_str().unwrap().to_string();
    assert!(added["merchant_id"].as_str().unwrap().len() == 36);

    let ch = connect(server.grpc).await;
    let mut merchant = merchant_client(ch.clone(), Some(&key));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    merchant
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(pb::Offer {
                title: "Churros".into(),
                cell: cell.into(),
                radius_k: 1,
                valid_from: Some(prost_types::Timestamp {
                    seconds: now - 60,
                    nanos: 0,
                }),
                valid_until: Some(prost_types::Timestamp {
                    seconds: now + 86_400,
                    nanos: 0,
                }),
                max_notifications_per_day: 100,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let d = "dev-restart-000001";
    consent_client(ch.clone())
        .set_consent(set(d))
        .await
        .unwrap();
    let report = || pb::ReportPresenceRequest {
        device_token: d.into(),
        cell: cell.into(),
        observed_at: Some(prost_types::Timestamp {
            seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            nanos: 0,
        }),
        utc_offset_minutes: 0,
    };
    let first = PresenceServiceClient::new(ch.clone())
        .report_presence(report())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.reason, pb::NoOfferReason::None as i32);
    assert_eq!(first.offers.len(), 1);
    drop(ch);
    server.kill9();

    let restarted = BinServer::spawn(dir.path(), &args);
    let ch = connect(restarted.grpc).await;
    let second = PresenceServiceClient::new(ch.clone())
        .report_presence(report())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.reason,
        pb::NoOfferReason::MinInterval as i32,
        "caps hold across kill -9"
    );
    assert!(second.offers.is_empty());
    let mine = transparency_client(ch)
        .get_my_data(pb::GetMyDataRequest {
            device_token: d.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.notifications.len(), 1);
    assert_eq!(mine.notifications[0].offer_id, first.offers[0].offer_id);

    // `merchant list` shows it, `merchant revoke` stops its key at once.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args(["merchant", "list", "--store", &store])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("Churros"));
    let revoke = std::process::Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args([
            "merchant",
            "revoke",
            "--store",
            &store,
            added["merchant_id"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(revoke.status.success());
}
