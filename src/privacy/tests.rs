//! Tests of the release path against a real store: contribution bounding (noise disabled
//! through the test-only seam), domain completeness, release-once, and the statistics of
//! the noise that the real release path adds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::Insights;
use super::accounting::{self, Mechanism};
use crate::clock::{Clock, ManualClock, SharedClock, Timestamp};
use crate::config::{Config, MechanismKind};
use crate::devices::Devices;
use crate::model::{Purpose, Purposes};
use crate::offers::OfferIndex;
use crate::presence::{Presence, Report};
use crate::pseudonym::DeviceId;
use crate::settings::{LiveSettings, Settings};
use crate::store::{Store, WriteOp};

/// 2026-01-05T10:00:00Z, on an hour boundary.
const T0: i64 = 1_767_607_200_000;
const HOUR: Duration = Duration::from_secs(3600);

struct Rig {
    _dir: tempfile::TempDir,
    store: Store,
    clock: ManualClock,
    devices: Arc<Devices>,
    insights: Insights,
    presence: Presence,
    settings: LiveSettings,
}

async fn rig(config: Config, noise: bool, merchants: &[(f64, f64)]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let clock = ManualClock::new(Timestamp(T0));
    let shared: SharedClock = Arc::new(clock.clone());
    for (i, (lat, lng)) in merchants.iter().enumerate() {
        let cell = h3o::LatLng::new(*lat, *lng)
            .unwrap()
            .to_cell(h3o::Resolution::Eight);
        crate::merchants::add(
            &store,
            &format!("m{i}"),
            vec![cell.into()],
            8,
            Timestamp(T0 - 1),
        )
        .await
        .unwrap();
    }
    let settings = LiveSettings::new(Settings::new(config).unwrap());
    let mut insights = Insights::new(store.clone(), shared.clone(), settings.clone());
    if !noise {
        insights = insights.without_noise();
    }
    insights.load().await.unwrap();
    let devices = Arc::new(Devices::default());
    let presence = Presence::new(
        devices.clone(),
        Arc::new(OfferIndex::default()),
        store.clone(),
        shared,
        settings.clone(),
        insights.clone(),
    );
    Rig {
        _dir: dir,
        store,
        clock,
        devices,
        insights,
        presence,
        settings,
    }
}

fn device(n: u32) -> DeviceId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_le_bytes());
    id[15] = n as u8;
    DeviceId(id)
}

/// Grants consent as the consent service does: the store (contributions and notifications
/// are recorded only for a device the store knows consents), then memory.
async fn consent(r: &Rig, d: DeviceId, purposes: &[Purpose]) {
    store_consent(&r.store, d, purposes, r.clock.now()).await;
    let p: Purposes = purposes.iter().copied().collect();
    r.devices.set_purposes(d, p, r.clock.now());
}

async fn store_consent(store: &Store, d: DeviceId, purposes: &[Purpose], now: Timestamp) {
    let receipt = crate::model::ConsentReceipt {
        receipt_id: uuid::Uuid::new_v4().to_string(),
        device: d,
        purposes: purposes.iter().copied().collect(),
        granted_at: now,
        policy_version: "1".into(),
        controller: "test".into(),
    };
    store.put_consent(receipt, now).await.unwrap();
}

async fn released(r: &Rig, bucket: Timestamp) -> Vec<(u64, i64)> {
    let domain: Vec<u64> = super::domain::domain(
        &r.store.merchants().await.unwrap(),
        &r.settings.current().config,
        bucket,
    )
    .into_iter()
    .collect();
    r.store
        .released(&domain, bucket, bucket.plus(Duration::from_millis(1)))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.cell, c.noisy))
        .collect()
}

