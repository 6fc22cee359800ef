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

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;

use common::proxy::Proxy;
use common::stream::{self, Oracle, PROGRESS, Published, Publishing, messages, publish_on};
use common::*;

use twins::broker;

/// Lease of the tests' instances: a killed holder is replaced within about this long.
const LEASE: &str = "2s";

/// The scenarios run one at a time. Every instance reads the whole shared `channels`
/// stream (messages no twin of its own listens to are looked up and ignored), so
/// scenarios running together would each process all the others' messages too.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One deployment: the binary's instances of one group on one database and broker.
struct Deployment {
    app: TestApp,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Deployment {
    async fn new() -> Self {
        Self::with(|b| b).await
    }

    /// A deployment whose app is `configure`d on top of the scenarios' settings.
    async fn with(configure: impl FnOnce(Builder) -> Builder) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let builder = TestApp::builder()
            .process()
            .auth(Auth::Standalone)
            .var("MG_TWINS_INGEST_LEASE", LEASE);
        Self {
            app: configure(builder).spawn().await,
            _turn: turn,
        }
    }

    /// Creates `n` twins, each listening on a channel of its own; (twin id, channel).
    async fn twins(&self, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let ch = unique("f");
            let id = self
                .app
                .create_listening(&[attribute("v", &ch, "", true)])
                .await;
            out.push((id, ch));
        }
        out
    }

    /// Waits until everything up to `seq` is applied (acked after it was made durable).
    async fn wait_applied(&self, seq: u64, within: Duration) {
        stream::wait_applied(&self.app, seq, within).await;
    }

    /// Starts publishing `messages` in the background.
    async fn publish_in_background(&self, messages: &[Published]) -> Publishing {
        stream::publish_in_background(&self.app, messages).await
    }

    /// Waits until the group has acked `count` of the messages `publishing`.
    async fn wait_progress(&self, publishing: &Publishing, count: u64) {
        stream::wait_progress(&self.app, publishing, count).await;
    }

    /// Publishes `messages` in the background and returns once `count` of them are
    /// applied: the fault that follows strikes mid-ingest.
    async fn publish_until(&self, messages: &[Published], count: u64) -> Publishing {
        let publishing = self.publish_in_background(messages).await;
        self.wait_progress(&publishing, count).await;
        publishing
    }

    /// Asserts that every twin has exactly the oracle's states.
    async fn assert_matches(&self, oracle: &Oracle) {
        stream::assert_matches(&self.app, oracle).await;
    }

    async fn publish(&self, messages: &[Published]) -> u64 {
        publish_on(self.app.js(), messages).await
    }

    /// SIGTERM to the newest instance, which must exit 0.
    async fn terminate(&mut self) {
        self.app.instance().terminate();
        let status = self.app.instance().wait(DEADLINE).await;
        assert_eq!(status.code(), Some(0), "SIGTERM ends with exit code 0");
    }
}

async fn sigkill_three_times_during_ingest_loses_and_duplicates_nothing() {
    let mut d = Deployment::new().await;
    let twins = d.twins(200).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..20_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);

    let publishing = d.publish_in_background(&all).await;
    let started = Instant::now();
    for share in [0.15, 0.4, 0.7] {
        d.wait_progress(&publishing, (20_000.0 * share) as u64)
            .await;
        eprintln!(
            "{share} of the messages acked after {:?} (ack floor {}, published from {})",
            started.elapsed(),
            d.app.acked().await,
            publishing.base()
        );
        d.app.instance().kill().await;
        d.app.start().await;
    }
    let last = publishing.finished().await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
}

async fn sigterm_mid_ingest_then_restart_loses_nothing_and_exits_zero() {
    let mut d = Deployment::new().await;
    let twins = d.twins(50).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..10_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let publishing = d.publish_until(&all, 2_000).await;
    d.terminate().await;
    d.app.start().await;
    let last = publishing.finished().await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
}

