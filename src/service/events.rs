//! Magistrala's event store (`MG_TWINS_ES_URL`) as a decorator: after each successful
//! operation, the event the Go service published for it, with its field names and
//! encodings, so that consumers of the stream `magistrala.twins` keep working after the
//! swap.
//!
//! Operations: `twins.add`, `twins.update`, `twins.remove`, `twins.view`, `twins.list`,
//! `twins.list_states` and, per applied message, `twins.save_states`. As in the Go
//! service, nested values (metadata, definitions, attributes, the message) are JSON
//! texts carried as bytes, which JSON shows in base64. Unlike the Go service, an event
//! that cannot be published never fails the operation: it is logged and counted.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::ServiceResult;
use super::ingest::{Batch, BatchReport, Ingest, IngestError, Message, SetAside};
use super::twins::{NewTwin, TwinUpdate, Twins};
use crate::domain::state::State;
use crate::domain::time;
use crate::domain::twin::{Definition, Twin, TwinFilter};
use crate::domain::{Page, PageRequest};

/// The event stream of the twins service, as Magistrala names it.
pub const STREAM_ID: &str = "magistrala.twins";
/// Counter of events that could not be published.
pub const FAILED: &str = "twins_es_publish_failures_total";

/// One event: the Go service's map of values (`operation` first).
pub type Event = Map<String, Value>;

/// Where events go (a JetStream stream or a Redis stream).
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Publishes the events in order, each with `occurred_at` (Unix nanoseconds) added.
    /// An error says they were not all stored.
    async fn publish(&self, events: Vec<Event>) -> Result<(), crate::error::Cause>;
}

/// A use case whose successful operations are published to the event store (when
/// there is one; without, it adds nothing).
pub struct Recorded<S> {
    inner: S,
    store: Option<Arc<dyn EventStore>>,
}

impl<S> Recorded<S> {
    pub fn new(inner: S, store: Option<Arc<dyn EventStore>>) -> Self {
        Self { inner, store }
    }

    async fn record(&self, events: Vec<Event>) {
        let Some(store) = &self.store else { return };
        if events.is_empty() {
            return;
        }
        let n = events.len();
        if let Err(e) = store.publish(events).await {
            metrics::counter!(FAILED).increment(n as u64);
            tracing::warn!(error = %e, events = n, "event store: events not published");
        }
    }
}

/// The value the Go service shows for a nested value: its JSON text as bytes, which
/// JSON renders in base64.
fn go_bytes<T: Serialize + ?Sized>(v: &T) -> Value {
    let text = serde_json::to_vec(v).unwrap_or_default();
    Value::String(base64::engine::general_purpose::STANDARD.encode(text))
}

/// A time as Go's `time.Time` marshals to JSON (RFC 3339 with nanoseconds as needed).
fn go_time(t: &chrono::DateTime<chrono::Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn event(operation: &str) -> Event {
    let mut e = Map::new();
    e.insert("operation".into(), json!(operation));
    e
}

/// `twins.add` and `twins.update`: the twin and the definition it was given (its
/// current one), each field only when it is not Go's zero value.
pub fn twin_event(operation: &str, twin: &Twin, with_created: bool) -> Event {
    let mut e = event(operation);
    e.insert("id".into(), json!(twin.id));
    if with_created || operation == "twins.add" {
        e.insert("created".into(), go_time(&twin.created));
    }
    if !twin.owner.is_empty() {
        e.insert("owner".into(), json!(twin.owner));
    }
    if !twin.name.is_empty() {
        e.insert("name".into(), json!(twin.name));
    }
    if twin.revision != 0 {
        e.insert("revision".into(), json!(twin.revision));
    }
    if !twin.metadata.is_empty() {
        e.insert("metadata".into(), go_bytes(&twin.metadata));
    }
    if !twin.definitions.is_empty() {
        e.insert("twin_definitions".into(), go_bytes(&twin.definitions));
    }
    if let Some(d) = twin.definitions.last() {
        definition_fields(&mut e, d);
    }
    e
}

fn definition_fields(e: &mut Event, d: &Definition) {
    if d.id != 0 {
        e.insert("definition_id".into(), json!(d.id));
    }
    e.insert("definition_created".into(), go_time(&d.created));
    if !d.attributes.is_empty() {
        e.insert("definition_attributes".into(), go_bytes(&d.attributes));
    }
    if d.delta != 0 {
        e.insert("definition_delta".into(), json!(d.delta));
    }
}

fn with_id(operation: &str, id: &str) -> Event {
    let mut e = event(operation);
    if !id.is_empty() {
        e.insert("id".into(), json!(id));
    }
    e
}

fn paged(e: &mut Event, page: PageRequest) {
    if page.offset != 0 {
        e.insert("offset".into(), json!(page.offset));
    }
    if page.limit != 0 {
        e.insert("limit".into(), json!(page.limit));
    }
}

/// `twins.list`: the query.
pub fn list_event(filter: &TwinFilter, page: PageRequest) -> Event {
    let mut e = event("twins.list");
    if let Some(name) = filter.name.as_deref().filter(|n| !n.is_empty()) {
        e.insert("name".into(), json!(name));
    }
    if let Some(metadata) = &filter.metadata {
        e.insert("metadata".into(), go_bytes(metadata));
    }
    paged(&mut e, page);
    e
}

/// `twins.save_states`: the message, as Go's JSON of `messaging.Message` (the payload
/// in base64; the publisher and protocol are not kept by ingestion, so absent).
pub fn save_states_event(m: &Message) -> Event {
    let mut msg = Map::new();
    for (key, value) in [("channel", &m.channel), ("subtopic", &m.subtopic)] {
        if !value.is_empty() {
            msg.insert(key.into(), json!(value));
        }
    }
    if !m.payload.is_empty() {
        msg.insert(
            "payload".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
        );
    }
    if m.created != 0 {
        msg.insert("created".into(), json!(m.created));
    }
    let mut e = event("twins.save_states");
    e.insert("message".into(), go_bytes(&msg));
    e
}

/// Adds `occurred_at` (Unix nanoseconds, now), as Magistrala's publishers do.
pub fn stamped(mut e: Event) -> Event {
    e.insert(
        "occurred_at".into(),
        json!(time::to_nanos(&chrono::Utc::now())),
    );
    e
}

#[async_trait]
impl<S: Twins> Twins for Recorded<S> {
    async fn create(&self, owner: &str, new: NewTwin) -> ServiceResult<Twin> {
        let result = self.inner.create(owner, new).await;
        if let Ok(t) = &result {
            self.record(vec![twin_event("twins.add", t, true)]).await;
        }
        result
    }

    async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let result = self.inner.view(owner, id).await;
        if result.is_ok() {
            self.record(vec![with_id("twins.view", id)]).await;
        }
        result
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>> {
        let result = self.inner.list(owner, filter, page).await;
        if result.is_ok() {
            self.record(vec![list_event(filter, page)]).await;
        }
        result
    }

    async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let result = self.inner.update(owner, id, update).await;
        if let Ok(t) = &result {
            self.record(vec![twin_event("twins.update", t, true)]).await;
        }
        result
    }

    async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let result = self.inner.remove(owner, id).await;
        if result.is_ok() {
            self.record(vec![with_id("twins.remove", id)]).await;
        }
        result
    }

    async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let result = self.inner.list_states(owner, twin_id, page).await;
        if result.is_ok() {
            let mut e = event("twins.list_states");
            paged(&mut e, page);
            e.insert("id".into(), json!(twin_id));
            self.record(vec![e]).await;
        }
        result
    }
}

