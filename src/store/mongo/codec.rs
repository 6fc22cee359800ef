//! Twins, states and documents as BSON, in the shape the Go service stores them.
//!
//! A deployment switching from the Go service keeps its data, and the Go service could
//! read ours back, so the layout follows the Go driver's defaults rather than our JSON:
//! field names are the lower-cased Go field names (`persiststate`, `twinid`), Go `int`
//! fields (revision, definition ids, a state's definition) are Int32 when they fit and
//! Int64 otherwise, `int64` fields (delta, state id) are Int64, and times are BSON dates,
//! which hold milliseconds. Decoding is as lenient as the Go driver: a missing or null
//! field reads as its zero value (Go writes a nil map or slice as null) and any numeric
//! type is accepted for an integer. The `_id` ObjectId the drivers add is ignored.
//!
//! Free-form JSON (metadata, payloads, document data) maps type by type: integers to
//! Int64, other numbers to Double, objects to embedded documents. Reading back maps
//! Int32/Int64 to integers and Double to floats, so our own values round-trip exactly;
//! BSON types JSON lacks (dates, ObjectIds, ...) read as relaxed extended JSON. The Go
//! service stored every such number as a Double: the integral ones are served without a
//! fraction, as it served them, by [`crate::domain::json`].

use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value};

use crate::domain::document::{
    Document as TwinDocument, DocumentSummary, VersionSummary, WriteOp, Writer,
};
use crate::domain::history::AttributeSummary;
use crate::domain::state::State;
use crate::domain::twin::{Attribute, Definition, Twin};
use crate::store::{StoreError, StoreResult};

/// A Go `int`: the Go driver writes Int32 when the value fits.
fn go_int(v: i64) -> Bson {
    i32::try_from(v).map_or(Bson::Int64(v), Bson::Int32)
}

fn date(t: &DateTime<Utc>) -> Bson {
    Bson::DateTime(bson::DateTime::from_millis(t.timestamp_millis()))
}

pub fn json_to_bson(v: &Value) -> Bson {
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            // Integers above i64::MAX have no BSON integer type.
            None => n.as_f64().map_or(Bson::Null, Bson::Double),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(json_to_bson).collect()),
        Value::Object(m) => Bson::Document(object_to_bson(m)),
    }
}

pub fn object_to_bson(m: &Map<String, Value>) -> Document {
    m.iter()
        .map(|(k, v)| (k.clone(), json_to_bson(v)))
        .collect()
}

pub fn bson_to_json(b: &Bson) -> Value {
    match b {
        Bson::Null => Value::Null,
        Bson::Boolean(v) => Value::Bool(*v),
        Bson::Int32(i) => Value::from(*i),
        Bson::Int64(i) => Value::from(*i),
        // NaN and infinities have no JSON form.
        Bson::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Array(a) => Value::Array(a.iter().map(bson_to_json).collect()),
        Bson::Document(d) => Value::Object(bson_to_object(d)),
        other => other.clone().into_relaxed_extjson(),
    }
}

fn bson_to_object(d: &Document) -> Map<String, Value> {
    d.iter()
        .map(|(k, v)| (k.clone(), bson_to_json(v)))
        .collect()
}

pub fn twin_to_bson(t: &Twin) -> Document {
    doc! {
        "owner": &t.owner,
        "id": &t.id,
        "name": &t.name,
        "created": date(&t.created),
        "updated": date(&t.updated),
        "revision": go_int(t.revision),
        "definitions": definitions_to_bson(&t.definitions),
        "metadata": object_to_bson(&t.metadata),
    }
}

/// An attribute in the Go service's shape; `record`, ours, only when set (the Go service
/// ignores it).
fn attribute_to_bson(a: &Attribute) -> Bson {
    let mut d = doc! {
        "name": &a.name,
        "channel": &a.channel,
        "subtopic": &a.subtopic,
        "persiststate": a.persist_state,
    };
    if let Some(r) = &a.record {
        d.insert("record", r);
    }
    Bson::Document(d)
}

pub fn definitions_to_bson(defs: &[Definition]) -> Vec<Bson> {
    defs.iter()
        .map(|d| {
            Bson::Document(doc! {
                "id": go_int(d.id),
                "created": date(&d.created),
                "attributes": d.attributes.iter().map(attribute_to_bson).collect::<Vec<_>>(),
                "delta": Bson::Int64(d.delta),
            })
        })
        .collect()
}

