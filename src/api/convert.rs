//! Domain records to protobuf messages (the outbound half of the boundary; inbound
//! conversion is validation, in `validate.rs`).

use std::time::Duration;

use crate::clock::Timestamp;
use crate::consent::{MyData, ReceiptView};
use crate::model::Purpose;
use crate::policy::PrivacyPolicy;

use super::pb;

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let ms = t.millis();
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // Unwrap safety: rem_euclid(1000) * 1e6 is below 1e9 and fits in i32.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).expect("below 1e9"),
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn purpose(p: Purpose) -> pb::Purpose {
    match p {
        Purpose::NearbyOffers => pb::Purpose::NearbyOffers,
        Purpose::FootTraffic => pb::Purpose::FootTraffic,
    }
}

pub fn receipt(view: &ReceiptView) -> pb::ConsentReceipt {
    let r = &view.receipt;
    pb::ConsentReceipt {
        receipt_id: r.receipt_id.clone(),
        purposes: r.purposes.iter().map(|p| purpose(p) as i32).collect(),
        granted_at: Some(timestamp(r.granted_at)),
        policy_version: r.policy_version.clone(),
        principal_id: r.device.to_hex(),
        controller: r.controller.clone(),
        expires_at: Some(timestamp(view.expires_at)),
        withdrawn: view.withdrawn,
    }
}

pub fn my_data(d: &MyData) -> pb::MyData {
    let deadline = d.retention_deadline.map(timestamp);
    pb::MyData {
        principal_id: d.device.map(|id| id.to_hex()).unwrap_or_default(),
        receipts: d.receipts.iter().map(receipt).collect(),
        current_cell: d.current_cell.map(|c| pb::CurrentCell {
            cell: c.cell,
            since: Some(timestamp(c.since)),
            last_seen: Some(timestamp(c.last_seen)),
            retention_deadline: deadline,
        }),
        notifications: d
            .notifications
            .iter()
            .map(|n| pb::NotificationRecord {
                sent_at: Some(timestamp(n.sent_at)),
                offer_id: n.offer_id.to_string(),
                merchant_id: n.merchant_id.to_string(),
                feedback: n
                    .feedback
                    .map(|f| f.as_str().to_string())
                    .unwrap_or_default(),
                retention_deadline: deadline,
            })
            .collect(),
        restrictions: d
            .restrictions
            .iter()
            .flat_map(|r| {
                let mut out = Vec::new();
                if r.muted {
                    out.push(pb::MerchantRestriction {
                        merchant_id: r.merchant_id.to_string(),
                        kind: "MUTED".into(),
                        until: None,
                        retention_deadline: deadline,
                    });
                }
                if let Some(until) = r.backoff_until {
                    out.push(pb::MerchantRestriction {
                        merchant_id: r.merchant_id.to_string(),
                        kind: "DISMISSAL_BACKOFF".into(),
                        until: Some(timestamp(until)),
                        retention_deadline: deadline,
                    });
                }
                out
            })
            .collect(),
        pending_contributions: d.pending_contributions.map(|(count, deadline)| {
            pb::PendingContributions {
                count,
                retention_deadline: Some(timestamp(deadline)),
            }
        }),
        contribution_spend: d.contribution_spend.map(|(count, deadline)| {
            pb::PendingContributions {
                count,
                retention_deadline: Some(timestamp(deadline)),
            }
        }),
        pending_daily_contributions: d.pending_daily_contributions.map(|(count, deadline)| {
            pb::PendingContributions {
                count,
                retention_deadline: Some(timestamp(deadline)),
            }
        }),
        retention_deadline: deadline,
        last_activity: d.last_activity.map(timestamp),
    }
}

