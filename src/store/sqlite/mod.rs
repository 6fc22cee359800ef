//! Embedded SQLite backend (the default): one file, WAL mode, no server to run.
//!
//! Writes go through a single-connection pool so they queue in the process instead of
//! failing on SQLite's single-writer lock; reads use a separate pool and proceed in
//! parallel with writes thanks to WAL.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    DocumentRepository, HealthCheck, IngestCursor, StateRepository, StoreError, StoreResult,
    TwinFilter, TwinRepository, TwinWrites, Versioned,
};
use crate::domain::document::{Document, DocumentSummary};
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
    "CREATE TABLE IF NOT EXISTS states (
        twin_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        definition INTEGER NOT NULL,
        created INTEGER NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (twin_id, id)
    ) WITHOUT ROWID",
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
    "CREATE TABLE IF NOT EXISTS ingest_cursors (
        twin_id TEXT PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID",
];

/// Both pools over one database file.
pub struct SqliteStore {
    reader: SqlitePool,
    writer: SqlitePool,
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
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
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
            // Checkpoint every ~32 MiB of WAL rather than 4 MiB: ingestion batches
            // rewrite many pages, and each checkpoint costs an fsync.
            .pragma("wal_autocheckpoint", "8192")
            .pragma("journal_size_limit", "67108864");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        for stmt in SCHEMA {
            sqlx::query(*stmt).execute(&writer).await.map_err(map_err)?;
        }
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.read_only(true))
            .await
            .map_err(map_err)?;
        Ok(Self { reader, writer })
    }

    async fn replace_attributes(tx: &mut Transaction<'_, Sqlite>, twin: &Twin) -> StoreResult<()> {
        sqlx::query("DELETE FROM twin_attributes WHERE twin_id = ?")
            .bind(&twin.id)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        let Some(def) = twin.current_definition() else {
            return Ok(());
        };
        for attr in &def.attributes {
            sqlx::query(
                "INSERT INTO twin_attributes (twin_id, channel, subtopic) VALUES (?, ?, ?)",
            )
            .bind(&twin.id)
            .bind(&attr.channel)
            .bind(&attr.subtopic)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        }
        Ok(())
    }
}

/// Maps sqlx errors onto the store's error kinds.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(db.message().to_owned())
        }
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6): another writer holds the database.
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("5" | "6")) => {
            StoreError::Unavailable(db.message().to_owned())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Internal(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(raw: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(raw).map_err(|e| StoreError::Internal(format!("corrupt {what}: {e}")))
}

fn twin_from_row(row: &SqliteRow) -> StoreResult<Twin> {
    let get_err = |e: sqlx::Error| StoreError::Internal(e.to_string());
    Ok(Twin {
        id: row.try_get("id").map_err(get_err)?,
        owner: row.try_get("owner").map_err(get_err)?,
        name: row.try_get("name").map_err(get_err)?,
        revision: row.try_get("revision").map_err(get_err)?,
        created: from_nanos(row.try_get("created").map_err(get_err)?),
        updated: from_nanos(row.try_get("updated").map_err(get_err)?),
        definitions: from_json(
            &row.try_get::<String, _>("definitions").map_err(get_err)?,
            "definitions",
        )?,
        metadata: from_json(
            &row.try_get::<String, _>("metadata").map_err(get_err)?,
            "metadata",
        )?,
    })
}

fn state_from_row(row: &SqliteRow) -> StoreResult<State> {
    let get_err = |e: sqlx::Error| StoreError::Internal(e.to_string());
    Ok(State {
        twin_id: row.try_get("twin_id").map_err(get_err)?,
        id: row.try_get("id").map_err(get_err)?,
        definition: row.try_get("definition").map_err(get_err)?,
        created: from_nanos(row.try_get("created").map_err(get_err)?),
        payload: from_json(
            &row.try_get::<String, _>("payload").map_err(get_err)?,
            "payload",
        )?,
    })
}

const TWIN_COLUMNS: &str = "id, owner, name, revision, created, updated, definitions, metadata";

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

#[async_trait]
impl TwinRepository for SqliteStore {
    async fn save(&self, twin: &Twin) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO twins (id, owner, name, revision, created, updated, definitions, metadata)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&twin.id)
        .bind(&twin.owner)
        .bind(&twin.name)
        .bind(twin.revision)
        .bind(to_nanos(&twin.created))
        .bind(to_nanos(&twin.updated))
        .bind(to_json(&twin.definitions)?)
        .bind(to_json(&twin.metadata)?)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        Self::replace_attributes(&mut tx, twin).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn update(&self, twin: &Twin, expected_revision: i64) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let done = sqlx::query(
            "UPDATE twins SET name = ?, revision = ?, updated = ?, definitions = ?, metadata = ?
             WHERE id = ? AND owner = ? AND revision = ?",
        )
        .bind(&twin.name)
        .bind(twin.revision)
        .bind(to_nanos(&twin.updated))
        .bind(to_json(&twin.definitions)?)
        .bind(to_json(&twin.metadata)?)
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
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(
            "SELECT id, owner, name, revision, created, updated, definitions, metadata
             FROM twins WHERE id = ? AND owner = ?",
        )
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(twin_from_row).transpose()
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
            "SELECT {TWIN_COLUMNS} FROM twins WHERE {LIST_FILTER} ORDER BY rowid LIMIT ?4 OFFSET ?5"
        )))
        .bind(owner)
        .bind(filter.name.as_deref())
        .bind(metadata.as_deref())
        .bind(page.limit as i64)
        .bind(page.offset as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        Ok(Page {
            total: total.max(0) as u64,
            offset: page.offset,
            limit: page.limit,
            items: rows.iter().map(twin_from_row).collect::<StoreResult<_>>()?,
        })
    }

    async fn remove(&self, owner: &str, id: &str) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let done = sqlx::query("DELETE FROM twins WHERE id = ? AND owner = ?")
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for stmt in [
            "DELETE FROM twin_attributes WHERE twin_id = ?",
            "DELETE FROM states WHERE twin_id = ?",
            "DELETE FROM ingest_cursors WHERE twin_id = ?",
            "DELETE FROM documents WHERE twin_id = ?",
        ] {
            sqlx::query(stmt)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(
            "SELECT DISTINCT twin_id FROM twin_attributes
             WHERE channel = ? AND (subtopic = ? OR subtopic = ?)",
        )
        .bind(channel)
        .bind(subtopic)
        .bind(WILDCARD_SUBTOPIC)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        let row = sqlx::query(
            "SELECT id, owner, name, revision, created, updated, definitions, metadata
             FROM twins WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(twin_from_row).transpose()
    }
}

