//! `hexveil simulate` against the pipeline it claims to run: its figures equal what the same
//! traffic does when driven report by report, caps hold in the rows it wrote, `--compare`
//! moves the figures the right way, its privacy figures are `config check`'s and its measured
//! error matches σ, its HTML page renders in headless Chromium, and bad input is named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use hexveil::clock::{ManualClock, Timestamp};
use hexveil::reload::ConfigSource;
use hexveil::server::App;
use hexveil::settings::Settings;
use hexveil::simulate::{self, City, SimReport, Simulation, Traffic};
use statrs::distribution::{ChiSquared, Univariate};

const SMALL: usize = 120;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example() -> Settings {
    ConfigSource {
        path: Some(root().join("hexveil.example.toml")),
        flags: Vec::new(),
    }
    .load()
    .expect("the example config is valid")
}

fn sim(settings: Settings, devices: usize, seed: u64) -> Simulation {
    Simulation {
        settings,
        label: "hexveil.example.toml".into(),
        city: City::demo(),
        city_label: "demo".into(),
        devices,
        days: 1,
        seed,
    }
}

fn hexveil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hexveil"))
        .args(args)
        .output()
        .expect("run hexveil")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "hexveil failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// Drives the same traffic report by report through `Presence::report` and feedback, the
/// way the gRPC handlers do, and returns the notifications and the count of each outcome.
async fn drive_directly(
    settings: &Settings,
    dir: &Path,
    devices: usize,
    seed: u64,
) -> (u64, HashMap<&'static str, u64>) {
    let mut settings = settings.clone();
    settings.config.store.url = format!("sqlite://{}/direct.db", dir.display());
    settings.config.store.data_dir = dir.to_path_buf();
    let clock = ManualClock::new(simulate::START.minus(Duration::from_secs(600)));
    let app = App::open(settings.clone(), Arc::new(clock.clone()))
        .await
        .unwrap();
    let city = City::demo();
    let setup = simulate::setup(&app, &clock, &city, "demo").await.unwrap();
    let mut traffic = Traffic::new(&app, &city, &setup, devices, seed);
    clock.set(simulate::START.minus(Duration::from_secs(60)));
    for (id, purposes) in traffic.devices().collect::<Vec<_>>() {
        if !purposes.is_empty() {
            app.consents.set(id, purposes, "1".into()).await.unwrap();
        }
    }
    let mut notifications = 0;
    let mut outcomes: HashMap<&'static str, u64> = HashMap::new();
    for hour in 0..24 {
        let start = simulate::START.plus(Duration::from_secs(hour * 3600));
        for (minute, events) in traffic.hour(start) {
            clock.set(Timestamp(minute));
            for e in events {
                let d = app.presence.report(e.report).await.unwrap();
                notifications += d.offers.len() as u64;
                *outcomes
                    .entry(d.reason.map_or("NONE", |r| r.as_str()))
                    .or_default() += 1;
                for (offer, _) in &d.offers {
                    if let Some(f) = traffic.reaction(e.device, e.report.observed_at) {
                        app.presence
                            .feedback(e.report.device, offer.offer_id, f)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
    (notifications, outcomes)
}

#[tokio::test(flavor = "multi_thread")]
async fn figures_equal_the_pipeline_driven_directly_and_caps_hold() {
    let settings = example();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let report = sim(settings.clone(), SMALL, 7)
        .run_in(dirs.0.path())
        .await
        .unwrap();
    assert!(report.reports > 1000, "enough traffic: {}", report.reports);
    assert!(report.notifications.total > 20, "some offers were sent");

    // The report's total is the number of notification rows (Notify writes) the run left.
    let store = hexveil::store::Store::open(&format!(
        "sqlite://{}",
        simulate::store_path(dirs.0.path()).display()
    ))
    .await
    .unwrap();
    let rows = store.load_notifications(Timestamp(0)).await.unwrap();
    assert_eq!(rows.len() as u64, report.notifications.total);
    let hist = &report.notifications.per_device_per_day.histogram;
    assert_eq!(
        hist.iter().sum::<u64>(),
        SMALL as u64,
        "one entry per device-day"
    );
    let weighted: u64 = hist.iter().enumerate().map(|(n, c)| n as u64 * c).sum();
    assert_eq!(weighted, report.notifications.total);
    let outcome_sum: u64 = report.outcomes.iter().map(|o| o.reports).sum();
    assert_eq!(outcome_sum, report.reports);

    // No device exceeds a cap in what was written.
    let caps = &settings.config.caps;
    let mut per_device: HashMap<_, Vec<i64>> = HashMap::new();
    for n in &rows {
        per_device
            .entry(n.device)
            .or_default()
            .push(n.sent_at.millis());
        let minute = n.sent_at.millis().div_euclid(60_000).rem_euclid(1440) as u16;
        assert!(
            !caps.quiet_hours.contains(minute),
            "no offer in quiet hours"
        );
    }
    let interval = caps.min_interval.get().as_millis() as i64;
    for times in per_device.values_mut() {
        times.sort_unstable();
        for (i, t) in times.iter().enumerate() {
            let day = times[i..]
                .iter()
                .take_while(|u| **u < t + 86_400_000)
                .count();
            assert!(day as u32 <= caps.per_device_per_day, "daily cap");
            assert!(times.len() as u32 <= caps.per_device_per_week, "weekly cap");
            if i > 0 {
                assert!(t - times[i - 1] >= interval, "min interval");
            }
        }
    }
    assert!(report.notifications.max_in_any_24h <= report.notifications.cap_per_day);

    // The same traffic, driven report by report, makes the same decisions.
    let (direct, outcomes) = drive_directly(&settings, dirs.1.path(), SMALL, 7).await;
    assert_eq!(direct, report.notifications.total);
    for o in &report.outcomes {
        assert_eq!(
            outcomes.get(o.reason).copied().unwrap_or(0),
            o.reports,
            "{} reports",
            o.reason
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_fixes_the_traffic_and_the_decisions() {
    let a = sim(example(), 60, 3).run().await.unwrap();
    let b = sim(example(), 60, 3).run().await.unwrap();
    let c = sim(example(), 60, 4).run().await.unwrap();
    let key = |r: &SimReport| (r.reports, r.notifications.clone(), r.outcomes.clone());
    assert_eq!(key(&a), key(&b));
    assert_ne!(key(&a), key(&c));
    assert!(a.reproducibility.contains("noise is not"));
}

fn config_with_daily_cap(dir: &Path, cap: u32) -> PathBuf {
    let text = std::fs::read_to_string(root().join("hexveil.example.toml")).unwrap();
    let text = text.replace(
        "per_device_per_day = 3 ",
        &format!("per_device_per_day = {cap} "),
    );
    assert!(text.contains(&format!("per_device_per_day = {cap} ")));
    let path = dir.join(format!("cap{cap}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn compare_halving_the_daily_cap_sends_fewer_and_withholds_more() {
    let dir = tempfile::tempdir().unwrap();
    let (four, two) = (
        config_with_daily_cap(dir.path(), 4),
        config_with_daily_cap(dir.path(), 2),
    );
    let base = ["simulate", "--devices", "200", "--seed", "5", "--config"];
    let mut args: Vec<&str> = base.to_vec();
    args.extend([four.to_str().unwrap(), "--compare", two.to_str().unwrap()]);

    let j = json(&hexveil(&[&args[..], &["--json"]].concat()));
    let (a, b) = (&j["base"], &j["compare"]);
    let mean = |r: &serde_json::Value| r["notifications"]["per_device_per_day"]["mean"].as_f64();
    assert!(
        mean(b) < mean(a),
        "fewer per device: {:?} vs {:?}",
        mean(a),
        mean(b)
    );
    let daily = |r: &serde_json::Value| {
        r["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["reason"] == "DAILY_CAP")
            .unwrap()["share"]
            .as_f64()
            .unwrap()
    };
    assert!(
        daily(b) > daily(a),
        "more DAILY_CAP: {} vs {}",
        daily(a),
        daily(b)
    );
    assert_eq!(b["notifications"]["cap_per_day"], 2);
    assert!(j["difference"]["notifications.total"].as_f64().unwrap() < 0.0);
    assert!(j["difference"]["outcome.DAILY_CAP"].as_f64().unwrap() > 0.0);

    let out = hexveil(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let change = |label: &str| {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in\n{text}"));
        line.split_whitespace().last().unwrap().to_string()
    };
    assert!(change("notifications delivered").starts_with('-'), "{text}");
    assert!(change("mean").starts_with('-'), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("DAILY_CAP") && l.contains(" +")),
        "{text}"
    );
    // Aligned: every value row of a section ends at the same column.
    let widths: Vec<usize> = text
        .lines()
        .skip_while(|l| !l.starts_with("Notifications"))
        .take_while(|l| !l.is_empty())
        .map(|l| l.chars().count())
        .collect();
    assert!(
        widths.windows(2).all(|w| w[0] == w[1]),
        "aligned columns:\n{text}"
    );
}

#[test]
fn privacy_figures_are_config_checks_and_the_error_matches_sigma() {
    let example = root().join("hexveil.example.toml");
    let example = example.to_str().unwrap();
    let check = json(&hexveil(&["config", "check", "--json", example]));
    let dp = &check["consequences"]["privacy"];
    let report = json(&hexveil(&[
        "simulate",
        "--json",
        "--devices",
        "300",
        "--config",
        example,
    ]));
    let p = &report["privacy"];
    for (ours, theirs) in [
        ("epsilon_per_device_per_day", "epsilon_per_device_per_day"),
        ("noise_std_dev", "noise_std_dev"),
        ("noise_scale", "noise_scale"),
        ("hour_ci95_half_width", "ci95_half_width"),
        ("day_ci95_half_width", "day_total_ci95_half_width"),
        ("delta", "delta"),
    ] {
        assert_eq!(p[ours], dp[theirs], "{ours} equals config check's {theirs}");
    }
    assert_eq!(
        p["epsilon_promised"],
        check["config"]["privacy"]["max_epsilon_per_device_per_day"]
    );

    // The measured error is the noise alone: n · rms² / σ² is chi-square with n degrees of
    // freedom (the exact σ of the discrete noise). Each bound fails a correct build with
    // probability 1e-6 / 2; a wrong truth (read after release, or unbounded) is far outside.
    for g in ["hourly", "daily"] {
        let e = &p[g];
        let n = e["values"].as_f64().unwrap();
        assert!(n >= 30.0, "{g}: enough released values ({n})");
        let sigma = e["expected_std_dev"].as_f64().unwrap();
        let stat = n * e["rms_error"].as_f64().unwrap().powi(2) / (sigma * sigma);
        let chi = ChiSquared::new(n).unwrap();
        let (lo, hi) = (quantile(&chi, n, 0.5e-6), quantile(&chi, n, 1.0 - 0.5e-6));
        assert!(
            (lo..=hi).contains(&stat),
            "{g}: n·rms²/σ² = {stat:.1} outside [{lo:.1}, {hi:.1}] (n = {n})"
        );
        // At least 95% of values within the stated interval, less 5 binomial std-devs
        // (false-failure rate below 1e-6).
        let within = e["share_within_ci95"].as_f64().unwrap();
        let floor = 0.95 - 5.0 * (0.05 * 0.95 / n).sqrt();
        assert!(
            within >= floor,
            "{g}: {within} within the 95% interval (floor {floor:.3})"
        );
    }
    assert!(
        report["reproducibility"]
            .as_str()
            .unwrap()
            .contains("noise is not")
    );
}

/// The `p` quantile of a chi-square with `df` degrees of freedom, by bisection on its CDF.
fn quantile(chi: &ChiSquared, df: f64, p: f64) -> f64 {
    let (mut a, mut b) = (0.0, df + 200.0 * df.sqrt() + 200.0);
    for _ in 0..200 {
        let m = (a + b) / 2.0;
        if chi.cdf(m) < p {
            a = m;
        } else {
            b = m;
        }
    }
    b
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let refused = |args: &[&str], needle: &str| {
        let o = hexveil(args);
        assert!(!o.status.success(), "{args:?} must fail");
        let e = stderr(&o);
        assert!(e.contains(needle), "{args:?}: {needle:?} not in: {e}");
        e
    };
    refused(&["simulate", "--devices", "0"], "--devices");
    refused(&["simulate", "--days", "many"], "--days");
    refused(&["simulate", "--colour", "red"], "--colour");
    refused(
        &["simulate", "--city", "/no/such/city.json"],
        "/no/such/city.json",
    );
    let missing = d.join("missing.toml");
    refused(
        &["simulate", "--config", missing.to_str().unwrap()],
        "missing.toml",
    );
    refused(
        &["simulate", "--compare", missing.to_str().unwrap()],
        "--compare",
    );
    let html = d.join("no-such-dir/page.html");
    refused(&["simulate", "--html", html.to_str().unwrap()], "--html");

    let city = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let shop = r#""name": "A", "lat": 38.71, "lng": -9.14"#;
    let bad_type = city(
        "type.json",
        &format!(
            r#"{{"merchants": [{{{shop}, "offers": [{{"title": "t", "radius_k": "far"}}]}}]}}"#
        ),
    );
    refused(
        &["simulate", "--city", &bad_type],
        "merchants[0].offers[0].radius_k",
    );
    let truncated = city("cut.json", r#"{"merchants": [{"name": "A", "#);
    refused(&["simulate", "--city", &truncated], "cut.json");
    let share = city(
        "share.json",
        &format!(r#"{{"merchants": [{{{shop}}}], "population": {{"activity": [0.1, 2]}}}}"#),
    );
    refused(&["simulate", "--city", &share], "population.activity");
    // The real registration path refuses an offer wider than offers.max_radius_k.
    let wide = city(
        "wide.json",
        &format!(r#"{{"merchants": [{{{shop}, "offers": [{{"title": "t", "radius_k": 9}}]}}]}}"#),
    );
    refused(
        &["simulate", "--devices", "5", "--city", &wide],
        "merchants[0].offers[0]: radius_k",
    );

    // An invalid config is refused exactly as `config check` refuses it.
    for (name, text) in [
        ("type.toml", "[caps]\nper_device_per_day = \"three\"\n"),
        ("promise.toml", "[privacy]\nrho_per_bucket = 5.0\n"),
        ("unknown.toml", "[caps]\nper_device_per_dya = 3\n"),
    ] {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let p = p.to_str().unwrap();
        let check = hexveil(&["config", "check", p]);
        assert_eq!(check.status.code(), Some(2));
        let reason = stderr(&check);
        let reason = reason.trim();
        let e = refused(&["simulate", "--config", p], reason);
        assert!(e.contains("config check"), "{e}");
        let sim = hexveil(&["simulate", "--config", p]);
        assert_eq!(
            sim.status.code(),
            check.status.code(),
            "{name}: same exit code"
        );
    }
}

#[test]
fn html_page_renders_in_headless_chromium() {
    let browser_dir = root().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && browser_dir.join("node_modules/playwright-core").exists(),
        "the HTML test needs Chromium at {chromium} and playwright-core: run `bash .ci/deps`"
    );
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("simulate.html");
    let two = config_with_daily_cap(dir.path(), 2);
    let example = root().join("hexveil.example.toml");
    let o = hexveil(&[
        "simulate",
        "--devices",
        "400",
        "--config",
        example.to_str().unwrap(),
        "--compare",
        two.to_str().unwrap(),
        "--html",
        page.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    for outside in ["http://", "https://", "<script", "src="] {
        assert!(!html.contains(outside), "the page holds no {outside}");
    }
    let out = Command::new("node")
        .arg("simulate.test.mjs")
        .current_dir(&browser_dir)
        .env("PAGE", &page)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bucket_is_released_whatever_its_length_and_grace() {
    let mut settings = example();
    settings.config.insights.bucket = "30m".parse().unwrap();
    settings.config.insights.grace = "90s".parse().unwrap();
    let settings = Settings::new(settings.config).unwrap();
    let report = sim(settings, 150, 2).run().await.unwrap();
    let series = &report.privacy.series;
    let last = series.last().expect("released points").bucket_start_ms;
    assert_eq!(
        last,
        simulate::START.millis() + 47 * 1_800_000,
        "the day's last half-hour is released"
    );
    assert!(
        series
            .windows(2)
            .all(|w| w[1].bucket_start_ms - w[0].bucket_start_ms == 1_800_000)
    );
}
