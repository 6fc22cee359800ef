//! Turns broker messages into twin states (SPEC sections 4 and 14).
//!
//! A batch is a run of consecutive stream messages handed over by the broker layer in
//! stream order, with the group's position before it (`from`) and after it (`to`). It
//! goes through small stages:
//!
//! 1. **route**: which twins each message is for (cache, then store), and its SenML
//!    records; what is not for any twin is ignored, what cannot be read is rejected;
//! 2. **plan**: per twin, its messages folded onto its cursor with the pure sampling
//!    rule ([`plan`]), skipping what the twin already has;
//! 3. **set aside**: rejected messages go to the dead-letter port, durably, before
//!    anything moves past them;
//! 4. **persist**: one durable step writes the states and moves the group's position
//!    from `from` to `to`; a write that can never be made is isolated to its twin and
//!    set aside, so one bad twin never stops the others;
//! 5. **report**: what was written, rejected, ignored and skipped, in a [`BatchReport`]
//!    from which the decorators count ([`super::metered`]) and notify
//!    ([`super::notify`]).
//!
//! Errors are typed by what helps: [`IngestError::Transient`] (retry the same batch
//! later, unacked) or [`IngestError::Fenced`] (another instance moved the position:
//! stop and stand by).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use chrono::Utc;

use super::ServiceError;
use super::inband::{Kind, classify};
use super::lookup::TwinLookup;
use super::outbox::change;
use crate::domain::feed::EventKind;
use crate::domain::history;
use crate::domain::sampling::{self, Write};
use crate::domain::senml::{self, Record};
use crate::domain::time::now_millis;
use crate::domain::twin::Definition;
use crate::error::Cause;
use crate::store::{
    Applied, IngestCursor, IngestStep, OutboxEvent, SeqWrite, Store, StoreError, TwinWrites,
};

/// How often a step is recomputed for twins that moved under it.
const REDO_ATTEMPTS: usize = 5;
/// Cursors kept in memory before they are dropped wholesale (bounded memory).
const MAX_CURSORS: usize = 100_000;

/// One stream message as the broker layer decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stream sequence number.
    pub seq: u64,
    pub channel: String,
    pub subtopic: String,
    /// The SenML payload, not yet read.
    pub payload: Vec<u8>,
    /// When Magistrala received the message, in nanoseconds since the epoch (0: unknown).
    pub created: i64,
}

/// A run of consecutive stream messages and the group's position around it.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub group: &'a str,
    /// Position before the batch (the last sequence applied).
    pub from: u64,
    /// Position after it (its last sequence, including messages that were not decoded).
    pub to: u64,
    pub messages: &'a [Message],
    /// Messages of the batch the transport could not decode: set aside with the rest.
    pub rejected: &'a [Rejected],
}

/// A message that can never be applied (for one twin, or for all when `twin_id` is
/// None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub seq: u64,
    /// Metric label and dead-letter subject token.
    pub reason: &'static str,
    pub twin_id: Option<String>,
}

/// Where rejected messages are set aside (the dead-letter stream).
#[async_trait]
pub trait SetAside: Send + Sync {
    /// Keeps the rejected messages durably; an error means they must not be acked yet.
    async fn set_aside(&self, rejected: &[Rejected]) -> Result<(), IngestError>;
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A dependency failed in a way that may pass (unreachable, busy, full): retry the
    /// same batch later without acking it.
    #[error("transient failure: {0}")]
    Transient(#[source] Cause),
    /// The group's position is not where this batch starts: another instance is
    /// ingesting.
    #[error("another instance moved the group's position")]
    Fenced,
}

impl IngestError {
    fn store(e: StoreError) -> Self {
        Self::Transient(Box::new(e))
    }
}

/// What an applied batch did: the input of the metrics and notification decorators.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchReport {
    /// Messages in the batch, decoded or not.
    pub received: usize,
    /// The state writes made durable, per twin.
    pub written: Vec<TwinWrites>,
    /// Messages set aside, with their reasons.
    pub rejected: Vec<Rejected>,
    /// Messages that concern no twin, counted by reason.
    pub ignored: BTreeMap<&'static str, usize>,
    /// Messages a twin already had (delivered again after a crash).
    pub duplicates: usize,
}

impl BatchReport {
    /// Writes of this batch in order, with the twin each is for.
    pub fn writes(&self) -> impl Iterator<Item = (&str, &Write)> {
        self.written
            .iter()
            .flat_map(|t| t.writes.iter().map(|w| (t.twin_id.as_str(), &w.write)))
    }

