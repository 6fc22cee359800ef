//! Twin documents: named, versioned JSON objects for desired/current state exchange.
//!
//! Names are parsed into [`DocumentName`]; data is limited to [`MAX_DATA_BYTES`] of
//! compact JSON. [`merge_patch`] is RFC 7396 and [`delta`] lists what differs between
//! two documents. Every write records how it was made ([`WriteOp`]) and by whom
//! ([`Writer`]); [`merge_patch_between`] is the RFC 7396 patch from one revision to
//! another.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{ValidationError, time};

/// Largest document data, as compact JSON.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Longest document name.
pub const MAX_NAME_LEN: usize = 64;

/// A document as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Document {
    pub twin_id: String,
    pub document_name: String,
    /// 1 on creation, +1 on every write.
    pub version: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated: DateTime<Utc>,
    #[schema(value_type = Object)]
    #[serde(serialize_with = "super::json::serialize_object")]
    pub data: Map<String, Value>,
}

/// A document in a listing, without its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DocumentSummary {
    pub document_name: String,
    pub version: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated: DateTime<Utc>,
}

impl From<&Document> for DocumentSummary {
    fn from(d: &Document) -> Self {
        Self {
            document_name: d.document_name.clone(),
            version: d.version,
            updated: d.updated,
        }
    }
}

/// How a version of a document came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteOp {
    /// The write created the document (PUT or PATCH of an absent document).
    Create,
    /// The data was replaced.
    Put,
    /// The data was merge-patched.
    Patch,
}

impl WriteOp {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Put => "put",
            Self::Patch => "patch",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "create" => Some(Self::Create),
            "put" => Some(Self::Put),
            "patch" => Some(Self::Patch),
            _ => None,
        }
    }
}

/// Who wrote a version: `{"kind":"user","id":...}` over REST, `{"kind":"channel","id":...}`
/// for a device inband, `{"kind":"service"}` for a request/reply caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Writer {
    /// An authenticated user; the id is the identity the auth service returned.
    User { id: String },
    /// A device publishing on this Magistrala channel.
    Channel { id: String },
    /// A trusted back-end caller over NATS request/reply.
    Service,
}

impl Writer {
    /// The kind as stored (`user`, `channel`, `service`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User { .. } => "user",
            Self::Channel { .. } => "channel",
            Self::Service => "service",
        }
    }

    /// The id as stored; empty for the service.
    pub fn id(&self) -> &str {
        match self {
            Self::User { id } | Self::Channel { id } => id,
            Self::Service => "",
        }
    }

    /// The writer stored as `kind` and `id`; None for an unknown kind.
    pub fn from_parts(kind: &str, id: &str) -> Option<Self> {
        match kind {
            "user" => Some(Self::User { id: id.to_owned() }),
            "channel" => Some(Self::Channel { id: id.to_owned() }),
            "service" => Some(Self::Service),
            _ => None,
        }
    }
}

/// A kept version of a document as listed: when, how and by whom it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionSummary {
    pub version: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated: DateTime<Utc>,
    pub op: WriteOp,
    pub by: Writer,
}

/// A document name matching `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentName(String);

