//! What a run prints: one line per round as it ends, then a summary with hexveil ÷ baseline
//! (medians over the rounds, measured in the same run), or one JSON document.

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

fn percentiles(s: &Stats) -> Option<[f64; 4]> {
    (!s.latency.is_empty())
        .then(|| [50.0, 90.0, 99.0, 99.9].map(|q| ms(s.latency.value_at_quantile(q / 100.0))))
}

fn codes(s: &Stats) -> String {
    s.codes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
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
    half: Option<&'a (f64, Round)>,
}

impl<'a> Summary<'a> {
    pub fn new(desc: &str, rounds: &'a [Round], half: Option<&'a (f64, Round)>) -> Self {
        Summary {
            desc: desc.to_string(),
            rounds,
            half,
        }
    }

    fn modes(&self) -> Vec<&'static str> {
        let mut m: Vec<&'static str> = self.rounds.iter().map(|r| r.mode).collect();
        m.dedup();
        m
    }

    fn errors(&self) -> u64 {
        self.rounds.iter().map(|r| r.stats.errors()).sum::<u64>()
            + self.half.map(|(_, r)| r.stats.errors()).unwrap_or(0)
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
        if let Some((rate, r)) = self.half
            && let Some(p) = percentiles(&r.stats)
        {
            println!(
                "half load: {rate:.0}/s offered, {:.0}/s done, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                r.stats.rate(),
                p[0],
                p[2],
                p[3]
            );
        }
        println!("errors: {}", self.errors());
    }

    pub fn json(&self) -> serde_json::Value {
        let rounds: Vec<serde_json::Value> = self
            .rounds
            .iter()
            .chain(self.half.map(|(_, r)| r))
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
            "half_load": self.half.map(|(rate, r)| serde_json::json!({
                "offered_per_second": rate,
                "per_second": r.stats.rate(),
                "p99_ms": percentiles(&r.stats).map(|p| p[2]),
            })),
            "errors": self.errors(),
        })
    }
}
