//! End-to-end ingestion over the real NATS JetStream (and Redis where named): messages
//! published to `channels.<ch>[.<subtopic>]` become states visible through the HTTP API.
//!
//! Each test runs on every store backend with its own database, durable consumer name,
//! channels and notification channel, so tests run in parallel on the shared broker and
//! leave nothing behind.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};
use twins::app::Application;
use twins::broker::{self, Envelope};
use twins::config::Config;
use twins::service::ingest::{
    Batch, Ingest, IngestError, IngestService, Message, Rejected, SetAside,
};
use twins::service::lookup::TwinLookup;
use twins::store::Lease;

/// A dead-letter port for batches that must have nothing to set aside.
struct NothingAside;

#[async_trait::async_trait]
impl SetAside for NothingAside {
    async fn set_aside(&self, rejected: &[Rejected]) -> Result<(), IngestError> {
        panic!("nothing should be set aside: {rejected:?}")
    }
}

use common::envelope;

// Every test below runs once per store backend (see `common::backend`), MongoDB also as
// a replica set, where a store can apply a batch in a transaction.
crate::backend_matrix!(replica_set:
    first_state_then_update_within_delta_then_new_state_beyond_delta,
    payload_is_carried_over_and_unpersisted_attributes_never_stored,
    wildcard_subtopic_matches_and_other_channels_are_ignored,
    every_senml_value_type_is_stored,
    garbage_is_rejected_counted_and_the_next_good_message_lands,
    own_notification_channel_and_inband_subtopics_never_become_states,
    definition_moved_to_a_new_channel_follows_it,
    messages_published_while_stopped_are_applied_exactly_once_after_restart,
    a_redelivered_message_never_adds_a_second_state,
    notifications_report_every_operation,
    redis_keys_stay_exact_through_create_update_and_delete,
    ingestion_falls_back_to_the_store_when_redis_stops,
    api_serves_while_the_broker_is_down_and_ingestion_resumes_after_restart,
    records_without_time_take_the_time_magistrala_received_them,
);

const NATS: &str = "nats://127.0.0.1:4222";
const TOKEN: &str = "ingest-secret";
const T0: f64 = 1_700_000_000.0;

fn id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A running service with its own database and consumer.
struct Svc {
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    store: twins::store::Store,
}

struct Env {
    nats_url: String,
    /// Keeps the SQLite file of the test; a MongoDB database lives until the test ends.
    _dir: tempfile::TempDir,
    db_url: String,
    group: String,
    notif: String,
    js: jetstream::Context,
    nats: async_nats::Client,
    extra: Vec<(String, String)>,
}

impl Env {
    async fn new() -> Self {
        Self::on(NATS).await
    }

    async fn on(nats_url: &str) -> Self {
        let nats = async_nats::connect(nats_url)
            .await
            .expect("NATS with JetStream must run on 127.0.0.1:4222 (see .ci/run)");
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            nats_url: nats_url.to_owned(),
            db_url: common::backend::database_url(dir.path()),
            _dir: dir,
            group: format!("test-{}", id()),
            notif: id(),
            js: jetstream::new(nats.clone()),
            nats,
            extra: Vec::new(),
        }
    }

    fn config(&self) -> Config {
        let mut vars = vec![
            ("MG_TWINS_HTTP_HOST".into(), "127.0.0.1".into()),
            ("MG_TWINS_HTTP_PORT".into(), "0".into()),
            ("MG_TWINS_DB_URL".into(), self.db_url.clone()),
            ("MG_TWINS_STANDALONE_ID".into(), "alice".into()),
            ("MG_TWINS_STANDALONE_TOKEN".into(), TOKEN.into()),
            ("MG_MESSAGE_BROKER_URL".into(), self.nats_url.clone()),
            ("MG_TWINS_INSTANCE_GROUP".into(), self.group.clone()),
            ("MG_TWINS_CHANNEL_ID".into(), self.notif.clone()),
            ("MG_TWINS_SHUTDOWN_TIMEOUT".into(), "5s".into()),
        ];
        vars.extend(self.extra.iter().cloned());
        Config::from_vars(vars).expect("test config")
    }

    /// Starts the service and waits until its durable consumer exists.
    async fn start(&self) -> Svc {
        let app = Application::build(self.config())
            .await
            .expect("service starts");
        let base = format!("http://{}", app.local_addr());
        let store = app.store();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("service runs");
        });
        common::wait_for_consumer(&self.js, &self.group).await;
        Svc {
            base,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
            store,
        }
    }

    /// Publishes a SenML payload to JetStream; returns the stream sequence.
    async fn publish(&self, channel: &str, subtopic: &str, senml: Value) -> u64 {
        self.publish_raw(
            channel,
            subtopic,
            envelope(channel, subtopic, senml.to_string().into_bytes()),
        )
        .await
    }

    async fn publish_raw(&self, channel: &str, subtopic: &str, data: Vec<u8>) -> u64 {
        self.js
            .publish(broker::subject(channel, subtopic), data.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack")
            .sequence
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave no consumer behind on the broker.
        common::delete_consumer_at(&self.nats_url, &self.group);
    }
}

