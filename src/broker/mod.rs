//! The Magistrala message broker (NATS with JetStream): envelopes, subjects, the
//! ingestion consumer and the notifier.

pub mod consumer;
pub mod deadletter;
pub mod notifier;

use prost::Message as _;

pub use crate::proto::messaging::Message as Envelope;

/// JetStream stream that Magistrala publishes channel messages to.
pub const STREAM: &str = "channels";
/// Subjects of that stream.
pub const STREAM_SUBJECTS: &str = "channels.>";

/// Subject of a message on `channel`/`subtopic` (`channels.<channel>[.<subtopic>]`).
pub fn subject(channel: &str, subtopic: &str) -> String {
    if subtopic.is_empty() {
        format!("channels.{channel}")
    } else {
        format!("channels.{channel}.{subtopic}")
    }
}

/// Decodes a protobuf envelope.
pub fn decode(bytes: &[u8]) -> Result<Envelope, prost::DecodeError> {
    Envelope::decode(bytes)
}

/// Encodes a protobuf envelope.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    envelope.encode_to_vec()
}

/// Connects to NATS. Never fails because the server is down: the client keeps trying in
/// the background (and after every disconnection), so the HTTP API serves meanwhile.
pub async fn connect(url: &str) -> Result<async_nats::Client, ConnectError> {
    async_nats::ConnectOptions::new()
        .name("twins")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(|source| ConnectError {
            url: crate::error::redact_url(url),
            source,
        })
}

/// The broker client could not be set up; names the URL without its password.
#[derive(Debug, thiserror::Error)]
#[error("broker at {url}: {source}")]
pub struct ConnectError {
    url: String,
    #[source]
    source: async_nats::ConnectError,
}

impl ConnectError {
    /// Whether connecting again can succeed: not for a malformed URL, rejected
    /// credentials or a broken TLS setup, which stay until the configuration changes.
    pub fn is_transient(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        matches!(
            self.source.kind(),
            Kind::Dns | Kind::TimedOut | Kind::Io | Kind::MaxReconnects
        )
    }
}

#[cfg(test)]
mod connect_tests {
    use std::error::Error as _;

    use super::*;

    #[tokio::test]
    async fn a_malformed_url_is_named_without_its_password() {
        let Err(e) = connect("nats://u:hunter2@nats:notaport").await else {
            panic!("a malformed URL was accepted");
        };
        assert!(!e.is_transient(), "{e}");
        let text = crate::error::chain(&e);
        assert!(text.contains("nats://u:***@nats:notaport"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let source = e.source().expect("the client error");
        assert!(source.downcast_ref::<async_nats::ConnectError>().is_some());
    }
}

/// Whether the client is connected right now.
pub fn is_connected(client: &async_nats::Client) -> bool {
    matches!(
        client.connection_state(),
        async_nats::connection::State::Connected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_with_and_without_subtopic() {
        assert_eq!(subject("ch", ""), "channels.ch");
        assert_eq!(subject("ch", "engine.temp"), "channels.ch.engine.temp");
    }

    #[test]
    fn envelope_round_trip() {
        let e = Envelope {
            channel: "c".into(),
            subtopic: "s".into(),
            publisher: "p".into(),
            protocol: "mqtt".into(),
            payload: b"[]".to_vec(),
            created: 42,
        };
        assert_eq!(decode(&encode(&e)), Ok(e));
        assert!(decode(b"\xff\xff\xff").is_err());
    }
}
