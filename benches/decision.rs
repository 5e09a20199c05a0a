//! Benchmarks the in-process decision path — `Presence::decide` (device lookup, GCRA, consent,
//! dwell, offer-index lookup, every cap) — and the offer-index lookup alone, over 1M consenting
//! devices and 100k offers spread over Berlin-sized H3 res-8 cells; also measures heap bytes
//! per device with a counting global allocator. Run:
//! `cargo bench --bench decision` (quicker: `cargo bench --bench decision -- --warm-up-time 1
//! --measurement-time 3`). Under `cargo test --benches` it runs once at a small scale.
//!
//! What is measured (all printed, summary on the last line):
//! - RAM: live heap bytes before/after inserting the devices (`Devices::set_purposes`, both
//!   purposes), then after 10% of them reported once through `decide` and got an offer (the
//!   cost of a notification log and of the foot-traffic contributions held per device).
//! - `index/visit`: `OfferIndex::visit` as a decision runs it (rings nearest first, stopping at
//!   the first offer) for cells drawn from the city area.
//! - `decide/full_chain`: caps loosened so that nearly every report passes every rule and gets
//!   an offer (quiet hours off, `min_dwell` 1 min, `min_interval` 1 min, day/week caps at
//!   their maxima; per-merchant weekly cap, fatigue, per-offer and per-cell caps at defaults;
//!   rate limits at their maxima). The worst case per decision.
//! - `decide/default_caps`: the default day/week/interval caps, over the 100k devices that got
//!   an offer minutes (of simulated time) ago, so nearly every report stops at `MIN_INTERVAL`
//!   after the index lookup (the common production path: most reports get no offer).
//!
//! The reason mix of each decide benchmark is printed from 100k decisions run just before it.
//! Each decision advances the manual clock by 1 ms; devices report in turn from a fixed home
//! cell, with `observed_at = now - 2 min` (so `min_dwell` is met on the first report).
//! The engine is wired as in `server::App::open`: the 5k merchants are registered in a real
//! SQLite store so that foot-traffic contributions are counted (`Insights`), and the
//! Prometheus recorder the server uses is installed, so metric updates are included.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use h3o::{CellIndex, LatLng, Resolution};
use hexveil::clock::{Clock, ManualClock, Timestamp};
use hexveil::config::{Config, Dur, QuietHours};
use hexveil::devices::{DeviceState, Devices};
use hexveil::model::{Merchant, Offer, OpeningHours, Purpose, Purposes};
use hexveil::offers::OfferIndex;
use hexveil::presence::{Commit, Decision, Presence, PresenceError, Report};
use hexveil::privacy::Insights;
use hexveil::pseudonym::DeviceId;
use hexveil::settings::{LiveSettings, Settings};
use hexveil::store::{Store, WriteOp};

// ---------------------------------------------------------------------------------------------
// Counting allocator: live heap bytes and number of allocations.

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn allocs() -> usize {
    ALLOCS.load(Ordering::Relaxed)
}

/// Resident set size in bytes (Linux), for a sanity check of the heap count.
fn rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------------------------------------
// Deterministic workload.

/// Monday 2025-03-03 12:00 UTC (13:00 local at UTC+1, inside the offers' opening hours).
const T0: Timestamp = Timestamp(1_741_003_200_000);
const UTC_OFFSET: i32 = 60;
/// Berlin's bounding box, about 35 km × 42 km (≈ 2400 res-8 cells).
const LAT: (f64, f64) = (52.36, 52.68);
const LNG: (f64, f64) = (13.10, 13.72);
/// Report cells are drawn from this many random points of the box.
const REPORT_CELLS: usize = 1 << 16;
const OFFERS_PER_MERCHANT: u64 = 20;
/// Simulated time between two decisions.
const TICK: Duration = Duration::from_millis(1);

struct Scale {
    devices: u64,
    offers: u64,
    sample: u64,
}

/// splitmix64: spreads a counter over 64 bits.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniformly spread pseudonym, like the HMAC output the service derives from a token.
fn device_id(i: u64) -> DeviceId {
    let a = mix(i);
    let b = mix(a ^ 0x5BD1_E995);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_le_bytes());
    id[8..].copy_from_slice(&b.to_le_bytes());
    DeviceId(id)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A res-8 cell at a pseudo-random point of the box.
