//! Behaviour every store backend must show, written once and run against each.
//!
//! Each `async fn` below is one case taking a fresh, empty [`Store`], and runs as one
//! test per backend: `sqlite::<case>` always, `mongodb::<case>`,
//! `mongodb_replica_set::<case>` and `postgres::<case>` on the servers named by
//! `TWINS_TEST_MONGODB_URL`, `TWINS_TEST_MONGODB_RS_URL` and `TWINS_TEST_POSTGRES_URL`
//! (see `common::backend`: asked for and unreachable is a failure; each case gets its own
//! database, dropped afterwards).
//!
//! Times are whole milliseconds because that is what a BSON date holds.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use common::backend::{self, Backend};
use twins::domain::PageRequest;
use twins::domain::document::{Document, VersionSummary, WriteOp, Writer};
use twins::domain::feed::{ChangeEvent, EventKind};
use twins::domain::history::{Window, summarize};
use twins::domain::sampling::Write;
use twins::domain::state::State;
use twins::domain::time::from_nanos;
use twins::domain::twin::{Attribute, Definition, Twin};
use twins::store::{
    Applied, DocumentWrite, IngestCursor, IngestStep, Lease, OutboxEvent, SeqWrite, Store,
    StoreError, TwinFilter, TwinWrites, Versioned,
};

/// Calls `$then!` with every case, so both backends run the same list.
macro_rules! conformance_cases {
    ($then:ident) => {
        $then!(
            store_answers_ping,
            saved_twin_is_retrieved_unchanged,
            twins_are_scoped_to_their_owner,
            many_twins_are_read_together_whoever_owns_them,
            saving_an_existing_twin_id_is_a_conflict,
            list_pages_in_creation_order_with_the_total,
            list_filters_by_exact_name,
            list_filters_by_top_level_metadata_values,
            list_filters_take_metadata_keys_and_values_literally,
            update_needs_the_expected_revision_and_owner,
            remove_deletes_the_twin_with_its_states_documents_and_cursor,
            remove_by_another_owner_deletes_nothing,
            ids_by_attribute_only_sees_the_current_definition,
            ids_by_attribute_matches_exact_and_wildcard_subtopics,
            ids_by_attribute_needs_channel_and_subtopic_on_one_attribute,
            ids_by_attribute_follows_updates,
            states_save_update_and_latest,
            saving_an_existing_state_id_is_a_conflict,
            states_list_pages_by_id_with_total_from_latest,
            range_pages_the_window_in_history_order_with_its_total,
            range_bounds_finer_than_a_millisecond_are_exact,
            range_of_a_history_in_time_order_or_out_of_it_matches_the_oracle,
            state_at_is_the_latest_created_not_after_the_instant,
            summary_matches_the_state_by_state_definition,
            history_of_a_twin_without_states_is_empty,
            prune_removes_old_states_from_the_first_id_never_the_latest,
            prune_stops_at_a_newer_state_and_keeps_pages_by_id_right,
            twin_ids_after_walks_every_twin_in_id_order,
            cursor_of_an_unknown_twin_is_empty,
            apply_writes_states_and_moves_the_cursor,
            apply_with_a_stale_sequence_is_a_conflict_and_writes_nothing,
            apply_from_zero_conflicts_once_a_cursor_exists,
            apply_keeps_going_past_a_conflicting_twin,
            a_conflict_leaves_the_position_until_the_twin_is_redone,
            concurrent_applies_from_one_cursor_let_exactly_one_win,
            a_new_group_starts_at_the_given_position,
            the_lease_is_exclusive_until_released_or_run_out,
            the_position_moves_only_from_where_it_is,
            rewinding_forgets_every_twin_sequence,
            document_write_without_version_creates_only,
            document_write_with_version_is_conditional,
            concurrent_conditional_document_writes_let_exactly_one_win,
            document_delete_with_and_without_version,
            documents_list_by_name_per_twin,
            document_writes_keep_revisions_newest_first_with_how_and_by_whom,
            revisions_are_pruned_to_the_bound_oldest_first,
            no_revisions_kept_leaves_the_current_version_only,
            revision_at_is_the_newest_written_at_or_before_the_time,
            deleting_a_document_or_its_twin_deletes_its_revisions,
            outbox_records_events_with_committed_writes_only,
            outbox_records_state_events_of_the_twins_applied_only,
            outbox_pages_in_id_order_and_forgets_what_was_relayed,
        );
    };
}

