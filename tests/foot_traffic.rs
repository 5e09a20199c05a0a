//! Foot traffic end to end over gRPC with the manual clock: devices report, the bucket is
//! released, the merchant reads noisy counts with intervals, its area only.

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use hexveil::api::pb::{self, Purpose};
use hexveil::clock::{Clock, Timestamp};
use tonic::Code;
use tonic_types::StatusExt;

/// 2026-01-05T10:00:00Z.
const T0: i64 = 1_767_607_200_000;

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms / 1000,
        nanos: 0,
    }
}

/// A query for `cells` over the day starting at T0.
fn day_of(cells: Vec<u64>, granularity: pb::Granularity) -> pb::GetFootTrafficRequest {
    pb::GetFootTrafficRequest {
        cells,
        start: Some(ts(T0)),
        end: Some(ts(T0 + 86_400_000)),
        granularity: granularity as i32,
    }
}

#[tokio::test]
async fn devices_report_the_bucket_is_released_and_the_merchant_reads_it() {
    let (clock, shared) = manual_clock(T0);
    let server = TestServer::start("", shared).await;
    let ch = server.channel().await;
    let here = h3o::LatLng::new(59.33, 18.07)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let elsewhere = h3o::LatLng::new(57.70, 11.97)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let store = &server.app.store;
    let (_, key_a) = hexveil::merchants::add(store, "A", vec![here.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    hexveil::merchants::add(store, "B", vec![elsewhere.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    server.app.insights.refresh_domain().await.unwrap();

    let report = |token: String, cell: u64| {
        let ch = ch.clone();
        let now = clock.now().millis();
        async move {
            PresenceServiceClient::new(ch)
                .report_presence(pb::ReportPresenceRequest {
                    device_token: token,
                    cell,
                    observed_at: Some(ts(now)),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap()
        }
    };
    for n in 0..26 {
        let t = format!("ft-device-{n:08}");
        grant(&ch, &t, &[Purpose::FootTraffic]).await;
        report(t, here.into()).await;
    }
    // Nearby-offers consent only: never counted.
    grant(&ch, "ft-no-consent-0001", &[Purpose::NearbyOffers]).await;
    report("ft-no-consent-0001".into(), here.into()).await;
    // Erasure removes unreleased contributions.
    transparency_client(ch.clone())
        .forget_me(pb::ForgetMeRequest {
            device_token: "ft-device-00000025".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        store.bucket_counts(Timestamp(T0), 4).await.unwrap(),
        vec![(u64::from(here), 25)]
    );
    let mine = transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: "ft-device-00000001".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pending = mine.pending_contributions.unwrap();
    assert_eq!(pending.count, 1);
    // The daily release's contribution is shown too, with its deletion at the day's release.
    let daily = mine.pending_daily_contributions.unwrap();
    assert_eq!(daily.count, 1);
    assert_eq!(
        daily.retention_deadline.unwrap().seconds,
        (T0 - 10 * 3_600_000 + 86_400_000 + 600_000) / 1000
    );
    assert_eq!(
        pending.retention_deadline.unwrap().seconds,
        (T0 + 3_600_000 + 600_000) / 1000
    );

    clock.advance(Duration::from_secs(3600 + 600));
    assert_eq!(server.app.insights.release_due().await.unwrap().released, 1);
    let mine = transparency_client(ch.clone())
        .get_my_data(pb::GetMyDataRequest {
            device_token: "ft-device-00000001".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        mine.pending_contributions.is_none(),
        "released contributions are deleted"
    );

    let hour = merchant_client(ch.clone(), Some(&key_a))
        .get_foot_traffic(day_of(vec![here.into()], pb::Granularity::Hour))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hour.points.len(), 1);
    let p = &hour.points[0];
    assert_eq!(
        (p.cell, p.bucket_start.unwrap().seconds),
        (u64::from(here), T0 / 1000)
    );
    assert!(p.ci95_low <= p.ci95_high);
    let params = hour.params.unwrap();
    assert_eq!(params.mechanism, "discrete_gaussian");
    assert!(params.epsilon_per_device_per_day > 0.0 && !params.explanation.is_empty());
    if !p.suppressed {
        assert!((p.ci95_high - p.ci95_low) >= params.ci95_half_width);
    }
    // A day is not a sum of hours: before the daily release there is no DAY point at all.
    let before = merchant_client(ch.clone(), Some(&key_a))
        .get_foot_traffic(day_of(vec![here.into()], pb::Granularity::Day))
        .await
        .unwrap()
        .into_inner();
    assert!(before.points.is_empty(), "{:?}", before.points);
    // The same devices come back in a later hour: hours count them twice, the day once.
    for n in 0..25 {
        report(format!("ft-device-{n:08}"), here.into()).await;
    }
    let day_start = T0 - 10 * 3_600_000;
    clock.set(Timestamp(day_start + 86_400_000 + 600_000));
    let run = server.app.insights.release_due().await.unwrap();
    assert_eq!(run.days, 1, "{run:?}");
    assert_eq!(server.app.insights.release_due().await.unwrap().days, 0);
    let released = store
        .released_days(&[u64::from(here)], Timestamp(day_start), Timestamp(T0))
        .await
        .unwrap();
    assert_eq!(released.len(), 1);
    let ledger = store
        .daily_ledger(Timestamp(day_start), Timestamp(T0))
        .await
        .unwrap();
    assert_eq!(ledger.len(), 1);
    let daily_half = hexveil::privacy::accounting::ci95_half_width_gaussian(ledger[0].scale);
    let day = merchant_client(ch.clone(), Some(&key_a))
        .get_foot_traffic(day_of(vec![here.into()], pb::Granularity::Day))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(day.points.len(), 1);
    let d = &day.points[0];
    assert_eq!(d.bucket_start.unwrap().seconds, day_start / 1000);
    assert_eq!(d.suppressed, released[0].suppressed);
    if d.suppressed {
        assert_eq!((d.count, d.ci95_low), (0, 0.0));
        assert!((d.ci95_high - (20.0 + daily_half)).abs() < 1e-9);
    } else {
        assert_eq!(d.count, released[0].noisy, "DAY reads the daily release");
        assert!((d.ci95_high - (d.count as f64 + daily_half)).abs() < 1e-9);
        assert!((d.ci95_low - (d.count as f64 - daily_half).max(0.0)).abs() < 1e-9);
    }
    // A coarser area sums released daily values, with a wider interval.
    let parent = here.parent(h3o::Resolution::Seven).unwrap();
    let area = merchant_client(ch.clone(), Some(&key_a))
        .get_foot_traffic(day_of(vec![parent.into()], pb::Granularity::Day))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(area.points.len(), 1);
    let a = &area.points[0];
    assert_eq!(a.bucket_start.unwrap().seconds, day_start / 1000);
    let children: Vec<u64> = parent
        .children(h3o::Resolution::Eight)
        .map(u64::from)
        .collect();
    let rows = store
        .released_days(&children, Timestamp(day_start), Timestamp(T0))
        .await
        .unwrap();
    assert!(
        rows.len() > 1,
        "the domain's cells under the parent, zeros included"
    );
    let sum: i64 = rows.iter().map(|r| r.noisy).sum();
    if !a.suppressed {
        assert_eq!(a.count, sum);
    }
    assert!(a.ci95_high - a.ci95_low > 2.0 * daily_half || a.suppressed);

    // Outside the merchant's area: PERMISSION_DENIED.
    let err = merchant_client(ch.clone(), Some(&key_a))
        .get_foot_traffic(day_of(vec![elsewhere.into()], pb::Granularity::Hour))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Bad parameters name the field.
    for (req, field) in [
        (
            pb::GetFootTrafficRequest {
                cells: vec![here.into()],
                start: None,
                end: Some(ts(T0)),
                granularity: 1,
            },
            "start",
        ),
        (
            pb::GetFootTrafficRequest {
                cells: vec![],
                start: Some(ts(T0)),
                end: Some(ts(T0 + 1000)),
                granularity: 1,
            },
            "cells",
        ),
        (
            pb::GetFootTrafficRequest {
                cells: vec![here.center_child(h3o::Resolution::Nine).unwrap().into()],
                start: Some(ts(T0)),
                end: Some(ts(T0 + 1000)),
                granularity: 1,
            },
            "cells[0]",
        ),
        (
            pb::GetFootTrafficRequest {
                cells: vec![here.into()],
                start: Some(ts(T0)),
                end: Some(ts(T0)),
                granularity: 1,
            },
            "end",
        ),
    ] {
        let err = merchant_client(ch.clone(), Some(&key_a))
            .get_foot_traffic(req)
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
    server.stop().await;
}
