//! The daily release against a real store: the per-day bound across hourly releases and a
//! restart (and against a writer that bypasses memory), release-once over the whole domain
//! with zeros, late reports, and the statistics of its noise.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::{HOUR, T0, check_distribution, consent, device, rig, store_consent};
use crate::clock::{Clock, SharedClock, Timestamp};
use crate::config::{Config, MechanismKind};
use crate::devices::Devices;
use crate::model::Purpose;
use crate::offers::OfferIndex;
use crate::presence::{Presence, Report};
use crate::privacy::Insights;
use crate::privacy::accounting::Mechanism;
use crate::privacy::daily::{self, DAY_MS};
use crate::privacy::release::Noise;
use crate::store::WriteOp;

/// Start of the UTC day holding T0 (T0 is 10:00).
const DAY0: i64 = T0 - 10 * 3_600_000;

async fn released_day(store: &crate::store::Store, cells: &[u64], day: i64) -> Vec<(u64, i64)> {
    store
        .released_days(cells, Timestamp(day), Timestamp(day + 1))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.cell, c.noisy))
        .collect()
}

fn domain_of(r: &super::Rig, merchants: &[crate::model::Merchant]) -> Vec<u64> {
    crate::privacy::domain::domain(
        merchants,
        &r.settings.current().config,
        Timestamp(DAY0 + DAY_MS - 1),
    )
    .into_iter()
    .collect()
}