/// One module of tests per backend, each case on a store of its own.
macro_rules! on_backend {
    ($module:ident, $backend:ident, $($case:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::backend::run(super::Backend::$backend, async {
                        let store = super::backend::store(dir.path()).await;
                        super::$case(&store).await;
                    })
                    .await;
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($case:ident),* $(,)?) => {
        on_backend!(sqlite, Sqlite, $($case),*);
        on_backend!(mongodb, MongoDb, $($case),*);
        on_backend!(mongodb_replica_set, MongoDbReplicaSet, $($case),*);
        on_backend!(postgres, Postgres, $($case),*);
    };
}

conformance_cases!(every_backend);

// The stores that record a step's events last in its transaction.
on_backend!(sqlite_stamps, Sqlite, step_events_are_stamped_when_recorded);
on_backend!(
    postgres_stamps,
    Postgres,
    step_events_are_stamped_when_recorded
);

/// SQLite's ingestion steps hand their outbox entries over to the relay of the process
/// once they commit: exactly the entries the outbox holds, same ids, message ids,
/// owners and payloads, and none of a twin the step refused.
#[tokio::test]
async fn sqlite_hands_over_the_entries_its_steps_record() {
    let dir = tempfile::tempdir().unwrap();
    backend::run(Backend::Sqlite, async {
        let store = backend::store(dir.path()).await;
        outbox_records_state_events_of_the_twins_applied_only(&store).await;
        let entries = store.outbox.pending(1_000).await.unwrap();
        assert_eq!(entries.len(), 3);
        let handed = store.recorded.take_after(entries[0].id - 1, 1_000);
        assert_eq!(handed, entries);
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Fixtures

const ALICE: &str = "alice";
const BOB: &str = "bob";
/// 2020-05-05T08:41:39.142Z.
const T0_MS: i64 = 1_588_668_099_142;

fn at(ms: i64) -> DateTime<Utc> {
    from_nanos(ms * 1_000_000)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn attr(name: &str, channel: &str, subtopic: &str, persist_state: bool) -> Attribute {
    Attribute {
        name: name.into(),
        channel: channel.into(),
        subtopic: subtopic.into(),
        persist_state,
        record: None,
    }
}

/// A twin of `owner` whose definitions have these attributes, oldest first.
fn twin(owner: &str, name: &str, definitions: Vec<Vec<Attribute>>) -> Twin {
    Twin {
        owner: owner.into(),
        id: Uuid::new_v4().to_string(),
        name: name.into(),
        revision: definitions.len().saturating_sub(1) as i64,
        created: at(T0_MS),
        updated: at(T0_MS + 1),
        definitions: definitions
            .into_iter()
            .enumerate()
            .map(|(i, attributes)| Definition {
                id: i as i64,
                created: at(T0_MS + i as i64),
                attributes,
                delta: 1_000_000,
            })
            .collect(),
        metadata: Map::new(),
    }
}

fn plain_twin(owner: &str, name: &str) -> Twin {
    twin(owner, name, vec![vec![]])
}

fn state(twin_id: &str, id: i64, payload: Value) -> State {
    State {
        twin_id: twin_id.into(),
        id,
        definition: 0,
        created: at(T0_MS + id * 1000),
        payload: object(payload),
    }
}

fn document(twin_id: &str, name: &str, version: i64, data: Value) -> Document {
    Document {
        twin_id: twin_id.into(),
        document_name: name.into(),
        version,
        updated: at(T0_MS + version),
        data: object(data),
    }
}

/// Revisions kept by the writes of the cases that do not test the bound.
const KEEP: u32 = 100;

/// Who wrote version `v` in the cases: a user, a channel and the service in turn.
fn writer(v: i64) -> Writer {
    match v % 3 {
        1 => Writer::User { id: ALICE.into() },
        2 => Writer::Channel {
            id: "chan-1".into(),
        },
        _ => Writer::Service,
    }
}

/// How version `v` was written in the cases.
fn op(v: i64) -> WriteOp {
    match v {
        1 => WriteOp::Create,
        v if v % 2 == 0 => WriteOp::Put,
        _ => WriteOp::Patch,
    }
}

/// Writes `doc` conditionally on `expected`, keeping [`KEEP`] revisions.
async fn write_doc(
    store: &Store,
    doc: &Document,
    expected: Option<i64>,
) -> Result<Versioned, StoreError> {
    write_keeping(store, doc, expected, KEEP).await
}

async fn write_keeping(
    store: &Store,
    doc: &Document,
    expected: Option<i64>,
    keep: u32,
) -> Result<Versioned, StoreError> {
    let by = writer(doc.version);
    let write = DocumentWrite {
        doc,
        expected,
        op: op(doc.version),
        by: &by,
        keep,
        events: &[],
    };
    store.documents.write(&write).await
}

/// Writes versions 1 to `n` of (t, `name`), version v at `T0_MS + 10 v` with data
/// `{"v": v}`, keeping `keep` revisions; returns what was written.
async fn write_versions(store: &Store, name: &str, n: i64, keep: u32) -> Vec<Document> {
    let mut written = Vec::new();
    for v in 1..=n {
        let mut doc = document("t", name, v, json!({"v": v, "list": [v]}));
        doc.updated = at(T0_MS + 10 * v);
        let expected = (v > 1).then_some(v - 1);
        assert_eq!(
            write_keeping(store, &doc, expected, keep).await.unwrap(),
            Versioned::Done
        );
        written.push(doc);
    }
    written
}

/// What the versions listing of `written` shows when the newest `keep + 1` are kept.
fn kept_summaries(written: &[Document], keep: u32) -> Vec<VersionSummary> {
    let newest = written.last().map_or(0, |d| d.version);
    written
        .iter()
        .rev()
        .filter(|d| d.version >= newest - i64::from(keep))
        .map(|d| VersionSummary {
            version: d.version,
            updated: d.updated,
            op: op(d.version),
            by: writer(d.version),
        })
        .collect()
}

fn page(offset: u64, limit: u64) -> PageRequest {
    PageRequest::new(offset, limit).unwrap()
}

async fn names(store: &Store, owner: &str, filter: TwinFilter) -> Vec<String> {
    let mut names: Vec<String> = store
        .twins
        .list(owner, &filter, page(0, 100))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    names
}

fn metadata_filter(v: Value) -> TwinFilter {
    TwinFilter {
        name: None,
        metadata: Some(object(v)),
    }
}

async fn ids_by_attribute(store: &Store, channel: &str, subtopic: &str) -> Vec<String> {
    let mut ids = store
        .twins
        .ids_by_attribute(channel, subtopic)
        .await
        .unwrap();
    ids.sort();
    ids
}

fn sorted(ids: &[&Twin]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|t| t.id.clone()).collect();
    ids.sort();
    ids
}

async fn cursor(store: &Store, twin_id: &str) -> IngestCursor {
    store.ingest.cursor(twin_id).await.unwrap()
}

/// A twin's writes computed from `expected_seq`, each made by the message of its seq.
fn writes(twin_id: &str, expected_seq: u64, writes: Vec<(Write, u64)>) -> TwinWrites {
    let writes: Vec<SeqWrite> = writes
        .into_iter()
        .map(|(write, seq)| SeqWrite { write, seq })
        .collect();
    TwinWrites {
        twin_id: twin_id.into(),
        expected_seq,
        last_break: twins::domain::history::last_break(writes.iter().map(|w| w.write.state())),
        writes,
        events: Vec::new(),
    }
}

const GROUP: &str = "conformance";

fn lease(holder: &str, ttl: Duration, start: u64) -> Lease {
    Lease {
        group: GROUP.into(),
        holder: holder.into(),
        ttl,
        start,
    }
}

/// Applies the twins' writes as one step of the test group, from wherever its position
/// is (leased as "h"), moving the position on by one; the twins that conflicted.
async fn ingest(store: &Store, twins: Vec<TwinWrites>) -> Vec<String> {
    let from = store
        .ingest
        .lease(&lease("h", Duration::from_secs(60), 0))
        .await
        .unwrap()
        .expect("the test group's lease");
    let step = IngestStep {
        group: GROUP.into(),
        from,
        to: from + 1,
        twins,
    };
    match store.ingest.apply(&step).await.unwrap() {
        Applied::Done { conflicts } => conflicts,
        Applied::Fenced => panic!("fenced from {from}"),
    }
}

// ---------------------------------------------------------------------------------------
// Twins

async fn store_answers_ping(store: &Store) {
    store.ping().await.unwrap();
}

async fn saved_twin_is_retrieved_unchanged(store: &Store) {
    let mut t = twin(
        ALICE,
        "grinding machine 2",
        vec![
            vec![],
            vec![
                attr("engine temperature", "ch-1", "engine", true),
                attr("rpm", "ch-1", ">", false),
                Attribute {
                    record: Some("engine/oil".into()),
                    ..attr("oil", "ch-1", "engine", true)
                },
            ],
        ],
    );
    t.metadata = object(json!({
        "site": "plant-1", "floor": 2, "ratio": 0.5, "on": true, "none": null,
        "tags": ["a", 1], "nested": {"deep": {"x": "y"}},
    }));
    store.twins.save(&t).await.unwrap();
    assert_eq!(store.twins.retrieve(ALICE, &t.id).await.unwrap(), Some(t));
}

async fn twins_are_scoped_to_their_owner(store: &Store) {
    let t = plain_twin(ALICE, "mine");
    store.twins.save(&t).await.unwrap();
    assert_eq!(store.twins.retrieve(BOB, &t.id).await.unwrap(), None);
    assert_eq!(
        store.twins.retrieve(ALICE, "no-such-twin").await.unwrap(),
        None
    );
    let any = store.twins.retrieve_any(&t.id).await.unwrap();
    assert_eq!(any, Some(t));
    assert_eq!(
        store.twins.retrieve_any("no-such-twin").await.unwrap(),
        None
    );
    let bobs = store
        .twins
        .list(BOB, &TwinFilter::default(), page(0, 10))
        .await
        .unwrap();
    assert_eq!((bobs.total, bobs.items.len()), (0, 0));
}

async fn many_twins_are_read_together_whoever_owns_them(store: &Store) {
    let mut saved = Vec::new();
    // More than one query's worth of ids.
    for i in 0..600 {
        let t = plain_twin(if i % 2 == 0 { ALICE } else { BOB }, &format!("t{i}"));
        store.twins.save(&t).await.unwrap();
        saved.push(t);
    }
    let mut ids: Vec<String> = saved.iter().map(|t| t.id.clone()).collect();
    ids.push("no-such-twin".into());
    let found = store.twins.retrieve_many(&ids).await.unwrap();
    assert_eq!(found.len(), saved.len());
    for t in &saved {
        assert_eq!(found.get(&t.id).map(|r| r.as_ref().ok()), Some(Some(t)));
    }
    assert!(store.twins.retrieve_many(&[]).await.unwrap().is_empty());
}

async fn saving_an_existing_twin_id_is_a_conflict(store: &Store) {
    let t = plain_twin(ALICE, "first");
    store.twins.save(&t).await.unwrap();
    let mut again = plain_twin(BOB, "second");
    again.id = t.id.clone();
    let err = store.twins.save(&again).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(store.twins.retrieve_any(&t.id).await.unwrap(), Some(t));
}

async fn list_pages_in_creation_order_with_the_total(store: &Store) {
    let mut created = Vec::new();
    for i in 0..5 {
        let t = plain_twin(ALICE, &format!("twin {i}"));
        store.twins.save(&t).await.unwrap();
        store
            .twins
            .save(&plain_twin(BOB, &format!("other {i}")))
            .await
            .unwrap();
        created.push(t);
    }
    let p = store
        .twins
        .list(ALICE, &TwinFilter::default(), page(1, 2))
        .await
        .unwrap();
    assert_eq!((p.total, p.offset, p.limit), (5, 1, 2));
    assert_eq!(p.items, created[1..3].to_vec());
    let last = store
        .twins
        .list(ALICE, &TwinFilter::default(), page(4, 10))
        .await
        .unwrap();
    assert_eq!(last.items, created[4..].to_vec());
    let beyond = store
        .twins
        .list(ALICE, &TwinFilter::default(), page(5, 10))
        .await
        .unwrap();
    assert_eq!((beyond.total, beyond.items.len()), (5, 0));
}

async fn list_filters_by_exact_name(store: &Store) {
    for (owner, name) in [
        (ALICE, "pump"),
        (ALICE, "pump"),
        (ALICE, "pump 2"),
        (ALICE, "Pump"),
        (BOB, "pump"),
    ] {
        store.twins.save(&plain_twin(owner, name)).await.unwrap();
    }
    let filter = TwinFilter {
        name: Some("pump".into()),
        metadata: None,
    };
    let p = store.twins.list(ALICE, &filter, page(0, 1)).await.unwrap();
    assert_eq!(p.total, 2);
    assert_eq!(p.items.len(), 1);
    assert_eq!(names(store, ALICE, filter).await, ["pump", "pump"]);
}

async fn list_filters_by_top_level_metadata_values(store: &Store) {
    for (name, metadata) in [
        (
            "a",
            json!({"site": "p1", "floor": 2, "tags": ["x", "y"], "opt": null, "nested": {"k": 1}}),
        ),
        ("b", json!({"site": "p1", "floor": 2.0})),
        ("c", json!({"site": "p2", "tags": "x"})),
        ("d", json!({})),
    ] {
        let mut t = plain_twin(ALICE, name);
        t.metadata = object(metadata);
        store.twins.save(&t).await.unwrap();
    }
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["a", "b", "c", "d"]),
        (json!({"site": "p1"}), vec!["a", "b"]),
        // Integers and reals compare as numbers.
        (json!({"site": "p1", "floor": 2}), vec!["a", "b"]),
        (json!({"floor": 2.0}), vec!["a", "b"]),
        (json!({"floor": 2.5}), vec![]),
        // Values compare whole: an array holding "x" is not "x".
        (json!({"tags": "x"}), vec!["c"]),
        (json!({"tags": ["x", "y"]}), vec!["a"]),
        // null matches a null value, not a missing key.
        (json!({"opt": null}), vec!["a"]),
        (json!({"nested": {"k": 1}}), vec!["a"]),
        (json!({"site": "p1", "missing": 1}), vec![]),
        (json!({"site": 1}), vec![]),
    ];
    for (filter, want) in cases {
        assert_eq!(
            names(store, ALICE, metadata_filter(filter.clone())).await,
            want,
            "metadata filter {filter}"
        );
    }
    let both = TwinFilter {
        name: Some("b".into()),
        metadata: Some(object(json!({"site": "p1"}))),
    };
    assert_eq!(names(store, ALICE, both).await, ["b"]);
    assert!(
        names(store, BOB, metadata_filter(json!({"site": "p1"})))
            .await
            .is_empty()
    );
}

async fn list_filters_take_metadata_keys_and_values_literally(store: &Store) {
    for (name, metadata) in [
        ("dotted", json!({"a.b": 1, "a": {"b": 2}})),
        ("nested", json!({"a": {"b": 1}})),
        ("dollar", json!({"$x": "1", "$where": "1"})),
        ("empty key", json!({"": "e", "q\"k": "v'"})),
        (
            "operators",
            json!({"op": {"$where": "1"}, "ne": {"$ne": null}, "deep": [{"$gt": [1, {"$in": []}]}]}),
        ),
        (
            "plain",
            json!({"a": 5, "op": "x", "ne": 1, "deep": [{"$gt": [1]}]}),
        ),
    ] {
        let mut t = plain_twin(ALICE, name);
        t.metadata = object(metadata);
        store.twins.save(&t).await.unwrap();
    }
    let cases: Vec<(Value, Vec<&str>)> = vec![
        // A key is a key, not a path.
        (json!({"a.b": 1}), vec!["dotted"]),
        (json!({"a": {"b": 1}}), vec!["nested"]),
        (json!({"a": {"b": 2}}), vec!["dotted"]),
        // An object is equal as a whole, not as a subset.
        (json!({"a": {}}), vec![]),
        (json!({"$x": "1"}), vec!["dollar"]),
        (json!({"$where": "1"}), vec!["dollar"]),
        (json!({"": "e"}), vec!["empty key"]),
        (json!({"q\"k": "v'"}), vec!["empty key"]),
        (json!({"q\"k": "v"}), vec![]),
        // A value is a value, not an operator.
        (json!({"op": {"$where": "1"}}), vec!["operators"]),
        (json!({"ne": {"$ne": null}}), vec!["operators"]),
        (
            json!({"deep": [{"$gt": [1, {"$in": []}]}]}),
            vec!["operators"],
        ),
        (json!({"deep": [{"$gt": [1]}]}), vec!["plain"]),
        (json!({"a": {"$ne": null}}), vec![]),
        (json!({"a": {"$exists": true}}), vec![]),
        (json!({"a": {"$gt": 0}}), vec![]),
        (json!({"op": {"$in": ["x"]}}), vec![]),
        (json!({"op": {"$where": "true"}}), vec![]),
        (json!({"$where": "1", "$x": "1"}), vec!["dollar"]),
    ];
    for (filter, want) in cases {
        assert_eq!(
            names(store, ALICE, metadata_filter(filter.clone())).await,
            want,
            "metadata filter {filter}"
        );
    }
}

async fn update_needs_the_expected_revision_and_owner(store: &Store) {
    let t = twin(ALICE, "before", vec![vec![attr("a", "ch", "x", true)]]);
    store.twins.save(&t).await.unwrap();
    let mut changed = t.clone();
    changed.name = "after".into();
    changed.revision = 1;
    changed.updated = at(T0_MS + 5000);
    changed.metadata = object(json!({"k": "v"}));
    changed.definitions.push(Definition {
        id: 1,
        created: at(T0_MS + 5000),
        attributes: vec![attr("b", "ch2", ">", false)],
        delta: 7,
    });

    assert!(!store.twins.update(&changed, 3).await.unwrap());
    let mut foreign = changed.clone();
    foreign.owner = BOB.into();
    assert!(!store.twins.update(&foreign, 0).await.unwrap());
    let mut missing = changed.clone();
    missing.id = Uuid::new_v4().to_string();
    assert!(!store.twins.update(&missing, 0).await.unwrap());
    assert_eq!(
        store.twins.retrieve(ALICE, &t.id).await.unwrap(),
        Some(t.clone())
    );

    assert!(store.twins.update(&changed, 0).await.unwrap());
    assert_eq!(
        store.twins.retrieve(ALICE, &t.id).await.unwrap(),
        Some(changed.clone())
    );
    // The revision moved on: the same expectation now fails.
    assert!(!store.twins.update(&changed, 0).await.unwrap());
}

async fn remove_deletes_the_twin_with_its_states_documents_and_cursor(store: &Store) {
    let t = plain_twin(ALICE, "doomed");
    let kept = plain_twin(ALICE, "kept");
    for tw in [&t, &kept] {
        store.twins.save(tw).await.unwrap();
        let conflicts = ingest(
            store,
            vec![writes(
                &tw.id,
                0,
                vec![(Write::Insert(state(&tw.id, 0, json!({"a": 1}))), 5)],
            )],
        )
        .await;
        assert!(conflicts.is_empty());
        let conflicts = ingest(
            store,
            vec![writes(
                &tw.id,
                5,
                vec![(Write::Insert(state(&tw.id, 1, json!({"a": 2}))), 6)],
            )],
        )
        .await;
        assert!(conflicts.is_empty());
        write_doc(
            store,
            &document(&tw.id, "desired", 1, json!({"on": true})),
            None,
        )
        .await
        .unwrap();
    }

    assert!(store.twins.remove(ALICE, &t.id).await.unwrap());
    assert_eq!(store.twins.retrieve(ALICE, &t.id).await.unwrap(), None);
    assert_eq!(cursor(store, &t.id).await, IngestCursor::default());
    let states = store.states.list(&t.id, page(0, 10)).await.unwrap();
    assert_eq!((states.total, states.items.len()), (0, 0));
    assert!(store.documents.list(&t.id).await.unwrap().is_empty());
    assert_eq!(store.documents.get(&t.id, "desired").await.unwrap(), None);
    assert!(!store.twins.remove(ALICE, &t.id).await.unwrap());

    // The other twin keeps everything.
    let c = cursor(store, &kept.id).await;
    assert_eq!(c.seq, 6);
    assert_eq!(c.last.map(|s| s.id), Some(1));
    assert_eq!(store.documents.list(&kept.id).await.unwrap().len(), 1);
}

async fn remove_by_another_owner_deletes_nothing(store: &Store) {
    let t = plain_twin(ALICE, "mine");
    store.twins.save(&t).await.unwrap();
    store
        .states
        .save(&state(&t.id, 0, json!({})))
        .await
        .unwrap();
    assert!(!store.twins.remove(BOB, &t.id).await.unwrap());
    assert!(!store.twins.remove(ALICE, "no-such-twin").await.unwrap());
    assert_eq!(
        store.twins.retrieve(ALICE, &t.id).await.unwrap(),
        Some(t.clone())
    );
    assert!(store.states.latest(&t.id).await.unwrap().is_some());
}

async fn ids_by_attribute_only_sees_the_current_definition(store: &Store) {
    let moved = twin(
        ALICE,
        "moved",
        vec![
            vec![attr("a", "old", "x", true)],
            vec![attr("a", "new", "x", true)],
        ],
    );
    let emptied = twin(
        ALICE,
        "emptied",
        vec![vec![attr("a", "old", "x", true)], vec![]],
    );
    for t in [&moved, &emptied] {
        store.twins.save(t).await.unwrap();
    }
    assert!(ids_by_attribute(store, "old", "x").await.is_empty());
    assert_eq!(ids_by_attribute(store, "new", "x").await, sorted(&[&moved]));
}

async fn ids_by_attribute_matches_exact_and_wildcard_subtopics(store: &Store) {
    let exact = twin(ALICE, "exact", vec![vec![attr("a", "ch", "engine", true)]]);
    let wild = twin(BOB, "wild", vec![vec![attr("a", "ch", ">", false)]]);
    let bare = twin(ALICE, "bare", vec![vec![attr("a", "ch", "", true)]]);
    let elsewhere = twin(
        ALICE,
        "elsewhere",
        vec![vec![attr("a", "other", ">", true)]],
    );
    for t in [&exact, &wild, &bare, &elsewhere] {
        store.twins.save(t).await.unwrap();
    }
    assert_eq!(
        ids_by_attribute(store, "ch", "engine").await,
        sorted(&[&exact, &wild])
    );
    assert_eq!(
        ids_by_attribute(store, "ch", "chassis").await,
        sorted(&[&wild])
    );
    assert_eq!(
        ids_by_attribute(store, "ch", "").await,
        sorted(&[&wild, &bare])
    );
    assert!(
        ids_by_attribute(store, "nothing", "engine")
            .await
            .is_empty()
    );
}

async fn ids_by_attribute_needs_channel_and_subtopic_on_one_attribute(store: &Store) {
    // The channel matches one attribute and the subtopic another: not a match.
    let split = twin(
        ALICE,
        "split",
        vec![vec![
            attr("a", "ch", "chassis", true),
            attr("b", "other", "engine", true),
        ]],
    );
    let twice = twin(
        ALICE,
        "twice",
        vec![vec![
            attr("a", "ch", "engine", true),
            attr("b", "ch", ">", true),
        ]],
    );
    for t in [&split, &twice] {
        store.twins.save(t).await.unwrap();
    }
    assert_eq!(
        ids_by_attribute(store, "ch", "engine").await,
        sorted(&[&twice])
    );
}

async fn ids_by_attribute_follows_updates(store: &Store) {
    let t = twin(ALICE, "t", vec![vec![attr("a", "before", "x", true)]]);
    store.twins.save(&t).await.unwrap();
    assert_eq!(ids_by_attribute(store, "before", "x").await, sorted(&[&t]));
    let mut changed = t.clone();
    changed.revision = 1;
    changed.definitions.push(Definition {
        id: 1,
        created: at(T0_MS + 10),
        attributes: vec![attr("a", "after", "x", true)],
        delta: 1_000_000,
    });
    assert!(store.twins.update(&changed, 0).await.unwrap());
    assert!(ids_by_attribute(store, "before", "x").await.is_empty());
    assert_eq!(ids_by_attribute(store, "after", "x").await, sorted(&[&t]));
    assert!(store.twins.remove(ALICE, &t.id).await.unwrap());
    assert!(ids_by_attribute(store, "after", "x").await.is_empty());
}

// ---------------------------------------------------------------------------------------
// States

async fn states_save_update_and_latest(store: &Store) {
    assert_eq!(store.states.latest("t").await.unwrap(), None);
    let s0 = state("t", 0, json!({"temp": 20.5, "status": "ok"}));
    let s1 = state("t", 1, json!({"temp": 21.0, "on": true, "n": 3}));
    store.states.save(&s0).await.unwrap();
    store.states.save(&s1).await.unwrap();
    store
        .states
        .save(&state("other", 7, json!({})))
        .await
        .unwrap();
    assert_eq!(store.states.latest("t").await.unwrap(), Some(s1.clone()));

    let mut s1b = s1.clone();
    s1b.definition = 2;
    s1b.payload = object(json!({"temp": 22.25, "list": [1, 2]}));
    store.states.update(&s1b).await.unwrap();
    assert_eq!(store.states.latest("t").await.unwrap(), Some(s1b.clone()));
    let all = store.states.list("t", page(0, 10)).await.unwrap();
    assert_eq!(all.items, vec![s0, s1b]);
}

async fn saving_an_existing_state_id_is_a_conflict(store: &Store) {
    let s = state("t", 0, json!({"a": 1}));
    store.states.save(&s).await.unwrap();
    let err = store
        .states
        .save(&state("t", 0, json!({"a": 2})))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(store.states.latest("t").await.unwrap(), Some(s));
}

async fn states_list_pages_by_id_with_total_from_latest(store: &Store) {
    let all: Vec<State> = (0..25).map(|i| state("t", i, json!({"i": i}))).collect();
    for s in &all {
        store.states.save(s).await.unwrap();
    }
    for i in 0..3 {
        store
            .states
            .save(&state("other", i, json!({})))
            .await
            .unwrap();
    }
    let p = store.states.list("t", page(10, 5)).await.unwrap();
    assert_eq!((p.total, p.offset, p.limit), (25, 10, 5));
    assert_eq!(p.items, all[10..15].to_vec());
    let tail = store.states.list("t", page(24, 10)).await.unwrap();
    assert_eq!(tail.items, all[24..].to_vec());
    let beyond = store.states.list("t", page(30, 10)).await.unwrap();
    assert_eq!((beyond.total, beyond.items.len()), (25, 0));
    let none = store.states.list("unknown", page(0, 10)).await.unwrap();
    assert_eq!((none.total, none.items.len()), (0, 0));
}

// ---------------------------------------------------------------------------------------
// History

/// A state of twin "t" created `ms` after T0.
fn state_at_ms(id: i64, ms: i64, payload: Value) -> State {
    State {
        twin_id: "t".into(),
        id,
        definition: id % 2,
        created: at(T0_MS + ms),
        payload: object(payload),
    }
}

/// States with out-of-order times (3 and 6 are older than the state before them), ties on
/// `created` (2 and 4), attributes that come and go, and values of every JSON type.
fn history_fixture() -> Vec<State> {
    vec![
        state_at_ms(0, 0, json!({"temp": 20, "status": "ok"})),
        state_at_ms(1, 1000, json!({"temp": 21.5, "status": "ok", "on": true})),
        state_at_ms(2, 3000, json!({"temp": -4, "on": false, "n": null})),
        state_at_ms(
            3,
            2000,
            json!({"temp": "broken", "pos": {"x": 1, "y": [2, 3]}}),
        ),
        state_at_ms(4, 3000, json!({"temp": 30.25, "status": "hot", "n": 7})),
        state_at_ms(5, 5000, json!({"status": "cold", "only_last": 1})),
        state_at_ms(6, 4000, json!({"temp": 19, "pos": {"x": 2}})),
    ]
}

async fn save_history(store: &Store) -> Vec<State> {
    let states = history_fixture();
    for s in &states {
        store.states.save(s).await.unwrap();
    }
    // Another twin's states, at the same times, must never show.
    for s in &states {
        let mut other = s.clone();
        other.twin_id = "other".into();
        other.payload = object(json!({"temp": 1000, "foreign": true}));
        store.states.save(&other).await.unwrap();
    }
    states
}

fn window_ms(from: Option<i64>, to: Option<i64>) -> Window {
    Window::new(from.map(|m| at(T0_MS + m)), to.map(|m| at(T0_MS + m))).unwrap()
}

/// The oracle: the states of the window by created, then id.
fn expected_window(states: &[State], window: &Window) -> Vec<State> {
    let mut hit: Vec<State> = states
        .iter()
        .filter(|s| window.from.is_none_or(|f| f <= s.created))
        .filter(|s| window.to.is_none_or(|t| s.created <= t))
        .cloned()
        .collect();
    hit.sort_by_key(|s| (s.created, s.id));
    hit
}

/// The oracle: the greatest created not after `t`, ties to the greatest id.
fn expected_at(states: &[State], t: DateTime<Utc>) -> Option<State> {
    states
        .iter()
        .filter(|s| s.created <= t)
        .max_by_key(|s| (s.created, s.id))
        .cloned()
}

async fn range_pages_the_window_in_history_order_with_its_total(store: &Store) {
    let states = save_history(store).await;
    let windows = [
        window_ms(None, None),
        window_ms(None, Some(2500)),
        window_ms(Some(2000), Some(3000)),
        window_ms(Some(1001), None),
        window_ms(Some(3000), Some(3000)),
        window_ms(Some(6000), None),
        window_ms(None, Some(-1)),
    ];
    assert_windows(store, "t", &states, &windows, "fixture").await;
}

/// Each of `windows` at offsets from the start to past the end: the page and its total
/// equal the oracle's over `states`.
async fn assert_windows(
    store: &Store,
    twin: &str,
    states: &[State],
    windows: &[Window],
    label: &str,
) {
    for w in windows {
        let want = expected_window(states, w);
        for (offset, limit) in [
            (0, 100),
            (0, 2),
            (1, 3),
            (5, 2),
            (7, 1),
            (10, 7),
            (want.len() as u64, 3),
            (100, 1),
        ] {
            let got = store
                .states
                .range(twin, w, page(offset, limit))
                .await
                .unwrap();
            let items: Vec<State> = want
                .iter()
                .skip(offset as usize)
                .take(limit as usize)
                .cloned()
                .collect();
            assert_eq!(got.total, want.len() as u64, "{label}: {w:?}");
            assert_eq!((got.offset, got.limit), (offset, limit));
            assert_eq!(got.items, items, "{label}: {w:?} {offset} {limit}");
        }
    }
}

/// Windows over the ordered fixture below: ends on ties, inside, outside.
fn ordered_windows() -> [Window; 8] {
    [
        window_ms(None, None),
        window_ms(Some(0), Some(0)),
        window_ms(Some(1), Some(2999)),
        window_ms(Some(2000), Some(6000)),
        window_ms(Some(5000), None),
        window_ms(None, Some(4000)),
        window_ms(Some(20_000), None),
        window_ms(None, Some(-1)),
    ]
}

/// A history written in time order (ties included) is paged as a run of ids; one state
/// out of order, by a single save or inside an ingested batch, falls back to the time
/// index; once retention has removed the states up to the break, the history is in
/// order again. The pages are the oracle's throughout.
async fn range_of_a_history_in_time_order_or_out_of_it_matches_the_oracle(store: &Store) {
    // Created every 1000 ms in threes (ties), the first half saved one by one, the rest
    // ingested in two batches.
    let mut states: Vec<State> = (0..24)
        .map(|i| state_at_ms(i, (i / 3) * 1000, json!({"i": i})))
        .collect();
    for s in &states[..12] {
        store.states.save(s).await.unwrap();
    }
    let batch = |from: usize, to: usize, seq: u64| {
        writes(
            "t",
            seq,
            states[from..to]
                .iter()
                .map(|s| (Write::Insert(s.clone()), seq + 1))
                .collect(),
        )
    };
    assert!(ingest(store, vec![batch(12, 18, 0)]).await.is_empty());
    assert!(ingest(store, vec![batch(18, 24, 1)]).await.is_empty());
    assert_windows(store, "t", &states, &ordered_windows(), "in order").await;

    // Saved out of order: older than the state before it.
    states.push(state_at_ms(24, 2500, json!({"late": true})));
    store.states.save(&states[24]).await.unwrap();
    states.push(state_at_ms(25, 9000, json!({"i": 25})));
    store.states.save(&states[25]).await.unwrap();
    assert_windows(store, "t", &states, &ordered_windows(), "a late save").await;

    // Out of order inside one ingested batch, on another twin.
    let mut other: Vec<State> = (0..8)
        .map(|i| {
            let mut s = state_at_ms(i, i * 1000, json!({"i": i}));
            s.twin_id = "u".into();
            s
        })
        .collect();
    other[5].created = at(T0_MS + 1500);
    let ws = writes(
        "u",
        0,
        other
            .iter()
            .map(|s| (Write::Insert(s.clone()), 1))
            .collect(),
    );
    assert_eq!(ws.last_break, Some(5));
    assert!(ingest(store, vec![ws]).await.is_empty());
    assert_windows(
        store,
        "u",
        &other,
        &ordered_windows(),
        "a late state in a batch",
    )
    .await;

    // Retention removes the states up to the late one: in order again.
    let before = at(T0_MS + 8999);
    while store.states.prune("t", &before, 100).await.unwrap() > 0 {}
    let kept: Vec<State> = states.iter().filter(|s| s.id >= 25).cloned().collect();
    assert_eq!(
        store.states.list("t", page(0, 100)).await.unwrap().items,
        kept
    );
    assert_windows(
        store,
        "t",
        &kept,
        &ordered_windows(),
        "pruned past the break",
    )
    .await;
}

async fn range_bounds_finer_than_a_millisecond_are_exact(store: &Store) {
    let states = save_history(store).await;
    let ns = chrono::Duration::nanoseconds(1);
    // Just after the ties at 3000 and just before 5000: both ends exclude their neighbour.
    let w = Window::new(Some(at(T0_MS + 3000) + ns), Some(at(T0_MS + 5000) - ns)).unwrap();
    let got = store.states.range("t", &w, page(0, 100)).await.unwrap();
    assert_eq!(got.items, expected_window(&states, &w));
    assert_eq!(got.items.iter().map(|s| s.id).collect::<Vec<_>>(), vec![6]);
    assert_eq!(
        store
            .states
            .at("t", &(at(T0_MS + 1000) - ns))
            .await
            .unwrap(),
        Some(states[0].clone())
    );
}

async fn state_at_is_the_latest_created_not_after_the_instant(store: &Store) {
    let states = save_history(store).await;
    for ms in [
        -1, 0, 1, 999, 1000, 1500, 2000, 2999, 3000, 3500, 4000, 4999, 5000, 9000,
    ] {
        let t = at(T0_MS + ms);
        let got = store.states.at("t", &t).await.unwrap();
        assert_eq!(got, expected_at(&states, t), "at {ms} ms");
    }
    // Before the first state: none; on the tie at 3000, the greater id.
    assert_eq!(store.states.at("t", &at(T0_MS - 1)).await.unwrap(), None);
    let tie = store.states.at("t", &at(T0_MS + 3000)).await.unwrap();
    assert_eq!(tie.map(|s| s.id), Some(4));
}

async fn summary_matches_the_state_by_state_definition(store: &Store) {
    let states = save_history(store).await;
    let windows = [
        window_ms(None, None),
        window_ms(Some(1000), Some(3000)),
        window_ms(Some(2000), None),
        window_ms(Some(3000), Some(3000)),
        window_ms(Some(9000), None),
    ];
    for w in &windows {
        let want = summarize(&expected_window(&states, w));
        let got = store.states.summary("t", w).await.unwrap();
        assert_eq!(got.states, want.states, "{w:?}");
        assert_eq!(
            got.attributes.keys().collect::<Vec<_>>(),
            want.attributes.keys().collect::<Vec<_>>(),
            "{w:?}"
        );
        for (name, a) in &want.attributes {
            let g = &got.attributes[name];
            assert_eq!(
                (g.count, &g.first, &g.last, &g.min, &g.max),
                (a.count, &a.first, &a.last, &a.min, &a.max),
                "{w:?} {name}"
            );
            match (g.mean, a.mean) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9, "{w:?} {name}: {x} {y}"),
                (x, y) => assert_eq!(x, y, "{w:?} {name}"),
            }
        }
    }
}

