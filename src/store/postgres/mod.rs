//! PostgreSQL backend (`postgres://` or `postgresql://`): the store for several instances
//! on the database an operator already runs.
//!
//! The statements are those of the SQLite store wherever the dialects agree
//! ([`super::sql`]); the twin list's metadata filter and the batch writes of ingestion are
//! PostgreSQL's own. Tables and indexes come from the migrations in
//! `migrations/postgres`, run at start under sqlx's advisory lock, so instances starting
//! together apply each migration once. TLS follows the URL (`sslmode=require`,
//! `verify-ca`, `verify-full`, with `sslrootcert`), through rustls.

mod ingest;
mod transfer;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row, SqlSafeStr, Transaction};

use super::sql::{self, Columns};
use super::{
    DocumentRepository, DocumentWrite, HealthCheck, OutboxEntry, OutboxEvent, OutboxRepository,
    StateRepository, StoreError, StoreResult, TwinFilter, TwinRepository, Versioned,
};
use crate::domain::document::{Document, DocumentSummary, VersionSummary};
use crate::domain::history::{Summary, Window};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::time::{from_nanos, to_nanos};
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};
use crate::domain::{Page, PageRequest};
use crate::error::redact_url;

/// Connections of a store by default (`MG_TWINS_DB_POOL_SIZE`).
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// How long a call waits for a free connection (or a new one) before the store counts
/// as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema's migrations, oldest first, compiled into the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../../migrations/postgres/0001_schema.sql"),
    ),
    (
        2,
        "document revisions",
        include_str!("../../../migrations/postgres/0002_document_revisions.sql"),
    ),
    (
        3,
        "states_history",
        include_str!("../../../migrations/postgres/0003_states_history.sql"),
    ),
    (
        4,
        "state_breaks",
        include_str!("../../../migrations/postgres/0004_state_breaks.sql"),
    ),
    (
        5,
        "feed_outbox",
        include_str!("../../../migrations/postgres/0005_feed_outbox.sql"),
    ),
];

/// [0]: records a break; [1]: finds those of a run of ids (see [`sql::state_breaks`]).
const STATE_BREAKS: [&str; 2] = sql::state_breaks!("GREATEST");

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects with a pool of at most `pool_size` connections and brings the schema up
    /// to date.
    pub async fn connect(url: &str, pool_size: u32) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Internal(
                    format!("invalid PostgreSQL URL {}: {e}", redact_url(url)).into(),
                )
            })?
            // The one statement costly enough for JIT compilation is a summary of a long
            // history, and it runs faster without: compiling costs more than it saves.
            .options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, name, text)| {
                Migration::new(
                    *version,
                    (*name).into(),
                    MigrationType::Simple,
                    text.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => map_err(e),
                other => StoreError::Internal(other.into()),
            })?;
        Ok(Self { pool })
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(map_err)
    }

    async fn replace_attributes(
        tx: &mut Transaction<'static, Postgres>,
        twin: &Twin,
    ) -> StoreResult<()> {
        sqlx::query(sql::DELETE_ATTRIBUTES)
            .bind(&twin.id)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        let Some(def) = twin.current_definition() else {
            return Ok(());
        };
        let (channels, subtopics): (Vec<&str>, Vec<&str>) = def
            .attributes
            .iter()
            .map(|a| (a.channel.as_str(), a.subtopic.as_str()))
            .unzip();
        sqlx::query(
            "INSERT INTO twin_attributes (twin_id, channel, subtopic)
             SELECT $1, c, s FROM UNNEST($2::text[], $3::text[]) AS a(c, s)",
        )
        .bind(&twin.id)
        .bind(&channels)
        .bind(&subtopics)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn document_version(
        tx: &mut Transaction<'static, Postgres>,
        twin_id: &str,
        name: &str,
    ) -> StoreResult<Option<i64>> {
        sqlx::query_scalar(sql::DOCUMENT_VERSION)
            .bind(twin_id)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)
    }
}

impl PostgresStore {
    /// Records `events` in the outbox inside `tx`, in their order.
    async fn record<'a>(
        tx: &mut Transaction<'static, Postgres>,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
    ) -> StoreResult<()> {
        Self::record_at(tx, events, None).await
    }

    /// [`record`](Self::record), each event stamped with `at` when given.
    async fn record_at<'a>(
        tx: &mut Transaction<'static, Postgres>,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
        at: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        let (ids, owners, payloads) = sql::outbox_columns(events, at)?;
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO feed_outbox (msg_id, owner, payload)
             SELECT m, o, p FROM UNNEST($1::text[], $2::text[], $3::text[])
                WITH ORDINALITY AS e(m, o, p, n)
             ORDER BY n",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(&payloads)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }
}

