//! Several instances of one group on one shared store and Redis (SPEC section 13),
//! started by [`Cluster`]: every message applied exactly once and in order while HTTP
//! requests go to every instance and the ingesting one is killed; a twin changed through
//! one instance seen at once by the ingestion of all; conditional document writes racing
//! across instances letting exactly one win; and the warning a single-instance
//! configuration logs when another live instance shares its group.
//!
//! The cluster scenarios run on the stores that several instances can share
//! (`mongodb::<name>`, `mongodb_replica_set::<name>`, `postgres::<name>`, see
//! `common::backend`).

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::cluster::{Cluster, find_message};
use common::stream::{self, DELTA, Oracle, PROGRESS, T0, messages};
use common::*;
use twins::domain::PageRequest;
use twins::store::Store;

/// Creates `n` twins, each listening on a channel of its own, through the instances in
/// turn; (twin id, channel).
async fn streaming_twins(c: &Cluster, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ch = unique("m");
        let id = c
            .create_on(c.pick(), &listening(&[attribute("v", &ch, "", true)]))
            .await;
        out.push((id, ch));
    }
    out
}

/// What the HTTP load saw.
#[derive(Debug, Default)]
struct Load {
    /// Answers per instance (by base URL index).
    answered: Vec<usize>,
    /// Requests that could not reach an instance (it was killed or stopped).
    unreachable: usize,
}

/// Requests of every kind spread over the instances until `stop`: reads of the streaming
/// twins and their states, and writes of twins and documents of their own. Fails the
/// test on any answer but the expected one.
fn http_load(
    urls: Vec<String>,
    streaming: Vec<String>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(async move {
        let client = client();
        let mut load = Load {
            answered: vec![0; urls.len()],
            ..Load::default()
        };
        let mut own: Vec<String> = Vec::new();
        let mut k = 0usize;
        while !stop.is_cancelled() {
            let i = k % urls.len();
            let base = &urls[i];
            let at = |path: &str| format!("{base}{path}");
            let twin = &streaming[k % streaming.len()];
            let (req, expected) = match k % 5 {
                0 => (client.get(at(&format!("/twins/{twin}"))), StatusCode::OK),
                1 => (
                    client.get(at(&format!("/states/{twin}?limit=5"))),
                    StatusCode::OK,
                ),
                2 => (
                    client
                        .post(at("/twins"))
                        .json(&json!({"name": format!("by{k}")})),
                    StatusCode::CREATED,
                ),
                3 if !own.is_empty() => (
                    client
                        .put(at(&format!("/twins/{}", own[k % own.len()])))
                        .json(&json!({"metadata": {"k": k}})),
                    StatusCode::OK,
                ),
                _ if !own.is_empty() => (
                    client
                        .patch(at(&format!("/twins/{}/documents/d", own[k % own.len()])))
                        .json(&json!({"data": {format!("k{k}"): k}})),
                    StatusCode::OK,
                ),
                _ => (client.get(at("/twins")), StatusCode::OK),
            };
            k += 1;
            match req.bearer_auth(ALICE).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.text().await.unwrap_or_default();
                    // A document's first write creates it.
                    let created_doc = status == StatusCode::CREATED && expected == StatusCode::OK;
                    assert!(
                        status == expected || created_doc,
                        "instance {i} answered {status}, expected {expected}: {body}"
                    );
                    if expected == StatusCode::CREATED
                        && let Ok(v) = serde_json::from_str::<Value>(&body)
                    {
                        own.push(id_of(&v));
                    }
                    load.answered[i] += 1;
                }
                Err(e) if e.is_connect() || e.is_request() => load.unreachable += 1,
                Err(e) => panic!("instance {i}: {e}"),
            }
        }
        load
    })
}

/// How an instance is taken out of the cluster.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Stop,
}

/// `instances` instances ingest a stream to many twins while HTTP requests go to all of
/// them; at each share of the stream in `faults`, the instance ingesting then is taken
/// out. Every twin ends with exactly the oracle's states.
async fn every_message_once_in_order(instances: usize, faults: &[(f64, Fault)]) {
    let mut c = Cluster::start(instances).await;
    let twins = streaming_twins(&c, 40).await;
    c.app.wait_ingesting().await;
    let total = 6_000;
    let all = messages(&twins, 0..total);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);

    let stop = CancellationToken::new();
    let ids = twins.iter().map(|(id, _)| id.clone()).collect();
    let load = http_load(c.urls(), ids, stop.clone());
    let publishing = stream::publish_in_background(&c.app, &all).await;
    for &(share, fault) in faults {
        stream::wait_progress(&c.app, &publishing, (total as f64 * share) as u64).await;
        let holder = c.holder().await;
        match fault {
            Fault::Kill => c.kill(holder).await,
            Fault::Stop => c.stop(holder).await,
        }
    }
    let last = publishing.finished().await;
    stream::wait_applied(&c.app, last, PROGRESS).await;
    stop.cancel();
    let load = load.await.expect("HTTP load");
    assert!(
        load.answered.iter().all(|&n| n > 0),
        "every instance answered requests: {load:?}"
    );
    stream::assert_matches(&c.app, &oracle).await;
}

