//! Behaviour every `TwinCache` must show, written once and run against each backend.
//!
//! The in-process cache includes this file in its unit tests and the Redis cache in
//! `tests/cache_redis.rs`, so the two cannot drift apart. It names types through
//! `crate::cache` and `crate::domain`, which the lib provides directly and the
//! integration test re-exports from `twins`. Use it by declaring it as a module named
//! `conformance` with `#[macro_use]` and calling `twin_cache_conformance!(fixture)`,
//! where `async fn fixture()` returns something that derefs to a fresh, empty cache: a
//! `Box`, or a guard that also cleans up when dropped.

use chrono::Utc;

use crate::cache::TwinCache;
use crate::domain::twin::{Attribute, Definition, Twin};

/// One test per behaviour below, each on a fresh cache from `$fixture().await`.
macro_rules! twin_cache_conformance {
    ($fixture:path) => {
        twin_cache_conformance!(@cases $fixture;
            saved_twin_is_listed_under_each_attribute_key,
            only_the_current_definition_is_cached,
            non_persisted_attributes_are_cached,
            wildcard_attribute_matches_every_subtopic_of_its_channel,
            ids_merges_exact_and_wildcard_without_duplicates,
            update_moves_twin_to_its_new_channel,
            update_keeps_keys_that_stay_in_the_definition,
            update_of_an_uncached_twin_saves_it,
            update_to_an_empty_definition_forgets_the_twin,
            remove_forgets_the_twin_everywhere,
            removing_one_twin_keeps_another_on_the_same_key,
            save_ids_lists_ids_and_remove_forgets_them,
            unknown_twins_and_empty_input_are_not_errors,
        );
    };
    (@cases $fixture:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let fixture = $fixture().await;
                conformance::$case(&*fixture).await;
            }
        )*
    };
}

pub fn attr(name: &str, channel: &str, subtopic: &str, persist_state: bool) -> Attribute {
    Attribute {
        name: name.into(),
        channel: channel.into(),
        subtopic: subtopic.into(),
        persist_state,
        record: None,
    }
}

/// A twin whose definitions have the given attributes, oldest first.
pub fn twin(id: &str, definitions: Vec<Vec<Attribute>>) -> Twin {
    let now = Utc::now();
    Twin {
        owner: "owner@example.com".into(),
        id: id.into(),
        name: id.into(),
        revision: definitions.len() as i64,
        created: now,
        updated: now,
        definitions: definitions
            .into_iter()
            .enumerate()
            .map(|(i, attributes)| Definition {
                id: i as i64,
                created: now,
                attributes,
                delta: 1_000_000,
            })
            .collect(),
        metadata: Default::default(),
    }
}