#[async_trait]
impl OutboxRepository for PostgresStore {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(sql::PENDING_EVENTS)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::outbox_from_row).collect()
    }

    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(sql::PENDING_EVENTS_AFTER)
            .bind(after)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::outbox_from_row).collect()
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        sqlx::query("DELETE FROM feed_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn backlog(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(sql::OUTBOX_BACKLOG)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(sql::seq_of(n))
    }
}

/// Maps sqlx errors onto the store's error kinds ([`sql::map_err`]).
fn map_err(e: sqlx::Error) -> StoreError {
    sql::map_err(e, is_transient_code)
}

/// SQLSTATEs after which the same call can succeed later: connection exceptions (class
/// 08), insufficient resources (53: disk full, out of memory, too many connections),
/// operator intervention (57P: shutdown, cannot connect now), serialization failures and
/// deadlocks (40001, 40P01).
fn is_transient_code(code: Option<&str>) -> bool {
    code.is_some_and(|c| {
        c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c.starts_with("40")
    })
}

impl Columns for PgRow {
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
        self.try_get::<Json<T>, _>(column)
            .map(|j| j.0)
            .map_err(|e| StoreError::Internal(format!("corrupt {what}: {e}").into()))
    }
}

/// Owner ($1), optional exact name ($2) and optional metadata object ($3) whose
/// top-level keys must all be present with equal values: a containment on the GIN index,
/// refined to equality (containment alone would let `{"a": [1, 2]}` match `{"a": [1]}`).
/// Keys are compared literally.
const LIST_FILTER: &str = "owner = $1
    AND ($2::text IS NULL OR name = $2)
    AND ($3::jsonb IS NULL OR (metadata @> $3 AND NOT EXISTS (
        SELECT 1 FROM jsonb_each($3) AS f WHERE twins.metadata -> f.key <> f.value
    )))";

#[async_trait]
impl TwinRepository for PostgresStore {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(sql::INSERT_TWIN)
            .bind(&twin.id)
            .bind(&twin.owner)
            .bind(&twin.name)
            .bind(twin.revision)
            .bind(to_nanos(&twin.created))
            .bind(to_nanos(&twin.updated))
            .bind(Json(&twin.definitions))
            .bind(Json(&twin.metadata))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        Self::replace_attributes(&mut tx, twin).await?;
        Self::record(&mut tx, events).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(sql::UPDATE_TWIN)
            .bind(&twin.name)
            .bind(twin.revision)
            .bind(to_nanos(&twin.updated))
            .bind(Json(&twin.definitions))
            .bind(Json(&twin.metadata))
            .bind(&twin.id)
            .bind(&twin.owner)
            .bind(expected_revision)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        Self::replace_attributes(&mut tx, twin).await?;
        Self::record(&mut tx, events).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(sql::SELECT_TWIN)
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
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
        let metadata = filter.metadata.as_ref().map(Json);
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM twins WHERE {LIST_FILTER}"
        )))
        .bind(owner)
        .bind(filter.name.as_deref())
        .bind(metadata)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM twins WHERE {LIST_FILTER} ORDER BY pos LIMIT $4 OFFSET $5",
            sql::TWIN_COLUMNS
        )))
        .bind(owner)
        .bind(filter.name.as_deref())
        .bind(metadata)
        .bind(i64::try_from(page.limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(page.offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
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
        let mut tx = self.begin().await?;
        let done = sqlx::query(sql::DELETE_TWIN)
            .bind(id)
            .bind(owner)
            .bind(expected_revision)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for stmt in sql::DELETE_TWIN_ROWS {
            sqlx::query(stmt)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        Self::record(&mut tx, events).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(sql::IDS_BY_ATTRIBUTE)
            .bind(channel)
            .bind(subtopic)
            .bind(WILDCARD_SUBTOPIC)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(sql::SELECT_ANY_TWIN)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::twin_from_row).transpose()
    }

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        super::many_in_chunks(ids, |chunk| async move {
            let rows = sqlx::query(sql::SELECT_ANY_TWINS)
                .bind(chunk.to_vec())
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?;
            rows.iter().map(sql::twin_with_id).collect()
        })
        .await
    }
}

