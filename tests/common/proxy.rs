//! A TCP forwarder a test can cut: the service reaches a real server through it, and
//! [`Proxy::cut`] makes that server unreachable for the service without stopping it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

pub struct Proxy {
    pub addr: SocketAddr,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Forwards connections on a free local port to `target` (`host:port`).
    pub async fn to(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (target, conns) = (target.to_owned(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
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
            accept,
        }
    }

    /// Stops accepting and closes every forwarded connection.
    pub fn cut(&self) {
        self.accept.abort();
        self.tasks.lock().expect("proxy lock").abort_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}
