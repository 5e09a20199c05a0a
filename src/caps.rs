//! Intrusiveness caps: every rule of SPEC §4 as a small pure function over (state, config,
//! now), plus the GCRA rate limiter. Nothing here does I/O or reads a clock, so each rule is
//! tested on its own with plain numbers.
//!
//! Windows are rolling: a "day" is the last 24 h, a "week" the last 7 × 24 h.

use std::time::Duration;

use crate::clock::{Timestamp, duration_millis};
use crate::config::{CapsConfig, QuietHours};
use crate::model::{Dwell, Feedback, MerchantId};

/// Why a report got no offer (mirrors the wire enum; `None` is not a reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    NoConsent,
    NoOffersNearby,
    DwellNotMet,
    QuietHours,
    MinInterval,
    DailyCap,
    WeeklyCap,
    MerchantCap,
    DismissalBackoff,
    MerchantMuted,
    OfferCap,
    StaleReport,
    GlobalCellCap,
}

impl Reason {
    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoConsent => "NO_CONSENT",
            Reason::NoOffersNearby => "NO_OFFERS_NEARBY",
            Reason::DwellNotMet => "DWELL_NOT_MET",
            Reason::QuietHours => "QUIET_HOURS",
            Reason::MinInterval => "MIN_INTERVAL",
            Reason::DailyCap => "DAILY_CAP",
            Reason::WeeklyCap => "WEEKLY_CAP",
            Reason::MerchantCap => "MERCHANT_CAP",
            Reason::DismissalBackoff => "DISMISSAL_BACKOFF",
            Reason::MerchantMuted => "MERCHANT_MUTED",
            Reason::OfferCap => "OFFER_CAP",
            Reason::StaleReport => "STALE_REPORT",
            Reason::GlobalCellCap => "GLOBAL_CELL_CAP",
        }
    }
}

pub const DAY: Duration = Duration::from_secs(86_400);
pub const WEEK: Duration = Duration::from_secs(7 * 86_400);

/// GCRA (generic cell rate algorithm): `tat` is the theoretical arrival time in ms. Allows
/// `burst` back-to-back requests, then one per `3600 s / per_hour`. On refusal the state is
/// unchanged and the wait until the next allowed request is returned.
///
/// Hand-written rather than taken from `governor` because its state (8 bytes) lives inside
/// each device's record — one map, not two — and it must read the injected clock and follow
/// config reloads.
pub fn gcra(tat: &mut i64, now: Timestamp, per_hour: u32, burst: u32) -> Result<(), Duration> {
    let interval = 3_600_000 / i64::from(per_hour.max(1));
    let tolerance = interval * i64::from(burst.max(1) - 1);
    let t = (*tat).max(now.millis());
    let ahead = t - now.millis();
    if ahead > tolerance {
        return Err(Duration::from_millis((ahead - tolerance) as u64));
    }
    *tat = t + interval;
    Ok(())
}

/// Dwell is continuous presence within `grid_disk(anchor, 1)`, with reports at most `gap`
/// apart; leaving the disk (or a silence longer than `gap`) starts a new dwell. Reports
/// older than the last one seen do not move dwell backwards.
pub fn update_dwell(
    prev: Option<Dwell>,
    cell: u64,
    observed_at: Timestamp,
    gap: Duration,
) -> Dwell {
    let fresh = Dwell {
        anchor: cell,
        cell,
        since: observed_at,
        last_seen: observed_at,
    };
    let Some(prev) = prev else {
        return fresh;
    };
    if observed_at < prev.last_seen {
        return prev;
    }
    let continuous = observed_at.millis() - prev.last_seen.millis() <= duration_millis(gap);
    if continuous && within_one_ring(prev.anchor, cell) {
        Dwell {
            anchor: prev.anchor,
            cell,
            since: prev.since,
            last_seen: observed_at,
        }
    } else {
        fresh
    }
}

fn within_one_ring(a: u64, b: u64) -> bool {
    match (h3o::CellIndex::try_from(a), h3o::CellIndex::try_from(b)) {
        (Ok(a), Ok(b)) => a.grid_distance(b).is_ok_and(|d| d <= 1),
        _ => false,
    }
}

/// One delivered notification, as the caps see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub offer_id: uuid::Uuid,
    pub merchant_id: MerchantId,
    pub sent_at: Timestamp,
    pub feedback: Option<Feedback>,
}

impl From<&crate::model::Notification> for Sent {
    fn from(n: &crate::model::Notification) -> Self {
        Sent {
            offer_id: n.offer_id,
            merchant_id: n.merchant_id,
            sent_at: n.sent_at,
            feedback: n.feedback,
        }
    }
}

