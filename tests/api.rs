//! Black-box tests of the HTTP API (SPEC sections 1 and 2) over a real socket, with an
//! in-test auth service and a temporary SQLite store.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use twins::domain::state::State;

use common::*;

const MIB: usize = 1 << 20;

// The tests below run once per store backend (see `common::backend`), except the one
// that corrupts the SQLite file.
crate::backend_matrix!(
    create_answers_201_with_location_and_the_created_twin,
    create_with_empty_object_gets_the_default_definition,
    create_with_zero_or_absent_delta_uses_one_millisecond,
    create_accepts_json_content_type_with_parameters_or_other_case,
    twin_names_up_to_1024_bytes_are_accepted,
    timestamps_have_millisecond_precision_in_utc,
    list_pages_only_the_callers_twins_with_totals,
    list_of_a_user_without_twins_is_an_empty_page,
    name_filter_matches_the_exact_name_only,
    name_filter_over_1024_bytes_is_400,
    metadata_filter_requires_every_top_level_key_to_match,
    metadata_filter_takes_keys_and_values_literally,
    name_and_metadata_filters_combine,
    metadata_query_that_is_not_a_json_object_is_400,
    bad_limit_or_offset_is_400_on_every_listing,
    view_returns_the_twin_as_created,
    view_of_missing_or_non_uuid_id_is_404,
    update_replaces_name_and_metadata_and_increments_revision,
    update_appends_definitions_with_the_next_id,
    update_with_an_empty_definition_and_a_name_changes_only_the_name,
    update_with_nothing_to_change_is_400_and_changes_nothing,
    update_of_missing_or_non_uuid_twin_is_404,
    concurrent_updates_never_lose_a_definition,
    delete_removes_the_twin_and_its_states,
    delete_of_missing_or_non_uuid_id_is_204,
    delete_of_a_foreign_twin_is_204_and_deletes_nothing,
    states_are_listed_by_ascending_id_with_totals,
    states_of_a_twin_without_states_is_an_empty_page,
    states_of_unknown_foreign_or_non_uuid_twin_are_404,
    integral_numbers_are_served_without_a_fraction,
    a_foreign_twin_is_indistinguishable_from_a_missing_one,
    two_users_may_use_the_same_names,
    every_protected_route_answers_401_to_missing_or_invalid_credentials,
    an_identity_with_an_empty_id_is_401,
    post_and_put_without_a_json_content_type_are_415,
    a_body_over_one_mebibyte_is_413,
    a_body_of_exactly_one_mebibyte_is_accepted,
    empty_or_non_json_bodies_are_400,
    unknown_routes_and_methods_answer_json_errors,
    health_reports_pass_with_build_information_and_needs_no_token,
    metrics_count_requests_per_route_template,
    openapi_document_lists_the_twins_and_states_paths,
    error_content_type_is_json_for_each_status,
);

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

