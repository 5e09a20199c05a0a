//! Storage: the one interface every domain module writes and reads through, and the only
//! module that runs SQL.
//!
//! Writes go through a group-commit queue ([`group_commit`]): callers enqueue an operation
//! and await its acknowledgement; one writer task drains everything queued, applies it in a
//! single transaction with one fsync, then acknowledges each caller. An acknowledged write
//! has therefore reached the disk and survives `kill -9`, without one fsync per request.
//!
//! Faults: a batch that cannot commit (disk full, I/O error, the file removed under the server)
//! answers UNAVAILABLE to exactly its callers and marks the store unable to write ([`health`]);
//! from then on writes are refused at once and health is NOT_SERVING until the writer's probe
//! commits again. One operation that fails on its own ([`StoreError::Rejected`]) fails only its
//! caller.
//!
//! Backends are chosen by URL: `sqlite:` is the embedded default, `postgres://` the shared
//! store for several nodes. Both implement [`Backend`] (every read, and a writer on the same
//! group-commit queue applying the same [`WriteOp`]s); `Store` holds one behind `Arc<dyn _>`.

mod group_commit;
mod health;
mod postgres;
mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Timestamp;
use crate::model::{
    ConsentReceipt, DeliveryRow, DeviceRow, DeviceSnapshot, Dwell, Feedback, LedgerEntry, Merchant,
    MerchantId, NodeRow, Notification, Offer, OfferId, OfferStatRow, OfferStatsLedgerEntry,
    ReleasedCount, Restriction,
};
use crate::pseudonym::DeviceId;

pub use group_commit::MAX_BATCH;
/// Test support for the PostgreSQL runs (a schema per test); not part of the product.
#[doc(hidden)]
pub use postgres::testing as pg_testing;

/// Receipts kept per device (older ones are dropped when a new one is stored).
pub const RECEIPTS_KEPT: i64 = 10;
/// Notifications kept per device beyond the last week (the log is bounded; older entries are
/// dropped). Every notification of the last 7 days is kept whatever their number, since the
/// weekly cap (`caps.per_device_per_week`, up to 700) is re-checked on the stored log.
pub const NOTIFICATIONS_KEPT: i64 = 100;

/// A storage failure. Details are logged where they happen; clients see only the kind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the write; nothing was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The URL or a migration is wrong; fatal at start-up.
    #[error("store misconfigured: {0}")]
    Config(String),
    /// Data in the store does not decode (a bug or tampering).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// The store refused this one write (a constraint it breaks); nothing of it was stored,
    /// and the other writes of its batch were not affected. A bug, not an outage.
    #[error("write rejected: {0}")]
    Rejected(String),
}

