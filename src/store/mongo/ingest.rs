//! The ingestion log in MongoDB, without multi-document transactions.
//!
//! Each state carries `seq`, the stream sequence of the last message folded into it, so
//! a twin's latest state says how far the twin has applied the stream, and every state
//! write is a single-document compare-and-set on that value: an update names the `seq`
//! it was computed from, an insert first checks the state before it (and the unique
//! `(twinid, id)` index refuses a second insert of one id). A twin's writes go in id
//! order, so a process dying half-way leaves a prefix, and the next holder, replaying
//! from the group's position, skips for each twin what its latest state already has.
//! The group's position (`ingest_groups`) moves after the states, as a compare-and-set
//! too: it is a lower bound of what every twin has applied. The Go service ignores the
//! extra field.

use async_trait::async_trait;
use bson::{Bson, Document, doc};
use chrono::Utc;
use mongodb::Collection;
use mongodb::options::ReturnDocument;

use super::outbox::{self, Check};
use super::{MongoStore, codec, filters, map_err};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::time::{from_nanos, to_nanos};
use crate::store::{
    Applied, IngestCursor, IngestRepository, IngestStep, Lease, OutboxEvent, StoreError,
    StoreResult, TwinWrites,
};

/// Collection of the groups' positions and leases.
pub const GROUPS: &str = "ingest_groups";
/// How many twins of a step are written at once.
const TWINS_AT_ONCE: usize = 16;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The stream sequence a state document carries; 0 for states written before this
/// field existed (or by the Go service).
pub(super) fn seq_in(doc: &Document) -> u64 {
    match doc.get("seq") {
        Some(Bson::Int64(v)) => u64::try_from(*v).unwrap_or(0),
        Some(Bson::Int32(v)) => u64::try_from(*v).unwrap_or(0),
        _ => 0,
    }
}

/// The state `id` of the twin while its `seq` is still `expected`.
fn state_at(twin_id: &str, id: i64, expected: u64) -> Document {
    let mut filter = filters::state(twin_id, id);
    if expected == 0 {
        // Absent or 0, without an `$or` (which some servers answer by a scan).
        filter.insert("seq", doc! { "$in": [Bson::Null, 0_i64] });
    } else {
        filter.insert("seq", to_i64(expected));
    }
    filter
}

/// The events a twin's write `i` carries: the event of the same index, and the events
/// past the last write with the last write.
fn marks(tw: &TwinWrites, i: usize) -> Vec<&OutboxEvent> {
    let last = tw.writes.len().saturating_sub(1);
    let upto = if i == last { tw.events.len() } else { i + 1 };
    tw.events.get(i..upto).unwrap_or_default().iter().collect()
}

/// A state event with its states as MongoDB stores them and the API then serves them:
/// times in whole milliseconds (a BSON date).
fn as_stored(event: &OutboxEvent) -> OutboxEvent {
    let mut event = event.clone();
    for value in [&mut event.event.old, &mut event.event.new]
        .into_iter()
        .flatten()
    {
        if let Ok(mut state) = serde_json::from_value::<State>(value.clone()) {
            state.created = from_nanos(to_nanos(&state.created).div_euclid(1_000_000) * 1_000_000);
            if let Ok(stored) = serde_json::to_value(&state) {
                *value = stored;
            }
        }
    }
    event
}

/// How to tell that the event `i` of a twin's writes was made: its state carries it.
fn state_check(tw: &TwinWrites, i: usize) -> Option<Check> {
    let state = tw.writes.get(i).or(tw.writes.last())?.write.state();
    Some(Check::Marked {
        collection: filters::STATES,
        filter: filters::state(&state.twin_id, state.id),
    })
}

/// The group's document while its position is `seq`.
fn group_at(group: &str, seq: u64) -> Document {
    doc! { "_id": group, "seq": to_i64(seq) }
}

impl MongoStore {
    fn groups(&self) -> Collection<Document> {
        self.db.collection(GROUPS)
    }

