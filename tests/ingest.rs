//! End-to-end ingestion over the real NATS JetStream (and Redis where named): messages
//! published to `channels.<ch>[.<subtopic>]` become states visible through the HTTP API.
//!
//! Each test runs on every store backend with its own database, durable consumer name,
//! channels and notification channel, so tests run in parallel on the shared broker and
//! leave nothing behind.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use twins::broker::{self, Envelope};
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

use common::*;

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
    attributes_bound_to_records_take_only_their_record,
);

const T0: f64 = 1_700_000_000.0;

/// A channel name of the test's own.
fn channel() -> String {
    unique("ch-")
}

/// An app ingesting as Alice (standalone) with a notification channel of its own.
fn app() -> Builder {
    TestApp::builder().auth(Auth::Standalone).notifications()
}

/// A twin listening on a channel of its own (attribute `x`), once a message on it has
/// become its first state; (twin id, channel).
async fn twin_with_a_state(app: &TestApp) -> (String, String) {
    let ch = channel();
    let tid = app.create_listening(&[attribute("x", &ch, "", true)]).await;
    app.publish(&ch, "", json!([{"v": 1, "t": T0}])).await;
    app.states_until(&tid, |s| s.len() == 1).await;
    (tid, ch)
}

/// Publishes a second message to the twin of [`twin_with_a_state`] and asserts that it
/// becomes its second state.
async fn second_state_lands(app: &TestApp, tid: &str, ch: &str, why: &str) {
    app.publish(ch, "", json!([{"v": 2, "t": T0 + 10.0}])).await;
    let s = app.states_until(tid, |s| s.len() == 2).await;
    assert_eq!(s[1]["payload"], json!({"x": 2}), "{why}: {s:?}");
}

fn rfc3339(t: f64) -> String {
    twins::domain::time::format(&twins::domain::time::from_nanos((t * 1e9).round() as i64))
}

async fn first_state_then_update_within_delta_then_new_state_beyond_delta() {
    let app = app().spawn().await;
    let ch = channel();
    let tid = app
        .create_listening(&[attribute("temp", &ch, "engine", true)])
        .await;

    app.publish(&ch, "engine", json!([{"n": "temp", "v": 20.0, "t": T0}]))
        .await;
    let s = app.states_until(&tid, |s| s.len() == 1).await;
    assert_eq!(s[0]["id"], 0);
    assert_eq!(s[0]["definition"], 0);
    assert_eq!(s[0]["payload"], json!({"temp": 20}));
    assert_eq!(s[0]["created"], rfc3339(T0), "record time honoured");

    app.publish(
        &ch,
        "engine",
        json!([{"n": "temp", "v": 21.5, "t": T0 + 0.5}]),
    )
    .await;
    let s = app
        .states_until(&tid, |s| {
            s.first().is_some_and(|x| x["payload"]["temp"] == 21.5)
        })
        .await;
    assert_eq!(s.len(), 1, "within delta updates the last state");
    assert_eq!(s[0]["payload"], json!({"temp": 21.5}));
    assert_eq!(s[0]["created"], rfc3339(T0));

    app.publish(
        &ch,
        "engine",
        json!([{"n": "temp", "v": 23.0, "t": T0 + 2.0}]),
    )
    .await;
    let s = app.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s[1]["id"], 1, "beyond delta adds a state");
    assert_eq!(s[1]["payload"], json!({"temp": 23}));
    assert_eq!(s[1]["created"], rfc3339(T0 + 2.0));
}

async fn payload_is_carried_over_and_unpersisted_attributes_never_stored() {
    let app = app().spawn().await;
    let ch = channel();
    let marker = Marker::new();
    let tid = app
        .create_listening(&[
            attribute("engine", &ch, "engine", true),
            attribute("chassis", &ch, "chassis", true),
            attribute("rpm", &ch, "rpm", false),
            marker.attribute(),
        ])
        .await;

    app.publish(&ch, "rpm", json!([{"v": 3000, "t": T0 - 10.0}]))
        .await;
    app.publish(&ch, "engine", json!([{"v": 80, "t": T0}]))
        .await;
    app.publish(&ch, "chassis", json!([{"v": 30, "t": T0 + 5.0}]))
        .await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0]["payload"], json!({"engine": 80}));
    assert_eq!(
        s[1]["payload"],
        json!({"engine": 80, "chassis": 30}),
        "carried over"
    );
}

