//! Every intrusiveness cap, table-driven with the manual clock against a real in-process
//! server over gRPC: for each cap, one case where it alone withholds the offer (with its
//! reason) and one where its window has passed and the offer is given.

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use hexveil::api::pb::{self, NoOfferReason as R, Purpose};
use hexveil::clock::ManualClock;
use tonic::transport::Channel;

/// Monday 2026-01-05 12:00:00 UTC.
const START_MS: i64 = 1_767_614_400_000;
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn here() -> u64 {
    h3o::LatLng::new(52.52, 13.405)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
        .into()
}

fn far() -> u64 {
    h3o::LatLng::new(48.13, 11.58)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
        .into()
}

struct Fixture {
    server: TestServer,
    clock: ManualClock,
    ch: Channel,
    /// API keys of merchants A and B, both located at `here()`.
    keys: Vec<String>,
    offers: Vec<String>,
}

fn ts(clock: &ManualClock) -> prost_types::Timestamp {
    use hexveil::clock::Clock;
    let ms = clock.now().millis();
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

impl Fixture {
    /// A server with `toml` config, and `merchants` merchants each with one offer at `here()`.
    async fn new(toml: &str, merchants: usize, budget: u32) -> Fixture {
        let (clock, shared) = manual_clock(START_MS);
        let server = TestServer::start(toml, shared).await;
        let ch = server.channel().await;
        let mut f = Fixture {
            server,
            clock,
            ch,
            keys: Vec::new(),
            offers: Vec::new(),
        };
        for i in 0..merchants {
            let (_, key) = hexveil::merchants::add(
                &f.server.app.store,
                &format!("Merchant {i}"),
                vec![here()],
                8,
                hexveil::clock::Timestamp(START_MS),
            )
            .await
            .unwrap();
            let offer = f.upsert(&key, budget, None).await;
            f.keys.push(key);
            f.offers.push(offer.offer_id);
        }
        f
    }

    fn merchant(&self, key: &str) -> MerchantClient {
        merchant_client(self.ch.clone(), Some(key))
    }

    async fn upsert(
        &self,
        key: &str,
        budget: u32,
        valid_from: Option<prost_types::Timestamp>,
    ) -> pb::Offer {
        let now = ts(&self.clock);
        self.merchant(key)
            .upsert_offer(pb::UpsertOfferRequest {
                offer: Some(pb::Offer {
                    title: "Coffee -20%".into(),
                    body: "Show this at the counter.".into(),
                    cell: here(),
                    radius_k: 1,
                    valid_from: Some(valid_from.unwrap_or(now)),
                    valid_until: Some(prost_types::Timestamp {
                        seconds: now.seconds + 365 * 86_400,
                        nanos: 0,
                    }),
                    max_notifications_per_day: budget,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn consent(&self, token: &str, purposes: &[Purpose]) {
        grant(&self.ch, token, purposes).await;
    }

    async fn report_at(
        &self,
        token: &str,
        cell: u64,
        observed: prost_types::Timestamp,
        offset: i32,
    ) -> pb::ReportPresenceReply {
        PresenceServiceClient::new(self.ch.clone())
            .report_presence(pb::ReportPresenceRequest {
                device_token: token.into(),
                cell,
                observed_at: Some(observed),
                utc_offset_minutes: offset,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn report(&self, token: &str) -> pb::ReportPresenceReply {
        self.report_at(token, here(), ts(&self.clock), 0).await
    }

    /// Consents (if asked), then reports twice five minutes apart so dwell is met.
    async fn settle(&self, token: &str) -> pb::ReportPresenceReply {
        self.report(token).await;
        self.clock.advance(5 * MIN);
        self.report(token).await
    }

    /// Stays in the area for `d`, reporting every 10 minutes; returns the last reply.
    async fn stay(&self, token: &str, d: Duration) -> pb::ReportPresenceReply {
        let mut left = d;
        let mut last = None;
        while !left.is_zero() {
            let step = left.min(10 * MIN);
            self.clock.advance(step);
            left -= step;
            last = Some(self.report(token).await);
        }
        last.expect("stayed for a while")
    }

    async fn feedback(&self, token: &str, offer_id: &str, action: pb::FeedbackAction) {
        PresenceServiceClient::new(self.ch.clone())
            .send_feedback(pb::SendFeedbackRequest {
                device_token: token.into(),
                offer_id: offer_id.into(),
                action: action as i32,
            })
            .await
            .unwrap();
    }
}

fn reason(r: &pb::ReportPresenceReply) -> R {
    R::try_from(r.reason).unwrap()
}

#[track_caller]
fn given(r: &pb::ReportPresenceReply) -> String {
    assert_eq!(reason(r), R::None, "expected an offer, got {:?}", reason(r));
    assert_eq!(r.offers.len(), 1);
    let why = r.offers[0]
        .why
        .as_ref()
        .expect("a delivered offer explains itself");
    assert!(!why.text.is_empty());
    r.offers[0].offer_id.clone()
}

#[track_caller]
fn withheld(r: &pb::ReportPresenceReply, want: R) {
    assert_eq!(reason(r), want);
    assert!(r.offers.is_empty());
}

/// Caps relaxed so that only the cap under test can bite.
const OPEN: &str = "[caps]\nquiet_hours = \"\"\nmin_interval = \"0s\"\nper_merchant_per_device_per_week = 100\nper_device_per_day = 100\nper_device_per_week = 700\nignore_fatigue_after = 0\n";

#[tokio::test]
async fn dwell() {
    let f = Fixture::new("", 1, 100).await;
    f.consent("dev-dwell-000001", BOTH).await;
    withheld(&f.report("dev-dwell-000001").await, R::DwellNotMet);
    f.clock.advance(4 * MIN);
    withheld(&f.report("dev-dwell-000001").await, R::DwellNotMet);
    f.clock.advance(MIN);
    let r = f.report("dev-dwell-000001").await;
    given(&r);
    assert_eq!(
        r.offers[0]
            .why
            .as_ref()
            .unwrap()
            .dwell
            .as_ref()
            .unwrap()
            .seconds,
        300
    );
}

#[tokio::test]
async fn quiet_hours_in_device_local_time() {
    let f = Fixture::new("", 1, 100).await;
    f.consent("dev-quiet-000001", BOTH).await;
    // 12:00 UTC is 22:00 at UTC+10.
    f.report_at("dev-quiet-000001", here(), ts(&f.clock), 600)
        .await;
    f.clock.advance(5 * MIN);
    withheld(
        &f.report_at("dev-quiet-000001", here(), ts(&f.clock), 600)
            .await,
        R::QuietHours,
    );
    // 23:05 UTC is 09:05 at UTC+10: quiet hours are over.
    f.clock.advance(11 * HOUR);
    f.report_at("dev-quiet-000001", here(), ts(&f.clock), 600)
        .await;
    f.clock.advance(5 * MIN);
    given(
        &f.report_at("dev-quiet-000001", here(), ts(&f.clock), 600)
            .await,
    );
}

#[tokio::test]
async fn min_interval() {
    let f = Fixture::new(
        "[caps]\nper_merchant_per_device_per_week = 100\nignore_fatigue_after = 0",
        2,
        100,
    )
    .await;
    f.consent("dev-interval-001", BOTH).await;
    given(&f.settle("dev-interval-001").await);
    withheld(&f.stay("dev-interval-001", 119 * MIN).await, R::MinInterval);
    f.clock.advance(MIN);
    given(&f.report("dev-interval-001").await);
}

#[tokio::test]
async fn daily_cap_is_a_rolling_24_hours() {
    let f = Fixture::new(
        &format!("{OPEN}per_device_per_day = 1\n").replace("per_device_per_day = 100\n", ""),
        2,
        100,
    )
    .await;
    f.consent("dev-daily-000001", BOTH).await;
    given(&f.settle("dev-daily-000001").await);
    // 12:05 plus 12 h is past midnight: a new calendar day, but not a new rolling day.
    withheld(&f.stay("dev-daily-000001", 12 * HOUR).await, R::DailyCap);
    withheld(
        &f.stay("dev-daily-000001", 11 * HOUR + 59 * MIN).await,
        R::DailyCap,
    );
    f.clock.advance(MIN);
    given(&f.report("dev-daily-000001").await);
}

#[tokio::test]
async fn weekly_cap() {
    let f = Fixture::new(
        &OPEN.replace("per_device_per_week = 700", "per_device_per_week = 1"),
        2,
        100,
    )
    .await;
    f.consent("dev-weekly-00001", BOTH).await;
    given(&f.settle("dev-weekly-00001").await);
    f.clock.advance(DAY);
    withheld(&f.settle("dev-weekly-00001").await, R::WeeklyCap);
    f.clock.advance(6 * DAY - 5 * MIN);
    given(&f.settle("dev-weekly-00001").await);
}

#[tokio::test]
async fn per_merchant_per_device_per_week() {
    let f = Fixture::new(
        &OPEN.replace(
            "per_merchant_per_device_per_week = 100",
            "per_merchant_per_device_per_week = 1",
        ),
        1,
        100,
    )
    .await;
    f.consent("dev-merchant-001", BOTH).await;
    given(&f.settle("dev-merchant-001").await);
    f.clock.advance(MIN);
    withheld(&f.report("dev-merchant-001").await, R::MerchantCap);
    f.clock.advance(7 * DAY);
    given(&f.settle("dev-merchant-001").await);
}

#[tokio::test]
async fn per_offer_budget() {
    let f = Fixture::new(OPEN, 1, 1).await;
    f.consent("dev-offer-cap-01", BOTH).await;
    f.consent("dev-offer-cap-02", BOTH).await;
    given(&f.settle("dev-offer-cap-01").await);
    withheld(&f.settle("dev-offer-cap-02").await, R::OfferCap);
    f.clock.advance(DAY);
    given(&f.settle("dev-offer-cap-02").await);
}

#[tokio::test]
async fn dismissal_backoff_escalates() {
    let f = Fixture::new(OPEN, 1, 100).await;
    let d = "dev-dismiss-0001";
    f.consent(d, BOTH).await;
    let offer = given(&f.settle(d).await);
    f.feedback(d, &offer, pb::FeedbackAction::Dismissed).await;
    withheld(&f.report(d).await, R::DismissalBackoff);
    f.clock.advance(DAY);
    let offer = given(&f.settle(d).await);
    f.feedback(d, &offer, pb::FeedbackAction::Dismissed).await;
    // Second dismissal: three days.
    f.clock.advance(2 * DAY);
    withheld(&f.settle(d).await, R::DismissalBackoff);
    f.clock.advance(DAY);
    given(&f.settle(d).await);
    let mine = transparency_client(f.ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: d.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.notifications.len(), 3);
    assert!(
        mine.restrictions
            .iter()
            .any(|r| r.kind == "DISMISSAL_BACKOFF" && r.until.is_some())
    );
}

#[tokio::test]
async fn mute_lasts_until_consent_is_withdrawn() {
    let f = Fixture::new(OPEN, 1, 100).await;
    let d = "dev-mute-0000001";
    f.consent(d, BOTH).await;
    let offer = given(&f.settle(d).await);
    f.feedback(d, &offer, pb::FeedbackAction::MuteMerchant)
        .await;
    f.clock.advance(30 * DAY);
    withheld(&f.settle(d).await, R::MerchantMuted);
    let mine = transparency_client(f.ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: d.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(mine.restrictions.iter().any(|r| r.kind == "MUTED"));
    f.consent(d, &[]).await;
    f.consent(d, BOTH).await;
    given(&f.settle(d).await);
}

#[tokio::test]
async fn global_cell_flood_guard() {
    let f = Fixture::new(&format!("{OPEN}per_cell_per_minute = 1\n"), 1, 100).await;
    f.consent("dev-flood-000001", BOTH).await;
    f.consent("dev-flood-000002", BOTH).await;
    f.report("dev-flood-000001").await;
    f.report("dev-flood-000002").await;
    f.clock.advance(5 * MIN);
    given(&f.report("dev-flood-000001").await);
    withheld(&f.report("dev-flood-000002").await, R::GlobalCellCap);
    f.clock.advance(MIN);
    given(&f.report("dev-flood-000002").await);
}

#[tokio::test]
async fn stale_reports_never_trigger_an_offer() {
    let f = Fixture::new(OPEN, 1, 100).await;
    let d = "dev-stale-000001";
    f.consent(d, BOTH).await;
    f.settle(d).await;
    f.clock.advance(16 * MIN);
    let old = prost_types::Timestamp {
        seconds: ts(&f.clock).seconds - 16 * 60,
        nanos: 0,
    };
    withheld(&f.report_at(d, here(), old, 0).await, R::StaleReport);
    f.settle(d).await;
    f.clock.advance(MIN);
    let r = f.report(d).await;
    assert!(
        matches!(reason(&r), R::None | R::MerchantCap),
        "{:?}",
        reason(&r)
    );
}

#[tokio::test]
async fn consent_is_required_for_offers() {
    let f = Fixture::new(OPEN, 1, 100).await;
    let d = "dev-consent-0001";
    // Unknown device: nothing happens at all.
    withheld(&f.report(d).await, R::NoConsent);
    f.consent(d, &[Purpose::FootTraffic]).await;
    withheld(&f.settle(d).await, R::NoConsent);
    f.consent(d, BOTH).await;
    f.clock.advance(MIN);
    given(&f.report(d).await);
}

#[tokio::test]
async fn offers_only_nearby_active_and_outside_exclusions() {
    let clinic = format!("[exclusions]\ncells = [\"{:x}\"]\n", far());
    let f = Fixture::new(&format!("{OPEN}{clinic}"), 0, 100).await;
    let (_, key) = hexveil::merchants::add(
        &f.server.app.store,
        "Later",
        vec![here()],
        8,
        hexveil::clock::Timestamp(START_MS),
    )
    .await
    .unwrap();
    let later = prost_types::Timestamp {
        seconds: START_MS / 1000 + 3600,
        nanos: 0,
    };
    f.upsert(&key, 100, Some(later)).await;
    let d = "dev-nearby-00001";
    f.consent(d, BOTH).await;
    withheld(&f.settle(d).await, R::NoOffersNearby);
    f.clock.advance(HOUR);
    f.report(d).await;
    // Far away: nothing nearby; and that far cell is excluded, so never anything there.
    withheld(
        &f.report_at(d, far(), ts(&f.clock), 0).await,
        R::NoOffersNearby,
    );
    f.settle(d).await;
    f.clock.advance(5 * MIN);
    given(&f.report(d).await);
}

#[tokio::test]
async fn fatigue_halves_the_allowance_until_one_is_opened() {
    let toml = OPEN
        .replace("ignore_fatigue_after = 0", "ignore_fatigue_after = 1")
        .replace("per_device_per_day = 100", "per_device_per_day = 2");
    let f = Fixture::new(&toml, 3, 100).await;
    let d = "dev-fatigue-0001";
    f.consent(d, BOTH).await;
    let first = given(&f.settle(d).await);
    f.clock.advance(MIN);
    // One ignored offer: fatigued, the allowance of 2 per day is halved to 1, used up.
    withheld(&f.report(d).await, R::DailyCap);
    f.feedback(d, &first, pb::FeedbackAction::Opened).await;
    f.clock.advance(MIN);
    given(&f.report(d).await);
}
