//! Traces exported over OTLP/HTTP by the real binary, received by an in-test collector:
//! an HTTP call gives a span tree continuing the caller's trace with the route and the
//! status, the trace context goes on into the notification it publishes, and a consumed
//! message gives a span linked to its publisher's context. Spans still buffered at
//! SIGTERM are flushed before the process exits.
//!
//! Each test runs its own NATS server, so no other test's service consumes its messages.

mod common;
#[path = "support/ops.rs"]
mod ops;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::json;

use ops::{ReceivedSpan, TOKEN, USER};
use twins::broker::{self, Envelope};

struct Fixture {
    _nats: common::Child,
    nats_url: String,
    _dir: tempfile::TempDir,
    collector: ops::Collector,
    binary: ops::Binary,
    group: String,
}

async fn start(extra: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let nats = common::own_nats(port, &dir.path().join("nats")).await;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let collector = ops::spawn_collector().await;
    let group = common::unique_group();
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let jaeger = collector.url();
    let mut vars = vec![
        ("MG_TWINS_DB_URL", db.as_str()),
        ("MG_MESSAGE_BROKER_URL", nats_url.as_str()),
        ("MG_TWINS_INSTANCE_GROUP", group.as_str()),
        ("MG_TWINS_STANDALONE_ID", USER),
        ("MG_TWINS_STANDALONE_TOKEN", TOKEN),
        ("MG_JAEGER_URL", jaeger.as_str()),
        ("MG_TWINS_SHUTDOWN_TIMEOUT", "5s"),
    ];
    vars.extend_from_slice(extra);
    let binary = ops::start_binary(&vars).await;
    Fixture {
        _nats: nats,
        nats_url,
        _dir: dir,
        collector,
        binary,
        group,
    }
}

impl Fixture {
    /// SIGTERM, a clean exit, and the spans the collector got.
    async fn stop(&mut self) -> Vec<ReceivedSpan> {
        self.binary.terminate();
        let status = self.binary.wait(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "exit {status:?}; logs {:#?}",
            self.binary.logs()
        );
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
    let notif = uuid::Uuid::new_v4().simple().to_string();
    let mut fx = start(&[("MG_TWINS_CHANNEL_ID", notif.as_str())]).await;
    let nats = async_nats::connect(&fx.nats_url).await.expect("connect");
    let mut notifications = nats
        .subscribe(format!("channels.{notif}.>"))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");

    let (trace, caller) = ops::random_trace();
    let resp = common::client()
        .post(fx.binary.url("/twins"))
        .bearer_auth(TOKEN)
        .header("traceparent", ops::traceparent(&trace, &caller))
        .json(&json!({"name": "traced"}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 201);
    let twin: serde_json::Value = resp.json().await.expect("JSON");
    let twin_id = twin["id"].as_str().expect("id").to_owned();

    // The notification continues the request's trace.
    let note = tokio::time::timeout(Duration::from_secs(10), notifications.next())
        .await
        .expect("a notification")
        .expect("subscription open");
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
    let resp = common::client()
        .get(fx.binary.url(&format!("/twins/{twin_id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

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
    let mut fx = start(&[]).await;
    let channel = uuid::Uuid::new_v4().to_string();
    let resp = common::client()
        .post(fx.binary.url("/twins"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "name": "fed",
            "definition": {"attributes": [
                {"name": "temperature", "channel": channel, "subtopic": "engine", "persist_state": true}
            ]}
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 201);
    let twin: serde_json::Value = resp.json().await.expect("JSON");
    let twin_id = twin["id"].as_str().expect("id").to_owned();

    let nats = async_nats::connect(&fx.nats_url).await.expect("connect");
    let js = jetstream::new(nats);
    wait_for_consumer(&js, &fx.group).await;

    let (trace, publisher) = ops::random_trace();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", ops::traceparent(&trace, &publisher).as_str());
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
    js.publish_with_headers(
        broker::subject(&channel, "engine"),
        headers,
        broker::encode(&envelope).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stream ack");

    let mut applied = false;
    for _ in 0..100 {
        let states: serde_json::Value = common::client()
            .get(fx.binary.url(&format!("/states/{twin_id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON");
        if states["total"].as_u64().unwrap_or(0) > 0 {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied, "the message became a state");

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

async fn wait_for_consumer(js: &jetstream::Context, group: &str) {
    for _ in 0..200 {
        if let Ok(stream) = js.get_stream(broker::STREAM).await
            && stream
                .consumer_info(group)
                .await
                .is_ok_and(|i| i.num_waiting > 0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service's consumer did not appear");
}

#[tokio::test]
async fn no_exporter_without_jaeger_url_and_logs_are_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let _nats = common::own_nats(port, &dir.path().join("nats")).await;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let mut binary = ops::start_binary(&[
        ("MG_TWINS_DB_URL", db.as_str()),
        ("MG_MESSAGE_BROKER_URL", nats_url.as_str()),
        ("MG_TWINS_STANDALONE_ID", USER),
        ("MG_TWINS_STANDALONE_TOKEN", TOKEN),
    ])
    .await;
    let resp = common::client()
        .get(binary.url("/health"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    binary.terminate();
    assert!(binary.wait(Duration::from_secs(20)).await.success());
    let logs = binary.logs();
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
