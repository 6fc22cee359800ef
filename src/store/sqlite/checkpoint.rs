//! WAL checkpoints in the background, off the writer's commits.
//!
//! In WAL mode with `synchronous = NORMAL` a commit appends to the WAL without a sync;
//! the syncs come with checkpoints, which copy the WAL's pages into the database file.
//! Left to SQLite, the connection whose commit takes the WAL past `wal_autocheckpoint`
//! pages runs the checkpoint inside that commit: it syncs every WAL page written since
//! the last one, copies them and syncs the database file, and every write waiting for
//! the writer (an ingestion step, a group of API writes) waits for all of that.
//!
//! Here a connection of its own runs a passive checkpoint every [`EVERY`]: it copies
//! what the WAL holds while the writer goes on appending, and never waits for the
//! writer or a reader (a passive checkpoint takes no lock another connection holds).
//! The writer keeps its automatic checkpoint: only a checkpoint run by the writer
//! lets the WAL start again from its beginning (SQLite restarts the WAL when a write
//! transaction begins on a WAL that is copied to its end), and it also bounds the WAL
//! should this task fall behind. By then the background checkpoints have synced and
//! copied all but the last few commits, so the writer's checkpoint is short.
//!
//! Durability does not change: a commit is in the WAL when it returns, whether or not
//! a checkpoint has copied it yet.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::map_err;
use crate::store::StoreResult;

/// How often the WAL is checkpointed in the background.
pub(super) const EVERY: Duration = Duration::from_millis(100);

/// Runs the background checkpoints while it lives.
pub(super) struct Checkpointer {
    /// Dropped with the store, which ends the task.
    _stop: DropGuard,
}

impl Checkpointer {
    /// Opens the checkpoint connection over the database of `options` and starts
    /// checkpointing every `every`.
    pub(super) async fn start(options: SqliteConnectOptions, every: Duration) -> StoreResult<Self> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    () = tokio::time::sleep(every) => {}
                }
                match checkpoint(&pool).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("SQLite WAL checkpoints succeed again");
                    }
                    Ok(()) => {}
                    // A full disk or an I/O error: the writer's own checkpoint still
                    // bounds the WAL; said once until a checkpoint succeeds again.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "SQLite WAL checkpoint failed");
                    }
                    Err(_) => {}
                }
            }
            pool.close().await;
        });
        Ok(Self {
            _stop: stop.drop_guard(),
        })
    }
}

/// Copies what the WAL holds into the database file, as far as the readers allow,
/// without waiting for any connection.
async fn checkpoint(pool: &SqlitePool) -> StoreResult<()> {
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::SqliteStore;

    /// Pages committed well below the writer's automatic checkpoint reach the database
    /// file without another write: the background checkpoint copied them.
    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let store = SqliteStore::open(&path.display().to_string())
            .await
            .unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // About 4 MiB, an eighth of what makes the writer checkpoint.
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
             INSERT INTO feed_outbox (msg_id, owner, payload)
             SELECT i, 'o', hex(randomblob(2000)) FROM n",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let size = std::fs::metadata(&path).unwrap().len();
            if size >= before + 4_000_000 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the database file holds {size} bytes (from {before}) 20 s after the commit"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
