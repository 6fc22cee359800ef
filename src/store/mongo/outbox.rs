//! The change feed's outbox in MongoDB, without multi-document transactions.
//!
//! An event is recorded in `feed_outbox` *before* its change, not yet ready, with an
//! increasing `_id` from a counter record (`feed_outbox_ids`) and a way to tell whether
//! the change was made: the changed record carries the event's message id in `feedlog`
//! (its latest [`MARKS`] ids), written by the change's own single-document update, or,
//! for a deletion, the deleted record's `_id` is gone. Once the change is made the entry
//! is marked ready; a change known not to be made takes its entries back.
//!
//! The relay takes entries in `_id` order and stops at the first that is not ready
//! while its change may still be in flight, so events reach the stream in the order
//! their changes became visible. An entry left unready by a process that died is
//! settled by its check once it is [`GRACE`] old: published if the change is there,
//! dropped if not. The change's record is the durable step that decides.

use std::time::Duration;

use async_trait::async_trait;
use bson::{Bson, Document, doc};
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::options::ReturnDocument;

use super::{MongoStore, map_err, to_i64};
use crate::store::{OutboxEntry, OutboxEvent, OutboxRepository, StoreError, StoreResult};

/// Collection of the recorded events.
pub const OUTBOX: &str = "feed_outbox";
/// Collection of the counter the events' ids come from.
pub const OUTBOX_IDS: &str = "feed_outbox_ids";
/// Message ids of the latest events a record keeps in `feedlog`.
pub const MARKS: i64 = 16;
/// How long an entry may stay unready before its check settles it: longer than any
/// write takes.
pub const GRACE: Duration = Duration::from_secs(30);

/// Filters that together match exactly the records whose `_id` is one of `ids`, one
/// range per run of consecutive ids: an event's entries take consecutive ids, so a
/// batch is a few runs, and each range is matched through the `_id` index by every
/// server (a long `$in`, or an `$or` of ranges, is not, by some: they scan).
fn id_runs(ids: &[i64]) -> Vec<Document> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if id == *last + 1 => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs.into_iter()
        .map(|(first, last)| doc! { "_id": { "$gte": first, "$lte": last } })
        .collect()
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("corrupt outbox entry: {what}").into())
}

/// How to tell whether an event's change was made.
#[derive(Debug, Clone)]
pub(super) enum Check {
    /// A record of `collection` matching `filter` carries the event's message id.
    Marked {
        collection: &'static str,
        filter: Document,
    },
    /// The record of `collection` with this `_id` no longer exists.
    Gone { collection: &'static str, id: Bson },
}

impl Check {
    /// The deletion of `record` (its `_id` read) from `collection`, whose filter `at`
    /// then names that very record.
    pub(super) fn gone(collection: &'static str, record: &Document, at: &mut Document) -> Self {
        let id = record.get("_id").cloned().unwrap_or(Bson::Null);
        at.insert("_id", id.clone());
        Self::Gone { collection, id }
    }

    fn to_bson(&self) -> Document {
        match self {
            Self::Marked { collection, filter } => {
                doc! { "collection": *collection, "marked": filter.clone() }
            }
            Self::Gone { collection, id } => doc! { "collection": *collection, "gone": id.clone() },
        }
    }
}

/// Events recorded ahead of their change, to settle once it is made or not.
pub(super) struct Intent<'a> {
    first: i64,
    events: Vec<&'a OutboxEvent>,
    checks: Vec<Check>,
}

/// Adds the events' message ids to the `feedlog` of the record an update changes.
pub(super) fn mark(update: &mut Document, events: &[&OutboxEvent]) {
    if events.is_empty() {
        return;
    }
    let ids: Vec<&str> = events.iter().map(|e| e.msg_id.as_str()).collect();
    let push = doc! { "$each": ids, "$slice": -MARKS };
    match update.get_document_mut("$push") {
        Ok(p) => {
            p.insert("feedlog", push);
        }
        Err(_) => {
            update.insert("$push", doc! { "feedlog": push });
        }
    }
}

