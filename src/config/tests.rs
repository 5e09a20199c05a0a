//! Config parsing and validation, table-driven through one `check` helper.

use super::*;

const EXAMPLE: &str = include_str!("../../hexveil.example.toml");

#[test]
fn example_file_parses_validates_and_equals_the_defaults() {
    let parsed = Config::from_toml(EXAMPLE).expect("example parses");
    parsed.validate().expect("example validates");
    assert_eq!(
        parsed,
        Config::default(),
        "the example documents the defaults"
    );
}

#[test]
fn empty_file_is_the_default_config() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c, Config::default());
    let consequences = c.validate().unwrap();
    assert_eq!(consequences.caps.max_notifications_per_device_per_day, 3);
    assert_eq!(consequences.caps.max_notifications_per_device_per_week, 10);
    assert!(consequences.privacy.epsilon_per_device_per_day <= 2.0);
}

/// Parses and validates `toml`; asserts the error names `key` (or succeeds for `""`).
fn check(toml: &str, key: &str) {
    let result = Config::from_toml(toml).and_then(|c| c.validate().map(|_| c));
    match (result, key) {
        (Ok(_), "") => {}
        (Ok(_), key) => panic!("{toml:?} was accepted, expected an error naming {key}"),
        (Err(e), "") => panic!("{toml:?} was refused: {e}"),
        (Err(e), key) => {
            assert_eq!(e.key(), key, "{toml:?}: {e}");
            assert!(e.to_string().contains(key), "message names the key: {e}");
        }
    }
}

