//! The group-commit queue: many callers, one writer, one transaction per batch.
//!
//! Architecture invariants: a caller's reply is sent only after the transaction holding its
//! operation has committed. A batch that fails as a whole (the disk is full, an I/O error, the
//! database file is gone) commits nothing, answers UNAVAILABLE to every caller in it, and marks
//! the store unable to write ([`Health`]); one operation that fails on its own (a constraint)
//! fails only its own caller, and the rest of the batch commits. The writer also probes the
//! store on a timer, so a fault is noticed even when nobody writes, and so is its end.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::health::Health;
use super::{StoreError, WriteOp, WriteResult};

/// Most operations applied in one transaction.
pub const MAX_BATCH: usize = 2048;
/// Operations that may wait in the queue before callers are back-pressured.
pub(crate) const QUEUE_DEPTH: usize = 16_384;
/// How often the writer probes the store while it can write (the file's identity is checked
/// on every tick; a write probe every few ticks).
pub(crate) const PROBE_TICK: Duration = Duration::from_secs(1);
/// Ticks between write probes while the store can write; while it cannot, every tick probes.
const WRITE_PROBE_EVERY_TICKS: u32 = 5;

/// A queued write and where to send its outcome.
pub(crate) struct Pending {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

/// Why a whole batch (or probe) failed; nothing of it committed.
#[derive(Debug, Clone)]
pub(crate) struct BatchFailure {
    /// A bounded label for metrics and health: `disk_full`, `disk_reserve`, `io`, `busy`,
    /// `read_only`, `file_removed`, `cannot_open`, `corrupt`, `other`.
    pub cause: &'static str,
    /// What the database said (logged, never sent to clients).
    pub detail: String,
}

/// One operation's outcome inside a batch that committed.
pub(crate) type OpResult = Result<WriteResult, StoreError>;

/// A backend's transactional batch apply.
pub(crate) trait BatchWriter: Send + 'static {
    /// Applies `ops` in one transaction. `Ok` means the transaction committed, with one result
    /// per op in order (an op that failed on its own was rolled back alone); `Err` means nothing
    /// committed.
    fn apply(
        &mut self,
        ops: &[&WriteOp],
    ) -> impl std::future::Future<Output = Result<Vec<OpResult>, BatchFailure>> + Send;

    /// Cheap checks before writing: the database is still the file that was opened (not
    /// removed or replaced under the server), and its file system keeps the free-space reserve.
    fn check_file(&mut self) -> Result<(), BatchFailure>;

    /// Commits a transaction that needs fresh space, then gives the space back.
    fn probe(&mut self) -> impl std::future::Future<Output = Result<(), BatchFailure>> + Send;
}

/// Runs [`run`] for `writer` on a thread of its own (with its own single-threaded runtime):
/// on the server's runtime, every statement's answer waited in the run queue behind request
/// work, which stretched each commit (and every durable reply) under load.
pub(crate) fn spawn_writer<W: BatchWriter>(
    writer: W,
    rx: mpsc::Receiver<Pending>,
    health: Arc<Health>,
) -> Result<(), StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Config(format!("cannot start the writer's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("hexveil-writer".into())
        .spawn(move || runtime.block_on(run(writer, rx, health)))
        .map_err(|e| StoreError::Config(format!("cannot start the writer thread: {e}")))?;
    Ok(())
}

/// Drains the queue until every sender is dropped, probing the store between batches.
pub(crate) async fn run<W: BatchWriter>(
    mut writer: W,
    mut rx: mpsc::Receiver<Pending>,
    health: Arc<Health>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(PROBE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
                apply_batch(&mut writer, &mut batch, &health).await;
            }
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                health.tick();
                let outcome = match writer.check_file() {
                    Err(f) => Err(f),
                    Ok(()) if !health.is_writable() || ticks.is_multiple_of(WRITE_PROBE_EVERY_TICKS) => {
                        writer.probe().await
                    }
                    Ok(()) => continue,
                };
                match outcome {
                    Ok(()) => health.recovered(),
                    Err(f) => fail(&health, &f, "probe"),
                }
            }
        }
    }
}

