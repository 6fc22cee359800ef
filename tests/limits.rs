//! What a client can hold, over raw sockets: a request head sent too slowly, a
//! keep-alive connection left idle, connections past the cap, a handshake never
//! finished, a request the service cannot answer in time. Every wait has a generous
//! deadline; nothing asserts on elapsed time.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::tls::{https_request, make_pki, tls_connect};
use common::{ALICE, Auth, AuthServer, TestApp};

/// Far longer than any limit the tests set: reaching it means the limit did not act.
const DEADLINE: Duration = Duration::from_secs(10);

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// The service in standalone mode with `vars` on top.
async fn app(vars: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .auth(Auth::Standalone)
        .vars(vars)
        .spawn()
        .await
}

/// Reads until the server closes the connection (end of stream or reset), and returns
/// what arrived; panics if it is still open at the deadline.
async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {DEADLINE:?}; received {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0) | Err(_)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a request for `/health` on a new connection and reads its answer; the
/// connection stays open (keep-alive). `None` when the server closes it unanswered.
async fn served(addr: SocketAddr) -> Option<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(HEALTH).await.ok()?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
            .await
            .expect("an answer or a close before the deadline")
            .ok()?;
        if n == 0 {
            return None;
        }
        received.extend_from_slice(&buf[..n]);
        if let Some(length) = complete_response(&received) {
            assert!(
                received.starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&received[..length])
            );
            return Some(tcp);
        }
    }
}

/// The length of the response at the start of `raw`, once all of it has arrived.
fn complete_response(raw: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(raw);
    let (head, _) = text.split_once("\r\n\r\n")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length header");
    let total = head.len() + 4 + length;
    (raw.len() >= total).then_some(total)
}

/// A connection that got an answer, retried while the server still counts connections
/// the test has just closed (their slots are given back once the server notices).
async fn hold(addr: SocketAddr) -> TcpStream {
    for _ in 0..100 {
        if let Some(tcp) = served(addr).await {
            return tcp;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection served within 10 s");
}

/// The value of the refused-connections counter (0 before the first refusal).
async fn refused_so_far(addr: SocketAddr) -> f64 {
    let mut tcp = hold_one_shot(addr).await;
    let text = String::from_utf8_lossy(&closed_by_server(&mut tcp).await).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("twins_http_connections_refused_total "))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// A connection carrying a `GET /metrics` that asks the server to close it after the
/// answer, retried like [`hold`].
async fn hold_one_shot(addr: SocketAddr) -> TcpStream {
    for _ in 0..100 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if tcp.write_all(request).await.is_ok() {
            let mut first = [0u8; 1];
            if let Ok(1) = tcp.peek(&mut first).await {
                return tcp;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection served within 10 s");
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_closed_after_the_header_timeout() {
    let app = app(&[
        ("MG_TWINS_HTTP_HEADER_TIMEOUT", "1s"),
        ("MG_TWINS_HTTP_IDLE_TIMEOUT", "60s"),
    ])
    .await;
    let mut slow = TcpStream::connect(app.addr()).await.expect("connect");
    slow.write_all(b"GET /health HT").await.expect("write");
    let answer = closed_by_server(&mut slow).await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));

    // A client that sends nothing at all is closed the same way.
    let mut silent = TcpStream::connect(app.addr()).await.expect("connect");
    closed_by_server(&mut silent).await;

    // So is one that keeps sending a byte of its head now and then: the clock runs from
    // the first byte, not from the last.
    let trickle = TcpStream::connect(app.addr()).await.expect("connect");
    let (mut reading, mut writing) = trickle.into_split();
    let writer = tokio::spawn(async move {
        let mut next: &[u8] = b"GET /health HTTP/1.1\r\n";
        while writing.write_all(next).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            next = b"x";
        }
    });
    let answer = closed_by_server(&mut reading).await;
    writer.abort();
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));

    // Others are served meanwhile and after.
    assert!(served(app.addr()).await.is_some());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The header timeout is past the deadline: only the idle timeout can close it.
    let app = app(&[
        ("MG_TWINS_HTTP_HEADER_TIMEOUT", "60s"),
        ("MG_TWINS_HTTP_IDLE_TIMEOUT", "1s"),
    ])
    .await;
    let mut idle = served(app.addr()).await.expect("served");
    let after = closed_by_server(&mut idle).await;
    assert!(after.is_empty(), "{:?}", String::from_utf8_lossy(&after));
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_counted_until_one_ends() {
    let app = app(&[
        ("MG_TWINS_HTTP_MAX_CONNECTIONS", "2"),
        ("MG_TWINS_HTTP_HEADER_TIMEOUT", "60s"),
        ("MG_TWINS_HTTP_IDLE_TIMEOUT", "60s"),
    ])
    .await;
    let before = refused_so_far(app.addr()).await;
    let first = hold(app.addr()).await;
    let _second = hold(app.addr()).await;

    assert!(
        served(app.addr()).await.is_none(),
        "a third connection was served with a cap of 2"
    );

    // Serving resumes once a held connection ends.
    drop(first);
    let third = hold(app.addr()).await;
    drop((third, _second));
    let after = refused_so_far(app.addr()).await;
    assert!(after > before, "refused counter {before} -> {after}");
}

#[tokio::test]
async fn https_closes_slow_request_heads_and_unfinished_handshakes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path(), "limits");
    let app = TestApp::builder()
        .auth(Auth::Standalone)
        .https(&pki)
        .var("MG_TWINS_HTTP_HEADER_TIMEOUT", "1s")
        .var("MG_TWINS_HTTP_IDLE_TIMEOUT", "60s")
        .spawn()
        .await;

    let mut slow = tls_connect(app.addr(), &pki.ca_pem)
        .await
        .expect("TLS handshake");
    slow.write_all(b"GET /health HT").await.expect("write");
    slow.flush().await.expect("flush");
    let answer = closed_by_server(&mut slow).await;
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));

    // A client that opens TCP and never starts its handshake.
    let mut silent = TcpStream::connect(app.addr()).await.expect("connect");
    closed_by_server(&mut silent).await;

    let health = https_request(app.addr(), &pki.ca_pem, "GET", "/health", None)
        .await
        .expect("HTTPS request");
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn a_request_past_the_request_timeout_gets_a_json_503() {
    // The auth service holds every call until the test releases it, which it does only
    // after the answer: the request cannot finish within the request timeout.
    let auth = AuthServer::builder().held().start().await;
    let app = TestApp::builder()
        .auth(Auth::GrpcServer(auth))
        .var("MG_AUTH_GRPC_TIMEOUT", "60s")
        .var("MG_TWINS_HTTP_REQUEST_TIMEOUT", "1s")
        .spawn()
        .await;
    let resp = tokio::time::timeout(DEADLINE, app.get("/twins", ALICE))
        .await
        .expect("an answer before the deadline");
    common::assert_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    app.auth.as_ref().expect("the held auth service").release();
}

