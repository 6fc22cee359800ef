//! The JetStream consumer feeding ingestion: one active instance per group, reading the
//! stream in order from the group's stored position.
//!
//! Why this shape: JetStream redelivers a dead subscriber's unacked messages only after
//! `ack_wait`, after newer ones; any rule that skips "older" messages then loses them.
//! So ordering is not left to delivery. The group's position (the last stream sequence
//! applied) is stored with the states it covers, an instance ingests only while it
//! holds the group's lease in the store, and on taking the lease it recreates the
//! durable consumer named after the group at position + 1. From then on it accepts only
//! first deliveries with consecutive consumer sequences: anything else (a redelivery, a
//! message taken by another client of the consumer) ends the session and the consumer is
//! recreated at the stored position. Each batch moves the position from `from` to `to`
//! with a compare-and-set, so an instance that lost its lease without knowing it
//! (paused, partitioned) cannot write over its successor.
//!
//! Standby instances retry the lease every third of its duration, so one takes over
//! within about one lease duration after the holder dies; on SIGTERM the holder hands
//! back what it buffered (NAK) and releases the lease at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::deadletter::{self, DeadLetters};
use super::inband::Responder;
use super::{STREAM, STREAM_SUBJECTS};
use crate::service::inband::{Kind, classify};
use crate::service::ingest::{Batch, Ingest, IngestError, Message, Rejected};
use crate::store::{Applied, IngestRepository, Lease};

/// Most messages applied in one durable step. Large batches matter under load: a
/// batch touches each busy twin's pages once, however many of its messages it holds
/// (8,192 rather than 4,096: a fifth faster into SQLite, twice as fast into PostgreSQL,
/// a third fewer bytes written per message with a million states stored; BENCHMARKS.md).
/// Under a moderate load a batch holds only what arrived during the previous one.
pub const BATCH: usize = 8192;
/// Gauge of the stream sequence of the last message the group applied.
pub const POSITION: &str = "twins_ingest_position";
/// Gauge of the messages not yet delivered to the ingesting instance (the lag).
pub const PENDING: &str = "twins_ingest_pending_messages";
/// Most payload bytes in one batch.
pub const BATCH_BYTES: usize = 4 << 20;
/// Most payload bytes fetched but not yet applied (beside the batch being applied).
/// With [`BATCH_BYTES`] this bounds the memory held by messages whatever they carry.
pub const BUFFER_BYTES: usize = 16 << 20;
/// Messages and bytes asked for per pull request.
const PULL: usize = 1024;
const PULL_BYTES: usize = 4 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the server waits for an ack before redelivering. Batches end far sooner;
/// a batch still being retried is kept by progress acks every [`PROGRESS`].
const ACK_WAIT: Duration = Duration::from_secs(60);
const PROGRESS: Duration = Duration::from_secs(15);
/// A batch that takes this long is logged.
const SLOW_BATCH: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The stream Magistrala publishes to, created when missing with Magistrala's settings.
pub fn stream_config() -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        subjects: vec![STREAM_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(24 * 3600),
        max_message_size: 1 << 20,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The group's durable consumer, reading from `start` (the position + 1). Acking a
/// message acks every earlier one: the position, not the acks, says what is applied.
pub fn consumer_config(durable: &str, start: u64) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.into()),
        filter_subject: STREAM_SUBJECTS.into(),
        ack_policy: consumer::AckPolicy::All,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        },
        ack_wait: ACK_WAIT,
        // Room for the batch being applied and the next ones fetched meanwhile.
        max_ack_pending: (BATCH * 3) as i64,
        ..Default::default()
    }
}

/// Who ingests for which group.
#[derive(Clone)]
pub struct Ingestor {
    pub js: jetstream::Context,
    pub group: String,
    /// This process's name in the lease (unique per process).
    pub holder: String,
    pub lease: Duration,
    pub ingest: Arc<dyn Ingest>,
    pub log: Arc<dyn IngestRepository>,
    /// Answers the inband requests devices publish on their channels.
    pub inband: Option<Responder>,
    /// The channel our notifications go to: neither data nor requests.
    pub own_channel: Option<String>,
}

