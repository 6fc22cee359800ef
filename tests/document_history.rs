//! Document history over the API (SPEC section 11): the kept versions, a revision by
//! version or by time, the diff of two revisions, pruning at the configured bound, and
//! who each write is recorded as, over REST, inband and request/reply.
//!
//! Expectations come from an oracle: the documents the writes answered with, and for
//! patches the patch crates applied to the older revision.

mod common;

use chrono::{DateTime, Duration as TimeDelta, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use common::*;
use twins::domain::PageRequest;

// Every test below runs once per store backend (see `common::backend`).
crate::backend_matrix!(
    versions_are_listed_newest_first_with_paging_and_their_writer,
    each_kept_version_is_served_as_it_was_written,
    at_serves_the_revision_in_force_at_that_time,
    diff_patches_turn_one_revision_into_the_other,
    revisions_are_pruned_at_the_configured_bound,
    keeping_no_revisions_leaves_the_current_version_only,
    deleting_a_document_or_its_twin_deletes_its_history,
    inband_and_request_reply_writes_are_recorded_with_their_writer,
    bad_history_requests_are_400_and_foreign_twins_404,
);

fn doc_path(id: &str, name: &str) -> String {
    format!("/twins/{id}/documents/{name}")
}

/// One REST write: PUT or PATCH (merge patch) with `data`; returns the written document.
async fn write(app: &TestApp, id: &str, name: &str, method: Method, data: Value) -> Value {
    let resp = send(
        app.authed(method.clone(), &doc_path(id, name), ALICE)
            .json(&json!({ "data": data })),
    )
    .await;
    assert!(
        resp.status().is_success(),
        "{method} {name}: {}",
        resp.status()
    );
    json_of(resp).await
}

/// The writes of the history tests: created by PUT, then patches and replacements that
/// add, change and remove keys at several depths, and change types.
fn writes() -> Vec<(Method, Value)> {
    vec![
        (
            Method::PUT,
            json!({"armed": false, "zones": {"kitchen": "off", "garage": "off"}, "list": [1, 2]}),
        ),
        (
            Method::PATCH,
            json!({"armed": true, "zones": {"garage": null, "hall": {"lamp": 1}}}),
        ),
        (
            Method::PUT,
            json!({"armed": true, "zones": {"hall": {"lamp": 2, "fan": "on"}}, "list": [2]}),
        ),
        (
            Method::PATCH,
            json!({"list": {"now": "an object"}, "mode": "eco"}),
        ),
        (
            Method::PATCH,
            json!({"zones": {"hall": {"lamp": null}}, "armed": null}),
        ),
        (Method::PUT, json!({})),
        (Method::PATCH, json!({"back": [true, {"deep": {"er": 1}}]})),
    ]
}

/// Makes the writes of [`writes`] on a new twin's document "panel"; returns the twin id
/// and every written document, oldest first.
async fn history(app: &TestApp) -> (String, Vec<Value>) {
    let id = app.create_id(ALICE, &json!({})).await;
    let mut written = Vec::new();
    for (method, data) in writes() {
        written.push(write(app, &id, "panel", method, data).await);
    }
    (id, written)
}

/// How the n-th write of [`writes`] (from 0) is listed, written by `by`.
fn listed(written: &[Value], by: &Value) -> Vec<Value> {
    let methods: Vec<Method> = writes().into_iter().map(|(m, _)| m).collect();
    written
        .iter()
        .zip(methods)
        .enumerate()
        .map(|(i, (doc, method))| {
            let op = match (i, method) {
                (0, _) => "create",
                (_, Method::PUT) => "put",
                _ => "patch",
            };
            json!({"version": doc["version"], "updated": doc["updated"], "op": op, "by": by})
        })
        .rev()
        .collect()
}

async fn versions(app: &TestApp, id: &str, query: &[(&str, &str)]) -> Value {
    let resp = app
        .get_query(&format!("{}/versions", doc_path(id, "panel")), ALICE, query)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    json_of(resp).await
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn updated(doc: &Value) -> DateTime<Utc> {
    doc["updated"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_utc())
        .expect("an RFC 3339 updated")
}

/// Returns once the clock has passed `t` by more than a millisecond, so that the next
/// write is stamped later than everything written until now.
async fn clock_past(t: DateTime<Utc>) {
    eventually(
        "the clock to pass the last write",
        || async { Utc::now() },
        |now| *now > t + TimeDelta::milliseconds(1),
    )
    .await;
}

async fn versions_are_listed_newest_first_with_paging_and_their_writer() {
    let app = spawn_app().await;
    let (id, written) = history(&app).await;
    let want = listed(&written, &json!({"kind": "user", "id": ALICE_ID}));
    let n = want.len();

    let all = versions(&app, &id, &[]).await;
    assert_eq!(
        (
            all["total"].clone(),
            all["offset"].clone(),
            all["limit"].clone()
        ),
        (json!(n), json!(0), json!(10))
    );
    assert_eq!(all["versions"], json!(want));
    assert_eq!(all["versions"][0]["version"], written[n - 1]["version"]);

    for (offset, limit) in [(0, 1), (1, 2), (2, 3), (5, 10), (n, 10), (n + 3, 1)] {
        let page = versions(
            &app,
            &id,
            &[
                ("offset", &offset.to_string()),
                ("limit", &limit.to_string()),
            ],
        )
        .await;
        let slice: Vec<Value> = want.iter().skip(offset).take(limit).cloned().collect();
        assert_eq!(page["total"], json!(n), "offset {offset} limit {limit}");
        assert_eq!(
            page["versions"],
            json!(slice),
            "offset {offset} limit {limit}"
        );
    }
    // The page bounds of every other listing.
    for bad in [
        ("limit", "0"),
        ("limit", "101"),
        ("offset", "-1"),
        ("limit", "x"),
    ] {
        let resp = app
            .get_query(
                &format!("{}/versions", doc_path(&id, "panel")),
                ALICE,
                &[bad],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
}

async fn each_kept_version_is_served_as_it_was_written() {
    let app = spawn_app().await;
    let (id, written) = history(&app).await;
    for doc in &written {
        let v = doc["version"].to_string();
        let resp = app
            .get_query(&doc_path(&id, "panel"), ALICE, &[("version", &v)])
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "version {v}");
        assert_eq!(header(&resp, "etag"), format!("\"{v}\""));
        assert_eq!(json_of(resp).await, *doc, "version {v}");
    }
    // Without a query, the current document as before.
    let current = json_of(app.get(&doc_path(&id, "panel"), ALICE).await).await;
    assert_eq!(Some(&current), written.last());

    let next = (written.len() + 1).to_string();
    let resp = app
        .get_query(&doc_path(&id, "panel"), ALICE, &[("version", &next)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(resp).await, json!({"error": "version not kept"}));
}

async fn at_serves_the_revision_in_force_at_that_time() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let mut written = Vec::new();
    for (method, data) in writes().into_iter().take(4) {
        let doc = write(&app, &id, "panel", method, data).await;
        // Every write a millisecond of its own, so that there is a time between two.
        clock_past(updated(&doc)).await;
        written.push(doc);
    }
    let first = updated(&written[0]);
    let ms = TimeDelta::milliseconds(1);
    let mut times = vec![first - ms, first - TimeDelta::days(1)];
    for doc in &written {
        times.extend([updated(doc), updated(doc) + ms]);
    }
    times.push(Utc::now() + TimeDelta::days(1));
    for t in times {
        let in_force = written.iter().rev().find(|d| updated(d) <= t);
        let resp = app
            .get_query(&doc_path(&id, "panel"), ALICE, &[("at", &time(&t))])
            .await;
        match in_force {
            Some(doc) => {
                assert_eq!(resp.status(), StatusCode::OK, "at {t}");
                assert_eq!(json_of(resp).await, *doc, "at {t}");
            }
            None => {
                assert_eq!(resp.status(), StatusCode::NOT_FOUND, "at {t}");
                assert_eq!(
                    json_of(resp).await,
                    json!({"error": "document did not exist at that time"})
                );
            }
        }
    }
    // Any offset names the same instant.
    let second = updated(&written[1]);
    let elsewhere = second
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("offset"))
        .to_rfc3339_opts(SecondsFormat::Millis, false);
    let resp = app
        .get_query(&doc_path(&id, "panel"), ALICE, &[("at", &elsewhere)])
        .await;
    assert_eq!(json_of(resp).await, written[1]);
}

async fn diff_patches_turn_one_revision_into_the_other() {
    let app = spawn_app().await;
    let (id, written) = history(&app).await;
    let diff_path = format!("{}/diff", doc_path(&id, "panel"));
    let current = written.last().expect("written");
    for from in &written {
        let mut targets: Vec<(Option<&Value>, &Value)> =
            written.iter().map(|to| (Some(to), to)).collect();
        targets.push((None, current));
        for (asked, to) in targets {
            let from_v = from["version"].to_string();
            let mut query = vec![("from", from_v.clone())];
            if let Some(asked) = asked {
                query.push(("to", asked["version"].to_string()));
            }
            let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let resp = app.get_query(&diff_path, ALICE, &query).await;
            assert_eq!(resp.status(), StatusCode::OK, "{query:?}");
            let diff = json_of(resp).await;
            assert_eq!(diff["from_version"], from["version"]);
            assert_eq!(diff["to_version"], to["version"]);

            let patch: json_patch::Patch =
                serde_json::from_value(diff["patch"].clone()).expect("an RFC 6902 patch");
            let mut patched = from["data"].clone();
            json_patch::patch(&mut patched, &patch).expect("the patch applies");
            assert_eq!(patched, to["data"], "RFC 6902 {query:?}");

            let mut merged = from["data"].clone();
            json_patch::merge(&mut merged, &diff["merge_patch"]);
            assert_eq!(merged, to["data"], "RFC 7396 {query:?}");
            if from["version"] == to["version"] {
                assert_eq!(diff["patch"], json!([]));
                assert_eq!(diff["merge_patch"], json!({}));
            }
        }
    }
}

/// An app keeping `revisions` earlier revisions per document.
async fn keeping(revisions: &str) -> TestApp {
    TestApp::builder()
        .var("MG_TWINS_DOCUMENT_REVISIONS", revisions)
        .spawn()
        .await
}

async fn revisions_are_pruned_at_the_configured_bound() {
    let keep = 2;
    let app = keeping(&keep.to_string()).await;
    let id = app.create_id(ALICE, &json!({})).await;
    let mut written = Vec::new();
    for (method, data) in writes() {
        let doc = write(&app, &id, "panel", method, data).await;
        clock_past(updated(&doc)).await;
        written.push(doc);
    }
    let all = listed(&written, &json!({"kind": "user", "id": ALICE_ID}));
    let kept: Vec<Value> = all.iter().take(keep + 1).cloned().collect();
    let page = versions(&app, &id, &[("limit", "100")]).await;
    assert_eq!(page["total"], json!(keep + 1));
    assert_eq!(page["versions"], json!(kept));

    let oldest_kept = written.len() - keep;
    for doc in &written {
        let v = doc["version"].as_u64().expect("version") as usize;
        let resp = app
            .get_query(
                &doc_path(&id, "panel"),
                ALICE,
                &[("version", &v.to_string())],
            )
            .await;
        if v >= oldest_kept {
            assert_eq!(json_of(resp).await, *doc, "version {v}");
        } else {
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "version {v}");
            assert_eq!(json_of(resp).await, json!({"error": "version not kept"}));
            // What was in force then is gone too, and so is a diff from it.
            let resp = app
                .get_query(
                    &doc_path(&id, "panel"),
                    ALICE,
                    &[("at", &time(&updated(doc)))],
                )
                .await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "at version {v}");
            assert_eq!(json_of(resp).await, json!({"error": "version not kept"}));
            let resp = app
                .get_query(
                    &format!("{}/diff", doc_path(&id, "panel")),
                    ALICE,
                    &[("from", &v.to_string())],
                )
                .await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "diff from {v}");
            assert_eq!(json_of(resp).await, json!({"error": "version not kept"}));
        }
    }
}

