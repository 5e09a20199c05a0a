//! What a config promises: worst-case notifications per device, and the privacy loss and
//! error bars of foot-traffic releases. Shown by `hexveil config check`, `GetPrivacyPolicy`
//! and the audit log, so the numbers people read come from the same code that checks them.

use std::time::Duration;

use serde::Serialize;

use super::{Config, MechanismKind};
use crate::privacy::accounting::{self, AccountingError, Mechanism};

/// Everything a config implies, computed from it alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Consequences {
    pub caps: CapConsequences,
    pub privacy: PrivacyConsequences,
}

/// The most notifications the caps let through, whatever devices do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapConsequences {
    /// Most offers one device can receive in any 24 h window.
    pub max_notifications_per_device_per_day: u32,
    /// Most offers one device can receive in any 7 × 24 h window.
    pub max_notifications_per_device_per_week: u32,
    /// Earliest time after one notification that the next can arrive.
    pub earliest_next_notification_secs: u64,
}

/// One release series' share of the per-device daily budget. The promise is their total:
/// zCDP ρ adds up over Gaussian releases (then converts to one (ε, δ)), pure ε adds up over
/// Laplace ones. A new release series (the daily foot-traffic release) is one more part.
///
/// The unit is any 24 hours of one device's activity. A part must state what such a window
/// can cost it: the hourly releases enforce their bound over a rolling window
/// (`privacy::contrib`); offer statistics are per UTC day but their input, deliveries, is
/// bounded by the caps' rolling windows. A per-UTC-day release whose own bound is per UTC day
/// (the daily release) is touched by two days in a window straddling midnight, so its part is
/// twice one day's cost unless its bound is made rolling too.
///
/// hexveil keeps the daily release's bound per UTC day (that is what a merchant reads: a
/// device in at most `privacy.max_cells_per_day` cells of one UTC day) and counts its part
/// twice: a window from 13:00 to 13:00 holds the afternoon of one UTC day and the morning of
/// the next, and each of those two releases can move `max_cells_per_day` counts by one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetPart {
    /// `"hourly_foot_traffic"`, `"offer_stats"`, …
    pub release: &'static str,
    /// zCDP ρ one device can spend on it in any 24 hours (Gaussian; else 0).
    pub rho: f64,
    /// Pure-DP ε one device can spend on it in any 24 hours (Laplace; else 0).
    pub epsilon: f64,
}

/// Noise and sensitivity of the offer statistics (per offer and UTC day: deliveries, opens).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OfferStatsConsequences {
    /// Deliveries one device counts in per UTC day at most (the caps' daily maximum; the
    /// release clips to it).
    pub max_deliveries_per_device_per_day: u32,
    /// Deliveries one device counts in per offer and day at most (clipped likewise).
    pub max_deliveries_per_device_per_offer: u32,
    /// L1 sensitivity of one day's table (deliveries and opens of every offer).
    pub l1_sensitivity: f64,
    /// Squared L2 sensitivity of one day's table.
    pub l2_sensitivity_sq: f64,
    /// Scale handed to opendp (σ or b).
    pub noise_scale: f64,
    pub noise_std_dev: f64,
    /// Half-width of the 95% interval of one released count.
    pub ci95_half_width: f64,
}

/// Noise and sensitivity of the daily release (distinct devices per cell and UTC day).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailyConsequences {
    /// Cells one device counts in per UTC day at most (`privacy.max_cells_per_day`).
    pub max_cells_per_day: u32,
    /// UTC days, hence daily releases, one 24-hour window can touch: 2.
    pub days_per_window: u32,
    /// zCDP ρ (Gaussian) or ε (Laplace) of one day's release for a device at the bound.
    pub rho_per_release: f64,
    pub epsilon_per_release: f64,
    /// Scale handed to opendp (σ or b).
    pub noise_scale: f64,
    pub noise_std_dev: f64,
    /// Half-width of the 95% interval of one released daily count.
    pub ci95_half_width: f64,
}

