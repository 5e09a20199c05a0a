//! What a simulation found: the tally kept while it runs, the [`Report`] (serialized as
//! `--json`) and the aligned text table, for one config or two side by side (`--compare`).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::caps::Reason;
use crate::clock::Timestamp;
use crate::model::{OfferId, ReleasedCount};
use crate::presence::Decision;
use crate::settings::Settings;

use super::{START, Setup, Simulation};

/// What the report says about reproducibility (the issue asks that it be said).
pub const REPRODUCIBILITY: &str = "traffic is reproducible with --seed; the DP noise is not \
     (opendp draws it fresh on every run), so released counts and error figures vary a little";

/// Every outcome of a report, in the wire enum's order: index 0 is NONE (an offer was given).
pub const OUTCOMES: [&str; 14] = [
    "NONE",
    "NO_CONSENT",
    "NO_OFFERS_NEARBY",
    "DWELL_NOT_MET",
    "QUIET_HOURS",
    "MIN_INTERVAL",
    "DAILY_CAP",
    "WEEKLY_CAP",
    "MERCHANT_CAP",
    "DISMISSAL_BACKOFF",
    "MERCHANT_MUTED",
    "OFFER_CAP",
    "STALE_REPORT",
    "GLOBAL_CELL_CAP",
];

/// Index of a reason in [`OUTCOMES`]; exhaustive, so a new reason cannot be forgotten.
fn outcome_index(r: Reason) -> usize {
    match r {
        Reason::NoConsent => 1,
        Reason::NoOffersNearby => 2,
        Reason::DwellNotMet => 3,
        Reason::QuietHours => 4,
        Reason::MinInterval => 5,
        Reason::DailyCap => 6,
        Reason::WeeklyCap => 7,
        Reason::MerchantCap => 8,
        Reason::DismissalBackoff => 9,
        Reason::MerchantMuted => 10,
        Reason::OfferCap => 11,
        Reason::StaleReport => 12,
        Reason::GlobalCellCap => 13,
    }
}

/// Counts kept while the simulation runs.
pub(crate) struct Tally {
    days: u32,
    reports: u64,
    rate_limited: u64,
    outcomes: [u64; 14],
    /// Notifications per (device, UTC day of the run), `device * days + day`.
    per_device_day: Vec<u32>,
    /// Send times of every notified device, for the largest count in any rolling 24 h.
    sends: HashMap<usize, Vec<i64>>,
    per_offer: HashMap<OfferId, u64>,
    offers: Vec<(String, crate::model::Offer)>,
}

/// A distribution of notifications per device per day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
    /// Share of (device, day) pairs with no notification at all.
    pub share_none: f64,
    /// `histogram[n]`: (device, day) pairs with exactly `n` notifications.
    pub histogram: Vec<u64>,
}

/// Notifications delivered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notifications {
    pub total: u64,
    /// Over every simulated device and day (devices × days pairs).
    pub per_device_per_day: Distribution,
    /// The most any device got in a rolling 24 h window (the caps' own window).
    pub max_in_any_24h: u32,
    /// What `config check` says the caps allow at most per device per day.
    pub cap_per_day: u32,
}

/// One outcome's share of all reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// `NONE` (an offer was given) or a `NoOfferReason`.
    pub reason: &'static str,
    pub reports: u64,
    pub share: f64,
}

/// Notifications delivered by one merchant or offer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivered {
    pub merchant: String,
    /// Empty for a merchant's total.
    pub offer: String,
    pub delivered: u64,
}

/// Released vs true counts, for one granularity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorStats {
    /// Released values compared (suppressed ones included: their noisy value is stored).
    pub values: u64,
    pub mean_abs_error: f64,
    pub p95_abs_error: f64,
    /// Root mean square error: comparable with `expected_std_dev`.
    pub rms_error: f64,
    /// What the noise alone should give (from `config check`'s σ).
    pub expected_std_dev: f64,
    /// Half-width of the 95% interval `config check` states.
    pub ci95_half_width: f64,
    /// Share of released values within that interval of the truth (about 0.95 expected).
    pub share_within_ci95: f64,
}

/// One bucket of the chart's cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesPoint {
    pub bucket_start_ms: i64,
    pub truth: u64,
    pub released: i64,
    pub suppressed: bool,
}