/// How a session ended.
enum End {
    Shutdown,
    /// Another instance holds the lease.
    Standby,
    /// Start again from the stored position.
    Resync(&'static str),
}

/// A fetched message and its share of the buffer.
type Fetched = (jetstream::Message, OwnedSemaphorePermit);

impl Ingestor {
    /// Ingests (or stands by) until `stop` is cancelled, then releases the lease.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        let mut holding = false;
        while !stop.is_cancelled() {
            let pause = match self.session(&stop).await {
                Ok(End::Shutdown) => break,
                Ok(End::Standby) => {
                    if holding {
                        tracing::info!(group = %self.group, "standing by: another instance ingests");
                    }
                    holding = false;
                    backoff = Duration::from_millis(200);
                    self.lease / 3
                }
                Ok(End::Resync(why)) => {
                    holding = true;
                    tracing::info!(group = %self.group, why, "reading again from the stored position");
                    Duration::from_millis(50)
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "ingestion interrupted; retrying");
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    pause
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => {}
            }
        }
        // Hand over at once rather than after the lease runs out.
        let released = tokio::time::timeout(
            Duration::from_secs(1),
            self.log.release(&self.group, &self.holder),
        )
        .await;
        if !matches!(released, Ok(Ok(()))) {
            tracing::debug!("ingestion lease not released; it runs out by itself");
        }
        tracing::info!("consumer stopped");
    }

