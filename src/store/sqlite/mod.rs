//! Embedded SQLite backend (the default): one file, WAL mode, no server to run.
//!
//! Writes go through a single-connection pool so they queue in the process instead of
//! failing on SQLite's single-writer lock; reads use a separate pool and proceed in
//! parallel with writes thanks to WAL.
//!
//! Writes manage their transactions themselves ([`WriteTx`]) rather than through sqlx's
//! transaction type: after an error SQLite may roll a transaction back on its own (a full
//! disk, an I/O error) and sqlx's bookkeeping can then disagree with the connection, so
//! that later writes nest inside a transaction that is never committed. A transaction
//! that does not end in a commit or a clean rollback closes the writer connection; the
//! pool opens a fresh one, known to be outside any transaction.

mod checkpoint;
mod group;
mod ingest;
mod transfer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

use super::sql::{self, Columns};
use super::{
    DocumentRepository, DocumentWrite, HealthCheck, OutboxEntry, OutboxEvent, OutboxRepository,
    Recorded, StateRepository, StoreError, StoreResult, TwinFilter, TwinRepository, Versioned,
};
use crate::domain::document::{Document, DocumentSummary, VersionSummary};
use crate::domain::history::{Summary, Window};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::time::{from_nanos, to_nanos};
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};
use crate::domain::{Page, PageRequest};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS twins (
        id TEXT PRIMARY KEY NOT NULL,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        revision INTEGER NOT NULL,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        definitions TEXT NOT NULL,
        metadata TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS twins_owner ON twins (owner)",
    "CREATE INDEX IF NOT EXISTS twins_owner_name ON twins (owner, name)",
    // The attributes of each twin's current definition, for ingestion's lookup by
    // channel and subtopic.
    "CREATE TABLE IF NOT EXISTS twin_attributes (
        twin_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        subtopic TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS twin_attributes_channel ON twin_attributes (channel, subtopic)",
    "CREATE INDEX IF NOT EXISTS twin_attributes_twin ON twin_attributes (twin_id)",
    // The attributes follow the definitions inside the statement that writes them: no
    // statement of its own per write (each is a hop to the connection's thread), and
    // none at all when an update leaves the definitions as they were. Definitions that
    // are not JSON (written behind the service's back) leave the attributes as they
    // were rather than fail the write; reading such a twin is an internal error.
    // (Triggers of the same job without the JSON check, from a development version.)
    "DROP TRIGGER IF EXISTS twin_attributes_of_new_twin",
    "DROP TRIGGER IF EXISTS twin_attributes_of_new_definition",
    "CREATE TRIGGER IF NOT EXISTS twin_attributes_on_insert AFTER INSERT ON twins
    WHEN json_valid(new.definitions) BEGIN
        INSERT INTO twin_attributes (twin_id, channel, subtopic)
        SELECT new.id, json_extract(a.value, '$.channel'),
            coalesce(json_extract(a.value, '$.subtopic'), '')
        FROM json_each(new.definitions, '$[#-1].attributes') AS a;
    END",
    "CREATE TRIGGER IF NOT EXISTS twin_attributes_on_update AFTER UPDATE OF definitions ON twins
    WHEN old.definitions IS NOT new.definitions AND json_valid(new.definitions) BEGIN
        DELETE FROM twin_attributes WHERE twin_id = new.id;
        INSERT INTO twin_attributes (twin_id, channel, subtopic)
        SELECT new.id, json_extract(a.value, '$.channel'),
            coalesce(json_extract(a.value, '$.subtopic'), '')
        FROM json_each(new.definitions, '$[#-1].attributes') AS a;
    END",
    "CREATE TABLE IF NOT EXISTS states (
        twin_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        definition INTEGER NOT NULL,
        created INTEGER NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (twin_id, id)
    ) WITHOUT ROWID",
    // History in time order (ranges, the state at an instant, summaries). Entries of an
    // index on a table without rowid end with its primary key, so this index is
    // (twin_id, created, id): history order itself.
    "CREATE INDEX IF NOT EXISTS states_created ON states (twin_id, created)",
    // Stream sequence of the last message applied per twin, so redelivered messages
    // never create a second state.
    "CREATE TABLE IF NOT EXISTS documents (
        twin_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (twin_id, name)
    ) WITHOUT ROWID",
    // document_revisions: see REVISIONS_TABLE.
    "CREATE TABLE IF NOT EXISTS ingest_cursors (
        twin_id TEXT PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID",
    // Per instance group: the stream sequence of the last message applied, and the
    // lease of the one instance allowed to move it (until = Unix ns).
    "CREATE TABLE IF NOT EXISTS ingest_groups (
        grp TEXT PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL,
        holder TEXT NOT NULL,
        until INTEGER NOT NULL
    ) WITHOUT ROWID",
    // Change events recorded with the writes that made them, until the relay has put
    // them on the stream; AUTOINCREMENT keeps ids increasing after the table empties.
    "CREATE TABLE IF NOT EXISTS feed_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        msg_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        payload TEXT NOT NULL
    )",
    // One row rewritten by the health check after a failed write, to learn whether
    // writes succeed again (a read succeeds on a full disk).
    "CREATE TABLE IF NOT EXISTS health_probe (id INTEGER PRIMARY KEY, at INTEGER NOT NULL)",
];

/// Revisions of each document, the current version included, the newest `keep + 1` kept.
/// Every query of it runs along the primary key.
const REVISIONS_TABLE: &str = "CREATE TABLE document_revisions (
    twin_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    data TEXT NOT NULL,
    op TEXT NOT NULL,
    by_kind TEXT NOT NULL,
    by_id TEXT NOT NULL,
    PRIMARY KEY (twin_id, name, version)
) WITHOUT ROWID";

/// Run with [`REVISIONS_TABLE`], in a database that may have documents: a document
/// written before revisions were kept starts its history at its current version, whose
/// writer is unknown and recorded as the service.
const START_HISTORIES: &str = "INSERT INTO document_revisions
    (twin_id, name, version, updated, data, op, by_kind, by_id)
    SELECT twin_id, name, version, updated, data,
        CASE WHEN version = 1 THEN 'create' ELSE 'put' END, 'service', ''
    FROM documents";

