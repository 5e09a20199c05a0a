//! The store through its one interface, on every backend under test: the embedded SQLite
//! store always, PostgreSQL when `HEXVEIL_TEST_POSTGRES_URL` is set (each test in a schema of
//! its own). Then what only PostgreSQL has: several nodes committing at once, and an outage
//! of the database itself.

use std::time::Duration;

use super::pg_testing::{self, TestSchema};
use super::{DeliveryLimits, NOTIFICATIONS_KEPT, Store, StoreError, WriteOp};
use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, Dwell, Feedback, LedgerEntry, Merchant, Notification, Offer, OpeningHours,
    Purposes, ReleasedCount, Restriction,
};
use crate::pseudonym::DeviceId;

const CELL: u64 = 0x0883_9336_61bf_ffff;
const OTHER_CELL: u64 = 0x0883_9336_63bf_ffff;
/// 2026-01-05T10:00:00Z.
const T0: i64 = 1_767_607_200_000;

/// A store under test and what keeps its data alive.
struct Under {
    name: &'static str,
    store: Store,
    _dir: Option<tempfile::TempDir>,
    schema: Option<TestSchema>,
}

/// The backends to test: SQLite, and PostgreSQL when the test database is configured.
async fn backends(test: &str) -> Vec<Under> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    let mut out = vec![Under {
        name: "sqlite",
        store: sqlite,
        _dir: Some(dir),
        schema: None,
    }];
    if let Some(pg) = postgres(test).await {
        out.push(pg);
    }
    out
}

/// A PostgreSQL store in a fresh schema, or `None` (skipped) without a test database.
async fn postgres(test: &str) -> Option<Under> {
    let base = pg_testing::url_or_skip(test)?;
    let schema = TestSchema::create(&base).await;
    let store = Store::open(&schema.url).await.unwrap();
    Some(Under {
        name: "postgres",
        store,
        _dir: None,
        schema: Some(schema),
    })
}

fn device(n: u8) -> DeviceId {
    DeviceId([n; 16])
}

fn consent(n: u8, bits: u8, at: i64) -> WriteOp {
    WriteOp::PutConsent {
        receipt: ConsentReceipt {
            receipt_id: format!("receipt-{n}-{at}"),
            device: device(n),
            purposes: Purposes::from_bits(bits),
            granted_at: Timestamp(at),
            policy_version: "2026-11".into(),
            controller: "hexveil".into(),
        },
        now: Timestamp(at),
    }
}

fn merchant(n: u8) -> Merchant {
    Merchant {
        merchant_id: uuid::Uuid::from_bytes([n; 16]),
        name: format!("shop {n}"),
        key_hash: [n; 32],
        cells: vec![CELL, OTHER_CELL],
        created_at: Timestamp(T0 - 1_000),
        revoked_at: None,
    }
}

fn offer(m: u8, n: u8, cell: u64, per_day: u32) -> Offer {
    Offer {
        offer_id: uuid::Uuid::from_bytes([n; 16]),
        merchant_id: uuid::Uuid::from_bytes([m; 16]),
        title: format!("offer {n}"),
        body: "10% off".into(),
        cell,
        radius_k: 1,
        valid_from: Timestamp(T0 - 3_600_000),
        valid_until: Timestamp(T0 + 86_400_000),
        max_notifications_per_day: per_day,
        opening_hours: vec![OpeningHours {
            weekday: 1,
            open: 480,
            close: 1_200,
        }],
        updated_at: Timestamp(T0 - 500),
    }
}

fn notification(dev: u8, m: u8, o: u8, cell: u64, at: i64) -> Notification {
    Notification {
        notification_id: uuid::Uuid::new_v4(),
        device: device(dev),
        offer_id: uuid::Uuid::from_bytes([o; 16]),
        merchant_id: uuid::Uuid::from_bytes([m; 16]),
        cell,
        sent_at: Timestamp(at),
        feedback: None,
    }
}

fn deliver(n: Notification, offer_per_day: u32, cell_per_minute: u32) -> WriteOp {
    WriteOp::Deliver {
        notification: n,
        limits: DeliveryLimits {
            offer_per_day,
            cell_per_minute,
        },
    }
}

