//! Nodes sharing one store: which are live, and this node's share of the one limit that only
//! memory enforces — the per-device rate limit (`rate_limits.device_reports_per_hour` and
//! `device_burst`), which is not checked in the store (that would be a write per report).
//!
//! Every node renews its row in `nodes` every [`HEARTBEAT`]: a join sequence (`seq`, never
//! reused), a beat counter, and `seen` — the highest join sequence it had applied to its
//! share when it wrote. A node enforces `1/N` of each rate (at least 1), N the live nodes at
//! its last beat, so N nodes together allow at most `burst + rate·t`.
//! - **Joining:** a node that finds other live nodes serves no report until every one of
//!   them has *applied* a view counting it (their `seen` ≥ its `seq`, i.e. at least two of
//!   their beats later): by then each has lowered its share.
//! - **Leaving:** a node whose counter has not moved for [`TIMEOUT`] of this node's own
//!   (monotonic) time is deleted — conditionally on that counter, so a late beat wins — and
//!   the survivors' share rises only at their next beat after that.
//! - **Lease:** a node that knows of others serves only while its own last successful beat
//!   is less than [`LEASE`] old (shorter than [`TIMEOUT`]), so it stops before the others may
//!   drop it; a node dropped anyway finds its row gone, rejoins with a new `seq`, and waits.
//!
//! Liveness is measured on each process's monotonic clock, not the injected [`Clock`]
//! (crate::clock): it is about whether a process is running, and a test's manual clock
//! jumping a day must not drop a live node. Nothing here decides a cap or a bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError, WriteOp, WriteResult};

/// How often a node renews its row.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose beat counter did not move for this long is dropped by the others.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A node that knows of others serves only while its own last beat is this recent.
pub const LEASE: Duration = Duration::from_secs(6);

/// This node's view of the nodes sharing its store.
#[derive(Debug)]
pub struct Nodes {
    id: String,
    store: Store,
    view: Mutex<View>,
    /// [`TIMEOUT`] and [`LEASE`] (shorter in tests).
    timeout: Duration,
    lease: Duration,
    /// The locked `node.id` file, if the id is kept there (the lock lives as long as this).
    _id_file: Option<std::fs::File>,
}

/// The file in `store.data_dir` holding a node's id across restarts.
pub const NODE_ID_FILE: &str = "node.id";

#[derive(Debug, Clone, Default)]
struct View {
    /// Live nodes at the last beat, this one included (0: never beaten, counts as 1).
    live: u32,
    /// This node's join sequence, once it has beaten.
    seq: Option<i64>,
    /// The highest join sequence applied to `live` (written as `seen` by the next beat).
    applied: i64,
    /// Whether every other live node has applied a view counting this one.
    admitted: bool,
    /// When this node last beat successfully.
    last_beat: Option<Instant>,
    /// Other nodes: their beat counter and when this node saw it change.
    others: HashMap<String, (i64, Instant)>,
    /// Set by a serving node before its first beat: from then on its share needs a recent
    /// successful beat (the lease) whether or not it has seen other nodes.
    serving: bool,
}

/// Why a node serves no rate-limited report now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoShare {
    /// Joining: the other live nodes have not all lowered their share yet (retry shortly).
    Joining,
    /// Its last successful beat is older than the lease: it cannot know its share (the
    /// others may have dropped it and taken its share), so it serves none — the store is
    /// unreachable from here, as far as this node can tell.
    LeaseLapsed,
}

impl Nodes {
    /// A node that has not beaten yet counts itself alone and admitted: a process that never
    /// beats (a one-off command, `simulate`, a test driving the domain) uses its store alone.
    pub fn new(store: Store) -> Nodes {
        Nodes {
            id: uuid::Uuid::new_v4().to_string(),
            store,
            view: Mutex::new(View {
                admitted: true,
                ..View::default()
            }),
            _id_file: None,
            timeout: TIMEOUT,
            lease: LEASE,
        }
    }

    /// The same node with another drop timeout and lease (the lease must be shorter).
    pub fn with_timing(mut self, timeout: Duration, lease: Duration) -> Nodes {
        assert!(
            lease < timeout,
            "a node's lease must end before others may drop it"
        );
        self.timeout = timeout;
        self.lease = lease;
        self
    }

    /// Like [`Nodes::new`], with the id kept in `<data_dir>/node.id` under an exclusive lock:
    /// a process restarted on the same data dir (after `kill -9` too) is the same node, so
    /// its own stale row never makes it wait; a second process on the same data dir while
    /// the first runs gets an id of its own. Any failure falls back to a fresh id.
    pub fn in_data_dir(store: Store, data_dir: &std::path::Path) -> Nodes {
        let mut nodes = Nodes::new(store);
        match locked_id(&data_dir.join(NODE_ID_FILE)) {
            Ok(Some((id, file))) => {
                nodes.id = id;
                nodes._id_file = Some(file);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "node.id: using a fresh node id"),
        }
        nodes
    }