pub fn state_to_bson(s: &State) -> Document {
    doc! {
        "twinid": &s.twin_id,
        "id": Bson::Int64(s.id),
        "definition": go_int(s.definition),
        "created": date(&s.created),
        "payload": object_to_bson(&s.payload),
    }
}

pub fn document_to_bson(d: &TwinDocument) -> Document {
    doc! {
        "twinid": &d.twin_id,
        "name": &d.document_name,
        "version": Bson::Int64(d.version),
        "updated": date(&d.updated),
        "data": object_to_bson(&d.data),
    }
}

/// Who wrote a version: `{kind, id}`, without `id` for the service.
pub fn writer_to_bson(by: &Writer) -> Document {
    let mut d = doc! { "kind": by.kind() };
    if !matches!(by, Writer::Service) {
        d.insert("id", by.id());
    }
    d
}

/// A revision as kept in its document's record: the data as compact JSON text, so that
/// a revision takes at most the document size limit (the BSON of the same data can be
/// several times larger) and a record of bounded revisions stays within MongoDB's
/// 16 MiB.
pub fn revision_to_bson(doc: &TwinDocument, op: WriteOp, by: &Writer) -> StoreResult<Document> {
    let data = serde_json::to_string(&doc.data).map_err(|e| StoreError::Internal(e.into()))?;
    Ok(doc! {
        "version": Bson::Int64(doc.version),
        "updated": date(&doc.updated),
        "op": op.as_str(),
        "by": writer_to_bson(by),
        "data": data,
    })
}

/// The current version of a record written before revisions were kept, as its first
/// revision.
pub fn legacy_revision(record: &Document) -> StoreResult<Document> {
    let doc = document_from_bson(record)?;
    let (op, by) = provenance(&Fields::new(record, "document"), doc.version)?;
    revision_to_bson(&doc, op, &by)
}

/// A document's record as first written: the document, how and by whom it was written,
/// and its first revision.
pub fn new_document_to_bson(doc: &TwinDocument, op: WriteOp, by: &Writer) -> StoreResult<Document> {
    let mut record = document_to_bson(doc);
    record.insert("op", op.as_str());
    record.insert("by", writer_to_bson(by));
    record.insert(
        "revisions",
        vec![Bson::Document(revision_to_bson(doc, op, by)?)],
    );
    Ok(record)
}

/// Typed reads of one stored document, naming the field in every error.
struct Fields<'a> {
    doc: &'a Document,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(doc: &'a Document, what: &'static str) -> Self {
        Self { doc, what }
    }

    /// The field's value; None when it is missing or null.
    fn get(&self, key: &str) -> Option<&'a Bson> {
        self.doc.get(key).filter(|b| !matches!(b, Bson::Null))
    }

    fn corrupt(&self, key: &str, found: &Bson) -> StoreError {
        StoreError::Internal(
            format!(
                "corrupt {}: field {key:?} is a {:?}",
                self.what,
                found.element_type()
            )
            .into(),
        )
    }

    fn str(&self, key: &str) -> StoreResult<String> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Bson::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }

    fn int(&self, key: &str) -> StoreResult<i64> {
        match self.get(key) {
            None => Ok(0),
            Some(Bson::Int32(i)) => Ok(i64::from(*i)),
            Some(Bson::Int64(i)) => Ok(*i),
            // Written by hand in a shell, where every number is a double.
            Some(Bson::Double(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(*f as i64),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }

    fn bool(&self, key: &str) -> StoreResult<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Bson::Boolean(b)) => Ok(*b),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }

    /// A BSON date; a missing one reads as the Unix epoch.
    fn date(&self, key: &str) -> StoreResult<DateTime<Utc>> {
        match self.get(key) {
            None => Ok(DateTime::UNIX_EPOCH),
            Some(Bson::DateTime(d)) => DateTime::from_timestamp_millis(d.timestamp_millis())
                .ok_or_else(|| self.corrupt(key, &Bson::DateTime(*d))),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }

    fn object(&self, key: &str) -> StoreResult<Map<String, Value>> {
        match self.get(key) {
            None => Ok(Map::new()),
            Some(Bson::Document(d)) => Ok(bson_to_object(d)),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }

    /// The embedded documents of an array field.
    fn documents(&self, key: &str) -> StoreResult<Vec<&'a Document>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Bson::Array(items)) => items
                .iter()
                .map(|b| match b {
                    Bson::Document(d) => Ok(d),
                    other => Err(self.corrupt(key, other)),
                })
                .collect(),
            Some(other) => Err(self.corrupt(key, other)),
        }
    }
}

