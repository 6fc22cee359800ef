//! The inband document API (SPEC section 7): devices read and write their twin's
//! documents through the broker instead of HTTP.
//!
//! A device publishes on its Magistrala channel with subtopic
//! `twins.<twinID>.<document>.<op>`; it is authorised when the twin's current
//! definition binds that channel, and the result goes back on the same channel with
//! subtopic `...<op>.response.success` or `.response.error`. Trusted back-end callers
//! use NATS request/reply on subject `twins.<twinID>.<document>.<op>`.
//!
//! This module is the use case: what a request means and what it answers. Receiving
//! and publishing are the broker layer's (`broker::inband`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::ServiceError;
use super::documents::{Access, Change, Documents, check_version};
use crate::domain::ValidationError;
use crate::domain::document::DocumentName;

/// Subtopics of the inband document API, which never become states.
pub const INBAND_PREFIX: &str = "twins.";

/// What a message on a Magistrala channel is to this service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// One of our own notifications: neither data nor a request.
    OwnNotification,
    /// On the inband document API's subtopics: a request when it parses, never data
    /// (responses included).
    Inband(Option<Target<'a>>),
    /// Data that may become states.
    Data,
}

/// Classifies a channel message; `own_channel` is where our notifications go. The one
/// place that decides what ingestion skips and what the inband API answers.
pub fn classify<'a>(own_channel: Option<&str>, channel: &str, subtopic: &'a str) -> Kind<'a> {
    if own_channel == Some(channel) {
        Kind::OwnNotification
    } else if subtopic.starts_with(INBAND_PREFIX) {
        Kind::Inband(parse(subtopic))
    } else {
        Kind::Data
    }
}

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

/// Parses the subtopic `twins.<twinID>.<document>.<op>`; None for anything else,
/// responses included.
pub fn parse(address: &str) -> Option<Target<'_>> {
    parse_request("twins", address)
}

/// Parses `<prefix>.<twinID>.<document>.<op>` (a request/reply subject under a
/// configured prefix); None for anything else.
pub fn parse_request<'a>(prefix: &str, address: &'a str) -> Option<Target<'a>> {
    let rest = address.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut parts = rest.split('.');
    let (Some(twin_id), Some(document), Some(op), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
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

impl Target<'_> {
    /// Whether the address names a twin at all (a UUID). Requests that do not are not
    /// answered, so that no id a client made up reaches a broker subject.
    pub fn names_a_twin(&self) -> bool {
        super::twins::parse_twin_id(self.twin_id).is_ok()
    }
}

/// Payload of a request: the REST body (`{"version"?, "data"?}`).
#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    data: Option<Map<String, Value>>,
}

/// Executes inband requests; the answers are JSON documents or JSON error bodies.
#[derive(Clone)]
pub struct Inband {
    documents: Arc<dyn Documents>,
}

/// The answer to a request/reply subject that is no inband address.
pub fn bad_address(prefix: &str) -> Value {
    serde_json::json!({
        "error": format!("subject must be {prefix}.<twinID>.<document>.<get|put|patch|delete>")
    })
}

impl Inband {
    pub fn new(documents: Arc<dyn Documents>) -> Self {
        Self { documents }
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
                let name = DocumentName::parse(&doc.document_name)?;
                check_version(&doc.twin_id, &name, body.version, Some(doc.version))?;
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

    /// Runs one request and answers it: whether it succeeded, and the document or the
    /// public error body.
    pub async fn answer(
        &self,
        access: Access<'_>,
        target: Target<'_>,
        payload: &[u8],
    ) -> (bool, Value) {
        match self.execute(access, target, payload).await {
            Ok(doc) => (true, doc),
            Err(e) => (false, e.public_body()),
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
