//! The ingestion log in PostgreSQL: the same tables as SQLite's, moved in one
//! transaction with the states they cover.
//!
//! Several instances share one database, so every step first locks its group's row
//! (`SELECT … FOR UPDATE`) and checks the position there: two steps of one group run one
//! after the other, and the second sees what the first committed (READ COMMITTED reads
//! each statement's snapshot after the lock is granted), so it is fenced or reads fresh
//! twin sequences — never the stale ones of a concurrent step.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::{Postgres, Row, Transaction};

use super::{PostgresStore, map_err};
use crate::domain::sampling::Write;
use crate::domain::time::{now_millis, to_nanos};
use crate::store::sql::{self, seq_of, to_i64};
use crate::store::{
    Applied, IngestCursor, IngestRepository, IngestStep, Lease, StateRepository, StoreError,
    StoreResult,
};

/// Columns of a batch of state rows, bound as arrays and unpacked by `UNNEST`.
#[derive(Default)]
pub(super) struct StateRows {
    twin_ids: Vec<String>,
    ids: Vec<i64>,
    definitions: Vec<i64>,
    created: Vec<i64>,
    payloads: Vec<String>,
}

impl StateRows {
    pub(super) fn push(&mut self, state: &crate::domain::state::State) -> StoreResult<()> {
        self.twin_ids.push(state.twin_id.clone());
        self.ids.push(state.id);
        self.definitions.push(state.definition);
        self.created.push(to_nanos(&state.created));
        self.payloads.push(
            serde_json::to_string(&state.payload).map_err(|e| StoreError::Internal(e.into()))?,
        );
        Ok(())
    }

    pub(super) async fn execute(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        statement: &'static str,
    ) -> StoreResult<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(statement)
            .bind(&self.twin_ids)
            .bind(&self.ids)
            .bind(&self.definitions)
            .bind(&self.created)
            .bind(&self.payloads)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// State rows bound as five arrays (twin id, id, definition, created, payload as text).
const INSERT_STATES: &str = "INSERT INTO states (twin_id, id, definition, created, payload)
    SELECT t, i, d, c, p::jsonb
    FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) AS u(t, i, d, c, p)";

const UPDATE_STATES: &str = "UPDATE states SET definition = u.d, created = u.c, payload = u.p::jsonb
    FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[]) AS u(t, i, d, c, p)
    WHERE states.twin_id = u.t AND states.id = u.i";

impl PostgresStore {
    /// Locks the group's row; whether its position is `from`.
    async fn lock_position(
        tx: &mut Transaction<'static, Postgres>,
        group: &str,
        from: u64,
    ) -> StoreResult<bool> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM ingest_groups WHERE grp = $1 FOR UPDATE")
                .bind(group)
                .fetch_optional(&mut **tx)
                .await
                .map_err(map_err)?;
        Ok(seq == Some(to_i64(from)))
    }

    async fn set_position(
        tx: &mut Transaction<'static, Postgres>,
        group: &str,
        from: u64,
        to: u64,
    ) -> StoreResult<()> {
        sqlx::query(sql::MOVE_POSITION)
            .bind(to_i64(to))
            .bind(group)
            .bind(to_i64(from))
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// The stored sequences of the step's twins, their rows locked.
    async fn twin_seqs(
        tx: &mut Transaction<'static, Postgres>,
        step: &IngestStep,
    ) -> StoreResult<HashMap<String, u64>> {
        let ids: Vec<&str> = step.twins.iter().map(|t| t.twin_id.as_str()).collect();
        let rows = sqlx::query(
            "SELECT twin_id, seq FROM ingest_cursors WHERE twin_id = ANY($1) FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(map_err)?;
        let mut stored = HashMap::with_capacity(rows.len());
        for r in &rows {
            let get_err = |e: sqlx::Error| StoreError::Internal(e.into());
            let id: String = r.try_get("twin_id").map_err(get_err)?;
            let seq: i64 = r.try_get("seq").map_err(get_err)?;
            stored.insert(id, seq_of(seq));
        }
        Ok(stored)
    }
}

#[async_trait]
impl IngestRepository for PostgresStore {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease.ttl).unwrap_or(chrono::Duration::MAX);
        let seq: Option<i64> = sqlx::query_scalar(sql::TAKE_LEASE)
            .bind(&lease.group)
            .bind(to_i64(lease.start))
            .bind(&lease.holder)
            .bind(to_nanos(&until))
            .bind(to_nanos(&now))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(seq.map(seq_of))
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        sqlx::query(sql::RELEASE_LEASE)
            .bind(group)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        let seq: Option<i64> = sqlx::query_scalar(sql::TWIN_SEQ)
            .bind(twin_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(IngestCursor {
            last: self.latest(twin_id).await?,
            seq: seq.map_or(0, seq_of),
        })
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        let mut tx = self.begin().await?;
        if !Self::lock_position(&mut tx, &step.group, step.from).await? {
            return Ok(Applied::Fenced);
        }
        let stored = Self::twin_seqs(&mut tx, step).await?;
        let mut conflicts = Vec::new();
        let (mut inserts, mut updates) = (StateRows::default(), StateRows::default());
        let (mut cursor_ids, mut cursor_seqs) = (Vec::new(), Vec::new());
        let mut events = Vec::new();
        let (mut break_ids, mut breaks) = (Vec::new(), Vec::new());
        for tw in &step.twins {
            if stored.get(&tw.twin_id).copied().unwrap_or(0) != tw.expected_seq {
                conflicts.push(tw.twin_id.clone());
                continue;
            }
            for w in &tw.writes {
                match &w.write {
                    Write::Insert(s) => inserts.push(s)?,
                    Write::Update(s) => updates.push(s)?,
                }
            }
            cursor_ids.push(tw.twin_id.as_str());
            if let Some(b) = tw.last_break {
                break_ids.push(tw.twin_id.as_str());
                breaks.push(b);
            }
            cursor_seqs.push(to_i64(tw.new_seq()));
            events.extend(&tw.events);
        }
        // Past conflicting twins' messages only once they are applied.
        let to = if conflicts.is_empty() {
            step.to
        } else {
            step.from
        };
        Self::set_position(&mut tx, &step.group, step.from, to).await?;
        inserts.execute(&mut tx, INSERT_STATES).await?;
        updates.execute(&mut tx, UPDATE_STATES).await?;
        for (twin_id, b) in break_ids.iter().zip(&breaks) {
            sqlx::query(super::STATE_BREAKS[0])
                .bind(twin_id)
                .bind(b)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        if !cursor_ids.is_empty() {
            sqlx::query(
                "INSERT INTO ingest_cursors (twin_id, seq)
                 SELECT * FROM UNNEST($1::text[], $2::bigint[])
                 ON CONFLICT (twin_id) DO UPDATE SET seq = excluded.seq",
            )
            .bind(&cursor_ids)
            .bind(&cursor_seqs)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        // The last statement before the commit: the events' time is as close to the
        // commit as it can be known.
        Self::record_at(&mut tx, events, Some(now_millis())).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::Done { conflicts })
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        let mut tx = self.begin().await?;
        if !Self::lock_position(&mut tx, group, from).await? {
            return Ok(Applied::Fenced);
        }
        Self::set_position(&mut tx, group, from, to).await?;
        sqlx::query(sql::FORGET_SEQS)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(Applied::Done {
            conflicts: Vec::new(),
        })
    }
}