async fn history_of_a_twin_without_states_is_empty(store: &Store) {
    let all = Window::default();
    let p = store.states.range("none", &all, page(0, 10)).await.unwrap();
    assert_eq!((p.total, p.items.len()), (0, 0));
    assert_eq!(store.states.at("none", &at(T0_MS)).await.unwrap(), None);
    let s = store.states.summary("none", &all).await.unwrap();
    assert_eq!((s.states, s.attributes.len()), (0, 0));
    assert_eq!(store.states.prune("none", &at(T0_MS), 10).await.unwrap(), 0);
}

async fn prune_removes_old_states_from_the_first_id_never_the_latest(store: &Store) {
    let all: Vec<State> = (0..10).map(|i| state("t", i, json!({"i": i}))).collect();
    for s in &all {
        store.states.save(s).await.unwrap();
    }
    store
        .states
        .save(&state("other", 0, json!({})))
        .await
        .unwrap();
    // Every state is older than the cutoff: batches of 4, then the rest but the latest.
    let before = at(T0_MS + 1_000_000);
    let mut removed = Vec::new();
    loop {
        let n = store.states.prune("t", &before, 4).await.unwrap();
        removed.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(removed, vec![4, 4, 1, 0]);
    let left = store.states.list("t", page(0, 10)).await.unwrap();
    assert_eq!((left.total, left.items), (1, vec![all[9].clone()]));
    assert_eq!(
        store.states.latest("t").await.unwrap(),
        Some(all[9].clone())
    );
    assert_eq!(cursor(store, "t").await.last, Some(all[9].clone()));
    // Other twins are untouched.
    assert_eq!(
        store.states.list("other", page(0, 10)).await.unwrap().total,
        1
    );
}

async fn prune_stops_at_a_newer_state_and_keeps_pages_by_id_right(store: &Store) {
    // Created: 0, 1000, ... except state 4, newer than the cutoff, and state 6, as old
    // as state 0 but after state 4.
    let mut all: Vec<State> = (0..10).map(|i| state("t", i, json!({"i": i}))).collect();
    all[4].created = at(T0_MS + 100_000);
    all[6].created = at(T0_MS);
    for s in &all {
        store.states.save(s).await.unwrap();
    }
    // A state created exactly at the cutoff is not older than it.
    let before = at(T0_MS + 3000);
    assert_eq!(store.states.prune("t", &before, 100).await.unwrap(), 3);
    assert_eq!(store.states.prune("t", &before, 100).await.unwrap(), 0);
    let kept = &all[3..];
    let p = store.states.list("t", page(0, 3)).await.unwrap();
    assert_eq!((p.total, p.items), (7, kept[..3].to_vec()));
    let p = store.states.list("t", page(5, 10)).await.unwrap();
    assert_eq!((p.total, p.items), (7, kept[5..].to_vec()));
    let p = store.states.list("t", page(7, 10)).await.unwrap();
    assert_eq!((p.total, p.items.len()), (7, 0));
    let w = Window::default();
    let p = store.states.range("t", &w, page(0, 100)).await.unwrap();
    assert_eq!(p.items, expected_window(kept, &w));
}

async fn twin_ids_after_walks_every_twin_in_id_order(store: &Store) {
    let mut ids = Vec::new();
    for (i, owner) in [ALICE, BOB, ALICE].iter().enumerate() {
        let t = plain_twin(owner, &format!("w{i}"));
        store.twins.save(&t).await.unwrap();
        ids.push(t.id);
    }
    ids.sort();
    let first = store.states.twin_ids_after("", 2).await.unwrap();
    assert_eq!(first, ids[..2].to_vec());
    let rest = store.states.twin_ids_after(&first[1], 2).await.unwrap();
    assert_eq!(rest, ids[2..].to_vec());
    assert!(
        store
            .states
            .twin_ids_after(&ids[2], 2)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn cursor_of_an_unknown_twin_is_empty(store: &Store) {
    assert_eq!(cursor(store, "unknown").await, IngestCursor::default());
    // States saved outside ingestion show up; the sequence stays 0.
    let s = state("t", 0, json!({}));
    store.states.save(&s).await.unwrap();
    assert_eq!(
        cursor(store, "t").await,
        IngestCursor {
            last: Some(s),
            seq: 0
        }
    );
}

async fn apply_writes_states_and_moves_the_cursor(store: &Store) {
    let s0 = state("t", 0, json!({"a": 1}));
    let conflicts = ingest(
        store,
        vec![writes("t", 0, vec![(Write::Insert(s0.clone()), 5)])],
    )
    .await;
    assert!(conflicts.is_empty());
    assert_eq!(
        cursor(store, "t").await,
        IngestCursor {
            last: Some(s0.clone()),
            seq: 5
        }
    );

    let mut s0b = s0.clone();
    s0b.payload = object(json!({"a": 2}));
    let s1 = state("t", 1, json!({"a": 3}));
    let s2 = state("t", 2, json!({"a": 4}));
    let conflicts = ingest(
        store,
        vec![writes(
            "t",
            5,
            vec![
                (Write::Update(s0b.clone()), 6),
                (Write::Insert(s1.clone()), 8),
                (Write::Insert(s2.clone()), 9),
            ],
        )],
    )
    .await;
    assert!(conflicts.is_empty());
    assert_eq!(
        cursor(store, "t").await,
        IngestCursor {
            last: Some(s2.clone()),
            seq: 9
        }
    );
    let all = store.states.list("t", page(0, 10)).await.unwrap();
    assert_eq!(all.items, vec![s0b, s1, s2]);
}

async fn apply_with_a_stale_sequence_is_a_conflict_and_writes_nothing(store: &Store) {
    let s0 = state("t", 0, json!({"a": 1}));
    ingest(
        store,
        vec![writes("t", 0, vec![(Write::Insert(s0.clone()), 5)])],
    )
    .await;
    let mut s0b = s0.clone();
    s0b.payload = object(json!({"a": 99}));
    for stale in [3, 4, 6] {
        let conflicts = ingest(
            store,
            vec![writes(
                "t",
                stale,
                vec![
                    (Write::Update(s0b.clone()), 11),
                    (Write::Insert(state("t", 1, json!({}))), 12),
                ],
            )],
        )
        .await;
        assert_eq!(conflicts, ["t"], "expected_seq {stale}");
    }
    // An insert computed from a stale cursor is refused as well.
    let conflicts = ingest(
        store,
        vec![writes(
            "t",
            4,
            vec![(Write::Insert(state("t", 1, json!({}))), 12)],
        )],
    )
    .await;
    assert_eq!(conflicts, ["t"]);
    assert_eq!(
        cursor(store, "t").await,
        IngestCursor {
            last: Some(s0),
            seq: 5
        }
    );
}

async fn apply_from_zero_conflicts_once_a_cursor_exists(store: &Store) {
    ingest(
        store,
        vec![writes(
            "t",
            0,
            vec![(Write::Insert(state("t", 0, json!({}))), 1)],
        )],
    )
    .await;
    let conflicts = ingest(
        store,
        vec![writes(
            "t",
            0,
            vec![(Write::Insert(state("t", 1, json!({}))), 2)],
        )],
    )
    .await;
    assert_eq!(conflicts, ["t"]);
    let c = cursor(store, "t").await;
    assert_eq!((c.seq, c.last.map(|s| s.id)), (1, Some(0)));
}

/// Where the test group's position is (leased as "h").
async fn position(store: &Store) -> u64 {
    store
        .ingest
        .lease(&lease("h", Duration::from_secs(60), 0))
        .await
        .unwrap()
        .expect("the test group's lease")
}

async fn a_conflict_leaves_the_position_until_the_twin_is_redone(store: &Store) {
    let t0 = state("t", 0, json!({}));
    ingest(store, vec![writes("t", 0, vec![(Write::Insert(t0), 1)])]).await;
    assert_eq!(position(store).await, 1);
    let step = |twins| IngestStep {
        group: GROUP.into(),
        from: 1,
        to: 2,
        twins,
    };
    // "t" is stale (its sequence is 1), "u" is not: "u" is written, the position stays.
    let stale = writes("t", 0, vec![(Write::Insert(state("t", 1, json!({}))), 2)]);
    let fresh = writes("u", 0, vec![(Write::Insert(state("u", 0, json!({}))), 2)]);
    let applied = store.ingest.apply(&step(vec![stale, fresh])).await.unwrap();
    assert_eq!(
        applied,
        Applied::Done {
            conflicts: vec!["t".into()]
        }
    );
    assert_eq!(position(store).await, 1, "message 2 is not passed for t");
    assert_eq!(cursor(store, "u").await.seq, 2);
    // The redo of "t" from its stored sequence moves the position.
    let redone = writes("t", 1, vec![(Write::Insert(state("t", 1, json!({}))), 2)]);
    let applied = store.ingest.apply(&step(vec![redone])).await.unwrap();
    assert_eq!(applied, Applied::Done { conflicts: vec![] });
    assert_eq!(position(store).await, 2);
    assert_eq!(cursor(store, "t").await.seq, 2);
}

async fn apply_keeps_going_past_a_conflicting_twin(store: &Store) {
    ingest(
        store,
        vec![writes(
            "b",
            0,
            vec![(Write::Insert(state("b", 0, json!({}))), 3)],
        )],
    )
    .await;
    let a0 = state("a", 0, json!({"x": 1}));
    let c0 = state("c", 0, json!({"x": 3}));
    let conflicts = ingest(
        store,
        vec![
            writes("a", 0, vec![(Write::Insert(a0.clone()), 10)]),
            writes("b", 1, vec![(Write::Insert(state("b", 1, json!({}))), 10)]),
            writes("c", 0, vec![(Write::Insert(c0.clone()), 10)]),
        ],
    )
    .await;
    assert_eq!(conflicts, ["b"]);
    assert_eq!(cursor(store, "a").await.last, Some(a0));
    assert_eq!(cursor(store, "c").await.last, Some(c0));
    let b = cursor(store, "b").await;
    assert_eq!((b.seq, b.last.map(|s| s.id)), (3, Some(0)));
}

async fn concurrent_applies_from_one_cursor_let_exactly_one_win(store: &Store) {
    let from = store
        .ingest
        .lease(&lease("h", Duration::from_secs(60), 0))
        .await
        .unwrap()
        .expect("lease");
    for expected in [0, 1] {
        let results = join_all((0..8).map(|i| {
            // Steps that leave the position where it is: only the twin's sequence
            // decides between them.
            let step = IngestStep {
                group: GROUP.into(),
                from,
                to: from,
                twins: vec![writes(
                    "t",
                    expected,
                    vec![(
                        Write::Insert(state("t", expected as i64, json!({"writer": i}))),
                        expected + 1,
                    )],
                )],
            };
            async move { (i, store.ingest.apply(&step).await.unwrap()) }
        }))
        .await;
        let winners: Vec<i64> = results
            .iter()
            .filter(|(_, applied)| matches!(applied, Applied::Done { conflicts } if conflicts.is_empty()))
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(winners.len(), 1, "from {expected}: {results:?}");
        let c = cursor(store, "t").await;
        assert_eq!(c.seq, expected + 1);
        let last = c.last.unwrap();
        assert_eq!(
            (last.id, &last.payload["writer"]),
            (expected as i64, &json!(winners[0]))
        );
    }
}

async fn a_new_group_starts_at_the_given_position(store: &Store) {
    let long = Duration::from_secs(60);
    assert_eq!(
        store.ingest.lease(&lease("a", long, 42)).await.unwrap(),
        Some(42)
    );
    // Once the group exists, its position is what was applied, not a new start.
    assert_eq!(
        store.ingest.lease(&lease("a", long, 7)).await.unwrap(),
        Some(42)
    );
    let other = Lease {
        group: "another group".into(),
        ..lease("a", long, 3)
    };
    assert_eq!(store.ingest.lease(&other).await.unwrap(), Some(3));
}

async fn the_lease_is_exclusive_until_released_or_run_out(store: &Store) {
    let long = Duration::from_secs(60);
    assert_eq!(
        store.ingest.lease(&lease("a", long, 5)).await.unwrap(),
        Some(5)
    );
    assert_eq!(
        store.ingest.lease(&lease("b", long, 5)).await.unwrap(),
        None
    );
    // Renewal by the holder.
    assert_eq!(
        store.ingest.lease(&lease("a", long, 5)).await.unwrap(),
        Some(5)
    );
    // Releasing by someone else changes nothing; by the holder, frees it at once.
    store.ingest.release(GROUP, "b").await.unwrap();
    assert_eq!(
        store.ingest.lease(&lease("b", long, 5)).await.unwrap(),
        None
    );
    store.ingest.release(GROUP, "a").await.unwrap();
    assert_eq!(
        store
            .ingest
            .lease(&lease("b", Duration::from_millis(1), 5))
            .await
            .unwrap(),
        Some(5)
    );
    // b's lease runs out by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if store.ingest.lease(&lease("a", long, 5)).await.unwrap() == Some(5) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lease never ran out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn rewinding_forgets_every_twin_sequence(store: &Store) {
    let s0 = state("t", 0, json!({"a": 1}));
    ingest(
        store,
        vec![writes("t", 0, vec![(Write::Insert(s0.clone()), 5)])],
    )
    .await;
    let long = Duration::from_secs(60);
    let p = store
        .ingest
        .lease(&lease("h", long, 0))
        .await
        .unwrap()
        .expect("lease");
    assert_eq!(
        store.ingest.rewind(GROUP, p + 1, 0).await.unwrap(),
        Applied::Fenced
    );
    assert_eq!(cursor(store, "t").await.seq, 5);
    assert_eq!(
        store.ingest.rewind(GROUP, p, 0).await.unwrap(),
        Applied::Done { conflicts: vec![] }
    );
    assert_eq!(
        store.ingest.lease(&lease("h", long, 9)).await.unwrap(),
        Some(0)
    );
    // The states stay; only the sequences of the old stream are forgotten.
    assert_eq!(
        cursor(store, "t").await,
        IngestCursor {
            last: Some(s0),
            seq: 0
        }
    );
}

async fn the_position_moves_only_from_where_it_is(store: &Store) {
    let long = Duration::from_secs(60);
    let p = store
        .ingest
        .lease(&lease("a", long, 10))
        .await
        .unwrap()
        .expect("lease");
    let s0 = state("t", 0, json!({"a": 1}));
    let step = |from: u64, to: u64| IngestStep {
        group: GROUP.into(),
        from,
        to,
        twins: vec![writes("t", 0, vec![(Write::Insert(s0.clone()), to)])],
    };
    // A holder that believes the position is elsewhere writes nothing.
    assert_eq!(
        store.ingest.apply(&step(p + 3, p + 5)).await.unwrap(),
        Applied::Fenced
    );
    assert_eq!(cursor(store, "t").await, IngestCursor::default());
    assert_eq!(
        store.ingest.apply(&step(p, p + 5)).await.unwrap(),
        Applied::Done { conflicts: vec![] }
    );
    assert_eq!(
        store.ingest.lease(&lease("a", long, 0)).await.unwrap(),
        Some(p + 5)
    );
    // The same step again is fenced: its position has gone.
    assert_eq!(
        store.ingest.apply(&step(p, p + 5)).await.unwrap(),
        Applied::Fenced
    );
    // A step of an unknown group is fenced too.
    let unknown = IngestStep {
        group: "nobody".into(),
        ..step(0, 1)
    };
    assert_eq!(store.ingest.apply(&unknown).await.unwrap(), Applied::Fenced);
    assert_eq!(cursor(store, "t").await.seq, p + 5);
}

// ---------------------------------------------------------------------------------------
// Documents

async fn document_write_without_version_creates_only(store: &Store) {
    let d = document(
        "t",
        "desired",
        1,
        json!({"armed": true, "zones": {"a": [1, 2]}}),
    );
    assert_eq!(write_doc(store, &d, None).await.unwrap(), Versioned::Done);
    assert_eq!(
        store.documents.get("t", "desired").await.unwrap(),
        Some(d.clone())
    );
    let again = document("t", "desired", 1, json!({"armed": false}));
    assert_eq!(
        write_doc(store, &again, None).await.unwrap(),
        Versioned::Stale { actual: Some(1) }
    );
    assert_eq!(store.documents.get("t", "desired").await.unwrap(), Some(d));
    assert_eq!(store.documents.get("t", "current").await.unwrap(), None);
    assert_eq!(store.documents.get("u", "desired").await.unwrap(), None);
}

async fn document_write_with_version_is_conditional(store: &Store) {
    let v1 = document("t", "desired", 1, json!({"a": 1}));
    write_doc(store, &v1, None).await.unwrap();
    let v2 = document("t", "desired", 2, json!({"a": 2}));
    assert_eq!(
        write_doc(store, &v2, Some(1)).await.unwrap(),
        Versioned::Done
    );
    assert_eq!(
        store.documents.get("t", "desired").await.unwrap(),
        Some(v2.clone())
    );
    let late = document("t", "desired", 2, json!({"a": "late"}));
    assert_eq!(
        write_doc(store, &late, Some(1)).await.unwrap(),
        Versioned::Stale { actual: Some(2) }
    );
    assert_eq!(store.documents.get("t", "desired").await.unwrap(), Some(v2));
    let absent = document("t", "current", 2, json!({}));
    assert_eq!(
        write_doc(store, &absent, Some(1)).await.unwrap(),
        Versioned::Stale { actual: None }
    );
    assert_eq!(store.documents.get("t", "current").await.unwrap(), None);
}

async fn concurrent_conditional_document_writes_let_exactly_one_win(store: &Store) {
    write_doc(store, &document("t", "d", 1, json!({})), None)
        .await
        .unwrap();
    let results = join_all((0..8).map(|i| async move {
        write_doc(store, &document("t", "d", 2, json!({"writer": i})), Some(1))
            .await
            .unwrap()
    }))
    .await;
    let done = results.iter().filter(|r| **r == Versioned::Done).count();
    assert_eq!(done, 1, "{results:?}");
    // Exactly the winner's version 2 is kept, with the winner's data.
    let current = store.documents.get("t", "d").await.unwrap();
    assert_eq!(
        store.documents.revision("t", "d", 2).await.unwrap(),
        current
    );
    assert_eq!(
        store
            .documents
            .versions("t", "d", page(0, 10))
            .await
            .unwrap()
            .total,
        2
    );
    assert!(
        results
            .iter()
            .all(|r| *r == Versioned::Done || *r == Versioned::Stale { actual: Some(2) }),
        "{results:?}"
    );
    // The same holds for creation.
    let results = join_all((0..8).map(|i| async move {
        write_doc(store, &document("t", "new", 1, json!({"writer": i})), None)
            .await
            .unwrap()
    }))
    .await;
    assert_eq!(
        results.iter().filter(|r| **r == Versioned::Done).count(),
        1,
        "{results:?}"
    );
}

async fn document_delete_with_and_without_version(store: &Store) {
    assert_eq!(
        store.documents.delete("t", "d", None).await.unwrap(),
        Versioned::Stale { actual: None }
    );
    assert_eq!(
        store.documents.delete("t", "d", Some(1)).await.unwrap(),
        Versioned::Stale { actual: None }
    );
    write_doc(store, &document("t", "d", 1, json!({})), None)
        .await
        .unwrap();
    write_doc(store, &document("t", "d", 2, json!({"k": 1})), Some(1))
        .await
        .unwrap();
    assert_eq!(
        store.documents.delete("t", "d", Some(1)).await.unwrap(),
        Versioned::Stale { actual: Some(2) }
    );
    assert!(store.documents.get("t", "d").await.unwrap().is_some());
    assert_eq!(
        store.documents.delete("t", "d", Some(2)).await.unwrap(),
        Versioned::Done
    );
    assert_eq!(store.documents.get("t", "d").await.unwrap(), None);

    write_doc(store, &document("t", "e", 1, json!({})), None)
        .await
        .unwrap();
    assert_eq!(
        store.documents.delete("t", "e", None).await.unwrap(),
        Versioned::Done
    );
    assert_eq!(store.documents.get("t", "e").await.unwrap(), None);
}

async fn documents_list_by_name_per_twin(store: &Store) {
    for (twin_id, name) in [("t", "b"), ("t", "a"), ("t", "c"), ("u", "z")] {
        write_doc(
            store,
            &document(twin_id, name, 1, json!({"big": "data"})),
            None,
        )
        .await
        .unwrap();
    }
    write_doc(store, &document("t", "c", 2, json!({})), Some(1))
        .await
        .unwrap();
    let listed = store.documents.list("t").await.unwrap();
    let got: Vec<(String, i64, DateTime<Utc>)> = listed
        .into_iter()
        .map(|s| (s.document_name, s.version, s.updated))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), 1, at(T0_MS + 1)),
            ("b".into(), 1, at(T0_MS + 1)),
            ("c".into(), 2, at(T0_MS + 2)),
        ]
    );
    assert_eq!(store.documents.list("u").await.unwrap().len(), 1);
    assert!(store.documents.list("none").await.unwrap().is_empty());
}

