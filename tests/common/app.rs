//! The one way a black-box test starts the service: [`TestApp::builder`], then
//! [`Builder::spawn`].
//!
//! Every app gets names of its own (database on the test's backend, durable consumer
//! group, notification channel and Redis key prefix when asked for), so tests run in
//! parallel on the shared NATS and Redis without seeing each other. The same variables
//! configure the service in this process ([`Launch::InProcess`], the default) or as the
//! real binary ([`Launch::Process`], for tests that send SIGTERM or SIGKILL, read its
//! logs or run several instances of one group).
//!
//! The handle talks to the newest running instance: requests with a token, twins,
//! publishing SenML as a device does, waiting for states or health with a deadline,
//! metrics, and stopping or restarting the service, its broker and its Redis.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use twins::app::Application;
use twins::config::Config;
use twins::store::Store;

use super::auth::{ALICE, ALICE_ID, AuthServer};
use super::servers::{Nats, Redis};
use super::{backend, delete_consumer_at, envelope, json_of, send};

/// Address of the shared NATS server.
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
/// Address of the shared Redis server.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long a condition the test waits for may take before the test fails. Generous:
/// it only bounds a failing test, a passing one goes on as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two looks at a condition.
const POLL: Duration = Duration::from_millis(50);

/// What `look` finds once `done` holds; fails the test with the last look when that
/// does not happen within [`DEADLINE`].
pub async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    look: impl Fn() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let found = look().await;
        if done(&found) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never reached the awaited condition: {found:#?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next message of `subscription`; fails the test when none comes within
/// [`DEADLINE`].
pub async fn receive(subscription: &mut async_nats::Subscriber, what: &str) -> async_nats::Message {
    use futures::StreamExt as _;
    tokio::time::timeout(DEADLINE, subscription.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} arrived"))
        .expect("subscription open")
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A consumer group of the test's own, so parallel tests never share one.
pub fn unique_group() -> String {
    unique("test-")
}

/// Who the service asks about tokens.
pub enum Auth {
    /// A fresh in-test auth service ([`AuthServer`]).
    Grpc,
    /// This in-test auth service (started held, or over TLS, by the test).
    GrpcServer(AuthServer),
    /// Whatever listens at this `MG_AUTH_GRPC_URL` (possibly nothing).
    GrpcAt(String),
    /// Standalone mode: [`ALICE`] identifies [`ALICE_ID`].
    Standalone,
    /// No auth setting at all: development mode, or what the test's own variables say.
    Unset,
}

/// Where the service runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `Application` on the test's runtime.
    InProcess,
    /// The `twins` binary as a child process with JSON logs.
    Process,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerChoice {
    Shared,
    Own,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CacheChoice {
    Memory,
    SharedRedis,
    OwnRedis,
}

/// Options of a [`TestApp`]; see [`TestApp::builder`].
pub struct Builder {
    launch: Launch,
    auth: Auth,
    broker: BrokerChoice,
    cache: CacheChoice,
    notifications: bool,
    database: Option<String>,
    vars: Vec<(String, String)>,
}

impl Builder {
    /// Runs the real binary instead of the service in this process.
    pub fn process(mut self) -> Self {
        self.launch = Launch::Process;
        self
    }

    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// A NATS server of the app's own, which the test can stop and restart.
    pub fn own_broker(mut self) -> Self {
        self.broker = BrokerChoice::Own;
        self
    }

    /// The shared Redis as cache, under a key prefix of the app's own.
    pub fn redis(mut self) -> Self {
        self.cache = CacheChoice::SharedRedis;
        self
    }

    /// A Redis of the app's own as cache, which the test can stop.
    pub fn own_redis(mut self) -> Self {
        self.cache = CacheChoice::OwnRedis;
        self
    }

    /// Notifications on a channel of the app's own ([`TestApp::notifications`]).
    pub fn notifications(mut self) -> Self {
        self.notifications = true;
        self
    }

    /// This database instead of a fresh one on the test's backend.
    pub fn database(mut self, url: impl Into<String>) -> Self {
        self.database = Some(url.into());
        self
    }

    /// HTTPS with this certificate and key.
    pub fn https(self, pki: &super::tls::Pki) -> Self {
        self.var(
            "MG_TWINS_HTTP_SERVER_CERT",
            super::tls::path(&pki.server_cert),
        )
        .var(
            "MG_TWINS_HTTP_SERVER_KEY",
            super::tls::path(&pki.server_key),
        )
    }

    /// A variable on top of the harness's; an empty value unsets one.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn vars(self, vars: &[(&str, &str)]) -> Self {
        vars.iter().fold(self, |b, (k, v)| b.var(k, v))
    }

    /// Sets everything up and starts one instance.
    pub async fn spawn(self) -> TestApp {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db_url = self
            .database
            .unwrap_or_else(|| backend::database_url(dir.path()));
        let own_nats = match self.broker {
            BrokerChoice::Shared => None,
            BrokerChoice::Own => Some(Nats::start().await),
        };
        let broker_url = own_nats
            .as_ref()
            .map_or_else(|| NATS_URL.to_owned(), Nats::url);
        let own_redis = match self.cache {
            CacheChoice::OwnRedis => Some(Redis::start().await),
            _ => None,
        };
        let group = unique_group();
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| vars.push((k.to_owned(), v.to_owned()));
        set("MG_TWINS_HTTP_HOST", "127.0.0.1");
        set("MG_TWINS_HTTP_PORT", "0");
        set("MG_TWINS_DB_URL", &db_url);
        set("MG_MESSAGE_BROKER_URL", &broker_url);
        set("MG_TWINS_INSTANCE_GROUP", &group);
        set("MG_TWINS_SHUTDOWN_TIMEOUT", "5s");
        if self.launch == Launch::Process {
            set("MG_TWINS_LOG_FORMAT", "json");
            set("MG_TWINS_LOG_LEVEL", "info");
        }
        let auth = match self.auth {
            Auth::Grpc => Some(AuthServer::start().await),
            Auth::GrpcServer(server) => Some(server),
            Auth::GrpcAt(url) => {
                set("MG_AUTH_GRPC_URL", &url);
                None
            }
            Auth::Standalone => {
                set("MG_TWINS_STANDALONE_ID", ALICE_ID);
                set("MG_TWINS_STANDALONE_TOKEN", ALICE);
                None
            }
            Auth::Unset => None,
        };
        if let Some(server) = &auth {
            set("MG_AUTH_GRPC_URL", &server.addr.to_string());
        }
        let notifications = self.notifications.then(|| unique(""));
        if let Some(channel) = &notifications {
            set("MG_TWINS_CHANNEL_ID", channel);
        }
        let cache_prefix = (self.cache != CacheChoice::Memory).then(|| unique("twins-test-") + ":");
        if let Some(prefix) = &cache_prefix {
            let url = own_redis
                .as_ref()
                .map_or_else(|| REDIS_URL.to_owned(), Redis::url);
            set("MG_TWINS_CACHE_URL", &url);
            set("MG_TWINS_CACHE_PREFIX", prefix);
        }
        vars.extend(self.vars);
        // Later entries win, as in the environment after an override.
        let mut seen = std::collections::HashSet::new();
        vars.reverse();
        vars.retain(|(k, _)| seen.insert(k.clone()));
        vars.reverse();

        let nats = async_nats::connect(&broker_url)
            .await
            .unwrap_or_else(|e| panic!("NATS with JetStream must run at {broker_url}: {e}"));
        let mut app = TestApp {
            instances: Vec::new(),
            client: client(),
            launch: self.launch,
            vars,
            group,
            notifications,
            cache_prefix,
            db_url,
            auth,
            broker_url,
            js: jetstream::new(nats.clone()),
            nats,
            own_nats,
            own_redis,
            dir,
        };
        app.start().await;
        app
    }
}

/// The service under test and everything it was given; see the module docs.
pub struct TestApp {
    instances: Vec<Instance>,
    pub client: reqwest::Client,
    launch: Launch,
    vars: Vec<(String, String)>,
    /// The durable consumer group of every instance.
    pub group: String,
    /// The notification channel, when asked for.
    pub notifications: Option<String>,
    /// The Redis key prefix, when Redis is the cache.
    pub cache_prefix: Option<String>,
    pub db_url: String,
    /// The in-test auth service the app asks, when it has one.
    pub auth: Option<AuthServer>,
    broker_url: String,
    nats: async_nats::Client,
    js: jetstream::Context,
    own_nats: Option<Nats>,
    own_redis: Option<Redis>,
    /// The app's temporary directory (its SQLite file on the SQLite backend).
    pub dir: TempDir,
}

/// An HTTP client that ignores proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// The `twins` binary over a clean environment (no inherited `MG_*` or `OTEL_*`) with
/// `vars`; killed when dropped.
pub fn twins_command(vars: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_twins"));
    for (k, _) in std::env::vars() {
        if k.starts_with("MG_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The state of one dependency in a `/health` body (the health-check draft's
/// `"<name>:responseTime": [{status, output, ...}]`): `pass`, or the word saying what is
/// wrong (`unavailable`, `disconnected`); `missing` when the body has no such check.
pub fn health_check(body: &Value, name: &str) -> String {
    let check = &body["checks"][format!("{name}:responseTime")][0];
    match (check["status"].as_str(), check["output"].as_str()) {
        (Some("pass"), _) => "pass".into(),
        (Some(_), Some(word)) => word.into(),
        (Some(status), None) => status.into(),
        (None, _) => "missing".into(),
    }
}

/// What `/health` answered.
#[derive(Debug)]
pub struct Health {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl TestApp {
    /// Defaults: in this process, the in-test gRPC auth service, the shared broker, the
    /// memory cache, no notifications, a fresh database on the test's backend.
    pub fn builder() -> Builder {
        Builder {
            launch: Launch::InProcess,
            auth: Auth::Grpc,
            broker: BrokerChoice::Shared,
            cache: CacheChoice::Memory,
            notifications: false,
            database: None,
            vars: Vec::new(),
        }
    }

    // ------------------------------------------------------------------ instances

    /// Starts one more instance with the same configuration; requests go to it from
    /// now on.
    pub async fn start(&mut self) {
        let instance = match self.launch {
            Launch::InProcess => Instance::in_process(&self.vars).await,
            Launch::Process => Instance::process(&self.vars).await,
        };
        self.instances.push(instance);
    }

    /// Sets a variable for the instances started from now on (an empty value unsets
    /// one).
    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.to_owned(), value.to_owned()));
    }

    /// Every running instance, oldest first.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Instance `i`, oldest first.
    pub fn instance_at(&mut self, i: usize) -> &mut Instance {
        &mut self.instances[i]
    }

    /// Takes instance `i` out of the app, to kill or stop it: requests no longer go
    /// to it.
    pub fn take_instance(&mut self, i: usize) -> Instance {
        self.instances.remove(i)
    }

    /// The newest instance.
    pub fn instance(&mut self) -> &mut Instance {
        self.instances.last_mut().expect("a started instance")
    }

    /// The oldest instance still in the list.
    pub fn first_instance(&mut self) -> &mut Instance {
        self.instances.first_mut().expect("a started instance")
    }

    fn current(&self) -> &Instance {
        self.instances.last().expect("a started instance")
    }

    /// Stops the newest instance gracefully and fails the test unless it stopped
    /// cleanly (exit code 0 for a process).
    pub async fn stop(&mut self) {
        let instance = self.instances.pop().expect("a started instance");
        instance.stop().await;
    }

    /// The store of the newest instance (in-process only).
    pub fn store(&self) -> Store {
        match &self.current().run {
            Run::InProcess { store, .. } => store.clone(),
            Run::Process(_) => panic!("a process's store is not reachable from the test"),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.current().addr
    }

    pub fn url(&self, path: &str) -> String {
        self.current().url(path)
    }

    // ------------------------------------------------------------------ HTTP

    /// A request without credentials.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A request with `Authorization: Bearer <token>`.
    pub fn authed(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(token)
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        send(self.authed(Method::GET, path, token)).await
    }

    pub async fn get_query(&self, path: &str, token: &str, query: &[(&str, &str)]) -> Response {
        send(self.authed(Method::GET, path, token).query(query)).await
    }

    pub async fn post_twin(&self, token: &str, body: &Value) -> Response {
        send(self.authed(Method::POST, "/twins", token).json(body)).await
    }

    /// POST /twins with a raw body and content type.
    pub async fn post_raw(
        &self,
        token: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Response {
        let mut req = self.authed(Method::POST, "/twins", token).body(body);
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        send(req).await
    }

    /// PUT /twins/{id} with a raw body and content type.
    pub async fn put_raw(
        &self,
        token: &str,
        id: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Response {
        let mut req = self
            .authed(Method::PUT, &format!("/twins/{id}"), token)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        send(req).await
    }

    /// Creates a twin and returns it, failing the test unless the answer is 201.
    pub async fn create_twin(&self, token: &str, body: &Value) -> Value {
        let resp = self.post_twin(token, body).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "create {body}");
        json_of(resp).await
    }

    /// The id of a freshly created twin.
    pub async fn create_id(&self, token: &str, body: &Value) -> String {
        super::id_of(&self.create_twin(token, body).await)
    }

    /// Alice's new twin whose one definition has `attributes` and a one-second delta.
    pub async fn create_listening(&self, attributes: &[Value]) -> String {
        self.create_id(ALICE, &listening(attributes)).await
    }

    pub async fn put_twin(&self, token: &str, id: &str, body: &Value) -> Response {
        send(
            self.authed(Method::PUT, &format!("/twins/{id}"), token)
                .json(body),
        )
        .await
    }

    /// Updates Alice's twin, failing the test unless the answer is 200.
    pub async fn update_twin(&self, id: &str, body: &Value) -> Value {
        let resp = self.put_twin(ALICE, id, body).await;
        assert_eq!(resp.status(), StatusCode::OK, "update {body}");
        json_of(resp).await
    }

    pub async fn delete_twin(&self, token: &str, id: &str) -> Response {
        send(self.authed(Method::DELETE, &format!("/twins/{id}"), token)).await
    }

    /// GET /twins/{id} as JSON, failing the test unless the answer is 200.
    pub async fn twin(&self, token: &str, id: &str) -> Value {
        let resp = self.get(&format!("/twins/{id}"), token).await;
        assert_eq!(resp.status(), StatusCode::OK, "view twin {id}");
        json_of(resp).await
    }

    /// GET /twins with a query, failing the test unless the answer is 200.
    pub async fn list_twins(&self, token: &str, query: &[(&str, &str)]) -> Value {
        let resp = self.get_query("/twins", token, query).await;
        assert_eq!(resp.status(), StatusCode::OK, "list twins {query:?}");
        json_of(resp).await
    }

    /// GET /states/{id} with a query, failing the test unless the answer is 200.
    pub async fn list_states(&self, token: &str, id: &str, query: &[(&str, &str)]) -> Value {
        let resp = self.get_query(&format!("/states/{id}"), token, query).await;
        assert_eq!(resp.status(), StatusCode::OK, "list states {query:?}");
        json_of(resp).await
    }

    /// How many twins the user sees.
    pub async fn twin_count(&self, token: &str) -> u64 {
        self.list_twins(token, &[]).await["total"]
            .as_u64()
            .expect("total is a number")
    }

    /// Every state of Alice's twin, in order.
    pub async fn states(&self, twin: &str) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let offset = all.len().to_string();
            let page = self
                .list_states(ALICE, twin, &[("limit", "100"), ("offset", &offset)])
                .await;
            let items = page["states"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                return all;
            }
            all.extend(items);
        }
    }

    /// The states of Alice's twin once `done` holds; fails the test with what is there
    /// when it does not within [`DEADLINE`].
    pub async fn states_until(&self, twin: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let what = format!("the states of twin {twin}");
        eventually(&what, || self.states(twin), |s| done(s)).await
    }

    /// Publishes a message on `marker`'s channel and returns the states of Alice's twin
    /// from before it, once the state it makes has arrived. The service applies a
    /// group's messages in stream order, so everything published earlier has been
    /// applied (or dropped) by then: what is returned is all it will ever make of it.
    pub async fn states_before(&self, twin: &str, marker: &Marker) -> Vec<Value> {
        let n = marker.next_value();
        self.publish(
            &marker.channel,
            "",
            json!([{"n": "marker", "v": n, "t": n}]),
        )
        .await;
        let mut states = self
            .states_until(twin, |s| {
                s.last()
                    .is_some_and(|last| last["payload"]["marker"] == json!(n))
            })
            .await;
        states.pop();
        states
    }

    pub async fn health(&self) -> Health {
        let resp = send(self.request(Method::GET, "/health")).await;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Health {
            status,
            content_type,
            body: json_of(resp).await,
        }
    }

    /// `/health` once `done` holds; fails the test when it does not within [`DEADLINE`].
    pub async fn health_until(&self, done: impl Fn(&Health) -> bool) -> Health {
        eventually("/health", || self.health(), done).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        send(self.request(Method::GET, "/metrics"))
            .await
            .text()
            .await
            .expect("metrics text")
    }

    // ------------------------------------------------------------------ broker

    /// A client of the app's broker.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// A subscription on the app's broker, in place on the server when this returns.
    pub async fn subscribe(&self, subject: String) -> async_nats::Subscriber {
        let subscription = self.nats.subscribe(subject).await.expect("subscribe");
        self.nats.flush().await.expect("flush");
        subscription
    }

    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// Waits until the group's durable consumer waits for messages: from then on, what
    /// is published is the group's to apply.
    pub async fn wait_ingesting(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(stream) = self.js.get_stream(twins::broker::STREAM).await
                && stream
                    .consumer_info(&self.group)
                    .await
                    .is_ok_and(|i| i.num_waiting > 0)
            {
                if let Some(instance) = self.instances.last() {
                    instance.ingesting.store(true, Ordering::SeqCst);
                }
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the consumer {} never waited for messages",
                self.group
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The stream sequence up to which the group's consumer has acked (0 when none).
    ///
    /// A consumer that has delivered nothing yet reports an ack floor of 0 (NATS 2.9),
    /// even when an instance created it at the group's stored position + 1 after a
    /// takeover with nothing left to apply; everything before its first sequence is
    /// applied then.
    pub async fn acked(&self) -> u64 {
        match self.js.get_stream(twins::broker::STREAM).await {
            Ok(stream) => stream
                .consumer_info(&self.group)
                .await
                .map(|i| {
                    if i.delivered.consumer_sequence == 0 {
                        i.delivered.stream_sequence
                    } else {
                        i.ack_floor.stream_sequence
                    }
                })
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// The group's consumer as the broker sees it, for a failing test's message: where
    /// delivery and the ack floor are, and what waits for an ack or a pull.
    pub async fn consumer_summary(&self) -> String {
        let stream = match self.js.get_stream(twins::broker::STREAM).await {
            Ok(stream) => stream,
            Err(e) => return format!("no stream: {e}"),
        };
        match stream.consumer_info(&self.group).await {
            Ok(i) => format!(
                "delivered {} (consumer {}), ack floor {} (consumer {}), ack pending {}, \
                 redelivered {}, pending {}, waiting pulls {}",
                i.delivered.stream_sequence,
                i.delivered.consumer_sequence,
                i.ack_floor.stream_sequence,
                i.ack_floor.consumer_sequence,
                i.num_ack_pending,
                i.num_redelivered,
                i.num_pending,
                i.num_waiting
            ),
            Err(e) => format!("no consumer: {e}"),
        }
    }

    /// Publishes `senml` as a device on `channel`/`subtopic`; the stream sequence.
    pub async fn publish(&self, channel: &str, subtopic: &str, senml: Value) -> u64 {
        let data = envelope(channel, subtopic, senml.to_string().into_bytes());
        self.publish_raw(channel, subtopic, data).await
    }

    /// Publishes `data` as it is on the subject of `channel`/`subtopic`, stored by
    /// JetStream; the stream sequence. While an instance runs, first waits until it
    /// takes messages, so that the message is the group's to apply.
    pub async fn publish_raw(&self, channel: &str, subtopic: &str, data: Vec<u8>) -> u64 {
        if self
            .instances
            .last()
            .is_some_and(|i| !i.ingesting.load(Ordering::SeqCst))
        {
            self.wait_ingesting().await;
        }
        self.js
            .publish(twins::broker::subject(channel, subtopic), data.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack")
            .sequence
    }

    fn own_nats(&mut self) -> &mut Nats {
        self.own_nats
            .as_mut()
            .expect("a broker of the app's own (Builder::own_broker)")
    }

    /// Kills the app's own broker.
    pub fn stop_broker(&mut self) {
        self.own_nats().stop();
    }

    /// Starts the app's own broker again with its data, and waits until its stream
    /// takes messages again.
    pub async fn restart_broker(&mut self) {
        self.own_nats().restart().await;
        self.reconnect().await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.js.get_stream(twins::broker::STREAM).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream did not come back with the broker"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the app's own broker again without any data: the stream starts over.
    pub async fn restart_broker_empty(&mut self) {
        self.own_nats().restart_empty().await;
        self.reconnect().await;
    }

    /// A fresh connection: the old one reconnects in the background, at its own pace.
    async fn reconnect(&mut self) {
        self.nats = async_nats::connect(&self.broker_url)
            .await
            .expect("the broker is back");
        self.js = jetstream::new(self.nats.clone());
    }

    /// Kills the app's own Redis.
    pub fn stop_redis(&mut self) {
        self.own_redis = None;
    }
}

/// Log lines of each spawned process a failing test prints, the last ones.
const LOG_TAIL: usize = 200;

impl Drop for TestApp {
    fn drop(&mut self) {
        let shared = self.own_nats.is_none();
        if std::thread::panicking() {
            // What the processes said last goes with the failure, so that a failure
            // seen once in a run can be read afterwards.
            for (i, instance) in self.instances.iter().enumerate() {
                let lines = instance.log_lines();
                if lines.is_empty() {
                    continue;
                }
                let from = lines.len().saturating_sub(LOG_TAIL);
                eprintln!(
                    "instance {i}: its last {} of {} log lines:\n{}",
                    lines.len() - from,
                    lines.len(),
                    lines[from..].join("\n")
                );
            }
        }
        for instance in self.instances.drain(..) {
            let Run::InProcess { shutdown, task, .. } = instance.run else {
                continue;
            };
            let _ = shutdown.send(());
            // An app dropped in the middle of a test keeps running until it has stopped,
            // and may create its consumer after the deletion below: delete it again
            // then. The test's clean-up waits for that before dropping the database.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (group, url) = (self.group.clone(), self.broker_url.clone());
                backend::track(rt.spawn(async move {
                    let _ = task.await;
                    if shared && let Ok(c) = async_nats::connect(url).await {
                        let _ = jetstream::new(c)
                            .delete_consumer_from_stream(&group, twins::broker::STREAM)
                            .await;
                    }
                }));
            }
        }
        if shared {
            delete_consumer_at(&self.broker_url, &self.group);
        }
    }
}

/// A channel of the test's own that a twin listens to (attribute `marker`), to learn
/// when everything published before has been applied: see [`TestApp::states_before`].
pub struct Marker {
    pub channel: String,
    sent: std::sync::atomic::AtomicU64,
}

impl Default for Marker {
    fn default() -> Self {
        Self::new()
    }
}

impl Marker {
    pub fn new() -> Self {
        Self {
            channel: unique("marker-"),
            sent: 0.into(),
        }
    }

    /// The attribute to put into the twin's definition.
    pub fn attribute(&self) -> Value {
        attribute("marker", &self.channel, "", true)
    }

    /// The next marker value, also used as its record time (seconds since the epoch):
    /// in 2030, later than any test data, so that it always opens a new state.
    fn next_value(&self) -> u64 {
        1_900_000_000 + self.sent.fetch_add(1, Ordering::SeqCst) * 1_000
    }
}

/// An attribute of a twin's definition.
pub fn attribute(name: &str, channel: &str, subtopic: &str, persist: bool) -> Value {
    json!({"name": name, "channel": channel, "subtopic": subtopic, "persist_state": persist})
}

/// A twin body with one definition of `attributes` and a one-second delta.
pub fn listening(attributes: &[Value]) -> Value {
    json!({"name": "machine", "definition": {"attributes": attributes, "delta": 1_000_000_000}})
}

// ---------------------------------------------------------------------- instances

/// One running service.
pub struct Instance {
    pub addr: SocketAddr,
    /// Whether its consumer was seen waiting for messages.
    ingesting: AtomicBool,
    run: Run,
}

enum Run {
    InProcess {
        store: Store,
        shutdown: oneshot::Sender<()>,
        task: JoinHandle<std::io::Result<()>>,
    },
    Process(Process),
}

/// The binary as a child process.
struct Process {
    child: tokio::process::Child,
    /// Every log line it wrote so far (stderr lines prefixed with `stderr: `).
    logs: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    async fn in_process(vars: &[(String, String)]) -> Self {
        let config = Config::from_vars(vars.to_vec()).expect("valid test configuration");
        let app = Application::build(config)
            .await
            .expect("application starts");
        let addr = app.local_addr();
        let store = app.store();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            ingesting: AtomicBool::new(false),
            run: Run::InProcess {
                store,
                shutdown,
                task,
            },
        }
    }

    /// Starts the binary and waits until it logs where it listens.
    async fn process(vars: &[(String, String)]) -> Self {
        let mut child = twins_command(vars)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the twins binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_logs = logs.clone();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "twins service listening"
                    && let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok())
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
                out_logs.lock().expect("logs").push(line);
            }
        });
        let err_logs = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                err_logs
                    .lock()
                    .expect("logs")
                    .push(format!("stderr: {line}"));
            }
        });
        let addr = match tokio::time::timeout(DEADLINE, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "the binary did not report listening; logs: {:#?}",
                logs.lock().expect("logs")
            ),
        };
        Self {
            addr,
            ingesting: AtomicBool::new(false),
            run: Run::Process(Process { child, logs }),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn process_mut(&mut self) -> &mut Process {
        match &mut self.run {
            Run::Process(p) => p,
            Run::InProcess { .. } => panic!("not a process (Builder::process)"),
        }
    }

    /// The process id of the running binary.
    pub fn pid(&mut self) -> u32 {
        self.process_mut()
            .child
            .id()
            .expect("the binary is running")
    }

    /// Sends SIGTERM, as a container runtime does to stop the service.
    pub fn terminate(&mut self) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM delivered");
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill(&mut self) {
        let child = &mut self.process_mut().child;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }

    /// Waits for the process to exit; `within` only bounds a failing test.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        let process = self.process_mut();
        match tokio::time::timeout(within, process.child.wait()).await {
            Ok(status) => status.expect("exit status"),
            Err(_) => panic!(
                "the binary did not exit within {within:?}; logs: {:#?}",
                process.logs.lock().expect("logs")
            ),
        }
    }

    /// Every log line of the process so far (none for an instance in this process).
    pub fn log_lines(&self) -> Vec<String> {
        match &self.run {
            Run::Process(p) => p.logs.lock().expect("logs").clone(),
            Run::InProcess { .. } => Vec::new(),
        }
    }

    /// Every log line of the process so far.
    pub fn logs(&mut self) -> Vec<String> {
        self.process_mut().logs.lock().expect("logs").clone()
    }

    /// Stops gracefully: the service's task ends without error, the process exits 0.
    pub async fn stop(mut self) {
        if let Run::Process(_) = self.run {
            self.terminate();
            let status = self.wait(DEADLINE).await;
            assert!(status.success(), "exit {status:?}; logs {:#?}", self.logs());
            return;
        }
        let Run::InProcess { shutdown, task, .. } = self.run else {
            unreachable!("a process returned above");
        };
        let _ = shutdown.send(());
        task.await
            .expect("service task")
            .expect("service stops cleanly");
    }
}
