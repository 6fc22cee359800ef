//! The one in-test `magistrala.AuthService` every test authenticates against: it knows
//! two users, one token it answers `UNAVAILABLE` for and one that identifies nobody.
//!
//! A test that needs the service to be slow starts it [`held`](AuthServer::builder):
//! each call then waits until the test [releases](AuthServer::release) it, so "the
//! request is still in flight" is a state the test controls, not a race against a
//! delay. [`AuthServer::called`] says when a request has reached it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Status};

use twins::proto::magistrala::auth_service_server::{AuthService, AuthServiceServer};
use twins::proto::magistrala::{IdentityReq, IdentityRes};

/// Bearer token of the first user, whose identity id is [`ALICE_ID`]. Standalone apps
/// of the harness know it too.
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

/// Prefix of tokens identifying the user named by the rest (see [`token_of`]): users of
/// a test's own, for tests whose data is keyed by owner on shared servers (the change
/// feed's subjects).
pub const USER_TOKEN_PREFIX: &str = "user-token-";

/// A token the in-test auth service answers with identity `id`: a user of the test's
/// own.
pub fn token_of(id: &str) -> String {
    format!("{USER_TOKEN_PREFIX}{id}")
}

/// How long [`AuthServer::called`] waits for a call before failing the test.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Users {
    /// Calls answer once this is true.
    open: watch::Receiver<bool>,
    calls: mpsc::UnboundedSender<()>,
}

#[tonic::async_trait]
impl AuthService for Users {
    async fn identify(
        &self,
        request: Request<IdentityReq>,
    ) -> Result<tonic::Response<IdentityRes>, Status> {
        let _ = self.calls.send(());
        let mut open = self.open.clone();
        let _ = open.wait_for(|open| *open).await;
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
            token => match token.strip_prefix(USER_TOKEN_PREFIX) {
                Some(id) if !id.is_empty() => identity(id),
                _ => Err(Status::unauthenticated("unknown token")),
            },
        }
    }
}

/// How to start an [`AuthServer`].
#[derive(Default)]
pub struct AuthBuilder {
    tls: Option<ServerTlsConfig>,
    held: bool,
}

impl AuthBuilder {
    /// Serves over TLS (mutual when the configuration asks for client certificates).
    pub fn tls(mut self, tls: ServerTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Holds every call until [`AuthServer::release`].
    pub fn held(mut self) -> Self {
        self.held = true;
        self
    }

    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start(self) -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind auth listener");
        self.start_on(listener)
    }

    /// Starts on a bound listener.
    pub fn start_on(self, listener: TcpListener) -> AuthServer {
        let addr = listener.local_addr().expect("auth listener address");
        let (stop, stopped) = oneshot::channel::<()>();
        let (gate, open) = watch::channel(!self.held);
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            server = server
                .tls_config(tls)
                .expect("auth server TLS configuration");
        }
        let users = Users {
            open,
            calls: calls_tx,
        };
        let task = tokio::spawn(async move {
            server
                .add_service(AuthServiceServer::new(users))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("auth server failed");
        });
        AuthServer {
            addr,
            gate,
            calls: Arc::new(Mutex::new(calls)),
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// A running in-test auth service; dropping it stops it.
pub struct AuthServer {
    pub addr: SocketAddr,
    gate: watch::Sender<bool>,
    calls: Arc<Mutex<mpsc::UnboundedReceiver<()>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl AuthServer {
    pub fn builder() -> AuthBuilder {
        AuthBuilder::default()
    }

    /// A plain server answering at once.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Waits until a call has reached the service.
    pub async fn called(&self) {
        tokio::time::timeout(CALL_TIMEOUT, self.calls.lock().await.recv())
            .await
            .expect("a request reaches the auth service")
            .expect("auth service running");
    }

    /// How many calls reached the service since the last time this was asked (or
    /// [`Self::called`] took one).
    pub async fn calls_since(&self) -> usize {
        let mut calls = self.calls.lock().await;
        let mut n = 0;
        while calls.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Lets held calls (and all later ones) answer.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Stops the server and waits until it no longer accepts connections.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
