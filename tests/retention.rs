//! Retention with the manual clock: an idle device is erased after `retention.device_days`,
//! an active one is kept. No sleeping: time is moved by hand.

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use hexveil::api::pb::{self, Purpose};

const DAY: Duration = Duration::from_secs(86_400);

fn set(token: &str) -> pb::SetConsentRequest {
    consent_request(token, &[Purpose::NearbyOffers])
}

#[tokio::test]
async fn idle_devices_expire_after_retention_and_active_ones_stay() {
    let (clock, shared) = manual_clock(1_767_225_600_000); // 2026-01-01T00:00:00Z
    let server = TestServer::start("[retention]\ndevice_days = 30", shared).await;
    let ch = server.channel().await;
    let (idle, active) = (token(1), token(2));
    consent_client(ch.clone())
        .set_consent(set(&idle))
        .await
        .unwrap();
    consent_client(ch.clone())
        .set_consent(set(&active))
        .await
        .unwrap();

    let data = transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: idle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        data.retention_deadline.unwrap().seconds,
        1_767_225_600 + 30 * 86_400,
        "GetMyData tells the deadline"
    );

    // Day 20: the active device is active again; nothing has expired yet.
    clock.advance(20 * DAY);
    consent_client(ch.clone())
        .set_consent(set(&active))
        .await
        .unwrap();
    assert_eq!(server.app.consents.expire_idle().await.unwrap(), 0);

    // Day 30 exactly: not yet past the deadline.
    clock.advance(10 * DAY);
    assert_eq!(server.app.consents.expire_idle().await.unwrap(), 0);

    // Day 30 + 1 s: the idle device is gone, the active one is not.
    clock.advance(Duration::from_secs(1));
    assert_eq!(server.app.consents.expire_idle().await.unwrap(), 1);
    let gone = transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: idle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone, pb::MyData::default());
    let err = consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest { device_token: idle })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest {
            device_token: active.clone(),
        })
        .await
        .expect("the active device is kept");

    // Its own deadline passes 30 days after its last activity (day 20).
    clock.advance(20 * DAY);
    assert_eq!(server.app.consents.expire_idle().await.unwrap(), 1);
    assert!(dump_db(&server.db()).await.is_empty());
    server.stop().await;
}

/// A device whose last reports changed no durable fact (answered from memory, its row written
/// lazily) is still active: the sweep must not erase it because its row is a minute behind.
#[tokio::test]
async fn the_sweep_never_erases_a_device_memory_saw_after_the_cutoff() {
    use hexveil::api::pb::presence_service_client::PresenceServiceClient;
    let start = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let (clock, shared) = manual_clock(start);
    let server = TestServer::start("[retention]\ndevice_days = 1", shared).await;
    let ch = server.channel().await;
    let (busy, idle) = (token(1), token(2));
    for t in [&busy, &idle] {
        consent_client(ch.clone())
            .set_consent(set(t))
            .await
            .unwrap();
    }
    let cell = h3o::LatLng::new(38.7139, -9.1394)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let report = |ms: i64| {
        let ch = ch.clone();
        let busy = busy.clone();
        async move {
            PresenceServiceClient::new(ch)
                .report_presence(pb::ReportPresenceRequest {
                    device_token: busy,
                    cell: cell.into(),
                    observed_at: Some(prost_types::Timestamp {
                        seconds: ms / 1000,
                        nanos: 0,
                    }),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap()
        }
    };
    // Second 2: a dwell starts (written). Second 55: same cell, nothing new (memory only).
    clock.advance(Duration::from_secs(2));
    report(start + 2_000).await;
    clock.advance(Duration::from_secs(53));
    report(start + 55_000).await;
    // A day and 30 s later the cutoff is second 30: between the row (second 2) and the
    // device's real last activity (second 55).
    clock.advance(DAY - Duration::from_secs(25));
    assert_eq!(
        server.app.consents.expire_idle().await.unwrap(),
        1,
        "only the idle device"
    );
    consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest {
            device_token: busy.clone(),
        })
        .await
        .expect("the device active at second 55 is kept");
    let err = consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest { device_token: idle })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.stop().await;
}
