//! The change feed's write side (SPEC 12): every committed change puts exactly one event
//! on the `twins-events` stream, on its owner's, twin's and kind's subject, with the
//! values before and after it as the API serves them, in commit order per twin; also
//! when the service is killed between commit and publish, or the broker is away.
//!
//! Each test acts as a user of its own, whose events it reads back through a consumer
//! filtered on that user's owner key, once the store's outbox is empty (everything
//! recorded is then on the stream).

mod common;

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::app::{DEADLINE, TestApp, attribute, eventually, listening, unique};
use common::auth::token_of;
use common::{id_of, json_of, send};
use twins::broker::feed::FEED_STREAM;
use twins::domain::feed::owner_key;
use twins::store::Store;

/// Time of the first SenML record, in seconds since the epoch.
const T0: f64 = 1_700_000_000.0;

/// A user of the test's own.
struct User {
    id: String,
    token: String,
}

impl User {
    fn new() -> Self {
        let id = unique("feed-");
        Self {
            token: token_of(&id),
            id,
        }
    }
}

/// An event as a consumer reads it from the stream.
#[derive(Debug, Clone)]
struct Seen {
    subject: String,
    msg_id: String,
    payload: Value,
}

/// An event as the oracle expects it: kind, twin, old, new.
type Expected = (String, String, Value, Value);

fn expect(kind: &str, twin: &str, old: Option<&Value>, new: Option<&Value>) -> Expected {
    (
        kind.to_owned(),
        twin.to_owned(),
        old.cloned().unwrap_or(Value::Null),
        new.cloned().unwrap_or(Value::Null),
    )
}

/// Waits until the store's outbox is empty: every event recorded so far is on the
/// stream.
async fn drained(store: &Store) {
    eventually(
        "the outbox backlog",
        || async { store.outbox.backlog().await.expect("outbox backlog") },
        |n| *n == 0,
    )
    .await;
}

/// Every event of `owner` on the stream, in stream order.
async fn feed(js: &jetstream::Context, owner: &str) -> Vec<Seen> {
    let stream = js.get_stream(FEED_STREAM).await.expect("the feed stream");
    let mut consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("twins.events.{}.>", owner_key(owner)),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("a consumer of the feed");
    let pending = consumer.info().await.expect("consumer info").num_pending as usize;
    let name = consumer.cached_info().name.clone();
    let mut seen = Vec::with_capacity(pending);
    if pending > 0 {
        let mut messages = consumer
            .fetch()
            .max_messages(pending)
            .expires(DEADLINE)
            .messages()
            .await
            .expect("fetch");
        while seen.len() < pending {
            let m = tokio::time::timeout(DEADLINE, messages.next())
                .await
                .expect("an event within the deadline")
                .expect("the fetch goes on")
                .expect("an event");
            let msg_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            seen.push(Seen {
                subject: m.subject.to_string(),
                msg_id,
                payload: serde_json::from_slice(&m.payload).expect("an event is JSON"),
            });
        }
    }
    let _ = stream.delete_consumer(&name).await;
    seen
}

/// Events by twin, each twin's in their order: the order SPEC 12 promises (per twin;
/// different twins' events may be relayed side by side).
fn per_twin(events: Vec<Expected>) -> std::collections::BTreeMap<String, Vec<Expected>> {
    let mut by_twin = std::collections::BTreeMap::<String, Vec<Expected>>::new();
    for e in events {
        by_twin.entry(e.1.clone()).or_default().push(e);
    }
    by_twin
}

/// Checks the envelope of every event (subject, message id, fields) and returns them as
/// the oracle writes them.
fn contents(owner: &str, seen: &[Seen]) -> Vec<Expected> {
    let key = owner_key(owner);
    let mut ids = HashSet::new();
    seen.iter()
        .map(|s| {
            let p = &s.payload;
            let kind = p["kind"].as_str().expect("a kind").to_owned();
            let twin = p["twin_id"].as_str().expect("a twin id").to_owned();
            assert_eq!(s.subject, format!("twins.events.{key}.{twin}.{kind}"));
            assert!(
                ids.insert(s.msg_id.clone()),
                "message id {} twice",
                s.msg_id
            );
            assert!(!s.msg_id.is_empty(), "an event without Nats-Msg-Id");
            assert!(
                p["time"]
                    .as_str()
                    .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
                "{p}"
            );
            let fields: HashSet<&str> = p
                .as_object()
                .expect("an object")
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                fields,
                HashSet::from(["kind", "twin_id", "time", "old", "new"]),
                "{p}"
            );
            (kind, twin, p["old"].clone(), p["new"].clone())
        })
        .collect()
}