/// Records the twin's breaks of time order among its states `first..=last`.
async fn find_breaks(
    tx: &mut Transaction<'static, Postgres>,
    twin_id: &str,
    first: i64,
    last: i64,
) -> StoreResult<()> {
    sqlx::query(STATE_BREAKS[1])
        .bind(twin_id)
        .bind(first)
        .bind(last)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

async fn write_state(tx: &mut Transaction<'static, Postgres>, write: &Write) -> StoreResult<()> {
    let (statement, state) = sql::state_write(write);
    sqlx::query(statement)
        .bind(state.definition)
        .bind(to_nanos(&state.created))
        .bind(Json(&state.payload))
        .bind(&state.twin_id)
        .bind(state.id)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl StateRepository for PostgresStore {
    async fn save(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        write_state(&mut tx, &Write::Insert(state.clone())).await?;
        find_breaks(&mut tx, &state.twin_id, state.id, state.id).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        write_state(&mut tx, &Write::Update(state.clone())).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        let row = sqlx::query(sql::LATEST_STATE)
            .bind(twin_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::state_from_row).transpose()
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(sql::STATE_ID_BOUNDS)
            .bind(twin_id)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let (total, start) = sql::states_span(first, last, page.offset);
        let rows = sqlx::query(sql::STATES_FROM)
            .bind(twin_id)
            .bind(start)
            .bind(sql::to_i64(page.limit))
            .fetch_all(&self.pool)
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
                    .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        super::page_of(total, page, &rows, sql::state_from_row)
    }

    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>> {
        let row = sqlx::query(sql::STATE_AT)
            .bind(twin_id)
            .bind(to_nanos(at))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::state_from_row).transpose()
    }

    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary> {
        let (from, to) = window.nanos();
        let states = match self.window_shape(twin_id, from, to).await?.ids() {
            Some((states, _)) => states,
            None => self.window_count(twin_id, from, to).await?,
        };
        let rows = sqlx::query(SUMMARY)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64> {
        // No lock needed: a twin's latest id only grows, and ingestion rewrites only the
        // latest state, so what is read here stays true of the states deleted.
        let (_, last): (Option<i64>, Option<i64>) = sqlx::query_as(sql::STATE_ID_BOUNDS)
            .bind(twin_id)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let first: Vec<(i64, i64)> = sqlx::query_as(sql::FIRST_STATES)
            .bind(twin_id)
            .bind(sql::to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let first: Vec<_> = first
            .into_iter()
            .map(|(id, c)| (id, from_nanos(c)))
            .collect();
        let Some(keep) = last.and_then(|last| super::prune_bound(&first, last, before)) else {
            return Ok(0);
        };
        let done = sqlx::query(sql::DELETE_STATES_BEFORE)
            .bind(twin_id)
            .bind(keep)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }
}

/// Twin id, from, to: one row per attribute of the window's states (see
/// [`sql::aggregate_from_row`]); extremes over the numbers as `numeric`, so integers
/// stay integers, and the mean in `float8` (what it is served as), which sums several
/// times faster than `numeric`.
pub const SUMMARY: &str = "SELECT j.key AS name, COUNT(*) AS count,
    COALESCE(to_jsonb(MIN(CASE WHEN jsonb_typeof(j.value) = 'number' THEN j.value::numeric END)),
        'null'::jsonb) AS min,
    COALESCE(to_jsonb(MAX(CASE WHEN jsonb_typeof(j.value) = 'number' THEN j.value::numeric END)),
        'null'::jsonb) AS max,
    AVG(CASE WHEN jsonb_typeof(j.value) = 'number' THEN j.value::float8 END) AS mean,
    MIN(s.created) AS first_created, MAX(s.created) AS last_created
    FROM states AS s CROSS JOIN LATERAL jsonb_each(s.payload) AS j
    WHERE s.twin_id = $1 AND s.created >= $2 AND s.created <= $3
    GROUP BY j.key";

/// A statement of [`VALUE_AT`], in the given order of ids.
macro_rules! value_at {
    ($order:literal) => {
        concat!(
            "SELECT payload FROM states
            WHERE twin_id = $1 AND created = $2 AND jsonb_exists(payload, $3)
            ORDER BY ",
            $order,
            " LIMIT 1"
        )
    };
}

/// Twin id, created, attribute: the payload of the first state created then that has the
/// attribute ([0]), or of the last one ([1]); read in id order on the history index.
pub const VALUE_AT: [&str; 2] = [value_at!("id"), value_at!("id DESC")];

impl PostgresStore {
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
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.into())
    }

    /// The number of the twin's states created between `from` and `to` (Unix ns).
    async fn window_count(&self, twin_id: &str, from: i64, to: i64) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(sql::RANGE_COUNT)
            .bind(twin_id)
            .bind(from)
            .bind(to)
            .fetch_one(&self.pool)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row
            .as_ref()
            .map(|r| sql::payload_value(r, &name))
            .transpose()?
            .flatten())
    }
}

