//! Plain records shared by the domain modules and the store: purposes and consent receipts.
//!
//! Nothing here knows protobuf or SQL; `api` maps these to the wire and `store` to rows.

use crate::clock::Timestamp;
use crate::pseudonym::DeviceId;

/// A purpose a device can consent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Receive nearby merchant offers.
    NearbyOffers,
    /// Be counted, with DP noise, in foot-traffic statistics.
    FootTraffic,
}

impl Purpose {
    /// Every purpose, in wire order.
    pub const ALL: [Purpose; 2] = [Purpose::NearbyOffers, Purpose::FootTraffic];

    /// The purpose's bit in the stored mask.
    pub fn bit(self) -> u8 {
        match self {
            Purpose::NearbyOffers => 1,
            Purpose::FootTraffic => 2,
        }
    }

    /// A short stable name, used in logs and the plain-language policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::NearbyOffers => "nearby_offers",
            Purpose::FootTraffic => "foot_traffic",
        }
    }
}

/// A set of purposes, stored as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Purposes(u8);

impl Purposes {
    /// No purpose: consent withdrawn.
    pub const NONE: Purposes = Purposes(0);

    /// From the stored bit mask, ignoring unknown bits.
    pub fn from_bits(bits: u8) -> Purposes {
        Purposes(bits & 0b11)
    }

    /// The stored bit mask.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether `p` is granted.
    pub fn contains(self, p: Purpose) -> bool {
        self.0 & p.bit() != 0
    }

    /// Whether no purpose is granted.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The granted purposes, in wire order.
    pub fn iter(self) -> impl Iterator<Item = Purpose> {
        Purpose::ALL.into_iter().filter(move |p| self.contains(*p))
    }
}

impl FromIterator<Purpose> for Purposes {
    fn from_iter<I: IntoIterator<Item = Purpose>>(iter: I) -> Self {
        Purposes(iter.into_iter().fold(0, |acc, p| acc | p.bit()))
    }
}

/// A consent receipt: what a device agreed to, when, under which policy, with whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentReceipt {
    pub receipt_id: String,
    pub device: DeviceId,
    pub purposes: Purposes,
    pub granted_at: Timestamp,
    pub policy_version: String,
    pub controller: String,
}

/// The device's last known area, for dwell (never a history: one row, overwritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentCell {
    pub cell: u64,
    pub since: Timestamp,
    pub last_seen: Timestamp,
}

/// Everything stored about one device, as read for transparency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub device: DeviceId,
    pub created_at: Timestamp,
    pub last_activity: Timestamp,
    /// Newest first.
    pub receipts: Vec<ConsentReceipt>,
    pub current_cell: Option<CurrentCell>,
    /// Newest first.
    pub notifications: Vec<Notification>,
    pub restrictions: Vec<Restriction>,
    /// Unreleased foot-traffic contributions and the latest bucket among them.
    pub pending_contributions: u64,
    pub latest_pending_bucket: Option<Timestamp>,
    /// Contribution spend kept for the rolling per-day bound: pairs (no cells) and the latest
    /// bucket among them.
    pub contribution_spend: u64,
    pub latest_spend_bucket: Option<Timestamp>,
    /// Unreleased daily contributions (cell, UTC day) and the latest day among them.
    pub pending_daily_contributions: u64,
    pub latest_pending_day: Option<Timestamp>,
}

/// A merchant id (UUID).
pub type MerchantId = uuid::Uuid;
/// An offer id (UUID).
pub type OfferId = uuid::Uuid;

/// One opening interval: weekday 1 (Monday) to 7 (Sunday), minutes since local midnight,
/// `close` exclusive and at most 1440.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpeningHours {
    pub weekday: u8,
    pub open: u16,
    pub close: u16,
}

/// A merchant's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub offer_id: OfferId,
    pub merchant_id: MerchantId,
    pub title: String,
    pub body: String,
    pub cell: u64,
    pub radius_k: u32,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    pub max_notifications_per_day: u32,
    /// Empty: always open.
    pub opening_hours: Vec<OpeningHours>,
    pub updated_at: Timestamp,
}

impl Offer {
    /// Whether the offer is valid at `t` and open at local time `t + offset`.
    pub fn active_at(&self, t: Timestamp, utc_offset_minutes: i32) -> bool {
        if t < self.valid_from || t >= self.valid_until {
            return false;
        }
        if self.opening_hours.is_empty() {
            return true;
        }
        let local_min = t.millis().div_euclid(60_000) + i64::from(utc_offset_minutes);
        let minute_of_day = local_min.rem_euclid(1440) as u16;
        // 1970-01-01 was a Thursday (weekday 4).
        let weekday = ((local_min.div_euclid(1440) + 3).rem_euclid(7) + 1) as u8;
        self.opening_hours
            .iter()
            .any(|h| h.weekday == weekday && (h.open..h.close).contains(&minute_of_day))
    }
}

