//! Every filter, update, sort and index the MongoDB store sends, built in one place.
//!
//! Keeping them as plain functions lets unit tests pin the exact BSON without a server,
//! and keeps the repository code down to "send this, read that". Only basic query
//! operators are used (no aggregation), so MongoDB-compatible servers that lack the
//! aggregation pipeline still work.

use bson::{Bson, Document, doc};

use super::codec;
use crate::domain::document::Document as TwinDocument;
use crate::domain::state::State;
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};
use crate::store::TwinFilter;

pub const TWINS: &str = "twins";
pub const STATES: &str = "states";
pub const DOCUMENTS: &str = "documents";
/// Stream sequence of the last message applied per twin; the Go service never reads it.
pub const CURSORS: &str = "ingest_cursors";

/// Indexes created at start, per collection: keys and whether they are unique.
/// Creating an index that exists with the same keys and options is a no-op.
pub fn indexes() -> Vec<(&'static str, Document, bool)> {
    vec![
        (TWINS, doc! { "id": 1 }, true),
        // Owner scoping, with `_id` for listing in creation order without a sort in memory.
        (TWINS, doc! { "owner": 1, "_id": 1 }, false),
        (TWINS, doc! { "owner": 1, "name": 1 }, false),
        (
            TWINS,
            doc! { "definitions.attributes.channel": 1, "definitions.attributes.subtopic": 1 },
            false,
        ),
        (STATES, doc! { "twinid": 1, "id": 1 }, true),
        (DOCUMENTS, doc! { "twinid": 1, "name": 1 }, true),
        (CURSORS, doc! { "twinid": 1 }, true),
    ]
}

/// Ascending `_id`: ObjectIds grow with insertion time, so this is creation order.
pub fn creation_order() -> Document {
    doc! { "_id": 1 }
}

/// Sort on a field, ascending (1) or descending (-1).
pub fn by(field: &str, direction: i32) -> Document {
    doc! { field: direction }
}

/// Only the listed fields, without `_id`.
pub fn only(fields: &[&str]) -> Document {
    let mut d = doc! { "_id": 0 };
    for f in fields {
        d.insert(*f, 1);
    }
    d
}

pub fn twin(owner: &str, id: &str) -> Document {
    doc! { "id": id, "owner": owner }
}

pub fn twin_any_owner(id: &str) -> Document {
    doc! { "id": id }
}

/// The owner's twin, only while it still has the revision the caller read.
pub fn twin_at_revision(twin: &Twin, expected_revision: i64) -> Document {
    doc! { "id": &twin.id, "owner": &twin.owner, "revision": expected_revision }
}

/// Everything an update may change; `id`, `owner`, `created` and `_id` stay.
pub fn twin_update(twin: &Twin) -> Document {
    let mut set = codec::twin_to_bson(twin);
    for fixed in ["id", "owner", "created"] {
        set.remove(fixed);
    }
    doc! { "$set": set }
}

/// The owner's twins with this exact name and these top-level metadata values.
///
/// A plain `{"metadata.k": v}` would also match a twin whose `k` is an array holding `v`,
/// and `{"metadata.k": null}` one without `k`; SQLite compares the values themselves, so
/// non-array values also require the field to exist and not be an array.
pub fn twin_list(owner: &str, filter: &TwinFilter) -> Document {
    let mut d = doc! { "owner": owner };
    if let Some(name) = &filter.name {
        d.insert("name", name);
    }
    for (key, value) in filter.metadata.iter().flatten() {
        let value = codec::json_to_bson(value);
        let condition = match value {
            Bson::Array(_) => doc! { "$eq": value },
            _ => doc! { "$eq": value, "$exists": true, "$not": { "$type": "array" } },
        };
        d.insert(format!("metadata.{key}"), condition);
    }
    d
}

/// Twins with an attribute on `channel` with this subtopic or the wildcard, in any of
/// their definitions: the index narrows, the caller keeps those whose current (last)
/// definition matches.
pub fn twins_on_channel(channel: &str, subtopic: &str) -> Document {
    doc! {
        "definitions.attributes.channel": channel,
        "definitions.attributes.subtopic": { "$in": [subtopic, WILDCARD_SUBTOPIC] },
    }
}