/// Acceptance 1: a device seen in 15 cells over three hours of a day — with an hourly
/// release after each hour and a restart (fresh memory) in between — counts in at most
/// `privacy.max_cells_per_day` (8) cells of the daily release, each by one; a writer that
/// bypasses memory is refused by the store.
#[tokio::test]
async fn a_device_in_fifteen_cells_counts_in_at_most_k_daily_cells_across_releases_and_a_restart() {
    let mut config = Config::default();
    config.insights.radius_k = 10;
    config.rate_limits.device_burst = 1000;
    let mut r = rig(config, false, &[(45.76, 4.84)]).await;
    let d = device(1);
    consent(&r, d, &[Purpose::FootTraffic]).await;
    let centre = h3o::LatLng::new(45.76, 4.84)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let cells: Vec<_> = centre.grid_disk::<Vec<_>>(5).into_iter().take(15).collect();
    let k = r.settings.current().config.privacy.max_cells_per_day as usize;
    assert_eq!(k, 8);
    for (hour, chunk) in cells.chunks(5).enumerate() {
        if hour == 2 {
            // Restart: new memory, loaded from the store as the server does at start.
            let shared: SharedClock = Arc::new(r.clock.clone());
            let insights =
                Insights::new(r.store.clone(), shared.clone(), r.settings.clone()).without_noise();
            insights.load().await.unwrap();
            let devices = Arc::new(Devices::default());
            devices.set_purposes(
                d,
                [Purpose::FootTraffic].into_iter().collect(),
                r.clock.now(),
            );
            devices.load_contributions(
                r.store.load_contributions().await.unwrap(),
                r.store
                    .load_contribution_spend(Timestamp(i64::MAX))
                    .await
                    .unwrap(),
                r.store.load_daily_contributions().await.unwrap(),
            );
            r.presence = Presence::new(
                devices.clone(),
                Arc::new(OfferIndex::default()),
                r.store.clone(),
                shared,
                r.settings.clone(),
                insights.clone(),
            );
            r.devices = devices;
            r.insights = insights;
        }
        for c in chunk {
            let report = Report {
                device: d,
                cell: *c,
                observed_at: r.clock.now(),
                utc_offset_minutes: 0,
            };
            r.presence.report(report).await.unwrap();
            r.clock.advance(Duration::from_secs(60));
        }
        // The hourly release of the bucket just ended leaves daily contributions alone.
        r.clock.advance(HOUR + Duration::from_secs(5 * 60));
        assert_eq!(r.insights.release_due().await.unwrap().released, 1);
    }
    // A writer that bypasses memory (another node, a stale cache) cannot add a ninth cell.
    let ninth = WriteOp::ContributeDay {
        device: d,
        cell: u64::from(cells[14]),
        day: Timestamp(DAY0),
        max_cells: k as u32,
    };
    r.store.write(ninth).await.unwrap();
    let held = r.store.load_daily_contributions().await.unwrap();
    assert_eq!(held.len(), k, "the store refused the ninth cell");
    r.clock.set(Timestamp(DAY0 + DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_due().await.unwrap().days, 1);
    let merchants = r.store.merchants().await.unwrap();
    let counts = released_day(&r.store, &domain_of(&r, &merchants), DAY0).await;
    assert_eq!(counts.len(), 331, "the whole domain is released");
    let moved: Vec<_> = counts.iter().filter(|(_, n)| *n != 0).collect();
    assert_eq!(moved.len(), k, "{moved:?}");
    assert!(moved.iter().all(|(_, n)| *n == 1));
}

#[tokio::test]
async fn the_daily_release_covers_the_domain_once_with_zeros_and_deletes_raw_contributions() {
    let r = rig(Config::default(), true, &[(45.76, 4.84), (45.9, 4.9)]).await;
    let merchants = r.store.merchants().await.unwrap();
    let domain = domain_of(&r, &merchants);
    assert_eq!(domain.len(), 38);
    let inside = domain[0];
    for n in 0..30 {
        let d = device(n);
        consent(&r, d, &[Purpose::FootTraffic]).await;
        // The same cell in two hours: counted once in the day.
        for _ in 0..2 {
            r.presence
                .report(Report {
                    device: d,
                    cell: h3o::CellIndex::try_from(inside).unwrap(),
                    observed_at: r.clock.now(),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap();
        }
    }
    r.clock.advance(HOUR);
    for n in 0..30 {
        r.presence
            .report(Report {
                device: device(n),
                cell: h3o::CellIndex::try_from(inside).unwrap(),
                observed_at: r.clock.now(),
                utc_offset_minutes: 0,
            })
            .await
            .unwrap();
    }
    assert_eq!(
        r.store.day_counts(Timestamp(DAY0)).await.unwrap(),
        vec![(inside, 30)]
    );
    // Not due before the day's end + grace.
    r.clock.set(Timestamp(DAY0 + DAY_MS + 9 * 60_000));
    assert_eq!(r.insights.release_due().await.unwrap().days, 0);
    r.clock.set(Timestamp(DAY0 + DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_due().await.unwrap().days, 1);
    // Again, and a direct retry: nothing more.
    assert_eq!(r.insights.release_due().await.unwrap().days, 0);
    let settings = r.settings.current();
    assert!(
        !daily::release_day(
            &r.store,
            &settings,
            Noise::OpenDp,
            Timestamp(DAY0),
            r.clock.now()
        )
        .await
        .unwrap()
    );
    let ledger = r
        .store
        .daily_ledger(Timestamp(i64::MIN), Timestamp(i64::MAX))
        .await
        .unwrap();
    assert_eq!(ledger.len(), 1);
    let e = &ledger[0];
    assert_eq!((e.bucket, e.cells), (Timestamp(DAY0), 38));
    let dc = &settings.consequences.privacy.daily;
    assert_eq!(e.scale, dc.noise_scale);
    assert!((e.rho - settings.config.privacy.rho_per_day).abs() < 1e-9);
    assert_eq!(e.l1_sensitivity, 8.0);
    let got: BTreeSet<u64> = released_day(&r.store, &domain, DAY0)
        .await
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert_eq!(got, domain.iter().copied().collect::<BTreeSet<_>>());
    assert!(
        r.store
            .day_counts(Timestamp(DAY0))
            .await
            .unwrap()
            .is_empty(),
        "raw daily contributions are gone"
    );
    // A late report for the released day is dropped (before any write, and by the store).
    let late = Report {
        device: device(0),
        cell: h3o::CellIndex::try_from(domain[1]).unwrap(),
        observed_at: Timestamp(DAY0 + DAY_MS - 60_000),
        utc_offset_minutes: 0,
    };
    let (_, commit) = r.presence.decide(late).unwrap();
    let has_day = |op: &WriteOp| matches!(op, WriteOp::ContributeDay { .. });
    assert!(match &commit {
        Some(WriteOp::Many(ops)) => !ops.iter().any(has_day),
        Some(op) => !has_day(op),
        None => true,
    });
    let forged = WriteOp::ContributeDay {
        device: device(0),
        cell: domain[1],
        day: Timestamp(DAY0),
        max_cells: 8,
    };
    r.store.write(forged).await.unwrap();
    assert!(
        r.store
            .day_counts(Timestamp(DAY0))
            .await
            .unwrap()
            .is_empty()
    );
    // The next, empty, day is released too once due: zeros are released.
    r.clock.set(Timestamp(DAY0 + 2 * DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_due().await.unwrap().days, 1);
    assert_eq!(
        released_day(&r.store, &domain, DAY0 + DAY_MS).await.len(),
        38
    );
}

/// A request's writes are one `Many`, whose count is the notifications it recorded: a new
/// daily contribution must not make a refused notification look recorded (the offer would be
/// shown although the store refused it).
#[tokio::test]
async fn a_daily_contribution_never_counts_as_a_recorded_notification() {
    let r = rig(Config::default(), false, &[(45.76, 4.84)]).await;
    let d = device(3);
    consent(&r, d, &[Purpose::FootTraffic, Purpose::NearbyOffers]).await;
    let cell = domain_of(&r, &r.store.merchants().await.unwrap())[0];
    let refused = crate::model::Notification {
        notification_id: uuid::Uuid::new_v4(),
        device: d,
        // No such offer: the store refuses the notification.
        offer_id: uuid::Uuid::new_v4(),
        merchant_id: r.store.merchants().await.unwrap()[0].merchant_id,
        cell,
        sent_at: r.clock.now(),
        feedback: None,
    };
    let op = WriteOp::Many(vec![
        WriteOp::Notify(refused),
        WriteOp::ContributeDay {
            device: d,
            cell,
            day: Timestamp(DAY0),
            max_cells: 8,
        },
    ]);
    assert_eq!(r.store.write_count(op).await.unwrap(), 0);
    assert_eq!(
        r.store.day_counts(Timestamp(DAY0)).await.unwrap(),
        vec![(cell, 1)],
        "the contribution itself was recorded"
    );
}

/// Releases `days` days of a fixed dataset through the real daily release and returns the
/// noise (released minus true) of every cell, with the scale the release used.
async fn daily_noise_samples(mechanism: MechanismKind, days: i64) -> (Vec<i64>, f64) {
    let mut config = Config::default();
    config.insights.radius_k = 10;
    config.privacy.mechanism = mechanism;
    let merchants: Vec<(f64, f64)> = (0..30).map(|i| (40.0 + f64::from(i) * 0.5, 2.0)).collect();
    let r = rig(config, true, &merchants).await;
    let settings = r.settings.current();
    let scale = settings.consequences.privacy.daily.noise_scale;
    let domain = domain_of(&r, &r.store.merchants().await.unwrap());
    // The fixed dataset: the first 100 cells hold i % 7 distinct devices each, the rest none.
    for n in 0..700 {
        store_consent(
            &r.store,
            device(1000 + n),
            &[Purpose::FootTraffic],
            Timestamp(T0),
        )
        .await;
    }
    let mut samples = Vec::new();
    for round in 0..days {
        let day = Timestamp(DAY0 + round * DAY_MS);
        let mut truth = HashMap::new();
        let mut ops = Vec::new();
        for (i, cell) in domain.iter().enumerate() {
            let n = if i < 100 { (i % 7) as u32 } else { 0 };
            for j in 0..n {
                ops.push(WriteOp::ContributeDay {
                    device: device(1000 + i as u32 * 7 + j),
                    cell: *cell,
                    day,
                    max_cells: 8,
                });
            }
            truth.insert(*cell, i64::from(n));
        }
        r.store.write(WriteOp::Many(ops)).await.unwrap();
        assert!(
            daily::release_day(&r.store, &settings, Noise::OpenDp, day, r.clock.now())
                .await
                .unwrap()
        );
        for (cell, noisy) in released_day(&r.store, &domain, day.millis()).await {
            samples.push(noisy - truth[&cell]);
        }
    }
    (samples, scale)
}

#[tokio::test]
async fn gaussian_daily_noise_matches_the_mechanism_at_the_configured_scale() {
    let (samples, scale) = daily_noise_samples(MechanismKind::Gaussian, 11).await;
    assert!(samples.len() >= 100_000, "{}", samples.len());
    // The configured scale: σ = sqrt(K / (2 ρ_day)) = sqrt(8 / 0.035) ≈ 15.12.
    assert!(
        (scale - (8.0_f64 / (2.0 * 0.0175)).sqrt()).abs() < 1e-6,
        "{scale}"
    );
    check_distribution(&samples, Mechanism::DiscreteGaussian, scale);
}

#[tokio::test]
async fn laplace_daily_noise_matches_the_mechanism_at_the_configured_scale() {
    let (samples, scale) = daily_noise_samples(MechanismKind::Laplace, 11).await;
    assert!(samples.len() >= 100_000, "{}", samples.len());
    // b = K / ε_day = 8 / 0.4.
    assert!((scale - 20.0).abs() < 1e-9, "{scale}");
    check_distribution(&samples, Mechanism::DiscreteLaplace, scale);
}