fn entry(bucket: i64, len: i64) -> LedgerEntry {
    LedgerEntry {
        bucket: Timestamp(bucket),
        bucket_len_ms: len,
        released_at: Timestamp(bucket + len),
        mechanism: "gaussian".into(),
        scale: 1.5,
        rho: 0.25,
        epsilon: 1.0,
        l1_sensitivity: 2.0,
        l2_sensitivity: 1.5,
        threshold: 3,
        cells: 2,
    }
}

fn count(bucket: i64, cell: u64, noisy: i64, suppressed: bool) -> ReleasedCount {
    ReleasedCount {
        bucket: Timestamp(bucket),
        cell,
        noisy,
        suppressed,
    }
}

/// Every write and read once, with the same answers on every backend (a port that
/// translated a statement wrongly fails here).
#[tokio::test]
async fn every_write_and_read_means_the_same_on_every_backend() {
    for Under { name, store, .. } in backends("store round trip").await {
        let m = merchant(1);
        store.write(WriteOp::PutMerchant(m.clone())).await.unwrap();
        assert_eq!(
            store.merchant(m.merchant_id).await.unwrap(),
            Some(m.clone())
        );
        assert_eq!(store.merchants().await.unwrap(), vec![m.clone()], "{name}");
        let o = offer(1, 7, CELL, 2);
        store.write(WriteOp::PutOffer(o.clone())).await.unwrap();
        assert_eq!(
            store.load_offers().await.unwrap(),
            vec![o.clone()],
            "{name}"
        );
        assert_eq!(
            store.offers_of(m.merchant_id).await.unwrap(),
            vec![o.clone()]
        );

        store.write(consent(1, 3, T0)).await.unwrap();
        store.write(consent(2, 3, T0)).await.unwrap();
        // Receipts are trimmed to the newest RECEIPTS_KEPT.
        for i in 0..12 {
            store.write(consent(3, 3, T0 + i)).await.unwrap();
        }
        let latest = store.latest_consent(device(3)).await.unwrap().unwrap();
        assert_eq!(latest.granted_at, Timestamp(T0 + 11), "{name}");
        let dwell = Dwell {
            anchor: CELL,
            cell: CELL,
            since: Timestamp(T0),
            last_seen: Timestamp(T0 + 60_000),
        };
        // A dwell that continues one the store does not hold restarts at its report (another
        // node may have stored a move); one that continues the stored dwell keeps its start.
        let presence = |dwell| WriteOp::Presence {
            device: device(1),
            dwell,
            now: Timestamp(T0 + 60_000),
        };
        store.write(presence(dwell)).await.unwrap();
        let stored = store.stored_device(device(1)).await.unwrap().unwrap();
        assert_eq!(
            stored.row.dwell.map(|d| d.since),
            Some(Timestamp(T0 + 60_000)),
            "{name}: no stored dwell to continue"
        );
        store
            .write(presence(Dwell {
                last_seen: Timestamp(T0),
                ..dwell
            }))
            .await
            .unwrap();
        store
            .write(WriteOp::Presence {
                device: device(1),
                dwell,
                now: Timestamp(T0 + 60_000),
            })
            .await
            .unwrap();
        store
            .write(WriteOp::Touch {
                device: device(1),
                at: Timestamp(T0 + 1),
            })
            .await
            .unwrap();

        // Deliveries: the offer's budget of 2 holds in the store.
        let mut recorded = Vec::new();
        for dev in [1, 2, 3] {
            let n = notification(dev, 1, 7, CELL, T0 + 61_000 + i64::from(dev));
            let r = store.write_count(deliver(n.clone(), 2, 10)).await.unwrap();
            recorded.push(r);
            if r == 1 {
                store
                    .write(WriteOp::Feedback {
                        device: n.device,
                        notification_id: n.notification_id,
                        feedback: Feedback::Opened,
                        restriction: Some(Restriction {
                            device: n.device,
                            merchant_id: n.merchant_id,
                            muted: true,
                            dismissals: 2,
                            backoff_until: Some(Timestamp(T0 + 999)),
                        }),
                        now: Timestamp(T0 + 62_000),
                    })
                    .await
                    .unwrap();
            }
        }
        assert_eq!(recorded, vec![1, 1, 0], "{name}: the daily budget holds");
        // Without limits (Notify), a revoked merchant still refuses.
        let n = notification(3, 1, 7, CELL, T0 + 63_000);
        assert_eq!(store.write_count(WriteOp::Notify(n)).await.unwrap(), 1);
        let notes = store.load_notifications(Timestamp(0)).await.unwrap();
        assert_eq!(notes.len(), 3, "{name}");
        assert_eq!(notes[0].feedback, Some(Feedback::Opened), "{name}");
        assert_eq!(store.load_deliveries(Timestamp(0)).await.unwrap().len(), 3);
        let restrictions = store.load_restrictions().await.unwrap();
        assert_eq!(restrictions.len(), 2, "{name}");
        assert!(restrictions.iter().all(|r| r.muted && r.dismissals == 2));
        let rows = store
            .deliveries(Timestamp(T0), Timestamp(T0 + 86_400_000))
            .await
            .unwrap();
        assert_eq!(rows.iter().filter(|r| r.opened).count(), 2, "{name}");

        let devices = store.load_devices().await.unwrap();
        assert_eq!(devices.len(), 3, "{name}");
        let d1 = devices.iter().find(|d| d.device == device(1)).unwrap();
        assert_eq!(d1.dwell, Some(dwell), "{name}");
        assert_eq!(d1.purposes, Purposes::from_bits(3));

        // Foot traffic: contributions, their bound at release, the release once.
        for (dev, cell) in [(1, CELL), (1, OTHER_CELL), (2, CELL), (2, CELL)] {
            store
                .write(WriteOp::Contribute {
                    device: device(dev),
                    cell,
                    bucket: Timestamp(T0),
                    max_cells: 8,
                    max_per_day: 24,
                })
                .await
                .unwrap();
        }
        let mut counts = store.bucket_counts(Timestamp(T0), 1).await.unwrap();
        counts.sort();
        let (lo, hi) = (CELL.min(OTHER_CELL), CELL.max(OTHER_CELL));
        let expected = if lo == CELL {
            vec![(CELL, 2)]
        } else {
            vec![(lo, 1), (hi, 1)]
        };
        assert_eq!(counts, expected, "{name}: one cell per device, its lowest");
        assert_eq!(
            store.unreleased_buckets().await.unwrap(),
            vec![Timestamp(T0)]
        );
        assert_eq!(store.load_contributions().await.unwrap().len(), 3, "{name}");
        let spend = store.load_contribution_spend(Timestamp(T0)).await.unwrap();
        assert_eq!(spend.iter().map(|s| s.2).sum::<u32>(), 3, "{name}");
        let snap = store.device_snapshot(device(1)).await.unwrap().unwrap();
        assert_eq!(snap.pending_contributions, 2, "{name}");
        assert_eq!(snap.contribution_spend, 2, "{name}");
        assert_eq!(snap.current_cell.map(|c| c.cell), Some(CELL));
        assert_eq!(snap.receipts.len(), 1);
        assert_eq!(store.device_snapshot(device(9)).await.unwrap(), None);
        let released = vec![count(T0, CELL, 5, false), count(T0, OTHER_CELL, 0, true)];
        let release = || WriteOp::Release {
            entry: entry(T0, 3_600_000),
            counts: released.clone(),
        };
        assert_eq!(store.write_count(release()).await.unwrap(), 1, "{name}");
        assert_eq!(store.write_count(release()).await.unwrap(), 0, "{name}");
        assert_eq!(store.last_release().await.unwrap(), Some(Timestamp(T0)));
        assert_eq!(
            store
                .ledger(Timestamp(T0), Timestamp(T0 + 1))
                .await
                .unwrap(),
            vec![entry(T0, 3_600_000)],
            "{name}"
        );
        let mut got = store
            .released(&[CELL, OTHER_CELL], Timestamp(T0), Timestamp(T0 + 1))
            .await
            .unwrap();
        got.sort_by_key(|c| c.cell);
        let mut want = released.clone();
        want.sort_by_key(|c| c.cell);
        assert_eq!(got, want, "{name}");
        assert!(store.unreleased_buckets().await.unwrap().is_empty());

        // Daily: the per-device bound of cells per day, then the day's release once.
        let day = T0 - T0.rem_euclid(86_400_000);
        for cell in [CELL, OTHER_CELL] {
            store
                .write(WriteOp::ContributeDay {
                    device: device(1),
                    cell,
                    day: Timestamp(day),
                    max_cells: 1,
                })
                .await
                .unwrap();
        }
        assert_eq!(store.day_counts(Timestamp(day)).await.unwrap().len(), 1);
        assert_eq!(store.load_daily_contributions().await.unwrap().len(), 1);
        let mut daily = entry(day, 86_400_000);
        daily.bucket_len_ms = crate::privacy::daily::DAY_MS;
        let release_day = || WriteOp::ReleaseDay {
            entry: daily.clone(),
            counts: vec![count(day, CELL, 4, false)],
        };
        assert_eq!(store.write_count(release_day()).await.unwrap(), 1);
        assert_eq!(store.write_count(release_day()).await.unwrap(), 0);
        assert_eq!(
            store.last_daily_release().await.unwrap(),
            Some(Timestamp(day))
        );
        assert_eq!(
            store
                .daily_ledger(Timestamp(day), Timestamp(day + 1))
                .await
                .unwrap(),
            vec![daily.clone()],
            "{name}"
        );
        assert_eq!(
            store
                .released_days(&[CELL], Timestamp(day), Timestamp(day + 1))
                .await
                .unwrap(),
            vec![count(day, CELL, 4, false)]
        );

        // Offer statistics, released once.
        let stats_entry = crate::model::OfferStatsLedgerEntry {
            day: Timestamp(day),
            released_at: Timestamp(day + 86_400_000),
            mechanism: "gaussian".into(),
            scale: 2.0,
            rho: 0.1,
            epsilon: 0.5,
            l1_sensitivity: 1.0,
            l2_sensitivity: 1.0,
            offers: 1,
        };
        let stat = crate::model::OfferStatRow {
            day: Timestamp(day),
            offer_id: o.offer_id,
            merchant_id: m.merchant_id,
            deliveries: 3,
            opens: -1,
        };
        let release_stats = || WriteOp::ReleaseOfferStats {
            entry: stats_entry.clone(),
            rows: vec![stat.clone()],
        };
        assert_eq!(store.write_count(release_stats()).await.unwrap(), 1);
        assert_eq!(store.write_count(release_stats()).await.unwrap(), 0);
        assert_eq!(
            store.last_offer_stats_day().await.unwrap(),
            Some(Timestamp(day))
        );
        assert_eq!(
            store
                .offer_stats(m.merchant_id, Timestamp(day), Timestamp(day + 1))
                .await
                .unwrap(),
            vec![stat.clone()]
        );
        assert_eq!(
            store
                .offer_stats_ledger(Timestamp(day), Timestamp(day + 1))
                .await
                .unwrap(),
            vec![stats_entry.clone()]
        );

        // Revocation and deletion; erasure and expiry.
        assert_eq!(
            store
                .write_count(WriteOp::RevokeMerchant {
                    merchant_id: m.merchant_id,
                    at: Timestamp(T0 + 70_000),
                })
                .await
                .unwrap(),
            1
        );
        let n = notification(2, 1, 7, CELL, T0 + 71_000);
        assert_eq!(
            store.write_count(WriteOp::Notify(n)).await.unwrap(),
            0,
            "{name}: a revoked merchant's offer is never recorded"
        );
        assert!(store.erase_device(device(1)).await.unwrap() > 0);
        assert_eq!(store.device_snapshot(device(1)).await.unwrap(), None);
        assert_eq!(
            store
                .expire_idle(
                    Timestamp(T0 + 1_000_000),
                    vec![(device(2), Timestamp(T0 + 2_000_000))]
                )
                .await
                .unwrap(),
            1,
            "{name}: device 3 idle, device 2 touched by the sweep's own transaction"
        );
        assert_eq!(
            store
                .write_count(WriteOp::DeleteOffer {
                    merchant_id: m.merchant_id,
                    offer_id: o.offer_id,
                })
                .await
                .unwrap(),
            1
        );
        store.ping().await.unwrap();
    }
}