#[test]
fn bad_values_and_unknown_keys_name_the_key() {
    for (toml, key) in [
        ("[caps]\nper_device_per_day = 2", ""),
        ("[caps]\nmin_dwell = \"5 minutes\"", "caps.min_dwell"),
        ("[caps]\nmin_dwell = 5", "caps.min_dwell"),
        ("[caps]\nquiet_hours = \"25:00-09:00\"", "caps.quiet_hours"),
        ("[caps]\nquiet_hours = \"\"", ""),
        (
            "[caps]\ndismissal_backoff = [\"3d\", \"1d\"]",
            "caps.dismissal_backoff",
        ),
        (
            "[caps]\nper_cell_per_minute = 0",
            "caps.per_cell_per_minute",
        ),
        ("[caps]\nper_device_per_dya = 3", "caps.per_device_per_dya"),
        ("[capz]\nmin_dwell = \"5m\"", "capz"),
        ("[caps]\nper_device_per_day = -1", "caps.per_device_per_day"),
        ("[location]\nmax_resolution = 16", "location.max_resolution"),
        (
            "[location]\nfiner_cells = \"round\"",
            "location.finer_cells",
        ),
        ("[server]\ngrpc_listen = \"nowhere\"", "server.grpc_listen"),
        ("[store]\nurl = \"mysql://x\"", "store.url"),
        ("[retention]\ndevice_days = 0", "retention.device_days"),
        (
            "[offers]\nmax_offers_per_reply = 0",
            "offers.max_offers_per_reply",
        ),
        ("[offers]\nmax_report_age = \"0s\"", "offers.max_report_age"),
        ("[exclusions]\ncells = [\"8828308281fffff\"]", ""),
        ("[exclusions]\ncells = [\"zz\"]", "exclusions.cells[0]"),
        ("[exclusions]\ncells = [12]", "exclusions.cells[0]"),
        (
            "[rate_limits]\ndevice_burst = 0",
            "rate_limits.device_burst",
        ),
        ("[insights]\nbucket = \"7m\"", "insights.bucket"),
        (
            "[server]\nmetrics_listen = \"127.0.0.1:8080\"",
            "server.metrics_listen",
        ),
        (
            "[server]\ngrpc_listen = \"127.0.0.1:7000\"\nmetrics_listen = \"127.0.0.1:7000\"",
            "server.metrics_listen",
        ),
        (
            "[server]\nhttp_listen = \"127.0.0.1:50051\"",
            "server.http_listen",
        ),
        (
            "[server]\nhttp_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"",
            "",
        ),
        ("[insights]\nresolution = 9", "insights.resolution"),
        ("[insights]\nscope = \"everyone\"", "insights.scope"),
        ("[privacy]\nmechanism = \"laplace\"", ""),
        ("[privacy]\nmechanism = \"uniform\"", "privacy.mechanism"),
        ("[privacy]\ndelta = 0.5", "privacy.delta"),
        ("[privacy]\nrho_per_bucket = -1.0", "privacy.rho_per_bucket"),
        (
            "[privacy]\nrho_per_bucket = 1.0",
            "privacy.max_epsilon_per_device_per_day",
        ),
        (
            "[privacy]\nmax_epsilon_per_device_per_day = 0.5",
            "privacy.max_epsilon_per_device_per_day",
        ),
        (
            "[privacy]\nmechanism = \"laplace\"\nepsilon_per_bucket = 1.0",
            "privacy.max_epsilon_per_device_per_day",
        ),
        ("[insights]\nbucket = \"15m\"", ""),
        ("[policy]\nversion = \"\"", "policy.version"),
        // Transport bounds: 0 would mean "unlimited" to hyper and tonic.
        (
            "[server]\nmax_concurrent_streams = 0",
            "server.max_concurrent_streams",
        ),
        ("[server]\nmax_connections = 0", "server.max_connections"),
        ("[server]\nmax_in_flight = 1000000", "server.max_in_flight"),
        ("[server]\nidle_timeout = \"0s\"", "server.idle_timeout"),
        (
            "[server]\nrequest_timeout = \"2d\"",
            "server.request_timeout",
        ),
        (
            "[server]\nmax_device_message_bytes = 0",
            "server.max_device_message_bytes",
        ),
        ("[server]\nidle_timeout = \"1s\"\nmax_in_flight = 1", ""),
        ("[server]\nmax_streams = 5", "server.max_streams"),
        // Query cells: at most 4 levels coarser than the released resolution.
        (
            "[insights]\nmin_query_resolution = 3",
            "insights.min_query_resolution",
        ),
        (
            "[insights]\nmin_query_resolution = 9",
            "insights.min_query_resolution",
        ),
        ("[insights]\nmin_query_resolution = 8", ""),
        // Coarser released counts need a coarser query minimum too; the error says which.
        (
            "[insights]\nresolution = 4",
            "insights.min_query_resolution",
        ),
        ("[insights]\nresolution = 4\nmin_query_resolution = 2", ""),
        // Noise budgets in ranges that compute in milliseconds.
        (
            "[privacy]\nrho_per_bucket = 1e-300",
            "privacy.rho_per_bucket",
        ),
        (
            "[privacy]\nrho_per_bucket = 5e-324",
            "privacy.rho_per_bucket",
        ),
        ("[privacy]\nrho_per_bucket = nan", "privacy.rho_per_bucket"),
        (
            "[privacy]\nmechanism = \"laplace\"\nepsilon_per_bucket = 1e-100",
            "privacy.epsilon_per_bucket",
        ),
        ("[privacy]\ndelta = 1e-300", "privacy.delta"),
        (
            "[privacy]\nmax_epsilon_per_device_per_day = inf",
            "privacy.max_epsilon_per_device_per_day",
        ),
        (
            "[privacy]\nmax_contributions_per_day = 4294967295",
            "privacy.max_contributions_per_day",
        ),
    ] {
        check(toml, key);
    }
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let file = "[caps]\nper_device_per_day = 2\n";
    let env = vec![
        (
            "HEXVEIL_CAPS__PER_DEVICE_PER_DAY".to_string(),
            "1".to_string(),
        ),
        (
            "HEXVEIL_CAPS__QUIET_HOURS".to_string(),
            "22:00-07:00".to_string(),
        ),
        (
            "HEXVEIL_DEVICE_KEY".to_string(),
            "not a config key".to_string(),
        ),
        ("PATH".to_string(), "/bin".to_string()),
    ];
    let c = Config::from_toml_with(file, env.clone(), &[]).unwrap();
    assert_eq!(c.caps.per_device_per_day, 1);
    assert_eq!(c.caps.quiet_hours.to_string(), "22:00-07:00");
    let flags = vec![(
        "caps.per_device_per_day".to_string(),
        toml::Value::Integer(3),
    )];
    let c = Config::from_toml_with(file, env, &flags).unwrap();
    assert_eq!(c.caps.per_device_per_day, 3);
}

