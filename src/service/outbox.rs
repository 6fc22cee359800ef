//! The change feed's write side (SPEC 12): the services record each committed change's
//! event in the store's outbox in the change's own durable step ([`change`] builds it);
//! the [`Relay`] puts the outbox on the feed's stream, in outbox order, and removes what
//! the stream holds.
//!
//! Exactly once: an event is removed from the outbox only after the stream acknowledged
//! it, and the stream drops a second copy of a message id it stored within its
//! duplicate window, so a relay that dies between the two publishes it again harmlessly.
//! One relay per store at a time (a lease in the store), and each event of a twin is
//! published only once the twin's event before it is acknowledged, so the stream holds
//! each twin's events in outbox order; events of different twins are published side
//! by side.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{ServiceError, ServiceResult};
use crate::domain::feed::{ChangeEvent, EventKind};
use crate::error::Cause;
use crate::store::{
    IngestRepository, Lease, OutboxEntry, OutboxEvent, OutboxRepository, StoreResult,
};

/// Events relayed to the stream.
pub const RELAYED: &str = "twins_feed_events_relayed_total";
/// Events recorded and not yet relayed.
pub const BACKLOG: &str = "twins_feed_outbox_backlog";

/// The event of a change of `owner`'s twin, with the values before and after it as the
/// API serves them.
pub fn change<T: Serialize>(
    owner: &str,
    kind: EventKind,
    twin_id: &str,
    time: DateTime<Utc>,
    old: Option<&T>,
    new: Option<&T>,
) -> ServiceResult<OutboxEvent> {
    let value = |v: Option<&T>| {
        v.map(serde_json::to_value)
            .transpose()
            .map_err(|e| ServiceError::Internal(e.into()))
    };
    Ok(OutboxEvent::new(
        owner,
        ChangeEvent {
            kind,
            twin_id: twin_id.to_owned(),
            time,
            old: value(old)?,
            new: value(new)?,
        },
    ))
}

/// Why an event did not reach the stream; trying again later may help.
#[derive(Debug, thiserror::Error)]
#[error("feed stream unavailable: {0}")]
pub struct PublishError(#[source] pub Cause);

/// Where the relay puts events (the feed's stream).
#[async_trait]
pub trait FeedPublisher: Send + Sync {
    /// Makes sure the stream exists with its settings; called before publishing and
    /// again after a failure.
    async fn prepare(&self) -> Result<(), PublishError>;
    /// Publishes the entry's event under its message id and returns once the stream
    /// holds it (a copy of an id it holds already is acknowledged without being stored
    /// again).
    async fn publish(&self, entry: &OutboxEntry) -> Result<(), PublishError>;
}

/// A point where a relay stops for good, for tests that kill the process there. Not
/// part of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldAt {
    /// With events read from the outbox, before the first is published.
    BeforePublish,
    /// After the first event of a batch is acknowledged, before it leaves the outbox.
    AfterPublish,
}

impl HoldAt {
    /// `feed-before-publish` or `feed-after-publish`.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "feed-before-publish" => Some(Self::BeforePublish),
            "feed-after-publish" => Some(Self::AfterPublish),
            _ => None,
        }
    }
}

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Name of the store-wide lease, so that one relay runs per store.
    pub lease_group: String,
    pub holder: String,
    pub lease_ttl: Duration,
    /// Entries read from the outbox at a time.
    pub batch: usize,
    /// Pause after relaying less than a batch, and the first pause at an empty outbox
    /// (doubled, up to 100 ms, while it stays empty).
    pub idle: Duration,
    pub hold_at: Option<HoldAt>,
}

/// Pause after a failure, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Moves the outbox onto the stream; see the module docs.
pub struct Relay {
    outbox: Arc<dyn OutboxRepository>,
    lease: Arc<dyn IngestRepository>,
    publisher: Arc<dyn FeedPublisher>,
    settings: RelaySettings,
}

