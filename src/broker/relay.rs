//! The change feed relay's publisher: events onto the `twins-events` stream, each under
//! its `Nats-Msg-Id`, acknowledged by JetStream once stored (or found stored already).

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_trait::async_trait;

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
}
