//! Documents: get, put, patch, delete, list and delta, with version checks and limits.

use serde_json::{Map, Value, json};

use super::super::ServiceError;
use super::super::documents::{Access, AsOf, Change, DocumentsService, NOT_KEPT, NOT_YET};
use super::{ALICE, BOB, Fixture, object};
use crate::domain::document::{self, Document, DocumentSummary, MAX_DATA_BYTES, WriteOp, Writer};
use crate::domain::twin::Twin;
use crate::service::documents::Documents as _;
use crate::service::fakes::Failure;

const OWNER: Access<'static> = Access::Owner(ALICE);

async fn twin(f: &Fixture) -> Twin {
    f.twin(ALICE, "pump", &[("temp", "ch", "")]).await
}

async fn put(f: &Fixture, t: &Twin, name: &str, data: Value, version: Option<i64>) -> Document {
    f.documents
        .write(OWNER, &t.id, name, Change::Put(object(data)), version)
        .await
        .expect("document written")
        .0
}

/// The version mismatch inside `err`, as (expected, actual).
fn mismatch(err: ServiceError) -> (i64, Option<i64>) {
    match err {
        ServiceError::VersionMismatch(m) => (m.expected_version, m.actual_version),
        other => panic!("not a version mismatch: {other:?}"),
    }
}

/// Data whose compact JSON is exactly `bytes` long.
fn data_of_size(bytes: usize) -> Map<String, Value> {
    let overhead = serde_json::to_vec(&json!({"k": ""})).unwrap().len();
    object(json!({ "k": "x".repeat(bytes - overhead) }))
}

#[tokio::test]
async fn put_creates_version_one_then_each_write_adds_one() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let (first, created) = f
        .documents
        .write(
            OWNER,
            &t.id,
            "desired",
            Change::Put(object(json!({"a": 1}))),
            None,
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.version, 1);
    assert_eq!(
        (first.twin_id.as_str(), first.document_name.as_str()),
        (t.id.as_str(), "desired")
    );
    let (second, created) = f
        .documents
        .write(
            OWNER,
            &t.id,
            "desired",
            Change::Put(object(json!({"b": 2}))),
            None,
        )
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(second.version, 2);
    assert_eq!(second.data, object(json!({"b": 2})), "put replaces");
    assert_eq!(
        f.documents.get(OWNER, &t.id, "desired").await.unwrap(),
        second
    );
}

#[tokio::test]
async fn get_of_a_missing_document_is_not_found_and_a_bad_name_is_invalid() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let err = f.documents.get(OWNER, &t.id, "absent").await.unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    for bad in ["", "has space", "dot.ted", &"n".repeat(65)] {
        let err = f.documents.get(OWNER, &t.id, bad).await.unwrap_err();
        assert!(matches!(err, ServiceError::Invalid(_)), "{bad:?}: {err:?}");
    }
}

#[tokio::test]
async fn patch_merges_into_the_stored_data() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let stored = json!({"mode": "eco", "zones": {"kitchen": 20, "hall": 18}, "list": [1, 2]});
    let patch = json!({"mode": null, "zones": {"hall": 19}, "list": [3], "new": true});
    let before = put(&f, &t, "desired", stored.clone(), None).await;
    let (after, created) = f
        .documents
        .write(
            OWNER,
            &t.id,
            "desired",
            Change::Patch(object(patch.clone())),
            None,
        )
        .await
        .unwrap();
    let mut expected = stored;
    document::merge_patch(&mut expected, &patch);
    assert!(!created);
    assert_eq!(after.data, object(expected));
    assert_eq!(after.version, before.version + 1);
}

#[tokio::test]
async fn patch_of_an_absent_document_creates_it_from_empty() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let patch = json!({"a": {"b": 1}, "gone": null});
    let (doc, created) = f
        .documents
        .write(
            OWNER,
            &t.id,
            "current",
            Change::Patch(object(patch.clone())),
            None,
        )
        .await
        .unwrap();
    let mut expected = json!({});
    document::merge_patch(&mut expected, &patch);
    assert!(created);
    assert_eq!((doc.version, doc.data), (1, object(expected)));
}

