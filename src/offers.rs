//! Offers: the in-memory index of active offers keyed by cell, and merchant offer
//! management (validated, stored, then indexed).
//!
//! Architecture invariant: the index mirrors the `offers` table — every change goes to the
//! store first and into the index only once committed; a periodic refresh picks up changes
//! made elsewhere (another process or node). Lookups never run SQL.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use h3o::CellIndex;

use crate::clock::{SharedClock, Timestamp};
use crate::config::Config;
use crate::model::{Merchant, Offer, OfferId, OpeningHours};
use crate::settings::LiveSettings;
use crate::store::{Store, StoreError, WriteOp};

/// Longest title and body, in characters.
pub const TITLE_MAX: usize = 80;
pub const BODY_MAX: usize = 500;

/// An offer in the index with its send times in the last 24 h (its own daily budget).
#[derive(Debug)]
pub struct OfferEntry {
    pub offer: Offer,
    pub sent: Mutex<VecDeque<Timestamp>>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<OfferId, Arc<OfferEntry>>,
    by_cell: HashMap<u64, Vec<Arc<OfferEntry>>>,
    /// Bumped by every local change, so a refresh that read the store before the change
    /// cannot overwrite it with a stale list.
    generation: u64,
}

impl Inner {
    /// Adds an offer (not yet present) with its send history.
    fn insert(&mut self, offer: Offer, sent: VecDeque<Timestamp>) {
        let entry = Arc::new(OfferEntry {
            sent: Mutex::new(sent),
            offer,
        });
        self.by_cell
            .entry(entry.offer.cell)
            .or_default()
            .push(entry.clone());
        self.by_id.insert(entry.offer.offer_id, entry);
    }
}

/// The in-memory offer index.
#[derive(Debug, Default)]
pub struct OfferIndex {
    inner: RwLock<Inner>,
    /// Bumped by every change of the index's content (local or refreshed from the store).
    version: std::sync::atomic::AtomicU64,
    /// [`OfferIndex::any_nearby`]'s answers per (cell, UTC offset, max_k), for the current
    /// minute and index version.
    nearby: Mutex<HashMap<(u64, i32, u32), NearbyMemo>>,
}

/// One remembered [`OfferIndex::any_nearby`] answer and what it was valid for.
#[derive(Debug, Clone, Copy)]
struct NearbyMemo {
    minute: i64,
    version: u64,
    exclusions: (usize, usize),
    any: bool,
}

/// Most (cell, offset) answers remembered; beyond it the memo starts afresh.
const NEARBY_MEMO_MAX: usize = 65_536;

impl OfferIndex {
    /// Inserts or replaces an offer, keeping its send history (the budget carries over).
    pub fn upsert(&self, offer: Offer) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let sent = inner
            .by_id
            .get(&offer.offer_id)
            .map(|e| e.sent.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        Self::remove_locked(&mut inner, &offer.offer_id);
        inner.generation += 1;
        inner.insert(offer, sent);
        self.changed();
    }

    fn changed(&self) {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    fn remove_locked(inner: &mut Inner, id: &OfferId) -> Option<Arc<OfferEntry>> {
        let old = inner.by_id.remove(id)?;
        if let Some(list) = inner.by_cell.get_mut(&old.offer.cell) {
            list.retain(|e| e.offer.offer_id != *id);
            if list.is_empty() {
                inner.by_cell.remove(&old.offer.cell);
            }
        }
        Some(old)
    }

    /// Removes an offer.
    pub fn remove(&self, id: &OfferId) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        Self::remove_locked(&mut inner, id);
        inner.generation += 1;
        self.changed();
    }

    /// The generation to pass to [`OfferIndex::replace_all`]; read it before reading the store.
    pub fn generation(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// One offer by id.
    pub fn get(&self, id: &OfferId) -> Option<Arc<OfferEntry>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_id.get(id).cloned()
    }

