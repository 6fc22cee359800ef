//! Every filter, update, sort and index the MongoDB store sends, built in one place.
//!
//! Keeping them as plain functions lets unit tests pin the exact BSON without a server,
//! and keeps the repository code down to "send this, read that". Queries are basic query
//! operators, except the metadata filter of a listing, an aggregation expression
//! (`$expr`, MongoDB 3.6 and later) because the query language cannot take a key or a
//! value literally.

use bson::{Bson, Document, bson, doc};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::codec;
use crate::domain::document::{Document as TwinDocument, WriteOp, Writer};
use crate::domain::history::Window;
use crate::domain::state::State;
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};
use crate::store::{StoreResult, TwinFilter};

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
        // History order: ranges, the state in force at an instant, summaries.
        (STATES, doc! { "twinid": 1, "created": 1, "id": 1 }, false),
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

/// The twins with these ids, whoever owns them.
pub fn twins_any_owner(ids: &[String]) -> Document {
    doc! { "id": { "$in": ids } }
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
pub fn twin_list(owner: &str, filter: &TwinFilter) -> Document {
    let mut d = doc! { "owner": owner };
    if let Some(name) = &filter.name {
        d.insert("name", name);
    }
    if let Some(metadata) = filter.metadata.as_ref().filter(|m| !m.is_empty()) {
        d.insert("$expr", metadata_holds(metadata));
    }
    d
}

/// An expression that is true when the twin's metadata holds every entry of `wanted`.
///
/// The query language reads `{"metadata.<key>": <value>}` as a path and an operator
/// expression: `a.b` would reach into `a`, `$x` or `""` is refused, `{"$ne": null}` is an
/// operator, an array matches any of its elements and an object only with its keys in
/// the same order. So the metadata is taken apart with `$objectToArray` and each entry
/// compared by [`equals`]: keys are compared as strings, values as JSON values, and no
/// key of the client's ever becomes a key of the query (some servers inspect those even
/// under `$literal`).
fn metadata_holds(wanted: &Map<String, Value>) -> Bson {
    when_object(
        Bson::from("$metadata"),
        0,
        |entries| bson!({ "$and": wanted.iter().map(|(k, v)| has_entry(entries, k, v, 0)).collect::<Vec<_>>() }),
    )
}

/// `then` applied to the entries (`[{k, v}]`, in variable `$$o<depth>`) of the value of
/// expression `x` when that is an object, false otherwise.
fn when_object(x: Bson, depth: usize, then: impl FnOnce(&str) -> Bson) -> Bson {
    let var = format!("o{depth}");
    let entries = format!("$${var}");
    bson!({ "$cond": [
        { "$eq": [{ "$type": x.clone() }, "object"] },
        { "$let": { "vars": { var: { "$objectToArray": x } }, "in": then(&entries) } },
        false,
    ] })
}

/// Whether the entries of an object hold `key` with a value equal to `value`.
fn has_entry(entries: &str, key: &str, value: &Value, depth: usize) -> Bson {
    let var = format!("e{depth}");
    let (k, v) = (format!("$${var}.k"), format!("$${var}.v"));
    bson!({ "$anyElementTrue": [{ "$map": {
        "input": entries,
        "as": var,
        "in": { "$and": [
            { "$eq": [k, { "$literal": key }] },
            equals(Bson::String(v), value, depth + 1),
        ] },
    } }] })
}

/// Whether expression `x` evaluates to the JSON value `value`: numbers compare as numbers
/// whatever their BSON type, objects whatever their key order, arrays element by element.
fn equals(x: Bson, value: &Value, depth: usize) -> Bson {
    match value {
        Value::Object(m) => when_object(x, depth, |entries| {
            let size = bson!({ "$eq": [{ "$size": entries }, len(m.len())] });
            let entries = m.iter().map(|(k, v)| has_entry(entries, k, v, depth));
            bson!({ "$and": std::iter::once(size).chain(entries).collect::<Vec<_>>() })
        }),
        // Objects inside need the comparison above; without them a literal is exact.
        Value::Array(items) if items.iter().any(holds_object) => {
            let size = bson!({ "$eq": [{ "$size": x.clone() }, len(items.len())] });
            let items = items.iter().enumerate().map(|(i, item)| {
                equals(bson!({ "$arrayElemAt": [x.clone(), len(i)] }), item, depth)
            });
            bson!({ "$cond": [
                { "$isArray": x.clone() },
                { "$and": std::iter::once(size).chain(items).collect::<Vec<_>>() },
                false,
            ] })
        }
        _ => bson!({ "$eq": [x, { "$literal": codec::json_to_bson(value) }] }),
    }
}

fn holds_object(v: &Value) -> bool {
    match v {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().any(holds_object),
        _ => false,
    }
}

fn len(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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

/// The twin's states from id `first` on.
pub fn states_from(twin_id: &str, first: i64) -> Document {
    doc! { "twinid": twin_id, "id": { "$gte": first } }
}

/// The first BSON date after `t` (dates hold milliseconds): `created < after(t)` is
/// `created <= t` for every stored date. (A strict bound also sidesteps servers whose
/// index bounds treat `$lte` on dates as `$lt`.)
fn millis_after(t: &DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis().saturating_add(1))
}

/// A BSON date of `t` rounded up to the millisecond: the first stored date not before `t`.
fn millis_ceil(t: &DateTime<Utc>) -> bson::DateTime {
    let up = i64::from(!t.timestamp_subsec_nanos().is_multiple_of(1_000_000));
    bson::DateTime::from_millis(t.timestamp_millis().saturating_add(up))
}

/// The twin's states of a window. Dates hold milliseconds, so a bound with a finer
/// part is rounded inwards: exactly the states whose served `created` is in the window.
pub fn states_in(twin_id: &str, window: &Window) -> Document {
    let mut created = Document::new();
    if let Some(from) = &window.from {
        created.insert("$gte", millis_ceil(from));
    }
    if let Some(to) = &window.to {
        created.insert("$lt", millis_after(to));
    }
    let mut d = doc! { "twinid": twin_id };
    if !created.is_empty() {
        d.insert("created", created);
    }
    d
}

/// The twin's states created at or before `at`.
pub fn states_until(twin_id: &str, at: &DateTime<Utc>) -> Document {
    doc! { "twinid": twin_id, "created": { "$lt": millis_after(at) } }
}

/// History order (created, then id), ascending (1) or descending (-1): the order of the
/// (twinid, created, id) index.
pub fn history_order(direction: i32) -> Document {
    doc! { "created": direction, "id": direction }
}

/// Twins after this id, for the walk of retention.
pub fn twins_after(after: &str) -> Document {
    doc! { "id": { "$gt": after } }
}

/// The twin's states before id `keep`.
pub fn states_before(twin_id: &str, keep: i64) -> Document {
    doc! { "twinid": twin_id, "id": { "$lt": keep } }
}

/// A number, or nothing (which `$min`, `$max` and `$avg` skip).
fn numeric(field: &str) -> Bson {
    bson!({ "$cond": [{ "$isNumber": field }, field, Bson::Null] })
}

/// One document per attribute of the window's states: `_id` the attribute name,
/// `count`, `first`, `last` (in history order, sorted on the index before grouping),
/// and `min`, `max`, `mean` over its numbers.
pub fn summary_pipeline(twin_id: &str, window: &Window) -> Vec<Document> {
    vec![
        doc! { "$match": states_in(twin_id, window) },
        doc! { "$sort": history_order(1) },
        doc! { "$project": { "_id": 0, "kv": { "$objectToArray": "$payload" } } },
        doc! { "$unwind": "$kv" },
        doc! { "$group": {
            "_id": "$kv.k",
            "count": { "$sum": 1 },
            "first": { "$first": "$kv.v" },
            "last": { "$last": "$kv.v" },
            "min": { "$min": numeric("$kv.v") },
            "max": { "$max": numeric("$kv.v") },
            "mean": { "$avg": numeric("$kv.v") },
        } },
    ]
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

/// The document at version `expected`, with revisions kept (`revised`) or written before
/// revisions were kept (no `revisions` field).
pub fn document_revised_at(twin_id: &str, name: &str, expected: i64, revised: bool) -> Document {
    let mut d = document_at_version(twin_id, name, Some(expected));
    d.insert("revisions", doc! { "$exists": revised });
    d
}

/// Replaces the data of a document, sets its new version with how and by whom it was
/// written, and appends its revision (after `earlier`, the revision of a record's
/// version from before revisions were kept), keeping the newest `keep + 1`: one atomic
/// update of one record.
pub fn document_update(
    doc: &TwinDocument,
    op: WriteOp,
    by: &Writer,
    keep: u32,
    earlier: Option<Document>,
) -> StoreResult<Document> {
    let mut set = codec::document_to_bson(doc);
    set.remove("twinid");
    set.remove("name");
    set.insert("op", op.as_str());
    set.insert("by", codec::writer_to_bson(by));
    let revisions: Vec<Document> = earlier
        .into_iter()
        .chain([codec::revision_to_bson(doc, op, by)?])
        .collect();
    Ok(doc! {
        "$set": set,
        "$push": { "revisions": { "$each": revisions, "$slice": -(i64::from(keep) + 1) } },
    })
}

/// A document's record without its revisions: what a read of the document needs.
pub fn without_revisions() -> Document {
    doc! { "revisions": 0 }
}

/// A record projected to what lists its versions.
pub fn versions_projection() -> Document {
    doc! {
        "version": 1, "updated": 1, "op": 1, "by": 1,
        "revisions.version": 1, "revisions.updated": 1, "revisions.op": 1, "revisions.by": 1,
    }
}

/// A record projected to its current version and the one kept revision `version`.
pub fn revision_projection(version: i64) -> Document {
    doc! {
        "twinid": 1, "name": 1, "version": 1, "updated": 1, "data": 1,
        "revisions": { "$elemMatch": { "version": version } },
    }
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
                    record: None,
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
            ("states", vec!["twinid", "created", "id"], false),
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

    fn metadata(v: serde_json::Value) -> TwinFilter {
        TwinFilter {
            name: None,
            metadata: v.as_object().cloned(),
        }
    }

    #[test]
    fn twin_list_filters_by_owner_name_and_metadata_entries() {
        assert_eq!(
            twin_list("o", &TwinFilter::default()),
            doc! { "owner": "o" }
        );
        let empty = TwinFilter {
            name: Some("pump".into()),
            metadata: Some(Map::new()),
        };
        assert_eq!(
            twin_list("o", &empty),
            doc! { "owner": "o", "name": "pump" }
        );
        assert_eq!(
            twin_list("o", &metadata(json!({"site": "p1"}))),
            doc! {
                "owner": "o",
                "$expr": { "$cond": [
                    { "$eq": [{ "$type": "$metadata" }, "object"] },
                    { "$let": {
                        "vars": { "o0": { "$objectToArray": "$metadata" } },
                        "in": { "$and": [{ "$anyElementTrue": [{ "$map": {
                            "input": "$$o0",
                            "as": "e0",
                            "in": { "$and": [
                                { "$eq": ["$$e0.k", { "$literal": "site" }] },
                                { "$eq": ["$$e0.v", { "$literal": "p1" }] },
                            ] },
                        } }] }] },
                    } },
                    false,
                ] },
            }
        );
    }

    /// Every key of a document, recursively (in arrays too).
    fn keys(b: &Bson, out: &mut Vec<String>) {
        match b {
            Bson::Document(d) => {
                for (k, v) in d {
                    out.push(k.clone());
                    keys(v, out);
                }
            }
            Bson::Array(items) => items.iter().for_each(|i| keys(i, out)),
            _ => {}
        }
    }

    #[test]
    fn metadata_keys_and_values_never_become_keys_of_the_query() {
        let filter = metadata(json!({
            "a.b": 1, "$where": "1", "": {"$ne": null}, "deep": [{"$gt": [{"$in": []}]}],
        }));
        let mut got = Vec::new();
        keys(&Bson::Document(twin_list("o", &filter)), &mut got);
        for client in ["a.b", "$where", "", "$ne", "deep", "$gt", "$in"] {
            assert!(!got.iter().any(|k| k == client), "{client:?} in {got:?}");
        }
    }

    #[test]
    fn arrays_holding_objects_are_compared_element_by_element() {
        let plain = equals(Bson::from("$$x"), &json!([1, [2, "$y"]]), 1);
        assert_eq!(
            plain,
            bson!({ "$eq": ["$$x", { "$literal": [1_i64, [2_i64, "$y"]] }] })
        );
        let mut got = Vec::new();
        keys(
            &equals(Bson::from("$$x"), &json!([1, [{"k": 2}]]), 1),
            &mut got,
        );
        assert!(got.contains(&"$arrayElemAt".to_owned()), "{got:?}");
        assert!(got.contains(&"$objectToArray".to_owned()), "{got:?}");
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
        assert_eq!(
            document_revised_at("t", "d", 3, false),
            doc! { "twinid": "t", "name": "d", "version": 3_i64, "revisions": { "$exists": false } }
        );
        let d = TwinDocument {
            twin_id: "t".into(),
            document_name: "d".into(),
            version: 4,
            updated: from_nanos(MS * 1_000_000),
            data: json!({"x": [1]}).as_object().cloned().unwrap(),
        };
        let by = Writer::User { id: "u".into() };
        assert_eq!(
            document_update(&d, WriteOp::Patch, &by, 2, None).unwrap(),
            doc! {
                "$set": {
                    "version": 4_i64, "updated": date(), "data": { "x": [1_i64] },
                    "op": "patch", "by": { "kind": "user", "id": "u" },
                },
                "$push": { "revisions": {
                    "$each": [{
                        "version": 4_i64, "updated": date(), "op": "patch",
                        "by": { "kind": "user", "id": "u" }, "data": "{\"x\":[1]}",
                    }],
                    "$slice": -3_i64,
                } },
            }
        );
    }
}