fn ids(page: &Value, field: &str) -> Vec<String> {
    page[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is an array: {page}"))
        .iter()
        .map(|t| t["id"].as_str().expect("string id").to_owned())
        .collect()
}

fn parse_time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// Waits until the clock, read to the millisecond as the service stamps times, is past
/// `time`: an update made from then on is stamped later than it.
async fn clock_passes(time: &Value) {
    let time = parse_time(time);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Utc::now() - chrono::Duration::milliseconds(1) <= time {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A JSON body of exactly `size` bytes: `{"metadata":{"k":"xxx…"}}`.
fn body_of_size(size: usize) -> Vec<u8> {
    let shell = r#"{"metadata":{"k":""}}"#.len();
    let padding = "x".repeat(size - shell);
    let body = format!(r#"{{"metadata":{{"k":"{padding}"}}}}"#);
    assert_eq!(body.len(), size);
    body.into_bytes()
}

// ---------------------------------------------------------------- POST /twins

async fn create_answers_201_with_location_and_the_created_twin() {
    let app = spawn_app().await;
    let body = json!({
        "name": "grinding machine 2",
        "metadata": {"site": "plant 1", "floor": 2},
        "definition": {
            "attributes": [
                {"name": "temperature", "channel": "ch-1", "subtopic": "engine", "persist_state": true},
                {"name": "rpm", "channel": "ch-2"}
            ],
            "delta": 5000
        }
    });
    let resp = app.post_twin(ALICE, &body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = header(&resp, "location");
    let twin = json_of(resp).await;

    let id = id_of(&twin);
    assert_eq!(location, format!("/twins/{id}"));
    let uuid = uuid::Uuid::parse_str(&id).expect("id is a UUID");
    assert_eq!(uuid.get_version_num(), 4, "id is a UUID v4");
    assert_eq!(
        uuid.hyphenated().to_string(),
        id,
        "id is lowercase hyphenated"
    );

    assert_eq!(
        keys(&twin),
        BTreeSet::from([
            "owner",
            "id",
            "name",
            "revision",
            "created",
            "updated",
            "definitions",
            "metadata"
        ])
    );
    assert_eq!(twin["owner"], ALICE_ID);
    assert_eq!(twin["name"], "grinding machine 2");
    assert_eq!(twin["revision"], 0);
    assert_timestamp(&twin["created"]);
    assert_eq!(twin["created"], twin["updated"]);
    assert_eq!(twin["metadata"], json!({"site": "plant 1", "floor": 2}));
    assert_eq!(
        twin["definitions"],
        json!([{
            "id": 0,
            "created": twin["created"],
            "attributes": [
                {"name": "temperature", "channel": "ch-1", "subtopic": "engine", "persist_state": true},
                {"name": "rpm", "channel": "ch-2", "subtopic": "", "persist_state": false}
            ],
            "delta": 5000
        }])
    );

    // The Location resolves to the same twin.
    let fetched = json_of(app.get(&location, ALICE).await).await;
    assert_eq!(fetched, twin);
}

async fn create_with_empty_object_gets_the_default_definition() {
    let app = spawn_app().await;
    let twin = app.create_twin(ALICE, &json!({})).await;
    assert_eq!(twin["name"], "");
    assert_eq!(twin["revision"], 0);
    assert_eq!(twin["metadata"], json!({}));
    assert_eq!(
        twin["definitions"],
        json!([{"id": 0, "created": twin["created"], "attributes": [], "delta": 1_000_000}])
    );
}

async fn create_with_zero_or_absent_delta_uses_one_millisecond() {
    let app = spawn_app().await;
    for definition in [
        json!({"attributes": [{"name": "a", "channel": "c"}], "delta": 0}),
        json!({"attributes": [{"name": "a", "channel": "c"}]}),
        json!({}),
    ] {
        let twin = app
            .create_twin(ALICE, &json!({ "definition": definition }))
            .await;
        assert_eq!(twin["definitions"][0]["delta"], 1_000_000, "{definition}");
    }
}

async fn create_accepts_json_content_type_with_parameters_or_other_case() {
    let app = spawn_app().await;
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ] {
        let resp = app.post_raw(ALICE, Some(ct), b"{}".to_vec()).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{ct}");
    }
    assert_eq!(app.twin_count(ALICE).await, 3);
}

async fn twin_names_up_to_1024_bytes_are_accepted() {
    let app = spawn_app().await;
    let name = "n".repeat(1024);
    let twin = app.create_twin(ALICE, &json!({ "name": name })).await;
    assert_eq!(twin["name"], name);
    // 341 three-byte characters are 1023 bytes.
    let name = "€".repeat(341);
    let twin = app.create_twin(ALICE, &json!({ "name": name })).await;
    assert_eq!(twin["name"], name);
}

async fn timestamps_have_millisecond_precision_in_utc() {
    let app = spawn_app().await;
    let twin = app.create_twin(ALICE, &json!({})).await;
    assert_timestamp(&twin["created"]);
    assert_timestamp(&twin["updated"]);
    assert_timestamp(&twin["definitions"][0]["created"]);
    let age = Utc::now() - parse_time(&twin["created"]);
    assert!(
        age.num_seconds().abs() < 60,
        "created is now, not {}",
        twin["created"]
    );
}

// ---------------------------------------------------------------- GET /twins

async fn list_pages_only_the_callers_twins_with_totals() {
    let app = spawn_app().await;
    let mut alice = BTreeSet::new();
    for i in 0..15 {
        alice.insert(
            app.create_id(ALICE, &json!({ "name": format!("a{i}") }))
                .await,
        );
    }
    for i in 0..3 {
        app.create_id(BOB, &json!({ "name": format!("b{i}") }))
            .await;
    }

    let first = app.list_twins(ALICE, &[]).await;
    assert_eq!(
        keys(&first),
        BTreeSet::from(["total", "offset", "limit", "twins"])
    );
    assert_eq!(first["total"], 15);
    assert_eq!(first["offset"], 0);
    assert_eq!(first["limit"], 10);
    assert_eq!(first["twins"].as_array().unwrap().len(), 10);
    for twin in first["twins"].as_array().unwrap() {
        assert_eq!(twin["owner"], ALICE_ID);
    }

    let second = app.list_twins(ALICE, &[("offset", "10")]).await;
    assert_eq!(second["total"], 15);
    assert_eq!(second["offset"], 10);
    assert_eq!(second["limit"], 10);
    assert_eq!(second["twins"].as_array().unwrap().len(), 5);

    let mut paged: BTreeSet<String> = ids(&first, "twins").into_iter().collect();
    for id in ids(&second, "twins") {
        assert!(paged.insert(id), "pages overlap");
    }
    assert_eq!(paged, alice, "the two pages are exactly alice's twins");

    let all = app.list_twins(ALICE, &[("limit", "100")]).await;
    assert_eq!(all["limit"], 100);
    assert_eq!(all["twins"].as_array().unwrap().len(), 15);

    let one = app
        .list_twins(ALICE, &[("limit", "1"), ("offset", "14")])
        .await;
    assert_eq!(one["twins"].as_array().unwrap().len(), 1);
    assert_eq!(
        (
            one["total"].clone(),
            one["offset"].clone(),
            one["limit"].clone()
        ),
        (json!(15), json!(14), json!(1))
    );

    for offset in ["15", "1000"] {
        let past = app.list_twins(ALICE, &[("offset", offset)]).await;
        assert_eq!(past["total"], 15);
        assert_eq!(past["twins"], json!([]), "offset {offset}");
    }

    let bob = app.list_twins(BOB, &[]).await;
    assert_eq!(bob["total"], 3);
    for twin in bob["twins"].as_array().unwrap() {
        assert_eq!(twin["owner"], BOB_ID);
    }
}

async fn list_of_a_user_without_twins_is_an_empty_page() {
    let app = spawn_app().await;
    app.create_twin(ALICE, &json!({})).await;
    let page = app.list_twins(BOB, &[]).await;
    assert_eq!(
        page,
        json!({"total": 0, "offset": 0, "limit": 10, "twins": []})
    );
}

async fn name_filter_matches_the_exact_name_only() {
    let app = spawn_app().await;
    let pump = app.create_id(ALICE, &json!({"name": "pump"})).await;
    for name in ["pump 2", "Pump", "pum", " pump", ""] {
        app.create_twin(ALICE, &json!({ "name": name })).await;
    }
    app.create_twin(BOB, &json!({"name": "pump"})).await;

    let page = app.list_twins(ALICE, &[("name", "pump")]).await;
    assert_eq!(page["total"], 1);
    assert_eq!(ids(&page, "twins"), vec![pump]);

    let none = app.list_twins(ALICE, &[("name", "valve")]).await;
    assert_eq!(none["total"], 0);
    assert_eq!(none["twins"], json!([]));

    let spaced = app.list_twins(ALICE, &[("name", "pump 2")]).await;
    assert_eq!(spaced["total"], 1);
    assert_eq!(spaced["twins"][0]["name"], "pump 2");
}

async fn name_filter_over_1024_bytes_is_400() {
    let app = spawn_app().await;
    let long = "n".repeat(1025);
    let resp = app.get_query("/twins", ALICE, &[("name", &long)]).await;
    assert_error(resp, StatusCode::BAD_REQUEST).await;
    let ok = "n".repeat(1024);
    app.list_twins(ALICE, &[("name", &ok)]).await;
}

/// Lists Alice's twins with each metadata filter and checks the ids and the total.
async fn assert_metadata_filters(app: &TestApp, cases: Vec<(Value, Vec<&String>)>) {
    for (filter, want) in cases {
        let filter_text = filter.to_string();
        let page = app
            .list_twins(ALICE, &[("metadata", &filter_text), ("limit", "100")])
            .await;
        let got: BTreeSet<String> = ids(&page, "twins").into_iter().collect();
        let want: BTreeSet<String> = want.into_iter().cloned().collect();
        assert_eq!(got, want, "metadata={filter_text}");
        assert_eq!(
            page["total"],
            want.len(),
            "total for metadata={filter_text}"
        );
    }
}

async fn metadata_filter_requires_every_top_level_key_to_match() {
    let app = spawn_app().await;
    let a1 = app
        .create_id(
            ALICE,
            &json!({"metadata": {"site": "a", "floor": 1, "loc": {"x": 1, "y": 2}}}),
        )
        .await;
    let a2 = app
        .create_id(
            ALICE,
            &json!({"metadata": {"site": "a", "floor": 2, "flag": true}}),
        )
        .await;
    let b = app
        .create_id(ALICE, &json!({"metadata": {"site": "b", "floor": "1"}}))
        .await;
    let empty = app.create_id(ALICE, &json!({})).await;
    app.create_twin(BOB, &json!({"metadata": {"site": "a"}}))
        .await;

    let cases: Vec<(Value, Vec<&String>)> = vec![
        (json!({"site": "a"}), vec![&a1, &a2]),
        (json!({"site": "a", "floor": 2}), vec![&a2]),
        (json!({"site": "a", "floor": 3}), vec![]),
        (json!({"floor": 1}), vec![&a1]),
        (json!({"floor": 1.0}), vec![&a1]),
        (json!({"floor": "1"}), vec![&b]),
        (json!({"flag": true}), vec![&a2]),
        (json!({"flag": 1}), vec![]),
        (json!({"loc": {"y": 2, "x": 1}}), vec![&a1]),
        (json!({"loc": {"x": 1}}), vec![]),
        (json!({"missing": null}), vec![]),
        (json!({"site": "c"}), vec![]),
        (json!({}), vec![&a1, &a2, &b, &empty]),
    ];
    assert_metadata_filters(&app, cases).await;
}

async fn metadata_filter_takes_keys_and_values_literally() {
    let app = spawn_app().await;
    let dotted = app
        .create_id(
            ALICE,
            &json!({"metadata": {"a.b": 1, "": "e", "q\"k": "v'"}}),
        )
        .await;
    let nested = app
        .create_id(ALICE, &json!({"metadata": {"a": {"b": 1}}}))
        .await;
    let dollar = app
        .create_id(ALICE, &json!({"metadata": {"$x": 1, "a": {"$where": "1"}}}))
        .await;
    let any = app.create_id(ALICE, &json!({"metadata": {"a": 5}})).await;

    let cases: Vec<(Value, Vec<&String>)> = vec![
        (json!({"a.b": 1}), vec![&dotted]),
        (json!({"a": {"b": 1}}), vec![&nested]),
        (json!({"": "e"}), vec![&dotted]),
        (json!({"q\"k": "v'"}), vec![&dotted]),
        (json!({"$x": 1}), vec![&dollar]),
        (json!({"a": {"$where": "1"}}), vec![&dollar]),
        (json!({"a": {"$ne": null}}), vec![]),
        (json!({"a": {"$exists": true}}), vec![]),
        (json!({"a": {"$gt": 0}}), vec![]),
        (json!({"a": 5}), vec![&any]),
    ];
    assert_metadata_filters(&app, cases).await;
}

async fn name_and_metadata_filters_combine() {
    let app = spawn_app().await;
    let wanted = app
        .create_id(ALICE, &json!({"name": "pump", "metadata": {"site": "a"}}))
        .await;
    app.create_twin(ALICE, &json!({"name": "pump", "metadata": {"site": "b"}}))
        .await;
    app.create_twin(ALICE, &json!({"name": "valve", "metadata": {"site": "a"}}))
        .await;
    let page = app
        .list_twins(ALICE, &[("name", "pump"), ("metadata", r#"{"site":"a"}"#)])
        .await;
    assert_eq!(page["total"], 1);
    assert_eq!(ids(&page, "twins"), vec![wanted]);
}

async fn metadata_query_that_is_not_a_json_object_is_400() {
    let app = spawn_app().await;
    app.create_twin(ALICE, &json!({"metadata": {"site": "a"}}))
        .await;
    for bad in [
        "[1]",
        "\"site\"",
        "1",
        "null",
        "true",
        "not json",
        "{",
        "{\"site\":}",
    ] {
        let resp = app.get_query("/twins", ALICE, &[("metadata", bad)]).await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
}

async fn bad_limit_or_offset_is_400_on_every_listing() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let states = format!("/states/{id}");
    let bad = [
        ("limit", "0"),
        ("limit", "101"),
        ("limit", "-1"),
        ("limit", "x"),
        ("limit", "1.5"),
        ("limit", "99999999999999999999999"),
        ("offset", "x"),
        ("offset", "-1"),
        ("offset", "1.5"),
        ("offset", "99999999999999999999999"),
    ];
    for path in ["/twins", states.as_str()] {
        for (key, value) in bad {
            let resp = app.get_query(path, ALICE, &[(key, value)]).await;
            let message = assert_error(resp, StatusCode::BAD_REQUEST).await;
            assert!(message.contains(key), "{path}?{key}={value}: {message}");
        }
        for limit in ["1", "100"] {
            let resp = app.get_query(path, ALICE, &[("limit", limit)]).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}?limit={limit}");
        }
    }
}

// ---------------------------------------------------------------- GET /twins/{id}

async fn view_returns_the_twin_as_created() {
    let app = spawn_app().await;
    let created = app
        .create_twin(ALICE, &json!({"name": "press", "metadata": {"k": [1, 2]}}))
        .await;
    let viewed = app.twin(ALICE, &id_of(&created)).await;
    assert_eq!(viewed, created);
}

async fn view_of_missing_or_non_uuid_id_is_404() {
    let app = spawn_app().await;
    app.create_twin(ALICE, &json!({})).await;
    for id in [
        random_id().as_str(),
        "not-a-uuid",
        "1",
        "twin%20one",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        let resp = app.get(&format!("/twins/{id}"), ALICE).await;
        assert_error(resp, StatusCode::NOT_FOUND).await;
    }
}

// ---------------------------------------------------------------- PUT /twins/{id}

async fn update_replaces_name_and_metadata_and_increments_revision() {
    let app = spawn_app().await;
    let created = app
        .create_twin(ALICE, &json!({"name": "old", "metadata": {"a": 1, "b": 2}}))
        .await;
    let id = id_of(&created);
    clock_passes(&created["updated"]).await;

    let resp = app
        .put_twin(ALICE, &id, &json!({"name": "new", "metadata": {"c": 3}}))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let updated = json_of(resp).await;
    assert_eq!(updated["name"], "new");
    assert_eq!(
        updated["metadata"],
        json!({"c": 3}),
        "metadata is replaced, not merged"
    );
    assert_eq!(updated["revision"], 1);
    assert_eq!(updated["created"], created["created"]);
    assert_eq!(updated["owner"], ALICE_ID);
    assert_eq!(
        updated["definitions"], created["definitions"],
        "no definition appended"
    );
    assert_timestamp(&updated["updated"]);
    assert!(
        parse_time(&updated["updated"]) > parse_time(&created["updated"]),
        "updated moves forward: {} -> {}",
        created["updated"],
        updated["updated"]
    );
    assert_eq!(
        app.twin(ALICE, &id).await,
        updated,
        "the answer is what is stored"
    );

    // Only the name: metadata is kept.
    let renamed = json_of(app.put_twin(ALICE, &id, &json!({"name": "newer"})).await).await;
    assert_eq!(renamed["name"], "newer");
    assert_eq!(renamed["metadata"], json!({"c": 3}));
    assert_eq!(renamed["revision"], 2);

    // Only the metadata: the name is kept.
    let retagged = json_of(
        app.put_twin(ALICE, &id, &json!({"metadata": {"d": 4}}))
            .await,
    )
    .await;
    assert_eq!(retagged["name"], "newer");
    assert_eq!(retagged["metadata"], json!({"d": 4}));
    assert_eq!(retagged["revision"], 3);
}

async fn update_appends_definitions_with_the_next_id() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "t"})).await;
    let id = id_of(&created);
    let def0 = created["definitions"][0].clone();
    clock_passes(&created["updated"]).await;

    let attrs1 = json!([{"name": "temp", "channel": "ch", "subtopic": ">", "persist_state": true}]);
    let one = json_of(
        app.put_twin(
            ALICE,
            &id,
            &json!({"definition": {"attributes": attrs1, "delta": 42}}),
        )
        .await,
    )
    .await;
    assert_eq!(one["revision"], 1);
    let defs = one["definitions"].as_array().unwrap();
    assert_eq!(defs.len(), 2);
    assert_eq!(defs[0], def0, "earlier definitions are kept unchanged");
    assert_eq!(defs[1]["id"], 1);
    assert_eq!(defs[1]["attributes"], attrs1);
    assert_eq!(defs[1]["delta"], 42);
    assert_eq!(
        defs[1]["created"], one["updated"],
        "a definition is created at the update"
    );
    assert!(parse_time(&defs[1]["created"]) > parse_time(&def0["created"]));

    // A name-only update appends nothing.
    let renamed = json_of(app.put_twin(ALICE, &id, &json!({"name": "t2"})).await).await;
    assert_eq!(renamed["definitions"].as_array().unwrap().len(), 2);
    assert_eq!(renamed["revision"], 2);

    // Delta 0 becomes 1 ms on update as on create.
    let attrs2 = json!([{"name": "rpm", "channel": "ch2", "subtopic": "", "persist_state": false}]);
    let two = json_of(
        app.put_twin(
            ALICE,
            &id,
            &json!({"definition": {"attributes": attrs2, "delta": 0}}),
        )
        .await,
    )
    .await;
    assert_eq!(two["revision"], 3);
    assert_eq!(two["name"], "t2");
    let defs = two["definitions"].as_array().unwrap();
    let def_ids: Vec<i64> = defs.iter().map(|d| d["id"].as_i64().unwrap()).collect();
    assert_eq!(def_ids, vec![0, 1, 2]);
    assert_eq!(defs[2]["attributes"], attrs2);
    assert_eq!(defs[2]["delta"], 1_000_000);
    assert_eq!(
        defs[1], one["definitions"][1],
        "earlier definitions are kept unchanged"
    );

    assert_eq!(app.twin(ALICE, &id).await, two);
}

async fn update_with_an_empty_definition_and_a_name_changes_only_the_name() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "a"})).await;
    let id = id_of(&created);
    let updated = json_of(
        app.put_twin(
            ALICE,
            &id,
            &json!({"name": "b", "definition": {"attributes": [], "delta": 7}, "metadata": {}}),
        )
        .await,
    )
    .await;
    assert_eq!(updated["name"], "b");
    assert_eq!(updated["revision"], 1);
    assert_eq!(updated["definitions"], created["definitions"]);
    assert_eq!(updated["metadata"], created["metadata"]);
}