    /// Number of offers indexed.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the whole index with `offers` (from the store), keeping send histories, and
    /// adds the send times in `sent` (offer, time) for offers not yet tracked. Does nothing
    /// (returns false) if the index changed locally since `generation` was read: the store
    /// read may predate that change, and the next refresh will be current.
    pub fn replace_all(
        &self,
        offers: Vec<Offer>,
        sent: &[(OfferId, Timestamp)],
        generation: u64,
    ) -> bool {
        let mut fresh = Inner::default();
        {
            let old = self.inner.read().unwrap_or_else(|p| p.into_inner());
            for offer in offers {
                let history = match old.by_id.get(&offer.offer_id) {
                    Some(e) => e.sent.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    None => sent
                        .iter()
                        .filter(|(id, _)| *id == offer.offer_id)
                        .map(|(_, t)| *t)
                        .collect(),
                };
                fresh.insert(offer, history);
            }
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.generation != generation {
            return false;
        }
        fresh.generation = generation;
        *inner = fresh;
        self.changed();
        true
    }

    /// Visits the offers near `cell` that are valid and open at `now` and outside every
    /// exclusion area, ranked by grid distance, then most recently updated first, until
    /// `visit` breaks. Rings are walked nearest first, so a decision that finds its offer in
    /// the device's own cell never looks further. `max_k` is `offers.max_radius_k`.
    pub fn visit(
        &self,
        cell: CellIndex,
        max_k: u32,
        now: Timestamp,
        utc_offset_minutes: i32,
        exclusions: &[crate::config::CellSpec],
        visit: impl FnMut(&Arc<OfferEntry>, u32) -> std::ops::ControlFlow<()>,
    ) {
        self.walk(
            cell,
            max_k,
            now,
            utc_offset_minutes,
            exclusions,
            true,
            visit,
        );
    }

    /// Whether any active offer is near `cell` (no ranking needed, so none is done).
    ///
    /// It only chooses which reason a withheld report gets (a cap's, or NO_OFFERS_NEARBY), so
    /// its answer is remembered per (cell, UTC offset) for the rest of the minute while the
    /// index is unchanged: most reports are withheld by a cap, and walking the rings for each
    /// was a sixth of the server's time under load. No offer is ever given from it.
    pub fn any_nearby(
        &self,
        cell: CellIndex,
        max_k: u32,
        now: Timestamp,
        utc_offset_minutes: i32,
        exclusions: &[crate::config::CellSpec],
    ) -> bool {
        use std::sync::atomic::Ordering;
        let key = (u64::from(cell), utc_offset_minutes, max_k);
        let minute = now.millis().div_euclid(60_000);
        let version = self.version.load(Ordering::Acquire);
        let excl = (exclusions.as_ptr() as usize, exclusions.len());
        let fresh =
            |m: &NearbyMemo| m.minute == minute && m.version == version && m.exclusions == excl;
        if let Some(m) = self
            .nearby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|m| fresh(m))
        {
            return m.any;
        }
        let any = self.walk_any(cell, max_k, now, utc_offset_minutes, exclusions);
        let mut memo = self.nearby.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= NEARBY_MEMO_MAX {
            memo.clear();
        }
        memo.insert(
            key,
            NearbyMemo {
                minute,
                version,
                exclusions: excl,
                any,
            },
        );
        any
    }

    fn walk_any(
        &self,
        cell: CellIndex,
        max_k: u32,
        now: Timestamp,
        utc_offset_minutes: i32,
        exclusions: &[crate::config::CellSpec],
    ) -> bool {
        let mut any = false;
        self.walk(
            cell,
            max_k,
            now,
            utc_offset_minutes,
            exclusions,
            false,
            |_, _| {
                any = true;
                std::ops::ControlFlow::Break(())
            },
        );
        any
    }

    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        cell: CellIndex,
        max_k: u32,
        now: Timestamp,
        utc_offset_minutes: i32,
        exclusions: &[crate::config::CellSpec],
        ranked: bool,
        mut visit: impl FnMut(&Arc<OfferEntry>, u32) -> std::ops::ControlFlow<()>,
    ) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if inner.by_cell.is_empty() {
            return;
        }
        let mut ring: Vec<CellIndex> = Vec::new();
        let mut found: Vec<&Arc<OfferEntry>> = Vec::new();
        for k in 0..=max_k {
            ring_cells(cell, k, &mut ring);
            found.clear();
            for c in &ring {
                let Some(list) = inner.by_cell.get(&u64::from(*c)) else {
                    continue;
                };
                for entry in list {
                    let o = &entry.offer;
                    if k <= o.radius_k.min(max_k)
                        && o.active_at(now, utc_offset_minutes)
                        && (exclusions.is_empty() || !crate::cells::excluded(o.cell, exclusions))
                    {
                        found.push(entry);
                    }
                }
            }
            if ranked && found.len() > 1 {
                found.sort_by(|a, b| {
                    b.offer
                        .updated_at
                        .cmp(&a.offer.updated_at)
                        .then(a.offer.offer_id.cmp(&b.offer.offer_id))
                });
            }
            for entry in &found {
                if visit(entry, k).is_break() {
                    return;
                }
            }
        }
    }
}

