//! The change feed's stream as a [`FeedSource`]: one live tail per process, fanned out to
//! every follower, and a catch-up read from the stream for a follower that resumes.
//!
//! Why one tail: a consumer per follower makes the broker match every new event against
//! every follower's filter (NATS 2.9 scans its consumers on each message), and holds a
//! consumer per open connection. The tail is one ordered consumer of `twins.events.>`;
//! it hands each event to the followers of its owner (and twin) through a map, so the
//! cost of an event does not grow with the number of followers of other owners.
//!
//! Gap-free and once: a follower registers with the tail and learns the tail's position
//! `L` at that moment; every later event comes through its registration. Events after its
//! cursor up to `L` are read from the stream by an ephemeral pull consumer with the
//! follower's owner-scoped filter, in batches, only as fast as the follower reads. An
//! event at or below the position already delivered is skipped, so the switch from
//! catch-up to live neither loses nor repeats one.
//!
//! Bounded: a registration holds at most `buffer` events. A follower whose buffer is full
//! when the tail has an event for it is dropped by the tail; if it was still catching up
//! it reads the stream again from where it is, otherwise it ends with
//! [`FeedError::Behind`] after the events it holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull, push};
use async_nats::jetstream::{self, Message};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::feed::{FEED_STREAM, FEED_SUBJECTS, FeedRetention, ensure_feed_stream};
use crate::domain::feed::{SUBJECT_PREFIX, StoredEvent};
use crate::service::feed::{
    Bounds, EventStream, FeedError, FeedEvent, FeedSource, subject_matches,
};

/// Name of the counter of followers dropped for a full buffer.
pub const BEHIND: &str = "twins_feed_followers_behind_total";

/// Events read from the stream per catch-up request, and their size at most (above the
/// stream's largest message, which must fit).
const CATCH_UP_BATCH: usize = 256;
const CATCH_UP_BYTES: usize = 8 * 1024 * 1024;
/// How long the broker keeps a catch-up consumer nobody reads (a follower that went away
/// without its consumer being deleted).
const CATCH_UP_IDLE: Duration = Duration::from_secs(60);
/// How long a new follower waits for the tail to (re)start before it is refused.
const TAIL_WAIT: Duration = Duration::from_secs(5);
/// Pauses before the tail starts again after it failed: the first, and the longest
/// (doubling in between while it keeps failing).
const TAIL_RETRY: Duration = Duration::from_secs(1);
const TAIL_RETRY_MAX: Duration = Duration::from_secs(30);

/// The feed over JetStream; cheap to clone, all clones share one tail.
#[derive(Clone)]
pub struct JetStreamFeed {
    js: jetstream::Context,
    hub: Arc<Hub>,
    buffer: usize,
    /// The stream's settings, for creating it again if it is gone (a broker that lost
    /// its storage).
    retention: FeedRetention,
}

impl JetStreamFeed {
    /// A feed whose followers hold at most `buffer` events each (at least 1), over the
    /// stream kept as `retention` says. Nothing is delivered until
    /// [`JetStreamFeed::tail`] runs.
    pub fn new(js: jetstream::Context, buffer: usize, retention: FeedRetention) -> Self {
        Self {
            js,
            hub: Arc::new(Hub::default()),
            buffer: buffer.max(1),
            retention,
        }
    }

