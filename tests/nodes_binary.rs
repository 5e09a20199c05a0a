//! Issue 12, acceptance 2, on real processes: two `hexveil serve` nodes on one PostgreSQL, the
//! same devices reporting at both at once, feedback given at one node and consent changed at
//! the other. The notification log (what GetMyData shows, read back from the store) never
//! exceeds a cap: per device per day under concurrent bursts, no offer from a merchant after
//! its mute was acknowledged, none after a withdrawal was acknowledged. (`tests/nodes.rs` is
//! the property test of the same promises with two in-process nodes and a manual clock.)
//!
//! Runs when `HEXVEIL_TEST_POSTGRES_URL` is set; fails if it is set and PostgreSQL is not there.

#[path = "support/harness.rs"]
mod harness;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::*;
use hexveil::api::pb::{self, Purpose, presence_service_client::PresenceServiceClient};
use hexveil::store::pg_testing::{self, TestSchema};
use tonic::transport::Channel;

const PER_DAY: usize = 4;

const CONFIG: &str = "[caps]\nmin_dwell = \"0s\"\nquiet_hours = \"\"\nmin_interval = \"0s\"\n\
    per_device_per_day = 4\nper_device_per_week = 10\nper_merchant_per_device_per_week = 10\n\
    per_cell_per_minute = 100000\nignore_fatigue_after = 0\n\
    [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n";

fn report(token: &str, cell: h3o::CellIndex) -> pb::ReportPresenceRequest {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    pb::ReportPresenceRequest {
        device_token: token.into(),
        cell: cell.into(),
        observed_at: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: 0,
        }),
        utc_offset_minutes: 0,
    }
}

/// `per_node` reports of each token at each node, all at once; the offers' merchants seen.
async fn burst(
    nodes: &[Channel; 2],
    tokens: &[String],
    cell: h3o::CellIndex,
    per_node: usize,
) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    for token in tokens {
        for ch in nodes {
            for _ in 0..per_node {
                let (ch, token) = (ch.clone(), token.clone());
                calls.push(tokio::spawn(async move {
                    let reply = PresenceServiceClient::new(ch)
                        .report_presence(report(&token, cell))
                        .await
                        .expect("both nodes answer")
                        .into_inner();
                    reply
                        .offers
                        .into_iter()
                        .map(|o| (token.clone(), o.merchant_id))
                        .collect::<Vec<_>>()
                }));
            }
        }
    }
    let mut offered = Vec::new();
    for c in calls {
        offered.extend(c.await.unwrap());
    }
    offered
}

async fn notifications(ch: &Channel, token: &str) -> Vec<pb::NotificationRecord> {
    transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .notifications
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_real_nodes_never_jointly_exceed_a_cap_a_mute_or_a_withdrawal() {
    let Some(base) = pg_testing::url_or_skip("two_real_nodes_never_jointly_exceed_a_cap") else {
        return;
    };
    let schema = TestSchema::create(&base).await;
    let store = schema.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hexveil.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let key = [(
        "HEXVEIL_DEVICE_KEY",
        "two-real-nodes-test-key-0123456789abcdef",
    )];
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let args = ["--config", config.to_str().unwrap()];
    let cell = h3o::LatLng::new(59.3293, 18.0686)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let (a, b, keys) = tokio::task::block_in_place(|| {
        std::fs::create_dir_all(&dir_a).unwrap();
        std::fs::create_dir_all(&dir_b).unwrap();
        let a = BinServer::spawn_store(&dir_a, &dir_a, &store, &args, &key);
        let b = BinServer::spawn_store(&dir_b, &dir_b, &store, &args, &key);
        let keys: Vec<String> = (0..3)
            .map(|i| cli_merchant_add(&store, &format!("Kafé {i}"), cell))
            .collect();
        (a, b, keys)
    });
    let nodes = [connect(a.grpc).await, connect(b.grpc).await];
    for (i, k) in keys.iter().enumerate() {
        upsert_offer_now(&nodes[i % 2], k, &format!("Fika {i}"), cell).await;
    }
    // Both nodes admitted (a joining node waits for the other's share) and both offer
    // indexes refreshed from the store (every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;

    // 1. Bursts of the same devices at both nodes at once: never more than the daily cap.
    let group: Vec<String> = (0..12)
        .map(|i| format!("burst-device-{i:04}-nodes"))
        .collect();
    for (i, t) in group.iter().enumerate() {
        grant(&nodes[i % 2], t, &[Purpose::NearbyOffers]).await;
    }
    let offered = burst(&nodes, &group, cell, 8).await;
    let mut over = Vec::new();
    for t in &group {
        let shown = offered.iter().filter(|(d, _)| d == t).count();
        let logged = notifications(&nodes[0], t).await.len();
        if shown > PER_DAY || logged > PER_DAY || shown != logged {
            over.push((t.clone(), shown, logged));
        }
    }
    assert!(
        over.is_empty(),
        "per_device_per_day = {PER_DAY} across two nodes; (device, offers shown, logged): {over:?}"
    );
    assert!(offered.len() >= group.len(), "the bursts delivered offers");

    // 2. Feedback at node b mutes a merchant; then bursts at both: nothing more from it.
    let muted: Vec<String> = (0..6)
        .map(|i| format!("muting-device-{i:04}-nodes"))
        .collect();
    let mut mute_of = Vec::new();
    for t in &muted {
        grant(&nodes[0], t, &[Purpose::NearbyOffers]).await;
        let first = PresenceServiceClient::new(nodes[0].clone())
            .report_presence(report(t, cell))
            .await
            .unwrap()
            .into_inner();
        let offer = first.offers.first().expect("a first offer").clone();
        PresenceServiceClient::new(nodes[1].clone())
            .send_feedback(pb::SendFeedbackRequest {
                device_token: t.clone(),
                offer_id: offer.offer_id.clone(),
                action: pb::FeedbackAction::MuteMerchant as i32,
            })
            .await
            .unwrap();
        mute_of.push((t.clone(), offer.merchant_id));
    }
    let offered = burst(&nodes, &muted, cell, 4).await;
    for (t, merchant) in &mute_of {
        let from_muted: Vec<_> = notifications(&nodes[1], t)
            .await
            .into_iter()
            .filter(|n| &n.merchant_id == merchant)
            .collect();
        assert_eq!(from_muted.len(), 1, "{t}: only the offer before the mute");
        assert!(
            !offered.iter().any(|(d, m)| d == t && m == merchant),
            "{t} was shown an offer of the merchant it muted at the other node"
        );
    }

    // 3. A withdrawal at node b; then bursts at both: no offer, nothing logged.
    let leaving: Vec<String> = (0..6)
        .map(|i| format!("leaving-device-{i:04}-nodes"))
        .collect();
    for t in &leaving {
        grant(&nodes[0], t, &[Purpose::NearbyOffers, Purpose::FootTraffic]).await;
        grant(&nodes[1], t, &[Purpose::FootTraffic]).await;
    }
    let offered = burst(&nodes, &leaving, cell, 4).await;
    assert!(offered.is_empty(), "offers after a withdrawal: {offered:?}");
    for t in &leaving {
        assert!(notifications(&nodes[0], t).await.is_empty(), "{t}");
    }
    drop((a, b));
}
