//! Black-box tests of a twin's history over HTTP (SPEC section 11): ranges of states,
//! the state in force at an instant, diffs, summaries, and state retention. Every
//! expectation is computed from the states the test stored (an oracle), never written
//! down by hand.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use twins::domain::state::State;

use common::*;

crate::backend_matrix!(
    range_pages_the_window_by_created_then_id,
    without_a_window_states_stay_paged_by_id,
    state_at_is_the_state_in_force_with_its_definition,
    diff_lists_every_changed_attribute_and_a_patch,
    summary_matches_the_states_of_the_window,
    a_twin_without_states_has_an_empty_history,
    bad_times_and_reversed_windows_are_400,
    history_of_a_foreign_missing_or_non_uuid_twin_is_404,
    retention_removes_old_states_but_never_the_latest,
    ingestion_under_retention_applies_every_message_once,
);

/// 2020-05-05T08:41:39.142Z: whole milliseconds, what every backend keeps.
fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2020-05-05T08:41:39.142Z")
        .expect("a time")
        .with_timezone(&Utc)
}

fn ms(offset: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds(offset)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    twins::domain::time::format(&t)
}

fn object(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

/// States with out-of-order times (3 and 6 are older than the state before them), a tie
/// on `created` (2 and 4), attributes that come and go, two definitions.
fn fixture(twin_id: &str) -> Vec<State> {
    let s = |id: i64, offset: i64, definition: i64, payload: Value| State {
        twin_id: twin_id.to_owned(),
        id,
        definition,
        created: ms(offset),
        payload: object(payload),
    };
    vec![
        s(0, 0, 0, json!({"temp": 20, "status": "ok"})),
        s(
            1,
            1000,
            0,
            json!({"temp": 21.5, "status": "ok", "on": true}),
        ),
        s(2, 3000, 0, json!({"temp": -4, "on": false})),
        s(3, 2000, 1, json!({"temp": "broken", "pos": {"x": 1}})),
        s(4, 3000, 1, json!({"temp": 30.25, "status": "hot", "n": 7})),
        s(5, 5000, 1, json!({"status": "cold", "pos": {"x": 2}})),
        s(6, 4000, 1, json!({"temp": 19, "pos": {"x": 2, "y": [1]}})),
    ]
}

/// A twin of Alice with two definitions and the fixture's states, in id order.
async fn twin_with_history(app: &TestApp) -> (String, Vec<State>) {
    let id = app.create_id(ALICE, &json!({"name": "history"})).await;
    let def = json!({"definition": {"attributes": [
        {"name": "temp", "channel": "c", "subtopic": "s", "persist_state": true}
    ]}});
    let updated = app.put_twin(ALICE, &id, &def).await;
    assert_eq!(updated.status(), StatusCode::OK);
    let states = fixture(&id);
    for s in &states {
        app.store().states.save(s).await.expect("state saved");
    }
    (id, states)
}

fn json_of(states: &[State]) -> Vec<Value> {
    states
        .iter()
        .map(|s| serde_json::to_value(s).expect("a state serializes"))
        .collect()
}

/// The oracle of a window: its states by created, then id.
fn in_window(states: &[State], from: Option<i64>, to: Option<i64>) -> Vec<State> {
    let mut hit: Vec<State> = states
        .iter()
        .filter(|s| from.is_none_or(|f| ms(f) <= s.created))
        .filter(|s| to.is_none_or(|t| s.created <= ms(t)))
        .cloned()
        .collect();
    hit.sort_by_key(|s| (s.created, s.id));
    hit
}

/// The oracle of an instant: the greatest created not after it, ties to the greatest id.
fn in_force(states: &[State], at: DateTime<Utc>) -> Option<State> {
    states
        .iter()
        .filter(|s| s.created <= at)
        .max_by_key(|s| (s.created, s.id))
        .cloned()
}

fn window_query(from: Option<i64>, to: Option<i64>) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(f) = from {
        q.push(("from", rfc3339(ms(f))));
    }
    if let Some(t) = to {
        q.push(("to", rfc3339(ms(t))));
    }
    q
}