    /// Follows the stream's new events and hands them to the followers until `stop`;
    /// then, and whenever the tail fails, followers end (they resume with their last
    /// cursor). A failed tail starts again from the stream's end.
    pub async fn tail(self, stop: CancellationToken) {
        let mut pause = TAIL_RETRY;
        loop {
            let mut started = false;
            let outcome = tokio::select! {
                () = stop.cancelled() => Ok(()),
                outcome = self.follow_tail(&mut started) => outcome,
            };
            self.hub.stop();
            if started {
                pause = TAIL_RETRY;
            }
            match outcome {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => tracing::warn!(?pause, "change feed tail ended; starting it again"),
                Err(e) => tracing::warn!(
                    error = %crate::error::chain(e.as_ref()),
                    ?pause,
                    "change feed tail failed; starting it again"
                ),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(TAIL_RETRY_MAX);
        }
    }

    async fn follow_tail(&self, started: &mut bool) -> Result<(), async_nats::Error> {
        let stream = ensure_feed_stream(&self.js, self.retention).await?;
        let last = stream.cached_info().state.last_sequence;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: FEED_SUBJECTS.into(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        self.hub.start(last);
        *started = true;
        tracing::debug!(position = last, "change feed tail running");
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => self.hub.dispatch(&message)?,
                // The ordered consumer recreates itself after the next event it has.
                Err(e) => tracing::debug!(error = %e, "change feed tail"),
            }
        }
        Ok(())
    }

    async fn register(&self, filters: &Arc<[String]>) -> Result<Registration, FeedError> {
        let mut running = self.hub.running.subscribe();
        let wait = async {
            loop {
                if let Some(registration) = self.hub.register(filters, self.buffer) {
                    return Ok(registration);
                }
                if running.changed().await.is_err() {
                    return Err(unavailable("the change feed tail is gone"));
                }
            }
        };
        tokio::time::timeout(TAIL_WAIT, wait)
            .await
            .unwrap_or_else(|_| Err(unavailable("the change feed tail is not running")))
    }
}

#[async_trait]
impl FeedSource for JetStreamFeed {
    async fn bounds(&self) -> Result<Bounds, FeedError> {
        bounds(&self.js).await
    }

    async fn follow(
        &self,
        filters: Vec<String>,
        after: Option<u64>,
    ) -> Result<EventStream, FeedError> {
        let filters: Arc<[String]> = filters.into();
        let registration = self.register(&filters).await?;
        let position = match after {
            Some(after) => after,
            // From now on: after the last event on the stream, which the tail may not
            // have handed out yet (read after registering, so it is not below the
            // tail's position; the registration's events up to it are skipped).
            None => bounds(&self.js).await?.last.max(registration.from),
        };
        let mut catch_up = None;
        if position < registration.from {
            // Opened by the first read, after the response's head: creating a filtered
            // consumer from an old position makes the broker count what matches from
            // there, which on a long stream takes longer than a client should wait for
            // the head. A broker that cannot create it ends the stream with an error.
            catch_up = Some(CatchUp::new(
                self.js.clone(),
                &filters,
                position,
                registration.from,
            ));
        }
        let reader = Reader {
            feed: self.clone(),
            filters,
            position,
            registration,
            catch_up,
            done: false,
        };
        Ok(futures::stream::unfold(reader, |mut reader| async move {
            reader.next().await.map(|item| (item, reader))
        })
        .boxed())
    }
}

fn unavailable(why: &str) -> FeedError {
    FeedError::Unavailable(why.into())
}

async fn bounds(js: &jetstream::Context) -> Result<Bounds, FeedError> {
    let stream = js
        .get_stream(FEED_STREAM)
        .await
        .map_err(|e| FeedError::Unavailable(Box::new(e)))?;
    let state = &stream.cached_info().state;
    Ok(Bounds {
        // A stream that holds nothing starts after its last sequence.
        first: if state.messages == 0 {
            state.last_sequence + 1
        } else {
            state.first_sequence
        },
        last: state.last_sequence,
    })
}

/// The owner key and twin (None for all twins) a filter built by
/// [`crate::domain::feed::filters`] selects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Scope {
    owner: String,
    twin: Option<String>,
}

impl Scope {
    /// The scope of a subject or filter `twins.events.<ownerKey>.<twin>.<...>`.
    fn of(subject: &str) -> Option<Self> {
        let rest = subject.strip_prefix(SUBJECT_PREFIX)?.strip_prefix('.')?;
        let mut tokens = rest.splitn(3, '.');
        let owner = tokens.next()?.to_owned();
        let twin = match tokens.next()? {
            "*" => None,
            twin => Some(twin.to_owned()),
        };
        Some(Self { owner, twin })
    }
}

