//! The command line: `serve`, `config check`, `merchant add|list|revoke` and `simulate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::clock::SystemClock;
use crate::reload::ConfigSource;
use crate::server::{self, App};
use crate::settings::Settings;

/// hexveil: privacy-preserving nearby offers and foot-traffic statistics over H3 cells.
#[derive(Debug, Parser)]
#[command(name = "hexveil", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC and HTTP servers (embedded defaults when no config is given).
    Serve(ServeArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Register, list and revoke merchants (works while the server runs).
    Merchant {
        #[command(subcommand)]
        command: MerchantCommand,
    },
    /// Replay synthetic traffic through the real pipeline under a config (and optionally a
    /// second one) and report notifications per device, what withheld offers, and DP error.
    Simulate(crate::simulate::cli::SimulateArgs),
}

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Store URL: sqlite://path/to/file.db or postgres://user@host:5432/db.
    #[arg(
        long,
        value_name = "URL",
        default_value = "sqlite://hexveil-data/hexveil.db"
    )]
    pub store: String,
    /// Config file (for location.max_resolution); defaults apply without one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MerchantCommand {
    /// Register a merchant at one or more H3 cells; prints its id and API key (shown once).
    Add {
        #[command(flatten)]
        store: StoreArgs,
        /// Display name.
        #[arg(long)]
        name: String,
        /// A location cell (H3 index in hex, or decimal); repeat for several.
        #[arg(long = "cell", required = true, value_parser = parse_cell)]
        cells: Vec<u64>,
        /// Print `{"merchant_id": ..., "api_key": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// List merchants (never their keys).
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a merchant's API key; it stops working at once.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// The merchant id printed by `merchant add`.
        merchant_id: String,
    },
}

fn parse_cell(s: &str) -> Result<u64, String> {
    let raw = if s.chars().all(|c| c.is_ascii_digit()) && s.len() > 15 {
        s.parse::<u64>().map_err(|e| e.to_string())?
    } else {
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .map_err(|_| format!("{s:?} is not an H3 index"))?
    };
    h3o::CellIndex::try_from(raw)
        .map(u64::from)
        .map_err(|e| format!("{s:?} is not a valid H3 cell: {e}"))
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file; edits to it are applied live (also on SIGHUP).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL (overrides store.url), e.g. sqlite://hexveil-data/hexveil.db or
    /// postgres://user@host:5432/db.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// gRPC listen address (overrides server.grpc_listen).
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// HTTP listen address (overrides server.http_listen).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Operator-only metrics listen address (overrides server.metrics_listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Data directory (overrides store.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seed a synthetic city (merchants, offers, a day of simulated devices, released through
    /// the real DP path) and print the demo merchants' keys and the dashboard URL. Uses a
    /// fresh temporary data directory unless --store or --data-dir is given.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and print the effective config and its consequences.
    Check {
        /// The TOML file to check.
        file: PathBuf,
        /// Print JSON instead of TOML and text.
        #[arg(long)]
        json: bool,
    },
}

impl ServeArgs {
    fn source(&self) -> ConfigSource {
        let mut flags = Vec::new();
        let mut flag = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                flags.push((key.to_string(), toml::Value::String(v)));
            }
        };
        flag("store.url", self.store.clone());
        flag("server.grpc_listen", self.grpc_listen.clone());
        flag("server.http_listen", self.http_listen.clone());
        flag("server.metrics_listen", self.metrics_listen.clone());
        flag(
            "store.data_dir",
            self.data_dir.as_ref().map(|d| d.display().to_string()),
        );
        ConfigSource {
            path: self.config.clone(),
            flags,
        }
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Config {
            command: ConfigCommand::Check { file, json },
        } => config_check(&file, json),
        Command::Simulate(args) => crate::simulate::cli::run(args),
        Command::Merchant { command } => match merchant(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn merchant(command: MerchantCommand) -> anyhow::Result<()> {
    use crate::clock::Clock;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let open = |args: &StoreArgs| -> anyhow::Result<(crate::store::Store, u8)> {
        let config = ConfigSource {
            path: args.config.clone(),
            flags: Vec::new(),
        }
        .load()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?
        .config;
        let store = runtime
            .block_on(crate::store::Store::open(&args.store))
            .map_err(|e| anyhow::anyhow!("store: {e}"))?;
        Ok((store, config.location.max_resolution))
    };
    let now = SystemClock.now();
    match command {
        MerchantCommand::Add {
            store,
            name,
            cells,
            json,
        } => {
            let (store, max_res) = open(&store)?;
            let (m, key) = runtime
                .block_on(crate::merchants::add(&store, &name, cells, max_res, now))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"merchant_id": m.merchant_id.to_string(), "api_key": key})
                );
            } else {
                println!("merchant_id: {}", m.merchant_id);
                println!("api_key:     {key}");
                println!("The API key is shown only this once; hexveil stores only its hash.");
            }
        }
        MerchantCommand::List { store, json } => {
            let (store, _) = open(&store)?;
            let merchants = runtime
                .block_on(store.merchants())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for m in merchants {
                let cells: Vec<String> = m.cells.iter().map(|c| format!("{c:x}")).collect();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "merchant_id": m.merchant_id.to_string(),
                            "name": m.name,
                            "cells": cells,
                            "created_at_ms": m.created_at.millis(),
                            "revoked_at_ms": m.revoked_at.map(|t| t.millis()),
                        })
                    );
                } else {
                    let state = if m.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{}  {state:7}  {}  cells={}",
                        m.merchant_id,
                        m.name,
                        cells.join(",")
                    );
                }
            }
        }
        MerchantCommand::Revoke { store, merchant_id } => {
            let id = uuid::Uuid::try_parse(&merchant_id).map_err(|_| {
                anyhow::anyhow!("merchant_id: {merchant_id:?} is not a merchant id")
            })?;
            let (store, _) = open(&store)?;
            runtime
                .block_on(crate::merchants::revoke(&store, id, now))
                .map_err(|e| anyhow::anyhow!("merchant_id {id}: {e}"))?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init_logging();
    if args.demo && args.store.is_none() && args.data_dir.is_none() {
        let dir = crate::demo::fresh_data_dir();
        args.store = Some(format!("sqlite://{}/hexveil.db", dir.display()));
        println!(
            "demo data directory: {} (delete it when done)",
            dir.display()
        );
        args.data_dir = Some(dir);
    }
    let source = args.source();
    let settings = source
        .load()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async move {
        let grpc_addr = settings.config.server.grpc_listen;
        let http_addr = settings.config.server.http_listen;
        let grpc = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("server.grpc_listen: cannot listen on {grpc_addr}"))?;
        let http = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("server.http_listen: cannot listen on {http_addr}"))?;
        let metrics_addr = settings.config.server.metrics_listen;
        let metrics = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("server.metrics_listen: cannot listen on {metrics_addr}"))?;
        let metrics_bound = metrics.local_addr()?;
        let bound = server::Bound {
            grpc: grpc.local_addr()?,
            http: http.local_addr()?,
        };
        let app = if args.demo {
            let clock = Arc::new(crate::demo::DemoClock::default());
            let app = App::open(settings, crate::demo::shared(&clock)).await?;
            let city = crate::demo::seed(&app, &clock)
                .await
                .context("cannot seed the demo city")?;
            print_demo(&city, bound.http);
            app
        } else {
            App::open(settings, Arc::new(SystemClock)).await?
        };
        tracing::info!(grpc = %bound.grpc, http = %bound.http, metrics = %metrics_bound, "hexveil listening");
        // A stable line on stdout that scripts and tests can wait for.
        println!(
            "hexveil listening grpc={} http={} metrics={}",
            bound.grpc, bound.http, metrics_bound
        );
        server::run_with_metrics(
            app,
            source,
            grpc,
            http,
            Some(metrics),
            server::shutdown_signal(),
        )
        .await
    });
    // Dropping a runtime waits for every blocking task; a stop must not (see server::run).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