/// One rejected op (a primary-key violation) fails only its own caller, on every backend —
/// a caller's whole `Many` goes with it — and the rest of the writes committed.
#[tokio::test]
async fn a_rejected_write_fails_only_its_caller() {
    for Under { name, store, .. } in backends("rejected write").await {
        store
            .write(WriteOp::PutMerchant(merchant(1)))
            .await
            .unwrap();
        // Queue them together so that they share batches.
        let ops = vec![
            consent(10, 3, T0),
            WriteOp::PutMerchant(merchant(2)),
            WriteOp::PutMerchant(merchant(1)),
            consent(11, 3, T0),
            WriteOp::Many(vec![consent(12, 3, T0), WriteOp::PutMerchant(merchant(2))]),
            consent(13, 3, T0),
        ];
        let results =
            futures_util::future::join_all(ops.into_iter().map(|op| store.write(op))).await;
        assert!(
            results[0].is_ok() && results[1].is_ok(),
            "{name}: {results:?}"
        );
        assert!(matches!(results[2], Err(StoreError::Rejected(_))), "{name}");
        assert!(results[3].is_ok(), "{name}");
        assert!(matches!(results[4], Err(StoreError::Rejected(_))), "{name}");
        assert!(results[5].is_ok(), "{name}");
        assert!(store.is_writable(), "{name}: a rejected op is no outage");
        assert_eq!(store.merchants().await.unwrap().len(), 2, "{name}");
        for (dev, present) in [(10, true), (11, true), (12, false), (13, true)] {
            assert_eq!(
                store.latest_consent(device(dev)).await.unwrap().is_some(),
                present,
                "{name}: device {dev}"
            );
        }
    }
}