async fn wildcard_subtopic_matches_and_other_channels_are_ignored() {
    let app = app().spawn().await;
    let (ch, other) = (channel(), channel());
    let marker = Marker::new();
    let tid = app
        .create_listening(&[attribute("any", &ch, ">", true), marker.attribute()])
        .await;

    app.publish(&other, "x", json!([{"v": 1, "t": T0}])).await;
    app.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    app.publish(&ch, "deep.sub", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = app.states_before(&tid, &marker).await;
    let values: Vec<&Value> = s.iter().map(|x| &x["payload"]["any"]).collect();
    assert_eq!(values, [&json!(2), &json!(3)]);
}

async fn every_senml_value_type_is_stored() {
    let app = app().spawn().await;
    let ch = channel();
    let tid = app.create_listening(&[attribute("x", &ch, "", true)]).await;
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
        app.publish(&ch, "", json!([r])).await;
    }
    let s = app.states_until(&tid, |s| s.len() == 5).await;
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
}

async fn garbage_is_rejected_counted_and_the_next_good_message_lands() {
    let app = app().spawn().await;
    let ch = channel();
    let marker = Marker::new();
    let tid = app
        .create_listening(&[attribute("x", &ch, "", true), marker.attribute()])
        .await;

    app.publish_raw(&ch, "", b"\xff\xfe not protobuf".to_vec())
        .await;
    app.publish_raw(&ch, "", envelope(&ch, "", b"{\"not\":\"senml\"}".to_vec()))
        .await;
    app.publish_raw(
        &ch,
        "",
        envelope(&ch, "", b"[{\"n\":\"novalue\"}]".to_vec()),
    )
    .await;
    app.publish(&ch, "", json!([{"v": 42, "t": T0}])).await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["payload"], json!({"x": 42}));
    let m = app.metrics().await;
    for reason in ["envelope", "not_array", "no_value"] {
        assert!(
            m.contains(&format!(
                "twins_ingest_rejected_total{{reason=\"{reason}\"}}"
            )),
            "rejection {reason} counted in:\n{m}"
        );
    }
}

async fn own_notification_channel_and_inband_subtopics_never_become_states() {
    let app = app().spawn().await;
    let notifications = app.notifications.clone().expect("a notification channel");
    let ch = channel();
    let marker = Marker::new();
    // A twin bound to the notification channel and to an ordinary channel.
    let tid = app
        .create_listening(&[
            attribute("n", &notifications, ">", true),
            attribute("x", &ch, ">", true),
            marker.attribute(),
        ])
        .await;
    app.publish(&notifications, "anything", json!([{"v": 1, "t": T0}]))
        .await;
    app.publish(
        &ch,
        &format!("twins.{tid}.desired.get"),
        json!([{"v": 2, "t": T0 + 10.0}]),
    )
    .await;
    app.publish(&ch, "plain", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["payload"], json!({"x": 3}));
}

async fn definition_moved_to_a_new_channel_follows_it() {
    let app = app().spawn().await;
    let (old, new) = (channel(), channel());
    let marker = Marker::new();
    let tid = app
        .create_listening(&[attribute("x", &old, "", true), marker.attribute()])
        .await;
    app.publish(&old, "", json!([{"v": 1, "t": T0}])).await;
    app.states_until(&tid, |s| s.len() == 1).await;

    let updated = app
        .update_twin(
            &tid,
            &listening(&[attribute("x", &new, "", true), marker.attribute()]),
        )
        .await;
    assert_eq!(updated["definitions"][1]["id"], 1);
    app.publish(&old, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    app.publish(&new, "", json!([{"v": 3, "t": T0 + 20.0}]))
        .await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 2, "old channel no longer lands: {s:?}");
    assert_eq!(s[1]["payload"], json!({"x": 3}));
    assert_eq!(s[1]["definition"], 1);
}