impl StoreError {
    /// A short label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Config(_) => "config",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::Rejected(_) => "rejected",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            sqlx::Error::Configuration(_) | sqlx::Error::Migrate(_) => {
                StoreError::Config(e.to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// One write, applied inside a group-commit transaction.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Stores a receipt, creating the device or marking it active at `now`.
    PutConsent {
        receipt: ConsentReceipt,
        now: Timestamp,
    },
    /// Deletes everything held about a device; yields the number of records erased.
    EraseDevice { device: DeviceId },
    /// Deletes every device idle since before `cutoff`; yields the number of devices.
    ExpireIdle { cutoff: Timestamp },
    /// Moves a device's stored last activity forward to `at` (never back).
    Touch { device: DeviceId, at: Timestamp },
    /// Records where a consenting device is (its dwell) and marks it active.
    Presence {
        device: DeviceId,
        dwell: Dwell,
        now: Timestamp,
    },
    /// Refreshes a device's last sighting and activity while nothing else changed: the
    /// sighting only if the stored dwell is still `dwell`'s (same cell and anchor) — another
    /// node may have stored a newer one, which a stale refresh must not overwrite.
    Seen {
        device: DeviceId,
        dwell: Dwell,
        now: Timestamp,
    },
    /// Logs a delivered notification (before the reply that carries it), if the device still
    /// consents, the merchant is not revoked and the offer exists; yields 1, or 0 if refused.
    Notify(Notification),
    /// Like `Notify`, and also only if the offer's daily budget and the cell's flood guard
    /// still have room among the stored notifications (all nodes'): yields 1, or 0.
    Deliver {
        notification: Notification,
        limits: DeliveryLimits,
    },
    /// Records feedback on a notification and the device's new standing with the merchant.
    Feedback {
        device: DeviceId,
        notification_id: uuid::Uuid,
        feedback: Feedback,
        restriction: Option<Restriction>,
        now: Timestamp,
    },
    /// The offers of one reply: `check` is run on the device as stored (all nodes'
    /// notifications, restrictions, the dwell row), in the committing transaction; only if
    /// it passes is each delivery recorded as by `Deliver`. Yields the number recorded (0 if
    /// the check refused, or the device is gone).
    DeliverChecked {
        device: DeviceId,
        check: DeviceCheck,
        deliveries: Vec<(Notification, DeliveryLimits)>,
    },
    /// Renews this node's row in `nodes` (counts a beat, sets `seen`), inserting it with a
    /// new join sequence if it is missing.
    Heartbeat { node_id: String, seen: i64 },
    /// Deletes a node's row if its beat counter is still `beats`; yields 1, or 0.
    DropNode { node_id: String, beats: i64 },
    /// Registers a merchant.
    PutMerchant(Merchant),
    /// Revokes a merchant's key; yields 1 if it was active.
    RevokeMerchant {
        merchant_id: MerchantId,
        at: Timestamp,
    },
    /// Creates or replaces an offer.
    PutOffer(Offer),
    /// Deletes one of a merchant's offers; yields 1 if it existed.
    DeleteOffer {
        merchant_id: MerchantId,
        offer_id: OfferId,
    },
    /// Several writes of one request, applied in order in the same transaction.
    Many(Vec<WriteOp>),
    /// Records a foot-traffic contribution (idempotent per device, cell and bucket) if the
    /// device still consents, the bucket is not released, and the device's stored spend
    /// (all nodes') leaves room: fewer than `max_cells` cells in this bucket and at most
    /// `max_per_day` pairs in every 24-hour window holding it (`privacy::contrib::admit`).
    Contribute {
        device: DeviceId,
        cell: u64,
        bucket: Timestamp,
        max_cells: u32,
        max_per_day: u32,
    },
    /// Releases a bucket in one transaction: the ledger entry, the noisy table, and the
    /// deletion of the bucket's raw contributions. Yields 1, or 0 (and changes nothing) if
    /// the bucket was already released.
    Release {
        entry: LedgerEntry,
        counts: Vec<ReleasedCount>,
    },
    /// Releases one UTC day of offer statistics: the ledger entry and the noisy table, in one
    /// transaction. Yields 1, or 0 (and changes nothing) if the day was already released.
    ReleaseOfferStats {
        entry: OfferStatsLedgerEntry,
        rows: Vec<OfferStatRow>,
    },
    /// Records a daily contribution (the device seen in `cell` on the UTC day starting at
    /// `day`) if the device still consents, the day is not released and the device holds
    /// fewer than `max_cells` cells of that day in the store. Yields `Done` either way (never
    /// a count: `Many` sums the notifications a request recorded).
    ContributeDay {
        device: DeviceId,
        cell: u64,
        day: Timestamp,
        max_cells: u32,
    },
    /// Releases one UTC day of daily counts in one transaction: the ledger entry (`bucket` is
    /// the day's start), the noisy table and the deletion of the day's raw daily
    /// contributions. Yields 1, or 0 (and changes nothing) if the day was already released.
    ReleaseDay {
        entry: LedgerEntry,
        counts: Vec<ReleasedCount>,
    },
}

/// The limits shared by all devices that a delivery must fit, checked again in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// The offer's `max_notifications_per_day` (any 24 hours).
    pub offer_per_day: u32,
    /// `caps.per_cell_per_minute` (per UTC minute).
    pub cell_per_minute: u32,
}