/// Per twin, the greatest id of a state created before the state before it: while it
/// is at or before the first kept state, the twin's history is in time order and a
/// window of it is a run of ids ([`sql::WindowShape`]). Twins always in order have no row.
const STATE_BREAKS_TABLE: &str = "CREATE TABLE state_breaks (
    twin_id TEXT PRIMARY KEY NOT NULL,
    last_break INTEGER NOT NULL
) WITHOUT ROWID";

/// [0]: records a break; [1]: finds those of a run of ids (see [`sql::state_breaks`]).
const STATE_BREAKS: [&str; 2] = sql::state_breaks!("max");

/// Both pools over one database file.
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
    /// Set when a write transaction failed, cleared by the next commit: the health
    /// check then tries a write instead of trusting a read.
    write_failed: Arc<AtomicBool>,
    /// The writes of the API, made in groups on the writer connection.
    group: group::Group,
    /// Where ingestion steps hand over the outbox entries they committed.
    recorded: Recorded,
    /// Checkpoints the WAL in the background while the store lives.
    _checkpointer: checkpoint::Checkpointer,
    /// The database file, whose filesystem the health check measures.
    path: PathBuf,
}

/// An explicit transaction on the writer connection (see the module docs).
struct WriteTx {
    conn: PoolConnection<Sqlite>,
    done: bool,
    write_failed: Arc<AtomicBool>,
}

impl WriteTx {
    /// Starts a write transaction on `conn`, the writer connection, taking SQLite's
    /// write lock.
    async fn begin(
        conn: PoolConnection<Sqlite>,
        write_failed: Arc<AtomicBool>,
    ) -> StoreResult<Self> {
        let mut tx = WriteTx {
            conn,
            done: false,
            write_failed,
        };
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        Ok(tx)
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    async fn commit(mut self) -> StoreResult<()> {
        sqlx::raw_sql("COMMIT")
            .execute(&mut *self.conn)
            .await
            .map_err(map_err)?;
        self.done = true;
        self.write_failed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the transaction without writing anything (a condition did not hold).
    async fn rollback(mut self) -> StoreResult<()> {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *self.conn)
            .await
            .map_err(map_err)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.done {
            // An error ended this transaction: whatever state SQLite left the
            // connection in, the next write gets a fresh one.
            self.conn.close_on_drop();
            self.write_failed.store(true, Ordering::Relaxed);
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    pub async fn open(path: &str) -> StoreResult<Self> {
        if path.is_empty() {
            return Err(StoreError::Internal("empty SQLite path".into()));
        }
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()).into())
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(map_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .pragma("cache_size", "-16384")
            // Statement journals (a multi-row statement's undo, within its
            // transaction) in memory, not in temporary files: the batch statements
            // write one page copy per page they touch. Commits are unaffected.
            .pragma("temp_store", "MEMORY")
            // The writer checkpoints once the WAL holds ~32 MiB rather than 4 MiB,
            // after which the WAL starts again from its beginning; by then the
            // background checkpoints (see `checkpoint`) have copied all but its last
            // commits.
            .pragma("wal_autocheckpoint", "8192")
            .pragma("journal_size_limit", "67108864");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| Box::pin(stable_plans(conn)))
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&writer).await.map_err(map_err)?;
        }
        Self::add_table(
            &writer,
            "document_revisions",
            &[REVISIONS_TABLE, START_HISTORIES],
        )
        .await?;
        Self::add_table(
            &writer,
            "state_breaks",
            &[STATE_BREAKS_TABLE, sql::START_STATE_BREAKS],
        )
        .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| Box::pin(stable_plans(conn)))
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(map_err)?;
        let write_failed = Arc::<AtomicBool>::default();
        let group = group::Group::start(writer.clone(), write_failed.clone());
        let checkpointer = checkpoint::Checkpointer::start(options, checkpoint::EVERY).await?;
        Ok(Self {
            reader,
            writer,
            write_failed,
            group,
            recorded: Recorded::default(),
            _checkpointer: checkpointer,
            path: PathBuf::from(path),
        })
    }

    /// Where the store hands over the outbox entries of its ingestion steps once they
    /// committed (see [`Recorded`]): the [`super::Store`] over it rings the same.
    pub fn recorded(&self) -> Recorded {
        self.recorded.clone()
    }

    /// Creates the table `name` where it is missing with `statements` (its creation and
    /// the rows it starts with, derived from older tables), in one transaction under the
    /// write lock: no crash leaves the table without them, and of two processes opening
    /// the file only one creates it.
    async fn add_table(writer: &SqlitePool, name: &str, statements: &[&str]) -> StoreResult<()> {
        let mut conn = writer.acquire().await.map_err(map_err)?;
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = $1)")
                .bind(name)
                .fetch_one(&mut *conn)
                .await
                .map_err(map_err)?;
        if !exists {
            for stmt in statements {
                sqlx::query(sqlx::AssertSqlSafe(*stmt))
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err)?;
            }
        }
        sqlx::raw_sql("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// Starts a write transaction on the writer connection, taking SQLite's write lock.
    async fn begin(&self) -> StoreResult<WriteTx> {
        let conn = self.writer.acquire().await.map_err(map_err)?;
        WriteTx::begin(conn, self.write_failed.clone()).await
    }
}