/// Sets up one merchant with offers in `CELL`, and `devices` consenting devices.
async fn shop(store: &Store, offers: &[(u8, u32)], devices: u8) {
    store
        .write(WriteOp::PutMerchant(merchant(1)))
        .await
        .unwrap();
    for (o, per_day) in offers {
        store
            .write(WriteOp::PutOffer(offer(1, *o, CELL, *per_day)))
            .await
            .unwrap();
    }
    for d in 0..devices {
        store.write(consent(d, 3, T0)).await.unwrap();
    }
}

/// Two nodes (two `Store`s, each with its own writer) on one schema deliver at the same
/// moment: their transactions overlap, and still neither the offer's daily budget nor the
/// cell's flood guard is exceeded — the stored count is exactly the limit.
#[tokio::test]
async fn two_nodes_delivering_at_once_never_exceed_a_budget_or_the_flood_guard() {
    let Some(a) = postgres("two nodes delivering").await else {
        return;
    };
    let schema = a.schema.as_ref().unwrap();
    let b = Store::open(&schema.url).await.unwrap();
    let a = a.store.clone();
    shop(&a, &[(7, 3), (8, 1_000), (9, 1_000)], 120).await;
    for round in 0..5i64 {
        // Each round in a minute of its own, so the flood guard starts afresh (the budget of
        // offer 7 does not: any 24 hours).
        let at = T0 + round * 60_000 + 1;
        let mut writes = Vec::new();
        for d in 0..120u8 {
            let store = if d % 2 == 0 { a.clone() } else { b.clone() };
            let o = [7, 8, 9][usize::from(d % 3)];
            let n = notification(d, 1, o, CELL, at + i64::from(d));
            writes.push(async move {
                store
                    .write_count(deliver(n, if o == 7 { 3 } else { 1_000 }, 5))
                    .await
            });
        }
        let recorded: u64 = futures_util::future::join_all(writes)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .sum();
        assert_eq!(
            recorded, 5,
            "round {round}: the flood guard allows 5 a minute"
        );
    }
    let per_offer = |o: u8| {
        let id = uuid::Uuid::from_bytes([o; 16]).to_string();
        format!("offer_deliveries WHERE offer_id = '{id}'")
    };
    assert!(schema.count(&per_offer(7)).await <= 3, "offer 7's budget");
    assert_eq!(schema.count("offer_deliveries").await, 25);
    assert_eq!(schema.count("notifications").await, 25);

    // The budget alone: offer 7 (budget 3, some of it maybe spent above) in a quiet cell.
    let spent = schema.count(&per_offer(7)).await;
    let mut writes = Vec::new();
    for d in 0..60u8 {
        let store = if d % 2 == 0 { a.clone() } else { b.clone() };
        let n = notification(d, 1, 7, CELL, T0 + 3_600_000 + i64::from(d));
        writes.push(async move { store.write_count(deliver(n, 3, 1_000)).await });
    }
    let recorded: u64 = futures_util::future::join_all(writes)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert_eq!(
        recorded as i64 + spent,
        3,
        "the budget holds across both nodes"
    );
    assert_eq!(schema.count(&per_offer(7)).await, 3);
}