pub fn twin_from_bson(doc: &Document) -> StoreResult<Twin> {
    let f = Fields::new(doc, "twin");
    Ok(Twin {
        owner: f.str("owner")?,
        id: f.str("id")?,
        name: f.str("name")?,
        revision: f.int("revision")?,
        created: f.date("created")?,
        updated: f.date("updated")?,
        definitions: definitions_from_bson(doc)?,
        metadata: f.object("metadata")?,
    })
}

/// The `definitions` of a twin document (also of one projected to its attributes).
pub fn definitions_from_bson(twin: &Document) -> StoreResult<Vec<Definition>> {
    Fields::new(twin, "twin")
        .documents("definitions")?
        .into_iter()
        .map(|d| {
            let f = Fields::new(d, "definition");
            Ok(Definition {
                id: f.int("id")?,
                created: f.date("created")?,
                attributes: f
                    .documents("attributes")?
                    .into_iter()
                    .map(|a| {
                        let f = Fields::new(a, "attribute");
                        Ok(Attribute {
                            name: f.str("name")?,
                            channel: f.str("channel")?,
                            subtopic: f.str("subtopic")?,
                            persist_state: f.bool("persiststate")?,
                            record: Some(f.str("record")?).filter(|r| !r.is_empty()),
                        })
                    })
                    .collect::<StoreResult<_>>()?,
                delta: f.int("delta")?,
            })
        })
        .collect()
}

pub fn state_from_bson(doc: &Document) -> StoreResult<State> {
    let f = Fields::new(doc, "state");
    Ok(State {
        twin_id: f.str("twinid")?,
        id: f.int("id")?,
        definition: f.int("definition")?,
        created: f.date("created")?,
        payload: f.object("payload")?,
    })
}

pub fn document_from_bson(doc: &Document) -> StoreResult<TwinDocument> {
    let f = Fields::new(doc, "document");
    Ok(TwinDocument {
        twin_id: f.str("twinid")?,
        document_name: f.str("name")?,
        version: f.int("version")?,
        updated: f.date("updated")?,
        data: f.object("data")?,
    })
}

pub fn summary_from_bson(doc: &Document) -> StoreResult<DocumentSummary> {
    let f = Fields::new(doc, "document");
    Ok(DocumentSummary {
        document_name: f.str("name")?,
        version: f.int("version")?,
        updated: f.date("updated")?,
    })
}

/// How and by whom a version was written, from a record or one of its revisions. A
/// record written before revisions were kept has neither: its writer is unknown and
/// reads as the service, as the SQL stores record such documents.
fn provenance(f: &Fields<'_>, version: i64) -> StoreResult<(WriteOp, Writer)> {
    let op = match f.get("op") {
        None if version == 1 => WriteOp::Create,
        None => WriteOp::Put,
        Some(Bson::String(s)) => {
            WriteOp::parse(s).ok_or_else(|| f.corrupt("op", &Bson::String(s.clone())))?
        }
        Some(other) => return Err(f.corrupt("op", other)),
    };
    let by = match f.get("by") {
        None => Writer::Service,
        Some(Bson::Document(d)) => {
            let w = Fields::new(d, "writer");
            let kind = w.str("kind")?;
            Writer::from_parts(&kind, &w.str("id")?)
                .ok_or_else(|| w.corrupt("kind", &Bson::String(kind)))?
        }
        Some(other) => return Err(f.corrupt("by", other)),
    };
    Ok((op, by))
}

fn version_summary(f: &Fields<'_>) -> StoreResult<VersionSummary> {
    let version = f.int("version")?;
    let (op, by) = provenance(f, version)?;
    Ok(VersionSummary {
        version,
        updated: f.date("updated")?,
        op,
        by,
    })
}

