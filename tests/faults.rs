//! Ingestion under faults, compared with an oracle: the states each twin must have are
//! computed by applying its messages once each, in stream order, with the domain's
//! SenML and sampling functions; the served states must equal them after every fault
//! the service claims to survive (SIGKILL, SIGTERM, a foreign client of the group's
//! consumer, several instances, a broker restart, a corrupt stored twin).
//!
//! The service runs as the real binary. Progress is read from the broker (the group's
//! consumer acks a batch only once it is durable), never guessed with sleeps. The
//! scenarios that do not reach into SQLite itself run per backend (`sqlite::<name>`,
//! `mongodb::<name>`, see `common::backend`).

mod common;
#[path = "support/ops.rs"]
mod ops;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{TimeZone, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;

use common::proxy::Proxy;

use twins::broker::{self, Envelope};
use twins::domain::sampling::{self, Write};
use twins::domain::senml;
use twins::domain::state::State;
use twins::domain::twin::{Attribute, Definition};

const TOKEN: &str = "fault-token";
const OWNER: &str = "fault-owner";
/// Sampling window of the twins: 1 s.
const DELTA: i64 = 1_000_000_000;
const T0: f64 = 1_700_000_000.0;
/// Lease of the tests' instances: a killed holder is replaced within about this long.
const LEASE: &str = "2s";

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The scenarios run one at a time. Every instance reads the whole shared `channels`
/// stream (messages no twin of its own listens to are looked up and ignored), so
/// scenarios running together would each process all the others' messages too.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One deployment: a database, a group and a broker shared by its instances.
struct Deployment {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    dir: TempDir,
    db_url: String,
    group: String,
    nats_url: String,
    js: jetstream::Context,
    http: reqwest::Client,
}

impl Deployment {
    async fn new() -> Self {
        Self::on(common::NATS_URL, None).await
    }

    /// On the broker at `nats_url`, with the database at `db_url` (when None, a database
    /// of the test's own on its backend).
    async fn on(nats_url: &str, db_url: Option<String>) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let db_url = db_url.unwrap_or_else(|| common::backend::database_url(dir.path()));
        let nats = async_nats::connect(nats_url)
            .await
            .expect("NATS with JetStream must run (see .ci/run)");
        Self {
            _turn: turn,
            dir,
            db_url,
            group: format!("fault-{}", uid()),
            nats_url: nats_url.to_owned(),
            js: jetstream::new(nats),
            http: common::client(),
        }
    }

    async fn start(&self) -> ops::Binary {
        self.start_with(&[]).await
    }

    async fn start_with(&self, extra: &[(&str, &str)]) -> ops::Binary {
        let mut vars = vec![
            ("MG_TWINS_DB_URL", self.db_url.as_str()),
            ("MG_MESSAGE_BROKER_URL", self.nats_url.as_str()),
            ("MG_TWINS_INSTANCE_GROUP", self.group.as_str()),
            ("MG_TWINS_STANDALONE_ID", OWNER),
            ("MG_TWINS_STANDALONE_TOKEN", TOKEN),
            ("MG_TWINS_INGEST_LEASE", LEASE),
            ("MG_TWINS_SHUTDOWN_TIMEOUT", "5s"),
        ];
        vars.extend_from_slice(extra);
        ops::start_binary(&vars).await
    }

