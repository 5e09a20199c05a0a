//! The decision pipeline for presence reports, in this order: (validated input) → per-device
//! rate limit → consent → dwell update → candidate offers from the index → every cap →
//! record the notification durably → reply.
//!
//! Architecture invariants: the decision runs on in-memory state under the device's shard
//! lock (no SQL, no await), so two concurrent reports of one device cannot both pass a cap;
//! everything the decision changed is written through the group commit before the reply is
//! released; if that write fails, the reply is an error and no offer is shown (state stays
//! as if it had been sent, which can only mean fewer notifications, never more).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use h3o::CellIndex;

use crate::caps::{self, FloodGuard, Reason, Sent, Standing};
use crate::clock::{SharedClock, Timestamp};
use crate::consent::ConsentLocks;
use crate::devices::Devices;
use crate::model::{Feedback, Notification, Offer, OfferId, Purpose, Restriction};
use crate::nodes::Nodes;
use crate::offers::OfferIndex;
use crate::privacy::Insights;
use crate::pseudonym::DeviceId;
use crate::settings::LiveSettings;
use crate::store::{
    DeliveryLimits, DeviceCheck, Store, StoreError, StoredDevice, WriteOp, WriteResult,
};

/// A validated report.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub device: DeviceId,
    /// Already admitted (coarsened) to `location.max_resolution`.
    pub cell: CellIndex,
    pub observed_at: Timestamp,
    pub utc_offset_minutes: i32,
}

/// Why this device was notified, in numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub grid_distance: u32,
    pub dwell: Duration,
    pub remaining_today: u32,
    pub remaining_this_week: u32,
}

/// The outcome of a report.
#[derive(Debug, Clone)]
pub struct Decision {
    pub offers: Vec<(Offer, Explanation)>,
    /// `None` when offers were given.
    pub reason: Option<Reason>,
    pub cell: u64,
}

/// Why a report could not be processed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PresenceError {
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("no notification of this offer to this device")]
    UnknownOffer,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often a device's row (last sighting, last activity) is refreshed in the store while
/// nothing durable changes: the recovered dwell after a crash is at most this stale.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Pending durable effects of a decision; the reply may be released once it resolves.
pub type Commit = Option<WriteOp>;

/// The presence engine.
#[derive(Debug, Clone)]
pub struct Presence {
    devices: Arc<Devices>,
    index: Arc<OfferIndex>,
    store: Store,
    clock: SharedClock,
    settings: LiveSettings,
    insights: Insights,
    flood: Arc<FloodGuard>,
    /// Devices looked up in the store and not found, and when (the negative cache).
    misses: Arc<std::sync::Mutex<std::collections::HashMap<DeviceId, Timestamp>>>,
    nodes: Arc<Nodes>,
    consent_locks: ConsentLocks,
}

/// How long a device not found in the store is answered from memory alone (NO_CONSENT)
/// before it is looked up again.
pub const MISS_TTL: Duration = Duration::from_secs(2);
/// Most devices held in the negative cache.
pub const MISS_CAPACITY: usize = 10_000;

impl Presence {
    pub fn new(
        devices: Arc<Devices>,
        index: Arc<OfferIndex>,
        store: Store,
        clock: SharedClock,
        settings: LiveSettings,
        insights: Insights,
    ) -> Self {
        let nodes = Arc::new(Nodes::new(store.clone()));
        Presence {
            devices,
            index,
            store,
            clock,
            settings,
            insights,
            flood: Arc::default(),
            misses: Arc::default(),
            nodes,
            consent_locks: ConsentLocks::default(),
        }
    }

    /// Takes the consent changes' lock stripes, so loads from the store and consent changes
    /// of one device run one at a time.
    pub fn with_consent_locks(mut self, locks: ConsentLocks) -> Self {
        self.consent_locks = locks;
        self
    }

    /// Uses `nodes` as this node's membership (e.g. with an id kept in the data dir).
    pub fn with_nodes(mut self, nodes: Nodes) -> Self {
        self.nodes = Arc::new(nodes);
        self
    }

    /// The nodes sharing this store, as this node sees them (its share of the rate limit).
    pub fn nodes(&self) -> &Arc<Nodes> {
        &self.nodes
    }

    /// Decides and durably records one report.
    pub async fn report(&self, report: Report) -> Result<Decision, PresenceError> {
        self.look_up_if_unknown(report.device).await?;
        let (decision, commit) = self.decide(report)?;
        self.commit(decision, commit).await
    }

