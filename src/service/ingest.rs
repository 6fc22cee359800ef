//! Turns broker messages into twin states (SPEC section 4).
//!
//! A batch of messages, in stream order, becomes at most one store write per state and
//! one durable step for the whole batch; the caller acks the batch only after
//! [`IngestService::handle`] returns Ok. Each twin remembers the stream sequence of the
//! last message applied to it, so a redelivered message never adds a state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use chrono::Utc;

use super::inband::{self, Inband};
use super::lookup::TwinLookup;
use super::{ServiceError, ServiceResult};
use crate::broker::notifier::Notifier;
use crate::broker::{self, Envelope};
use crate::domain::sampling::{self, Write};
use crate::domain::senml::{self, Record};
use crate::store::{IngestCursor, Store, TwinWrites};

/// Subtopics of the inband document API, which never become states.
pub const INBAND_PREFIX: &str = "twins.";
/// How often a batch is recomputed for twins another instance wrote meanwhile.
const REDO_ATTEMPTS: usize = 5;
/// Cursors kept in memory before they are dropped wholesale (bounded memory).
const MAX_CURSORS: usize = 100_000;

/// Counter of messages refused as bad, by reason.
pub const REJECTED: &str = "twins_ingest_rejected_total";
/// Counter of messages that concern no twin, by reason.
pub const IGNORED: &str = "twins_ingest_ignored_total";
/// Counter of messages received.
pub const RECEIVED: &str = "twins_ingest_messages_total";
/// Counter of redelivered messages skipped.
pub const DUPLICATES: &str = "twins_ingest_duplicates_total";
/// Counter of state writes, by kind (insert, update).
pub const STATE_WRITES: &str = "twins_ingest_state_writes_total";

/// One message as delivered by the stream.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Stream sequence number.
    pub seq: u64,
    /// Protobuf-encoded [`Envelope`].
    pub data: Bytes,
}

/// What a batch did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub inserted: usize,
    pub updated: usize,
    pub rejected: usize,
    pub ignored: usize,
    pub duplicates: usize,
}

struct Decoded {
    seq: u64,
    envelope: Envelope,
    records: Vec<Record>,
}

/// The ingestion use case.
pub struct IngestService {
    store: Store,
    lookup: TwinLookup,
    notifier: Notifier,
    inband: Option<Inband>,
    cursors: Mutex<HashMap<String, IngestCursor>>,
}

fn reject(
    report: &mut BatchReport,
    seq: u64,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
) {
    tracing::warn!(seq, reason, %detail, "message rejected");
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
    report.rejected += 1;
}

fn ignore(report: &mut BatchReport, reason: &'static str) {
    metrics::counter!(IGNORED, "reason" => reason).increment(1);
    report.ignored += 1;
}

/// Adds `w` to the twin's pending writes, folding it into an earlier write of the
/// same state (an update of a state inserted in this batch stays an insert).
fn merge(pending: &mut Vec<Write>, w: Write) {
    let id = w.state().id;
    match pending.iter_mut().find(|p| p.state().id == id) {
        Some(Write::Insert(s)) | Some(Write::Update(s)) => *s = w.into_state(),
        None => pending.push(w),
    }
}

impl IngestService {
    pub fn new(store: Store, lookup: TwinLookup, notifier: Notifier) -> Self {
        Self {
            store,
            lookup,
            notifier,
            inband: None,
            cursors: Mutex::default(),
        }
    }

    /// Also answers the inband document requests found among the messages.
    pub fn with_inband(mut self, inband: Inband) -> Self {
        self.inband = Some(inband);
        self
    }

    /// Executes the inband document requests of a batch, once each, in stream order;
    /// each is answered on its channel whatever the outcome, so none is retried.
    pub async fn answer_inband(&self, batch: &[Incoming]) {
        let Some(inband) = &self.inband else {
            return;
        };
        for inc in batch {
            let Ok(env) = broker::decode(&inc.data) else {
                continue;
            };
            if Some(env.channel.as_str()) == self.notifier.channel() {
                continue;
            }
            if let Some(target) = inband::parse(&env.subtopic) {
                inband.on_channel_message(&env, target).await;
            }
        }
    }

    /// Forgets where a deleted twin stood.
    pub fn forget(&self, twin_id: &str) {
        self.lock_cursors().remove(twin_id);
    }