impl Drop for Svc {
    /// A test that fails before `stop` leaves its service stopping; its database is
    /// dropped once it has stopped.
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            common::backend::track(task);
        }
    }
}

impl Svc {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("service stops cleanly");
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }

    async fn create_twin(&self, body: Value) -> Value {
        let res = self
            .req(reqwest::Method::POST, "/twins")
            .json(&body)
            .send()
            .await
            .expect("POST");
        assert_eq!(res.status(), 201, "create twin");
        res.json().await.expect("twin JSON")
    }

    async fn update_twin(&self, id: &str, body: Value) -> Value {
        let res = self
            .req(reqwest::Method::PUT, &format!("/twins/{id}"))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        assert_eq!(res.status(), 200, "update twin");
        res.json().await.expect("twin JSON")
    }

    async fn states(&self, twin: &str) -> Vec<Value> {
        let res = self
            .req(reqwest::Method::GET, &format!("/states/{twin}?limit=100"))
            .send()
            .await
            .expect("GET states");
        assert_eq!(res.status(), 200);
        let page: Value = res.json().await.expect("page JSON");
        page["states"].as_array().cloned().unwrap_or_default()
    }

    /// Polls the states until `done` holds (or 10 s pass) and returns them.
    async fn states_until(&self, twin: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..200 {
            let s = self.states(twin).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.states(twin).await
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

fn attr(name: &str, channel: &str, subtopic: &str, persist: bool) -> Value {
    json!({"name": name, "channel": channel, "subtopic": subtopic, "persist_state": persist})
}

/// A twin with the given attributes and a one-second delta.
fn twin_body(attrs: Vec<Value>) -> Value {
    json!({"name": "machine", "definition": {"attributes": attrs, "delta": 1_000_000_000}})
}

fn rfc3339(t: f64) -> String {
    twins::domain::time::format(&twins::domain::time::from_nanos((t * 1e9).round() as i64))
}

async fn first_state_then_update_within_delta_then_new_state_beyond_delta() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("temp", &ch, "engine", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();

    env.publish(&ch, "engine", json!([{"n": "temp", "v": 20.0, "t": T0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() == 1).await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["id"], 0);
    assert_eq!(s[0]["definition"], 0);
    assert_eq!(s[0]["payload"], json!({"temp": 20}));
    assert_eq!(s[0]["created"], rfc3339(T0), "record time honoured");

    env.publish(
        &ch,
        "engine",
        json!([{"n": "temp", "v": 21.5, "t": T0 + 0.5}]),
    )
    .await;
    let s = svc
        .states_until(&tid, |s| {
            s.first().is_some_and(|x| x["payload"]["temp"] == 21.5)
        })
        .await;
    assert_eq!(s.len(), 1, "within delta updates the last state");
    assert_eq!(s[0]["payload"], json!({"temp": 21.5}));
    assert_eq!(s[0]["created"], rfc3339(T0));

    env.publish(
        &ch,
        "engine",
        json!([{"n": "temp", "v": 23.0, "t": T0 + 2.0}]),
    )
    .await;
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s.len(), 2, "beyond delta adds a state");
    assert_eq!(s[1]["id"], 1);
    assert_eq!(s[1]["payload"], json!({"temp": 23}));
    assert_eq!(s[1]["created"], rfc3339(T0 + 2.0));
    svc.stop().await;
}

async fn payload_is_carried_over_and_unpersisted_attributes_never_stored() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![
            attr("engine", &ch, "engine", true),
            attr("chassis", &ch, "chassis", true),
            attr("rpm", &ch, "rpm", false),
        ]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();

    env.publish(&ch, "rpm", json!([{"v": 3000, "t": T0 - 10.0}]))
        .await;
    env.publish(&ch, "engine", json!([{"v": 80, "t": T0}]))
        .await;
    env.publish(&ch, "chassis", json!([{"v": 30, "t": T0 + 5.0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0]["payload"], json!({"engine": 80}));
    assert_eq!(
        s[1]["payload"],
        json!({"engine": 80, "chassis": 30}),
        "carried over"
    );
    svc.stop().await;
}

async fn wildcard_subtopic_matches_and_other_channels_are_ignored() {
    let env = Env::new().await;
    let svc = env.start().await;
    let (ch, other) = (id(), id());
    let twin = svc
        .create_twin(twin_body(vec![attr("any", &ch, ">", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();

    env.publish(&other, "x", json!([{"v": 1, "t": T0}])).await;
    env.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    env.publish(&ch, "deep.sub", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    let values: Vec<&Value> = s.iter().map(|x| &x["payload"]["any"]).collect();
    assert_eq!(values, [&json!(2), &json!(3)]);
    svc.stop().await;
}

async fn every_senml_value_type_is_stored() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    let records = [
        json!({"v": 1.5}),
        json!({"vs": "on"}),
        json!({"vb": true}),
        json!({"vd": "aGVsbG8"}),
        json!({"s": 7.25}),
    ];
    for (i, r) in records.iter().enumerate() {
        let mut r = r.clone();
        r["t"] = json!(T0 + 10.0 * i as f64);
        env.publish(&ch, "", json!([r])).await;
    }
    let s = svc.states_until(&tid, |s| s.len() == 5).await;
    let values: Vec<Value> = s.iter().map(|x| x["payload"]["x"].clone()).collect();
    assert_eq!(
        values,
        [
            json!(1.5),
            json!("on"),
            json!(true),
            json!("aGVsbG8"),
            json!(7.25)
        ]
    );
    svc.stop().await;
}

async fn garbage_is_rejected_counted_and_the_next_good_message_lands() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();

    env.publish_raw(&ch, "", b"\xff\xfe not protobuf".to_vec())
        .await;
    env.publish_raw(&ch, "", envelope(&ch, "", b"{\"not\":\"senml\"}".to_vec()))
        .await;
    env.publish_raw(
        &ch,
        "",
        envelope(&ch, "", b"[{\"n\":\"novalue\"}]".to_vec()),
    )
    .await;
    env.publish(&ch, "", json!([{"v": 42, "t": T0}])).await;
    let s = svc.states_until(&tid, |s| s.len() == 1).await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["payload"], json!({"x": 42}));
    let m = svc.metrics().await;
    for reason in ["envelope", "not_array", "no_value"] {
        assert!(
            m.contains(&format!(
                "twins_ingest_rejected_total{{reason=\"{reason}\"}}"
            )),
            "rejection {reason} counted in:\n{m}"
        );
    }
    svc.stop().await;
}

async fn own_notification_channel_and_inband_subtopics_never_become_states() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    // A twin bound to the notification channel and to an ordinary channel.
    let twin = svc
        .create_twin(twin_body(vec![
            attr("n", &env.notif, ">", true),
            attr("x", &ch, ">", true),
        ]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    env.publish(&env.notif, "anything", json!([{"v": 1, "t": T0}]))
        .await;
    env.publish(
        &ch,
        &format!("twins.{tid}.desired.get"),
        json!([{"v": 2, "t": T0 + 10.0}]),
    )
    .await;
    env.publish(&ch, "plain", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = svc.states_until(&tid, |s| !s.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = svc.states(&tid).await;
    assert_eq!(s, s2);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["payload"], json!({"x": 3}));
    svc.stop().await;
}

async fn definition_moved_to_a_new_channel_follows_it() {
    let env = Env::new().await;
    let svc = env.start().await;
    let (old, new) = (id(), id());
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &old, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    env.publish(&old, "", json!([{"v": 1, "t": T0}])).await;
    svc.states_until(&tid, |s| s.len() == 1).await;

    let updated = svc
        .update_twin(&tid, json!({"definition": {"attributes": [attr("x", &new, "", true)], "delta": 1_000_000_000}}))
        .await;
    assert_eq!(updated["definitions"][1]["id"], 1);
    env.publish(&old, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    env.publish(&new, "", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        svc.states(&tid).await.len(),
        2,
        "old channel no longer lands"
    );
    assert_eq!(s[1]["payload"], json!({"x": 3}));
    assert_eq!(s[1]["definition"], 1);
    svc.stop().await;
}

async fn messages_published_while_stopped_are_applied_exactly_once_after_restart() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    svc.stop().await;

    env.publish(&ch, "", json!([{"v": 1, "t": T0}])).await;
    env.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;

    let svc = env.start().await;
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.states(&tid).await, s);
    assert_eq!(s.len(), 2);
    svc.stop().await;
}

async fn a_redelivered_message_never_adds_a_second_state() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    let store = svc.store.clone();
    svc.stop().await;

    // The message is applied to the twin but the group's position does not cover it (a
    // crash between the state writes and the position, as on a store without
    // transactions): the message is read again after the restart.
    let payload = envelope(&ch, "", json!([{"v": 1, "t": T0}]).to_string().into_bytes());
    let seq = env.publish_raw(&ch, "", payload.clone()).await;
    let lease = Lease {
        group: env.group.clone(),
        holder: "test".into(),
        ttl: Duration::from_secs(60),
        start: 0,
    };
    let position = store
        .ingest
        .lease(&lease)
        .await
        .expect("lease")
        .expect("the stopped service released the lease");
    assert!(position < seq);
    let lookup = TwinLookup::new(
        store.twins.clone(),
        std::sync::Arc::new(twins::cache::memory::MemoryCache::default()),
    );
    let ingest = IngestService::new(store.clone(), lookup, None);
    let decoded = broker::decode(&payload).expect("envelope");
    let messages = [Message {
        seq,
        channel: decoded.channel,
        subtopic: decoded.subtopic,
        payload: decoded.payload,
        created: decoded.created,
    }];
    let batch = Batch {
        group: &env.group,
        from: position,
        to: position,
        messages: &messages,
        rejected: &[],
    };
    let report = ingest.apply(&batch, &NothingAside).await.expect("applied");
    assert_eq!(report.inserted(), 1);
    store
        .ingest
        .release(&env.group, "test")
        .await
        .expect("release");

    let svc = env.start().await;
    env.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s2 = svc.states(&tid).await;
    assert_eq!(s, s2);
    assert_eq!(s.len(), 2, "the redelivered message was skipped: {s:?}");
    // The counter is process-wide and other tests of this binary may add to it.
    let metrics = svc.metrics().await;
    let duplicates: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twins_ingest_duplicates_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        duplicates >= 1,
        "the message read again counts as a duplicate"
    );
    assert_eq!(s[0]["payload"], json!({"x": 1}));
    assert_eq!(s[1]["payload"], json!({"x": 2}));
    svc.stop().await;
}

async fn notifications_report_every_operation() {
    let env = Env::new().await;
    let mut sub = env
        .nats
        .subscribe(format!("channels.{}.>", env.notif))
        .await
        .expect("subscribe");
    env.nats.flush().await.expect("flush");
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    svc.req(reqwest::Method::GET, &format!("/twins/{tid}"))
        .send()
        .await
        .expect("GET");
    svc.update_twin(&tid, json!({"name": "renamed"})).await;
    env.publish(&ch, "", json!([{"v": 5, "t": T0}])).await;
    svc.states_until(&tid, |s| s.len() == 1).await;
    let res = svc
        .req(reqwest::Method::DELETE, &format!("/twins/{tid}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(res.status(), 204);

    let mut got = Vec::new();
    while got.len() < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("notification within 5 s")
            .expect("subscription open");
        let env_msg = broker::decode(&msg.payload).expect("protobuf envelope");
        let payload: Value = serde_json::from_slice(&env_msg.payload).expect("JSON payload");
        assert_eq!(env_msg.publisher, "twins");
        assert_eq!(
            format!("channels.{}.{}", env_msg.channel, env_msg.subtopic),
            msg.subject.as_str()
        );
        got.push((msg.subject.to_string(), payload));
    }
    let prefix = format!("channels.{}.messages.{tid}", env.notif);
    let subjects: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        subjects,
        [
            format!("{prefix}.create.success"),
            format!("{prefix}.get.success"),
            format!("{prefix}.update.success"),
            format!("{prefix}.save.success"),
            format!("{prefix}.remove.success"),
        ]
    );
    assert_eq!(got[0].1["id"], tid.as_str());
    assert_eq!(got[2].1["name"], "renamed");
    assert_eq!(got[3].1["payload"], json!({"x": 5}));
    assert_eq!(got[4].1, json!({"deleted": tid}));
    svc.stop().await;
}

async fn smembers(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut m: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(redis)
        .await
        .expect("SMEMBERS");
    m.sort();
    m
}

async fn redis_keys_stay_exact_through_create_update_and_delete() {
    let mut env = Env::new().await;
    let prefix = format!("twins-test-{}:", id());
    env.extra = vec![
        ("MG_TWINS_CACHE_URL".into(), "redis://127.0.0.1:6379".into()),
        ("MG_TWINS_CACHE_PREFIX".into(), prefix.clone()),
    ];
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis URL");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (see .ci/run)");
    let svc = env.start().await;
    let (a, b) = (id(), id());
    let twin = svc
        .create_twin(twin_body(vec![
            attr("x", &a, "s", true),
            attr("y", &a, ">", false),
        ]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    let key = |ch: &str, sub: &str| format!("{prefix}twin:{ch}-{sub}");
    assert_eq!(smembers(&mut redis, &key(&a, "s")).await, vec![tid.clone()]);
    assert_eq!(smembers(&mut redis, &key(&a, ">")).await, vec![tid.clone()]);
    let mut reverse = vec![key(&a, ">"), key(&a, "s")];
    reverse.sort();
    assert_eq!(
        smembers(&mut redis, &format!("{prefix}twin:{tid}")).await,
        reverse
    );

    // The update the Go service gets wrong: the twin must move to its new channel.
    svc.update_twin(
        &tid,
        json!({"definition": {"attributes": [attr("x", &b, "", true)]}}),
    )
    .await;
    assert!(smembers(&mut redis, &key(&a, "s")).await.is_empty());
    assert!(smembers(&mut redis, &key(&a, ">")).await.is_empty());
    assert_eq!(smembers(&mut redis, &key(&b, "")).await, vec![tid.clone()]);
    assert_eq!(
        smembers(&mut redis, &format!("{prefix}twin:{tid}")).await,
        [key(&b, "")]
    );

    env.publish(&b, "", json!([{"v": 1, "t": T0}])).await;
    assert_eq!(svc.states_until(&tid, |s| s.len() == 1).await.len(), 1);

    let res = svc
        .req(reqwest::Method::DELETE, &format!("/twins/{tid}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(res.status(), 204);
    assert!(smembers(&mut redis, &key(&b, "")).await.is_empty());
    assert!(
        smembers(&mut redis, &format!("{prefix}twin:{tid}"))
            .await
            .is_empty()
    );
    svc.stop().await;
}

async fn ingestion_falls_back_to_the_store_when_redis_stops() {
    let mut env = Env::new().await;
    let port = common::free_port();
    let redis_server = common::own_redis(port).await;
    env.extra = vec![(
        "MG_TWINS_CACHE_URL".into(),
        format!("redis://127.0.0.1:{port}"),
    )];
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    env.publish(&ch, "", json!([{"v": 1, "t": T0}])).await;
    svc.states_until(&tid, |s| s.len() == 1).await;

    drop(redis_server);
    env.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s.len(), 2, "ingested through the store while Redis is down");
    assert_eq!(s[1]["payload"], json!({"x": 2}));
    svc.stop().await;
}

async fn api_serves_while_the_broker_is_down_and_ingestion_resumes_after_restart() {
    let port = common::free_port();
    let nats_dir = tempfile::tempdir().expect("temp dir");
    let nats = common::own_nats(port, nats_dir.path()).await;
    let env = Env::on(&format!("nats://127.0.0.1:{port}")).await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    env.publish(&ch, "", json!([{"v": 1, "t": T0}])).await;
    svc.states_until(&tid, |s| s.len() == 1).await;

    drop(nats);
    let mut health = Value::Null;
    for _ in 0..100 {
        health = svc
            .http
            .get(format!("{}/health", svc.base))
            .send()
            .await
            .expect("health")
            .json()
            .await
            .expect("JSON");
        if health["checks"]["broker"] != "pass" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health["checks"]["broker"], "disconnected", "{health}");
    assert_eq!(health["status"], "warn");
    let created = svc.create_twin(twin_body(vec![])).await;
    assert!(
        created["id"].is_string(),
        "API keeps serving without the broker"
    );

    let _nats = common::own_nats(port, nats_dir.path()).await;
    let mut published = false;
    for _ in 0..100 {
        let sent = env
            .js
            .publish(
                broker::subject(&ch, ""),
                envelope(
                    &ch,
                    "",
                    json!([{"v": 2, "t": T0 + 10.0}]).to_string().into_bytes(),
                )
                .into(),
            )
            .await;
        if let Ok(ack) = sent
            && tokio::time::timeout(Duration::from_secs(1), ack)
                .await
                .is_ok_and(|a| a.is_ok())
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "broker back");
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s.len(), 2, "consumer reconnected by itself: {s:?}");
    assert_eq!(s[1]["payload"], json!({"x": 2}));
    svc.stop().await;
}

async fn records_without_time_take_the_time_magistrala_received_them() {
    let env = Env::new().await;
    let svc = env.start().await;
    let ch = id();
    let twin = svc
        .create_twin(twin_body(vec![attr("x", &ch, "", true)]))
        .await;
    let tid = twin["id"].as_str().unwrap().to_owned();
    // Two messages received 10 s apart, applied together: two states, at those times.
    for (i, t) in [T0, T0 + 10.0].into_iter().enumerate() {
        let data = broker::encode(&Envelope {
            channel: ch.clone(),
            subtopic: String::new(),
            publisher: "device".into(),
            protocol: "mqtt".into(),
            payload: json!([{"v": i}]).to_string().into_bytes(),
            created: (t * 1e9) as i64,
        });
        env.publish_raw(&ch, "", data).await;
    }
    let s = svc.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0]["created"], rfc3339(T0));
    assert_eq!(s[1]["created"], rfc3339(T0 + 10.0));
    svc.stop().await;
}