/// The privacy side: the promise (from `Consequences`, as `config check` prints it) and
/// what the released counts measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Privacy {
    pub mechanism: &'static str,
    pub epsilon_promised: f64,
    pub epsilon_per_device_per_day: f64,
    pub delta: f64,
    pub noise_scale: f64,
    pub noise_std_dev: f64,
    pub hour_ci95_half_width: f64,
    pub day_ci95_half_width: f64,
    pub threshold: u32,
    /// (cell, bucket) values released over the run.
    pub released_values: u64,
    pub share_suppressed: f64,
    pub hourly: ErrorStats,
    /// Day totals of a cell (sums of its hourly releases over a UTC day).
    pub daily: ErrorStats,
    /// The busiest released cell (hex), for the chart.
    pub series_cell: String,
    pub series: Vec<SeriesPoint>,
}

/// Everything one simulation reports (`--json` prints this).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub config: String,
    pub city: String,
    pub devices: usize,
    pub days: u32,
    pub seed: u64,
    pub start_ms: i64,
    pub reproducibility: &'static str,
    pub reports: u64,
    /// Reports refused by the per-device rate limit (no decision was made).
    pub rate_limited: u64,
    pub took_secs: f64,
    pub notifications: Notifications,
    pub outcomes: Vec<Outcome>,
    pub merchants: Vec<Delivered>,
    pub offers: Vec<Delivered>,
    pub privacy: Privacy,
}

impl Tally {
    pub(crate) fn new(devices: usize, days: u32, setup: &Setup) -> Tally {
        Tally {
            days,
            reports: 0,
            rate_limited: 0,
            outcomes: [0; 14],
            per_device_day: vec![0; devices * days as usize],
            sends: HashMap::new(),
            per_offer: HashMap::new(),
            offers: setup.offers.clone(),
        }
    }

    /// Counts one decision of device `device` at `at`.
    pub(crate) fn record(&mut self, device: usize, at: Timestamp, d: &Decision) {
        self.reports += 1;
        let i = d.reason.map_or(0, outcome_index);
        self.outcomes[i] += 1;
        let day = ((at.millis() - START.millis()).div_euclid(86_400_000) as usize)
            .min(self.days as usize - 1);
        for (offer, _) in &d.offers {
            *self.per_offer.entry(offer.offer_id).or_default() += 1;
            self.per_device_day[device * self.days as usize + day] += 1;
            self.sends.entry(device).or_default().push(at.millis());
        }
    }

    pub(crate) fn rate_limited(&mut self) {
        self.rate_limited += 1;
    }

    /// The report, given the released counts and the true counts read before release.
    pub(crate) fn finish(
        self,
        sim: &Simulation,
        settings: &Settings,
        released: &[ReleasedCount],
        truth: &HashMap<(i64, u64), u64>,
        took_secs: f64,
    ) -> Report {
        let reports = self.reports.max(1) as f64;
        let outcomes = OUTCOMES
            .iter()
            .zip(self.outcomes)
            .map(|(reason, n)| Outcome {
                reason,
                reports: n,
                share: n as f64 / reports,
            })
            .collect();
        let mut merchants: Vec<(String, u64)> = Vec::new();
        let offers: Vec<Delivered> = self
            .offers
            .iter()
            .map(|(merchant, o)| {
                let n = self.per_offer.get(&o.offer_id).copied().unwrap_or(0);
                match merchants.iter_mut().find(|(m, _)| m == merchant) {
                    Some((_, total)) => *total += n,
                    None => merchants.push((merchant.clone(), n)),
                }
                Delivered {
                    merchant: merchant.clone(),
                    offer: o.title.clone(),
                    delivered: n,
                }
            })
            .collect();
        let max_in_any_24h = self
            .sends
            .values()
            .map(|times| {
                let mut best = 0;
                for (i, t) in times.iter().enumerate() {
                    let n = times[i..]
                        .iter()
                        .take_while(|u| **u < t + 86_400_000)
                        .count();
                    best = best.max(n as u32);
                }
                best
            })
            .max()
            .unwrap_or(0);
        let total: u64 = self.per_device_day.iter().map(|n| u64::from(*n)).sum();
        Report {
            config: sim.label.clone(),
            city: sim.city_label.clone(),
            devices: sim.devices,
            days: sim.days,
            seed: sim.seed,
            start_ms: START.millis(),
            reproducibility: REPRODUCIBILITY,
            reports: self.reports,
            rate_limited: self.rate_limited,
            took_secs,
            notifications: Notifications {
                total,
                per_device_per_day: distribution(self.per_device_day),
                max_in_any_24h,
                cap_per_day: settings
                    .consequences
                    .caps
                    .max_notifications_per_device_per_day,
            },
            outcomes,
            merchants: merchants
                .into_iter()
                .map(|(merchant, delivered)| Delivered {
                    merchant,
                    offer: String::new(),
                    delivered,
                })
                .collect(),
            offers,
            privacy: privacy(settings, released, truth),
        }
    }
}

