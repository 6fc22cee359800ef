//! The change feed's JetStream stream (SPEC 12): where committed changes are relayed
//! and where the SSE endpoints and back-end services read them.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// The feed's stream.
pub const FEED_STREAM: &str = "twins-events";
/// Its subjects: `twins.events.<ownerKey>.<twinID>.<kind>` (see
/// [`crate::domain::feed::subject`]).
pub const FEED_SUBJECTS: &str = "twins.events.>";
/// How long the stream remembers a `Nats-Msg-Id`: a relay that republishes an event
/// within this time after a crash is de-duplicated by the server.
pub const FEED_DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 3600);

/// The feed stream's settings: limits retention, events older than `max_age` dropped.
pub fn feed_stream_config(max_age: Duration) -> stream::Config {
    stream::Config {
        name: FEED_STREAM.into(),
        subjects: vec![FEED_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        max_age,
        duplicate_window: FEED_DUPLICATE_WINDOW.min(max_age),
        max_message_size: 4 * 1024 * 1024,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates the feed stream, or brings an existing one's max age to `max_age`.
pub async fn ensure_feed_stream(
    js: &jetstream::Context,
    max_age: Duration,
) -> Result<stream::Stream, async_nats::Error> {
    let config = feed_stream_config(max_age);
    match js.get_stream(FEED_STREAM).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.max_age != max_age {
                js.update_stream(config).await?;
            }
            Ok(js.get_stream(FEED_STREAM).await?)
        }
        Err(_) => Ok(js.get_or_create_stream(config).await?),
    }
}