/// Sets the events' message ids as the `feedlog` of a record being inserted.
pub(super) fn mark_new(record: &mut Document, events: &[&OutboxEvent]) {
    if !events.is_empty() {
        let ids: Vec<&str> = events.iter().map(|e| e.msg_id.as_str()).collect();
        record.insert("feedlog", ids);
    }
}

impl MongoStore {
    fn outbox(&self) -> Collection<Document> {
        self.db.collection(OUTBOX)
    }

    /// Takes `n` ids above every id taken before; the first of them.
    async fn take_ids(&self, n: i64) -> StoreResult<i64> {
        let counter = self
            .db
            .collection::<Document>(OUTBOX_IDS)
            .find_one_and_update(doc! { "_id": "feed" }, doc! { "$inc": { "next": n } })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_err)?
            .ok_or_else(|| corrupt("no id counter"))?;
        let next = counter.get_i64("next").map_err(|_| corrupt("id counter"))?;
        Ok(next - n + 1)
    }

    fn entry(id: i64, event: &OutboxEvent, ready: bool, check: &Check) -> StoreResult<Document> {
        Ok(doc! {
            "_id": id,
            "msg_id": &event.msg_id,
            "owner": &event.owner,
            "payload": event.payload()?,
            "ready": ready,
            "at": bson::DateTime::now(),
            "check": check.to_bson(),
        })
    }

    /// Records `events` not yet ready, each with its check (`checks[i]`, or the last
    /// check for the events past the checks), before their change is made.
    pub(super) async fn intend<'a>(
        &self,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
        checks: Vec<Check>,
    ) -> StoreResult<Intent<'a>> {
        let events: Vec<&OutboxEvent> = events.into_iter().collect();
        let mut intent = Intent {
            first: 0,
            checks: Vec::with_capacity(events.len()),
            events,
        };
        if intent.events.is_empty() {
            return Ok(intent);
        }
        let last = checks.last().cloned().ok_or_else(|| corrupt("no check"))?;
        intent.checks = checks;
        intent.checks.resize(intent.events.len(), last);
        intent.first = self.take_ids(to_i64(intent.events.len() as u64)).await?;
        let records = intent
            .events
            .iter()
            .zip(&intent.checks)
            .enumerate()
            .map(|(i, (e, c))| Self::entry(intent.first + to_i64(i as u64), e, false, c))
            .collect::<StoreResult<Vec<_>>>()?;
        self.outbox().insert_many(records).await.map_err(map_err)?;
        Ok(intent)
    }

    /// Deletes the entries with these ids.
    async fn delete_ids(&self, ids: &[i64]) -> StoreResult<()> {
        let outbox = self.outbox();
        futures::future::try_join_all(
            id_runs(ids)
                .into_iter()
                .map(|run| outbox.delete_many(run).into_future()),
        )
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// The intent's entries whose index `keep` says, made ready; the others taken back.
    pub(super) async fn settle(
        &self,
        intent: &Intent<'_>,
        keep: impl Fn(usize) -> bool,
    ) -> StoreResult<()> {
        let (mut ready, mut dropped) = (Vec::new(), Vec::new());
        for i in 0..intent.events.len() {
            let id = intent.first + to_i64(i as u64);
            if keep(i) { &mut ready } else { &mut dropped }.push(id);
        }
        self.delete_ids(&dropped).await?;
        if ready.is_empty() {
            return Ok(());
        }
        let n = ready.len() as u64;
        let outbox = self.outbox();
        let matched = futures::future::try_join_all(id_runs(&ready).into_iter().map(|run| {
            outbox
                .update_many(run, doc! { "$set": { "ready": true } })
                .into_future()
        }))
        .await
        .map_err(map_err)?
        .iter()
        .map(|done| done.matched_count)
        .sum::<u64>();
        if matched < n {
            // A change slower than GRACE: its entries were settled as not made and
            // dropped. Recorded again, ready, after the events recorded since.
            tracing::warn!(missing = n - matched, "change feed entries recorded late");
            let missing: Vec<usize> = (0..intent.events.len()).filter(|&i| keep(i)).collect();
            let first = self.take_ids(to_i64(missing.len() as u64)).await?;
            let records = missing
                .iter()
                .enumerate()
                .map(|(k, &i)| {
                    Self::entry(
                        first + to_i64(k as u64),
                        intent.events[i],
                        true,
                        &intent.checks[i],
                    )
                })
                .collect::<StoreResult<Vec<_>>>()?;
            // Ids already present are the entries that were still there.
            let _ = self.outbox().insert_many(records).ordered(false).await;
        }
        Ok(())
    }

    /// Settles every entry of the intent by its check: after a write failed in a way
    /// that leaves it unknown whether (or how far) it was made.
    pub(super) async fn settle_by_checks(&self, intent: &Intent<'_>) -> StoreResult<()> {
        let mut made = Vec::with_capacity(intent.events.len());
        for (e, c) in intent.events.iter().zip(&intent.checks) {
            made.push(self.made(&e.msg_id, c).await?);
        }
        self.settle(intent, |i| made[i]).await
    }

    /// Settles with `made` when it is known; by the checks when the write failed.
    pub(super) async fn conclude<T>(
        &self,
        intent: &Intent<'_>,
        outcome: StoreResult<T>,
        made: impl Fn(&T) -> bool,
    ) -> StoreResult<T> {
        match outcome {
            Ok(v) => {
                let m = made(&v);
                self.settle(intent, |_| m).await?;
                Ok(v)
            }
            Err(e) => Err(self.abandon(intent, e).await),
        }
    }

    /// After a write failed with `error`: settles the intent by its checks (or leaves
    /// it to the relay when that fails too) and returns the error.
    pub(super) async fn abandon(&self, intent: &Intent<'_>, error: StoreError) -> StoreError {
        if let Err(settling) = self.settle_by_checks(intent).await {
            tracing::debug!(error = %settling, "change feed entries left to the relay");
        }
        error
    }

    /// Whether the change of the event with this message id was made.
    async fn made(&self, msg_id: &str, check: &Check) -> StoreResult<bool> {
        match check {
            // The record is found by its own filter (an index serves it on every
            // server) and its marks are looked at here.
            Check::Marked { collection, filter } => Ok(self
                .db
                .collection::<Document>(collection)
                .find_one(filter.clone())
                .projection(doc! { "feedlog": 1 })
                .await
                .map_err(map_err)?
                .and_then(|record| record.get_array("feedlog").ok().cloned())
                .is_some_and(|marks| marks.iter().any(|m| m.as_str() == Some(msg_id)))),
            Check::Gone { collection, id } => Ok(self
                .db
                .collection::<Document>(collection)
                .find_one(doc! { "_id": id.clone() })
                .projection(doc! { "_id": 1 })
                .await
                .map_err(map_err)?
                .is_none()),
        }
    }

    /// The check stored in an entry.
    fn check_of(entry: &Document) -> StoreResult<Check> {
        let check = entry.get_document("check").map_err(|_| corrupt("check"))?;
        let collection = match check.get_str("collection").map_err(|_| corrupt("check"))? {
            super::filters::TWINS => super::filters::TWINS,
            super::filters::STATES => super::filters::STATES,
            super::filters::DOCUMENTS => super::filters::DOCUMENTS,
            _ => return Err(corrupt("check collection")),
        };
        if let Ok(filter) = check.get_document("marked") {
            return Ok(Check::Marked {
                collection,
                filter: filter.clone(),
            });
        }
        let id = check.get("gone").ok_or_else(|| corrupt("check"))?;
        Ok(Check::Gone {
            collection,
            id: id.clone(),
        })
    }

    /// Decides an unready entry older than [`GRACE`]: ready (true) or dropped.
    async fn settle_stale(&self, id: i64, entry: &Document) -> StoreResult<bool> {
        let msg_id = entry.get_str("msg_id").map_err(|_| corrupt("msg_id"))?;
        if self.made(msg_id, &Self::check_of(entry)?).await? {
            self.outbox()
                .update_one(doc! { "_id": id }, doc! { "$set": { "ready": true } })
                .await
                .map_err(map_err)?;
            Ok(true)
        } else {
            self.outbox()
                .delete_one(doc! { "_id": id, "ready": false })
                .await
                .map_err(map_err)?;
            Ok(false)
        }
    }
}

