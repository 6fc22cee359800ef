//! The inband document API from a device's and a back-end caller's side: requests
//! published on a channel and answered on it, and NATS request/reply.

use serde_json::Value;
use twins::broker;

use super::{DEADLINE, TestApp, envelope, eventually, receive};

/// An app on a NATS server of the test's own: inband answers on shared subjects would
/// otherwise come from every test's app at once. Returns once the app takes messages,
/// so its inband subscriptions are in place too.
pub async fn with_own_broker() -> TestApp {
    let app = TestApp::builder().own_broker().spawn().await;
    app.wait_ingesting().await;
    app
}

/// Publishes a device request on `channel` and returns the response envelope's subtopic
/// suffix (`success`/`error`) and JSON payload.
pub async fn device(
    app: &TestApp,
    channel: &str,
    twin: &str,
    doc: &str,
    op: &str,
    body: Value,
) -> (String, Value) {
    let subtopic = format!("twins.{twin}.{doc}.{op}");
    let mut sub = app
        .subscribe(format!("channels.{channel}.{subtopic}.response.*"))
        .await;
    app.publish_raw(
        channel,
        &subtopic,
        envelope(channel, &subtopic, body.to_string().into_bytes()),
    )
    .await;
    let msg = receive(&mut sub, "response").await;
    let answer = broker::decode(&msg.payload).expect("envelope");
    assert_eq!(answer.channel, channel);
    assert_eq!(answer.publisher, "twins");
    let outcome = answer
        .subtopic
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    (
        outcome,
        serde_json::from_slice(&answer.payload).expect("JSON answer"),
    )
}
/// An app on a broker of its own answering request/reply under `prefix`.
pub async fn with_request_reply(prefix: &str) -> TestApp {
    let app = TestApp::builder()
        .own_broker()
        .var("MG_TWINS_REQUEST_REPLY", "true")
        .var("MG_TWINS_REQUEST_REPLY_PREFIX", prefix)
        .spawn()
        .await;
    app.wait_ingesting().await;
    app
}

/// Sends a request/reply request; the raw outcome (an error when nobody answers).
pub async fn request(
    app: &TestApp,
    subject: String,
    body: &Value,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let nats = app.nats().clone();
    tokio::time::timeout(DEADLINE, nats.request(subject, body.to_string().into()))
        .await
        .expect("the broker answers within the deadline")
}

/// Asks until the service's subscription is in place, then returns the JSON reply.
pub async fn ask_until_answered(app: &TestApp, subject: String, body: Value) -> Value {
    let reply = eventually(
        "a request/reply answer",
        || request(app, subject.clone(), &body),
        Result::is_ok,
    )
    .await
    .expect("answered");
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}