async fn update_with_nothing_to_change_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    let created = app
        .create_twin(ALICE, &json!({"name": "keep", "metadata": {"k": "v"}}))
        .await;
    let id = id_of(&created);
    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"metadata": {}}),
        json!({"definition": {"attributes": []}}),
        json!({"definition": {"attributes": [], "delta": 5}}),
        json!({"definition": {}}),
        json!({"name": "", "metadata": {}, "definition": {"attributes": []}}),
        json!({"name": null, "metadata": null, "definition": null}),
    ] {
        let resp = app.put_twin(ALICE, &id, &body).await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
        assert_eq!(app.twin(ALICE, &id).await, created, "after {body}");
    }
}

async fn update_of_missing_or_non_uuid_twin_is_404() {
    let app = spawn_app().await;
    for id in [random_id().as_str(), "not-a-uuid"] {
        let resp = app.put_twin(ALICE, id, &json!({"name": "x"})).await;
        assert_error(resp, StatusCode::NOT_FOUND).await;
    }
    assert_eq!(app.twin_count(ALICE).await, 0, "an update creates nothing");
}

async fn concurrent_updates_never_lose_a_definition() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let bodies: Vec<Value> = (0..6)
        .map(|i| json!({"definition": {"attributes": [{"name": format!("a{i}"), "channel": "c"}]}}))
        .collect();
    let puts = bodies.iter().map(|body| app.put_twin(ALICE, &id, body));
    let statuses: Vec<StatusCode> = futures::future::join_all(puts)
        .await
        .iter()
        .map(|r| r.status())
        .collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(ok >= 1, "{statuses:?}");
    let twin = app.twin(ALICE, &id).await;
    assert_eq!(twin["revision"], ok);
    let def_ids: Vec<i64> = twin["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect();
    assert_eq!(def_ids, (0..=ok as i64).collect::<Vec<_>>());
}