    /// States inserted.
    pub fn inserted(&self) -> usize {
        self.writes()
            .filter(|(_, w)| matches!(w, Write::Insert(_)))
            .count()
    }

    /// States updated in place.
    pub fn updated(&self) -> usize {
        self.writes()
            .filter(|(_, w)| matches!(w, Write::Update(_)))
            .count()
    }

    fn ignore(&mut self, reason: &'static str) {
        *self.ignored.entry(reason).or_default() += 1;
    }
}

/// Ingestion as the broker layer and the decorators see it.
#[async_trait]
pub trait Ingest: Send + Sync {
    /// Applies a batch: on Ok its states are durable and the group's position is
    /// `batch.to`, so every message of it may be acked.
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError>;

    /// Forgets what memory assumes about twins: called when this instance (re)starts
    /// ingesting, since another may have written meanwhile.
    fn reset(&self);
}

/// A message routed to at least one twin, with its records.
struct Routed<'a> {
    message: &'a Message,
    records: Vec<Record>,
}

/// A twin's share of a batch, folded onto its cursor.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinPlan {
    pub writes: TwinWrites,
    /// Where the twin stands once the writes are applied.
    pub after: IngestCursor,
    /// Messages at or below the twin's sequence (it had them already).
    pub duplicates: usize,
}

/// Folds a twin's messages (in stream order, as `(seq, channel, subtopic, records)`)
/// onto its cursor: at most one write per state id, each tagged with the sequence of
/// the last message folded into it. Messages the cursor already covers are skipped.
pub fn plan<'r>(
    twin_id: &str,
    cursor: &IngestCursor,
    definition: &Definition,
    messages: impl IntoIterator<Item = (u64, &'r str, &'r str, &'r [Record])>,
) -> TwinPlan {
    let mut writes: Vec<SeqWrite> = Vec::new();
    let mut duplicates = 0;
    for (seq, channel, subtopic, records) in messages {
        if seq <= cursor.seq {
            duplicates += 1;
            continue;
        }
        // The latest state: the one written last (merging keeps it last), or the
        // cursor's before any.
        let latest = writes
            .last()
            .map(|w| w.write.state())
            .or(cursor.last.as_ref());
        let folded = sampling::fold(twin_id, latest, definition, channel, subtopic, records);
        for w in folded {
            merge(&mut writes, SeqWrite { write: w, seq });
        }
    }
    let last = writes
        .last()
        .map(|w| w.write.state().clone())
        .or_else(|| cursor.last.clone());
    let last_break = history::last_break(
        cursor
            .last
            .iter()
            .chain(writes.iter().map(|w| w.write.state())),
    );
    let writes = TwinWrites {
        twin_id: twin_id.to_owned(),
        expected_seq: cursor.seq,
        writes,
        events: Vec::new(),
        last_break,
    };
    TwinPlan {
        after: IngestCursor {
            last,
            seq: writes.new_seq(),
        },
        writes,
        duplicates,
    }
}

/// The change events of a twin's planned writes: `state.created` for a new state, with
/// the state before it (the twin's latest until then, or null for its first) as `old`;
/// `state.updated` for the latest state changed in place, with its previous version as
/// `old`. A run of messages folded into one write is one change, hence one event.
pub fn state_events(
    owner: &str,
    cursor: &IngestCursor,
    writes: &[SeqWrite],
) -> Result<Vec<OutboxEvent>, ServiceError> {
    let now = now_millis();
    let mut before = cursor.last.as_ref();
    let mut events = Vec::with_capacity(writes.len());
    for w in writes {
        let (kind, state) = match &w.write {
            Write::Insert(s) => (EventKind::StateCreated, s),
            Write::Update(s) => (EventKind::StateUpdated, s),
        };
        events.push(change(
            owner,
            kind,
            &state.twin_id,
            now,
            before,
            Some(state),
        )?);
        before = Some(state);
    }
    Ok(events)
}

/// Adds `w` to the pending writes, folding it into an earlier write of the same state
/// (an update of a state inserted in this batch stays an insert). Only the latest state
/// changes, and it is the one written last, so only the last pending write can share
/// its id: constant time per write, however many records a batch carries.
fn merge(pending: &mut Vec<SeqWrite>, w: SeqWrite) {
    match pending.last_mut() {
        Some(p) if p.write.state().id == w.write.state().id => {
            p.seq = w.seq;
            match &mut p.write {
                Write::Insert(s) | Write::Update(s) => *s = w.write.into_state(),
            }
        }
        _ => pending.push(w),
    }
}