fn entry_id(r: &Document) -> StoreResult<i64> {
    match r.get("_id") {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        _ => Err(corrupt("_id")),
    }
}

impl MongoStore {
    fn blocked_head(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.blocked_head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the entry the relay last found blocking the outbox still does: it is
    /// there, not ready, and within its [`GRACE`]. One read by `_id`, where reading the
    /// outbox's first entries costs a scan of the whole collection on some servers
    /// (SecantusDB sorts in memory), and the outbox grows for as long as an entry of a
    /// process that died blocks it.
    async fn still_blocked(&self) -> StoreResult<bool> {
        let Some(head) = *self.blocked_head() else {
            return Ok(false);
        };
        let entry = self
            .outbox()
            .find_one(doc! { "_id": head })
            .projection(doc! { "ready": 1, "at": 1 })
            .await
            .map_err(map_err)?;
        let blocked = entry.is_some_and(|e| !e.get_bool("ready").unwrap_or(true) && young(&e));
        if !blocked {
            *self.blocked_head() = None;
        }
        Ok(blocked)
    }
}

/// Whether an entry is within its [`GRACE`] (its change may still be in flight).
fn young(entry: &Document) -> bool {
    let grace = i64::try_from(GRACE.as_millis()).unwrap_or(i64::MAX);
    entry.get_datetime("at").is_ok_and(|at| {
        Utc::now()
            .timestamp_millis()
            .saturating_sub(at.timestamp_millis())
            < grace
    })
}

#[async_trait]
impl OutboxRepository for MongoStore {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        self.pending_from(doc! {}, limit).await
    }

    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        self.pending_from(doc! { "_id": { "$gt": after } }, limit)
            .await
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        self.delete_ids(ids).await
    }

    async fn backlog(&self) -> StoreResult<u64> {
        self.outbox()
            .count_documents(doc! {})
            .await
            .map_err(map_err)
    }
}

