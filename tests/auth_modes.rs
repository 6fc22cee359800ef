//! Authentication modes (SPEC section 3) and start-up behaviour of the binary
//! (SPEC section 9): the gRPC auth service down or silent, standalone mode and its
//! aliases, development mode with a printed token, bad configuration.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

use common::*;

/// Every route that needs a token, with a body suitable for POST and PUT.
async fn assert_every_route(app: &TestApp, token: &str, status: StatusCode) {
    let id = uuid::Uuid::new_v4();
    let twin = format!("/twins/{id}");
    let states = format!("/states/{id}");
    for (method, path) in [
        (Method::GET, "/twins"),
        (Method::POST, "/twins"),
        (Method::GET, twin.as_str()),
        (Method::PUT, twin.as_str()),
        (Method::DELETE, twin.as_str()),
        (Method::GET, states.as_str()),
    ] {
        let req = app
            .authed(method.clone(), path, token)
            .json(&json!({"name": "x"}));
        let resp = send(req).await;
        let message = assert_error(resp, status).await;
        assert!(!message.is_empty(), "{method} {path}");
    }
}

// ---------------------------------------------------------------- gRPC auth failures

#[tokio::test]
async fn unreachable_auth_service_is_503_never_500() {
    let closed = closed_addr().await.to_string();
    let app = TestApp::builder().auth(Auth::GrpcAt(closed)).spawn().await;
    assert_every_route(&app, ALICE, StatusCode::SERVICE_UNAVAILABLE).await;
    // Endpoints without authentication keep working.
    let resp = send(app.request(Method::GET, "/health")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        app.store()
            .twins
            .list(ALICE_ID, &Default::default(), Default::default())
            .await
            .unwrap()
            .total,
        0
    );
}

#[tokio::test]
async fn auth_service_stopping_after_start_turns_requests_into_503() {
    let mut app = spawn_app().await;
    let id = app.create_id(ALICE, &json!({})).await;
    app.auth.take().expect("auth server").stop().await;

    let resp = app.get(&format!("/twins/{id}"), ALICE).await;
    let message = assert_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        !message.contains("127.0.0.1"),
        "no internal detail leaks: {message}"
    );
    assert_every_route(&app, ALICE, StatusCode::SERVICE_UNAVAILABLE).await;
    // An unknown token cannot be told apart from a known one while auth is down.
    assert_every_route(&app, STRANGER, StatusCode::SERVICE_UNAVAILABLE).await;
}

#[tokio::test]
async fn auth_service_coming_back_serves_again() {
    // The client connects lazily: an auth service that is down at start-up does not
    // stop the service, and requests succeed once it is up.
    let addr = closed_addr().await;
    let url = addr.to_string();
    let app = TestApp::builder().auth(Auth::GrpcAt(url)).spawn().await;
    assert_error(
        app.get("/twins", ALICE).await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;

    let auth = spawn_auth_at(addr).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = app.get("/twins", ALICE).await.status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "auth never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(auth);
}

/// The in-test auth service on a given address, retrying while the port is busy.
async fn spawn_auth_at(addr: std::net::SocketAddr) -> AuthServer {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return AuthServer::builder().start_on(listener),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

#[tokio::test]
async fn silent_auth_service_is_503_after_the_timeout() {
    // Accepts connections, says so, and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            let _ = accepted_tx.send(());
            held.push(socket);
        }
    });
    let app = TestApp::builder()
        .auth(Auth::GrpcAt(addr))
        .var("MG_AUTH_GRPC_TIMEOUT", "300ms")
        .spawn()
        .await;
    // The deadline only bounds a service that never gives up waiting.
    let resp = tokio::time::timeout(DEADLINE, app.get("/twins", ALICE))
        .await
        .expect("the service gives up on the silent auth service");
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        accepted.try_recv().is_ok(),
        "the 503 came after asking the auth service, not instead of it"
    );
    hold.abort();
}

#[tokio::test]
async fn auth_service_answering_unavailable_is_503() {
    let app = spawn_app().await;
    assert_every_route(&app, OVERLOADED, StatusCode::SERVICE_UNAVAILABLE).await;
}

#[tokio::test]
async fn auth_url_with_an_http_scheme_is_accepted() {
    let auth = AuthServer::start().await;
    let url = format!("http://{}", auth.addr);
    let app = TestApp::builder().auth(Auth::GrpcAt(url)).spawn().await;
    let twin = app.create_twin(BOB, &json!({})).await;
    assert_eq!(twin["owner"], BOB_ID);
    assert_error(app.get("/twins", STRANGER).await, StatusCode::UNAUTHORIZED).await;
    drop(auth);
}

