//! The notification channel (SPEC section 6): the broker's adapter of the service's
//! [`Publish`] port.
//!
//! Publishing is fire-and-forget into the client's buffer: a broker outage is logged
//! and never fails the operation that is being reported. Each message carries the
//! W3C trace context of the operation (`traceparent` header) when traces are exported.

use async_trait::async_trait;

use crate::service::notify::{Outcome, Publish};

/// Publishes on `channels.<channel>.messages.<twin_id>.<op>.<success|failure>`.
pub struct Notifier {
    client: async_nats::Client,
    channel: String,
}

impl Notifier {
    pub fn new(client: async_nats::Client, channel: String) -> Self {
        Self { client, channel }
    }
}

#[async_trait]
impl Publish for Notifier {
    async fn publish(&self, twin_id: &str, op: &str, outcome: Outcome) {
        let (suffix, payload) = match outcome {
            Outcome::Success(json) => ("success", json),
            Outcome::Failure(text) => ("failure", text.into_bytes()),
        };
        let subtopic = format!("messages.{twin_id}.{op}.{suffix}");
        let subject = super::subject(&self.channel, &subtopic);
        let envelope = super::envelope(&self.channel, &subtopic, payload);
        if let Err(e) = super::publish(
            &self.client,
            subject.clone(),
            super::encode(&envelope).into(),
        )
        .await
        {
            tracing::warn!(%subject, error = %e, "notification not published");
        }
    }
}
