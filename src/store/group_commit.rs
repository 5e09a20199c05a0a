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