async fn get_ok(app: &TestApp, path: &str, query: &[(&str, String)]) -> Value {
    let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let res = app.get_query(path, ALICE, &q).await;
    let status = res.status();
    let body: Value = res.json().await.expect("a JSON body");
    assert_eq!(status, StatusCode::OK, "{path} {query:?}: {body}");
    body
}

async fn get_error(
    app: &TestApp,
    token: &str,
    path: &str,
    query: &[(&str, &str)],
) -> (StatusCode, Value) {
    let res = app.get_query(path, token, query).await;
    let status = res.status();
    let json = res
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
    assert!(json, "{path}: errors are JSON");
    (status, res.json().await.expect("a JSON error body"))
}

const WINDOWS: [(Option<i64>, Option<i64>); 7] = [
    (Some(-5000), Some(9000)),
    (None, Some(2500)),
    (Some(2000), Some(3000)),
    (Some(1001), None),
    (Some(3000), Some(3000)),
    (Some(6000), None),
    (None, Some(-1)),
];

async fn range_pages_the_window_by_created_then_id() {
    let app = spawn_app().await;
    let (id, states) = twin_with_history(&app).await;
    let path = format!("/states/{id}");
    for (from, to) in WINDOWS {
        let want = json_of(&in_window(&states, from, to));
        for (offset, limit) in [(0, 100), (0, 2), (2, 3), (6, 10)] {
            let mut q = window_query(from, to);
            q.push(("offset", offset.to_string()));
            q.push(("limit", limit.to_string()));
            let page = get_ok(&app, &path, &q).await;
            let items: Vec<Value> = want.iter().skip(offset).take(limit).cloned().collect();
            assert_eq!(page["total"], want.len(), "{q:?}");
            assert_eq!(
                (&page["offset"], &page["limit"]),
                (&json!(offset), &json!(limit))
            );
            assert_eq!(page["states"], Value::Array(items), "{q:?}");
        }
    }
}