/// What is left of a device's allowance after the device-level caps passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub remaining_day: u32,
    pub remaining_week: u32,
}

/// Minute of the local day (0..1440) at `t` for a device `utc_offset_minutes` from UTC.
pub fn local_minute(t: Timestamp, utc_offset_minutes: i32) -> u16 {
    let m = t.millis().div_euclid(60_000) + i64::from(utc_offset_minutes);
    m.rem_euclid(1440) as u16
}

/// Consecutive most recent notifications without OPENED feedback.
pub fn ignored_streak(log: &[Sent]) -> u32 {
    log.iter()
        .rev()
        .take_while(|s| s.feedback != Some(Feedback::Opened))
        .count() as u32
}

/// A cap, halved (but never below 1) while the device is fatigued.
fn fatigue_adjusted(cap: u32, fatigued: bool) -> u32 {
    if fatigued && cap > 0 {
        (cap / 2).max(1)
    } else {
        cap
    }
}

/// The device-level caps, in order: dwell, quiet hours, min interval, day, week.
/// `log` is the device's notification log, oldest first.
pub fn device_caps(
    caps: &CapsConfig,
    log: &[Sent],
    dwell: &Dwell,
    utc_offset_minutes: i32,
    now: Timestamp,
) -> Result<Allowance, Reason> {
    if now.millis() - dwell.since.millis() < duration_millis(caps.min_dwell.get()) {
        return Err(Reason::DwellNotMet);
    }
    if quiet(caps.quiet_hours, now, utc_offset_minutes) {
        return Err(Reason::QuietHours);
    }
    if let Some(last) = log.last()
        && now.millis() - last.sent_at.millis() < duration_millis(caps.min_interval.get())
    {
        return Err(Reason::MinInterval);
    }
    let fatigued =
        caps.ignore_fatigue_after > 0 && ignored_streak(log) >= caps.ignore_fatigue_after;
    let day_cap = fatigue_adjusted(caps.per_device_per_day, fatigued);
    let week_cap = fatigue_adjusted(caps.per_device_per_week, fatigued);
    let in_day = count_since(log, now.minus(DAY));
    if in_day >= day_cap {
        return Err(Reason::DailyCap);
    }
    let in_week = count_since(log, now.minus(WEEK));
    if in_week >= week_cap {
        return Err(Reason::WeeklyCap);
    }
    Ok(Allowance {
        remaining_day: day_cap - in_day,
        remaining_week: week_cap - in_week,
    })
}

fn quiet(q: QuietHours, now: Timestamp, offset: i32) -> bool {
    q.contains(local_minute(now, offset))
}

/// Notifications in `log` sent after `since` (exclusive: a window is `(now - len, now]`).
pub fn count_since(log: &[Sent], since: Timestamp) -> u32 {
    log.iter().rev().take_while(|s| s.sent_at > since).count() as u32
}

/// A device's standing towards one merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    pub muted: bool,
    pub dismissals: u32,
    pub backoff_until: Option<Timestamp>,
}

impl From<&crate::model::Restriction> for Standing {
    fn from(r: &crate::model::Restriction) -> Self {
        Standing {
            muted: r.muted,
            dismissals: r.dismissals,
            backoff_until: r.backoff_until,
        }
    }
}

/// The per-merchant caps, in order: mute, dismissal back-off, per merchant per week.
pub fn merchant_caps(
    caps: &CapsConfig,
    standing: Standing,
    log: &[Sent],
    merchant: MerchantId,
    now: Timestamp,
) -> Result<(), Reason> {
    if standing.muted {
        return Err(Reason::MerchantMuted);
    }
    if standing.backoff_until.is_some_and(|until| now < until) {
        return Err(Reason::DismissalBackoff);
    }
    let since = now.minus(WEEK);
    let to_merchant = log
        .iter()
        .filter(|s| s.merchant_id == merchant && s.sent_at > since)
        .count() as u32;
    if to_merchant >= caps.per_merchant_per_device_per_week {
        return Err(Reason::MerchantCap);
    }
    Ok(())
}