/// One follower as the tail sees it.
struct Follower {
    id: u64,
    filters: Arc<[String]>,
    events: mpsc::Sender<FeedEvent>,
    behind: Arc<AtomicBool>,
}

#[derive(Default)]
struct Followers {
    /// Every event up to here is on the stream and was handed out; None while the tail
    /// is not running.
    position: Option<u64>,
    next_id: u64,
    by_scope: HashMap<Scope, Vec<Follower>>,
}

/// The followers of the tail, by the scope of their filters.
#[derive(Default)]
struct Hub {
    followers: Mutex<Followers>,
    /// Changed whenever the tail starts.
    running: watch::Sender<()>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Followers> {
        // A panic while dispatching leaves the map consistent: each step is one insert
        // or removal.
        self.followers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start(&self, position: u64) {
        self.lock().position = Some(position);
        self.running.send_replace(());
    }

    /// Ends every registration: their followers end when they have read what they hold.
    fn stop(&self) {
        let mut followers = self.lock();
        followers.position = None;
        followers.by_scope.clear();
    }

    fn register(self: &Arc<Self>, filters: &Arc<[String]>, buffer: usize) -> Option<Registration> {
        let scope = filters.first().and_then(|f| Scope::of(f))?;
        let mut followers = self.lock();
        let from = followers.position?;
        let id = followers.next_id;
        followers.next_id += 1;
        let (events, receiver) = mpsc::channel(buffer);
        let behind = Arc::new(AtomicBool::new(false));
        followers
            .by_scope
            .entry(scope.clone())
            .or_default()
            .push(Follower {
                id,
                filters: filters.clone(),
                events,
                behind: behind.clone(),
            });
        Some(Registration {
            hub: self.clone(),
            scope,
            id,
            from,
            events: receiver,
            behind,
        })
    }

    fn remove(&self, scope: &Scope, id: u64) {
        let mut followers = self.lock();
        if let Some(list) = followers.by_scope.get_mut(scope) {
            list.retain(|f| f.id != id);
            if list.is_empty() {
                followers.by_scope.remove(scope);
            }
        }
    }

    /// Hands `message` to the followers whose filters match it. Only a message that is
    /// not from the feed's stream is an error (the tail then starts again).
    fn dispatch(&self, message: &Message) -> Result<(), async_nats::Error> {
        let cursor = message.info()?.stream_sequence;
        let subject = message.subject.as_str();
        let mut followers = self.lock();
        followers.position = Some(cursor);
        let Some(scope) = Scope::of(subject) else {
            return Ok(());
        };
        let all_twins = Scope {
            owner: scope.owner.clone(),
            twin: None,
        };
        let scopes = [scope, all_twins];
        if !scopes.iter().any(|s| followers.by_scope.contains_key(s)) {
            return Ok(());
        }
        let event = match StoredEvent::of_message(subject, message.payload.clone()) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(cursor, subject, error = %e, "change feed event not decodable; skipped");
                return Ok(());
            }
        };
        for scope in &scopes {
            let Some(list) = followers.by_scope.get_mut(scope) else {
                continue;
            };
            list.retain(|f| {
                if !f
                    .filters
                    .iter()
                    .any(|filter| subject_matches(filter, subject))
                {
                    return true;
                }
                let item = FeedEvent {
                    cursor,
                    event: event.clone(),
                };
                match f.events.try_send(item) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        ::metrics::counter!(BEHIND).increment(1);
                        f.behind.store(true, Ordering::Release);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            if list.is_empty() {
                followers.by_scope.remove(scope);
            }
        }
        Ok(())
    }
}

/// A follower's place at the tail: the events after `from`, until it is dropped.
struct Registration {
    hub: Arc<Hub>,
    scope: Scope,
    id: u64,
    /// The tail's position when it registered.
    from: u64,
    events: mpsc::Receiver<FeedEvent>,
    /// Set by the tail when it dropped this registration for a full buffer.
    behind: Arc<AtomicBool>,
}

impl Registration {
    fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(&self.scope, self.id);
    }
}

