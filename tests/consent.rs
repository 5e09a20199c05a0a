//! Consent and transparency over real gRPC against an in-process server on port 0.

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;

use harness::*;
use hexveil::api::pb::{self, Purpose};
use hexveil::clock::SystemClock;
use tonic::Code;

fn set(token: &str, purposes: &[Purpose]) -> pb::SetConsentRequest {
    consent_request(token, purposes)
}

#[tokio::test]
async fn consent_round_trip_and_my_data_shows_the_receipt() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let mut consent = consent_client(ch.clone());
    let mut transparency = transparency_client(ch);
    let t = token(1);

    let receipt = consent
        .set_consent(set(&t, &[Purpose::NearbyOffers, Purpose::FootTraffic]))
        .await
        .unwrap()
        .into_inner();
    assert!(!receipt.receipt_id.is_empty());
    assert_eq!(
        receipt.purposes,
        vec![Purpose::NearbyOffers as i32, Purpose::FootTraffic as i32]
    );
    assert_eq!(receipt.policy_version, "2026-11");
    assert_eq!(
        receipt.controller,
        "the operator of this hexveil deployment"
    );
    assert_eq!(receipt.principal_id.len(), 32);
    assert!(!receipt.principal_id.contains(&t));
    let granted = receipt.granted_at.unwrap();
    let expires = receipt.expires_at.unwrap();
    assert_eq!(expires.seconds - granted.seconds, 30 * 86_400);

    let got = consent
        .get_consent(pb::GetConsentRequest {
            device_token: t.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.receipt_id, receipt.receipt_id);
    assert_eq!(got.purposes, receipt.purposes);

    // A second grant replaces the first; both receipts are visible, newest first.
    let second = consent
        .set_consent(set(&t, &[Purpose::FootTraffic]))
        .await
        .unwrap()
        .into_inner();
    let data = transparency
        .get_my_data(pb::GetMyDataRequest {
            device_token: t.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(data.principal_id, receipt.principal_id);
    let ids: Vec<_> = data.receipts.iter().map(|r| r.receipt_id.clone()).collect();
    assert_eq!(
        ids,
        vec![second.receipt_id.clone(), receipt.receipt_id.clone()]
    );
    assert!(data.retention_deadline.is_some());
    let current = consent
        .get_consent(pb::GetConsentRequest {
            device_token: t.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.purposes, vec![Purpose::FootTraffic as i32]);

    // Another device sees none of it.
    let other = transparency
        .get_my_data(pb::GetMyDataRequest {
            device_token: token(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.receipts.is_empty() && other.principal_id.is_empty());
    server.stop().await;
}

async fn assert_erased(server: &TestServer, t: &str) {
    let ch = server.channel().await;
    let err = consent_client(ch.clone())
        .get_consent(pb::GetConsentRequest {
            device_token: t.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let data = transparency_client(ch)
        .get_my_data(pb::GetMyDataRequest {
            device_token: t.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(data, pb::MyData::default(), "GetMyData must be empty");
    let rows = dump_db(&server.db()).await;
    assert!(rows.is_empty(), "rows left after erasure: {rows:?}");
}

#[tokio::test]
async fn forget_me_erases_everything() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let t = token(3);
    for purposes in [&[Purpose::NearbyOffers][..], &[Purpose::FootTraffic]] {
        consent_client(ch.clone())
            .set_consent(set(&t, purposes))
            .await
            .unwrap();
    }
    let reply = transparency_client(ch.clone())
        .forget_me(pb::ForgetMeRequest {
            device_token: t.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.records_erased, 3, "two receipts and the device row");
    assert_erased(&server, &t).await;
    // Forgetting twice is harmless.
    let again = transparency_client(ch)
        .forget_me(pb::ForgetMeRequest {
            device_token: t.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.records_erased, 0);
    server.stop().await;
}

#[tokio::test]
async fn empty_purpose_list_withdraws_and_erases() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let t = token(4);
    consent_client(ch.clone())
        .set_consent(set(&t, &[Purpose::NearbyOffers, Purpose::FootTraffic]))
        .await
        .unwrap();
    let withdrawal = consent_client(ch.clone())
        .set_consent(set(&t, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(withdrawal.withdrawn);
    assert!(withdrawal.purposes.is_empty());
    assert_erased(&server, &t).await;
    server.stop().await;
}

#[tokio::test]
async fn privacy_policy_is_generated_from_the_live_config() {
    let server = TestServer::start(
        "[caps]\nper_device_per_day = 2\n[policy]\ncontroller = \"Acme Offers Ltd\"",
        Arc::new(SystemClock),
    )
    .await;
    let policy = transparency_client(server.channel().await)
        .get_privacy_policy(pb::GetPrivacyPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.controller, "Acme Offers Ltd");
    assert_eq!(policy.max_cell_resolution, 8);
    assert!(policy.max_cell_area_km2 > 0.5 && policy.max_cell_area_km2 < 1.0);
    let caps = policy.caps.unwrap();
    assert_eq!(caps.per_device_per_day, 2);
    assert_eq!(caps.max_notifications_per_day, 2);
    let dp = policy.privacy.unwrap();
    assert_eq!(dp.mechanism, "discrete_gaussian");
    assert!(dp.epsilon_per_device_per_day > 0.0 && dp.epsilon_per_device_per_day <= 2.0);
    assert!(dp.ci95_half_width > dp.noise_std_dev);
    // Each part of the budget and the total: hourly, daily (two UTC days in any 24 hours) and
    // offer statistics add up in ρ to what the promise converts.
    let parts: Vec<&str> = dp.budget.iter().map(|p| p.release.as_str()).collect();
    assert_eq!(
        parts,
        ["hourly_foot_traffic", "daily_foot_traffic", "offer_stats"]
    );
    let total: f64 = dp.budget.iter().map(|p| p.rho).sum();
    assert!((total - dp.rho_per_device_per_day).abs() < 1e-12);
    assert!((dp.daily_rho_per_day - 2.0 * 0.0175).abs() < 1e-9);
    assert!(dp.ci95_half_width <= 28.0 && dp.daily_ci95_half_width <= 30.0);
    assert_eq!(dp.max_cells_per_day, 8);
    for text in [&dp.budget_explanation, &policy.summary] {
        assert!(
            text.contains("hourly counts ρ = 0.0400")
                && text.contains("daily counts ρ = 0.0350")
                && text.contains("offer statistics ρ = 0.0100")
                && text.contains("together ρ = 0.0850, which is ε = 1.96"),
            "{text}"
        );
    }
    assert!(policy.summary.contains("Acme Offers Ltd"));
    assert!(
        policy.summary.contains("at most 2 offers per day"),
        "{}",
        policy.summary
    );
    assert_eq!(
        policy.retention.unwrap().device_state.unwrap().seconds,
        30 * 86_400
    );
    server.stop().await;
}

#[tokio::test]
async fn many_concurrent_writes_are_all_stored() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..300 {
        let mut c = consent_client(ch.clone());
        tasks.spawn(async move {
            c.set_consent(set(&token(1000 + n), &[Purpose::FootTraffic]))
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let rows = dump_db(&server.db()).await;
    assert_eq!(
        rows.iter().filter(|r| r.starts_with("devices:")).count(),
        300
    );
    server.stop().await;
}
