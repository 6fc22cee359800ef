//! `/metrics` as an operator's Prometheus sees it: every family described, the Go
//! service's metric names kept (so existing dashboards and alerts keep working), build
//! and process information, the ingest position and lag; and `promtool check metrics`
//! finds nothing but the Go service's own names, which its naming lint flags.
//!
//! `promtool` (Debian package `prometheus`) is named by `TWINS_TEST_PROMTOOL`;
//! `scripts/test` provides it. Without it (a plain `cargo test`) that one test says it
//! was skipped and passes.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::json;

use common::*;

/// What promtool's lint says of the Go service's names, which are kept as they were.
const GO_NAME_LINT: &[&str] = &[
    r#"twins_api_request_count counter metrics should have "_total" suffix"#,
    r#"twins_api_request_count non-histogram and non-summary metrics should not have "_count" suffix"#,
    r#"twins_api_request_latency_microseconds use base unit "seconds" instead of "microseconds""#,
];

/// A service that has answered each of the Go service's operations once and ingested
/// one message; its `/metrics` text.
async fn exercised() -> (TestApp, String) {
    let app = TestApp::builder().auth(Auth::Standalone).spawn().await;
    let ch = unique("ch-");
    let id = app.create_listening(&[attribute("x", &ch, "", true)]).await;
    app.twin(ALICE, &id).await;
    app.list_twins(ALICE, &[]).await;
    app.list_states(ALICE, &id, &[]).await;
    let resp = app.put_twin(ALICE, &id, &json!({"name": "renamed"})).await;
    assert!(resp.status().is_success(), "update: {}", resp.status());
    app.publish(&ch, "", json!([{"v": 1}])).await;
    app.states_until(&id, |s| s.len() == 1).await;
    let other = app.create_id(ALICE, &json!({"name": "gone"})).await;
    let resp = app.delete_twin(ALICE, &other).await;
    assert!(resp.status().is_success(), "remove: {}", resp.status());
    let text = app.metrics().await;
    (app, text)
}

/// The families of a metrics text: (described, typed, sampled) names.
fn families(text: &str) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (mut help, mut typed, mut sampled) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name)) => {
                help.insert(name.to_owned());
            }
            (Some("#"), Some("TYPE"), Some(name)) => {
                typed.insert(name.to_owned());
            }
            (Some(sample), ..) if !sample.starts_with('#') => {
                let name = sample.split('{').next().unwrap_or(sample);
                sampled.insert(name.to_owned());
            }
            _ => {}
        }
    }
    (help, typed, sampled)
}

#[tokio::test]
async fn every_family_is_described_and_the_go_names_are_kept() {
    let (_app, text) = exercised().await;
    let (help, typed, sampled) = families(&text);
    assert_eq!(help, typed, "every family has HELP and TYPE");
    for name in &sampled {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no TYPE:\n{text}");
    }
    for go in [
        "add_twin",
        "view_twin",
        "list_twins",
        "update_twin",
        "remove_twin",
        "list_states",
        "save_states",
    ] {
        let counter = format!(r#"twins_api_request_count{{method="{go}"}} "#);
        let summary = format!(r#"twins_api_request_latency_microseconds_count{{method="{go}"}} "#);
        for line in [&counter, &summary] {
            assert!(text.contains(line.as_str()), "{line} missing:\n{text}");
        }
    }
    assert!(
        text.contains("# TYPE twins_api_request_count counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE twins_api_request_latency_microseconds summary"),
        "{text}"
    );
    let build = format!(
        r#"twins_build_info{{version="{}","#,
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "{build} missing:\n{text}");
    for dependency in ["store", "broker", "cache"] {
        let up = format!(r#"twins_dependency_up{{dependency="{dependency}"}} 1"#);
        assert!(text.contains(&up), "{up} missing:\n{text}");
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "twins_ingest_position",
        "twins_ingest_pending_messages",
        "twins_dependency_up",
    ] {
        assert!(sampled.contains(name), "{name} missing:\n{text}");
    }
}

/// The change feed relay's lag is a histogram in seconds, with a sample once a change's
/// event is on the stream.
#[tokio::test]
async fn the_feed_relay_lag_is_a_histogram_in_seconds() {
    let app = TestApp::builder().auth(Auth::Standalone).spawn().await;
    app.create_id(ALICE, &json!({"name": "lagging"})).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let text = app.metrics().await;
        let counted = text
            .lines()
            .find_map(|l| l.strip_prefix("twins_feed_relay_lag_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if counted > 0 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no relayed event counted within 15 s:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        text.contains("# TYPE twins_feed_relay_lag_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains(r#"twins_feed_relay_lag_seconds_bucket{le="0.005"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn promtool_finds_nothing_but_the_go_names() {
    let Some(promtool) = std::env::var("TWINS_TEST_PROMTOOL")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        let _ = writeln!(
            std::io::stderr(),
            "promtool test skipped: TWINS_TEST_PROMTOOL is not set (the path of promtool)"
        );
        return;
    };
    let (_app, text) = exercised().await;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !GO_NAME_LINT.contains(l))
        .collect();
    assert!(problems.is_empty(), "promtool: {problems:?}\n{text}");
    // Exit 3 is promtool's "lint problems"; the only ones are the Go names'.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "promtool failed: {said}"
    );
}