    /// Takes the lease, recreates the consumer at the stored position and applies
    /// batches until something ends the session.
    async fn session(&self, stop: &CancellationToken) -> Result<End, BoxError> {
        let stream = self.js.get_or_create_stream(stream_config()).await?;
        self.js
            .get_or_create_stream(deadletter::stream_config())
            .await?;
        // Where a group seen for the first time starts: where this group's consumer
        // had acked to (an upgrade from a version without a stored position), else
        // the end of the stream (new messages only).
        let start = match stream.consumer_info(&self.group).await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(_) => stream.get_info().await?.state.last_sequence,
        };
        let lease = Lease {
            group: self.group.clone(),
            holder: self.holder.clone(),
            ttl: self.lease,
            start,
        };
        let Some(mut position) = self.take_lease(&lease).await? else {
            return Ok(End::Standby);
        };
        self.ingest.reset();
        let last = stream.get_info().await?.state.last_sequence;
        if position > last {
            // The stream was recreated or purged: its sequences start again below the
            // position, and waiting for position + 1 would ignore everything new.
            tracing::error!(
                position,
                last,
                "the stream is behind the group's position; continuing from its end"
            );
            if self.log.rewind(&self.group, position, last).await? == Applied::Fenced {
                return Ok(End::Resync("another instance moved the position"));
            }
            position = last;
        }
        if let Err(e) = stream.delete_consumer(&self.group).await {
            // Usually: there was none. Anything worse fails the creation below.
            tracing::debug!(error = %e, "consumer not deleted");
        }
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer_config(&self.group, position + 1))
            .await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL)
            .max_bytes_per_batch(PULL_BYTES)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await?;
        tracing::info!(group = %self.group, position, "ingesting {STREAM_SUBJECTS}");
        let (mut rx, _reader) = spawn_reader(messages);
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.tick().await;
        let mut next_consumer_seq = 1;
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    hand_back(&mut rx).await;
                    return Ok(End::Shutdown);
                }
                _ = renew.tick() => {
                    if self.take_lease(&lease).await?.is_none() {
                        return Ok(End::Resync("lease lost"));
                    }
                    continue;
                }
                m = rx.recv() => m,
            };
            let Some(first) = first else {
                return Err("message stream ended".into());
            };
            let batch = collect(first?, &mut rx)?;
            let mut expected = next_consumer_seq;
            let mut next_seq = position + 1;
            for (m, _) in &batch {
                let info = m.info()?;
                if info.consumer_sequence != expected || info.delivered != 1 {
                    return Ok(End::Resync("a delivery out of order"));
                }
                if info.stream_sequence != next_seq {
                    // Only messages the stream no longer holds may be passed over.
                    let first = stream.get_info().await?.state.first_sequence;
                    if info.stream_sequence < next_seq || first <= next_seq {
                        return Ok(End::Resync("a stream sequence passed over"));
                    }
                }
                expected += 1;
                next_seq = info.stream_sequence + 1;
            }
            let pending = batch
                .last()
                .and_then(|(m, _)| m.info().ok())
                .map(|i| i.pending);
            let started = tokio::time::Instant::now();
            let applied = self.apply(position, &batch, stop).await?;
            if started.elapsed() >= SLOW_BATCH {
                tracing::warn!(
                    messages = batch.len(),
                    took = ?started.elapsed(),
                    "slow batch: the store is slow or contended"
                );
            }
            match applied {
                Some(to) => {
                    position = to;
                    next_consumer_seq = expected;
                    metrics::gauge!(POSITION).set(position as f64);
                    if let Some(pending) = pending {
                        metrics::gauge!(PENDING).set(pending as f64);
                    }
                }
                None => {
                    nak(batch.iter().map(|(m, _)| m)).await;
                    hand_back(&mut rx).await;
                    return Ok(End::Shutdown);
                }
            }
        }
    }

    /// Takes or renews the group's lease. A store that does not answer within the
    /// lease's own duration fails the session (logged, then retried).
    async fn take_lease(&self, lease: &Lease) -> Result<Option<u64>, BoxError> {
        crate::store::lease_within(&*self.log, lease).await
    }

    /// Applies a batch (retrying what may pass) and acks it; the new position, or None
    /// when the service stopped first.
    async fn apply(
        &self,
        from: u64,
        batch: &[Fetched],
        stop: &CancellationToken,
    ) -> Result<Option<u64>, BoxError> {
        let span = tracing::info_span!(
            "broker.consume",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.batch.message_count = batch.len(),
        );
        crate::telemetry::link_messages(&span, batch.iter().map(|(m, _)| m.headers.as_ref()));
        self.apply_batch(from, batch, stop).instrument(span).await
    }

    async fn apply_batch(
        &self,
        from: u64,
        batch: &[Fetched],
        stop: &CancellationToken,
    ) -> Result<Option<u64>, BoxError> {
        let mut to = from;
        let mut decoded = Vec::with_capacity(batch.len());
        let mut undecodable = Vec::new();
        let mut originals = HashMap::new();
        for (m, _) in batch {
            let seq = m.info()?.stream_sequence;
            to = to.max(seq);
            originals.insert(seq, &m.payload);
            match super::decode(&m.payload) {
                Ok(e) => decoded.push(Message {
                    seq,
                    channel: e.channel,
                    subtopic: e.subtopic,
                    payload: e.payload,
                    created: e.created,
                }),
                Err(e) => {
                    tracing::warn!(seq, reason = "envelope", error = %e, "message rejected");
                    undecodable.push(Rejected {
                        seq,
                        reason: "envelope",
                        twin_id: None,
                    });
                }
            }
        }
        self.answer_inband(&decoded).await;
        let aside = DeadLetters {
            js: &self.js,
            group: &self.group,
            originals,
        };
        let ingest = Batch {
            group: &self.group,
            from,
            to,
            messages: &decoded,
            rejected: &undecodable,
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match keep_while(self.ingest.apply(&ingest, &aside), batch).await {
                Ok(report) => {
                    tracing::debug!(
                        messages = batch.len(),
                        inserted = report.inserted(),
                        updated = report.updated(),
                        rejected = report.rejected.len(),
                        duplicates = report.duplicates,
                        "batch applied"
                    );
                    break;
                }
                Err(IngestError::Fenced) => {
                    return Err("another instance moved the position".into());
                }
                Err(IngestError::Transient(e)) => {
                    tracing::warn!(error = %e, ?backoff, "batch not applied; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return Ok(None),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some((last, _)) = batch.last()
            && let Err(e) = last.ack().await
        {
            // The position is stored: a redelivery only makes the session start over.
            tracing::debug!(error = %e, "ack failed");
        }
        Ok(Some(to))
    }

    /// Executes the inband document requests of a batch, once each, in stream order.
    async fn answer_inband(&self, messages: &[Message]) {
        let Some(inband) = &self.inband else {
            return;
        };
        for m in messages {
            if let Kind::Inband(Some(target)) =
                classify(self.own_channel.as_deref(), &m.channel, &m.subtopic)
            {
                inband
                    .on_channel_message(&m.channel, &m.subtopic, target, &m.payload)
                    .await;
            }
        }
    }
}

/// Runs `work`, telling the server every [`PROGRESS`] that the batch is still being
/// worked on, so it is not redelivered meanwhile, and logging that it still is (a store
/// that stopped answering shows in the log, not only as silence).
async fn keep_while<T>(work: impl Future<Output = T>, batch: &[Fetched]) -> T {
    let mut work = std::pin::pin!(work);
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(started + PROGRESS, PROGRESS);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                tracing::warn!(
                    messages = batch.len(),
                    running = ?started.elapsed(),
                    "batch still being applied: the store is slow or does not answer"
                );
                futures::future::join_all(batch.iter().map(|(m, _)| m.ack_with(AckKind::Progress))).await;
            }
        }
    }
}