impl SqliteStore {
    /// Records `events` in the outbox inside `tx`, in their order.
    async fn record<'a>(
        conn: &mut SqliteConnection,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
    ) -> StoreResult<()> {
        Self::record_entries(conn, events, None).await.map(|_| ())
    }

    /// Records `events` in the outbox, each stamped with `at` when given, and returns
    /// their entries as stored, in id order. One statement inserts them in the order
    /// given, each with the table's next AUTOINCREMENT id, so their ids are the last
    /// one's and those just below it.
    async fn record_entries<'a>(
        conn: &mut SqliteConnection,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
        at: Option<DateTime<Utc>>,
    ) -> StoreResult<Vec<OutboxEntry>> {
        let events: Vec<&OutboxEvent> = events.into_iter().collect();
        let (ids, owners, payloads) = sql::outbox_columns(events.iter().copied(), at)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(&str, &str, &str)> = ids
            .into_iter()
            .zip(owners)
            .zip(payloads.iter().map(String::as_str))
            .map(|((i, o), p)| (i, o, p))
            .collect();
        let done = sqlx::query(
            "INSERT INTO feed_outbox (msg_id, owner, payload)
             SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                json_extract(value, '$[2]')
             FROM json_each(?) ORDER BY key",
        )
        .bind(to_json(&rows)?)
        .execute(conn)
        .await
        .map_err(map_err)?;
        let n = events.len() as i64;
        if done.rows_affected() != events.len() as u64 {
            return Err(StoreError::Internal(
                format!(
                    "{} outbox rows written for {n} events",
                    done.rows_affected()
                )
                .into(),
            ));
        }
        let first = done.last_insert_rowid() - n + 1;
        Ok(events
            .into_iter()
            .zip(payloads)
            .zip(first..)
            .map(|((e, payload), id)| OutboxEntry {
                id,
                msg_id: e.msg_id.clone(),
                owner: e.owner.clone(),
                twin_id: e.event.twin_id.clone(),
                kind: e.event.kind,
                time: at.unwrap_or(e.event.time),
                payload,
            })
            .collect())
    }
}

#[async_trait]
impl OutboxRepository for SqliteStore {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(sql::PENDING_EVENTS)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::outbox_from_row).collect()
    }

    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(sql::PENDING_EVENTS_AFTER)
            .bind(after)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::outbox_from_row).collect()
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = to_json(&ids)?;
        self.group
            .write(move |conn| {
                let ids = ids.clone();
                Box::pin(async move {
                    sqlx::query(
                        "DELETE FROM feed_outbox WHERE id IN (SELECT value FROM json_each(?))",
                    )
                    .bind(ids)
                    .execute(conn)
                    .await
                    .map_err(map_err)?;
                    Ok(())
                })
            })
            .await
    }

    async fn backlog(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(sql::OUTBOX_BACKLOG)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(sql::seq_of(n))
    }
}

/// Turns on SQLite's query planner stability guarantee for the connection
/// (`SQLITE_DBCONFIG_ENABLE_QPSG`): a statement keeps the plan it was prepared with.
/// Without it, the SQLite that sqlx builds (with `SQLITE_ENABLE_STAT4`) prepares a
/// cached statement again at its first step after new values are bound whenever a
/// value might change the plan: a `LIMIT ?`, a parameter compared with another in
/// `?2 IS NULL OR name = ?2`, an indexed column once `ANALYZE` has run. That is every
/// execution of the list and states-page statements: 10% and 6% of their time in
/// `sqlite3Reprepare` (BENCHMARKS.md, "A flame graph per endpoint"). Their plans do not
/// depend on those values.
async fn stable_plans(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is the connection's open handle, and the lock keeps sqlx's worker
    // from using it during the call. The call takes an int to set and a pointer for
    // the value read back, which may be null.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::os::raw::c_int,
            std::ptr::null_mut::<std::os::raw::c_int>(),
        )
    };
    if rc == libsqlite3_sys::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Configuration(
            format!("SQLite refused the query planner stability setting (code {rc})").into(),
        ))
    }
}

/// Maps sqlx errors onto the store's error kinds ([`sql::map_err`]).
fn map_err(e: sqlx::Error) -> StoreError {
    sql::map_err(e, is_transient_code)
}

/// SQLite result codes after which the same write can succeed later: another writer
/// holds the database (BUSY 5, LOCKED 6), the file cannot be written now (READONLY 8,
/// IOERR 10, FULL 13, CANTOPEN 14). Extended codes carry the primary code in their
/// low byte.
fn is_transient_code(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 8 | 10 | 13 | 14))
}

fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Internal(e.into()))
}

fn from_json<T: serde::de::DeserializeOwned>(raw: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(raw)
        .map_err(|e| StoreError::Internal(format!("corrupt {what}: {e}").into()))
}

impl Columns for SqliteRow {
    fn text(&self, column: &str) -> StoreResult<String> {
        self.try_get(column)
            .map_err(|e| StoreError::Internal(e.into()))
    }

    fn int(&self, column: &str) -> StoreResult<i64> {
        self.try_get(column)
            .map_err(|e| StoreError::Internal(e.into()))
    }

    fn float(&self, column: &str) -> StoreResult<Option<f64>> {
        self.try_get(column)
            .map_err(|e| StoreError::Internal(e.into()))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, column: &str, what: &str) -> StoreResult<T> {
        from_json(&self.text(column)?, what)
    }
}

// Owner, optional exact name (?2) and optional metadata object (?3) whose top-level keys
// must all be present with equal values (integers and reals compare numerically).
const LIST_FILTER: &str = "owner = ?1
    AND (?2 IS NULL OR name = ?2)
    AND (?3 IS NULL OR NOT EXISTS (
        SELECT 1 FROM json_each(?3) AS f WHERE NOT EXISTS (
            SELECT 1 FROM json_each(twins.metadata) AS m
            WHERE m.key = f.key AND m.value IS f.value
              AND (m.type = f.type OR (m.type IN ('integer', 'real') AND f.type IN ('integer', 'real')))
        )
    ))";

/// A twin write's inputs, owned by its queued write (which may run more than once).
struct TwinWrite {
    twin: Twin,
    definitions: String,
    metadata: String,
    events: Vec<OutboxEvent>,
}

impl TwinWrite {
    fn of(twin: &Twin, events: &[OutboxEvent]) -> StoreResult<Self> {
        Ok(Self {
            twin: twin.clone(),
            definitions: to_json(&twin.definitions)?,
            metadata: to_json(&twin.metadata)?,
            events: events.to_vec(),
        })
    }
}

/// A document write's inputs, as [`TwinWrite`].
struct DocWrite {
    twin_id: String,
    name: String,
    version: i64,
    updated: i64,
    data: String,
    expected: Option<i64>,
    op: &'static str,
    by_kind: String,
    by_id: String,
    oldest_kept: i64,
    events: Vec<OutboxEvent>,
}

