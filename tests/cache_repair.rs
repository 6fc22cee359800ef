//! The Redis cache under faults and floods, against the running service (SPEC 5, 14):
//! a twin created while Redis is down still gets its messages once Redis is back, even
//! when its key holds another twin; `/health` reports the outage as `warn`; a device
//! inventing subtopics under a wildcard, or channels nobody listens to, grows neither
//! Redis nor the service's memory.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};

use common::{ALICE, TestApp, health_check};

/// A record time in the past, absolute (above 2^28 s), the same for every message so
/// that each message updates the twin's one state in place: the last one wins.
const T0: f64 = 1_700_000_000.0;
/// Bound of the lookup memory in every app of this file (the gauge is per process).
const ANSWERS: usize = 100;

/// A Redis server of this test, keeping its data in `dir` across restarts.
struct Redis(std::process::Child);

impl Redis {
    async fn start(port: u16, dir: &Path) -> Self {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        common::wait_port(port).await;
        Self(child)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

/// Polls `probe` until it returns Some, failing the test after `limit`.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn twin_on(channel: &str, subtopic: &str) -> Value {
    json!({"name": "t", "definition": {"delta": 0, "attributes": [
        {"name": "x", "channel": channel, "subtopic": subtopic, "persist_state": true}
    ]}})
}

/// The payloads of the twin's states, oldest first.
async fn payloads(app: &TestApp, id: &str) -> Vec<Value> {
    let page = app.list_states(ALICE, id, &[("limit", "100")]).await;
    page["states"]
        .as_array()
        .map(|s| s.iter().map(|s| s["payload"].clone()).collect())
        .unwrap_or_default()
}

async fn health(app: &TestApp) -> Value {
    common::json_of(common::send(app.request(reqwest::Method::GET, "/health")).await).await
}

struct Broker {
    js: async_nats::jetstream::Context,
}

impl Broker {
    async fn for_app(app: &TestApp) -> Self {
        app.wait_ingesting().await;
        Self {
            js: app.js().clone(),
        }
    }

    /// Publishes `x = value` on each (channel, subtopic), all stored before returning.
    async fn publish(&self, messages: impl IntoIterator<Item = (String, String, u64)>) {
        let mut acks = Vec::new();
        for (channel, subtopic, value) in messages {
            let payload = json!([{"n": "x", "v": value, "t": T0}]).to_string();
            let data = common::envelope(&channel, &subtopic, payload.into_bytes());
            let subject = twins::broker::subject(&channel, &subtopic);
            acks.push(
                self.js
                    .publish(subject, data.into())
                    .await
                    .expect("publish"),
            );
        }
        let acks = acks.into_iter().map(std::future::IntoFuture::into_future);
        for stored in futures::future::join_all(acks).await {
            stored.expect("stored");
        }
    }
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn a_twin_created_while_redis_is_down_gets_its_messages_once_redis_is_back() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let redis = Redis::start(port, dir.path()).await;
    let size = ANSWERS.to_string();
    let app = TestApp::builder()
        .vars(&[
            ("MG_TWINS_CACHE_URL", url.as_str()),
            ("MG_TWINS_LOOKUP_CACHE_SIZE", size.as_str()),
        ])
        .spawn()
        .await;
    let broker = Broker::for_app(&app).await;
    let ch = id();
    let key = format!("twin:{ch}-s");

    let first = app.create_id(ALICE, &twin_on(&ch, "s")).await;
    broker.publish([(ch.clone(), "s".into(), 1)]).await;
    until("first message", Duration::from_secs(20), || async {
        (payloads(&app, &first).await.len() == 1).then_some(())
    })
    .await;
    let mut raw = connect(&url).await;
    let members: Vec<String> = raw.smembers(&key).await.expect("SMEMBERS");
    assert_eq!(members, vec![first.clone()]);
    // Redis keeps its data across the restart below, as a persistent one does.
    let () = redis::cmd("SAVE")
        .query_async(&mut raw)
        .await
        .expect("SAVE");
    drop(redis);

    let second = app.create_id(ALICE, &twin_on(&ch, "s")).await;
    let down = until("cache reported down", Duration::from_secs(10), || async {
        let h = health(&app).await;
        (health_check(&h, "cache") == "unavailable").then_some(h)
    })
    .await;
    assert_eq!(down["status"], "warn", "{down}");
    assert_eq!(health_check(&down, "store"), "pass", "{down}");