async fn apply_batch<W: BatchWriter>(writer: &mut W, batch: &mut Vec<Pending>, health: &Health) {
    let ops: Vec<&WriteOp> = batch.iter().map(|p| &p.op).collect();
    let started = std::time::Instant::now();
    let outcome = match writer.check_file() {
        Ok(()) => writer.apply(&ops).await,
        Err(f) => Err(f),
    };
    metrics::histogram!("hexveil_store_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("hexveil_store_commit_batch_size").record(batch.len() as f64);
    match outcome {
        Ok(results) => {
            for (pending, result) in batch.drain(..).zip(results) {
                if let Err(e) = &result {
                    metrics::counter!("hexveil_store_op_rejections_total").increment(1);
                    tracing::error!(error = %e, "a write was rejected; the rest of its batch committed");
                }
                // A caller that went away (cancelled request) no longer needs the answer.
                let _ = pending.reply.send(result);
            }
        }
        Err(f) => {
            fail(health, &f, "batch");
            let e = StoreError::Unavailable(format!("commit failed: {}", f.cause));
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(e.clone()));
            }
        }
    }
    batch.clear();
}

fn fail(health: &Health, f: &BatchFailure, what: &'static str) {
    metrics::counter!("hexveil_store_commit_failures_total", "cause" => f.cause, "during" => what)
        .increment(1);
    tracing::warn!(cause = f.cause, detail = %f.detail, during = what, "store write failed; nothing of it committed");
    health.failed(f.cause, &f.detail);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::clock::Timestamp;

    /// Records the size of every batch it is handed; fails when told to.
    struct Recorder {
        batches: Arc<Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl BatchWriter for Recorder {
        async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<OpResult>, BatchFailure> {
            self.batches.lock().unwrap().push(ops.len());
            if self.fail {
                return Err(BatchFailure {
                    cause: "disk_full",
                    detail: "database or disk is full".into(),
                });
            }
            Ok(ops.iter().map(|_| Ok(WriteResult::Done)).collect())
        }

        fn check_file(&mut self) -> Result<(), BatchFailure> {
            Ok(())
        }

        async fn probe(&mut self) -> Result<(), BatchFailure> {
            Ok(())
        }
    }

    async fn run_queued(
        n: usize,
        fail: bool,
    ) -> (Vec<usize>, Vec<Result<WriteResult, StoreError>>, bool) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let mut replies = Vec::new();
        for _ in 0..n {
            let (reply, done) = oneshot::channel();
            let op = WriteOp::ExpireIdle {
                cutoff: Timestamp(0),
            };
            tx.send(Pending { op, reply }).await.unwrap();
            replies.push(done);
        }
        drop(tx);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let health = Arc::new(Health::default());
        run(
            Recorder {
                batches: batches.clone(),
                fail,
            },
            rx,
            health.clone(),
        )
        .await;
        let mut out = Vec::new();
        for r in replies {
            out.push(r.await.unwrap());
        }
        let b = batches.lock().unwrap().clone();
        (b, out, health.is_writable())
    }

    #[tokio::test]
    async fn queued_writes_share_one_transaction() {
        let (batches, results, writable) = run_queued(300, false).await;
        assert_eq!(batches, vec![300], "one transaction for everything queued");
        assert!(results.iter().all(|r| matches!(r, Ok(WriteResult::Done))));
        assert!(writable);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_caller_in_it_and_marks_the_store_unwritable() {
        let (batches, results, writable) = run_queued(5, true).await;
        assert_eq!(batches, vec![5]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Unavailable(_))))
        );
        assert!(!writable, "a failed commit makes health NOT_SERVING");
    }

    #[tokio::test]
    async fn batches_are_capped() {
        let (batches, _, _) = run_queued(MAX_BATCH + 10, false).await;
        assert_eq!(batches, vec![MAX_BATCH, 10]);
    }
}