#[tokio::test]
async fn a_write_at_the_stored_version_succeeds() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), Some(0)).await;
    let doc = put(&f, &t, "d", json!({"a": 2}), Some(1)).await;
    assert_eq!(doc.version, 2);
}

#[tokio::test]
async fn a_write_at_another_version_is_a_mismatch_with_the_stored_version() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let stored = put(&f, &t, "d", json!({"a": 1}), None).await;
    for (change, version) in [
        (Change::Put(object(json!({"a": 2}))), 7),
        (Change::Patch(object(json!({"a": 2}))), 0),
    ] {
        let err = f
            .documents
            .write(OWNER, &t.id, "d", change, Some(version))
            .await
            .unwrap_err();
        assert_eq!(mismatch(err), (version, Some(stored.version)));
    }
    // A version on an absent document: actual is absent.
    let err = f
        .documents
        .write(OWNER, &t.id, "other", Change::Put(Map::new()), Some(3))
        .await
        .unwrap_err();
    assert_eq!(mismatch(err), (3, None));
    assert_eq!(f.documents.get(OWNER, &t.id, "d").await.unwrap(), stored);
}

#[tokio::test]
async fn a_conditional_write_losing_to_a_concurrent_write_is_a_mismatch_with_its_version() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), None).await;
    f.db.interleave_document_write(Some(object(json!({"theirs": true}))));
    let err = f
        .documents
        .write(
            OWNER,
            &t.id,
            "d",
            Change::Put(object(json!({"ours": true}))),
            Some(1),
        )
        .await
        .unwrap_err();
    assert_eq!(mismatch(err), (1, Some(2)));
    let stored = f.documents.get(OWNER, &t.id, "d").await.unwrap();
    assert_eq!(stored.data, object(json!({"theirs": true})));
}

#[tokio::test]
async fn an_unconditional_patch_retries_when_a_concurrent_write_wins() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), None).await;
    f.db.interleave_document_write(Some(object(json!({"a": 1, "theirs": true}))));
    let (doc, created) = f
        .documents
        .write(
            OWNER,
            &t.id,
            "d",
            Change::Patch(object(json!({"ours": true}))),
            None,
        )
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(f.db.calls("documents.write"), 3, "the put, then one retry");
    assert_eq!(doc.version, 3);
    assert_eq!(
        doc.data,
        object(json!({"a": 1, "theirs": true, "ours": true}))
    );
}

#[tokio::test]
async fn data_over_the_size_limit_is_too_large_and_not_written() {
    let f = Fixture::new();
    let t = twin(&f).await;
    assert!(
        f.documents
            .write(
                OWNER,
                &t.id,
                "max",
                Change::Put(data_of_size(MAX_DATA_BYTES)),
                None
            )
            .await
            .is_ok()
    );
    let err = f
        .documents
        .write(
            OWNER,
            &t.id,
            "big",
            Change::Put(data_of_size(MAX_DATA_BYTES + 1)),
            None,
        )
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, ServiceError::TooLarge(_)), "{err:?}");
    // A patch within the limit that grows the stored data over it.
    let over_half = MAX_DATA_BYTES / 2 + 64;
    put(
        &f,
        &t,
        "grows",
        Value::Object(data_of_size(over_half)),
        None,
    )
    .await;
    let mut patch = data_of_size(over_half);
    let long = patch.remove("k").unwrap();
    patch.insert("k2".into(), long);
    let err = f
        .documents
        .write(OWNER, &t.id, "grows", Change::Patch(patch), None)
        .await
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, ServiceError::TooLarge(_)), "{err:?}");
    assert_eq!(
        f.documents
            .get(OWNER, &t.id, "grows")
            .await
            .unwrap()
            .version,
        1
    );
    assert!(matches!(
        f.documents.get(OWNER, &t.id, "big").await,
        Err(ServiceError::NotFound)
    ));
}

