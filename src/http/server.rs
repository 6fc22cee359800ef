//! The accept loop of the HTTP and HTTPS listener, and the limits that keep what a
//! client can hold bounded: a cap on open connections, a deadline for a request head
//! (and for a TLS handshake), a deadline for an idle keep-alive connection, and the same
//! deadline for a response whose client stopped reading it.
//!
//! The per-request deadline is a layer of the router (`http::request_deadline`), so the
//! answer it gives is an ordinary JSON error that the metrics and spans see.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a keep-alive
//! connection waits for its next request, so it could not be told apart from the idle
//! timeout. Each connection instead tracks its [`Phase`] from what its socket reads and
//! writes and when its requests start and end, and one task per connection closes it
//! when the deadline of its phase passes.
//!
//! A connection past the cap is accepted and closed at once, not left waiting in the
//! kernel's backlog: the client learns at once that this instance is full (a proxy can
//! try another), each refusal is counted, and the file descriptors the process holds
//! stay bounded.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use super::metrics;

/// What a client may hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the first byte of a request (or from the connection, or from the end of its
    /// TLS handshake) to the end of its head; also the bound on a TLS handshake.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections open at once, TLS handshakes in progress included.
    pub max_connections: usize,
    /// From a complete request head to the response.
    pub request_timeout: Duration,
}

/// Serves `router` on `listener` (TLS sessions when `tls` is set) until `signal`
/// completes; then closes the listener at once, lets requests in progress finish, and
/// returns when every connection is closed. Dropping the returned future drops every
/// connection.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    limits: Limits,
    signal: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let tls = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let closing = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut cap_log = CapLog::default();
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            // Reaps finished connections, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    ::metrics::counter!(metrics::CONNECTIONS_REFUSED).increment(1);
                    cap_log.refused(limits.max_connections);
                    drop(tcp);
                    continue;
                };
                cap_log.accepted(slots.available_permits());
                // Each response, and each event of a change feed stream, is written
                // at once rather than held back until the client acknowledges the
                // previous write (Nagle's algorithm against delayed ACKs: up to 40 ms).
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, %addr, "TCP_NODELAY not set");
                }
                let connection = Connection {
                    addr,
                    router: router.clone(),
                    limits,
                    closing: closing.clone(),
                    _slot: Slot::open(slot),
                };
                connections.spawn(connection.run(tcp, tls.clone()));
            }
        }
    }
    // New connections are refused from here on; those open finish what they started.
    drop(listener);
    closing.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// How often the warning is repeated while connections go on being refused.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// The log lines of the connection cap: one when refusals start (repeated at most every
/// [`CAP_LOG_EVERY`] while they go on), one when the burst is over; never one per
/// connection.
#[derive(Default)]
struct CapLog {
    /// Refusals since the last line.
    refused: u64,
    /// When the last warning was written; set while refusals go on.
    warned: Option<Instant>,
}

impl CapLog {
    fn refused(&mut self, limit: usize) {
        self.refused += 1;
        if self.warned.is_none_or(|at| at.elapsed() >= CAP_LOG_EVERY) {
            tracing::warn!(
                limit,
                refused = self.refused,
                "connection limit reached: new connections are closed until one ends"
            );
            self.warned = Some(Instant::now());
            self.refused = 0;
        }
    }

    /// A connection was taken, leaving `free` slots. At the cap a freed slot is taken at
    /// once, so only room to spare ends the burst: churn at the cap writes no pair of
    /// lines per connection.
    fn accepted(&mut self, free: usize) {
        if self.warned.is_some() && free > 0 {
            tracing::info!(
                refused = self.refused,
                "connection limit: below the cap again"
            );
            *self = Self::default();
        }
    }
}

/// Errors of `accept` that concern one connection (the client gave up before it was
/// accepted) are skipped; others (out of file descriptors) get a pause, so the loop
/// does not spin while the cause lasts.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept connections; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A place under the connection cap, given back (and the gauge lowered) when the
/// connection's task ends, however it ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn open(permit: OwnedSemaphorePermit) -> Self {
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).decrement(1.0);
    }
}

struct Connection {
    addr: SocketAddr,
    router: Router,
    limits: Limits,
    closing: CancellationToken,
    _slot: Slot,
}