/// One follower's events: catch-up first (when it resumes from before its
/// registration), then the tail's.
struct Reader {
    feed: JetStreamFeed,
    filters: Arc<[String]>,
    /// The last cursor delivered (or the one the follower resumed from).
    position: u64,
    registration: Registration,
    catch_up: Option<CatchUp>,
    done: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<FeedEvent, FeedError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(reading) = self.catch_up.as_mut() {
                match reading.next().await {
                    Some(Ok(event)) => {
                        self.position = event.cursor;
                        return Some(Ok(event));
                    }
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => {
                        self.catch_up = None;
                        if self.registration.is_behind() {
                            // The tail dropped it while the stream was read: read on
                            // from the stream up to where the tail is now.
                            if let Err(e) = self.register_again().await {
                                self.done = true;
                                return Some(Err(e));
                            }
                        }
                        continue;
                    }
                }
            }
            match self.registration.events.recv().await {
                Some(event) if event.cursor <= self.position => continue,
                Some(event) => {
                    self.position = event.cursor;
                    return Some(Ok(event));
                }
                None => {
                    self.done = true;
                    return Some(Err(if self.registration.is_behind() {
                        FeedError::Behind {
                            resume_after: self.position,
                        }
                    } else {
                        unavailable("the change feed tail stopped")
                    }));
                }
            }
        }
    }

    async fn register_again(&mut self) -> Result<(), FeedError> {
        self.registration = self.feed.register(&self.filters).await?;
        if self.position < self.registration.from {
            self.catch_up = Some(CatchUp::new(
                self.feed.js.clone(),
                &self.filters,
                self.position,
                self.registration.from,
            ));
        }
        Ok(())
    }
}

/// The one broker filter of a catch-up: NATS 2.9 takes one filter per consumer, so
/// several kinds are read as all of the owner's (or twin's) events and filtered here.
fn covering(filters: &[String]) -> String {
    match filters {
        [one] => one.clone(),
        _ => {
            let scope: Vec<&str> = filters
                .first()
                .map(|f| f.split('.').take(4).collect())
                .unwrap_or_default();
            format!("{}.>", scope.join("."))
        }
    }
}

/// Reads the events after `position` up to `upto` from the stream.
struct CatchUp {
    js: jetstream::Context,
    filters: Arc<[String]>,
    position: u64,
    upto: u64,
    consumer: Option<consumer::Consumer<pull::Config>>,
    batch: Option<pull::Batch>,
    /// Whether the current batch has not yet been checked against the stream's first
    /// event.
    unchecked: bool,
    finished: bool,
}

impl CatchUp {
    fn new(js: jetstream::Context, filters: &Arc<[String]>, position: u64, upto: u64) -> Self {
        Self {
            js,
            filters: filters.clone(),
            position,
            upto,
            consumer: None,
            batch: None,
            unchecked: false,
            finished: false,
        }
    }