/// What the caller of [`twins_on_channel`] needs to pick the current definition.
pub fn twin_attributes_projection() -> Document {
    doc! {
        "_id": 0,
        "id": 1,
        "definitions.attributes.channel": 1,
        "definitions.attributes.subtopic": 1,
    }
}

pub fn states_of(twin_id: &str) -> Document {
    doc! { "twinid": twin_id }
}

pub fn state(twin_id: &str, id: i64) -> Document {
    doc! { "twinid": twin_id, "id": id }
}

/// The twin's states from id `offset` on.
pub fn states_from(twin_id: &str, offset: u64) -> Document {
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    doc! { "twinid": twin_id, "id": { "$gte": offset } }
}

/// Replaces what a state holds; its key (`twinid`, `id`) stays.
pub fn state_update(state: &State) -> Document {
    let mut set = codec::state_to_bson(state);
    set.remove("twinid");
    set.remove("id");
    doc! { "$set": set }
}

pub fn documents_of(twin_id: &str) -> Document {
    doc! { "twinid": twin_id }
}

pub fn document(twin_id: &str, name: &str) -> Document {
    doc! { "twinid": twin_id, "name": name }
}

/// The document, only while its version is `expected` (any version when None).
pub fn document_at_version(twin_id: &str, name: &str, expected: Option<i64>) -> Document {
    let mut d = document(twin_id, name);
    if let Some(v) = expected {
        d.insert("version", v);
    }
    d
}

