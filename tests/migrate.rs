//! `twins migrate`, run as the real binary between SQLite and PostgreSQL or MongoDB (on
//! the servers named by `TWINS_TEST_POSTGRES_URL` and `TWINS_TEST_MONGODB_URL`):
//! everything arrives unchanged, an interrupted run is finished by the next one without
//! duplicates, and bad arguments are refused.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use common::backend::{self, Backend};
use twins::domain::PageRequest;
use twins::domain::document::{Document, VersionSummary, WriteOp, Writer};
use twins::domain::state::State;
use twins::domain::time::from_nanos;
use twins::domain::twin::{Attribute, Definition, Twin};
use twins::store::transfer::IngestLog;
use twins::store::{DocumentWrite, Store};

const BIN: &str = env!("CARGO_BIN_EXE_twins");
const T0_MS: i64 = 1_588_668_099_142;

fn at(ms: i64) -> DateTime<Utc> {
    from_nanos(ms * 1_000_000)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn twin(owner: &str, i: usize, definitions: usize) -> Twin {
    Twin {
        owner: owner.into(),
        id: format!("{:08}-{}", i, uuid::Uuid::new_v4()),
        name: format!("twin {i}"),
        revision: definitions as i64 - 1,
        created: at(T0_MS),
        updated: at(T0_MS + 1),
        definitions: (0..definitions)
            .map(|d| Definition {
                id: d as i64,
                created: at(T0_MS + d as i64),
                attributes: vec![Attribute {
                    name: "temperature".into(),
                    channel: format!("ch-{i}"),
                    subtopic: format!("s{d}"),
                    persist_state: true,
                    record: None,
                }],
                delta: 1_000_000,
            })
            .collect(),
        metadata: object(json!({"building": i % 3, "tags": ["a", i]})),
    }
}

fn states(twin_id: &str, n: usize) -> Vec<State> {
    (0..n as i64)
        .map(|id| State {
            twin_id: twin_id.into(),
            id,
            definition: 0,
            created: at(T0_MS + id * 1000),
            payload: object(json!({"temperature": id as f64 / 2.0, "n": id})),
        })
        .collect()
}

/// Twins with `per_twin` states each, documents on every third twin and an ingest log.
async fn seed(store: &Store, twins: usize, per_twin: usize) {
    let transfer = store
        .transfer
        .clone()
        .expect("a store that can be migrated");
    let mut batch = Vec::new();
    for i in 0..twins {
        let t = twin(["alice", "bob", "carol"][i % 3], i, 1 + i % 2);
        store.twins.save(&t).await.expect("save twin");
        // The second twin's oldest states were removed by retention: its ids start
        // at 30.
        let skip = if i == 1 { 30.min(per_twin) } else { 0 };
        batch.extend(states(&t.id, per_twin).into_iter().skip(skip));
        if batch.len() >= 20_000 {
            transfer.put_states(&batch).await.expect("put states");
            batch.clear();
        }
        if i % 3 == 0 {
            // Three writes by three kinds of writer: the revisions go along.
            let writers = [
                (WriteOp::Create, Writer::User { id: "alice".into() }),
                (
                    WriteOp::Patch,
                    Writer::Channel {
                        id: format!("ch-{i}"),
                    },
                ),
                (WriteOp::Put, Writer::Service),
            ];
            for (v, (op, by)) in writers.iter().enumerate() {
                let version = v as i64 + 1;
                let doc = Document {
                    twin_id: t.id.clone(),
                    document_name: "desired".into(),
                    version,
                    updated: at(T0_MS + 5 + version),
                    data: object(json!({"setpoint": i + v, "mode": {"eco": v == 1}})),
                };
                let write = DocumentWrite {
                    doc: &doc,
                    expected: (version > 1).then_some(version - 1),
                    op: *op,
                    by,
                    keep: 10,
                    events: &[],
                };
                store.documents.write(&write).await.expect("document");
            }
        }
    }
    transfer.put_states(&batch).await.expect("put states");
    let first = transfer.twins_after(None, 2).await.expect("twins");
    let log = IngestLog {
        groups: vec![("twins".into(), 4_242), ("other".into(), 7)],
        cursors: first.iter().map(|t| (t.id.clone(), 4_000)).collect(),
    };
    transfer.put_ingest_log(&log).await.expect("ingest log");
}

/// Everything a store holds, in a stable order.
/// Everything a store holds: twins, states, each document's kept revisions (with who
/// wrote them and how) oldest first, and the ingest log.
type Dump = (
    Vec<Twin>,
    Vec<State>,
    Vec<(VersionSummary, Document)>,
    IngestLog,
);

async fn dump(store: &Store) -> Dump {
    let transfer = store
        .transfer
        .clone()
        .expect("a store that can be migrated");
    let (mut twins, mut all_states, mut docs) = (Vec::new(), Vec::new(), Vec::new());
    let mut after: Option<String> = None;
    loop {
        let page = transfer
            .twins_after(after.as_deref(), 500)
            .await
            .expect("twins");
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for t in &page {
            let s = store
                .states
                .list(
                    &t.id,
                    PageRequest {
                        offset: 0,
                        limit: 1_000_000,
                    },
                )
                .await
                .expect("states");
            all_states.extend(s.items);
            for d in store.documents.list(&t.id).await.expect("documents") {
                let page = PageRequest {
                    offset: 0,
                    limit: 1000,
                };
                let mut kept = store
                    .documents
                    .versions(&t.id, &d.document_name, page)
                    .await
                    .expect("versions")
                    .items;
                kept.sort_by_key(|v| v.version);
                for v in kept {
                    let doc = store
                        .documents
                        .revision(&t.id, &d.document_name, v.version)
                        .await
                        .expect("revision")
                        .expect("listed");
                    docs.push((v, doc));
                }
            }
        }
        twins.extend(page);
    }
    (
        twins,
        all_states,
        docs,
        transfer.ingest_log().await.expect("log"),
    )
}

fn migrate(from: &str, to: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["migrate", "--from", from, "--to", to, "--batch", "1000"])
        .env_clear()
        .output()
        .expect("run twins migrate")
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "twins migrate failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SQLite to the test's backend and back: every twin, state, document and ingest
/// position arrives unchanged; a second run changes nothing, and states written twice
/// (as by a run killed after a write it did not see acknowledged) are kept once.
async fn a_round_trip_keeps_every_row() {
    let dir = tempfile::tempdir().expect("dir");
    let a = format!("sqlite://{}/a.db", dir.path().display());
    let b = format!("sqlite://{}/b.db", dir.path().display());
    let target = backend::database_url(dir.path());
    let source = Store::connect(&a).await.expect("open a");
    seed(&source, 30, 120).await;
    let expected = dump(&source).await;
    assert_eq!(expected.1.len(), 30 * 120 - 30);

    // A run that stopped half-way through the twin whose states start at id 30: the
    // next run goes on after the target's latest state, counted from the source's first.
    let pruned = &expected.0[1];
    let its: Vec<State> = expected
        .1
        .iter()
        .filter(|s| s.twin_id == pruned.id)
        .cloned()
        .collect();
    assert_eq!(its[0].id, 30);
    let early = Store::connect(&target).await.expect("open the target");
    early.twins.save(pruned).await.expect("twin");
    early
        .transfer
        .clone()
        .expect("a store that can be migrated")
        .put_states(&its[..40])
        .await
        .expect("half of its states");

    assert_ok(&migrate(&a, &target));
    assert_ok(&migrate(&target, &b));
    assert_ok(&migrate(&a, &target));
    let target = Store::connect(&target).await.expect("open the target");
    let twice = &expected.1[..150];
    let transfer = target
        .transfer
        .clone()
        .expect("a store that can be migrated");
    let before = transfer.counts().await.expect("counts");
    transfer.put_states(twice).await.expect("states again");
    assert_eq!(transfer.counts().await.expect("counts"), before);
    let middle = dump(&target).await;
    let back = dump(&Store::connect(&b).await.expect("open b")).await;
    assert_eq!(middle, expected, "SQLite to the backend");
    assert_eq!(back, expected, "and back to SQLite");
}

/// `twins` twins with `per_twin` states each: a run killed mid-copy is finished by the
/// next one, without a duplicate; then back to SQLite. Prints how long each copy took.
async fn an_interrupted_run_is_finished_by_the_next(twins: usize, per_twin: usize) {
    let dir = tempfile::tempdir().expect("dir");
    let a = format!("sqlite://{}/a.db", dir.path().display());
    let b = format!("sqlite://{}/b.db", dir.path().display());
    let target = backend::database_url(dir.path());
    let source = Store::connect(&a).await.expect("open a");
    let seeding = Instant::now();
    seed(&source, twins, per_twin).await;
    let counts = source
        .transfer
        .clone()
        .expect("sql")
        .counts()
        .await
        .expect("counts");
    let total = (twins * per_twin - 30.min(per_twin)) as u64;
    assert_eq!(counts.states, total);
    eprintln!("seeded {total} states in {:?}", seeding.elapsed());

    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["migrate", "--from", &a, "--to", &target])
        .env_clear()
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twins migrate");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Killed once a progress line shows some states copied, well before the end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = seen
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a progress line within 2 minutes");
        if line.contains("states ") && !line.contains("states 0/") {
            assert!(
                !line.contains("done"),
                "finished before it could be killed: {line}"
            );
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let partial = Store::connect(&target).await.expect("open the target");
    let halfway = partial
        .transfer
        .clone()
        .expect("sql")
        .counts()
        .await
        .expect("counts");
    assert!(halfway.states < total, "{halfway:?}");

    assert_ok(&migrate(&a, &target));
    let to_target = started.elapsed();
    let there = partial
        .transfer
        .clone()
        .expect("sql")
        .counts()
        .await
        .expect("counts");
    assert_eq!(there, counts, "after the second run");

    let started = Instant::now();
    assert_ok(&migrate(&target, &b));
    let to_sqlite = started.elapsed();
    let back = Store::connect(&b).await.expect("open b");
    assert_eq!(
        back.transfer
            .clone()
            .expect("sql")
            .counts()
            .await
            .expect("counts"),
        counts
    );
    // Spot check: a twin's states are the same on both sides.
    let (twins, ..) = (source
        .transfer
        .clone()
        .expect("sql")
        .twins_after(None, 1)
        .await
        .expect("twin"),);
    let id = &twins[0].id;
    let page = PageRequest {
        offset: 0,
        limit: 2_000,
    };
    assert_eq!(
        back.states.list(id, page).await.expect("states").items,
        source.states.list(id, page).await.expect("states").items
    );
    eprintln!(
        "{total} states: SQLite to the backend (killed once, then finished) {to_target:?}, back to SQLite {to_sqlite:?}"
    );
}

#[tokio::test]
async fn postgres_round_trip_keeps_every_row() {
    backend::run(Backend::Postgres, a_round_trip_keeps_every_row()).await;
}

#[tokio::test]
async fn mongodb_round_trip_keeps_every_row() {
    backend::run(Backend::MongoDb, a_round_trip_keeps_every_row()).await;
}

#[tokio::test]
async fn postgres_an_interrupted_run_is_finished_by_the_next() {
    backend::run(
        Backend::Postgres,
        an_interrupted_run_is_finished_by_the_next(1_000, 1_000),
    )
    .await;
}

#[tokio::test]
async fn mongodb_an_interrupted_run_is_finished_by_the_next() {
    backend::run(
        Backend::MongoDb,
        an_interrupted_run_is_finished_by_the_next(200, 1_000),
    )
    .await;
}

#[test]
fn bad_arguments_are_refused_with_exit_code_2() {
    for args in [
        &["migrate"][..],
        &["migrate", "--from", "sqlite:///tmp/x.db"],
        &[
            "migrate",
            "--from",
            "sqlite:///tmp/x.db",
            "--to",
            "sqlite:///tmp/x.db",
        ],
        &["migrate", "--to", "sqlite:///tmp/x.db", "--bogus"],
        &[
            "migrate",
            "--from",
            "sqlite:///tmp/x.db",
            "--to",
            "sqlite:///tmp/y.db",
            "--batch",
            "0",
        ],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env_clear()
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") || err.contains("--from and --to name the same"),
            "{args:?}: {err}"
        );
        assert!(
            err.lines().filter(|l| l.contains("error")).count() <= 1,
            "{err}"
        );
    }
}

#[test]
fn a_store_that_cannot_be_opened_is_named() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(BIN)
        .args([
            "migrate",
            "--from",
            "mongodb://127.0.0.1:1/x?serverSelectionTimeoutMS=200",
            "--to",
            &format!("sqlite://{}/x.db", dir.path().display()),
        ])
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("twins migrate: cannot open mongodb://127.0.0.1:1/x"),
        "{err}"
    );
}
