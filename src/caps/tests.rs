//! Unit tests of the pure rules.

use super::*;

const H: i64 = 3_600_000;

fn ts(ms: i64) -> Timestamp {
    Timestamp(ms)
}

#[test]
fn gcra_allows_the_burst_then_one_per_interval() {
    let mut tat = 0;
    let now = ts(1_000 * H);
    for i in 0..10 {
        assert!(
            gcra(&mut tat, now, 60, 10).is_ok(),
            "request {i} of the burst"
        );
    }
    let before = tat;
    let wait = gcra(&mut tat, now, 60, 10).unwrap_err();
    assert_eq!(wait, Duration::from_secs(60));
    assert_eq!(tat, before, "a refusal leaves the state unchanged");
    assert!(gcra(&mut tat, now.plus(Duration::from_secs(59)), 60, 10).is_err());
    assert!(gcra(&mut tat, now.plus(Duration::from_secs(60)), 60, 10).is_ok());
}

#[test]
fn dwell_continues_within_one_ring_and_restarts_outside() {
    let c = h3o::LatLng::new(48.85, 2.35)
        .unwrap()
        .to_cell(h3o::Resolution::Eight);
    let neighbour = c
        .grid_disk::<Vec<_>>(1)
        .into_iter()
        .find(|n| *n != c)
        .unwrap();
    let far = c
        .grid_disk::<Vec<_>>(3)
        .into_iter()
        .find(|n| c.grid_distance(*n).unwrap() == 3)
        .unwrap();
    let gap = Duration::from_secs(900);
    let d0 = update_dwell(None, c.into(), ts(0), gap);
    let d1 = update_dwell(Some(d0), neighbour.into(), ts(60_000), gap);
    assert_eq!(
        (d1.anchor, d1.since, d1.cell),
        (u64::from(c), ts(0), u64::from(neighbour))
    );
    // Jitter back and forth does not restart dwell.
    let d2 = update_dwell(Some(d1), c.into(), ts(120_000), gap);
    assert_eq!(d2.since, ts(0));
    // Leaving the disk does.
    let d3 = update_dwell(Some(d2), far.into(), ts(180_000), gap);
    assert_eq!((d3.anchor, d3.since), (u64::from(far), ts(180_000)));
    // A long silence does too, even in the same cell.
    let d4 = update_dwell(Some(d3), far.into(), ts(180_000 + 901_000), gap);
    assert_eq!(d4.since, ts(180_000 + 901_000));
    // An older report changes nothing.
    assert_eq!(update_dwell(Some(d4), c.into(), ts(0), gap), d4);
}

#[test]
fn dismissal_backoff_escalates_and_stays_at_the_last_step() {
    let caps = CapsConfig::default();
    let mut s = Standing::default();
    let mut got = Vec::new();
    for _ in 0..4 {
        s = after_dismissal(&caps, s, ts(0));
        got.push(s.backoff_until.unwrap().millis() / (24 * H));
    }
    assert_eq!(got, vec![1, 3, 7, 7]);
}

#[test]
fn fatigue_halves_the_allowance_until_an_offer_is_opened() {
    let caps = CapsConfig {
        per_device_per_day: 4,
        min_interval: crate::config::Dur::secs(0),
        quiet_hours: QuietHours(None),
        ..CapsConfig::default()
    };
    let m = uuid::Uuid::nil();
    let sent = |t: i64, fb: Option<Feedback>| Sent {
        offer_id: m,
        merchant_id: m,
        sent_at: ts(t),
        feedback: fb,
    };
    let dwell = Dwell {
        anchor: 0,
        cell: 0,
        since: ts(0),
        last_seen: ts(0),
    };
    let now = ts(10 * H);
    // Three ignored offers: fatigued, the day cap of 4 becomes 2, already used up.
    let log = [
        sent(H, None),
        sent(2 * H, Some(Feedback::Dismissed)),
        sent(3 * H, None),
    ];
    assert_eq!(
        device_caps(&caps, &log, &dwell, 0, now),
        Err(Reason::DailyCap)
    );
    // The same with the last one opened: 3 of 4 used, one left.
    let log = [
        sent(H, None),
        sent(2 * H, None),
        sent(3 * H, Some(Feedback::Opened)),
    ];
    assert_eq!(
        device_caps(&caps, &log, &dwell, 0, now).map(|a| a.remaining_day),
        Ok(1)
    );
}

#[test]
fn local_time_follows_the_offset() {
    // 2026-01-01T20:30Z is 21:30 at UTC+1, 15:30 at UTC-5.
    let t = ts(1_767_225_600_000 + 20 * H + 30 * 60_000);
    assert_eq!(local_minute(t, 60), 21 * 60 + 30);
    assert_eq!(local_minute(t, -300), 15 * 60 + 30);
}