/// A device as the store holds it: what a reply's caps are re-checked against in the
/// committing transaction, and what a node reloads its memory of the device from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDevice {
    pub row: DeviceRow,
    /// Oldest first.
    pub notifications: Vec<Notification>,
    pub restrictions: Vec<Restriction>,
    /// Unreleased contributions as (bucket, cell).
    pub contributions: Vec<(Timestamp, u64)>,
    /// Contribution spend per bucket (pairs, released buckets' included).
    pub spend: Vec<(Timestamp, u32)>,
}

/// A domain rule over a [`StoredDevice`], run by the store inside the committing
/// transaction (the rules stay in the domain, the SQL in the store).
#[derive(Clone)]
pub struct DeviceCheck(pub Arc<dyn Fn(&StoredDevice) -> bool + Send + Sync>);

impl std::fmt::Debug for DeviceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCheck(..)")
    }
}

/// What a write yields once committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Done,
    Count(u64),
}

/// A boxed read of a backend (the seam is object-safe: `Store` holds `Arc<dyn Backend>`).
pub(crate) type Read<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A storage backend: every read, a liveness check, and its writer on the group-commit queue.
/// Each backend implements the same reads with the same meaning (see [`Store`]'s methods);
/// its writes are the [`WriteOp`]s its writer applies ([`group_commit::BatchWriter`]).
pub(crate) trait Backend: Send + Sync + 'static {
    /// A short name for logs and `Debug` (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;
    /// Starts the writer that drains `rx`, one transaction per batch, reporting to `health`.
    /// Called once, right after the backend is opened.
    fn start_writer(
        &self,
        rx: mpsc::Receiver<group_commit::Pending>,
        health: Arc<health::Health>,
    ) -> Result<(), StoreError>;
    fn ping(&self) -> Read<'_, ()>;
    fn latest_consent(&self, device: DeviceId) -> Read<'_, Option<ConsentReceipt>>;
    fn device_snapshot(&self, device: DeviceId) -> Read<'_, Option<DeviceSnapshot>>;
    fn stored_device(&self, device: DeviceId) -> Read<'_, Option<StoredDevice>>;
    fn live_nodes(&self) -> Read<'_, Vec<NodeRow>>;
    fn load_devices(&self) -> Read<'_, Vec<DeviceRow>>;
    fn load_notifications(&self, since: Timestamp) -> Read<'_, Vec<Notification>>;
    fn load_deliveries(&self, since: Timestamp) -> Read<'_, Vec<(OfferId, u64, Timestamp)>>;
    fn load_restrictions(&self) -> Read<'_, Vec<Restriction>>;
    fn load_offers(&self) -> Read<'_, Vec<Offer>>;
    fn offers_of(&self, merchant: MerchantId) -> Read<'_, Vec<Offer>>;
    fn merchant(&self, id: MerchantId) -> Read<'_, Option<Merchant>>;
    fn merchants(&self) -> Read<'_, Vec<Merchant>>;
    fn bucket_counts(
        &self,
        bucket: Timestamp,
        max_cells_per_device: u32,
    ) -> Read<'_, Vec<(u64, u64)>>;
    fn unreleased_buckets(&self) -> Read<'_, Vec<Timestamp>>;
    fn load_contributions(&self) -> Read<'_, Vec<(DeviceId, u64, Timestamp)>>;
    fn load_contribution_spend(
        &self,
        through: Timestamp,
    ) -> Read<'_, Vec<(DeviceId, Timestamp, u32)>>;
    fn ledger(&self, start: Timestamp, end: Timestamp) -> Read<'_, Vec<LedgerEntry>>;
    fn last_release(&self) -> Read<'_, Option<Timestamp>>;
    fn released<'a>(
        &'a self,
        cells: &'a [u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Read<'a, Vec<ReleasedCount>>;
    fn deliveries(&self, start: Timestamp, end: Timestamp) -> Read<'_, Vec<DeliveryRow>>;
    fn last_offer_stats_day(&self) -> Read<'_, Option<Timestamp>>;
    fn offer_stats(
        &self,
        merchant_id: MerchantId,
        start: Timestamp,
        end: Timestamp,
    ) -> Read<'_, Vec<OfferStatRow>>;
    fn offer_stats_ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Read<'_, Vec<OfferStatsLedgerEntry>>;
    fn day_counts(&self, day: Timestamp) -> Read<'_, Vec<(u64, u64)>>;
    fn load_daily_contributions(&self) -> Read<'_, Vec<(DeviceId, u64, Timestamp)>>;
    fn last_daily_release(&self) -> Read<'_, Option<Timestamp>>;
    fn daily_ledger(&self, start: Timestamp, end: Timestamp) -> Read<'_, Vec<LedgerEntry>>;
    fn released_days<'a>(
        &'a self,
        cells: &'a [u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Read<'a, Vec<ReleasedCount>>;
}