    fn lock_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<String, IngestCursor>> {
        self.cursors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a batch of messages in stream order. Bad messages are counted and
    /// skipped; an error means nothing was made durable for the twins not yet
    /// written, and the batch must be retried (already applied messages are skipped
    /// by the sequence guard).
    #[tracing::instrument(name = "ingest.batch", skip_all, fields(messages = batch.len()))]
    pub async fn handle(&self, batch: &[Incoming]) -> ServiceResult<BatchReport> {
        let mut report = BatchReport::default();
        metrics::counter!(RECEIVED).increment(batch.len() as u64);
        let mut envelopes = Vec::with_capacity(batch.len());
        for inc in batch {
            match broker::decode(&inc.data) {
                Err(e) => reject(&mut report, inc.seq, "envelope", &e),
                Ok(env) if Some(env.channel.as_str()) == self.notifier.channel() => {
                    ignore(&mut report, "own_channel")
                }
                Ok(env) if env.subtopic.starts_with(INBAND_PREFIX) => ignore(&mut report, "inband"),
                Ok(env) => envelopes.push((inc.seq, env)),
            }
        }

        // One lookup per distinct (channel, subtopic), all in flight together.
        let keys: HashSet<(&str, &str)> = envelopes
            .iter()
            .map(|(_, e)| (e.channel.as_str(), e.subtopic.as_str()))
            .collect();
        let lookups = futures::future::join_all(
            keys.into_iter()
                .map(|(c, s)| async move { (c, s, self.lookup.ids(c, s).await) }),
        )
        .await;
        let mut ids_by_key: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for (c, s, ids) in lookups {
            ids_by_key.insert((c, s), ids?);
        }

        // Messages per twin, in stream order; payloads parsed once.
        let now = Utc::now();
        let mut decoded: Vec<Decoded> = Vec::new();
        let mut per_twin: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (seq, envelope) in &envelopes {
            let ids = ids_by_key
                .get(&(envelope.channel.as_str(), envelope.subtopic.as_str()))
                .filter(|ids| !ids.is_empty());
            let Some(ids) = ids else {
                ignore(&mut report, "no_twin");
                continue;
            };
            // "Now" for records without a time is when the message was received by
            // Magistrala (the envelope's `created`), so a backlog applied late keeps
            // the timing of its messages.
            let received = match envelope.created {
                0 => now,
                ns => crate::domain::time::from_nanos(ns),
            };
            let records = match senml::resolve(&envelope.payload, received) {
                Ok(r) => r,
                Err(e) => {
                    reject(&mut report, *seq, e.reason(), &e);
                    continue;
                }
            };
            for id in ids {
                per_twin.entry(id.clone()).or_default().push(decoded.len());
            }
            decoded.push(Decoded {
                seq: *seq,
                envelope: envelope.clone(),
                records,
            });
        }

        let mut pending: Vec<String> = per_twin.keys().cloned().collect();
        for _ in 0..REDO_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut writes = Vec::new();
            let mut cursors = HashMap::new();
            for twin_id in &pending {
                let Some(twin) = self.lookup.twin(twin_id).await? else {
                    for &i in &per_twin[twin_id] {
                        reject(&mut report, decoded[i].seq, "unknown_twin", twin_id);
                    }
                    if let Err(e) = self.lookup.cache().remove(twin_id).await {
                        tracing::debug!(error = %e, "stale cache entry not removed");
                    }
                    continue;
                };
                let Some(definition) = twin.current_definition() else {
                    continue;
                };
                let cached = self.lock_cursors().get(twin_id).cloned();
                let cursor = match cached {
                    Some(c) => c,
                    None => self.store.states.cursor(twin_id).await?,
                };
                let mut last = cursor.last.clone();
                let mut seq = cursor.seq;
                let mut twin_writes: Vec<Write> = Vec::new();
                for &i in &per_twin[twin_id] {
                    let m = &decoded[i];
                    if m.seq <= seq {
                        report.duplicates += 1;
                        metrics::counter!(DUPLICATES).increment(1);
                        continue;
                    }
                    let ws = sampling::fold(
                        twin_id,
                        last.clone(),
                        definition,
                        &m.envelope.channel,
                        &m.envelope.subtopic,
                        &m.records,
                    );
                    for w in ws {
                        last = Some(w.state().clone());
                        merge(&mut twin_writes, w);
                    }
                    seq = m.seq;
                }
                if !twin_writes.is_empty() {
                    cursors.insert(twin_id.clone(), IngestCursor { last, seq });
                    writes.push(TwinWrites {
                        twin_id: twin_id.clone(),
                        expected_seq: cursor.seq,
                        new_seq: seq,
                        writes: twin_writes,
                    });
                }
            }
            let conflicts = match self.store.states.apply(&writes).await {
                Ok(c) => c,
                Err(e) => {
                    // Nothing of this attempt is durable; forget what memory assumed.
                    {
                        let mut mem = self.lock_cursors();
                        for w in &writes {
                            mem.remove(&w.twin_id);
                        }
                    }
                    for w in &writes {
                        self.notifier
                            .notify(&w.twin_id, "save", Err(&ServiceError::from(&e)))
                            .await;
                    }
                    return Err(ServiceError::from(e));
                }
            };
            {
                let mut mem = self.lock_cursors();
                if mem.len() + cursors.len() > MAX_CURSORS {
                    mem.clear();
                }
                for id in &conflicts {
                    mem.remove(id);
                    cursors.remove(id);
                }
                for (id, c) in cursors {
                    mem.insert(id, c);
                }
            }
            for tw in writes.iter().filter(|w| !conflicts.contains(&w.twin_id)) {
                for w in &tw.writes {
                    let kind = match w {
                        Write::Insert(_) => {
                            report.inserted += 1;
                            "insert"
                        }
                        Write::Update(_) => {
                            report.updated += 1;
                            "update"
                        }
                    };
                    metrics::counter!(STATE_WRITES, "kind" => kind).increment(1);
                    self.notifier
                        .notify_json(&tw.twin_id, "save", w.state())
                        .await;
                }
            }
            if !conflicts.is_empty() {
                tracing::debug!(
                    twins = conflicts.len(),
                    "redoing twins written by another instance"
                );
            }
            pending = conflicts;
        }
        if !pending.is_empty() {
            return Err(ServiceError::Unavailable(format!(
                "{} twins kept changing under this instance",
                pending.len()
            )));
        }
        Ok(report)
    }
}