async fn a_foreign_client_of_the_group_that_never_acks_loses_nothing() {
    let mut d = Deployment::new().await;
    let twins = d.twins(1).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..30);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);

    // While the service is stopped, a client bound to the group's consumer takes the
    // first messages and never acks them.
    d.terminate().await;
    d.publish(&all[..10]).await;
    let group = d.app.group.clone();
    let stream = d.app.js().get_stream(broker::STREAM).await.expect("stream");
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer(&group)
        .await
        .expect("the group's consumer");
    // For an instant after the process exits, the broker may still count the pull
    // request the service left waiting and hand it messages; those come back once
    // the consumer's ack wait (60 s) has passed. So the foreign client waits for its
    // four rather than taking what is there at once.
    let deadline = Instant::now() + Duration::from_secs(60) + DEADLINE;
    let mut held = Vec::new();
    while held.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the foreign client holds four messages, not {}",
            held.len()
        );
        let mut taken = consumer
            .batch()
            .max_messages(4 - held.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("pull");
        while let Some(m) = taken.next().await {
            held.push(m.expect("message"));
        }
    }

    d.app.start().await;
    d.app.wait_ingesting().await;
    // And while it runs, the foreign client keeps taking messages: each time a pull
    // request of its own waits beside the service's, a few messages are published.
    let mut stolen = 0;
    let mut last = 0;
    for chunk in all[10..].chunks(5) {
        // The service recreates the consumer after each theft: wait for the new one.
        let deadline = Instant::now() + DEADLINE;
        let consumer: jetstream::consumer::PullConsumer = loop {
            match stream.get_consumer(&group).await {
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
        // Past the deadline, publishing anyway only makes a theft less likely, which
        // the assertion on `stolen` below catches.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !thief.is_finished() {
            match stream.consumer_info(&group).await {
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
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
    drop(held);
}

async fn a_broker_restart_mid_ingest_loses_nothing() {
    let mut d = Deployment::with(Builder::own_broker).await;
    let twins = d.twins(20).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..4_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    d.publish(&all[..2_000]).await;
    d.app.restart_broker().await;
    let last = d.publish(&all[2_000..]).await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
}

/// Two or three instances of one group on one database; the first one started is
/// killed mid-run.
async fn several_instances(mut d: Deployment, instances: usize) {
    for _ in 1..instances {
        d.app.start().await;
    }
    let burst = d.twins(1).await;
    let spread = d.twins(50).await;
    d.app.wait_ingesting().await;
    let mut all = messages(&burst, 0..500);
    all.extend(messages(&spread, 0..5_000));
    let mut oracle = Oracle::new(&burst);
    oracle.states.extend(Oracle::new(&spread).states);
    oracle.apply(&all);
    let publishing = d.publish_until(&all, 1_000).await;
    // Kill whichever instance; the lease moves to another if it was the holder.
    d.app.first_instance().kill().await;
    let last = publishing.finished().await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
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

/// The store is cut off (through a proxy to `address`, the server's host:port) mid-ingest
/// and comes back; `url` gives the service's database URL through the proxy's address.
async fn a_store_outage_mid_ingest_loses_nothing(address: String, url: UrlThrough) {
    let proxy = Proxy::to(&address).await;
    let url = url(&proxy.addr.to_string());
    let d = Deployment::with(|b| b.database(url)).await;
    let twins = d.twins(20).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..3_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let publishing = d.publish_until(&all, 300).await;
    proxy.cut();
    // The store is away: /health says so, and nothing acked is lost meanwhile.
    d.app.health_until(|h| h.status == 503).await;
    proxy.restore();
    let last = publishing.finished().await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
}

#[tokio::test]
async fn mongodb_store_outage_mid_ingest_loses_nothing() {
    through_a_proxy(
        backend::Backend::MongoDb,
        a_store_outage_mid_ingest_loses_nothing,
    )
    .await;
}

#[tokio::test]
async fn postgres_store_outage_mid_ingest_loses_nothing() {
    through_a_proxy(
        backend::Backend::Postgres,
        a_store_outage_mid_ingest_loses_nothing,
    )
    .await;
}

/// Every store call ingestion makes fails as "may pass later" while the store is cut off
/// (through a proxy to `address`), never as a refusal: a refusal sets the messages aside
/// for good, and the states they carry would be missing once the store is back.
async fn a_cut_off_store_fails_every_ingest_call_as_transient(address: String, url: UrlThrough) {
    use twins::store::{IngestStep, Lease, Store};
    let proxy = Proxy::to(&address).await;
    let url = url(&proxy.addr.to_string());
    let store = Store::connect(&url)
        .await
        .expect("the store through the proxy");
    let group = unique("g");
    let twin = uuid::Uuid::new_v4().to_string();
    let lease = Lease {
        group: group.clone(),
        holder: unique("h"),
        ttl: Duration::from_secs(2),
        start: 0,
    };
    assert_eq!(store.ingest.lease(&lease).await.expect("lease"), Some(0));
    proxy.cut();
    let step = IngestStep {
        group: group.clone(),
        from: 0,
        to: 1,
        twins: Vec::new(),
    };
    // Several rounds: the first calls may meet pooled connections the cut closed, the
    // later ones open new connections that the proxy closes at once.
    for round in 0..4 {
        let outcomes = [
            (
                "retrieve_many",
                store
                    .twins
                    .retrieve_many(std::slice::from_ref(&twin))
                    .await
                    .err(),
            ),
            ("retrieve_any", store.twins.retrieve_any(&twin).await.err()),
            ("cursor", store.ingest.cursor(&twin).await.err()),
            ("lease", store.ingest.lease(&lease).await.err()),
            ("apply", store.ingest.apply(&step).await.err()),
        ];
        for (call, error) in outcomes {
            let error = error.unwrap_or_else(|| panic!("{call} succeeded on a cut-off store"));
            assert!(
                error.is_transient(),
                "round {round}: {call} failed as a refusal: {error}"
            );
        }
    }
    proxy.restore();
    let deadline = Instant::now() + DEADLINE;
    while store.ingest.apply(&step).await.is_err() {
        assert!(Instant::now() < deadline, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn mongodb_cut_off_store_fails_every_ingest_call_as_transient() {
    through_a_proxy(
        backend::Backend::MongoDb,
        a_cut_off_store_fails_every_ingest_call_as_transient,
    )
    .await;
}

#[tokio::test]
async fn postgres_cut_off_store_fails_every_ingest_call_as_transient() {
    through_a_proxy(
        backend::Backend::Postgres,
        a_cut_off_store_fails_every_ingest_call_as_transient,
    )
    .await;
}

/// The URL of the test's database through another address (a proxy's).
type UrlThrough = Box<dyn FnOnce(&str) -> String + Send>;

/// Runs `scenario` on a database of the test's own on `server` (MongoDB or PostgreSQL),
/// with the server's `host:port` and a function that gives the database's URL through
/// another address (a proxy's).
async fn through_a_proxy<F, Fut>(server: backend::Backend, scenario: F)
where
    F: FnOnce(String, UrlThrough) -> Fut,
    Fut: Future<Output = ()>,
{
    backend::run(server, async {
        let (address, url): (String, UrlThrough) = match server {
            backend::Backend::Postgres => {
                let url = backend::database_url(&std::env::temp_dir());
                let address = backend::server_address(&url);
                let replaced = address.clone();
                (address, Box::new(move |proxy| url.replace(&replaced, proxy)))
            }
            _ => {
                let (_, db) = backend::mongodb_database();
                let name = db.name().to_owned();
                (
                    backend::mongodb_address(),
                    Box::new(move |proxy| {
                        format!(
                            "mongodb://{proxy}/{name}?directConnection=true&serverSelectionTimeoutMS=1000"
                        )
                    }),
                )
            }
        };
        scenario(address, url).await;
    })
    .await;
}

/// SQLite only: the twin is corrupted in the database file.
#[tokio::test]
async fn a_corrupt_twin_is_set_aside_and_the_others_keep_ingesting() {
    let mut d = Deployment::new().await;
    let twins = d.twins(2).await;
    d.app.wait_ingesting().await;
    d.terminate().await;
    let (bad, _) = &twins[0];
    let path = d.app.dir.path().join("twins.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the database");
    sqlx::query("UPDATE twins SET definitions = 'not json' WHERE id = ?")
        .bind(bad)
        .execute(&pool)
        .await
        .expect("corrupt the twin");
    pool.close().await;

    let mut letters = d
        .app
        .subscribe("twins.deadletter.corrupt_twin".into())
        .await;
    d.app.start().await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..40);
    let mut oracle = Oracle::new(&twins[1..]);
    oracle.apply(
        &all.iter()
            .filter(|m| m.twin != *bad)
            .cloned()
            .collect::<Vec<_>>(),
    );
    let last = d.publish(&all).await;
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
    // Every message of the corrupt twin is on the dead-letter subject, with its twin.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
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
    let mut d = Deployment::with(|b| {
        b.database(format!("sqlite://{}/twins.db", disk.dir.path().display()))
    })
    .await;
    let twins = d.twins(5).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..2_000);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let first = d.publish(&all[..500]).await;
    d.wait_applied(first, PROGRESS).await;

    let filler = disk.fill();
    // Writes now either succeed durably or are refused with 503.
    let mut created = Vec::new();
    let mut refused = 0;
    for i in 0..300 {
        let resp = d
            .app
            .post_twin(
                ALICE,
                &json!({"name": format!("t{i}"), "metadata": {"pad": "x".repeat(2000)}}),
            )
            .await;
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
    assert_eq!(
        d.app.health().await.status,
        503,
        "the store is reported failing while writes fail"
    );
    // Messages published meanwhile wait, unacked.
    let last = d.publish(&all[500..]).await;
    // Small commits (the feed relay's removals, ingestion's) may still fit where the
    // WAL has room to reuse: the store stays reported failing until space returns.
    assert_eq!(
        d.app.health().await.status,
        503,
        "the store is reported failing while the disk is full"
    );

    std::fs::remove_file(&filler).expect("free the space");
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
    for id in &created {
        assert_eq!(
            d.app.get(&format!("/twins/{id}"), ALICE).await.status(),
            200,
            "twin {id} answered 201"
        );
    }
    d.app.instance().kill().await;
    d.app.start().await;
    for id in &created {
        assert_eq!(
            d.app.get(&format!("/twins/{id}"), ALICE).await.status(),
            200,
            "twin {id} after a restart"
        );
    }
    d.assert_matches(&oracle).await;
}

async fn a_stream_recreated_behind_the_position_is_followed_from_its_start() {
    let mut d = Deployment::with(Builder::own_broker).await;
    let twins = d.twins(3).await;
    d.app.wait_ingesting().await;
    let all = messages(&twins, 0..300);
    let mut oracle = Oracle::new(&twins);
    oracle.apply(&all);
    let last = d.publish(&all[..200]).await;
    d.wait_applied(last, PROGRESS).await;
    // The broker comes back empty: the stream starts again at sequence 1, below the
    // group's stored position.
    d.app.restart_broker_empty().await;
    d.app.wait_ingesting().await;
    let last = d.publish(&all[200..]).await;
    assert!(last < 200, "the new stream numbers from 1 again");
    d.wait_applied(last, PROGRESS).await;
    d.assert_matches(&oracle).await;
}
