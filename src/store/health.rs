//! Whether the store can write, as the writer finds out: a failed commit marks it unable, and
//! only a successful probe (a write that needs fresh space) marks it able again.
//!
//! Architecture invariant: while the store cannot write, [`super::Store::write`] refuses every
//! write at once (UNAVAILABLE) and health reports NOT_SERVING, so no offer is shown and no
//! bucket is released (fail closed); it recovers by itself, without a restart, once a probe
//! commits again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Shared view of the store's ability to write.
#[derive(Debug)]
pub(crate) struct Health {
    writable: AtomicBool,
    changes: watch::Sender<bool>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Why the store cannot write (a bounded label), while it cannot.
    cause: Option<&'static str>,
    /// When the current outage began.
    down_since: Option<Instant>,
    /// Up to when the outage time has been added to the metric.
    accounted_until: Instant,
}

impl Default for Health {
    fn default() -> Self {
        metrics::gauge!("hexveil_store_writable").set(1.0);
        Health {
            writable: AtomicBool::new(true),
            changes: watch::channel(true).0,
            inner: Mutex::new(Inner {
                cause: None,
                down_since: None,
                accounted_until: Instant::now(),
            }),
        }
    }
}

impl Health {
    /// Whether writes are accepted now.
    pub(crate) fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Why the store cannot write, if it cannot.
    pub(crate) fn cause(&self) -> Option<&'static str> {
        self.lock().cause
    }

    /// A receiver that sees every change of writability.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Records that a write or probe failed for `cause`.
    pub(crate) fn failed(&self, cause: &'static str, detail: &str) {
        let mut inner = self.lock();
        self.account(&mut inner);
        let was = self.writable.swap(false, Ordering::AcqRel);
        inner.cause = Some(cause);
        if was {
            inner.down_since = Some(Instant::now());
            metrics::gauge!("hexveil_store_writable").set(0.0);
            tracing::error!(
                cause,
                detail,
                "the store cannot write: refusing writes, health NOT_SERVING until a probe succeeds"
            );
            self.changes.send_replace(false);
        }
    }

    /// Records that a probe committed: the store can write again.
    pub(crate) fn recovered(&self) {
        let mut inner = self.lock();
        self.account(&mut inner);
        if !self.writable.swap(true, Ordering::AcqRel) {
            let down_for = inner
                .down_since
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            let cause = inner.cause.take().unwrap_or("unknown");
            metrics::gauge!("hexveil_store_writable").set(1.0);
            tracing::warn!(
                cause,
                down_for_ms = down_for.as_millis() as u64,
                "the store can write again: health SERVING"
            );
            self.changes.send_replace(true);
        }
    }

    /// Adds outage time up to now to `hexveil_store_not_writable_seconds_total`.
    fn account(&self, inner: &mut Inner) {
        let now = Instant::now();
        if !self.writable.load(Ordering::Acquire) {
            let d: Duration = now.saturating_duration_since(inner.accounted_until);
            metrics::counter!("hexveil_store_not_writable_seconds_total").increment(d.as_secs());
            // Keep the sub-second remainder for the next call, so the total is not rounded away.
            inner.accounted_until = now - Duration::from_nanos(d.subsec_nanos().into());
        } else {
            inner.accounted_until = now;
        }
    }

    /// Called on every probe tick so the outage metric moves while the outage lasts.
    pub(crate) fn tick(&self) {
        let mut inner = self.lock();
        self.account(&mut inner);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (plain fields).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_then_recovers_and_notifies_each_change_once() {
        let h = Health::default();
        let mut rx = h.subscribe();
        assert!(h.is_writable());
        h.failed("disk_full", "database or disk is full");
        h.failed("disk_full", "again");
        assert!(!h.is_writable());
        assert_eq!(h.cause(), Some("disk_full"));
        assert!(rx.has_changed().unwrap());
        assert!(!*rx.borrow_and_update());
        h.recovered();
        assert!(h.is_writable());
        assert_eq!(h.cause(), None);
        assert!(*rx.borrow_and_update());
        h.recovered();
        assert!(!rx.has_changed().unwrap(), "no change, no notification");
    }
}
