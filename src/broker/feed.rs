//! The change feed's JetStream stream (SPEC 12): where committed changes are relayed
//! and where the SSE endpoints and back-end services read them.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// The feed's stream.
pub const FEED_STREAM: &str = "twins-events";
/// Its subjects: `twins.events.<ownerKey>.<twinID>.<kind>` (see
/// [`crate::domain::feed::subject`]).
pub const FEED_SUBJECTS: &str = "twins.events.>";
/// How long the feed's stream keeps what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedRetention {
    /// Events older than this are dropped (`MG_TWINS_EVENTS_MAX_AGE`).
    pub max_age: Duration,
    /// How long the stream remembers a `Nats-Msg-Id`: a relay that republishes an event
    /// within this time after a crash is de-duplicated by the server
    /// (`MG_TWINS_EVENTS_DUPLICATE_WINDOW`).
    pub duplicate_window: Duration,
}

impl FeedRetention {
    /// The duplicate window the stream gets: JetStream refuses one longer than the
    /// max age.
    pub fn window(&self) -> Duration {
        self.duplicate_window.min(self.max_age)
    }
}

/// The feed stream's settings: limits retention, file storage.
pub fn feed_stream_config(retention: FeedRetention) -> stream::Config {
    stream::Config {
        name: FEED_STREAM.into(),
        subjects: vec![FEED_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        max_age: retention.max_age,
        duplicate_window: retention.window(),
        max_message_size: 4 * 1024 * 1024,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates the feed stream, or brings an existing one's max age and duplicate window to
/// `retention`.
pub async fn ensure_feed_stream(
    js: &jetstream::Context,
    retention: FeedRetention,
) -> Result<stream::Stream, async_nats::Error> {
    let config = feed_stream_config(retention);
    match js.get_stream(FEED_STREAM).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.max_age != retention.max_age
                || info.config.duplicate_window != retention.window()
            {
                js.update_stream(config).await?;
            }
            Ok(js.get_stream(FEED_STREAM).await?)
        }
        Err(_) => Ok(js.get_or_create_stream(config).await?),
    }
}
