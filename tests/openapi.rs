//! The served OpenAPI document against the service that serves it: a valid OpenAPI
//! document, and one a schema-driven fuzzer (schemathesis) cannot catch out, whether by
//! a 5xx, a response outside the document, or a request the document allows that the
//! service refuses (or one it forbids that the service accepts).
//!
//! The tools are Python programs (pip packages `openapi-spec-validator`, `schemathesis`) named by
//! `TWINS_TEST_OPENAPI_VALIDATOR` and `TWINS_TEST_SCHEMATHESIS` (`scripts/test` installs
//! both, pinned, and sets the variables); without them (a plain `cargo test`) these tests
//! say they were skipped and pass.

mod common;
#[path = "support/tools.rs"]
mod tools;

use std::process::{Command, Output};

/// Test cases per operation and phase: enough to reach every constraint of the document
/// and keep the run to about two minutes on two cores.
const MAX_EXAMPLES: &str = "30";

/// Schemathesis configuration, next to this file.
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");

/// The tool named by `var`, or None (after saying so) when the variable is unset.
fn tool(var: &str) -> Option<String> {
    tools::tool(var, "OpenAPI test")
}

/// Runs `command` off the runtime (the service under test shares it) and fails the test,
/// with everything the tool printed, unless it exits 0.
async fn run_clean(what: &str, mut command: Command) {
    let shown = format!("{command:?}");
    let output: Output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("tool thread")
        .unwrap_or_else(|e| panic!("{what} did not start ({shown}): {e}"));
    assert!(
        output.status.success(),
        "{what} found problems ({}):\n{shown}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// A service on a broker of its own: the change feed's stream then holds only this
/// run's events, so how long the shared stream has grown (a week of every test and
/// benchmark) cannot make a resume from an old cursor outlast the fuzzer's timeout.
async fn spawn_standalone() -> common::TestApp {
    common::TestApp::builder()
        .auth(common::Auth::Standalone)
        .own_broker()
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn served_document_is_valid_openapi() {
    let Some(validator) = tool("TWINS_TEST_OPENAPI_VALIDATOR") else {
        return;
    };
    let app = spawn_standalone().await;
    let document = app
        .request(reqwest::Method::GET, "/openapi.json")
        .send()
        .await
        .expect("GET /openapi.json")
        .bytes()
        .await
        .expect("document");
    let file = app.dir.path().join("openapi.json");
    std::fs::write(&file, &document).expect("write the document");
    let mut command = Command::new(validator);
    command.arg(&file);
    run_clean("openapi-spec-validator", command).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn service_keeps_to_its_document_under_schemathesis() {
    let Some(schemathesis) = tool("TWINS_TEST_SCHEMATHESIS") else {
        return;
    };
    let app = spawn_standalone().await;
    let mut command = Command::new(schemathesis);
    command
        // The few refusals of allowed requests that SPEC requires, each with its reason.
        .args(["--config-file", CONFIG])
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", common::ALICE),
        ])
        // Nothing written into the working tree, no colour codes in the failure text.
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(app.dir.path())
        .env("NO_PROXY", "*");
    run_clean("schemathesis", command).await;
}