impl Connection {
    async fn run(self, tcp: TcpStream, tls: Option<TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.serve(tcp).await;
        };
        let handshake = tokio::time::timeout(self.limits.header_timeout, acceptor.accept(tcp));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(addr = %self.addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(addr = %self.addr, "TLS handshake timed out");
                    return;
                }
            },
            // Nothing was asked yet: nothing to finish.
            () = self.closing.cancelled() => return,
        };
        self.serve(stream).await;
    }

    /// Serves HTTP/1.1 on `io` until the client closes it, a deadline passes, or the
    /// server stops.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let mut phase = activity.0.subscribe();
        let router = TowerToHyperService::new(self.router);
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let request = activity.request();
                let response = hyper::service::Service::call(&router, req);
                async move {
                    let response = response.await;
                    drop(request);
                    response
                }
            })
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        // The deadlines below replace it (see the module documentation).
        http.header_read_timeout(None);
        let writes = activity.clone();
        let conn = http.serve_connection(TokioIo::new(Watched { io, activity }), service);
        let mut conn = std::pin::pin!(conn);
        let mut stopping = false;
        loop {
            let current = *phase.borrow_and_update();
            let deadline = current.deadline(&self.limits);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(addr = %self.addr, error = %e, "connection ended");
                    }
                    return;
                }
                () = self.closing.cancelled(), if !stopping => {
                    if matches!(current, Phase::Head(_)) {
                        // At most part of a request head: nothing started, nothing lost.
                        return;
                    }
                    // A request in progress completes, then hyper closes the connection.
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
                changed = phase.changed() => {
                    // The sender lives in `conn`, which outlives this loop.
                    if changed.is_err() {
                        return;
                    }
                }
                () = stalled(&writes, current, self.limits.idle_timeout) => {
                    // A client that reads nothing of a response (an event stream it
                    // stopped following) is gone as much as an idle one.
                    tracing::debug!(addr = %self.addr, "response not read in time; connection closed");
                    return;
                }
                () = sleep_until(deadline) => {
                    // Writes push an idle deadline back without waking this loop.
                    let now = Instant::now();
                    match *phase.borrow() {
                        Phase::Head(since) if since + self.limits.header_timeout <= now => {
                            tracing::debug!(addr = %self.addr, "request head not received in time");
                            return;
                        }
                        Phase::Idle(since) if since + self.limits.idle_timeout <= now => {
                            tracing::debug!(addr = %self.addr, "idle connection closed");
                            return;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Completes when the response of a busy connection has had its writes refused for
/// `limit`; never for a connection between requests.
async fn stalled(activity: &Activity, phase: Phase, limit: Duration) {
    if !matches!(phase, Phase::Busy(_)) {
        return std::future::pending().await;
    }
    loop {
        let at = match activity.blocked_since() {
            Some(since) if since + limit <= Instant::now() => return,
            Some(since) => since + limit,
            None => Instant::now() + limit,
        };
        tokio::time::sleep_until(at).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where a connection stands, which decides the deadline that applies to it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head since then: from the connection (or the end of its
    /// TLS handshake), or from the first byte after an idle spell.
    Head(Instant),
    /// Between requests since then (pushed back by each write of a response).
    Idle(Instant),
    /// This many requests in the service; no connection deadline applies, the
    /// per-request one does.
    Busy(usize),
}

impl Phase {
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match *self {
            Self::Head(since) => Some(since + limits.header_timeout),
            Self::Idle(since) => Some(since + limits.idle_timeout),
            Self::Busy(_) => None,
        }
    }
}

/// The phase of one connection, moved by its socket and its requests, watched by its
/// task. Only changes of the kind of phase wake the task: those can bring a deadline
/// forward, while a write only pushes one back.
///
/// It also records since when the socket has refused the response's bytes (the client
/// stopped reading): a response blocked that long is abandoned like an idle connection.
#[derive(Clone)]
struct Activity(
    Arc<watch::Sender<Phase>>,
    Arc<std::sync::Mutex<Option<Instant>>>,
);

impl Activity {
    fn new() -> Self {
        Self(
            Arc::new(watch::Sender::new(Phase::Head(Instant::now()))),
            Arc::default(),
        )
    }

    /// Since when writes have been refused, if they are.
    fn blocked_since(&self) -> Option<Instant> {
        *self
            .1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_blocked(&self, blocked: bool) {
        let mut since = self
            .1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (blocked, *since) {
            (true, None) => *since = Some(Instant::now()),
            (false, Some(_)) => *since = None,
            _ => {}
        }
    }

    fn read(&self) {
        self.0.send_if_modified(|phase| match phase {
            Phase::Idle(_) => {
                *phase = Phase::Head(Instant::now());
                true
            }
            _ => false,
        });
    }

    fn wrote(&self) {
        self.0.send_if_modified(|phase| {
            if let Phase::Idle(since) = phase {
                *since = Instant::now();
            }
            false
        });
    }

    fn request(&self) -> InService {
        self.0.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                Phase::Head(_) | Phase::Idle(_) => Phase::Busy(1),
            }
        });
        InService(self.clone())
    }
}

/// A request in the service; the connection is idle again when the last one ends,
/// whether it completes or is dropped.
struct InService(Activity);

impl Drop for InService {
    fn drop(&mut self) {
        self.0.0.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Idle(Instant::now()),
            }
        });
    }
}

/// The connection's socket, reporting reads and writes to its [`Activity`].
struct Watched<I> {
    io: I,
    activity: Activity,
}

impl<I> Watched<I> {
    /// Reports a write that moved bytes, or one the socket refused, and hands its
    /// outcome on.
    fn noted(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.activity.write_blocked(false);
                self.activity.wrote();
            }
            Poll::Pending => self.activity.write_blocked(true),
            _ => {}
        }
        polled
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.activity.write_blocked(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
