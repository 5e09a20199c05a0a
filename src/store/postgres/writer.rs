//! The writer: this node's one connection the group-commit queue feeds, a batch attempt in
//! one transaction with a savepoint per op, deadlock retries, and the classification of its
//! faults.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::writes::{apply_one, lock_batch};
use crate::store::group_commit::{BatchFailure, BatchWriter, OpResult};
use crate::store::{StoreError, WriteOp};

/// Attempts of one batch that a deadlock or serialization failure (another node's
/// transaction) may cost before the batch fails.
const ATTEMPTS: u32 = 5;
/// Longest a batch (or probe) may take before the connection is given up: a database that
/// stops answering must not hold every caller forever.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// This node's writer connection.
pub(crate) struct PgWriter {
    /// `None` until first used and after a failed batch: the connection is discarded and a
    /// fresh one is opened for the next batch (or probe).
    pub(super) conn: Option<PgConnection>,
    options: PgConnectOptions,
}

/// How one failed statement is handled.
enum Failure {
    /// This operation breaks a constraint (or is malformed): roll back just it.
    Op(sqlx::Error),
    /// Another transaction won a lock race (deadlock, serialization): retry the batch.
    Retry(sqlx::Error),
    /// The transaction cannot go on (connection lost, database down, ...): nothing commits.
    Batch(BatchFailure),
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn classify(e: sqlx::Error) -> Failure {
    match sqlstate(&e).as_deref() {
        // Class 23: integrity constraint violation; class 22: data exception.
        Some(c) if c.starts_with("23") || c.starts_with("22") => Failure::Op(e),
        Some("40001") | Some("40P01") => Failure::Retry(e),
        _ if matches!(e, sqlx::Error::Encode(_)) => Failure::Op(e),
        _ => Failure::Batch(batch_failure(&e)),
    }
}

/// A bounded cause label for `e`, with its message.
pub(super) fn batch_failure(e: &sqlx::Error) -> BatchFailure {
    let cause = match sqlstate(e).as_deref() {
        Some("53100") => "disk_full",
        Some("25006") => "read_only",
        Some("40001") | Some("40P01") => "deadlock",
        Some(c) if c.starts_with("08") || c.starts_with("57") => "connection",
        Some(c) if c.starts_with("XX") => "corrupt",
        Some(_) => "other",
        None => match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_) => "connection",
            _ => "other",
        },
    };
    BatchFailure {
        cause,
        detail: e.to_string(),
    }
}

/// Runs one fixed statement (transaction control) on the writer.
async fn exec(conn: &mut PgConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(conn).await.map(|_| ())
}

/// Why an attempt ended without a commit.
enum Abort {
    /// An op was rejected and there were no savepoints: retry with them.
    Rejected,
    /// Another node's transaction won a lock race: retry the batch.
    Retry(sqlx::Error),
    /// Nothing commits.
    Failed(BatchFailure),
}

impl PgWriter {
    pub(crate) fn new(options: PgConnectOptions) -> PgWriter {
        PgWriter {
            conn: None,
            options,
        }
    }

    /// The writer connection, (re)opened if there is none.
    pub(super) async fn connection(&mut self) -> Result<&mut PgConnection, BatchFailure> {
        if self.conn.is_none() {
            let conn = super::connect(&self.options)
                .await
                .map_err(|e| batch_failure(&e))?;
            self.conn = Some(conn);
        }
        // Unwrap safety: set just above when it was `None`.
        Ok(self.conn.as_mut().expect("connection opened above"))
    }

