//! A TCP forwarder a test can cut and restore: the service reaches a real server through
//! it, [`Proxy::cut`] makes that server unreachable for the service without stopping it,
//! and [`Proxy::restore`] lets new connections through again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

pub struct Proxy {
    pub addr: SocketAddr,
    tasks: Arc<Mutex<JoinSet<()>>>,
    down: Arc<AtomicBool>,
    accept: AbortHandle,
}

impl Proxy {
    /// Forwards connections on a free local port to `target` (`host:port`).
    pub async fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let down = Arc::new(AtomicBool::new(false));
        let (target, conns, refuse) = (target.to_owned(), tasks.clone(), down.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    // The server is away for whoever connects: the connection ends
                    // (end of file, not a reset) before any answer, as a server that
                    // closes it does. What the client sends is read and dropped, so
                    // the kernel never turns the close into a reset.
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                conns.lock().expect("proxy lock").spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        })
        .abort_handle();
        Self {
            addr,
            tasks,
            down,
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