// ---------------------------------------------------------------- DELETE /twins/{id}

async fn delete_removes_the_twin_and_its_states() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let keep = app.create_id(ALICE, &json!({})).await;
    save_states(&app, &id, 3).await;
    save_states(&app, &keep, 2).await;

    let resp = app.delete_twin(ALICE, &id).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty(), "204 has no body");

    assert_error(
        app.get(&format!("/twins/{id}"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_error(
        app.get(&format!("/states/{id}"), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        app.store().states.latest(&id).await.unwrap(),
        None,
        "states are deleted"
    );
    let page = app.list_twins(ALICE, &[]).await;
    assert_eq!(page["total"], 1);
    assert_eq!(ids(&page, "twins"), vec![keep.clone()]);
    assert_eq!(
        app.list_states(ALICE, &keep, &[]).await["total"],
        2,
        "other twins keep their states"
    );

    // Deleting again is still 204.
    assert_eq!(
        app.delete_twin(ALICE, &id).await.status(),
        StatusCode::NO_CONTENT
    );
}

async fn delete_of_missing_or_non_uuid_id_is_204() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    for other in [random_id().as_str(), "not-a-uuid", "1"] {
        let resp = app.delete_twin(ALICE, other).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{other}");
    }
    app.twin(ALICE, &id).await;
}

async fn delete_of_a_foreign_twin_is_204_and_deletes_nothing() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "mine"})).await;
    let id = id_of(&created);
    save_states(&app, &id, 2).await;

    let resp = app.delete_twin(BOB, &id).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    assert_eq!(app.twin(ALICE, &id).await, created);
    assert_eq!(app.list_states(ALICE, &id, &[]).await["total"], 2);
}

