//! The fleet: phones with a home cell that wander between it and its neighbours, and the
//! loops that drive a server with them — unary at a fixed concurrency, streams, or an open
//! loop at a fixed rate (latency measured from each request's scheduled time, so a stall is
//! not hidden by the requests it held back).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use hexveil::api::pb;
use hexveil::api::pb::presence_service_client::PresenceServiceClient;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

/// Reports a device sends before it moves to another cell of its neighbourhood.
pub const MOVE_EVERY: u32 = 50;

/// One simulated phone.
#[derive(Debug, Clone)]
pub struct Phone {
    pub token: String,
    home: h3o::CellIndex,
    cell: h3o::CellIndex,
    sent: u32,
}

impl Phone {
    /// The next report: every [`MOVE_EVERY`] reports the phone steps to a random cell within
    /// one ring of its home (H3 boundaries are where phones jitter in real life).
    fn next(&mut self, rng: &mut SmallRng) -> pb::ReportPresenceRequest {
        self.sent += 1;
        if self.sent.is_multiple_of(MOVE_EVERY) {
            let ring: Vec<h3o::CellIndex> = self.home.grid_disk(1);
            self.cell = ring[rng.random_range(0..ring.len())];
        }
        pb::ReportPresenceRequest {
            device_token: self.token.clone(),
            cell: self.cell.into(),
            observed_at: Some(now()),
            utc_offset_minutes: 0,
        }
    }
}

fn now() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// `n` phones living within `radius` rings of `center`, reproducibly from `seed`.
pub fn phones(n: u32, center: h3o::CellIndex, radius: u32, seed: u64) -> Vec<Phone> {
    let area: Vec<h3o::CellIndex> = center.grid_disk(radius);
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let home = area[rng.random_range(0..area.len())];
            Phone {
                token: format!("loadgen-phone-{i:08}"),
                home,
                cell: home,
                sent: rng.random_range(0..MOVE_EVERY),
            }
        })
        .collect()
}

/// What one round measured.
#[derive(Debug)]
pub struct Stats {
    pub requests: u64,
    pub elapsed: Duration,
    /// Latency in microseconds (unary and open loop; streams measure throughput only).
    pub latency: Histogram<u64>,
    /// Open loop only: how late each request went out after its scheduled time, in
    /// microseconds (the client's own share of `latency`).
    pub lag: Histogram<u64>,
    /// Outcomes by gRPC status code name ("OK", "Unavailable", ...).
    pub codes: BTreeMap<String, u64>,
    pub offers: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            requests: 0,
            elapsed: Duration::ZERO,
            // Unwrap safety: 3 significant figures is within hdrhistogram's 0-5 range.
            latency: Histogram::new(3).expect("valid precision"),
            lag: Histogram::new(3).expect("valid precision"),
            codes: BTreeMap::new(),
            offers: 0,
        }
    }

    fn merge(&mut self, other: Stats) {
        self.requests += other.requests;
        // Unwrap safety: both histograms have the same auto-resizing configuration.
        self.latency.add(other.latency).expect("same precision");
        self.lag.add(other.lag).expect("same precision");
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        self.offers += other.offers;
    }

    fn record(&mut self, started: Instant, outcome: Result<&pb::ReportPresenceReply, tonic::Code>) {
        self.requests += 1;
        let _ = self.latency.record(micros(started.elapsed()));
        let code = match outcome {
            Ok(reply) => match &reply.error {
                Some(e) => tonic::Code::from(e.code),
                None => {
                    self.offers += reply.offers.len() as u64;
                    tonic::Code::Ok
                }
            },
            Err(code) => code,
        };
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Requests that did not end OK.
    pub fn errors(&self) -> u64 {
        self.codes
            .iter()
            .filter(|(k, _)| k.as_str() != "Ok")
            .map(|(_, v)| v)
            .sum()
    }
}