#[test]
fn unknown_env_key_is_named() {
    let env = vec![("HEXVEIL_CAPS__NOPE".to_string(), "1".to_string())];
    let e = Config::from_toml_with("", env, &[]).unwrap_err();
    assert_eq!(e.key(), "caps.nope");
}

#[test]
fn toml_round_trips() {
    let c = Config::default();
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
}

#[test]
fn quiet_hours_wrap_midnight() {
    let q: QuietHours = "21:00-09:00".parse().unwrap();
    assert!(q.contains(21 * 60));
    assert!(q.contains(3 * 60));
    assert!(!q.contains(9 * 60));
    assert!(!q.contains(12 * 60));
    assert_eq!(q.minutes(), 12 * 60);
    let day: QuietHours = "12:00-13:30".parse().unwrap();
    assert!(day.contains(12 * 60 + 59) && !day.contains(13 * 60 + 30));
    assert_eq!(day.minutes(), 90);
}

#[test]
fn worst_case_caps_follow_interval_and_quiet_hours() {
    let mut c = Config::default();
    c.caps.per_device_per_day = 100;
    c.caps.per_device_per_week = 700;
    c.caps.min_interval = Dur::hours(2);
    c.caps.quiet_hours = QuietHours(None);
    let k = Consequences::of(&c).unwrap().caps;
    assert_eq!(k.max_notifications_per_device_per_day, 12);
    assert_eq!(k.max_notifications_per_device_per_week, 84);
    c.caps.quiet_hours = "21:00-09:00".parse().unwrap();
    // 12 h allowed, split around the quiet window: at most 6 + 1 events.
    assert_eq!(
        Consequences::of(&c)
            .unwrap()
            .caps
            .max_notifications_per_device_per_day,
        7
    );
}

#[test]
fn every_config_at_the_edges_of_its_ranges_computes_in_milliseconds() {
    // The slowest corners of the accepted ranges: the largest noise scales (smallest budgets,
    // most cells per bucket), the smallest delta, the most releases per day. A value that once
    // hung start-up (rho = 1e-300) must be refused as quickly as these are accepted.
    let mut slowest = std::time::Duration::ZERO;
    for mechanism in ["gaussian", "laplace"] {
        for budget in ["1e-6", "1e-4", "0.01", "100.0", "1e-300", "5e-324"] {
            for cells in [1, 100] {
                for bucket in ["1m", "1d"] {
                    let toml = format!(
                        "[insights]\nbucket = \"{bucket}\"\n[privacy]\nmechanism = \"{mechanism}\"\n\
                         rho_per_bucket = {budget}\nepsilon_per_bucket = {budget}\n\
                         max_cells_per_bucket = {cells}\nmax_contributions_per_day = 100000\n\
                         delta = 1e-12\nmax_epsilon_per_device_per_day = 100.0\n"
                    );
                    let started = std::time::Instant::now();
                    let _ = Config::from_toml(&toml).and_then(|c| c.validate());
                    slowest = slowest.max(started.elapsed());
                }
            }
        }
    }
    // Debug build on a loaded CI machine; the slowest corner takes about a millisecond.
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "{slowest:?}"
    );
}
