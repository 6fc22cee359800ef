//! Servers of a test's own, started as child processes on a free port: a NATS server
//! with JetStream that the test can stop and start again (on the same port, with or
//! without its data), and a Redis.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

/// A server process, killed on drop.
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

/// Waits (polling, 10 s at most) until something accepts connections on `port`.
pub async fn wait_port(port: u16) {
    for _ in 0..200 {
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

/// A NATS server with JetStream on a port of its own.
pub struct Nats {
    pub port: u16,
    /// Storage directories: the current one last; earlier ones are kept until drop.
    dirs: Vec<TempDir>,
    process: Option<Child>,
}

impl Nats {
    pub async fn start() -> Self {
        let mut nats = Self {
            port: free_port(),
            dirs: vec![tempfile::tempdir().expect("NATS storage directory")],
            process: None,
        };
        nats.run().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn storage(&self) -> PathBuf {
        self.dirs.last().expect("a storage directory").path().into()
    }

    async fn run(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.storage())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server must be installed (Debian package nats-server)");
        self.process = Some(Child(child));
        wait_port(self.port).await;
    }

    /// Kills the server (its data stays on disk).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts it again on the same port with the data it had.
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }

    /// Starts it again on the same port with no data: every stream starts over.
    pub async fn restart_empty(&mut self) {
        self.stop();
        self.dirs
            .push(tempfile::tempdir().expect("NATS storage directory"));
        self.run().await;
    }
}

/// A Redis server on a port of its own, without persistence.
pub struct Redis {
    pub port: u16,
    _process: Child,
}

impl Redis {
    pub async fn start() -> Self {
        let port = free_port();
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
        Self {
            port,
            _process: Child(child),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