fn print_demo(city: &crate::demo::DemoCity, http: std::net::SocketAddr) {
    println!(
        "demo city seeded in {:.1} s: {} devices, {} reports, {} offers shown, {} buckets released",
        city.took.as_secs_f64(),
        city.devices,
        city.reports,
        city.offers_shown,
        city.buckets_released
    );
    for (name, key) in &city.merchants {
        println!("demo merchant: {key}  ({name})");
    }
    println!("dashboard: http://{http}/  (sign in with one of the keys above)");
}

fn config_check(file: &std::path::Path, json: bool) -> ExitCode {
    let source = ConfigSource {
        path: Some(file.to_path_buf()),
        flags: Vec::new(),
    };
    match source.load() {
        Ok(settings) => {
            print_check(&settings, json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "key": e.key(), "error": e.to_string()})
                );
            }
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_check(s: &Settings, json: bool) {
    let caps = &s.consequences.caps;
    let dp = &s.consequences.privacy;
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "config": s.config, "consequences": s.consequences})
        );
        return;
    }
    println!("# effective configuration\n{}", s.config.to_toml());
    println!("# consequences");
    println!(
        "notifications per device: at most {} per day, {} per week (rolling windows)",
        caps.max_notifications_per_device_per_day, caps.max_notifications_per_device_per_week
    );
    println!(
        "earliest next notification after one: {}",
        crate::config::Dur::secs(caps.earliest_next_notification_secs)
    );
    println!(
        "privacy: {} noise, epsilon = {:.3} per device per day (in any 24 hours, every release together; delta = {:e}), promised at most {}",
        dp.mechanism,
        dp.epsilon_per_device_per_day,
        dp.delta,
        s.config.privacy.max_epsilon_per_device_per_day
    );
    let parts: Vec<String> = dp
        .budget
        .iter()
        .map(|p| match s.config.privacy.mechanism {
            crate::config::MechanismKind::Gaussian => format!("{} rho {:.4}", p.release, p.rho),
            crate::config::MechanismKind::Laplace => {
                format!("{} epsilon {:.4}", p.release, p.epsilon)
            }
        })
        .collect();
    println!("budget per device in any 24 hours: {}", parts.join(" + "));
    println!(
        "offer statistics: scale {:.3}, std-dev {:.2}; 95% interval of one released count: ±{:.0}",
        dp.offer_stats.noise_scale, dp.offer_stats.noise_std_dev, dp.offer_stats.ci95_half_width
    );
    println!(
        "hourly noise: scale {:.3}, std-dev {:.2}; 95% interval of one count: ±{:.0} (a sum of a cell's 24 hours would be ±{:.0})",
        dp.noise_scale, dp.noise_std_dev, dp.ci95_half_width, dp.day_total_ci95_half_width
    );
    println!(
        "daily noise: scale {:.3}, std-dev {:.2}; 95% interval of one daily count: ±{:.0}; each device in at most {} cells per UTC day, counted twice in any 24 hours",
        dp.daily.noise_scale,
        dp.daily.noise_std_dev,
        dp.daily.ci95_half_width,
        dp.daily.max_cells_per_day
    );
    println!("{}", crate::policy::budget_explanation(s));
    println!(
        "contributions bounded to {} cells per bucket and {} in any 24 hours; counts below {} suppressed (cosmetic: the noise protects)",
        s.config.privacy.max_cells_per_bucket, dp.contributions_per_day, dp.threshold
    );
    println!("config OK");
}