    async fn open(&mut self) -> Result<(), FeedError> {
        let consumer = self
            .js
            .create_consumer_on_stream(
                pull::Config {
                    filter_subject: covering(&self.filters),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: self.position + 1,
                    },
                    ack_policy: AckPolicy::None,
                    inactive_threshold: CATCH_UP_IDLE,
                    memory_storage: true,
                    ..Default::default()
                },
                FEED_STREAM,
            )
            .await
            .map_err(|e| FeedError::Unavailable(Box::new(e)))?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Events read after `position` that the stream no longer holds could have been
    /// skipped by the consumer: the follower must learn its cursor expired.
    async fn check_kept(&mut self) -> Result<(), FeedError> {
        self.unchecked = false;
        let bounds = bounds(&self.js).await?;
        if bounds.first > self.position + 1 {
            return Err(FeedError::Expired {
                oldest: bounds.oldest_cursor(),
            });
        }
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<FeedEvent, FeedError>> {
        loop {
            if self.finished {
                return None;
            }
            if self.consumer.is_none()
                && let Err(e) = self.open().await
            {
                return Some(Err(e));
            }
            let consumer = self.consumer.as_ref()?;
            if self.batch.is_none() {
                let batch = consumer
                    .fetch()
                    .max_messages(CATCH_UP_BATCH)
                    .max_bytes(CATCH_UP_BYTES)
                    .messages()
                    .await;
                match batch {
                    Ok(batch) => self.batch = Some(batch),
                    Err(e) => return Some(Err(FeedError::Unavailable(Box::new(e)))),
                }
                self.unchecked = true;
            }
            let batch = self.batch.as_mut()?;
            let message = match batch.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Some(Err(FeedError::Unavailable(e))),
                None => {
                    let empty = self.unchecked;
                    self.batch = None;
                    if empty {
                        // Nothing more up to the stream's end.
                        self.finished = true;
                        if let Err(e) = self.check_kept().await {
                            return Some(Err(e));
                        }
                    }
                    continue;
                }
            };
            if self.unchecked
                && let Err(e) = self.check_kept().await
            {
                return Some(Err(e));
            }
            let (cursor, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(e) => return Some(Err(FeedError::Unavailable(e))),
            };
            if cursor > self.upto {
                self.finished = true;
                return None;
            }
            self.position = cursor;
            if pending == 0 {
                self.finished = true;
            }
            let subject = message.subject.as_str();
            if !self.filters.iter().any(|f| subject_matches(f, subject)) {
                continue;
            }
            match StoredEvent::of_message(subject, message.payload.clone()) {
                Ok(event) => {
                    return Some(Ok(FeedEvent { cursor, event }));
                }
                Err(e) => {
                    tracing::warn!(cursor, subject, error = %e, "change feed event not decodable; skipped");
                }
            }
        }
    }
}

impl Drop for CatchUp {
    fn drop(&mut self) {
        // The broker would drop it after CATCH_UP_IDLE; deleting it now keeps the number
        // of consumers down to the followers catching up.
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (js, name) = (self.js.clone(), consumer.cached_info().name.clone());
        runtime.spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, FEED_STREAM).await {
                tracing::debug!(consumer = name, error = %e, "catch-up consumer not deleted");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::feed::{EventKind, filters};

    #[test]
    fn scopes_of_filters_and_subjects_agree() {
        let subject = crate::domain::feed::subject("alice", "t1", EventKind::StateCreated);
        let one = Scope::of(&filters("alice", Some("t1"), &[])[0]).unwrap();
        let all = Scope::of(&filters("alice", None, &[EventKind::DocumentPut])[0]).unwrap();
        assert_eq!(Scope::of(&subject), Some(one.clone()));
        assert_eq!(all.twin, None);
        assert_eq!(all.owner, one.owner);
        assert_eq!(Scope::of("other.subject"), None);
    }

    #[test]
    fn catch_up_reads_one_filter_covering_all_kinds() {
        let kinds = [EventKind::StateCreated, EventKind::DocumentPut];
        let filters = filters("alice", Some("t1"), &kinds);
        let cover = covering(&filters);
        assert_eq!(
            cover,
            format!("{}.>", filters[0].rsplitn(3, '.').nth(2).unwrap())
        );
        for kind in kinds {
            let s = crate::domain::feed::subject("alice", "t1", kind);
            assert!(subject_matches(&cover, &s));
        }
        assert!(!subject_matches(
            &cover,
            &crate::domain::feed::subject("alice", "t2", EventKind::StateCreated)
        ));
        assert_eq!(covering(&filters[..1]), filters[0]);
    }
}
