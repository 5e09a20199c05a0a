//! The privacy policy in force, generated from the live settings: a machine-readable record
//! and a plain-language summary built from the same numbers, so the text people read can
//! never drift from what the system does.

use crate::cells;
use crate::config::{FinerCells, InsightsScope, MechanismKind};
use crate::settings::Settings;

/// Who receives what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub recipient: &'static str,
    pub receives: String,
}

/// The machine-readable policy (the live settings plus derived figures) and its summary.
#[derive(Debug, Clone)]
pub struct PrivacyPolicy<'a> {
    pub settings: &'a Settings,
    pub max_cell_area_km2: f64,
    pub recipients: Vec<Recipient>,
    pub summary: String,
}

impl<'a> PrivacyPolicy<'a> {
    /// The policy of `settings`.
    pub fn of(settings: &'a Settings) -> Self {
        let area = cells::average_area_km2(settings.config.location.max_resolution);
        PrivacyPolicy {
            settings,
            max_cell_area_km2: area,
            recipients: recipients(settings),
            summary: summary(settings, area),
        }
    }
}

/// What a released foot-traffic count is, in plain words, from the live settings (shown with
/// every gRPC foot-traffic reply and on the dashboard).
pub fn foot_traffic_explanation(s: &Settings) -> String {
    let c = &s.config;
    let dp = &s.consequences.privacy;
    format!(
        "Each count is the number of distinct consenting devices seen in a cell per {}, \
         plus random noise (standard deviation {:.1}), so that nobody's presence can be \
         inferred: 95% of counts are within ±{:.0} of the truth. Counts below {} are shown \
         as suppressed — for readability only: the noise is the protection, and sums over \
         several cells include suppressed values. Each device counts in at most {} cells per \
         period. Daily counts are a release of their own — distinct devices per cell and UTC \
         day, each device in at most {} cells a day, so a person who stays three hours counts \
         once — with noise of standard deviation {:.1} (95% within ±{:.0}). A device's privacy \
         loss over everything released (hourly and daily counts and offer statistics together) \
         is at most ε = {:.2} per day, in any 24 hours.",
        c.insights.bucket,
        dp.noise_std_dev,
        dp.ci95_half_width,
        dp.threshold,
        c.privacy.max_cells_per_bucket,
        c.privacy.max_cells_per_day,
        dp.daily.noise_std_dev,
        dp.daily.ci95_half_width,
        dp.epsilon_per_device_per_day,
    )
}

/// The per-device budget in plain words: each release series' share, and how they add up to
/// the promise (zCDP ρ adds up and converts to one ε; pure-DP ε adds up).
pub fn budget_explanation(s: &Settings) -> String {
    let c = &s.config;
    let dp = &s.consequences.privacy;
    let part = |name: &str| {
        dp.budget
            .iter()
            .find(|p| p.release == name)
            .map_or(0.0, |p| p.rho + p.epsilon)
    };
    let (hourly, daily, offers) = (
        part("hourly_foot_traffic"),
        part("daily_foot_traffic"),
        part("offer_stats"),
    );
    let (unit, per_day) = match c.privacy.mechanism {
        MechanismKind::Gaussian => ("ρ", dp.daily.rho_per_release),
        MechanismKind::Laplace => ("ε", dp.daily.epsilon_per_release),
    };
    let pairs = dp.contributions_per_day.max(1);
    let total = match c.privacy.mechanism {
        MechanismKind::Gaussian => format!(
            "together ρ = {:.4}, which is ε = {:.2} at δ = {:e}",
            dp.rho_per_device_per_day, dp.epsilon_per_device_per_day, dp.delta
        ),
        MechanismKind::Laplace => format!("together ε = {:.2}", dp.epsilon_per_device_per_day),
    };
    format!(
        "In any 24 hours one device can cost: hourly counts {unit} = {hourly:.4} (at most \
         {pairs} area-hours, {unit} = {:.5} each), plus daily counts {unit} = {daily:.4} (a day's \
         release costs {unit} = {per_day:.4} for a device in up to {} areas, and any 24 hours \
         spans two calendar days, so twice that), plus offer statistics {unit} = {offers:.4}: \
         {total}, within the promised ε = {}.",
        hourly / f64::from(pairs),
        c.privacy.max_cells_per_day,
        c.privacy.max_epsilon_per_device_per_day,
    )
}

