//! Unit tests of the use cases, over the in-memory fakes of their ports.
//!
//! Every service under test is built in [`Fixture::new`] and nowhere else, so a change
//! of constructors or decorators is one edit here. Tests go through the services' public
//! methods and look at the outcome in the fake store; expected states come from the pure
//! domain functions, not from hand-written numbers.

mod decorators;
mod documents;
mod inband;
mod ingest;
mod retention;
mod twins;

use std::sync::Arc;

use serde_json::{Map, Value};

use super::documents::{DEFAULT_REVISIONS, DocumentsService};
use super::fakes::{Memory, RecordingSetAside};
use super::ingest::IngestService;
use super::lookup::{CacheMaintaining, TwinLookup};
use super::twins::{NewTwin, Twins, TwinsService};
use crate::cache::memory::MemoryCache;
use crate::domain::twin::{Attribute, DefinitionInput, NewDefinition, Twin, TwinName};
use crate::store::Store;

/// Owners of twins; each test's data is its own, so fixed ids are enough.
const ALICE: &str = "alice-id";
const BOB: &str = "bob-id";
/// Definitions a twin keeps in these tests: few, so that the limit is easy to reach.
const MAX_DEFINITIONS: usize = 5;
/// The channel notifications go to, which ingestion must never read as data.
const OWN_CHANNEL: &str = "own-notifications";

/// The fake backend and every service over it.
struct Fixture {
    /// The backend, to inspect and to steer (failures, interleaved writers).
    db: Arc<Memory>,
    /// The ports without this instance's decorators, to write as another instance would.
    store: Store,
    twins: TwinsService,
    documents: DocumentsService,
    ingest: IngestService,
    /// Where ingestion sets messages aside.
    aside: RecordingSetAside,
}

impl Fixture {
    fn new() -> Self {
        let db = Memory::new();
        let store = db.store();
        // As the application wires it: the use cases write twins through the
        // cache-maintaining decorator, the lookup reads the plain repository. Tests
        // write through the plain one, as another instance would.
        let lookup = TwinLookup::new(store.twins.clone(), Arc::new(MemoryCache::new()));
        let mut maintained = store.clone();
        maintained.twins = Arc::new(CacheMaintaining::new(store.twins.clone(), lookup.clone()));
        Self {
            twins: TwinsService::new(maintained.clone(), MAX_DEFINITIONS),
            documents: DocumentsService::new(maintained.clone(), DEFAULT_REVISIONS),
            ingest: IngestService::new(maintained, lookup, Some(OWN_CHANNEL.into())),
            aside: RecordingSetAside::default(),
            store,
            db,
        }
    }

    /// A twin of `owner` created through the service, with these attributes (persisted)
    /// and sampling window.
    async fn twin(&self, owner: &str, name: &str, attributes: &[(&str, &str, &str)]) -> Twin {
        let name = TwinName::parse(name.into()).expect("name");
        self.twins
            .create(
                owner,
                NewTwin::new(name, Some(definition(attributes, 0)), None),
            )
            .await
            .expect("twin created")
    }
}

/// A persisted attribute `(name, channel, subtopic)`.
fn attribute((name, channel, subtopic): (&str, &str, &str)) -> Attribute {
    Attribute {
        name: name.into(),
        channel: channel.into(),
        subtopic: subtopic.into(),
        persist_state: true,
        record: None,
    }
}

/// A definition with these persisted attributes and `delta` in nanoseconds (0: default).
fn definition(attributes: &[(&str, &str, &str)], delta: i64) -> NewDefinition {
    NewDefinition::parse(DefinitionInput {
        attributes: attributes.iter().copied().map(attribute).collect(),
        delta,
    })
    .expect("valid definition")
}

/// The JSON object `v`.
fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}