#[async_trait]
impl StateRepository for SqliteStore {
    async fn save(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        write_state(&mut tx, &Write::Insert(state.clone())).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        write_state(&mut tx, &Write::Update(state.clone())).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM ingest_cursors WHERE twin_id = ?")
                .bind(twin_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
        Ok(IngestCursor {
            last: self.latest(twin_id).await?,
            seq: seq.unwrap_or(0).max(0) as u64,
        })
    }

    async fn apply(&self, batch: &[TwinWrites]) -> StoreResult<Vec<String>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // A batch is a handful of statements whatever its size: the rows travel as one
        // JSON array per statement and are unpacked by json_each. The single writer
        // connection serialises this with every other write of the process, and the
        // transaction holds SQLite's write lock against other processes.
        let ids: Vec<&str> = batch.iter().map(|t| t.twin_id.as_str()).collect();
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let rows = sqlx::query(
            "SELECT twin_id, seq FROM ingest_cursors
             WHERE twin_id IN (SELECT value FROM json_each(?))",
        )
        .bind(to_json(&ids)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let mut stored = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: String = r
                .try_get("twin_id")
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            let seq: i64 = r
                .try_get("seq")
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            stored.insert(id, seq.max(0) as u64);
        }
        let mut conflicts = Vec::new();
        let (mut inserts, mut updates, mut cursors) = (Vec::new(), Vec::new(), Vec::new());
        for tw in batch {
            let seq = stored.get(&tw.twin_id).copied().unwrap_or(0);
            if seq != tw.expected_seq {
                conflicts.push(tw.twin_id.clone());
                continue;
            }
            stored.insert(tw.twin_id.clone(), tw.new_seq);
            for w in &tw.writes {
                let (rows, s) = match w {
                    Write::Insert(s) => (&mut inserts, s),
                    Write::Update(s) => (&mut updates, s),
                };
                rows.push(serde_json::json!([
                    s.twin_id,
                    s.id,
                    s.definition,
                    to_nanos(&s.created),
                    to_json(&s.payload)?
                ]));
            }
            cursors.push(serde_json::json!([
                tw.twin_id,
                i64::try_from(tw.new_seq).unwrap_or(i64::MAX)
            ]));
        }
        const ROWS: &str =
            "SELECT json_extract(value, '$[0]') AS t, json_extract(value, '$[1]') AS i,
            json_extract(value, '$[2]') AS d, json_extract(value, '$[3]') AS c,
            json_extract(value, '$[4]') AS p FROM json_each(?)";
        if !inserts.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO states (twin_id, id, definition, created, payload)
                 SELECT t, i, d, c, p FROM ({ROWS})"
            )))
            .bind(to_json(&inserts)?)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        if !updates.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE states SET definition = u.d, created = u.c, payload = u.p
                 FROM ({ROWS}) AS u WHERE states.twin_id = u.t AND states.id = u.i"
            )))
            .bind(to_json(&updates)?)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        if !cursors.is_empty() {
            sqlx::query(
                "INSERT INTO ingest_cursors (twin_id, seq)
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?)
                 WHERE true
                 ON CONFLICT (twin_id) DO UPDATE SET seq = excluded.seq",
            )
            .bind(to_json(&cursors)?)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(conflicts)
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        let row = sqlx::query(
            "SELECT twin_id, id, definition, created, payload FROM states
             WHERE twin_id = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(twin_id)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(state_from_row).transpose()
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        // State ids are a gap-free sequence from 0, so the total is the latest id + 1 and
        // a page starts at id = offset: both come straight from the primary key, however
        // deep the offset.
        let last: Option<i64> =
            sqlx::query_scalar("SELECT id FROM states WHERE twin_id = ? ORDER BY id DESC LIMIT 1")
                .bind(twin_id)
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
        let total = last.map_or(0, |id| id.max(-1) + 1) as u64;
        let rows = sqlx::query(
            "SELECT twin_id, id, definition, created, payload FROM states
             WHERE twin_id = ? AND id >= ? ORDER BY id LIMIT ?",
        )
        .bind(twin_id)
        .bind(page.offset as i64)
        .bind(page.limit as i64)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        Ok(Page {
            total,
            offset: page.offset,
            limit: page.limit,
            items: rows
                .iter()
                .map(state_from_row)
                .collect::<StoreResult<_>>()?,
        })
    }
}

