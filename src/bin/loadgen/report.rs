//! What a run prints: one line per round as it ends, then a summary with hexveil ÷ baseline
//! (medians over the rounds, measured in the same run), or one JSON document.

use hdrhistogram::Histogram;

use crate::fleet::Stats;

/// One measured round.
pub struct Round {
    pub mode: &'static str,
    pub round: u32,
    pub target: &'static str,
    pub stats: Stats,
    pub rss: Option<u64>,
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn quantiles(h: &Histogram<u64>) -> Option<[f64; 4]> {
    (!h.is_empty()).then(|| [50.0, 90.0, 99.0, 99.9].map(|q| ms(h.value_at_quantile(q / 100.0))))
}

fn percentiles(s: &Stats) -> Option<[f64; 4]> {
    quantiles(&s.latency)
}

/// `target`'s half-load rounds pooled: requests done per second (median over the rounds), and
/// the latency and send-lag histograms of all their requests together.
fn pooled(half: &[Round], target: &str) -> Option<(f64, Histogram<u64>, Histogram<u64>)> {
    let mine: Vec<&Round> = half.iter().filter(|r| r.target == target).collect();
    let first = mine.first()?;
    let (mut h, mut lag) = (first.stats.latency.clone(), first.stats.lag.clone());
    for r in &mine[1..] {
        // Unwrap safety: every round's histograms have the same auto-resizing configuration.
        h.add(&r.stats.latency).expect("same precision");
        lag.add(&r.stats.lag).expect("same precision");
    }
    Some((median_rate(half, "half-load", target), h, lag))
}

fn codes(s: &Stats) -> String {
    let codes = s
        .codes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    match lag_p99(&s.lag) {
        Some(lag) => format!("{codes}  send lag p99 {lag:.2} ms"),
        None => codes,
    }
}

/// p99 of an open-loop round's send lag (none for closed-loop rounds).
fn lag_p99(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| ms(h.value_at_quantile(0.99)))
}

/// Prints one round as a table row.
pub fn print_round(r: &Round) {
    let lat = percentiles(&r.stats)
        .map(|p| format!("{:>7.2} {:>7.2} {:>7.2} {:>7.2}", p[0], p[1], p[2], p[3]))
        .unwrap_or_else(|| format!("{:>31}", "(throughput only)"));
    println!(
        "{:<9} #{} {:<8} {:>10.0}/s  p50/p90/p99/p99.9 ms {lat}  rss {:>6.1} MB  {}",
        r.mode,
        r.round,
        r.target,
        r.stats.rate(),
        r.rss.unwrap_or(0) as f64 / 1e6,
        codes(&r.stats)
    );
}

/// Median requests/s of `target`'s rounds in `mode`.
pub fn median_rate(rounds: &[Round], mode: &str, target: &str) -> f64 {
    let mut v: Vec<f64> = rounds
        .iter()
        .filter(|r| r.mode == mode && r.target == target)
        .map(|r| r.stats.rate())
        .collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The run's conclusions.
pub struct Summary<'a> {
    desc: String,
    rounds: &'a [Round],
    /// The offered rate of the half-load rounds (requests/s).
    half_rate: f64,
    /// The half-load rounds, both targets.
    half: &'a [Round],
}

impl<'a> Summary<'a> {
    pub fn new(desc: &str, rounds: &'a [Round], half_rate: f64, half: &'a [Round]) -> Self {
        Summary {
            desc: desc.to_string(),
            rounds,
            half_rate,
            half,
        }
    }

    fn modes(&self) -> Vec<&'static str> {
        let mut m: Vec<&'static str> = self.rounds.iter().map(|r| r.mode).collect();
        m.dedup();
        m
    }

    fn errors(&self) -> u64 {
        self.rounds
            .iter()
            .chain(self.half)
            .map(|r| r.stats.errors())
            .sum()
    }

    pub fn print(&self) {
        println!("\n{}", self.desc);
        println!(
            "{:<8} {:>14} {:>14} {:>8}",
            "mode", "baseline /s", "hexveil /s", "ratio"
        );
        for mode in self.modes() {
            let b = median_rate(self.rounds, mode, "baseline");
            let h = median_rate(self.rounds, mode, "hexveil");
            println!("{mode:<8} {b:>14.0} {h:>14.0} {:>8.2}", h / b.max(1e-9));
        }
        if !self.half.is_empty() {
            println!(
                "half load: {:.0}/s offered to each, latency from the scheduled send, rounds pooled",
                self.half_rate
            );
            for target in ["baseline", "hexveil"] {
                if let Some((done, h, lag)) = pooled(self.half, target)
                    && let Some(p) = quantiles(&h)
                {
                    println!(
                        "  {target:<8} {done:>8.0}/s done  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  (send lag p99 {:.2} ms)",
                        p[0],
                        p[2],
                        p[3],
                        lag_p99(&lag).unwrap_or(0.0)
                    );
                }
            }
        }
        println!("errors: {}", self.errors());
    }

    pub fn json(&self) -> serde_json::Value {
        let rounds: Vec<serde_json::Value> = self
            .rounds
            .iter()
            .chain(self.half)
            .map(|r| {
                let p = percentiles(&r.stats);
                serde_json::json!({
                    "mode": r.mode,
                    "round": r.round,
                    "target": r.target,
                    "requests": r.stats.requests,
                    "per_second": r.stats.rate(),
                    "p50_ms": p.map(|p| p[0]),
                    "p90_ms": p.map(|p| p[1]),
                    "p99_ms": p.map(|p| p[2]),
                    "p999_ms": p.map(|p| p[3]),
                    "send_lag_p99_ms": lag_p99(&r.stats.lag),
                    "codes": r.stats.codes,
                    "offers": r.stats.offers,
                    "rss_bytes": r.rss,
                })
            })
            .collect();
        let ratios: serde_json::Map<String, serde_json::Value> = self
            .modes()
            .into_iter()
            .map(|m| {
                let b = median_rate(self.rounds, m, "baseline");
                let h = median_rate(self.rounds, m, "hexveil");
                (
                    m.to_string(),
                    serde_json::json!({"baseline": b, "hexveil": h, "ratio": h / b.max(1e-9)}),
                )
            })
            .collect();
        serde_json::json!({
            "run": self.desc,
            "rounds": rounds,
            "summary": ratios,
            "half_load": (!self.half.is_empty()).then(|| {
                let mut out = serde_json::Map::new();
                out.insert("offered_per_second".into(), self.half_rate.into());
                for target in ["baseline", "hexveil"] {
                    if let Some((done, h, lag)) = pooled(self.half, target) {
                        let p = quantiles(&h);
                        out.insert(target.into(), serde_json::json!({
                            "per_second": done,
                            "p50_ms": p.map(|p| p[0]),
                            "p99_ms": p.map(|p| p[2]),
                            "p999_ms": p.map(|p| p[3]),
                            "send_lag_p99_ms": lag_p99(&lag),
                        }));
                    }
                }
                out
            }),
            "errors": self.errors(),
        })
    }
}
