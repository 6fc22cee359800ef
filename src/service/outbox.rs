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
use std::future::Future;
use std::pin::Pin;
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
    IngestRepository, Lease, OutboxEntry, OutboxEvent, OutboxRepository, Recorded, StoreResult,
};

/// Events relayed to the stream.
pub const RELAYED: &str = "twins_feed_events_relayed_total";
/// Events recorded and not yet relayed.
pub const BACKLOG: &str = "twins_feed_outbox_backlog";
/// Seconds from an event's time stamp to the stream's acknowledgement of it.
pub const LAG: &str = "twins_feed_relay_lag_seconds";

/// Counts an event the stream acknowledged, with its lag.
fn count_relayed(entry: &OutboxEntry) {
    metrics::counter!(RELAYED).increment(1);
    let lag = (Utc::now() - entry.time).to_std().unwrap_or_default();
    metrics::histogram!(LAG).record(lag.as_secs_f64());
}

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
    /// The message ids of the events the stream received at or after `since` (by its
    /// own clock) up to its last event when asked, or of its last `limit` events when
    /// there are more.
    async fn stored_since(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Result<HashSet<String>, PublishError>;
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
    /// How often a read starts from the beginning of the outbox rather than after the
    /// last entry read, for entries that committed after one with a larger id was
    /// read ([`HEAD_EVERY`] in the service).
    pub head_every: Duration,
    pub hold_at: Option<HoldAt>,
}

/// Pause after a failure, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest pause between two looks at an outbox that stays empty (the shortest is
/// [`RelaySettings::idle`]): every look is a read of the store.
const IDLE_MAX: Duration = Duration::from_millis(100);

/// How far before the oldest event it reads a relay that (re)starts looks on the
/// stream for copies published before it started: covers a broker clock behind the
/// service's, and events whose time stamps are not in outbox order.
pub const RECONCILE_MARGIN: Duration = Duration::from_secs(300);

/// The most message ids a relay that (re)starts reads from the stream: the latest ones
/// when there are more (those of a relay that died are the stream's last, unless
/// others publish on it too). Copies older than those are kept out by the stream's
/// duplicate window alone.
pub const RECONCILE_LIMIT: usize = 100_000;

/// How often the service's relay reads from the start of the outbox rather than after
/// the last entry it read (see [`OutboxRepository::pending_after`]).
pub const HEAD_EVERY: Duration = Duration::from_millis(250);

/// Moves the outbox onto the stream; see the module docs.
///
/// It runs as a pipeline, not in rounds: reads of the outbox, publishes and removals
/// of what the stream holds overlap, so an event waits neither for the slowest
/// acknowledgement of a batch nor for a removal. At most [`RelaySettings::batch`]
/// events are waiting or being published at a time.
pub struct Relay {
    outbox: Arc<dyn OutboxRepository>,
    lease: Arc<dyn IngestRepository>,
    publisher: Arc<dyn FeedPublisher>,
    settings: RelaySettings,
    recorded: Recorded,
}

type Publishing =
    Pin<Box<dyn Future<Output = (Arc<OutboxEntry>, Result<(), PublishError>)> + Send>>;
/// A read of the outbox (or of what the store handed over) on its way.
type Fetching = Pin<Box<dyn Future<Output = StoreResult<Vec<OutboxEntry>>> + Send>>;
type Reading = Pin<Box<dyn Future<Output = Result<Read, Cause>> + Send>>;