#[tokio::test]
async fn a_device_in_fifty_cells_moves_at_most_k_counts_by_one() {
    let mut config = Config::default();
    config.insights.radius_k = 10;
    config.rate_limits.device_burst = 1000;
    let r = rig(config, false, &[(45.76, 4.84)]).await;
    let d = device(1);
    consent(&r, d, &[Purpose::FootTraffic]).await;
    let centre = h3o::LatLng::new(45.76, 4.84)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let cells: Vec<_> = centre.grid_disk::<Vec<_>>(5).into_iter().take(50).collect();
    assert_eq!(cells.len(), 50);
    for c in &cells {
        let report = Report {
            device: d,
            cell: *c,
            observed_at: r.clock.now(),
            utc_offset_minutes: 0,
        };
        r.presence.report(report).await.unwrap();
        // Twice: duplicates must not count either.
        r.presence.report(report).await.unwrap();
        r.clock.advance(Duration::from_secs(30));
    }
    r.clock.advance(2 * HOUR);
    let run = r.insights.release_due().await.unwrap();
    // T0 and the empty bucket after it: releases run from the merchant's first whole bucket.
    assert_eq!(run.released, 2);
    let counts = released(&r, Timestamp(T0)).await;
    assert_eq!(counts.len(), 331, "the whole domain is released");
    let moved: Vec<_> = counts.iter().filter(|(_, n)| *n != 0).collect();
    let k = r.settings.current().config.privacy.max_cells_per_bucket as usize;
    assert_eq!(moved.len(), k, "{moved:?}");
    assert!(moved.iter().all(|(_, n)| *n == 1));
}

#[tokio::test]
async fn releases_cover_the_domain_exactly_once_and_delete_raw_contributions() {
    let r = rig(Config::default(), true, &[(45.76, 4.84), (45.9, 4.9)]).await;
    let domain = super::domain::domain(
        &r.store.merchants().await.unwrap(),
        &r.settings.current().config,
        Timestamp(T0),
    );
    assert_eq!(domain.len(), 38, "two disjoint disks of 19 cells");
    let outside = h3o::LatLng::new(10.0, 10.0)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let inside = *domain.iter().next().unwrap();
    for n in 0..30 {
        let d = device(n);
        consent(&r, d, &[Purpose::FootTraffic, Purpose::NearbyOffers]).await;
        for cell in [inside, u64::from(outside)] {
            let report = Report {
                device: d,
                cell: h3o::CellIndex::try_from(cell).unwrap(),
                observed_at: r.clock.now(),
                utc_offset_minutes: 0,
            };
            r.presence.report(report).await.unwrap();
        }
    }
    // A device without foot-traffic consent is never counted.
    let d = device(99);
    consent(&r, d, &[Purpose::NearbyOffers]).await;
    r.presence
        .report(Report {
            device: d,
            cell: h3o::CellIndex::try_from(inside).unwrap(),
            observed_at: r.clock.now(),
            utc_offset_minutes: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        r.store.bucket_counts(Timestamp(T0), 4).await.unwrap(),
        vec![(inside, 30)]
    );
    // Not due before bucket end + grace.
    r.clock.advance(HOUR + Duration::from_secs(9 * 60));
    assert_eq!(r.insights.release_due().await.unwrap().released, 0);
    r.clock.advance(Duration::from_secs(60));
    assert_eq!(r.insights.release_due().await.unwrap().released, 1);
    // Twice, and a direct retry: nothing more.
    assert_eq!(r.insights.release_due().await.unwrap().released, 0);
    assert!(!r.insights.release(Timestamp(T0)).await.unwrap());
    let ledger = r
        .store
        .ledger(Timestamp(i64::MIN), Timestamp(i64::MAX))
        .await
        .unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].cells, 38);
    assert_eq!(ledger[0].mechanism, "discrete_gaussian");
    let cells: BTreeSet<u64> = released(&r, Timestamp(T0))
        .await
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert_eq!(
        cells, domain,
        "every domain cell, zeros included, and nothing else"
    );
    let all = r
        .store
        .released(&[u64::from(outside)], Timestamp(0), Timestamp(i64::MAX))
        .await
        .unwrap();
    assert!(
        all.is_empty(),
        "a cell outside the domain is never released"
    );
    assert!(
        r.store.unreleased_buckets().await.unwrap().is_empty(),
        "raw contributions are gone"
    );
    // A late report for the released bucket is dropped.
    let late = Report {
        device: device(0),
        cell: h3o::CellIndex::try_from(inside).unwrap(),
        observed_at: Timestamp(T0 + 60_000),
        utc_offset_minutes: 0,
    };
    let (_, commit) = r.presence.decide(late).unwrap();
    assert!(
        !matches!(commit, Some(WriteOp::Many(ref ops)) if ops.iter().any(|o| matches!(o, WriteOp::Contribute { .. })))
    );
    // The next, empty, bucket is released too once due: zeros are released.
    r.clock.advance(HOUR);
    assert_eq!(r.insights.release_due().await.unwrap().released, 1);
    assert_eq!(released(&r, Timestamp(T0).plus(HOUR)).await.len(), 38);
}