/// The ingestion use case.
pub struct IngestService {
    store: Store,
    lookup: TwinLookup,
    /// The channel our notifications go to: never read as data.
    own_channel: Option<String>,
    /// Where each twin stood after this instance's last write, valid while it holds
    /// the group's lease (cleared by [`Ingest::reset`]).
    cursors: Mutex<HashMap<String, IngestCursor>>,
}

#[async_trait]
impl Ingest for IngestService {
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let result = self.apply_inner(batch, aside).await;
        if result.is_err() {
            // Whatever memory assumed about this attempt may not be durable.
            self.reset();
        }
        result
    }

    fn reset(&self) {
        self.lock_cursors().clear();
    }
}

impl IngestService {
    pub fn new(store: Store, lookup: TwinLookup, own_channel: Option<String>) -> Self {
        Self {
            store,
            lookup,
            own_channel,
            cursors: Mutex::default(),
        }
    }

    fn kind<'m>(&self, m: &'m Message) -> Kind<'m> {
        classify(self.own_channel.as_deref(), &m.channel, &m.subtopic)
    }

    fn lock_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<String, IngestCursor>> {
        self.cursors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the cursors of twins deleted since the last batch: they get no more
    /// messages, and their ids are never reused.
    fn forget_removed(&self) {
        let removed = self.lookup.take_removed();
        if !removed.is_empty() {
            let mut cursors = self.lock_cursors();
            for id in removed {
                cursors.remove(&id);
            }
        }
    }

    async fn apply_inner(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let mut report = BatchReport {
            received: batch.messages.len() + batch.rejected.len(),
            ..BatchReport::default()
        };
        self.forget_removed();
        let mut rejected = batch.rejected.to_vec();
        let (routed, per_twin) = self.route(batch, &mut report, &mut rejected).await?;
        let plans = self.plan_twins(&routed, &per_twin, &mut rejected).await?;
        Self::set_aside(aside, rejected, &mut report).await?;
        let plans = self.persist(batch, plans, aside, &mut report).await?;
        report.written = plans.into_iter().map(|p| p.writes).collect();
        Ok(report)
    }

    /// Stage 1: routes each data message to its twins and reads its records.
    async fn route<'a>(
        &self,
        batch: &Batch<'a>,
        report: &mut BatchReport,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(Vec<Routed<'a>>, BTreeMap<String, Vec<usize>>), IngestError> {
        let mut data = Vec::with_capacity(batch.messages.len());
        for m in batch.messages {
            match self.kind(m) {
                Kind::OwnNotification => report.ignore("own_channel"),
                Kind::Inband(_) => report.ignore("inband"),
                Kind::Data => data.push(m),
            }
        }
        // One lookup per distinct (channel, subtopic), all in flight together.
        let keys: HashSet<(&str, &str)> = data
            .iter()
            .map(|m| (m.channel.as_str(), m.subtopic.as_str()))
            .collect();
        let lookups = futures::future::join_all(
            keys.into_iter()
                .map(|(c, s)| async move { (c, s, self.lookup.ids(c, s).await) }),
        )
        .await;
        let mut ids_by_key: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for (c, s, ids) in lookups {
            ids_by_key.insert((c, s), ids.map_err(IngestError::store)?);
        }
        let now = Utc::now();
        let mut routed = Vec::new();
        let mut per_twin: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for m in data {
            let Some(ids) = ids_by_key
                .get(&(m.channel.as_str(), m.subtopic.as_str()))
                .filter(|ids| !ids.is_empty())
            else {
                report.ignore("no_twin");
                continue;
            };
            // "Now" for records without a time is when Magistrala received the message
            // (the envelope's `created`), so a backlog applied late keeps its timing.
            let received = match m.created {
                0 => now,
                ns => crate::domain::time::from_nanos(ns),
            };
            let records = match senml::resolve(&m.payload, received) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(seq = m.seq, reason = e.reason(), error = %e, "message rejected");
                    rejected.push(Rejected {
                        seq: m.seq,
                        reason: e.reason(),
                        twin_id: None,
                    });
                    continue;
                }
            };
            for id in ids {
                per_twin.entry(id.clone()).or_default().push(routed.len());
            }
            routed.push(Routed {
                message: m,
                records,
            });
        }
        Ok((routed, per_twin))
    }

    /// Stage 2: each twin's messages folded onto its cursor.
    async fn plan_twins(
        &self,
        routed: &[Routed<'_>],
        per_twin: &BTreeMap<String, Vec<usize>>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<Vec<(TwinPlan, Vec<u64>)>, IngestError> {
        let mut plans = Vec::with_capacity(per_twin.len());
        // The twins as stored now, in one read: changes made through any instance
        // before these messages were published are seen.
        let ids: Vec<String> = per_twin.keys().cloned().collect();
        let mut twins = self.lookup.twins(&ids).await.map_err(IngestError::store)?;
        for (twin_id, indexes) in per_twin {
            let seqs: Vec<u64> = indexes.iter().map(|&i| routed[i].message.seq).collect();
            let mut reject_all = |reason: &'static str, error: &dyn std::fmt::Display| {
                tracing::warn!(twin = %twin_id, reason, %error, messages = seqs.len(), "messages rejected");
                rejected.extend(seqs.iter().map(|&seq| Rejected {
                    seq,
                    reason,
                    twin_id: Some(twin_id.clone()),
                }));
            };
            let twin = match twins.remove(twin_id) {
                Some(Ok(t)) => t,
                None => {
                    self.lock_cursors().remove(twin_id);
                    reject_all("unknown_twin", &"no such twin");
                    continue;
                }
                Some(Err(e)) => {
                    reject_all("corrupt_twin", &e);
                    continue;
                }
            };
            let Some(definition) = twin.current_definition() else {
                // Every stored twin has definition 0: one without is corrupt data.
                reject_all("corrupt_twin", &"the twin has no definition");
                continue;
            };
            let cached = self.lock_cursors().get(twin_id).cloned();
            let cursor = match cached {
                Some(c) => c,
                None => match self.store.ingest.cursor(twin_id).await {
                    Ok(c) => c,
                    Err(e) if e.is_transient() => return Err(IngestError::store(e)),
                    Err(e) => {
                        reject_all("corrupt_state", &e);
                        continue;
                    }
                },
            };
            let messages = indexes.iter().map(|&i| {
                let r = &routed[i];
                (
                    r.message.seq,
                    r.message.channel.as_str(),
                    r.message.subtopic.as_str(),
                    r.records.as_slice(),
                )
            });
            let mut planned = plan(twin_id, &cursor, definition, messages);
            match state_events(&twin.owner, &cursor, &planned.writes.writes) {
                Ok(events) => planned.writes.events = events,
                Err(e) => {
                    reject_all("corrupt_state", &e);
                    continue;
                }
            }
            plans.push((planned, seqs));
        }
        Ok(plans)
    }

    /// Stage 3: rejected messages are kept before the position moves past them.
    async fn set_aside(
        aside: &dyn SetAside,
        rejected: Vec<Rejected>,
        report: &mut BatchReport,
    ) -> Result<(), IngestError> {
        if rejected.is_empty() {
            return Ok(());
        }
        aside.set_aside(&rejected).await?;
        report.rejected.extend(rejected);
        Ok(())
    }

    /// One durable step: the twins' writes and the group's position from `from` to
    /// `to`. Ok(Ok(conflicts)) when applied (the twins listed moved under it and were
    /// not written), Ok(Err(e)) when the store refused it for good, Err when the batch
    /// must stop (fenced, or a failure that may pass). The writes are handed back, their
    /// events stamped with the step's time.
    async fn step(
        &self,
        batch: &Batch<'_>,
        (from, to): (u64, u64),
        mut twins: Vec<TwinWrites>,
    ) -> Result<(Result<Vec<String>, StoreError>, Vec<TwinWrites>), IngestError> {
        // The events' time is their commit's, as close to it as it can be known: just
        // before the step is written, not when the batch was planned (a store may stamp
        // them later still, see `IngestRepository::apply`).
        let now = now_millis();
        for event in twins.iter_mut().flat_map(|tw| tw.events.iter_mut()) {
            event.event.time = now;
        }
        let step = IngestStep {
            group: batch.group.to_owned(),
            from,
            to,
            twins,
        };
        let outcome = match self.store.ingest.apply(&step).await {
            Ok(Applied::Done { conflicts }) => {
                self.store.recorded.ring();
                Ok(conflicts)
            }
            Ok(Applied::Fenced) => return Err(IngestError::Fenced),
            Err(e) if e.is_transient() => return Err(IngestError::store(e)),
            Err(e) => Err(e),
        };
        Ok((outcome, step.twins))
    }

    /// [`step`](Self::step) with the plans' writes, which go back into the plans
    /// afterwards (no copy of the states is made for the store).
    async fn step_plans(
        &self,
        batch: &Batch<'_>,
        range: (u64, u64),
        plans: &mut [TwinPlan],
    ) -> Result<Result<Vec<String>, StoreError>, IngestError> {
        let twins = plans
            .iter_mut()
            .map(|p| std::mem::take(&mut p.writes))
            .collect();
        let (outcome, twins) = self.step(batch, range, twins).await?;
        for (p, w) in plans.iter_mut().zip(twins) {
            p.writes = w;
        }
        Ok(outcome)
    }

    /// Stage 4: writes the plans and moves the position in one durable step; twins that
    /// moved meanwhile are planned again, twins whose writes can never be made are set
    /// aside. Returns the plans that were written.
    async fn persist(
        &self,
        batch: &Batch<'_>,
        plans: Vec<(TwinPlan, Vec<u64>)>,
        aside: &dyn SetAside,
        report: &mut BatchReport,
    ) -> Result<Vec<TwinPlan>, IngestError> {
        report.duplicates += plans.iter().map(|(p, _)| p.duplicates).sum::<usize>();
        let (mut written, seqs): (Vec<TwinPlan>, Vec<Vec<u64>>) = plans
            .into_iter()
            .filter(|(p, _)| !p.writes.writes.is_empty())
            .unzip();
        let range = (batch.from, batch.to);
        let conflicts = match self.step_plans(batch, range, &mut written).await? {
            Ok(conflicts) => conflicts,
            Err(e) => {
                tracing::warn!(error = %e, "batch refused by the store; isolating its twins");
                return self.isolate(batch, written, seqs, aside, report).await;
            }
        };
        let mut done = self.remember(written, &conflicts);
        if !conflicts.is_empty() {
            done.extend(self.redo(batch, conflicts, aside, report).await?);
        }
        Ok(done)
    }

    /// Keeps the cursors of the plans written and returns those plans.
    fn remember(&self, plans: Vec<TwinPlan>, conflicts: &[String]) -> Vec<TwinPlan> {
        let mut mem = self.lock_cursors();
        if mem.len() + plans.len() > MAX_CURSORS {
            mem.clear();
        }
        let mut done = Vec::with_capacity(plans.len());
        for p in plans {
            if conflicts.contains(&p.writes.twin_id) {
                mem.remove(&p.writes.twin_id);
            } else {
                mem.insert(p.writes.twin_id.clone(), p.after.clone());
                done.push(p);
            }
        }
        done
    }

    /// Plans twins that moved under a step again from their stored cursors. The step
    /// left the position at `batch.from` (the store moves it past no conflicting twin),
    /// so each attempt is again a step from `batch.from` to `batch.to`: when one fails,
    /// the whole batch can be retried and nothing was passed over.
    async fn redo(
        &self,
        batch: &Batch<'_>,
        mut pending: Vec<String>,
        aside: &dyn SetAside,
        report: &mut BatchReport,
    ) -> Result<Vec<TwinPlan>, IngestError> {
        let mut done = Vec::new();
        let messages: Vec<Message> = batch
            .messages
            .iter()
            .filter(|m| matches!(self.kind(m), Kind::Data))
            .cloned()
            .collect();
        let sub = Batch {
            messages: &messages,
            rejected: &[],
            ..*batch
        };
        for _ in 0..REDO_ATTEMPTS {
            tracing::debug!(twins = pending.len(), "redoing twins that moved meanwhile");
            let only: HashSet<&str> = pending.iter().map(String::as_str).collect();
            // What routing counts was counted for the whole batch already.
            let mut routing = BatchReport::default();
            let mut rejected = Vec::new();
            let (routed, mut per_twin) = self.route(&sub, &mut routing, &mut rejected).await?;
            per_twin.retain(|id, _| only.contains(id.as_str()));
            rejected.clear();
            let plans = self.plan_twins(&routed, &per_twin, &mut rejected).await?;
            // Set aside before the position can move past them; counted once, when
            // the attempt that moves the position succeeds.
            if !rejected.is_empty() {
                aside.set_aside(&rejected).await?;
            }
            let duplicates: usize = plans.iter().map(|(p, _)| p.duplicates).sum();
            let mut plans: Vec<TwinPlan> = plans
                .into_iter()
                .map(|(p, _)| p)
                .filter(|p| !p.writes.writes.is_empty())
                .collect();
            let conflicts = self
                .step_plans(batch, (batch.from, batch.to), &mut plans)
                .await?
                .map_err(IngestError::store)?;
            done.extend(self.remember(plans, &conflicts));
            if conflicts.is_empty() {
                report.rejected.extend(rejected);
                report.duplicates += duplicates;
                return Ok(done);
            }
            pending = conflicts;
        }
        Err(IngestError::Transient(
            format!("{} twins kept changing under this instance", pending.len()).into(),
        ))
    }

    /// Applies twin by twin after the store refused the whole step, sets aside the
    /// messages of each twin it refuses for good, then moves the position.
    async fn isolate(
        &self,
        batch: &Batch<'_>,
        plans: Vec<TwinPlan>,
        seqs: Vec<Vec<u64>>,
        aside: &dyn SetAside,
        report: &mut BatchReport,
    ) -> Result<Vec<TwinPlan>, IngestError> {
        let mut written = Vec::new();
        let mut rejected = Vec::new();
        for (mut p, seqs) in plans.into_iter().zip(seqs) {
            let twin = std::slice::from_mut(&mut p);
            match self
                .step_plans(batch, (batch.from, batch.from), twin)
                .await?
            {
                Ok(conflicts) if conflicts.is_empty() => written.push(p),
                Ok(_) => {
                    return Err(IngestError::Transient("twin moved during isolation".into()));
                }
                Err(e) => {
                    tracing::warn!(twin = %p.writes.twin_id, error = %e, "state writes refused by the store");
                    rejected.extend(seqs.into_iter().map(|seq| Rejected {
                        seq,
                        reason: "store_refused",
                        twin_id: Some(p.writes.twin_id.clone()),
                    }));
                }
            }
        }
        Self::set_aside(aside, rejected, report).await?;
        self.step(batch, (batch.from, batch.to), Vec::new())
            .await?
            .0
            .map_err(IngestError::store)?;
        Ok(self.remember(written, &[]))
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone};
    use serde_json::json;

    use super::*;
    use crate::domain::state::State;
    use crate::domain::twin::Attribute;

    const DELTA: i64 = 1_000_000_000;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(s, 0).single().expect("time")
    }

    fn definition() -> Definition {
        Definition {
            id: 0,
            created: at(0),
            attributes: vec![Attribute {
                name: "temp".into(),
                channel: "ch".into(),
                subtopic: String::new(),
                persist_state: true,
                record: None,
            }],
            delta: DELTA,
        }
    }

    fn record(t: i64, v: f64) -> Vec<Record> {
        vec![Record {
            name: "temp".into(),
            unit: None,
            time: at(t),
            value: json!(v),
        }]
    }

    fn run(cursor: &IngestCursor, messages: &[(u64, Vec<Record>)]) -> TwinPlan {
        let def = definition();
        plan(
            "t",
            cursor,
            &def,
            messages.iter().map(|(s, r)| (*s, "ch", "", r.as_slice())),
        )
    }

    fn state(id: i64, t: i64, v: f64) -> State {
        State {
            twin_id: "t".into(),
            id,
            definition: 0,
            created: at(t),
            payload: json!({ "temp": v }).as_object().cloned().expect("object"),
        }
    }

    #[test]
    fn each_write_carries_the_sequence_of_its_last_message() {
        let p = run(
            &IngestCursor::default(),
            &[
                (3, record(10, 1.0)),
                (5, record(10, 2.0)),
                (9, record(20, 3.0)),
            ],
        );
        let seqs: Vec<(i64, u64)> = p
            .writes
            .writes
            .iter()
            .map(|w| (w.write.state().id, w.seq))
            .collect();
        assert_eq!(seqs, vec![(0, 5), (1, 9)]);
        assert_eq!(p.writes.expected_seq, 0);
        assert_eq!(p.after.seq, 9);
        assert_eq!(p.after.last, Some(state(1, 20, 3.0)));
        assert_eq!(p.duplicates, 0);
    }

    #[test]
    fn messages_the_twin_already_has_are_skipped_and_counted() {
        let cursor = IngestCursor {
            last: Some(state(4, 10, 1.0)),
            seq: 7,
        };
        let p = run(
            &cursor,
            &[
                (6, record(50, 9.0)),
                (7, record(60, 9.0)),
                (8, record(10, 2.0)),
            ],
        );
        assert_eq!(p.duplicates, 2);
        assert_eq!(
            p.writes.writes,
            vec![SeqWrite {
                write: Write::Update(state(4, 10, 2.0)),
                seq: 8
            }]
        );
        assert_eq!(p.writes.expected_seq, 7);
    }

    #[test]
    fn a_state_inserted_then_updated_in_one_batch_stays_an_insert() {
        let cursor = IngestCursor {
            last: Some(state(0, 10, 1.0)),
            seq: 2,
        };
        let p = run(&cursor, &[(3, record(30, 5.0)), (4, record(30, 6.0))]);
        assert_eq!(
            p.writes.writes,
            vec![SeqWrite {
                write: Write::Insert(state(1, 30, 6.0)),
                seq: 4
            }]
        );
    }

    #[test]
    fn state_events_carry_the_state_before_each_write() {
        let cursor = IngestCursor {
            last: Some(state(4, 10, 1.0)),
            seq: 2,
        };
        let p = run(&cursor, &[(3, record(10, 2.0)), (4, record(30, 3.0))]);
        let events = state_events("o", &cursor, &p.writes.writes).unwrap();
        let summary: Vec<_> = events
            .iter()
            .map(|e| {
                assert_eq!(e.owner, "o");
                (e.event.kind, e.event.old.clone(), e.event.new.clone())
            })
            .collect();
        let value = |s: State| Some(serde_json::to_value(s).unwrap());
        assert_eq!(
            summary,
            vec![
                (
                    EventKind::StateUpdated,
                    value(state(4, 10, 1.0)),
                    value(state(4, 10, 2.0))
                ),
                (
                    EventKind::StateCreated,
                    value(state(4, 10, 2.0)),
                    value(state(5, 30, 3.0))
                ),
            ]
        );
        let first = state_events("o", &IngestCursor::default(), &p.writes.writes[1..]).unwrap();
        assert_eq!(first[0].event.old, None);
    }

    #[test]
    fn nothing_to_write_keeps_the_cursor() {
        let cursor = IngestCursor {
            last: Some(state(0, 10, 1.0)),
            seq: 2,
        };
        let p = run(&cursor, &[]);
        assert!(p.writes.writes.is_empty());
        assert_eq!(p.after, cursor);
    }

    #[tokio::test]
    async fn a_deleted_twin_leaves_no_cursor_behind() {
        use std::sync::Arc;

        use crate::cache::flaky::{self, Flaky};
        use crate::service::fakes::{Memory, RecordingSetAside};
        use crate::service::lookup::CacheMaintaining;
        use crate::store::{Lease, TwinRepository};

        let db = Memory::new();
        let store = db.store();
        let lookup = TwinLookup::new(store.twins.clone(), Arc::new(Flaky::default()));
        let twins = CacheMaintaining::new(store.twins.clone(), lookup.clone());
        let ingest = IngestService::new(store.clone(), lookup, None);
        let lease = Lease {
            group: "g".into(),
            holder: "h".into(),
            ttl: std::time::Duration::from_secs(60),
            start: 0,
        };
        store.ingest.lease(&lease).await.unwrap();
        twins
            .save(&flaky::twin("t", 1, &[("ch", "")]))
            .await
            .unwrap();
        let messages = [Message {
            seq: 1,
            channel: "ch".into(),
            subtopic: String::new(),
            payload: json!([{"v": 1}]).to_string().into_bytes(),
            created: 1_600_000_000_000_000_000,
        }];
        let mut batch = Batch {
            group: "g",
            from: 0,
            to: 1,
            messages: &messages,
            rejected: &[],
        };
        let aside = RecordingSetAside::default();
        ingest.apply(&batch, &aside).await.unwrap();
        assert!(ingest.lock_cursors().contains_key("t"));
        // The step told the relay of this process that it recorded events.
        tokio::time::timeout(std::time::Duration::from_secs(5), store.recorded.rung())
            .await
            .expect("the step rang");

        assert!(twins.remove("o", "t").await.unwrap());
        (batch.from, batch.messages) = (1, &[]);
        ingest.apply(&batch, &aside).await.unwrap();
        assert!(ingest.lock_cursors().is_empty());
    }
}