async fn without_a_window_states_stay_paged_by_id() {
    let app = spawn_app().await;
    let (id, states) = twin_with_history(&app).await;
    let path = format!("/states/{id}");
    let by_id = json_of(&states);
    let page = get_ok(
        &app,
        &path,
        &[("offset", "2".into()), ("limit", "3".into())],
    )
    .await;
    assert_eq!(page["total"], by_id.len());
    assert_eq!(page["states"], Value::Array(by_id[2..5].to_vec()));
    // An empty bound is not a time.
    let (status, _) = get_error(&app, ALICE, &path, &[("from", "")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn state_at_is_the_state_in_force_with_its_definition() {
    let app = spawn_app().await;
    let (id, states) = twin_with_history(&app).await;
    let twin = app.twin(ALICE, &id).await;
    let path = format!("/twins/{id}/states/at");
    // Before the first state, exactly on states, between them, on the tie, after all.
    for offset in [
        -1, 0, 1, 999, 1000, 2000, 2500, 3000, 3999, 4000, 5000, 86_400_000,
    ] {
        let at = ms(offset);
        let q = [("time", rfc3339(at))];
        match in_force(&states, at) {
            None => {
                let (status, body) = get_error(&app, ALICE, &path, &[("time", &q[0].1)]).await;
                assert_eq!(status, StatusCode::NOT_FOUND, "{offset}");
                assert_eq!(body, json!({"error": "no state at that time"}));
            }
            Some(want) => {
                let got = get_ok(&app, &path, &q).await;
                let mut expected = serde_json::to_value(&want).expect("a state");
                let definition = twin["definitions"]
                    .as_array()
                    .expect("definitions")
                    .iter()
                    .find(|d| d["id"] == want.definition)
                    .cloned()
                    .expect("the state's definition");
                expected["definition_in_force"] = definition;
                assert_eq!(got, expected, "at {offset}");
            }
        }
    }
    // The tie at 3000 goes to the greater id; an instant with an offset is the same
    // instant in UTC.
    let got = get_ok(
        &app,
        &path,
        &[("time", "2020-05-05T10:41:42.142+02:00".into())],
    )
    .await;
    assert_eq!(got["id"], 4);
}

/// The oracle of a diff's `changes`: every attribute whose values differ, absent as
/// null, by name.
fn expected_changes(from: &Map<String, Value>, to: &Map<String, Value>) -> Value {
    let names: std::collections::BTreeSet<&String> = from.keys().chain(to.keys()).collect();
    Value::Array(
        names
            .into_iter()
            .filter_map(|n| {
                let a = from.get(n).cloned().unwrap_or(Value::Null);
                let b = to.get(n).cloned().unwrap_or(Value::Null);
                (a != b).then(|| json!({"attribute": n, "from": a, "to": b}))
            })
            .collect(),
    )
}

async fn diff_lists_every_changed_attribute_and_a_patch() {
    let app = spawn_app().await;
    let (id, states) = twin_with_history(&app).await;
    let path = format!("/twins/{id}/states/diff");
    for (t1, t2) in [
        (0, 1000),
        (1000, 3000),
        (-1, 2000),
        (2000, 4000),
        (3000, 3000),
        (-5, -1),
    ] {
        let q = [("from", rfc3339(ms(t1))), ("to", rfc3339(ms(t2)))];
        let got = get_ok(&app, &path, &q).await;
        let from = in_force(&states, ms(t1));
        let to = in_force(&states, ms(t2));
        let json_or_null = |s: &Option<State>| {
            s.as_ref()
                .map_or(Value::Null, |s| serde_json::to_value(s).expect("a state"))
        };
        assert_eq!(got["from"], json_or_null(&from), "{t1}..{t2}");
        assert_eq!(got["to"], json_or_null(&to), "{t1}..{t2}");
        let a = from.map(|s| s.payload).unwrap_or_default();
        let b = to.map(|s| s.payload).unwrap_or_default();
        assert_eq!(got["changes"], expected_changes(&a, &b), "{t1}..{t2}");
        // The patch, applied to the first payload, gives the second.
        let patch: json_patch::Patch =
            serde_json::from_value(got["patch"].clone()).expect("an RFC 6902 patch");
        let mut doc = Value::Object(a);
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        assert_eq!(doc, Value::Object(b), "{t1}..{t2}");
    }
}

/// The oracle of a summary, attribute by attribute over the window's states.
fn expected_summary(states: &[State]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut names: Vec<&String> = states.iter().flat_map(|s| s.payload.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let values: Vec<&Value> = states.iter().filter_map(|s| s.payload.get(name)).collect();
        let numbers: Vec<(f64, &Value)> = values
            .iter()
            .filter_map(|v| v.as_f64().map(|x| (x, *v)))
            .collect();
        let pick = |better: fn(f64, f64) -> bool| {
            numbers
                .iter()
                .fold(None::<(f64, &Value)>, |best, (x, v)| match best {
                    Some((b, _)) if !better(*x, b) => best,
                    _ => Some((*x, *v)),
                })
                .map_or(Value::Null, |(_, v)| v.clone())
        };
        let mean = (!numbers.is_empty())
            .then(|| numbers.iter().map(|(x, _)| x).sum::<f64>() / numbers.len() as f64);
        out.insert(
            name.clone(),
            json!({
                "count": values.len(),
                "first": values.first(),
                "last": values.last(),
                "min": pick(|x, b| x < b),
                "max": pick(|x, b| x > b),
                "mean": mean,
            }),
        );
    }
    out
}

async fn summary_matches_the_states_of_the_window() {
    let app = spawn_app().await;
    let (id, states) = twin_with_history(&app).await;
    let path = format!("/twins/{id}/states/summary");
    for (from, to) in WINDOWS.into_iter().chain([(None, None)]) {
        let got = get_ok(&app, &path, &window_query(from, to)).await;
        let hit = in_window(&states, from, to);
        let bound = |b: Option<i64>| b.map_or(Value::Null, |m| json!(rfc3339(ms(m))));
        assert_eq!((&got["from"], &got["to"]), (&bound(from), &bound(to)));
        assert_eq!(got["states"], hit.len(), "{from:?}..{to:?}");
        let attributes = got["attributes"].as_object().expect("attributes");
        let want = expected_summary(&hit);
        assert_eq!(
            attributes.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            let g = &attributes[name];
            for field in ["count", "first", "last", "min", "max"] {
                assert_eq!(g[field], w[field], "{from:?}..{to:?} {name}.{field}");
            }
            match (g["mean"].as_f64(), w["mean"].as_f64()) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9, "{name}: {x} {y}"),
                _ => assert_eq!(g["mean"], w["mean"], "{name}"),
            }
        }
    }
}

async fn a_twin_without_states_has_an_empty_history() {
    let app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    let page = get_ok(&app, &format!("/states/{id}"), &window_query(Some(0), None)).await;
    assert_eq!((&page["total"], &page["states"]), (&json!(0), &json!([])));
    let (status, body) = get_error(
        &app,
        ALICE,
        &format!("/twins/{id}/states/at"),
        &[("time", &rfc3339(ms(0)))],
    )
    .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "no state at that time"})
        )
    );
    let diff = get_ok(
        &app,
        &format!("/twins/{id}/states/diff"),
        &[("from", rfc3339(ms(0))), ("to", rfc3339(ms(1)))],
    )
    .await;
    assert_eq!(
        diff,
        json!({"from": null, "to": null, "changes": [], "patch": []})
    );
    let summary = get_ok(&app, &format!("/twins/{id}/states/summary"), &[]).await;
    assert_eq!(
        summary,
        json!({"from": null, "to": null, "states": 0, "attributes": {}})
    );
}