/// Two nodes release the same bucket (and day) at the same moment: exactly one yields 1,
/// and there is one ledger entry.
#[tokio::test]
async fn two_nodes_releasing_one_bucket_release_it_once() {
    let Some(a) = postgres("two nodes releasing").await else {
        return;
    };
    let schema = a.schema.as_ref().unwrap();
    let b = Store::open(&schema.url).await.unwrap();
    let a = a.store.clone();
    shop(&a, &[], 4).await;
    for round in 0..10i64 {
        let bucket = T0 + round * 3_600_000;
        for d in 0..4 {
            a.write(WriteOp::Contribute {
                device: device(d),
                cell: CELL,
                bucket: Timestamp(bucket),
                max_cells: 8,
                max_per_day: 24,
            })
            .await
            .unwrap();
        }
        let release = || WriteOp::Release {
            entry: entry(bucket, 3_600_000),
            counts: vec![
                count(bucket, CELL, 4, false),
                count(bucket, OTHER_CELL, 1, true),
            ],
        };
        let (x, y) = tokio::join!(a.write_count(release()), b.write_count(release()));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(
            x + y,
            1,
            "round {round}: exactly one node releases ({x}, {y})"
        );
        assert_eq!(
            schema
                .count(&format!("ledger WHERE bucket = {bucket}"))
                .await,
            1
        );
        assert_eq!(
            schema
                .count(&format!("releases WHERE bucket = {bucket}"))
                .await,
            2,
            "every domain cell once"
        );
        assert_eq!(
            schema
                .count(&format!("contributions WHERE bucket = {bucket}"))
                .await,
            0
        );
    }
}

