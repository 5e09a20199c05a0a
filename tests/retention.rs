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
    assert!(dump_db(&server.db_path()).await.is_empty());
    server.stop().await;
}