/// Replaces the data of a document and sets its new version.
pub fn document_update(doc: &TwinDocument) -> Document {
    let mut set = codec::document_to_bson(doc);
    set.remove("twinid");
    set.remove("name");
    doc! { "$set": set }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::from_nanos;
    use crate::domain::twin::{Attribute, Definition};
    use serde_json::json;

    const MS: i64 = 1_588_668_099_142;

    fn date() -> bson::DateTime {
        bson::DateTime::from_millis(MS)
    }

    fn sample_twin() -> Twin {
        Twin {
            owner: "o".into(),
            id: "t".into(),
            name: "n".into(),
            revision: 2,
            created: from_nanos(MS * 1_000_000),
            updated: from_nanos(MS * 1_000_000),
            definitions: vec![Definition {
                id: 0,
                created: from_nanos(MS * 1_000_000),
                attributes: vec![Attribute {
                    name: "a".into(),
                    channel: "c".into(),
                    subtopic: ">".into(),
                    persist_state: true,
                }],
                delta: 5,
            }],
            metadata: json!({"k": 1}).as_object().cloned().unwrap(),
        }
    }

    #[test]
    fn indexes_cover_the_spec() {
        let got: Vec<_> = indexes()
            .into_iter()
            .map(|(c, keys, unique)| (c, keys.keys().cloned().collect::<Vec<_>>(), unique))
            .collect();
        let want: Vec<(&str, Vec<&str>, bool)> = vec![
            ("twins", vec!["id"], true),
            ("twins", vec!["owner", "_id"], false),
            ("twins", vec!["owner", "name"], false),
            (
                "twins",
                vec![
                    "definitions.attributes.channel",
                    "definitions.attributes.subtopic",
                ],
                false,
            ),
            ("states", vec!["twinid", "id"], true),
            ("documents", vec!["twinid", "name"], true),
            ("ingest_cursors", vec!["twinid"], true),
        ];
        let got: Vec<(&str, Vec<&str>, bool)> = got
            .iter()
            .map(|(c, k, u)| (*c, k.iter().map(String::as_str).collect(), *u))
            .collect();
        assert_eq!(got, want);
        for (_, keys, _) in indexes() {
            assert!(keys.values().all(|v| *v == Bson::Int32(1)), "{keys}");
        }
    }

    #[test]
    fn sorts_and_projections() {
        assert_eq!(creation_order(), doc! { "_id": 1 });
        assert_eq!(by("id", -1), doc! { "id": -1 });
        assert_eq!(by("name", 1), doc! { "name": 1 });
        assert_eq!(
            only(&["name", "version"]),
            doc! { "_id": 0, "name": 1, "version": 1 }
        );
    }

    #[test]
    fn twin_queries_are_scoped_to_the_owner() {
        assert_eq!(twin("o", "t"), doc! { "id": "t", "owner": "o" });
        assert_eq!(twin_any_owner("t"), doc! { "id": "t" });
        assert_eq!(
            twin_at_revision(&sample_twin(), 1),
            doc! { "id": "t", "owner": "o", "revision": 1_i64 }
        );
    }

    #[test]
    fn twin_update_sets_everything_but_identity_and_creation() {
        assert_eq!(
            twin_update(&sample_twin()),
            doc! { "$set": {
                "name": "n",
                "updated": date(),
                "revision": 2_i32,
                "definitions": [ {
                    "id": 0_i32,
                    "created": date(),
                    "attributes": [ { "name": "a", "channel": "c", "subtopic": ">", "persiststate": true } ],
                    "delta": 5_i64,
                } ],
                "metadata": { "k": 1_i64 },
            } }
        );
    }

    #[test]
    fn twin_list_filters_by_owner_name_and_metadata_keys() {
        assert_eq!(
            twin_list("o", &TwinFilter::default()),
            doc! { "owner": "o" }
        );
        let filter = TwinFilter {
            name: Some("pump".into()),
            metadata: json!({"site": "p1", "floor": 2, "tags": ["a"], "gone": null})
                .as_object()
                .cloned(),
        };
        let scalar = |v: Bson| doc! { "$eq": v, "$exists": true, "$not": { "$type": "array" } };
        assert_eq!(
            twin_list("o", &filter),
            doc! {
                "owner": "o",
                "name": "pump",
                "metadata.floor": scalar(Bson::Int64(2)),
                "metadata.gone": scalar(Bson::Null),
                "metadata.site": scalar(Bson::String("p1".into())),
                "metadata.tags": { "$eq": ["a"] },
            }
        );
    }

    #[test]
    fn twins_on_channel_uses_the_attribute_index() {
        assert_eq!(
            twins_on_channel("c", "engine"),
            doc! {
                "definitions.attributes.channel": "c",
                "definitions.attributes.subtopic": { "$in": ["engine", ">"] },
            }
        );
        assert_eq!(
            twin_attributes_projection(),
            doc! { "_id": 0, "id": 1, "definitions.attributes.channel": 1, "definitions.attributes.subtopic": 1 }
        );
    }

    #[test]
    fn state_queries() {
        assert_eq!(states_of("t"), doc! { "twinid": "t" });
        assert_eq!(state("t", 4), doc! { "twinid": "t", "id": 4_i64 });
        assert_eq!(
            states_from("t", 20),
            doc! { "twinid": "t", "id": { "$gte": 20_i64 } }
        );
        let s = State {
            twin_id: "t".into(),
            id: 4,
            definition: 1,
            created: from_nanos(MS * 1_000_000),
            payload: json!({"a": 1.5}).as_object().cloned().unwrap(),
        };
        assert_eq!(
            state_update(&s),
            doc! { "$set": { "definition": 1_i32, "created": date(), "payload": { "a": 1.5 } } }
        );
    }

    #[test]
    fn document_queries_and_update() {
        assert_eq!(documents_of("t"), doc! { "twinid": "t" });
        assert_eq!(document("t", "d"), doc! { "twinid": "t", "name": "d" });
        assert_eq!(
            document_at_version("t", "d", Some(3)),
            doc! { "twinid": "t", "name": "d", "version": 3_i64 }
        );
        assert_eq!(
            document_at_version("t", "d", None),
            doc! { "twinid": "t", "name": "d" }
        );
        let d = TwinDocument {
            twin_id: "t".into(),
            document_name: "d".into(),
            version: 4,
            updated: from_nanos(MS * 1_000_000),
            data: json!({"x": [1]}).as_object().cloned().unwrap(),
        };
        assert_eq!(
            document_update(&d),
            doc! { "$set": { "version": 4_i64, "updated": date(), "data": { "x": [1_i64] } } }
        );
    }
}