/// Waits until `count` log lines of the app's binary contain `text`, and returns how
/// many do.
async fn log_lines(app: &mut TestApp, text: &str, count: usize) -> usize {
    let mut matching = || {
        app.instance()
            .logs()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    };
    let until = tokio::time::Instant::now() + DEADLINE;
    while matching() < count && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    matching()
}

#[tokio::test]
async fn a_burst_of_refused_connections_is_logged_once() {
    let mut app = TestApp::builder()
        .process()
        .auth(Auth::Standalone)
        .var("MG_TWINS_HTTP_MAX_CONNECTIONS", "2")
        .spawn()
        .await;
    let addr = app.addr();
    let held = [hold(addr).await, hold(addr).await];
    for _ in 0..5 {
        assert!(served(addr).await.is_none(), "served past the cap");
    }
    let reached = "connection limit reached";
    assert_eq!(
        log_lines(&mut app, reached, 1).await,
        1,
        "{:#?}",
        app.instance().logs()
    );

    // Once a connection is taken with room to spare, the burst is over. The server
    // gives the held slots back when it notices they closed: ask until it has.
    drop(held);
    let again = "below the cap again";
    for _ in 0..100 {
        drop(hold(addr).await);
        if app.instance().logs().iter().any(|l| l.contains(again)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        log_lines(&mut app, again, 1).await,
        1,
        "{:#?}",
        app.instance().logs()
    );
    assert_eq!(
        log_lines(&mut app, reached, 1).await,
        1,
        "{:#?}",
        app.instance().logs()
    );

    app.instance().kill().await;
}

/// The process runs without transparent huge pages (see `without_huge_pages` in
/// `main.rs`): the kernel reports the flag of the process in its status.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_process_runs_without_transparent_huge_pages() {
    let mut app = TestApp::builder()
        .process()
        .auth(Auth::Standalone)
        .spawn()
        .await;
    let pid = app.instance().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let flag = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(flag, Some("0"), "{status}");
}
