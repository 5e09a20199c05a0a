//! The SQLite writer under faults: one rejected op fails only its caller, a full database
//! fails the whole batch and leaves nothing behind, and a removed file is noticed.

use std::str::FromStr;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};

use super::migrator;
use super::writer::{FileSet, SqliteWriter};
use crate::clock::Timestamp;
use crate::model::{ConsentReceipt, Merchant, Purposes};
use crate::pseudonym::DeviceId;
use crate::store::group_commit::BatchWriter;
use crate::store::{StoreError, WriteOp, WriteResult};

async fn writer(dir: &std::path::Path) -> SqliteWriter {
    let path = dir.join("hexveil.db");
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .unwrap()
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
    migrator().run(&mut conn).await.unwrap();
    // As in production: a second connection keeps the log alive across writer reconnects.
    let sentinel = SqliteConnection::connect_with(&options.clone().read_only(true))
        .await
        .unwrap();
    SqliteWriter {
        conn: Some(conn),
        options: options.create_if_missing(false),
        identity: FileSet::of(&path),
        path,
        min_free_bytes: 0,
        _sentinel: Some(sentinel),
    }
}

fn merchant(n: u8) -> WriteOp {
    WriteOp::PutMerchant(Merchant {
        merchant_id: uuid::Uuid::from_bytes([n; 16]),
        name: format!("shop {n}"),
        key_hash: [n; 32],
        cells: vec![0x0883_9336_61bf_ffff],
        created_at: Timestamp(1_000),
        revoked_at: None,
    })
}

fn consent(n: u8) -> WriteOp {
    WriteOp::PutConsent {
        receipt: ConsentReceipt {
            receipt_id: format!("receipt-{n}"),
            device: DeviceId([n; 16]),
            purposes: Purposes::from_bits(3),
            granted_at: Timestamp(1_000),
            policy_version: "2026-11".into(),
            controller: "hexveil".into(),
        },
        now: Timestamp(1_000),
    }
}

async fn count(w: &mut SqliteWriter, table: &str) -> i64 {
    let conn = w.connection().await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_failing_op_fails_only_its_own_caller() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path()).await;
    w.apply(&[&merchant(1)]).await.unwrap();

    // The third op re-registers merchant 1 (a primary-key violation); the fifth is one
    // caller's two writes, the second of which fails: that caller's first write must go too.
    let ops = [
        consent(10),
        merchant(2),
        merchant(1),
        consent(11),
        WriteOp::Many(vec![consent(12), merchant(2)]),
        consent(13),
    ];
    let refs: Vec<&WriteOp> = ops.iter().collect();
    let results = w.apply(&refs).await.expect("the batch commits");
    assert_eq!(results.len(), 6);
    assert!(matches!(results[0], Ok(WriteResult::Done)));
    assert!(matches!(results[1], Ok(WriteResult::Done)));
    assert!(
        matches!(&results[2], Err(StoreError::Rejected(_))),
        "{:?}",
        results[2]
    );
    assert!(matches!(results[3], Ok(WriteResult::Done)));
    assert!(matches!(&results[4], Err(StoreError::Rejected(_))));
    assert!(matches!(results[5], Ok(WriteResult::Done)));

    assert_eq!(count(&mut w, "merchants").await, 2);
    assert_eq!(count(&mut w, "consent_receipts").await, 3, "10, 11 and 13");
    let conn = w.connection().await.unwrap();
    let twelve: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM consent_receipts WHERE receipt_id = 'receipt-12'")
            .fetch_one(conn)
            .await
            .unwrap();
    assert_eq!(
        twelve, 0,
        "a rejected caller's writes are rolled back whole"
    );
}

#[tokio::test]
async fn a_full_database_fails_the_whole_batch_and_recovers_on_a_fresh_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path()).await;
    w.apply(&[&consent(1)]).await.unwrap();
    // Cap the file at its current size: the next write that needs a page fails SQLITE_FULL.
    {
        let conn = w.connection().await.unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    let ops: Vec<WriteOp> = (10..200).map(consent).collect();
    let refs: Vec<&WriteOp> = ops.iter().collect();
    let failure = w.apply(&refs).await.expect_err("the database is full");
    assert_eq!(failure.cause, "disk_full", "{}", failure.detail);
    assert!(
        w.conn.is_none(),
        "the connection is discarded after a failed batch"
    );
    assert_eq!(
        count(&mut w, "consent_receipts").await,
        1,
        "nothing of a failed batch is left behind"
    );
    // The fresh connection has no page cap: the same batch now commits.
    let results = w.apply(&refs).await.unwrap();
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(count(&mut w, "consent_receipts").await, 191);
    w.probe().await.unwrap();
    assert_eq!(
        count(&mut w, "store_probe").await,
        0,
        "the probe leaves nothing"
    );
}

#[tokio::test]
async fn a_removed_or_replaced_file_is_noticed_and_never_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path()).await;
    w.apply(&[&consent(1)]).await.unwrap();
    w.check_file().unwrap();
    let path = dir.path().join("hexveil.db");
    std::fs::rename(&path, dir.path().join("moved.db")).unwrap();
    let f = w.check_file().expect_err("renamed away");
    assert_eq!(f.cause, "file_removed");
    // A new file at the same path is not the database that was opened.
    std::fs::write(&path, b"").unwrap();
    assert_eq!(w.check_file().unwrap_err().cause, "file_removed");
    std::fs::remove_file(&path).unwrap();
    w.discard().await;
    assert!(
        w.connection().await.is_err(),
        "a reconnect never creates a fresh database in place of the lost one"
    );
    assert!(!path.exists());
    // Moved back, it is the same file again.
    std::fs::rename(dir.path().join("moved.db"), &path).unwrap();
    w.check_file().unwrap();
    w.probe().await.unwrap();
}

#[tokio::test]
async fn below_the_free_space_reserve_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path()).await;
    w.check_file().unwrap();
    w.min_free_bytes = u64::MAX;
    let f = w
        .check_file()
        .expect_err("no file system has that much free");
    assert_eq!(f.cause, "disk_reserve", "{}", f.detail);
    assert!(f.detail.contains("store.min_free_mb"));
}

#[tokio::test]
async fn a_removed_write_ahead_log_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path()).await;
    w.apply(&[&consent(1)]).await.unwrap();
    w.check_file().unwrap();
    std::fs::remove_file(dir.path().join("hexveil.db-wal")).unwrap();
    let f = w
        .check_file()
        .expect_err("the log holds acknowledged writes");
    assert_eq!(f.cause, "file_removed");
    assert!(f.detail.contains("-wal"), "{}", f.detail);
}