fn distribution(mut v: Vec<u32>) -> Distribution {
    v.sort_unstable();
    let n = v.len().max(1);
    let at = |p: f64| {
        v.get(((p * n as f64).ceil() as usize).clamp(1, n) - 1)
            .copied()
    };
    let max = v.last().copied().unwrap_or(0);
    let mut histogram = vec![0u64; max as usize + 1];
    for x in &v {
        histogram[*x as usize] += 1;
    }
    Distribution {
        mean: v.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64,
        p50: at(0.5).unwrap_or(0),
        p90: at(0.9).unwrap_or(0),
        p99: at(0.99).unwrap_or(0),
        max,
        share_none: histogram.first().copied().unwrap_or(0) as f64 / n as f64,
        histogram,
    }
}

/// Error figures of `(released - truth)` pairs against the stated σ and interval.
fn error_stats(errors: &[i64], std_dev: f64, half_width: f64) -> ErrorStats {
    let n = errors.len().max(1) as f64;
    let mut abs: Vec<f64> = errors.iter().map(|e| e.unsigned_abs() as f64).collect();
    abs.sort_by(f64::total_cmp);
    let p95 = abs
        .get(((0.95 * abs.len() as f64).ceil() as usize).max(1) - 1)
        .copied()
        .unwrap_or(0.0);
    ErrorStats {
        values: errors.len() as u64,
        mean_abs_error: abs.iter().sum::<f64>() / n,
        p95_abs_error: p95,
        rms_error: (errors.iter().map(|e| (*e as f64).powi(2)).sum::<f64>() / n).sqrt(),
        expected_std_dev: std_dev,
        ci95_half_width: half_width,
        share_within_ci95: abs.iter().filter(|a| **a <= half_width).count() as f64 / n,
    }
}

fn privacy(
    settings: &Settings,
    released: &[ReleasedCount],
    truth: &HashMap<(i64, u64), u64>,
) -> Privacy {
    let dp = &settings.consequences.privacy;
    let truth_of = |r: &ReleasedCount| {
        truth
            .get(&(r.bucket.millis(), r.cell))
            .copied()
            .unwrap_or(0)
    };
    let hourly: Vec<i64> = released
        .iter()
        .map(|r| r.noisy - truth_of(r) as i64)
        .collect();
    // (cell, day) -> (released sum, true sum, terms)
    let mut days: BTreeMap<(u64, i64), (i64, i64, u32)> = BTreeMap::new();
    let mut per_cell: HashMap<u64, u64> = HashMap::new();
    for r in released {
        let e = days
            .entry((r.cell, r.bucket.millis().div_euclid(86_400_000)))
            .or_default();
        e.0 += r.noisy;
        e.1 += truth_of(r) as i64;
        e.2 += 1;
        *per_cell.entry(r.cell).or_default() += truth_of(r);
    }
    // Only whole days: the stated day interval is for a sum of every bucket of the day.
    let daily: Vec<i64> = days
        .values()
        .filter(|(_, _, terms)| *terms == dp.buckets_per_day)
        .map(|(noisy, t, _)| noisy - t)
        .collect();
    let busiest = per_cell
        .iter()
        .max_by_key(|(cell, n)| (**n, std::cmp::Reverse(**cell)))
        .map(|(c, _)| *c);
    let mut series: Vec<SeriesPoint> = released
        .iter()
        .filter(|r| Some(r.cell) == busiest)
        .map(|r| SeriesPoint {
            bucket_start_ms: r.bucket.millis(),
            truth: truth_of(r),
            released: r.noisy,
            suppressed: r.suppressed,
        })
        .collect();
    series.sort_by_key(|p| p.bucket_start_ms);
    let suppressed = released.iter().filter(|r| r.suppressed).count();
    Privacy {
        mechanism: dp.mechanism,
        epsilon_promised: settings.config.privacy.max_epsilon_per_device_per_day,
        epsilon_per_device_per_day: dp.epsilon_per_device_per_day,
        delta: dp.delta,
        noise_scale: dp.noise_scale,
        noise_std_dev: dp.noise_std_dev,
        hour_ci95_half_width: dp.ci95_half_width,
        day_ci95_half_width: dp.day_total_ci95_half_width,
        threshold: dp.threshold,
        released_values: released.len() as u64,
        share_suppressed: suppressed as f64 / released.len().max(1) as f64,
        hourly: error_stats(&hourly, dp.noise_std_dev, dp.ci95_half_width),
        daily: error_stats(
            &daily,
            dp.noise_std_dev * f64::from(dp.buckets_per_day).sqrt(),
            dp.day_total_ci95_half_width,
        ),
        series_cell: busiest.map(|c| format!("{c:x}")).unwrap_or_default(),
        series,
    }
}