/// Splits the fleet into `parts` disjoint shares, so no phone is driven by two tasks at once
/// (a phone sends one report at a time, as a real one does); phone `i` goes to share
/// `i % parts`. The phones are moved out: [`unshare`] puts them back after the round.
fn shares(phones: &mut Vec<Phone>, parts: usize) -> Vec<Vec<Phone>> {
    let mut out = vec![Vec::new(); parts];
    for (i, p) in std::mem::take(phones).into_iter().enumerate() {
        out[i % parts].push(p);
    }
    out
}

/// Puts the shares `(index, phones)` of a round back into `phones`, in the order [`shares`]
/// took them, so the fleet goes on from where the round left it: a phone that moved stays
/// where it went (a fresh copy each round would teleport every moved phone back home, and
/// each of those jumps is a cell change the server must write durably).
fn unshare(phones: &mut Vec<Phone>, mut parts: Vec<(usize, Vec<Phone>)>) {
    parts.sort_by_key(|(i, _)| *i);
    let n = parts.len();
    let total: usize = parts.iter().map(|(_, p)| p.len()).sum();
    let mut iters: Vec<_> = parts.into_iter().map(|(_, p)| p.into_iter()).collect();
    phones.clear();
    for i in 0..total {
        // Unwrap safety: share `i % n` holds exactly the phones whose index is `i` mod `n`.
        phones.push(iters[i % n].next().expect("share sizes follow shares()"));
    }
}

/// `concurrency` tasks over `channels` connections, each sending one unary report at a time,
/// for `duration`.
pub async fn unary(
    channels: &[Channel],
    phones: &mut Vec<Phone>,
    concurrency: usize,
    duration: Duration,
) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut share) in shares(phones, concurrency).into_iter().enumerate() {
        let mut client = PresenceServiceClient::new(channels[i % channels.len()].clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut stats = Stats::new();
            let mut rng = SmallRng::seed_from_u64(i as u64);
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) && !share.is_empty() {
                let n = share.len();
                let req = share[k % n].next(&mut rng);
                k += 1;
                let started = Instant::now();
                match client.report_presence(req).await {
                    Ok(r) => stats.record(started, Ok(r.get_ref())),
                    Err(s) => stats.record(started, Err(s.code())),
                }
            }
            (i, share, stats)
        });
    }
    collect(tasks, stop, duration, phones).await
}

/// `streams` StreamPresence calls over `channels` connections, each kept full, for
/// `duration`; counts replies.
pub async fn stream(
    channels: &[Channel],
    phones: &mut Vec<Phone>,
    streams: usize,
    duration: Duration,
) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, share) in shares(phones, streams).into_iter().enumerate() {
        let mut client = PresenceServiceClient::new(channels[i % channels.len()].clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut stats = Stats::new();
            if share.is_empty() {
                return (i, share, stats);
            }
            let stop_send = stop.clone();
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ReportPresenceRequest>(1024);
            // The sender is aborted at the end; the share stays reachable from here. The lock
            // is never held across an await.
            let fleet = Arc::new(std::sync::Mutex::new(share));
            let sending = fleet.clone();
            let sender = tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(1_000 + i as u64);
                let mut k = 0;
                while !stop_send.load(Ordering::Relaxed) {
                    let req = {
                        let mut share = sending.lock().unwrap_or_else(|p| p.into_inner());
                        let n = share.len();
                        share[k % n].next(&mut rng)
                    };
                    k += 1;
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
            });
            let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
            let started = Instant::now();
            match client.stream_presence(outbound).await {
                Ok(response) => {
                    let mut inbound = response.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(reply)) => stats.record(started, Ok(&reply)),
                            Ok(None) => break,
                            Err(s) => {
                                stats.record(started, Err(s.code()));
                                break;
                            }
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                Err(s) => stats.record(started, Err(s.code())),
            }
            sender.abort();
            let _ = sender.await;
            // Stream latency is not per message; keep only counts.
            stats.latency.reset();
            let share = std::mem::take(&mut *fleet.lock().unwrap_or_else(|p| p.into_inner()));
            (i, share, stats)
        });
    }
    collect(tasks, stop, duration, phones).await
}