fn cell_at(seed: u64) -> CellIndex {
    let lat = LAT.0 + unit(mix(seed)) * (LAT.1 - LAT.0);
    let lng = LNG.0 + unit(mix(seed ^ 0xA5A5_A5A5)) * (LNG.1 - LNG.0);
    LatLng::new(lat, lng)
        .expect("the box holds valid coordinates")
        .to_cell(Resolution::Eight)
}

fn home_cell(cells: &[CellIndex], device: u64) -> CellIndex {
    cells[(mix(device ^ 0xC311_C311) as usize) % cells.len()]
}

/// `n` merchants, each at 1-3 cells of the box, registered a day before `T0`.
fn merchants(n: u64) -> Vec<Merchant> {
    (0..n)
        .map(|m| Merchant {
            merchant_id: uuid::Uuid::from_u64_pair(2, m),
            name: format!("Merchant {m}"),
            key_hash: [mix(m).to_le_bytes(), mix(!m).to_le_bytes(), [0; 8], [0; 8]]
                .concat()
                .try_into()
                .expect("32 bytes"),
            cells: (0..1 + mix(m ^ 0x10C) % 3)
                .map(|l| u64::from(cell_at(1_000_000_000 + m * 4 + l)))
                .collect(),
            created_at: T0.minus(Duration::from_secs(86_400)),
            revoked_at: None,
        })
        .collect()
}

/// `offers` offers, 20 per merchant at the merchant's cells; half always open, half open
/// 08:00-22:00 every day; radius 1-3 rings; valid for a year.
fn populate_offers(index: &OfferIndex, merchants: &[Merchant], offers: u64) {
    let hours: Vec<OpeningHours> = (1..=7)
        .map(|weekday| OpeningHours {
            weekday,
            open: 8 * 60,
            close: 22 * 60,
        })
        .collect();
    for (m, merchant) in (0u64..).zip(merchants) {
        for j in 0..OFFERS_PER_MERCHANT {
            let k = m * OFFERS_PER_MERCHANT + j;
            if k >= offers {
                return;
            }
            index.upsert(Offer {
                offer_id: uuid::Uuid::from_u64_pair(1, k),
                merchant_id: merchant.merchant_id,
                title: format!("Offer {k}: 10% off today"),
                body: "Show this notification at the counter. One per customer.".into(),
                cell: merchant.cells[j as usize % merchant.cells.len()],
                radius_k: 1 + (mix(k ^ 0x4AD) % 3) as u32,
                valid_from: T0.minus(Duration::from_secs(86_400)),
                valid_until: T0.plus(Duration::from_secs(365 * 86_400)),
                max_notifications_per_day: 1_000_000,
                opening_hours: if k.is_multiple_of(2) {
                    Vec::new()
                } else {
                    hours.clone()
                },
                updated_at: Timestamp(T0.millis() - k as i64),
            });
        }
    }
}

/// Defaults with quiet hours off, a short dwell and rate limits that never bite; `loose`
/// also lifts the interval and day/week caps so that almost every report gets an offer.
fn config(loose: bool) -> Config {
    let mut config = Config::default();
    config.caps.quiet_hours = QuietHours(None);
    config.caps.min_dwell = Dur::mins(1);
    config.rate_limits.device_reports_per_hour = 3_600_000;
    config.rate_limits.device_burst = 10_000;
    if loose {
        config.caps.min_interval = Dur::mins(1);
        config.caps.per_device_per_day = 100;
        config.caps.per_device_per_week = 700;
    }
    config
}

fn settings(loose: bool) -> Settings {
    Settings::new(config(loose)).expect("bench config validates")
}

/// The engine and a cursor over the devices, which report in turn.
struct Workload {
    presence: Presence,
    clock: ManualClock,
    cells: Vec<CellIndex>,
    /// Devices `0..turns` report in turn, starting at `next`.
    turns: u64,
    next: u64,
}

impl Workload {
    fn report(&self, device: u64) -> Report {
        let now = self.clock.now();
        Report {
            device: device_id(device),
            cell: home_cell(&self.cells, device),
            observed_at: now.minus(Duration::from_secs(120)),
            utc_offset_minutes: UTC_OFFSET,
        }
    }

