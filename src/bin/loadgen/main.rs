//! `loadgen`: drives a real `hexveil serve` over gRPC with a fleet of phones and, in the same
//! run, alternates rounds against an empty-handler server of the same PresenceService in its
//! own process, so every figure comes with the transport's own ceiling beside it.
//!
//! ```text
//! cargo build --release && target/release/loadgen --devices 5000 --mode both --rounds 3
//! ```
//!
//! It starts both servers itself (hexveil on a temporary data dir, with the rate limit raised
//! for the run and otherwise default caps), registers a merchant with one offer in the middle
//! of the fleet, grants consent to every phone, then measures. See `--help`.

mod baseline;
mod fleet;
mod report;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hexveil::api::pb;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for hexveil, with a built-in baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the empty-handler PresenceService (what `run` starts as its baseline).
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Unary,
    Stream,
    Both,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Phones in the fleet (each gets consent before the rounds).
    #[arg(long, default_value_t = 5000)]
    devices: u32,
    /// Unary requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// StreamPresence calls in stream mode.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Rounds; each runs the baseline, then hexveil.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// After the unary rounds, also measure latency at half of hexveil's measured maximum
    /// (open loop, fixed rate), on both servers at the same rate, `rounds` rounds each.
    #[arg(long)]
    half_load: bool,
    /// The hexveil binary (default: `hexveil` next to this one).
    #[arg(long)]
    hexveil: Option<PathBuf>,
    /// Extra TOML appended to the run's config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// hexveil's store URL (default: a fresh SQLite file in the run's directory), e.g.
    /// `postgres://postgres@127.0.0.1:5432/hexveil_load` — an empty database or schema: the
    /// run registers a merchant and grants consent to its fleet there.
    #[arg(long)]
    store: Option<String>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Seed for the fleet's homes and movements.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Cmd::Baseline { listen }) => rt.block_on(baseline::serve(&listen)),
        None => rt.block_on(run(cli.run)),
    }
}

/// A child server that is killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Spawns `cmd` and waits for its "... listening" line; `key` precedes the address.
    fn spawn(mut cmd: Command, key: &str) -> anyhow::Result<Server> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening") => break l,
                Some(Ok(_)) => continue,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("{cmd:?} exited before listening");
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .context("no address in the listening line")?
            .parse()?;
        Ok(Server { child, addr })
    }

    /// Resident memory of the process, from /proc.
    fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

async fn channels(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        out.push(ch);
    }
    Ok(out)
}

