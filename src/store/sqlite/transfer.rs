//! Bulk copy in and out of SQLite (see [`crate::store::transfer`]).

use async_trait::async_trait;

use super::ingest::ROWS;
use super::{SqliteStore, find_breaks, map_err, to_json};
use crate::domain::state::State;
use crate::domain::time::to_nanos;
use crate::domain::twin::Twin;
use crate::store::StoreResult;
use crate::store::sql::{self, to_i64};
use crate::store::transfer::{Counts, IngestLog, Transfer};

#[async_trait]
impl Transfer for SqliteStore {
    async fn twins_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Twin>> {
        let rows = sqlx::query(sql::TWINS_AFTER)
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::twin_from_row).collect()
    }

    async fn put_states(&self, states: &[State]) -> StoreResult<()> {
        if states.is_empty() {
            return Ok(());
        }
        let rows = states
            .iter()
            .map(|s| {
                Ok(serde_json::json!([
                    s.twin_id,
                    s.id,
                    s.definition,
                    to_nanos(&s.created),
                    to_json(&s.payload)?
                ]))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let mut tx = self.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO states (twin_id, id, definition, created, payload)
             SELECT t, i, d, c, p FROM ({ROWS}) WHERE true ON CONFLICT (twin_id, id) DO NOTHING"
        )))
        .bind(to_json(&rows)?)
        .execute(tx.conn())
        .await
        .map_err(map_err)?;
        for (twin_id, first, last) in sql::id_runs(states) {
            find_breaks(&mut tx, twin_id, first, last).await?;
        }
        tx.commit().await
    }

    async fn ingest_log(&self) -> StoreResult<IngestLog> {
        let groups = sqlx::query_as(sql::GROUP_POSITIONS)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        let cursors = sqlx::query_as(sql::TWIN_SEQS)
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(IngestLog {
            groups: sql::positions(groups),
            cursors: sql::positions(cursors),
        })
    }

    async fn put_ingest_log(&self, log: &IngestLog) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for (statement, rows) in [
            (sql::PUT_GROUP, &log.groups),
            (sql::PUT_TWIN_SEQ, &log.cursors),
        ] {
            for (key, seq) in rows {
                sqlx::query(statement)
                    .bind(key)
                    .bind(to_i64(*seq))
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await
    }

    async fn counts(&self) -> StoreResult<Counts> {
        let row = sqlx::query_as(sql::COUNTS)
            .fetch_one(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(sql::counts(row))
    }
}