/// The kept versions of a record (projected to the fields of [`VersionSummary`], or
/// whole), oldest first. The current version is the record's own, also for a record
/// whose revisions lack it (written before revisions were kept).
pub fn versions_from_bson(record: &Document) -> StoreResult<Vec<VersionSummary>> {
    let f = Fields::new(record, "document");
    let mut versions = f
        .documents("revisions")?
        .into_iter()
        .map(|r| version_summary(&Fields::new(r, "revision")))
        .collect::<StoreResult<Vec<_>>>()?;
    let current = version_summary(&f)?;
    if versions.last().map(|v| v.version) != Some(current.version) {
        versions.retain(|v| v.version < current.version);
        versions.push(current);
    }
    Ok(versions)
}

/// A revision kept in a record, as the document it was.
pub fn revision_from_bson(
    revision: &Document,
    twin_id: &str,
    name: &str,
) -> StoreResult<TwinDocument> {
    let f = Fields::new(revision, "revision");
    let data = f.str("data")?;
    Ok(TwinDocument {
        twin_id: twin_id.to_owned(),
        document_name: name.to_owned(),
        version: f.int("version")?,
        updated: f.date("updated")?,
        data: serde_json::from_str(&data)
            .map_err(|e| StoreError::Internal(format!("corrupt revision data: {e}").into()))?,
    })
}

/// The revisions of a record (as projected), in the order kept.
pub fn revisions_of(record: &Document) -> StoreResult<Vec<&Document>> {
    Fields::new(record, "document").documents("revisions")
}

/// The stored version of a document (projected or whole).
pub fn version_from_bson(doc: &Document) -> StoreResult<i64> {
    Fields::new(doc, "document").int("version")
}

/// The id of a twin document (projected or whole).
pub fn id_from_bson(doc: &Document, what: &'static str) -> StoreResult<String> {
    Fields::new(doc, what).str("id")
}

/// The id of a state document (projected or whole).
pub fn state_id_from_bson(doc: &Document) -> StoreResult<i64> {
    Fields::new(doc, "state").int("id")
}

/// One group of [`super::filters::summary_pipeline`]: the attribute and its summary.
pub fn attribute_summary_from_bson(doc: &Document) -> StoreResult<(String, AttributeSummary)> {
    let f = Fields::new(doc, "summary");
    let value = |key: &str| doc.get(key).map_or(Value::Null, bson_to_json);
    let mean = match doc.get("mean") {
        Some(Bson::Double(m)) => Some(*m).filter(|m| m.is_finite()),
        Some(Bson::Int32(m)) => Some(f64::from(*m)),
        Some(Bson::Int64(m)) => Some(*m as f64),
        _ => None,
    };
    Ok((
        f.str("_id")?,
        AttributeSummary {
            count: u64::try_from(f.int("count")?).unwrap_or(0),
            first: value("first"),
            last: value("last"),
            min: value("min"),
            max: value("max"),
            mean,
        },
    ))
}