impl DocumentName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_NAME_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValidationError::new(
                "document name must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the size limit of document data.
pub fn check_size(data: &Map<String, Value>) -> Result<(), ValidationError> {
    let size = serde_json::to_vec(data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DATA_BYTES {
        return Err(ValidationError::new(format!(
            "document data is {size} bytes, more than {MAX_DATA_BYTES}"
        )));
    }
    Ok(())
}

/// Applies an RFC 7396 JSON merge patch to `target`: `null` deletes a key, objects
/// merge recursively, anything else (arrays included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The RFC 7396 merge patch that turns `from` into `to`: objects recurse, keys missing
/// from `to` become `null`, anything else that differs is replaced whole. Applying it to
/// `from` gives `to` unless `to` holds a `null` value, which RFC 7396 cannot set (a
/// `null` in a merge patch deletes).
pub fn merge_patch_between(from: &Value, to: &Value) -> Value {
    let (Value::Object(from), Value::Object(to)) = (from, to) else {
        return to.clone();
    };
    let mut patch = Map::new();
    for key in from.keys().filter(|k| !to.contains_key(*k)) {
        patch.insert(key.clone(), Value::Null);
    }
    for (key, value) in to {
        match from.get(key) {
            Some(old) if old == value => {}
            Some(old @ Value::Object(_)) if value.is_object() => {
                patch.insert(key.clone(), merge_patch_between(old, value));
            }
            _ => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(patch)
}

/// One key whose value differs between two documents.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Difference {
    /// Path of the key from the document root, e.g. `["zones", "kitchen"]`.
    pub path: Vec<String>,
    /// Value in the document asked about; absent when the key is missing there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Value in the document compared against; absent when missing there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub against: Option<Value>,
}

/// The keys (recursing into objects present on both sides) whose values differ.
pub fn delta(doc: &Map<String, Value>, against: &Map<String, Value>) -> Vec<Difference> {
    let mut out = Vec::new();
    diff_into(&mut Vec::new(), doc, against, &mut out);
    out
}

fn diff_into(
    path: &mut Vec<String>,
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    out: &mut Vec<Difference>,
) {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        path.push(k.clone());
        match (a.get(k), b.get(k)) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => diff_into(path, x, y, out),
            (x, y) if x != y => out.push(Difference {
                path: path.clone(),
                value: x.cloned(),
                against: y.cloned(),
            }),
            _ => {}
        }
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of RFC 7396, appendix A.
    #[test]
    fn merge_patch_rfc7396_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }

    /// Pairs of documents covering every case of the merge-patch generation: keys added,
    /// removed and changed, nested objects, arrays, type changes, equal documents.
    fn revision_pairs() -> Vec<(Value, Value)> {
        vec![
            (json!({}), json!({})),
            (json!({"a": 1}), json!({"a": 1})),
            (json!({}), json!({"a": 1, "b": {"c": [1, 2]}})),
            (json!({"a": 1, "b": {"c": [1, 2]}}), json!({})),
            (json!({"a": 1, "b": 2}), json!({"a": 2, "c": 3})),
            (
                json!({"z": {"k": "on", "g": "on", "deep": {"x": 1, "y": 2}}}),
                json!({"z": {"k": "on", "deep": {"x": 1, "y": 3, "w": [0]}}}),
            ),
            (json!({"a": [1, 2, 3]}), json!({"a": [3]})),
            (json!({"a": {"b": 1}}), json!({"a": [1]})),
            (json!({"a": "text"}), json!({"a": {"b": "text"}})),
            (json!({"a": {"b": {}}}), json!({"a": {"b": {"c": true}}})),
            (json!({"": 1, "~/": 2}), json!({"": 2, "~/": {"x": 1}})),
        ]
    }

    #[test]
    fn merge_patch_between_revisions_applies_back_to_the_target() {
        for (from, to) in revision_pairs() {
            let patch = merge_patch_between(&from, &to);
            let mut ours = from.clone();
            merge_patch(&mut ours, &patch);
            assert_eq!(ours, to, "{from} -> {to} with {patch}");
            let mut theirs = from.clone();
            json_patch::merge(&mut theirs, &patch);
            assert_eq!(theirs, to, "json_patch::merge of {patch}");
        }
    }

    #[test]
    fn merge_patch_between_equal_documents_is_empty() {
        for (doc, _) in revision_pairs() {
            assert_eq!(merge_patch_between(&doc, &doc), json!({}), "{doc}");
        }
    }

    #[test]
    fn merge_patch_between_names_removed_keys_with_null() {
        let patch = merge_patch_between(&json!({"a": 1, "b": {"c": 1}}), &json!({"b": {}}));
        assert_eq!(patch, json!({"a": null, "b": {"c": null}}));
    }

    #[test]
    fn writers_serialize_with_their_kind() {
        let cases = [
            (
                Writer::User { id: "u1".into() },
                json!({"kind": "user", "id": "u1"}),
            ),
            (
                Writer::Channel { id: "c1".into() },
                json!({"kind": "channel", "id": "c1"}),
            ),
            (Writer::Service, json!({"kind": "service"})),
        ];
        for (writer, want) in cases {
            assert_eq!(serde_json::to_value(&writer).ok(), Some(want));
            assert_eq!(
                Writer::from_parts(writer.kind(), writer.id()),
                Some(writer.clone())
            );
        }
        assert_eq!(Writer::from_parts("robot", "x"), None);
        for op in [WriteOp::Create, WriteOp::Put, WriteOp::Patch] {
            assert_eq!(WriteOp::parse(op.as_str()), Some(op));
            assert_eq!(serde_json::to_value(op).ok(), Some(json!(op.as_str())));
        }
    }

    #[test]
    fn names_follow_the_pattern() {
        for ok in ["desired", "current", "a", "A_b-9", &"x".repeat(64)] {
            assert!(DocumentName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a.b", "é", "a/b", &"x".repeat(65)] {
            assert!(DocumentName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn size_limit_is_on_compact_json() {
        let mut m = Map::new();
        m.insert("k".into(), json!("x".repeat(MAX_DATA_BYTES - 8)));
        assert!(check_size(&m).is_ok());
        m.insert("k".into(), json!("x".repeat(MAX_DATA_BYTES)));
        assert!(check_size(&m).is_err());
    }

    #[test]
    fn delta_lists_differing_keys_recursively() {
        let desired = json!({"armed": true, "zones": {"kitchen": "on", "garage": "on"}, "same": 1});
        let current = json!({"armed": false, "zones": {"kitchen": "on"}, "same": 1, "extra": [1]});
        let (Value::Object(d), Value::Object(c)) = (desired, current) else {
            unreachable!()
        };
        let got = delta(&d, &c);
        assert_eq!(
            got,
            vec![
                Difference {
                    path: vec!["armed".into()],
                    value: Some(json!(true)),
                    against: Some(json!(false))
                },
                Difference {
                    path: vec!["extra".into()],
                    value: None,
                    against: Some(json!([1]))
                },
                Difference {
                    path: vec!["zones".into(), "garage".into()],
                    value: Some(json!("on")),
                    against: None
                },
            ]
        );
        assert!(delta(&d, &d).is_empty());
    }
}
