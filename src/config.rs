//! Operator configuration: the TOML keys of SPEC §9, their defaults, env and flag overrides,
//! and validation that names the offending key.
//!
//! Precedence, lowest first: built-in defaults, the config file, `HEXVEIL_<SECTION>__<KEY>`
//! environment variables, command-line flags. Every struct denies unknown fields, so a typo in
//! a key is an error rather than a silently ignored setting.

mod consequences;
mod duration;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use consequences::{
    BudgetPart, CapConsequences, Consequences, OfferStatsConsequences, PrivacyConsequences,
};
pub use duration::Dur;

/// Environment variable prefix for config overrides (`HEXVEIL_CAPS__MIN_DWELL=10m`).
pub const ENV_PREFIX: &str = "HEXVEIL_";

/// A configuration that could not be loaded, naming the key at fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or a key has the wrong type or is unknown.
    #[error("{key}: {message}")]
    Parse { key: String, message: String },
    /// A key parsed but its value is not allowed.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// The dotted key this error is about (`""` for I/O errors and whole-file syntax errors).
    pub fn key(&self) -> &str {
        match self {
            ConfigError::Io { .. } => "",
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => key,
        }
    }

    /// A short label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            ConfigError::Io { .. } => "io",
            ConfigError::Parse { .. } => "parse",
            ConfigError::Invalid { .. } => "invalid",
        }
    }

    fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// The whole configuration. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub policy: PolicyConfig,
    pub location: LocationConfig,
    pub retention: RetentionConfig,
    pub offers: OffersConfig,
    pub caps: CapsConfig,
    pub exclusions: ExclusionsConfig,
    pub rate_limits: RateLimitsConfig,
    pub insights: InsightsConfig,
    pub privacy: PrivacyConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// HTTP listen address (dashboard, its JSON API, `/healthz`): merchant-facing.
    pub http_listen: SocketAddr,
    /// Operator-only listener for Prometheus `/metrics` (and `/healthz`); never served on
    /// the merchant-facing port. Keep it on loopback or a private network.
    pub metrics_listen: SocketAddr,
    // Transport bounds of both listeners (what one client may hold of the server), applied
    // by `crate::transport` and read once at start like the listen addresses.
    /// Open connections per listener; beyond it, new clients wait in the kernel's backlog.
    pub max_connections: u32,
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS); a client
    /// that opens more has the excess refused with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
    /// Requests being handled at once per listener, over all its connections; beyond it a
    /// request is shed at once: RESOURCE_EXHAUSTED on gRPC, 503 on HTTP (grpc.health,
    /// `/healthz` and `/metrics` are never shed).
    pub max_in_flight: u32,
    /// A gRPC handler that has not answered after this long is cancelled.
    pub request_timeout: Dur,
    /// A connection with no request in flight for this long is closed (this also bounds a
    /// client that connects and never finishes its first request).
    pub idle_timeout: Dur,
    /// An HTTP/1 client must send a request's headers within this long.
    pub header_read_timeout: Dur,
    /// HTTP/2 PING interval, to find dead peers that hold streams open.
    pub keepalive_interval: Dur,
    /// A PING not answered within this long closes the connection.
    pub keepalive_timeout: Dur,
    /// Largest request message of the device services (consent, presence, transparency).
    pub max_device_message_bytes: u32,
    /// Largest request message of `MerchantService`.
    pub max_merchant_message_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_connections: 1000,
            max_concurrent_streams: 100,
            max_in_flight: 512,
            request_timeout: Dur::secs(30),
            idle_timeout: Dur::mins(2),
            header_read_timeout: Dur::secs(10),
            keepalive_interval: Dur::secs(30),
            keepalive_timeout: Dur::secs(10),
            max_device_message_bytes: 16 * 1024,
            max_merchant_message_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://path/to/file.db` (embedded) or `postgres://user@host:5432/db` (shared by
    /// several nodes; `?options=-c%20search_path%3Dname` selects a schema).
    pub url: String,
    /// Directory for the device-pseudonym key file and the config audit log.
    pub data_dir: PathBuf,
    /// Free space (MiB) the store's file system must keep: below it the store stops taking
    /// writes and health says NOT_SERVING, before the disk is actually full. 0 disables.
    /// SQLite only: PostgreSQL manages its own disk (a full one fails commits, which then
    /// fail closed the same way).
    pub min_free_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://hexveil-data/hexveil.db".to_string(),
            data_dir: PathBuf::from("hexveil-data"),
            min_free_mb: 64,
        }
    }
}

