//! Consent and transparency: receipts, what is held about a device, erasure, retention.
//!
//! API boundary: callers pass a [`DeviceId`], never a token. Architecture invariant: an empty
//! purpose list erases the device (nothing is kept "just in case"), and every item shown by
//! [`Consents::my_data`] carries the deadline by which it is deleted.

use std::time::Duration;

use std::sync::Arc;

use crate::clock::{SharedClock, Timestamp};
use crate::devices::Devices;
use crate::model::{ConsentReceipt, CurrentCell, Notification, Purposes, Restriction};
use crate::pseudonym::DeviceId;
use crate::settings::LiveSettings;
use crate::store::{Store, StoreError};

/// Why a consent operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsentError {
    /// The device has no consent on record.
    #[error("no consent on record for this device")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A receipt as shown to the device: the stored receipt plus what follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptView {
    pub receipt: ConsentReceipt,
    /// When the consent (and all state kept under it) expires without activity.
    pub expires_at: Timestamp,
    /// True for the receipt of a withdrawal (empty purposes); such receipts are not stored.
    pub withdrawn: bool,
}

/// Everything held about one device, each item with its deletion deadline.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MyData {
    pub device: Option<DeviceId>,
    pub receipts: Vec<ReceiptView>,
    pub current_cell: Option<CurrentCell>,
    /// Newest first.
    pub notifications: Vec<Notification>,
    pub restrictions: Vec<Restriction>,
    /// Unreleased foot-traffic contributions and when the last of them is deleted.
    pub pending_contributions: Option<(u64, Timestamp)>,
    /// Contribution spend (pairs per bucket, no cells) kept to hold the per-day bound over any
    /// 24 hours, and when the last of it is deleted.
    pub contribution_spend: Option<(u64, Timestamp)>,
    /// Unreleased daily contributions (cell, UTC day) and when the last of them is deleted.
    pub pending_daily_contributions: Option<(u64, Timestamp)>,
    pub last_activity: Option<Timestamp>,
    /// When everything expires if the device stays inactive.
    pub retention_deadline: Option<Timestamp>,
}

/// Lock stripes serializing consent changes per device.
const CONSENT_STRIPES: usize = 256;

/// The consent and transparency domain service.
#[derive(Debug, Clone)]
pub struct Consents {
    store: Store,
    devices: Arc<Devices>,
    clock: SharedClock,
    settings: LiveSettings,
    /// Consent changes of one device run one at a time (store and memory in the same order
    /// for grant and withdrawal), so racing changes cannot leave memory and store disagreeing.
    changes: ConsentLocks,
}

/// The lock stripes serializing consent changes per device; shared with `Presence`, whose
/// loads of a device from the store (a cache miss, a reload) take the same lock, so a load
/// racing a withdrawal cannot put the erased device back into memory.
#[derive(Debug, Clone)]
pub struct ConsentLocks(Arc<[tokio::sync::Mutex<()>]>);

impl Default for ConsentLocks {
    fn default() -> Self {
        ConsentLocks(
            (0..CONSENT_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        )
    }
}

impl ConsentLocks {
    /// Waits for the device's other consent changes (and loads) to finish.
    pub async fn serialize(&self, device: DeviceId) -> tokio::sync::MutexGuard<'_, ()> {
        self.0[usize::from(device.0[14]) % CONSENT_STRIPES]
            .lock()
            .await
    }
}

impl Consents {
    pub fn new(
        store: Store,
        devices: Arc<Devices>,
        clock: SharedClock,
        settings: LiveSettings,
    ) -> Self {
        Consents {
            store,
            devices,
            clock,
            settings,
            changes: ConsentLocks::default(),
        }
    }

    /// The lock stripes of consent changes (for `Presence`'s loads from the store).
    pub fn locks(&self) -> ConsentLocks {
        self.changes.clone()
    }