fn hexveil_bin(args: &RunArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.hexveil {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    Ok(me.with_file_name("hexveil"))
}

/// Starts hexveil on a fresh data dir with the run's config.
fn start_hexveil(args: &RunArgs, dir: &Path) -> anyhow::Result<(Server, String)> {
    let mut toml = String::from(
        "# loadgen: default caps, rate limit raised so the fleet is never refused for speed\n\
         [rate_limits]\ndevice_reports_per_hour = 3600000\ndevice_burst = 10000\n",
    );
    if let Some(extra) = &args.config {
        toml.push_str(
            &std::fs::read_to_string(extra).with_context(|| extra.display().to_string())?,
        );
    }
    // Not in the data dir: the server watches its config file's directory, and every commit
    // changes the write-ahead log there (an inotify event per commit to wake for and drop).
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir)?;
    let config = config_dir.join("loadgen.toml");
    std::fs::write(&config, toml)?;
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/hexveil.db", dir.display()));
    let mut cmd = Command::new(hexveil_bin(args)?);
    cmd.args([
        "serve",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .arg("--config")
    .arg(&config)
    .args(["--store", &store, "--data-dir"])
    .arg(dir)
    .env("RUST_LOG", "warn")
    .stderr(std::fs::File::create(dir.join("hexveil.log"))?);
    Ok((Server::spawn(cmd, "grpc=")?, store))
}

/// Registers a merchant with the CLI, gives it one offer at `center`, and grants consent to
/// every phone.
async fn set_up(
    args: &RunArgs,
    hexveil: &Server,
    store: &str,
    center: h3o::CellIndex,
    phones: &[fleet::Phone],
) -> anyhow::Result<()> {
    let out = Command::new(hexveil_bin(args)?)
        .args([
            "merchant",
            "add",
            "--store",
            store,
            "--name",
            "Loadgen Café",
        ])
        .args(["--cell", &format!("{center:x}"), "--json"])
        .output()?;
    if !out.status.success() {
        bail!("merchant add: {}", String::from_utf8_lossy(&out.stderr));
    }
    let added: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let key = added["api_key"].as_str().context("no api_key")?.to_string();
    let ch = channels(hexveil.addr, 1).await?.remove(0);
    let mut merchant = pb::merchant_service_client::MerchantServiceClient::with_interceptor(
        ch.clone(),
        move |mut req: tonic::Request<()>| {
            let v = format!("Bearer {key}")
                .parse()
                .map_err(|_| tonic::Status::internal("key"))?;
            req.metadata_mut().insert("authorization", v);
            Ok(req)
        },
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    merchant
        .upsert_offer(pb::UpsertOfferRequest {
            offer: Some(pb::Offer {
                title: "Pastel de nata".into(),
                body: "Two for one, today".into(),
                cell: center.into(),
                radius_k: 2,
                valid_from: Some(prost_types::Timestamp {
                    seconds: now - 3600,
                    nanos: 0,
                }),
                valid_until: Some(prost_types::Timestamp {
                    seconds: now + 7 * 86_400,
                    nanos: 0,
                }),
                max_notifications_per_day: 1_000_000,
                ..Default::default()
            }),
        })
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in phones.chunks(phones.len().div_ceil(16).max(1)) {
        let tokens: Vec<String> = chunk.iter().map(|p| p.token.clone()).collect();
        let mut consent = pb::consent_service_client::ConsentServiceClient::new(ch.clone());
        tasks.spawn(async move {
            for token in tokens {
                consent
                    .set_consent(pb::SetConsentRequest {
                        device_token: token,
                        purposes: vec![
                            pb::Purpose::NearbyOffers as i32,
                            pb::Purpose::FootTraffic as i32,
                        ],
                        policy_version: "loadgen".into(),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.concurrency == 0 || args.channels == 0 || args.streams == 0 {
        bail!("--devices, --concurrency, --channels and --streams must be at least 1");
    }
    if args.duration.is_nan() || args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    let duration = Duration::from_secs_f64(args.duration);
    let dir = std::env::temp_dir().join(format!("hexveil-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Cleanup(dir.clone());

    let (hexveil, store) = start_hexveil(&args, &dir)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["baseline", "--listen", "127.0.0.1:0"]);
    let base = Server::spawn(cmd, "addr=")?;

    let center = h3o::LatLng::new(38.7139, -9.1394)?.to_cell(h3o::Resolution::Eight);
    let phones = fleet::phones(args.devices, center, 3, args.seed);
    set_up(&args, &hexveil, &store, center, &phones).await?;

    let base_ch = channels(base.addr, args.channels).await?;
    let hex_ch = channels(hexveil.addr, args.channels).await?;
    let modes: &[Mode] = match args.mode {
        Mode::Both => &[Mode::Unary, Mode::Stream],
        m => match m {
            Mode::Unary => &[Mode::Unary],
            _ => &[Mode::Stream],
        },
    };
    // One fleet per server, carried from round to round: each server sees one fleet whose
    // phones go on from where they were.
    let mut fleets = [phones.clone(), phones];
    let mut rounds = Vec::new();
    for &mode in modes {
        for round in 1..=args.rounds {
            for (target, ch, fleet) in targets(&base_ch, &hex_ch, &mut fleets) {
                let stats = match mode {
                    Mode::Unary => fleet::unary(ch, fleet, args.concurrency, duration).await,
                    _ => fleet::stream(ch, fleet, args.streams, duration).await,
                };
                let rss = if target == "hexveil" {
                    hexveil.rss_bytes()
                } else {
                    base.rss_bytes()
                };
                let mode = if mode == Mode::Unary {
                    "unary"
                } else {
                    "stream"
                };
                record(&mut rounds, args.json, mode, round, target, stats, rss);
            }
        }
    }
    let mut half = Vec::new();
    let mut half_rate = 0.0;
    if args.half_load && modes.contains(&Mode::Unary) {
        // The same offered rate on both servers: the baseline's latency at that rate is the
        // share of the client, the transport and the machine; the rest is hexveil's.
        half_rate = report::median_rate(&rounds, "unary", "hexveil") / 2.0;
        for round in 1..=args.rounds {
            for (target, ch, fleet) in targets(&base_ch, &hex_ch, &mut fleets) {
                let stats = fleet::paced(ch, fleet, half_rate, duration).await;
                let rss = if target == "hexveil" {
                    hexveil.rss_bytes()
                } else {
                    base.rss_bytes()
                };
                record(&mut half, args.json, "half-load", round, target, stats, rss);
            }
        }
    }
    let summary = report::Summary::new(&args_desc(&args), &rounds, half_rate, &half);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.json())?);
    } else {
        summary.print();
    }
    Ok(())
}

/// The two servers of a run, in the order each round visits them, with their fleets.
fn targets<'a>(
    base: &'a [Channel],
    hex: &'a [Channel],
    fleets: &'a mut [Vec<fleet::Phone>; 2],
) -> [(&'static str, &'a [Channel], &'a mut Vec<fleet::Phone>); 2] {
    let [b, h] = fleets;
    [("baseline", base, b), ("hexveil", hex, h)]
}

fn args_desc(a: &RunArgs) -> String {
    format!(
        "{} phones, {} in flight over {} connections (unary), {} streams, {} s rounds × {}, \
         store {}",
        a.devices,
        a.concurrency,
        a.channels,
        a.streams,
        a.duration,
        a.rounds,
        match a.store.as_deref().and_then(|s| s.split_once(':')) {
            Some((scheme, _)) => scheme,
            None => "sqlite (embedded)",
        }
    )
}

/// Removes the run's data dir at the end.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Keeps a finished round, printing it unless the output is JSON.
fn record(
    into: &mut Vec<report::Round>,
    json: bool,
    mode: &'static str,
    round: u32,
    target: &'static str,
    stats: fleet::Stats,
    rss: Option<u64>,
) {
    let r = report::Round {
        mode,
        round,
        target,
        stats,
        rss,
    };
    if !json {
        report::print_round(&r);
    }
    into.push(r);
}
