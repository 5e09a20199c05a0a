//! The writer: the one connection the group-commit queue feeds, a batch attempt in one
//! IMMEDIATE transaction with a savepoint per op, and the classification of its faults.

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::writes::apply_one;
use crate::store::group_commit::{BatchFailure, BatchWriter, OpResult};
use crate::store::{StoreError, WriteOp};

/// The one writer connection, fed by the group-commit queue.
pub(super) struct SqliteWriter {
    /// `None` after a failed batch: the connection is discarded (whatever state SQLite left it
    /// in) and a fresh one is opened for the next batch.
    pub(super) conn: Option<SqliteConnection>,
    pub(super) options: SqliteConnectOptions,
    pub(super) path: std::path::PathBuf,
    /// The database's files as they were when it was opened; `None` for an in-memory one.
    pub(super) identity: Option<FileSet>,
    /// Free space the file system must keep (`store.min_free_mb`); 0 disables the check.
    pub(super) min_free_bytes: u64,
    /// Keeps the write-ahead log (and shared-memory file) alive between writer connections.
    pub(super) _sentinel: Option<SqliteConnection>,
}

/// (device, inode) of `path`, if it exists.
pub(super) fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The identities of a database file, its write-ahead log and its shared-memory index.
/// Deleting the log loses every acknowledged write since the last checkpoint at the next
/// restart, so it is as much "the database" as the main file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileSet {
    main: (u64, u64),
    wal: Option<(u64, u64)>,
    shm: Option<(u64, u64)>,
}

impl FileSet {
    pub(super) fn of(path: &std::path::Path) -> Option<FileSet> {
        let with = |suffix: &str| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            file_identity(std::path::Path::new(&p))
        };
        Some(FileSet {
            main: file_identity(path)?,
            wal: with("-wal"),
            shm: with("-shm"),
        })
    }

    /// Which of the files opened is gone or replaced in `now`, if any.
    fn missing(&self, now: Option<FileSet>) -> Option<&'static str> {
        let Some(now) = now else {
            return Some("database file");
        };
        if now.main != self.main {
            return Some("database file");
        }
        if self.wal.is_some() && now.wal != self.wal {
            return Some("write-ahead log (-wal)");
        }
        if self.shm.is_some() && now.shm != self.shm {
            return Some("shared-memory index (-shm)");
        }
        None
    }
}

/// Bytes available to this process on the file system holding `path`, if it can be read.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to writable
    // memory of the right type, which statvfs fills in when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 or u64); widen both.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Some(u64::from(st.f_bavail).saturating_mul(st.f_frsize as u64))
}

/// How one failed statement is handled: only its operation, or the whole batch.
enum Failure {
    /// This operation breaks a constraint (or is malformed): roll back just it.
    Op(sqlx::Error),
    /// The transaction cannot go on (disk full, I/O, locked, ...): nothing commits.
    Batch(BatchFailure),
}

/// SQLite primary result codes that belong to one statement, not to the database: TOOBIG,
/// CONSTRAINT, MISMATCH, RANGE.
const PER_OP_CODES: [i64; 4] = [18, 19, 20, 25];

fn classify(e: sqlx::Error) -> Failure {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(1);
        if PER_OP_CODES.contains(&(code & 0xff)) {
            return Failure::Op(e);
        }
    }
    if matches!(e, sqlx::Error::Encode(_)) {
        return Failure::Op(e);
    }
    Failure::Batch(batch_failure(&e))
}

/// A bounded cause label for `e` (SQLite primary result code), with its message.
fn batch_failure(e: &sqlx::Error) -> BatchFailure {
    let cause = match e {
        sqlx::Error::Database(db) => {
            match db.code().and_then(|c| c.parse::<i64>().ok()).unwrap_or(1) & 0xff {
                13 => "disk_full",
                10 => "io",
                5 | 6 => "busy",
                8 => "read_only",
                14 => "cannot_open",
                11 | 26 => "corrupt",
                _ => "other",
            }
        }
        sqlx::Error::Io(_) => "io",
        _ => "other",
    };
    BatchFailure {
        cause,
        detail: e.to_string(),
    }
}

impl SqliteWriter {
    /// The writer connection, reopened if the last batch discarded it.
    pub(super) async fn connection(&mut self) -> Result<&mut SqliteConnection, BatchFailure> {
        if self.conn.is_none() {
            let conn = SqliteConnection::connect_with(&self.options)
                .await
                .map_err(|e| batch_failure(&e))?;
            self.conn = Some(conn);
            // The file may have been swapped between the check and the open.
            self.check_file()?;
        }
        // Unwrap safety: set just above when it was `None`.
        Ok(self.conn.as_mut().expect("connection opened above"))
    }