    /// Creates `n` twins, each listening on a channel of its own; (twin id, channel).
    async fn twins(&self, app: &ops::Binary, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let ch = format!("f{}", uid());
            let resp = self
                .http
                .post(app.url("/twins"))
                .bearer_auth(TOKEN)
                .json(&json!({"definition": {
                    "attributes": [{"name": "v", "channel": ch, "subtopic": "", "persist_state": true}],
                    "delta": DELTA
                }}))
                .send()
                .await
                .expect("POST /twins");
            assert_eq!(resp.status(), 201);
            let twin: Value = resp.json().await.expect("twin JSON");
            out.push((twin["id"].as_str().expect("id").to_owned(), ch));
        }
        out
    }

    /// Waits until the group's consumer exists: from then on, what is published is
    /// the group's to apply.
    async fn wait_ingesting(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = self.js.get_stream(broker::STREAM).await
                && stream.consumer_info(&self.group).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the group's consumer never appeared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stream sequence up to which the group's consumer has acked (0 when none).
    async fn acked(&self) -> u64 {
        match self.js.get_stream(broker::STREAM).await {
            Ok(stream) => stream
                .consumer_info(&self.group)
                .await
                .map(|i| i.ack_floor.stream_sequence)
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Waits until everything up to `seq` is applied (acked after it was made durable).
    async fn wait_applied(&self, seq: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked().await < seq {
            assert!(
                Instant::now() < deadline,
                "not applied up to {seq} within {within:?} (acked {})",
                self.acked().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn states(&self, app: &ops::Binary, twin: &str) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let resp = self
                .http
                .get(app.url(&format!("/states/{twin}?limit=100&offset={}", all.len())))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("GET /states");
            assert_eq!(resp.status(), 200);
            let page: Value = resp.json().await.expect("states page");
            let items = page["states"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                return all;
            }
            all.extend(items);
        }
    }

    /// Asserts that every twin has exactly the oracle's states. The consumer's ack
    /// floor can run ahead of what the current holder applied (a late ack of an
    /// instance that lost the lease lands on the recreated consumer of the same name),
    /// so each twin is given until a deadline to match.
    async fn assert_matches(&self, app: &ops::Binary, oracle: &Oracle) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (twin, expected) in &oracle.states {
            let expected: Vec<Value> = expected
                .iter()
                .map(|s| serde_json::to_value(s).expect("state JSON"))
                .collect();
            loop {
                let served = self.states(app, twin).await;
                if served == expected {
                    break;
                }
                if Instant::now() >= deadline {
                    assert_eq!(
                        served.len(),
                        expected.len(),
                        "twin {twin}: {} states served, {} expected",
                        served.len(),
                        expected.len()
                    );
                    assert_eq!(served, expected, "twin {twin}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn publish(&self, messages: &[Published]) -> u64 {
        publish_on(&self.js, messages).await
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        common::delete_consumer_at(&self.nats_url, &self.group);
    }
}

/// A message as the device sends it: on a twin's channel, one record.
#[derive(Clone)]
struct Published {
    twin: String,
    channel: String,
    payload: Vec<u8>,
}

/// Messages `k in range` spread over `twins` in turn, each with an explicit time such
/// that about half of them open a new state and half update the last one.
fn messages(twins: &[(String, String)], range: std::ops::Range<usize>) -> Vec<Published> {
    range
        .map(|k| {
            let (twin, channel) = &twins[k % twins.len()];
            let round = (k / twins.len()) as f64;
            let senml = json!([{"n": "v", "v": k, "t": T0 + round * 0.6}]);
            Published {
                twin: twin.clone(),
                channel: channel.clone(),
                payload: senml.to_string().into_bytes(),
            }
        })
        .collect()
}

/// Publishes with acks, 512 in flight; the stream sequence of the last one.
async fn publish_on(js: &jetstream::Context, messages: &[Published]) -> u64 {
    let mut last = 0;
    for chunk in messages.chunks(512) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let env = Envelope {
                channel: m.channel.clone(),
                subtopic: String::new(),
                publisher: "fault-test".into(),
                protocol: "nats".into(),
                payload: m.payload.clone(),
                created: 0,
            };
            acks.push(
                js.publish(broker::subject(&m.channel, ""), broker::encode(&env).into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            last = last.max(ack.await.expect("publish ack").sequence);
        }
    }
    last
}

/// The states each twin must have: its messages applied once each, in order.
#[derive(Default)]
struct Oracle {
    states: HashMap<String, Vec<State>>,
}

impl Oracle {
    fn new(twins: &[(String, String)]) -> Self {
        Self {
            states: twins.iter().map(|(t, _)| (t.clone(), Vec::new())).collect(),
        }
    }

    fn apply(&mut self, messages: &[Published]) {
        for m in messages {
            let definition = Definition {
                id: 0,
                created: Utc.timestamp_opt(0, 0).single().expect("time"),
                attributes: vec![Attribute {
                    name: "v".into(),
                    channel: m.channel.clone(),
                    subtopic: String::new(),
                    persist_state: true,
                }],
                delta: DELTA,
            };
            let records = senml::resolve(&m.payload, Utc::now()).expect("SenML");
            let states = self.states.entry(m.twin.clone()).or_default();
            for w in sampling::fold(
                &m.twin,
                states.last().cloned(),
                &definition,
                &m.channel,
                "",
                &records,
            ) {
                match w {
                    Write::Insert(s) => states.push(s),
                    Write::Update(s) => {
                        let i = usize::try_from(s.id).expect("state id");
                        states[i] = s;
                    }
                }
            }
        }
    }
}

async fn sigkill_three_times_during_ingest_loses_and_duplicates_nothing() {
    let d = Deployment::new().await;
    let mut app = d.start().await;
    let twins = d.twins(&app, 200).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..20_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);

    let js = d.js.clone();
    let to_publish = all.clone();
    let publisher = tokio::spawn(async move { publish_on(&js, &to_publish).await });
    // The first message's sequence is unknown until published: count progress from
    // the consumer's position when publishing started.
    let base = d.acked().await;
    for (i, share) in [0.15, 0.4, 0.7].into_iter().enumerate() {
        let target = base + (20_000.0 * share) as u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        while d.acked().await < target {
            assert!(
                Instant::now() < deadline,
                "kill {i}: no progress to {target}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        app.kill().await;
        app = d.start().await;
    }
    let last = publisher.await.expect("publisher");
    d.wait_applied(last, Duration::from_secs(180)).await;
    d.assert_matches(&app, &oracle).await;
}

async fn sigterm_mid_ingest_then_restart_loses_nothing_and_exits_zero() {
    let d = Deployment::new().await;
    let mut app = d.start().await;
    let twins = d.twins(&app, 50).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..10_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let base = d.acked().await;
    let js = d.js.clone();
    let to_publish = all.clone();
    let publisher = tokio::spawn(async move { publish_on(&js, &to_publish).await });
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.acked().await < base + 2_000 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.terminate();
    let status = app.wait(Duration::from_secs(7)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM ends with exit code 0");
    let app = d.start().await;
    let last = publisher.await.expect("publisher");
    d.wait_applied(last, Duration::from_secs(120)).await;
    d.assert_matches(&app, &oracle).await;
}

async fn a_foreign_client_of_the_group_that_never_acks_loses_nothing() {
    let d = Deployment::new().await;
    let mut app = d.start().await;
    let twins = d.twins(&app, 1).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..30);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);

    // While the service is stopped, a client bound to the group's consumer takes the
    // first messages and never acks them.
    app.terminate();
    assert_eq!(app.wait(Duration::from_secs(7)).await.code(), Some(0));
    d.publish(&all[..10]).await;
    let stream = d.js.get_stream(broker::STREAM).await.expect("stream");
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(&d.group)
        .await
        .expect("the group's consumer");
    let mut taken = consumer
        .fetch()
        .max_messages(4)
        .messages()
        .await
        .expect("fetch");
    let mut held = Vec::new();
    while let Some(m) = taken.next().await {
        held.push(m.expect("message"));
    }
    assert_eq!(held.len(), 4, "the foreign client holds four messages");

    let app = d.start().await;
    d.wait_ingesting().await;
    // And while it runs, the foreign client keeps taking messages: each time a pull
    // request of its own waits beside the service's, a few messages are published.
    let mut stolen = 0;
    let mut last = 0;
    for chunk in all[10..].chunks(5) {
        // The service recreates the consumer after each theft: wait for the new one.
        let deadline = Instant::now() + Duration::from_secs(10);
        let consumer: jetstream::consumer::PullConsumer = loop {
            match stream.get_consumer(&d.group).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the group's consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let thief = tokio::spawn(async move {
            let mut kept = Vec::new();
            if let Ok(mut batch) = consumer
                .fetch()
                .max_messages(2)
                .expires(Duration::from_secs(2))
                .messages()
                .await
            {
                while let Some(Ok(m)) = batch.next().await {
                    kept.push(m);
                }
            }
            kept
        });
        // The service keeps one pull request waiting; publish once the foreign one
        // waits beside it (or has ended, e.g. on a consumer the service recreated).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !thief.is_finished() {
            match stream.consumer_info(&d.group).await {
                Ok(info) if info.num_waiting >= 2 => break,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        last = d.publish(chunk).await;
        let kept = thief.await.expect("foreign client");
        stolen += kept.len();
        held.extend(kept);
    }
    assert!(
        stolen > 0,
        "the foreign client took no message while the service ran"
    );
    d.wait_applied(last, Duration::from_secs(60)).await;
    d.assert_matches(&app, &oracle).await;
    drop(held);
}

async fn a_broker_restart_mid_ingest_loses_nothing() {
    let nats_dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let nats = common::own_nats(port, nats_dir.path()).await;
    let d = Deployment::on(&url, None).await;
    let app = d.start().await;
    let twins = d.twins(&app, 20).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..4_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    d.publish(&all[..2_000]).await;
    drop(nats);
    let _nats = common::own_nats(port, nats_dir.path()).await;
    // A fresh connection: the deployment's own reconnects in the background.
    let js = jetstream::new(async_nats::connect(&url).await.expect("broker back"));
    let last = publish_on(&js, &all[2_000..]).await;
    d.wait_applied(last, Duration::from_secs(120)).await;
    d.assert_matches(&app, &oracle).await;
}

/// Two or three instances of one group on one database; one is killed mid-run.
async fn several_instances(d: Deployment, instances: usize) {
    let mut apps = Vec::new();
    for _ in 0..instances {
        apps.push(d.start().await);
    }
    let burst = d.twins(&apps[0], 1).await;
    let spread = d.twins(&apps[instances - 1], 50).await;
    d.wait_ingesting().await;
    let mut all = messages(&burst, 0..500);
    all.extend(messages(&spread, 0..5_000));
    let mut oracle = Oracle::new(&burst);
    oracle.states.extend(Oracle::new(&spread).states);
    oracle.apply(&all);
    let base = d.acked().await;
    let js = d.js.clone();
    let to_publish = all.clone();
    let publisher = tokio::spawn(async move { publish_on(&js, &to_publish).await });
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.acked().await < base + 1_000 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Kill whichever instance; the lease moves to another if it was the holder.
    apps[0].kill().await;
    let last = publisher.await.expect("publisher");
    d.wait_applied(last, Duration::from_secs(180)).await;
    d.assert_matches(&apps[instances - 1], &oracle).await;
}

async fn two_instances_of_one_group_apply_every_message_once() {
    several_instances(Deployment::new().await, 2).await;
}

async fn three_instances_of_one_group_apply_every_message_once() {
    several_instances(Deployment::new().await, 3).await;
}

crate::backend_matrix!(
    sigkill_three_times_during_ingest_loses_and_duplicates_nothing,
    sigterm_mid_ingest_then_restart_loses_nothing_and_exits_zero,
    a_foreign_client_of_the_group_that_never_acks_loses_nothing,
    a_broker_restart_mid_ingest_loses_nothing,
    a_stream_recreated_behind_the_position_is_followed_from_its_start,
    two_instances_of_one_group_apply_every_message_once,
    three_instances_of_one_group_apply_every_message_once,
);

/// MongoDB only: the store is cut off (through a proxy) mid-ingest and comes back.
async fn a_store_outage_mid_ingest_loses_nothing() {
    let (_, db) = common::backend::mongodb_database();
    let proxy = Proxy::to(&common::backend::mongodb_address()).await;
    let url = format!(
        "mongodb://{}/{}?directConnection=true&serverSelectionTimeoutMS=1000",
        proxy.addr,
        db.name()
    );
    let d = Deployment::on(common::NATS_URL, Some(url)).await;
    let app = d.start().await;
    let twins = d.twins(&app, 20).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..3_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let base = d.acked().await;
    let js = d.js.clone();
    let to_publish = all.clone();
    let publisher = tokio::spawn(async move { publish_on(&js, &to_publish).await });
    let deadline = Instant::now() + Duration::from_secs(120);
    while d.acked().await < base + 300 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.cut();
    // The store is away: /health says so, and nothing acked is lost meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = d.http.get(app.url("/health")).send().await.expect("health");
        if health.status() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store outage never showed in /health"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.restore();
    let last = publisher.await.expect("publisher");
    d.wait_applied(last, Duration::from_secs(120)).await;
    d.assert_matches(&app, &oracle).await;
}

#[tokio::test]
async fn mongodb_store_outage_mid_ingest_loses_nothing() {
    common::backend::run(
        common::backend::Backend::MongoDb,
        a_store_outage_mid_ingest_loses_nothing(),
    )
    .await;
}

/// SQLite only: the twin is corrupted in the database file.
#[tokio::test]
async fn a_corrupt_twin_is_set_aside_and_the_others_keep_ingesting() {
    let d = Deployment::new().await;
    let mut app = d.start().await;
    let twins = d.twins(&app, 2).await;
    d.wait_ingesting().await;
    app.terminate();
    assert_eq!(app.wait(Duration::from_secs(7)).await.code(), Some(0));
    let (bad, _) = &twins[0];
    let path = d.dir.path().join("twins.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the database");
    sqlx::query("UPDATE twins SET definitions = 'not json' WHERE id = ?")
        .bind(bad)
        .execute(&pool)
        .await
        .expect("corrupt the twin");
    pool.close().await;

    let nats = async_nats::connect(common::NATS_URL).await.expect("NATS");
    let mut letters = nats
        .subscribe("twins.deadletter.corrupt_twin")
        .await
        .expect("subscribe");
    let app = d.start().await;
    let all = messages(&twins, 0..40);
    let mut oracle = Oracle::new(&twins[1..]);
    oracle.apply(
        &all.iter()
            .filter(|m| m.twin != *bad)
            .cloned()
            .collect::<Vec<_>>(),
    );
    let last = d.publish(&all).await;
    d.wait_applied(last, Duration::from_secs(60)).await;
    d.assert_matches(&app, &oracle).await;
    // Every message of the corrupt twin is on the dead-letter subject, with its twin.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen < 20 {
        let m = tokio::time::timeout_at(deadline, letters.next())
            .await
            .expect("dead letters arrive")
            .expect("subscription open");
        let twin = m
            .headers
            .as_ref()
            .and_then(|h| h.get(twins::broker::deadletter::TWIN_HEADER))
            .map(|v| v.as_str().to_owned());
        if twin.as_deref() == Some(bad.as_str()) {
            let env = broker::decode(&m.payload).expect("the original envelope");
            assert_eq!(env.channel, twins[0].1);
            seen += 1;
        }
    }
}

/// A directory on a tmpfs of its own, unmounted on drop.
struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    /// None (with the reason printed) when this process may not mount.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match mounted {
            Ok(s) if s.success() => Some(Self { dir }),
            other => {
                eprintln!("disk-full test needs to mount a tmpfs (Linux, as root): {other:?}");
                None
            }
        }
    }

    /// Fills what is left with a file; removing it frees the space again.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.flush();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_answers_503_and_loses_nothing_it_acknowledged() {
    // CI runs as root; elsewhere the test cannot make a small disk and says so.
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let Some(disk) = SmallDisk::mount("16m") else {
        assert!(!is_root, "running as root, the tmpfs must mount");
        return;
    };
    let d = Deployment::on(
        common::NATS_URL,
        Some(format!("sqlite://{}/twins.db", disk.dir.path().display())),
    )
    .await;
    let mut app = d.start().await;
    let twins = d.twins(&app, 5).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..2_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let first = d.publish(&all[..500]).await;
    d.wait_applied(first, Duration::from_secs(60)).await;

    let filler = disk.fill();
    // Writes now either succeed durably or are refused with 503.
    let mut created = Vec::new();
    let mut refused = 0;
    for i in 0..300 {
        let resp = d
            .http
            .post(app.url("/twins"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": format!("t{i}"), "metadata": {"pad": "x".repeat(2000)}}))
            .send()
            .await
            .expect("POST /twins");
        match resp.status().as_u16() {
            201 => {
                let t: Value = resp.json().await.expect("twin");
                created.push(t["id"].as_str().expect("id").to_owned());
            }
            503 => refused += 1,
            other => panic!("a write on a full disk answered {other}"),
        }
    }
    assert!(refused > 0, "the disk never filled up");
    let health = d.http.get(app.url("/health")).send().await.expect("health");
    assert_eq!(
        health.status(),
        503,
        "the store is reported failing while writes fail"
    );
    // Messages published meanwhile wait, unacked.
    let last = d.publish(&all[500..]).await;

    std::fs::remove_file(&filler).expect("free the space");
    d.wait_applied(last, Duration::from_secs(120)).await;
    d.assert_matches(&app, &oracle).await;
    let check = |app: &ops::Binary, id: &String| {
        let req = d
            .http
            .get(app.url(&format!("/twins/{id}")))
            .bearer_auth(TOKEN);
        async move { req.send().await.expect("GET /twins").status().as_u16() }
    };
    for id in &created {
        assert_eq!(check(&app, id).await, 200, "twin {id} answered 201");
    }
    app.kill().await;
    let app = d.start().await;
    for id in &created {
        assert_eq!(check(&app, id).await, 200, "twin {id} after a restart");
    }
    d.assert_matches(&app, &oracle).await;
}

async fn a_stream_recreated_behind_the_position_is_followed_from_its_start() {
    let port = common::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let first_dir = tempfile::tempdir().expect("temp dir");
    let nats = common::own_nats(port, first_dir.path()).await;
    let d = Deployment::on(&url, None).await;
    let app = d.start().await;
    let twins = d.twins(&app, 3).await;
    d.wait_ingesting().await;
    let all = messages(&twins, 0..300);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let last = d.publish(&all[..200]).await;
    d.wait_applied(last, Duration::from_secs(60)).await;
    // The broker comes back empty: the stream starts again at sequence 1, below the
    // group's stored position.
    drop(nats);
    let second_dir = tempfile::tempdir().expect("temp dir");
    let _nats = common::own_nats(port, second_dir.path()).await;
    d.wait_ingesting().await;
    let last = d.publish(&all[200..]).await;
    assert!(last < 200, "the new stream numbers from 1 again");
    d.wait_applied(last, Duration::from_secs(60)).await;
    d.assert_matches(&app, &oracle).await;
}