/// Implements [`Backend`] for `$ty` by forwarding every read to its inherent `async fn` of the
/// same name (each backend writes its reads as plain async methods), and `start_writer` to
/// its inherent `start_writer_now`.
macro_rules! forward_backend {
    ($ty:ty, $kind:literal) => {
        const _: () = {
        use $crate::clock::Timestamp;
        use $crate::model::{
            ConsentReceipt, DeliveryRow, DeviceRow, DeviceSnapshot, LedgerEntry, Merchant,
            MerchantId, Notification, Offer, OfferId, OfferStatRow, OfferStatsLedgerEntry,
            ReleasedCount, Restriction,
        };
        use $crate::pseudonym::DeviceId;
        impl $crate::store::Backend for $ty {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn start_writer(
                &self,
                rx: ::tokio::sync::mpsc::Receiver<$crate::store::group_commit::Pending>,
                health: ::std::sync::Arc<$crate::store::health::Health>,
            ) -> Result<(), $crate::store::StoreError> {
                self.start_writer_now(rx, health)
            }
            $crate::store::forward_backend!(@reads
                ping() -> ();
                latest_consent(device: DeviceId) -> Option<ConsentReceipt>;
                device_snapshot(device: DeviceId) -> Option<DeviceSnapshot>;
                stored_device(device: DeviceId) -> Option<$crate::store::StoredDevice>;
                live_nodes() -> Vec<$crate::model::NodeRow>;
                load_devices() -> Vec<DeviceRow>;
                load_notifications(since: Timestamp) -> Vec<Notification>;
                load_deliveries(since: Timestamp) -> Vec<(OfferId, u64, Timestamp)>;
                load_restrictions() -> Vec<Restriction>;
                load_offers() -> Vec<Offer>;
                offers_of(merchant: MerchantId) -> Vec<Offer>;
                merchant(id: MerchantId) -> Option<Merchant>;
                merchants() -> Vec<Merchant>;
                bucket_counts(bucket: Timestamp, max_cells_per_device: u32) -> Vec<(u64, u64)>;
                unreleased_buckets() -> Vec<Timestamp>;
                load_contributions() -> Vec<(DeviceId, u64, Timestamp)>;
                load_contribution_spend(through: Timestamp) -> Vec<(DeviceId, Timestamp, u32)>;
                ledger(start: Timestamp, end: Timestamp) -> Vec<LedgerEntry>;
                last_release() -> Option<Timestamp>;
                deliveries(start: Timestamp, end: Timestamp) -> Vec<DeliveryRow>;
                last_offer_stats_day() -> Option<Timestamp>;
                offer_stats(merchant_id: MerchantId, start: Timestamp, end: Timestamp)
                    -> Vec<OfferStatRow>;
                offer_stats_ledger(start: Timestamp, end: Timestamp) -> Vec<OfferStatsLedgerEntry>;
                day_counts(day: Timestamp) -> Vec<(u64, u64)>;
                load_daily_contributions() -> Vec<(DeviceId, u64, Timestamp)>;
                last_daily_release() -> Option<Timestamp>;
                daily_ledger(start: Timestamp, end: Timestamp) -> Vec<LedgerEntry>;
            );
            fn released<'a>(
                &'a self,
                cells: &'a [u64],
                start: Timestamp,
                end: Timestamp,
            ) -> $crate::store::Read<'a, Vec<ReleasedCount>> {
                Box::pin(<$ty>::released(self, cells, start, end))
            }
            fn released_days<'a>(
                &'a self,
                cells: &'a [u64],
                start: Timestamp,
                end: Timestamp,
            ) -> $crate::store::Read<'a, Vec<ReleasedCount>> {
                Box::pin(<$ty>::released_days(self, cells, start, end))
            }
        }
        };
    };
    (@reads $( $name:ident ( $($arg:ident : $argty:ty),* ) -> $ret:ty ; )*) => {
        $(
            fn $name(&self, $($arg: $argty),*) -> $crate::store::Read<'_, $ret> {
                // Inherent methods take precedence over trait methods of the same name.
                Box::pin(Self::$name(self, $($arg),*))
            }
        )*
    };
}
pub(crate) use forward_backend;

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    writes: mpsc::Sender<group_commit::Pending>,
    health: Arc<health::Health>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.kind())
            .finish()
    }
}

