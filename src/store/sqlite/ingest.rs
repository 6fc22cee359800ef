//! The ingestion log in SQLite: the group's lease and position in `ingest_groups`, each
//! twin's last applied sequence in `ingest_cursors`, all moved in one transaction with
//! the states they cover.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::Row;

use super::{SqliteStore, WriteTx, map_err, to_json};
use crate::domain::sampling::Write;
use crate::domain::time::{now_millis, to_nanos};
use crate::store::sql::{self, seq_of, to_i64};
use crate::store::{
    Applied, IngestCursor, IngestRepository, IngestStep, Lease, StateRepository, StoreError,
    StoreResult,
};

/// Rows of a batch travel as one JSON array per statement, unpacked by `json_each`.
pub(super) const ROWS: &str =
    "SELECT json_extract(value, '$[0]') AS t, json_extract(value, '$[1]') AS i,
    json_extract(value, '$[2]') AS d, json_extract(value, '$[3]') AS c,
    json_extract(value, '$[4]') AS p FROM json_each(?)";

impl SqliteStore {
    /// Moves the group's position from `from` to `to`; false when it was elsewhere.
    async fn move_position(tx: &mut WriteTx, step: &IngestStep, to: u64) -> StoreResult<bool> {
        let done = sqlx::query(sql::MOVE_POSITION)
            .bind(to_i64(to))
            .bind(&step.group)
            .bind(to_i64(step.from))
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// The stored sequences of the step's twins.
    async fn twin_seqs(tx: &mut WriteTx, step: &IngestStep) -> StoreResult<HashMap<String, u64>> {
        let ids: Vec<&str> = step.twins.iter().map(|t| t.twin_id.as_str()).collect();
        let rows = sqlx::query(
            "SELECT twin_id, seq FROM ingest_cursors
             WHERE twin_id IN (SELECT value FROM json_each(?))",
        )
        .bind(to_json(&ids)?)
        .fetch_all(tx.conn())
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
impl IngestRepository for SqliteStore {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease.ttl).unwrap_or(chrono::Duration::MAX);
        let mut tx = self.begin().await?;
        let seq: Option<i64> = sqlx::query_scalar(sql::TAKE_LEASE)
            .bind(&lease.group)
            .bind(to_i64(lease.start))
            .bind(&lease.holder)
            .bind(to_nanos(&until))
            .bind(to_nanos(&now))
            .fetch_optional(tx.conn())
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(seq.map(seq_of))
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(sql::RELEASE_LEASE)
            .bind(group)
            .bind(holder)
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        tx.commit().await
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        let seq: Option<i64> = sqlx::query_scalar(sql::TWIN_SEQ)
            .bind(twin_id)
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        Ok(IngestCursor {
            last: self.latest(twin_id).await?,
            seq: seq.map_or(0, seq_of),
        })
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        // A step is a handful of statements whatever its size. The single writer
        // connection serialises it with every other write of the process, and the
        // transaction holds SQLite's write lock against other processes.
        let mut tx = self.begin().await?;
        let mut stored = Self::twin_seqs(&mut tx, step).await?;
        let conflicted = step
            .twins
            .iter()
            .any(|tw| stored.get(&tw.twin_id).copied().unwrap_or(0) != tw.expected_seq);
        // Past conflicting twins' messages only once they are applied.
        let to = if conflicted { step.from } else { step.to };
        if !Self::move_position(&mut tx, step, to).await? {
            tx.rollback().await?;
            return Ok(Applied::Fenced);
        }
        let mut conflicts = Vec::new();
        let (mut inserts, mut updates, mut cursors) = (Vec::new(), Vec::new(), Vec::new());
        let mut events = Vec::new();
        let mut breaks = Vec::new();
        for tw in &step.twins {
            let seq = stored.get(&tw.twin_id).copied().unwrap_or(0);
            if seq != tw.expected_seq {
                conflicts.push(tw.twin_id.clone());
                continue;
            }
            stored.insert(tw.twin_id.clone(), tw.new_seq());
            for w in &tw.writes {
                let (rows, s) = match &w.write {
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
            cursors.push(serde_json::json!([tw.twin_id, to_i64(tw.new_seq())]));
            events.extend(&tw.events);
            if let Some(b) = tw.last_break {
                breaks.push((tw.twin_id.as_str(), b));
            }
        }
        if !inserts.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO states (twin_id, id, definition, created, payload)
                 SELECT t, i, d, c, p FROM ({ROWS})"
            )))
            .bind(to_json(&inserts)?)
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        }
        if !updates.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE states SET definition = u.d, created = u.c, payload = u.p
                 FROM ({ROWS}) AS u WHERE states.twin_id = u.t AND states.id = u.i"
            )))
            .bind(to_json(&updates)?)
            .execute(tx.conn())
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
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        }
        for (twin_id, b) in breaks {
            sqlx::query(super::STATE_BREAKS[0])
                .bind(twin_id)
                .bind(b)
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
        }
        // The last statement before the commit: the events' time is as close to the
        // commit as it can be known.
        let recorded = Self::record_entries(tx.conn(), events, Some(now_millis())).await?;
        tx.commit().await?;
        self.recorded.hand_over(recorded);
        Ok(Applied::Done { conflicts })
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        let mut tx = self.begin().await?;
        let step = IngestStep {
            group: group.to_owned(),
            from,
            to,
            twins: Vec::new(),
        };
        if !Self::move_position(&mut tx, &step, step.to).await? {
            tx.rollback().await?;
            return Ok(Applied::Fenced);
        }
        sqlx::query(sql::FORGET_SEQS)
            .execute(tx.conn())
            .await
            .map_err(map_err)?;
        tx.commit().await?;
        Ok(Applied::Done {
            conflicts: Vec::new(),
        })
    }
}
