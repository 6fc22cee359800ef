//! A TCP forwarder a test can cut and restore: the service reaches a real server through
//! it, [`Proxy::cut`] makes that server unreachable for the service without stopping it,
//! and [`Proxy::restore`] lets new connections through again. [`Proxy::hold`] keeps what
//! the server sends from reaching the service (the connections stay up) until
//! [`Proxy::release`], and [`Proxy::sent`] counts the bytes the service sent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

pub struct Proxy {
    pub addr: SocketAddr,
    tasks: Arc<Mutex<JoinSet<()>>>,
    down: Arc<AtomicBool>,
    held: watch::Sender<bool>,
    sent: Arc<AtomicU64>,
    accept: AbortHandle,
}

/// Copies `from` to `to`, adding what it copied to `count`; while `held` is true it
/// reads nothing more (what was read is written when released).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
    count: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if held.wait_for(|h| !*h).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(count) = &count {
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    /// Forwards connections on a free local port to `target` (`host:port`).
    pub async fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (held, _) = watch::channel(false);
        let sent = Arc::new(AtomicU64::new(0));
        let (target, conns, refuse) = (target.to_owned(), tasks.clone(), down.clone());
        let (hold, counted) = (held.clone(), sent.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    // The server is away for whoever connects: the connection ends
                    // (end of file, not a reset) before any answer, as a server that
                    // closes it does. What the client sends is read and dropped, so
                    // the kernel never turns the close into a reset.
                    tokio::spawn(async move {
                        let _ = inbound.shutdown().await;
                        let mut sink = [0u8; 1024];
                        let drain = async {
                            while matches!(inbound.read(&mut sink).await, Ok(n) if n > 0) {}
                        };
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
                    });
                    continue;
                }
                let target = target.clone();
                let (hold, counted) = (hold.subscribe(), counted.clone());
                conns.lock().expect("proxy lock").spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        let (client_read, client_write) = inbound.into_split();
                        let (server_read, server_write) = outbound.into_split();
                        let (never, _) = watch::channel(false);
                        tokio::join!(
                            pump(client_read, server_write, never.subscribe(), Some(counted)),
                            pump(server_read, client_write, hold, None),
                        );
                    }
                });
            }
        })
        .abort_handle();
        Self {
            addr,
            tasks,
            down,
            held,
            sent,
            accept,
        }
    }

    /// Closes every forwarded connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.tasks.lock().expect("proxy lock").abort_all();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Keeps what the server sends from reaching the service until [`Proxy::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets what the server sent through.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// The bytes the service has sent the server so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