async fn bad_times_and_reversed_windows_are_400() {
    let app = spawn_app().await;
    let (id, _) = twin_with_history(&app).await;
    let (early, late) = (rfc3339(ms(0)), rfc3339(ms(1000)));
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("/states/{id}"), vec![("from", "yesterday")]),
        (format!("/states/{id}"), vec![("to", "2020-05-05")]),
        (
            format!("/states/{id}"),
            vec![("from", &late), ("to", &early)],
        ),
        (format!("/twins/{id}/states/at"), vec![]),
        (
            format!("/twins/{id}/states/at"),
            vec![("time", "1588668099")],
        ),
        (format!("/twins/{id}/states/diff"), vec![("from", &early)]),
        (
            format!("/twins/{id}/states/diff"),
            vec![("from", "now"), ("to", &late)],
        ),
        (
            format!("/twins/{id}/states/diff"),
            vec![("from", &late), ("to", &early)],
        ),
        (
            format!("/twins/{id}/states/summary"),
            vec![("from", &late), ("to", &early)],
        ),
        (
            format!("/twins/{id}/states/summary"),
            vec![("to", "2020-13-01T00:00:00Z")],
        ),
    ];
    for (path, query) in cases {
        let (status, body) = get_error(&app, ALICE, &path, &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {query:?}: {body}");
        let message = body["error"].as_str().expect("an error message");
        assert!(!message.is_empty(), "{path} {query:?}");
    }
    let (_, body) = get_error(
        &app,
        ALICE,
        &format!("/states/{id}"),
        &[("from", &late), ("to", &early)],
    )
    .await;
    assert_eq!(body, json!({"error": "from must not be later than to"}));
}

async fn history_of_a_foreign_missing_or_non_uuid_twin_is_404() {
    let app = spawn_app().await;
    let (id, _) = twin_with_history(&app).await;
    let missing = uuid::Uuid::new_v4().to_string();
    let time = rfc3339(ms(3000));
    for (token, twin) in [(BOB, id.as_str()), (ALICE, &missing), (ALICE, "not-a-uuid")] {
        for (path, query) in [
            (format!("/states/{twin}"), vec![("from", time.as_str())]),
            (format!("/twins/{twin}/states/at"), vec![("time", &time)]),
            (
                format!("/twins/{twin}/states/diff"),
                vec![("from", &time), ("to", &time)],
            ),
            (format!("/twins/{twin}/states/summary"), vec![]),
        ] {
            let (status, body) = get_error(&app, token, &path, &query).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body, json!({"error": "entity not found"}), "{path}");
        }
    }
}

/// Counter of states removed by retention, as `/metrics` shows it (0 before the first).
async fn pruned(app: &TestApp) -> u64 {
    app.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("twins_states_pruned_total "))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