#[async_trait]
impl TwinRepository for SqliteStore {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        let write = Arc::new(TwinWrite::of(twin, events)?);
        self.group
            .write(move |conn| {
                let w = write.clone();
                Box::pin(async move {
                    let twin = &w.twin;
                    sqlx::query(sql::INSERT_TWIN)
                        .bind(&twin.id)
                        .bind(&twin.owner)
                        .bind(&twin.name)
                        .bind(twin.revision)
                        .bind(to_nanos(&twin.created))
                        .bind(to_nanos(&twin.updated))
                        .bind(&w.definitions)
                        .bind(&w.metadata)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    Self::record(conn, &w.events).await
                })
            })
            .await
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let write = Arc::new(TwinWrite::of(twin, events)?);
        self.group
            .write(move |conn| {
                let w = write.clone();
                Box::pin(async move {
                    let twin = &w.twin;
                    let done = sqlx::query(sql::UPDATE_TWIN)
                        .bind(&twin.name)
                        .bind(twin.revision)
                        .bind(to_nanos(&twin.updated))
                        .bind(&w.definitions)
                        .bind(&w.metadata)
                        .bind(&twin.id)
                        .bind(&twin.owner)
                        .bind(expected_revision)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    if done.rows_affected() == 0 {
                        return Ok(false);
                    }
                    Self::record(conn, &w.events).await?;
                    Ok(true)
                })
            })
            .await
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(sql::SELECT_TWIN)
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::twin_from_row).transpose()
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>> {
        let metadata = filter.metadata.as_ref().map(to_json).transpose()?;
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM twins WHERE {LIST_FILTER}"
        )))
        .bind(owner)
        .bind(filter.name.as_deref())
        .bind(metadata.as_deref())
        .fetch_one(&self.reader)
        .await
        .map_err(map_err)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM twins WHERE {LIST_FILTER} ORDER BY rowid LIMIT ?4 OFFSET ?5",
            sql::TWIN_COLUMNS
        )))
        .bind(owner)
        .bind(filter.name.as_deref())
        .bind(metadata.as_deref())
        .bind(page.limit as i64)
        .bind(page.offset as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        super::page_of(total.max(0) as u64, page, &rows, sql::twin_from_row)
    }

    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let write = Arc::new((owner.to_owned(), id.to_owned(), events.to_vec()));
        self.group
            .write(move |conn| {
                let w = write.clone();
                Box::pin(async move {
                    let (owner, id, events) = &*w;
                    let done = sqlx::query(sql::DELETE_TWIN)
                        .bind(id)
                        .bind(owner)
                        .bind(expected_revision)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    if done.rows_affected() == 0 {
                        return Ok(false);
                    }
                    for stmt in sql::DELETE_TWIN_ROWS {
                        sqlx::query(stmt)
                            .bind(id)
                            .execute(&mut *conn)
                            .await
                            .map_err(map_err)?;
                    }
                    Self::record(conn, events).await?;
                    Ok(true)
                })
            })
            .await
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(sql::IDS_BY_ATTRIBUTE)
            .bind(channel)
            .bind(subtopic)
            .bind(WILDCARD_SUBTOPIC)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(sql::SELECT_ANY_TWIN)
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::twin_from_row).transpose()
    }

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        // Chunks stay within SQLite's limit on bound parameters.
        super::many_in_chunks(ids, |chunk| async move {
            // Only placeholders are spliced in; the ids are bound.
            let sql = format!(
                "SELECT {} FROM twins WHERE id IN ({})",
                sql::TWIN_COLUMNS,
                vec!["?"; chunk.len()].join(",")
            );
            let rows = chunk
                .iter()
                .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, id| q.bind(id))
                .fetch_all(&self.reader)
                .await
                .map_err(map_err)?;
            rows.iter().map(sql::twin_with_id).collect()
        })
        .await
    }
}

#[async_trait]
impl StateRepository for SqliteStore {
    async fn save(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        write_state(&mut tx, &Write::Insert(state.clone())).await?;
        find_breaks(&mut tx, &state.twin_id, state.id, state.id).await?;
        tx.commit().await
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        write_state(&mut tx, &Write::Update(state.clone())).await?;
        tx.commit().await
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        let row = sqlx::query(sql::LATEST_STATE)
            .bind(twin_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::state_from_row).transpose()
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        // State ids are a gap-free run, so the total and the first id of a page come
        // straight from the primary key, however deep the offset.
        let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(sql::STATE_ID_BOUNDS)
            .bind(twin_id)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        let (total, start) = sql::states_span(first, last, page.offset);
        let rows = sqlx::query(sql::STATES_FROM)
            .bind(twin_id)
            .bind(start)
            .bind(page.limit as i64)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        super::page_of(total, page, &rows, sql::state_from_row)
    }