/// `cache.ids(channel, subtopic)`, sorted so that tests compare sets.
pub async fn ids(cache: &dyn TwinCache, channel: &str, subtopic: &str) -> Vec<String> {
    let mut ids = cache.ids(channel, subtopic).await.unwrap();
    ids.sort();
    ids
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

pub async fn saved_twin_is_listed_under_each_attribute_key(cache: &dyn TwinCache) {
    let t = twin(
        "t1",
        vec![vec![
            attr("temp", "A", "x", true),
            attr("hum", "A", "", true),
            attr("load", "B", "y.z", true),
        ]],
    );
    cache.save(&t).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1"]));
    assert_eq!(ids(cache, "A", "").await, strings(&["t1"]));
    assert_eq!(ids(cache, "B", "y.z").await, strings(&["t1"]));
    assert!(ids(cache, "A", "y.z").await.is_empty());
    assert!(ids(cache, "B", "x").await.is_empty());
    assert!(ids(cache, "C", "x").await.is_empty());
}

pub async fn only_the_current_definition_is_cached(cache: &dyn TwinCache) {
    let t = twin(
        "t1",
        vec![
            vec![attr("temp", "old", "x", true)],
            vec![attr("temp", "new", "x", true)],
        ],
    );
    cache.save(&t).await.unwrap();
    assert!(ids(cache, "old", "x").await.is_empty());
    assert_eq!(ids(cache, "new", "x").await, strings(&["t1"]));
}

pub async fn non_persisted_attributes_are_cached(cache: &dyn TwinCache) {
    let t = twin("t1", vec![vec![attr("temp", "A", "x", false)]]);
    cache.save(&t).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1"]));
}

pub async fn wildcard_attribute_matches_every_subtopic_of_its_channel(cache: &dyn TwinCache) {
    let t = twin("t1", vec![vec![attr("all", "A", ">", true)]]);
    cache.save(&t).await.unwrap();
    assert_eq!(ids(cache, "A", "engine").await, strings(&["t1"]));
    assert_eq!(ids(cache, "A", "engine.rpm").await, strings(&["t1"]));
    assert_eq!(ids(cache, "A", "").await, strings(&["t1"]));
    assert!(ids(cache, "B", "engine").await.is_empty());
}

pub async fn ids_merges_exact_and_wildcard_without_duplicates(cache: &dyn TwinCache) {
    let exact = twin("t-exact", vec![vec![attr("rpm", "A", "engine", true)]]);
    let wild = twin("t-wild", vec![vec![attr("all", "A", ">", true)]]);
    let both = twin(
        "t-both",
        vec![vec![
            attr("rpm", "A", "engine", true),
            attr("all", "A", ">", false),
        ]],
    );
    for t in [&exact, &wild, &both] {
        cache.save(t).await.unwrap();
    }
    assert_eq!(
        ids(cache, "A", "engine").await,
        strings(&["t-both", "t-exact", "t-wild"])
    );
    assert_eq!(
        ids(cache, "A", "chassis").await,
        strings(&["t-both", "t-wild"])
    );
}

pub async fn update_moves_twin_to_its_new_channel(cache: &dyn TwinCache) {
    let mut t = twin("t1", vec![vec![attr("temp", "A", "x", true)]]);
    cache.save(&t).await.unwrap();
    t = twin(
        "t1",
        vec![
            vec![attr("temp", "A", "x", true)],
            vec![attr("temp", "B", "x", true)],
        ],
    );
    cache.update(&t).await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
    assert_eq!(ids(cache, "B", "x").await, strings(&["t1"]));
    // The old key must not come back through the reverse direction either.
    cache.remove("t1").await.unwrap();
    assert!(ids(cache, "B", "x").await.is_empty());
}

pub async fn update_keeps_keys_that_stay_in_the_definition(cache: &dyn TwinCache) {
    let t = twin(
        "t1",
        vec![vec![attr("a", "A", "x", true), attr("b", "A", "y", true)]],
    );
    cache.save(&t).await.unwrap();
    let t = twin(
        "t1",
        vec![
            vec![attr("a", "A", "x", true), attr("b", "A", "y", true)],
            vec![attr("a", "A", "x", true), attr("c", "C", "z", true)],
        ],
    );
    cache.update(&t).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1"]));
    assert!(ids(cache, "A", "y").await.is_empty());
    assert_eq!(ids(cache, "C", "z").await, strings(&["t1"]));
}

pub async fn update_of_an_uncached_twin_saves_it(cache: &dyn TwinCache) {
    let t = twin("t1", vec![vec![attr("a", "A", "x", true)]]);
    cache.update(&t).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1"]));
}

pub async fn update_to_an_empty_definition_forgets_the_twin(cache: &dyn TwinCache) {
    let t = twin("t1", vec![vec![attr("a", "A", "x", true)]]);
    cache.save(&t).await.unwrap();
    let t = twin("t1", vec![vec![attr("a", "A", "x", true)], vec![]]);
    cache.update(&t).await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
}

pub async fn remove_forgets_the_twin_everywhere(cache: &dyn TwinCache) {
    let t = twin(
        "t1",
        vec![vec![attr("a", "A", "x", true), attr("b", "B", ">", false)]],
    );
    cache.save(&t).await.unwrap();
    cache.remove("t1").await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
    assert!(ids(cache, "B", "anything").await.is_empty());
    // Saving again after a remove starts from a clean slate.
    let t = twin("t1", vec![vec![attr("c", "C", "x", true)]]);
    cache.save(&t).await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
    assert_eq!(ids(cache, "C", "x").await, strings(&["t1"]));
}

pub async fn removing_one_twin_keeps_another_on_the_same_key(cache: &dyn TwinCache) {
    let t1 = twin("t1", vec![vec![attr("a", "A", "x", true)]]);
    let t2 = twin(
        "t2",
        vec![vec![attr("a", "A", "x", false), attr("b", "B", "y", true)]],
    );
    cache.save(&t1).await.unwrap();
    cache.save(&t2).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1", "t2"]));
    cache.remove("t1").await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t2"]));
    assert_eq!(ids(cache, "B", "y").await, strings(&["t2"]));
}

pub async fn save_ids_lists_ids_and_remove_forgets_them(cache: &dyn TwinCache) {
    cache
        .save_ids("A", "x", &strings(&["t1", "t2"]))
        .await
        .unwrap();
    cache.save_ids("A", "x", &strings(&["t2"])).await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t1", "t2"]));
    // save_ids keeps the reverse direction too, so remove and update reach these keys.
    cache.remove("t1").await.unwrap();
    assert_eq!(ids(cache, "A", "x").await, strings(&["t2"]));
    let t2 = twin("t2", vec![vec![attr("a", "B", "y", true)]]);
    cache.update(&t2).await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
    assert_eq!(ids(cache, "B", "y").await, strings(&["t2"]));
}

pub async fn unknown_twins_and_empty_input_are_not_errors(cache: &dyn TwinCache) {
    cache.remove("never-cached").await.unwrap();
    cache.save_ids("A", "x", &[]).await.unwrap();
    cache.save(&twin("t1", vec![vec![]])).await.unwrap();
    cache.save(&twin("t2", vec![])).await.unwrap();
    cache.update(&twin("t2", vec![])).await.unwrap();
    assert!(ids(cache, "A", "x").await.is_empty());
    assert!(ids(cache, "nothing", "").await.is_empty());
}