async fn messages_published_while_stopped_are_applied_exactly_once_after_restart() {
    let mut app = app().spawn().await;
    let ch = channel();
    let marker = Marker::new();
    let tid = app
        .create_listening(&[attribute("x", &ch, "", true), marker.attribute()])
        .await;
    app.wait_ingesting().await;
    app.stop().await;

    app.publish(&ch, "", json!([{"v": 1, "t": T0}])).await;
    app.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;

    app.start().await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0]["payload"]["x"], 1);
    assert_eq!(s[1]["payload"]["x"], 2);
}

async fn a_redelivered_message_never_adds_a_second_state() {
    let mut app = app().spawn().await;
    let ch = channel();
    let marker = Marker::new();
    let tid = app
        .create_listening(&[attribute("x", &ch, "", true), marker.attribute()])
        .await;
    app.wait_ingesting().await;
    let store = app.store();
    app.stop().await;

    // The message is applied to the twin but the group's position does not cover it (a
    // crash between the state writes and the position, as on a store without
    // transactions): the message is read again after the restart.
    let payload = envelope(&ch, "", json!([{"v": 1, "t": T0}]).to_string().into_bytes());
    let seq = app.publish_raw(&ch, "", payload.clone()).await;
    let lease = Lease {
        group: app.group.clone(),
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
        group: &app.group,
        from: position,
        to: position,
        messages: &messages,
        rejected: &[],
    };
    let report = ingest.apply(&batch, &NothingAside).await.expect("applied");
    assert_eq!(report.inserted(), 1);
    store
        .ingest
        .release(&app.group, "test")
        .await
        .expect("release");

    app.start().await;
    app.publish(&ch, "", json!([{"v": 2, "t": T0 + 10.0}]))
        .await;
    let s = app.states_before(&tid, &marker).await;
    assert_eq!(s.len(), 2, "the redelivered message was skipped: {s:?}");
    // The counter is process-wide and other tests of this binary may add to it.
    let metrics = app.metrics().await;
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
}

async fn notifications_report_every_operation() {
    let app = app().spawn().await;
    let notifications = app.notifications.clone().expect("a notification channel");
    let mut sub = app.subscribe(format!("channels.{notifications}.>")).await;
    let ch = channel();
    let tid = app.create_listening(&[attribute("x", &ch, "", true)]).await;
    app.twin(ALICE, &tid).await;
    app.update_twin(&tid, &json!({"name": "renamed"})).await;
    app.publish(&ch, "", json!([{"v": 5, "t": T0}])).await;
    app.states_until(&tid, |s| s.len() == 1).await;
    let res = app.delete_twin(ALICE, &tid).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let mut got = Vec::new();
    while got.len() < 5 {
        let msg = receive(&mut sub, "notification").await;
        let env_msg = broker::decode(&msg.payload).expect("protobuf envelope");
        let payload: Value = serde_json::from_slice(&env_msg.payload).expect("JSON payload");
        assert_eq!(env_msg.publisher, "twins");
        assert_eq!(
            format!("channels.{}.{}", env_msg.channel, env_msg.subtopic),
            msg.subject.as_str()
        );
        got.push((msg.subject.to_string(), payload));
    }
    let prefix = format!("channels.{notifications}.messages.{tid}");
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
    let client = redis::Client::open(REDIS_URL).expect("redis URL");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (see .ci/run)");
    let app = app().redis().spawn().await;
    let prefix = app.cache_prefix.clone().expect("a Redis key prefix");
    let (a, b) = (channel(), channel());
    let tid = app
        .create_listening(&[
            attribute("x", &a, "s", true),
            attribute("y", &a, ">", false),
        ])
        .await;
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
    app.update_twin(
        &tid,
        &json!({"definition": {"attributes": [attribute("x", &b, "", true)]}}),
    )
    .await;
    assert!(smembers(&mut redis, &key(&a, "s")).await.is_empty());
    assert!(smembers(&mut redis, &key(&a, ">")).await.is_empty());
    assert_eq!(smembers(&mut redis, &key(&b, "")).await, vec![tid.clone()]);
    assert_eq!(
        smembers(&mut redis, &format!("{prefix}twin:{tid}")).await,
        [key(&b, "")]
    );

    app.publish(&b, "", json!([{"v": 1, "t": T0}])).await;
    app.states_until(&tid, |s| s.len() == 1).await;

    let res = app.delete_twin(ALICE, &tid).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(smembers(&mut redis, &key(&b, "")).await.is_empty());
    assert!(
        smembers(&mut redis, &format!("{prefix}twin:{tid}"))
            .await
            .is_empty()
    );
}