/// What one pass did.
enum Pass {
    /// A full batch was relayed; look again at once.
    Busy,
    /// Less than a batch was relayed; look again after the shortest pause.
    Drained,
    /// Nothing to relay, or another relay holds the lease: pause longer each time, up
    /// to [`IDLE_MAX`].
    Idle,
}

/// The longest pause between two looks at an outbox that stays empty (the shortest is
/// [`RelaySettings::idle`]): every look is a read of the store.
const IDLE_MAX: Duration = Duration::from_millis(100);

impl Relay {
    pub fn new(
        outbox: Arc<dyn OutboxRepository>,
        lease: Arc<dyn IngestRepository>,
        publisher: Arc<dyn FeedPublisher>,
        settings: RelaySettings,
    ) -> Self {
        Self {
            outbox,
            lease,
            publisher,
            settings,
        }
    }

    /// Relays until `stop`; failures are retried with a growing pause.
    pub async fn run(self, stop: CancellationToken) {
        let mut state = RelayState::default();
        let mut backoff = MIN_BACKOFF;
        let mut quiet = self.settings.idle;
        loop {
            let pause = match self.pass(&mut state).await {
                Ok(Pass::Busy) => {
                    backoff = MIN_BACKOFF;
                    quiet = self.settings.idle;
                    None
                }
                Ok(Pass::Drained) => {
                    backoff = MIN_BACKOFF;
                    quiet = self.settings.idle;
                    Some(quiet)
                }
                Ok(Pass::Idle) => {
                    backoff = MIN_BACKOFF;
                    let pause = quiet;
                    quiet = (quiet * 2).min(IDLE_MAX.max(self.settings.idle));
                    Some(pause)
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "change feed relay failed");
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Some(pause)
                }
            };
            if stop.is_cancelled() {
                break;
            }
            if let Some(pause) = pause {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        if let Err(e) = self.removed(&mut state).await {
            tracing::debug!(error = %e, "relayed events left in the outbox");
        }
        if state.leased_at.is_some()
            && let Err(e) = self
                .lease
                .release(&self.settings.lease_group, &self.settings.holder)
                .await
        {
            tracing::debug!(error = %e, "change feed relay lease not released");
        }
    }

    /// Takes or renews the lease when due; false while another relay holds it.
    async fn leased(&self, state: &mut RelayState) -> Result<bool, Cause> {
        let due = state
            .leased_at
            .is_none_or(|at| at.elapsed() >= self.settings.lease_ttl / 3);
        if !due {
            return Ok(true);
        }
        let lease = Lease {
            group: self.settings.lease_group.clone(),
            holder: self.settings.holder.clone(),
            ttl: self.settings.lease_ttl,
            start: 0,
        };
        match self.lease.lease(&lease).await? {
            Some(_) => {
                if state.leased_at.is_none() {
                    tracing::info!("change feed relay started");
                }
                state.leased_at = Some(tokio::time::Instant::now());
                Ok(true)
            }
            None => {
                state.leased_at = None;
                Ok(false)
            }
        }
    }

    /// One look at the outbox: relays at most a batch.
    async fn pass(&self, state: &mut RelayState) -> Result<Pass, Cause> {
        if !self.leased(state).await? {
            return Ok(Pass::Idle);
        }
        // Entries the stream holds already but a failure kept in the outbox: removed
        // without publishing them again.
        if !state.acked.is_empty() && state.removing.is_none() {
            self.outbox.relayed(&state.acked).await?;
            state.acked.clear();
        }
        if !state.prepared {
            self.publisher.prepare().await?;
            state.prepared = true;
        }
        // The entries of the batch before may still be on their way out of the outbox:
        // read past them, and do not publish them again.
        let removing = state.removing.as_ref().map_or(0, |r| r.ids.len());
        let mut pending = self.outbox.pending(self.settings.batch + removing).await?;
        if let Some(r) = &state.removing {
            pending.retain(|e| !r.ids.contains(&e.id));
        }
        pending.truncate(self.settings.batch);
        self.measure_backlog(state, pending.len() + removing).await;
        if pending.is_empty() {
            self.removed(state).await?;
            return Ok(Pass::Idle);
        }
        if self.settings.hold_at == Some(HoldAt::BeforePublish) {
            hold("feed-before-publish", pending.len()).await;
        }
        // Each twin's events in outbox order, one at a time: the next is published
        // once the stream acknowledged the one before. Different twins' events are
        // published side by side.
        let mut queues: HashMap<&str, VecDeque<&OutboxEntry>> = HashMap::new();
        for entry in &pending {
            queues
                .entry(entry.twin_id.as_str())
                .or_default()
                .push_back(entry);
        }
        let publisher = &*self.publisher;
        let publish = |entry| publish_one(publisher, entry);
        let mut inflight = FuturesUnordered::new();
        for queue in queues.values_mut() {
            if let Some(entry) = queue.pop_front() {
                inflight.push(publish(entry));
            }
        }
        let mut failed = None;
        while let Some((entry, published)) = inflight.next().await {
            match published {
                Ok(()) => {
                    state.acked.push(entry.id);
                    metrics::counter!(RELAYED).increment(1);
                    if self.settings.hold_at == Some(HoldAt::AfterPublish) {
                        hold("feed-after-publish", state.acked.len()).await;
                    }
                    // After a failure nothing more is started; what is on its way
                    // is awaited, so that its acknowledgement is not lost.
                    if failed.is_none()
                        && let Some(next) = queues
                            .get_mut(entry.twin_id.as_str())
                            .and_then(VecDeque::pop_front)
                    {
                        inflight.push(publish(next));
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        // The batch before must be out of the outbox before this one starts leaving it
        // (one removal at a time, so that at most two batches are read again).
        let removed = self.removed(state).await;
        if let Some(e) = failed {
            state.prepared = false;
            // What was acknowledged leaves the outbox at the next pass.
            return Err(e.into());
        }
        removed?;
        // Removed while the next batch is read and published.
        let ids = std::mem::take(&mut state.acked);
        let outbox = self.outbox.clone();
        state.removing = Some(Removal {
            ids: ids.iter().copied().collect(),
            task: tokio::spawn(async move {
                let removed = outbox.relayed(&ids).await;
                (ids, removed)
            }),
        });
        Ok(if pending.len() < self.settings.batch {
            Pass::Drained
        } else {
            Pass::Busy
        })
    }

    /// Waits for the removal of the batch before from the outbox, if one is on its
    /// way; when it failed, its entries are removed again by the next pass.
    async fn removed(&self, state: &mut RelayState) -> Result<(), Cause> {
        let Some(removal) = state.removing.take() else {
            return Ok(());
        };
        match removal.task.await {
            Ok((_, Ok(()))) => Ok(()),
            Ok((ids, Err(e))) => {
                state.acked.extend(ids);
                Err(e.into())
            }
            Err(e) => {
                state.acked.extend(removal.ids);
                Err(e.into())
            }
        }
    }

    /// Sets the backlog gauge: the batch read when it was not full, else a count at
    /// most once a second.
    async fn measure_backlog(&self, state: &mut RelayState, read: usize) {
        if read < self.settings.batch {
            metrics::gauge!(BACKLOG).set(read as f64);
            return;
        }
        if state
            .counted_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        state.counted_at = Some(tokio::time::Instant::now());
        match self.outbox.backlog().await {
            Ok(n) => metrics::gauge!(BACKLOG).set(n as f64),
            Err(e) => tracing::debug!(error = %e, "outbox backlog not counted"),
        }
    }
}

/// What a relay keeps between passes.
#[derive(Default)]
struct RelayState {
    /// When the lease was last taken or renewed (None: not held).
    leased_at: Option<tokio::time::Instant>,
    /// Whether the stream was prepared since the last failure.
    prepared: bool,
    /// Ids of entries the stream acknowledged that are still in the outbox (at most a
    /// batch).
    acked: Vec<i64>,
    /// The relayed batch being removed from the outbox.
    removing: Option<Removal>,
    counted_at: Option<tokio::time::Instant>,
}

/// A removal from the outbox on its way: the ids, and the task that hands them back
/// with its outcome.
struct Removal {
    ids: HashSet<i64>,
    task: tokio::task::JoinHandle<(Vec<i64>, StoreResult<()>)>,
}

/// Publishes `entry`'s event, handing the entry back with the outcome.
async fn publish_one<'e>(
    publisher: &dyn FeedPublisher,
    entry: &'e OutboxEntry,
) -> (&'e OutboxEntry, Result<(), PublishError>) {
    (entry, publisher.publish(entry).await)
}

/// Stops this relay for good, saying where, for a test to kill the process.
async fn hold(point: &'static str, events: usize) {
    tracing::warn!(point, events, "change feed relay held");
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::service::fakes::Memory;

    /// Publishes into a list; fails the next `fail` publishes, and the first publish of
    /// each message id in `fail_once`.
    #[derive(Default)]
    struct Recording {
        published: Mutex<Vec<OutboxEvent>>,
        fail: Mutex<usize>,
        fail_once: Mutex<std::collections::HashSet<String>>,
    }

    #[async_trait]
    impl FeedPublisher for Recording {
        async fn prepare(&self) -> Result<(), PublishError> {
            Ok(())
        }

        async fn publish(&self, entry: &OutboxEntry) -> Result<(), PublishError> {
            let event = entry.event().unwrap();
            let refused = {
                let mut fail = self.fail.lock().unwrap();
                let refused = *fail > 0;
                *fail = fail.saturating_sub(1);
                refused || self.fail_once.lock().unwrap().remove(&event.msg_id)
            };
            if refused {
                return Err(PublishError("broker away".into()));
            }
            // Acknowledgements come back in any order.
            for _ in 0..(event.msg_id.as_bytes()[0] % 4) {
                tokio::task::yield_now().await;
            }
            self.published.lock().unwrap().push(event.clone());
            Ok(())
        }
    }

    fn event(twin: &str, n: i64) -> OutboxEvent {
        change(
            "o",
            EventKind::TwinUpdated,
            twin,
            Utc::now(),
            None,
            Some(&serde_json::json!({ "n": n })),
        )
        .unwrap()
    }

    /// The message ids of twin `t`'s events, in their order.
    fn of_twin(events: &[OutboxEvent], t: &str) -> Vec<String> {
        events
            .iter()
            .filter(|e| e.event.twin_id == t)
            .map(|e| e.msg_id.clone())
            .collect()
    }

    fn relay(db: &Arc<Memory>, publisher: Arc<Recording>, holder: &str) -> Relay {
        let store = db.store();
        Relay::new(
            store.outbox,
            store.ingest,
            publisher,
            RelaySettings {
                lease_group: "feed".into(),
                holder: holder.into(),
                lease_ttl: Duration::from_secs(60),
                batch: 2,
                idle: Duration::from_millis(10),
                hold_at: None,
            },
        )
    }

    #[tokio::test]
    async fn events_are_relayed_in_outbox_order_and_removed_once_acknowledged() {
        use crate::store::TwinRepository;
        let db = Memory::new();
        let twin = crate::cache::flaky::twin("t", 1, &[]);
        let events: Vec<OutboxEvent> = (0..5).map(|n| event("t", n)).collect();
        db.save_recorded(&twin, &events).await.unwrap();
        let publisher = Arc::new(Recording::default());
        *publisher.fail.lock().unwrap() = 1;
        let r = relay(&db, publisher.clone(), "a");
        let mut state = RelayState::default();
        assert!(r.pass(&mut state).await.is_err());
        while matches!(r.pass(&mut state).await, Ok(Pass::Busy)) {}
        r.removed(&mut state).await.unwrap();
        assert_eq!(*publisher.published.lock().unwrap(), events);
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 0);

        // Another holder waits while the lease runs.
        db.save_recorded(&crate::cache::flaky::twin("u", 1, &[]), &[event("u", 9)])
            .await
            .unwrap();
        let other = relay(&db, publisher.clone(), "b");
        assert!(matches!(
            other.pass(&mut RelayState::default()).await,
            Ok(Pass::Idle)
        ));
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn twins_are_relayed_side_by_side_each_in_its_order_through_failures() {
        use crate::store::TwinRepository;
        let db = Memory::new();
        let mut recorded: Vec<OutboxEvent> = Vec::new();
        // Writes of three twins interleaved, three events each.
        for n in 0..3 {
            for t in ["a", "b", "c"] {
                let e = vec![event(t, n)];
                let twin = crate::cache::flaky::twin(&format!("{t}{n}"), 1, &[]);
                db.save_recorded(&twin, &e).await.unwrap();
                recorded.extend(e);
            }
        }
        let publisher = Arc::new(Recording::default());
        // The first event of b and the second of c are not acknowledged the first time.
        publisher
            .fail_once
            .lock()
            .unwrap()
            .extend([recorded[1].msg_id.clone(), recorded[5].msg_id.clone()]);
        let mut r = relay(&db, publisher.clone(), "a");
        r.settings.batch = 9;
        let mut state = RelayState::default();
        for _ in 0..10 {
            let _ = r.pass(&mut state).await;
        }
        r.removed(&mut state).await.unwrap();
        let published = publisher.published.lock().unwrap().clone();
        assert_eq!(published.len(), recorded.len(), "each event once");
        for t in ["a", "b", "c"] {
            assert_eq!(
                of_twin(&published, t),
                of_twin(&recorded, t),
                "twin {t} in outbox order"
            );
        }
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 0);
    }

    /// An outbox whose removals wait for a go-ahead, and fail while told to.
    struct SlowOutbox {
        inner: Arc<dyn OutboxRepository>,
        go: tokio::sync::Semaphore,
        fail: Mutex<usize>,
    }

    #[async_trait]
    impl OutboxRepository for SlowOutbox {
        async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.inner.pending(limit).await
        }

        async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
            self.go.acquire().await.unwrap().forget();
            let refused = {
                let mut fail = self.fail.lock().unwrap();
                let refused = *fail > 0;
                *fail = fail.saturating_sub(1);
                refused
            };
            if refused {
                return Err(crate::store::StoreError::Unavailable("store away".into()));
            }
            self.inner.relayed(ids).await
        }

        async fn backlog(&self) -> StoreResult<u64> {
            self.inner.backlog().await
        }
    }

    #[tokio::test]
    async fn a_batch_is_published_while_the_one_before_leaves_the_outbox_and_never_twice() {
        use crate::store::TwinRepository;
        let db = Memory::new();
        let mut recorded = Vec::new();
        for n in 0..6 {
            let e = vec![event(&format!("t{}", n % 2), n)];
            let twin = crate::cache::flaky::twin(&format!("w{n}"), 1, &[]);
            db.save_recorded(&twin, &e).await.unwrap();
            recorded.extend(e);
        }
        let publisher = Arc::new(Recording::default());
        let mut r = relay(&db, publisher.clone(), "a");
        let outbox = Arc::new(SlowOutbox {
            inner: db.store().outbox,
            go: tokio::sync::Semaphore::new(0),
            fail: Mutex::new(1),
        });
        r.outbox = outbox.clone();
        let mut state = RelayState::default();
        // The first batch is published and its removal waits.
        assert!(matches!(r.pass(&mut state).await, Ok(Pass::Busy)));
        assert_eq!(publisher.published.lock().unwrap().len(), 2);
        // The second batch is read past the first, published, and waits for the
        // first's removal, which fails; its entries stay to be removed again.
        outbox.go.add_permits(1);
        assert!(r.pass(&mut state).await.is_err());
        assert_eq!(publisher.published.lock().unwrap().len(), 4);
        outbox.go.add_permits(100);
        for _ in 0..5 {
            let _ = r.pass(&mut state).await;
        }
        r.removed(&mut state).await.unwrap();
        let published = publisher.published.lock().unwrap().clone();
        assert_eq!(published.len(), recorded.len(), "each event once");
        for t in ["t0", "t1"] {
            assert_eq!(
                of_twin(&published, t),
                of_twin(&recorded, t),
                "twin {t} in outbox order"
            );
        }
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 0);
    }
}