async fn two_instances_apply_every_message_once_when_the_ingesting_one_is_killed() {
    every_message_once_in_order(2, &[(0.3, Fault::Kill)]).await;
}

async fn three_instances_apply_every_message_once_through_a_kill_and_a_stop() {
    every_message_once_in_order(3, &[(0.25, Fault::Kill), (0.6, Fault::Stop)]).await;
}

/// A definition of one persisted attribute `name` on `channel`.
fn definition_of(name: &str, channel: &str) -> Value {
    json!({"definition": {"attributes": [attribute(name, channel, "", true)], "delta": DELTA}})
}

/// A record `value` at `T0 + seconds`, far enough apart to open a state each time.
fn record(value: u64, seconds: u64) -> Value {
    json!([{"n": "x", "v": value, "t": T0 + seconds as f64}])
}

/// `{name: value}`.
fn payload(name: &str, value: u64) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(name.to_owned(), json!(value));
    Value::Object(map)
}

/// The twin is updated through each instance in turn, twice, and a message published
/// as soon as the update is answered: its state has the new definition. The ingesting
/// instance read the twin for the message before, so a copy kept in its memory would
/// show here whenever the update went through another instance.
async fn updated_through_any_instance(instances: usize) {
    let c = Cluster::start(instances).await;
    let ch = unique("u");
    let twin = c
        .create_on(0, &listening(&[attribute("a", &ch, "", true)]))
        .await;
    c.app.publish(&ch, "", record(0, 0)).await;
    let states = c.app.states_until(&twin, |s| s.len() == 1).await;
    assert_eq!(states[0]["payload"], json!({"a": 0}));
    for round in 1..=2 * instances as u64 {
        let i = usize::try_from(round).expect("round") % instances;
        let name = format!("r{round}");
        let resp = send(
            c.on(i, Method::PUT, &format!("/twins/{twin}"))
                .json(&definition_of(&name, &ch)),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "update through instance {i}");
        c.app.publish(&ch, "", record(round, round * 10)).await;
        let n = usize::try_from(round).expect("round") + 1;
        let states = c.app.states_until(&twin, |s| s.len() >= n).await;
        assert_eq!(states.len(), n, "one state per message: {states:#?}");
        let last = &states[n - 1];
        assert_eq!(
            (&last["definition"], &last["payload"]),
            (&json!(round), &payload(&name, round)),
            "round {round}, updated through instance {i}: {states:#?}"
        );
    }
}

async fn a_twin_updated_through_one_of_two_instances_is_seen_at_once() {
    updated_through_any_instance(2).await;
}

async fn a_twin_updated_through_one_of_three_instances_is_seen_at_once() {
    updated_through_any_instance(3).await;
}

/// A twin per instance, each read by the ingesting instance (a message lands), then
/// deleted through that instance, with a message on its channel published as soon as
/// the deletion is answered: no state is written for a deleted twin.
async fn deleted_through_any_instance(instances: usize) {
    let c = Cluster::start(instances).await;
    let marker = Marker::new();
    let watcher = c.create_on(0, &listening(&[marker.attribute()])).await;
    let mut doomed = Vec::new();
    for i in 0..instances {
        let ch = unique("d");
        let id = c
            .create_on(
                (i + 1) % instances,
                &listening(&[attribute("v", &ch, "", true)]),
            )
            .await;
        c.app.publish(&ch, "", record(0, 0)).await;
        c.app.states_until(&id, |s| s.len() == 1).await;
        doomed.push((id, ch));
    }
    for (i, (id, ch)) in doomed.iter().enumerate() {
        let resp = send(c.on(i, Method::DELETE, &format!("/twins/{id}"))).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "delete through {i}");
        c.app.publish(ch, "", record(1, 10)).await;
    }
    // Everything published before the marker has been applied once it has.
    c.app.states_before(&watcher, &marker).await;
    let store = Store::connect(&c.app.db_url).await.expect("the store");
    for (id, _) in &doomed {
        let states = store
            .states
            .list(id, PageRequest::default())
            .await
            .expect("states");
        assert_eq!(states.total, 0, "states of deleted twin {id}: {states:?}");
    }
}

async fn twins_deleted_through_either_of_two_instances_get_no_more_states() {
    deleted_through_any_instance(2).await;
}

async fn twins_deleted_through_any_of_three_instances_get_no_more_states() {
    deleted_through_any_instance(3).await;
}