    async fn range(
        &self,
        twin_id: &str,
        window: &Window,
        page: PageRequest,
    ) -> StoreResult<Page<State>> {
        let (from, to) = window.nanos();
        let shape = self.window_shape(twin_id, from, to).await?;
        if let Some((total, run)) = shape.ids() {
            let rows = match sql::WindowShape::page_ids(run, page) {
                Some((start, end)) => sqlx::query(sql::STATES_BETWEEN)
                    .bind(twin_id)
                    .bind(start)
                    .bind(end)
                    .fetch_all(&self.reader)
                    .await
                    .map_err(map_err)?,
                None => Vec::new(),
            };
            return super::page_of(total, page, &rows, sql::state_from_row);
        }
        let total = self.window_count(twin_id, from, to).await?;
        let rows = sqlx::query(sql::RANGE_PAGE)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .bind(sql::to_i64(page.limit))
            .bind(sql::to_i64(page.offset))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        super::page_of(total, page, &rows, sql::state_from_row)
    }

    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>> {
        let row = sqlx::query(sql::STATE_AT)
            .bind(twin_id)
            .bind(to_nanos(at))
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::state_from_row).transpose()
    }

    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary> {
        let (from, to) = window.nanos();
        let shape = self.window_shape(twin_id, from, to).await?;
        if let Some((states, Some(run))) = shape.ids()
            && states >= SLICED_SUMMARY
        {
            let aggregates = self.summary_in_slices(twin_id, run).await?;
            return super::assemble_summary(states, aggregates, |name, created, last| {
                self.value_at(twin_id, name, created, last)
            })
            .await;
        }
        let states = match shape.ids() {
            Some((states, _)) => states,
            None => self.window_count(twin_id, from, to).await?,
        };
        let rows = sqlx::query(SUMMARY)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        let aggregates = rows
            .iter()
            .map(sql::aggregate_from_row)
            .collect::<StoreResult<_>>()?;
        super::assemble_summary(states, aggregates, |name, created, last| {
            self.value_at(twin_id, name, created, last)
        })
        .await
    }

    async fn twin_ids_after(&self, after: &str, limit: usize) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(sql::TWIN_IDS_AFTER)
            .bind(after)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)
    }

    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64> {
        // Read and delete in one write transaction: the latest id cannot move under it.
        let mut tx = self.begin().await?;
        let (_, last): (Option<i64>, Option<i64>) = sqlx::query_as(sql::STATE_ID_BOUNDS)
            .bind(twin_id)
            .fetch_one(tx.conn())
            .await
            .map_err(map_err)?;
        let first: Vec<(i64, i64)> = sqlx::query_as(sql::FIRST_STATES)
            .bind(twin_id)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(tx.conn())
            .await
            .map_err(map_err)?;
        let first: Vec<_> = first
            .into_iter()
            .map(|(id, c)| (id, from_nanos(c)))
            .collect();
        let Some(keep) = last.and_then(|last| super::prune_bound(&first, last, before)) else {
            tx.rollback().await?;
            return Ok(0);
        };
        let done = sqlx::query(sql::DELETE_STATES_BEFORE)
            .bind(twin_id)
            .bind(keep)
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// Twin id, from, to: one row per attribute of the window's states (see
/// [`sql::aggregate_from_row`]). `json_each` types numbers as `integer` or `real`;
/// `json_quote` turns the extremes back into JSON numbers (or `null`).
const SUMMARY: &str = "SELECT j.key AS name, COUNT(*) AS count,
    json_quote(MIN(CASE WHEN j.type IN ('integer', 'real') THEN j.value END)) AS min,
    json_quote(MAX(CASE WHEN j.type IN ('integer', 'real') THEN j.value END)) AS max,
    AVG(CASE WHEN j.type IN ('integer', 'real') THEN j.value END) AS mean,
    MIN(s.created) AS first_created, MAX(s.created) AS last_created
    FROM states AS s, json_each(s.payload) AS j
    WHERE s.twin_id = $1 AND s.created >= $2 AND s.created <= $3
    GROUP BY j.key";

/// Twin id, first id, last id: [`SUMMARY`] of a run of ids, in parts that merge: the
/// sum and number of numeric values instead of their mean. `TOTAL` sums in floating
/// point, as `AVG` does, and never overflows.
const SUMMARY_SLICE: &str = "SELECT j.key AS name, COUNT(*) AS count,
    json_quote(MIN(CASE WHEN j.type IN ('integer', 'real') THEN j.value END)) AS min,
    json_quote(MAX(CASE WHEN j.type IN ('integer', 'real') THEN j.value END)) AS max,
    TOTAL(CASE WHEN j.type IN ('integer', 'real') THEN j.value END) AS sum,
    COUNT(CASE WHEN j.type IN ('integer', 'real') THEN 1 END) AS numbers,
    MIN(s.created) AS first_created, MAX(s.created) AS last_created
    FROM states AS s, json_each(s.payload) AS j
    WHERE s.twin_id = $1 AND s.id >= $2 AND s.id <= $3
    GROUP BY j.key";

/// Windows of a history in time order with at least this many states are summarised
/// in slices of ids read in parallel, each on a reader connection (its own thread).
const SLICED_SUMMARY: u64 = 50_000;

/// A statement of [`VALUE_AT`], in the given order of ids.
macro_rules! value_at {
    ($order:literal) => {
        concat!(
            "SELECT payload FROM states AS s INDEXED BY states_created
            WHERE s.twin_id = $1 AND s.created = $2
              AND EXISTS (SELECT 1 FROM json_each(s.payload) WHERE key = $3)
            ORDER BY ",
            $order,
            " LIMIT 1"
        )
    };
}

/// Twin id, created, attribute: the payload of the first state created then that has the
/// attribute ([0]), or of the last one ([1]); read in id order on the history index
/// (named: the planner would rather walk the twin's states by id).
const VALUE_AT: [&str; 2] = [value_at!("s.id"), value_at!("s.id DESC")];

impl SqliteStore {
    /// Where the window `from..=to` (Unix ns) falls in the twin's history.
    async fn window_shape(
        &self,
        twin_id: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<sql::WindowShape> {
        let row: sql::WindowShapeRow = sqlx::query_as(sql::WINDOW_SHAPE)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(row.into())
    }

    /// The aggregates of the states `run` (first and last id), from slices read in
    /// parallel and merged.
    async fn summary_in_slices(
        &self,
        twin_id: &str,
        (lo, hi): (i64, i64),
    ) -> StoreResult<Vec<super::Aggregate>> {
        let slices = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let size = (hi - lo) / slices as i64 + 1;
        let reads = (0..slices as i64)
            .map(|k| (lo + k * size, hi.min(lo + (k + 1) * size - 1)))
            .filter(|(a, b)| a <= b)
            .map(|(a, b)| {
                sqlx::query(SUMMARY_SLICE)
                    .bind(twin_id)
                    .bind(a)
                    .bind(b)
                    .fetch_all(&self.reader)
            });
        let mut merged = sql::SummaryParts::default();
        for rows in futures::future::try_join_all(reads)
            .await
            .map_err(map_err)?
        {
            for row in &rows {
                merged.add(sql::summary_part_from_row(row)?);
            }
        }
        Ok(merged.into_aggregates())
    }

    /// The number of the twin's states created between `from` and `to` (Unix ns).
    async fn window_count(&self, twin_id: &str, from: i64, to: i64) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(sql::RANGE_COUNT)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(sql::seq_of(n))
    }

    async fn value_at(
        &self,
        twin_id: &str,
        name: String,
        created: i64,
        last: bool,
    ) -> StoreResult<Option<serde_json::Value>> {
        let row = sqlx::query(VALUE_AT[usize::from(last)])
            .bind(twin_id)
            .bind(created)
            .bind(&name)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(row
            .as_ref()
            .map(|r| sql::payload_value(r, &name))
            .transpose()?
            .flatten())
    }
}

/// Records the twin's breaks of time order among its states `first..=last`.
async fn find_breaks(tx: &mut WriteTx, twin_id: &str, first: i64, last: i64) -> StoreResult<()> {
    sqlx::query(STATE_BREAKS[1])
        .bind(twin_id)
        .bind(first)
        .bind(last)
        .execute(tx.conn())
        .await
        .map_err(map_err)?;
    Ok(())
}

async fn write_state(tx: &mut WriteTx, write: &Write) -> StoreResult<()> {
    let (statement, state) = sql::state_write(write);
    sqlx::query(statement)
        .bind(state.definition)
        .bind(to_nanos(&state.created))
        .bind(to_json(&state.payload)?)
        .bind(&state.twin_id)
        .bind(state.id)
        .execute(tx.conn())
        .await
        .map_err(map_err)?;
    Ok(())
}

impl SqliteStore {
    /// The stored version, read inside the transaction that failed to write.
    async fn document_version(
        conn: &mut SqliteConnection,
        twin_id: &str,
        name: &str,
    ) -> StoreResult<Option<i64>> {
        sqlx::query_scalar(sql::DOCUMENT_VERSION)
            .bind(twin_id)
            .bind(name)
            .fetch_optional(conn)
            .await
            .map_err(map_err)
    }
}

#[async_trait]
impl DocumentRepository for SqliteStore {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        let rows = sqlx::query(sql::DOCUMENT_SUMMARIES)
            .bind(twin_id)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::summary_from_row).collect()
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        let row = sqlx::query(sql::SELECT_DOCUMENT)
            .bind(twin_id)
            .bind(name)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::document_from_row).transpose()
    }

    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned> {
        let w = Arc::new(DocWrite {
            twin_id: write.doc.twin_id.clone(),
            name: write.doc.document_name.clone(),
            version: write.doc.version,
            updated: to_nanos(&write.doc.updated),
            data: to_json(&write.doc.data)?,
            expected: write.expected,
            op: write.op.as_str(),
            by_kind: write.by.kind().to_owned(),
            by_id: write.by.id().to_owned(),
            oldest_kept: write.oldest_kept(),
            events: write.events.to_vec(),
        });
        self.group
            .write(move |conn| {
                let w = w.clone();
                Box::pin(async move {
                    let mut query = sqlx::query(sql::document_write(w.expected))
                        .bind(&w.twin_id)
                        .bind(&w.name)
                        .bind(w.version)
                        .bind(w.updated)
                        .bind(&w.data);
                    if let Some(v) = w.expected {
                        query = query.bind(v);
                    }
                    let done = query.execute(&mut *conn).await.map_err(map_err)?;
                    if done.rows_affected() != 1 {
                        let actual = Self::document_version(conn, &w.twin_id, &w.name).await?;
                        return Ok(Versioned::Stale { actual });
                    }
                    // The revision commits with the document or not at all.
                    sqlx::query(sql::PUT_REVISION)
                        .bind(&w.twin_id)
                        .bind(&w.name)
                        .bind(w.version)
                        .bind(w.updated)
                        .bind(&w.data)
                        .bind(w.op)
                        .bind(&w.by_kind)
                        .bind(&w.by_id)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    sqlx::query(sql::PRUNE_REVISIONS)
                        .bind(&w.twin_id)
                        .bind(&w.name)
                        .bind(w.oldest_kept)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    Self::record(conn, &w.events).await?;
                    Ok(Versioned::Done)
                })
            })
            .await
    }

    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned> {
        let write = Arc::new((twin_id.to_owned(), name.to_owned(), events.to_vec()));
        self.group
            .write(move |conn| {
                let w = write.clone();
                Box::pin(async move {
                    let (twin_id, name, events) = &*w;
                    let done = sqlx::query(sql::DELETE_DOCUMENT)
                        .bind(twin_id)
                        .bind(name)
                        .bind(expected)
                        .execute(&mut *conn)
                        .await
                        .map_err(map_err)?;
                    if done.rows_affected() == 1 {
                        sqlx::query(sql::DELETE_REVISIONS)
                            .bind(twin_id)
                            .bind(name)
                            .execute(&mut *conn)
                            .await
                            .map_err(map_err)?;
                        Self::record(conn, events).await?;
                        return Ok(Versioned::Done);
                    }
                    let actual = Self::document_version(conn, twin_id, name).await?;
                    Ok(Versioned::Stale { actual })
                })
            })
            .await
    }

    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>> {
        // One read transaction, so that the total and the page agree.
        let mut tx = self.reader.begin().await.map_err(map_err)?;
        let total: i64 = sqlx::query_scalar(sql::COUNT_REVISIONS)
            .bind(twin_id)
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let rows = sqlx::query(sql::REVISION_PAGE)
            .bind(twin_id)
            .bind(name)
            .bind(sql::to_i64(page.limit))
            .bind(sql::to_i64(page.offset))
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        super::page_of(total.max(0) as u64, page, &rows, sql::version_from_row)
    }

    async fn revision(
        &self,
        twin_id: &str,
        name: &str,
        version: i64,
    ) -> StoreResult<Option<Document>> {
        let row = sqlx::query(sql::SELECT_REVISION)
            .bind(twin_id)
            .bind(name)
            .bind(version)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::document_from_row).transpose()
    }

    async fn revision_at(
        &self,
        twin_id: &str,
        name: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<Document>> {
        let row = sqlx::query(sql::REVISION_AT)
            .bind(twin_id)
            .bind(name)
            .bind(to_nanos(at))
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::document_from_row).transpose()
    }
}