/// Releases `rounds` buckets of a fixed dataset through the real release path and returns
/// the noise (released minus true) of every cell.
async fn noise_samples(mechanism: MechanismKind, rounds: usize) -> (Vec<i64>, f64) {
    let mut config = Config::default();
    config.insights.radius_k = 10;
    config.privacy.mechanism = mechanism;
    // 30 far-apart merchants: 30 disjoint disks of 331 cells.
    let merchants: Vec<(f64, f64)> = (0..30).map(|i| (40.0 + f64::from(i) * 0.5, 2.0)).collect();
    let r = rig(config, true, &merchants).await;
    let scale = r.settings.current().consequences.privacy.noise_scale;
    let domain: Vec<u64> = super::domain::domain(
        &r.store.merchants().await.unwrap(),
        &r.settings.current().config,
        Timestamp(T0),
    )
    .into_iter()
    .collect();
    // Each device counts in 4 neighbouring cells of the domain at most (the default k, which
    // the release clips to): device 7·(i / 4) + n is one of cell i's i % 7 visitors.
    let visitor = |i: usize, n: u32| device(7 * (i / 4) as u32 + n);
    let consents: Vec<WriteOp> = (0..domain.len())
        .step_by(4)
        .flat_map(|i| (0..6).map(move |n| (i, n)))
        .map(|(i, n)| WriteOp::PutConsent {
            receipt: crate::model::ConsentReceipt {
                receipt_id: uuid::Uuid::new_v4().to_string(),
                device: visitor(i, n),
                purposes: [Purpose::FootTraffic].into_iter().collect(),
                granted_at: Timestamp(T0),
                policy_version: "1".into(),
                controller: "test".into(),
            },
            now: Timestamp(T0),
        })
        .collect();
    r.store.write(WriteOp::Many(consents)).await.unwrap();
    let mut samples = Vec::new();
    for round in 0..rounds {
        let bucket = Timestamp(T0).plus(HOUR * round as u32);
        // The fixed dataset: cell i of the domain has i % 7 devices.
        let mut truth = std::collections::HashMap::new();
        let mut ops = Vec::new();
        for (i, cell) in domain.iter().enumerate() {
            for n in 0..(i % 7) as u32 {
                ops.push(WriteOp::Contribute {
                    device: visitor(i, n),
                    cell: *cell,
                    bucket,
                    max_cells: u32::MAX,
                    max_per_day: u32::MAX,
                });
            }
            truth.insert(*cell, (i % 7) as i64);
        }
        r.store.write(WriteOp::Many(ops)).await.unwrap();
        assert!(r.insights.release(bucket).await.unwrap());
        for (cell, noisy) in released(&r, bucket).await {
            samples.push(noisy - truth[&cell]);
        }
    }
    (samples, scale)
}