    /// One decision for `device`, one tick later.
    fn decide_for(&self, device: u64) -> Result<(Decision, Commit), PresenceError> {
        self.clock.advance(TICK);
        self.presence.decide(self.report(device))
    }

    /// One decision for the next device in turn.
    fn decide_next(&mut self) -> Result<(Decision, Commit), PresenceError> {
        let device = self.next;
        self.next = (device + 1) % self.turns;
        self.decide_for(device)
    }

    /// Runs `n` decisions and prints the outcomes by reason and the allocations per decision.
    fn print_mix(&mut self, label: &str, n: u64) {
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        let allocs_before = allocs();
        let started = Instant::now();
        for _ in 0..n {
            let outcome = match self.decide_next() {
                Ok((d, _)) => d.reason.map_or("OFFER_SENT", |r| r.as_str()),
                Err(PresenceError::RateLimited { .. }) => "RATE_LIMITED",
                Err(_) => "ERROR",
            };
            *by_reason.entry(outcome).or_default() += 1;
        }
        let elapsed = started.elapsed();
        let allocs_per = (allocs() - allocs_before) as f64 / n as f64;
        let mix: Vec<String> = by_reason
            .iter()
            .rev()
            .map(|(r, c)| format!("{r} {:.1}%", *c as f64 * 100.0 / n as f64))
            .collect();
        println!(
            "{label}: mix over {n} decisions: {}; {allocs_per:.1} allocations/decision; \
             {:.0} ns/decision (plain loop)",
            mix.join(", "),
            elapsed.as_nanos() as f64 / n as f64
        );
    }
}

/// Criterion's typical estimate (slope, else mean) in ns for `id`, if this run produced it.
fn criterion_estimate(id: &str, since: SystemTime) -> Option<f64> {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("criterion"))
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion"));
    let file = dir.join(id).join("new/estimates.json");
    if std::fs::metadata(&file).ok()?.modified().ok()? < since {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).ok()?).ok()?;
    let typical = if json["slope"].is_null() {
        &json["mean"]
    } else {
        &json["slope"]
    };
    typical["point_estimate"].as_f64()
}

fn fmt_num(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.0}"))
}

/// Growth of the live heap from `from` to `to`, per `n`.
fn per(from: usize, to: usize, n: u64) -> f64 {
    (to as f64 - from as f64) / n as f64
}

