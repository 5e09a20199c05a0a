//! `--html FILE`: one self-contained page (inline CSS and SVG, no script, no external asset)
//! with the charts an operator would rather look at than read: notifications per device per
//! day, outcomes by reason, and released vs true counts with their 95% bands.
//!
//! The page carries a Content-Security-Policy of `default-src 'none'`, so even a mistake
//! here could not make a browser fetch anything.

use std::fmt::Write;

use super::report::{self, Report};

const TEMPLATE: &str = include_str!("page.html");
/// Fill colours of the first and second config.
const COLOURS: [&str; 2] = ["#2563eb", "#ea580c"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for one report, or two compared (`reports.len()` is 1 or 2).
pub fn page(reports: &[&Report]) -> String {
    let first = reports[0];
    let names: Vec<String> = reports.iter().map(|r| esc(&r.config)).collect();
    let mut legend = String::new();
    for (i, n) in names.iter().enumerate() {
        let _ = write!(
            legend,
            r#"<span class="key"><span class="swatch" style="background:{}"></span>{n}</span>"#,
            COLOURS[i]
        );
    }
    let summary = format!(
        "{} devices × {} day(s) of the city <b>{}</b>, seed {}; {} reports in {:.1} s. {}.",
        first.devices,
        first.days,
        esc(&first.city),
        first.seed,
        first.reports,
        first.took_secs,
        esc(first.reproducibility)
    );
    let mut series = String::new();
    for (i, r) in reports.iter().enumerate() {
        series.push_str(&released_chart(r, i));
    }
    TEMPLATE
        .replace("{{TITLE}}", &names.join(" vs "))
        .replace("{{SUMMARY}}", &summary)
        .replace("{{LEGEND}}", &legend)
        .replace("{{HISTOGRAM}}", &histogram(reports))
        .replace("{{OUTCOMES}}", &outcomes(reports))
        .replace("{{SERIES}}", &series)
        .replace("{{TABLE}}", &table(reports))
}

/// Bars of the share of (device, day) pairs with n notifications, n = 0..=max.
fn histogram(reports: &[&Report]) -> String {
    let max_n = reports
        .iter()
        .map(|r| r.notifications.per_device_per_day.histogram.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let shares: Vec<Vec<f64>> = reports
        .iter()
        .map(|r| {
            let h = &r.notifications.per_device_per_day.histogram;
            let total: u64 = h.iter().sum::<u64>().max(1);
            (0..max_n)
                .map(|n| h.get(n).copied().unwrap_or(0) as f64 / total as f64)
                .collect()
        })
        .collect();
    let (w, h, left, bottom) = (560.0, 240.0, 44.0, 28.0);
    // The axis ends at the next quarter above the tallest bar.
    let top = (shares.iter().flatten().fold(0.0_f64, |a, b| a.max(*b)) * 4.0)
        .ceil()
        .max(1.0)
        / 4.0;
    let group = (w - left) / max_n as f64;
    let bar = (group * 0.8) / reports.len() as f64;
    let mut svg = format!(
        r#"<svg id="histogram" viewBox="0 0 {w} {h}" role="img" aria-label="Notifications per device per day"><title>Share of devices per day with each number of notifications</title>"#
    );
    axis(&mut svg, left, w, h, bottom, top);
    for (i, s) in shares.iter().enumerate() {
        for (n, share) in s.iter().enumerate() {
            let bh = share / top * (h - bottom - 10.0);
            let x = left + n as f64 * group + group * 0.1 + i as f64 * bar;
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{bh:.1}" fill="{}"><title>{}: {n} notifications: {:.1}%</title></rect>"#,
                h - bottom - bh,
                COLOURS[i],
                esc(&reports[i].config),
                100.0 * share
            );
        }
    }
    for n in 0..max_n {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{n}</text>"#,
            left + (n as f64 + 0.5) * group,
            h - bottom + 16.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A y axis from 0 to `top` (a share, a multiple of 25%) with a gridline every 25%.
fn axis(svg: &mut String, left: f64, w: f64, h: f64, bottom: f64, top: f64) {
    let steps = (top / 0.25).round().max(1.0) as u32;
    for k in 0..=steps {
        let v = 0.25 * f64::from(k);
        let y = h - bottom - (h - bottom - 10.0) * v / top;
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{left}" x2="{w}" y1="{y:.1}" y2="{y:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"#,
            left - 4.0,
            y + 4.0,
            100.0 * v
        );
    }
}

/// Horizontal bars: each outcome's share of reports (outcomes no config saw are left out).
fn outcomes(reports: &[&Report]) -> String {
    let shown: Vec<usize> = (0..report::OUTCOMES.len())
        .filter(|i| reports.iter().any(|r| r.outcomes[*i].reports > 0))
        .collect();
    let row = 12.0 * reports.len() as f64 + 8.0;
    let (w, left) = (560.0, 170.0);
    let h = row * shown.len() as f64 + 10.0;
    let mut svg = format!(
        r#"<svg id="outcomes" viewBox="0 0 {w} {h}" role="img" aria-label="Reports by outcome"><title>Share of reports by outcome (NONE: an offer was sent)</title>"#
    );
    for (k, i) in shown.iter().enumerate() {
        let y0 = 5.0 + k as f64 * row;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y0 + row / 2.0 + 2.0,
            report::OUTCOMES[*i]
        );
        for (j, r) in reports.iter().enumerate() {
            let share = r.outcomes[*i].share;
            let bw = share * (w - left - 60.0);
            let y = y0 + 4.0 + j as f64 * 12.0;
            let _ = write!(
                svg,
                r#"<rect class="bar" x="{left}" y="{y:.1}" width="{bw:.1}" height="10" fill="{}"><title>{}: {}: {:.1}%</title></rect><text x="{:.1}" y="{:.1}">{:.1}%</text>"#,
                COLOURS[j],
                esc(&r.config),
                report::OUTCOMES[*i],
                100.0 * share,
                left + bw + 4.0,
                y + 9.0,
                100.0 * share
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The busiest cell's hours: the true count (line), the released count (dots) and the 95%
/// interval a merchant is shown around it (band), which should hold the truth 95% of the time.
fn released_chart(r: &Report, i: usize) -> String {
    let p = &r.privacy;
    let pts = &p.series;
    let (w, h, left, bottom) = (560.0, 220.0, 44.0, 24.0);
    let half = p.hour_ci95_half_width;
    let top = pts
        .iter()
        .map(|q| (q.released as f64 + half).max(q.truth as f64))
        .fold(1.0_f64, f64::max);
    let low = pts
        .iter()
        .map(|q| q.released as f64 - half)
        .fold(0.0_f64, f64::min);
    let n = pts.len().max(2) as f64;
    let x = |k: usize| left + (w - left - 8.0) * k as f64 / (n - 1.0);
    let y = |v: f64| 10.0 + (h - bottom - 10.0) * (top - v) / (top - low);
    let mut svg = format!(
        r#"<figure><figcaption>{}: cell {} — true count (line), released count (dots) and its 95% band (±{half:.0})</figcaption><svg class="series" viewBox="0 0 {w} {h}" role="img" aria-label="Released vs true counts"><title>Released vs true counts of the busiest cell, per hour</title>"#,
        esc(&r.config),
        esc(&p.series_cell)
    );
    let zero = y(0.0);
    let _ = write!(
        svg,
        r#"<line class="grid" x1="{left}" x2="{w}" y1="{zero:.1}" y2="{zero:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end">0</text><text x="{:.1}" y="{:.1}" text-anchor="end">{top:.0}</text>"#,
        left - 4.0,
        zero + 4.0,
        left - 4.0,
        y(top) + 8.0
    );
    for (k, q) in pts.iter().enumerate() {
        let hour = q.bucket_start_ms.div_euclid(3_600_000).rem_euclid(24);
        if hour % 6 == 0 && q.bucket_start_ms % 3_600_000 == 0 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{hour:02}:00</text>"#,
                x(k),
                h - 6.0
            );
        }
    }
    if !pts.is_empty() {
        let mut band = String::new();
        for (k, q) in pts.iter().enumerate() {
            let _ = write!(
                band,
                "{}{:.1},{:.1}",
                if k == 0 { "M" } else { "L" },
                x(k),
                y(q.released as f64 + half)
            );
        }
        for (k, q) in pts.iter().enumerate().rev() {
            let _ = write!(band, "L{:.1},{:.1}", x(k), y(q.released as f64 - half));
        }
        band.push('Z');
        let _ = write!(
            svg,
            r#"<path class="band" d="{band}" fill="{}" fill-opacity="0.15"/>"#,
            COLOURS[i]
        );
        let line: Vec<String> = pts
            .iter()
            .enumerate()
            .map(|(k, q)| format!("{:.1},{:.1}", x(k), y(q.truth as f64)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline class="truth" points="{}" fill="none" stroke="#111827" stroke-width="1.5"/>"##,
            line.join(" ")
        );
        for (k, q) in pts.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<circle class="released{}" cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"><title>hour {k}: true {}, released {}{}</title></circle>"#,
                if q.suppressed { " suppressed" } else { "" },
                x(k),
                y(q.released as f64),
                COLOURS[i],
                q.truth,
                q.released,
                if q.suppressed { " (suppressed)" } else { "" }
            );
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The text report's table as HTML.
fn table(reports: &[&Report]) -> String {
    let mut out = String::from("<table><thead><tr><th></th>");
    for r in reports {
        let _ = write!(out, r#"<th class="num">{}</th>"#, esc(&r.config));
    }
    if reports.len() == 2 {
        out.push_str(r#"<th class="num">change</th>"#);
    }
    out.push_str("</tr></thead><tbody>");
    let mut section = "";
    for row in report::table(reports) {
        if row.section != section {
            section = row.section;
            let _ = write!(
                out,
                r#"<tr class="section"><th colspan="{}">{}</th></tr>"#,
                reports.len() + 2,
                esc(section)
            );
        }
        let _ = write!(out, "<tr><td>{}</td>", esc(row.label.trim()));
        for v in row.values.iter().chain(&row.change) {
            let _ = write!(out, r#"<td class="num">{}</td>"#, esc(v));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}
