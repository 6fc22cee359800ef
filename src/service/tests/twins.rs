//! Twins and states: create, view, list, update, remove, list states.

use serde_json::json;

use super::super::ServiceError;
use super::super::twins::TwinUpdate;
use super::{ALICE, BOB, Fixture, attribute, definition, object};
use crate::domain::PageRequest;
use crate::domain::state::State;
use crate::domain::twin::{DEFAULT_DELTA, TwinName};
use crate::service::documents::Documents as _;
use crate::service::fakes::Failure;
use crate::service::twins::NewTwin;
use crate::service::twins::Twins as _;
use crate::store::TwinFilter;

fn name(raw: &str) -> TwinName {
    TwinName::parse(raw.into()).expect("name")
}

fn page(offset: u64, limit: u64) -> PageRequest {
    PageRequest::new(offset, limit).expect("page")
}

fn renamed(raw: &str) -> TwinUpdate {
    TwinUpdate {
        name: Some(name(raw)),
        ..TwinUpdate::default()
    }
}

#[tokio::test]
async fn create_stores_revision_zero_with_definition_zero() {
    let f = Fixture::new();
    let created = f
        .twins
        .create(
            ALICE,
            NewTwin::new(
                name("pump"),
                Some(definition(&[("temp", "ch", "engine")], 5)),
                Some(object(json!({"site": "p1"}))),
            ),
        )
        .await
        .unwrap();
    assert_eq!(created.owner, ALICE);
    assert_eq!(created.name, "pump");
    assert_eq!(created.revision, 0);
    assert_eq!(created.created, created.updated);
    assert_eq!(created.metadata, object(json!({"site": "p1"})));
    let expected = definition(&[("temp", "ch", "engine")], 5).into_definition(0, created.created);
    assert_eq!(created.definitions, vec![expected]);
    assert!(uuid::Uuid::parse_str(&created.id).is_ok(), "{}", created.id);
    assert_eq!(
        f.store.twins.retrieve(ALICE, &created.id).await.unwrap(),
        Some(created)
    );
}

#[tokio::test]
async fn create_without_definition_gets_an_empty_one_with_the_default_delta() {
    let f = Fixture::new();
    let created = f
        .twins
        .create(ALICE, NewTwin::new(name(""), None, None))
        .await
        .unwrap();
    let def = created.current_definition().expect("definition 0");
    assert_eq!((def.id, def.delta), (0, DEFAULT_DELTA));
    assert!(def.attributes.is_empty());
    assert!(created.metadata.is_empty());
}

#[tokio::test]
async fn create_passes_each_store_failure_kind_through() {
    let f = Fixture::new();
    for (failure, transient) in [
        (Failure::Unavailable, true),
        (Failure::Conflict, false),
        (Failure::Internal, false),
    ] {
        f.db.fail("twins.save", failure, 1);
        let err = f
            .twins
            .create(ALICE, NewTwin::new(name("x"), None, None))
            .await
            .unwrap_err();
        let kind_kept = match failure {
            Failure::Unavailable => matches!(err, ServiceError::Unavailable(_)),
            Failure::Conflict => matches!(err, ServiceError::Conflict(_)),
            Failure::Internal => matches!(err, ServiceError::Internal(_)),
        };
        assert!(kind_kept, "{failure:?} became {err:?}");
        assert_eq!(err.is_transient(), transient, "{err:?}");
    }
    let all = f
        .twins
        .list(ALICE, &TwinFilter::default(), page(0, 10))
        .await
        .unwrap();
    assert_eq!(all.total, 0);
}

#[tokio::test]
async fn view_finds_the_twin_by_its_id_in_any_case() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), t);
    assert_eq!(f.twins.view(ALICE, &t.id.to_uppercase()).await.unwrap(), t);
}

#[tokio::test]
async fn view_of_a_foreign_missing_or_malformed_id_is_not_found() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (owner, id) in [
        (BOB, t.id.as_str()),
        (ALICE, &missing),
        (ALICE, "not-a-uuid"),
    ] {
        let err = f.twins.view(owner, id).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::NotFound),
            "{owner} {id}: {err:?}"
        );
    }
    // A malformed id is no twin: the store is not even asked.
    assert_eq!(f.db.calls("twins.retrieve"), 2);
}

#[tokio::test]
async fn list_shows_only_the_owners_twins_in_creation_order() {
    let f = Fixture::new();
    let a = f.twin(ALICE, "a", &[]).await;
    f.twin(BOB, "b", &[]).await;
    let c = f.twin(ALICE, "c", &[]).await;
    let p = f
        .twins
        .list(ALICE, &TwinFilter::default(), page(0, 10))
        .await
        .unwrap();
    assert_eq!(p.total, 2);
    assert_eq!(p.items, vec![a, c]);
}

