//! Every kind of bad input is INVALID_ARGUMENT with a BadRequest naming the field, and
//! leaves the store exactly as it was.

#[path = "support/harness.rs"]
mod harness;

use std::sync::Arc;

use harness::*;
use hexveil::api::pb::{self, Purpose};
use hexveil::clock::SystemClock;
use tonic::Code;
use tonic_types::StatusExt;

enum Call {
    Set(pb::SetConsentRequest),
    Get(pb::GetConsentRequest),
    MyData(pb::GetMyDataRequest),
    Forget(pb::ForgetMeRequest),
}

fn set(token: &str, purposes: Vec<i32>, version: &str) -> Call {
    Call::Set(pb::SetConsentRequest {
        device_token: token.to_string(),
        purposes,
        policy_version: version.to_string(),
    })
}

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field_and_changes_nothing() {
    let server = TestServer::start("", Arc::new(SystemClock)).await;
    let ch = server.channel().await;
    // A known device, so "unchanged" covers existing rows too.
    let known = token(7);
    consent_client(ch.clone())
        .set_consent(pb::SetConsentRequest {
            device_token: known.clone(),
            purposes: vec![Purpose::NearbyOffers as i32],
            policy_version: "1".into(),
        })
        .await
        .unwrap();
    let before = dump_db(&server.db()).await;
    assert!(!before.is_empty());

    let ok = || token(8);
    let cases: Vec<(&str, Call, &[&str])> = vec![
        ("empty token", set("", vec![1], "1"), &["device_token"]),
        ("short token", set("abc", vec![1], "1"), &["device_token"]),
        (
            "long token",
            set(&"a".repeat(129), vec![1], "1"),
            &["device_token"],
        ),
        (
            "token charset",
            set("device token with spaces!", vec![1], "1"),
            &["device_token"],
        ),
        (
            "unspecified purpose",
            set(&ok(), vec![0], "1"),
            &["purposes[0]"],
        ),
        (
            "unknown purpose",
            set(&ok(), vec![1, 42], "1"),
            &["purposes[1]"],
        ),
        (
            "duplicate purpose",
            set(&ok(), vec![2, 2], "1"),
            &["purposes"],
        ),
        (
            "missing policy version",
            set(&ok(), vec![1], ""),
            &["policy_version"],
        ),
        (
            "long policy version",
            set(&ok(), vec![1], &"v".repeat(65)),
            &["policy_version"],
        ),
        (
            "control chars in version",
            set(&ok(), vec![1], "1\u{7}"),
            &["policy_version"],
        ),
        (
            "several at once",
            set("x", vec![7], ""),
            &["device_token", "purposes[0]", "policy_version"],
        ),
        // Withdrawal by a malformed token must not erase anything.
        (
            "withdraw with bad token",
            set(&format!("{known}!"), vec![], "1"),
            &["device_token"],
        ),
        (
            "get: bad token",
            Call::Get(pb::GetConsentRequest {
                device_token: "?".into(),
            }),
            &["device_token"],
        ),
        (
            "my data: bad token",
            Call::MyData(pb::GetMyDataRequest {
                device_token: String::new(),
            }),
            &["device_token"],
        ),
        (
            "forget: bad token",
            Call::Forget(pb::ForgetMeRequest {
                device_token: format!("{known} "),
            }),
            &["device_token"],
        ),
    ];
    for (name, call, fields) in cases {
        let mut c = consent_client(ch.clone());
        let mut t = transparency_client(ch.clone());
        let status = match call {
            Call::Set(r) => c.set_consent(r).await.map(|_| ()),
            Call::Get(r) => c.get_consent(r).await.map(|_| ()),
            Call::MyData(r) => t.get_my_data(r).await.map(|_| ()),
            Call::Forget(r) => t.forget_me(r).await.map(|_| ()),
        }
        .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        let details = status.get_error_details();
        let bad = details
            .bad_request()
            .unwrap_or_else(|| panic!("{name}: no BadRequest"));
        let named: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(named, fields.to_vec(), "{name}");
        assert!(
            bad.field_violations
                .iter()
                .all(|v| !v.description.is_empty()),
            "{name}"
        );
        assert_eq!(
            dump_db(&server.db()).await,
            before,
            "{name} changed the store"
        );
    }
    server.stop().await;
}