pub fn privacy_policy(p: &PrivacyPolicy<'_>) -> pb::PrivacyPolicy {
    let c = &p.settings.config;
    let caps = &p.settings.consequences.caps;
    let dp = &p.settings.consequences.privacy;
    pb::PrivacyPolicy {
        controller: c.policy.controller.clone(),
        policy_version: c.policy.version.clone(),
        max_cell_resolution: u32::from(c.location.max_resolution),
        max_cell_area_km2: p.max_cell_area_km2,
        finer_cells: match c.location.finer_cells {
            crate::config::FinerCells::Coarsen => "coarsen",
            crate::config::FinerCells::Reject => "reject",
        }
        .to_string(),
        retention: Some(pb::Retention {
            device_state: Some(duration(c.retention.device_state())),
            contributions: Some(duration(c.insights.bucket.get() + c.insights.grace.get())),
            max_report_age: Some(duration(c.offers.max_report_age.get())),
        }),
        caps: Some(pb::PrivacyCaps {
            min_dwell: Some(duration(c.caps.min_dwell.get())),
            quiet_hours: c.caps.quiet_hours.to_string(),
            min_interval: Some(duration(c.caps.min_interval.get())),
            per_device_per_day: c.caps.per_device_per_day,
            per_device_per_week: c.caps.per_device_per_week,
            per_merchant_per_device_per_week: c.caps.per_merchant_per_device_per_week,
            dismissal_backoff: c
                .caps
                .dismissal_backoff
                .iter()
                .map(|d| duration(d.get()))
                .collect(),
            per_cell_per_minute: c.caps.per_cell_per_minute,
            ignore_fatigue_after: c.caps.ignore_fatigue_after,
            max_report_age: Some(duration(c.offers.max_report_age.get())),
            max_offers_per_reply: c.offers.max_offers_per_reply,
            max_notifications_per_day: caps.max_notifications_per_device_per_day,
            max_notifications_per_week: caps.max_notifications_per_device_per_week,
        }),
        privacy: Some(pb::DifferentialPrivacy {
            mechanism: dp.mechanism.to_string(),
            epsilon_per_device_per_day: dp.epsilon_per_device_per_day,
            delta: dp.delta,
            max_epsilon_per_device_per_day: c.privacy.max_epsilon_per_device_per_day,
            rho_per_device_per_day: dp.rho_per_device_per_day,
            noise_scale: dp.noise_scale,
            noise_std_dev: dp.noise_std_dev,
            ci95_half_width: dp.ci95_half_width,
            threshold: dp.threshold,
            max_cells_per_bucket: c.privacy.max_cells_per_bucket,
            bucket: Some(duration(c.insights.bucket.get())),
            grace: Some(duration(c.insights.grace.get())),
            insights_resolution: u32::from(c.insights.resolution),
            max_contributions_per_day: dp.contributions_per_day,
            offer_stats_noise_std_dev: dp.offer_stats.noise_std_dev,
            offer_stats_rho_per_day: dp
                .budget
                .iter()
                .filter(|p| p.release == "offer_stats")
                .map(|p| p.rho)
                .sum(),
            offer_stats_epsilon_per_day: dp
                .budget
                .iter()
                .filter(|p| p.release == "offer_stats")
                .map(|p| p.epsilon)
                .sum(),
            daily_noise_std_dev: dp.daily.noise_std_dev,
            daily_ci95_half_width: dp.daily.ci95_half_width,
            max_cells_per_day: c.privacy.max_cells_per_day,
            daily_rho_per_day: dp
                .budget
                .iter()
                .filter(|p| p.release == "daily_foot_traffic")
                .map(|p| p.rho)
                .sum(),
            daily_epsilon_per_day: dp
                .budget
                .iter()
                .filter(|p| p.release == "daily_foot_traffic")
                .map(|p| p.epsilon)
                .sum(),
            budget: dp
                .budget
                .iter()
                .map(|p| pb::BudgetPart {
                    release: p.release.to_string(),
                    rho: p.rho,
                    epsilon: p.epsilon,
                })
                .collect(),
            budget_explanation: crate::policy::budget_explanation(p.settings),
        }),
        recipients: p
            .recipients
            .iter()
            .map(|r| pb::DataRecipient {
                recipient: r.recipient.to_string(),
                receives: r.receives.clone(),
            })
            .collect(),
        purposes: Purpose::ALL.iter().map(|p| purpose(*p) as i32).collect(),
        exclusion_areas: u32::try_from(c.exclusions.cells.len()).unwrap_or(u32::MAX),
        summary: p.summary.clone(),
    }
}

