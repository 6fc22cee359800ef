//! Shared harness of the black-box tests: the service started by [`TestApp::builder`]
//! (see [`app`]) with a database of its own on the test's backend (see [`backend`]),
//! the in-test auth service ([`auth`]), servers of a test's own ([`servers`]),
//! certificates ([`tls`]), a trace receiver ([`otlp`]), a TCP proxy ([`proxy`]), a
//! stream of messages with its oracle ([`stream`]), several instances of one group
//! as one deployment ([`cluster`]) and a device's side of the inband API ([`inband`]).
//!
//! Every test gets its own temporary directory, database, consumer group and auth
//! server, so tests run in parallel without seeing each other's twins.

// Each test binary uses a part of the harness.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod auth;
pub mod backend;
pub mod cluster;
pub mod inband;
pub mod otlp;
pub mod proxy;
pub mod servers;
pub mod stream;
pub mod tls;

pub use app::*;
pub use auth::*;
pub use inband::*;
pub use servers::*;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;

/// The app with every default of [`TestApp::builder`].
pub async fn spawn_app() -> TestApp {
    TestApp::builder().spawn().await
}

/// An address on which nothing listens (bound, then released).
pub async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// Deletes a test's durable consumer from the broker at `url`. Runs on a thread and
/// connection of its own, since it is called from `Drop` while the test's runtime is
/// blocked; deletes twice, because a creation request of the stopping app may still be
/// on its way to the server.
pub fn delete_consumer_at(url: &str, group: &str) {
    let (url, group) = (url.to_owned(), group.to_owned());
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let connected =
                tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await;
            if let Ok(Ok(c)) = connected {
                let js = async_nats::jetstream::new(c);
                for pause in [Duration::ZERO, Duration::from_millis(300)] {
                    tokio::time::sleep(pause).await;
                    let _ = js
                        .delete_consumer_from_stream(&group, twins::broker::STREAM)
                        .await;
                }
            }
        });
    })
    .join();
}

/// [`delete_consumer_at`] on the shared broker.
pub fn delete_consumer(group: &str) {
    delete_consumer_at(NATS_URL, group);
}

/// `payload` in the `messaging.Message` a device's message arrives in.
pub fn envelope(channel: &str, subtopic: &str, payload: Vec<u8>) -> Vec<u8> {
    twins::broker::encode(&twins::broker::Envelope {
        channel: channel.into(),
        subtopic: subtopic.into(),
        publisher: "device".into(),
        protocol: "mqtt".into(),
        payload,
        created: 0,
    })
}

pub async fn send(req: RequestBuilder) -> Response {
    req.send().await.expect("request reaches the service")
}

pub async fn json_of(resp: Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.expect("response body");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body {text:?} is not JSON: {e}"))
}

pub fn id_of(twin: &Value) -> String {
    twin["id"]
        .as_str()
        .expect("twin has a string id")
        .to_owned()
}

pub fn header(resp: &Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name} header"))
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

/// Asserts the response is `status` with a JSON `{"error": "<non-empty>"}` body served
/// as `application/json`, and returns the message.
pub async fn assert_error(resp: Response, status: StatusCode) -> String {
    let got = resp.status();
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let text = resp.text().await.expect("response body");
    assert_eq!(got, status, "body: {text}");
    assert!(
        content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{status}: error content type {content_type:?}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: error body {text:?} is not JSON: {e}"));
    let obj = body.as_object().expect("error body is an object");
    assert_eq!(obj.len(), 1, "error body has only `error`: {body}");
    let message = obj["error"].as_str().expect("`error` is a string");
    assert!(!message.is_empty(), "error message is empty");
    message.to_owned()
}

/// Asserts a timestamp is RFC 3339 in UTC with at least millisecond precision.
pub fn assert_timestamp(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp {v} is not a string"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "{s} is not RFC 3339"
    );
    assert!(s.ends_with('Z'), "{s} is not in UTC");
    let fraction = s
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("{s} has no fractional part"));
    assert!(
        fraction.len() >= 3 && fraction.bytes().all(|b| b.is_ascii_digit()),
        "{s} has less than millisecond precision"
    );
}