impl MongoStore {
    /// The first `limit` entries matching `filter`, in id order, up to the first whose
    /// change may still be in flight.
    async fn pending_from(&self, filter: Document, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        if self.still_blocked().await? {
            return Ok(Vec::new());
        }
        let records: Vec<Document> = self
            .outbox()
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(to_i64(limit as u64))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        let mut entries = Vec::with_capacity(records.len());
        for r in &records {
            let id = entry_id(r)?;
            if !r.get_bool("ready").unwrap_or(true) {
                r.get_datetime("at").map_err(|_| corrupt("at"))?;
                if young(r) {
                    // A change in flight: later events wait for it.
                    if entries.is_empty() {
                        *self.blocked_head() = Some(id);
                    }
                    break;
                }
                if !self.settle_stale(id, r).await? {
                    continue;
                }
            }
            let text = |k: &str| r.get_str(k).map(str::to_owned).map_err(|_| corrupt(k));
            entries.push(OutboxEntry::stored(
                id,
                text("msg_id")?,
                text("owner")?,
                text("payload")?,
            )?);
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_matched_as_runs_of_consecutive_ids() {
        assert_eq!(
            id_runs(&[7, 5, 6, 6]),
            vec![doc! { "_id": { "$gte": 5_i64, "$lte": 7_i64 } }]
        );
        assert_eq!(
            id_runs(&[1, 2, 4, 9, 10]),
            vec![
                doc! { "_id": { "$gte": 1_i64, "$lte": 2_i64 } },
                doc! { "_id": { "$gte": 4_i64, "$lte": 4_i64 } },
                doc! { "_id": { "$gte": 9_i64, "$lte": 10_i64 } },
            ]
        );
        assert!(id_runs(&[]).is_empty());
    }
}