/// A registered merchant (the API key itself is never stored, only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merchant {
    pub merchant_id: MerchantId,
    pub name: String,
    pub key_hash: [u8; 32],
    pub cells: Vec<u64>,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// Feedback a device gives on a delivered offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Dismissed,
    Opened,
    MuteMerchant,
}

impl Feedback {
    pub fn as_str(self) -> &'static str {
        match self {
            Feedback::Dismissed => "DISMISSED",
            Feedback::Opened => "OPENED",
            Feedback::MuteMerchant => "MUTE_MERCHANT",
        }
    }

    pub fn parse(s: &str) -> Option<Feedback> {
        match s {
            "DISMISSED" => Some(Feedback::Dismissed),
            "OPENED" => Some(Feedback::Opened),
            "MUTE_MERCHANT" => Some(Feedback::MuteMerchant),
            _ => None,
        }
    }
}

/// A notification sent to a device, as logged durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub notification_id: uuid::Uuid,
    pub device: DeviceId,
    pub offer_id: OfferId,
    pub merchant_id: MerchantId,
    pub cell: u64,
    pub sent_at: Timestamp,
    pub feedback: Option<Feedback>,
}

/// A device's standing towards one merchant: mute and dismissal back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restriction {
    pub device: DeviceId,
    pub merchant_id: MerchantId,
    pub muted: bool,
    pub dismissals: u32,
    pub backoff_until: Option<Timestamp>,
}

/// A device's dwell state as stored: the anchor cell where continuous presence began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dwell {
    pub anchor: u64,
    pub cell: u64,
    pub since: Timestamp,
    pub last_seen: Timestamp,
}

/// What is loaded at start to rebuild in-memory device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device: DeviceId,
    pub purposes: Purposes,
    pub last_activity: Timestamp,
    pub dwell: Option<Dwell>,
}

/// One released bucket's ledger entry: what was spent, with which mechanism and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerEntry {
    /// Bucket start.
    pub bucket: Timestamp,
    pub bucket_len_ms: i64,
    pub released_at: Timestamp,
    /// `"discrete_gaussian"` or `"discrete_laplace"`.
    pub mechanism: String,
    pub scale: f64,
    /// zCDP ρ of this release for a device at the contribution bound (Gaussian; else 0).
    pub rho: f64,
    /// Pure-DP ε of this release (Laplace; else 0).
    pub epsilon: f64,
    pub l1_sensitivity: f64,
    pub l2_sensitivity: f64,
    pub threshold: u32,
    pub cells: u64,
}

/// One released (noisy) count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleasedCount {
    pub bucket: Timestamp,
    pub cell: u64,
    pub noisy: i64,
    pub suppressed: bool,
}

/// One delivery as the offer-statistics release reads it (raw: never leaves `privacy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryRow {
    pub device: crate::pseudonym::DeviceId,
    pub offer_id: OfferId,
    pub sent_at: Timestamp,
    pub opened: bool,
}

/// Released (noisy) statistics of one offer on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferStatRow {
    pub day: Timestamp,
    pub offer_id: OfferId,
    pub merchant_id: MerchantId,
    pub deliveries: i64,
    pub opens: i64,
}

/// The ledger entry of one day's offer-statistics release.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferStatsLedgerEntry {
    /// Start of the UTC day.
    pub day: Timestamp,
    pub released_at: Timestamp,
    /// `"discrete_gaussian"` or `"discrete_laplace"`.
    pub mechanism: String,
    pub scale: f64,
    /// zCDP ρ of this release for a device at the contribution bound (Gaussian; else 0).
    pub rho: f64,
    /// Pure-DP ε of this release (Laplace; else 0).
    pub epsilon: f64,
    pub l1_sensitivity: f64,
    pub l2_sensitivity: f64,
    pub offers: u64,
}

/// One live node sharing the store (`nodes` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    /// Join sequence (never reused: a dropped node that comes back gets a new one).
    pub seq: i64,
    /// Beats so far (liveness is this counter moving).
    pub beats: i64,
    /// The highest join sequence the node had applied when it last wrote.
    pub seen: i64,
}