/// Mean, standard deviation and a chi-square goodness-of-fit test against the exact pmf.
///
/// False-failure rates (each at most 1e-6, documented here):
/// - mean: |mean| > 5 standard errors has probability 5.7e-7 under the null (normal limit);
/// - std-dev: the sample std-dev of n ≥ 100,000 draws has relative standard error at most
///   0.4% (Laplace, kurtosis 6); a 3% deviation is over 7 standard errors (p < 1e-12);
/// - chi-square: the statistic is compared with the chi-square quantile at 1 - 1e-6 for its
///   degrees of freedom; bins are merged until each expects at least 20 draws.
fn check_distribution(samples: &[i64], mechanism: Mechanism, scale: f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<i64>() as f64 / n;
    let var = samples
        .iter()
        .map(|x| (*x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let theory = match mechanism {
        Mechanism::DiscreteGaussian => accounting::discrete_gaussian_std(scale),
        Mechanism::DiscreteLaplace => accounting::discrete_laplace_std(scale),
    };
    assert!(
        mean.abs() <= 5.0 * theory / n.sqrt(),
        "mean {mean} too far from 0"
    );
    let sd = var.sqrt();
    assert!(
        (sd / theory - 1.0).abs() <= 0.03,
        "std-dev {sd} vs theory {theory}"
    );
    // Chi-square over bins of consecutive values, tails pooled.
    let (lo, hi) = (
        *samples.iter().min().unwrap(),
        *samples.iter().max().unwrap(),
    );
    let mut observed = std::collections::HashMap::new();
    for x in samples {
        *observed.entry(*x).or_insert(0u64) += 1;
    }
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (expected, observed)
    let (mut e_acc, mut o_acc) = (0.0, 0.0);
    // Left tail: P(X < lo) folded into the first bin.
    let mut tail_left = 0.0;
    let mut k = lo - 1;
    loop {
        let p = accounting::pmf(mechanism, scale, k);
        if p < 1e-300 || k < lo - 10_000 {
            break;
        }
        tail_left += p;
        k -= 1;
    }
    e_acc += tail_left * n;
    for k in lo..=hi {
        e_acc += accounting::pmf(mechanism, scale, k) * n;
        o_acc += *observed.get(&k).unwrap_or(&0) as f64;
        if e_acc >= 20.0 {
            bins.push((e_acc, o_acc));
            e_acc = 0.0;
            o_acc = 0.0;
        }
    }
    // Right tail and any remainder join the last bin.
    let mut tail_right = 0.0;
    let mut k = hi + 1;
    loop {
        let p = accounting::pmf(mechanism, scale, k);
        if p < 1e-300 || k > hi + 10_000 {
            break;
        }
        tail_right += p;
        k += 1;
    }
    let last = bins.last_mut().unwrap();
    last.0 += e_acc + tail_right * n;
    last.1 += o_acc;
    let stat: f64 = bins.iter().map(|(e, o)| (o - e).powi(2) / e).sum();
    let df = (bins.len() - 1) as f64;
    use statrs::distribution::{ChiSquared, Univariate};
    // The 1 - 1e-6 quantile, by bisection on the exact CDF.
    let chi = ChiSquared::new(df).unwrap();
    let (mut a, mut b) = (df, df + 200.0 * df.sqrt() + 200.0);
    for _ in 0..200 {
        let m = (a + b) / 2.0;
        if chi.cdf(m) < 1.0 - 1e-6 {
            a = m
        } else {
            b = m
        }
    }
    let critical = b;
    assert!(
        stat <= critical,
        "chi-square {stat:.1} > {critical:.1} (df {df})"
    );
}

#[tokio::test]
async fn gaussian_release_noise_matches_the_mechanism() {
    let (samples, scale) = noise_samples(MechanismKind::Gaussian, 11).await;
    assert!(samples.len() >= 100_000, "{}", samples.len());
    check_distribution(&samples, Mechanism::DiscreteGaussian, scale);
}

#[tokio::test]
async fn laplace_release_noise_matches_the_mechanism() {
    let (samples, scale) = noise_samples(MechanismKind::Laplace, 11).await;
    assert!(samples.len() >= 100_000, "{}", samples.len());
    check_distribution(&samples, Mechanism::DiscreteLaplace, scale);
}

/// An offer of merchant `m0` valid over `[from, until)`.
async fn put_offer(r: &Rig, from: i64, until: i64) -> crate::model::Offer {
    let m = &r.store.merchants().await.unwrap()[0];
    let offer = crate::model::Offer {
        offer_id: uuid::Uuid::new_v4(),
        merchant_id: m.merchant_id,
        title: "t".into(),
        body: String::new(),
        cell: m.cells[0],
        radius_k: 1,
        valid_from: Timestamp(from),
        valid_until: Timestamp(until),
        max_notifications_per_day: 1000,
        opening_hours: vec![],
        updated_at: Timestamp(T0),
    };
    r.store
        .write(WriteOp::PutOffer(offer.clone()))
        .await
        .unwrap();
    offer
}

async fn deliver(r: &Rig, d: DeviceId, offer: &crate::model::Offer, at: i64, opened: bool) {
    let n = crate::model::Notification {
        notification_id: uuid::Uuid::new_v4(),
        device: d,
        offer_id: offer.offer_id,
        merchant_id: offer.merchant_id,
        cell: offer.cell,
        sent_at: Timestamp(at),
        feedback: None,
    };
    let id = n.notification_id;
    r.store.write(WriteOp::Notify(n)).await.unwrap();
    if opened {
        r.store
            .write(WriteOp::Feedback {
                device: d,
                notification_id: id,
                feedback: crate::model::Feedback::Opened,
                restriction: None,
                now: Timestamp(at),
            })
            .await
            .unwrap();
    }
}

const DAY_MS: i64 = 86_400_000;

/// Offer statistics clip each device to what the caps allow (3 deliveries a day, 1 per
/// offer with the defaults), count an open only for a kept delivery, release every offer
/// valid that day (zeros included, none other), once, with a ledger entry that spends
/// exactly the offer-statistics share of the budget.
#[tokio::test]
async fn offer_stats_clip_devices_release_the_domain_once_and_enter_the_ledger() {
    let r = rig(Config::default(), false, &[(59.33, 18.07)]).await;
    let day = T0.div_euclid(DAY_MS) * DAY_MS;
    let a = put_offer(&r, day - DAY_MS, day + 10 * DAY_MS).await;
    let b = put_offer(&r, day - DAY_MS, day + 10 * DAY_MS).await;
    let quiet = put_offer(&r, day - DAY_MS, day + 10 * DAY_MS).await;
    let _future = put_offer(&r, day + 3 * DAY_MS, day + 10 * DAY_MS).await;
    let (d1, d2, d3) = (device(1), device(2), device(3));
    for d in [d1, d2, d3] {
        store_consent(&r.store, d, &[Purpose::NearbyOffers], Timestamp(T0)).await;
    }
    // d1: five deliveries of A (only the first counts, and it was opened).
    deliver(&r, d1, &a, T0, true).await;
    for i in 1..5 {
        deliver(&r, d1, &a, T0 + i * 60_000, true).await;
    }
    // d2: A, B, A — the second A is over the per-offer bound; nothing opened.
    deliver(&r, d2, &a, T0, false).await;
    deliver(&r, d2, &b, T0 + 60_000, false).await;
    deliver(&r, d2, &a, T0 + 120_000, false).await;
    // d3: four of B on the next day belong to the next day's release.
    for i in 0..4 {
        deliver(&r, d3, &b, day + DAY_MS + i * 60_000, true).await;
    }
    let os = r
        .settings
        .current()
        .consequences
        .privacy
        .offer_stats
        .clone();
    assert_eq!(
        (
            os.max_deliveries_per_device_per_day,
            os.max_deliveries_per_device_per_offer
        ),
        (3, 1)
    );

    r.clock.set(Timestamp(day + DAY_MS + 10 * 60_000 - 1));
    assert_eq!(
        r.insights.release_offer_stats_due().await.unwrap(),
        0,
        "not before the grace"
    );
    r.clock.set(Timestamp(day + DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_offer_stats_due().await.unwrap(), 1);
    assert_eq!(
        r.insights.release_offer_stats_due().await.unwrap(),
        0,
        "released once"
    );
    let merchant = r.store.merchants().await.unwrap().remove(0);
    let stats = r
        .store
        .offer_stats(
            merchant.merchant_id,
            Timestamp(day - DAY_MS),
            Timestamp(day + 5 * DAY_MS),
        )
        .await
        .unwrap();
    let get = |o: &crate::model::Offer| {
        stats
            .iter()
            .find(|s| s.offer_id == o.offer_id)
            .map(|s| (s.deliveries, s.opens))
    };
    assert_eq!(get(&a), Some((2, 1)));
    assert_eq!(get(&b), Some((1, 0)));
    assert_eq!(get(&quiet), Some((0, 0)), "zeros are released too");
    assert_eq!(
        stats.len(),
        3,
        "an offer not valid that day is not released"
    );
    let ledger = r
        .store
        .offer_stats_ledger(Timestamp(day - DAY_MS), Timestamp(day + 5 * DAY_MS))
        .await
        .unwrap();
    assert_eq!(ledger.len(), 1);
    let part = r
        .settings
        .current()
        .consequences
        .privacy
        .budget
        .iter()
        .find(|p| p.release == "offer_stats")
        .unwrap()
        .clone();
    assert!(
        (ledger[0].rho - part.rho).abs() < 1e-12,
        "{:?} vs {part:?}",
        ledger[0]
    );
    assert!(
        (ledger[0].rho - r.settings.current().config.privacy.offer_stats_rho_per_day).abs() < 1e-9
    );

    // The next day: d3's four deliveries of B count once (per-offer bound), opened.
    r.clock.set(Timestamp(day + 2 * DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_offer_stats_due().await.unwrap(), 1);
    let next = r
        .store
        .offer_stats(
            merchant.merchant_id,
            Timestamp(day + DAY_MS),
            Timestamp(day + 2 * DAY_MS),
        )
        .await
        .unwrap();
    assert_eq!(
        next.iter()
            .find(|s| s.offer_id == b.offer_id)
            .map(|s| (s.deliveries, s.opens)),
        Some((1, 1))
    );
}

/// Noise of released offer statistics: 1000 offers over 50 days nobody was notified on,
/// released through the real path; every released value is pure noise.
async fn offer_noise_samples(mechanism: MechanismKind) -> (Vec<i64>, f64) {
    let mut config = Config::default();
    config.privacy.mechanism = mechanism;
    let r = rig(config, true, &[(59.33, 18.07)]).await;
    let scale = r
        .settings
        .current()
        .consequences
        .privacy
        .offer_stats
        .noise_scale;
    let day = T0.div_euclid(DAY_MS) * DAY_MS;
    let m = r.store.merchants().await.unwrap().remove(0);
    let ops = (0..1000)
        .map(|_| {
            WriteOp::PutOffer(crate::model::Offer {
                offer_id: uuid::Uuid::new_v4(),
                merchant_id: m.merchant_id,
                title: "t".into(),
                body: String::new(),
                cell: m.cells[0],
                radius_k: 0,
                valid_from: Timestamp(day - DAY_MS),
                valid_until: Timestamp(day + 100 * DAY_MS),
                max_notifications_per_day: 1,
                opening_hours: vec![],
                updated_at: Timestamp(T0),
            })
        })
        .collect();
    r.store.write(WriteOp::Many(ops)).await.unwrap();
    r.clock.set(Timestamp(day + 50 * DAY_MS + 10 * 60_000));
    assert_eq!(r.insights.release_offer_stats_due().await.unwrap(), 50);
    let samples = r
        .store
        .offer_stats(m.merchant_id, Timestamp(day), Timestamp(day + 50 * DAY_MS))
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| [s.deliveries, s.opens])
        .collect();
    (samples, scale)
}

#[tokio::test]
async fn gaussian_offer_stats_noise_matches_the_mechanism() {
    let (samples, scale) = offer_noise_samples(MechanismKind::Gaussian).await;
    assert_eq!(samples.len(), 100_000);
    check_distribution(&samples, Mechanism::DiscreteGaussian, scale);
}

#[tokio::test]
async fn laplace_offer_stats_noise_matches_the_mechanism() {
    let (samples, scale) = offer_noise_samples(MechanismKind::Laplace).await;
    assert_eq!(samples.len(), 100_000);
    check_distribution(&samples, Mechanism::DiscreteLaplace, scale);
}

/// Audit 9 F1: a reload that lowers `privacy.max_cells_per_bucket` while a bucket is pending
/// must not release the contributions admitted under the old bound with noise calibrated
/// for the new one: the release clips every device to the k in force (its lowest cells).
#[tokio::test]
async fn a_lowered_k_clips_the_pending_bucket_to_the_new_bound() {
    let mut config = Config::default();
    config.insights.radius_k = 10;
    config.rate_limits.device_burst = 1000;
    config.privacy.max_cells_per_bucket = 100;
    config.privacy.max_contributions_per_day = 100;
    let r = rig(config.clone(), false, &[(45.76, 4.84)]).await;
    let d = device(1);
    consent(&r, d, &[Purpose::FootTraffic]).await;
    let centre = h3o::LatLng::new(45.76, 4.84)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let cells: Vec<_> = centre
        .grid_disk::<Vec<_>>(6)
        .into_iter()
        .take(100)
        .collect();
    for c in &cells {
        let report = Report {
            device: d,
            cell: *c,
            observed_at: r.clock.now(),
            utc_offset_minutes: 0,
        };
        r.presence.report(report).await.unwrap();
    }
    assert_eq!(r.store.load_contributions().await.unwrap().len(), 100);
    // The operator lowers k to 1 before the bucket falls due.
    config.privacy.max_cells_per_bucket = 1;
    config.privacy.max_contributions_per_day = 4;
    r.settings.replace(Settings::new(config).unwrap());
    r.clock.advance(HOUR + Duration::from_secs(11 * 60));
    assert_eq!(r.insights.release_due().await.unwrap().released, 1);
    let counts = released(&r, Timestamp(T0)).await;
    let moved: Vec<_> = counts.iter().filter(|(_, n)| *n != 0).collect();
    let lowest = cells.iter().map(|c| u64::from(*c)).min().unwrap();
    assert_eq!(
        moved,
        vec![&(lowest, 1)],
        "one cell (the lowest), counted once"
    );
}

/// Audit 9 F4(c): a release that fails (the store cannot write) must not move the
/// watermark: the bucket — empty here — is released on the next run, so a failure never
/// leaves a gap that would read as "nobody came".
#[tokio::test]
async fn a_failed_release_is_retried_and_leaves_no_gap() {
    let r = rig(Config::default(), true, &[(45.76, 4.84)]).await;
    r.clock.advance(HOUR + Duration::from_secs(11 * 60));
    r.store.set_writable_for_test(false);
    assert!(r.insights.release_due().await.is_err());
    r.store.set_writable_for_test(true);
    r.clock.advance(Duration::from_secs(9 * 60));
    assert_eq!(r.insights.release_due().await.unwrap().released, 1);
    let ledger = r
        .store
        .ledger(Timestamp(i64::MIN), Timestamp(i64::MAX))
        .await
        .unwrap();
    assert_eq!(
        ledger.iter().map(|e| e.bucket).collect::<Vec<_>>(),
        vec![Timestamp(T0)]
    );
}

mod daily;
