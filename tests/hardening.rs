//! Limits and behaviours that hold whatever clients send or however many send it at
//! once: contention on one twin, the definitions a twin keeps, made-up methods against
//! the metric labels.

mod common;

use reqwest::Method;
use serde_json::{Value, json};

use common::*;

crate::backend_matrix!(
    concurrent_definition_appends_all_land,
    concurrent_unconditional_patches_all_land,
    appending_beyond_the_definitions_limit_is_413,
    made_up_methods_add_no_metric_series,
);

const WRITERS: usize = 50;

async fn concurrent_definition_appends_all_land() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({"name": "busy"})).await;
    let puts = (0..WRITERS).map(|i| {
        let (app, id) = (&app, &id);
        async move {
            let body = json!({"definition": {"attributes": [
                {"name": format!("a{i}"), "channel": format!("c{i}"), "persist_state": true}
            ]}});
            app.put_twin(ALICE, id, &body).await.status()
        }
    });
    let statuses = futures::future::join_all(puts).await;
    assert!(
        statuses.iter().all(|s| s.is_success()),
        "every unconditional append succeeds: {statuses:?}"
    );
    let twin = app.twin(ALICE, &id).await;
    assert_eq!(twin["revision"], json!(WRITERS));
    let definitions = twin["definitions"].as_array().expect("definitions");
    assert_eq!(
        definitions.len(),
        WRITERS + 1,
        "the first one and one per writer"
    );
    let mut names: Vec<&str> = definitions[1..]
        .iter()
        .map(|d| d["attributes"][0]["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    let mut expected: Vec<String> = (0..WRITERS).map(|i| format!("a{i}")).collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "each writer's definition once");
}

async fn concurrent_unconditional_patches_all_land() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({"name": "busy"})).await;
    let path = format!("/twins/{id}/documents/desired");
    let patches = (0..WRITERS).map(|i| {
        let (app, path) = (&app, &path);
        async move {
            app.authed(Method::PATCH, path, ALICE)
                .json(&json!({"data": {format!("k{i}"): i}}))
                .send()
                .await
                .expect("PATCH")
                .status()
        }
    });
    let statuses = futures::future::join_all(patches).await;
    assert!(
        statuses.iter().all(|s| s.is_success()),
        "every unconditional patch succeeds: {statuses:?}"
    );
    let doc: Value = app.get(&path, ALICE).await.json().await.expect("document");
    assert_eq!(doc["version"], json!(WRITERS));
    let expected: serde_json::Map<String, Value> =
        (0..WRITERS).map(|i| (format!("k{i}"), json!(i))).collect();
    assert_eq!(doc["data"], Value::Object(expected));
}

async fn appending_beyond_the_definitions_limit_is_413() {
    let app = TestApp::builder()
        .var("MG_TWINS_MAX_DEFINITIONS", "3")
        .spawn()
        .await;
    let id = app.create_id(ALICE, &json!({"name": "model"})).await;
    let append = |i: usize| {
        json!({"definition": {"attributes": [
            {"name": "temp", "channel": format!("c{i}"), "persist_state": true}
        ]}})
    };
    for i in 1..3 {
        let res = app.put_twin(ALICE, &id, &append(i)).await;
        assert_eq!(res.status(), 200, "definition {i} fits");
    }
    let res = app.put_twin(ALICE, &id, &append(3)).await;
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.expect("JSON error");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 3 definitions")),
        "{body}"
    );
    let twin = app.twin(ALICE, &id).await;
    assert_eq!(twin["definitions"].as_array().map(Vec::len), Some(3));
    let res = app.put_twin(ALICE, &id, &json!({"name": "renamed"})).await;
    assert_eq!(res.status(), 200, "other changes still apply");
}

/// Series of the HTTP request counter in a `/metrics` text.
fn request_series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("twins_http_requests_total{"))
        .count()
}

async fn made_up_methods_add_no_metric_series() {
    let app = spawn_app().await;
    for i in 0..3 {
        let method = Method::from_bytes(format!("WARMUP{i}").as_bytes()).expect("method");
        app.request(method, "/twins").send().await.expect("request");
    }
    let before = request_series(&app.metrics().await);
    for i in 0..100 {
        let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let res = app.request(method, "/twins").send().await.expect("request");
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    let metrics = app.metrics().await;
    // Other tests of this binary share the process-wide recorder and may add series of
    // their own routes meanwhile, but never 100.
    assert!(
        request_series(&metrics) < before + 20,
        "100 made-up methods added series: {before} before, {} after",
        request_series(&metrics)
    );
    assert!(
        metrics.contains("method=\"other\""),
        "made-up methods are counted as other"
    );
}
