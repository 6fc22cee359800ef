//! The Redis cache against a real Redis (127.0.0.1:6379, or `TWINS_TEST_REDIS_URL`).
//!
//! A Redis that cannot be reached fails these tests rather than skipping them: a skipped
//! cache test would let a broken key layout through unnoticed. Each test works under its
//! own key prefix, so tests run in parallel and against a Redis that holds other data,
//! and deletes its keys when it ends, even when it fails.

#[macro_use]
#[path = "support/cache_conformance.rs"]
mod conformance;

use std::collections::BTreeSet;
use std::ops::Deref;
use std::time::Duration;

use redis::AsyncCommands;
use tokio::net::TcpListener;
use twins::cache::TwinCache;
use twins::cache::redis::RedisCache;
// The conformance cases name these through `crate::`, as they do inside the lib.
use twins::{cache, domain};

use conformance::{attr, twin};

fn redis_url() -> String {
    std::env::var("TWINS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A `RedisCache` under a fresh prefix, plus a raw connection to inspect the keys.
struct Fixture {
    cache: RedisCache,
    raw: redis::aio::MultiplexedConnection,
    prefix: String,
}

impl Deref for Fixture {
    type Target = RedisCache;
    fn deref(&self) -> &RedisCache {
        &self.cache
    }
}

impl Drop for Fixture {
    // Synchronous so that it also runs while a failed test unwinds.
    fn drop(&mut self) {
        let Ok(mut con) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> =
            match redis::Commands::scan_match(&mut con, format!("{}*", self.prefix)) {
                Ok(iter) => iter.filter_map(Result::ok).collect(),
                Err(_) => return,
            };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::Commands::del(&mut con, keys);
        }
    }
}

impl Fixture {
    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    async fn members(&self, rest: &str) -> BTreeSet<String> {
        let mut raw = self.raw.clone();
        raw.smembers(self.key(rest)).await.unwrap()
    }

    async fn exists(&self, rest: &str) -> bool {
        let mut raw = self.raw.clone();
        raw.exists(self.key(rest)).await.unwrap()
    }

    /// Prefixed keys, as the reverse sets hold them.
    fn keys(&self, rests: &[&str]) -> BTreeSet<String> {
        rests.iter().map(|r| self.key(r)).collect()
    }
}

fn set(members: &[&str]) -> BTreeSet<String> {
    members.iter().map(|s| s.to_string()).collect()
}

async fn fixture() -> Fixture {
    let url = redis_url();
    let client = redis::Client::open(url.as_str())
        .unwrap_or_else(|e| panic!("TWINS_TEST_REDIS_URL {url:?} is not a Redis URL: {e}"));
    let raw = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())
    .and_then(|r| r.map_err(|e| e.to_string()))
    .unwrap_or_else(|e| {
        panic!(
            "these tests need a running Redis at {url} (set TWINS_TEST_REDIS_URL to use \
             another one): {e}"
        )
    });
    let prefix = format!("twins-test-{}:", uuid::Uuid::new_v4());
    let cache = RedisCache::connect(&url, &prefix).await.unwrap();
    Fixture { cache, raw, prefix }
}

twin_cache_conformance!(fixture);

#[tokio::test]
async fn save_writes_the_go_key_layout() {
    let f = fixture().await;
    let t = twin(
        "t1",
        vec![vec![
            attr("temp", "A", "x", true),
            attr("hum", "A", "", false),
            attr("all", "B", ">", true),
        ]],
    );
    f.save(&t).await.unwrap();
    assert_eq!(f.members("twin:A-x").await, set(&["t1"]));
    assert_eq!(f.members("twin:A-").await, set(&["t1"]));
    assert_eq!(f.members("twin:B->").await, set(&["t1"]));
    assert_eq!(
        f.members("twin:t1").await,
        f.keys(&["twin:A-x", "twin:A-", "twin:B->"])
    );
}

#[tokio::test]
async fn update_moves_the_twin_from_channel_a_to_channel_b_in_both_directions() {
    let f = fixture().await;
    let before = twin(
        "t1",
        vec![vec![
            attr("temp", "A", "x", true),
            attr("hum", "A", "y", false),
        ]],
    );
    let other = twin("t2", vec![vec![attr("temp", "A", "x", true)]]);
    f.save(&before).await.unwrap();
    f.save(&other).await.unwrap();
    let after = twin(
        "t1",
        vec![
            before.definitions[0].attributes.clone(),
            vec![attr("temp", "B", "x", true)],
        ],
    );
    f.update(&after).await.unwrap();
    assert_eq!(f.members("twin:A-x").await, set(&["t2"]));
    assert!(!f.exists("twin:A-y").await, "empty sets must not linger");
    assert_eq!(f.members("twin:B-x").await, set(&["t1"]));
    assert_eq!(f.members("twin:t1").await, f.keys(&["twin:B-x"]));
    assert_eq!(f.members("twin:t2").await, f.keys(&["twin:A-x"]));
}