impl Store {
    /// Opens the store at `url` with no free-space reserve: for one-off commands such as
    /// `hexveil merchant add`, which read no config and write a row or two. The server opens
    /// with [`Store::open_with_reserve`] and the configured `store.min_free_mb`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with_reserve(url, 0).await
    }

    /// Opens the store at `url`, runs migrations and starts the group-commit writer. On
    /// SQLite the writer refuses to write while the database's file system has less than
    /// `min_free_bytes` free; PostgreSQL manages its own disk, so it ignores the reserve.
    pub async fn open_with_reserve(url: &str, min_free_bytes: u64) -> Result<Store, StoreError> {
        let (tx, rx) = mpsc::channel(group_commit::QUEUE_DEPTH);
        let health = Arc::new(health::Health::default());
        let backend: Arc<dyn Backend> = if url.starts_with("sqlite:") {
            Arc::new(sqlite::SqliteStore::open(url, min_free_bytes).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Arc::new(postgres::PgStore::open(url).await?)
        } else {
            return Err(StoreError::Config(format!(
                "store.url: unsupported scheme {:?} (use sqlite: or postgres://)",
                url.split(':').next().unwrap_or("")
            )));
        };
        backend.start_writer(rx, health.clone())?;
        Ok(Store {
            backend,
            writes: tx,
            health,
        })
    }

    /// Whether the store can write now (false from a failed commit until a probe succeeds).
    pub fn is_writable(&self) -> bool {
        self.health.is_writable()
    }

    /// Test seam: marks the store unable to write, as a failed commit does (the writer's
    /// probe makes it writable again within about a second), or able again at once.
    #[cfg(test)]
    pub(crate) fn set_writable_for_test(&self, writable: bool) {
        if writable {
            self.health.recovered();
        } else {
            self.health.failed("test", "set by a test");
        }
    }

    /// A receiver that sees every change of [`Store::is_writable`]; drives `grpc.health.v1`.
    pub fn writable_changes(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    /// Enqueues `op` and waits until it is durably committed. While the store cannot write,
    /// refuses at once: nothing is queued behind a fault.
    pub async fn write(&self, op: WriteOp) -> Result<WriteResult, StoreError> {
        if !self.health.is_writable() {
            let cause = self.health.cause().unwrap_or("unknown");
            return Err(StoreError::Unavailable(format!(
                "the store cannot write ({cause})"
            )));
        }
        let (reply, done) = oneshot::channel();
        self.writes
            .send(group_commit::Pending { op, reply })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Queues `op` without waiting for it: for facts that may be lost in a crash because the
    /// state recovered without them errs toward fewer offers (a device's last sighting).
    /// Dropped, and counted, when the store cannot write or the queue is full; returns
    /// whether it was queued (so the caller can try again later).
    pub fn write_behind(&self, op: WriteOp) -> bool {
        if !self.health.is_writable() {
            metrics::counter!("hexveil_store_write_behind_dropped_total").increment(1);
            return false;
        }
        let (reply, _) = oneshot::channel();
        let queued = self
            .writes
            .try_send(group_commit::Pending { op, reply })
            .is_ok();
        if !queued {
            metrics::counter!("hexveil_store_write_behind_dropped_total").increment(1);
        }
        queued
    }

    /// Stores a consent receipt (durably) and marks the device active.
    pub async fn put_consent(
        &self,
        receipt: ConsentReceipt,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::PutConsent { receipt, now })
            .await
            .map(|_| ())
    }

    /// Erases a device; returns how many records were deleted.
    pub async fn erase_device(&self, device: DeviceId) -> Result<u64, StoreError> {
        match self.write(WriteOp::EraseDevice { device }).await? {
            WriteResult::Count(n) => Ok(n),
            WriteResult::Done => Ok(0),
        }
    }

    /// Erases every device idle since before `cutoff`; returns how many. `active` are devices
    /// seen after `cutoff` whose stored last activity may be older (it is written lazily):
    /// their rows are brought up to date in the same transaction, before the sweep.
    pub async fn expire_idle(
        &self,
        cutoff: Timestamp,
        active: Vec<(DeviceId, Timestamp)>,
    ) -> Result<u64, StoreError> {
        let mut ops: Vec<WriteOp> = active
            .into_iter()
            .map(|(device, at)| WriteOp::Touch { device, at })
            .collect();
        ops.push(WriteOp::ExpireIdle { cutoff });
        match self.write(WriteOp::Many(ops)).await? {
            WriteResult::Count(n) => Ok(n),
            WriteResult::Done => Ok(0),
        }
    }

    /// The newest receipt of a device, if it has one.
    pub async fn latest_consent(
        &self,
        device: DeviceId,
    ) -> Result<Option<ConsentReceipt>, StoreError> {
        self.backend.latest_consent(device).await
    }

    /// Everything stored about a device, or `None` if nothing is.
    pub async fn device_snapshot(
        &self,
        device: DeviceId,
    ) -> Result<Option<DeviceSnapshot>, StoreError> {
        self.backend.device_snapshot(device).await
    }

    /// A device as stored (row, notifications, restrictions, contributions), or `None` if it
    /// has no row: for a node that does not know it, or whose memory of it is stale.
    pub async fn stored_device(
        &self,
        device: DeviceId,
    ) -> Result<Option<StoredDevice>, StoreError> {
        self.backend.stored_device(device).await
    }

    /// The nodes sharing this store (not yet dropped), by join sequence.
    pub async fn live_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.backend.live_nodes().await
    }

    /// Checks the store answers (for health).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// Writes `op` and maps a count result to `u64`.
    pub async fn write_count(&self, op: WriteOp) -> Result<u64, StoreError> {
        match self.write(op).await? {
            WriteResult::Count(n) => Ok(n),
            WriteResult::Done => Ok(0),
        }
    }

    /// Every device row, to rebuild in-memory state at start.
    pub async fn load_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.backend.load_devices().await
    }

    /// Notifications sent at or after `since` (all devices), oldest first.
    pub async fn load_notifications(
        &self,
        since: Timestamp,
    ) -> Result<Vec<Notification>, StoreError> {
        self.backend.load_notifications(since).await
    }

    /// Deliveries at or after `since` as (offer, cell, sent at), oldest first: what offer
    /// budgets and the flood guard count (they carry no device, so erasure keeps them).
    pub async fn load_deliveries(
        &self,
        since: Timestamp,
    ) -> Result<Vec<(OfferId, u64, Timestamp)>, StoreError> {
        self.backend.load_deliveries(since).await
    }

    /// Every mute and back-off.
    pub async fn load_restrictions(&self) -> Result<Vec<Restriction>, StoreError> {
        self.backend.load_restrictions().await
    }

    /// Every offer.
    pub async fn load_offers(&self) -> Result<Vec<Offer>, StoreError> {
        self.backend.load_offers().await
    }

    /// One merchant's offers, most recently updated first.
    pub async fn offers_of(&self, merchant: MerchantId) -> Result<Vec<Offer>, StoreError> {
        self.backend.offers_of(merchant).await
    }

    /// One merchant, revoked or not.
    pub async fn merchant(&self, id: MerchantId) -> Result<Option<Merchant>, StoreError> {
        self.backend.merchant(id).await
    }

    /// Distinct contribution counts per cell of one bucket, each device clipped to its
    /// `max_cells_per_device` lowest cells (the bound the release's noise is calibrated for).
    pub async fn bucket_counts(
        &self,
        bucket: Timestamp,
        max_cells_per_device: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.backend
            .bucket_counts(bucket, max_cells_per_device)
            .await
    }

    /// Buckets that still hold raw contributions, oldest first.
    pub async fn unreleased_buckets(&self) -> Result<Vec<Timestamp>, StoreError> {
        self.backend.unreleased_buckets().await
    }

    /// Every unreleased contribution as (device, cell, bucket), to rebuild bounds at start.
    pub async fn load_contributions(&self) -> Result<Vec<(DeviceId, u64, Timestamp)>, StoreError> {
        self.backend.load_contributions().await
    }

    /// Per-bucket contribution spend (pairs, no cell) of buckets starting at or before
    /// `through`, to rebuild the rolling per-day bound at start.
    pub async fn load_contribution_spend(
        &self,
        through: Timestamp,
    ) -> Result<Vec<(DeviceId, Timestamp, u32)>, StoreError> {
        self.backend.load_contribution_spend(through).await
    }

    /// Ledger entries of buckets starting in `[start, end)`, oldest first.
    pub async fn ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.backend.ledger(start, end).await
    }

    /// Start of the newest released bucket, if any.
    pub async fn last_release(&self) -> Result<Option<Timestamp>, StoreError> {
        self.backend.last_release().await
    }

    /// Released counts of `cells` for buckets starting in `[start, end)`.
    pub async fn released(
        &self,
        cells: &[u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<ReleasedCount>, StoreError> {
        self.backend.released(cells, start, end).await
    }

    /// Every delivery sent in `[start, end)`, oldest first: raw rows for the offer-statistics
    /// release only (they name device pseudonyms and never leave `privacy`).
    pub async fn deliveries(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        self.backend.deliveries(start, end).await
    }

    /// Start of the newest released day of offer statistics, if any.
    pub async fn last_offer_stats_day(&self) -> Result<Option<Timestamp>, StoreError> {
        self.backend.last_offer_stats_day().await
    }

    /// A merchant's released offer statistics of days starting in `[start, end)`, by day.
    pub async fn offer_stats(
        &self,
        merchant_id: MerchantId,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<OfferStatRow>, StoreError> {
        self.backend.offer_stats(merchant_id, start, end).await
    }

    /// Offer-statistics ledger entries of days starting in `[start, end)`, oldest first.
    pub async fn offer_stats_ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<OfferStatsLedgerEntry>, StoreError> {
        self.backend.offer_stats_ledger(start, end).await
    }

    /// Distinct daily contribution counts per cell of the UTC day starting at `day`.
    pub async fn day_counts(&self, day: Timestamp) -> Result<Vec<(u64, u64)>, StoreError> {
        self.backend.day_counts(day).await
    }

    /// Every unreleased daily contribution as (device, cell, day), to rebuild bounds at start.
    pub async fn load_daily_contributions(
        &self,
    ) -> Result<Vec<(DeviceId, u64, Timestamp)>, StoreError> {
        self.backend.load_daily_contributions().await
    }

    /// Start of the newest released day of daily counts, if any.
    pub async fn last_daily_release(&self) -> Result<Option<Timestamp>, StoreError> {
        self.backend.last_daily_release().await
    }

    /// Daily-release ledger entries of days starting in `[start, end)`, oldest first.
    pub async fn daily_ledger(
        &self,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.backend.daily_ledger(start, end).await
    }

    /// Released daily counts of `cells` for days starting in `[start, end)` (`bucket` is the
    /// day's start).
    pub async fn released_days(
        &self,
        cells: &[u64],
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Vec<ReleasedCount>, StoreError> {
        self.backend.released_days(cells, start, end).await
    }

    /// Every merchant, oldest first.
    pub async fn merchants(&self) -> Result<Vec<Merchant>, StoreError> {
        self.backend.merchants().await
    }
}

#[cfg(test)]
mod tests;