pub fn offer(o: &crate::model::Offer) -> pb::Offer {
    pb::Offer {
        offer_id: o.offer_id.to_string(),
        merchant_id: o.merchant_id.to_string(),
        title: o.title.clone(),
        body: o.body.clone(),
        cell: o.cell,
        radius_k: o.radius_k,
        valid_from: Some(timestamp(o.valid_from)),
        valid_until: Some(timestamp(o.valid_until)),
        max_notifications_per_day: o.max_notifications_per_day,
        opening_hours: o
            .opening_hours
            .iter()
            .map(|h| pb::OpeningHours {
                weekday: u32::from(h.weekday),
                open: crate::offers::format_hhmm(h.open),
                close: crate::offers::format_hhmm(h.close),
            })
            .collect(),
        why: None,
        updated_at: Some(timestamp(o.updated_at)),
    }
}

pub fn delivered(o: &crate::model::Offer, why: &crate::presence::Explanation) -> pb::Offer {
    let mut out = offer(o);
    let minutes = why.dwell.as_secs() / 60;
    let near = match why.grid_distance {
        0 => "in your area".to_string(),
        1 => "one area away".to_string(),
        n => format!("{n} areas away"),
    };
    out.why = Some(pb::OfferExplanation {
        grid_distance: why.grid_distance,
        dwell: Some(duration(why.dwell)),
        remaining_today: why.remaining_today,
        remaining_this_week: why.remaining_this_week,
        text: format!(
            "You got this because {} is {near} and you have been here for {minutes} min. \
             You can get {} more offer(s) today and {} more this week.",
            o.title, why.remaining_today, why.remaining_this_week
        ),
    });
    out
}

pub fn reason(r: Option<crate::caps::Reason>) -> pb::NoOfferReason {
    use crate::caps::Reason as R;
    match r {
        None => pb::NoOfferReason::None,
        Some(R::NoConsent) => pb::NoOfferReason::NoConsent,
        Some(R::NoOffersNearby) => pb::NoOfferReason::NoOffersNearby,
        Some(R::DwellNotMet) => pb::NoOfferReason::DwellNotMet,
        Some(R::QuietHours) => pb::NoOfferReason::QuietHours,
        Some(R::MinInterval) => pb::NoOfferReason::MinInterval,
        Some(R::DailyCap) => pb::NoOfferReason::DailyCap,
        Some(R::WeeklyCap) => pb::NoOfferReason::WeeklyCap,
        Some(R::MerchantCap) => pb::NoOfferReason::MerchantCap,
        Some(R::DismissalBackoff) => pb::NoOfferReason::DismissalBackoff,
        Some(R::MerchantMuted) => pb::NoOfferReason::MerchantMuted,
        Some(R::OfferCap) => pb::NoOfferReason::OfferCap,
        Some(R::StaleReport) => pb::NoOfferReason::StaleReport,
        Some(R::GlobalCellCap) => pb::NoOfferReason::GlobalCellCap,
    }
}

pub fn privacy_params(s: &crate::settings::Settings) -> pb::PrivacyParams {
    let c = &s.config;
    let dp = &s.consequences.privacy;
    pb::PrivacyParams {
        mechanism: dp.mechanism.to_string(),
        epsilon_per_device_per_day: dp.epsilon_per_device_per_day,
        delta: dp.delta,
        noise_std_dev: dp.noise_std_dev,
        ci95_half_width: dp.ci95_half_width,
        threshold: dp.threshold,
        bucket: Some(duration(c.insights.bucket.get())),
        resolution: u32::from(c.insights.resolution),
        max_cells_per_bucket: c.privacy.max_cells_per_bucket,
        explanation: crate::policy::foot_traffic_explanation(s),
        daily_noise_std_dev: dp.daily.noise_std_dev,
        daily_ci95_half_width: dp.daily.ci95_half_width,
        max_cells_per_day: c.privacy.max_cells_per_day,
    }
}
