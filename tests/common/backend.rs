//! The store backends a test runs on, and the databases it creates on them.
//!
//! A test is written once and run per backend by [`backend_matrix!`](crate::backend_matrix)
//! (or a suite's own macro calling [`run`]): the backend is a task-local of the test, and
//! whatever starts an application or opens a store asks [`database_url`] for a database
//! of the test's own. SQLite is always there; MongoDB and PostgreSQL run when their URL
//! variable is set and then must answer: a suite that was asked for fails rather than
//! passing unseen. Without the variable, each such test passes at once and the test
//! binary prints one line saying so (`scripts/test` sets them all). Every database a test created is dropped when it ends, pass or fail,
//! once the applications it started have stopped writing.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinHandle;
use twins::store::Store;

/// A standalone MongoDB-compatible server (`mongodb://host:port`).
pub const MONGODB_URL_VAR: &str = "TWINS_TEST_MONGODB_URL";
/// A replica set (`mongodb://host:port/?replicaSet=name`): transactions and change
/// streams exist there only.
pub const MONGODB_RS_URL_VAR: &str = "TWINS_TEST_MONGODB_RS_URL";

/// A PostgreSQL server (`postgres://user@host:port/db`) on which each test creates a
/// database of its own (the URL's user needs CREATEDB) and drops it afterwards.
pub const POSTGRES_URL_VAR: &str = "TWINS_TEST_POSTGRES_URL";

/// How long a test waits for its server before failing.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for its stopping applications before dropping their databases.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MongoDb,
    MongoDbReplicaSet,
    Postgres,
}

impl Backend {
    /// The variable naming the server, for backends that need one.
    fn url_var(self) -> Option<&'static str> {
        match self {
            Self::Sqlite => None,
            Self::MongoDb => Some(MONGODB_URL_VAR),
            Self::MongoDbReplicaSet => Some(MONGODB_RS_URL_VAR),
            Self::Postgres => Some(POSTGRES_URL_VAR),
        }
    }
}

/// The server of a backend that has one, as the running test reaches it.
enum Server {
    /// Its URL and a client.
    MongoDb(String, mongodb::Client),
    /// Its URL (each database is created and dropped over a connection of its own).
    Postgres(String),
}

/// What the running test has on its backend.
struct Scope {
    /// None on SQLite.
    server: Option<Server>,
    databases: Mutex<Vec<String>>,
    stopping: Mutex<Vec<JoinHandle<()>>>,
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// Runs `test` on `backend`: skipped when the backend's server was not asked for, failed
/// when it was and does not answer, and followed by dropping every database it created.
pub async fn run(backend: Backend, test: impl Future<Output = ()>) {
    let server = match backend.url_var() {
        None => None,
        Some(var) => match std::env::var(var).ok().filter(|v| !v.is_empty()) {
            Some(base) if backend == Backend::Postgres => {
                reach_postgres(var, &base).await;
                Some(Server::Postgres(base))
            }
            Some(base) => Some(Server::MongoDb(base.clone(), reach(var, &base).await)),
            None => {
                skipped(backend, var);
                return;
            }
        },
    };
    let scope = Arc::new(Scope {
        server,
        databases: Mutex::default(),
        stopping: Mutex::default(),
    });
    let outcome = AssertUnwindSafe(SCOPE.scope(scope.clone(), test))
        .catch_unwind()
        .await;
    let cleaned = scope.clean_up().await;
    match (outcome, cleaned) {
        (Err(panic), cleaned) => {
            // The test's own failure comes first; a clean-up that failed after it
            // (a server that died, say) is only reported beside it.
            if let Err(e) = cleaned {
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "after the failure: {e}");
            }
            std::panic::resume_unwind(panic);
        }
        (Ok(()), Err(e)) => panic!("{e}"),
        (Ok(()), Ok(())) => {}
    }
}