/// Who is responsible for the processing, shown on receipts and in the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The data controller's name.
    pub controller: String,
    /// How to reach the controller about one's data.
    pub contact: String,
    /// Version of the privacy policy in force.
    pub version: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            controller: "the operator of this hexveil deployment".to_string(),
            contact: String::new(),
            version: "1".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinerCells {
    /// Replace a too-fine cell by its parent at `location.max_resolution`.
    Coarsen,
    /// Refuse the report with INVALID_ARGUMENT.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocationConfig {
    pub max_resolution: u8,
    pub finer_cells: FinerCells,
}

impl Default for LocationConfig {
    fn default() -> Self {
        LocationConfig {
            max_resolution: 8,
            finer_cells: FinerCells::Coarsen,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Device state expires after this many days without activity.
    pub device_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { device_days: 30 }
    }
}

impl RetentionConfig {
    /// The retention period as a duration.
    pub fn device_state(&self) -> std::time::Duration {
        Dur::days(u64::from(self.device_days)).get()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffersConfig {
    pub max_report_age: Dur,
    pub max_offers_per_reply: u32,
    pub max_radius_k: u32,
}

impl Default for OffersConfig {
    fn default() -> Self {
        OffersConfig {
            max_report_age: Dur::mins(15),
            max_offers_per_reply: 1,
            max_radius_k: 3,
        }
    }
}

/// Quiet hours in device local time, as minutes since local midnight; `None` disables them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuietHours(pub Option<(u16, u16)>);

impl QuietHours {
    /// Whether `minute_of_day` (0..1440, local time) falls inside the quiet window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        match self.0 {
            None => false,
            Some((start, end)) if start < end => (start..end).contains(&minute_of_day),
            Some((start, end)) => minute_of_day >= start || minute_of_day < end,
        }
    }

    /// Length of the quiet window in minutes (0 when disabled).
    pub fn minutes(&self) -> u32 {
        match self.0 {
            None => 0,
            Some((start, end)) => (u32::from(end) + 1440 - u32::from(start)) % 1440,
        }
    }
}

impl std::str::FromStr for QuietHours {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(QuietHours(None));
        }
        let bad = || {
            format!(
                "invalid quiet hours {s:?}: expected \"HH:MM-HH:MM\" (local time) or \"\" to disable"
            )
        };
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!(
                "quiet hours {s:?} start and end at the same time; use \"\" to disable them"
            ));
        }
        Ok(QuietHours(Some((start, end))))
    }
}

impl std::fmt::Display for QuietHours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => Ok(()),
            Some((s, e)) => write!(f, "{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60),
        }
    }
}

impl Serialize for QuietHours {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QuietHours {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapsConfig {
    pub min_dwell: Dur,
    pub quiet_hours: QuietHours,
    pub min_interval: Dur,
    pub per_device_per_day: u32,
    pub per_device_per_week: u32,
    pub per_merchant_per_device_per_week: u32,
    pub dismissal_backoff: Vec<Dur>,
    pub per_cell_per_minute: u32,
    pub ignore_fatigue_after: u32,
}

impl Default for CapsConfig {
    fn default() -> Self {
        CapsConfig {
            min_dwell: Dur::mins(5),
            quiet_hours: QuietHours(Some((21 * 60, 9 * 60))),
            min_interval: Dur::hours(2),
            per_device_per_day: 3,
            per_device_per_week: 10,
            per_merchant_per_device_per_week: 1,
            dismissal_backoff: vec![Dur::days(1), Dur::days(3), Dur::days(7)],
            per_cell_per_minute: 100,
            ignore_fatigue_after: 3,
        }
    }
}

/// An H3 cell in the config, written as an integer or as the usual hex string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CellSpec(pub u64);

impl Serialize for CellSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:x}", self.0))
    }
}

