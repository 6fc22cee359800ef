//! The command line and configuration mistakes, run as the real binary in an empty
//! directory: help and version print and exit without starting anything; unknown
//! arguments and each configuration mistake operators make give one line naming what is
//! wrong and exit code 2, before anything is created or connected.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_twins");

/// The binary in `dir` with only `vars` in its environment.
fn twins(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run twins")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Nothing was created in `dir`: no database, no data directory.
fn assert_untouched(dir: &Path, what: &str) {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(entries.is_empty(), "{what} created {entries:?}");
}

#[test]
fn help_and_version_print_and_start_nothing() {
    for args in [&["--help"][..], &["-h"], &["help"], &["migrate", "--help"]] {
        let dir = tempfile::tempdir().expect("dir");
        let out = twins(dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage: twins"), "{args:?}: {stdout}");
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
        assert_untouched(dir.path(), &format!("{args:?}"));
    }
    for args in [&["--version"][..], &["-V"]] {
        let dir = tempfile::tempdir().expect("dir");
        let out = twins(dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let stdout = text(&out.stdout);
        let want = format!("twins {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(stdout.starts_with(&want), "{args:?}: {stdout}");
        assert_untouched(dir.path(), &format!("{args:?}"));
    }
}

#[test]
fn unknown_arguments_are_an_error() {
    for args in [
        &["--bogus"][..],
        &["bogus"],
        &["serve", "--bogus"],
        &["healthcheck", "now"],
        &["-x"],
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let out = twins(dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains("Usage: twins"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_untouched(dir.path(), &format!("{args:?}"));
    }
}

#[test]
fn healthcheck_without_a_running_service_fails() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    for args in [&["healthcheck"][..], &["--healthcheck"]] {
        let dir = tempfile::tempdir().expect("dir");
        let out = twins(dir.path(), args, &[("MG_TWINS_HTTP_PORT", &port)]);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_untouched(dir.path(), &format!("{args:?}"));
    }
}

/// Each mistake: exit code 2, one line on stderr that names the variable, never a
/// password, and nothing created. Each of these once started a broken service (no log
/// output, no consumer, 503 to everything) or failed later with a vaguer message.
#[test]
fn configuration_mistakes_are_one_line_naming_the_variable_and_exit_2() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("MG_TWINS_LOG_LEVEL", &[("MG_TWINS_LOG_LEVEL", "WARNING")]),
        (
            "MG_TWINS_INSTANCE_GROUP",
            &[("MG_TWINS_INSTANCE_GROUP", "a.b")],
        ),
        ("MG_AUTH_GRPC_URL", &[("MG_AUTH_GRPC_URL", "ftp://x")]),
        (
            "MG_AUTH_GRPC_TIMEOUT",
            &[
                ("MG_AUTH_GRPC_TIMEOUT", "fast"),
                ("MG_TWINS_STANDALONE_ID", "u"),
                ("MG_TWINS_STANDALONE_TOKEN", "t"),
            ],
        ),
        (
            "MG_MESSAGE_BROKER_URL",
            &[("MG_MESSAGE_BROKER_URL", "amqp://guest:s3cret@127.0.0.1")],
        ),
        (
            "MG_TWINS_CACHE_URL",
            &[("MG_TWINS_CACHE_URL", "http://:s3cret@127.0.0.1:6379")],
        ),
        (
            "MG_TWINS_DB_URL",
            &[("MG_TWINS_DB_URL", "postgre://u:s3cret@127.0.0.1/twins")],
        ),
        ("MG_TWINS_DB_URL", &[("MG_TWINS_DB_URL", "sqlite://")]),
        (
            "MG_TWINS_HTTP_SERVER_CERT",
            &[
                ("MG_TWINS_HTTP_SERVER_CERT", "/nonexistent/cert.pem"),
                ("MG_TWINS_HTTP_SERVER_KEY", "/nonexistent/key.pem"),
            ],
        ),
        (
            "MG_AUTH_GRPC_CLIENT_CERT",
            &[
                ("MG_AUTH_GRPC_URL", "127.0.0.1:7001"),
                ("MG_AUTH_GRPC_CLIENT_CERT", "/nonexistent/c.pem"),
                ("MG_AUTH_GRPC_CLIENT_KEY", "/nonexistent/k.pem"),
            ],
        ),
        ("MG_TWINS_HTTP_PORT", &[("MG_TWINS_HTTP_PORT", "http")]),
    ];
    for (var, vars) in cases {
        let dir = tempfile::tempdir().expect("dir");
        let out = twins(dir.path(), &[], vars);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {out:?}");
        let stderr = text(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {stderr:?}");
        assert!(
            lines[0].starts_with(&format!("twins: invalid configuration: {var}: ")),
            "{vars:?}: {stderr}"
        );
        assert!(!stderr.contains("s3cret"), "a password: {stderr}");
        assert_untouched(dir.path(), &format!("{vars:?}"));
    }
}

/// A misspelled variable is not an error (other services' variables share the
/// environment) but is named once at start, with the variable meant.
#[test]
fn a_misspelled_variable_is_warned_about_once() {
    let dir = tempfile::tempdir().expect("dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let group = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let mut child = Command::new(BIN)
        .env_clear()
        .envs([
            ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
            ("MG_TWINS_HTTP_PORT", port.as_str()),
            ("MG_TWINS_DB_URL", db.as_str()),
            ("MG_TWINS_INSTANCE_GROUP", group.as_str()),
            ("MG_TWINS_LOG_FORMAT", "json"),
            ("MG_TWINS_CACHE_PREFX", "site-a:"),
            ("MG_MESSAGE_BROKER_URL", "nats://127.0.0.1:4222"),
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start twins");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut warnings = Vec::new();
    // Read up to the line saying the service listens: the warnings come before it.
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the service starts within 30 s");
        if line.contains("MG_TWINS_CACHE_PREFX") {
            warnings.push(line.clone());
        }
        if line.contains("twins service listening") {
            break;
        }
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    common::delete_consumer(&group);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("did you mean MG_TWINS_CACHE_PREFIX?"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("WARN"), "{warnings:?}");
}

/// While the broker cannot be reached, the log says which broker (without its
/// password), and the API serves meanwhile.
#[test]
fn an_unreachable_broker_is_named_in_the_log() {
    let dir = tempfile::tempdir().expect("dir");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let (port, broker_port) = (free().to_string(), free());
    let url = format!("nats://twins:s3cret@127.0.0.1:{broker_port}");
    let db = format!("sqlite://{}/twins.db", dir.path().display());
    let mut child = Command::new(BIN)
        .env_clear()
        .envs([
            ("MG_TWINS_HTTP_HOST", "127.0.0.1"),
            ("MG_TWINS_HTTP_PORT", port.as_str()),
            ("MG_TWINS_DB_URL", db.as_str()),
            ("MG_MESSAGE_BROKER_URL", url.as_str()),
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start twins");
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let named = format!("nats://twins:***@127.0.0.1:{broker_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let found = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break false;
        };
        assert!(!line.contains("s3cret"), "a password in the log: {line}");
        let hit = line.contains(&named) && line.contains("broker");
        seen.push(line);
        if hit {
            break true;
        }
    };
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(found, "no line names {named}: {seen:#?}");
}