    /// This node's id in the `nodes` table.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Live nodes at the last beat (this one included).
    pub fn live(&self) -> u32 {
        self.lock().live.max(1)
    }

    /// Whether this node has beaten (joined the `nodes` table) at least once.
    pub fn joined(&self) -> bool {
        self.lock().seq.is_some()
    }

    /// Whether this node may serve rate-limited reports now.
    pub fn admitted(&self) -> bool {
        let v = self.lock();
        v.admitted && self.lease_held(&v)
    }

    fn lease_held(&self, v: &View) -> bool {
        // A process that never serves (a one-off command, a test driving the domain) has no
        // lease to hold; a serving node needs one even alone: a node cut off from the store
        // cannot know that another did not drop it and take the whole limit.
        !v.serving || v.last_beat.is_some_and(|t| t.elapsed() < self.lease)
    }

    /// Marks this node as serving (before its first beat): it serves rate-limited reports
    /// only with a successful beat less than [`LEASE`] old, and, if its first beat fails,
    /// not before a later one succeeds.
    pub fn start_serving(&self) {
        self.lock().serving = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's share of a per-device rate limit (`per_hour`, `burst`), or why it may
    /// serve none now.
    pub fn share(&self, per_hour: u32, burst: u32) -> Result<(u32, u32), NoShare> {
        let v = self.lock();
        if !self.lease_held(&v) {
            return Err(NoShare::LeaseLapsed);
        }
        if !v.admitted {
            return Err(NoShare::Joining);
        }
        let n = v.live.max(1);
        Ok(((per_hour / n).max(1), (burst / n).max(1)))
    }

    /// Renews this node's row, drops nodes whose counter stood still for [`TIMEOUT`], and
    /// takes the new view.
    pub async fn beat(&self) -> Result<(), StoreError> {
        let applied = self.lock().applied;
        self.store
            .write(WriteOp::Heartbeat {
                node_id: self.id.clone(),
                seen: applied,
            })
            .await?;
        let rows = self.store.live_nodes().await?;
        let now = Instant::now();
        let mut stale = Vec::new();
        {
            let mut v = self.lock();
            let Some(mine) = rows.iter().find(|r| r.node_id == self.id).map(|r| r.seq) else {
                // Dropped between the write and the read: serve nothing until the next beat.
                v.admitted = false;
                return Ok(());
            };
            let others: Vec<_> = rows.iter().filter(|r| r.node_id != self.id).collect();
            let all_counted = others.iter().all(|o| o.seen >= mine);
            v.admitted = if v.seq != Some(mine) {
                // A new row (the first beat, or back after being dropped): alone, or once
                // every other live node has applied a view counting it.
                all_counted
            } else {
                v.admitted || all_counted
            };
            let mut seen_now = HashMap::new();
            for o in &others {
                let since = match v.others.get(&o.node_id) {
                    Some((beats, at)) if *beats == o.beats => *at,
                    _ => now,
                };
                if now.duration_since(since) >= self.timeout {
                    stale.push((o.node_id.clone(), o.beats));
                }
                seen_now.insert(o.node_id.clone(), (o.beats, since));
            }
            v.others = seen_now;
            v.live = rows.len().max(1) as u32;
            v.applied = rows.iter().map(|r| r.seq).max().unwrap_or(mine);
            v.seq = Some(mine);
            v.last_beat = Some(now);
        }
        for (node_id, beats) in stale {
            let dropped = self
                .store
                .write(WriteOp::DropNode {
                    node_id: node_id.clone(),
                    beats,
                })
                .await?;
            if dropped == WriteResult::Count(1) {
                tracing::warn!(node = %node_id, "dropped a node that stopped beating");
            }
        }
        Ok(())
    }
}

/// The id in `path`, written first if the file is new or holds none, with the file locked
/// exclusively; `None` if another process (or another node of this one) holds the lock.
fn locked_id(path: &std::path::Path) -> std::io::Result<Option<(String, std::fs::File)>> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let id = match uuid::Uuid::parse_str(text.trim()) {
        Ok(id) => id.to_string(),
        Err(_) => {
            let id = uuid::Uuid::new_v4().to_string();
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(id.as_bytes())?;
            file.sync_all()?;
            id
        }
    };
    Ok(Some((id, file)))
}