/// Keeps the transaction's writes when one row changed; otherwise rolls back and says
/// which version is stored.
async fn versioned(
    mut tx: Transaction<'static, Postgres>,
    changed: u64,
    twin_id: &str,
    name: &str,
) -> StoreResult<Versioned> {
    if changed == 1 {
        tx.commit().await.map_err(map_err)?;
        return Ok(Versioned::Done);
    }
    let actual = PostgresStore::document_version(&mut tx, twin_id, name).await?;
    tx.rollback().await.map_err(map_err)?;
    Ok(Versioned::Stale { actual })
}

#[async_trait]
impl DocumentRepository for PostgresStore {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        let rows = sqlx::query(sql::DOCUMENT_SUMMARIES)
            .bind(twin_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::summary_from_row).collect()
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        let row = sqlx::query(sql::SELECT_DOCUMENT)
            .bind(twin_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::document_from_row).transpose()
    }

    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned> {
        let doc = write.doc;
        let mut tx = self.begin().await?;
        let mut query = sqlx::query(sql::document_write(write.expected))
            .bind(&doc.twin_id)
            .bind(&doc.document_name)
            .bind(doc.version)
            .bind(to_nanos(&doc.updated))
            .bind(Json(&doc.data));
        if let Some(v) = write.expected {
            query = query.bind(v);
        }
        let done = query.execute(&mut *tx).await.map_err(map_err)?;
        if done.rows_affected() == 1 {
            // The document's row is locked by the write above until the commit, so the
            // revision commits with it, or neither does.
            sqlx::query(sql::PUT_REVISION)
                .bind(&doc.twin_id)
                .bind(&doc.document_name)
                .bind(doc.version)
                .bind(to_nanos(&doc.updated))
                .bind(Json(&doc.data))
                .bind(write.op.as_str())
                .bind(write.by.kind())
                .bind(write.by.id())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            sqlx::query(sql::PRUNE_REVISIONS)
                .bind(&doc.twin_id)
                .bind(&doc.document_name)
                .bind(write.oldest_kept())
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            Self::record(&mut tx, write.events).await?;
        }
        versioned(tx, done.rows_affected(), &doc.twin_id, &doc.document_name).await
    }

    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(sql::DELETE_DOCUMENT)
            .bind(twin_id)
            .bind(name)
            .bind(expected)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 1 {
            sqlx::query(sql::DELETE_REVISIONS)
                .bind(twin_id)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            Self::record(&mut tx, events).await?;
        }
        versioned(tx, done.rows_affected(), twin_id, name).await
    }

    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>> {
        // One snapshot, so that the total and the page agree.
        let mut tx = self.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
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
            .fetch_optional(&self.pool)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(sql::document_from_row).transpose()
    }
}

#[async_trait]
impl HealthCheck for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_or_cut_connections_are_unavailable() {
        let cut = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof");
        for e in [
            sqlx::Error::Io(cut),
            // What a connection closed during the handshake reads as.
            sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into()),
            sqlx::Error::WorkerCrashed,
            sqlx::Error::BeginFailed,
            sqlx::Error::PoolTimedOut,
        ] {
            let shown = e.to_string();
            assert!(map_err(e).is_transient(), "{shown}");
        }
    }

    #[test]
    fn undecodable_rows_are_internal() {
        for e in [
            sqlx::Error::ColumnNotFound("x".into()),
            sqlx::Error::Decode("bad".into()),
            sqlx::Error::RowNotFound,
        ] {
            let shown = e.to_string();
            assert!(matches!(map_err(e), StoreError::Internal(_)), "{shown}");
        }
    }
}