/// A value in the text table.
#[derive(Debug, Clone, Copy)]
enum Value {
    Int(u64),
    Share(f64),
    Num(f64, usize),
}

impl Value {
    fn number(self) -> f64 {
        match self {
            Value::Int(n) => n as f64,
            Value::Share(s) => s,
            Value::Num(x, _) => x,
        }
    }

    fn show(self) -> String {
        match self {
            Value::Int(n) => n.to_string(),
            Value::Share(s) => format!("{:.1}%", 100.0 * s),
            Value::Num(x, d) => format!("{x:.d$}"),
        }
    }

    fn change(self, other: Value) -> String {
        let d = other.number() - self.number();
        match self {
            Value::Int(_) => format!("{:+}", d as i64),
            Value::Share(_) => format!("{:+.1} pp", 100.0 * d),
            Value::Num(_, p) => format!("{d:+.p$}"),
        }
    }
}

/// One line of the table: its section, a stable key (the `--json` difference's), a label.
struct Row {
    section: &'static str,
    key: String,
    label: String,
    value: Value,
}

impl Report {
    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut add = |section: &'static str, key: &str, label: &str, value: Value| {
            rows.push(Row {
                section,
                key: key.to_string(),
                label: label.to_string(),
                value,
            })
        };
        let n = &self.notifications;
        let d = &n.per_device_per_day;
        let s = "Notifications per device per day";
        add(
            s,
            "notifications.total",
            "notifications delivered",
            Value::Int(n.total),
        );
        add(s, "notifications.mean", "mean", Value::Num(d.mean, 2));
        add(s, "notifications.p50", "p50", Value::Int(d.p50.into()));
        add(s, "notifications.p90", "p90", Value::Int(d.p90.into()));
        add(s, "notifications.p99", "p99", Value::Int(d.p99.into()));
        add(s, "notifications.max", "max", Value::Int(d.max.into()));
        add(
            s,
            "notifications.max_in_any_24h",
            "max in any rolling 24 h",
            Value::Int(n.max_in_any_24h.into()),
        );
        add(
            s,
            "notifications.cap_per_day",
            "cap per day (config check)",
            Value::Int(n.cap_per_day.into()),
        );
        add(
            s,
            "notifications.share_none",
            "devices with none that day",
            Value::Share(d.share_none),
        );
        let s = "Reports by outcome (share of reports)";
        add(s, "reports", "reports", Value::Int(self.reports));
        add(
            s,
            "rate_limited",
            "rate-limited (no decision)",
            Value::Int(self.rate_limited),
        );
        for o in &self.outcomes {
            let label = if o.reason == "NONE" {
                "NONE (offer sent)"
            } else {
                o.reason
            };
            add(
                s,
                &format!("outcome.{}", o.reason),
                label,
                Value::Share(o.share),
            );
        }
        let s = "Delivered per merchant and offer";
        for m in &self.merchants {
            add(
                s,
                &format!("merchant.{}", m.merchant),
                &m.merchant,
                Value::Int(m.delivered),
            );
            for o in self.offers.iter().filter(|o| o.merchant == m.merchant) {
                let title: String = o.offer.chars().take(34).collect();
                add(
                    s,
                    &format!("offer.{}/{}", o.merchant, o.offer),
                    &format!("  {title}"),
                    Value::Int(o.delivered),
                );
            }
        }
        let p = &self.privacy;
        let s = "Privacy (promise from config check; error measured)";
        add(
            s,
            "privacy.epsilon_promised",
            "ε promised per device per day",
            Value::Num(p.epsilon_promised, 3),
        );
        add(
            s,
            "privacy.epsilon_per_device_per_day",
            "ε the schedule spends per day",
            Value::Num(p.epsilon_per_device_per_day, 3),
        );
        add(
            s,
            "privacy.noise_std_dev",
            "noise σ of a count",
            Value::Num(p.noise_std_dev, 2),
        );
        add(
            s,
            "privacy.hour_ci95_half_width",
            "95% interval ± (hour)",
            Value::Num(p.hour_ci95_half_width, 0),
        );
        add(
            s,
            "privacy.day_ci95_half_width",
            "95% interval ± (day total)",
            Value::Num(p.day_ci95_half_width, 0),
        );
        add(
            s,
            "privacy.share_suppressed",
            "released cells suppressed",
            Value::Share(p.share_suppressed),
        );
        for (g, e) in [("hour", &p.hourly), ("day", &p.daily)] {
            add(
                s,
                &format!("privacy.{g}.mean_abs_error"),
                &format!("{g}: mean abs error"),
                Value::Num(e.mean_abs_error, 2),
            );
            add(
                s,
                &format!("privacy.{g}.p95_abs_error"),
                &format!("{g}: p95 abs error"),
                Value::Num(e.p95_abs_error, 0),
            );
            add(
                s,
                &format!("privacy.{g}.rms_error"),
                &format!("{g}: rms error (σ {:.1})", e.expected_std_dev),
                Value::Num(e.rms_error, 2),
            );
            add(
                s,
                &format!("privacy.{g}.share_within_ci95"),
                &format!("{g}: within the 95% interval"),
                Value::Share(e.share_within_ci95),
            );
        }
        let s = "Run";
        add(s, "took_secs", "took (s)", Value::Num(self.took_secs, 2));
        add(
            s,
            "reports_per_sec",
            "reports per second",
            Value::Int((self.reports as f64 / self.took_secs.max(1e-9)) as u64),
        );
        rows
    }

    /// The aligned text table of this report alone.
    pub fn text(&self) -> String {
        render(&[self])
    }
}

