//! Load generator: ingest and API throughput of a real `twins` process against the
//! limits of the machine it runs on (raw JetStream, raw store writes, `/health`).
//!
//! ```text
//! cargo bench --bench twins-bench -- ingest         [--twins 1000] [--messages 200000] [--rate R --seconds 10]
//! cargo bench --bench twins-bench -- ingest-latency [--twins 1000] [--messages 200000] [--seconds 10]
//! cargo bench --bench twins-bench -- ingest-growth  [--twins 1000] [--messages 50000] [--states 1000000]
//! cargo bench --bench twins-bench -- api            [--connections 64] [--seconds 5] [--states 1000000]
//! cargo bench --bench twins-bench -- history        [--states 1000000] [--samples 200]
//! cargo bench --bench twins-bench -- memory         [--twins 100000]
//! cargo bench --bench twins-bench -- events         [--clients 1000] [--messages 100000] [--seconds 10] [--synthetic] [--rate R]
//! cargo bench --bench twins-bench -- all
//! ```
//! Each scenario starts its own `twins` process on the embedded defaults (SQLite in a
//! temporary directory, in-process cache) against the NATS at `--nats`
//! (default `nats://127.0.0.1:4222`), prints progress on stderr and one JSON summary
//! line per scenario on stdout.
//!
//! `--db postgres://user@host:port/db` runs every scenario on PostgreSQL instead: each
//! store the run needs is a database of its own created on that server (the URL's user
//! needs CREATEDB) and dropped at the end. `--instances N` starts N processes of one
//! instance group sharing the store and a Redis lookup cache (`--redis`, default
//! `redis://127.0.0.1:6379`); the API load is spread over them and any of them may
//! ingest. `--url http://host:port` runs `api` against a service
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
use std::str::FromStr;
use tokio::sync::Mutex;
use twins::broker::{self, Envelope};
use twins::domain::sampling::Write;
use twins::domain::state::State;
use twins::domain::time::now_millis;
use twins::domain::twin::{Attribute, Definition, Twin};
use twins::proto::magistrala::auth_service_server::{AuthService, AuthServiceServer};
use twins::proto::magistrala::{IdentityReq, IdentityRes};
use twins::store::{Applied, IngestStep, Lease, SeqWrite, Store, TwinWrites};

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
    db: Option<String>,
    instances: usize,
    redis: String,
    samples: usize,
    /// Messages per second of a fixed-rate ingest run (`--rate`).
    rate: Option<f64>,
    clients: usize,
    synthetic: bool,
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
        db: None,
        instances: 1,
        redis: "redis://127.0.0.1:6379".into(),
        samples: 200,
        rate: None,
        clients: 1000,
        synthetic: false,
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
            "--db" => o.db = Some(val()?),
            "--instances" => o.instances = val()?.parse::<usize>()?.max(1),
            "--redis" => o.redis = val()?,
            "--samples" => o.samples = val()?.parse::<usize>()?.max(1),
            "--rate" => o.rate = Some(val()?.parse::<f64>()?.max(1.0)),
            "--clients" => o.clients = val()?.parse::<usize>()?.max(1),
            "--synthetic" => o.synthetic = true,
            s if !s.starts_with('-') && o.scenario.is_empty() => o.scenario = s.to_owned(),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if let Some(db) = &o.db
        && !db.starts_with("postgres://")
        && !db.starts_with("postgresql://")
    {
        return Err(format!("--db {db}: only postgres:// URLs (SQLite is the default)").into());
    }
    if o.scenario.is_empty() {
        return Err(
            "usage: twins-bench <ingest|ingest-latency|ingest-growth|api|history|events|all> [options]"
                .into(),
        );
    }
    Ok(o)
}

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------- databases

/// A store of the run's own: a SQLite file in a temporary directory, or a PostgreSQL
/// database created for it and dropped with it.
struct Database {
    url: String,
    /// The server's URL and the database's name, on PostgreSQL.
    created: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Database {
    async fn create(o: &Opts) -> Res<Self> {
        let dir = tempfile::tempdir()?;
        let Some(server) = &o.db else {
            return Ok(Self {
                url: format!("sqlite://{}/twins.db", dir.path().display()),
                created: None,
                _dir: dir,
            });
        };
        let name = format!("twins_bench_{}", uid());
        postgres_admin(server, &format!("CREATE DATABASE \"{name}\"")).await?;
        let (head, _) = server
            .rsplit_once('/')
            .ok_or("--db needs a database in its URL")?;
        let query = server
            .split_once('?')
            .map_or(String::new(), |(_, q)| format!("?{q}"));
        Ok(Self {
            url: format!("{head}/{name}{query}"),
            created: Some((server.clone(), name)),
            _dir: dir,
        })
    }

    fn kind(&self) -> &'static str {
        if self.created.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    async fn store(&self) -> Res<Store> {
        Ok(Store::connect(&self.url).await?)
    }

    /// Brings a freshly seeded store to the state a running one is in: statistics
    /// gathered and, on PostgreSQL, the visibility map set (what autovacuum does soon
    /// after a bulk insert), so that measurements do not depend on when it ran.
    async fn settle(&self) -> Res<()> {
        match &self.created {
            None => {
                let mut conn =
                    <sqlx::SqliteConnection as sqlx::Connection>::connect(&self.url).await?;
                sqlx::raw_sql("ANALYZE").execute(&mut conn).await?;
            }
            Some(_) => {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url).await?;
                sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// A reader for the bench's own polling (ingest cursors, state counts).
    async fn reader(&self) -> Res<Reader> {
        Ok(match &self.created {
            None => Reader::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)?.read_only(true),
                    )
                    .await?,
            ),
            Some(_) => Reader::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&self.url)
                    .await?,
            ),
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some((server, name)) = self.created.take() {
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = rt.block_on(postgres_admin(&server, &drop));
                }
            })
            .join();
        }
    }
}

