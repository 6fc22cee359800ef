//! Writes made in groups on the writer connection (group commit).
//!
//! Every statement on SQLite is a hop from the calling task to the connection's worker
//! thread and back. A write of the API is several statements inside `BEGIN IMMEDIATE`
//! and `COMMIT`, and while it waits for each hop it holds the one writer connection:
//! under load, the writes queue behind each other's hops, and the machine is partly
//! idle while they do.
//!
//! Writes queued here are made by one task: it takes the writes waiting (up to
//! [`MAX_GROUP`]), makes them one after the other in one transaction and commits once. A caller gets its answer only after that commit, so an answer still
//! means the write is durable. When one write of a group fails, the transaction is
//! rolled back, that write gets its error and the others are made again in a new
//! transaction without it: a write never fails because of another one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{WriteTx, map_err};
use crate::store::{StoreError, StoreResult};

/// Most writes made in one transaction.
const MAX_GROUP: usize = 64;
/// Writes waiting for the writer before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// A write, as its caller gives it: the statements to run in the group's transaction.
/// It may run more than once, in later transactions, when another write of its group
/// fails, so it keeps its inputs and does not consume them.
pub(super) type Statements<T> =
    Box<dyn for<'c> Fn(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>> + Send>;

/// The queue of writes for the writer connection.
pub(super) struct Group {
    queue: mpsc::Sender<Box<dyn Queued>>,
}

impl Group {
    /// Starts the task that makes the queued writes on `writer`; it ends when the
    /// queue is dropped.
    pub(super) fn start(writer: SqlitePool, write_failed: Arc<AtomicBool>) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(run(waiting, writer, write_failed));
        Self { queue }
    }

    /// Makes `statements` in the next group's transaction; their result once it is
    /// committed.
    pub(super) async fn write<T, F>(&self, statements: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            statements: Box::new(statements) as Statements<T>,
            outcome: None,
            reply,
        };
        self.queue
            .send(Box::new(job))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the SQLite writer stopped".into())
}

/// A queued write whatever its result type.
trait Queued: Send {
    /// Runs the write in the open transaction; false when it failed.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;

    /// Answers the caller: its failure, or its result once `commit` succeeded.
    fn answer(self: Box<Self>, commit: Result<(), &StoreError>);
}

struct Job<T> {
    statements: Statements<T>,
    outcome: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T: Send + 'static> Queued for Job<T> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let outcome = (self.statements)(conn).await;
            let done = outcome.is_ok();
            self.outcome = Some(outcome);
            done
        })
    }

    fn answer(self: Box<Self>, commit: Result<(), &StoreError>) {
        let answer = match (self.outcome, commit) {
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(copy(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(StoreError::Internal("a write was never made".into())),
        };
        // A caller that went away no longer needs its answer; its write stands.
        let _ = self.reply.send(answer);
    }
}

/// The same failure for every write of a group whose commit failed.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(c) => StoreError::Unavailable(c.to_string().into()),
        StoreError::Conflict(c) => StoreError::Conflict(c.to_string().into()),
        StoreError::Internal(c) => StoreError::Internal(c.to_string().into()),
    }
}

async fn run(
    mut waiting: mpsc::Receiver<Box<dyn Queued>>,
    writer: SqlitePool,
    write_failed: Arc<AtomicBool>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while waiting.recv_many(&mut group, MAX_GROUP).await > 0 {
        make(&writer, &write_failed, &mut group).await;
    }
}

/// Makes the writes of `group` and answers each of them.
async fn make(
    writer: &SqlitePool,
    write_failed: &Arc<AtomicBool>,
    group: &mut Vec<Box<dyn Queued>>,
) {
    while !group.is_empty() {
        let mut tx = match begin(writer, write_failed).await {
            Ok(tx) => tx,
            Err(e) => {
                for job in group.drain(..) {
                    job.answer(Err(&e));
                }
                return;
            }
        };
        let mut failed = None;
        for (i, job) in group.iter_mut().enumerate() {
            if !job.run(tx.conn()).await {
                failed = Some(i);
                break;
            }
        }
        match failed {
            None => {
                let committed = tx.commit().await;
                for job in group.drain(..) {
                    job.answer(committed.as_ref().map(|_| ()));
                }
            }
            Some(i) => {
                // Nothing of the group is kept: a rollback that fails closes the
                // connection (the next transaction gets a fresh one). As after any
                // failed write, the health check tries a write until one succeeds (a
                // full disk fails writes, not reads).
                write_failed.store(true, Ordering::Relaxed);
                let _ = tx.rollback().await;
                group.remove(i).answer(Ok(()));
            }
        }
    }
}

async fn begin(writer: &SqlitePool, write_failed: &Arc<AtomicBool>) -> StoreResult<WriteTx> {
    let conn = writer.acquire().await.map_err(map_err)?;
    WriteTx::begin(conn, write_failed.clone()).await
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;

    async fn pools(dir: &std::path::Path) -> (SqlitePool, SqlitePool) {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(dir.join("g.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY NOT NULL)")
            .execute(&writer)
            .await
            .unwrap();
        let reader = SqlitePoolOptions::new()
            .connect_with(options.read_only(true))
            .await
            .unwrap();
        (writer, reader)
    }

    fn insert(group: &Group, k: String) -> impl Future<Output = StoreResult<String>> + '_ {
        group.write(move |conn| {
            let k = k.clone();
            Box::pin(async move {
                sqlx::query("INSERT INTO t (k) VALUES (?)")
                    .bind(&k)
                    .execute(conn)
                    .await
                    .map_err(map_err)?;
                Ok(k)
            })
        })
    }

    /// Concurrent writes, one of which collides with a stored key: that one gets its
    /// conflict, every other is answered with its own result and was committed when
    /// answered (another connection reads it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_failing_write_fails_alone_and_answers_follow_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, reader) = pools(dir.path()).await;
        let group = Group::start(writer, Arc::default());
        insert(&group, "taken".into()).await.unwrap();
        for round in 0..5 {
            let keys: Vec<String> = (0..200)
                .map(|i| {
                    if i == 77 {
                        "taken".to_owned()
                    } else {
                        format!("{round}-{i}")
                    }
                })
                .collect();
            let answers =
                futures::future::join_all(keys.iter().map(|k| insert(&group, k.clone()))).await;
            for (k, answer) in keys.iter().zip(answers) {
                match answer {
                    Ok(got) => {
                        assert_eq!(&got, k);
                        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE k = ?")
                            .bind(k)
                            .fetch_one(&reader)
                            .await
                            .unwrap();
                        assert_eq!(n, 1, "{k} answered but not committed");
                    }
                    Err(e) => {
                        assert_eq!(k, "taken", "{k}: {e}");
                        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
                    }
                }
            }
        }
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&reader)
            .await
            .unwrap();
        assert_eq!(n, 1 + 5 * 199);
    }

    /// A failed write makes the health check try a write, as a failed transaction did
    /// before writes were grouped; the next commit clears that.
    #[tokio::test]
    async fn a_failed_write_is_reported_until_a_commit_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _reader) = pools(dir.path()).await;
        let failed = Arc::<AtomicBool>::default();
        let group = Group::start(writer, failed.clone());
        insert(&group, "k".into()).await.unwrap();
        assert!(!failed.load(Ordering::Relaxed));
        assert!(insert(&group, "k".into()).await.is_err());
        assert!(failed.load(Ordering::Relaxed));
        insert(&group, "other".into()).await.unwrap();
        assert!(!failed.load(Ordering::Relaxed));
    }
}