/// The database goes away under a running store (a proxy between them is cut): reads fail
/// fast with `Unavailable`, writes fail and the store turns unwritable (health NOT_SERVING)
/// and refuses writes at once; when the database is back the probe makes it writable again,
/// without a restart.
#[tokio::test]
async fn a_lost_database_fails_closed_and_recovers_by_itself() {
    let Some(base) = pg_testing::url_or_skip("lost database") else {
        return;
    };
    let schema = TestSchema::create(&base).await;
    let proxy = pg_testing::Proxy::start(&schema.url).await;
    let store = Store::open(&proxy.url).await.unwrap();
    store.write(consent(1, 3, T0)).await.unwrap();
    let mut changes = store.writable_changes();

    proxy.cut();
    let started = std::time::Instant::now();
    let read = store.merchants().await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a read on a lost database fails within the acquire timeout, took {:?}",
        started.elapsed()
    );
    let write = store.write(consent(2, 3, T0)).await;
    assert!(
        matches!(write, Err(StoreError::Unavailable(_))),
        "{write:?}"
    );
    assert!(
        !store.is_writable(),
        "a failed commit marks the store unwritable"
    );
    assert!(!*changes.borrow_and_update());
    let refused = store.write(consent(3, 3, T0)).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))));
    assert_eq!(
        schema.count("devices").await,
        1,
        "nothing of the failed writes"
    );

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(15), async {
        while !*changes.borrow_and_update() {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the probe makes the store writable again once the database is back");
    store.write(consent(4, 3, T0)).await.unwrap();
    assert_eq!(store.merchants().await.unwrap().len(), 0);
    assert_eq!(schema.count("devices").await, 2);
}

/// Nodes that start together on an empty database all run the migrations at once: sqlx's
/// migrator holds an advisory lock while it works, so each migration is applied once and
/// every node opens.
#[tokio::test]
async fn nodes_starting_together_apply_each_migration_once() {
    let Some(base) = pg_testing::url_or_skip("nodes starting together") else {
        return;
    };
    let schema = TestSchema::create(&base).await;
    let opened = futures_util::future::join_all((0..4).map(|_| Store::open(&schema.url))).await;
    for store in &opened {
        assert!(store.is_ok(), "{store:?}");
    }
    let migrations = super::postgres::MIGRATIONS.len() as i64;
    assert_eq!(schema.count("_sqlx_migrations").await, migrations);
    assert_eq!(schema.count("_sqlx_migrations WHERE NOT success").await, 0);
}

/// A batch that loses a deadlock to another session (PostgreSQL aborts it with 40P01) is
/// retried whole and commits: its caller sees success and the store stays writable.
#[tokio::test]
async fn a_batch_aborted_by_a_deadlock_is_retried_and_commits() {
    use sqlx::Connection;
    let Some(pg) = postgres("deadlock retry").await else {
        return;
    };
    let schema = pg.schema.as_ref().unwrap();
    let store = pg.store.clone();
    shop(&store, &[], 3).await;
    // Another session holds device 2's row, with a long deadlock timeout so that the store's
    // writer (1 s, the default) is the one PostgreSQL aborts.
    let mut other = sqlx::PgConnection::connect(&schema.url).await.unwrap();
    sqlx::raw_sql("SET deadlock_timeout = '20s'; BEGIN")
        .execute(&mut other)
        .await
        .unwrap();
    let lock = "SELECT 1 FROM devices WHERE device = $1 FOR UPDATE";
    sqlx::query(lock)
        .bind(&device(2).0[..])
        .execute(&mut other)
        .await
        .unwrap();
    // The writer locks device 1, then waits for device 2.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(WriteOp::Many(vec![
                    WriteOp::Touch {
                        device: device(1),
                        at: Timestamp(T0 + 5),
                    },
                    WriteOp::Touch {
                        device: device(2),
                        at: Timestamp(T0 + 5),
                    },
                ]))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The other session now waits for device 1: a cycle, which the writer loses.
    sqlx::query(lock)
        .bind(&device(1).0[..])
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    let written = writer.await.unwrap();
    assert!(
        written.is_ok(),
        "the batch is retried, not failed: {written:?}"
    );
    assert!(store.is_writable(), "a lost lock race is no outage");
    let devices = store.load_devices().await.unwrap();
    for d in [1, 2] {
        let row = devices.iter().find(|r| r.device == device(d)).unwrap();
        assert_eq!(row.last_activity, Timestamp(T0 + 5));
    }
}

