//! Presence and merchant APIs over gRPC: merchant auth, rate limits, coarsening, streaming.

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;

use harness::*;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use hexveil::api::pb::{self, NoOfferReason as R};
use hexveil::clock::{Clock, SystemClock};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

fn cell_at(res: h3o::Resolution) -> h3o::CellIndex {
    h3o::LatLng::new(51.5072, -0.1276).unwrap().to_cell(res)
}

fn now_ts() -> prost_types::Timestamp {
    let ms = SystemClock.now().millis();
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: 0,
    }
}

fn offer(cell: u64) -> pb::Offer {
    let now = now_ts();
    pb::Offer {
        title: "Bagels 2 for 1".into(),
        body: "Until noon.".into(),
        cell,
        radius_k: 1,
        valid_from: Some(now),
        valid_until: Some(prost_types::Timestamp {
            seconds: now.seconds + 86_400,
            nanos: 0,
        }),
        max_notifications_per_day: 50,
        ..Default::default()
    }
}

async fn consent(ch: &Channel, token: &str) {
    grant(ch, token, BOTH).await;
}

fn report(token: &str, cell: u64) -> pb::ReportPresenceRequest {
    pb::ReportPresenceRequest {
        device_token: token.into(),
        cell,
        observed_at: Some(now_ts()),
        utc_offset_minutes: 0,
    }
}

