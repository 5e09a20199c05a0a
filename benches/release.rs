//! Release of a ~100k-cell bucket through the real release path (counts from the store,
//! opendp noise, threshold, one transaction with the ledger entry and the deletion of raw
//! contributions), against opendp's raw sampling of the same number of values, measured in
//! the same run. The goal is a ratio of at most 1.5.
//!
//! Run: `cargo bench --bench release`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use hexveil::clock::{ManualClock, SharedClock, Timestamp};
use hexveil::config::Config;
use hexveil::privacy::Insights;
use hexveil::privacy::accounting::Mechanism;
use hexveil::pseudonym::DeviceId;
use hexveil::settings::{LiveSettings, Settings};
use hexveil::store::{Store, WriteOp};

const T0: i64 = 1_767_607_200_000;
const HOUR_MS: i64 = 3_600_000;

struct Rig {
    _dir: tempfile::TempDir,
    store: Store,
    insights: Insights,
    domain: Vec<u64>,
    scale: f64,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/bench.db", dir.path().display()))
        .await
        .unwrap();
    let mut config = Config::default();
    config.insights.radius_k = 10;
    // 303 far-apart merchants with 331-cell areas: 100,293 domain cells.
    for i in 0..303 {
        let lat = -60.0 + f64::from(i) * 0.4;
        let cell = h3o::LatLng::new(lat, 20.0)
            .unwrap()
            .to_cell(h3o::Resolution::Eight);
        hexveil::merchants::add(
            &store,
            &format!("m{i}"),
            vec![cell.into()],
            8,
            Timestamp(T0 - 1),
        )
        .await
        .unwrap();
    }
    // Contributions are recorded only for devices the store knows consent to be counted.
    let consents = (0..20_000u32)
        .map(|i| WriteOp::PutConsent {
            receipt: hexveil::model::ConsentReceipt {
                receipt_id: format!("bench-{i}"),
                device: bench_device(i),
                purposes: [hexveil::model::Purpose::FootTraffic].into_iter().collect(),
                granted_at: Timestamp(T0),
                policy_version: "1".into(),
                controller: "bench".into(),
            },
            now: Timestamp(T0),
        })
        .collect();
    store.write(WriteOp::Many(consents)).await.unwrap();
    let settings = Settings::new(config.clone()).unwrap();
    let scale = settings.consequences.privacy.noise_scale;
    let clock: SharedClock = Arc::new(ManualClock::new(Timestamp(T0)));
    let insights = Insights::new(store.clone(), clock, LiveSettings::new(settings));
    let domain =
        hexveil::privacy::domain::domain(&store.merchants().await.unwrap(), &config, Timestamp(T0))
            .into_iter()
            .collect();
    Rig {
        _dir: dir,
        store,
        insights,
        domain,
        scale,
    }
}

fn bench_device(i: u32) -> DeviceId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_le_bytes());
    DeviceId(id)
}

/// 20,000 contributions spread over the domain, for one bucket.
async fn seed(rig: &Rig, bucket: Timestamp) {
    let ops = (0..20_000u32)
        .map(|i| WriteOp::Contribute {
            device: bench_device(i),
            cell: rig.domain[(i as usize * 7) % rig.domain.len()],
            bucket,
            max_cells: u32::MAX,
            max_per_day: u32::MAX,
        })
        .collect();
    rig.store.write(WriteOp::Many(ops)).await.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rig = rt.block_on(rig());
    let n = rig.domain.len();
    println!("domain: {n} cells, noise scale {:.3}", rig.scale);
    let mut group = c.benchmark_group("release");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(40));
    group.bench_function("opendp_raw_sampling_100k", |b| {
        b.iter(|| {
            hexveil::privacy::mechanism::sample_raw(Mechanism::DiscreteGaussian, rig.scale, n)
                .unwrap()
        })
    });
    let mut next_bucket = 0i64;
    group.bench_function("release_bucket_100k_cells", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let bucket = Timestamp(T0 + next_bucket * HOUR_MS);
                next_bucket += 1;
                rt.block_on(seed(&rig, bucket));
                let started = Instant::now();
                assert!(rt.block_on(rig.insights.release(bucket)).unwrap());
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
    // One paired measurement for the ratio the README quotes.
    let bucket = Timestamp(T0 + (next_bucket + 1) * HOUR_MS);
    rt.block_on(seed(&rig, bucket));
    let t = Instant::now();
    hexveil::privacy::mechanism::sample_raw(Mechanism::DiscreteGaussian, rig.scale, n).unwrap();
    let raw = t.elapsed();
    let t = Instant::now();
    rt.block_on(rig.insights.release(bucket)).unwrap();
    let release = t.elapsed();
    println!(
        "release of {n} cells: {:.2} s; opendp raw sampling of {n} values: {:.2} s; ratio {:.2}",
        release.as_secs_f64(),
        raw.as_secs_f64(),
        release.as_secs_f64() / raw.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