/// The privacy loss per device and the accuracy of each released count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrivacyConsequences {
    /// `"discrete_gaussian"` or `"discrete_laplace"`.
    pub mechanism: &'static str,
    /// Worst-case (ε, δ) one device can spend in any 24 hours, over every release series
    /// (the sum of `budget`).
    pub epsilon_per_device_per_day: f64,
    /// The shares of that total, one per release series.
    pub budget: Vec<BudgetPart>,
    /// Offer statistics' noise.
    pub offer_stats: OfferStatsConsequences,
    /// The daily release's noise.
    pub daily: DailyConsequences,
    /// δ of the guarantee (0 for the pure-DP Laplace mechanism).
    pub delta: f64,
    /// zCDP ρ per device per day (Gaussian only, else 0).
    pub rho_per_device_per_day: f64,
    /// Releases per day.
    pub buckets_per_day: u32,
    /// (cell, bucket) pairs one device can move in any 24 hours.
    pub contributions_per_day: u32,
    /// Scale handed to opendp (σ for Gaussian, b for Laplace).
    pub noise_scale: f64,
    /// Standard deviation of the noise on one released count.
    pub noise_std_dev: f64,
    /// Half-width of the 95% interval of one released count.
    pub ci95_half_width: f64,
    /// Half-width of the 95% interval of a sum of one cell's buckets over a day (what a day
    /// cost before the daily release; kept for comparison).
    pub day_total_ci95_half_width: f64,
    /// Noisy counts below this are suppressed.
    pub threshold: u32,
}

impl Consequences {
    /// Computes the consequences of `config` (values are assumed range-checked).
    pub fn of(config: &Config) -> Result<Consequences, AccountingError> {
        let caps = cap_consequences(config);
        let privacy = privacy_consequences(config, &caps)?;
        Ok(Consequences { caps, privacy })
    }
}

fn cap_consequences(config: &Config) -> CapConsequences {
    let caps = &config.caps;
    let per_reply = config.offers.max_offers_per_reply;
    let day = Duration::from_secs(86_400);
    let interval = caps.min_interval.get();
    let quiet = Duration::from_secs(u64::from(caps.quiet_hours.minutes()) * 60);
    // Any 24 h window holds exactly 24 h minus the quiet length of allowed time, possibly
    // split in two pieces around the quiet window; a split adds at most one notification
    // event, and only when the quiet window is long enough to act as a gap of its own.
    let events_per_day = if interval.is_zero() {
        u32::MAX
    } else {
        let allowed = day - quiet;
        let contiguous = allowed.as_secs().div_ceil(interval.as_secs());
        let split_bonus = u64::from(!quiet.is_zero() && quiet >= interval);
        let full_day = day.as_secs().div_ceil(interval.as_secs());
        u32::try_from((contiguous + split_bonus).min(full_day)).unwrap_or(u32::MAX)
    };
    let per_day = caps
        .per_device_per_day
        .min(events_per_day.saturating_mul(per_reply));
    let per_week = caps.per_device_per_week.min(per_day.saturating_mul(7));
    CapConsequences {
        max_notifications_per_device_per_day: per_day,
        max_notifications_per_device_per_week: per_week,
        earliest_next_notification_secs: interval.as_secs(),
    }
}

/// Offer statistics' sensitivity: the release clips each device to `n` deliveries per UTC day
/// and `m` per offer and day (what the caps allow anyway), and an open counts only for a kept
/// delivery. So one device moves at most `2n` counts by one in L1, and — each offer's two
/// counts by at most `m` — at most `2·n·m` in squared L2.
fn offer_stats_sensitivity(config: &Config, caps: &CapConsequences) -> (u32, u32, f64, f64) {
    // With no deliveries allowed at all, calibrate for one: there is nothing to protect, but a
    // zero scale would be an error (never "no noise").
    let n = caps.max_notifications_per_device_per_day.max(1);
    let m = config.caps.per_merchant_per_device_per_week.clamp(1, n);
    (n, m, 2.0 * f64::from(n), 2.0 * f64::from(n) * f64::from(m))
}

/// UTC days one 24-hour window can overlap, hence daily releases it can move.
pub const DAYS_PER_WINDOW: u32 = 2;

