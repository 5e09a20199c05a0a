//! The command line: `serve` and `config check` (more subcommands arrive with their issues).

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
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file; edits to it are applied live (also on SIGHUP).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Store URL (overrides store.url), e.g. sqlite://hexveil-data/hexveil.db.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// gRPC listen address (overrides server.grpc_listen).
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// HTTP listen address (overrides server.http_listen).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Data directory (overrides store.data_dir).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
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
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::telemetry::init_logging();
    let source = args.source();
    let settings = source
        .load()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let grpc_addr = settings.config.server.grpc_listen;
        let http_addr = settings.config.server.http_listen;
        let grpc = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("server.grpc_listen: cannot listen on {grpc_addr}"))?;
        let http = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("server.http_listen: cannot listen on {http_addr}"))?;
        let app = App::open(settings, Arc::new(SystemClock)).await?;
        let bound = server::Bound {
            grpc: grpc.local_addr()?,
            http: http.local_addr()?,
        };
        tracing::info!(grpc = %bound.grpc, http = %bound.http, "hexveil listening");
        // A stable line on stdout that scripts and tests can wait for.
        println!("hexveil listening grpc={} http={}", bound.grpc, bound.http);
        server::run(app, source, grpc, http, server::shutdown_signal()).await
    })
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
        "privacy: {} noise, epsilon = {:.3} per device per day (delta = {:e}), promised at most {}",
        dp.mechanism,
        dp.epsilon_per_device_per_day,
        dp.delta,
        s.config.privacy.max_epsilon_per_device_per_day
    );
    println!(
        "noise: scale {:.3}, std-dev {:.2}; 95% interval of one count: ±{:.0}; of a cell's day total: ±{:.0}",
        dp.noise_scale, dp.noise_std_dev, dp.ci95_half_width, dp.day_total_ci95_half_width
    );
    println!(
        "contributions bounded to {} cells per bucket and {} per day; counts below {} suppressed",
        s.config.privacy.max_cells_per_bucket, dp.contributions_per_day, dp.threshold
    );
    println!("config OK");
}