#[tokio::test]
async fn list_filters_by_name_and_metadata() {
    let f = Fixture::new();
    let mut made = Vec::new();
    for (n, meta) in [
        ("pump", json!({"site": "p1", "floor": 2})),
        ("pump", json!({"site": "p2"})),
        ("fan", json!({"site": "p1", "floor": 2.0})),
    ] {
        let t = f
            .twins
            .create(ALICE, NewTwin::new(name(n), None, Some(object(meta))))
            .await
            .unwrap();
        made.push(t);
    }
    let cases = [
        (Some("pump"), None, vec![0, 1]),
        (None, Some(json!({"floor": 2})), vec![0, 2]),
        (Some("pump"), Some(json!({"site": "p2"})), vec![1]),
        (Some("fan"), Some(json!({"site": "p2"})), vec![]),
    ];
    for (by_name, by_metadata, want) in cases {
        let filter = TwinFilter {
            name: by_name.map(str::to_owned),
            metadata: by_metadata.map(object),
        };
        let p = f.twins.list(ALICE, &filter, page(0, 10)).await.unwrap();
        let want: Vec<_> = want.into_iter().map(|i| made[i].clone()).collect();
        assert_eq!(p.total, want.len() as u64, "{filter:?}");
        assert_eq!(p.items, want, "{filter:?}");
    }
}

#[tokio::test]
async fn list_pages_with_the_total_of_matches() {
    let f = Fixture::new();
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(f.twin(ALICE, &format!("t{i}"), &[]).await);
    }
    let p = f
        .twins
        .list(ALICE, &TwinFilter::default(), page(1, 2))
        .await
        .unwrap();
    assert_eq!((p.total, p.offset, p.limit), (5, 1, 2));
    assert_eq!(p.items, created[1..3]);
    let beyond = f
        .twins
        .list(ALICE, &TwinFilter::default(), page(7, 2))
        .await
        .unwrap();
    assert_eq!((beyond.total, beyond.items.len()), (5, 0));
}

#[tokio::test]
async fn update_replaces_name_and_metadata_and_moves_the_revision() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "before", &[("temp", "ch", "")]).await;
    let update = TwinUpdate {
        name: Some(name("after")),
        definition: None,
        metadata: Some(object(json!({"k": "v"}))),
    };
    let updated = f.twins.update(ALICE, &t.id, update).await.unwrap();
    assert_eq!(updated.name, "after");
    assert_eq!(updated.metadata, object(json!({"k": "v"})));
    assert_eq!(updated.revision, t.revision + 1);
    assert_eq!(updated.definitions, t.definitions);
    assert!(updated.updated >= t.updated);
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), updated);
}

#[tokio::test]
async fn update_appends_a_definition_with_the_next_id() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[("temp", "old", "")]).await;
    let update = TwinUpdate {
        definition: Some(definition(&[("temp", "new", ">")], 7)),
        ..TwinUpdate::default()
    };
    let updated = f.twins.update(ALICE, &t.id, update).await.unwrap();
    assert_eq!(updated.definitions.len(), 2);
    assert_eq!(updated.definitions[0], t.definitions[0]);
    let current = updated.current_definition().unwrap();
    assert_eq!(current.id, 1);
    assert_eq!(current.delta, 7);
    assert_eq!(current.attributes, vec![attribute(("temp", "new", ">"))]);
    assert_eq!(current.created, updated.updated);
    assert_eq!(updated.name, "pump", "absent fields stay");
}

#[tokio::test]
async fn appending_beyond_the_definitions_limit_is_too_large_and_writes_nothing() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[("temp", "c0", "")]).await;
    let append = |i: usize| TwinUpdate {
        definition: Some(definition(&[("temp", &format!("c{i}"), "")], 0)),
        ..TwinUpdate::default()
    };
    for i in 1..super::MAX_DEFINITIONS {
        f.twins.update(ALICE, &t.id, append(i)).await.unwrap();
    }
    let err = f
        .twins
        .update(ALICE, &t.id, append(super::MAX_DEFINITIONS))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::TooLarge(_)), "{err:?}");
    assert!(err.to_string().contains("at most 5 definitions"), "{err}");
    let stored = f.store.twins.retrieve(ALICE, &t.id).await.unwrap().unwrap();
    assert_eq!(stored.definitions.len(), super::MAX_DEFINITIONS);
    // A twin at the limit can still be renamed.
    f.twins
        .update(ALICE, &t.id, renamed("still"))
        .await
        .unwrap();
}

#[tokio::test]
async fn update_with_nothing_to_change_is_invalid_and_writes_nothing() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let empty = [
        TwinUpdate::default(),
        renamed(""),
        TwinUpdate {
            metadata: Some(object(json!({}))),
            ..TwinUpdate::default()
        },
        TwinUpdate {
            definition: Some(definition(&[], 5)),
            ..TwinUpdate::default()
        },
    ];
    for update in empty {
        let err = f.twins.update(ALICE, &t.id, update).await.unwrap_err();
        assert!(matches!(err, ServiceError::Invalid(_)), "{err:?}");
    }
    assert_eq!(f.db.calls("twins.update"), 0);
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), t);
}