impl<'de> Deserialize<'de> for CellSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Hex(String),
        }
        let raw = match Raw::deserialize(d)? {
            Raw::Int(n) => n,
            Raw::Hex(s) => u64::from_str_radix(s.trim(), 16).map_err(|_| {
                serde::de::Error::custom(format!("{s:?} is not an H3 index in hex"))
            })?,
        };
        h3o::CellIndex::try_from(raw).map_err(|e| {
            serde::de::Error::custom(format!("{raw:#x} is not a valid H3 cell: {e}"))
        })?;
        Ok(CellSpec(raw))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExclusionsConfig {
    /// Sensitive areas: no offer is sent in or for them, nothing is counted there.
    pub cells: Vec<CellSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    pub device_reports_per_hour: u32,
    pub device_burst: u32,
    pub merchant_queries_per_minute: u32,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            device_reports_per_hour: 60,
            device_burst: 10,
            merchant_queries_per_minute: 600,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InsightsScope {
    /// A merchant reads only the released domain around its own locations.
    OwnArea,
    /// A merchant reads every released cell.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InsightsConfig {
    pub resolution: u8,
    pub bucket: Dur,
    pub grace: Dur,
    pub radius_k: u32,
    pub scope: InsightsScope,
    /// Coarsest cell a merchant may query: a query cell stands for all its released
    /// children, so this bounds the work one query cell can ask for.
    pub min_query_resolution: u8,
}

impl Default for InsightsConfig {
    fn default() -> Self {
        InsightsConfig {
            resolution: 8,
            bucket: Dur::hours(1),
            grace: Dur::mins(10),
            radius_k: 2,
            scope: InsightsScope::OwnArea,
            min_query_resolution: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MechanismKind {
    /// opendp's discrete Gaussian, accounted under zero-concentrated DP.
    Gaussian,
    /// opendp's discrete Laplace, accounted under pure DP.
    Laplace,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    pub mechanism: MechanismKind,
    /// A device counts in at most this many cells per bucket.
    pub max_cells_per_bucket: u32,
    /// A device counts in at most this many (cell, bucket) pairs in any 24 hours.
    pub max_contributions_per_day: u32,
    /// Laplace: epsilon spent per release on a device at the per-bucket bound.
    pub epsilon_per_bucket: f64,
    /// Gaussian: zCDP rho spent per release on a device at the per-bucket bound.
    pub rho_per_bucket: f64,
    /// Gaussian: zCDP rho a device can spend per day on offer statistics.
    pub offer_stats_rho_per_day: f64,
    /// A device counts in at most this many cells per UTC day in the daily release.
    pub max_cells_per_day: u32,
    /// Gaussian: zCDP rho of one day's daily release for a device at `max_cells_per_day`
    /// (any 24 hours touches two UTC days, so the promise counts it twice).
    pub rho_per_day: f64,
    /// Laplace: epsilon of one day's daily release for a device at `max_cells_per_day`
    /// (counted twice in the promise, likewise).
    pub epsilon_per_day: f64,
    /// Laplace: epsilon a device can spend per day on offer statistics.
    pub offer_stats_epsilon_per_day: f64,
    /// Noisy counts below this are released as suppressed.
    pub threshold: u32,
    /// The promise: a config whose schedule spends more per device per day is refused.
    pub max_epsilon_per_device_per_day: f64,
    pub delta: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            mechanism: MechanismKind::Gaussian,
            max_cells_per_bucket: 4,
            max_contributions_per_day: 16,
            epsilon_per_bucket: 0.1,
            rho_per_bucket: 0.01,
            offer_stats_rho_per_day: 0.01,
            max_cells_per_day: 8,
            rho_per_day: 0.0175,
            epsilon_per_day: 0.4,
            offer_stats_epsilon_per_day: 0.2,
            threshold: 20,
            max_epsilon_per_device_per_day: 2.0,
            delta: 1e-6,
        }
    }
}

impl Config {
    /// Reads a config and applies overrides: `path` (if any), then `env`
    /// (`HEXVEIL_<SECTION>__<KEY>` pairs), then `flags` (dotted key, TOML value). Values are
    /// not validated here: [`crate::settings::Settings::new`] validates once and keeps the
    /// consequences it computed.
    pub fn read(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(String, toml::Value)],
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Io {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_with(&text, env, flags)
    }

    /// Parses TOML text with overrides, without validating values.
    pub fn from_toml_with(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(String, toml::Value)],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    key: toml_error_key(text, &e),
                    message: e.message().to_string(),
                })?;
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        env.sort();
        for (name, value) in env {
            let dotted = name[ENV_PREFIX.len()..]
                .replacen("__", ".", 1)
                .to_lowercase();
            set_key(&mut table, &dotted, parse_scalar(&value))?;
        }
        for (key, value) in flags {
            set_key(&mut table, key, value.clone())?;
        }
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            ConfigError::Parse {
                key: full_key(&path, &message),
                message,
            }
        })
    }

    /// Parses TOML text alone (no overrides, no validation).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with(text, [], &[])
    }

    /// Checks every value and the privacy promise; returns what the config implies.
    pub fn validate(&self) -> Result<Consequences, ConfigError> {
        fn inv(key: &str, message: impl Into<String>) -> ConfigError {
            ConfigError::invalid(key, message)
        }
        self.validate_transport()?;
        if self.store.url.trim().is_empty() {
            return Err(inv("store.url", "must not be empty"));
        }
        if !(self.store.url.starts_with("sqlite:")
            || self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://"))
        {
            return Err(inv(
                "store.url",
                "must start with sqlite: (embedded file) or postgres:// (scale-out)",
            ));
        }
        if self.store.min_free_mb > 1 << 20 {
            return Err(inv("store.min_free_mb", "must be at most 1048576 (1 TiB)"));
        }
        if self.policy.controller.trim().is_empty() || self.policy.controller.len() > 200 {
            return Err(inv("policy.controller", "must be 1-200 characters"));
        }
        if self.policy.version.trim().is_empty()
            || self.policy.version.len() > 64
            || self.policy.version.chars().any(char::is_control)
        {
            return Err(inv("policy.version", "must be 1-64 printable characters"));
        }
        if self.location.max_resolution > 15 {
            return Err(inv("location.max_resolution", "H3 resolutions are 0-15"));
        }
        if !(1..=3650).contains(&self.retention.device_days) {
            return Err(inv("retention.device_days", "must be 1-3650"));
        }
        if self.offers.max_report_age.get().is_zero() {
            return Err(inv("offers.max_report_age", "must be longer than 0s"));
        }
        if !(1..=10).contains(&self.offers.max_offers_per_reply) {
            return Err(inv("offers.max_offers_per_reply", "must be 1-10"));
        }
        if self.offers.max_radius_k > 10 {
            return Err(inv("offers.max_radius_k", "must be 0-10 (grid rings)"));
        }
        let caps = &self.caps;
        if caps.min_dwell > Dur::days(1) {
            return Err(inv("caps.min_dwell", "must be at most 1d"));
        }
        if caps.min_interval > Dur::days(7) {
            return Err(inv("caps.min_interval", "must be at most 7d"));
        }
        if caps.per_device_per_day > 100 {
            return Err(inv("caps.per_device_per_day", "must be 0-100"));
        }
        if caps.per_device_per_week > 700 {
            return Err(inv("caps.per_device_per_week", "must be 0-700"));
        }
        if caps.per_merchant_per_device_per_week > 100 {
            return Err(inv(
                "caps.per_merchant_per_device_per_week",
                "must be 0-100",
            ));
        }
        if caps.dismissal_backoff.len() > 10 {
            return Err(inv("caps.dismissal_backoff", "at most 10 steps"));
        }
        if caps.dismissal_backoff.windows(2).any(|w| w[1] < w[0]) {
            return Err(inv(
                "caps.dismissal_backoff",
                "steps must not decrease (the back-off escalates)",
            ));
        }
        if caps.dismissal_backoff.iter().any(|d| *d > Dur::days(365)) {
            return Err(inv(
                "caps.dismissal_backoff",
                "each step must be at most 365d",
            ));
        }
        if caps.per_cell_per_minute == 0 {
            return Err(inv("caps.per_cell_per_minute", "must be at least 1"));
        }
        if caps.ignore_fatigue_after > 100 {
            return Err(inv("caps.ignore_fatigue_after", "must be 0-100"));
        }
        let rl = &self.rate_limits;
        if rl.device_reports_per_hour == 0 || rl.device_reports_per_hour > 3_600_000 {
            return Err(inv(
                "rate_limits.device_reports_per_hour",
                "must be 1-3600000",
            ));
        }
        if rl.device_burst == 0 || rl.device_burst > 10_000 {
            return Err(inv("rate_limits.device_burst", "must be 1-10000"));
        }
        if rl.merchant_queries_per_minute == 0 {
            return Err(inv(
                "rate_limits.merchant_queries_per_minute",
                "must be at least 1",
            ));
        }
        let ins = &self.insights;
        if ins.resolution > self.location.max_resolution {
            return Err(inv(
                "insights.resolution",
                format!(
                    "must not be finer than location.max_resolution ({})",
                    self.location.max_resolution
                ),
            ));
        }
        let bucket = ins.bucket.as_secs();
        if bucket < 60 || !86_400_u64.is_multiple_of(bucket) {
            return Err(inv(
                "insights.bucket",
                "must be at least 1m and divide a day evenly (e.g. \"15m\", \"1h\", \"1d\")",
            ));
        }
        if ins.grace > Dur::days(1) {
            return Err(inv("insights.grace", "must be at most 1d"));
        }
        if ins.radius_k > 10 {
            return Err(inv("insights.radius_k", "must be 0-10 (grid rings)"));
        }
        // One query cell expands to 7^(levels) released cells: at most 4 levels (2,401).
        if ins.min_query_resolution > ins.resolution
            || ins.resolution - ins.min_query_resolution > MAX_QUERY_LEVELS
        {
            return Err(inv(
                "insights.min_query_resolution",
                format!(
                    "must be {}-{} (at most {MAX_QUERY_LEVELS} levels coarser than insights.resolution = {})",
                    ins.resolution.saturating_sub(MAX_QUERY_LEVELS),
                    ins.resolution,
                    ins.resolution
                ),
            ));
        }
        let p = &self.privacy;
        if !(1..=100).contains(&p.max_cells_per_bucket) {
            return Err(inv("privacy.max_cells_per_bucket", "must be 1-100"));
        }
        if p.max_contributions_per_day == 0 {
            return Err(inv(
                "privacy.max_contributions_per_day",
                "must be at least 1",
            ));
        }
        // Bounded ranges, not just "positive": the noise scale follows from these, and the
        // interval widths and accounting cost time that grows with it (1e-300 once hung
        // start-up and the reloader). Outside these ranges the noise is either useless
        // (std-dev in the thousands) or no privacy at all.
        in_range(
            p.epsilon_per_bucket,
            EPSILON_RANGE,
            "privacy.epsilon_per_bucket",
        )?;
        in_range(p.rho_per_bucket, RHO_RANGE, "privacy.rho_per_bucket")?;
        in_range(p.delta, DELTA_RANGE, "privacy.delta")?;
        in_range(
            p.max_epsilon_per_device_per_day,
            EPSILON_RANGE,
            "privacy.max_epsilon_per_device_per_day",
        )?;
        if p.max_contributions_per_day > 100_000 {
            return Err(inv(
                "privacy.max_contributions_per_day",
                "must be at most 100000",
            ));
        }
        if p.threshold > 1_000_000 {
            return Err(inv("privacy.threshold", "must be at most 1000000"));
        }
        in_range(
            p.offer_stats_rho_per_day,
            RHO_RANGE,
            "privacy.offer_stats_rho_per_day",
        )?;
        in_range(
            p.offer_stats_epsilon_per_day,
            EPSILON_RANGE,
            "privacy.offer_stats_epsilon_per_day",
        )?;
        if !(1..=100).contains(&p.max_cells_per_day) {
            return Err(inv("privacy.max_cells_per_day", "must be 1-100"));
        }
        in_range(p.rho_per_day, RHO_RANGE, "privacy.rho_per_day")?;
        in_range(p.epsilon_per_day, EPSILON_RANGE, "privacy.epsilon_per_day")?;
        let consequences = Consequences::of(self).map_err(|e| inv("privacy", e.to_string()))?;
        let eps = consequences.privacy.epsilon_per_device_per_day;
        if eps > p.max_epsilon_per_device_per_day {
            let spent_by = match p.mechanism {
                MechanismKind::Gaussian => {
                    "privacy.rho_per_bucket, privacy.rho_per_day, privacy.offer_stats_rho_per_day"
                }
                MechanismKind::Laplace => {
                    "privacy.epsilon_per_bucket, privacy.epsilon_per_day, privacy.offer_stats_epsilon_per_day"
                }
            };
            return Err(inv(
                "privacy.max_epsilon_per_device_per_day",
                format!(
                    "the release schedule spends epsilon = {eps:.3} per device in any 24 hours (delta = {}), \
                     more than the promised {}; lower {spent_by}, privacy.max_cells_per_bucket, \
                     privacy.max_contributions_per_day or privacy.max_cells_per_day, or lengthen insights.bucket",
                    p.delta, p.max_epsilon_per_device_per_day
                ),
            ));
        }
        Ok(consequences)
    }

    /// The config as TOML, the way `hexveil config check` prints it.
    pub fn to_toml(&self) -> String {
        // Unwrap safety: every field is a plain string, number, list or table, which the TOML
        // serializer always accepts.
        toml::to_string(self).expect("config always serializes")
    }
}