/// What a read brings: entries, and after a (re)start the message ids the stream held
/// from shortly before the oldest of them.
struct Read {
    entries: Vec<OutboxEntry>,
    stored: Option<HashSet<String>>,
}

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
            recorded: Recorded::default(),
        }
    }

    /// Reads the outbox as soon as `recorded` rings (a write of this process recorded
    /// events), not only at its looks.
    pub fn woken_by(mut self, recorded: Recorded) -> Self {
        self.recorded = recorded;
        self
    }

    /// Relays until `stop`; failures are retried with a growing pause. On `stop` no
    /// new event is started; those on their way are awaited and what the stream
    /// acknowledged leaves the outbox.
    pub async fn run(self, stop: CancellationToken) {
        let mut flow = Flow::default();
        let mut inflight: FuturesUnordered<Publishing> = FuturesUnordered::new();
        let mut reading: Option<Reading> = None;
        let mut read_at = tokio::time::Instant::now();
        let mut quiet = self.settings.idle;
        let mut backoff = MIN_BACKOFF;
        let mut failure: Option<Cause> = None;
        loop {
            if flow.removing.is_none() && !flow.acked.is_empty() {
                flow.remove(&self.outbox);
            }
            // After a failure: once nothing is on its way, everything not acknowledged
            // is forgotten (read again later, each twin from its first unpublished
            // event) and the relay pauses.
            if failure.is_some() && inflight.is_empty() && reading.is_none() {
                if let Some(e) = failure.take() {
                    tracing::warn!(error = %e, retry_in = ?backoff, "change feed relay failed");
                }
                flow.forget();
                flow.prepared = false;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                read_at = tokio::time::Instant::now();
                continue;
            }
            let may_read = reading.is_none()
                && failure.is_none()
                && flow.waiting(inflight.len()) < self.settings.batch;
            let removing = async {
                match flow.removing.as_mut() {
                    Some(r) => (&mut r.task).await,
                    None => std::future::pending().await,
                }
            };
            let read_done = async {
                match reading.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some((entry, published)) = inflight.next(), if !inflight.is_empty() => {
                    match published {
                        Ok(()) => {
                            backoff = MIN_BACKOFF;
                            flow.acked.push(entry.id);
                            count_relayed(&entry);
                            if self.settings.hold_at == Some(HoldAt::AfterPublish) {
                                hold("feed-after-publish", flow.acked.len()).await;
                            }
                            // The twin's next event, unless a failure stops the relay.
                            if let Some(next) = flow.next_of(&entry.twin_id)
                                && failure.is_none()
                            {
                                inflight.push(self.publish(next));
                            }
                        }
                        Err(e) => {
                            failure.get_or_insert(e.into());
                        }
                    }
                }
                done = removing => {
                    let ids = flow.removing.take().map(|r| r.ids).unwrap_or_default();
                    let removed: Result<(), Cause> = match done {
                        Ok((_, removed)) => removed.map_err(Into::into),
                        Err(e) => Err(e.into()),
                    };
                    match removed {
                        Ok(()) => {
                            for id in &ids {
                                flow.seen.remove(id);
                            }
                            // A read on its way may have found them still there.
                            if reading.is_some() {
                                flow.gone.extend(ids);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "relayed events left in the outbox; removed again");
                            flow.acked.extend(ids);
                        }
                    }
                }
                read = read_done => {
                    reading = None;
                    let limit = flow.limit;
                    let gone = std::mem::take(&mut flow.gone);
                    match read {
                        Ok(Read { entries, stored }) => {
                            if stored.is_some() {
                                flow.stored = stored;
                            }
                            let full = entries.len() >= limit;
                            let room = self.settings.batch.saturating_sub(flow.waiting(inflight.len()));
                            let fresh: Vec<OutboxEntry> = entries
                                .into_iter()
                                .filter(|e| !flow.seen.contains(&e.id) && !gone.contains(&e.id))
                                .take(room)
                                .collect();
                            let now = tokio::time::Instant::now();
                            // Rings bring reads forward again once one finds something.
                            if !fresh.is_empty() {
                                flow.deaf = false;
                            } else if flow.reading_woken {
                                flow.deaf = true;
                            }
                            if fresh.is_empty() {
                                self.measure_backlog(&mut flow, inflight.len(), full).await;
                                read_at = now + quiet;
                                quiet = (quiet * 2).min(IDLE_MAX.max(self.settings.idle));
                                continue;
                            }
                            quiet = self.settings.idle;
                            read_at = if full { now } else { now + self.settings.idle };
                            if self.settings.hold_at == Some(HoldAt::BeforePublish) {
                                hold("feed-before-publish", fresh.len()).await;
                            }
                            let mut held = 0;
                            for entry in fresh {
                                if flow.held_already(&entry) {
                                    held += 1;
                                } else if let Some(first) = flow.add(entry) {
                                    inflight.push(self.publish(first));
                                }
                            }
                            if held > 0 {
                                tracing::info!(events = held, "events the stream held already leave the outbox unpublished");
                            }
                            self.measure_backlog(&mut flow, inflight.len(), full).await;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                () = tokio::time::sleep_until(read_at), if may_read => {
                    match self.ready(&mut flow).await {
                        Ok(true) => {
                            let room = self.settings.batch.saturating_sub(flow.waiting(inflight.len()));
                            let outbox = self.outbox.clone();
                            // Mostly what was recorded since the last entry read; now
                            // and then from the start, for entries that committed
                            // after one with a larger id was read.
                            let head = flow
                                .head_at
                                .is_none_or(|at| at.elapsed() >= self.settings.head_every);
                            flow.reading_woken = std::mem::take(&mut flow.woken);
                            // What this process's steps handed over right after the
                            // last entry read is what a read would find first.
                            let handed = if head {
                                Vec::new()
                            } else {
                                self.recorded.take_after(flow.last, room)
                            };
                            let read: Fetching = if head {
                                flow.head_at = Some(tokio::time::Instant::now());
                                flow.limit = room + flow.seen.len();
                                let limit = flow.limit;
                                Box::pin(async move { outbox.pending(limit).await })
                            } else if !handed.is_empty() {
                                flow.limit = room;
                                Box::pin(std::future::ready(Ok(handed)))
                            } else {
                                flow.limit = room;
                                let after = flow.last;
                                Box::pin(async move { outbox.pending_after(after, room).await })
                            };
                            reading = Some(self.reconciled(read, flow.stored.is_none()));
                        }
                        Ok(false) => {
                            // Another relay holds the lease and relays what this one
                            // read: forgotten once nothing is on its way.
                            if inflight.is_empty() {
                                flow.forget();
                            }
                            read_at = tokio::time::Instant::now() + IDLE_MAX;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    }
                }
                // After the look above in this order, so that a stream of rings never
                // holds a due read back.
                () = self.recorded.rung(), if may_read => {
                    // Not while rung reads find nothing (an entry not yet readable
                    // holds the outbox back): the pauses then apply.
                    if !flow.deaf {
                        read_at = tokio::time::Instant::now();
                        quiet = self.settings.idle;
                        flow.woken = true;
                    }
                }
            }
        }
        // Stopping: what is on its way is awaited, so that its acknowledgement is not
        // lost, and what the stream holds leaves the outbox.
        while let Some((entry, published)) = inflight.next().await {
            if published.is_ok() {
                flow.acked.push(entry.id);
                count_relayed(&entry);
            }
        }
        if let Some(removal) = flow.removing.take()
            && !matches!(removal.task.await, Ok((_, Ok(()))))
        {
            flow.acked.extend(removal.ids);
        }
        if !flow.acked.is_empty()
            && let Err(e) = self.outbox.relayed(&flow.acked).await
        {
            tracing::debug!(error = %e, "relayed events left in the outbox");
        }
        if flow.leased_at.is_some()
            && let Err(e) = self
                .lease
                .release(&self.settings.lease_group, &self.settings.holder)
                .await
        {
            tracing::debug!(error = %e, "change feed relay lease not released");
        }
    }

    /// `read`, and when `reconcile`, the message ids the stream holds from shortly
    /// before the oldest entry read: a relay that (re)starts may find entries that an
    /// earlier one published and did not remove, and publishing them again would store
    /// them twice once the stream's duplicate window has passed.
    fn reconciled(&self, read: Fetching, reconcile: bool) -> Reading {
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let entries = read.await?;
            let oldest = entries.iter().map(|e| e.time).min();
            let stored = match oldest {
                Some(oldest) if reconcile => {
                    let margin = chrono::Duration::from_std(RECONCILE_MARGIN)
                        .unwrap_or(chrono::Duration::MAX);
                    let since = oldest.checked_sub_signed(margin).unwrap_or(oldest);
                    Some(publisher.stored_since(since, RECONCILE_LIMIT).await?)
                }
                _ => None,
            };
            Ok(Read { entries, stored })
        })
    }

    /// Publishes `entry`'s event, handing the entry back with the outcome.
    fn publish(&self, entry: Arc<OutboxEntry>) -> Publishing {
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let outcome = publisher.publish(&entry).await;
            (entry, outcome)
        })
    }

    /// Whether the relay may read: it holds the lease (taken or renewed when due) and
    /// the stream is prepared.
    async fn ready(&self, flow: &mut Flow) -> Result<bool, Cause> {
        if !self.leased(flow).await? {
            return Ok(false);
        }
        if !flow.prepared {
            self.publisher.prepare().await?;
            flow.prepared = true;
        }
        Ok(true)
    }

    /// Takes or renews the lease when due; false while another relay holds it.
    async fn leased(&self, flow: &mut Flow) -> Result<bool, Cause> {
        let due = flow
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
        match crate::store::lease_within(&*self.lease, &lease).await? {
            Some(_) => {
                if flow.leased_at.is_none() {
                    tracing::info!("change feed relay started");
                }
                flow.leased_at = Some(tokio::time::Instant::now());
                Ok(true)
            }
            None => {
                flow.leased_at = None;
                Ok(false)
            }
        }
    }

    /// Sets the backlog gauge after a read: when the read was not full, every entry
    /// the stream has not acknowledged is waiting or on its way; else a count at most
    /// once a second.
    async fn measure_backlog(&self, flow: &mut Flow, inflight: usize, full: bool) {
        if !full {
            metrics::gauge!(BACKLOG).set(flow.waiting(inflight) as f64);
            return;
        }
        if flow
            .counted_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        flow.counted_at = Some(tokio::time::Instant::now());
        match self.outbox.backlog().await {
            Ok(n) => metrics::gauge!(BACKLOG).set(n as f64),
            Err(e) => tracing::debug!(error = %e, "outbox backlog not counted"),
        }
    }
}