async fn keeping_no_revisions_leaves_the_current_version_only() {
    let app = keeping("0").await;
    let (id, written) = history(&app).await;
    let page = versions(&app, &id, &[]).await;
    let all = listed(&written, &json!({"kind": "user", "id": ALICE_ID}));
    assert_eq!(page["total"], 1);
    assert_eq!(page["versions"], json!(all[..1]));
    let previous = (written.len() - 1).to_string();
    let resp = app
        .get_query(&doc_path(&id, "panel"), ALICE, &[("version", &previous)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let current = written.len().to_string();
    let resp = app
        .get_query(&doc_path(&id, "panel"), ALICE, &[("version", &current)])
        .await;
    assert_eq!(Some(&json_of(resp).await), written.last());
}

/// How many revisions of the twin's document "panel" the store keeps, read past the API
/// (which answers 404 for a deleted document whatever is left behind).
async fn stored_revisions(app: &TestApp, id: &str) -> u64 {
    app.store()
        .documents
        .versions(id, "panel", PageRequest::new(0, 100).expect("page"))
        .await
        .expect("versions")
        .total
}

async fn deleting_a_document_or_its_twin_deletes_its_history() {
    let app = spawn_app().await;
    let (id, _) = history(&app).await;
    let resp = send(app.authed(Method::DELETE, &doc_path(&id, "panel"), ALICE)).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        stored_revisions(&app, &id).await,
        0,
        "of a deleted document"
    );
    let resp = app
        .get(&format!("{}/versions", doc_path(&id, "panel")), ALICE)
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Made again, the document starts a new history.
    let doc = write(&app, &id, "panel", Method::PATCH, json!({"again": 1})).await;
    let page = versions(&app, &id, &[]).await;
    assert_eq!(
        page["versions"],
        json!([{"version": 1, "updated": doc["updated"], "op": "create",
                "by": {"kind": "user", "id": ALICE_ID}}])
    );

    let resp = app.delete_twin(ALICE, &id).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(stored_revisions(&app, &id).await, 0, "of a deleted twin");
}

async fn inband_and_request_reply_writes_are_recorded_with_their_writer() {
    let app = with_request_reply("twins").await;
    let ch = uuid::Uuid::new_v4().to_string();
    let id = app
        .create_id(
            ALICE,
            &json!({"definition": {"attributes": [{"name": "x", "channel": ch}]}}),
        )
        .await;
    let mut written = Vec::new();
    let (outcome, doc) = device(&app, &ch, &id, "panel", "put", json!({"data": {"a": 1}})).await;
    assert_eq!(outcome, "success", "{doc}");
    written.push((doc, "create", json!({"kind": "channel", "id": ch})));
    let doc = ask_until_answered(
        &app,
        format!("twins.{id}.panel.patch"),
        json!({"data": {"b": 2}}),
    )
    .await;
    written.push((doc, "patch", json!({"kind": "service"})));
    let doc = write(&app, &id, "panel", Method::PUT, json!({"c": 3})).await;
    written.push((doc, "put", json!({"kind": "user", "id": ALICE_ID})));
    let (outcome, doc) = device(&app, &ch, &id, "panel", "patch", json!({"data": {"d": 4}})).await;
    assert_eq!(outcome, "success", "{doc}");
    written.push((doc, "patch", json!({"kind": "channel", "id": ch})));

    let want: Vec<Value> = written
        .iter()
        .rev()
        .map(|(doc, op, by)| {
            json!({"version": doc["version"], "updated": doc["updated"], "op": op, "by": by})
        })
        .collect();
    let page = versions(&app, &id, &[]).await;
    assert_eq!(page["versions"], json!(want));
}

async fn bad_history_requests_are_400_and_foreign_twins_404() {
    let app = spawn_app().await;
    let (id, written) = history(&app).await;
    let path = doc_path(&id, "panel");
    let diff = format!("{path}/diff");
    let bad: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (path.as_str(), vec![("version", "0")]),
        (path.as_str(), vec![("version", "-1")]),
        (path.as_str(), vec![("version", "1.5")]),
        (path.as_str(), vec![("version", "two")]),
        (path.as_str(), vec![("at", "yesterday")]),
        (path.as_str(), vec![("at", "2026-13-01T00:00:00Z")]),
        (path.as_str(), vec![("at", "2026-01-02")]),
        (
            path.as_str(),
            vec![("version", "1"), ("at", "2026-01-02T03:04:05Z")],
        ),
        (diff.as_str(), vec![]),
        (diff.as_str(), vec![("to", "1")]),
        (diff.as_str(), vec![("from", "0")]),
        (diff.as_str(), vec![("from", "x")]),
        (diff.as_str(), vec![("from", "1"), ("to", "-2")]),
    ];
    for (path, query) in &bad {
        let resp = app.get_query(path, ALICE, query).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path} {query:?}");
        assert!(json_of(resp).await["error"].is_string());
    }
    let beyond = (written.len() + 1).to_string();
    let resp = app
        .get_query(&diff, ALICE, &[("from", "1"), ("to", &beyond)])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(resp).await, json!({"error": "version not kept"}));

    // Another user's twin is a missing twin, and so is a missing document.
    let versions_path = format!("{path}/versions");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (versions_path.as_str(), vec![]),
        (path.as_str(), vec![("version", "1")]),
        (path.as_str(), vec![("at", "2100-01-01T00:00:00Z")]),
        (diff.as_str(), vec![("from", "1")]),
    ];
    for (path, query) in &cases {
        let resp = app.get_query(path, BOB, query).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path} {query:?}");
        assert_eq!(json_of(resp).await, json!({"error": "entity not found"}));
        let missing = path.replace("/panel", "/absent");
        let resp = app.get_query(&missing, ALICE, query).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{missing} {query:?}");
    }
}

/// A bound that is not a whole number from 0 to 10000 stops start-up before anything
/// starts: one line naming the variable, exit code 2.
#[tokio::test]
async fn a_bad_revision_bound_stops_start_up_with_exit_code_2() {
    for bad in ["-1", "many", "10001", "1.5"] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = format!("sqlite://{}/twins.db", dir.path().display());
        let vars = [
            ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
            ("MG_TWINS_HTTP_PORT", "0"),
            ("MG_TWINS_DB_URL", db.as_str()),
            ("MG_TWINS_DOCUMENT_REVISIONS", bad),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let output = tokio::time::timeout(DEADLINE, twins_command(&vars).output())
            .await
            .expect("the binary stops")
            .expect("the binary runs");
        assert_eq!(output.status.code(), Some(2), "{bad}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{bad}: {stderr}");
        assert!(lines[0].contains("MG_TWINS_DOCUMENT_REVISIONS"), "{stderr}");
        assert!(
            !dir.path().join("twins.db").exists(),
            "{bad}: a store was opened"
        );
    }
}