/// The weekly cap (`caps.per_device_per_week`, up to 700) is re-checked on the stored log, so
/// a device's last week is kept whole; only older notifications are trimmed, down to
/// `NOTIFICATIONS_KEPT`.
#[tokio::test]
async fn the_last_week_of_notifications_is_kept_whole() {
    for Under { name, store, .. } in backends("the_last_week_of_notifications_is_kept_whole").await
    {
        store
            .write(WriteOp::PutMerchant(merchant(1)))
            .await
            .unwrap();
        store
            .write(WriteOp::PutOffer(offer(1, 7, CELL, 1_000)))
            .await
            .unwrap();
        store.write(consent(1, 3, T0)).await.unwrap();
        let week = 7 * 86_400_000;
        // 150 older than a week (oldest first), then 250 within the last week.
        let old = (0..150).map(|i| T0 - 2 * week + i * 60_000);
        let recent = (0..250).map(|i| T0 + i * 60_000);
        for at in old.chain(recent) {
            let n = notification(1, 1, 7, CELL, at);
            assert_eq!(store.write_count(WriteOp::Notify(n)).await.unwrap(), 1);
        }
        let stored = store.stored_device(device(1)).await.unwrap().unwrap();
        let last = T0 + 249 * 60_000;
        let in_week = stored
            .notifications
            .iter()
            .filter(|n| n.sent_at.millis() > last - week)
            .count();
        assert_eq!(in_week, 250, "{name}: every notification of the last week");
        assert_eq!(
            stored.notifications.len(),
            250,
            "{name}: older ones trimmed (the last week holds more than {NOTIFICATIONS_KEPT})"
        );
    }
}