#[tokio::test]
async fn delete_returns_the_deleted_document() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let stored = put(&f, &t, "d", json!({"a": 1}), None).await;
    assert_eq!(
        f.documents.delete(OWNER, &t.id, "d", None).await.unwrap(),
        stored
    );
    assert!(matches!(
        f.documents.get(OWNER, &t.id, "d").await,
        Err(ServiceError::NotFound)
    ));
    let err = f
        .documents
        .delete(OWNER, &t.id, "d", None)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
}

#[tokio::test]
async fn delete_at_another_version_is_a_mismatch_and_keeps_the_document() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), None).await;
    let stored = put(&f, &t, "d", json!({"a": 2}), None).await;
    let err = f
        .documents
        .delete(OWNER, &t.id, "d", Some(1))
        .await
        .unwrap_err();
    assert_eq!(mismatch(err), (1, Some(2)));
    assert_eq!(f.documents.get(OWNER, &t.id, "d").await.unwrap(), stored);
    assert_eq!(
        f.documents
            .delete(OWNER, &t.id, "d", Some(2))
            .await
            .unwrap(),
        stored
    );
}

#[tokio::test]
async fn delete_losing_to_a_concurrent_delete_is_not_found() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), None).await;
    f.db.interleave_document_write(None);
    let err = f
        .documents
        .delete(OWNER, &t.id, "d", None)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
}

#[tokio::test]
async fn list_summarises_the_twins_documents_by_name() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let other = f.twin(ALICE, "other", &[]).await;
    let b = put(&f, &t, "b", json!({}), None).await;
    let a = put(&f, &t, "a", json!({"x": 1}), None).await;
    put(&f, &other, "c", json!({}), None).await;
    let list = f.documents.list(OWNER, &t.id).await.unwrap();
    assert_eq!(
        list,
        vec![DocumentSummary::from(&a), DocumentSummary::from(&b)]
    );
}

#[tokio::test]
async fn delta_lists_what_differs_from_the_other_document() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let desired = json!({"mode": "eco", "zones": {"kitchen": 20, "hall": 18}});
    let reported = json!({"mode": "eco", "zones": {"kitchen": 19}, "extra": 1});
    let d = put(&f, &t, "desired", desired.clone(), None).await;
    put(&f, &t, "reported", json!({}), None).await;
    let r = put(&f, &t, "reported", reported.clone(), None).await;
    let view = f
        .documents
        .delta(OWNER, &t.id, "desired", "reported")
        .await
        .unwrap();
    assert_eq!(
        view.differences,
        document::delta(&object(desired), &object(reported))
    );
    assert!(!view.differences.is_empty());
    assert_eq!(
        (view.version, view.against_version),
        (d.version, Some(r.version))
    );
    assert_eq!(view.against, "reported");
}

#[tokio::test]
async fn delta_against_an_absent_document_compares_with_empty() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let desired = json!({"mode": "eco"});
    put(&f, &t, "desired", desired.clone(), None).await;
    let view = f
        .documents
        .delta(OWNER, &t.id, "desired", "reported")
        .await
        .unwrap();
    assert_eq!(view.against_version, None);
    assert_eq!(
        view.differences,
        document::delta(&object(desired), &Map::new())
    );
    let err = f
        .documents
        .delta(OWNER, &t.id, "absent", "desired")
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
}

#[tokio::test]
async fn documents_of_a_foreign_twin_are_not_found_for_every_operation() {
    let f = Fixture::new();
    let t = twin(&f).await;
    put(&f, &t, "d", json!({"a": 1}), None).await;
    let bob = Access::Owner(BOB);
    let id = t.id.as_str();
    let results = [
        f.documents.list(bob, id).await.map(drop),
        f.documents.get(bob, id, "d").await.map(drop),
        f.documents
            .write(bob, id, "d", Change::Put(Map::new()), None)
            .await
            .map(drop),
        f.documents
            .write(bob, id, "new", Change::Patch(Map::new()), None)
            .await
            .map(drop),
        f.documents.delete(bob, id, "d", None).await.map(drop),
        f.documents.delta(bob, id, "d", "e").await.map(drop),
    ];
    for (i, r) in results.into_iter().enumerate() {
        assert!(
            matches!(r, Err(ServiceError::NotFound)),
            "operation {i}: {r:?}"
        );
    }
    let stored = f.documents.list(OWNER, id).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].version, 1);
}