/// A client of the server at `base`, failing the test with a clear message when none
/// answers there.
async fn reach(var: &str, base: &str) -> mongodb::Client {
    let failed = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{var}={base} asks for the MongoDB tests, but no server answers there: {e}. \
             Start one (scripts/test does) or unset {var} to skip them."
        )
    };
    let mut options = match mongodb::options::ClientOptions::parse(base).await {
        Ok(o) => o,
        Err(e) => failed(&e),
    };
    options.server_selection_timeout = Some(REACH_TIMEOUT);
    let client = match mongodb::Client::with_options(options) {
        Ok(c) => c,
        Err(e) => failed(&e),
    };
    if let Err(e) = client
        .database("admin")
        .run_command(bson::doc! { "ping": 1 })
        .await
    {
        failed(&e);
    }
    client
}

/// Fails the test with a clear message when no PostgreSQL server answers at `base`.
async fn reach_postgres(var: &str, base: &str) {
    let connected = tokio::time::timeout(REACH_TIMEOUT, sqlx::PgPool::connect(base)).await;
    match connected {
        Ok(Ok(pool)) => pool.close().await,
        Ok(Err(e)) => panic!(
            "{var}={base} asks for the PostgreSQL tests, but no server answers there: {e}. \
             Start one (scripts/test needs it) or unset {var} to skip them."
        ),
        Err(_) => panic!("{var}={base}: no PostgreSQL answer within {REACH_TIMEOUT:?}"),
    }
}

/// Runs one statement on the server at `base`, on a thread and runtime of its own so
/// that synchronous code (a database name asked for while a test is set up) can wait
/// for it.
fn postgres_admin(base: &str, statement: String) -> Result<(), String> {
    let base = base.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(&base)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            conn.close().await.map_err(|e| e.to_string())
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL admin thread panicked".to_owned())?
}

/// Says once per test binary and backend that its tests did not run.
fn skipped(backend: Backend, var: &str) {
    static ONCE: [Once; 3] = [Once::new(), Once::new(), Once::new()];
    let (index, what) = match backend {
        Backend::Postgres => (2, "PostgreSQL"),
        Backend::MongoDbReplicaSet => (1, "MongoDB"),
        _ => (0, "MongoDB"),
    };
    ONCE[index].call_once(|| {
        use std::io::Write as _;
        // Straight to stderr: the harness swallows the output of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "{what} tests skipped: {var} is not set (scripts/test sets it)"
        );
    });
}

