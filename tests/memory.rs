//! Resident memory per active device (issue 11, target 4): 1,000,000 consenting devices, each
//! contributing to the hourly and the daily foot-traffic release in a few buckets and cells,
//! built through the production types and the same calls a report makes (device table +
//! `Insights::contribute`), measured as the growth of the process's resident set
//! (`/proc/self/statm`). Memory, not time: the figure does not depend on the machine's load.
//! Its own test binary with a single test, so no other test's allocations move the figure.
//! It prints the figure and its split between the device table and the contribution bounds:
//! `cargo test --test memory -- --nocapture` (about 25 s in a debug build). Measured 139.0 B
//! (table 76.4, bounds 62.6) with the dense table and `privacy::held`; 558.6 B before.

use std::sync::Arc;

use hexveil::clock::{ManualClock, SharedClock, Timestamp};
use hexveil::config::Config;
use hexveil::devices::Devices;
use hexveil::model::{Purpose, Purposes};
use hexveil::privacy::Insights;
use hexveil::pseudonym::DeviceId;
use hexveil::settings::{LiveSettings, Settings};
use hexveil::store::Store;

/// 2026-01-05T10:00:00Z, on an hour boundary.
const T0: i64 = 1_767_607_200_000;
const HOUR_MS: i64 = 3_600_000;
const DEVICES: u32 = 1_000_000;
/// The target.
const MAX_BYTES_PER_DEVICE: f64 = 150.0;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Pseudonyms as the HMAC makes them: uniformly spread bytes (a fixed mixing of `n`).
fn device(n: u32) -> DeviceId {
    let mut x = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) ^ 0x5555;
    x ^= x >> 61;
    x = x.wrapping_mul(0xd6e8_feb8_6659_fd93_a5a5_5a5a_1234_5678);
    DeviceId(x.to_le_bytes())
}

#[tokio::test(flavor = "current_thread")]
async fn a_million_contributing_devices_fit_in_150_bytes_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let clock = ManualClock::new(Timestamp(T0));
    let shared: SharedClock = Arc::new(clock.clone());
    // Merchants in a few neighbouring cells: the devices contribute to their cells.
    let origin = h3o::LatLng::new(45.76, 4.84)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let cells: Vec<u64> = origin
        .grid_disk::<Vec<_>>(1)
        .into_iter()
        .map(u64::from)
        .collect();
    for (i, c) in cells.iter().enumerate() {
        hexveil::merchants::add(&store, &format!("m{i}"), vec![*c], 8, Timestamp(T0 - 1))
            .await
            .unwrap();
    }
    let settings = LiveSettings::new(Settings::new(Config::default()).unwrap());
    let insights = Insights::new(store.clone(), shared, settings.clone());
    insights.load().await.unwrap();
    let config = settings.current().config.clone();
    let devices = Devices::default();

    let before = resident_bytes();
    let foot = Purposes::from_iter([Purpose::FootTraffic]);
    let mut recorded = 0u64;
    // Three hours of one day, two cells an hour: the bound tracker holds six hourly pairs
    // and the daily bound up to `max_cells_per_day` cells per device.
    let now = Timestamp(T0 + 3 * HOUR_MS - 1);
    for n in 0..DEVICES {
        devices.set_purposes(device(n), foot, Timestamp(T0));
    }
    let table = resident_bytes();
    for n in 0..DEVICES {
        let id = device(n);
        let mut shard = devices.lock(&id);
        let state = shard.get_mut(&id).unwrap();
        for h in 0..3i64 {
            for k in 0..2usize {
                let cell = cells[(n as usize + h as usize * 2 + k) % cells.len()];
                let at = Timestamp(T0 + h * HOUR_MS + 60_000 * k as i64);
                state.set_last_activity(at);
                if insights
                    .contribute(state, id, cell, at, now, &config)
                    .is_some()
                {
                    recorded += 1;
                }
            }
        }
    }
    let after = resident_bytes();
    assert_eq!(devices.len(), DEVICES as usize);
    assert!(
        recorded >= 6 * u64::from(DEVICES),
        "every device contributed its pairs ({recorded} recorded)"
    );
    let per_device = (after.saturating_sub(before)) as f64 / f64::from(DEVICES);
    let per = |bytes: u64| bytes as f64 / f64::from(DEVICES);
    eprintln!(
        "resident bytes per contributing device: {per_device:.1} (device table {:.1}, \
         contribution bounds {:.1})",
        per(table.saturating_sub(before)),
        per(after.saturating_sub(table)),
    );
    assert!(
        per_device <= MAX_BYTES_PER_DEVICE,
        "{per_device:.1} resident bytes per contributing device (target {MAX_BYTES_PER_DEVICE})"
    );
    drop(devices);
    drop(insights);
}
