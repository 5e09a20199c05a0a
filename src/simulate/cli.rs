//! `hexveil simulate`'s flags and output: every input (configs, city, output file) is checked
//! before anything runs, and each refusal names the flag, file or JSON field at fault.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::reload::ConfigSource;
use crate::settings::Settings;

use super::{City, Comparison, MAX_DAYS, MAX_DEVICES, Simulation};

/// Flags of `hexveil simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The config to simulate (TOML; embedded defaults without one). Refused exactly as
    /// `hexveil config check` refuses it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A second config: the same traffic runs under it, reported side by side with the
    /// differences.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_DEVICES as u64))]
    pub devices: u64,
    /// Simulated days (from Monday 2026-01-05 00:00 UTC).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS)))]
    pub days: u32,
    /// Seed of the traffic (who reports where and when): the same seed gives the same
    /// traffic and decisions; the DP noise is drawn fresh on every run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `demo` (the city of `serve --demo`) or a JSON file of merchants, offers and the
    /// population's shape (format in the README).
    #[arg(long, value_name = "demo|FILE.json", default_value = "demo")]
    pub city: String,
    /// Print JSON instead of the text table.
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML page with charts to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

/// Loads a config as `config check` does, or says why not exactly as it would.
fn load(flag: &str, path: Option<&Path>) -> Result<(Settings, String), String> {
    let source = ConfigSource {
        path: path.map(Path::to_path_buf),
        flags: Vec::new(),
    };
    let label = path.map_or("defaults".to_string(), |p| {
        p.file_name().map_or(p.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        })
    });
    source.load().map(|s| (s, label)).map_err(|e| {
        let shown = path.map_or(String::new(), |p| format!(" {}", p.display()));
        format!("{e}\n  ({flag}{shown} is refused, as `hexveil config check` refuses it)")
    })
}

/// Runs `hexveil simulate`; exit 0, or 2 with `error: ...` on stderr.
pub fn run(args: SimulateArgs) -> ExitCode {
    match simulate(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn simulate(args: SimulateArgs) -> Result<(), String> {
    let (base, base_label) = load("--config", args.config.as_deref())?;
    let compare = match &args.compare {
        Some(p) => Some(load("--compare", Some(p))?),
        None => None,
    };
    let city = City::load(&args.city).map_err(|e| e.to_string())?;
    if let Some(html) = &args.html {
        let parent = html.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) || html.is_dir() {
            return Err(format!(
                "--html {}: cannot write there (no such directory, or it is a directory)",
                html.display()
            ));
        }
    }
    let city_label = if args.city == "demo" {
        "demo".to_string()
    } else {
        args.city.clone()
    };
    let sim = |settings: Settings, label: String| Simulation {
        settings,
        label,
        city: city.clone(),
        city_label: city_label.clone(),
        devices: args.devices as usize,
        days: args.days,
        seed: args.seed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let first = runtime
        .block_on(sim(base, base_label).run())
        .map_err(|e| e.to_string())?;
    let (text, json, page) = match compare {
        None => (
            first.text(),
            serde_json::to_string_pretty(&first),
            super::html::page(&[&first]),
        ),
        Some((settings, mut label)) => {
            if label == first.config {
                label = format!("{label} (--compare)");
            }
            let second = runtime
                .block_on(sim(settings, label).run())
                .map_err(|e| e.to_string())?;
            let both = Comparison::new(first, second);
            (
                both.text(),
                serde_json::to_string_pretty(&both),
                super::html::page(&[&both.base, &both.compare]),
            )
        }
    };
    if args.json {
        println!(
            "{}",
            json.map_err(|e| format!("cannot encode the report: {e}"))?
        );
    } else {
        print!("{text}");
    }
    if let Some(html) = &args.html {
        std::fs::write(html, page)
            .map_err(|e| format!("--html {}: cannot write it: {e}", html.display()))?;
        eprintln!("wrote {}", html.display());
    }
    Ok(())
}