/// What the relay keeps while it runs.
#[derive(Default)]
struct Flow {
    /// When the lease was last taken or renewed (None: not held).
    leased_at: Option<tokio::time::Instant>,
    /// Whether the stream was prepared since the last failure.
    prepared: bool,
    /// Ids of the entries read that are still in the outbox: waiting, being published,
    /// acknowledged, or being removed. A read skips them.
    seen: HashSet<i64>,
    /// Per twin with an event being published: its events read after that one, in
    /// outbox order.
    queues: HashMap<String, VecDeque<Arc<OutboxEntry>>>,
    /// Events in the queues.
    queued: usize,
    /// Ids of entries the stream acknowledged that are still in the outbox.
    acked: Vec<i64>,
    /// The acknowledged entries being removed from the outbox.
    removing: Option<Removal>,
    /// The limit of the read on its way.
    limit: usize,
    /// The largest id read.
    last: i64,
    /// When the last read from the start of the outbox began (None: one is due).
    head_at: Option<tokio::time::Instant>,
    /// Ids removed from the outbox while the read on its way ran: it may hold them.
    gone: HashSet<i64>,
    /// Message ids the stream held when this relay (re)started, not yet met in the
    /// outbox; None until then (a read checks the stream first).
    stored: Option<HashSet<String>>,
    /// A read brought forward by a ring found nothing new: rings do not bring reads
    /// forward until a read finds something.
    deaf: bool,
    /// The next read was brought forward by a ring.
    woken: bool,
    /// The read on its way was brought forward by a ring.
    reading_woken: bool,
    counted_at: Option<tokio::time::Instant>,
}