    /// Applies one twin's writes in id order; false as soon as one finds the twin
    /// elsewhere than where the writes were computed from. Each state written carries
    /// the message ids of its events (see [`marks`]).
    async fn apply_twin(&self, tw: &TwinWrites) -> StoreResult<bool> {
        let mut expected = tw.expected_seq;
        for (i, w) in tw.writes.iter().enumerate() {
            let marks = marks(tw, i);
            match &w.write {
                Write::Update(s) => {
                    let mut update = filters::state_update(s);
                    if let Ok(set) = update.get_document_mut("$set") {
                        set.insert("seq", to_i64(w.seq));
                    }
                    outbox::mark(&mut update, &marks);
                    let done = self
                        .states
                        .update_one(state_at(&s.twin_id, s.id, expected), update)
                        .await
                        .map_err(map_err)?;
                    if done.matched_count == 0 {
                        return Ok(false);
                    }
                }
                Write::Insert(s) => {
                    if i == 0 && s.id > 0 {
                        // The state before it must still be the one it was computed from.
                        let done = self
                            .states
                            .update_one(
                                state_at(&s.twin_id, s.id - 1, expected),
                                doc! { "$set": { "seq": to_i64(expected) } },
                            )
                            .await
                            .map_err(map_err)?;
                        if done.matched_count == 0 {
                            return Ok(false);
                        }
                    }
                    let mut state = codec::state_to_bson(s);
                    state.insert("seq", to_i64(w.seq));
                    outbox::mark_new(&mut state, &marks);
                    match self.states.insert_one(state).await.map_err(map_err) {
                        Ok(_) => {}
                        Err(StoreError::Conflict(_)) => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
            }
            expected = w.seq;
        }
        Ok(true)
    }
}

#[async_trait]
impl IngestRepository for MongoStore {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease.ttl).unwrap_or(chrono::Duration::MAX);
        let taken = self
            .groups()
            .find_one_and_update(
                doc! {
                    "_id": &lease.group,
                    "$or": [
                        { "holder": &lease.holder },
                        { "until": { "$lt": bson::DateTime::from_millis(now.timestamp_millis()) } },
                    ],
                },
                doc! {
                    "$set": { "holder": &lease.holder, "until": bson::DateTime::from_millis(until.timestamp_millis()) },
                    "$setOnInsert": { "seq": to_i64(lease.start) },
                },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_err);
        match taken {
            Ok(Some(group)) => Ok(Some(seq_in(&group))),
            // Another holder's lease runs: the upsert collided with its document.
            Ok(None) | Err(StoreError::Conflict(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        self.groups()
            .update_one(
                doc! { "_id": group, "holder": holder },
                doc! { "$set": { "until": bson::DateTime::from_millis(0) } },
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        let latest = self
            .states
            .find_one(filters::states_of(twin_id))
            .sort(filters::by("id", -1))
            .await
            .map_err(map_err)?;
        Ok(match latest {
            Some(doc) => IngestCursor {
                seq: seq_in(&doc),
                last: Some(codec::state_from_bson(&doc)?),
            },
            None => IngestCursor::default(),
        })
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        let current = self
            .groups()
            .find_one(group_at(&step.group, step.from))
            .await
            .map_err(map_err)?;
        if current.is_none() {
            return Ok(Applied::Fenced);
        }
        // The step's events, each with the twin it belongs to, recorded before the
        // states that carry them, with the states as stored.
        let (mut events, mut checks, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for (t, tw) in step.twins.iter().enumerate() {
            for (i, e) in tw.events.iter().enumerate() {
                if let Some(check) = state_check(tw, i) {
                    events.push(as_stored(e));
                    checks.push(check);
                    owners.push(t);
                }
            }
        }
        let intent = self.intend(&events, checks).await?;
        // Twins are independent records: several are written at once, each twin's own
        // writes in order. All have ended before anything is settled.
        let mut outcomes = Vec::with_capacity(step.twins.len());
        for chunk in step.twins.chunks(TWINS_AT_ONCE) {
            let writes = chunk.iter().map(|tw| self.apply_twin(tw));
            outcomes.extend(futures::future::join_all(writes).await);
        }
        let mut conflicts = Vec::new();
        let mut written = vec![false; step.twins.len()];
        let mut failure = None;
        for ((t, tw), outcome) in step.twins.iter().enumerate().zip(outcomes) {
            match outcome {
                Ok(true) => written[t] = true,
                Ok(false) => conflicts.push(tw.twin_id.clone()),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(self.abandon(&intent, e).await);
        }
        if conflicts.is_empty() {
            self.settle(&intent, |i| written[owners[i]]).await?;
        } else {
            // A twin that conflicted may have been written in part.
            self.settle_by_checks(&intent).await?;
        }
        // Past conflicting twins' messages only once they are applied.
        let to = if conflicts.is_empty() {
            step.to
        } else {
            step.from
        };
        let moved = self
            .groups()
            .update_one(
                group_at(&step.group, step.from),
                doc! { "$set": { "seq": to_i64(to) } },
            )
            .await
            .map_err(map_err)?;
        if moved.matched_count == 0 {
            return Ok(Applied::Fenced);
        }
        Ok(Applied::Done { conflicts })
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        if self
            .groups()
            .find_one(group_at(group, from))
            .await
            .map_err(map_err)?
            .is_none()
        {
            return Ok(Applied::Fenced);
        }
        // States first: should this stop half-way, the position is still ahead of the
        // stream and the next holder rewinds again.
        self.states
            .update_many(
                doc! { "seq": { "$exists": true } },
                doc! { "$unset": { "seq": "" } },
            )
            .await
            .map_err(map_err)?;
        let moved = self
            .groups()
            .update_one(
                group_at(group, from),
                doc! { "$set": { "seq": to_i64(to) } },
            )
            .await
            .map_err(map_err)?;
        Ok(if moved.matched_count == 0 {
            Applied::Fenced
        } else {
            Applied::Done {
                conflicts: Vec::new(),
            }
        })
    }
}