fn main() {
    let started = SystemTime::now();
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let full = has("--bench") && !has("--test") && !has("--list");
    let scale = if full {
        Scale {
            devices: 1_000_000,
            offers: 100_000,
            sample: 100_000,
        }
    } else {
        Scale {
            devices: 10_000,
            offers: 1_000,
            sample: 1_000,
        }
    };
    let mut criterion = Criterion::default().configure_from_args();
    let _ = hexveil::telemetry::prometheus();

    // The engine, wired as `server::App::open` does (the store is never touched by `decide`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/b.db", dir.path().display());
    let store = runtime.block_on(Store::open(&url)).expect("store opens");
    let clock = ManualClock::new(T0);
    let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let live = LiveSettings::new(settings(true));
    let devices = Arc::new(Devices::default());
    let index = Arc::new(OfferIndex::default());
    // Merchants are registered in the store: foot traffic counts reports in their areas.
    let merchants = merchants(scale.offers.div_ceil(OFFERS_PER_MERCHANT));
    let insights = Insights::new(store.clone(), shared_clock.clone(), live.clone());
    runtime.block_on(async {
        let writes = merchants
            .iter()
            .map(|m| store.write(WriteOp::PutMerchant(m.clone())));
        for written in futures_util::future::join_all(writes).await {
            written.expect("merchant stored");
        }
        insights.load().await.expect("insights load");
    });
    let presence = Presence::new(
        devices.clone(),
        index.clone(),
        store,
        shared_clock,
        live.clone(),
        insights,
    );
    let cells: Vec<CellIndex> = (0..REPORT_CELLS as u64).map(cell_at).collect();

    let before_offers = live_bytes();
    populate_offers(&index, &merchants, scale.offers);
    let offer_bytes = per(before_offers, live_bytes(), scale.offers);
    let max_k = live.current().config.offers.max_radius_k;
    let candidates: usize = cells
        .iter()
        .take(10_000)
        .map(|c| {
            let mut n = 0;
            index.visit(*c, max_k, T0, UTC_OFFSET, &[], |_, _| {
                n += 1;
                std::ops::ControlFlow::Continue(())
            });
            n
        })
        .sum();
    let mean_candidates = candidates as f64 / cells.len().min(10_000) as f64;
    let area = cells.iter().collect::<HashSet<_>>().len();
    println!(
        "offers: {} indexed over ~{} res-8 cells, {offer_bytes:.0} heap bytes/offer; \
         {mean_candidates:.0} candidates per lookup on average (max_radius_k {max_k})",
        index.len(),
        area
    );

    // RAM per device.
    let both: Purposes = [Purpose::NearbyOffers, Purpose::FootTraffic]
        .into_iter()
        .collect();
    let (heap0, rss0) = (live_bytes(), rss_bytes());
    for i in 0..scale.devices {
        devices.set_purposes(device_id(i), both, T0);
    }
    let (heap1, rss1) = (live_bytes(), rss_bytes());
    assert_eq!(devices.len() as u64, scale.devices);
    let shard0 = {
        let shard = devices.lock(&DeviceId([0; 16]));
        (shard.len(), shard.capacity())
    };
    let per_device = per(heap0, heap1, scale.devices);
    let rss_per_device = rss0.zip(rss1).map(|(a, b)| per(a, b, scale.devices));
    println!(
        "devices: {} consenting; {per_device:.1} heap bytes/device (RSS {} bytes/device); \
         entry {} bytes (+ 5 in the index), shard 0 holds {} in room for {}",
        scale.devices,
        fmt_num(rss_per_device),
        std::mem::size_of::<(DeviceId, DeviceState)>(),
        shard0.0,
        shard0.1,
    );

    let mut work = Workload {
        presence,
        clock,
        cells,
        turns: scale.devices,
        next: 0,
    };
    let mut notified = 0u64;
    for i in (0..scale.devices).step_by(10) {
        if let Ok((d, _)) = work.decide_for(i) {
            notified += u64::from(!d.offers.is_empty());
        }
    }
    let heap2 = live_bytes();
    let per_device_logs = per(heap0, heap2, scale.devices);
    let per_notified = per(heap1, heap2, notified.max(1));
    println!(
        "devices: {notified} of them notified once: {per_device_logs:.1} heap bytes/device \
         overall, +{per_notified:.0} bytes per notified device (log, foot-traffic \
         contributions, offer send times, per-cell counters)"
    );

    // Benchmarks.
    let mut group = criterion.benchmark_group("index");
    group.bench_function("visit", |b| {
        let mut k = 0;
        let now = work.clock.now();
        b.iter(|| {
            k = (k + 1) % work.cells.len();
            let mut first = None;
            index.visit(work.cells[k], max_k, now, UTC_OFFSET, &[], |e, d| {
                first = Some((e.offer.offer_id, d));
                std::ops::ControlFlow::Break(())
            });
            first
        });
    });
    group.finish();

    work.print_mix("decide/full_chain", scale.sample);
    let mut group = criterion.benchmark_group("decide");
    group.bench_function("full_chain", |b| b.iter(|| work.decide_next()));
    // Devices 0..sample all got an offer in the sample above, minutes of simulated time ago.
    live.replace(settings(false));
    (work.next, work.turns) = (0, scale.sample);
    work.print_mix("decide/default_caps", scale.sample);
    group.bench_function("default_caps", |b| b.iter(|| work.decide_next()));
    group.finish();
    criterion.final_summary();

    let heap3 = live_bytes();
    println!(
        "after the benchmarks ({} simulated minutes): {:.1} heap bytes/device",
        (work.clock.now().millis() - T0.millis()) / 60_000,
        per(heap0, heap3, scale.devices)
    );
    println!(
        "decision: {} ns/decision full chain, {} ns/decision default caps; index lookup: {} ns; \
         RAM: {per_device:.0} bytes/device ({per_device_logs:.0} with a notification log and contributions on 10%)",
        fmt_num(criterion_estimate("decide/full_chain", started)),
        fmt_num(criterion_estimate("decide/default_caps", started)),
        fmt_num(criterion_estimate("index/visit", started)),
    );
    drop(work);
    drop(runtime);
}
