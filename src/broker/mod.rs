//! The Magistrala message broker (NATS with JetStream), a transport driving the
//! service: envelopes and subjects, the ingestion consumer, the inband document API,
//! and the adapters of the service's ports (notifications, dead letters, health).

pub mod consumer;
pub mod deadletter;
pub mod events;
pub mod feed;
pub mod feed_source;
pub mod inband;
pub mod notifier;
pub mod presence;
pub mod relay;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;

use crate::service::health::{Check, Dependency};

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

/// An envelope this service publishes on `channel`/`subtopic`, created now.
pub fn envelope(channel: &str, subtopic: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        channel: channel.to_owned(),
        subtopic: subtopic.to_owned(),
        publisher: "twins".into(),
        protocol: "nats".into(),
        payload,
        created: crate::domain::time::to_nanos(&chrono::Utc::now()),
    }
}

/// Publishes on core NATS with the W3C trace context of the current span when traces
/// are exported: the one way this service publishes (acks and JetStream aside).
pub async fn publish(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    payload: Bytes,
) -> Result<(), async_nats::client::PublishError> {
    match crate::telemetry::current_headers() {
        Some(headers) => client.publish_with_headers(subject, headers, payload).await,
        None => client.publish(subject, payload).await,
    }
}

/// Connects to NATS. Never fails because the server is down: the client keeps trying in
/// the background (and after every disconnection), so the HTTP API serves meanwhile.
pub async fn connect(url: &str) -> Result<async_nats::Client, ConnectError> {
    let shown = crate::error::redact_url(url);
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    async_nats::ConnectOptions::new()
        .name("twins")
        .retry_on_initial_connect()
        .max_reconnects(None)
        // Each change of the connection once, naming the broker (without a password):
        // failed attempts are logged once until a connection succeeds again.
        .event_callback(move |event| {
            let broker = shown.clone();
            let failing = failing.clone();
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                match event {
                    async_nats::Event::Connected => {
                        failing.store(false, SeqCst);
                        tracing::info!(%broker, "broker connected");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%broker, "broker disconnected; reconnecting in the background");
                    }
                    async_nats::Event::ClientError(e) => {
                        if !failing.swap(true, SeqCst) {
                            tracing::warn!(%broker, error = %e, "cannot reach the broker; retrying in the background");
                        }
                    }
                    // One per dropped message of a slow subscriber: not for the log.
                    async_nats::Event::SlowConsumer(_) => {}
                    other => tracing::warn!(%broker, event = %other, "broker"),
                }
            }
        })
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

/// The broker connection as a dependency of the service: not critical, since the API
/// keeps serving while it is away and the client reconnects by itself.
pub struct Connection(pub async_nats::Client);

#[async_trait]
impl Dependency for Connection {
    fn name(&self) -> &'static str {
        "broker"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Check {
        match self.0.connection_state() {
            async_nats::connection::State::Connected => Check::Pass,
            _ => Check::Down("disconnected"),
        }
    }
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