fn privacy_consequences(
    config: &Config,
    caps: &CapConsequences,
) -> Result<PrivacyConsequences, AccountingError> {
    let (n, m, l1, l2_sq) = offer_stats_sensitivity(config, caps);
    let p = &config.privacy;
    let k = f64::from(p.max_cells_per_bucket);
    let buckets_per_day = u32::try_from(86_400 / config.insights.bucket.as_secs().max(1))
        .unwrap_or(u32::MAX)
        .max(1);
    let contributions = p
        .max_contributions_per_day
        .min(p.max_cells_per_bucket.saturating_mul(buckets_per_day));
    let c = f64::from(contributions);
    let n_day = usize::try_from(buckets_per_day).unwrap_or(usize::MAX);
    let kd = f64::from(p.max_cells_per_day);
    let windows = f64::from(DAYS_PER_WINDOW);
    Ok(match p.mechanism {
        MechanismKind::Gaussian => {
            // One release moves at most k counts by 1: L2² sensitivity k, so ρ_bucket = k/(2σ²).
            // Over a day the concatenated releases move at most C counts: ρ_day = C/(2σ²).
            let sigma = accounting::gaussian_sigma_for_rho(k, p.rho_per_bucket);
            let rho_hourly = c / (2.0 * sigma * sigma);
            let offer_sigma = accounting::gaussian_sigma_for_rho(l2_sq, p.offer_stats_rho_per_day);
            // The daily release moves at most K_d counts by 1: ρ_release = K_d/(2σ_d²), and any
            // 24 hours touches two days' releases.
            let day_sigma = accounting::gaussian_sigma_for_rho(kd, p.rho_per_day);
            let rho_release = kd / (2.0 * day_sigma * day_sigma);
            let daily = DailyConsequences {
                max_cells_per_day: p.max_cells_per_day,
                days_per_window: DAYS_PER_WINDOW,
                rho_per_release: rho_release,
                epsilon_per_release: 0.0,
                noise_scale: day_sigma,
                noise_std_dev: accounting::discrete_gaussian_std(day_sigma),
                ci95_half_width: accounting::ci95_half_width_gaussian(day_sigma),
            };
            let budget = vec![
                BudgetPart {
                    release: "hourly_foot_traffic",
                    rho: rho_hourly,
                    epsilon: 0.0,
                },
                BudgetPart {
                    release: "daily_foot_traffic",
                    rho: windows * rho_release,
                    epsilon: 0.0,
                },
                BudgetPart {
                    release: "offer_stats",
                    rho: l2_sq / (2.0 * offer_sigma * offer_sigma),
                    epsilon: 0.0,
                },
            ];
            let rho_day: f64 = budget.iter().map(|b| b.rho).sum();
            PrivacyConsequences {
                mechanism: "discrete_gaussian",
                epsilon_per_device_per_day: accounting::zcdp_to_epsilon(rho_day, p.delta)?,
                budget,
                offer_stats: OfferStatsConsequences {
                    max_deliveries_per_device_per_day: n,
                    max_deliveries_per_device_per_offer: m,
                    l1_sensitivity: l1,
                    l2_sensitivity_sq: l2_sq,
                    noise_scale: offer_sigma,
                    noise_std_dev: accounting::discrete_gaussian_std(offer_sigma),
                    ci95_half_width: accounting::ci95_half_width_gaussian(offer_sigma),
                },
                daily,
                delta: p.delta,
                rho_per_device_per_day: rho_day,
                buckets_per_day,
                contributions_per_day: contributions,
                noise_scale: sigma,
                noise_std_dev: accounting::discrete_gaussian_std(sigma),
                ci95_half_width: accounting::ci95_half_width_gaussian(sigma),
                day_total_ci95_half_width: accounting::ci95_half_width_of_sum(
                    Mechanism::DiscreteGaussian,
                    sigma,
                    n_day,
                ),
                threshold: p.threshold,
            }
        }
        MechanismKind::Laplace => {
            // L1 sensitivity k per release, so b = k/ε_bucket; a day moves C counts: ε = C/b.
            let b = accounting::laplace_scale_for_epsilon(k, p.epsilon_per_bucket);
            let offer_b = accounting::laplace_scale_for_epsilon(l1, p.offer_stats_epsilon_per_day);
            // L1 sensitivity K_d per daily release: b_d = K_d/ε_day, twice in any 24 hours.
            let day_b = accounting::laplace_scale_for_epsilon(kd, p.epsilon_per_day);
            let daily = DailyConsequences {
                max_cells_per_day: p.max_cells_per_day,
                days_per_window: DAYS_PER_WINDOW,
                rho_per_release: 0.0,
                epsilon_per_release: kd / day_b,
                noise_scale: day_b,
                noise_std_dev: accounting::discrete_laplace_std(day_b),
                ci95_half_width: accounting::ci95_half_width_laplace(day_b),
            };
            let budget = vec![
                BudgetPart {
                    release: "hourly_foot_traffic",
                    rho: 0.0,
                    epsilon: c / b,
                },
                BudgetPart {
                    release: "daily_foot_traffic",
                    rho: 0.0,
                    epsilon: windows * kd / day_b,
                },
                BudgetPart {
                    release: "offer_stats",
                    rho: 0.0,
                    epsilon: l1 / offer_b,
                },
            ];
            PrivacyConsequences {
                mechanism: "discrete_laplace",
                epsilon_per_device_per_day: budget.iter().map(|b| b.epsilon).sum(),
                budget,
                offer_stats: OfferStatsConsequences {
                    max_deliveries_per_device_per_day: n,
                    max_deliveries_per_device_per_offer: m,
                    l1_sensitivity: l1,
                    l2_sensitivity_sq: l2_sq,
                    noise_scale: offer_b,
                    noise_std_dev: accounting::discrete_laplace_std(offer_b),
                    ci95_half_width: accounting::ci95_half_width_laplace(offer_b),
                },
                daily,
                delta: 0.0,
                rho_per_device_per_day: 0.0,
                buckets_per_day,
                contributions_per_day: contributions,
                noise_scale: b,
                noise_std_dev: accounting::discrete_laplace_std(b),
                ci95_half_width: accounting::ci95_half_width_laplace(b),
                day_total_ci95_half_width: accounting::ci95_half_width_of_sum(
                    Mechanism::DiscreteLaplace,
                    b,
                    n_day,
                ),
                threshold: p.threshold,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promise_is_one_total_over_every_release_series() {
        let config = Config::default();
        let c = Consequences::of(&config).unwrap();
        let p = &c.privacy;
        let parts: Vec<&str> = p.budget.iter().map(|b| b.release).collect();
        assert_eq!(
            parts,
            ["hourly_foot_traffic", "daily_foot_traffic", "offer_stats"]
        );
        let offer = &p.budget[2];
        assert!((offer.rho - config.privacy.offer_stats_rho_per_day).abs() < 1e-12);
        let total: f64 = p.budget.iter().map(|b| b.rho).sum();
        assert!((total - p.rho_per_device_per_day).abs() < 1e-12);
        let eps = accounting::zcdp_to_epsilon(total, p.delta).unwrap();
        assert!((eps - p.epsilon_per_device_per_day).abs() < 1e-9);
        // The hourly part alone would promise less: the offer statistics are not free.
        let hourly = accounting::zcdp_to_epsilon(p.budget[0].rho, p.delta).unwrap();
        assert!(hourly < p.epsilon_per_device_per_day);
        // Defaults: 3 deliveries a day, 1 per offer: squared L2 sensitivity 2 * 3 * 1.
        assert_eq!(p.offer_stats.l2_sensitivity_sq, 6.0);
    }

    #[test]
    fn offer_statistics_can_break_the_promise_and_are_refused_then() {
        let mut config = Config::default();
        config.privacy.offer_stats_rho_per_day = 0.05;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key(), "privacy.max_epsilon_per_device_per_day");
        assert!(err.to_string().contains("offer_stats_rho_per_day"), "{err}");
        config.privacy.mechanism = MechanismKind::Laplace;
        config.privacy.offer_stats_epsilon_per_day = 1.5;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key(), "privacy.max_epsilon_per_device_per_day");
    }

    #[test]
    fn the_defaults_keep_hourly_and_daily_counts_accurate_under_the_promise() {
        let config = Config::default();
        let c = config.validate().unwrap();
        let p = &c.privacy;
        assert!(p.ci95_half_width <= 28.0, "hourly ±{}", p.ci95_half_width);
        assert!(
            p.daily.ci95_half_width <= 30.0,
            "daily ±{}",
            p.daily.ci95_half_width
        );
        assert!(
            p.epsilon_per_device_per_day <= 2.0,
            "{}",
            p.epsilon_per_device_per_day
        );
        // Any 24 hours touches two UTC days: the daily part is two releases' worth.
        let daily = &p.budget[1];
        assert_eq!(daily.release, "daily_foot_traffic");
        assert!((daily.rho - 2.0 * p.daily.rho_per_release).abs() < 1e-12);
        assert!((p.daily.rho_per_release - config.privacy.rho_per_day).abs() < 1e-9);
        // Laplace defaults keep the promise too.
        let mut laplace = Config::default();
        laplace.privacy.mechanism = MechanismKind::Laplace;
        let c = laplace.validate().unwrap();
        assert!(c.privacy.epsilon_per_device_per_day <= 2.0);
        assert!((c.privacy.budget[1].epsilon - 2.0 * laplace.privacy.epsilon_per_day).abs() < 1e-9);
    }

    #[test]
    fn the_daily_release_can_break_the_promise_and_is_refused_then() {
        let mut config = Config::default();
        config.privacy.rho_per_day = 0.03;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key(), "privacy.max_epsilon_per_device_per_day");
        assert!(err.to_string().contains("privacy.rho_per_day"), "{err}");
        let mut config = Config::default();
        config.privacy.mechanism = MechanismKind::Laplace;
        config.privacy.epsilon_per_day = 0.8;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key(), "privacy.max_epsilon_per_device_per_day");
        assert!(err.to_string().contains("privacy.epsilon_per_day"), "{err}");
    }
}
