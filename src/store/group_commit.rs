//! The group-commit queue: many callers, one writer, one transaction per batch.
//!
//! Architecture invariant: a caller's reply is sent only after the transaction holding its
//! operation has committed (or failed, in which case every caller in the batch gets the error
//! and nothing of the batch is visible).

use tokio::sync::{mpsc, oneshot};

use super::{StoreError, WriteOp, WriteResult};

/// Most operations applied in one transaction.
pub const MAX_BATCH: usize = 2048;
/// Operations that may wait in the queue before callers are back-pressured.
pub(crate) const QUEUE_DEPTH: usize = 16_384;

/// A queued write and where to send its outcome.
pub(crate) struct Pending {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<WriteResult, StoreError>>,
}

/// A backend's transactional batch apply.
pub(crate) trait BatchWriter: Send + 'static {
    /// Applies `ops` in one transaction, returning one result per op, in order.
    fn apply(
        &mut self,
        ops: &[&WriteOp],
    ) -> impl std::future::Future<Output = Result<Vec<WriteResult>, StoreError>> + Send;
}

/// Drains the queue until every sender is dropped.
pub(crate) async fn run<W: BatchWriter>(mut writer: W, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ops: Vec<&WriteOp> = batch.iter().map(|p| &p.op).collect();
        let started = std::time::Instant::now();
        let outcome = writer.apply(&ops).await;
        metrics::histogram!("hexveil_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("hexveil_store_commit_batch_size").record(batch.len() as f64);
        match outcome {
            Ok(results) => {
                for (pending, result) in batch.drain(..).zip(results) {
                    // A caller that went away (cancelled request) no longer needs the answer.
                    let _ = pending.reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = batch.len(), "group commit failed");
                metrics::counter!("hexveil_store_commit_failures_total").increment(1);
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(e.clone()));
                }
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::clock::Timestamp;

    /// Records the size of every batch it is handed; fails when told to.
    struct Recorder {
        batches: Arc<Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl BatchWriter for Recorder {
        async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<WriteResult>, StoreError> {
            self.batches.lock().unwrap().push(ops.len());
            if self.fail {
                return Err(StoreError::Unavailable("disk full".into()));
            }
            Ok(ops.iter().map(|_| WriteResult::Done).collect())
        }
    }

    async fn run_queued(
        n: usize,
        fail: bool,
    ) -> (Vec<usize>, Vec<Result<WriteResult, StoreError>>) {
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
        run(
            Recorder {
                batches: batches.clone(),
                fail,
            },
            rx,
        )
        .await;
        let mut out = Vec::new();
        for r in replies {
            out.push(r.await.unwrap());
        }
        let b = batches.lock().unwrap().clone();
        (b, out)
    }

    #[tokio::test]
    async fn queued_writes_share_one_transaction() {
        let (batches, results) = run_queued(300, false).await;
        assert_eq!(batches, vec![300], "one transaction for everything queued");
        assert!(results.iter().all(|r| matches!(r, Ok(WriteResult::Done))));
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_caller_in_it() {
        let (batches, results) = run_queued(5, true).await;
        assert_eq!(batches, vec![5]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Unavailable(_))))
        );
    }

    #[tokio::test]
    async fn batches_are_capped() {
        let (batches, _) = run_queued(MAX_BATCH + 10, false).await;
        assert_eq!(batches, vec![MAX_BATCH, 10]);
    }
}