#[async_trait]
impl<S: Ingest> Ingest for Recorded<S> {
    /// One `twins.save_states` per message of the batch that was applied (not
    /// rejected), once the batch is durable.
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let report = self.inner.apply(batch, aside).await?;
        if self.store.is_none() {
            return Ok(report);
        }
        let rejected: std::collections::HashSet<u64> =
            report.rejected.iter().map(|r| r.seq).collect();
        let events = batch
            .messages
            .iter()
            .filter(|m| !rejected.contains(&m.seq))
            .map(save_states_event)
            .collect();
        self.record(events).await;
        Ok(report)
    }

    fn reset(&self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::twin::Attribute;

    fn decoded(v: &Value) -> Value {
        let b = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a base64 string"))
            .expect("base64");
        serde_json::from_slice(&b).expect("JSON inside")
    }

    #[test]
    fn a_new_twin_is_the_go_services_add_event() {
        let created = time::from_nanos(1_700_000_000_123_000_000);
        let twin = Twin {
            owner: "alice".into(),
            id: "7f1f3a8e-0000-4000-8000-000000000001".into(),
            name: "pump".into(),
            revision: 0,
            created,
            updated: created,
            definitions: vec![Definition {
                id: 0,
                created,
                attributes: vec![Attribute {
                    name: "t".into(),
                    channel: "ch".into(),
                    subtopic: "s".into(),
                    persist_state: true,
                    record: None,
                }],
                delta: 1_000_000,
            }],
            metadata: serde_json::from_value(json!({"site": "a"})).expect("map"),
        };
        let e = twin_event("twins.add", &twin, true);
        assert_eq!(e["operation"], "twins.add");
        assert_eq!(e["id"], json!(twin.id));
        assert_eq!(e["created"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e["owner"], "alice");
        assert_eq!(e["name"], "pump");
        assert!(e.get("revision").is_none(), "zero values are left out");
        assert!(e.get("definition_id").is_none(), "zero values are left out");
        assert_eq!(decoded(&e["metadata"]), json!({"site": "a"}));
        assert_eq!(
            decoded(&e["definition_attributes"]),
            json!([{"name": "t", "channel": "ch", "subtopic": "s", "persist_state": true}])
        );
        assert_eq!(decoded(&e["twin_definitions"])[0]["delta"], 1_000_000);
        assert_eq!(e["definition_delta"], 1_000_000);
        let stamped = stamped(e);
        assert!(stamped["occurred_at"].as_i64().is_some_and(|t| t > 0));
    }

    #[test]
    fn a_message_is_carried_as_go_marshals_it() {
        let m = Message {
            seq: 9,
            channel: "ch".into(),
            subtopic: String::new(),
            payload: b"[{\"v\":1}]".to_vec(),
            created: 42,
        };
        let e = save_states_event(&m);
        assert_eq!(e["operation"], "twins.save_states");
        assert_eq!(
            decoded(&e["message"]),
            json!({"channel": "ch", "payload": "W3sidiI6MX1d", "created": 42})
        );
    }
}
