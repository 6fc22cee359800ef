//! Bulk copy in and out of MongoDB (see [`crate::store::transfer`]).
//!
//! MongoDB keeps no table of twin sequences: a twin's sequence is the `seq` field of its
//! latest state (see [`super::ingest`]). So the ingest log read here is each twin's
//! latest state's `seq` (when above 0), and a log written here sets that field on the
//! twin's latest state. A sequence of a twin without states has nothing to be written
//! on; it is not needed either, since ingestion resumes from the group's position,
//! which every twin sequence of a SQL store is at or below.

use async_trait::async_trait;
use bson::{Document, doc};
use futures::{StreamExt, TryStreamExt};
use mongodb::error::ErrorKind;

use super::ingest::{GROUPS, seq_in};
use super::{DUPLICATE_KEY, MongoStore, codec, collect, filters, map_err, to_i64};
use crate::domain::state::State;
use crate::domain::twin::Twin;
use crate::store::StoreResult;
use crate::store::transfer::{Counts, IngestLog, Transfer};

/// Twins whose latest state is read at once when the ingest log is gathered.
const CONCURRENT_READS: usize = 16;

impl MongoStore {
    /// Every twin id, in id order.
    async fn twin_ids(&self) -> StoreResult<Vec<String>> {
        let docs = collect(
            self.twins
                .find(doc! {})
                .sort(filters::by("id", 1))
                .projection(filters::only(&["id"]))
                .await
                .map_err(map_err)?,
        )
        .await?;
        docs.iter()
            .map(|d| codec::id_from_bson(d, "twin"))
            .collect()
    }

    /// Revisions kept in every document's record; a record from before revisions were
    /// kept has its current version as its one revision.
    async fn revision_count(&self) -> StoreResult<u64> {
        let pipeline = vec![
            doc! { "$project": { "n": { "$cond": [
                { "$isArray": "$revisions" }, { "$size": "$revisions" }, 1
            ] } } },
            doc! { "$group": { "_id": null, "n": { "$sum": "$n" } } },
        ];
        let rows = collect(self.documents.aggregate(pipeline).await.map_err(map_err)?).await?;
        Ok(rows
            .first()
            .and_then(|d| match d.get("n") {
                Some(bson::Bson::Int32(n)) => u64::try_from(*n).ok(),
                Some(bson::Bson::Int64(n)) => u64::try_from(*n).ok(),
                _ => None,
            })
            .unwrap_or(0))
    }

    /// The twins whose latest state carries a sequence, with it.
    async fn twin_seqs(&self) -> StoreResult<Vec<(String, u64)>> {
        let ids = self.twin_ids().await?;
        let found: Vec<Option<(String, u64)>> = futures::stream::iter(ids)
            .map(|id| async move {
                let latest = self.latest_fields(&id, &["seq"]).await?;
                Ok::<_, crate::store::StoreError>(
                    latest
                        .map(|d| seq_in(&d))
                        .filter(|&seq| seq > 0)
                        .map(|seq| (id, seq)),
                )
            })
            .buffered(CONCURRENT_READS)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}

#[async_trait]
impl Transfer for MongoStore {
    async fn twins_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Twin>> {
        let filter = match after {
            Some(id) => doc! { "id": { "$gt": id } },
            None => doc! {},
        };
        let docs = collect(
            self.twins
                .find(filter)
                .sort(filters::by("id", 1))
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await
                .map_err(map_err)?,
        )
        .await?;
        docs.iter().map(codec::twin_from_bson).collect()
    }

    async fn put_states(&self, states: &[State]) -> StoreResult<()> {
        if states.is_empty() {
            return Ok(());
        }
        let docs: Vec<Document> = states.iter().map(codec::state_to_bson).collect();
        match self.states.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(()),
            // States already there (a re-run) stay as they are; any other refusal fails.
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(m)
                    if m.write_concern_error.is_none()
                        && m.write_errors
                            .as_ref()
                            .is_some_and(|w| w.iter().all(|w| w.code == DUPLICATE_KEY)) =>
                {
                    Ok(())
                }
                _ => Err(map_err(e)),
            },
        }
    }

    async fn ingest_log(&self) -> StoreResult<IngestLog> {
        let docs = collect(
            self.db
                .collection::<Document>(GROUPS)
                .find(doc! {})
                .sort(filters::by("_id", 1))
                .await
                .map_err(map_err)?,
        )
        .await?;
        let groups: Vec<(String, u64)> = docs
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), seq_in(d))))
            .collect();
        Ok(IngestLog {
            groups,
            cursors: self.twin_seqs().await?,
        })
    }

    async fn put_ingest_log(&self, log: &IngestLog) -> StoreResult<()> {
        for (group, seq) in &log.groups {
            self.db
                .collection::<Document>(GROUPS)
                .update_one(
                    doc! { "_id": group },
                    doc! { "$set": {
                        "seq": to_i64(*seq),
                        "holder": "",
                        "until": bson::DateTime::from_millis(0),
                    } },
                )
                .upsert(true)
                .await
                .map_err(map_err)?;
        }
        for (twin_id, seq) in &log.cursors {
            let latest = self.latest_fields(twin_id, &["id"]).await?;
            let Some(latest) = latest else { continue };
            self.states
                .update_one(
                    filters::state(twin_id, codec::state_id_from_bson(&latest)?),
                    doc! { "$set": { "seq": to_i64(*seq) } },
                )
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn counts(&self) -> StoreResult<Counts> {
        let count = |name: &str| {
            let c = self.db.collection::<Document>(name);
            async move { c.count_documents(doc! {}).await.map_err(map_err) }
        };
        Ok(Counts {
            twins: count(filters::TWINS).await?,
            states: count(filters::STATES).await?,
            documents: count(filters::DOCUMENTS).await?,
            revisions: self.revision_count().await?,
            groups: count(GROUPS).await?,
            cursors: self.twin_seqs().await?.len() as u64,
        })
    }
}