/// Takes what has arrived after `first`, up to [`BATCH`] messages and [`BATCH_BYTES`].
fn collect(
    first: Fetched,
    rx: &mut mpsc::Receiver<Result<Fetched, BoxError>>,
) -> Result<Vec<Fetched>, BoxError> {
    let mut bytes = first.0.payload.len();
    let mut batch = vec![first];
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        match rx.try_recv() {
            Ok(m) => {
                let m = m?;
                bytes += m.0.payload.len();
                batch.push(m);
            }
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// A task of its own keeps pulling, so the next messages arrive while a batch is
/// applied; what it buffers is bounded by [`BUFFER_BYTES`]. It stops when dropped.
fn spawn_reader(
    mut messages: consumer::pull::Stream,
) -> (mpsc::Receiver<Result<Fetched, BoxError>>, AbortOnDrop) {
    let budget = Arc::new(Semaphore::new(BUFFER_BYTES));
    let (tx, rx) = mpsc::channel(BATCH * 2);
    let task = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            let item = match m {
                Ok(m) => {
                    let size = m.payload.len().clamp(1, BUFFER_BYTES);
                    let Ok(permit) = budget
                        .clone()
                        .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
                        .await
                    else {
                        break;
                    };
                    Ok((m, permit))
                }
                Err(e) => Err(BoxError::from(e)),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

/// Hands back everything fetched but not applied, so it is delivered again at once.
async fn hand_back(rx: &mut mpsc::Receiver<Result<Fetched, BoxError>>) {
    let mut left = Vec::new();
    while let Ok(Ok((m, _))) = rx.try_recv() {
        left.push(m);
    }
    nak(left.iter()).await;
}

async fn nak<'a>(messages: impl Iterator<Item = &'a jetstream::Message>) {
    futures::future::join_all(messages.map(|m| m.ack_with(AckKind::Nak(None)))).await;
}

/// Aborts the task when dropped, so a reader never outlives its session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::service::fakes::{Memory, SilentLease};
    use crate::service::ingest::{BatchReport, SetAside};

    /// Applies nothing: the messages other tests publish on the shared stream are not
    /// this test's concern.
    struct Nothing;

    #[async_trait]
    impl Ingest for Nothing {
        async fn apply(&self, _: &Batch<'_>, _: &dyn SetAside) -> Result<BatchReport, IngestError> {
            Ok(BatchReport::default())
        }

        fn reset(&self) {}
    }

    /// A lease renewal the store never answers ends the session with an error, within
    /// about the lease's duration, instead of holding ingestion without a word.
    #[tokio::test]
    async fn a_lease_renewal_that_never_answers_ends_the_session() {
        let nats = async_nats::connect("nats://127.0.0.1:4222")
            .await
            .expect("the test broker at 127.0.0.1:4222");
        let js = jetstream::new(nats);
        let group = format!("test-lease-{}", uuid::Uuid::new_v4().simple());
        let log = Arc::new(SilentLease::new(Memory::new(), 1));
        let ingestor = Ingestor {
            js: js.clone(),
            group: group.clone(),
            holder: "holder".into(),
            lease: Duration::from_millis(900),
            ingest: Arc::new(Nothing),
            log: log.clone(),
            inband: None,
            own_channel: None,
        };
        let stop = CancellationToken::new();
        let ended = tokio::time::timeout(Duration::from_secs(20), ingestor.session(&stop)).await;
        if let Ok(stream) = js.get_stream(STREAM).await {
            let _ = stream.delete_consumer(&group).await;
        }
        let ended = ended.expect("the session still waits on the silent lease renewal");
        let error = match ended {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the session ended without an error"),
        };
        assert!(error.contains("did not answer"), "{error}");
        assert_eq!(log.calls(), 2, "taken once, renewed once");
    }
}
