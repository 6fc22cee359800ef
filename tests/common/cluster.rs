//! Several instances of the service as one deployment: N processes of the real binary
//! sharing one `MG_TWINS_INSTANCE_GROUP`, the test's database, one Redis key prefix and
//! the shared NATS (SPEC section 13). Requests are spread over the instances (round
//! robin, or to a chosen one); any instance can be killed (SIGKILL) or stopped
//! (SIGTERM) at a chosen moment, the one ingesting included ([`Cluster::holder`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use reqwest::{Method, RequestBuilder};
use serde_json::Value;

use super::app::{Auth, Builder, DEADLINE, Instance, TestApp, client, eventually};
use super::auth::ALICE;
use super::{json_of, send};

/// Lease of the instances: a killed holder is replaced within about this long.
pub const LEASE: &str = "2s";

/// The clusters of a test binary run one at a time. Every instance reads the whole
/// shared `channels` stream (messages no twin of its own listens to are looked up and
/// ignored), so deployments running together would each process the others' messages.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the consumer logs when an instance takes the lease and starts ingesting.
const INGESTING: &str = "ingesting channels.>";
/// What it logs when it lets another instance ingest.
const NOT_INGESTING: [&str; 2] = [
    "standing by: another instance ingests",
    "reading again from the stored position",
];

pub struct Cluster {
    /// The instances; its helpers talk to the newest one.
    pub app: TestApp,
    client: reqwest::Client,
    next: AtomicUsize,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// `n` instances on the test's backend with Redis as their cache.
    pub async fn start(n: usize) -> Self {
        Self::with(n, |b| b).await
    }

    /// `n` instances whose configuration is `configure`d on top of the cluster's.
    pub async fn with(n: usize, configure: impl FnOnce(Builder) -> Builder) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let builder = TestApp::builder()
            .process()
            .auth(Auth::Standalone)
            .redis()
            .var("MG_TWINS_INGEST_LEASE", LEASE);
        let mut app = configure(builder).spawn().await;
        for _ in 1..n {
            app.start().await;
        }
        Self {
            app,
            client: client(),
            next: AtomicUsize::new(0),
            _turn: turn,
        }
    }

    /// Instances running.
    pub fn len(&self) -> usize {
        self.app.instances().len()
    }

    /// The index of the instance the next spread request goes to.
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.len()
    }

    /// A request with Alice's token to instance `i`.
    pub fn on(&self, i: usize, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.app.instances()[i].url(path))
            .bearer_auth(ALICE)
    }

    /// A request with Alice's token to the next instance in turn.
    pub fn any(&self, method: Method, path: &str) -> RequestBuilder {
        self.on(self.pick(), method, path)
    }

    /// The base URLs of the running instances, oldest first.
    pub fn urls(&self) -> Vec<String> {
        self.app.instances().iter().map(|i| i.url("")).collect()
    }

    /// Creates Alice's twin through instance `i`; its id.
    pub async fn create_on(&self, i: usize, body: &Value) -> String {
        let resp = send(self.on(i, Method::POST, "/twins").json(body)).await;
        assert_eq!(resp.status(), 201, "create {body} through instance {i}");
        super::id_of(&json_of(resp).await)
    }

    /// The instance that holds the group's lease and ingests, once one does: the one
    /// whose latest word about ingesting says it started, latest of all.
    pub async fn holder(&self) -> usize {
        let found = eventually(
            "an instance that ingests",
            || async {
                let logs: Vec<Vec<String>> = self
                    .app
                    .instances()
                    .iter()
                    .map(Instance::log_lines)
                    .collect();
                latest_holder(&logs)
            },
            Option::is_some,
        )
        .await;
        found.unwrap_or_else(|| unreachable!("eventually returned a holder"))
    }

    /// Kills instance `i` (SIGKILL: no chance to clean up or hand over).
    pub async fn kill(&mut self, i: usize) {
        self.app.take_instance(i).kill().await;
    }

    /// Stops instance `i` with SIGTERM and fails the test unless it exits 0.
    pub async fn stop(&mut self, i: usize) {
        self.app.take_instance(i).stop().await;
    }

    /// Every log line of instance `i` so far.
    pub fn logs(&self, i: usize) -> Vec<String> {
        self.app.instances()[i].log_lines()
    }

    /// Waits until instance `i` logged a line whose message contains `text`; the line.
    pub async fn log_line(&self, i: usize, text: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(line) = find_message(&self.logs(i), text) {
                return line;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {i} never logged {text:?}; logs: {:#?}",
                self.logs(i)
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// The first JSON log line whose message contains `text`.
pub fn find_message(logs: &[String], text: &str) -> Option<Value> {
    logs.iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text))
        })
}

/// Of instances' logs, the one that started ingesting last and has not stopped since.
fn latest_holder(logs: &[Vec<String>]) -> Option<usize> {
    let mut best: Option<(String, usize)> = None;
    for (i, lines) in logs.iter().enumerate() {
        let mut since: Option<String> = None;
        for line in lines {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message == INGESTING {
                since = v["timestamp"].as_str().map(str::to_owned);
            } else if NOT_INGESTING.contains(&message) {
                since = None;
            }
        }
        if let Some(at) = since
            && best.as_ref().is_none_or(|(b, _)| at > *b)
        {
            best = Some((at, i));
        }
    }
    best.map(|(_, i)| i)
}
