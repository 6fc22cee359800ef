//! Shared harness of the black-box HTTP tests: an in-test auth service knowing two
//! users, and the application started on port 0 with a database of its own on the
//! test's backend (see [`backend`]).
//!
//! Every test gets its own temporary directory, database and auth server, so tests run
//! in parallel without seeing each other's twins.

#![allow(dead_code)]

pub mod backend;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

use twins::app::Application;
use twins::config::Config;
use twins::proto::magistrala::auth_service_server::{AuthService, AuthServiceServer};
use twins::proto::magistrala::{IdentityReq, IdentityRes};
use twins::store::Store;

/// Bearer token of the first user, whose identity id is [`ALICE_ID`].
pub const ALICE: &str = "alice-token";
pub const ALICE_ID: &str = "alice";
/// Bearer token of the second user, whose identity id is [`BOB_ID`].
pub const BOB: &str = "bob-token";
pub const BOB_ID: &str = "bob";
/// A token the auth service does not know.
pub const STRANGER: &str = "stranger-token";
/// A token for which the auth service answers `UNAVAILABLE`.
pub const OVERLOADED: &str = "overloaded-token";
/// A token for which the auth service answers an identity with an empty id.
pub const ANONYMOUS: &str = "anonymous-token";

/// The in-test `magistrala.AuthService`.
struct Users;

#[tonic::async_trait]
impl AuthService for Users {
    async fn identify(
        &self,
        request: Request<IdentityReq>,
    ) -> Result<tonic::Response<IdentityRes>, Status> {
        let identity = |id: &str| {
            Ok(tonic::Response::new(IdentityRes {
                id: id.to_owned(),
                user_id: format!("{id}-user"),
                domain_id: "domain-1".to_owned(),
            }))
        };
        match request.into_inner().token.as_str() {
            ALICE => identity(ALICE_ID),
            BOB => identity(BOB_ID),
            ANONYMOUS => identity(""),
            OVERLOADED => Err(Status::unavailable("auth service overloaded")),
            _ => Err(Status::unauthenticated("unknown token")),
        }
    }
}

/// A running in-test auth service; dropping it stops it.
pub struct AuthServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AuthServer {
    /// Stops the server and waits until it no longer accepts connections.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Starts the auth service on 127.0.0.1 with an ephemeral port.
pub async fn spawn_auth() -> AuthServer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind auth listener");
    spawn_auth_on(listener)
}

/// Starts the auth service on a bound listener.
pub fn spawn_auth_on(listener: TcpListener) -> AuthServer {
    let addr = listener.local_addr().expect("auth listener address");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(Users))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
            .expect("auth server failed");
    });
    AuthServer {
        addr,
        stop: Some(stop),
        task,
    }
}

/// An address on which nothing listens (bound, then released).
pub async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// The application under test, serving on an ephemeral port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: Store,
    pub dir: TempDir,
    /// The auth service the application asks, when the test started one.
    pub auth: Option<AuthServer>,
    /// Name of the app's durable consumer on the shared broker, deleted on drop.
    pub group: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Address of the shared NATS server the tests use.
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// A consumer name of the test's own, so parallel tests never share one.
pub fn unique_group() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes a test's durable consumer from the broker at `url`. Runs on a thread and
/// connection of its own, since it is called from `Drop` while the test's runtime is
/// blocked; deletes twice, because a creation request of the stopping app may still be
/// on its way to the server.
pub fn delete_consumer_at(url: &str, group: &str) {
    let (url, group) = (url.to_owned(), group.to_owned());
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let connected =
                tokio::time::timeout(Duration::from_secs(2), async_nats::connect(url)).await;
            if let Ok(Ok(c)) = connected {
                let js = async_nats::jetstream::new(c);
                for pause in [Duration::ZERO, Duration::from_millis(300)] {
                    tokio::time::sleep(pause).await;
                    let _ = js
                        .delete_consumer_from_stream(&group, twins::broker::STREAM)
                        .await;
                }
            }
        });
    })
    .join();
}

/// [`delete_consumer_at`] on the shared broker.
pub fn delete_consumer(group: &str) {
    delete_consumer_at(NATS_URL, group);
}