async fn postgres_admin(server: &str, statement: &str) -> Res<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(server).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// The bench's own connection to the store, to watch ingestion from outside.
enum Reader {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Reader {
    /// Every twin's ingest sequence.
    async fn cursors(&self) -> Res<Vec<(String, i64)>> {
        const SQL: &str = "SELECT twin_id, seq FROM ingest_cursors";
        let rows: Vec<(String, i64)> = match self {
            Self::Sqlite(p) => sqlx::query_as(SQL).fetch_all(p).await?,
            Self::Postgres(p) => sqlx::query_as(SQL).fetch_all(p).await?,
        };
        Ok(rows)
    }

    async fn states(&self) -> Res<i64> {
        const SQL: &str = "SELECT COUNT(*) FROM states";
        Ok(match self {
            Self::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await?,
            Self::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await?,
        })
    }
}

// ---------------------------------------------------------------- the service process

struct Service {
    child: Child,
    base: String,
    group: String,
    nats: String,
}

/// `n` instances of one group on one store, sharing a Redis lookup cache when more
/// than one.
async fn start_services(o: &Opts, db: &Database, extra: &[(&str, String)]) -> Res<Vec<Service>> {
    let group = format!("bench-{}", uid());
    let mut vars: Vec<(&str, String)> = extra.to_vec();
    if o.instances > 1 {
        vars.push(("MG_TWINS_CACHE_URL", o.redis.clone()));
        vars.push(("MG_TWINS_CACHE_PREFIX", format!("bench-{}:", uid())));
    }
    let mut services = Vec::with_capacity(o.instances);
    for _ in 0..o.instances {
        services.push(Service::start(&db.url, &o.nats, &group, &vars).await?);
    }
    Ok(services)
}

impl Service {
    async fn start(db: &str, nats: &str, group: &str, extra: &[(&str, String)]) -> Res<Self> {
        let port = free_port()?;
        let group = group.to_owned();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twins"));
        for (k, _) in std::env::vars() {
            if k.starts_with("MG_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("MG_TWINS_HTTP_HOST", "127.0.0.1")
            .env("MG_TWINS_HTTP_PORT", port.to_string())
            .env("MG_TWINS_DB_URL", db)
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

    /// Waits until the service's gauge `twins_feed_outbox_backlog` reads 0.
    async fn wait_outbox_empty(&self, http: &reqwest::Client, within: Duration) -> Res<()> {
        let deadline = Instant::now() + within;
        loop {
            let text = http
                .get(format!("{}/metrics", self.base))
                .send()
                .await?
                .text()
                .await?;
            let backlog = text
                .lines()
                .find_map(|l| l.strip_prefix("twins_feed_outbox_backlog "))
                .and_then(|v| v.trim().parse::<f64>().ok());
            if backlog == Some(0.0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the outbox still holds {backlog:?} events").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Peak resident set size of the process, in KiB.
    fn rss_peak_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Bytes the process has had written to storage so far (`write_bytes` of
    /// `/proc/<pid>/io`: what reached the block layer, not what is still cached; 0 when
    /// unreadable).
    fn written_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/io", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU time the process has used so far, all threads, user and system, in seconds
    /// (`utime` and `stime` of `/proc/<pid>/stat`, in ticks of 1/100 s; 0 when
    /// unreadable).
    fn cpu_seconds(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                // Fields after the command's closing parenthesis start at field 3.
                let rest = s.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
                Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
            })
            .unwrap_or(0.0)
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// A figure in kB of the process's `/proc/<pid>/status` (0 when unreadable).
    fn status_kib(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
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
                record: None,
            }],
            delta: 1_000_000,
        }],
        metadata: Default::default(),
    }
}

/// Writes `per_twin[i]` states for twin i through the store, in batches.
async fn fill_states(store: &Store, twins: &[Twin], per_twin: &[usize]) -> Res<()> {
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
                    events: Vec::new(),
                    last_break: None,
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
                events: Vec::new(),
                last_break: None,
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
async fn store_apply(store: &Store, twins: Vec<TwinWrites>) -> Res<()> {
    let lease = Lease {
        group: "bench".into(),
        holder: "bench".into(),
        ttl: Duration::from_secs(3600),
        start: 0,
    };
    let from = store
        .ingest
        .lease(&lease)
        .await?
        .ok_or("bench group leased elsewhere")?;
    let step = IngestStep {
        group: lease.group,
        from,
        to: from + 1,
        twins,
    };
    match store.ingest.apply(&step).await? {
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
    publish_paced(js, subjects_payloads, None).await
}

/// [`publish_all`] at `rate` messages per second at most when given.
async fn publish_paced(
    js: &jetstream::Context,
    subjects_payloads: Vec<(String, Vec<u8>)>,
    rate: Option<f64>,
) -> Res<Vec<(u64, Instant)>> {
    let mut out = Vec::with_capacity(subjects_payloads.len());
    let mut inflight = futures::stream::FuturesOrdered::new();
    let begin = tokio::time::Instant::now();
    for (i, (subject, payload)) in subjects_payloads.into_iter().enumerate() {
        if let Some(rate) = rate
            && i % 16 == 0
        {
            tokio::time::sleep_until(begin + Duration::from_secs_f64(i as f64 / rate)).await;
        }
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
    /// The services' CPU time during the run, per message, in microseconds.
    cpu_us_per_message: f64,
    /// Bytes the services had written to storage during the run, per message.
    written_bytes_per_message: f64,
    /// When the publish of message k (value k) started.
    published_at: Vec<Instant>,
}

/// Ingests `messages` SenML messages spread over `twins` (each on its own channel)
/// through a running service, published at `rate` per second at most when given, and
/// measures publish start to last state persisted.
async fn ingest_through(
    svcs: &[Service],
    db: &Database,
    js: &jetstream::Context,
    twins: &[Twin],
    messages: usize,
    states_before: u64,
    rate: Option<f64>,
) -> Res<IngestRun> {
    svcs.first().ok_or("no service")?.wait_consumer(js).await?;
    let db = db.reader().await?;
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
    let cpu_before: f64 = svcs.iter().map(Service::cpu_seconds).sum();
    let written_before: u64 = svcs.iter().map(Service::written_bytes).sum();
    let start = Instant::now();
    let published = publish_paced(js, payloads, rate).await?;
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
        let rows = db.cursors().await?;
        let now = Instant::now();
        let mut seen = vec![0u64; twins.len()];
        for (id, seq) in rows {
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
    let cpu = svcs.iter().map(Service::cpu_seconds).sum::<f64>() - cpu_before;
    let written = svcs
        .iter()
        .map(Service::written_bytes)
        .sum::<u64>()
        .saturating_sub(written_before);
    let mut lat: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.3.map(|d| (d - s.2).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(f64::total_cmp);
    let created = db.states().await?;
    Ok(IngestRun {
        rate: messages as f64 / seconds,
        seconds,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        created: (created.max(0) as u64).saturating_sub(states_before),
        rss_peak_kib: svcs.iter().map(Service::rss_peak_kib).max().unwrap_or(0),
        cpu_us_per_message: cpu * 1e6 / messages as f64,
        written_bytes_per_message: written as f64 / messages as f64,
        published_at: published.iter().map(|(_, t)| *t).collect(),
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
async fn baseline_store(o: &Opts, messages: usize) -> Res<f64> {
    let twins = o.twins;
    let db = Database::create(o).await?;
    let store = db.store().await?;
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
                    events: Vec::new(),
                    last_break: None,
                };
                seq[t] += 1;
                w
            })
            .collect();
        store_apply(&store, batch).await?;
    }
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

async fn seeded_twins(store: &Store, n: usize, owner: &str) -> Res<Vec<Twin>> {
    let run = uid();
    let mut twins = Vec::with_capacity(n);
    for i in 0..n {
        let t = twin(owner, &format!("bench{run}-{i}"));
        store.twins.save(&t).await?;
        twins.push(t);
    }
    Ok(twins)
}

async fn scenario_ingest(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(200_000);
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats.clone());
    if let Some(rate) = o.rate {
        let (db, twins, svcs) = notifying_service(o).await?;
        svcs.first().ok_or("no service")?.wait_consumer(&js).await?;
        eprintln!(
            "ingest: {rate:.0} msg/s for {} s on {}",
            o.seconds,
            db.kind()
        );
        let run = ingest_at_rate(&nats, &js, &twins, rate, o.seconds).await?;
        eprintln!(
            "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} seen)",
            run.p50_ms, run.p99_ms, run.max_ms, run.seen, run.sent
        );
        let mut out = run.json();
        out["scenario"] = json!("ingest");
        out["db"] = json!(db.kind());
        out["twins"] = json!(o.twins);
        return Ok(out);
    }
    eprintln!("ingest: baseline JetStream publish + consume + ack of {messages} messages");
    let js_rate = baseline_jetstream(&js, o.twins, messages).await?;
    eprintln!("  {js_rate:.0} msg/s");
    eprintln!("ingest: baseline store, {messages} states in batches of {STORE_BATCH}");
    let store_rate = baseline_store(o, messages).await?;
    eprintln!("  {store_rate:.0} states/s");
    let db = Database::create(o).await?;
    eprintln!(
        "ingest: service on {}, {} instance(s), {} twins, {messages} messages",
        db.kind(),
        o.instances,
        o.twins
    );
    let twins = seeded_twins(&db.store().await?, o.twins, "bench").await?;
    let svcs = start_services(o, &db, &standalone()).await?;
    let run = ingest_through(&svcs, &db, &js, &twins, messages, 0, None).await?;
    eprintln!(
        "  {:.0} msg/s end to end, p50 {:.1} ms, p99 {:.1} ms",
        run.rate, run.p50_ms, run.p99_ms
    );
    Ok(json!({
        "scenario": "ingest",
        "db": db.kind(),
        "instances": o.instances,
        "twins": o.twins,
        "messages": messages,
        "seconds": round(run.seconds),
        "messages_per_second": run.rate.round(),
        "publish_to_persist_p50_ms": round(run.p50_ms),
        "publish_to_persist_p99_ms": round(run.p99_ms),
        "states_created": run.created,
        "messages_applied_as_updates": (messages as u64).saturating_sub(run.created),
        "service_rss_peak_mib": round(run.rss_peak_kib as f64 / 1024.0),
        "service_cpu_us_per_message": round(run.cpu_us_per_message),
        "service_written_bytes_per_message": run.written_bytes_per_message.round(),
        "baseline_jetstream_messages_per_second": js_rate.round(),
        "baseline_store_states_per_second": store_rate.round(),
        "ratio_to_jetstream": round(run.rate / js_rate),
        "ratio_to_store": round(run.rate / store_rate),
    }))
}

/// The notification channel of fixed-rate runs: the service publishes one `save`
/// notification per state it has written, after the write is durable.
const NOTIFY_CHANNEL: &str = "bench-notify";

/// Latencies of a fixed-rate run, publish start to the state's `save` notification.
struct RateRun {
    rate: f64,
    sent: usize,
    seen: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl RateRun {
    fn json(&self) -> Value {
        json!({
            "rate": self.rate.round(),
            "messages": self.sent,
            "persisted": self.seen,
            "publish_to_persist_p50_ms": round(self.p50_ms),
            "publish_to_persist_p99_ms": round(self.p99_ms),
            "publish_to_persist_max_ms": round(self.max_ms),
        })
    }
}

/// Publishes `rate` messages a second for `seconds` over `twins` (message k carries the
/// value k, one new state each: the twins' delta is 1 ms and each gets a message far
/// less often) and times each from the start of its publish to the `save`
/// notification of its state, which the service publishes once the state is durable.
/// Each message is measured, none sampled; acks are awaited off the schedule.
async fn ingest_at_rate(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    twins: &[Twin],
    rate: f64,
    seconds: u64,
) -> Res<RateRun> {
    // Values of this run only, whatever notifications of earlier ones still arrive.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let base = (RUNS.fetch_add(1, Ordering::Relaxed) + 1) * 1_000_000_000;
    let total = (rate * seconds as f64) as usize;
    let started: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total]));
    let mut notes = nats
        .subscribe(format!("channels.{NOTIFY_CHANNEL}.messages.*.save.success"))
        .await?;
    nats.flush().await?;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let collector = {
        let started = started.clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total);
            loop {
                let msg = tokio::select! {
                    m = notes.next() => m,
                    _ = &mut done_rx => break,
                };
                let Some(msg) = msg else { break };
                let now = Instant::now();
                let Ok(env) = broker::decode(&msg.payload) else {
                    continue;
                };
                let Ok(state) = serde_json::from_slice::<Value>(&env.payload) else {
                    continue;
                };
                // The value as the service wrote it back (a SenML value is a float),
                // less this run's base: the message's index.
                let Some(k) = state["payload"]["v"]
                    .as_f64()
                    .and_then(|v| (v as u64).checked_sub(base))
                else {
                    continue;
                };
                let t = started
                    .lock()
                    .ok()
                    .and_then(|s| s.get(k as usize).copied().flatten());
                if let Some(t) = t {
                    lat.push((now - t).as_secs_f64() * 1000.0);
                    if lat.len() == total {
                        break;
                    }
                }
            }
            lat
        })
    };
    let acks = Arc::new(AtomicU64::new(0));
    let begin = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut k = 0;
    while k < total {
        tick.tick().await;
        let due = ((begin.elapsed().as_secs_f64() * rate) as usize).min(total);
        while k < due {
            let t = &twins[k % twins.len()];
            let ch = &t.definitions[0].attributes[0].channel;
            let now = Instant::now();
            if let Ok(mut s) = started.lock() {
                s[k] = Some(now);
            }
            let ack = js
                .publish(
                    broker::subject(ch, ""),
                    senml_envelope(ch, base as usize + k).into(),
                )
                .await?;
            let acks = acks.clone();
            tokio::spawn(async move {
                if ack.await.is_ok() {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            });
            k += 1;
        }
    }
    let sent_secs = begin.elapsed().as_secs_f64();
    eprintln!("  sent {total} in {sent_secs:.1} s; waiting for the last notifications");
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if collector.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if waited.is_err() {
        let _ = done_tx.send(());
    }
    let mut lat = collector.await?;
    lat.sort_by(f64::total_cmp);
    Ok(RateRun {
        rate: total as f64 / sent_secs,
        sent: total,
        seen: lat.len(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
    })
}

/// A service on a store of its own with `n` twins, publishing `save` notifications.
async fn notifying_service(o: &Opts) -> Res<(Database, Vec<Twin>, Vec<Service>)> {
    let db = Database::create(o).await?;
    let twins = seeded_twins(&db.store().await?, o.twins, "bench").await?;
    let mut vars = standalone();
    vars.push(("MG_TWINS_CHANNEL_ID", NOTIFY_CHANNEL.to_owned()));
    let svcs = start_services(o, &db, &vars).await?;
    Ok((db, twins, svcs))
}

/// Publish-to-persist latency at 25%, 50% and 75% of the maximum ingest rate measured
/// first in the same run (a flood of `--messages`), `--seconds` each.
async fn scenario_ingest_latency(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(200_000);
    let seconds = o.seconds.max(10);
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats.clone());
    let (db, twins, svcs) = notifying_service(o).await?;
    eprintln!(
        "ingest-latency: maximum rate on {}, {messages} messages",
        db.kind()
    );
    let flood = ingest_through(&svcs, &db, &js, &twins, messages, 0, None).await?;
    eprintln!("  {:.0} msg/s", flood.rate);
    let mut runs = serde_json::Map::new();
    for pct in [25, 50, 75] {
        let rate = flood.rate * pct as f64 / 100.0;
        eprintln!("ingest-latency: {pct}% = {rate:.0} msg/s for {seconds} s");
        let run = ingest_at_rate(&nats, &js, &twins, rate, seconds).await?;
        eprintln!(
            "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} seen)",
            run.p50_ms, run.p99_ms, run.max_ms, run.seen, run.sent
        );
        runs.insert(format!("at_{pct}_percent"), run.json());
    }
    Ok(json!({
        "scenario": "ingest-latency",
        "db": db.kind(),
        "instances": o.instances,
        "twins": o.twins,
        "max_messages_per_second": flood.rate.round(),
        "runs": runs,
    }))
}

/// Resident memory of a service whose store holds `--twins` twins (default 100,000),
/// each on a channel of its own: just started, then once a message for every twin has
/// been ingested with a lookup cache big enough for all of them (each twin's channel
/// answer and ingest cursor in memory), and the same with the default cache size.
async fn scenario_memory(o: &Opts) -> Res<Value> {
    let n = if o.twins == 1000 { 100_000 } else { o.twins };
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats);
    let db = Database::create(o).await?;
    eprintln!("memory: seeding {n} twins on {}", db.kind());
    let twins = seeded_twins(&db.store().await?, n, "bench").await?;
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!("memory"));
    out.insert("db".into(), json!(db.kind()));
    out.insert("twins".into(), json!(n));
    for (label, cache) in [("all_cached", n), ("default_cache", 0)] {
        let mut vars = standalone();
        if cache > 0 {
            vars.push(("MG_TWINS_LOOKUP_CACHE_SIZE", cache.to_string()));
        }
        let svcs = start_services(o, &db, &vars).await?;
        let svc = svcs.first().ok_or("no service")?;
        svc.wait_consumer(&js).await?;
        let started = svc.rss_kib();
        let run = ingest_through(&svcs, &db, &js, &twins, n, 0, None).await?;
        let loaded = svc.rss_kib();
        let per_twin = (loaded.saturating_sub(started) * 1024) as f64 / n as f64;
        eprintln!(
            "  {label}: {:.1} MiB started, {:.1} MiB with every twin ingested, {per_twin:.0} bytes per twin, peak {:.1} MiB",
            started as f64 / 1024.0,
            loaded as f64 / 1024.0,
            run.rss_peak_kib as f64 / 1024.0
        );
        out.insert(
            label.into(),
            json!({
                "lookup_cache_size": if cache > 0 { cache } else { twins::service::lookup::DEFAULT_ANSWERS },
                "rss_started_mib": round(started as f64 / 1024.0),
                "rss_loaded_mib": round(loaded as f64 / 1024.0),
                "rss_peak_mib": round(run.rss_peak_kib as f64 / 1024.0),
                "bytes_per_twin": per_twin.round(),
            }),
        );
        drop(svcs);
    }
    Ok(Value::Object(out))
}

async fn scenario_growth(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(50_000);
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats);
    let mut runs = Vec::new();
    for stored in [0, o.states] {
        eprintln!("ingest-growth: {messages} messages with {stored} states stored");
        let db = Database::create(o).await?;
        let store = db.store().await?;
        let twins = seeded_twins(&store, o.twins, "bench").await?;
        if stored > 0 {
            let per = vec![stored / o.twins; o.twins];
            fill_states(&store, &twins, &per).await?;
        }
        drop(store);
        let svcs = start_services(o, &db, &standalone()).await?;
        let run = ingest_through(&svcs, &db, &js, &twins, messages, stored as u64, None).await?;
        eprintln!(
            "  {:.0} msg/s, service CPU {:.1} µs and {:.0} bytes written per message",
            run.rate, run.cpu_us_per_message, run.written_bytes_per_message
        );
        runs.push(run);
    }
    let phase = |r: &IngestRun| {
        json!({
            "messages_per_second": r.rate.round(),
            "service_cpu_us_per_message": round(r.cpu_us_per_message),
            "service_written_bytes_per_message": r.written_bytes_per_message.round(),
        })
    };
    Ok(json!({
        "scenario": "ingest-growth",
        "db": if o.db.is_some() { "postgres" } else { "sqlite" },
        "instances": o.instances,
        "twins": o.twins,
        "messages": messages,
        "states_stored": o.states,
        "messages_per_second_empty": runs[0].rate.round(),
        "messages_per_second_full": runs[1].rate.round(),
        "ratio": round(runs[1].rate / runs[0].rate),
        "empty": phase(&runs[0]),
        "full": phase(&runs[1]),
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
    bases: &[String],
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
        let base = bases[w % bases.len()].clone();
        let (twins, deep) = (twins_by_user.clone(), deep.clone());
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
    let db = Database::create(o).await?;
    let (bases, _svcs, twins_by_user, deep) = match &o.url {
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
            let store = db.store().await?;
            let mut by_user = vec![Vec::new(); USERS];
            let mut all = Vec::new();
            for i in 0..10_000 {
                let user = i % USERS;
                let t = twin(&format!("bench-user-{user}"), &format!("api-{i}"));
                store.twins.save(&t).await?;
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
            let svcs = start_services(o, &db, &[("MG_AUTH_GRPC_URL", auth)]).await?;
            let bases: Vec<String> = svcs.iter().map(|s| s.base.clone()).collect();
            (
                bases,
                svcs,
                Arc::new(by_user),
                (0usize, all[0].id.clone(), deep_n as u64),
            )
        }
    };
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!("api"));
    out.insert("db".into(), json!(db.kind()));
    out.insert("instances".into(), json!(o.instances));
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
        let l = load(&bases, ep, &twins_by_user, &deep, o.connections, o.seconds).await?;
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

// ---------------------------------------------------------------- history

/// Spacing of the history fixture's states.
const HISTORY_STEP_MS: i64 = 10;

/// One twin with `n` states 10 ms apart ending now, each with three attributes (an
/// integer, a float, a string), written through the store as ingestion writes them.
async fn fill_history(store: &Store, twin: &Twin, n: usize) -> Res<(DateTimeUtc, DateTimeUtc)> {
    let last = now_millis();
    let first = last - chrono::Duration::milliseconds(HISTORY_STEP_MS * (n as i64 - 1));
    let per_step = STORE_BATCH * 8;
    let mut writes = Vec::with_capacity(per_step);
    for id in 0..n as i64 {
        writes.push(SeqWrite {
            seq: 0,
            write: Write::Insert(State {
                twin_id: twin.id.clone(),
                id,
                definition: 0,
                created: first + chrono::Duration::milliseconds(HISTORY_STEP_MS * id),
                payload: [
                    ("v".to_owned(), json!(id)),
                    ("temp".to_owned(), json!(20.0 + (id % 1000) as f64 / 100.0)),
                    (
                        "status".to_owned(),
                        json!(if id % 2 == 0 { "ok" } else { "warm" }),
                    ),
                ]
                .into_iter()
                .collect(),
            }),
        });
        // Not `capacity()`: taking the writes below leaves an empty vector behind.
        if writes.len() == per_step || id + 1 == n as i64 {
            let twins = vec![TwinWrites {
                twin_id: twin.id.clone(),
                expected_seq: 0,
                writes: std::mem::take(&mut writes),
                events: Vec::new(),
                // Written in time order.
                last_break: None,
            }];
            let before = id + 1 - twins[0].writes.len() as i64;
            store_apply(store, twins).await?;
            if before / 100_000 != (id + 1) / 100_000 {
                eprintln!("  {} states", id + 1);
            }
        }
    }
    Ok((first, last))
}

type DateTimeUtc = chrono::DateTime<chrono::Utc>;

/// The query string of the i-th request of a measure.
type QueryOf = Box<dyn Fn(usize) -> Vec<(&'static str, String)>>;

/// Latencies of `samples` requests made one after the other, the query of each from
/// `query(i)`; every answer must be a 200.
async fn timed(
    http: &reqwest::Client,
    url: &str,
    samples: usize,
    query: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Res<Value> {
    let mut ms = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        let res = http
            .get(url)
            .bearer_auth("bench")
            .query(&query(i))
            .send()
            .await?;
        let status = res.status();
        let body = res.bytes().await?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        if !status.is_success() {
            return Err(format!("{url}: {status}: {}", String::from_utf8_lossy(&body)).into());
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "samples": samples,
        "p50_ms": round(percentile(&ms, 0.5)),
        "p99_ms": round(percentile(&ms, 0.99)),
        "max_ms": round(ms.last().copied().unwrap_or(0.0)),
    }))
}

/// History endpoints over one twin with `--states` states: the state at random
/// instants, 100-state pages of a window at the start, middle and end against the first
/// plain page, and the summary of the whole history.
async fn scenario_history(o: &Opts) -> Res<Value> {
    let db = Database::create(o).await?;
    let store = db.store().await?;
    let twin = twin("bench", "history");
    store.twins.save(&twin).await?;
    eprintln!("history: seeding one twin with {} states", o.states);
    let seeding = Instant::now();
    let (first, last) = fill_history(&store, &twin, o.states).await?;
    eprintln!("  seeded in {:.1} s", seeding.elapsed().as_secs_f64());
    db.settle().await?;
    drop(store);
    let svc = start_services(o, &db, &standalone()).await?;
    let base = &svc[0].base;
    let http = reqwest::Client::new();
    let rfc = |t: DateTimeUtc| twins::domain::time::format(&t);
    let (from, to) = (rfc(first), rfc(last));
    let span_ms = (last - first).num_milliseconds().max(1) as u64;
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!("history"));
    out.insert("db".into(), json!(db.kind()));
    out.insert("states".into(), json!(o.states));
    let states_url = format!("{base}/states/{}", twin.id);
    let page = |offset: usize| {
        let (from, to) = (from.clone(), to.clone());
        move |_| {
            vec![
                ("from", from.clone()),
                ("to", to.clone()),
                ("limit", "100".to_owned()),
                ("offset", offset.to_string()),
            ]
        }
    };
    let n = o.states;
    let measures: Vec<(&str, String, usize, QueryOf)> = vec![
        (
            "states_first_page",
            states_url.clone(),
            o.samples,
            Box::new(|_| vec![("limit", "100".to_owned())]),
        ),
        (
            "range_page_start",
            states_url.clone(),
            o.samples,
            Box::new(page(0)),
        ),
        (
            "range_page_middle",
            states_url.clone(),
            o.samples,
            Box::new(page(n / 2)),
        ),
        (
            "range_page_end",
            states_url.clone(),
            o.samples,
            Box::new(page(n.saturating_sub(100))),
        ),
        (
            "state_at",
            format!("{base}/twins/{}/states/at", twin.id),
            o.samples,
            // Spread over the history by a fixed stride (Knuth's multiplicative hash).
            Box::new(move |i| {
                let offset = (i as u64).wrapping_mul(2_654_435_761) % span_ms;
                vec![(
                    "time",
                    rfc(first + chrono::Duration::milliseconds(offset as i64)),
                )]
            }),
        ),
        (
            "summary_all",
            format!("{base}/twins/{}/states/summary", twin.id),
            o.samples.clamp(1, 5),
            Box::new(|_| Vec::new()),
        ),
    ];
    let mut first_page_p99 = 0.0;
    for (name, url, samples, query) in measures {
        let mut m = timed(&http, &url, samples, query).await?;
        let p99 = m["p99_ms"].as_f64().unwrap_or(0.0);
        if name == "states_first_page" {
            first_page_p99 = p99;
        } else if name.starts_with("range_page") {
            m["p99_ratio_to_first_page"] = json!(round(p99 / first_page_p99.max(f64::EPSILON)));
        }
        eprintln!(
            "  {name}: p50 {} ms, p99 {} ms, max {} ms",
            m["p50_ms"], m["p99_ms"], m["max_ms"]
        );
        out.insert(name.into(), m);
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------- change feed

/// Each event's commit `time` and its latency (ms) from then to its arrival at an SSE
/// client.
type Latencies = Arc<std::sync::Mutex<Vec<(chrono::DateTime<chrono::Utc>, f64)>>>;

/// Each event's commit `time`, the value its state holds (the number of the last
/// message folded into it) and when it reached an SSE client.
type Arrivals = Arc<std::sync::Mutex<Vec<(chrono::DateTime<chrono::Utc>, Option<u64>, Instant)>>>;

/// The part of a served event the broker probe reads.
#[derive(serde::Deserialize)]
struct Stamped {
    time: chrono::DateTime<chrono::Utc>,
}

/// The parts of a served state event the clients read.
#[derive(serde::Deserialize)]
struct Served {
    time: chrono::DateTime<chrono::Utc>,
    new: Option<ServedState>,
}

#[derive(serde::Deserialize)]
struct ServedState {
    payload: ServedPayload,
}

#[derive(serde::Deserialize)]
struct ServedPayload {
    v: Option<u64>,
}

/// One SSE client following `path` until `stop`: records the latency of every event.
async fn sse_client(
    http: reqwest::Client,
    url: String,
    opened: Arc<AtomicU64>,
    (latencies, arrivals): (Latencies, Arrivals),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Res<()> {
    let mut resp = http.get(url).bearer_auth("bench").send().await?;
    if !resp.status().is_success() {
        return Err(format!("SSE answered {}", resp.status()).into());
    }
    opened.fetch_add(1, Ordering::Relaxed);
    let mut text = String::new();
    loop {
        let chunk = tokio::select! {
            chunk = resp.chunk() => chunk?,
            _ = stop.changed() => return Ok(()),
        };
        let Some(chunk) = chunk else {
            return Err("an SSE stream ended".into());
        };
        let (now, arrived) = (chrono::Utc::now(), Instant::now());
        text.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            // Only the time and the value are read: the clients share the machine
            // with the service.
            let event: Served = serde_json::from_str(data)?;
            let time = event.time;
            let ms = (now - time).num_microseconds();
            let ms = ms.unwrap_or_default() as f64 / 1000.0;
            latencies.lock().map_err(|_| "poisoned")?.push((time, ms));
            let value = event.new.and_then(|n| n.payload.v);
            arrivals
                .lock()
                .map_err(|_| "poisoned")?
                .push((time, value, arrived));
        }
    }
}

/// Publishes, at `rate` per second for `seconds`, change events of `twins` on the feed's
/// stream as the relay of committed changes does, stamped with the publish time.
async fn synthetic_events(
    js: &jetstream::Context,
    twins: &[Twin],
    rate: f64,
    seconds: u64,
) -> Res<usize> {
    use twins::domain::feed::{ChangeEvent, EventKind, subject};
    let n = (rate * seconds as f64) as usize;
    let begin = tokio::time::Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for k in 0..n {
        tokio::time::sleep_until(begin + Duration::from_secs_f64(k as f64 / rate)).await;
        let t = &twins[k % twins.len()];
        let event = ChangeEvent {
            kind: EventKind::StateUpdated,
            twin_id: t.id.clone(),
            time: chrono::Utc::now(),
            old: None,
            new: Some(json!({"v": k})),
        };
        let ack = js
            .publish(
                subject(&t.owner, &t.id, event.kind),
                serde_json::to_vec(&event)?.into(),
            )
            .await?;
        inflight.push(std::future::IntoFuture::into_future(ack));
        while inflight.len() >= WINDOW {
            if let Some(ack) = inflight.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = inflight.next().await {
        ack?;
    }
    Ok(n)
}

/// `--clients` SSE clients each following one twin while ingestion runs at half the rate
/// measured without them: event latency from commit to client (and from the publish of
/// the message a state event carries, ingestion included), and the ingest rate with
/// the clients and without them (after they left, so that the store is as full). `--synthetic` publishes the change events itself instead
/// of ingesting (the feed alone, without the relay of committed changes).
async fn scenario_events(o: &Opts) -> Res<Value> {
    let messages = o.messages.unwrap_or(100_000);
    let clients = o.clients;
    let nats = async_nats::connect(o.nats.as_str()).await?;
    let js = jetstream::new(nats);
    let db = Database::create(o).await?;
    let twins = seeded_twins(&db.store().await?, clients.max(o.twins), "bench").await?;
    let mut vars = standalone();
    vars.push(("MG_TWINS_HTTP_MAX_CONNECTIONS", (clients + 128).to_string()));
    let svcs = start_services(o, &db, &vars).await?;
    let svc = svcs.first().ok_or("no service")?;
    let mut stored = 0;
    let without = if o.synthetic {
        None
    } else {
        eprintln!("events: ingest of {messages} messages without SSE clients");
        let run = ingest_through(&svcs, &db, &js, &twins, messages, stored, None).await?;
        stored += run.created;
        eprintln!("  {:.0} msg/s", run.rate);
        Some(run.rate)
    };
    eprintln!("events: opening {clients} SSE clients, one twin each");
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()?;
    let opened = Arc::new(AtomicU64::new(0));
    let latencies: Latencies = Arc::default();
    let arrivals: Arrivals = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(clients);
    for t in twins.iter().take(clients) {
        tasks.push(tokio::spawn(sse_client(
            http.clone(),
            format!("{}/twins/{}/events", svc.base, t.id),
            opened.clone(),
            (latencies.clone(), arrivals.clone()),
            stopped.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (opened.load(Ordering::Relaxed) as usize) < clients {
        if Instant::now() > deadline || tasks.iter().any(|t| t.is_finished()) {
            return Err(
                format!("only {} SSE clients opened", opened.load(Ordering::Relaxed)).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same events as the relay publishes them: a plain subscription to the feed's
    // subjects, so that the way from commit to client splits into commit to broker and
    // broker to client.
    // It follows one twin in twenty, so that watching does not add a second full
    // delivery of the feed to what the machine does.
    let at_broker: Latencies = Arc::default();
    let probe = {
        let mut subs = Vec::new();
        for t in twins.iter().take(clients).step_by(PROBE_EVERY) {
            subs.push(
                js.client()
                    .subscribe(format!("twins.events.*.{}.>", t.id))
                    .await?,
            );
        }
        let mut sub = futures::stream::select_all(subs);
        let at_broker = at_broker.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let now = chrono::Utc::now();
                if let Ok(Stamped { time }) = serde_json::from_slice::<Stamped>(&m.payload) {
                    let ms = (now - time).num_microseconds().unwrap_or_default() as f64 / 1000.0;
                    if let Ok(mut l) = at_broker.lock() {
                        l.push((time, ms));
                    }
                }
            }
        })
    };
    let seconds = o.seconds.max(10);
    // The run at full speed leaves events in the outbox: the paced run starts once the
    // relay has put them all on the stream, so that its events do not queue behind them.
    if !o.synthetic {
        eprintln!("events: waiting for the outbox to be relayed");
        svc.wait_outbox_empty(&http, Duration::from_secs(300))
            .await?;
    }
    let paced_from = chrono::Utc::now();
    let mut published_at = Vec::new();
    let (half, sent) = match without {
        Some(rate) => {
            // Half the maximum measured just now, unless `--rate` names the rate.
            let half = o.rate.unwrap_or(rate / 2.0);
            let n = (half * seconds as f64) as usize;
            eprintln!("events: ingest of {n} messages at {half:.0} msg/s with {clients} clients");
            let run =
                ingest_through(&svcs, &db, &js, &twins[..clients], n, stored, Some(half)).await?;
            stored += run.created;
            published_at = run.published_at;
            (half, n)
        }
        None => {
            let rate = 5_000.0;
            eprintln!("events: {rate:.0} synthetic events/s for {seconds} s to {clients} clients");
            (
                rate,
                synthetic_events(&js, &twins[..clients], rate, seconds).await?,
            )
        }
    };
    // Every change of the paced run is one event for one client (messages folded into
    // one state write are one change, so there are at most `sent`): wait until all are
    // relayed and then until no more arrive for a second (at most 30 s more), and keep
    // the latencies of that run only.
    let deadline = Instant::now() + Duration::from_secs(30);
    let paced = |l: &Latencies| -> Res<usize> {
        let l = l.lock().map_err(|_| "poisoned")?;
        Ok(l.iter().filter(|(time, _)| *time >= paced_from).count())
    };
    if !o.synthetic {
        svc.wait_outbox_empty(&http, Duration::from_secs(30))
            .await?;
    }
    let mut seen = (paced(&latencies)?, Instant::now());
    while seen.0 < sent && seen.1.elapsed() < Duration::from_secs(1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = paced(&latencies)?;
        if now != seen.0 {
            seen = (now, Instant::now());
        }
    }
    // Only the events of changes made during the paced run.
    let mut lat: Vec<f64> = std::mem::take(&mut *latencies.lock().map_err(|_| "poisoned")?)
        .into_iter()
        .filter(|(time, _)| *time >= paced_from)
        .map(|(_, ms)| ms)
        .collect();
    probe.abort();
    // From the publish of the message whose value an event's state holds to the
    // event's arrival: the way through ingestion too, which commit to client leaves out.
    let mut end_to_end: Vec<f64> = std::mem::take(&mut *arrivals.lock().map_err(|_| "poisoned")?)
        .into_iter()
        .filter(|(time, _, _)| *time >= paced_from)
        .filter_map(|(_, value, arrived)| {
            let published = published_at.get(usize::try_from(value?).ok()?)?;
            Some(arrived.saturating_duration_since(*published).as_secs_f64() * 1000.0)
        })
        .collect();
    end_to_end.sort_by(f64::total_cmp);
    let mut broker_lat: Vec<f64> = std::mem::take(&mut *at_broker.lock().map_err(|_| "poisoned")?)
        .into_iter()
        .filter(|(time, _)| *time >= paced_from)
        .map(|(_, ms)| ms)
        .collect();
    broker_lat.sort_by(f64::total_cmp);
    let with = if o.synthetic {
        None
    } else {
        eprintln!("events: ingest of {messages} messages with {clients} SSE clients");
        let run =
            ingest_through(&svcs, &db, &js, &twins[..clients], messages, stored, None).await?;
        stored += run.created;
        eprintln!("  {:.0} msg/s", run.rate);
        Some(run.rate)
    };
    let _ = stop.send(true);
    for task in tasks {
        if let Ok(Err(e)) = task.await {
            eprintln!("  an SSE client failed: {e}");
        }
    }
    // The same run once more without clients, on a store as full as the run with them.
    let after = if o.synthetic {
        None
    } else {
        eprintln!("events: ingest of {messages} messages after the SSE clients left");
        let run =
            ingest_through(&svcs, &db, &js, &twins[..clients], messages, stored, None).await?;
        eprintln!("  {:.0} msg/s", run.rate);
        Some(run.rate)
    };
    lat.sort_by(f64::total_cmp);
    if lat.is_empty() {
        eprintln!("events: no event reached a client (is the relay of committed changes running?)");
    } else {
        eprintln!(
            "  {} events delivered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    for (what, sorted) in [
        ("at the broker", &broker_lat),
        ("from the message's publish", &end_to_end),
    ] {
        if !sorted.is_empty() {
            eprintln!(
                "  {what}: {} events, p50 {:.1} ms, p99 {:.1} ms",
                sorted.len(),
                percentile(sorted, 0.5),
                percentile(sorted, 0.99)
            );
        }
    }
    let ms = |p: f64| (!lat.is_empty()).then(|| round(percentile(&lat, p)));
    let at_broker_ms = |p: f64| (!broker_lat.is_empty()).then(|| round(percentile(&broker_lat, p)));
    let end_to_end_ms =
        |p: f64| (!end_to_end.is_empty()).then(|| round(percentile(&end_to_end, p)));
    Ok(json!({
        "scenario": "events",
        "db": db.kind(),
        "clients": clients,
        "synthetic": o.synthetic,
        "rate_during_latency_run": half.round(),
        "changes_during_latency_run": sent,
        "events_delivered": lat.len(),
        "commit_to_client_p50_ms": ms(0.5),
        "commit_to_client_p99_ms": ms(0.99),
        "commit_to_client_max_ms": lat.last().map(|m| round(*m)),
        "commit_to_broker_p50_ms": at_broker_ms(0.5),
        "commit_to_broker_p99_ms": at_broker_ms(0.99),
        "publish_to_client_p50_ms": end_to_end_ms(0.5),
        "publish_to_client_p99_ms": end_to_end_ms(0.99),
        "ingest_messages_per_second_without_clients": without.map(f64::round),
        "ingest_messages_per_second_with_clients": with.map(f64::round),
        "ingest_messages_per_second_after_clients": after.map(f64::round),
        "ingest_ratio_with_to_after": with.zip(after).map(|(w, a)| round(w / a)),
        "service_rss_peak_mib": round(svc.rss_peak_kib() as f64 / 1024.0),
    }))
}

/// The events benchmark measures commit to broker on one twin in this many.
const PROBE_EVERY: usize = 20;

fn standalone() -> Vec<(&'static str, String)> {
    vec![
        ("MG_TWINS_STANDALONE_ID", "bench".into()),
        ("MG_TWINS_STANDALONE_TOKEN", "bench".into()),
    ]
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
        "all" => vec!["ingest", "ingest-growth", "api", "history", "events"],
        s => vec![s],
    };
    for s in scenarios {
        let result = match s {
            "ingest" => scenario_ingest(&opts).await,
            "ingest-latency" => scenario_ingest_latency(&opts).await,
            "memory" => scenario_memory(&opts).await,
            "ingest-growth" => scenario_growth(&opts).await,
            "api" => scenario_api(&opts).await,
            "history" => scenario_history(&opts).await,
            "events" => scenario_events(&opts).await,
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
