//! The change feed's outbox in MongoDB: `feed_outbox`, one record per event with an
//! increasing `_id` taken from a counter record (`feed_outbox_ids`).

use async_trait::async_trait;
use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::options::ReturnDocument;

use super::{MongoStore, map_err, to_i64};
use crate::store::{OutboxEntry, OutboxEvent, OutboxRepository, StoreError, StoreResult};

/// Collection of the pending events.
pub const OUTBOX: &str = "feed_outbox";
/// Collection of the counter the events' ids come from.
pub const OUTBOX_IDS: &str = "feed_outbox_ids";

fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("corrupt outbox entry: {what}").into())
}

impl MongoStore {
    fn outbox(&self) -> Collection<Document> {
        self.db.collection(OUTBOX)
    }

    /// Records `events` in the outbox, in their order, with ids above every id taken
    /// before.
    pub(super) async fn record<'a>(
        &self,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
    ) -> StoreResult<()> {
        let events: Vec<&OutboxEvent> = events.into_iter().collect();
        if events.is_empty() {
            return Ok(());
        }
        let n = to_i64(events.len() as u64);
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
        let mut records = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            records.push(doc! {
                "_id": next - n + to_i64(i as u64) + 1,
                "msg_id": &e.msg_id,
                "owner": &e.owner,
                "payload": e.payload()?,
            });
        }
        self.outbox().insert_many(records).await.map_err(map_err)?;
        Ok(())
    }
}

#[async_trait]
impl OutboxRepository for MongoStore {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        let records: Vec<Document> = self
            .outbox()
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .limit(to_i64(limit as u64))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        records
            .iter()
            .map(|r| {
                let text = |k: &str| r.get_str(k).map(str::to_owned).map_err(|_| corrupt(k));
                let id = match r.get("_id") {
                    Some(Bson::Int64(v)) => *v,
                    Some(Bson::Int32(v)) => i64::from(*v),
                    _ => return Err(corrupt("_id")),
                };
                Ok(OutboxEntry {
                    id,
                    event: OutboxEvent::decode(text("msg_id")?, text("owner")?, &text("payload")?)?,
                })
            })
            .collect()
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        self.outbox()
            .delete_many(doc! { "_id": { "$in": ids } })
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn backlog(&self) -> StoreResult<u64> {
        self.outbox()
            .count_documents(doc! {})
            .await
            .map_err(map_err)
    }
}