async fn write_state(tx: &mut Transaction<'_, Sqlite>, write: &Write) -> StoreResult<()> {
    let (sql, state) = match write {
        Write::Insert(s) => (
            "INSERT INTO states (definition, created, payload, twin_id, id) VALUES (?, ?, ?, ?, ?)",
            s,
        ),
        Write::Update(s) => (
            "UPDATE states SET definition = ?, created = ?, payload = ? WHERE twin_id = ? AND id = ?",
            s,
        ),
    };
    sqlx::query(sql)
        .bind(state.definition)
        .bind(to_nanos(&state.created))
        .bind(to_json(&state.payload)?)
        .bind(&state.twin_id)
        .bind(state.id)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

fn document_from_row(row: &SqliteRow) -> StoreResult<Document> {
    let get_err = |e: sqlx::Error| StoreError::Internal(e.to_string());
    Ok(Document {
        twin_id: row.try_get("twin_id").map_err(get_err)?,
        document_name: row.try_get("name").map_err(get_err)?,
        version: row.try_get("version").map_err(get_err)?,
        updated: from_nanos(row.try_get("updated").map_err(get_err)?),
        data: from_json(
            &row.try_get::<String, _>("data").map_err(get_err)?,
            "document",
        )?,
    })
}

impl SqliteStore {
    /// The stored version, read inside the transaction that failed to write.
    async fn document_version(
        tx: &mut Transaction<'_, Sqlite>,
        twin_id: &str,
        name: &str,
    ) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT version FROM documents WHERE twin_id = ? AND name = ?")
            .bind(twin_id)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)
    }
}

#[async_trait]
impl DocumentRepository for SqliteStore {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        let rows = sqlx::query(
            "SELECT name, version, updated FROM documents WHERE twin_id = ? ORDER BY name",
        )
        .bind(twin_id)
        .fetch_all(&self.reader)
        .await
        .map_err(map_err)?;
        let get_err = |e: sqlx::Error| StoreError::Internal(e.to_string());
        rows.iter()
            .map(|r| {
                Ok(DocumentSummary {
                    document_name: r.try_get("name").map_err(get_err)?,
                    version: r.try_get("version").map_err(get_err)?,
                    updated: from_nanos(r.try_get("updated").map_err(get_err)?),
                })
            })
            .collect()
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        let row = sqlx::query(
            "SELECT twin_id, name, version, updated, data FROM documents WHERE twin_id = ? AND name = ?",
        )
        .bind(twin_id)
        .bind(name)
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(document_from_row).transpose()
    }

    async fn write(&self, doc: &Document, expected: Option<i64>) -> StoreResult<Versioned> {
        let data = to_json(&doc.data)?;
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let done = match expected {
            None => sqlx::query(
                "INSERT INTO documents (twin_id, name, version, updated, data) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (twin_id, name) DO NOTHING",
            )
            .bind(&doc.twin_id)
            .bind(&doc.document_name)
            .bind(doc.version)
            .bind(to_nanos(&doc.updated))
            .bind(&data)
            .execute(&mut *tx)
            .await,
            Some(v) => sqlx::query(
                "UPDATE documents SET version = ?, updated = ?, data = ?
                 WHERE twin_id = ? AND name = ? AND version = ?",
            )
            .bind(doc.version)
            .bind(to_nanos(&doc.updated))
            .bind(&data)
            .bind(&doc.twin_id)
            .bind(&doc.document_name)
            .bind(v)
            .execute(&mut *tx)
            .await,
        }
        .map_err(map_err)?;
        if done.rows_affected() == 1 {
            tx.commit().await.map_err(map_err)?;
            return Ok(Versioned::Done);
        }
        let actual = Self::document_version(&mut tx, &doc.twin_id, &doc.document_name).await?;
        Ok(Versioned::Stale { actual })
    }

    async fn delete(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<Versioned> {
        let mut tx = self.writer.begin().await.map_err(map_err)?;
        let done = sqlx::query(
            "DELETE FROM documents WHERE twin_id = ? AND name = ? AND (?3 IS NULL OR version = ?3)",
        )
        .bind(twin_id)
        .bind(name)
        .bind(expected)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 1 {
            tx.commit().await.map_err(map_err)?;
            return Ok(Versioned::Done);
        }
        let actual = Self::document_version(&mut tx, twin_id, name).await?;
        Ok(Versioned::Stale { actual })
    }
}

#[async_trait]
impl HealthCheck for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