#[async_trait]
impl HealthCheck for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(map_err)?;
        enough_space(available_bytes(&self.path))?;
        if self.write_failed.load(Ordering::Relaxed) {
            // A read succeeds on a full disk: after a failed write, only a write tells.
            let mut tx = self.begin().await?;
            sqlx::query("INSERT OR REPLACE INTO health_probe (id, at) VALUES (1, ?)")
                .bind(to_nanos(&chrono::Utc::now()))
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Free space under which the health check reports the store failing. A write probe
/// cannot tell a full disk: a small commit succeeds while the WAL has frames to reuse
/// and larger ones are refused for lack of space.
const MIN_FREE_BYTES: u64 = 1 << 20;

/// Fails when `available` (bytes) is under [`MIN_FREE_BYTES`]; passes when it is unknown.
fn enough_space(available: Option<u64>) -> StoreResult<()> {
    match available {
        Some(free) if free < MIN_FREE_BYTES => Err(StoreError::Unavailable(
            format!("disk full: {free} bytes free on the database's filesystem").into(),
        )),
        _ => Ok(()),
    }
}

/// Bytes a process without privileges may still write on the filesystem holding
/// `path`; None when it cannot be told (the file is missing, the path is not one).
fn available_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and `stat`
    // points to memory for one `statvfs`, which the call fills when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the call returned 0, so it wrote the whole struct.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::twin::{Attribute, Definition};

    /// The health check's space test: under the floor fails as a transient failure that
    /// says why, at or over it passes, and a filesystem that cannot be measured passes.
    #[test]
    fn the_store_fails_its_check_with_less_than_the_floor_free() {
        let low = enough_space(Some(MIN_FREE_BYTES - 1)).unwrap_err();
        assert!(low.is_transient());
        assert!(low.to_string().contains("disk full"), "{low}");
        assert!(enough_space(Some(MIN_FREE_BYTES)).is_ok());
        assert!(enough_space(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).is_some_and(|b| b > 0));
        assert_eq!(available_bytes(&dir.path().join("missing/t.db")), None);
    }

    /// The attributes the lookup by channel and subtopic reads follow the twin's
    /// current definition through creation, an update that keeps the definitions and
    /// one that adds a definition.
    #[tokio::test]
    async fn attributes_follow_the_current_definition() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db").display().to_string())
            .await
            .unwrap();
        let attribute = |name: &str, channel: &str, subtopic: &str| Attribute {
            name: name.into(),
            channel: channel.into(),
            subtopic: subtopic.into(),
            persist_state: true,
            record: None,
        };
        let definition = |id: i64, attributes: Vec<Attribute>| Definition {
            id,
            created: Utc::now(),
            attributes,
            delta: 1,
        };
        let now = Utc::now();
        let mut twin = Twin {
            owner: "o".into(),
            id: "t1".into(),
            name: "n".into(),
            revision: 0,
            created: now,
            updated: now,
            definitions: vec![definition(
                0,
                vec![attribute("a", "c1", ""), attribute("b", "c2", "s")],
            )],
            metadata: Default::default(),
        };
        let ids = |channel: &'static str, subtopic: &'static str| {
            let store = &store;
            async move { store.ids_by_attribute(channel, subtopic).await.unwrap() }
        };
        store.save_recorded(&twin, &[]).await.unwrap();
        assert_eq!(ids("c1", "").await, ["t1"]);
        assert_eq!(ids("c2", "s").await, ["t1"]);
        assert!(ids("c2", "").await.is_empty());

        twin.name = "renamed".into();
        twin.revision = 1;
        assert!(store.update_recorded(&twin, 0, &[]).await.unwrap());
        assert_eq!(ids("c1", "").await, ["t1"]);
        assert_eq!(ids("c2", "s").await, ["t1"]);

        twin.definitions
            .push(definition(1, vec![attribute("a", "c3", "x")]));
        twin.revision = 2;
        assert!(store.update_recorded(&twin, 1, &[]).await.unwrap());
        assert!(ids("c1", "").await.is_empty());
        assert!(ids("c2", "s").await.is_empty());
        assert_eq!(ids("c3", "x").await, ["t1"]);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM twin_attributes")
            .fetch_one(&store.reader)
            .await
            .unwrap();
        assert_eq!(rows, 1);
    }

    /// The history and retention statements read a twin's states through an index and
    /// never walk them all: SQLite's own plan of each says which index it searches.
    #[tokio::test]
    async fn history_statements_search_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db").display().to_string())
            .await
            .unwrap();
        let window = ["'t'", "0", "9"];
        let cases: Vec<(String, &str)> = vec![
            (literal(sql::STATE_ID_BOUNDS, &["'t'"]), "PRIMARY KEY"),
            (literal(sql::RANGE_COUNT, &window), "states_created"),
            (
                literal(sql::RANGE_PAGE, &["'t'", "0", "9", "100", "500"]),
                "states_created",
            ),
            (literal(sql::STATE_AT, &["'t'", "5"]), "states_created"),
            // The first id on the primary key, the window's ends on the time index.
            (literal(sql::WINDOW_SHAPE, &window), "USING"),
            (
                literal(sql::STATES_BETWEEN, &["'t'", "500", "599"]),
                "PRIMARY KEY",
            ),
            (literal(SUMMARY, &window), "states_created"),
            (literal(VALUE_AT[0], &["'t'", "5", "'v'"]), "states_created"),
            (literal(VALUE_AT[1], &["'t'", "5", "'v'"]), "states_created"),
            (literal(sql::FIRST_STATES, &["'t'", "10"]), "PRIMARY KEY"),
            (
                literal(sql::DELETE_STATES_BEFORE, &["'t'", "10"]),
                "PRIMARY KEY",
            ),
        ];
        for (query, index) in cases {
            let plan: Vec<String> =
                sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")))
                    .fetch_all(&store.reader)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<String, _>("detail"))
                    .collect();
            let on_states: Vec<&String> = plan
                .iter()
                .filter(|d| d.contains("states") && !d.contains("json_each"))
                .collect();
            assert!(
                !on_states.is_empty()
                    && on_states
                        .iter()
                        .all(|d| d.starts_with("SEARCH") && d.contains(index)),
                "{query}: {plan:?}"
            );
        }
    }

    /// Every connection of both pools keeps the plans its statements were prepared
    /// with (see [`stable_plans`]).
    #[tokio::test]
    async fn connections_keep_their_statements_plans() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db").display().to_string())
            .await
            .unwrap();
        for pool in [&store.reader, &store.writer] {
            let mut conn = pool.acquire().await.unwrap();
            let mut handle = conn.lock_handle().await.unwrap();
            let mut on: std::os::raw::c_int = -1;
            // SAFETY: as in `stable_plans`; -1 reads the setting into `on`.
            let rc = unsafe {
                libsqlite3_sys::sqlite3_db_config(
                    handle.as_raw_handle().as_ptr(),
                    libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
                    -1 as std::os::raw::c_int,
                    &mut on as *mut std::os::raw::c_int,
                )
            };
            assert_eq!((rc, on), (libsqlite3_sys::SQLITE_OK, 1));
        }
    }

    /// A database at `path` with the first schema only, as an earlier version left it:
    /// no table that [`SqliteStore::open`] adds to existing files.
    async fn database_before_later_tables(path: &str) -> SqlitePool {
        let before = SqlitePoolOptions::new()
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true),
            )
            .await
            .expect("open");
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&before).await.expect("schema");
        }
        before
    }

    /// A statement with its numbered parameters replaced by literals.
    fn literal(statement: &str, values: &[&str]) -> String {
        values
            .iter()
            .enumerate()
            .rev()
            .fold(statement.to_owned(), |q, (i, v)| {
                q.replace(&format!("${}", i + 1), v)
            })
    }
    use crate::domain::document::{VersionSummary, WriteOp, Writer};
    use crate::domain::time::from_nanos;

    /// A database written before revisions were kept: each document's history starts at
    /// its current version, once, when the store opens it.
    #[tokio::test]
    async fn a_summary_read_in_slices_equals_the_state_by_state_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db").display().to_string())
            .await
            .unwrap();
        // Integers, reals, negative numbers, strings and attributes that come and go,
        // with extremes in different slices.
        let states: Vec<State> = (0..997i64)
            .map(|i| {
                let mut p = serde_json::Map::new();
                p.insert("i".into(), serde_json::json!(i * 7 % 1000 - 300));
                p.insert("r".into(), serde_json::json!(i as f64 / 8.0 - 50.5));
                if i % 3 == 0 {
                    p.insert("s".into(), serde_json::json!(format!("x{i}")));
                }
                if i % 5 == 0 {
                    p.insert(
                        "m".into(),
                        serde_json::json!(if i % 2 == 0 { 1.5 } else { -2.0 }),
                    );
                }
                State {
                    twin_id: "t".into(),
                    id: i,
                    definition: 0,
                    created: from_nanos(i * 1_000_000),
                    payload: p,
                }
            })
            .collect();
        for s in &states {
            StateRepository::save(&store, s).await.unwrap();
        }
        let want = crate::domain::history::summarize(&states);
        for run in [(0, 996), (1, 995), (100, 100), (0, 1)] {
            let parts = store.summary_in_slices("t", run).await.unwrap();
            let got = crate::store::assemble_summary(want.states, parts, |name, created, last| {
                store.value_at("t", name, created, last)
            })
            .await
            .unwrap();
            let want = crate::domain::history::summarize(&states[run.0 as usize..=run.1 as usize]);
            assert_eq!(
                got.attributes.keys().collect::<Vec<_>>(),
                want.attributes.keys().collect::<Vec<_>>()
            );
            for (name, a) in &want.attributes {
                let g = &got.attributes[name];
                assert_eq!(
                    (g.count, &g.first, &g.last, &g.min, &g.max),
                    (a.count, &a.first, &a.last, &a.min, &a.max),
                    "{run:?} {name}"
                );
                match (g.mean, a.mean) {
                    (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9, "{run:?} {name}: {x} {y}"),
                    (x, y) => assert_eq!(x, y, "{run:?} {name}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn histories_from_before_breaks_were_kept_are_read_in_time_order() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("before.db");
        let path = path.to_str().expect("a UTF-8 path");
        let before = database_before_later_tables(path).await;
        // Created 0, 10, 5, 20 ms: state 2 is late. Twin "u" is in order.
        for (twin, created) in [("t", [0, 10, 5, 20]), ("u", [0, 1, 2, 3])] {
            for (id, ms) in created.into_iter().enumerate() {
                sqlx::query(sql::INSERT_STATE)
                    .bind(0)
                    .bind(ms * 1_000_000)
                    .bind("{}")
                    .bind(twin)
                    .bind(id as i64)
                    .execute(&before)
                    .await
                    .expect("state");
            }
        }
        before.close().await;

        let page = PageRequest {
            offset: 0,
            limit: 10,
        };
        for _ in 0..2 {
            let store = SqliteStore::open(path).await.expect("reopen");
            for (twin, order) in [("t", [0, 2, 1, 3]), ("u", [0, 1, 2, 3])] {
                let got = store
                    .range(twin, &Window::default(), page)
                    .await
                    .expect("range");
                let ids: Vec<i64> = got.items.iter().map(|s| s.id).collect();
                assert_eq!((got.total, ids), (4, order.to_vec()), "{twin}");
            }
        }
    }

    #[tokio::test]
    async fn documents_from_before_revisions_start_their_history_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("before.db");
        let path = path.to_str().expect("a UTF-8 path");
        let before = database_before_later_tables(path).await;
        for (name, version, data) in [("a", 1, r#"{"x":1}"#), ("b", 3, r#"{"y":[2]}"#)] {
            sqlx::query(sql::CREATE_DOCUMENT)
                .bind("t")
                .bind(name)
                .bind(version)
                .bind(version * 1_000_000)
                .bind(data)
                .execute(&before)
                .await
                .expect("document");
        }
        before.close().await;

        let page = PageRequest {
            offset: 0,
            limit: 10,
        };
        for _ in 0..2 {
            let store = SqliteStore::open(path).await.expect("reopen");
            for (name, version, op) in [("a", 1, WriteOp::Create), ("b", 3, WriteOp::Put)] {
                let listed = store.versions("t", name, page).await.expect("versions");
                assert_eq!(
                    listed.items,
                    vec![VersionSummary {
                        version,
                        updated: from_nanos(version * 1_000_000),
                        op,
                        by: Writer::Service,
                    }],
                    "{name}"
                );
                assert_eq!(
                    store.revision("t", name, version).await.expect("revision"),
                    store.get("t", name).await.expect("get"),
                );
            }
            store.writer.close().await;
            store.reader.close().await;
        }
    }
}
