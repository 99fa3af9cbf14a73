//! The HTTP request decoders (AWS JSON `BatchMeterUsage`/`MeterUsage` and native bulk NDJSON),
//! driven through the real router: authentication, content type, body limits, envelope and
//! per-record parsing, validation against the example book, and the response encoding.
//! Properties: no panic, never a 5xx, every 200 answer is JSON with one result per record.
#![no_main]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use ingest::clock::ManualClock;
use ingest::guard::Security;
use ingest::http::{router, HttpLimits, IngestState};
use libfuzzer_sys::fuzz_target;
use meterline_fuzz::{now, AcceptAll};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

fn app() -> &'static (tokio::runtime::Runtime, Router) {
    static APP: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
    APP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let book = Arc::new(common::catalogue::PriceBook::from_toml(meterline_fuzz::BOOK_TOML).expect("book"));
        let security = Security::for_book(&book);
        // Small bulk limits keep each execution cheap; the parsing code is the same.
        let limits = HttpLimits { max_bulk_bytes: 256 * 1024, max_bulk_records: 1000 };
        let state = Arc::new(IngestState { book: book.into(), sink: AcceptAll, clock: Arc::new(ManualClock::new(now())), limits, security, tokens: Default::default() });
        (rt, router(state))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let (rt, app) = app();
    let (path, target) = match sel % 5 {
        0 => ("/v1/BatchMeterUsage", None),
        1 => ("/", Some("AWSMPMeteringService.BatchMeterUsage")),
        2 => ("/v1/MeterUsage", None),
        3 => ("/", Some("AWSMPMeteringService.MeterUsage")),
        _ => ("/v1/usage", None),
    };
    let content_type = match (sel / 5) % 4 {
        0 => Some("application/x-amz-json-1.1"),
        1 => Some("application/json"),
        2 => None,
        _ => Some("application/x-ndjson"),
    };
    let key = if (sel / 20) % 2 == 0 { "demo-key-acme" } else { "demo-key-globex" };
    let mut req = Request::post(path).header("x-api-key", key);
    if let Some(t) = target {
        req = req.header("x-amz-target", t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Body::from(body.to_vec())).expect("request");
    let resp = rt.block_on(app.clone().oneshot(req)).expect("the router is infallible");
    let status = resp.status();
    let bytes = rt.block_on(axum::body::to_bytes(resp.into_body(), usize::MAX)).expect("body");
    assert!(!status.is_server_error(), "{status} for {:?}: {}", String::from_utf8_lossy(body), String::from_utf8_lossy(&bytes));
    // JSON's grammar allows numbers of any magnitude and records are echoed as sent, so the
    // grammar is checked with IgnoredAny; the counts only where serde_json's Value can hold it.
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).expect("every answer is JSON");
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    if status == StatusCode::OK && path == "/v1/usage" {
        let lines = std::str::from_utf8(body).expect("200 means UTF-8").lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(answer["Results"].as_array().map(Vec::len), Some(lines), "one result per line");
    }
    if status == StatusCode::OK && answer.get("Results").is_some() && path != "/v1/usage" {
        let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        assert_eq!(
            answer["Results"].as_array().map(Vec::len),
            req["UsageRecords"].as_array().map(Vec::len).or(Some(0)),
            "one result per record"
        );
    }
});
