//! The JetStream consumer feeding ingestion.
//!
//! A durable pull consumer (named by `MG_TWINS_INSTANCE_GROUP`, so instances share the
//! work and messages published while the service is down wait for it) is read in
//! batches: whatever has arrived, up to [`BATCH`], is applied in one durable step and
//! only then acked. A failed step is retried in place (keeping stream order) until it
//! succeeds or the service stops; unacked messages are redelivered later and the
//! per-twin sequence guard skips what was already applied.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::{STREAM, STREAM_SUBJECTS};
use crate::service::ingest::{Incoming, IngestService};

/// Most messages applied in one durable step. Large batches matter under load: a
/// batch touches each busy twin's pages once, however many of its messages it holds.
pub const BATCH: usize = 4096;
/// Messages asked for per pull request.
const PULL: usize = 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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

/// The durable consumer. A new one starts with messages published after its creation
/// rather than replaying a day of history onto every twin.
pub fn consumer_config(durable: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.into()),
        filter_subject: STREAM_SUBJECTS.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::New,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Consumes until `stop` turns true, reconnecting with backoff after any failure.
pub async fn run(
    client: async_nats::Client,
    durable: String,
    ingest: Arc<IngestService>,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(client);
    let mut backoff = Duration::from_millis(200);
    while !*stop.borrow() {
        match consume(&js, &durable, &ingest, &mut stop).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "consumer interrupted; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    tracing::info!("consumer stopped");
}

async fn consume(
    js: &jetstream::Context,
    durable: &str,
    ingest: &IngestService,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), BoxError> {
    let stream = js.get_or_create_stream(stream_config()).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(durable, consumer_config(durable))
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PULL)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await?;
    tracing::info!(consumer = durable, "consuming {STREAM_SUBJECTS}");
    // A task of its own keeps polling the pull stream, so the next messages are
    // fetched while a batch is being applied.
    let (tx, mut rx) = tokio::sync::mpsc::channel(BATCH * 2);
    let reader = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            let failed = m.is_err();
            if tx.send(m).await.is_err() || failed {
                break;
            }
        }
    }));
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = stop.changed() => return Ok(()),
        };
        let first = first.ok_or("message stream ended")??;
        let mut batch = vec![first];
        let mut failure = None;
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        if !apply(ingest, &batch, stop).await {
            return Ok(());
        }
        if let Some(e) = failure {
            drop(reader);
            return Err(e.into());
        }
    }
}

/// Aborts the task when dropped, so a reader never outlives its consumer.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies and acks a batch; false when the service stopped before it could be applied.
/// One span per batch, linked to the trace of every message that carries one (W3C
/// `traceparent` header): tracing never costs per message.
async fn apply(
    ingest: &IngestService,
    batch: &[jetstream::Message],
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let span = tracing::info_span!(
        "broker.consume",
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.batch.message_count = batch.len(),
    );
    crate::telemetry::link_messages(&span, batch.iter().map(|m| m.headers.as_ref()));
    apply_batch(ingest, batch, stop).instrument(span).await
}

async fn apply_batch(
    ingest: &IngestService,
    batch: &[jetstream::Message],
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let incoming: Vec<Incoming> = batch
        .iter()
        .filter_map(|m| {
            m.info().ok().map(|info| Incoming {
                seq: info.stream_sequence,
                data: m.payload.clone(),
            })
        })
        .collect();
    ingest.answer_inband(&incoming).await;
    let mut backoff = Duration::from_millis(200);
    loop {
        match ingest.handle(&incoming).await {
            Ok(report) => {
                tracing::debug!(messages = batch.len(), ?report, "batch applied");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "batch not applied; retrying");
                // Keep the messages ours while we retry, so they are not redelivered.
                futures::future::join_all(batch.iter().map(|m| m.ack_with(AckKind::Progress)))
                    .await;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return false,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    for (m, acked) in batch
        .iter()
        .zip(futures::future::join_all(batch.iter().map(|m| m.ack())).await)
    {
        if let Err(e) = acked {
            tracing::warn!(subject = %m.subject, error = %e, "ack failed; the message will be redelivered and skipped");
        }
    }
    true
}