/// The cells exactly `k` rings from `cell`, into `out`.
fn ring_cells(cell: CellIndex, k: u32, out: &mut Vec<CellIndex>) {
    out.clear();
    let fast: Option<Vec<CellIndex>> = cell.grid_ring_fast(k).collect();
    match fast {
        Some(cells) => out.extend(cells),
        // Near a pentagon the fast ring is undefined; fall back to the disk.
        None => out.extend(
            cell.grid_disk_distances::<Vec<_>>(k)
                .into_iter()
                .filter(|(_, d)| *d == k)
                .map(|(c, _)| c),
        ),
    }
}

/// Why an offer change was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OfferError {
    /// (field, description) pairs.
    #[error("invalid offer: {0:?}")]
    Invalid(Vec<(String, String)>),
    #[error("no such offer")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks an offer against the config and the merchant's locations; all violations at once.
pub fn validate(offer: &Offer, merchant: &Merchant, config: &Config) -> Result<(), OfferError> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut bad = |f: &str, d: String| v.push((format!("offer.{f}"), d));
    let title_len = offer.title.chars().count();
    if offer.title.trim().is_empty() {
        bad("title", "required".into());
    } else if title_len > TITLE_MAX {
        bad("title", format!("must be at most {TITLE_MAX} characters"));
    } else if offer.title.chars().any(char::is_control) {
        bad("title", "must not contain control characters".into());
    }
    if offer.body.chars().count() > BODY_MAX {
        bad("body", format!("must be at most {BODY_MAX} characters"));
    } else if offer.body.chars().any(|c| c.is_control() && c != '\n') {
        bad(
            "body",
            "must not contain control characters other than newlines".into(),
        );
    }
    if !merchant.cells.contains(&offer.cell) {
        bad(
            "cell",
            "must be one of the merchant's registered location cells".into(),
        );
    } else if crate::cells::excluded(offer.cell, &config.exclusions.cells) {
        bad("cell", "lies in a sensitive exclusion area".into());
    }
    if offer.radius_k > config.offers.max_radius_k {
        bad(
            "radius_k",
            format!(
                "must be at most {} (offers.max_radius_k)",
                config.offers.max_radius_k
            ),
        );
    }
    if offer.valid_until <= offer.valid_from {
        bad("valid_until", "must be after valid_from".into());
    }
    if offer.max_notifications_per_day == 0 {
        bad("max_notifications_per_day", "must be at least 1".into());
    } else if offer.max_notifications_per_day > 1_000_000 {
        bad(
            "max_notifications_per_day",
            "must be at most 1000000".into(),
        );
    }
    for (i, h) in offer.opening_hours.iter().enumerate() {
        if !(1..=7).contains(&h.weekday) {
            bad(
                &format!("opening_hours[{i}].weekday"),
                "must be 1 (Monday) to 7 (Sunday)".into(),
            );
        }
        if h.open >= h.close || h.close > 1440 {
            bad(
                &format!("opening_hours[{i}].close"),
                "must be after open, at most 24:00".into(),
            );
        }
    }
    if v.is_empty() {
        Ok(())
    } else {
        Err(OfferError::Invalid(v))
    }
}

/// Parses "HH:MM" (up to "24:00") into minutes since midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    let total = h * 60 + m;
    (m < 60 && total <= 1440).then_some(total)
}