// ---------------------------------------------------------------- GET /states/{id}

fn base_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2020-05-05T08:41:39.142Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Saves states 0..n of the twin straight into the store, in reverse id order and with
/// times going backwards, so that the listing's order can only come from the ids.
async fn save_states(app: &TestApp, twin_id: &str, n: i64) {
    for id in (0..n).rev() {
        let state = State {
            twin_id: twin_id.to_owned(),
            id,
            definition: id / 10,
            created: base_time() - chrono::Duration::seconds(id),
            payload: serde_json::Map::from_iter([
                ("temperature".to_owned(), json!(20 + id)),
                ("label".to_owned(), json!(format!("s{id}"))),
            ]),
        };
        app.store().states.save(&state).await.expect("state saved");
    }
}

async fn states_are_listed_by_ascending_id_with_totals() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let other = app.create_id(ALICE, &json!({})).await;
    save_states(&app, &id, 25).await;
    save_states(&app, &other, 4).await;

    let page = app.list_states(ALICE, &id, &[]).await;
    assert_eq!(
        keys(&page),
        BTreeSet::from(["total", "offset", "limit", "states"])
    );
    assert_eq!(page["total"], 25);
    assert_eq!(page["offset"], 0);
    assert_eq!(page["limit"], 10);
    let ids_of = |page: &Value| -> Vec<i64> {
        page["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids_of(&page), (0..10).collect::<Vec<_>>());

    let first = &page["states"][0];
    assert_eq!(
        *first,
        json!({
            "twin_id": id,
            "id": 0,
            "definition": 0,
            "created": "2020-05-05T08:41:39.142Z",
            "payload": {"temperature": 20, "label": "s0"}
        })
    );
    assert_eq!(page["states"][3]["created"], "2020-05-05T08:41:36.142Z");

    let cases: [(&str, &str, Vec<i64>); 5] = [
        ("10", "5", (10..15).collect()),
        ("20", "10", (20..25).collect()),
        ("24", "10", vec![24]),
        ("25", "10", vec![]),
        ("0", "100", (0..25).collect()),
    ];
    for (offset, limit, want) in cases {
        let page = app
            .list_states(ALICE, &id, &[("offset", offset), ("limit", limit)])
            .await;
        assert_eq!(page["total"], 25, "offset {offset} limit {limit}");
        assert_eq!(page["offset"].to_string(), offset);
        assert_eq!(page["limit"].to_string(), limit);
        assert_eq!(ids_of(&page), want, "offset {offset} limit {limit}");
        for s in page["states"].as_array().unwrap() {
            assert_eq!(s["twin_id"], id.as_str());
            assert_eq!(s["definition"], s["id"].as_i64().unwrap() / 10);
        }
    }

    let page = app.list_states(ALICE, &other, &[]).await;
    assert_eq!(page["total"], 4);
    assert_eq!(ids_of(&page), vec![0, 1, 2, 3]);
}

async fn states_of_a_twin_without_states_is_an_empty_page() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let page = app.list_states(ALICE, &id, &[]).await;
    assert_eq!(
        page,
        json!({"total": 0, "offset": 0, "limit": 10, "states": []})
    );
}

