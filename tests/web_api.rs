//! The dashboard's JSON API over real HTTP: authentication (the same keys as gRPC), scope
//! (own area only), the shared per-key rate limit, and bad parameters refused with a 4xx and
//! a message naming the parameter. Also: the dashboard itself is served with a strict CSP.

#[path = "support/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use harness::*;
use hexveil::clock::{Clock, Timestamp};
use hexveil::model::{Offer, Purpose, Purposes};
use hexveil::presence::Report;
use serde_json::Value;

/// 2026-01-05T10:00:00Z.
const T0: i64 = 1_767_607_200_000;

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    Reply {
        status: head[9..12].parse().unwrap(),
        headers: head.to_string(),
        body: body.to_string(),
    }
}

fn cell_at(lat: f64, lng: f64) -> h3o::CellIndex {
    h3o::LatLng::new(lat, lng)
        .unwrap()
        .to_cell(h3o::Resolution::Eight)
}

/// A server with two merchants far apart; returns (server, clock, key A, A's cell, B's cell).
async fn setup(
    extra: &str,
) -> (
    TestServer,
    hexveil::clock::ManualClock,
    String,
    h3o::CellIndex,
    h3o::CellIndex,
) {
    let (clock, shared) = manual_clock(T0);
    let server = TestServer::start(extra, shared).await;
    let here = cell_at(59.33, 18.07);
    let elsewhere = cell_at(57.70, 11.97);
    let store = &server.app.store;
    let (_, key) = hexveil::merchants::add(store, "A", vec![here.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    hexveil::merchants::add(store, "B", vec![elsewhere.into()], 8, Timestamp(T0 - 1))
        .await
        .unwrap();
    server.app.insights.refresh_domain().await.unwrap();
    (server, clock, key, here, elsewhere)
}

fn assert_error(r: &Reply, status: u16, field: Option<&str>, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let j = r.json();
    let msg = j["error"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    if let Some(f) = field {
        assert_eq!(j["field"], f, "{}", r.body);
    }
}

#[tokio::test]
async fn auth_is_the_merchant_key_and_wrong_keys_get_401() {
    let (server, _clock, key, here, _) = setup("").await;
    let a = server.http;
    for path in [
        "/api/v1/me",
        "/api/v1/offers",
        "/api/v1/privacy",
        "/api/v1/foot-traffic?start=0&end=1",
    ] {
        let r = get(a, path, None).await;
        assert_error(&r, 401, None, "API key");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        let wrong = format!("{}x", &key[..key.len() - 1]);
        assert_error(&get(a, path, Some(&wrong)).await, 401, None, "API key");
        assert_error(&get(a, path, Some("nonsense")).await, 401, None, "API key");
    }

    let me = get(a, "/api/v1/me", Some(&key)).await;
    assert_eq!(me.status, 200, "{}", me.body);
    let me = me.json();
    assert_eq!(me["name"], "A");
    assert_eq!(me["locations"][0], format!("{:x}", u64::from(here)));
    let area = me["area"].as_array().unwrap();
    assert_eq!(area.len(), 19, "grid_disk(location, 2)");
    assert_eq!(
        area.iter().filter(|c| c["location"] == true).count(),
        1,
        "the location cell is marked"
    );
    for c in area {
        let boundary = c["boundary"].as_array().unwrap();
        assert_eq!(boundary.len(), 6, "hexagon boundaries: {c}");
        let lat = boundary[0][0].as_f64().unwrap();
        assert!((59.0..60.0).contains(&lat), "[lat, lng] in degrees");
    }

    // A revoked key stops working at once, here as over gRPC.
    let id = uuid::Uuid::parse_str(me["merchant_id"].as_str().unwrap()).unwrap();
    hexveil::merchants::revoke(&server.app.store, id, Timestamp(T0))
        .await
        .unwrap();
    assert_error(
        &get(a, "/api/v1/me", Some(&key)).await,
        401,
        None,
        "API key",
    );
    server.stop().await;
}

#[tokio::test]
async fn foot_traffic_reads_released_counts_of_the_own_area_only() {
    let (server, clock, key, here, elsewhere) = setup("").await;
    let a = server.http;
    let app = &server.app;
    let counted: Purposes = [Purpose::FootTraffic].into_iter().collect();
    for n in 0..30 {
        let device = app.pseudonyms.device_id(&token(n));
        app.consents.set(device, counted, "1".into()).await.unwrap();
        app.presence
            .report(Report {
                device,
                cell: here,
                observed_at: clock.now(),
                utc_offset_minutes: 0,
            })
            .await
            .unwrap();
    }
    let range = format!("start={T0}&end={}", T0 + 86_400_000);
    let before = get(a, &format!("/api/v1/foot-traffic?{range}"), Some(&key)).await;
    assert_eq!(before.status, 200, "{}", before.body);
    assert_eq!(
        before.json()["points"].as_array().unwrap().len(),
        0,
        "nothing before the release: merchants read released tables only"
    );

    clock.advance(Duration::from_secs(3600 + 600));
    assert_eq!(app.insights.release_due().await.unwrap().released, 1);

    let all = get(a, &format!("/api/v1/foot-traffic?{range}"), Some(&key)).await;
    assert_eq!(all.status, 200, "{}", all.body);
    let points = all.json()["points"].as_array().unwrap().clone();
    assert_eq!(points.len(), 19, "every cell of the area, zeros included");
    for p in &points {
        assert_eq!(p["bucket_start"], T0);
        let (lo, hi) = (
            p["ci95_low"].as_f64().unwrap(),
            p["ci95_high"].as_f64().unwrap(),
        );
        assert!(lo <= hi && hi > 0.0, "{p}");
        if p["suppressed"] == true {
            assert_eq!(p["count"], 0, "a suppressed count shows no value");
        }
    }

    let one = get(
        a,
        &format!(
            "/api/v1/foot-traffic?{range}&granularity=day&cells={:x}",
            u64::from(here)
        ),
        Some(&key),
    )
    .await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(
        one.json()["points"].as_array().unwrap().len(),
        0,
        "days come from the daily release, never from sums of released hours"
    );

    let area = get(a, &format!("/api/v1/foot-traffic/area?{range}"), Some(&key)).await;
    assert_eq!(area.status, 200, "{}", area.body);
    let area = area.json();
    let total = &area["points"][0];
    assert!(total["cell"].is_null());
    assert!(
        total["ci95_high"].as_f64().unwrap() - total["ci95_low"].as_f64().unwrap() > 60.0,
        "a sum of 19 noisy counts has a wider interval than one: {total}"
    );

    // Scope: another merchant's area is forbidden, by name.
    let r = get(
        a,
        &format!(
            "/api/v1/foot-traffic?{range}&cells={:x}",
            u64::from(elsewhere)
        ),
        Some(&key),
    )
    .await;
    assert_error(&r, 403, Some("cells"), "outside your area");

    // Once the UTC day is released, its day point is there, with the daily release's interval.
    let day_start = T0.div_euclid(86_400_000) * 86_400_000;
    clock.set(Timestamp(day_start + 86_400_000 + 10 * 60_000));
    assert_eq!(app.insights.release_due().await.unwrap().days, 1);
    let one = get(
        a,
        &format!(
            "/api/v1/foot-traffic?{range}&granularity=day&cells={:x}",
            u64::from(here)
        ),
        Some(&key),
    )
    .await
    .json();
    assert_eq!(one["points"].as_array().unwrap().len(), 1, "{one}");
    let p = &one["points"][0];
    assert_eq!(p["cell"], format!("{:x}", u64::from(here)));
    assert_eq!(p["bucket_start"], day_start);
    let half = app
        .settings
        .current()
        .consequences
        .privacy
        .daily
        .ci95_half_width;
    let hi = p["ci95_high"].as_f64().unwrap();
    let expected = if p["suppressed"] == true {
        20.0 + half
    } else {
        p["count"].as_f64().unwrap() + half
    };
    assert!((hi - expected).abs() < 1e-9, "{p}");
    server.stop().await;
}

#[tokio::test]
async fn bad_parameters_get_400_naming_the_parameter() {
    let (server, _clock, key, here, _) = setup("").await;
    let a = server.http;
    let fine = format!("start={T0}&end={}", T0 + 3_600_000);
    let finer = u64::from(here.center_child(h3o::Resolution::Nine).unwrap());
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("end={}", T0), "start", "required"),
        (format!("start=yesterday&end={T0}"), "start", "milliseconds"),
        (format!("start={T0}&end=-5"), "end", "milliseconds"),
        (format!("start={T0}&end={T0}"), "end", "after start"),
        (
            format!("{fine}&granularity=week"),
            "granularity",
            "\"hour\" or \"day\"",
        ),
        (format!("{fine}&cells=zz"), "cells[0]", "not an H3 cell"),
        (
            format!("{fine}&cells={:x},123", u64::from(here)),
            "cells[1]",
            "not an H3 cell",
        ),
        (format!("{fine}&cells={finer:x}"), "cells[0]", "finer than"),
        (format!("{fine}&colour=red"), "colour", "unknown parameter"),
        (format!("{fine}&start=1"), "start", "more than once"),
        (
            format!("start={T0}&end={}", T0 + 401 * 86_400_000),
            "end",
            "at most 400 days",
        ),
    ];
    for (query, field, needle) in cases {
        let r = get(a, &format!("/api/v1/foot-traffic?{query}"), Some(&key)).await;
        assert_error(&r, 400, Some(field), needle);
        assert!(
            r.json()["error"].as_str().unwrap().starts_with(field),
            "the message names the parameter: {}",
            r.body
        );
    }
    let r = get(a, "/api/v1/foot-traffic/area?start=1", Some(&key)).await;
    assert_error(&r, 400, Some("end"), "required");
    let r = get(a, "/api/v1/nothing-here", Some(&key)).await;
    assert_error(&r, 404, None, "no such API route");
    server.stop().await;
}

#[tokio::test]
/// Offers are listed without any figure from the delivery log; deliveries and opens appear
/// only once their day is released, as noisy values with intervals.
async fn offers_list_no_raw_counts_and_delivery_figures_come_only_released() {
    let (server, clock, key, here, _) = setup("[caps]\nquiet_hours = \"\"\n").await;
    let app = &server.app;
    let merchant = hexveil::merchants::authenticate(&app.store, &key)
        .await
        .unwrap();
    let offer = app
        .offers
        .upsert(
            &merchant,
            Offer {
                offer_id: uuid::Uuid::nil(),
                merchant_id: merchant.merchant_id,
                title: "Two for one".into(),
                body: "Today only".into(),
                cell: here.into(),
                radius_k: 1,
                valid_from: Timestamp(T0 - 1),
                valid_until: Timestamp(T0 + 86_400_000),
                max_notifications_per_day: 10,
                opening_hours: Vec::new(),
                updated_at: Timestamp(0),
            },
        )
        .await
        .unwrap();
    let both: Purposes = Purpose::ALL.into_iter().collect();
    for n in 0..3 {
        let device = app.pseudonyms.device_id(&token(100 + n));
        app.consents.set(device, both, "1".into()).await.unwrap();
    }
    let mut shown = 0;
    for step in 0..2 {
        if step == 1 {
            clock.advance(Duration::from_secs(6 * 60));
        }
        for n in 0..3 {
            let d = app
                .presence
                .report(Report {
                    device: app.pseudonyms.device_id(&token(100 + n)),
                    cell: here,
                    observed_at: clock.now(),
                    utc_offset_minutes: 0,
                })
                .await
                .unwrap();
            shown += d.offers.len();
        }
    }
    assert_eq!(shown, 3, "each device got the offer once its dwell was met");
    let r = get(server.http, "/api/v1/offers", Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let o = &j["offers"][0];
    assert_eq!(o["offer_id"], offer.offer_id.to_string());
    assert_eq!(o["title"], "Two for one");
    assert!(
        o.get("shown_total").is_none() && o.get("shown_last_24h").is_none(),
        "{o}"
    );
    let day = T0.div_euclid(86_400_000) * 86_400_000;
    let stats_path = format!("/api/v1/offer-stats?start={}&end={}", day, day + 86_400_000);
    let r = get(server.http, &stats_path, Some(&key)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["stats"],
        serde_json::json!([]),
        "nothing before the day is released"
    );
    clock.set(Timestamp(day + 86_400_000 + 10 * 60_000));
    assert_eq!(app.insights.release_due().await.unwrap().offer_days, 1);
    let j = get(server.http, &stats_path, Some(&key)).await.json();
    let s = &j["stats"][0];
    assert_eq!(s["offer_id"], offer.offer_id.to_string());
    let (low, high) = (
        s["deliveries_ci95_low"].as_f64().unwrap(),
        s["deliveries_ci95_high"].as_f64().unwrap(),
    );
    assert!(low <= high && high - low > 10.0, "an honest interval: {s}");
    let p = get(server.http, "/api/v1/privacy", Some(&key)).await.json();
    assert_eq!(p["threshold"], 20);
    assert!(p["explanation"].as_str().unwrap().contains("per day"));
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limit_per_key_is_shared_with_grpc() {
    let (server, _clock, key, _, _) =
        setup("[rate_limits]\nmerchant_queries_per_minute = 3\n").await;
    let a = server.http;
    assert_eq!(get(a, "/api/v1/privacy", Some(&key)).await.status, 200);
    assert_eq!(get(a, "/api/v1/offers", Some(&key)).await.status, 200);
    // The third call of the minute goes over gRPC.
    let mut grpc = merchant_client(server.channel().await, Some(&key));
    grpc.list_offers(hexveil::api::pb::ListOffersRequest {})
        .await
        .unwrap();
    let r = get(a, "/api/v1/me", Some(&key)).await;
    assert_error(&r, 429, None, "rate limited");
    assert!(r.header("retry-after").is_some());
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_with_a_strict_content_security_policy() {
    let (server, _clock, _, _, _) = setup("").await;
    let page = get(server.http, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("merchant dashboard"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    for (path, kind) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(server.http, path, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
    }
    // Nothing in the page refers to another origin.
    for asset in ["/", "/assets/app.js", "/assets/style.css"] {
        let body = get(server.http, asset, None).await.body;
        for line in body.lines() {
            let l = line.to_ascii_lowercase();
            assert!(
                !(l.contains("http://") || l.contains("https://") || l.contains("//cdn"))
                    || l.contains("www.w3.org/2000/svg"),
                "{asset} refers elsewhere: {line}"
            );
        }
    }
    server.stop().await;
}
