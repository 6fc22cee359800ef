//! The inband document API (SPEC section 7): devices read and write their twin's
//! documents through the broker instead of HTTP.
//!
//! A device publishes on its Magistrala channel with subtopic
//! `twins.<twinID>.<document>.<op>`; it is authorised when the twin's current
//! definition binds that channel, and the result goes back on the same channel with
//! subtopic `...<op>.response.success` or `.response.error`. Trusted back-end callers
//! use NATS request/reply on subject `twins.<twinID>.<document>.<op>`.

use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ServiceError;
use super::documents::{Access, Change, DocumentsService};
use crate::broker::{self, Envelope};
use crate::domain::ValidationError;

/// Subject of request/reply callers: `twins.<twinID>.<document>.<op>`.
pub const REQUEST_SUBJECTS: &str = "twins.*.*.*";

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Patch,
    Delete,
}

/// A parsed inband request address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub twin_id: &'a str,
    pub document: &'a str,
    pub op: Op,
}

/// Parses `twins.<twinID>.<document>.<op>`; None for anything else, responses included.
pub fn parse(address: &str) -> Option<Target<'_>> {
    let mut parts = address.split('.');
    let (Some("twins"), Some(twin_id), Some(document), Some(op), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let op = match op {
        "get" => Op::Get,
        "put" => Op::Put,
        "patch" => Op::Patch,
        "delete" => Op::Delete,
        _ => return None,
    };
    Some(Target {
        twin_id,
        document,
        op,
    })
}

/// Payload of a request: the REST body (`{"version"?, "data"?}`).
#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
}

/// Executes inband requests and publishes their answers.
#[derive(Clone)]
pub struct Inband {
    documents: DocumentsService,
    client: async_nats::Client,
}

impl Inband {
    pub fn new(documents: DocumentsService, client: async_nats::Client) -> Self {
        Self { documents, client }
    }

    /// Runs one request; Ok is the document JSON (for delete, the deleted document).
    pub async fn execute(
        &self,
        access: Access<'_>,
        target: Target<'_>,
        payload: &[u8],
    ) -> Result<Value, ServiceError> {
        let body: Body = if payload.iter().all(u8::is_ascii_whitespace) {
            Body::default()
        } else {
            serde_json::from_slice(payload).map_err(|e| {
                ServiceError::Invalid(ValidationError::new(format!(
                    "payload must be a JSON object like {{\"version\": 1, \"data\": {{}}}}: {e}"
                )))
            })?
        };
        let data = || {
            body.data.clone().ok_or_else(|| {
                ServiceError::Invalid(ValidationError::new("data (a JSON object) is required"))
            })
        };
        let docs = &self.documents;
        let (id, name) = (target.twin_id, target.document);
        let doc = match target.op {
            Op::Get => {
                let doc = docs.get(access, id, name).await?;
                if let Some(v) = body.version.filter(|v| *v != doc.version) {
                    return Err(ServiceError::VersionMismatch(Box::new(
                        super::VersionMismatch {
                            error: "document version mismatch",
                            twin_id: doc.twin_id,
                            document_name: doc.document_name,
                            expected_version: v,
                            actual_version: Some(doc.version),
                        },
                    )));
                }
                doc
            }
            Op::Put => {
                docs.write(access, id, name, Change::Put(data()?), body.version)
                    .await?
                    .0
            }
            Op::Patch => {
                docs.write(access, id, name, Change::Patch(data()?), body.version)
                    .await?
                    .0
            }
            Op::Delete => docs.delete(access, id, name, body.version).await?,
        };
        serde_json::to_value(&doc).map_err(|e| ServiceError::Internal(e.into()))
    }

    /// Handles a request a device published on a channel and answers on that channel.
    #[tracing::instrument(name = "inband.request", skip_all,
        fields(otel.kind = "consumer", twin.id = target.twin_id, document = target.document, op = ?target.op))]
    pub async fn on_channel_message(&self, envelope: &Envelope, target: Target<'_>) {
        let result = self
            .execute(
                Access::Channel(&envelope.channel),
                target,
                &envelope.payload,
            )
            .await;
        let (outcome, body) = match &result {
            Ok(doc) => ("success", doc.clone()),
            Err(e) => ("error", e.public_body()),
        };
        let subtopic = format!("{}.response.{outcome}", envelope.subtopic);
        let answer = Envelope {
            channel: envelope.channel.clone(),
            subtopic: subtopic.clone(),
            publisher: "twins".into(),
            protocol: "nats".into(),
            payload: body.to_string().into_bytes(),
            created: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        };
        let subject = broker::subject(&envelope.channel, &subtopic);
        let payload = broker::encode(&answer).into();
        let published = match crate::telemetry::current_headers() {
            Some(headers) => {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
            }
            None => self.client.publish(subject, payload).await,
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, "inband response not published");
        }
    }

    /// Answers request/reply callers on [`REQUEST_SUBJECTS`] until `stop` is cancelled.
    /// Instances share the subject through the queue group `group`.
    pub async fn serve(self, group: String, stop: CancellationToken) {
        let mut sub = match self.client.queue_subscribe(REQUEST_SUBJECTS, group).await {
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
            self.answer(&msg, reply).instrument(span).await;
        }
        let _ = sub.unsubscribe().await;
    }

    /// Executes a request/reply request and answers on its reply subject.
    async fn answer(&self, msg: &async_nats::Message, reply: async_nats::Subject) {
        let body = match parse(msg.subject.as_str()) {
            Some(target) => match self.execute(Access::Trusted, target, &msg.payload).await {
                Ok(doc) => doc,
                Err(e) => e.public_body(),
            },
            None => {
                serde_json::json!({"error": "subject must be twins.<twinID>.<document>.<get|put|patch|delete>"})
            }
        };
        let payload = body.to_string().into();
        let published = match crate::telemetry::current_headers() {
            Some(headers) => {
                self.client
                    .publish_with_headers(reply, headers, payload)
                    .await
            }
            None => self.client.publish(reply, payload).await,
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, "inband reply not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_responses_do_not() {
        assert_eq!(
            parse("twins.abc.desired.patch"),
            Some(Target {
                twin_id: "abc",
                document: "desired",
                op: Op::Patch
            })
        );
        for bad in [
            "twins.abc.desired.patch.response.success",
            "twins.abc.desired",
            "twins.abc.desired.merge",
            "other.abc.desired.get",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
