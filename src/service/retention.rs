//! State retention (`MG_TWINS_STATES_RETENTION`): a background task that removes the
//! states older than the retention period, twin by twin, in bounded batches.
//!
//! A twin's latest state is never removed: it is what ingestion folds the next message
//! into, and (on MongoDB) it carries the stream sequence that makes ingestion
//! exactly-once. The store removes states from a twin's first id on
//! ([`StateRepository::prune`]), so the ids left are one gap-free run. Several
//! instances may prune the same twin at once: a removal is idempotent.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::store::{StateRepository, StoreResult};

/// Counter of states removed by retention.
pub const PRUNED: &str = "twins_states_pruned_total";
/// Twins read per page of a pass.
const TWINS_PAGE: usize = 100;
/// Most states one store call removes.
pub const BATCH: usize = 1000;

/// The retention task of one process.
pub struct Retention {
    states: Arc<dyn StateRepository>,
    keep: chrono::Duration,
    every: Duration,
}

impl Retention {
    /// Keeps states for `keep` (None when that is beyond what a date can express:
    /// nothing is ever old enough), a pass every `every`.
    pub fn new(states: Arc<dyn StateRepository>, keep: Duration, every: Duration) -> Option<Self> {
        let keep = chrono::Duration::from_std(keep).ok()?;
        Some(Self {
            states,
            keep,
            every,
        })
    }

    /// One pass over every twin; the number of states removed. Stops early (with what
    /// it removed so far) when `stop` fires.
    pub async fn pass(&self, stop: &CancellationToken) -> StoreResult<u64> {
        let Some(before) = Utc::now().checked_sub_signed(self.keep) else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut after = String::new();
        loop {
            let ids = self.states.twin_ids_after(&after, TWINS_PAGE).await?;
            for id in &ids {
                loop {
                    if stop.is_cancelled() {
                        return Ok(removed);
                    }
                    let n = self.states.prune(id, &before, BATCH).await?;
                    metrics::counter!(PRUNED).increment(n);
                    removed += n;
                    if n < BATCH as u64 {
                        break;
                    }
                }
            }
            match ids.last() {
                Some(last) if ids.len() == TWINS_PAGE => after.clone_from(last),
                _ => return Ok(removed),
            }
        }
    }

    /// Passes until `stop` fires: one at once, then one every period. A failed pass is
    /// logged and the next one starts over.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let span = tracing::info_span!("states.retention");
            match self.pass(&stop).instrument(span).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "retention removed old states"),
                Err(e) => tracing::warn!(error = %e, "retention pass failed; retrying next period"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }
}