    /// Rolls back whatever is open and drops the connection; the next batch reconnects.
    pub(super) async fn discard(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }

    /// One attempt at the batch. With `savepoints`, each op runs inside its own savepoint and
    /// an op that breaks a constraint is rolled back alone; without, the first such op aborts
    /// the attempt (`Err(None)`) so the caller can retry with savepoints — the common case
    /// pays for no savepoints at all.
    async fn attempt(
        &mut self,
        ops: &[&WriteOp],
        savepoints: bool,
    ) -> Result<Vec<OpResult>, Option<BatchFailure>> {
        let conn = self.connection().await.map_err(Some)?;
        exec(conn, "BEGIN IMMEDIATE")
            .await
            .map_err(|e| Some(batch_failure(&e)))?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            if savepoints {
                exec(conn, "SAVEPOINT op")
                    .await
                    .map_err(|e| Some(batch_failure(&e)))?;
            }
            match apply_one(conn, op).await.map_err(classify) {
                Ok(r) => {
                    if savepoints {
                        exec(conn, "RELEASE op")
                            .await
                            .map_err(|e| Some(batch_failure(&e)))?;
                    }
                    results.push(Ok(r));
                }
                Err(Failure::Op(e)) if savepoints => {
                    exec(conn, "ROLLBACK TO op")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    exec(conn, "RELEASE op")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    results.push(Err(StoreError::Rejected(e.to_string())));
                }
                Err(Failure::Op(_)) => {
                    exec(conn, "ROLLBACK")
                        .await
                        .map_err(|e| Some(batch_failure(&e)))?;
                    return Err(None);
                }
                Err(Failure::Batch(f)) => return Err(Some(f)),
            }
        }
        exec(conn, "COMMIT")
            .await
            .map_err(|e| Some(batch_failure(&e)))?;
        Ok(results)
    }
}

/// Runs one fixed statement (transaction control) on the writer.
async fn exec(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(conn).await.map(|_| ())
}

impl BatchWriter for SqliteWriter {
    async fn apply(&mut self, ops: &[&WriteOp]) -> Result<Vec<OpResult>, BatchFailure> {
        let outcome = match self.attempt(ops, false).await {
            Err(None) => self.attempt(ops, true).await,
            other => other,
        };
        match outcome {
            Ok(results) => Ok(results),
            Err(failure) => {
                // Whatever SQLite left open (a failed COMMIT can leave the transaction
                // active), the next batch starts on a fresh connection.
                self.discard().await;
                Err(failure.unwrap_or_else(|| BatchFailure {
                    cause: "other",
                    detail: "a write was rejected even inside its own savepoint".into(),
                }))
            }
        }
    }

    fn check_file(&mut self) -> Result<(), BatchFailure> {
        let Some(opened) = self.identity else {
            return Ok(());
        };
        match opened.missing(FileSet::of(&self.path)) {
            None => {
                if self.min_free_bytes > 0
                    && let Some(free) = free_bytes(&self.path)
                    && free < self.min_free_bytes
                {
                    return Err(BatchFailure {
                        cause: "disk_reserve",
                        detail: format!(
                            "{free} bytes free on the file system of {}, below the reserve of \
                             {} bytes (store.min_free_mb)",
                            self.path.display(),
                            self.min_free_bytes
                        ),
                    });
                }
                Ok(())
            }
            Some(which) => Err(BatchFailure {
                cause: "file_removed",
                detail: format!(
                    "the {which} of {} was removed or replaced under the running server",
                    self.path.display(),
                ),
            }),
        }
    }

    async fn probe(&mut self) -> Result<(), BatchFailure> {
        let result = async {
            let conn = self.connection().await?;
            // 64 KiB that must fit: fresh pages in the file (or the WAL), handed back at once.
            sqlx::raw_sql(
                "BEGIN IMMEDIATE;
                 INSERT INTO store_probe (id, filler) VALUES (1, randomblob(65536));
                 DELETE FROM store_probe;
                 COMMIT;",
            )
            .execute(conn)
            .await
            .map(|_| ())
            .map_err(|e| batch_failure(&e))
        }
        .await;
        if result.is_err() {
            self.discard().await;
        }
        result
    }
}