/// Most levels a query cell may be coarser than `insights.resolution` (7^4 = 2,401 cells).
pub const MAX_QUERY_LEVELS: u8 = 4;
/// Accepted ε per release and ε promise per day (Laplace scale b = k/ε stays below 10⁶).
pub const EPSILON_RANGE: (f64, f64) = (1e-4, 100.0);
/// Accepted ρ per release (Gaussian σ = √(k/2ρ) stays below about 7,100).
pub const RHO_RANGE: (f64, f64) = (1e-6, 100.0);
/// Accepted δ.
pub const DELTA_RANGE: (f64, f64) = (1e-12, 1e-3);

/// Refuses a value outside `[lo, hi]` (NaN and infinities included), naming the key.
fn in_range(value: f64, (lo, hi): (f64, f64), key: &str) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("must be a number from {lo:e} to {hi:e} (got {value:e})"),
        ))
    }
}

impl Config {
    /// The transport bounds: every one must be set (0 would mean "refuse everything" or, for
    /// tonic and hyper, "no limit"), and none so large that it stops bounding anything.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let counts = [
            ("server.max_connections", s.max_connections, 100_000),
            (
                "server.max_concurrent_streams",
                s.max_concurrent_streams,
                10_000,
            ),
            ("server.max_in_flight", s.max_in_flight, 100_000),
            (
                "server.max_device_message_bytes",
                s.max_device_message_bytes,
                4 << 20,
            ),
            (
                "server.max_merchant_message_bytes",
                s.max_merchant_message_bytes,
                4 << 20,
            ),
        ];
        for (key, value, max) in counts {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::invalid(key, format!("must be 1-{max}")));
            }
        }
        let times = [
            ("server.request_timeout", s.request_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.keepalive_interval", s.keepalive_interval),
            ("server.keepalive_timeout", s.keepalive_timeout),
        ];
        for (key, value) in times {
            if value.get().is_zero() || value > Dur::hours(1) {
                return Err(ConfigError::invalid(key, "must be 1s-1h"));
            }
        }
        // Operator metrics on the merchant-facing port (or the gRPC one) would be served to
        // whoever reaches it, or fail to bind at start; port 0 (any free port) never clashes.
        let clash = |a: SocketAddr, b: SocketAddr| a == b && a.port() != 0;
        for (other, name) in [
            (s.http_listen, "server.http_listen"),
            (s.grpc_listen, "server.grpc_listen"),
        ] {
            if clash(s.metrics_listen, other) {
                return Err(ConfigError::invalid(
                    "server.metrics_listen",
                    format!("must differ from {name} ({other})"),
                ));
            }
        }
        if clash(s.http_listen, s.grpc_listen) {
            return Err(ConfigError::invalid(
                "server.http_listen",
                format!("must differ from server.grpc_listen ({})", s.grpc_listen),
            ));
        }
        Ok(())
    }
}

/// Sets `a.b` in a table, creating the section; only two levels exist in this config.
fn set_key(table: &mut toml::Table, dotted: &str, value: toml::Value) -> Result<(), ConfigError> {
    let Some((section, key)) = dotted.split_once('.') else {
        return Err(ConfigError::Parse {
            key: dotted.to_string(),
            message: "overrides must name a key as section.key".to_string(),
        });
    };
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(ConfigError::Parse {
            key: section.to_string(),
            message: "is not a table".to_string(),
        });
    };
    section_table.insert(key.to_string(), value);
    Ok(())
}

/// An environment value as TOML when it parses as a number, boolean or array, else a string.
fn parse_scalar(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

/// Joins serde's path with an unknown field's name so the error names the whole key.
fn full_key(path: &str, message: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    match (path, unknown) {
        (".", Some(field)) | ("", Some(field)) => field.to_string(),
        (p, Some(field)) if p.rsplit('.').next() == Some(field) => p.to_string(),
        (p, Some(field)) => format!("{p}.{field}"),
        (p, None) => p.to_string(),
    }
}

/// Best effort at the key on the line of a TOML syntax error, for the error message.
fn toml_error_key(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return String::new();
    };
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    line.split('=').next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests;