/// With `MG_TWINS_AUTH_CACHE_TTL` a known token is identified by the auth service once,
/// a rejected one every time; without it every request asks.
#[tokio::test]
async fn the_opt_in_identity_cache_asks_once_per_known_token() {
    for (ttl, asked) in [(Some("1m"), 1), (None, 5)] {
        let auth = AuthServer::start().await;
        let url = format!("http://{}", auth.addr);
        let mut builder = TestApp::builder().auth(Auth::GrpcAt(url));
        if let Some(ttl) = ttl {
            builder = builder.vars(&[("MG_TWINS_AUTH_CACHE_TTL", ttl)]);
        }
        let app = builder.spawn().await;
        auth.calls_since().await;
        for _ in 0..5 {
            let resp = send(app.request(Method::GET, "/twins").bearer_auth(BOB)).await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(auth.calls_since().await, asked, "{ttl:?}");
        for _ in 0..3 {
            assert_error(app.get("/twins", STRANGER).await, StatusCode::UNAUTHORIZED).await;
        }
        assert_eq!(
            auth.calls_since().await,
            3,
            "{ttl:?}: rejected tokens are asked about"
        );
    }
}

// ---------------------------------------------------------------- standalone

/// An app whose authentication only `vars` configure.
async fn configured_by(vars: &[(&str, &str)]) -> TestApp {
    TestApp::builder()
        .auth(Auth::Unset)
        .vars(vars)
        .spawn()
        .await
}

#[tokio::test]
async fn standalone_token_identifies_the_configured_id_without_grpc() {
    let app = configured_by(&[
        ("MG_TWINS_STANDALONE_ID", "owner-1"),
        ("MG_TWINS_STANDALONE_TOKEN", "s3cret"),
    ])
    .await;
    let twin = app.create_twin("s3cret", &json!({"name": "solo"})).await;
    assert_eq!(twin["owner"], "owner-1");
    assert_eq!(app.list_twins("s3cret", &[]).await["total"], 1);
    for wrong in [ALICE, "s3cre", "s3cret2", "S3CRET", "owner-1"] {
        assert_every_route(&app, wrong, StatusCode::UNAUTHORIZED).await;
    }
    let resp = send(app.request(Method::GET, "/twins")).await;
    assert_error(resp, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn standalone_takes_precedence_over_the_grpc_url() {
    // The gRPC URL points nowhere: if it were used, every request would be 503.
    let closed = closed_addr().await.to_string();
    let app = TestApp::builder()
        .auth(Auth::GrpcAt(closed))
        .vars(&[
            ("MG_TWINS_STANDALONE_ID", "owner-1"),
            ("MG_TWINS_STANDALONE_TOKEN", "s3cret"),
        ])
        .spawn()
        .await;
    let twin = app.create_twin("s3cret", &json!({})).await;
    assert_eq!(twin["owner"], "owner-1");
    assert_every_route(&app, ALICE, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test]
async fn things_standalone_aliases_are_honoured() {
    let app = configured_by(&[
        ("MG_THINGS_STANDALONE_ID", "thing-owner"),
        ("MG_THINGS_STANDALONE_TOKEN", "things-secret"),
    ])
    .await;
    let twin = app.create_twin("things-secret", &json!({})).await;
    assert_eq!(twin["owner"], "thing-owner");
    assert_every_route(&app, "other", StatusCode::UNAUTHORIZED).await;
}

// ---------------------------------------------------------------- the binary

/// The binary of the harness with `vars`, run in `dir`.
fn binary(dir: &Path, vars: &[(&str, &str)]) -> Command {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut cmd = twins_command(&vars);
    cmd.current_dir(dir);
    cmd
}

fn value_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()
}

#[tokio::test]
async fn development_mode_prints_a_working_token_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Its own consumer name on the shared broker, deleted at the end.
    let group = common::unique_group();
    let mut child = binary(
        dir.path(),
        &[
            ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
            ("MG_TWINS_HTTP_PORT", "0"),
            ("MG_TWINS_INSTANCE_GROUP", &group),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("binary starts");

    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            let _ = lines_tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let err_reader = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            all.push(line);
        }
        all
    });

    // The deadline only bounds a binary that never gets there.
    let deadline = Instant::now() + DEADLINE;
    let (mut addr, mut token) = (None::<String>, None::<String>);
    while addr.is_none() || token.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines_rx.recv())
            .await
            .expect("address and token are logged")
            .expect("the binary is still running");
        assert!(
            !line.contains('\u{1b}'),
            "no ANSI colours when not a TTY: {line:?}"
        );
        if line.contains("twins service listening") {
            addr = value_after(&line, "addr=").map(str::to_owned);
        }
        if line.contains(" token=") {
            assert!(
                line.contains("WARN"),
                "the token is logged as a warning: {line}"
            );
            token = value_after(&line, " token=").map(str::to_owned);
        }
    }
    let (addr, token) = (addr.unwrap(), token.unwrap());
    assert_eq!(token.len(), 32, "token {token:?}");
    assert!(
        token.bytes().all(|b| b.is_ascii_hexdigit()),
        "token {token:?}"
    );

    let client = client();
    let url = |path: &str| format!("http://{addr}{path}");
    loop {
        match client.get(url("/health")).send().await {
            Ok(r) if r.status() == StatusCode::OK => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("/health did not answer: {other:?}"),
        }
    }
    assert!(
        dir.path().join("data/twins.db").exists(),
        "the default store is ./data/twins.db"
    );

    let resp = client
        .post(url("/twins"))
        .bearer_auth(&token)
        .json(&json!({"name": "dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let twin: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(twin["name"], "dev");
    let resp = client
        .get(url("/twins"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for other in ["0123456789abcdef0123456789abcdef", "development", ALICE] {
        let resp = client
            .get(url("/twins"))
            .bearer_auth(other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{other}");
    }
    drop(client);

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the binary stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");

    let stdout = reader.await.unwrap();
    let printed = stdout.iter().filter(|l| l.contains(&token)).count();
    assert_eq!(
        printed,
        1,
        "the token is printed once:\n{}",
        stdout.join("\n")
    );
    let stderr = err_reader.await.unwrap();
    common::delete_consumer(&group);
    assert!(stderr.is_empty(), "nothing on stderr: {stderr:?}");
}

#[tokio::test]
async fn a_bad_port_stops_start_up_with_exit_code_2_and_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        DEADLINE,
        binary(
            dir.path(),
            &[
                ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
                ("MG_TWINS_HTTP_PORT", "abc"),
            ],
        )
        .output(),
    )
    .await
    .expect("the binary stops")
    .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr:?}");
    assert!(lines[0].contains("MG_TWINS_HTTP_PORT"), "{stderr:?}");
    assert!(
        lines[0].contains("abc"),
        "the bad value is shown: {stderr:?}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created before the configuration is valid"
    );
}