    let _redis = Redis::start(port, dir.path()).await;
    let mut raw = connect(&url).await;
    let members: Vec<String> = raw.smembers(&key).await.expect("SMEMBERS");
    assert!(members.contains(&first), "Redis came back with its keys");
    broker.publish([(ch.clone(), "s".into(), 2)]).await;

    // Expected, from the delta rule with delta 0 and one record time: every twin on the
    // key has one state holding the last value it received.
    until(
        "both twins got the message",
        Duration::from_secs(20),
        || async {
            let (a, b) = (payloads(&app, &first).await, payloads(&app, &second).await);
            (a == vec![json!({"x": 2})] && b == vec![json!({"x": 2})]).then_some(())
        },
    )
    .await;
    let repaired = until("key repaired", Duration::from_secs(20), || {
        let mut raw = raw.clone();
        let key = key.clone();
        async move {
            let mut members: Vec<String> = raw.smembers(&key).await.ok()?;
            members.sort();
            (members.len() == 2).then_some(members)
        }
    })
    .await;
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(repaired, expected);
    let reverse: Vec<String> = raw
        .smembers(format!("twin:{second}"))
        .await
        .expect("SMEMBERS");
    assert_eq!(reverse, vec![key.clone()]);
    until("cache reported back", Duration::from_secs(10), || async {
        let h = health(&app).await;
        (health_check(&h, "cache") == "pass" && h["status"] == "pass").then_some(())
    })
    .await;
}

/// Keys under `prefix` in the shared Redis.
async fn keys(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> =
        raw.scan_match(format!("{prefix}*")).await.expect("SCAN");
    while let Some(key) = iter.next_item().await {
        found.push(key.expect("key"));
    }
    found.sort();
    found
}

/// The value of a gauge or counter in the `/metrics` text (0 when absent).
async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = common::send(app.request(reqwest::Method::GET, "/metrics"))
        .await
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn floods_of_invented_subtopics_and_channels_leave_redis_and_memory_bounded() {
    const FLOOD: u64 = 2_000;
    let url =
        std::env::var("TWINS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("twins-test-{}:", uuid::Uuid::new_v4());
    let size = ANSWERS.to_string();
    let app = TestApp::builder()
        .vars(&[
            ("MG_TWINS_CACHE_URL", url.as_str()),
            ("MG_TWINS_CACHE_PREFIX", prefix.as_str()),
            ("MG_TWINS_LOOKUP_CACHE_SIZE", size.as_str()),
        ])
        .spawn()
        .await;
    let broker = Broker::for_app(&app).await;
    let mut raw = connect(&url).await;
    let ch = id();
    let wild = app.create_id(ALICE, &twin_on(&ch, ">")).await;
    // Redis lost the twin's keys (flushed, or a writer that failed): every lookup misses
    // and the store answers.
    let lost = keys(&mut raw, &prefix).await;
    assert_eq!(lost.len(), 2, "{lost:?}");
    let () = raw.del(&lost).await.expect("DEL");

    broker
        .publish((0..FLOOD).map(|i| (ch.clone(), format!("s{i}"), i)))
        .await;
    let nobody = id();
    broker
        .publish((0..FLOOD).map(|i| (nobody.clone(), format!("s{i}"), i)))
        .await;
    let last = json!({"x": FLOOD - 1});
    until("the flood applied", Duration::from_secs(60), || async {
        (payloads(&app, &wild).await == vec![last.clone()]).then_some(())
    })
    .await;
    // The channel nobody listens on comes after the wildcard flood in the stream, so it
    // is applied once its last message is counted.
    until(
        "unknown channel flood applied",
        Duration::from_secs(60),
        || async { (metric(&app, "twins_lookup_answers_evicted_total").await > 0.0).then_some(()) },
    )
    .await;

    let after = keys(&mut raw, &prefix).await;
    let mut expected = vec![
        format!("{prefix}twin:{ch}->"),
        format!("{prefix}twin:{wild}"),
    ];
    expected.sort();
    assert_eq!(after, expected, "one key per attribute, none per subtopic");
    let answers = metric(&app, "twins_lookup_answers ").await;
    assert!(
        answers <= ANSWERS as f64,
        "{answers} answers remembered, bound {ANSWERS}"
    );
    let () = raw.del(&after).await.expect("DEL");
}
