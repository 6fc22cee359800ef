//! The change feed's events (SPEC 12): one per committed change, with the value before
//! and after it, published on the subject that names its owner, twin and kind.
//!
//! On the stream an event's payload is its JSON without `id`: the cursor is the stream
//! sequence the broker gives it, known only once it is stored. The SSE endpoints add
//! `id` (the sequence, as a string) when they serve it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ValidationError;

/// Subjects of the feed: `twins.events.<ownerKey>.<twinID>.<kind>`.
pub const SUBJECT_PREFIX: &str = "twins.events";

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "twin.created")]
    TwinCreated,
    #[serde(rename = "twin.updated")]
    TwinUpdated,
    #[serde(rename = "twin.deleted")]
    TwinDeleted,
    #[serde(rename = "state.created")]
    StateCreated,
    #[serde(rename = "state.updated")]
    StateUpdated,
    #[serde(rename = "document.put")]
    DocumentPut,
    #[serde(rename = "document.patched")]
    DocumentPatched,
    #[serde(rename = "document.deleted")]
    DocumentDeleted,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        Self::TwinCreated,
        Self::TwinUpdated,
        Self::TwinDeleted,
        Self::StateCreated,
        Self::StateUpdated,
        Self::DocumentPut,
        Self::DocumentPatched,
        Self::DocumentDeleted,
    ];

    /// The kind as it appears in events, in `?kinds=` and as the last subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TwinCreated => "twin.created",
            Self::TwinUpdated => "twin.updated",
            Self::TwinDeleted => "twin.deleted",
            Self::StateCreated => "state.created",
            Self::StateUpdated => "state.updated",
            Self::DocumentPut => "document.put",
            Self::DocumentPatched => "document.patched",
            Self::DocumentDeleted => "document.deleted",
        }
    }

    /// The kind as the subject's last tokens: a kind's dot separates two tokens, so
    /// `twin.created` is the subject tail `twin.created` and `twins.events.K.T.twin.*`
    /// selects every twin event.
    pub fn subject_tail(self) -> &'static str {
        self.as_str()
    }

    /// Parses a comma-separated `?kinds=` list; empty entries are ignored, an unknown
    /// kind is refused with the list of known ones.
    pub fn parse_list(raw: &str) -> Result<Vec<EventKind>, ValidationError> {
        let mut kinds = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let kind = part.parse::<EventKind>()?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds.sort();
        Ok(kinds)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                ValidationError::new(format!(
                    "unknown event kind {s:?}; known kinds: {}",
                    known.join(", ")
                ))
            })
    }
}

/// One committed change, as stored on the stream (without its cursor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub kind: EventKind,
    pub twin_id: String,
    /// When the change was committed.
    pub time: DateTime<Utc>,
    /// The twin, state or document as the API serves it before the change (null for a
    /// creation).
    pub old: Option<Value>,
    /// ... and after it (null for a deletion).
    pub new: Option<Value>,
}

impl ChangeEvent {
    /// The event as served to a client: `id` (the stream sequence, as a string) first,
    /// then the stored fields.
    pub fn served(&self, cursor: u64) -> Value {
        serde_json::json!({
            "id": cursor.to_string(),
            "kind": self.kind,
            "twin_id": self.twin_id,
            "time": self.time,
            "old": self.old,
            "new": self.new,
        })
    }

    /// The event's JSON as stored, with `time` in place of its own: a store stamps an
    /// event when its change commits without copying its values.
    pub fn to_json_at(&self, time: DateTime<Utc>) -> serde_json::Result<String> {
        /// The fields of [`ChangeEvent`] in its order, borrowed.
        #[derive(Serialize)]
        struct At<'a> {
            kind: EventKind,
            twin_id: &'a str,
            time: DateTime<Utc>,
            old: &'a Option<Value>,
            new: &'a Option<Value>,
        }
        serde_json::to_string(&At {
            kind: self.kind,
            twin_id: &self.twin_id,
            time,
            old: &self.old,
            new: &self.new,
        })
    }
}

/// A change event as the stream holds it, served without decoding its values: its kind
/// (from its subject) and its JSON as stored. Cheap to clone.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub kind: EventKind,
    json: bytes::Bytes,
}

impl StoredEvent {
    /// The event of a stream message: the kind is the subject's tail
    /// (`twins.events.<ownerKey>.<twin>.<kind>`), the payload must be one JSON object.
    pub fn of_message(subject: &str, payload: bytes::Bytes) -> Result<Self, String> {
        let tail = subject
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.splitn(3, '.').nth(2))
            .ok_or_else(|| format!("{subject} is not a change feed subject"))?;
        let kind: EventKind = tail.parse().map_err(|e: ValidationError| e.to_string())?;
        if payload.first() != Some(&b'{') {
            return Err("the event is not a JSON object".into());
        }
        // Checked, not decoded: nothing of it is kept.
        serde_json::from_slice::<serde::de::IgnoredAny>(&payload)
            .map_err(|e| format!("the event is not JSON: {e}"))?;
        Ok(Self {
            kind,
            json: payload,
        })
    }

    /// The event as served to a client, as [`ChangeEvent::served`] has it: `id` (the
    /// cursor, as a string) first, then the stored fields.
    pub fn served(&self, cursor: u64) -> String {
        let id = cursor.to_string();
        let rest = &self.json[1..];
        let mut out = String::with_capacity(self.json.len() + id.len() + 8);
        out.push_str("{\"id\":\"");
        out.push_str(&id);
        out.push('"');
        // `rest` is the object's members after its `{`, then its `}`: valid UTF-8, as
        // all JSON checked above.
        let rest = std::str::from_utf8(rest).unwrap_or("}");
        if !rest.trim_start().starts_with('}') {
            out.push(',');
        }
        out.push_str(rest);
        out
    }
}