#[tokio::test]
async fn update_of_a_foreign_twin_is_not_found_and_changes_nothing() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let err = f
        .twins
        .update(BOB, &t.id, renamed("stolen"))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    let missing = uuid::Uuid::new_v4().to_string();
    let err = f
        .twins
        .update(ALICE, &missing, renamed("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), t);
}

#[tokio::test]
async fn update_retries_when_another_update_wins() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[("temp", "ch0", "")]).await;
    // Between our read and our write another update appends definition 1.
    let theirs = definition(&[("temp", "theirs", "")], 0).into_definition(1, t.created);
    let appended = theirs.clone();
    f.db.interleave_twin_updates(1, move |stored| {
        stored.definitions.push(appended.clone());
        stored.metadata = object(json!({"by": "them"}));
    });
    let update = TwinUpdate {
        definition: Some(definition(&[("temp", "ours", "")], 0)),
        ..TwinUpdate::default()
    };
    let updated = f.twins.update(ALICE, &t.id, update).await.unwrap();
    assert_eq!(f.db.calls("twins.update"), 2, "one retry");
    // Nothing of theirs is lost and ours comes after it.
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.metadata, object(json!({"by": "them"})));
    let ids: Vec<i64> = updated.definitions.iter().map(|d| d.id).collect();
    assert_eq!(ids, [0, 1, 2]);
    assert_eq!(updated.definitions[1], theirs);
    assert_eq!(
        updated.definitions[2].attributes,
        vec![attribute(("temp", "ours", ""))]
    );
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), updated);
}

#[tokio::test(start_paused = true)]
async fn update_gives_up_as_transient_when_other_updates_keep_winning() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let interleaved = 1000;
    f.db.interleave_twin_updates(interleaved, |stored| stored.name = "theirs".into());
    let err = f
        .twins
        .update(ALICE, &t.id, renamed("ours"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let attempts = f.db.calls("twins.update");
    assert!(
        attempts > 1 && attempts < interleaved,
        "{attempts} attempts"
    );
    let stored = f.store.twins.retrieve(ALICE, &t.id).await.unwrap().unwrap();
    assert_eq!(stored.name, "theirs");
    assert_eq!(stored.revision, attempts as i64);
}

#[tokio::test]
async fn remove_deletes_the_twin_with_its_states_and_documents() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "doomed", &[]).await;
    let kept = f.twin(ALICE, "kept", &[]).await;
    for id in [&t.id, &kept.id] {
        f.store.states.save(&state(id, 0)).await.unwrap();
        f.documents
            .write(
                super::super::documents::Access::Owner(ALICE),
                id,
                "desired",
                super::super::documents::Change::Put(object(json!({"on": true}))),
                None,
            )
            .await
            .unwrap();
    }
    assert_eq!(
        f.twins.remove(ALICE, &t.id).await.unwrap(),
        Some(t.id.clone())
    );
    assert!(matches!(
        f.twins.view(ALICE, &t.id).await,
        Err(ServiceError::NotFound)
    ));
    assert!(f.db.states_of(&t.id).is_empty());
    assert!(f.store.documents.list(&t.id).await.unwrap().is_empty());
    assert_eq!(f.db.states_of(&kept.id).len(), 1);
    assert_eq!(f.store.documents.list(&kept.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn remove_of_a_foreign_missing_or_malformed_id_deletes_nothing() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (owner, id) in [(BOB, t.id.as_str()), (ALICE, &missing), (ALICE, "nope")] {
        assert_eq!(f.twins.remove(owner, id).await.unwrap(), None, "{id}");
    }
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), t);
}

#[tokio::test]
async fn remove_fails_while_the_store_is_unavailable() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    f.db.fail("twins.remove", Failure::Unavailable, 1);
    let err = f.twins.remove(ALICE, &t.id).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(f.twins.view(ALICE, &t.id).await.unwrap(), t);
}

fn state(twin_id: &str, id: i64) -> State {
    State {
        twin_id: twin_id.into(),
        id,
        definition: 0,
        created: crate::domain::time::now_millis(),
        payload: object(json!({"temp": id})),
    }
}

#[tokio::test]
async fn list_states_pages_the_twins_states_by_id() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    let all: Vec<State> = (0..7).map(|i| state(&t.id, i)).collect();
    for s in &all {
        f.store.states.save(s).await.unwrap();
    }
    let p = f.twins.list_states(ALICE, &t.id, page(2, 3)).await.unwrap();
    assert_eq!((p.total, p.offset, p.limit), (7, 2, 3));
    assert_eq!(p.items, all[2..5]);
    let tail = f
        .twins
        .list_states(ALICE, &t.id, page(5, 10))
        .await
        .unwrap();
    assert_eq!(tail.items, all[5..]);
}

#[tokio::test]
async fn list_states_of_a_foreign_or_missing_twin_is_not_found() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "pump", &[]).await;
    f.store.states.save(&state(&t.id, 0)).await.unwrap();
    let missing = uuid::Uuid::new_v4().to_string();
    for (owner, id) in [(BOB, t.id.as_str()), (ALICE, &missing), (ALICE, "x")] {
        let err = f
            .twins
            .list_states(owner, id, page(0, 10))
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::NotFound), "{id}: {err:?}");
    }
}
