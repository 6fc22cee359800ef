//! The change feed relay's publisher: events onto the `twins-events` stream, each under
//! its `Nats-Msg-Id`, acknowledged by JetStream once stored (or found stored already).

use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;

use super::feed::{FEED_STREAM, FeedRetention, ensure_feed_stream};
use crate::service::outbox::{FeedPublisher, PublishError};
use crate::store::OutboxEntry;

/// Publishes change events on the feed's stream.
pub struct StreamPublisher {
    js: jetstream::Context,
    retention: FeedRetention,
}

impl StreamPublisher {
    /// Over `js`; the stream keeps events as `retention` says.
    pub fn new(js: jetstream::Context, retention: FeedRetention) -> Self {
        Self { js, retention }
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> PublishError {
    PublishError(Box::new(e))
}

#[async_trait]
impl FeedPublisher for StreamPublisher {
    async fn prepare(&self) -> Result<(), PublishError> {
        ensure_feed_stream(&self.js, self.retention)
            .await
            .map(|_| ())
            .map_err(PublishError)
    }

    async fn publish(&self, entry: &OutboxEntry) -> Result<(), PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, entry.msg_id.as_str());
        let subject = entry.subject();
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, entry.payload.clone().into())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        if ack.stream != FEED_STREAM {
            return Err(PublishError(
                format!(
                    "{subject} was stored by stream {}, not {FEED_STREAM}",
                    ack.stream
                )
                .into(),
            ));
        }
        Ok(())
    }

    async fn stored_since(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Result<HashSet<String>, PublishError> {
        let mut stream = self.js.get_stream(FEED_STREAM).await.map_err(unavailable)?;
        let state = stream.info().await.map_err(unavailable)?.state.clone();
        let since = consumer::DeliverPolicy::ByStartTime { start_time: since };
        let (consumer, pending) = scan(&stream, since).await?;
        let limit = u64::try_from(limit).unwrap_or(u64::MAX).max(1);
        let consumer = if pending > limit {
            drop_scan(&stream, &consumer).await;
            tracing::warn!(
                events = pending,
                checked = limit,
                "change feed relay: more events on the stream since its oldest entry than it checks; only the latest are"
            );
            let start_sequence = state
                .last_sequence
                .saturating_sub(limit - 1)
                .max(state.first_sequence);
            let latest = consumer::DeliverPolicy::ByStartSequence { start_sequence };
            scan(&stream, latest).await?.0
        } else {
            consumer
        };
        let ids = read_ids(&consumer, state.last_sequence).await;
        drop_scan(&stream, &consumer).await;
        ids
    }
}

/// How long the server keeps a scan's consumer that nobody reads.
const SCAN_IDLE: Duration = Duration::from_secs(30);

/// The longest wait for the next event of a scan.
const SCAN_WAIT: Duration = Duration::from_secs(10);

/// A consumer of the stream's message ids from `from`, and how many events it has.
async fn scan(
    stream: &jetstream::stream::Stream,
    from: consumer::DeliverPolicy,
) -> Result<(consumer::PullConsumer, u64), PublishError> {
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: from,
            ack_policy: consumer::AckPolicy::None,
            headers_only: true,
            memory_storage: true,
            inactive_threshold: SCAN_IDLE,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let pending = consumer.cached_info().num_pending;
    Ok((consumer, pending))
}

/// Deletes a scan's consumer; the server removes it after [`SCAN_IDLE`] should this
/// fail.
async fn drop_scan(stream: &jetstream::stream::Stream, consumer: &consumer::PullConsumer) {
    let _ = stream.delete_consumer(&consumer.cached_info().name).await;
}

/// The message ids `consumer` delivers up to the stream sequence `last`.
async fn read_ids(
    consumer: &consumer::PullConsumer,
    last: u64,
) -> Result<HashSet<String>, PublishError> {
    let mut ids = HashSet::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(ids);
    }
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1024)
        .messages()
        .await
        .map_err(unavailable)?;
    loop {
        let message = match tokio::time::timeout(SCAN_WAIT, messages.next()).await {
            Ok(Some(m)) => m.map_err(unavailable)?,
            Ok(None) => return Err(PublishError("the feed stream scan ended early".into())),
            Err(_) => return Err(PublishError("the feed stream scan stalled".into())),
        };
        if let Some(id) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        {
            ids.insert(id.as_str().to_owned());
        }
        if message.info().map_err(PublishError)?.stream_sequence >= last {
            return Ok(ids);
        }
    }
}