/// Reports at a fixed `rate` per second for `duration` (open loop). Request `k` is due at
/// `start + k / rate` and its latency counts from that time, not from when it went out, so a
/// stall of the server (or of this client) is not hidden by the requests it held back.
///
/// One pipeline task per connection sends that connection's share of the schedule (every
/// `channels.len()`-th request) and keeps its requests in flight in one `FuturesUnordered`:
/// no task per request, and no limit on requests in flight, so a slow server cannot slow the
/// schedule down. Each request's send lag (when it went out − when it was due: the client's
/// own share of the latency, mostly tokio's millisecond timer) is kept apart in `Stats::lag`.
pub async fn paced(
    channels: &[Channel],
    phones: &mut Vec<Phone>,
    rate: f64,
    duration: Duration,
) -> Stats {
    let rate = rate.max(1.0);
    let total = (duration.as_secs_f64() * rate).floor().max(1.0) as u64;
    let lanes = channels.len() as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, mut share) in shares(phones, channels.len()).into_iter().enumerate() {
        let client = PresenceServiceClient::new(channels[lane].clone());
        tasks.spawn(async move {
            let mut stats = Stats::new();
            if share.is_empty() {
                return (lane, share, stats);
            }
            let due = |k: u64| started + Duration::from_secs_f64(k as f64 / rate);
            let mut rng = SmallRng::seed_from_u64(7 + lane as u64);
            let mut in_flight = FuturesUnordered::new();
            let mut next = lane as u64;
            let mut turn = 0usize;
            let timer = tokio::time::sleep_until(due(next).into());
            tokio::pin!(timer);
            loop {
                let now = Instant::now();
                while next < total && due(next) <= now {
                    let at = due(next);
                    // Phones take turns, so at the rates this runs at a phone's previous
                    // report is long answered before its next one.
                    let req = share[turn].next(&mut rng);
                    turn = (turn + 1) % share.len();
                    let _ = stats.lag.record(micros(now.duration_since(at)));
                    let mut client = client.clone();
                    in_flight.push(async move { (at, client.report_presence(req).await) });
                    next += lanes;
                }
                if next >= total && in_flight.is_empty() {
                    break;
                }
                if next < total {
                    timer.as_mut().reset(due(next).into());
                }
                tokio::select! {
                    Some((at, r)) = in_flight.next(), if !in_flight.is_empty() => match r {
                        Ok(r) => stats.record(at, Ok(r.get_ref())),
                        Err(e) => stats.record(at, Err(e.code())),
                    },
                    () = &mut timer, if next < total => {}
                }
            }
            (lane, share, stats)
        });
    }
    let mut total_stats = Stats::new();
    let mut parts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        // Unwrap safety: the round's tasks do not panic; a panic is a bug to see.
        let (i, share, s) = done.expect("a paced lane panicked");
        total_stats.merge(s);
        parts.push((i, share));
    }
    unshare(phones, parts);
    // The schedule's length: requests done per second is the rate the server kept up with.
    total_stats.elapsed = duration;
    total_stats
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

/// Lets the round's tasks run for `duration`, stops them, merges their stats and puts the
/// fleet back together.
async fn collect(
    mut tasks: tokio::task::JoinSet<(usize, Vec<Phone>, Stats)>,
    stop: Arc<AtomicBool>,
    duration: Duration,
    phones: &mut Vec<Phone>,
) -> Stats {
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut total = Stats::new();
    let mut parts = Vec::new();
    while let Some(done) = tasks.join_next().await {
        // Unwrap safety: the round's tasks do not panic; a panic is a bug to see.
        let (i, share, s) = done.expect("a fleet task panicked");
        total.merge(s);
        parts.push((i, share));
    }
    unshare(phones, parts);
    total.elapsed = elapsed;
    total
}
