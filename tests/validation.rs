//! Table tests of request-body validation (SPEC section 2, "Validation"): every bad
//! body is answered 400 with a JSON error and leaves the store as it was.

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::*;

fn attr(name: &str, channel: &str) -> Value {
    json!({"name": name, "channel": channel, "subtopic": "", "persist_state": true})
}

fn long_name() -> String {
    "n".repeat(1025)
}

/// Bodies that are JSON objects but not valid twin requests, for both create and update.
fn invalid_bodies() -> Vec<(&'static str, Value)> {
    vec![
        ("name too long", json!({ "name": long_name() })),
        (
            "name over 1024 bytes in multi-byte characters",
            json!({ "name": "€".repeat(342) }),
        ),
        ("name is a number", json!({"name": 5})),
        ("name is an object", json!({"name": {"first": "x"}})),
        ("name is an array", json!({"name": ["x"]})),
        ("metadata is an array", json!({"metadata": [1]})),
        ("metadata is a string", json!({"metadata": "x"})),
        ("metadata is a number", json!({"metadata": 5})),
        ("metadata is a boolean", json!({"metadata": true})),
        ("definition is a number", json!({"definition": 5})),
        ("definition is an empty array", json!({"definition": []})),
        (
            "definition is an array of its fields",
            json!({"definition": [[attr("a", "ch")], 5]}),
        ),
        (
            "attributes is an object",
            json!({"definition": {"attributes": {}}}),
        ),
        (
            "attribute is an array of its fields",
            json!({"definition": {"attributes": [["a", "ch", "", true]]}}),
        ),
        (
            "attribute is a string",
            json!({"definition": {"attributes": ["temperature"]}}),
        ),
        (
            "empty attribute name",
            json!({"definition": {"attributes": [attr("", "ch")]}}),
        ),
        (
            "empty attribute channel",
            json!({"definition": {"attributes": [attr("temperature", "")]}}),
        ),
        (
            "attribute without a name",
            json!({"definition": {"attributes": [{"channel": "ch"}]}}),
        ),
        (
            "attribute without a channel",
            json!({"definition": {"attributes": [{"name": "temperature"}]}}),
        ),
        (
            "attribute name is a number",
            json!({"definition": {"attributes": [{"name": 1, "channel": "ch"}]}}),
        ),
        (
            "persist_state is a string",
            json!({"definition": {"attributes": [{"name": "a", "channel": "ch", "persist_state": "yes"}]}}),
        ),
        (
            "subtopic is a number",
            json!({"definition": {"attributes": [{"name": "a", "channel": "ch", "subtopic": 3}]}}),
        ),
        (
            "duplicate attribute names",
            json!({"definition": {"attributes": [attr("temperature", "ch-1"), attr("temperature", "ch-2")]}}),
        ),
        (
            "duplicate attribute names among others",
            json!({"definition": {"attributes": [attr("a", "c"), attr("b", "c"), attr("a", "c")]}}),
        ),
        (
            "negative delta",
            json!({"definition": {"attributes": [attr("a", "ch")], "delta": -1}}),
        ),
        (
            "negative delta without attributes",
            json!({"definition": {"attributes": [], "delta": -1}}),
        ),
        (
            "delta is a string",
            json!({"definition": {"attributes": [attr("a", "ch")], "delta": "1"}}),
        ),
        (
            "delta is fractional",
            json!({"definition": {"attributes": [attr("a", "ch")], "delta": 1.5}}),
        ),
        (
            "delta beyond i64",
            json!({"definition": {"attributes": [attr("a", "ch")], "delta": 9_223_372_036_854_775_808u64}}),
        ),
        (
            "valid name with an invalid definition",
            json!({"name": "ok", "definition": {"attributes": [attr("", "ch")]}}),
        ),
        (
            "valid metadata with a too long name",
            json!({"name": long_name(), "metadata": {"k": "v"}}),
        ),
    ]
}

/// Bodies that are not JSON objects at all.
fn non_object_bodies() -> Vec<(&'static str, &'static str)> {
    vec![
        ("empty", ""),
        ("whitespace", "  \r\n"),
        ("not JSON", "twin"),
        ("truncated", "{\"name\":"),
        ("empty array", "[]"),
        ("array of the fields", "[\"name\", null, {\"k\": 1}]"),
        ("null", "null"),
        ("number", "5"),
        ("string", "\"twin\""),
        ("trailing garbage", "{} x"),
    ]
}

#[tokio::test]
async fn invalid_create_bodies_are_400_and_create_nothing() {
    let app = spawn_app().await;
    for (label, body) in invalid_bodies() {
        let resp = app.post_twin(ALICE, &body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
        let message = assert_error(resp, StatusCode::BAD_REQUEST).await;
        assert!(
            !message.contains("internal"),
            "{label}: message {message:?}"
        );
    }
    for (label, body) in non_object_bodies() {
        let resp = app
            .post_raw(ALICE, Some("application/json"), body.as_bytes().to_vec())
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
    assert_eq!(app.twin_count(ALICE).await, 0, "nothing was created");
}

#[tokio::test]
async fn invalid_update_bodies_are_400_and_change_nothing() {
    let app = spawn_app().await;
    let created = app
        .create_twin(
            ALICE,
            &json!({"name": "keep", "metadata": {"k": "v"},
                    "definition": {"attributes": [attr("a", "ch")], "delta": 10}}),
        )
        .await;
    let id = id_of(&created);
    for (label, body) in invalid_bodies() {
        let resp = app.put_twin(ALICE, &id, &body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
        assert_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            app.twin(ALICE, &id).await,
            created,
            "{label} changed the twin"
        );
    }
    for (label, body) in non_object_bodies() {
        let resp = app
            .put_raw(
                ALICE,
                &id,
                Some("application/json"),
                body.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{label}");
        assert_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            app.twin(ALICE, &id).await,
            created,
            "{label} changed the twin"
        );
    }
    assert_eq!(app.twin_count(ALICE).await, 1);
}

#[tokio::test]
async fn near_miss_bodies_are_accepted() {
    // The valid neighbours of the invalid rows: each must be accepted, so that the
    // table above fails for the reason its label gives.
    let app = spawn_app().await;
    let cases = [
        ("name of 1024 bytes", json!({ "name": "n".repeat(1024) })),
        ("empty metadata", json!({"metadata": {}})),
        ("null metadata", json!({"metadata": null})),
        ("null definition", json!({"definition": null})),
        (
            "same channel for two attributes",
            json!({"definition": {"attributes": [attr("a", "c"), attr("b", "c")]}}),
        ),
        (
            "zero delta",
            json!({"definition": {"attributes": [attr("a", "c")], "delta": 0}}),
        ),
        (
            "largest delta",
            json!({"definition": {"attributes": [attr("a", "c")], "delta": i64::MAX}}),
        ),
        (
            "attribute with only name and channel",
            json!({"definition": {"attributes": [{"name": "a", "channel": "c"}]}}),
        ),
        // Compat: the Go service ignores fields it does not know.
        (
            "unknown fields are ignored",
            json!({"name": "x", "color": "red"}),
        ),
    ];
    for (label, body) in &cases {
        let resp = app.post_twin(ALICE, body).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{label}");
    }
    assert_eq!(app.twin_count(ALICE).await, cases.len() as u64);
}
