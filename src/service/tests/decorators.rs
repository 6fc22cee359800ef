//! The decorators around the use cases: what each operation publishes, and that the
//! use case underneath is unchanged by them.

use std::sync::Arc;

use serde_json::{Value, json};

use super::super::documents::{Access, Change, Documents};
use super::super::fakes::RecordingPublish;
use super::super::inband::{self, Inband};
use super::super::ingest::{Batch, Ingest, Message};
use super::super::notify::{Notifying, Outcome};
use super::super::twins::{NewTwin, TwinUpdate, Twins};
use super::{ALICE, BOB, Fixture, OWN_CHANNEL, object};
use crate::cache::TwinCache;
use crate::cache::memory::MemoryCache;
use crate::domain::twin::TwinName;
use crate::store::Lease;

fn name(n: &str) -> TwinName {
    TwinName::parse(n.into()).expect("name")
}

/// The JSON a success outcome carries.
fn json_of(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Success(bytes) => serde_json::from_slice(bytes).expect("JSON"),
        Outcome::Failure(text) => panic!("a failure: {text}"),
    }
}

/// The operations published, as `(twin, operation, succeeded)`.
fn operations(p: &RecordingPublish) -> Vec<(String, String, bool)> {
    p.published()
        .into_iter()
        .map(|(t, op, o)| (t, op, matches!(o, Outcome::Success(_))))
        .collect()
}

#[tokio::test]
async fn twin_operations_publish_their_outcome_under_the_twin_id() {
    let f = Fixture::new();
    let publish = Arc::new(RecordingPublish::default());
    let twins = Notifying::new(f.twins.clone(), publish.clone());
    let t = twins
        .create(ALICE, NewTwin::new(name("pump"), None, None))
        .await
        .unwrap();
    twins.view(ALICE, &t.id).await.unwrap();
    let update = TwinUpdate {
        name: Some(name("renamed")),
        ..TwinUpdate::default()
    };
    twins.update(ALICE, &t.id, update).await.unwrap();
    twins.view(BOB, &t.id).await.unwrap_err();
    twins.remove(ALICE, &t.id).await.unwrap();
    let id = t.id.clone();
    assert_eq!(
        operations(&publish),
        [
            (id.clone(), "create".into(), true),
            (id.clone(), "get".into(), true),
            (id.clone(), "update".into(), true),
            (id.clone(), "get".into(), false),
            (id.clone(), "remove".into(), true),
        ]
    );
    let published = publish.published();
    assert_eq!(json_of(&published[0].2)["name"], "pump");
    assert_eq!(json_of(&published[4].2), json!({ "deleted": id }));
    // The failure carries the public text, never a cause.
    assert_eq!(published[3].2, Outcome::Failure("entity not found".into()));
}

#[tokio::test]
async fn nothing_is_published_for_ids_that_name_no_twin_or_deletions_of_nothing() {
    let f = Fixture::new();
    let publish = Arc::new(RecordingPublish::default());
    let twins = Notifying::new(f.twins.clone(), publish.clone());
    twins.view(ALICE, "not-a-uuid").await.unwrap_err();
    let missing = uuid::Uuid::new_v4().to_string();
    assert_eq!(twins.remove(ALICE, &missing).await.unwrap(), None);
    twins
        .list(ALICE, &Default::default(), Default::default())
        .await
        .unwrap();
    assert_eq!(operations(&publish), []);
}

#[tokio::test]
async fn document_writes_publish_put_patch_and_delete() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let publish = Arc::new(RecordingPublish::default());
    let docs = Notifying::new(f.documents.clone(), publish.clone());
    let owner = Access::Owner(ALICE);
    let data = object(json!({"on": true}));
    docs.write(owner, &t.id, "desired", Change::Put(data.clone()), None)
        .await
        .unwrap();
    docs.write(owner, &t.id, "desired", Change::Patch(data), Some(7))
        .await
        .unwrap_err();
    docs.get(owner, &t.id, "desired").await.unwrap();
    docs.delete(owner, &t.id, "desired", None).await.unwrap();
    assert_eq!(
        operations(&publish),
        [
            (t.id.clone(), "document.put".into(), true),
            (t.id.clone(), "document.patch".into(), false),
            (t.id.clone(), "document.delete".into(), true),
        ]
    );
}

#[tokio::test]
async fn ingestion_publishes_each_state_written_and_each_rejection_for_a_twin() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "meter", &[("temp", "ch", "")]).await;
    let gone = f.twin(ALICE, "gone", &[("temp", "ch", "")]).await;
    let cache = Arc::new(MemoryCache::new());
    for twin in [&t, &gone] {
        cache.save(twin).await.unwrap();
    }
    // Removed by another instance: the cache here still names it.
    assert!(f.store.twins.remove(ALICE, &gone.id).await.unwrap());
    let lease = Lease {
        group: "g".into(),
        holder: "h".into(),
        ttl: std::time::Duration::from_secs(60),
        start: 0,
    };
    f.store.ingest.lease(&lease).await.unwrap();
    let message = |seq: u64, channel: &str| Message {
        seq,
        channel: channel.into(),
        subtopic: String::new(),
        payload: json!([{"n": "temp", "v": seq}]).to_string().into_bytes(),
        created: 1_600_000_000_000_000_000,
    };
    let messages = [message(1, "ch"), message(2, OWN_CHANNEL)];
    let publish = Arc::new(RecordingPublish::default());
    let ingest = Notifying::new(
        super::super::ingest::IngestService::new(
            f.store.clone(),
            super::super::lookup::TwinLookup::new(f.store.twins.clone(), cache),
            Some(OWN_CHANNEL.into()),
        ),
        publish.clone(),
    );
    let batch = Batch {
        group: "g",
        from: 0,
        to: 2,
        messages: &messages,
        rejected: &[],
    };
    let report = ingest.apply(&batch, &f.aside).await.unwrap();
    assert_eq!(report.inserted(), 1);
    let published = publish.published();
    assert_eq!(published.len(), 2, "{published:?}");
    assert_eq!(
        (published[0].0.as_str(), published[0].1.as_str()),
        (gone.id.as_str(), "save")
    );
    assert_eq!(
        published[0].2,
        Outcome::Failure("message rejected: unknown_twin".into())
    );
    assert_eq!(published[1].0, t.id);
    assert_eq!(json_of(&published[1].2)["payload"], json!({"temp": 1}));
}

#[tokio::test]
async fn inband_get_with_another_version_is_a_mismatch_with_the_stored_one() {
    let f = Fixture::new();
    let t = f
        .twin(ALICE, "pump", &[("temp", "device-channel", "")])
        .await;
    let docs: Arc<dyn Documents> = Arc::new(f.documents.clone());
    let api = Inband::new(docs);
    let put = format!("twins.{}.desired.put", t.id);
    let target = inband::parse(&put).expect("address");
    let access = Access::Channel("device-channel");
    let (ok, doc) = api.answer(access, target, br#"{"data": {"on": 1}}"#).await;
    assert!(ok, "{doc}");
    let get = format!("twins.{}.desired.get", t.id);
    let target = inband::parse(&get).expect("address");
    let (ok, body) = api.answer(access, target, br#"{"version": 5}"#).await;
    assert!(!ok);
    assert_eq!(body["expected_version"], 5);
    assert_eq!(body["actual_version"], 1);
    let (ok, _) = api.answer(Access::Channel("other"), target, b"").await;
    assert!(!ok, "a channel the twin does not bind is refused");
}