/// Rounds of conditional writes of one document raced over every instance, half with
/// `If-Match`, half with the version in the body, and a conditional delete among them:
/// each round exactly one wins, every other answers 409 with the stored version.
async fn conditional_document_writes_race(instances: usize) {
    let c = Cluster::start(instances).await;
    let twin = c.create_on(0, &json!({"name": "doc-holder"})).await;
    let path = format!("/twins/{twin}/documents/d");
    let resp = send(c.on(0, Method::PUT, &path).json(&json!({"data": {}}))).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let mut version = 1;
    for round in 0..6 {
        let racers = (0..30).map(|k| {
            let req = if round % 3 == 2 && k == 7 {
                c.any(Method::DELETE, &format!("{path}?version={version}"))
            } else if k % 2 == 0 {
                c.any(Method::PATCH, &path)
                    .header("If-Match", format!("\"{version}\""))
                    .json(&json!({"data": {format!("r{round}k{k}"): k}}))
            } else {
                c.any(Method::PATCH, &path)
                    .json(&json!({"version": version, "data": {format!("r{round}k{k}"): k}}))
            };
            send(req)
        });
        let answers = futures::future::join_all(racers).await;
        let mut won = Vec::new();
        for resp in answers {
            let status = resp.status();
            let body = json_of_or_empty(resp).await;
            if status.is_success() {
                won.push(status);
            } else {
                assert_eq!(status, StatusCode::CONFLICT, "round {round}: {body}");
                assert_eq!(body["expected_version"], json!(version), "{body}");
                assert_ne!(body["actual_version"], json!(version), "{body}");
            }
        }
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        if won[0] == StatusCode::NO_CONTENT {
            // Deleted: the next round starts from a new document.
            let resp = send(c.any(Method::PUT, &path).json(&json!({"data": {}}))).await;
            assert_eq!(resp.status(), StatusCode::CREATED);
            version = 1;
        } else {
            version += 1;
        }
        let doc = json_of(send(c.any(Method::GET, &path)).await).await;
        assert_eq!(doc["version"], json!(version), "round {round}");
    }
}

/// The JSON body of a response, or null when it has none (204).
async fn json_of_or_empty(resp: reqwest::Response) -> Value {
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn conditional_document_writes_across_two_instances_let_one_win() {
    conditional_document_writes_race(2).await;
}

async fn conditional_document_writes_across_three_instances_let_one_win() {
    conditional_document_writes_race(3).await;
}

/// Several instances with a shared store and Redis do not warn: the configuration is
/// made for it.
async fn a_shared_store_and_redis_do_not_warn() {
    let c = Cluster::with(2, |b| b.var("MG_TWINS_LOG_LEVEL", "debug")).await;
    c.log_line(1, "other live instances share the instance group")
        .await;
    for i in 0..2 {
        assert!(
            find_message(&c.logs(i), "single-instance").is_none(),
            "instance {i}: {:#?}",
            c.logs(i)
        );
    }
}

macro_rules! shared_stores {
    ($($test:ident),* $(,)?) => {
        $crate::backend_matrix!(@module mongodb, MongoDb, $($test),*);
        $crate::backend_matrix!(@module mongodb_replica_set, MongoDbReplicaSet, $($test),*);
        $crate::backend_matrix!(@module postgres, Postgres, $($test),*);
    };
}

shared_stores!(
    two_instances_apply_every_message_once_when_the_ingesting_one_is_killed,
    three_instances_apply_every_message_once_through_a_kill_and_a_stop,
    a_twin_updated_through_one_of_two_instances_is_seen_at_once,
    a_twin_updated_through_one_of_three_instances_is_seen_at_once,
    twins_deleted_through_either_of_two_instances_get_no_more_states,
    twins_deleted_through_any_of_three_instances_get_no_more_states,
    conditional_document_writes_across_two_instances_let_one_win,
    conditional_document_writes_across_three_instances_let_one_win,
    a_shared_store_and_redis_do_not_warn,
);

// ------------------------------------------------------------ single-instance warning

/// The warning a single-instance configuration logs when it is not alone.
const WARNING: &str = "this configuration is single-instance";

#[tokio::test]
async fn a_second_sqlite_instance_on_the_group_warns_that_it_is_single_instance() {
    let mut c = Cluster::with(1, |b| {
        b.var("MG_TWINS_CACHE_URL", "")
            .var("MG_TWINS_LOG_LEVEL", "debug")
    })
    .await;
    // Alone: it asked, nobody answered, and it did not warn.
    c.log_line(0, "no other live instance in the instance group")
        .await;
    assert!(
        find_message(&c.logs(0), WARNING).is_none(),
        "{:#?}",
        c.logs(0)
    );

    // A second process of the group (its own SQLite file would do the same).
    c.app.start().await;
    let line = c.log_line(1, WARNING).await;
    assert_eq!(line["level"], "WARN", "{line}");
    let message = line["fields"]["message"].as_str().unwrap_or_default();
    for part in [
        "SQLite store",
        "in-process cache",
        "MG_TWINS_INSTANCE_GROUP",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    // The first one is told too, when the second one asks.
    c.log_line(0, WARNING).await;
    // Stopping cleanly is unaffected.
    c.stop(1).await;
}