async fn states_of_unknown_foreign_or_non_uuid_twin_are_404() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    save_states(&app, &id, 3).await;
    let cases = [
        (BOB, id.clone()),
        (ALICE, random_id()),
        (ALICE, "not-a-uuid".to_owned()),
    ];
    for (token, twin) in cases {
        let resp = app.get(&format!("/states/{twin}"), token).await;
        assert_error(resp, StatusCode::NOT_FOUND).await;
    }
}

// ---------------------------------------------------------------- cross-user

/// As the Go service served them: it decoded numbers into float64 and wrote integral ones
/// without a fraction.
async fn integral_numbers_are_served_without_a_fraction() {
    let app = spawn_app().await;
    let metadata = json!({"n": 3.0, "r": 0.5, "i": 7, "deep": {"list": [72.0, 1.25]}});
    let served = json!({"n": 3, "r": 0.5, "i": 7, "deep": {"list": [72, 1.25]}});
    let created = app.create_twin(ALICE, &json!({"metadata": metadata})).await;
    assert_eq!(created["metadata"], served);
    let id = id_of(&created);
    assert_eq!(app.twin(ALICE, &id).await["metadata"], served);
    let listed = app.list_twins(ALICE, &[("metadata", r#"{"n":3}"#)]).await;
    assert_eq!(listed["twins"][0]["metadata"], served);

    let state = State {
        twin_id: id.clone(),
        id: 0,
        definition: 0,
        created: base_time(),
        payload: serde_json::Map::from_iter([
            ("temperature".to_owned(), json!(72.0)),
            ("ratio".to_owned(), json!(0.25)),
        ]),
    };
    app.store().states.save(&state).await.expect("state saved");
    let states = app.list_states(ALICE, &id, &[]).await;
    assert_eq!(
        states["states"][0]["payload"],
        json!({"temperature": 72, "ratio": 0.25})
    );

    let resp = send(
        app.authed(Method::PUT, &format!("/twins/{id}/documents/d"), ALICE)
            .json(&json!({"data": {"x": 3.0}})),
    )
    .await;
    assert_eq!(json_of(resp).await["data"], json!({"x": 3}));
    let resp = app.get(&format!("/twins/{id}/documents/d"), ALICE).await;
    assert_eq!(json_of(resp).await["data"], json!({"x": 3}));
}

async fn a_foreign_twin_is_indistinguishable_from_a_missing_one() {
    let app = spawn_app().await;
    let created = app
        .create_twin(ALICE, &json!({"name": "alice's", "metadata": {"m": 1}}))
        .await;
    let id = id_of(&created);
    let missing = random_id();

    let answer = |resp: reqwest::Response| async move {
        let status = resp.status();
        let ct = header(&resp, "content-type");
        (status, ct, resp.text().await.unwrap())
    };
    for path in ["/twins", "/states"] {
        let foreign = answer(app.get(&format!("{path}/{id}"), BOB).await).await;
        let absent = answer(app.get(&format!("{path}/{missing}"), BOB).await).await;
        assert_eq!(foreign.0, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(foreign, absent, "GET {path}");
    }
    let body = json!({"name": "bob's now", "metadata": {"owner": "bob"}});
    let foreign = answer(app.put_twin(BOB, &id, &body).await).await;
    let absent = answer(app.put_twin(BOB, &missing, &body).await).await;
    assert_eq!(foreign.0, StatusCode::NOT_FOUND);
    assert_eq!(foreign, absent, "PUT");

    let bob_page = app.list_twins(BOB, &[]).await;
    assert_eq!(bob_page["total"], 0);
    let filtered = app.list_twins(BOB, &[("name", "alice's")]).await;
    assert_eq!(filtered["total"], 0);

    assert_eq!(app.twin(ALICE, &id).await, created, "bob changed nothing");
}

async fn two_users_may_use_the_same_names() {
    let app = spawn_app().await;
    let a = app.create_twin(ALICE, &json!({"name": "same"})).await;
    let b = app.create_twin(BOB, &json!({"name": "same"})).await;
    assert_eq!(a["owner"], ALICE_ID);
    assert_eq!(b["owner"], BOB_ID);
    assert_ne!(a["id"], b["id"]);
    assert_eq!(
        ids(&app.list_twins(ALICE, &[("name", "same")]).await, "twins"),
        vec![id_of(&a)]
    );
    assert_eq!(
        ids(&app.list_twins(BOB, &[("name", "same")]).await, "twins"),
        vec![id_of(&b)]
    );
}

// ---------------------------------------------------------------- 401

async fn every_protected_route_answers_401_to_missing_or_invalid_credentials() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "x"})).await;
    let id = id_of(&created);
    let twin_path = format!("/twins/{id}");
    let states_path = format!("/states/{id}");
    let routes = [
        (Method::GET, "/twins"),
        (Method::POST, "/twins"),
        (Method::GET, twin_path.as_str()),
        (Method::PUT, twin_path.as_str()),
        (Method::DELETE, twin_path.as_str()),
        (Method::GET, states_path.as_str()),
    ];
    let authorizations = [
        None,
        Some(format!("Bearer {STRANGER}")),
        Some("Bearer ".to_owned()),
        Some("Bearer".to_owned()),
        Some(ALICE.to_owned()),
        Some(format!("Basic {ALICE}")),
        Some("Basic YWxpY2U6c2VjcmV0".to_owned()),
        Some(format!("Token {ALICE}")),
    ];
    for (method, path) in &routes {
        for auth in &authorizations {
            let mut req = app
                .request(method.clone(), path)
                .json(&json!({"name": "changed"}));
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = send(req).await;
            // RFC 6750: the scheme to use.
            assert_eq!(header(&resp, "www-authenticate"), r#"Bearer realm="twins""#);
            let message = assert_error(resp, StatusCode::UNAUTHORIZED).await;
            assert!(!message.contains(ALICE), "the token is not echoed");
        }
    }
    // Nothing was created, changed or deleted.
    assert_eq!(app.twin(ALICE, &id).await, created);
    assert_eq!(app.twin_count(ALICE).await, 1);
}

async fn an_identity_with_an_empty_id_is_401() {
    let app = spawn_app().await;
    let resp = app.get("/twins", ANONYMOUS).await;
    assert_error(resp, StatusCode::UNAUTHORIZED).await;
    let resp = app.post_twin(ANONYMOUS, &json!({})).await;
    assert_error(resp, StatusCode::UNAUTHORIZED).await;
}

// ---------------------------------------------------------------- 415, 413, 400

async fn post_and_put_without_a_json_content_type_are_415() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "x"})).await;
    let id = id_of(&created);
    let body = br#"{"name":"changed"}"#.to_vec();
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/xml"),
    ] {
        let resp = app.post_raw(ALICE, ct, body.clone()).await;
        assert_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
        let resp = app.put_raw(ALICE, &id, ct, body.clone()).await;
        assert_error(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    }
    assert_eq!(app.twin_count(ALICE).await, 1);
    assert_eq!(app.twin(ALICE, &id).await, created);
}