impl Flow {
    /// Events waiting or being published.
    fn waiting(&self, inflight: usize) -> usize {
        self.queued + inflight
    }

    /// Whether the stream held `entry` when this relay (re)started: then it leaves the
    /// outbox without being published again. A twin's events reach the stream in order,
    /// so those it held come before any it did not.
    fn held_already(&mut self, entry: &OutboxEntry) -> bool {
        let held = self
            .stored
            .as_mut()
            .is_some_and(|ids| !ids.is_empty() && ids.remove(&entry.msg_id));
        if held {
            self.seen.insert(entry.id);
            self.last = self.last.max(entry.id);
            self.acked.push(entry.id);
        }
        held
    }

    /// Takes a newly read entry: returned to be published when its twin has none on
    /// its way, else queued behind the twin's events.
    fn add(&mut self, entry: OutboxEntry) -> Option<Arc<OutboxEntry>> {
        self.seen.insert(entry.id);
        self.last = self.last.max(entry.id);
        let entry = Arc::new(entry);
        match self.queues.get_mut(entry.twin_id.as_str()) {
            Some(queue) => {
                queue.push_back(entry);
                self.queued += 1;
                None
            }
            None => {
                self.queues.insert(entry.twin_id.clone(), VecDeque::new());
                Some(entry)
            }
        }
    }

    /// The twin's next event, once the one before is acknowledged.
    fn next_of(&mut self, twin_id: &str) -> Option<Arc<OutboxEntry>> {
        let queue = self.queues.get_mut(twin_id)?;
        match queue.pop_front() {
            Some(next) => {
                self.queued -= 1;
                Some(next)
            }
            None => {
                self.queues.remove(twin_id);
                None
            }
        }
    }

    /// Forgets every event not acknowledged (with nothing on its way): they are read
    /// again.
    fn forget(&mut self) {
        self.head_at = None;
        self.stored = None;
        self.queues.clear();
        self.queued = 0;
        let kept: HashSet<i64> = self
            .acked
            .iter()
            .copied()
            .chain(self.removing.iter().flat_map(|r| r.ids.iter().copied()))
            .collect();
        self.seen = kept;
    }

    /// Starts removing the acknowledged entries from the outbox.
    fn remove(&mut self, outbox: &Arc<dyn OutboxRepository>) {
        let ids = std::mem::take(&mut self.acked);
        let outbox = outbox.clone();
        self.removing = Some(Removal {
            ids: ids.iter().copied().collect(),
            task: tokio::spawn(async move {
                let removed = outbox.relayed(&ids).await;
                (ids, removed)
            }),
        });
    }
}

/// A removal from the outbox on its way: the ids, and the task that hands them back
/// with its outcome.
struct Removal {
    ids: HashSet<i64>,
    task: tokio::task::JoinHandle<(Vec<i64>, StoreResult<()>)>,
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
    use crate::store::TwinRepository;