async fn ingestion_falls_back_to_the_store_when_redis_stops() {
    let mut app = app().own_redis().spawn().await;
    let (tid, ch) = twin_with_a_state(&app).await;

    app.stop_redis();
    second_state_lands(
        &app,
        &tid,
        &ch,
        "ingested through the store while Redis is down",
    )
    .await;
}

async fn api_serves_while_the_broker_is_down_and_ingestion_resumes_after_restart() {
    let mut app = app().own_broker().spawn().await;
    let (tid, ch) = twin_with_a_state(&app).await;

    app.stop_broker();
    let health = app
        .health_until(|h| health_check(&h.body, "broker") != "pass")
        .await
        .body;
    assert_eq!(health_check(&health, "broker"), "disconnected", "{health}");
    assert_eq!(health["status"], "warn");
    let created = app.create_twin(ALICE, &listening(&[])).await;
    assert!(
        created["id"].is_string(),
        "API keeps serving without the broker"
    );

    app.restart_broker().await;
    second_state_lands(&app, &tid, &ch, "consumer reconnected by itself").await;
}

async fn records_without_time_take_the_time_magistrala_received_them() {
    let app = app().spawn().await;
    let ch = channel();
    let tid = app.create_listening(&[attribute("x", &ch, "", true)]).await;
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
        app.publish_raw(&ch, "", data).await;
    }
    let s = app.states_until(&tid, |s| s.len() == 2).await;
    assert_eq!(s[0]["created"], rfc3339(T0));
    assert_eq!(s[1]["created"], rfc3339(T0 + 10.0));
}

/// Two attributes of one channel/subtopic bound to the records `room/temperature` and
/// `room/humidity` (`bn` + `n`), and one without a record: one message carrying both
/// records (and a third) gives each bound attribute its own value; the unbound one takes
/// every record's value, the last winning, as in the Go service. The record names come
/// back in the twin's definition.
async fn attributes_bound_to_records_take_only_their_record() {
    let app = app().spawn().await;
    let ch = channel();
    let bound = |name: &str, record: &str| {
        let mut a = attribute(name, &ch, "env", true);
        a["record"] = json!(record);
        a
    };
    let tid = app
        .create_listening(&[
            bound("temperature", "room/temperature"),
            bound("humidity", "room/humidity"),
            attribute("last", &ch, "env", true),
        ])
        .await;
    let twin = app.twin(ALICE, &tid).await;
    let attrs = &twin["definitions"][0]["attributes"];
    assert_eq!(attrs[0]["record"], "room/temperature", "{twin}");
    assert!(attrs[2].get("record").is_none(), "{twin}");

    app.publish(
        &ch,
        "env",
        json!([
            {"bn": "room/", "bt": T0, "n": "temperature", "v": 21.5},
            {"n": "humidity", "v": 40},
            {"n": "pressure", "v": 1013},
        ]),
    )
    .await;
    let s = app.states_until(&tid, |s| s.len() == 1).await;
    assert_eq!(
        s[0]["payload"],
        json!({"temperature": 21.5, "humidity": 40, "last": 1013}),
        "{s:?}"
    );
}