    /// Writes what a decision changed and returns what may be shown. A notification is
    /// recorded only if, in the committing transaction, the device still consents and the
    /// offer's merchant is not revoked (another process, e.g. `hexveil merchant revoke`, or
    /// another node may have changed either since the decision); if any was refused, no offer
    /// is shown — the reservations it took stay taken, which means fewer offers, never more.
    pub async fn commit(
        &self,
        mut decision: Decision,
        commit: Commit,
    ) -> Result<Decision, PresenceError> {
        let Some(op) = commit else {
            return Ok(decision);
        };
        let expected = notifications_in(&op);
        let device = offered_device(&op);
        let recorded = match self.store.write(op).await? {
            WriteResult::Count(n) => n,
            WriteResult::Done => 0,
        };
        if recorded < expected {
            metrics::counter!("hexveil_offers_withheld_total").increment(expected - recorded);
            decision.offers.clear();
            decision.reason = Some(Reason::NoOffersNearby);
            // The store (all nodes' state) refused what memory allowed: memory is stale.
            // Converge on the store's view (or forget a device that no longer consents).
            // The refused reply is already safe; a failed reload only leaves the cache stale.
            if let Some(device) = device
                && let Err(e) = self.reload(device).await
            {
                tracing::warn!(error = %e, "could not reload a device after a refused reply");
            }
        } else {
            metrics::counter!("hexveil_offers_delivered_total").increment(recorded);
        }
        Ok(decision)
    }

    /// Decides one report on in-memory state (no I/O). Returns the decision and the writes
    /// that must commit before it is shown.
    pub fn decide(&self, r: Report) -> Result<(Decision, Commit), PresenceError> {
        let settings = self.settings.current();
        let config = &settings.config;
        let now = self.clock.now();
        let cell = u64::from(r.cell);
        let mut shard = self.devices.lock(&r.device);
        let Some(state) = shard.get_mut(&r.device) else {
            return Ok((no_offer(Reason::NoConsent, cell), None));
        };
        // This node's share of the limit: N nodes together allow no more than one would.
        let limits = &config.rate_limits;
        let (per_hour, burst) = self
            .nodes
            .share(limits.device_reports_per_hour, limits.device_burst)
            .map_err(|why| match why {
                crate::nodes::NoShare::Joining => PresenceError::RateLimited {
                    retry_after: crate::nodes::HEARTBEAT,
                },
                crate::nodes::NoShare::LeaseLapsed => PresenceError::Store(
                    StoreError::Unavailable("this node cannot renew its membership".into()),
                ),
            })?;
        state
            .rate_limit(now, per_hour, burst)
            .map_err(|retry_after| PresenceError::RateLimited { retry_after })?;

        let prev = state.dwell();
        let dwell = caps::update_dwell(
            prev,
            cell,
            r.observed_at,
            config.offers.max_report_age.get(),
        );
        state.set_dwell(dwell);
        state.set_last_activity(now);
        // Durable work only for new facts: a dwell that starts (or a new current cell) is
        // written before the reply; a report that only moves "last seen" is answered from
        // memory, and the row is refreshed behind it at most every TOUCH_EVERY. After a
        // crash the recovered last sighting is older than the real one, so a dwell that
        // cannot be proven continuous restarts: fewer offers, never more.
        let new_fact = prev.is_none_or(|p| {
            p.cell != dwell.cell || p.anchor != dwell.anchor || p.since != dwell.since
        });
        let row = WriteOp::Presence {
            device: r.device,
            dwell,
            now,
        };
        let mut ops = Vec::new();
        if new_fact {
            ops.push(row);
            state.mark_persisted(now);
        } else if state.persist_due(now, TOUCH_EVERY)
            && self.store.write_behind(WriteOp::Seen {
                device: r.device,
                dwell,
                now,
            })
        {
            // Marked only once queued: a dropped refresh is tried again on the next report.
            state.mark_persisted(now);
        }
        // Foot traffic counts every accepted report of a consenting device, offer or not.
        if let Some(op) =
            self.insights
                .contribute(state, r.device, cell, r.observed_at, now, config)
        {
            ops.push(op);
        }

        let outcome = self.choose(state, &r, &dwell, now, &settings.config);
        let decision = match outcome {
            Err(reason) => no_offer(reason, cell),
            Ok(chosen) => {
                let mut offers = Vec::with_capacity(chosen.len());
                let mut deliveries = Vec::with_capacity(chosen.len());
                for (entry, mut why) in chosen {
                    let offer = entry.offer.clone();
                    let notification = Notification {
                        notification_id: uuid::Uuid::new_v4(),
                        device: r.device,
                        offer_id: offer.offer_id,
                        merchant_id: offer.merchant_id,
                        cell,
                        sent_at: now,
                        feedback: None,
                    };
                    state.push_sent(
                        notification.notification_id,
                        cell,
                        Sent {
                            offer_id: offer.offer_id,
                            merchant_id: offer.merchant_id,
                            sent_at: now,
                            feedback: None,
                        },
                        now,
                    );
                    // The offer's budget and the cell's flood guard were reserved when the
                    // offer was chosen.
                    why.remaining_today =
                        why.remaining_today.saturating_sub(offers.len() as u32 + 1);
                    why.remaining_this_week = why
                        .remaining_this_week
                        .saturating_sub(offers.len() as u32 + 1);
                    deliveries.push((
                        notification,
                        DeliveryLimits {
                            offer_per_day: offer.max_notifications_per_day,
                            cell_per_minute: config.caps.per_cell_per_minute,
                        },
                    ));
                    offers.push((offer, why));
                }
                let merchants: Vec<_> = offers.iter().map(|(o, _)| o.merchant_id).collect();
                ops.push(WriteOp::DeliverChecked {
                    device: r.device,
                    check: reply_check(settings.clone(), r, dwell.cell, now, merchants),
                    deliveries,
                });
                Decision {
                    offers,
                    reason: None,
                    cell,
                }
            }
        };
        if let Some(reason) = decision.reason {
            metrics::counter!("hexveil_no_offer_total", "reason" => reason.as_str()).increment(1);
        }
        let op = match ops.len() {
            0 => None,
            1 => ops.pop(),
            _ => Some(WriteOp::Many(ops)),
        };
        Ok((decision, op))
    }

