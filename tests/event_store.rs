//! Magistrala's event store (`MG_TWINS_ES_URL`): the Go service's events for every
//! operation, read back from a NATS server (JetStream stream `events`, subject
//! `events.magistrala.twins`, a `messaging.Message` per event) and from a Redis server
//! (stream `magistrala.twins`, field `data`), each of the test's own.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt;
use serde_json::{Value, json};

use common::*;

/// Where the events are read back from.
enum Reader {
    Nats(async_nats::jetstream::Context),
    Redis(redis::aio::MultiplexedConnection),
}

impl Reader {
    /// Every event stored so far, in order.
    async fn events(&mut self) -> Vec<Value> {
        match self {
            Self::Nats(js) => {
                let Ok(stream) = js.get_stream("events").await else {
                    return Vec::new();
                };
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                        filter_subject: "events.magistrala.twins".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("ordered consumer");
                let pending = consumer.cached_info().num_pending as usize;
                let mut messages = consumer.messages().await.expect("messages");
                let mut out = Vec::new();
                while out.len() < pending {
                    let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                        .await
                        .expect("a stored event within 5 s")
                        .expect("a message")
                        .expect("no error");
                    let envelope = twins::broker::decode(&m.payload).expect("messaging.Message");
                    out.push(serde_json::from_slice(&envelope.payload).expect("JSON payload"));
                }
                out
            }
            Self::Redis(conn) => {
                let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg("magistrala.twins")
                    .arg("-")
                    .arg("+")
                    .query_async(conn)
                    .await
                    .expect("XRANGE");
                entries
                    .into_iter()
                    .map(|(_, fields)| {
                        let (name, data) = fields.into_iter().next().expect("one field");
                        assert_eq!(name, "data");
                        serde_json::from_str(&data).expect("JSON data")
                    })
                    .collect()
            }
        }
    }
}

fn unbase64(v: &Value) -> Value {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 text"))
        .expect("base64");
    serde_json::from_slice(&bytes).expect("JSON inside")
}

/// Every operation once, then the events read back: the Go service's operations in
/// order, with their fields.
async fn every_operation_is_stored(es_url: &str, mut reader: Reader) {
    let app = TestApp::builder()
        .auth(Auth::Standalone)
        .var("MG_TWINS_ES_URL", es_url)
        .spawn()
        .await;
    let ch = unique("ch-");
    let body = json!({
        "name": "pump",
        "metadata": {"site": "a"},
        "definition": {"attributes": [attribute("x", &ch, "", true)]},
    });
    let id = app.create_id(ALICE, &body).await;
    let resp = app
        .put_twin(
            ALICE,
            &id,
            &json!({"definition": {"attributes": [attribute("x", &ch, "", true)], "delta": 5}}),
        )
        .await;
    assert!(resp.status().is_success(), "update {}", resp.status());
    app.twin(ALICE, &id).await;
    app.list_twins(ALICE, &[("name", "pump")]).await;
    app.publish(&ch, "", json!([{"v": 1}])).await;
    app.states_until(&id, |s| s.len() == 1).await;
    let resp = app.delete_twin(ALICE, &id).await;
    assert!(resp.status().is_success(), "remove {}", resp.status());

    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = reader.events().await;
        if events.iter().any(|e| e["operation"] == "twins.remove") {
            break events;
        }
        assert!(Instant::now() < deadline, "no remove event: {events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The app ingests the shared stream: messages of other tests come as
    // `twins.save_states` too (as in the Go service, one per message); only this test's
    // channel counts here.
    let ours = |e: &&Value| {
        e["operation"] != "twins.save_states" || unbase64(&e["message"])["channel"] == json!(ch)
    };
    let events: Vec<Value> = events.iter().filter(ours).cloned().collect();
    let ops: Vec<&str> = events
        .iter()
        .map(|e| e["operation"].as_str().expect("operation"))
        .filter(|op| *op != "twins.list_states")
        .collect();
    assert_eq!(
        ops,
        [
            "twins.add",
            "twins.update",
            "twins.view",
            "twins.list",
            "twins.save_states",
            "twins.remove"
        ],
        "{events:#?}"
    );
    for e in &events {
        assert!(
            e["occurred_at"]
                .as_i64()
                .is_some_and(|t| t > 1_700_000_000_000_000_000),
            "occurred_at in Unix ns: {e}"
        );
    }
    let by = |op: &str| {
        events
            .iter()
            .find(|e| e["operation"] == op)
            .unwrap_or_else(|| panic!("{op}"))
    };
    let add = by("twins.add");
    assert_eq!(add["id"], json!(id));
    assert_eq!(add["owner"], ALICE_ID);
    assert_eq!(add["name"], "pump");
    assert_eq!(unbase64(&add["metadata"]), json!({"site": "a"}));
    assert_eq!(
        unbase64(&add["definition_attributes"])[0]["channel"],
        json!(ch)
    );
    let update = by("twins.update");
    assert_eq!(update["revision"], 1);
    assert_eq!(update["definition_id"], 1);
    assert_eq!(update["definition_delta"], 5);
    assert_eq!(by("twins.view")["id"], json!(id));
    assert_eq!(by("twins.list")["name"], "pump");
    assert_eq!(by("twins.list_states")["id"], json!(id));
    let message = unbase64(&by("twins.save_states")["message"]);
    assert_eq!(message["channel"], json!(ch));
    assert_eq!(unbase64_raw(&message["payload"]), br#"[{"v":1}]"#);
    assert_eq!(by("twins.remove")["id"], json!(id));
}

fn unbase64_raw(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 text"))
        .expect("base64")
}

#[tokio::test]
async fn nats_event_store_gets_every_operation() {
    let nats = Nats::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let reader = Reader::Nats(async_nats::jetstream::new(client));
    every_operation_is_stored(&nats.url(), reader).await;
}

#[tokio::test]
async fn redis_event_store_gets_every_operation() {
    let redis = Redis::start().await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let conn = redis::Client::open(url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    every_operation_is_stored(&url, Reader::Redis(conn)).await;
}