    /// Drops the connection (PostgreSQL rolls back whatever it had open); the next batch
    /// reconnects.
    pub(super) async fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing politely could wait on a dead peer; dropping closes the socket.
            drop(conn);
        }
    }

    /// One attempt at the batch. With `savepoints`, each op runs inside its own savepoint and
    /// an op that breaks a constraint is rolled back alone; without, the first such op aborts
    /// the attempt so the caller can retry with savepoints.
    async fn attempt(
        &mut self,
        ops: &[&WriteOp],
        savepoints: bool,
    ) -> Result<Vec<OpResult>, Abort> {
        let conn = self.connection().await.map_err(Abort::Failed)?;
        let fail = |e: sqlx::Error| Abort::Failed(batch_failure(&e));
        exec(conn, "BEGIN").await.map_err(fail)?;
        match lock_batch(conn, ops).await.map_err(classify) {
            Ok(()) => {}
            Err(Failure::Retry(e)) => {
                exec(conn, "ROLLBACK").await.map_err(fail)?;
                return Err(Abort::Retry(e));
            }
            Err(Failure::Op(e)) => return Err(Abort::Failed(batch_failure(&e))),
            Err(Failure::Batch(f)) => return Err(Abort::Failed(f)),
        }
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            if savepoints {
                exec(conn, "SAVEPOINT op").await.map_err(fail)?;
            }
            match apply_one(conn, op).await.map_err(classify) {
                Ok(r) => {
                    if savepoints {
                        exec(conn, "RELEASE SAVEPOINT op").await.map_err(fail)?;
                    }
                    results.push(Ok(r));
                }
                Err(Failure::Op(e)) if savepoints => {
                    exec(conn, "ROLLBACK TO SAVEPOINT op").await.map_err(fail)?;
                    exec(conn, "RELEASE SAVEPOINT op").await.map_err(fail)?;
                    results.push(Err(StoreError::Rejected(e.to_string())));
                }
                Err(Failure::Op(_)) => {
                    exec(conn, "ROLLBACK").await.map_err(fail)?;
                    return Err(Abort::Rejected);
                }
                Err(Failure::Retry(e)) => {
                    exec(conn, "ROLLBACK").await.map_err(fail)?;
                    return Err(Abort::Retry(e));
                }
                Err(Failure::Batch(f)) => return Err(Abort::Failed(f)),
            }
        }
        match exec(conn, "COMMIT").await.map_err(classify) {
            Ok(()) => Ok(results),
            Err(Failure::Retry(e)) => Err(Abort::Retry(e)),
            Err(Failure::Op(e)) => Err(Abort::Failed(batch_failure(&e))),
            Err(Failure::Batch(f)) => Err(Abort::Failed(f)),
        }
    }

    /// The batch with retries: savepoints after a rejected op, again after a lost lock race.
    async fn apply_with_retries(
        &mut self,
        ops: &[&WriteOp],
    ) -> Result<Vec<OpResult>, BatchFailure> {
        let mut savepoints = false;
        let mut retries = 0;
        loop {
            match self.attempt(ops, savepoints).await {
                Ok(results) => return Ok(results),
                Err(Abort::Rejected) if !savepoints => savepoints = true,
                Err(Abort::Rejected) => {
                    return Err(BatchFailure {
                        cause: "other",
                        detail: "a write was rejected even inside its own savepoint".into(),
                    });
                }
                Err(Abort::Retry(e)) => {
                    retries += 1;
                    metrics::counter!("hexveil_store_batch_retries_total").increment(1);
                    if retries >= ATTEMPTS {
                        return Err(batch_failure(&e));
                    }
                    tracing::debug!(error = %e, retries, "batch lost a lock race; retrying");
                    // A short, growing pause so the other node's transaction can finish.
                    tokio::time::sleep(Duration::from_millis(5 << retries)).await;
                }
                Err(Abort::Failed(f)) => return Err(f),
            }
        }
    }
}

impl BatchWriter for PgWriter {
    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<OpResult>, BatchFailure> {
        let outcome = match tokio::time::timeout(BATCH_TIMEOUT, self.apply_with_retries(ops)).await
        {
            Ok(r) => r,
            Err(_) => Err(BatchFailure {
                cause: "timeout",
                detail: format!("the batch took longer than {BATCH_TIMEOUT:?}"),
            }),
        };
        if outcome.is_err() {
            // Whatever state the connection is in, the next batch starts on a fresh one.
            self.discard().await;
        }
        outcome
    }

    fn check_file(&mut self) -> Result<(), BatchFailure> {
        // No file to watch: PostgreSQL manages its own storage (store.min_free_mb is SQLite's).
        Ok(())
    }

    async fn probe(&mut self) -> Result<(), BatchFailure> {
        let result = tokio::time::timeout(BATCH_TIMEOUT, async {
            let conn = self.connection().await?;
            let id: i64 = rand::random();
            let round_trip = async {
                let mut tx = conn.begin().await?;
                sqlx::query("INSERT INTO store_probe (id, filler) VALUES ($1, $2)")
                    .bind(id)
                    .bind(&[0u8; 1024][..])
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM store_probe WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            };
            round_trip.await.map_err(|e| batch_failure(&e))
        })
        .await
        .unwrap_or_else(|_| {
            Err(BatchFailure {
                cause: "timeout",
                detail: format!("the probe took longer than {BATCH_TIMEOUT:?}"),
            })
        });
        if result.is_err() {
            self.discard().await;
        }
        result
    }
}
