//! Twin documents over REST and inband over the broker (SPEC section 7).

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::*;

// Every test below runs once per store backend (see `common::backend`).
crate::backend_matrix!(
    put_creates_then_replaces_with_versions_and_etag,
    patch_is_a_json_merge_patch_and_creates_from_empty,
    stale_versions_get_409_with_both_versions,
    delete_with_and_without_version,
    bad_requests_and_foreign_twins,
    deleting_a_twin_deletes_its_documents,
    fifty_concurrent_conditional_patches_exactly_one_wins,
    concurrent_unconditional_patches_on_distinct_keys_lose_nothing,
    delta_shows_what_the_device_has_not_applied,
    openapi_lists_the_document_endpoints,
    inband_get_put_patch_delete_through_the_channel,
    inband_on_an_unbound_channel_gets_an_error_and_no_data,
    inband_request_reply_for_back_end_callers,
    request_reply_is_off_unless_asked_for,
    inband_requests_for_made_up_ids_are_not_answered,
    request_reply_answers_under_its_configured_prefix,
    alarm_panel_desired_current_round_trip,
);

fn doc_path(id: &str, name: &str) -> String {
    format!("/twins/{id}/documents/{name}")
}

async fn put_doc(app: &TestApp, id: &str, name: &str, body: Value) -> reqwest::Response {
    send(
        app.authed(Method::PUT, &doc_path(id, name), ALICE)
            .json(&body),
    )
    .await
}

async fn patch_doc(app: &TestApp, id: &str, name: &str, body: Value) -> reqwest::Response {
    send(
        app.authed(Method::PATCH, &doc_path(id, name), ALICE)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string()),
    )
    .await
}