/// Every state of the user's twin, in id order.
async fn states(app: &TestApp, user: &User, twin: &str) -> Vec<Value> {
    let page = app
        .list_states(&user.token, twin, &[("limit", "100")])
        .await;
    page["states"].as_array().cloned().unwrap_or_default()
}

/// Publishes one reading of `temp` with value `v` at `t` and returns the twin's states
/// once the reading is in its latest state.
async fn reading(
    app: &TestApp,
    user: &User,
    twin: &str,
    channel: &str,
    v: u64,
    t: f64,
) -> Vec<Value> {
    app.publish(channel, "", json!([{"n": "temp", "v": v, "t": t}]))
        .await;
    eventually(
        "the reading in the twin's latest state",
        || states(app, user, twin),
        |s| {
            s.last()
                .is_some_and(|last| last["payload"]["temp"] == json!(v))
        },
    )
    .await
}

/// The event a reading made, from the states before and after it.
fn state_event(twin: &str, before: &[Value], after: &[Value]) -> Expected {
    let new = after.last();
    if after.len() > before.len() {
        expect("state.created", twin, before.last(), new)
    } else {
        expect("state.updated", twin, before.last(), new)
    }
}

async fn write_document(
    app: &TestApp,
    user: &User,
    method: Method,
    twin: &str,
    name: &str,
    data: Value,
) -> Value {
    let resp = send(
        app.authed(
            method,
            &format!("/twins/{twin}/documents/{name}"),
            &user.token,
        )
        .json(&json!({ "data": data })),
    )
    .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    json_of(resp).await
}