async fn document_writes_keep_revisions_newest_first_with_how_and_by_whom(store: &Store) {
    let written = write_versions(store, "d", 5, KEEP).await;
    let want = kept_summaries(&written, KEEP);
    let all = store
        .documents
        .versions("t", "d", page(0, 10))
        .await
        .unwrap();
    assert_eq!(all.total, 5);
    assert_eq!(all.items, want);
    let middle = store
        .documents
        .versions("t", "d", page(1, 2))
        .await
        .unwrap();
    assert_eq!(middle.total, 5);
    assert_eq!(middle.items, want[1..3].to_vec());
    let past = store
        .documents
        .versions("t", "d", page(5, 2))
        .await
        .unwrap();
    assert_eq!((past.total, past.items.len()), (5, 0));
    for doc in &written {
        assert_eq!(
            store
                .documents
                .revision("t", "d", doc.version)
                .await
                .unwrap(),
            Some(doc.clone()),
            "version {}",
            doc.version
        );
    }
    assert_eq!(store.documents.revision("t", "d", 6).await.unwrap(), None);
    assert_eq!(store.documents.revision("u", "d", 1).await.unwrap(), None);
    assert_eq!(store.documents.revision("t", "e", 1).await.unwrap(), None);
    let none = store
        .documents
        .versions("t", "e", page(0, 10))
        .await
        .unwrap();
    assert_eq!((none.total, none.items.len()), (0, 0));
}