/// A state's id and creation time, from a document projected to them.
pub fn state_id_and_created(doc: &Document) -> StoreResult<(i64, DateTime<Utc>)> {
    let f = Fields::new(doc, "state");
    Ok((f.int("id")?, f.date("created")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::from_nanos;
    use bson::oid::ObjectId;
    use bson::spec::ElementType;
    use serde_json::json;

    /// 2020-05-05T08:41:39.142Z and 2020-05-05T08:49:12.638Z, as in the Go service's docs.
    const CREATED_MS: i64 = 1_588_668_099_142;
    const UPDATED_MS: i64 = 1_588_668_552_638;

    fn ms(millis: i64) -> DateTime<Utc> {
        from_nanos(millis * 1_000_000)
    }

    /// A twin exactly as the Go service stores it: `_id` added by the Go driver, Go
    /// `int` fields as Int32, `delta` as Int64, dates in milliseconds, metadata numbers
    /// as doubles (Go decodes JSON numbers into float64).
    fn go_twin() -> Document {
        doc! {
            "_id": ObjectId::parse_str("5eb127830f5d3b6a7ef9c1a2").unwrap(),
            "owner": "john.doe@email.net",
            "id": "a838e608-1c1b-4fea-9c34-def877473a89",
            "name": "grinding machine 2",
            "created": bson::DateTime::from_millis(CREATED_MS),
            "updated": bson::DateTime::from_millis(UPDATED_MS),
            "revision": 1_i32,
            "definitions": [
                {
                    "id": 0_i32,
                    "created": bson::DateTime::from_millis(CREATED_MS),
                    "attributes": [],
                    "delta": 1_000_000_i64,
                },
                {
                    "id": 1_i32,
                    "created": bson::DateTime::from_millis(UPDATED_MS),
                    "attributes": [
                        {
                            "name": "engine temperature",
                            "channel": "7ef6c61c-f514-402f-af4b-2401b588bfec",
                            "subtopic": "engine",
                            "persiststate": true,
                        },
                        {
                            "name": "rotations per sec",
                            "channel": "7ef6c61c-f514-402f-af4b-2401b588bfec",
                            "subtopic": "engine",
                            "persiststate": false,
                        },
                    ],
                    "delta": 10_000_000_000_i64,
                },
            ],
            "metadata": { "floor": 2.5, "site": "plant-1" },
        }
    }

    fn go_state() -> Document {
        doc! {
            "_id": ObjectId::parse_str("5eb127830f5d3b6a7ef9c1a3").unwrap(),
            "twinid": "a838e608-1c1b-4fea-9c34-def877473a89",
            "id": 12_i64,
            "definition": 1_i32,
            "created": bson::DateTime::from_millis(UPDATED_MS),
            "payload": { "engine temperature": 81.5, "on": true, "status": "ok" },
        }
    }

    fn expected_twin() -> Twin {
        let attr = |name: &str, persist_state| Attribute {
            name: name.into(),
            channel: "7ef6c61c-f514-402f-af4b-2401b588bfec".into(),
            subtopic: "engine".into(),
            persist_state,
            record: None,
        };
        Twin {
            owner: "john.doe@email.net".into(),
            id: "a838e608-1c1b-4fea-9c34-def877473a89".into(),
            name: "grinding machine 2".into(),
            revision: 1,
            created: ms(CREATED_MS),
            updated: ms(UPDATED_MS),
            definitions: vec![
                Definition {
                    id: 0,
                    created: ms(CREATED_MS),
                    attributes: vec![],
                    delta: 1_000_000,
                },
                Definition {
                    id: 1,
                    created: ms(UPDATED_MS),
                    attributes: vec![
                        attr("engine temperature", true),
                        attr("rotations per sec", false),
                    ],
                    delta: 10_000_000_000,
                },
            ],
            metadata: json!({"site": "plant-1", "floor": 2.5})
                .as_object()
                .cloned()
                .unwrap(),
        }
    }

    /// Field names and BSON types of a document, recursively, ignoring `_id`.
    fn shape(doc: &Document) -> Vec<(String, ElementType)> {
        fn walk(prefix: &str, b: &Bson, out: &mut Vec<(String, ElementType)>) {
            out.push((prefix.to_owned(), b.element_type()));
            match b {
                Bson::Document(d) => {
                    for (k, v) in d {
                        walk(&format!("{prefix}.{k}"), v, out);
                    }
                }
                Bson::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        walk(&format!("{prefix}.{i}"), v, out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        for (k, v) in doc.iter().filter(|(k, _)| *k != "_id") {
            walk(k, v, &mut out);
        }
        out
    }

    #[test]
    fn go_twin_decodes_into_our_twin() {
        assert_eq!(twin_from_bson(&go_twin()).unwrap(), expected_twin());
    }

    #[test]
    fn our_twin_encodes_to_the_go_field_names_and_types() {
        let mut go = go_twin();
        go.remove("_id");
        let ours = twin_to_bson(&expected_twin());
        assert_eq!(shape(&ours), shape(&go));
        assert_eq!(ours, go);
    }

    #[test]
    fn a_record_binding_is_a_field_of_ours_only_when_set() {
        let mut t = expected_twin();
        t.definitions[1].attributes[0].record = Some("engine/temperature".into());
        let encoded = twin_to_bson(&t);
        let attrs = |d: &Document| -> Vec<Option<String>> {
            d.get_array("definitions").unwrap()[1]
                .as_document()
                .unwrap()
                .get_array("attributes")
                .unwrap()
                .iter()
                .map(|a| {
                    a.as_document()
                        .unwrap()
                        .get_str("record")
                        .ok()
                        .map(Into::into)
                })
                .collect()
        };
        assert_eq!(
            attrs(&encoded),
            vec![Some("engine/temperature".to_owned()), None]
        );
        assert_eq!(twin_from_bson(&encoded).unwrap(), t);
    }

    #[test]
    fn go_state_decodes_into_our_state() {
        let s = state_from_bson(&go_state()).unwrap();
        assert_eq!(
            s,
            State {
                twin_id: "a838e608-1c1b-4fea-9c34-def877473a89".into(),
                id: 12,
                definition: 1,
                created: ms(UPDATED_MS),
                payload: json!({"engine temperature": 81.5, "status": "ok", "on": true})
                    .as_object()
                    .cloned()
                    .unwrap(),
            }
        );
    }

    #[test]
    fn our_state_encodes_to_the_go_field_names_and_types() {
        let mut go = go_state();
        go.remove("_id");
        let ours = state_to_bson(&state_from_bson(&go_state()).unwrap());
        assert_eq!(shape(&ours), shape(&go));
        assert_eq!(ours, go);
    }

    #[test]
    fn times_are_bson_dates_in_milliseconds() {
        let mut t = expected_twin();
        // Sub-millisecond precision is what a BSON date cannot hold.
        t.created = from_nanos(CREATED_MS * 1_000_000 + 999_999);
        let d = twin_to_bson(&t);
        assert_eq!(
            d.get("created"),
            Some(&Bson::DateTime(bson::DateTime::from_millis(CREATED_MS)))
        );
        assert_eq!(twin_from_bson(&d).unwrap().created, ms(CREATED_MS));
    }

    #[test]
    fn go_ints_beyond_i32_become_int64() {
        assert_eq!(go_int(7), Bson::Int32(7));
        assert_eq!(go_int(i64::from(i32::MAX) + 1), Bson::Int64(2_147_483_648));
        let mut t = expected_twin();
        t.revision = 5_000_000_000;
        assert_eq!(
            twin_from_bson(&twin_to_bson(&t)).unwrap().revision,
            t.revision
        );
    }

    /// The Go driver writes a nil map or slice as null; a twin created before a field
    /// existed lacks it.
    #[test]
    fn null_and_missing_fields_read_as_zero_values() {
        let go = doc! {
            "owner": "o",
            "id": "i",
            "created": bson::DateTime::from_millis(CREATED_MS),
            "updated": bson::DateTime::from_millis(CREATED_MS),
            "revision": 0_i32,
            "definitions": [ { "id": 0_i32, "created": bson::DateTime::from_millis(CREATED_MS), "attributes": null } ],
            "metadata": null,
        };
        let t = twin_from_bson(&go).unwrap();
        assert_eq!(t.name, "");
        assert!(t.metadata.is_empty());
        assert!(t.definitions[0].attributes.is_empty());
        assert_eq!(t.definitions[0].delta, 0);
        let s = state_from_bson(&doc! { "twinid": "i", "id": 0_i64, "payload": null }).unwrap();
        assert!(s.payload.is_empty());
        assert_eq!(s.created, DateTime::UNIX_EPOCH);
    }

    #[test]
    fn wrong_field_types_are_corrupt_data_naming_the_field() {
        let mut d = go_twin();
        d.insert("revision", "one");
        let err = twin_from_bson(&d).unwrap_err().to_string();
        assert!(
            err.contains("corrupt twin") && err.contains("revision"),
            "{err}"
        );
        let err = state_from_bson(&doc! { "id": "x" })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("corrupt state") && err.contains("\"id\""),
            "{err}"
        );
    }

    #[test]
    fn json_values_round_trip_through_bson() {
        let v = json!({
            "int": 5, "neg": -3, "float": 2.5, "whole float": 3.0, "s": "x", "b": false,
            "null": null, "arr": [1, "two", [3.5], {"k": true}], "obj": {"nested": {"deep": 1}},
        });
        let b = json_to_bson(&v);
        assert_eq!(b.as_document().unwrap().get("int"), Some(&Bson::Int64(5)));
        assert_eq!(
            b.as_document().unwrap().get("whole float"),
            Some(&Bson::Double(3.0))
        );
        assert_eq!(bson_to_json(&b), v);
    }

    #[test]
    fn bson_types_without_json_form_read_as_extended_json() {
        assert_eq!(bson_to_json(&Bson::Int32(4)), json!(4));
        assert_eq!(bson_to_json(&Bson::Double(f64::NAN)), Value::Null);
        let oid = ObjectId::parse_str("5eb127830f5d3b6a7ef9c1a2").unwrap();
        assert_eq!(
            bson_to_json(&Bson::ObjectId(oid)),
            json!({"$oid": "5eb127830f5d3b6a7ef9c1a2"})
        );
    }

    #[test]
    fn documents_encode_and_decode() {
        let d = TwinDocument {
            twin_id: "t".into(),
            document_name: "desired".into(),
            version: 3,
            updated: ms(UPDATED_MS),
            data: json!({"armed": true}).as_object().cloned().unwrap(),
        };
        let b = document_to_bson(&d);
        assert_eq!(
            b,
            doc! {
                "twinid": "t", "name": "desired", "version": 3_i64,
                "updated": bson::DateTime::from_millis(UPDATED_MS), "data": { "armed": true },
            }
        );
        assert_eq!(document_from_bson(&b).unwrap(), d);
        assert_eq!(summary_from_bson(&b).unwrap(), DocumentSummary::from(&d));
        assert_eq!(version_from_bson(&b).unwrap(), 3);
    }

    fn panel(version: i64, data: Value) -> TwinDocument {
        TwinDocument {
            twin_id: "t".into(),
            document_name: "panel".into(),
            version,
            updated: ms(UPDATED_MS + version),
            data: data.as_object().cloned().unwrap_or_default(),
        }
    }

    /// The data whose BSON is largest for its JSON size: an array of zeros, each one an
    /// Int64 under a key of up to five digits (15 bytes of BSON for 2 of JSON).
    fn largest_data() -> Value {
        let zeros = vec![json!(0); (crate::domain::document::MAX_DATA_BYTES - 16) / 2];
        json!({ "z": zeros })
    }

    #[test]
    fn a_record_with_the_most_revisions_of_the_largest_data_fits_in_16_mib() {
        let doc = panel(1000, largest_data());
        assert!(crate::domain::document::check_size(&doc.data).is_ok());
        let by = Writer::Channel {
            id: "c".repeat(256),
        };
        let mut record = new_document_to_bson(&doc, WriteOp::Patch, &by).unwrap();
        let revision = Bson::Document(revision_to_bson(&doc, WriteOp::Patch, &by).unwrap());
        let kept = super::super::MAX_KEPT as usize + 1;
        record.insert("revisions", vec![revision; kept]);
        let size = record.to_vec().unwrap().len();
        assert!(size < 16 * 1024 * 1024, "{size} bytes");
    }

    #[test]
    fn a_record_lists_its_revisions_and_serves_each() {
        let by = Writer::User { id: "alice".into() };
        let v1 = panel(1, json!({"a": {"b": [1, 2.5, "x", null]}}));
        let v2 = panel(2, json!({"c": true}));
        let mut record = new_document_to_bson(&v1, WriteOp::Create, &by).unwrap();
        let second = revision_to_bson(&v2, WriteOp::Put, &Writer::Service).unwrap();
        for (k, v) in document_to_bson(&v2) {
            record.insert(k, v);
        }
        record.insert("op", "put");
        record.insert("by", writer_to_bson(&Writer::Service));
        if let Ok(revisions) = record.get_array_mut("revisions") {
            revisions.push(Bson::Document(second));
        }
        let listed = versions_from_bson(&record).unwrap();
        let summary = |d: &TwinDocument, op, by| VersionSummary {
            version: d.version,
            updated: d.updated,
            op,
            by,
        };
        assert_eq!(
            listed,
            vec![
                summary(&v1, WriteOp::Create, by.clone()),
                summary(&v2, WriteOp::Put, Writer::Service)
            ]
        );
        let kept = revisions_of(&record).unwrap();
        assert_eq!(revision_from_bson(kept[0], "t", "panel").unwrap(), v1);
        assert_eq!(revision_from_bson(kept[1], "t", "panel").unwrap(), v2);
    }

    #[test]
    fn a_record_from_before_revisions_lists_its_current_version() {
        for (version, op) in [(1, WriteOp::Create), (4, WriteOp::Put)] {
            let record = document_to_bson(&panel(version, json!({"k": 1})));
            let listed = versions_from_bson(&record).unwrap();
            assert_eq!(
                listed,
                vec![VersionSummary {
                    version,
                    updated: ms(UPDATED_MS + version),
                    op,
                    by: Writer::Service,
                }]
            );
        }
    }
}
