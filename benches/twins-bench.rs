//! Load generator: ingest and API throughput of a real `twins` process against the
//! limits of the machine it runs on (raw JetStream, raw store writes, `/health`).
//!
//! ```text
//! cargo bench --bench twins-bench -- ingest         [--twins 1000] [--messages 200000]
//! cargo bench --bench twins-bench -- ingest-growth  [--twins 1000] [--messages 50000] [--states 1000000]
//! cargo bench --bench twins-bench -- api            [--connections 64] [--seconds 5] [--states 1000000]
//! cargo bench --bench twins-bench -- all
//! ```
//! Each scenario starts its own `twins` process on the embedded defaults (SQLite in a
//! temporary directory, in-process cache) against the NATS at `--nats`
//! (default `nats://127.0.0.1:4222`), prints progress on stderr and one JSON summary
//! line per scenario on stdout. `--url http://host:port` runs `api` against a service
//! that is already running (its auth must accept the tokens `bench-token-0..9`).

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::Row;
use tokio::sync::Mutex;
use twins::broker::{self, Envelope};
use twins::domain::sampling::Write;
use twins::domain::state::State;
use twins::domain::time::now_millis;
use twins::domain::twin::{Attribute, Definition, Twin};
use twins::proto::magistrala::auth_service_server::{AuthService, AuthServiceServer};
use twins::proto::magistrala::{IdentityReq, IdentityRes};
use twins::store::sqlite::SqliteStore;
use twins::store::{
    Applied, IngestRepository, IngestStep, Lease, SeqWrite, TwinRepository, TwinWrites,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const WINDOW: usize = 512;
const USERS: usize = 10;
/// The service's batch size, so the store baseline writes the way the service does.
const STORE_BATCH: usize = twins::broker::consumer::BATCH;

#[derive(Debug, Clone)]
struct Opts {
    scenario: String,
    twins: usize,
    messages: Option<usize>,
    states: usize,
    connections: usize,
    seconds: u64,
    nats: String,
    url: Option<String>,
}

fn parse_opts() -> Res<Opts> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut o = Opts {
        scenario: String::new(),
        twins: 1000,
        messages: None,
        states: 1_000_000,
        connections: 64,
        seconds: 5,
        nats: "nats://127.0.0.1:4222".into(),
        url: None,
    };
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--twins" => o.twins = val()?.parse()?,
            "--messages" => o.messages = Some(val()?.parse()?),
            "--states" => o.states = val()?.parse()?,
            "--connections" => o.connections = val()?.parse()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--nats" => o.nats = val()?,
            "--url" => o.url = Some(val()?),
            s if !s.starts_with('-') && o.scenario.is_empty() => o.scenario = s.to_owned(),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if o.scenario.is_empty() {
        return Err("usage: twins-bench <ingest|ingest-growth|api|all> [options]".into());
    }
    Ok(o)
}

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------- the service process

struct Service {
    child: Child,
    base: String,
    group: String,
    nats: String,
    db: String,
}