async fn revisions_are_pruned_to_the_bound_oldest_first(store: &Store) {
    for keep in [1_u32, 3] {
        let name = format!("keep{keep}");
        let written = write_versions(store, &name, 7, keep).await;
        let want = kept_summaries(&written, keep);
        assert_eq!(want.len() as u32, keep + 1);
        let listed = store
            .documents
            .versions("t", &name, page(0, 100))
            .await
            .unwrap();
        assert_eq!(listed.total, u64::from(keep) + 1);
        assert_eq!(listed.items, want);
        for doc in &written {
            let kept = want.iter().any(|s| s.version == doc.version);
            assert_eq!(
                store
                    .documents
                    .revision("t", &name, doc.version)
                    .await
                    .unwrap(),
                kept.then(|| doc.clone()),
                "keep {keep}, version {}",
                doc.version
            );
        }
    }
}

async fn no_revisions_kept_leaves_the_current_version_only(store: &Store) {
    let written = write_versions(store, "d", 4, 0).await;
    let listed = store
        .documents
        .versions("t", "d", page(0, 10))
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.items, kept_summaries(&written, 0));
    assert_eq!(store.documents.revision("t", "d", 3).await.unwrap(), None);
    assert_eq!(
        store.documents.revision("t", "d", 4).await.unwrap(),
        written.last().cloned()
    );
}

