//! What only the MongoDB backend shows from outside: data exactly as the Go service wrote
//! it, served, filtered, updated and fed through the API and ingestion; corrupt data; and
//! a store that stops answering. Runs on the server of `TWINS_TEST_MONGODB_URL` (see
//! `common::backend`), each test on a database of its own.

mod common;

use bson::{Bson, Document, doc};
use reqwest::{Method, StatusCode};
use serde_json::json;
use twins::broker;
use twins::domain::time::{format, from_nanos};

use common::backend;
use common::proxy::Proxy;
use common::*;

crate::backend_matrix!(only_mongodb:
    go_written_twins_and_states_are_served_filtered_updated_and_fed,
    corrupt_go_data_is_500_without_the_cause,
    an_unreachable_store_shows_no_internals,
    documents_from_before_revisions_keep_their_version_in_history,
);

/// 2020-05-05T08:41:39.142Z, as in the Go service's documentation.
const T0_MS: i64 = 1_588_668_099_142;

fn date(ms: i64) -> Bson {
    Bson::DateTime(bson::DateTime::from_millis(ms))
}

fn time_of(ms: i64) -> String {
    format(&from_nanos(ms * 1_000_000))
}

/// `d` with its keys in a random order: the Go driver writes a map in Go's map iteration
/// order, which is random.
fn shuffled(d: Document) -> Document {
    let mut entries: Vec<(String, Bson)> = d.into_iter().collect();
    for i in (1..entries.len()).rev() {
        let j = (uuid::Uuid::new_v4().as_u128() % (i as u128 + 1)) as usize;
        entries.swap(i, j);
    }
    entries.into_iter().collect()
}

/// An attribute as the Go service stores it (`persiststate`, no underscore).
fn go_attribute(name: &str, channel: &str, subtopic: &str, persist: bool) -> Bson {
    Bson::Document(doc! {
        "name": name, "channel": channel, "subtopic": subtopic, "persiststate": persist,
    })
}

/// A twin as the Go service writes it: Go `int` fields (revision, definition ids) as
/// Int32, `delta` as Int64, metadata numbers as doubles, nil slices and maps as null, an
/// `_id` from the driver, and no index but `_id`'s.
fn go_twin(owner: &str, id: &str, name: &str, channel: &str) -> Document {
    shuffled(doc! {
        "owner": owner,
        "id": id,
        "name": name,
        "created": date(T0_MS),
        "updated": date(T0_MS + 60_000),
        "revision": 2_i32,
        "definitions": [
            { "id": 0_i32, "created": date(T0_MS), "attributes": Bson::Null, "delta": 1_000_000_i64 },
            {
                "id": 1_i32,
                "created": date(T0_MS + 60_000),
                "attributes": [
                    go_attribute("temperature", channel, "engine", true),
                    go_attribute("rpm", channel, "engine", false),
                ],
                "delta": 1_000_000_000_i64,
            },
        ],
        "metadata": shuffled(doc! {
            "site": "plant-1", "floor": 2.0, "ratio": 0.5, "tags": ["a", 3.0],
            "loc": shuffled(doc! { "x": 1.0, "y": 2.0 }),
        }),
    })
}

/// A twin the Go service created with no definition and no metadata.
fn go_bare_twin(owner: &str, id: &str) -> Document {
    shuffled(doc! {
        "owner": owner,
        "id": id,
        "name": "",
        "created": date(T0_MS),
        "updated": date(T0_MS),
        "revision": 0_i32,
        "definitions": [
            { "id": 0_i32, "created": date(T0_MS), "attributes": Bson::Null, "delta": 1_000_000_i64 },
        ],
        "metadata": Bson::Null,
    })
}

