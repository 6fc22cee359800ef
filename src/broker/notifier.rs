//! Publishes the outcome of every operation on the notification channel (SPEC section 6).
//!
//! Publishing is fire-and-forget into the client's buffer: a broker outage is logged
//! and never fails the operation that is being reported. Each message carries the
//! W3C trace context of the operation (`traceparent` header) when traces are exported.

use std::sync::Arc;

use super::{Envelope, encode};
use crate::service::ServiceError;

/// Where notifications go; disabled when no `MG_TWINS_CHANNEL_ID` is configured.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

struct Target {
    client: async_nats::Client,
    channel: String,
}

impl Notifier {
    pub fn new(client: async_nats::Client, channel: Option<String>) -> Self {
        Self {
            target: channel.map(|channel| Arc::new(Target { client, channel })),
        }
    }

    /// A notifier that publishes nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// The channel notifications are published on, which ingestion must skip.
    pub fn channel(&self) -> Option<&str> {
        self.target.as_ref().map(|t| t.channel.as_str())
    }

    /// Publishes `<op>.success` with `payload`, or `<op>.failure` with the error's public
    /// text (never its cause), on `channels.<channel>.messages.<twin_id>.<op>.<outcome>`.
    ///
    /// Opens no span of its own (ingestion notifies once per state write): the message
    /// carries the context of the current span, and callers reporting an API operation
    /// wrap the call in [`publish_span`].
    pub async fn notify(&self, twin_id: &str, op: &str, outcome: Result<Vec<u8>, &ServiceError>) {
        let Some(t) = &self.target else {
            return;
        };
        let (suffix, payload) = match outcome {
            Ok(p) => ("success", p),
            Err(e) => ("failure", e.public_message().into_bytes()),
        };
        let subtopic = format!("messages.{twin_id}.{op}.{suffix}");
        let subject = format!("channels.{}.{subtopic}", t.channel);
        let envelope = Envelope {
            channel: t.channel.clone(),
            subtopic,
            publisher: "twins".into(),
            protocol: "nats".into(),
            payload,
            created: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        };
        let payload = encode(&envelope).into();
        let published = match crate::telemetry::current_headers() {
            Some(headers) => {
                t.client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
            }
            None => t.client.publish(subject.clone(), payload).await,
        };
        if let Err(e) = published {
            tracing::warn!(%subject, error = %e, "notification not published");
        }
    }

    /// Whether notifications are published at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Serialises `value` for a success notification.
    pub async fn notify_json<T: serde::Serialize>(&self, twin_id: &str, op: &str, value: &T) {
        if self.target.is_none() {
            return;
        }
        match serde_json::to_vec(value) {
            Ok(payload) => self.notify(twin_id, op, Ok(payload)).await,
            Err(e) => {
                let e = ServiceError::Internal(e.into());
                self.notify(twin_id, op, Err(&e)).await;
            }
        }
    }
}

/// The span of publishing an API operation's notification (`op` such as `create`).
pub fn publish_span(op: &str) -> tracing::Span {
    tracing::info_span!(
        "broker.publish",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        twins.operation = op,
    )
}