impl Service {
    async fn start(dir: &std::path::Path, nats: &str, extra: &[(&str, String)]) -> Res<Self> {
        let port = free_port()?;
        let group = format!("bench-{}", uid());
        let db = format!("{}/twins.db", dir.display());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twins"));
        for (k, _) in std::env::vars() {
            if k.starts_with("MG_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("MG_TWINS_HTTP_HOST", "127.0.0.1")
            .env("MG_TWINS_HTTP_PORT", port.to_string())
            .env("MG_TWINS_DB_URL", format!("sqlite://{db}"))
            .env("MG_MESSAGE_BROKER_URL", nats)
            .env("MG_TWINS_INSTANCE_GROUP", &group)
            .env("MG_TWINS_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let svc = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            group,
            nats: nats.to_owned(),
            db,
        };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{}/health", svc.base)).send().await
                && let Ok(h) = r.json::<Value>().await
                && h["status"] == "pass"
            {
                return Ok(svc);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the twins service did not become healthy".into())
    }

    /// Peak resident set size of the process, in KiB.
    fn rss_peak_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    async fn wait_consumer(&self, js: &jetstream::Context) -> Res<()> {
        for _ in 0..200 {
            if let Ok(s) = js.get_stream(broker::STREAM).await
                && s.consumer_info(&self.group).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the service's consumer did not appear".into())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let (url, group) = (self.nats.clone(), self.group.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    if let Ok(c) = async_nats::connect(url).await {
                        let _ = jetstream::new(c)
                            .delete_consumer_from_stream(&group, broker::STREAM)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

// ---------------------------------------------------------------- fixtures

fn twin(owner: &str, channel: &str) -> Twin {
    let now = now_millis();
    Twin {
        owner: owner.into(),
        id: uuid::Uuid::new_v4().to_string(),
        name: format!("bench {channel}"),
        revision: 0,
        created: now,
        updated: now,
        definitions: vec![Definition {
            id: 0,
            created: now,
            attributes: vec![Attribute {
                name: "v".into(),
                channel: channel.into(),
                subtopic: String::new(),
                persist_state: true,
            }],
            delta: 1_000_000,
        }],
        metadata: Default::default(),
    }
}

/// Writes `per_twin[i]` states for twin i through the store, in batches.
async fn fill_states(store: &SqliteStore, twins: &[Twin], per_twin: &[usize]) -> Res<()> {
    let t0 = now_millis();
    let mut batch = Vec::new();
    let mut pending = 0;
    for (t, &n) in twins.iter().zip(per_twin) {
        let mut writes = Vec::with_capacity(n);
        for id in 0..n as i64 {
            writes.push(SeqWrite {
                seq: 0,
                write: Write::Insert(State {
                    twin_id: t.id.clone(),
                    id,
                    definition: 0,
                    created: t0 - chrono::Duration::milliseconds(10 * (n as i64 - id)),
                    payload: [("v".to_owned(), json!(id))].into_iter().collect(),
                }),
            });
            pending += 1;
            if pending >= STORE_BATCH * 8 {
                batch.push(TwinWrites {
                    twin_id: t.id.clone(),
                    expected_seq: 0,
                    writes: std::mem::take(&mut writes),
                });
                // The sequence guard is not the point of the fixture: write with seq 0.
                store_apply(store, std::mem::take(&mut batch)).await?;
                pending = 0;
            }
        }
        if !writes.is_empty() {
            batch.push(TwinWrites {
                twin_id: t.id.clone(),
                expected_seq: 0,
                writes,
            });
        }
    }
    if !batch.is_empty() {
        store_apply(store, batch).await?;
    }
    Ok(())
}

/// Applies state writes as ingestion does: one step of a bench group, moving its
/// position by one.
async fn store_apply(store: &SqliteStore, twins: Vec<TwinWrites>) -> Res<()> {
    let lease = Lease {
        group: "bench".into(),
        holder: "bench".into(),
        ttl: Duration::from_secs(3600),
        start: 0,
    };
    let from = IngestRepository::lease(store, &lease)
        .await?
        .ok_or("bench group leased elsewhere")?;
    let step = IngestStep {
        group: lease.group,
        from,
        to: from + 1,
        twins,
    };
    match IngestRepository::apply(store, &step).await? {
        Applied::Done { .. } => Ok(()),
        Applied::Fenced => Err("bench group fenced".into()),
    }
}

fn senml_envelope(channel: &str, value: usize) -> Vec<u8> {
    broker::encode(&Envelope {
        channel: channel.into(),
        subtopic: String::new(),
        publisher: "bench".into(),
        protocol: "nats".into(),
        payload: format!("[{{\"n\":\"v\",\"v\":{value}}}]").into_bytes(),
        created: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Publishes `messages` with at most [`WINDOW`] unacknowledged; returns the stream
/// sequence of every message and the time its publish started.
async fn publish_all(
    js: &jetstream::Context,
    subjects_payloads: Vec<(String, Vec<u8>)>,
) -> Res<Vec<(u64, Instant)>> {
    let mut out = Vec::with_capacity(subjects_payloads.len());
    let mut inflight = futures::stream::FuturesOrdered::new();
    for (i, (subject, payload)) in subjects_payloads.into_iter().enumerate() {
        let started = Instant::now();
        let ack = js.publish(subject, payload.into()).await?;
        inflight.push_back(async move { (ack.await, started) });
        if inflight.len() >= WINDOW
            && let Some((ack, t)) = inflight.next().await
        {
            out.push((ack?.sequence, t));
        }
        if i % 50_000 == 0 && i > 0 {
            eprintln!("  published {i}");
        }
    }
    while let Some((ack, t)) = inflight.next().await {
        out.push((ack?.sequence, t));
    }
    Ok(out)
}

// ---------------------------------------------------------------- ingest

struct IngestRun {
    rate: f64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    created: u64,
    rss_peak_kib: u64,
}

/// Ingests `messages` SenML messages spread over `twins` (each on its own channel)
/// through a running service and measures publish start to last state persisted.
async fn ingest_through(
    svc: &Service,
    js: &jetstream::Context,
    twins: &[Twin],
    messages: usize,
    states_before: u64,
) -> Res<IngestRun> {
    svc.wait_consumer(js).await?;
    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&svc.db)
                .read_only(true),
        )
        .await?;
    let index: HashMap<&str, usize> = twins
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let payloads: Vec<(String, Vec<u8>)> = (0..messages)
        .map(|k| {
            let t = &twins[k % twins.len()];
            let ch = &t.definitions[0].attributes[0].channel;
            (broker::subject(ch, ""), senml_envelope(ch, k))
        })
        .collect();
    let start = Instant::now();
    let published = publish_all(js, payloads).await?;
    let publish_secs = start.elapsed().as_secs_f64();
    // The last sequence each twin must reach, and a sample for latencies.
    let mut last = vec![0u64; twins.len()];
    for (k, (seq, _)) in published.iter().enumerate() {
        last[k % twins.len()] = last[k % twins.len()].max(*seq);
    }
    let step = (messages / 500).max(1);
    let mut samples: Vec<(usize, u64, Instant, Option<Instant>)> = published
        .iter()
        .enumerate()
        .step_by(step)
        .map(|(k, (seq, t))| (k % twins.len(), *seq, *t, None))
        .collect();
    eprintln!("  published {messages} in {publish_secs:.2} s; waiting for the store");
    let deadline = Instant::now() + Duration::from_secs(600);
    let done_at = loop {
        let rows = sqlx::query("SELECT twin_id, seq FROM ingest_cursors")
            .fetch_all(&db)
            .await?;
        let now = Instant::now();
        let mut seen = vec![0u64; twins.len()];
        for r in rows {
            let id: String = r.try_get("twin_id")?;
            let seq: i64 = r.try_get("seq")?;
            if let Some(&i) = index.get(id.as_str()) {
                seen[i] = seq.max(0) as u64;
            }
        }
        for s in samples.iter_mut().filter(|s| s.3.is_none()) {
            if seen[s.0] >= s.1 {
                s.3 = Some(now);
            }
        }
        if seen.iter().zip(&last).all(|(s, l)| s >= l) {
            break now;
        }
        if now > deadline {
            return Err("ingest did not finish within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = (done_at - start).as_secs_f64();
    let mut lat: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.3.map(|d| (d - s.2).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(f64::total_cmp);
    let created: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM states")
        .fetch_one(&db)
        .await?;
    Ok(IngestRun {
        rate: messages as f64 / seconds,
        seconds,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        created: (created.max(0) as u64).saturating_sub(states_before),
        rss_peak_kib: svc.rss_peak_kib(),
    })
}

/// Raw JetStream: the same messages published and consumed + acked by a bare consumer.
async fn baseline_jetstream(js: &jetstream::Context, twins: usize, messages: usize) -> Res<f64> {
    let prefix = format!("benchraw{}", uid());
    let name = format!("bench-raw-{}", uid());
    let stream = js
        .get_or_create_stream(twins::broker::consumer::stream_config())
        .await?;
    let mut config = twins::broker::consumer::consumer_config(&name, 1);
    config.deliver_policy = jetstream::consumer::DeliverPolicy::New;
    config.filter_subject = format!("channels.{prefix}.>");
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_or_create_consumer(&name, config).await?;
    let mut msgs = consumer
        .stream()
        .max_messages_per_batch(1024)
        .messages()
        .await?;
    let counter = tokio::spawn(async move {
        let mut n = 0;
        while n < messages {
            match msgs.next().await {
                Some(Ok(m)) => {
                    let _ = m.ack().await;
                    n += 1;
                }
                _ => break,
            }
        }
        Instant::now()
    });
    let payloads = (0..messages)
        .map(|k| {
            let ch = format!("{prefix}.{}", k % twins);
            (format!("channels.{ch}"), senml_envelope(&ch, k))
        })
        .collect();
    let start = Instant::now();
    publish_all(js, payloads).await?;
    let end = counter.await?;
    let _ = js.delete_consumer_from_stream(&name, broker::STREAM).await;
    Ok(messages as f64 / (end - start).as_secs_f64())
}

/// Raw store: the same number of states written through the store API in the batches
/// the service uses, without the service.
async fn baseline_store(twins: usize, messages: usize) -> Res<f64> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&format!("{}/raw.db", dir.path().display())).await?;
    let ids: Vec<String> = (0..twins)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let mut next = vec![0i64; twins];
    let mut seq = vec![0u64; twins];
    let start = Instant::now();
    let mut k = 0;
    while k < messages {
        let mut per_twin: HashMap<usize, Vec<Write>> = HashMap::new();
        for _ in 0..STORE_BATCH.min(messages - k) {
            let t = k % twins;
            per_twin.entry(t).or_default().push(Write::Insert(State {
                twin_id: ids[t].clone(),
                id: next[t],
                definition: 0,
                created: now_millis(),
                payload: [("v".to_owned(), json!(k))].into_iter().collect(),
            }));
            next[t] += 1;
            k += 1;
        }
        let batch: Vec<TwinWrites> = per_twin
            .into_iter()
            .map(|(t, writes)| {
                let w = TwinWrites {
                    twin_id: ids[t].clone(),
                    expected_seq: seq[t],
                    writes: writes
                        .into_iter()
                        .map(|write| SeqWrite {
                            write,
                            seq: seq[t] + 1,
                        })
                        .collect(),
                };
                seq[t] += 1;
                w
            })
            .collect();
        store_apply(&store, batch).await?;
    }
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

async fn seeded_twins(dir: &std::path::Path, n: usize, owner: &str) -> Res<Vec<Twin>> {
    let store = SqliteStore::open(&format!("{}/twins.db", dir.display())).await?;
    let run = uid();
    let mut twins = Vec::with_capacity(n);
    for i in 0..n {
        let t = twin(owner, &format!("bench{run}-{i}"));
        TwinRepository::save(&store, &t).await?;
        twins.push(t);
    }
    Ok(twins)
}

async fn scenario_ingest(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(200_000);
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats);
    eprintln!("ingest: baseline JetStream publish + consume + ack of {messages} messages");
    let js_rate = baseline_jetstream(&js, o.twins, messages).await?;
    eprintln!("  {js_rate:.0} msg/s");
    eprintln!("ingest: baseline store, {messages} states in batches of {STORE_BATCH}");
    let store_rate = baseline_store(o.twins, messages).await?;
    eprintln!("  {store_rate:.0} states/s");
    eprintln!("ingest: service, {} twins, {messages} messages", o.twins);
    let dir = tempfile::tempdir()?;
    let twins = seeded_twins(dir.path(), o.twins, "bench").await?;
    let svc = Service::start(
        dir.path(),
        &o.nats,
        &[
            ("MG_TWINS_STANDALONE_ID", "bench".into()),
            ("MG_TWINS_STANDALONE_TOKEN", "bench".into()),
        ],
    )
    .await?;
    let run = ingest_through(&svc, &js, &twins, messages, 0).await?;
    eprintln!(
        "  {:.0} msg/s end to end, p50 {:.1} ms, p99 {:.1} ms",
        run.rate, run.p50_ms, run.p99_ms
    );
    Ok(json!({
        "scenario": "ingest",
        "twins": o.twins,
        "messages": messages,
        "seconds": round(run.seconds),
        "messages_per_second": run.rate.round(),
        "publish_to_persist_p50_ms": round(run.p50_ms),
        "publish_to_persist_p99_ms": round(run.p99_ms),
        "states_created": run.created,
        "messages_applied_as_updates": (messages as u64).saturating_sub(run.created),
        "service_rss_peak_mib": round(run.rss_peak_kib as f64 / 1024.0),
        "baseline_jetstream_messages_per_second": js_rate.round(),
        "baseline_store_states_per_second": store_rate.round(),
        "ratio_to_jetstream": round(run.rate / js_rate),
        "ratio_to_store": round(run.rate / store_rate),
    }))
}

async fn scenario_growth(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(50_000);
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats);
    let mut rates = Vec::new();
    for stored in [0, o.states] {
        eprintln!("ingest-growth: {messages} messages with {stored} states stored");
        let dir = tempfile::tempdir()?;
        let twins = seeded_twins(dir.path(), o.twins, "bench").await?;
        if stored > 0 {
            let store = SqliteStore::open(&format!("{}/twins.db", dir.path().display())).await?;
            let per = vec![stored / o.twins; o.twins];
            fill_states(&store, &twins, &per).await?;
        }
        let svc = Service::start(
            dir.path(),
            &o.nats,
            &[
                ("MG_TWINS_STANDALONE_ID", "bench".into()),
                ("MG_TWINS_STANDALONE_TOKEN", "bench".into()),
            ],
        )
        .await?;
        let run = ingest_through(&svc, &js, &twins, messages, stored as u64).await?;
        eprintln!("  {:.0} msg/s", run.rate);
        rates.push(run.rate);
    }
    Ok(json!({
        "scenario": "ingest-growth",
        "twins": o.twins,
        "messages": messages,
        "states_stored": o.states,
        "messages_per_second_empty": rates[0].round(),
        "messages_per_second_full": rates[1].round(),
        "ratio": round(rates[1] / rates[0]),
    }))
}

// ---------------------------------------------------------------- api

/// An auth service knowing `bench-token-<i>` as `bench-user-<i>`.
struct BenchAuth;

#[tonic::async_trait]
impl AuthService for BenchAuth {
    async fn identify(
        &self,
        request: tonic::Request<IdentityReq>,
    ) -> Result<tonic::Response<IdentityRes>, tonic::Status> {
        let token = request.into_inner().token;
        match token.strip_prefix("bench-token-") {
            Some(i) => Ok(tonic::Response::new(IdentityRes {
                id: format!("bench-user-{i}"),
                user_id: format!("bench-user-{i}"),
                domain_id: String::new(),
            })),
            None => Err(tonic::Status::unauthenticated("unknown token")),
        }
    }
}

async fn spawn_auth() -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(BenchAuth))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr.to_string())
}

#[derive(Clone, Copy)]
enum Endpoint {
    Health,
    GetTwin,
    ListTwins,
    StatesFirst,
    StatesDeep,
    PostTwin,
    PutTwin,
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn load(
    base: &str,
    endpoint: Endpoint,
    twins_by_user: &Arc<Vec<Vec<String>>>,
    deep: &(usize, String, u64),
    connections: usize,
    seconds: u64,
) -> Res<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()?;
    let mut workers = Vec::new();
    for w in 0..connections {
        let (client, stop, errors, latencies) = (
            client.clone(),
            stop.clone(),
            errors.clone(),
            latencies.clone(),
        );
        let (base, twins, deep) = (base.to_owned(), twins_by_user.clone(), deep.clone());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let user = (i >> 33) % USERS;
                let ids = &twins[user];
                let id = &ids[(i >> 17) % ids.len()];
                let token = format!("bench-token-{user}");
                let req = match endpoint {
                    Endpoint::Health => client.get(format!("{base}/health")),
                    Endpoint::GetTwin => client.get(format!("{base}/twins/{id}")),
                    Endpoint::ListTwins => client.get(format!("{base}/twins?limit=100")),
                    Endpoint::StatesFirst => client
                        .get(format!("{base}/states/{}?offset=0&limit=100", deep.1))
                        .bearer_auth(format!("bench-token-{}", deep.0)),
                    Endpoint::StatesDeep => client
                        .get(format!(
                            "{base}/states/{}?offset={}&limit=100",
                            deep.1,
                            deep.2.saturating_sub(100)
                        ))
                        .bearer_auth(format!("bench-token-{}", deep.0)),
                    Endpoint::PostTwin => client
                        .post(format!("{base}/twins"))
                        .json(&json!({"name": "load", "metadata": {"load": true}})),
                    Endpoint::PutTwin => client
                        .put(format!("{base}/twins/{id}"))
                        .json(&json!({"name": format!("renamed {i}")})),
                };
                let req = match endpoint {
                    Endpoint::Health | Endpoint::StatesFirst | Endpoint::StatesDeep => req,
                    _ => req.bearer_auth(&token),
                };
                let t = Instant::now();
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies.lock().await.extend(mine);
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *latencies.lock().await);
    lat.sort_by(f64::total_cmp);
    Ok(Load {
        rps: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
    })
}

async fn scenario_api(o: &Opts) -> Res<Value> {
    let dir = tempfile::tempdir()?;
    let (base, _svc, twins_by_user, deep) = match &o.url {
        Some(url) => {
            return Err(format!(
                "--url {url}: seed the target with the same fixtures first; only the embedded run is automated"
            )
            .into());
        }
        None => {
            eprintln!(
                "api: seeding 10000 twins of {USERS} users and {} states",
                o.states
            );
            let store = SqliteStore::open(&format!("{}/twins.db", dir.path().display())).await?;
            let mut by_user = vec![Vec::new(); USERS];
            let mut all = Vec::new();
            for i in 0..10_000 {
                let user = i % USERS;
                let t = twin(&format!("bench-user-{user}"), &format!("api-{i}"));
                TwinRepository::save(&store, &t).await?;
                by_user[user].push(t.id.clone());
                all.push(t);
            }
            // Half the states on one deep twin, the rest over 5000 twins.
            let deep_n = o.states / 2;
            let spread = &all[1..5001];
            let mut per = vec![deep_n];
            let rest = (o.states - deep_n) / spread.len();
            per.extend(std::iter::repeat_n(rest, spread.len()));
            fill_states(&store, &all[..5001], &per).await?;
            drop(store);
            let auth = spawn_auth().await?;
            let svc = Service::start(dir.path(), &o.nats, &[("MG_AUTH_GRPC_URL", auth)]).await?;
            let base = svc.base.clone();
            (
                base,
                Some(svc),
                Arc::new(by_user),
                (0usize, all[0].id.clone(), deep_n as u64),
            )
        }
    };
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!("api"));
    out.insert("connections".into(), json!(o.connections));
    out.insert("seconds_per_endpoint".into(), json!(o.seconds));
    let mut health_rps = 0.0;
    let mut first_p99 = 0.0;
    for (name, ep) in [
        ("health", Endpoint::Health),
        ("get_twin", Endpoint::GetTwin),
        ("list_twins_100", Endpoint::ListTwins),
        ("states_first_page", Endpoint::StatesFirst),
        ("states_deep_page", Endpoint::StatesDeep),
        ("post_twin", Endpoint::PostTwin),
        ("put_twin", Endpoint::PutTwin),
    ] {
        let l = load(&base, ep, &twins_by_user, &deep, o.connections, o.seconds).await?;
        eprintln!(
            "  {name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            l.rps, l.p50_ms, l.p99_ms, l.errors
        );
        if matches!(ep, Endpoint::Health) {
            health_rps = l.rps;
        }
        if matches!(ep, Endpoint::StatesFirst) {
            first_p99 = l.p99_ms;
        }
        let mut e = json!({
            "requests_per_second": l.rps.round(),
            "p50_ms": round(l.p50_ms),
            "p99_ms": round(l.p99_ms),
            "errors": l.errors,
            "ratio_to_health": round(l.rps / health_rps.max(1.0)),
        });
        if matches!(ep, Endpoint::StatesDeep) {
            e["p99_ratio_to_first_page"] = json!(round(l.p99_ms / first_p99.max(f64::EPSILON)));
        }
        out.insert(name.into(), e);
    }
    Ok(Value::Object(out))
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("twins-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let scenarios: Vec<&str> = match opts.scenario.as_str() {
        "all" => vec!["ingest", "ingest-growth", "api"],
        s => vec![s],
    };
    for s in scenarios {
        let result = match s {
            "ingest" => scenario_ingest(&opts).await,
            "ingest-growth" => scenario_growth(&opts).await,
            "api" => scenario_api(&opts).await,
            other => Err(format!("unknown scenario {other:?}").into()),
        };
        match result {
            Ok(summary) => println!("{summary}"),
            Err(e) => {
                eprintln!("twins-bench: {s}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