async fn retention_removes_old_states_but_never_the_latest() {
    let app = TestApp::builder()
        .vars(&[
            ("MG_TWINS_STATES_RETENTION", "1h"),
            ("MG_TWINS_STATES_PRUNE_INTERVAL", "50ms"),
        ])
        .spawn()
        .await;
    let before = pruned(&app).await;
    let now = Utc::now();
    let old = |hours: i64, id: i64| {
        now - chrono::Duration::hours(hours) + chrono::Duration::milliseconds(id)
    };
    // A twin whose states are all old: only its latest stays.
    // A twin whose states turn recent half-way: the old run before the first recent one goes.
    // A twin with an out-of-order old state after a recent one: it waits behind it.
    let cases: [(Vec<DateTime<Utc>>, usize); 3] = [
        ((0..6).map(|i| old(48, i)).collect(), 5),
        (
            vec![old(5, 0), old(4, 1), old(3, 2), now, now, old(0, 5)],
            3,
        ),
        (vec![old(5, 0), now, old(5, 2), old(5, 3)], 1),
    ];
    let mut twins = Vec::new();
    for (times, _) in &cases {
        let id = app.create_id(ALICE, &json!({})).await;
        let states: Vec<State> = times
            .iter()
            .enumerate()
            .map(|(i, t)| State {
                twin_id: id.clone(),
                id: i as i64,
                definition: 0,
                created: twins::domain::time::from_nanos(t.timestamp_millis() * 1_000_000),
                payload: object(json!({"i": i})),
            })
            .collect();
        for s in &states {
            app.store().states.save(s).await.expect("state saved");
        }
        twins.push((id, states));
    }
    for ((id, states), (_, removed)) in twins.iter().zip(&cases) {
        let want = json_of(&states[*removed..]);
        let page = eventually(
            "retention",
            || async { app.list_states(ALICE, id, &[("limit", "100")]).await },
            |p| p["total"] == want.len(),
        )
        .await;
        assert_eq!(page["states"], Value::Array(want.clone()));
        // The latest state, what ingestion folds into, is still there.
        assert_eq!(
            app.store().states.latest(id).await.expect("latest"),
            states.last().cloned()
        );
    }
    // Every removal is counted.
    let total: usize = cases.iter().map(|(_, r)| r).sum();
    eventually(
        "the counter",
        || pruned(&app),
        |n| *n >= before + total as u64,
    )
    .await;
}

/// Ingestion folds each message into the twin's latest state while retention removes
/// the states before it: every message is applied once, so the ids the messages make
/// are exactly one per message, and a message within the delta of the last one still
/// updates the latest state in place.
async fn ingestion_under_retention_applies_every_message_once() {
    let app = TestApp::builder()
        .auth(Auth::Standalone)
        .vars(&[
            ("MG_TWINS_STATES_RETENTION", "1h"),
            ("MG_TWINS_STATES_PRUNE_INTERVAL", "20ms"),
        ])
        .spawn()
        .await;
    let ch = unique("ch-");
    let tid = app.create_listening(&[attribute("x", &ch, "", true)]).await;
    // Two hours ago, two seconds apart (the delta is one second): each message opens a
    // new state, already older than the retention.
    let start = (Utc::now().timestamp() - 7200) as f64;
    let messages = 40;
    for i in 0..messages {
        let t = start + 2.0 * i as f64;
        app.publish(&ch, "", json!([{"v": i, "t": t}])).await;
    }
    let last_time = start + 2.0 * (messages - 1) as f64;
    let last = |x: i64| {
        json!({
            "twin_id": tid,
            "id": messages - 1,
            "definition": 0,
            "created": rfc3339(twins::domain::time::from_nanos((last_time * 1e9) as i64)),
            "payload": {"x": x},
        })
    };
    // Retention leaves the latest state alone, and it is the one the last message made.
    let states = app
        .states_until(&tid, |s| {
            s.len() == 1 && s[0]["payload"]["x"] == messages - 1
        })
        .await;
    assert_eq!(states[0], last(messages - 1));
    // Within the delta of the latest state: folded into it, not a new state.
    app.publish(&ch, "", json!([{"v": 1000, "t": last_time + 0.5}]))
        .await;
    let states = app
        .states_until(&tid, |s| s.len() == 1 && s[0]["payload"]["x"] == 1000)
        .await;
    assert_eq!(states[0], last(1000));
}