/// Formats minutes since midnight as "HH:MM".
pub fn format_hhmm(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Merchant offer management over the store and the index.
#[derive(Debug, Clone)]
pub struct Offers {
    store: Store,
    index: Arc<OfferIndex>,
    clock: SharedClock,
    settings: LiveSettings,
}

impl Offers {
    pub fn new(
        store: Store,
        index: Arc<OfferIndex>,
        clock: SharedClock,
        settings: LiveSettings,
    ) -> Self {
        Offers {
            store,
            index,
            clock,
            settings,
        }
    }

    /// The index this service keeps in sync.
    pub fn index(&self) -> &Arc<OfferIndex> {
        &self.index
    }

    /// Creates (nil id) or replaces one of `merchant`'s offers.
    pub async fn upsert(&self, merchant: &Merchant, mut offer: Offer) -> Result<Offer, OfferError> {
        let settings = self.settings.current();
        offer.merchant_id = merchant.merchant_id;
        if offer.offer_id.is_nil() {
            offer.offer_id = uuid::Uuid::new_v4();
        } else {
            let owned = self
                .store
                .offers_of(merchant.merchant_id)
                .await?
                .iter()
                .any(|o| o.offer_id == offer.offer_id);
            if !owned {
                return Err(OfferError::NotFound);
            }
        }
        offer.updated_at = self.clock.now();
        validate(&offer, merchant, &settings.config)?;
        self.store.write(WriteOp::PutOffer(offer.clone())).await?;
        self.index.upsert(offer.clone());
        Ok(offer)
    }

    /// The merchant's offers, most recently updated first.
    pub async fn list(&self, merchant: &Merchant) -> Result<Vec<Offer>, OfferError> {
        Ok(self.store.offers_of(merchant.merchant_id).await?)
    }

    /// Deletes one of the merchant's offers.
    pub async fn delete(&self, merchant: &Merchant, offer_id: OfferId) -> Result<(), OfferError> {
        let n = self
            .store
            .write_count(WriteOp::DeleteOffer {
                merchant_id: merchant.merchant_id,
                offer_id,
            })
            .await?;
        if n == 0 {
            return Err(OfferError::NotFound);
        }
        self.index.remove(&offer_id);
        Ok(())
    }

    /// Reloads the index from the store (offers of revoked merchants are left out).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let generation = self.index.generation();
        let revoked: std::collections::HashSet<_> = self
            .store
            .merchants()
            .await?
            .into_iter()
            .filter(|m| m.revoked_at.is_some())
            .map(|m| m.merchant_id)
            .collect();
        let offers: Vec<Offer> = self
            .store
            .load_offers()
            .await?
            .into_iter()
            .filter(|o| !revoked.contains(&o.merchant_id))
            .collect();
        // Send histories are needed only for offers the index does not track yet (made
        // elsewhere, or at start); tracked ones keep theirs. Usually there are none.
        let sent: Vec<(OfferId, Timestamp)> =
            if offers.iter().all(|o| self.index.get(&o.offer_id).is_some()) {
                Vec::new()
            } else {
                let since = self.clock.now().minus(crate::caps::DAY);
                self.store
                    .load_deliveries(since)
                    .await?
                    .into_iter()
                    .map(|(offer, _, at)| (offer, at))
                    .collect()
            };
        self.index.replace_all(offers, &sent, generation);
        Ok(())
    }
}

/// Converts opening hours from wire strings; `None` names the bad part.
pub fn opening_hours(weekday: u32, open: &str, close: &str) -> Result<OpeningHours, &'static str> {
    let weekday = u8::try_from(weekday).map_err(|_| "weekday")?;
    let open = parse_hhmm(open).ok_or("open")?;
    let close = parse_hhmm(close).ok_or("close")?;
    Ok(OpeningHours {
        weekday,
        open,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(cell: u64) -> Offer {
        Offer {
            offer_id: uuid::Uuid::new_v4(),
            merchant_id: uuid::Uuid::new_v4(),
            title: "t".into(),
            body: String::new(),
            cell,
            radius_k: 1,
            valid_from: Timestamp(0),
            valid_until: Timestamp(i64::MAX),
            max_notifications_per_day: 1,
            opening_hours: Vec::new(),
            updated_at: Timestamp(0),
        }
    }

    #[test]
    fn a_stale_refresh_never_drops_a_local_change() {
        let index = OfferIndex::default();
        let seen = index.generation();
        // A refresh read the store (empty) ... then a merchant's upsert lands locally ...
        index.upsert(offer(0x8828308281fffff));
        // ... and the stale refresh must not wipe it.
        assert!(!index.replace_all(Vec::new(), &[], seen));
        assert_eq!(index.len(), 1);
        // A current refresh applies.
        assert!(index.replace_all(Vec::new(), &[], index.generation()));
        assert!(index.is_empty());
    }
}