async fn put_creates_then_replaces_with_versions_and_etag() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;

    let resp = put_doc(&app, &id, "desired", json!({"data": {"armed": true}})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "etag"), "\"1\"");
    let doc = json_of(resp).await;
    assert_eq!(doc["twin_id"], id.as_str());
    assert_eq!(doc["document_name"], "desired");
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["data"], json!({"armed": true}));
    assert_timestamp(&doc["updated"]);

    let resp = put_doc(&app, &id, "desired", json!({"data": {"zones": 2}})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let doc = json_of(resp).await;
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["data"], json!({"zones": 2}), "PUT replaces");

    let resp = app.get(&doc_path(&id, "desired"), ALICE).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "etag"), "\"2\"");
    assert_eq!(json_of(resp).await["data"], json!({"zones": 2}));

    put_doc(&app, &id, "current", json!({"data": {}})).await;
    let list = json_of(app.get(&format!("/twins/{id}/documents"), ALICE).await).await;
    let names: Vec<&str> = list["documents"]
        .as_array()
        .expect("documents array")
        .iter()
        .map(|d| d["document_name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["current", "desired"]);
    assert_eq!(list["documents"][1]["version"], 2);
    assert!(
        list["documents"][1].get("data").is_none(),
        "listing has no data"
    );
}

async fn patch_is_a_json_merge_patch_and_creates_from_empty() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let resp = patch_doc(
        &app,
        &id,
        "d",
        json!({"data": {"a": {"b": 1, "c": 2}, "list": [1, 2]}}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = patch_doc(
        &app,
        &id,
        "d",
        json!({"data": {"a": {"b": null, "d": 3}, "list": [9], "new": "x"}}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let doc = json_of(resp).await;
    assert_eq!(doc["version"], 2);
    assert_eq!(
        doc["data"],
        json!({"a": {"c": 2, "d": 3}, "list": [9], "new": "x"})
    );
    // Plain application/json is accepted for PATCH too.
    let resp = send(
        app.authed(Method::PATCH, &doc_path(&id, "d"), ALICE)
            .json(&json!({"data": {"new": null}})),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        json_of(resp).await["data"],
        json!({"a": {"c": 2, "d": 3}, "list": [9]})
    );
}

async fn stale_versions_get_409_with_both_versions() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    put_doc(&app, &id, "d", json!({"data": {"v": 1}})).await;
    put_doc(&app, &id, "d", json!({"data": {"v": 2}})).await;

    let resp = put_doc(&app, &id, "d", json!({"version": 1, "data": {"v": 3}})).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        json_of(resp).await,
        json!({"error": "document version mismatch", "twin_id": id, "document_name": "d",
               "expected_version": 1, "actual_version": 2})
    );
    let resp = send(
        app.authed(Method::PATCH, &doc_path(&id, "d"), ALICE)
            .header("if-match", "\"1\"")
            .json(&json!({"data": {"v": 3}})),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::CONFLICT,
        "If-Match works like the body version"
    );

    let resp = send(
        app.authed(Method::PATCH, &doc_path(&id, "d"), ALICE)
            .header("if-match", "\"2\"")
            .json(&json!({"data": {"v": 3}})),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "etag"), "\"3\"");

    let resp = send(
        app.authed(Method::PUT, &doc_path(&id, "d"), ALICE)
            .header("if-match", "\"3\"")
            .json(&json!({"version": 2, "data": {}})),
    )
    .await;
    assert_error(resp, StatusCode::BAD_REQUEST).await;

    // Version 0 means "only if absent".
    let resp = put_doc(&app, &id, "fresh", json!({"version": 0, "data": {}})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = put_doc(&app, &id, "fresh", json!({"version": 0, "data": {}})).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        json_of(app.get(&doc_path(&id, "d"), ALICE).await).await["data"],
        json!({"v": 3})
    );
}

async fn delete_with_and_without_version() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    put_doc(&app, &id, "d", json!({"data": {"v": 1}})).await;
    put_doc(&app, &id, "d", json!({"data": {"v": 2}})).await;

    let resp = send(app.authed(
        Method::DELETE,
        &format!("{}?version=1", doc_path(&id, "d")),
        ALICE,
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(json_of(resp).await["actual_version"], 2);
    let resp = send(
        app.authed(Method::DELETE, &doc_path(&id, "d"), ALICE)
            .header("if-match", "\"1\""),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let resp = send(app.authed(
        Method::DELETE,
        &format!("{}?version=x", doc_path(&id, "d")),
        ALICE,
    ))
    .await;
    assert_error(resp, StatusCode::BAD_REQUEST).await;

    let resp = send(app.authed(
        Method::DELETE,
        &format!("{}?version=2", doc_path(&id, "d")),
        ALICE,
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_error(
        app.get(&doc_path(&id, "d"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let resp = send(app.authed(Method::DELETE, &doc_path(&id, "d"), ALICE)).await;
    assert_error(resp, StatusCode::NOT_FOUND).await;

    put_doc(&app, &id, "e", json!({"data": {}})).await;
    let resp = send(app.authed(Method::DELETE, &doc_path(&id, "e"), ALICE)).await;
    assert_eq!(
        resp.status(),
        StatusCode::NO_CONTENT,
        "unconditional delete"
    );
}

async fn bad_requests_and_foreign_twins() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    put_doc(&app, &id, "d", json!({"data": {"secret": 1}})).await;

    // Another user's twin behaves exactly like a missing one.
    for (method, path) in [
        (Method::GET, format!("/twins/{id}/documents")),
        (Method::GET, doc_path(&id, "d")),
        (Method::DELETE, doc_path(&id, "d")),
        (
            Method::GET,
            format!("{}/delta?against=x", doc_path(&id, "d")),
        ),
    ] {
        let resp = send(app.authed(method.clone(), &path, BOB)).await;
        assert_error(resp, StatusCode::NOT_FOUND).await;
    }
    let resp = send(
        app.authed(Method::PUT, &doc_path(&id, "d"), BOB)
            .json(&json!({"data": {}})),
    )
    .await;
    assert_error(resp, StatusCode::NOT_FOUND).await;
    assert_eq!(
        json_of(app.get(&doc_path(&id, "d"), ALICE).await).await["version"],
        1
    );
    let missing = uuid::Uuid::new_v4();
    assert_error(
        app.get(&doc_path(&missing.to_string(), "d"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_error(
        app.get(&doc_path("not-a-uuid", "d"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_error(
        app.get(&doc_path(&id, "absent"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // Names, bodies, sizes and content types.
    let long = "x".repeat(65);
    for name in ["bad.name", "sp%20ace", long.as_str()] {
        let resp = put_doc(&app, &id, name, json!({"data": {}})).await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
    for body in [
        json!({}),
        json!({"data": [1]}),
        json!({"data": 5}),
        json!({"version": "1", "data": {}}),
    ] {
        let resp = put_doc(&app, &id, "d", body.clone()).await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
    let big = json!({"data": {"blob": "x".repeat(64 * 1024)}});
    assert_error(
        put_doc(&app, &id, "d", big.clone()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert_error(
        patch_doc(&app, &id, "d", big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    let resp = send(
        app.authed(Method::PUT, &doc_path(&id, "d"), ALICE)
            .header("content-type", "text/plain")
            .body("{\"data\":{}}"),
    )
    .await;
    assert_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let resp = send(
        app.authed(Method::PUT, &doc_path(&id, "d"), ALICE)
            .header("content-type", "application/merge-patch+json")
            .body("{\"data\":{}}"),
    )
    .await;
    assert_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let resp = send(
        app.authed(Method::PUT, &doc_path(&id, "d"), ALICE)
            .header("if-match", "soon")
            .json(&json!({"data": {}})),
    )
    .await;
    assert_error(resp, StatusCode::BAD_REQUEST).await;
    let resp = send(app.request(Method::GET, &doc_path(&id, "d"))).await;
    assert_error(resp, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        json_of(app.get(&doc_path(&id, "d"), ALICE).await).await["data"],
        json!({"secret": 1})
    );
}

async fn deleting_a_twin_deletes_its_documents() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    put_doc(&app, &id, "d", json!({"data": {}})).await;
    assert_eq!(
        app.delete_twin(ALICE, &id).await.status(),
        StatusCode::NO_CONTENT
    );
    assert!(
        app.store()
            .documents
            .list(&id)
            .await
            .expect("list")
            .is_empty()
    );
}

async fn fifty_concurrent_conditional_patches_exactly_one_wins() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let v = json_of(put_doc(&app, &id, "d", json!({"data": {}})).await).await["version"]
        .as_i64()
        .expect("version");
    let requests = (0..50).map(|i| {
        send(
            app.authed(Method::PATCH, &doc_path(&id, "d"), ALICE)
                .json(&json!({"version": v, "data": {format!("k{i}"): i}})),
        )
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflicts), (1, 49), "{statuses:?}");
    let doc = json_of(app.get(&doc_path(&id, "d"), ALICE).await).await;
    assert_eq!(doc["version"], v + 1);
    assert_eq!(doc["data"].as_object().map(|m| m.len()), Some(1));
}

async fn concurrent_unconditional_patches_on_distinct_keys_lose_nothing() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let requests =
        (0..30).map(|i| patch_doc(&app, &id, "d", json!({"data": {format!("k{i}"): i}})));
    for r in futures::future::join_all(requests).await {
        assert!(r.status().is_success(), "{}", r.status());
    }
    let doc = json_of(app.get(&doc_path(&id, "d"), ALICE).await).await;
    assert_eq!(doc["data"].as_object().map(|m| m.len()), Some(30), "{doc}");
    assert_eq!(doc["version"], 30);
}

async fn delta_shows_what_the_device_has_not_applied() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    put_doc(
        &app,
        &id,
        "desired",
        json!({"data": {"armed": true, "zones": {"kitchen": "on", "garage": "on"}}}),
    )
    .await;
    let resp = app
        .get(
            &format!("{}/delta?against=current", doc_path(&id, "desired")),
            ALICE,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let delta = json_of(resp).await;
    assert_eq!(
        delta["against_version"],
        Value::Null,
        "current does not exist yet"
    );
    // Keys missing on the other side are listed whole, not recursed into.
    assert_eq!(
        delta["differences"],
        json!([
            {"path": ["armed"], "value": true},
            {"path": ["zones"], "value": {"kitchen": "on", "garage": "on"}}
        ])
    );

    put_doc(
        &app,
        &id,
        "current",
        json!({"data": {"armed": false, "zones": {"kitchen": "on"}}}),
    )
    .await;
    let delta = json_of(
        app.get(
            &format!("{}/delta?against=current", doc_path(&id, "desired")),
            ALICE,
        )
        .await,
    )
    .await;
    assert_eq!(delta["version"], 1);
    assert_eq!(delta["against_version"], 1);
    assert_eq!(
        delta["differences"],
        json!([
            {"path": ["armed"], "value": true, "against": false},
            {"path": ["zones", "garage"], "value": "on"}
        ])
    );
    let resp = app
        .get(&format!("{}/delta", doc_path(&id, "desired")), ALICE)
        .await;
    assert_error(resp, StatusCode::BAD_REQUEST).await;
}

async fn openapi_lists_the_document_endpoints() {
    let app = spawn_app().await;
    let doc = json_of(send(app.request(Method::GET, "/openapi.json")).await).await;
    for path in [
        "/twins/{id}/documents",
        "/twins/{id}/documents/{name}",
        "/twins/{id}/documents/{name}/delta",
        "/twins/{id}/documents/{name}/versions",
        "/twins/{id}/documents/{name}/diff",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let reads: Vec<&str> = doc["paths"]["/twins/{id}/documents/{name}"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for query in ["version", "at"] {
        assert!(reads.contains(&query), "{query} missing from {reads:?}");
    }
    assert!(
        doc["paths"]["/twins/{id}/documents/{name}"]
            .get("patch")
            .is_some()
    );
}

// ---------------------------------------------------------------- inband over the broker

async fn inband_get_put_patch_delete_through_the_channel() {
    let b = with_own_broker().await;
    let ch = uuid::Uuid::new_v4().to_string();
    let id = b
        .create_id(ALICE, &json!({"definition": {"attributes": [{"name": "x", "channel": ch, "persist_state": true}]}}))
        .await;

    let (o, doc) = device(
        &b,
        &ch,
        &id,
        "current",
        "put",
        json!({"data": {"armed": false}}),
    )
    .await;
    assert_eq!(o, "success", "{doc}");
    assert_eq!(doc["version"], 1);
    let (o, doc) = device(
        &b,
        &ch,
        &id,
        "current",
        "patch",
        json!({"version": 1, "data": {"zones": 1}}),
    )
    .await;
    assert_eq!(o, "success", "{doc}");
    assert_eq!(doc["data"], json!({"armed": false, "zones": 1}));
    let (o, doc) = device(&b, &ch, &id, "current", "get", json!({})).await;
    assert_eq!((o.as_str(), doc["version"].clone()), ("success", json!(2)));

    let (o, err) = device(
        &b,
        &ch,
        &id,
        "current",
        "patch",
        json!({"version": 1, "data": {"z": 0}}),
    )
    .await;
    assert_eq!(o, "error");
    assert_eq!(
        err,
        json!({"error": "document version mismatch", "twin_id": id, "document_name": "current",
               "expected_version": 1, "actual_version": 2})
    );
    let (o, _) = device(&b, &ch, &id, "current", "delete", json!({"version": 2})).await;
    assert_eq!(o, "success");
    let (o, err) = device(&b, &ch, &id, "current", "get", json!({})).await;
    assert_eq!(o, "error");
    assert_eq!(err["error"], "entity not found");

    // The requests never became states.
    let states = b.list_states(ALICE, &id, &[]).await;
    assert_eq!(states["total"], 0);
}

async fn inband_on_an_unbound_channel_gets_an_error_and_no_data() {
    let b = with_own_broker().await;
    let (bound, other) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let id = b
        .create_id(
            ALICE,
            &json!({"definition": {"attributes": [{"name": "x", "channel": bound}]}}),
        )
        .await;
    send(
        b.authed(Method::PUT, &doc_path(&id, "desired"), ALICE)
            .json(&json!({"data": {"secret": 1}})),
    )
    .await;
    let (o, err) = device(&b, &other, &id, "desired", "get", json!({})).await;
    assert_eq!(o, "error");
    assert_eq!(err, json!({"error": "entity not found"}));
    let (o, _) = device(
        &b,
        &other,
        &id,
        "desired",
        "put",
        json!({"data": {"hijack": 1}}),
    )
    .await;
    assert_eq!(o, "error");
    let doc = json_of(b.get(&doc_path(&id, "desired"), ALICE).await).await;
    assert_eq!(doc["data"], json!({"secret": 1}));
    assert_eq!(doc["version"], 1);
}

async fn inband_request_reply_for_back_end_callers() {
    let b = with_request_reply("twins").await;
    let id = b.create_id(ALICE, &json!({})).await;
    let ask =
        |op: &str, body: Value| ask_until_answered(&b, format!("twins.{id}.desired.{op}"), body);
    let doc = ask("put", json!({"data": {"armed": true}})).await;
    assert_eq!(doc["version"], 1);
    let doc = ask("patch", json!({"data": {"zones": 3}})).await;
    assert_eq!(doc["data"], json!({"armed": true, "zones": 3}));
    let err = ask("put", json!({"version": 7, "data": {}})).await;
    assert_eq!(err["expected_version"], 7);
    assert_eq!(err["actual_version"], 2);
    let doc = ask("get", json!({})).await;
    assert_eq!(doc["version"], 2);
    let err = ask("get", json!("not an object")).await;
    assert!(err["error"].is_string());
    let rest = json_of(b.get(&doc_path(&id, "desired"), ALICE).await).await;
    assert_eq!(rest["data"], json!({"armed": true, "zones": 3}));
}

async fn inband_requests_for_made_up_ids_are_not_answered() {
    let b = with_own_broker().await;
    let ch = uuid::Uuid::new_v4().to_string();
    let id = b
        .create_id(
            ALICE,
            &json!({"definition": {"attributes": [{"name": "x", "channel": ch}]}}),
        )
        .await;
    let mut answers = b
        .subscribe(format!("channels.{ch}.twins.*.*.*.response.*"))
        .await;
    let made_up = "twins.not-a-uuid.desired.get";
    b.publish_raw(&ch, made_up, envelope(&ch, made_up, b"{}".to_vec()))
        .await;
    // A request for the real twin after it: requests are answered in stream order, so
    // its answer arriving first proves the made-up one was passed over.
    let (o, _) = device(&b, &ch, &id, "desired", "get", json!({})).await;
    assert_eq!(o, "error", "the document does not exist yet");
    let first = receive(&mut answers, "an answer").await;
    assert!(
        first.subject.as_str().contains(&id),
        "the first answer is the real twin's: {}",
        first.subject
    );
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("twins_inband_unanswered_total{reason=\"not_a_twin_id\"}"),
        "counted"
    );
}

async fn request_reply_is_off_unless_asked_for() {
    let b = with_own_broker().await;
    let id = b.create_id(ALICE, &json!({})).await;
    let put = json!({"data": {"hijack": 1}});
    let answer = request(&b, format!("twins.{id}.desired.put"), &put).await;
    assert!(answer.is_err(), "nobody answers: {answer:?}");
    let resp = b.get(&doc_path(&id, "desired"), ALICE).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "nothing was written");
}

async fn request_reply_answers_under_its_configured_prefix() {
    let b = with_request_reply("site-a.twins").await;
    let id = b.create_id(ALICE, &json!({})).await;
    let subject = format!("site-a.twins.{id}.desired.put");
    let doc = ask_until_answered(&b, subject, json!({"data": {"on": true}})).await;
    assert_eq!(doc["version"], 1);
    // The default prefix is not answered by this deployment.
    let answer = request(&b, format!("twins.{id}.desired.get"), &json!({})).await;
    assert!(answer.is_err(), "{answer:?}");
    let bad = ask_until_answered(&b, "site-a.twins.x.y.merge".into(), json!({})).await;
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.contains("site-a.twins.<twinID>")),
        "{bad}"
    );
}

/// The alarm panel of the seed: the app asks for a state in `desired`, the device
/// applies it and reports in `current`, and the app sees the difference disappear.
async fn alarm_panel_desired_current_round_trip() {
    let b = with_own_broker().await;
    let panel_channel = uuid::Uuid::new_v4().to_string();
    let panel = b
        .create_id(
            ALICE,
            &json!({"name": "alarm panel", "definition": {"attributes": [
                {"name": "status", "channel": panel_channel, "subtopic": "status", "persist_state": true}]}}),
        )
        .await;

    // The app arms the alarm.
    let resp = send(
        b.authed(Method::PATCH, &doc_path(&panel, "desired"), ALICE)
            .json(&json!({"data": {"alarm": {"armed": true}}})),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    // The device reads what is desired...
    let (o, desired) = device(&b, &panel_channel, &panel, "desired", "get", json!({})).await;
    assert_eq!(o, "success");
    assert_eq!(desired["data"]["alarm"]["armed"], true);
    // ...sees it differs from what it reported, applies it and reports back.
    let delta = json_of(
        b.get(
            &format!("{}/delta?against=current", doc_path(&panel, "desired")),
            ALICE,
        )
        .await,
    )
    .await;
    assert_eq!(delta["differences"][0]["path"], json!(["alarm"]));
    let (o, current) = device(
        &b,
        &panel_channel,
        &panel,
        "current",
        "patch",
        json!({"data": {"alarm": {"armed": true}}}),
    )
    .await;
    assert_eq!(o, "success");
    assert_eq!(current["version"], 1);

    // The app sees nothing pending any more.
    let delta = json_of(
        b.get(
            &format!("{}/delta?against=current", doc_path(&panel, "desired")),
            ALICE,
        )
        .await,
    )
    .await;
    assert_eq!(delta["differences"], json!([]));
    assert_eq!(delta["against_version"], 1);
}