/// Two reports of the same traffic under two configs.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub base: Report,
    pub compare: Report,
    /// `compare - base` for every numeric figure, keyed as in the text table.
    pub difference: BTreeMap<String, f64>,
}

impl Comparison {
    pub fn new(base: Report, compare: Report) -> Comparison {
        let a = base.rows();
        let b: HashMap<String, Value> = compare
            .rows()
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect();
        let difference = a
            .iter()
            .filter_map(|r| {
                b.get(&r.key)
                    .map(|v| (r.key.clone(), v.number() - r.value.number()))
            })
            .collect();
        Comparison {
            base,
            compare,
            difference,
        }
    }

    /// The side-by-side text table with a change column.
    pub fn text(&self) -> String {
        render(&[&self.base, &self.compare])
    }
}

/// One line of the table shown for one or two reports (text and HTML share it).
pub(crate) struct TableRow {
    pub(crate) section: &'static str,
    pub(crate) label: String,
    /// One value per report, formatted.
    pub(crate) values: Vec<String>,
    /// `compare - base`, formatted, when there are two reports.
    pub(crate) change: Option<String>,
}

/// The rows of the table for `reports` (one, or two to compare), in order.
pub(crate) fn table(reports: &[&Report]) -> Vec<TableRow> {
    let tables: Vec<Vec<Row>> = reports.iter().map(|r| r.rows()).collect();
    tables[0]
        .iter()
        .map(|row| {
            let values: Vec<Value> = tables
                .iter()
                .map(|t| {
                    t.iter()
                        .find(|r| r.key == row.key)
                        .map_or(Value::Int(0), |r| r.value)
                })
                .collect();
            TableRow {
                section: row.section,
                label: row.label.clone(),
                values: values.iter().map(|v| v.show()).collect(),
                change: match values[..] {
                    [a, b] => Some(a.change(b)),
                    _ => None,
                },
            }
        })
        .collect()
}

fn render(reports: &[&Report]) -> String {
    use std::fmt::Write;
    let first = reports[0];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hexveil simulate: {} devices x {} day(s), city {}, seed {}",
        first.devices, first.days, first.city, first.seed
    );
    let _ = writeln!(out, "Note: {}.", first.reproducibility);
    let rows = table(reports);
    let width = rows
        .iter()
        .map(|r| (r.label.chars().count() + 2).max(r.section.chars().count() + 1))
        .max()
        .unwrap_or(0);
    let mut headers: Vec<String> = reports.iter().map(|r| r.config.clone()).collect();
    if reports.len() == 2 {
        headers.push("change".into());
    }
    let cols: Vec<usize> = headers
        .iter()
        .map(|h| h.chars().count().max(12) + 2)
        .collect();
    let mut section = "";
    for row in &rows {
        if row.section != section {
            section = row.section;
            let _ = write!(out, "\n{section:width$}");
            for (h, w) in headers.iter().zip(&cols) {
                let _ = write!(out, "{h:>w$}");
            }
            out.push('\n');
        }
        let _ = write!(out, "  {:w$}", row.label, w = width - 2);
        for (v, w) in row.values.iter().chain(&row.change).zip(&cols) {
            let _ = write!(out, "{v:>w$}");
        }
        out.push('\n');
    }
    out
}