#[tokio::test]
async fn an_unavailable_store_is_transient_for_reads_and_writes() {
    let f = Fixture::new();
    let t = twin(&f).await;
    f.db.fail("documents", Failure::Unavailable, 2);
    let read = f.documents.get(OWNER, &t.id, "d").await.unwrap_err();
    let write = f
        .documents
        .write(OWNER, &t.id, "d", Change::Put(Map::new()), None)
        .await
        .unwrap_err();
    assert!(
        read.is_transient() && write.is_transient(),
        "{read:?} {write:?}"
    );
    assert!(f.documents.list(OWNER, &t.id).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------- history

#[tokio::test]
async fn each_write_is_recorded_with_the_writer_of_its_access() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let accesses = [OWNER, Access::Channel("ch"), Access::Trusted, OWNER];
    for (i, access) in accesses.iter().enumerate() {
        let change = if i % 2 == 0 {
            Change::Put(object(json!({ "i": i })))
        } else {
            Change::Patch(object(json!({ "j": i })))
        };
        f.documents
            .write(*access, &t.id, "d", change, None)
            .await
            .expect("written");
    }
    let page = crate::domain::PageRequest::new(0, 10).expect("page");
    let listed = f
        .documents
        .versions(OWNER, &t.id, "d", page)
        .await
        .expect("versions");
    let got: Vec<(i64, WriteOp, Writer)> = listed
        .items
        .into_iter()
        .map(|v| (v.version, v.op, v.by))
        .collect();
    let alice = Writer::User { id: ALICE.into() };
    assert_eq!(
        got,
        vec![
            (4, WriteOp::Patch, alice.clone()),
            (3, WriteOp::Put, Writer::Service),
            (2, WriteOp::Patch, Writer::Channel { id: "ch".into() }),
            (1, WriteOp::Create, alice),
        ]
    );
    // Another user sees no such document.
    let foreign = f
        .documents
        .versions(Access::Owner(BOB), &t.id, "d", page)
        .await;
    assert!(
        matches!(foreign, Err(ServiceError::NotFound)),
        "{foreign:?}"
    );
}

#[tokio::test]
async fn versions_beyond_the_current_are_not_kept_and_below_one_are_invalid() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let doc = put(&f, &t, "d", json!({"a": 1}), None).await;
    let read = |v| f.documents.revision(OWNER, &t.id, "d", AsOf::Version(v));
    assert_eq!(read(1).await.expect("kept"), doc);
    assert!(matches!(read(2).await, Err(ServiceError::Absent(NOT_KEPT))));
    for bad in [0, -1] {
        assert!(matches!(read(bad).await, Err(ServiceError::Invalid(_))));
        let diff = f.documents.diff(OWNER, &t.id, "d", bad, None).await;
        assert!(matches!(diff, Err(ServiceError::Invalid(_))), "{diff:?}");
    }
}

#[tokio::test]
async fn a_time_before_the_kept_history_tells_pruned_from_not_yet_created() {
    let f = Fixture::new();
    let t = twin(&f).await;
    let keeping_one = DocumentsService::new(f.store.clone(), 1);
    let mut first = None;
    // One write keeps the whole history; three writes keeping one earlier revision do
    // not.
    for (name, writes) in [("complete", 1), ("pruned", 3)] {
        for i in 0..writes {
            let (doc, _) = keeping_one
                .write(
                    OWNER,
                    &t.id,
                    name,
                    Change::Put(object(json!({ "i": i }))),
                    None,
                )
                .await
                .expect("written");
            first.get_or_insert(doc.updated);
        }
    }
    let before = first.expect("written") - chrono::Duration::milliseconds(1);
    let at = |name| keeping_one.revision(OWNER, &t.id, name, AsOf::Time(before));
    assert!(matches!(
        at("complete").await,
        Err(ServiceError::Absent(NOT_YET))
    ));
    assert!(matches!(
        at("pruned").await,
        Err(ServiceError::Absent(NOT_KEPT))
    ));
}