async fn revision_at_is_the_newest_written_at_or_before_the_time(store: &Store) {
    let written = write_versions(store, "d", 4, KEEP).await;
    // Before the first write, exactly at each write and between writes.
    let mut times: Vec<i64> = vec![T0_MS, T0_MS + 9, T0_MS + 1000];
    for doc in &written {
        let ms = doc.updated.timestamp_millis();
        times.extend([ms - 1, ms, ms + 1]);
    }
    for t in times {
        let want = written.iter().rev().find(|d| d.updated <= at(t)).cloned();
        assert_eq!(
            store.documents.revision_at("t", "d", &at(t)).await.unwrap(),
            want,
            "at {t}"
        );
    }
    assert_eq!(
        store
            .documents
            .revision_at("t", "other", &at(T0_MS + 1000))
            .await
            .unwrap(),
        None
    );
}

async fn deleting_a_document_or_its_twin_deletes_its_revisions(store: &Store) {
    write_versions(store, "d", 3, KEEP).await;
    assert_eq!(
        store.documents.delete("t", "d", Some(3)).await.unwrap(),
        Versioned::Done
    );
    let listed = store
        .documents
        .versions("t", "d", page(0, 10))
        .await
        .unwrap();
    assert_eq!((listed.total, listed.items.len()), (0, 0));
    assert_eq!(store.documents.revision("t", "d", 1).await.unwrap(), None);
    // A document made again under the name starts a history of its own.
    let again = write_versions(store, "d", 1, KEEP).await;
    let listed = store
        .documents
        .versions("t", "d", page(0, 10))
        .await
        .unwrap();
    assert_eq!(listed.items, kept_summaries(&again, KEEP));

    let tw = plain_twin(ALICE, "with documents");
    store.twins.save(&tw).await.unwrap();
    let doc = document(&tw.id, "desired", 1, json!({"on": true}));
    write_doc(store, &doc, None).await.unwrap();
    let next = document(&tw.id, "desired", 2, json!({"on": false}));
    write_doc(store, &next, Some(1)).await.unwrap();
    assert!(store.twins.remove(ALICE, &tw.id).await.unwrap());
    let listed = store
        .documents
        .versions(&tw.id, "desired", page(0, 10))
        .await
        .unwrap();
    assert_eq!((listed.total, listed.items.len()), (0, 0));
    assert_eq!(
        store
            .documents
            .revision(&tw.id, "desired", 1)
            .await
            .unwrap(),
        None
    );
}