/// The subject-safe key of an owner: the owner's UTF-8 bytes in unpadded base64url
/// (RFC 4648 section 5), whose alphabet `A-Z a-z 0-9 - _` holds no subject separator or
/// wildcard. An empty owner is `_` (no token may be empty).
pub fn owner_key(owner: &str) -> String {
    if owner.is_empty() {
        return "_".into();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(owner.as_bytes())
}

/// The subject an event of `owner`'s twin is published on.
pub fn subject(owner: &str, twin_id: &str, kind: EventKind) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.{twin_id}.{}",
        owner_key(owner),
        kind.subject_tail()
    )
}

/// Subject filters selecting `owner`'s events: of one twin or all of them, of the
/// given kinds or all (an empty `kinds`). Every filter starts with the owner's key, so
/// no filter built here can select another owner's events.
pub fn filters(owner: &str, twin_id: Option<&str>, kinds: &[EventKind]) -> Vec<String> {
    let twin = twin_id.unwrap_or("*");
    let key = owner_key(owner);
    if kinds.is_empty() {
        return vec![format!("{SUBJECT_PREFIX}.{key}.{twin}.>")];
    }
    kinds
        .iter()
        .map(|k| format!("{SUBJECT_PREFIX}.{key}.{twin}.{}", k.subject_tail()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_are_single_subject_tokens_and_distinct() {
        let owners = ["a@b.c", "a.b@c", "x y", "*", ">", "é", "a", "b", ""];
        let keys: Vec<String> = owners.iter().map(|o| owner_key(o)).collect();
        for k in &keys {
            assert!(!k.is_empty());
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{k}"
            );
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
        assert_eq!(owner_key("a@b.c"), "YUBiLmM");
    }

    #[test]
    fn an_event_stamped_again_is_stored_as_if_made_then() {
        let made = |time| ChangeEvent {
            kind: EventKind::StateUpdated,
            twin_id: "t1".into(),
            time,
            old: Some(serde_json::json!({"v": 1})),
            new: Some(serde_json::json!({"v": [2, "x"]})),
        };
        let (before, commit) = (
            crate::domain::time::from_nanos(1_000_000_000),
            crate::domain::time::from_nanos(1_250_000_000),
        );
        let stamped = made(before).to_json_at(commit).expect("json");
        assert_eq!(stamped, serde_json::to_string(&made(commit)).expect("json"));
        assert_ne!(stamped, serde_json::to_string(&made(before)).expect("json"));
    }

    #[test]
    fn subjects_and_filters_name_owner_twin_and_kind() {
        let s = subject("a@b.c", "t1", EventKind::DocumentPut);
        assert_eq!(s, "twins.events.YUBiLmM.t1.document.put");
        assert_eq!(
            filters("a@b.c", None, &[]),
            vec!["twins.events.YUBiLmM.*.>"]
        );
        assert_eq!(
            filters("a@b.c", Some("t1"), &[EventKind::StateCreated]),
            vec!["twins.events.YUBiLmM.t1.state.created"]
        );
    }

    #[test]
    fn kinds_parse_from_a_list_and_unknown_ones_are_refused() {
        assert_eq!(
            EventKind::parse_list("state.created, document.put,,state.created").unwrap(),
            vec![EventKind::StateCreated, EventKind::DocumentPut]
        );
        let e = EventKind::parse_list("state.created,twin.renamed").unwrap_err();
        assert!(e.to_string().contains("twin.renamed"), "{e}");
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[test]
    fn served_events_carry_the_cursor_as_a_string_id() {
        let e = ChangeEvent {
            kind: EventKind::TwinDeleted,
            twin_id: "t".into(),
            time: DateTime::from_timestamp(1, 0).unwrap(),
            old: Some(serde_json::json!({"id": "t"})),
            new: None,
        };
        let v = e.served(42);
        assert_eq!(v["id"], "42");
        assert_eq!(v["kind"], "twin.deleted");
        assert_eq!(v["new"], Value::Null);
        let back: ChangeEvent = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn stored_events_are_served_as_decoded_ones_are() {
        let e = ChangeEvent {
            kind: EventKind::StateUpdated,
            twin_id: "t".into(),
            time: DateTime::from_timestamp(1, 0).unwrap(),
            old: Some(serde_json::json!({"id": 1, "s": "a\"}"})),
            new: Some(serde_json::json!({"id": 1, "s": "é"})),
        };
        let stored = StoredEvent::of_message(
            &subject("o", "t", e.kind),
            serde_json::to_vec(&e).unwrap().into(),
        )
        .unwrap();
        assert_eq!(stored.kind, e.kind);
        let served: Value = serde_json::from_str(&stored.served(7)).unwrap();
        assert_eq!(served, e.served(7));
        assert!(stored.served(7).starts_with(r#"{"id":"7","#));

        for (subject, payload) in [
            ("twins.events.o.t.state.created", &b"[1]"[..]),
            ("twins.events.o.t.state.created", b"{\"a\":"),
            ("twins.events.o.t.twin.renamed", b"{}"),
            ("other.o.t.state.created", b"{}"),
        ] {
            assert!(
                StoredEvent::of_message(subject, payload.to_vec().into()).is_err(),
                "{subject} {payload:?}"
            );
        }
        let empty =
            StoredEvent::of_message("twins.events.o.t.state.created", "{ }".into()).unwrap();
        assert_eq!(empty.served(1), r#"{"id":"1" }"#);
    }
}