fn recipients(s: &Settings) -> Vec<Recipient> {
    let scope = match s.config.insights.scope {
        InsightsScope::OwnArea => "around their own locations",
        InsightsScope::All => "in every released area",
    };
    vec![
        Recipient {
            recipient: "the device itself",
            receives: "everything held about it (GetMyData), at any time".to_string(),
        },
        Recipient {
            recipient: "merchants",
            receives: format!(
                "counts of people per area and {} and per area and day {scope}, and per offer and day how often it \
                 was delivered and opened, only after differential-privacy noise is added; never \
                 an individual, a device id, an exact count or a location history",
                s.config.insights.bucket
            ),
        },
        Recipient {
            recipient: "other companies",
            receives: "nothing".to_string(),
        },
    ]
}

fn plural(n: u32, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn summary(s: &Settings, area_km2: f64) -> String {
    let c = &s.config;
    let caps = &s.consequences.caps;
    let dp = &s.consequences.privacy;
    let mut out = Vec::new();
    out.push(format!(
        "{} runs this service (privacy policy version {}).",
        c.policy.controller, c.policy.version
    ));
    out.push(format!(
        "Your app shares only a coarse area, never coordinates: at most an H3 cell of resolution \
         {} (about {:.2} km²). {}",
        c.location.max_resolution,
        area_km2,
        match c.location.finer_cells {
            FinerCells::Coarsen => "Anything more precise is made coarser before it is used.",
            FinerCells::Reject => "Anything more precise is refused.",
        }
    ));
    out.push(
        "Your device is known only by a keyed pseudonym; its identifier is never stored. \
         No history of where you have been is kept: only your current area and since when."
            .to_string(),
    );
    out.push(format!(
        "Nearby offers (only if you allow them): at most {} per day and {} per week, at least {} \
         apart, {}, and only after you have spent {} in an area. At most {} from the same merchant \
         per week. Dismissing a merchant's offer pauses it for longer each time; muting a merchant \
         stops it until you withdraw consent.",
        plural(caps.max_notifications_per_device_per_day, "offer", "offers"),
        caps.max_notifications_per_device_per_week,
        c.caps.min_interval,
        if c.caps.quiet_hours.0.is_some() {
            format!("never between {} (your local time)", c.caps.quiet_hours)
        } else {
            "at any time of day".to_string()
        },
        c.caps.min_dwell,
        c.caps.per_merchant_per_device_per_week,
    ));
    let mechanism = match c.privacy.mechanism {
        MechanismKind::Gaussian => "discrete Gaussian",
        MechanismKind::Laplace => "discrete Laplace",
    };
    let delta = if dp.delta > 0.0 {
        format!(" (δ = {:e})", dp.delta)
    } else {
        String::new()
    };
    out.push(format!(
        "Foot traffic (only if you allow it): merchants see how many devices were in an area per \
         {}, with random {mechanism} noise added (standard deviation {:.1}; 95% of released counts \
         are within ±{:.0} of the truth), and how many distinct devices were in an area per \
         day, released once after the day with noise of its own (standard deviation {:.1}; \
         ±{:.0}). Counts below {} are shown only as \"few\" — a courtesy \
         to readers, not a protection: the noise is what protects you. Merchants also see, per \
         offer and day, how often it was delivered and opened, with noise of the same kind \
         (standard deviation {:.1}), never exact counts. You are counted in at most {} areas \
         per period and {} in any 24 hours, and in at most {} areas per day, so the privacy \
         loss for you over all of it is at most ε = {:.2} in any 24 hours{delta}, within the \
         promised ε = {}. {}",
        c.insights.bucket,
        dp.noise_std_dev,
        dp.ci95_half_width,
        dp.daily.noise_std_dev,
        dp.daily.ci95_half_width,
        dp.threshold,
        dp.offer_stats.noise_std_dev,
        c.privacy.max_cells_per_bucket,
        dp.contributions_per_day,
        c.privacy.max_cells_per_day,
        dp.epsilon_per_device_per_day,
        c.privacy.max_epsilon_per_device_per_day,
        budget_explanation(s),
    ));
    out.push(format!(
        "Retention: everything about your device is deleted after {} without activity; raw \
         foot-traffic records are deleted as soon as their period is released. You can see \
         everything held about you and erase it at any time; nothing is shared with other \
         companies.",
        plural(c.retention.device_days, "day", "days"),
    ));
    if !c.exclusions.cells.is_empty() {
        out.push(format!(
            "{} sensitive areas (such as clinics or places of worship) are excluded: no offers \
             there and nobody is counted there.",
            c.exclusions.cells.len()
        ));
    }
    out.join(" ")
}
