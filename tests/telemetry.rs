//! Traces exported over OTLP/HTTP by the real binary, received by an in-test collector:
//! an HTTP call gives a span tree continuing the caller's trace with the route and the
//! status, the trace context goes on into the notification it publishes, and a consumed
//! message gives a span linked to its publisher's context. Spans still buffered at
//! SIGTERM are flushed before the process exits.
//!
//! Each test runs its own NATS server, so no other test's service consumes its messages.

mod common;

use serde_json::json;

use common::otlp::{self, Collector, ReceivedSpan};
use common::*;
use twins::broker::{self, Envelope};

/// The binary on a broker of its own, exporting to an in-test collector.
struct Fixture {
    app: TestApp,
    collector: Collector,
}

async fn start(notifications: bool) -> Fixture {
    let collector = otlp::spawn_collector().await;
    let mut builder = TestApp::builder()
        .process()
        .own_broker()
        .auth(Auth::Standalone)
        .var("MG_JAEGER_URL", &collector.url());
    if notifications {
        builder = builder.notifications();
    }
    Fixture {
        app: builder.spawn().await,
        collector,
    }
}

impl Fixture {
    /// SIGTERM, a clean exit, and the spans the collector got.
    async fn stop(&mut self) -> Vec<ReceivedSpan> {
        self.app.stop().await;
        self.collector.spans()
    }
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name:?} among {:#?}", names(spans)))
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
        .collect()
}

fn names(spans: &[ReceivedSpan]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test]
async fn http_request_exports_a_span_tree_with_route_status_and_the_callers_trace() {
    let mut fx = start(true).await;
    let notif = fx
        .app
        .notifications
        .clone()
        .expect("a notification channel");
    let mut notifications = fx.app.subscribe(format!("channels.{notif}.>")).await;

    let (trace, caller) = otlp::random_trace();
    let resp = fx
        .app
        .authed(reqwest::Method::POST, "/twins", ALICE)
        .header("traceparent", otlp::traceparent(&trace, &caller))
        .json(&json!({"name": "traced"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 201);
    let twin: serde_json::Value = resp.json().await.expect("JSON");
    let twin_id = twin["id"].as_str().expect("id").to_owned();

    // The notification continues the request's trace.
    let note = receive(&mut notifications, "notification").await;
    assert_eq!(
        note.subject.as_str(),
        format!("channels.{notif}.messages.{twin_id}.create.success")
    );
    let header = note
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("notification carries traceparent");
    assert!(
        header.starts_with(&format!("00-{trace}-")),
        "traceparent {header} continues trace {trace}"
    );

    // A request without trace headers starts a trace of its own.
    fx.app.twin(ALICE, &twin_id).await;

    let spans = fx.stop().await;
    let http = find(&spans, "POST /twins");
    assert_eq!(http.service, "twins");
    assert_eq!(http.trace_id, trace, "continues the caller's trace");
    assert_eq!(http.parent_span_id, caller, "child of the caller's span");
    assert_eq!(http.attributes["http.route"], "/twins");
    assert_eq!(http.attributes["http.request.method"], "POST");
    assert_eq!(http.attributes["http.response.status_code"], "201");

    let service = children(&spans, http)
        .into_iter()
        .find(|s| s.name == "twins.create")
        .unwrap_or_else(|| panic!("twins.create under the request span: {:#?}", spans));
    let below: Vec<&str> = children(&spans, service)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert!(below.contains(&"store.twins.save"), "{below:?}");
    let publish = children(&spans, service)
        .into_iter()
        .find(|s| s.name == "broker.publish")
        .unwrap_or_else(|| panic!("broker.publish under twins.create: {below:?}"));
    assert!(
        header.contains(&publish.span_id),
        "the notification's parent is the publish span"
    );

    let view = find(&spans, "GET /twins/{id}");
    assert_ne!(view.trace_id, trace);
    assert!(view.parent_span_id.is_empty() || view.parent_span_id == "0000000000000000");
    assert_eq!(view.attributes["http.route"], "/twins/{id}");
    assert_eq!(view.attributes["http.response.status_code"], "200");
    assert!(
        children(&spans, view)
            .iter()
            .any(|s| s.name == "twins.view"),
        "service span under GET"
    );
}

#[tokio::test]
async fn consumed_message_span_links_to_the_publishers_context() {
    let mut fx = start(false).await;
    let channel = unique("ch-");
    let twin_id = fx
        .app
        .create_listening(&[attribute("temperature", &channel, "engine", true)])
        .await;
    fx.app.wait_ingesting().await;

    let (trace, publisher) = otlp::random_trace();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        otlp::traceparent(&trace, &publisher).as_str(),
    );
    let envelope = Envelope {
        channel: channel.clone(),
        subtopic: "engine".into(),
        publisher: "device".into(),
        protocol: "mqtt".into(),
        payload: json!([{"bn": "dev:", "n": "temperature", "v": 21.5}])
            .to_string()
            .into_bytes(),
        created: 0,
    };
    fx.app
        .js()
        .publish_with_headers(
            broker::subject(&channel, "engine"),
            headers,
            broker::encode(&envelope).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stream ack");

    // The message became a state.
    fx.app.states_until(&twin_id, |s| !s.is_empty()).await;

    let spans = fx.stop().await;
    let consume = spans
        .iter()
        .find(|s| {
            s.name == "broker.consume"
                && s.links
                    .iter()
                    .any(|(t, sp)| *t == trace && *sp == publisher)
        })
        .unwrap_or_else(|| {
            panic!("no broker.consume span linked to {trace}/{publisher}: {spans:#?}")
        });
    assert_eq!(consume.attributes["messaging.system"], "nats");
    assert_ne!(consume.trace_id, trace, "a batch starts its own trace");
    let batch = children(&spans, consume)
        .into_iter()
        .find(|s| s.name == "ingest.batch")
        .unwrap_or_else(|| panic!("ingest.batch under broker.consume: {:#?}", names(&spans)));
    assert!(
        children(&spans, batch)
            .iter()
            .any(|s| s.name == "store.ingest.apply"),
        "the batch is written in one store call: {:#?}",
        names(&spans)
    );
}

#[tokio::test]
async fn no_exporter_without_jaeger_url_and_logs_are_json() {
    let mut app = TestApp::builder()
        .process()
        .own_broker()
        .auth(Auth::Standalone)
        .spawn()
        .await;
    assert_eq!(app.health().await.status, 200);
    app.instance().terminate();
    assert!(app.instance().wait(DEADLINE).await.success());
    let logs = app.instance().logs();
    assert!(
        !logs.iter().any(|l| l.contains("exporting traces")),
        "{logs:#?}"
    );
    for line in logs.iter().filter(|l| !l.starts_with("stderr: ")) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line {line:?} is not JSON: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}