    /// Publishes into a list; fails the next `fail` publishes, and the first publish of
    /// each message id in `fail_once`; the publishes of the twins in `hang` wait until
    /// `gate` lets them through.
    struct Recording {
        published: Mutex<Vec<OutboxEvent>>,
        fail: Mutex<usize>,
        fail_once: Mutex<HashSet<String>>,
        hang: Mutex<HashSet<String>>,
        gate: tokio::sync::Semaphore,
    }

    impl Default for Recording {
        fn default() -> Self {
            Self {
                published: Mutex::default(),
                fail: Mutex::default(),
                fail_once: Mutex::default(),
                hang: Mutex::default(),
                gate: tokio::sync::Semaphore::new(0),
            }
        }
    }

    impl Recording {
        fn published(&self) -> Vec<OutboxEvent> {
            self.published.lock().unwrap().clone()
        }
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
            let hangs = self.hang.lock().unwrap().contains(&entry.twin_id);
            if hangs {
                self.gate.acquire().await.unwrap().forget();
            }
            // Acknowledgements come back in any order.
            for _ in 0..(event.msg_id.as_bytes()[0] % 4) {
                tokio::task::yield_now().await;
            }
            self.published.lock().unwrap().push(event.clone());
            Ok(())
        }

        async fn stored_since(
            &self,
            _since: DateTime<Utc>,
            _limit: usize,
        ) -> Result<HashSet<String>, PublishError> {
            let published = self.published.lock().unwrap();
            Ok(published.iter().map(|e| e.msg_id.clone()).collect())
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
                idle: Duration::from_millis(1),
                head_every: HEAD_EVERY,
                hold_at: None,
            },
        )
    }

    /// Records `events`, each with a twin of its own name so that the writes do not
    /// meet.
    async fn record(db: &Arc<Memory>, events: &[OutboxEvent]) {
        for (k, e) in events.iter().enumerate() {
            let twin = crate::cache::flaky::twin(&format!("w{k}-{}", e.msg_id), 1, &[]);
            db.save_recorded(&twin, std::slice::from_ref(e))
                .await
                .unwrap();
        }
    }

    /// A running relay, stopped (and awaited) by [`Running::stop`].
    struct Running {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn start(relay: Relay) -> Self {
            let stop = CancellationToken::new();
            let task = tokio::spawn(relay.run(stop.clone()));
            Self { stop, task }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    /// Waits until `done` holds, failing after 10 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 10 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn until_empty(db: &Arc<Memory>) {
        let outbox = db.store().outbox;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while outbox.backlog().await.unwrap() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the outbox is not empty within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A store whose outbox holds five events of twin "t", and a publisher.
    async fn five_events_of_twin_t() -> (Arc<Memory>, Vec<OutboxEvent>, Arc<Recording>) {
        let db = Memory::new();
        let twin = crate::cache::flaky::twin("t", 1, &[]);
        let events: Vec<OutboxEvent> = (0..5).map(|n| event("t", n)).collect();
        db.save_recorded(&twin, &events).await.unwrap();
        (db, events, Arc::new(Recording::default()))
    }

    /// A relay that died after the stream acknowledged events, before they left the
    /// outbox: the next one finds them on the stream and removes them unpublished, so
    /// nothing is stored twice however long after it runs (the stream's duplicate
    /// window is not what keeps the copies out).
    #[tokio::test]
    async fn a_relay_that_starts_leaves_out_what_an_earlier_one_published() {
        let (db, events, publisher) = five_events_of_twin_t().await;
        // What the relay before this one published, then died.
        publisher
            .published
            .lock()
            .unwrap()
            .extend_from_slice(&events[..3]);
        let running = Running::start(relay(&db, publisher.clone(), "a"));
        until_empty(&db).await;
        running.stop().await;
        assert_eq!(publisher.published(), events, "each event once, in order");
    }

    #[tokio::test]
    async fn events_are_relayed_in_outbox_order_and_removed_once_acknowledged() {
        let (db, events, publisher) = five_events_of_twin_t().await;
        *publisher.fail.lock().unwrap() = 1;
        let running = Running::start(relay(&db, publisher.clone(), "a"));
        until("5 events published", || publisher.published().len() >= 5).await;
        until_empty(&db).await;
        running.stop().await;
        assert_eq!(publisher.published(), events);

        // Another holder does not read while the lease runs: the outbox keeps the
        // event.
        let held = relay(&db, publisher.clone(), "a");
        assert!(held.leased(&mut Flow::default()).await.unwrap());
        db.save_recorded(&crate::cache::flaky::twin("u", 1, &[]), &[event("u", 9)])
            .await
            .unwrap();
        let other = relay(&db, publisher.clone(), "b");
        assert!(!other.ready(&mut Flow::default()).await.unwrap());
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 1);
        assert_eq!(publisher.published().len(), 5);
    }

    /// Counts the reads of the outbox it wraps.
    struct CountingReads {
        inner: Arc<dyn OutboxRepository>,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl OutboxRepository for CountingReads {
        async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.pending(limit).await
        }
        async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.pending_after(after, limit).await
        }
        async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
            self.inner.relayed(ids).await
        }
        async fn backlog(&self) -> StoreResult<u64> {
            self.inner.backlog().await
        }
    }

    #[tokio::test]
    async fn rings_whose_reads_find_nothing_do_not_make_the_relay_read_at_each_ring() {
        let db = Memory::new();
        let store = db.store();
        let counting = Arc::new(CountingReads {
            inner: store.outbox,
            reads: Default::default(),
        });
        let recorded = Recorded::default();
        let mut relay = relay(&db, Arc::new(Recording::default()), "a").woken_by(recorded.clone());
        relay.outbox = counting.clone();
        // Pauses of 1 ms doubling up to 100 ms while the outbox stays empty.
        relay.settings.idle = Duration::from_millis(1);
        let running = Running::start(relay);
        // Rings with nothing to read, as when the entry written is not readable yet,
        // every 2 ms for 400 ms: reading at each would be about 200 reads, the pauses
        // alone about 10.
        let until = tokio::time::Instant::now() + Duration::from_millis(400);
        while tokio::time::Instant::now() < until {
            recorded.ring();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        running.stop().await;
        let reads = counting.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reads < 40, "{reads} reads in 400 ms");
    }

    #[tokio::test]
    async fn a_ring_makes_the_relay_read_before_its_next_look() {
        let db = Memory::new();
        let publisher = Arc::new(Recording::default());
        let recorded = Recorded::default();
        let mut relay = relay(&db, publisher.clone(), "a").woken_by(recorded.clone());
        // After a read that found something, the next look is an hour away.
        relay.settings.idle = Duration::from_secs(3600);
        record(&db, &[event("t", 0)]).await;
        let running = Running::start(relay);
        until("the first event published", || {
            publisher.published().len() == 1
        })
        .await;
        record(&db, &[event("u", 1)]).await;
        recorded.ring();
        until("the rung event published", || {
            publisher.published().len() == 2
        })
        .await;
        until_empty(&db).await;
        running.stop().await;
    }

    /// The outbox it wraps, whose reads never answer once `frozen`.
    struct Freezable {
        inner: Arc<dyn OutboxRepository>,
        frozen: std::sync::atomic::AtomicBool,
    }

    impl Freezable {
        async fn wait_if_frozen(&self) {
            if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        }
    }

    #[async_trait]
    impl OutboxRepository for Freezable {
        async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.wait_if_frozen().await;
            self.inner.pending(limit).await
        }
        async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.wait_if_frozen().await;
            self.inner.pending_after(after, limit).await
        }
        async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
            self.inner.relayed(ids).await
        }
        async fn backlog(&self) -> StoreResult<u64> {
            self.inner.backlog().await
        }
    }

    /// A relay over `db` whose reads can be frozen, woken by `recorded`, reading only
    /// when rung (its looks and its reads from the start an hour apart); with the
    /// events of `first` recorded and published.
    async fn rung_relay(
        db: &Arc<Memory>,
        publisher: &Arc<Recording>,
        recorded: &Recorded,
        first: &[OutboxEvent],
    ) -> (Running, Arc<Freezable>) {
        let reads = Arc::new(Freezable {
            inner: db.store().outbox,
            frozen: Default::default(),
        });
        let mut relay = relay(db, publisher.clone(), "a").woken_by(recorded.clone());
        relay.outbox = reads.clone();
        relay.settings.idle = Duration::from_secs(3600);
        relay.settings.head_every = Duration::from_secs(3600);
        record(db, first).await;
        let running = Running::start(relay);
        until("the first events published", || {
            publisher.published().len() == first.len()
        })
        .await;
        until_empty(db).await;
        (running, reads)
    }

    /// The entries of `events`, recorded after the entry `last`, as the outbox holds
    /// them.
    async fn recorded_after(
        db: &Arc<Memory>,
        last: i64,
        events: &[OutboxEvent],
    ) -> Vec<OutboxEntry> {
        record(db, events).await;
        let entries = db.store().outbox.pending_after(last, 100).await.unwrap();
        assert_eq!(entries.len(), events.len());
        entries
    }

    /// Waits until `want` is published (in any order: acknowledgements of different
    /// twins come back in any order) and the outbox is empty, then stops the relay.
    async fn all_published(
        db: &Arc<Memory>,
        publisher: &Recording,
        running: Running,
        mut want: Vec<OutboxEvent>,
    ) {
        until("every event published", || {
            publisher.published().len() >= want.len()
        })
        .await;
        let mut got = publisher.published();
        got.sort_by(|a, b| a.msg_id.cmp(&b.msg_id));
        want.sort_by(|a, b| a.msg_id.cmp(&b.msg_id));
        assert_eq!(got, want);
        until_empty(db).await;
        running.stop().await;
    }

    /// A relay that published a first event is rung with two more events recorded,
    /// of which `handed` picks those handed over; once the first is published, its
    /// reads never answer when `frozen`. Every event is published once.
    async fn hand_over_after_a_first_event(
        frozen: bool,
        handed: fn(Vec<OutboxEntry>) -> Vec<OutboxEntry>,
    ) {
        let db = Memory::new();
        let publisher = Arc::new(Recording::default());
        let recorded = Recorded::default();
        let first = [event("t", 0)];
        let (running, reads) = rung_relay(&db, &publisher, &recorded, &first).await;
        reads
            .frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
        let next = [event("u", 1), event("v", 2)];
        let entries = recorded_after(&db, 0, &next).await;
        recorded.hand_over(handed(entries));
        recorded.ring();
        all_published(
            &db,
            &publisher,
            running,
            [first.to_vec(), next.to_vec()].concat(),
        )
        .await;
    }

    #[tokio::test]
    async fn entries_handed_over_right_after_the_last_read_are_published_without_a_read() {
        // Reads never answer: what gets published was handed over.
        hand_over_after_a_first_event(true, |entries| entries).await;
    }

    #[tokio::test]
    async fn entries_handed_over_after_a_gap_are_read_in_order_instead() {
        // Only the second handed over (as when a write that hands nothing over
        // committed in between): publishing it first would pass over the other one.
        hand_over_after_a_first_event(false, |entries| entries[1..].to_vec()).await;
    }

    #[tokio::test]
    async fn a_lease_renewal_that_never_answers_fails_and_the_relay_goes_on() {
        let db = Memory::new();
        let publisher = Arc::new(Recording::default());
        // The first renewal (the second lease call) never answers.
        let lease = Arc::new(crate::service::fakes::SilentLease::new(db.clone(), 1));
        let mut relay = relay(&db, publisher.clone(), "a");
        relay.lease = lease.clone();
        relay.settings.lease_ttl = Duration::from_millis(300);
        record(&db, &[event("t", 0)]).await;
        let running = Running::start(relay);
        until("the first event published", || {
            publisher.published().len() == 1
        })
        .await;
        until("the lease renewed", || lease.calls() >= 2).await;
        // Recorded while the renewal hangs: published once it has failed and the
        // lease is taken again.
        record(&db, &[event("u", 1)]).await;
        until("the second event published", || {
            publisher.published().len() == 2
        })
        .await;
        assert!(lease.calls() >= 3, "the lease taken again");
        until_empty(&db).await;
        running.stop().await;
    }

    #[tokio::test]
    async fn twins_are_relayed_side_by_side_each_in_its_order_through_failures() {
        let db = Memory::new();
        let mut recorded: Vec<OutboxEvent> = Vec::new();
        // Writes of three twins interleaved, three events each.
        for n in 0..3 {
            for t in ["a", "b", "c"] {
                recorded.push(event(t, n));
            }
        }
        record(&db, &recorded).await;
        let publisher = Arc::new(Recording::default());
        // The first event of b and the second of c are not acknowledged the first time.
        publisher
            .fail_once
            .lock()
            .unwrap()
            .extend([recorded[1].msg_id.clone(), recorded[5].msg_id.clone()]);
        let mut r = relay(&db, publisher.clone(), "a");
        r.settings.batch = 9;
        let running = Running::start(r);
        until("9 events published", || publisher.published().len() >= 9).await;
        until_empty(&db).await;
        running.stop().await;
        let published = publisher.published();
        assert_eq!(published.len(), recorded.len(), "each event once");
        for t in ["a", "b", "c"] {
            assert_eq!(
                of_twin(&published, t),
                of_twin(&recorded, t),
                "twin {t} in outbox order"
            );
        }
    }

    #[tokio::test]
    async fn a_twin_slow_to_be_acknowledged_holds_back_only_its_own_events() {
        let db = Memory::new();
        // slow's first event, then events of other twins, then slow's second.
        let mut recorded = vec![event("slow", 0)];
        recorded.extend((0..6).map(|n| event(&format!("t{n}"), n)));
        recorded.push(event("slow", 1));
        record(&db, &recorded).await;
        let publisher = Arc::new(Recording::default());
        publisher.hang.lock().unwrap().insert("slow".into());
        let running = Running::start(relay(&db, publisher.clone(), "a"));
        // With at most two events waiting or on their way, the six after slow's first
        // get through while it hangs; slow's second waits for it.
        until("the other twins' events published", || {
            publisher.published().len() >= 6
        })
        .await;
        assert!(of_twin(&publisher.published(), "slow").is_empty());
        publisher.gate.add_permits(2);
        until_empty(&db).await;
        running.stop().await;
        let published = publisher.published();
        assert_eq!(published.len(), recorded.len(), "each event once");
        assert_eq!(of_twin(&published, "slow"), of_twin(&recorded, "slow"));
    }

    /// An outbox whose removals wait for a go-ahead, and fail while told to; a read from
    /// the start takes what the outbox holds, then waits for its own go-ahead before it
    /// answers.
    struct SlowOutbox {
        inner: Arc<dyn OutboxRepository>,
        go: tokio::sync::Semaphore,
        fail: Mutex<usize>,
        answer: tokio::sync::Semaphore,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl SlowOutbox {
        fn new(db: &Arc<Memory>, fail: usize) -> Arc<Self> {
            Arc::new(Self {
                inner: db.store().outbox,
                go: tokio::sync::Semaphore::new(0),
                fail: Mutex::new(fail),
                answer: tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS),
                reads: Default::default(),
            })
        }

        fn reads(&self) -> usize {
            self.reads.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl OutboxRepository for SlowOutbox {
        async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            let read = self.inner.pending(limit).await;
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.answer.acquire().await.unwrap().forget();
            read
        }

        async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
            self.inner.pending_after(after, limit).await
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
    async fn events_are_published_while_earlier_ones_leave_the_outbox_and_never_twice() {
        let db = Memory::new();
        let recorded: Vec<OutboxEvent> = (0..6).map(|n| event(&format!("t{}", n % 2), n)).collect();
        record(&db, &recorded).await;
        let publisher = Arc::new(Recording::default());
        let mut r = relay(&db, publisher.clone(), "a");
        let outbox = SlowOutbox::new(&db, 1);
        r.outbox = outbox.clone();
        let running = Running::start(r);
        // Every event is published while the first removal waits; reads skip what is
        // still in the outbox.
        until("6 events published", || publisher.published().len() >= 6).await;
        // The first removal fails; its entries are removed again.
        outbox.go.add_permits(100);
        until_empty(&db).await;
        running.stop().await;
        let published = publisher.published();
        assert_eq!(published.len(), recorded.len(), "each event once");
        for t in ["t0", "t1"] {
            assert_eq!(
                of_twin(&published, t),
                of_twin(&recorded, t),
                "twin {t} in outbox order"
            );
        }
    }

    #[tokio::test]
    async fn a_stopped_relay_removes_what_the_stream_acknowledged() {
        let db = Memory::new();
        let recorded: Vec<OutboxEvent> = (0..4).map(|n| event(&format!("t{n}"), n)).collect();
        record(&db, &recorded).await;
        let publisher = Arc::new(Recording::default());
        let mut r = relay(&db, publisher.clone(), "a");
        r.settings.batch = 8;
        let outbox = SlowOutbox::new(&db, 0);
        r.outbox = outbox.clone();
        let running = Running::start(r);
        until("4 events published", || publisher.published().len() >= 4).await;
        outbox.go.add_permits(100);
        running.stop().await;
        assert_eq!(db.store().outbox.backlog().await.unwrap(), 0);
        // The lease was released: another relay takes it at once.
        let other = relay(&db, publisher.clone(), "b");
        assert!(other.leased(&mut Flow::default()).await.unwrap());
    }

    #[tokio::test]
    async fn a_read_that_began_before_a_removal_does_not_publish_what_was_removed() {
        let db = Memory::new();
        let recorded: Vec<OutboxEvent> = (0..2).map(|n| event(&format!("t{n}"), n)).collect();
        record(&db, &recorded).await;
        let publisher = Arc::new(Recording::default());
        let mut r = relay(&db, publisher.clone(), "a");
        let outbox = SlowOutbox::new(&db, 0);
        outbox
            .answer
            .forget_permits(tokio::sync::Semaphore::MAX_PERMITS);
        outbox.answer.add_permits(1);
        r.outbox = outbox.clone();
        let running = Running::start(r);
        // The first read answers; both events are published, and their removal waits
        // while the next read from the start takes the outbox as it is, both entries
        // still in it.
        until("2 events published", || publisher.published().len() >= 2).await;
        until("a second read from the start", || outbox.reads() >= 2).await;
        // The removal ends before that read answers.
        outbox.go.add_permits(100);
        until_empty(&db).await;
        outbox.answer.add_permits(100);
        until("another read from the start", || outbox.reads() >= 3).await;
        running.stop().await;
        let mut published = publisher.published();
        published.sort_by(|a, b| a.event.twin_id.cmp(&b.event.twin_id));
        assert_eq!(published, recorded, "each event once");
    }
}
