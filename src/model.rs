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

    fn bit(self) -> u8 {
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
}
