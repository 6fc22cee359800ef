//! Graceful shutdown of the real binary: a request that is in flight when SIGTERM
//! arrives (held by the auth service until the test lets it go) completes with 200, new
//! connections are refused meanwhile, and the process exits 0 as soon as it is done,
//! without waiting for `MG_TWINS_SHUTDOWN_TIMEOUT`.
//!
//! Nothing here measures time: what shows that the service did not wait for its
//! shutdown timeout is the absence of the line it logs when it does, with a timeout far
//! longer than any test deadline.

mod common;

use common::*;

/// A shutdown timeout no test waits for.
const NEVER: &str = "1h";

/// The binary on a broker of its own (no other test's messages), asking `auth`.
async fn binary(auth: Auth, shutdown_timeout: &str) -> TestApp {
    TestApp::builder()
        .process()
        .own_broker()
        .auth(auth)
        .var("MG_AUTH_GRPC_TIMEOUT", "1h")
        .var("MG_TWINS_SHUTDOWN_TIMEOUT", shutdown_timeout)
        .spawn()
        .await
}

/// Whether a log line says the shutdown timeout ran out.
fn timed_out(logs: &[String]) -> bool {
    logs.iter().any(|l| l.contains("shutdown timeout"))
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let auth = AuthServer::builder().held().start().await;
    let mut app = binary(Auth::GrpcServer(auth), NEVER).await;
    let held = tokio::spawn(app.authed(reqwest::Method::GET, "/twins", ALICE).send());
    // The request is in the service, waiting for the auth service's answer.
    app.auth.as_ref().expect("auth server").called().await;
    app.instance().terminate();

    // New connections are refused while the request is held.
    let addr = app.addr();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener still accepts after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !held.is_finished(),
        "checked while the request was in flight"
    );

    app.auth.as_ref().expect("auth server").release();
    let resp = held
        .await
        .expect("request task")
        .expect("the in-flight request gets an answer");
    assert_eq!(resp.status(), 200);
    let page: serde_json::Value = resp.json().await.expect("JSON body");
    assert_eq!(page["total"], 0);

    let status = app.instance().wait(DEADLINE).await;
    let logs = app.instance().logs();
    assert!(status.success(), "exit {status:?}; logs {logs:#?}");
    assert!(
        !timed_out(&logs),
        "exited when done, not at the end of the shutdown timeout: {logs:#?}"
    );
    assert!(
        logs.iter().any(|l| l.contains("shutting down"))
            && logs.iter().any(|l| l.contains("stopped")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn sigterm_on_an_idle_service_exits_zero_promptly() {
    let mut app = binary(Auth::Standalone, NEVER).await;
    // An idle keep-alive connection must not hold the shutdown up.
    let health = app.health().await;
    assert_eq!(health.status, 200);
    app.instance().terminate();
    let status = app.instance().wait(DEADLINE).await;
    let logs = app.instance().logs();
    assert!(status.success(), "exit {status:?}; logs {logs:#?}");
    assert!(
        !timed_out(&logs),
        "the idle connection held the shutdown up: {logs:#?}"
    );
}

#[tokio::test]
async fn sigterm_with_a_request_held_past_the_timeout_still_exits_zero() {
    // The auth service holds the request for good.
    let auth = AuthServer::builder().held().start().await;
    let mut app = binary(Auth::GrpcServer(auth), "1s").await;
    let held = tokio::spawn(app.authed(reqwest::Method::GET, "/twins", ALICE).send());
    app.auth.as_ref().expect("auth server").called().await;
    app.instance().terminate();
    let status = app.instance().wait(DEADLINE).await;
    let logs = app.instance().logs();
    assert_eq!(status.code(), Some(0), "exit {status:?}; logs {logs:#?}");
    assert!(timed_out(&logs), "the timeout was reached: {logs:#?}");
    held.abort();
}
