//! Bulk copy in and out of PostgreSQL (see [`crate::store::transfer`]).

use async_trait::async_trait;

use super::ingest::StateRows;
use super::{PostgresStore, map_err};
use crate::domain::state::State;
use crate::domain::twin::Twin;
use crate::store::StoreResult;
use crate::store::sql::{self, to_i64};
use crate::store::transfer::{Counts, IngestLog, Transfer};

const PUT_STATES: &str = "INSERT INTO states (twin_id, id, definition, created, payload)
    SELECT t, i, d, c, p::jsonb
    FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) AS u(t, i, d, c, p)
    ON CONFLICT (twin_id, id) DO NOTHING";

#[async_trait]
impl Transfer for PostgresStore {
    async fn twins_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Twin>> {
        let rows = sqlx::query(sql::TWINS_AFTER)
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(sql::twin_from_row).collect()
    }

    async fn put_states(&self, states: &[State]) -> StoreResult<()> {
        let mut rows = StateRows::default();
        for s in states {
            rows.push(s)?;
        }
        let mut tx = self.begin().await?;
        rows.execute(&mut tx, PUT_STATES).await?;
        for (twin_id, first, last) in sql::id_runs(states) {
            super::find_breaks(&mut tx, twin_id, first, last).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn ingest_log(&self) -> StoreResult<IngestLog> {
        let groups = sqlx::query_as(sql::GROUP_POSITIONS)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let cursors = sqlx::query_as(sql::TWIN_SEQS)
            .fetch_all(&self.pool)
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
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    async fn counts(&self) -> StoreResult<Counts> {
        let row = sqlx::query_as(sql::COUNTS)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(sql::counts(row))
    }
}