/// Waits (10 s at most) until the durable consumer `group` exists and waits for messages.
pub async fn wait_for_consumer(js: &async_nats::jetstream::Context, group: &str) {
    for _ in 0..200 {
        let ready = match js.get_stream(twins::broker::STREAM).await {
            Ok(s) => s
                .consumer_info(group)
                .await
                .is_ok_and(|i| i.num_waiting > 0),
            Err(_) => false,
        };
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("consumer {group} not ready within 10 s");
}

/// `payload` in the `messaging.Message` a device's message arrives in.
pub fn envelope(channel: &str, subtopic: &str, payload: Vec<u8>) -> Vec<u8> {
    twins::broker::encode(&twins::broker::Envelope {
        channel: channel.into(),
        subtopic: subtopic.into(),
        publisher: "device".into(),
        protocol: "mqtt".into(),
        payload,
        created: 0,
    })
}

/// Publishes `payload` as a device would: in a `messaging.Message` on
/// `channels.<channel>[.<subtopic>]`, stored by JetStream.
pub async fn publish_device(
    js: &async_nats::jetstream::Context,
    channel: &str,
    subtopic: &str,
    payload: Vec<u8>,
) {
    js.publish(
        twins::broker::subject(channel, subtopic),
        envelope(channel, subtopic, payload).into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// Starts the application backed by a fresh in-test auth service. `extra` variables
/// override the defaults; an empty value unsets a variable.
pub async fn spawn_app(extra: &[(&str, &str)]) -> TestApp {
    let auth = spawn_auth().await;
    let url = auth.addr.to_string();
    start(&[("MG_AUTH_GRPC_URL", url.as_str())], extra, Some(auth)).await
}

/// Starts the application with only the HTTP and database variables set plus `vars`
/// (no auth service is started).
pub async fn spawn_app_with(vars: &[(&str, &str)]) -> TestApp {
    start(&[], vars, None).await
}

async fn start(base: &[(&str, &str)], extra: &[(&str, &str)], auth: Option<AuthServer>) -> TestApp {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db_url = backend::database_url(dir.path());
    let group = unique_group();
    let mut vars: Vec<(String, String)> = [
        ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
        ("MG_TWINS_HTTP_PORT", "0"),
        ("MG_TWINS_DB_URL", db_url.as_str()),
        ("MG_MESSAGE_BROKER_URL", NATS_URL),
        ("MG_TWINS_INSTANCE_GROUP", group.as_str()),
        ("MG_TWINS_SHUTDOWN_TIMEOUT", "1s"),
    ]
    .iter()
    .chain(base)
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    // Later entries win, as in the environment after an override.
    let mut seen = std::collections::HashSet::new();
    vars.reverse();
    vars.retain(|(k, _)| seen.insert(k.clone()));
    let config = Config::from_vars(vars).expect("valid test configuration");
    let app = Application::build(config)
        .await
        .expect("application starts");
    let addr = app.local_addr();
    let store = app.store();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: client(),
        store,
        dir,
        auth,
        group,
        shutdown: Some(shutdown),
        task: Some(task),
    }
}

/// An HTTP client that ignores proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        delete_consumer(&self.group);
        // An app dropped in the middle of a test keeps running until it has stopped,
        // and may create its consumer after the deletion above: delete it again then.
        // The test's clean-up waits for that before dropping the app's database.
        if let (Some(task), Ok(rt)) = (self.task.take(), tokio::runtime::Handle::try_current()) {
            let group = self.group.clone();
            backend::track(rt.spawn(async move {
                let _ = task.await;
                if let Ok(c) = async_nats::connect(NATS_URL).await {
                    let _ = async_nats::jetstream::new(c)
                        .delete_consumer_from_stream(&group, twins::broker::STREAM)
                        .await;
                }
            }));
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

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
        id_of(&self.create_twin(token, body).await)
    }

    pub async fn put_twin(&self, token: &str, id: &str, body: &Value) -> Response {
        send(
            self.authed(Method::PUT, &format!("/twins/{id}"), token)
                .json(body),
        )
        .await
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
}

pub async fn send(req: RequestBuilder) -> Response {
    req.send().await.expect("request reaches the service")
}

pub async fn json_of(resp: Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.expect("response body");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: body {text:?} is not JSON: {e}"))
}

pub fn id_of(twin: &Value) -> String {
    twin["id"]
        .as_str()
        .expect("twin has a string id")
        .to_owned()
}

pub fn header(resp: &Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name} header"))
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

/// Asserts the response is `status` with a JSON `{"error": "<non-empty>"}` body served
/// as `application/json`, and returns the message.
pub async fn assert_error(resp: Response, status: StatusCode) -> String {
    let got = resp.status();
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let text = resp.text().await.expect("response body");
    assert_eq!(got, status, "body: {text}");
    assert!(
        content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/json")),
        "{status}: error content type {content_type:?}"
    );
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{status}: error body {text:?} is not JSON: {e}"));
    let obj = body.as_object().expect("error body is an object");
    assert_eq!(obj.len(), 1, "error body has only `error`: {body}");
    let message = obj["error"].as_str().expect("`error` is a string");
    assert!(!message.is_empty(), "error message is empty");
    message.to_owned()
}

/// Asserts a timestamp is RFC 3339 in UTC with at least millisecond precision.
pub fn assert_timestamp(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp {v} is not a string"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "{s} is not RFC 3339"
    );
    assert!(s.ends_with('Z'), "{s} is not in UTC");
    let fraction = s
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("{s} has no fractional part"));
    assert!(
        fraction.len() >= 3 && fraction.bytes().all(|b| b.is_ascii_digit()),
        "{s} has less than millisecond precision"
    );
}

/// A server process of the test's own (Redis or NATS on a free port), killed on drop.
pub struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub async fn wait_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server on port {port} did not start");
}

pub async fn own_redis(port: u16) -> Child {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (Debian package redis-server)");
    wait_port(port).await;
    Child(child)
}

pub async fn own_nats(port: u16, dir: &std::path::Path) -> Child {
    let child = std::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server must be installed (Debian package nats-server)");
    wait_port(port).await;
    Child(child)
}