#[tokio::test]
async fn remove_deletes_both_directions() {
    let f = fixture().await;
    let t = twin(
        "t1",
        vec![vec![
            attr("temp", "A", "x", true),
            attr("all", "B", ">", true),
        ]],
    );
    f.save(&t).await.unwrap();
    f.remove("t1").await.unwrap();
    for key in ["twin:A-x", "twin:B->", "twin:t1"] {
        assert!(!f.exists(key).await, "{key} still exists");
    }
}

#[tokio::test]
async fn removing_one_twin_leaves_the_shared_key_to_the_other() {
    let f = fixture().await;
    f.save(&twin("t1", vec![vec![attr("a", "A", "x", true)]]))
        .await
        .unwrap();
    f.save(&twin("t2", vec![vec![attr("a", "A", "x", false)]]))
        .await
        .unwrap();
    assert_eq!(f.members("twin:A-x").await, set(&["t1", "t2"]));
    f.remove("t1").await.unwrap();
    assert_eq!(f.members("twin:A-x").await, set(&["t2"]));
    assert!(!f.exists("twin:t1").await);
    assert_eq!(f.members("twin:t2").await, f.keys(&["twin:A-x"]));
}

#[tokio::test]
async fn save_ids_writes_both_directions() {
    let f = fixture().await;
    f.save_ids("A", "x", &["t1".into(), "t2".into()])
        .await
        .unwrap();
    assert_eq!(f.members("twin:A-x").await, set(&["t1", "t2"]));
    assert_eq!(f.members("twin:t1").await, f.keys(&["twin:A-x"]));
    assert_eq!(f.members("twin:t2").await, f.keys(&["twin:A-x"]));
}

#[tokio::test]
async fn keys_written_by_the_go_service_are_read_and_cleaned() {
    let f = fixture().await;
    let mut raw = f.raw.clone();
    let _: () = raw.sadd(f.key("twin:A-x"), "go-twin").await.unwrap();
    let _: () = raw.sadd(f.key("twin:A->"), "go-wild").await.unwrap();
    let _: () = raw
        .sadd(f.key("twin:go-twin"), f.key("twin:A-x"))
        .await
        .unwrap();
    let _: () = raw
        .sadd(f.key("twin:go-wild"), f.key("twin:A->"))
        .await
        .unwrap();
    assert_eq!(
        conformance::ids(&*f, "A", "x").await,
        vec!["go-twin".to_string(), "go-wild".to_string()]
    );
    f.update(&twin("go-twin", vec![vec![attr("a", "B", "x", true)]]))
        .await
        .unwrap();
    f.remove("go-wild").await.unwrap();
    assert!(!f.exists("twin:A-x").await);
    assert!(!f.exists("twin:A->").await);
    assert!(!f.exists("twin:go-wild").await);
    assert_eq!(f.members("twin:go-twin").await, f.keys(&["twin:B-x"]));
}

/// Every operation of `cache`, each of which must come back with an error, well within
/// `limit` (a hang guard, far above the cache's own timeout, not a measurement).
async fn assert_every_operation_fails(cache: &dyn TwinCache, limit: Duration) {
    let t = twin("t1", vec![vec![attr("a", "A", "x", true)]]);
    let ids = vec!["t1".to_string()];
    macro_rules! fails {
        ($name:literal, $op:expr) => {
            match tokio::time::timeout(limit, $op).await {
                Err(_) => panic!("{} hung for more than {limit:?}", $name),
                Ok(result) => assert!(result.is_err(), "{} succeeded: {result:?}", $name),
            }
        };
    }
    fails!("save", cache.save(&t));
    fails!("update", cache.update(&t));
    fails!("save_ids", cache.save_ids("A", "x", &ids));
    fails!("ids", cache.ids("A", "x"));
    fails!("remove", cache.remove("t1"));
    // A second round goes through the reconnection the first round triggered.
    fails!("ids again", cache.ids("A", "x"));
}

#[tokio::test]
async fn closed_port_fails_every_operation_quickly_instead_of_hanging() {
    let cache = tokio::time::timeout(
        Duration::from_secs(2),
        RedisCache::connect("redis://127.0.0.1:1", "unused:"),
    )
    .await
    .expect("connect hung")
    .expect("connect must not fail because Redis is down");
    assert_every_operation_fails(&cache, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn silent_server_fails_every_operation_within_the_timeout() {
    // Accepts connections and never answers: a hung Redis, or a black-holed network.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let cache = RedisCache::connect(&format!("redis://127.0.0.1:{port}"), "unused:")
        .await
        .expect("connect must not fail because Redis does not answer")
        .with_timeout(Duration::from_millis(200))
        .unwrap();
    assert_every_operation_fails(&cache, Duration::from_secs(1)).await;
    server.abort();
}