/// A state as the Go service writes it: Int64 id, Int32 definition, SenML values as
/// doubles.
fn go_state(twin_id: &str, id: i64, temperature: f64) -> Document {
    doc! {
        "twinid": twin_id,
        "id": id,
        "definition": 1_i32,
        "created": date(T0_MS + id * 60_000),
        "payload": { "temperature": temperature },
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The app on the Go service's database at `db_url`.
async fn app_on(db_url: &str) -> TestApp {
    TestApp::builder().database(db_url).spawn().await
}

async fn raw(db: &::mongodb::Database, collection: &str, filter: Document) -> Document {
    db.collection::<Document>(collection)
        .find_one(filter.clone())
        .await
        .expect("raw read")
        .unwrap_or_else(|| panic!("no {collection} document {filter}"))
}

async fn go_written_twins_and_states_are_served_filtered_updated_and_fed() {
    let (url, db) = backend::mongodb_database();
    let (a, bare, foreign) = (new_id(), new_id(), new_id());
    let (channel, other_channel) = (new_id(), new_id());
    db.collection::<Document>("twins")
        .insert_many([
            go_twin(ALICE_ID, &a, "grinder", &channel),
            go_bare_twin(ALICE_ID, &bare),
            go_twin(BOB_ID, &foreign, "not alice's", &channel),
        ])
        .await
        .expect("Go twins written");
    db.collection::<Document>("states")
        .insert_many((0..3).map(|i| go_state(&a, i, 70.0 + i as f64)))
        .await
        .expect("Go states written");
    let app = app_on(&url).await;

    // Read: Int32 and Int64 fields, null slices and maps, doubles served as Go did.
    let attribute = |name: &str, persist: bool| json!({"name": name, "channel": channel, "subtopic": "engine", "persist_state": persist});
    assert_eq!(
        app.twin(ALICE, &a).await,
        json!({
            "owner": ALICE_ID, "id": a, "name": "grinder", "revision": 2,
            "created": time_of(T0_MS), "updated": time_of(T0_MS + 60_000),
            "definitions": [
                {"id": 0, "created": time_of(T0_MS), "attributes": [], "delta": 1_000_000},
                {
                    "id": 1, "created": time_of(T0_MS + 60_000),
                    "attributes": [attribute("temperature", true), attribute("rpm", false)],
                    "delta": 1_000_000_000,
                },
            ],
            "metadata": {"site": "plant-1", "floor": 2, "ratio": 0.5, "tags": ["a", 3], "loc": {"x": 1, "y": 2}},
        })
    );
    let b = app.twin(ALICE, &bare).await;
    assert_eq!(b["metadata"], json!({}));
    assert_eq!(b["definitions"][0]["attributes"], json!([]));
    let resp = app.get(&format!("/twins/{foreign}"), ALICE).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // List and filter.
    let listed = app.list_twins(ALICE, &[]).await;
    assert_eq!(listed["total"], 2);
    let ids: Vec<&str> = listed["twins"]
        .as_array()
        .expect("twins")
        .iter()
        .map(|t| t["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [a.as_str(), bare.as_str()], "in insertion order");
    for (filter, want) in [
        (json!({"floor": 2}), 1),
        (json!({"floor": 2.0, "site": "plant-1"}), 1),
        (json!({"tags": ["a", 3]}), 1),
        (json!({"loc": {"y": 2, "x": 1}}), 1),
        (json!({"ratio": 0.5}), 1),
        (json!({"floor": 2.5}), 0),
        (json!({"nothing": null}), 0),
    ] {
        let page = app
            .list_twins(ALICE, &[("metadata", &filter.to_string())])
            .await;
        assert_eq!(page["total"], want, "metadata={filter}");
    }

    // States: ids and values as the Go service served them.
    let states = app.list_states(ALICE, &a, &[]).await;
    assert_eq!(states["total"], 3);
    assert_eq!(
        states["states"][2],
        json!({
            "twin_id": a, "id": 2, "definition": 1, "created": time_of(T0_MS + 120_000),
            "payload": {"temperature": 72},
        })
    );

    // Update, and what it leaves for the Go service to read.
    let resp = app.put_twin(ALICE, &a, &json!({"name": "renamed"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_of(resp).await["revision"], 3);
    let stored = raw(&db, "twins", doc! { "id": &a }).await;
    assert_eq!(stored.get("revision"), Some(&Bson::Int32(3)));
    assert_eq!(stored.get_str("name").ok(), Some("renamed"));
    let definition = stored.get_array("definitions").expect("definitions")[1].clone();
    assert_eq!(
        definition.as_document().and_then(|d| d.get("delta")),
        Some(&Bson::Int64(1_000_000_000))
    );
    let resp = app
        .put_twin(
            ALICE,
            &bare,
            &json!({"metadata": {"k": "v"}, "definition": {"attributes": [
                {"name": "x", "channel": other_channel, "subtopic": "", "persist_state": true},
            ]}}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let b = json_of(resp).await;
    assert_eq!(
        (&b["revision"], &b["metadata"]),
        (&json!(1), &json!({"k": "v"}))
    );
    assert_eq!(b["definitions"][1]["id"], 1);

    // Ingestion continues the Go ids: a record an hour later is a new state 3, one within
    // the delta updates it.
    let at = |ms: i64| ms as f64 / 1000.0;
    app.publish(
        &channel,
        "engine",
        json!([{"n": "temperature", "v": 75.5, "t": at(T0_MS + 3_600_000)}]),
    )
    .await;
    app.publish(
        &channel,
        "engine",
        json!([{"n": "temperature", "v": 76.0, "t": at(T0_MS + 3_600_500)}]),
    )
    .await;
    let states = app
        .states_until(&a, |s| s.len() == 4 && s[3]["payload"]["temperature"] == 76)
        .await;
    assert_eq!(
        states[3],
        json!({
            "twin_id": a, "id": 3, "definition": 1, "created": time_of(T0_MS + 3_600_000),
            "payload": {"temperature": 76},
        })
    );
    let stored = raw(&db, "states", doc! { "twinid": &a, "id": 3_i64 }).await;
    assert_eq!(stored.get("id"), Some(&Bson::Int64(3)));
    assert_eq!(stored.get("definition"), Some(&Bson::Int32(1)));
    app.publish(&other_channel, "", json!([{"v": 1}])).await;
    let states = app.states_until(&bare, |s| s.len() == 1).await;
    assert_eq!(states[0]["payload"], json!({"x": 1}));

    // Delete takes the Go states along.
    let resp = app.delete_twin(ALICE, &a).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let left = db
        .collection::<Document>("states")
        .count_documents(doc! { "twinid": &a })
        .await
        .expect("count");
    assert_eq!(left, 0);
}

async fn corrupt_go_data_is_500_without_the_cause() {
    let (url, db) = backend::mongodb_database();
    let id = new_id();
    let mut twin = go_bare_twin(ALICE_ID, &id);
    twin.insert("revision", "two");
    db.collection::<Document>("twins")
        .insert_one(twin)
        .await
        .expect("corrupt twin written");
    let app = app_on(&url).await;
    for resp in [
        app.get(&format!("/twins/{id}"), ALICE).await,
        app.get("/twins", ALICE).await,
    ] {
        let message = assert_error(resp, StatusCode::INTERNAL_SERVER_ERROR).await;
        for secret in ["corrupt", "revision", "string", "bson"] {
            assert!(
                !message.to_ascii_lowercase().contains(secret),
                "the cause leaks: {message}"
            );
        }
    }
}

/// Server addresses, topology and driver words that must not reach a client.
fn assert_no_internals(text: &str, proxy: &Proxy) {
    let lower = text.to_ascii_lowercase();
    for secret in [
        "127.0.0.1",
        &proxy.addr.port().to_string(),
        "topology",
        "server selection",
        "kind:",
        "i/o",
        "mongo",
    ] {
        assert!(!lower.contains(secret), "{secret:?} leaks: {text}");
    }
}

async fn an_unreachable_store_shows_no_internals() {
    let (_, db) = backend::mongodb_database();
    let proxy = Proxy::to(&backend::mongodb_address()).await;
    let url = format!(
        "mongodb://{}/{}?directConnection=true&serverSelectionTimeoutMS=1000",
        proxy.addr,
        db.name()
    );
    let app = TestApp::builder()
        .database(url)
        .notifications()
        .spawn()
        .await;
    let notifications = app
        .notifications
        .as_deref()
        .expect("a notification channel");
    let id = app.create_id(ALICE, &json!({"name": "soon away"})).await;
    let mut failures = app
        .subscribe(format!("channels.{notifications}.messages.{id}.*.failure"))
        .await;

    proxy.cut();
    let health = app
        .health_until(|h| {
            // The other fields hold random ids that could contain the port's digits.
            assert_no_internals(&h.body["checks"].to_string(), &proxy);
            h.status == StatusCode::SERVICE_UNAVAILABLE
        })
        .await
        .body;
    assert_eq!(health["status"], "fail", "{health}");
    assert_eq!(health_check(&health, "store"), "unavailable", "{health}");
    // Not ready while the store is away, but alive: an orchestrator stops sending
    // requests and does not restart the process.
    let probe = |path: &'static str| {
        let req = app.request(reqwest::Method::GET, path);
        async move { send(req).await.status() }
    };
    assert_eq!(
        probe("/health/ready").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(probe("/health/live").await, StatusCode::OK);

    let resp = app.get(&format!("/twins/{id}"), ALICE).await;
    let message = assert_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_no_internals(&message, &proxy);
    let resp = app.delete_twin(ALICE, &id).await;
    let message = assert_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_no_internals(&message, &proxy);

    for op in ["get", "remove"] {
        let msg = receive(&mut failures, "failure notification").await;
        assert!(
            msg.subject.ends_with(&format!(".{op}.failure")),
            "{}",
            msg.subject
        );
        let envelope = broker::decode(&msg.payload).expect("envelope");
        let text = String::from_utf8_lossy(&envelope.payload).into_owned();
        assert_no_internals(&text, &proxy);
        assert_eq!(text, "service temporarily unavailable");
    }
}

/// A document record written before revisions were kept (no `revisions`, `op` or `by`)
/// lists its version as written by the service, and the next write keeps it as a
/// revision beside its own.
async fn documents_from_before_revisions_keep_their_version_in_history() {
    let (url, db) = backend::mongodb_database();
    let app = app_on(&url).await;
    let id = app.create_id(ALICE, &json!({})).await;
    db.collection::<Document>("documents")
        .insert_one(doc! {
            "twinid": &id, "name": "panel", "version": 3_i64, "updated": date(T0_MS),
            "data": { "mode": "eco" },
        })
        .await
        .expect("an earlier record written");
    let path = format!("/twins/{id}/documents/panel");
    let earlier = json!({"version": 3, "updated": time_of(T0_MS), "op": "put",
                         "by": {"kind": "service"}});
    let listed = json_of(app.get(&format!("{path}/versions"), ALICE).await).await;
    assert_eq!(listed["versions"], json!([earlier]));

    let resp = send(
        app.authed(Method::PATCH, &path, ALICE)
            .json(&json!({"data": {"armed": true}})),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let written = json_of(resp).await;
    let listed = json_of(app.get(&format!("{path}/versions"), ALICE).await).await;
    assert_eq!(
        listed["versions"],
        json!([{"version": 4, "updated": written["updated"], "op": "patch",
                "by": {"kind": "user", "id": ALICE_ID}}, earlier])
    );
    let resp = app.get_query(&path, ALICE, &[("version", "3")]).await;
    assert_eq!(
        json_of(resp).await,
        json!({"twin_id": id, "document_name": "panel", "version": 3,
               "updated": time_of(T0_MS), "data": {"mode": "eco"}})
    );
    let record = raw(&db, "documents", doc! { "twinid": &id, "name": "panel" }).await;
    assert_eq!(record.get_array("revisions").map(Vec::len).ok(), Some(2));
}