/// Every device- and merchant-level cap for one reply of offers from `merchants`, decided
/// at `now` for a device in `cell`, over the device's state as the store holds it (all
/// nodes' notifications, standings and the stored dwell): the rules of [`device_caps`] and
/// [`merchant_caps`] again, so a node's stale memory cannot let a reply through that the
/// shared state forbids. The stored dwell must be in `cell` (a device that moved at another
/// node is not offered on a stale dwell). Offers of one reply are sent at the same instant:
/// they pass min-interval together, and together must fit the day's and the week's room.
#[allow(clippy::too_many_arguments)]
pub fn recheck_reply(
    caps: &CapsConfig,
    log: &[Sent],
    standing: impl Fn(MerchantId) -> Standing,
    dwell: Option<&Dwell>,
    cell: u64,
    utc_offset_minutes: i32,
    now: Timestamp,
    merchants: &[MerchantId],
) -> Result<(), Reason> {
    let Some(dwell) = dwell.filter(|d| d.cell == cell) else {
        return Err(Reason::DwellNotMet);
    };
    let allowance = device_caps(caps, log, dwell, utc_offset_minutes, now)?;
    let n = merchants.len() as u32;
    if n > allowance.remaining_day {
        return Err(Reason::DailyCap);
    }
    if n > allowance.remaining_week {
        return Err(Reason::WeeklyCap);
    }
    for (i, m) in merchants.iter().enumerate() {
        if merchants[..i].contains(m) {
            return Err(Reason::MerchantCap);
        }
        merchant_caps(caps, standing(*m), log, *m, now)?;
    }
    Ok(())
}

/// The standing after a dismissal at `now`: the back-off escalates with each dismissal.
pub fn after_dismissal(caps: &CapsConfig, mut standing: Standing, now: Timestamp) -> Standing {
    standing.dismissals = standing.dismissals.saturating_add(1);
    let steps = &caps.dismissal_backoff;
    if let Some(step) = steps
        .get((standing.dismissals as usize).saturating_sub(1))
        .or(steps.last())
    {
        standing.backoff_until = Some(now.plus(step.get()));
    }
    standing
}

/// The per-offer daily budget: `sent` holds the offer's send times, oldest first.
pub fn offer_cap(
    max_per_day: u32,
    sent: &std::collections::VecDeque<Timestamp>,
    now: Timestamp,
) -> Result<(), Reason> {
    let since = now.minus(DAY);
    let in_day = sent.iter().rev().take_while(|t| **t > since).count() as u32;
    if in_day >= max_per_day {
        Err(Reason::OfferCap)
    } else {
        Ok(())
    }
}

/// Reserves one delivery of an offer against its daily budget: checks and appends under the
/// caller's lock on `sent`, so two devices deciding at once cannot both take the last one.
/// Entries no window can see any more are trimmed.
pub fn take_offer_budget(
    max_per_day: u32,
    sent: &mut std::collections::VecDeque<Timestamp>,
    now: Timestamp,
) -> Result<(), Reason> {
    offer_cap(max_per_day, sent, now)?;
    sent.push_back(now);
    let day_ago = now.minus(DAY);
    while sent.front().is_some_and(|t| *t <= day_ago) {
        sent.pop_front();
    }
    Ok(())
}

/// The global per-cell flood guard (`caps.per_cell_per_minute`): deliveries per cell and
/// UTC minute, across all devices. Check and take happen under one lock.
#[derive(Debug, Default)]
pub struct FloodGuard {
    /// cell -> (minute, deliveries in that minute)
    cells: std::sync::Mutex<std::collections::HashMap<u64, (i64, u32)>>,
}

/// Cells remembered before stale minutes are swept.
const FLOOD_SWEEP_AT: usize = 100_000;

impl FloodGuard {
    /// Takes one delivery in `cell` now if fewer than `cap` were taken this minute;
    /// `also` runs under the same lock once the guard has agreed (and may still refuse, in
    /// which case nothing is taken) — so a second limit can be checked and taken atomically
    /// with this one.
    pub fn try_take(
        &self,
        cell: u64,
        now: Timestamp,
        cap: u32,
        also: impl FnOnce() -> Result<(), Reason>,
    ) -> Result<(), Reason> {
        let minute = now.millis().div_euclid(60_000);
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        let used = match cells.get(&cell) {
            Some((m, n)) if *m == minute => *n,
            _ => 0,
        };
        if used >= cap {
            return Err(Reason::GlobalCellCap);
        }
        also()?;
        Self::record(&mut cells, cell, minute);
        Ok(())
    }

    /// Counts a delivery made earlier (restoring the guard at start).
    pub fn restore(&self, cell: u64, at: Timestamp) {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        Self::record(&mut cells, cell, at.millis().div_euclid(60_000));
    }

    fn record(cells: &mut std::collections::HashMap<u64, (i64, u32)>, cell: u64, minute: i64) {
        if cells.len() > FLOOD_SWEEP_AT {
            cells.retain(|_, (m, _)| *m >= minute);
        }
        let e = cells.entry(cell).or_insert((minute, 0));
        if e.0 != minute {
            *e = (minute, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests;