#[test]
fn mongodb_urls_get_the_test_database() {
    use backend::with_database;
    assert_eq!(
        with_database("mongodb://localhost:27017", "db1"),
        "mongodb://localhost:27017/db1"
    );
    assert_eq!(
        with_database("mongodb://u:p@h1:1,h2:2/magistrala?replicaSet=rs0", "db1"),
        "mongodb://u:p@h1:1,h2:2/db1?replicaSet=rs0"
    );
    assert_eq!(
        with_database("mongodb+srv://cluster.example.com/?tls=true", "db1"),
        "mongodb+srv://cluster.example.com/db1?tls=true"
    );
}

// ---------------------------------------------------------------------------------------
// Outbox

/// An event of `owner`'s twin whose `new` value is `n`.
fn event(owner: &str, twin_id: &str, kind: EventKind, n: i64) -> OutboxEvent {
    OutboxEvent::new(
        owner,
        ChangeEvent {
            kind,
            twin_id: twin_id.into(),
            time: at(T0_MS + n),
            old: None,
            new: Some(json!({ "n": n, "text": "é \"quoted\"" })),
        },
    )
}

/// The events pending in the outbox, oldest first.
async fn pending(store: &Store) -> Vec<OutboxEvent> {
    let entries = store.outbox.pending(1_000).await.unwrap();
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");
    assert_eq!(store.outbox.backlog().await.unwrap(), entries.len() as u64);
    entries.iter().map(|e| e.event().unwrap()).collect()
}