    /// Waits for the device's other consent changes to finish.
    async fn serialize(&self, device: DeviceId) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.serialize(device).await
    }

    fn retention(&self) -> Duration {
        self.settings.current().config.retention.device_state()
    }

    /// Replaces the device's consent with `purposes`. An empty set withdraws consent and
    /// erases everything held about the device; the returned receipt records the withdrawal.
    pub async fn set(
        &self,
        device: DeviceId,
        purposes: Purposes,
        policy_version: String,
    ) -> Result<ReceiptView, ConsentError> {
        let _serialized = self.serialize(device).await;
        let now = self.clock.now();
        let settings = self.settings.current();
        let receipt = ConsentReceipt {
            receipt_id: uuid::Uuid::new_v4().to_string(),
            device,
            purposes,
            granted_at: now,
            policy_version,
            controller: settings.config.policy.controller.clone(),
        };
        if purposes.is_empty() {
            // Memory first: from here on no report of this device is acted upon, even if the
            // store write below fails (then the caller retries; nothing was acknowledged).
            self.devices.remove(&device);
            let erased = self.store.erase_device(device).await?;
            tracing::info!(%device, erased, "consent withdrawn, device erased");
            metrics::counter!("hexveil_consent_withdrawals_total").increment(1);
            return Ok(ReceiptView {
                receipt,
                expires_at: now,
                withdrawn: true,
            });
        }
        self.store.put_consent(receipt.clone(), now).await?;
        self.devices.set_purposes(device, purposes, now);
        for p in purposes.iter() {
            metrics::counter!("hexveil_consent_grants_total", "purpose" => p.as_str()).increment(1);
        }
        Ok(ReceiptView {
            receipt,
            expires_at: now.plus(self.retention()),
            withdrawn: false,
        })
    }

    /// The receipt in force, or [`ConsentError::NotFound`].
    pub async fn get(&self, device: DeviceId) -> Result<ReceiptView, ConsentError> {
        let snapshot = self
            .store
            .device_snapshot(device)
            .await?
            .ok_or(ConsentError::NotFound)?;
        let expires_at = snapshot.last_activity.plus(self.retention());
        let receipt = snapshot
            .receipts
            .into_iter()
            .next()
            .ok_or(ConsentError::NotFound)?;
        Ok(ReceiptView {
            receipt,
            expires_at,
            withdrawn: false,
        })
    }

    /// Everything held about the device (empty when nothing is).
    pub async fn my_data(&self, device: DeviceId) -> Result<MyData, ConsentError> {
        let Some(snapshot) = self.store.device_snapshot(device).await? else {
            return Ok(MyData::default());
        };
        let deadline = snapshot.last_activity.plus(self.retention());
        Ok(MyData {
            device: Some(device),
            receipts: snapshot
                .receipts
                .into_iter()
                .map(|receipt| ReceiptView {
                    receipt,
                    expires_at: deadline,
                    withdrawn: false,
                })
                .collect(),
            current_cell: snapshot.current_cell,
            notifications: snapshot.notifications,
            restrictions: snapshot.restrictions,
            pending_contributions: snapshot.latest_pending_bucket.map(|b| {
                let ins = &self.settings.current().config.insights;
                (
                    snapshot.pending_contributions,
                    b.plus(ins.bucket.get()).plus(ins.grace.get()),
                )
            }),
            contribution_spend: snapshot.latest_spend_bucket.map(|b| {
                let ins = &self.settings.current().config.insights;
                (
                    snapshot.contribution_spend,
                    // Deleted by the release of the bucket a day later.
                    b.plus(crate::caps::DAY)
                        .plus(ins.bucket.get())
                        .plus(ins.grace.get()),
                )
            }),
            pending_daily_contributions: snapshot.latest_pending_day.map(|d| {
                let ins = &self.settings.current().config.insights;
                (
                    snapshot.pending_daily_contributions,
                    // Deleted by the release of the day.
                    d.plus(crate::caps::DAY).plus(ins.grace.get()),
                )
            }),
            last_activity: Some(snapshot.last_activity),
            retention_deadline: Some(deadline),
        })
    }

    /// Erases everything held about the device; returns the number of records erased.
    pub async fn forget(&self, device: DeviceId) -> Result<u64, ConsentError> {
        let _serialized = self.serialize(device).await;
        self.devices.remove(&device);
        let erased = self.store.erase_device(device).await?;
        metrics::counter!("hexveil_forget_me_total").increment(1);
        tracing::info!(%device, erased, "device erased on request");
        Ok(erased)
    }

    /// Erases every device idle for longer than `retention.device_days`; returns how many.
    pub async fn expire_idle(&self) -> Result<u64, ConsentError> {
        let cutoff = self.clock.now().minus(self.retention());
        self.devices.expire_idle(cutoff);
        // Memory knows last activity exactly; the rows only lazily. A device memory saw after
        // the cutoff is written first, so the sweep never erases an active device.
        let active = self.devices.active_but_stale(cutoff);
        let n = self.store.expire_idle(cutoff, active).await?;
        if n > 0 {
            tracing::info!(devices = n, "retention expired idle devices");
        }
        metrics::counter!("hexveil_retention_expired_devices_total").increment(n);
        Ok(n)
    }
}