    /// Every rule after dwell, in order; the offers to send or the first reason not to.
    ///
    /// The device-level caps are checked before offers are looked up, because they do not
    /// depend on them and usually decide; a failing cap is reported only if some offer is
    /// nearby at all (else NO_OFFERS_NEARBY, as the pipeline order says).
    fn choose(
        &self,
        state: &crate::devices::DeviceState,
        r: &Report,
        dwell: &crate::model::Dwell,
        now: Timestamp,
        config: &crate::config::Config,
    ) -> Result<Vec<(Arc<crate::offers::OfferEntry>, Explanation)>, Reason> {
        if !state.purposes.contains(Purpose::NearbyOffers) {
            return Err(Reason::NoConsent);
        }
        let exclusions = &config.exclusions.cells;
        if crate::cells::excluded(u64::from(r.cell), exclusions) {
            return Err(Reason::NoOffersNearby);
        }
        let age = now.millis() - r.observed_at.millis();
        if age > crate::clock::duration_millis(config.offers.max_report_age.get()) {
            return Err(Reason::StaleReport);
        }
        let max_k = config.offers.max_radius_k;
        let offset = r.utc_offset_minutes;
        let log = state.sent();
        let allowance = match caps::device_caps(&config.caps, log, dwell, offset, now) {
            Ok(a) => a,
            Err(reason) => {
                let nearby = self
                    .index
                    .any_nearby(r.cell, max_k, now, offset, exclusions);
                return Err(if nearby {
                    reason
                } else {
                    Reason::NoOffersNearby
                });
            }
        };
        let room = config
            .offers
            .max_offers_per_reply
            .min(allowance.remaining_day)
            .min(allowance.remaining_week) as usize;
        let mut first_reason = None;
        let mut chosen: Vec<(Arc<crate::offers::OfferEntry>, Explanation)> = Vec::new();
        self.index
            .visit(r.cell, max_k, now, offset, exclusions, |entry, distance| {
                let offer = &entry.offer;
                if chosen
                    .iter()
                    .any(|(c, _)| c.offer.merchant_id == offer.merchant_id)
                {
                    return ControlFlow::Continue(());
                }
                let verdict = caps::merchant_caps(
                    &config.caps,
                    state.standing(offer.merchant_id),
                    log,
                    offer.merchant_id,
                    now,
                )
                .and_then(|()| {
                    // Check and reserve the offer's daily budget and the cell's flood guard
                    // under their locks at once: no other device can take the same last
                    // place between the check and the record.
                    let mut sent = entry.sent.lock().unwrap_or_else(|p| p.into_inner());
                    caps::offer_cap(offer.max_notifications_per_day, &sent, now)?;
                    self.flood.try_take(
                        u64::from(r.cell),
                        now,
                        config.caps.per_cell_per_minute,
                        || caps::take_offer_budget(offer.max_notifications_per_day, &mut sent, now),
                    )
                });
                match verdict {
                    Ok(()) => {
                        let why = Explanation {
                            grid_distance: distance,
                            dwell: Duration::from_millis(
                                (now.millis() - dwell.since.millis()).max(0) as u64,
                            ),
                            remaining_today: allowance.remaining_day,
                            remaining_this_week: allowance.remaining_week,
                        };
                        chosen.push((entry.clone(), why));
                    }
                    Err(reason) => {
                        first_reason.get_or_insert(reason);
                    }
                }
                if chosen.len() >= room {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
        if chosen.is_empty() {
            return Err(first_reason.unwrap_or(Reason::NoOffersNearby));
        }
        Ok(chosen)
    }

    /// Whether `device` is unknown here and was not looked up in vain in the last
    /// [`MISS_TTL`]: a device may have consented at another node after this one started.
    pub fn needs_lookup(&self, device: &DeviceId) -> bool {
        if self.devices.lock(device).contains_key(device) {
            return false;
        }
        let now = self.clock.now();
        let misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        misses
            .get(device)
            .is_none_or(|at| now.millis() - at.millis() >= crate::clock::duration_millis(MISS_TTL))
    }

    /// Looks up in the store a device this node does not hold (validated tokens only: the
    /// caller has pseudonymized a well-formed one) and takes it into memory if it consents;
    /// a device not found is remembered for [`MISS_TTL`], so hostile unknown tokens cost one
    /// read each per TTL at most (and none once [`MISS_CAPACITY`] misses are held: then an
    /// unknown device is answered from memory alone — NO_CONSENT, sending less).
    pub async fn look_up_if_unknown(&self, device: DeviceId) -> Result<(), PresenceError> {
        if !self.needs_lookup(&device) {
            return Ok(());
        }
        {
            let now = self.clock.now();
            let mut misses = self.misses.lock().unwrap_or_else(|p| p.into_inner());
            if misses.len() >= MISS_CAPACITY {
                let ttl = crate::clock::duration_millis(MISS_TTL);
                misses.retain(|_, at| now.millis() - at.millis() < ttl);
                if misses.len() >= MISS_CAPACITY {
                    metrics::counter!("hexveil_device_lookups_skipped_total").increment(1);
                    return Ok(());
                }
            }
        }
        metrics::counter!("hexveil_device_lookups_total").increment(1);
        let _serialized = self.consent_locks.serialize(device).await;
        let stored = self.store.stored_device(device).await?;
        match stored {
            Some(s) if !s.row.purposes.is_empty() => {
                self.devices.load_stored(&s, false);
                self.misses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&device);
            }
            _ => {
                let now = self.clock.now();
                self.misses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(device, now);
            }
        }
        Ok(())
    }

    /// Replaces this node's memory of `device` (consent, dwell, notifications, standings)
    /// with the store's, or forgets the device if the store holds no consent for it.
    pub async fn reload(&self, device: DeviceId) -> Result<(), PresenceError> {
        metrics::counter!("hexveil_device_reloads_total").increment(1);
        let _serialized = self.consent_locks.serialize(device).await;
        match self.store.stored_device(device).await? {
            Some(s) if !s.row.purposes.is_empty() => self.devices.load_stored(&s, true),
            _ => self.devices.remove(&device),
        }
        Ok(())
    }

    /// Restores the per-cell flood counters from the deliveries (cell, sent at) of the last minute.
    pub fn load_flood(&self, deliveries: &[(u64, Timestamp)]) {
        for (cell, at) in deliveries {
            self.flood.restore(*cell, *at);
        }
    }

    /// Records feedback on the latest notification of `offer_id` to `device`.
    pub async fn feedback(
        &self,
        device: DeviceId,
        offer_id: OfferId,
        feedback: Feedback,
    ) -> Result<(), PresenceError> {
        let op = match self.feedback_op(device, offer_id, feedback) {
            // The notification may have been sent by another node: look the device up.
            Err(PresenceError::UnknownOffer) => {
                self.reload(device).await?;
                self.feedback_op(device, offer_id, feedback)?
            }
            other => other?,
        };
        self.store.write(op).await?;
        metrics::counter!("hexveil_feedback_total", "action" => feedback.as_str()).increment(1);
        Ok(())
    }

    /// Applies feedback to memory and returns its write.
    fn feedback_op(
        &self,
        device: DeviceId,
        offer_id: OfferId,
        feedback: Feedback,
    ) -> Result<WriteOp, PresenceError> {
        let settings = self.settings.current();
        let now = self.clock.now();
        let op = {
            let mut shard = self.devices.lock(&device);
            let state = shard.get_mut(&device).ok_or(PresenceError::UnknownOffer)?;
            let extra = state.extra_mut().ok_or(PresenceError::UnknownOffer)?;
            let i = extra
                .sent
                .iter()
                .rposition(|e| e.offer_id == offer_id)
                .ok_or(PresenceError::UnknownOffer)?;
            let entry = &mut extra.sent[i];
            // OPENED is never overwritten: it is what ends fatigue.
            if entry.feedback != Some(Feedback::Opened) || feedback == Feedback::Opened {
                entry.feedback = Some(feedback);
            }
            let (notification_id, merchant_id) = (extra.meta[i].0, entry.merchant_id);
            let stored_feedback = entry.feedback.unwrap_or(feedback);
            let standing = state.standing(merchant_id);
            let new_standing = match feedback {
                Feedback::Opened => None,
                Feedback::Dismissed => {
                    Some(caps::after_dismissal(&settings.config.caps, standing, now))
                }
                Feedback::MuteMerchant => Some(Standing {
                    muted: true,
                    ..standing
                }),
            };
            if let Some(s) = new_standing {
                state.set_standing(merchant_id, s);
            }
            state.set_last_activity(now);
            WriteOp::Feedback {
                device,
                notification_id,
                feedback: stored_feedback,
                restriction: new_standing.map(|s| Restriction {
                    device,
                    merchant_id,
                    muted: s.muted,
                    dismissals: s.dismissals,
                    backoff_until: s.backoff_until,
                }),
                now,
            }
        };
        Ok(op)
    }
}

/// The check a reply's offers must pass on the device as stored (see
/// [`caps::recheck_reply`]): consent to offers, the stored dwell, every device and merchant
/// cap over all nodes' notifications and standings — with the config the decision used.
/// `cell` is the cell of the dwell the decision used (the stored one must be the same).
fn reply_check(
    settings: Arc<crate::settings::Settings>,
    r: Report,
    cell: u64,
    now: Timestamp,
    merchants: Vec<crate::model::MerchantId>,
) -> DeviceCheck {
    DeviceCheck(Arc::new(move |stored: &StoredDevice| {
        if !stored.row.purposes.contains(Purpose::NearbyOffers) {
            return false;
        }
        let log: Vec<Sent> = stored.notifications.iter().map(Sent::from).collect();
        let standing = |m| {
            stored
                .restrictions
                .iter()
                .find(|x| x.merchant_id == m)
                .map(Standing::from)
                .unwrap_or_default()
        };
        caps::recheck_reply(
            &settings.config.caps,
            &log,
            standing,
            stored.row.dwell.as_ref(),
            cell,
            r.utc_offset_minutes,
            now,
            &merchants,
        )
        .is_ok()
    }))
}

/// The device a commit offers something to, if it does.
fn offered_device(op: &WriteOp) -> Option<DeviceId> {
    match op {
        WriteOp::DeliverChecked { device, .. } => Some(*device),
        WriteOp::Notify(n)
        | WriteOp::Deliver {
            notification: n, ..
        } => Some(n.device),
        WriteOp::Many(ops) => ops.iter().find_map(offered_device),
        _ => None,
    }
}

/// Notifications a commit records (each must be recorded for the decision to be shown).
fn notifications_in(op: &WriteOp) -> u64 {
    match op {
        WriteOp::Notify(_) | WriteOp::Deliver { .. } => 1,
        WriteOp::DeliverChecked { deliveries, .. } => deliveries.len() as u64,
        WriteOp::Many(ops) => ops.iter().map(notifications_in).sum(),
        _ => 0,
    }
}

fn no_offer(reason: Reason, cell: u64) -> Decision {
    Decision {
        offers: Vec::new(),
        reason: Some(reason),
        cell,
    }
}