async fn delete_document(app: &TestApp, user: &User, twin: &str, name: &str) {
    let resp = send(app.authed(
        Method::DELETE,
        &format!("/twins/{twin}/documents/{name}"),
        &user.token,
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

async fn update_twin(app: &TestApp, user: &User, twin: &str, body: Value) -> Value {
    let resp = app.put_twin(&user.token, twin, &body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    json_of(resp).await
}

async fn delete_twin(app: &TestApp, user: &User, twin: &str) {
    let resp = app.delete_twin(&user.token, twin).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

/// A twin of the user listening to a channel of its own for `temp`: its id, channel
/// and the twin as created.
async fn listening_twin(app: &TestApp, user: &User) -> (String, String, Value) {
    let channel = unique("feed-ch-");
    let twin = app
        .create_twin(
            &user.token,
            &listening(&[attribute("temp", &channel, "", true)]),
        )
        .await;
    (id_of(&twin), channel, twin)
}

async fn every_kind_of_change_produces_exactly_one_event() {
    let app = TestApp::builder().spawn().await;
    let store = Store::connect(&app.db_url).await.expect("the store");
    let user = User::new();
    let (id, channel, created) = listening_twin(&app, &user).await;
    let mut expected = vec![expect("twin.created", &id, None, Some(&created))];

    let updated = update_twin(&app, &user, &id, json!({"name": "renamed"})).await;
    expected.push(expect("twin.updated", &id, Some(&created), Some(&updated)));

    // A new state, the same state updated within the delta, another new state.
    let mut before = Vec::new();
    for (v, t) in [(1, T0), (2, T0 + 0.5), (3, T0 + 10.0)] {
        let after = reading(&app, &user, &id, &channel, v, t).await;
        expected.push(state_event(&id, &before, &after));
        before = after;
    }
    assert_eq!(
        expected.iter().map(|e| e.0.as_str()).collect::<Vec<_>>()[2..],
        ["state.created", "state.updated", "state.created"]
    );

    let put = write_document(&app, &user, Method::PUT, &id, "desired", json!({"a": 1})).await;
    expected.push(expect("document.put", &id, None, Some(&put)));
    let patched = write_document(&app, &user, Method::PATCH, &id, "desired", json!({"b": 2})).await;
    expected.push(expect("document.patched", &id, Some(&put), Some(&patched)));
    // A write that does not commit makes no event.
    let stale = send(
        app.authed(
            Method::PUT,
            &format!("/twins/{id}/documents/desired"),
            &user.token,
        )
        .json(&json!({"data": {"c": 3}, "version": 1})),
    )
    .await;
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    delete_document(&app, &user, &id, "desired").await;
    expected.push(expect("document.deleted", &id, Some(&patched), None));

    let last = app.twin(&user.token, &id).await;
    delete_twin(&app, &user, &id).await;
    // Deleting again deletes nothing and makes no event.
    delete_twin(&app, &user, &id).await;
    expected.push(expect("twin.deleted", &id, Some(&last), None));

    drained(&store).await;
    let seen = feed(app.js(), &user.id).await;
    assert_eq!(per_twin(contents(&user.id, &seen)), per_twin(expected));
}

/// A small deterministic generator, seeded per run (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

async fn events_follow_the_changes_in_order_per_twin() {
    let app = TestApp::builder().spawn().await;
    let store = Store::connect(&app.db_url).await.expect("the store");
    let user = User::new();
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    println!("seed {seed}");
    let mut rng = Lcg(seed);

    struct Twin {
        id: String,
        channel: String,
        current: Value,
        states: Vec<Value>,
        documents: HashMap<&'static str, Value>,
        time: f64,
    }
    let mut expected: HashMap<String, Vec<Expected>> = HashMap::new();
    let mut twins = Vec::new();
    for _ in 0..3 {
        let (id, channel, created) = listening_twin(&app, &user).await;
        expected.entry(id.clone()).or_default().push(expect(
            "twin.created",
            &id,
            None,
            Some(&created),
        ));
        twins.push(Twin {
            id,
            channel,
            current: created,
            states: Vec::new(),
            documents: HashMap::new(),
            time: T0,
        });
    }
    for step in 0..40_u64 {
        let t = &mut twins[rng.below(3) as usize];
        let events = expected.entry(t.id.clone()).or_default();
        let name = ["a", "b"][rng.below(2) as usize];
        match rng.below(5) {
            0 => {
                let updated =
                    update_twin(&app, &user, &t.id, json!({"name": format!("n{step}")})).await;
                events.push(expect(
                    "twin.updated",
                    &t.id,
                    Some(&t.current),
                    Some(&updated),
                ));
                t.current = updated;
            }
            1 | 2 => {
                // Within the delta (an update in place) or past it (a new state).
                t.time += [0.3, 5.0][rng.below(2) as usize];
                let after = reading(&app, &user, &t.id, &t.channel, step, t.time).await;
                events.push(state_event(&t.id, &t.states, &after));
                t.states = after;
            }
            3 => {
                let (method, kind) = [
                    (Method::PUT, "document.put"),
                    (Method::PATCH, "document.patched"),
                ][rng.below(2) as usize]
                    .clone();
                let doc =
                    write_document(&app, &user, method, &t.id, name, json!({ name: step })).await;
                events.push(expect(kind, &t.id, t.documents.get(name), Some(&doc)));
                t.documents.insert(name, doc);
            }
            _ => {
                if let Some(old) = t.documents.remove(name) {
                    delete_document(&app, &user, &t.id, name).await;
                    events.push(expect("document.deleted", &t.id, Some(&old), None));
                }
            }
        }
    }
    let gone = &twins[0];
    let last = app.twin(&user.token, &gone.id).await;
    delete_twin(&app, &user, &gone.id).await;
    expected
        .get_mut(&gone.id)
        .expect("the twin's events")
        .push(expect("twin.deleted", &gone.id, Some(&last), None));

    drained(&store).await;
    let mut per_twin: HashMap<String, Vec<Expected>> = HashMap::new();
    for e in contents(&user.id, &feed(app.js(), &user.id).await) {
        per_twin.entry(e.1.clone()).or_default().push(e);
    }
    for (twin, events) in &expected {
        let seen = per_twin.remove(twin).unwrap_or_default();
        let kinds = |e: &[Expected]| e.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            kinds(&seen),
            kinds(events),
            "kinds of twin {twin}, seed {seed}"
        );
        if let Some(i) = (0..seen.len()).find(|&i| seen[i] != events[i]) {
            panic!(
                "event {i} of twin {twin} (seed {seed}):\n seen     {:?}\n expected {:?}",
                seen[i], events[i]
            );
        }
    }
    assert!(per_twin.is_empty(), "events of other twins: {per_twin:?}");
}

/// Changes of every kind but states, committed while the relay is held at `point`;
/// the events they must make.
async fn changes(app: &TestApp, user: &User) -> Vec<Expected> {
    let mut expected = Vec::new();
    let created = app
        .create_twin(&user.token, &json!({"name": "first"}))
        .await;
    let id = id_of(&created);
    expected.push(expect("twin.created", &id, None, Some(&created)));
    let updated = update_twin(app, user, &id, json!({"name": "second"})).await;
    expected.push(expect("twin.updated", &id, Some(&created), Some(&updated)));
    let doc = write_document(app, user, Method::PUT, &id, "d", json!({"k": 1})).await;
    expected.push(expect("document.put", &id, None, Some(&doc)));
    let other = app
        .create_twin(&user.token, &json!({"name": "other"}))
        .await;
    let other_id = id_of(&other);
    expected.push(expect("twin.created", &other_id, None, Some(&other)));
    delete_twin(app, user, &other_id).await;
    expected.push(expect("twin.deleted", &other_id, Some(&other), None));
    expected
}

/// Kills the service (SIGKILL) where its relay is held, restarts it, and finds every
/// committed change's event on the stream exactly once.
async fn killed_at(point: &str) {
    let app = TestApp::builder()
        .process()
        .var("TWINS_TEST_HOLD_AT", point)
        .var("MG_TWINS_INGEST_LEASE", "2s")
        .spawn()
        .await;
    killed_and_restarted(app, point, false).await;
}

/// [`killed_at`] on `app`; with `forgotten`, the instance starts again only once the
/// broker no longer remembers the message ids published before the kill.
async fn killed_and_restarted(mut app: TestApp, point: &str, forgotten: bool) {
    let store = Store::connect(&app.db_url).await.expect("the store");
    let user = User::new();
    let expected = changes(&app, &user).await;
    let held = format!("\"point\":\"{point}\"");
    eventually(
        "the relay held",
        || std::future::ready(app.instances()[0].log_lines()),
        |lines| {
            lines
                .iter()
                .any(|l| l.contains("change feed relay held") && l.contains(&held))
        },
    )
    .await;
    app.instance().kill().await;
    app.take_instance(0);
    if forgotten {
        window_passed(app.js()).await;
    }
    app.set_var("TWINS_TEST_HOLD_AT", "");
    app.start().await;
    drained(&store).await;
    let seen = feed(app.js(), &user.id).await;
    assert_eq!(per_twin(contents(&user.id, &seen)), per_twin(expected));
    app.stop().await;
}

/// Returns once the feed stream's duplicate window has passed for everything published
/// before the call: a marker published now is stored again under its message id.
async fn window_passed(js: &jetstream::Context) {
    let marker = unique("marker-");
    let publish = || {
        let js = js.clone();
        let marker = marker.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", marker.as_str());
            let subject = format!("twins.events.{}.marker.twin.updated", owner_key(&marker));
            js.publish_with_headers(subject, headers, "{}".into())
                .await
                .expect("a publish")
                .await
                .expect("an acknowledgement")
                .duplicate
        }
    };
    assert!(!publish().await, "the marker is new");
    eventually("the broker forgetting the marker's id", publish, |dup| !dup).await;
}

/// A relay killed after the stream acknowledged an event and started again after the
/// stream's duplicate window: the event is still stored once (the relay finds it on the
/// stream instead of counting on the window).
async fn a_kill_after_publishing_duplicates_nothing_after_the_window() {
    // A broker of the test's own: the shared stream's window is never changed.
    let app = TestApp::builder()
        .process()
        .own_broker()
        .var("TWINS_TEST_HOLD_AT", "feed-after-publish")
        .var("MG_TWINS_INGEST_LEASE", "2s")
        .var("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "1s")
        .spawn()
        .await;
    killed_and_restarted(app, "feed-after-publish", true).await;
}

async fn a_kill_before_publishing_loses_nothing() {
    killed_at("feed-before-publish").await;
}

async fn a_kill_after_publishing_duplicates_nothing() {
    killed_at("feed-after-publish").await;
}

async fn a_broker_outage_loses_no_event() {
    let mut app = TestApp::builder().own_broker().spawn().await;
    let store = Store::connect(&app.db_url).await.expect("the store");
    let user = User::new();
    let mut expected = changes(&app, &user).await;
    drained(&store).await;
    app.stop_broker();
    // Committed while the broker is away: kept in the outbox.
    expected.extend(changes(&app, &user).await);
    assert!(store.outbox.backlog().await.expect("backlog") > 0);
    app.restart_broker().await;
    drained(&store).await;
    let seen = feed(app.js(), &user.id).await;
    assert_eq!(per_twin(contents(&user.id, &seen)), per_twin(expected));
}

/// MongoDB records an event before its change and marks it ready after: an entry left
/// unready by a process that died is settled by its check once it is old enough, and a
/// younger one holds back the events after it.
mod settling {
    use super::*;

    async fn unready_entries_are_settled_by_their_change() {
        use bson::doc;
        use twins::domain::feed::{ChangeEvent, EventKind};
        use twins::store::OutboxEvent;

        let (url, db) = common::backend::mongodb_database();
        let store = Store::connect(&url).await.expect("the store");
        let twin = twins::domain::twin::Twin {
            owner: "o".into(),
            id: uuid::Uuid::new_v4().to_string(),
            name: "t".into(),
            revision: 0,
            created: chrono::Utc::now(),
            updated: chrono::Utc::now(),
            definitions: Vec::new(),
            metadata: serde_json::Map::new(),
        };
        let event = |n: i64| {
            OutboxEvent::new(
                "o",
                ChangeEvent {
                    kind: EventKind::TwinUpdated,
                    twin_id: twin.id.clone(),
                    time: chrono::Utc::now(),
                    old: None,
                    new: Some(json!({ "n": n })),
                },
            )
        };
        let made = event(0);
        store
            .twins
            .save_recorded(&twin, std::slice::from_ref(&made))
            .await
            .expect("saved");
        let entry = |id: i64, e: &OutboxEvent, ready: bool, age_s: i64| {
            doc! {
                "_id": id,
                "msg_id": &e.msg_id,
                "owner": "o",
                "payload": e.payload().expect("payload"),
                "ready": ready,
                "at": bson::DateTime::from_millis(
                    chrono::Utc::now().timestamp_millis() - age_s * 1_000,
                ),
                "check": { "collection": "twins", "marked": { "id": &twin.id } },
            }
        };
        // The change of `made` is in the twin's record; that of `lost` never happened.
        let (lost, young, after) = (event(1), event(2), event(3));
        db.collection::<bson::Document>("feed_outbox")
            .insert_many([
                entry(1_000_001, &made, false, 300),
                entry(1_000_002, &lost, false, 300),
                entry(1_000_003, &young, false, 0),
                entry(1_000_004, &after, true, 0),
            ])
            .await
            .expect("entries");
        let pending: Vec<String> = store
            .outbox
            .pending(100)
            .await
            .expect("pending")
            .into_iter()
            .map(|e| e.msg_id)
            .collect();
        assert_eq!(pending, [made.msg_id.clone(), made.msg_id.clone()]);
        // The lost one is gone, the young one and the one after it wait.
        assert_eq!(store.outbox.backlog().await.expect("backlog"), 4);
    }

    crate::backend_matrix!(only_mongodb: unready_entries_are_settled_by_their_change);
}

/// The relay's look at the stream when it (re)starts: the message ids of the events
/// received from a time on, or of the latest ones when there are more than it reads.
#[tokio::test]
async fn the_stream_scan_finds_the_ids_received_since_a_time_or_the_latest() {
    use twins::broker::feed::{FeedRetention, ensure_feed_stream};
    use twins::broker::relay::StreamPublisher;
    use twins::domain::feed::{ChangeEvent, EventKind};
    use twins::service::outbox::FeedPublisher;
    use twins::store::{OutboxEntry, OutboxEvent};

    let nats = common::servers::Nats::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("NATS"));
    let retention = FeedRetention {
        max_age: std::time::Duration::from_secs(3600),
        duplicate_window: std::time::Duration::from_secs(60),
    };
    ensure_feed_stream(&js, retention)
        .await
        .expect("the feed stream");
    let publisher = StreamPublisher::new(js, retention);
    let before = chrono::Utc::now() - chrono::Duration::seconds(60);
    let mut ids = Vec::new();
    for n in 0..5 {
        let event = OutboxEvent::new(
            "scan",
            ChangeEvent {
                kind: EventKind::StateCreated,
                twin_id: "t".into(),
                time: chrono::Utc::now(),
                old: None,
                new: Some(json!({ "n": n })),
            },
        );
        let entry = OutboxEntry::of(n, &event).expect("an entry");
        publisher.publish(&entry).await.expect("published");
        ids.push(event.msg_id);
    }
    let found = |since, limit| {
        let publisher = &publisher;
        async move { publisher.stored_since(since, limit).await.expect("a scan") }
    };
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(found(before, 100).await, all);
    let latest: HashSet<String> = ids[2..].iter().cloned().collect();
    assert_eq!(found(before, 3).await, latest);
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    assert!(found(later, 100).await.is_empty());
}

crate::backend_matrix!(
    every_kind_of_change_produces_exactly_one_event,
    events_follow_the_changes_in_order_per_twin,
    a_kill_before_publishing_loses_nothing,
    a_kill_after_publishing_duplicates_nothing,
    a_kill_after_publishing_duplicates_nothing_after_the_window,
    a_broker_outage_loses_no_event,
);
