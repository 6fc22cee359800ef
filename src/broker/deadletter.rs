//! The dead-letter port: messages that can never be applied are published, with their
//! reason, on `twins.deadletter.<reason>`, captured by the JetStream stream
//! `twins-deadletter` (7 days), so they can be inspected and replayed.
//!
//! Each is published with the original envelope as payload and headers naming the
//! stream sequence, the reason and the twin, and awaited: a message is acked only once
//! its dead letter is stored. `Nats-Msg-Id` makes a republish after a crash a no-op.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;

use crate::service::ingest::{IngestError, Rejected, SetAside};

/// The stream keeping dead letters.
pub const STREAM: &str = "twins-deadletter";
/// Its subjects; `<reason>` is the last token.
pub const SUBJECTS: &str = "twins.deadletter.>";
/// How long dead letters are kept.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Header with the stream sequence of the original message.
pub const SEQUENCE_HEADER: &str = "Twins-Stream-Sequence";
/// Header with the reason.
pub const REASON_HEADER: &str = "Twins-Reason";
/// Header with the twin the message could not be applied to (absent: any twin).
pub const TWIN_HEADER: &str = "Twins-Twin-Id";

pub fn stream_config() -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        max_age: MAX_AGE,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The subject of dead letters with this reason.
pub fn subject(reason: &str) -> String {
    format!("twins.deadletter.{reason}")
}

/// Why a dead letter was not kept (the message then stays unacked).
#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error("dead letter not published: {0}")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
    #[error("dead letter not stored: {0}")]
    Store(#[source] async_nats::jetstream::context::PublishError),
}

/// Dead letters of one batch: the original envelopes by stream sequence.
pub struct DeadLetters<'a> {
    pub js: &'a jetstream::Context,
    pub group: &'a str,
    pub originals: HashMap<u64, &'a Bytes>,
}

#[async_trait]
impl SetAside for DeadLetters<'_> {
    async fn set_aside(&self, rejected: &[Rejected]) -> Result<(), IngestError> {
        let mut acks = Vec::with_capacity(rejected.len());
        for r in rejected {
            let mut headers = HeaderMap::new();
            let twin = r.twin_id.as_deref().unwrap_or("-");
            headers.insert(
                "Nats-Msg-Id",
                format!("{}.{}.{}", self.group, r.seq, twin).as_str(),
            );
            headers.insert(SEQUENCE_HEADER, r.seq.to_string().as_str());
            headers.insert(REASON_HEADER, r.reason);
            if let Some(twin) = &r.twin_id {
                headers.insert(TWIN_HEADER, twin.as_str());
            }
            let payload = self
                .originals
                .get(&r.seq)
                .map(|b| (*b).clone())
                .unwrap_or_default();
            let ack = self
                .js
                .publish_with_headers(subject(r.reason), headers, payload)
                .await
                .map_err(|e| IngestError::Transient(Box::new(DeadLetterError::Publish(e))))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|e| IngestError::Transient(Box::new(DeadLetterError::Store(e))))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letter_subjects_end_with_the_reason() {
        assert_eq!(super::subject("not_json"), "twins.deadletter.not_json");
    }
}