async fn outbox_records_events_with_committed_writes_only(store: &Store) {
    let tw = plain_twin(ALICE, "recorded");
    let created = [event(ALICE, &tw.id, EventKind::TwinCreated, 1)];
    store.twins.save_recorded(&tw, &created).await.unwrap();
    // A save that fails records nothing.
    let again = [event(ALICE, &tw.id, EventKind::TwinCreated, 2)];
    assert!(matches!(
        store.twins.save_recorded(&tw, &again).await,
        Err(StoreError::Conflict(_))
    ));

    let mut next = tw.clone();
    next.name = "renamed".into();
    next.revision = 1;
    let stale = [event(ALICE, &tw.id, EventKind::TwinUpdated, 3)];
    assert!(!store.twins.update_recorded(&next, 7, &stale).await.unwrap());
    let updated = [
        event(ALICE, &tw.id, EventKind::TwinUpdated, 4),
        event(ALICE, &tw.id, EventKind::TwinUpdated, 5),
    ];
    assert!(
        store
            .twins
            .update_recorded(&next, 0, &updated)
            .await
            .unwrap()
    );

    let doc = document(&tw.id, "d", 1, json!({"on": true}));
    let put = [event(ALICE, &tw.id, EventKind::DocumentPut, 6)];
    let by = writer(1);
    let write = |expected, events| DocumentWrite {
        doc: &doc,
        expected,
        op: op(1),
        by: &by,
        keep: 10,
        events,
    };
    assert_eq!(
        store.documents.write(&write(Some(4), &put)).await.unwrap(),
        Versioned::Stale { actual: None }
    );
    assert_eq!(
        store.documents.write(&write(None, &put)).await.unwrap(),
        Versioned::Done
    );
    let deleted = [event(ALICE, &tw.id, EventKind::DocumentDeleted, 7)];
    for (expected, outcome) in [
        (3, Versioned::Stale { actual: Some(1) }),
        (1, Versioned::Done),
    ] {
        let deleting = store
            .documents
            .delete_recorded(&tw.id, "d", Some(expected), &deleted)
            .await;
        assert_eq!(deleting.unwrap(), outcome);
    }

    // A removal at another revision, or by another owner, records nothing.
    let removed = [event(ALICE, &tw.id, EventKind::TwinDeleted, 8)];
    assert!(
        !store
            .twins
            .remove_recorded(ALICE, &tw.id, Some(0), &removed)
            .await
            .unwrap()
    );
    assert!(
        !store
            .twins
            .remove_recorded(BOB, &tw.id, None, &removed)
            .await
            .unwrap()
    );
    assert!(store.twins.retrieve(ALICE, &tw.id).await.unwrap().is_some());
    assert!(
        store
            .twins
            .remove_recorded(ALICE, &tw.id, Some(1), &removed)
            .await
            .unwrap()
    );

    let expected: Vec<OutboxEvent> = [&created[..], &updated, &put, &deleted, &removed].concat();
    assert_eq!(pending(store).await, expected);
}

async fn outbox_records_state_events_of_the_twins_applied_only(store: &Store) {
    let mut a = writes(
        "a",
        0,
        vec![(Write::Insert(state("a", 0, json!({"v": 1}))), 1)],
    );
    a.events = vec![event(ALICE, "a", EventKind::StateCreated, 1)];
    ingest(store, vec![a.clone()]).await;
    // "a" moved on: its writes and events computed from 0 are refused, b's go in.
    let mut stale = writes(
        "a",
        0,
        vec![(Write::Insert(state("a", 1, json!({"v": 2}))), 2)],
    );
    stale.events = vec![event(ALICE, "a", EventKind::StateCreated, 2)];
    let mut b = writes(
        "b",
        0,
        vec![(Write::Insert(state("b", 0, json!({"v": 3}))), 2)],
    );
    b.events = vec![
        event(BOB, "b", EventKind::StateCreated, 3),
        event(BOB, "b", EventKind::StateUpdated, 4),
    ];
    assert_eq!(ingest(store, vec![stale, b.clone()]).await, vec!["a"]);
    let ended = Utc::now();
    let stored = pending(store).await;
    let given = [a.events, b.events].concat();
    // The events as given, but for their time: the caller's stamp, or a later one the
    // store took while the step ran (see `step_events_are_stamped_when_recorded`).
    let unstamped = |events: &[OutboxEvent]| -> Vec<OutboxEvent> {
        let mut events = events.to_vec();
        for e in &mut events {
            e.event.time = at(0);
        }
        events
    };
    assert_eq!(unstamped(&stored), unstamped(&given));
    for (s, g) in stored.iter().zip(&given) {
        assert!(
            s.event.time == g.event.time || (s.event.time > g.event.time && s.event.time <= ended),
            "{} stamped {} (given {})",
            s.msg_id,
            s.event.time,
            g.event.time
        );
    }
}

/// A store that records a step's events last in its transaction stamps them then, not
/// with the caller's time: every event of a step carries one time, taken while the step
/// ran, in the outbox and in the entries handed to the relay alike.
async fn step_events_are_stamped_when_recorded(store: &Store) {
    let mut tw = writes(
        "stamped",
        0,
        vec![
            (Write::Insert(state("stamped", 0, json!({"v": 1}))), 1),
            (Write::Insert(state("stamped", 1, json!({"v": 2}))), 1),
        ],
    );
    // Stamped by the caller long before the step.
    tw.events = vec![
        event(ALICE, "stamped", EventKind::StateCreated, 1),
        event(ALICE, "stamped", EventKind::StateCreated, 2),
    ];
    // The store's stamps are whole milliseconds.
    let began = at(Utc::now().timestamp_millis());
    assert!(ingest(store, vec![tw.clone()]).await.is_empty());
    let ended = Utc::now();
    let entries = store.outbox.pending(1_000).await.unwrap();
    let stored: Vec<OutboxEvent> = entries.iter().map(|e| e.event().unwrap()).collect();
    assert_eq!(stored.len(), 2);
    let time = stored[0].event.time;
    assert!(
        began <= time && time <= ended,
        "{began} <= {time} <= {ended}"
    );
    for (entry, (s, given)) in entries.iter().zip(stored.iter().zip(&tw.events)) {
        assert_eq!(s.event.time, time);
        assert_eq!(entry.time, time);
        let mut restamped = given.clone();
        restamped.event.time = time;
        assert_eq!(*s, restamped);
    }
}

async fn outbox_pages_in_id_order_and_forgets_what_was_relayed(store: &Store) {
    let tw = plain_twin(ALICE, "many");
    let events: Vec<OutboxEvent> = (0..7)
        .map(|n| event(ALICE, &tw.id, EventKind::TwinUpdated, n))
        .collect();
    store.twins.save_recorded(&tw, &events).await.unwrap();
    let first = store.outbox.pending(3).await.unwrap();
    assert_eq!(
        first.iter().map(|e| e.event().unwrap()).collect::<Vec<_>>(),
        events[..3]
    );
    // What was recorded after an entry, from where the first page ended.
    let after = store.outbox.pending_after(first[2].id, 2).await.unwrap();
    assert_eq!(
        after.iter().map(|e| e.event().unwrap()).collect::<Vec<_>>(),
        events[3..5]
    );
    let tail = store.outbox.pending_after(first[2].id, 100).await.unwrap();
    assert_eq!(tail.len(), 4);
    assert!(
        store
            .outbox
            .pending_after(tail[3].id, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let ids: Vec<i64> = first.iter().map(|e| e.id).collect();
    store.outbox.relayed(&ids).await.unwrap();
    // Relayed twice (a relay that died before it knew) is harmless.
    store.outbox.relayed(&ids).await.unwrap();
    store.outbox.relayed(&[]).await.unwrap();
    assert_eq!(pending(store).await, events[3..]);
    // Ids keep increasing once the outbox is empty.
    let rest: Vec<i64> = store
        .outbox
        .pending(100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    store.outbox.relayed(&rest).await.unwrap();
    assert_eq!(store.outbox.backlog().await.unwrap(), 0);
    let later = [event(ALICE, &tw.id, EventKind::TwinDeleted, 9)];
    assert!(
        store
            .twins
            .remove_recorded(ALICE, &tw.id, None, &later)
            .await
            .unwrap()
    );
    let last = store.outbox.pending(10).await.unwrap();
    assert_eq!(last.len(), 1);
    assert!(last[0].id > *rest.last().unwrap());
}
