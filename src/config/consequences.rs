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

/// The privacy loss per device and the accuracy of each released count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrivacyConsequences {
    /// `"discrete_gaussian"` or `"discrete_laplace"`.
    pub mechanism: &'static str,
    /// Worst-case (ε, δ) per device per UTC day, over all releases of that day.
    pub epsilon_per_device_per_day: f64,
    /// δ of the guarantee (0 for the pure-DP Laplace mechanism).
    pub delta: f64,
    /// zCDP ρ per device per day (Gaussian only, else 0).
    pub rho_per_device_per_day: f64,
    /// Releases per day.
    pub buckets_per_day: u32,
    /// (cell, bucket) pairs one device can move per day.
    pub contributions_per_day: u32,
    /// Scale handed to opendp (σ for Gaussian, b for Laplace).
    pub noise_scale: f64,
    /// Standard deviation of the noise on one released count.
    pub noise_std_dev: f64,
    /// Half-width of the 95% interval of one released count.
    pub ci95_half_width: f64,
    /// Half-width of the 95% interval of one cell's day total (a sum of its buckets).
    pub day_total_ci95_half_width: f64,
    /// Noisy counts below this are suppressed.
    pub threshold: u32,
}

impl Consequences {
    /// Computes the consequences of `config` (values are assumed range-checked).
    pub fn of(config: &Config) -> Result<Consequences, AccountingError> {
        Ok(Consequences {
            caps: cap_consequences(config),
            privacy: privacy_consequences(config)?,
        })
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

fn privacy_consequences(config: &Config) -> Result<PrivacyConsequences, AccountingError> {
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
    Ok(match p.mechanism {
        MechanismKind::Gaussian => {
            // One release moves at most k counts by 1: L2² sensitivity k, so ρ_bucket = k/(2σ²).
            // Over a day the concatenated releases move at most C counts: ρ_day = C/(2σ²).
            let sigma = accounting::gaussian_sigma_for_rho(k, p.rho_per_bucket);
            let rho_day = c / (2.0 * sigma * sigma);
            PrivacyConsequences {
                mechanism: "discrete_gaussian",
                epsilon_per_device_per_day: accounting::zcdp_to_epsilon(rho_day, p.delta)?,
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
            PrivacyConsequences {
                mechanism: "discrete_laplace",
                epsilon_per_device_per_day: c / b,
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