async fn a_body_over_one_mebibyte_is_413() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "x"})).await;
    let id = id_of(&created);
    let resp = app
        .post_raw(ALICE, Some("application/json"), body_of_size(MIB + 1))
        .await;
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    let resp = app
        .put_raw(ALICE, &id, Some("application/json"), body_of_size(2 * MIB))
        .await;
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(app.twin_count(ALICE).await, 1);
    assert_eq!(app.twin(ALICE, &id).await, created);
}

async fn a_body_of_exactly_one_mebibyte_is_accepted() {
    let app = spawn_app().await;
    let resp = app
        .post_raw(ALICE, Some("application/json"), body_of_size(MIB))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let twin = json_of(resp).await;
    assert_eq!(twin["metadata"]["k"].as_str().unwrap().len(), MIB - 21);
}

async fn empty_or_non_json_bodies_are_400() {
    let app = spawn_app().await;
    let created = app.create_twin(ALICE, &json!({"name": "x"})).await;
    let id = id_of(&created);
    for body in ["", " \n\t", "not json", "{", "{\"name\":\"x\"", "name=x"] {
        let resp = app
            .post_raw(ALICE, Some("application/json"), body.as_bytes().to_vec())
            .await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
        let resp = app
            .put_raw(
                ALICE,
                &id,
                Some("application/json"),
                body.as_bytes().to_vec(),
            )
            .await;
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
    assert_eq!(app.twin_count(ALICE).await, 1);
    assert_eq!(app.twin(ALICE, &id).await, created);
}

// ---------------------------------------------------------------- errors, routes

async fn unknown_routes_and_methods_answer_json_errors() {
    let app = spawn_app().await;
    let resp = app.get("/nowhere", ALICE).await;
    assert_error(resp, StatusCode::NOT_FOUND).await;
    let resp = send(app.authed(Method::PATCH, "/twins", ALICE)).await;
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED).await;
}

// ---------------------------------------------------------------- /health, /metrics, /openapi.json

async fn health_reports_pass_with_build_information_and_needs_no_token() {
    let app = TestApp::builder()
        .var("MG_TWINS_INSTANCE_ID", "instance-42")
        .spawn()
        .await;
    // The broker connection is made in the background just after start-up: until then
    // the status is "warn"; it must reach "pass" with the store and broker up. Every
    // answer on the way is 200 with the health content type.
    let health = app
        .health_until(|h| {
            assert_eq!(h.status, StatusCode::OK);
            assert_eq!(h.content_type, "application/health+json");
            h.body["status"] == "pass"
        })
        .await
        .body;
    assert_eq!(health["status"], "pass", "{health}");
    assert_eq!(health_check(&health, "store"), "pass");
    assert_eq!(health_check(&health, "broker"), "pass");
    assert_eq!(health["instance_id"], "instance-42");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    for field in [
        "version",
        "commit",
        "description",
        "build_time",
        "instance_id",
    ] {
        let v = health[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string: {health}"));
        assert!(!v.is_empty(), "{field} is empty");
    }
    // The health-check draft's shape: `<component>:<measurement>` keys, each a list of
    // checks with status pass/fail/warn, a type, a time and the measured value.
    let checks = health["checks"].as_object().expect("checks");
    let mut keys: Vec<&String> = checks.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "broker:responseTime",
            "cache:responseTime",
            "store:responseTime"
        ],
        "{health}"
    );
    for (key, list) in checks {
        let c = &list[0];
        assert_eq!(c["status"], "pass", "{key}: {health}");
        assert_eq!(c["observedUnit"], "ms", "{key}");
        assert!(
            c["observedValue"].as_f64().is_some_and(|v| v >= 0.0),
            "{key}"
        );
        let want = if key.starts_with("broker") {
            "component"
        } else {
            "datastore"
        };
        assert_eq!(c["componentType"], want, "{key}");
        let time = c["time"].as_str().expect("time");
        chrono::DateTime::parse_from_rfc3339(time).expect("an RFC 3339 time");
        assert!(c.get("output").is_none(), "no output when passing: {c}");
    }
    assert_eq!(
        health["releaseId"],
        format!(
            "{}+{}",
            health["version"].as_str().unwrap_or_default(),
            health["commit"].as_str().unwrap_or_default()
        )
    );
    for probe in ["/health/live", "/health/ready"] {
        let resp = send(app.request(Method::GET, probe)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{probe}");
        assert_eq!(header(&resp, "content-type"), "application/health+json");
        let body: Value = resp.json().await.expect("JSON");
        assert_eq!(body, json!({"status": "pass"}), "{probe}");
    }
}