impl Scope {
    async fn clean_up(&self) -> Result<(), String> {
        let stopping: Vec<_> = self
            .stopping
            .lock()
            .expect("scope lock")
            .drain(..)
            .collect();
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        for task in stopping {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        let names: Vec<_> = self
            .databases
            .lock()
            .expect("scope lock")
            .drain(..)
            .collect();
        let mut failed = Vec::new();
        for name in names {
            let dropped = match &self.server {
                None => Ok(()),
                Some(Server::MongoDb(_, client)) => client
                    .database(&name)
                    .drop()
                    .await
                    .map_err(|e| e.to_string()),
                Some(Server::Postgres(base)) => {
                    let base = base.clone();
                    tokio::task::spawn_blocking(move || {
                        postgres_admin(
                            &base,
                            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                        )
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                }
            };
            if let Err(e) = dropped {
                failed.push(format!("a test database was not dropped: {e}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// A fresh database name, dropped when the test ends.
    fn new_name(&self) -> String {
        let name = format!("twins_test_{}", uuid::Uuid::new_v4().simple());
        self.databases
            .lock()
            .expect("scope lock")
            .push(name.clone());
        name
    }

    /// A database of the test's own on its server: its URL. None on SQLite.
    fn new_database_url(&self) -> Option<String> {
        match self.server.as_ref()? {
            Server::MongoDb(base, _) => Some(with_database(base, &self.new_name())),
            Server::Postgres(base) => {
                let name = self.new_name();
                if let Err(e) = postgres_admin(base, format!("CREATE DATABASE \"{name}\"")) {
                    panic!("cannot create the test database {name} on {base}: {e}");
                }
                Some(with_database(base, &name))
            }
        }
    }

    /// A MongoDB database with a fresh name, dropped when the test ends: its URL and a
    /// handle on it. None on other backends.
    fn new_mongodb_database(&self) -> Option<(String, mongodb::Database)> {
        let Some(Server::MongoDb(base, client)) = &self.server else {
            return None;
        };
        let name = self.new_name();
        Some((with_database(base, &name), client.database(&name)))
    }
}

/// A database of the test's own on its backend: a SQLite file in `dir`, or a MongoDB
/// or PostgreSQL database with a fresh name, dropped when the test ends.
pub fn database_url(dir: &Path) -> String {
    SCOPE
        .try_with(|s| s.new_database_url())
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("sqlite://{}/twins.db", dir.display()))
}

/// A MongoDB database of the test's own, dropped when the test ends: its URL, and a handle
/// for reading and writing behind the service's back. Only in MongoDB tests.
pub fn mongodb_database() -> (String, mongodb::Database) {
    SCOPE
        .try_with(|s| s.new_mongodb_database())
        .ok()
        .flatten()
        .expect("a MongoDB test (backend::run with a MongoDB backend)")
}

/// The address of the test's MongoDB server (its first host).
pub fn mongodb_address() -> String {
    let base = SCOPE
        .try_with(|s| match &s.server {
            Some(Server::MongoDb(base, _)) => Some(base.clone()),
            _ => None,
        })
        .ok()
        .flatten()
        .expect("a MongoDB test (backend::run with a MongoDB backend)");
    server_address(&base)
}

/// The `host:port` of a database URL's (first) server, the port defaulted by scheme.
pub fn server_address(url: &str) -> String {
    let default_port = if url.starts_with("postgres") {
        5432
    } else {
        27017
    };
    let hosts = url.split_once("://").map_or(url, |(_, rest)| rest);
    let hosts = hosts.split(['/', '?']).next().unwrap_or(hosts);
    let first = hosts.split(',').next().unwrap_or(hosts);
    let host = first.rsplit_once('@').map_or(first, |(_, host)| host);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// Opens a store on a database of the test's own.
pub async fn store(dir: &Path) -> Store {
    let url = database_url(dir);
    Store::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot open the store at {url}: {e}"))
}

/// Lets the test's clean-up wait for `task` (an application stopping) before dropping
/// the databases it writes to. Outside [`run`] the task is left to itself.
pub fn track(task: JoinHandle<()>) {
    let _ = SCOPE.try_with(|s| s.stopping.lock().expect("scope lock").push(task));
}

/// `url` with its database (the path) replaced by `name`, options kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("a mongodb:// or postgres:// URL");
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let hosts = before_query.split('/').next().unwrap_or(before_query);
    format!("{scheme}://{hosts}/{name}{query}")
}

/// Turns a list of `async fn()` tests into one test per backend: `sqlite::<name>`,
/// `mongodb::<name>` and `postgres::<name>`; `replica_set: ...` adds
/// `mongodb_replica_set::<name>`, and `only_mongodb: ...` makes `mongodb::<name>` alone.
#[macro_export]
macro_rules! backend_matrix {
    (@module $module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $test() {
                    $crate::common::backend::run(
                        $crate::common::backend::Backend::$backend,
                        super::$test(),
                    )
                    .await;
                }
            )*
        }
    };
    (only_mongodb: $($test:ident),* $(,)?) => {
        $crate::backend_matrix!(@module mongodb, MongoDb, $($test),*);
    };
    (replica_set: $($test:ident),* $(,)?) => {
        $crate::backend_matrix!($($test),*);
        $crate::backend_matrix!(@module mongodb_replica_set, MongoDbReplicaSet, $($test),*);
    };
    ($($test:ident),* $(,)?) => {
        $crate::backend_matrix!(@module sqlite, Sqlite, $($test),*);
        $crate::backend_matrix!(@module mongodb, MongoDb, $($test),*);
        $crate::backend_matrix!(@module postgres, Postgres, $($test),*);
    };
}