#[tokio::test]
async fn merchant_keys_are_enforced_and_scoped() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let store = &server.app.store;
    let c = u64::from(cell_at(h3o::Resolution::Eight));
    let (a, key_a) = hexveil::merchants::add(store, "A", vec![c], 8, SystemClock.now())
        .await
        .unwrap();
    let (_b, key_b) = hexveil::merchants::add(store, "B", vec![c], 8, SystemClock.now())
        .await
        .unwrap();

    // Missing and wrong keys.
    for key in [
        None,
        Some("nope"),
        Some(&format!("{key_a}x")[..]),
        Some(&key_a[..key_a.len() - 1]),
    ] {
        let err = merchant_client(ch.clone(), key)
            .list_offers(pb::ListOffersRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}");
    }

    let created = merchant_client(ch.clone(), Some(&key_a))
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(offer(c)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.merchant_id, a.merchant_id.to_string());

    // B sees none of A's offers and can neither change nor delete them.
    let listed = merchant_client(ch.clone(), Some(&key_b))
        .list_offers(pb::ListOffersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.offers.is_empty());
    let mut stolen = created.clone();
    stolen.title = "Hijacked".into();
    let err = merchant_client(ch.clone(), Some(&key_b))
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(stolen),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = merchant_client(ch.clone(), Some(&key_b))
        .delete_offer(pb::DeleteOfferRequest {
            offer_id: created.offer_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mine = merchant_client(ch.clone(), Some(&key_a))
        .list_offers(pb::ListOffersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.offers.len(), 1);
    assert_eq!(mine.offers[0].title, "Bagels 2 for 1");

    // Bad offers name their fields.
    let mut bad = offer(u64::from(cell_at(h3o::Resolution::Seven)));
    bad.title = String::new();
    bad.radius_k = 9;
    let err = merchant_client(ch.clone(), Some(&key_a))
        .upsert_offer(pb::UpsertOfferRequest { offer: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, vec!["offer.title", "offer.cell", "offer.radius_k"]);

    // Revocation applies at once.
    hexveil::merchants::revoke(store, a.merchant_id, SystemClock.now())
        .await
        .unwrap();
    let err = merchant_client(ch.clone(), Some(&key_a))
        .list_offers(pb::ListOffersRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    merchant_client(ch, Some(&key_b))
        .list_offers(pb::ListOffersRequest {})
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn rate_limit_refuses_the_burst_plus_one_and_leaves_no_trace() {
    let server = TestServer::start("[rate_limits]\ndevice_burst = 5", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let d = "dev-ratelimit-0001";
    consent(&ch, d).await;
    let c = u64::from(cell_at(h3o::Resolution::Eight));
    let mut client = PresenceServiceClient::new(ch.clone());
    for _ in 0..5 {
        client.report_presence(report(d, c)).await.unwrap();
    }
    let before = dump_db(&server.db()).await;
    let other = u64::from(cell_at(h3o::Resolution::Six));
    let err = client.report_presence(report(d, other)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let retry = err
        .get_error_details()
        .retry_info()
        .expect("RetryInfo")
        .retry_delay
        .unwrap();
    assert!(retry.as_secs() >= 50 && retry.as_secs() <= 60, "{retry:?}");
    assert_eq!(
        dump_db(&server.db()).await,
        before,
        "a refused report leaves no trace"
    );
    let mine = transparency_client(ch)
        .get_my_data(pb::GetMyDataRequest {
            device_token: d.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        mine.current_cell.unwrap().cell,
        c,
        "the refused cell was not recorded"
    );
    server.stop().await;
}

#[tokio::test]
async fn fine_cells_are_coarsened_before_anything_sees_them() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let d = "dev-fine-cell-0001";
    consent(&ch, d).await;
    let fine = cell_at(h3o::Resolution::Twelve);
    let reply = PresenceServiceClient::new(ch.clone())
        .report_presence(report(d, fine.into()))
        .await
        .unwrap()
        .into_inner();
    let coarse = u64::from(fine.parent(h3o::Resolution::Eight).unwrap());
    assert_eq!(reply.cell, coarse);
    let mine = transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: d.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.current_cell.unwrap().cell, coarse);
    let db = server.db();
    let dir = server.stop().await;
    // Scan every file of the store for the fine index, in every encoding SQLite could use.
    let fine_raw = u64::from(fine);
    if on_postgres() {
        // The database is not in the dir: scan every row of it as text.
        let dump = dump_db(&db).await.join("\n");
        assert!(dump.contains("devices: "), "the database was scanned");
        for n in [
            (fine_raw as i64).to_string(),
            fine_raw.to_string(),
            format!("{fine_raw:x}"),
        ] {
            assert!(!dump.contains(&n), "fine cell found in PostgreSQL");
        }
    }
    let needles = [
        fine_raw.to_be_bytes().to_vec(),
        fine_raw.to_le_bytes().to_vec(),
        fine_raw.to_string().into_bytes(),
        format!("{fine_raw:x}").into_bytes(),
    ];
    let mut scanned = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        // SQLite may still be removing its -wal/-shm files as the last store handle closes.
        let bytes = match std::fs::read(entry.unwrap().path()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{e}"),
        };
        scanned += 1;
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == &n[..]),
                "fine cell found on disk"
            );
        }
    }
    assert!(scanned >= if on_postgres() { 1 } else { 2 });
}

#[tokio::test]
async fn fine_cells_are_rejected_when_configured() {
    let server = TestServer::start(
        "[location]\nfiner_cells = \"reject\"",
        Arc::new(SystemClock),
    )
    .await;
    let ch = server.channel().await;
    let d = "dev-fine-reject-01";
    consent(&ch, d).await;
    let before = dump_db(&server.db()).await;
    let err = PresenceServiceClient::new(ch.clone())
        .report_presence(report(d, cell_at(h3o::Resolution::Nine).into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let field = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations[0]
        .field
        .clone();
    assert_eq!(field, "cell");
    assert_eq!(dump_db(&server.db()).await, before);
    server.stop().await;
}

#[tokio::test]
async fn bad_reports_name_their_fields() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let c = u64::from(cell_at(h3o::Resolution::Eight));
    let future = prost_types::Timestamp {
        seconds: now_ts().seconds + 3600,
        nanos: 0,
    };
    for (req, field) in [
        (
            pb::ReportPresenceRequest {
                cell: 0,
                ..report("dev-bad-report-01", c)
            },
            "cell",
        ),
        (
            pb::ReportPresenceRequest {
                observed_at: None,
                ..report("dev-bad-report-01", c)
            },
            "observed_at",
        ),
        (
            pb::ReportPresenceRequest {
                observed_at: Some(future),
                ..report("dev-bad-report-01", c)
            },
            "observed_at",
        ),
        (
            pb::ReportPresenceRequest {
                utc_offset_minutes: 900,
                ..report("dev-bad-report-01", c)
            },
            "utc_offset_minutes",
        ),
        (report("bad", c), "device_token"),
    ] {
        let err = PresenceServiceClient::new(ch.clone())
            .report_presence(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.get_error_details()
                .bad_request()
                .unwrap()
                .field_violations[0]
                .field,
            field
        );
    }
    let err = PresenceServiceClient::new(ch.clone())
        .send_feedback(pb::SendFeedbackRequest {
            device_token: "dev-bad-report-01".into(),
            offer_id: "x".into(),
            action: 0,
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, vec!["offer_id", "action"]);
    server.stop().await;
}

#[tokio::test]
async fn stream_of_ten_thousand_reports_gets_ten_thousand_replies_in_order() {
    let server = TestServer::start(
        "[rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000",
        Arc::new(SystemClock),
    )
    .await;
    let ch = server.channel().await;
    let devices: Vec<String> = (0..100).map(|i| format!("dev-stream-{i:08}")).collect();
    for d in &devices {
        consent(&ch, d).await;
    }
    // Each report names its own cell so the replies' order can be checked against it.
    let cells: Vec<u64> = cell_at(h3o::Resolution::Eight)
        .grid_disk::<Vec<_>>(60)
        .into_iter()
        .take(10_000)
        .map(u64::from)
        .collect();
    assert_eq!(cells.len(), 10_000);
    let requests: Vec<pb::ReportPresenceRequest> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| report(&devices[i % devices.len()], *c))
        .collect();
    let mut replies = PresenceServiceClient::new(ch.clone())
        .stream_presence(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(reply) = replies.message().await.unwrap() {
        assert!(reply.error.is_none(), "{:?}", reply.error);
        assert_eq!(reply.cell, cells[n], "reply {n} out of order");
        assert_ne!(R::try_from(reply.reason).unwrap(), R::NoConsent);
        n += 1;
    }
    assert_eq!(n, 10_000);
    // A bad report mid-stream gets its own error reply; the stream goes on.
    let mixed = vec![
        report(&devices[0], cells[0]),
        report("bad", cells[1]),
        report(&devices[1], cells[2]),
    ];
    let mut replies = PresenceServiceClient::new(ch)
        .stream_presence(tokio_stream::iter(mixed))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = replies.message().await.unwrap() {
        got.push(r);
    }
    assert_eq!(got.len(), 3);
    assert!(got[0].error.is_none() && got[2].error.is_none());
    let e = got[1].error.as_ref().unwrap();
    assert_eq!(
        (e.code, e.field.as_str()),
        (Code::InvalidArgument as i32, "device_token")
    );
    server.stop().await;
}