async fn metrics_count_requests_per_route_template() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    app.twin(ALICE, &id).await;
    let missing = random_id();
    let resp = app.get(&format!("/twins/{missing}"), ALICE).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    app.list_states(ALICE, &id, &[]).await;

    let resp = send(app.request(Method::GET, "/metrics")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    let counter_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("twins_http_requests_total{"))
        .collect();
    let has = |labels: &[&str]| {
        counter_lines
            .iter()
            .any(|l| labels.iter().all(|label| l.contains(label)))
    };
    assert!(
        has(&[r#"method="POST""#, r#"route="/twins""#, r#"status="201""#]),
        "{text}"
    );
    assert!(
        has(&[
            r#"method="GET""#,
            r#"route="/twins/{id}""#,
            r#"status="200""#
        ]),
        "{text}"
    );
    assert!(
        has(&[
            r#"method="GET""#,
            r#"route="/twins/{id}""#,
            r#"status="404""#
        ]),
        "{text}"
    );
    assert!(
        has(&[
            r#"method="GET""#,
            r#"route="/states/{id}""#,
            r#"status="200""#
        ]),
        "{text}"
    );
    assert!(
        text.contains("twins_http_request_duration_seconds"),
        "latency is recorded"
    );
    assert!(
        !text.contains(&id) && !text.contains(&missing),
        "raw paths are not labels"
    );
}

async fn openapi_document_lists_the_twins_and_states_paths() {
    let app = spawn_app().await;
    let resp = send(app.request(Method::GET, "/openapi.json")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("application/json"));
    let doc = json_of(resp).await;
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/twins", &["get", "post"][..]),
        ("/twins/{id}", &["get", "put", "delete"][..]),
        ("/states/{id}", &["get"][..]),
        ("/twins/{id}/documents", &["get"][..]),
        (
            "/twins/{id}/documents/{name}",
            &["get", "put", "patch", "delete"][..],
        ),
        ("/twins/{id}/documents/{name}/delta", &["get"][..]),
        ("/health", &["get"][..]),
        ("/health/live", &["get"][..]),
        ("/health/ready", &["get"][..]),
        ("/metrics", &["get"][..]),
        ("/openapi.json", &["get"][..]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} documented"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} documented");
        }
    }
    assert!(doc["components"]["schemas"].get("Twin").is_some());

    // The interactive page, served from assets built into the binary, reads the
    // service's own document.
    let resp = send(app.request(Method::GET, "/docs/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/html"));
    let page = resp.text().await.expect("page");
    assert!(page.contains("swagger-ui"), "{page}");
    let resp = send(app.request(Method::GET, "/docs/swagger-initializer.js")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let init = resp.text().await.expect("initializer");
    assert!(init.contains("/openapi.json"), "{init}");
    for asset in ["/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"] {
        let resp = send(app.request(Method::GET, asset)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{asset}");
    }
}

async fn error_content_type_is_json_for_each_status() {
    // One request per error status produced by the API itself; assert_error checks the
    // body shape and the content type.
    let app = spawn_app().await;
    assert_error(app.get("/twins", STRANGER).await, StatusCode::UNAUTHORIZED).await;
    assert_error(
        app.get_query("/twins", ALICE, &[("limit", "0")]).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_error(
        app.get(&format!("/twins/{}", random_id()), ALICE).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_error(
        app.post_raw(ALICE, Some("text/plain"), b"{}".to_vec())
            .await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    )
    .await;
    let resp = send(
        app.authed(Method::POST, "/twins", ALICE)
            .header(CONTENT_TYPE, "application/json")
            .body(body_of_size(MIB + 1)),
    )
    .await;
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn unexpected_failures_are_500_without_the_cause() {
    use sqlx::Connection;

    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({"name": "soon corrupt"})).await;
    // Corrupt the stored twin behind the service's back.
    let options =
        sqlx::sqlite::SqliteConnectOptions::new().filename(app.dir.path().join("twins.db"));
    let mut db = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("open the test database");
    let done = sqlx::query("UPDATE twins SET definitions = 'not json' WHERE id = ?")
        .bind(&id)
        .execute(&mut db)
        .await
        .expect("corrupt the twin");
    assert_eq!(done.rows_affected(), 1);
    db.close().await.unwrap();

    for resp in [
        app.get(&format!("/twins/{id}"), ALICE).await,
        app.get("/twins", ALICE).await,
        app.put_twin(ALICE, &id, &json!({"name": "x"})).await,
    ] {
        let message = assert_error(resp, StatusCode::INTERNAL_SERVER_ERROR).await;
        for secret in ["corrupt", "definitions", "json", "sqlite", "expected"] {
            assert!(
                !message.to_ascii_lowercase().contains(secret),
                "the cause leaks: {message}"
            );
        }
    }
}
