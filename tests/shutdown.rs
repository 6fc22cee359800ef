//! Graceful shutdown of the real binary: a request that is in flight when SIGTERM
//! arrives (held up by an auth service that answers slowly) completes with 200, new
//! connections are refused meanwhile, and the process exits 0 as soon as it is done,
//! well within `MG_TWINS_SHUTDOWN_TIMEOUT`.

mod common;
#[path = "support/ops.rs"]
mod ops;

use std::time::{Duration, Instant};

use ops::{TOKEN, Users};

/// How long the auth service takes to answer.
const AUTH_DELAY: Duration = Duration::from_secs(2);

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let (calls_tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    let auth = ops::spawn_auth(
        Users {
            delay: AUTH_DELAY,
            calls: Some(calls_tx),
        },
        None,
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let _nats = common::own_nats(port, &dir.path().join("nats")).await;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let auth_url = auth.addr.to_string();
    let mut binary = ops::start_binary(&[
        ("MG_TWINS_DB_URL", db.as_str()),
        ("MG_MESSAGE_BROKER_URL", nats_url.as_str()),
        ("MG_AUTH_GRPC_URL", auth_url.as_str()),
        ("MG_AUTH_GRPC_TIMEOUT", "10s"),
        ("MG_TWINS_SHUTDOWN_TIMEOUT", "10s"),
    ])
    .await;

    let slow = tokio::spawn(
        common::client()
            .get(binary.url("/twins"))
            .bearer_auth(TOKEN)
            .send(),
    );
    // The request is in the service, waiting for the auth service's answer.
    tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("the request reaches the auth service")
        .expect("auth service running");
    let signalled = Instant::now();
    binary.terminate();

    // New connections are refused while the request finishes.
    let mut refused = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if tokio::net::TcpStream::connect(binary.addr).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the listener still accepts after SIGTERM");
    assert!(
        signalled.elapsed() < AUTH_DELAY,
        "checked while the request was in flight"
    );

    let resp = slow
        .await
        .expect("request task")
        .expect("the in-flight request gets an answer");
    assert_eq!(resp.status(), 200);
    let page: serde_json::Value = resp.json().await.expect("JSON body");
    assert_eq!(page["total"], 0);

    let status = binary.wait(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit {status:?}; logs {:#?}",
        binary.logs()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "exited when done, not at the end of the shutdown timeout ({:?})",
        signalled.elapsed()
    );
    let logs = binary.logs();
    assert!(
        logs.iter().any(|l| l.contains("shutting down"))
            && logs.iter().any(|l| l.contains("stopped")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn sigterm_on_an_idle_service_exits_zero_promptly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let _nats = common::own_nats(port, &dir.path().join("nats")).await;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let mut binary = ops::start_binary(&[
        ("MG_TWINS_DB_URL", db.as_str()),
        ("MG_MESSAGE_BROKER_URL", nats_url.as_str()),
        ("MG_TWINS_SHUTDOWN_TIMEOUT", "10s"),
    ])
    .await;
    // An idle keep-alive connection must not hold the shutdown up.
    let client = common::client();
    let health = client
        .get(binary.url("/health"))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status(), 200);
    let signalled = Instant::now();
    binary.terminate();
    let status = binary.wait(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit {status:?}; logs {:#?}",
        binary.logs()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    drop(client);
}

#[tokio::test]
async fn sigterm_with_a_request_held_past_the_timeout_still_exits_zero() {
    let (calls_tx, mut calls) = tokio::sync::mpsc::unbounded_channel();
    // The auth service holds the request far longer than the shutdown timeout.
    let auth = ops::spawn_auth(
        Users {
            delay: Duration::from_secs(60),
            calls: Some(calls_tx),
        },
        None,
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let _nats = common::own_nats(port, &dir.path().join("nats")).await;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let auth_url = auth.addr.to_string();
    let mut binary = ops::start_binary(&[
        ("MG_TWINS_DB_URL", db.as_str()),
        ("MG_MESSAGE_BROKER_URL", nats_url.as_str()),
        ("MG_AUTH_GRPC_URL", auth_url.as_str()),
        ("MG_AUTH_GRPC_TIMEOUT", "120s"),
        ("MG_TWINS_SHUTDOWN_TIMEOUT", "1s"),
    ])
    .await;
    let held = tokio::spawn(
        common::client()
            .get(binary.url("/twins"))
            .bearer_auth(TOKEN)
            .send(),
    );
    tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("the request reaches the auth service")
        .expect("auth service running");
    binary.terminate();
    // The timeout plus a second, with room for a slow machine.
    let status = binary.wait(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit {status:?}; logs {:#?}",
        binary.logs()
    );
    let logs = binary.logs();
    assert!(
        logs.iter().any(|l| l.contains("shutdown timeout")),
        "the timeout was reached: {logs:#?}"
    );
    held.abort();
}
