//! The inband document API's transport (SPEC section 7): requests devices publish on
//! their channel are answered on that channel, and trusted back-end callers are
//! answered over NATS request/reply. What a request means is the service's
//! ([`crate::service::inband`]).
//!
//! Request/reply carries no credentials: anyone who may publish on its subjects may
//! read and write every twin's documents. It is off unless `MG_TWINS_REQUEST_REPLY` is
//! set, under a configurable subject prefix, and a deployment restricts who may publish
//! there with NATS permissions (see the README).

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::service::documents::Access;
use crate::service::inband::{self, Inband, Target};

/// Counter of inband requests on a channel that were not answered, by reason.
pub const UNANSWERED: &str = "twins_inband_unanswered_total";

/// Answers inband requests over the broker.
#[derive(Clone)]
pub struct Responder {
    inband: Inband,
    client: async_nats::Client,
}

impl Responder {
    pub fn new(inband: Inband, client: async_nats::Client) -> Self {
        Self { inband, client }
    }

    /// Executes a request a device published on `channel` and answers on that channel
    /// with subtopic `<request subtopic>.response.<success|error>`.
    #[tracing::instrument(name = "inband.request", skip_all,
        fields(otel.kind = "consumer", twin.id = target.twin_id, document = target.document, op = ?target.op))]
    pub async fn on_channel_message(
        &self,
        channel: &str,
        subtopic: &str,
        target: Target<'_>,
        payload: &[u8],
    ) {
        if !target.names_a_twin() {
            // The answer's subject would carry the made-up id: no answer, counted.
            tracing::debug!("inband request for an id that names no twin: not answered");
            metrics::counter!(UNANSWERED, "reason" => "not_a_twin_id").increment(1);
            return;
        }
        let (ok, body) = self
            .inband
            .answer(Access::Channel(channel), target, payload)
            .await;
        let outcome = if ok { "success" } else { "error" };
        let subtopic = format!("{subtopic}.response.{outcome}");
        let answer = super::envelope(channel, &subtopic, body.to_string().into_bytes());
        let subject = super::subject(channel, &subtopic);
        if let Err(e) = super::publish(&self.client, subject, super::encode(&answer).into()).await {
            tracing::warn!(error = %e, "inband response not published");
        }
    }

    /// Answers request/reply callers on `<prefix>.<twinID>.<document>.<op>` until `stop`
    /// is cancelled. Instances share the subjects through the queue group `group`.
    pub async fn serve(self, prefix: String, group: String, stop: CancellationToken) {
        let subjects = format!("{prefix}.*.*.*");
        tracing::info!(%subjects, "answering inband requests over request/reply");
        let mut sub = match self.client.queue_subscribe(subjects, group).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "inband request subject not subscribed");
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                () = stop.cancelled() => break,
            };
            let Some(msg) = msg else { break };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let span = tracing::info_span!(
                "inband.reply",
                otel.kind = "server",
                messaging.destination.name = msg.subject.as_str(),
            );
            crate::telemetry::set_message_parent(&span, msg.headers.as_ref());
            self.reply(&prefix, &msg, reply).instrument(span).await;
        }
        let _ = sub.unsubscribe().await;
    }

    /// Executes a request/reply request and answers on its reply subject.
    async fn reply(&self, prefix: &str, msg: &async_nats::Message, reply: async_nats::Subject) {
        let body = match inband::parse_request(prefix, msg.subject.as_str()) {
            Some(target) => {
                self.inband
                    .answer(Access::Trusted, target, &msg.payload)
                    .await
                    .1
            }
            None => inband::bad_address(prefix),
        };
        if let Err(e) = super::publish(&self.client, reply, body.to_string().into()).await {
            tracing::warn!(error = %e, "inband reply not published");
        }
    }
}
