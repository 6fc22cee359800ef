//! Ingestion counters as a decorator: what each applied batch did, counted from its
//! [`BatchReport`], so the use case never mentions metrics.
//!
//! Counted once per applied batch: a batch retried after a failure that may pass is
//! counted when it finally applies, not per attempt.

use async_trait::async_trait;

use super::ingest::{Batch, BatchReport, Ingest, IngestError, SetAside};
use crate::domain::sampling::Write;

/// Counter of messages set aside, by reason.
pub const REJECTED: &str = "twins_ingest_rejected_total";
/// Counter of messages that concern no twin, by reason.
pub const IGNORED: &str = "twins_ingest_ignored_total";
/// Counter of messages received.
pub const RECEIVED: &str = "twins_ingest_messages_total";
/// Counter of messages a twin already had (delivered again after a crash).
pub const DUPLICATES: &str = "twins_ingest_duplicates_total";
/// Counter of state writes, by kind (insert, update).
pub const STATE_WRITES: &str = "twins_ingest_state_writes_total";

/// The Go service's request counter (go-kit), by its method name: existing dashboards
/// and alerts keep working after the swap.
pub const GO_REQUESTS: &str = "twins_api_request_count";
/// The Go service's latency summary (go-kit); despite the name, in seconds, as the Go
/// service observes it.
pub const GO_LATENCY: &str = "twins_api_request_latency_microseconds";

/// Ingestion with its counters.
pub struct Metered<S> {
    inner: S,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// Adds what a batch did to the counters. Every label value is one of the service's
/// fixed reasons or kinds, never input.
fn count(report: &BatchReport) {
    metrics::counter!(RECEIVED).increment(report.received as u64);
    metrics::counter!(DUPLICATES).increment(report.duplicates as u64);
    for (reason, n) in &report.ignored {
        metrics::counter!(IGNORED, "reason" => *reason).increment(*n as u64);
    }
    for r in &report.rejected {
        metrics::counter!(REJECTED, "reason" => r.reason).increment(1);
    }
    for (_, w) in report.writes() {
        let kind = match w {
            Write::Insert(_) => "insert",
            Write::Update(_) => "update",
        };
        metrics::counter!(STATE_WRITES, "kind" => kind).increment(1);
    }
}

#[async_trait]
impl<S: Ingest> Ingest for Metered<S> {
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let started = std::time::Instant::now();
        let report = self.inner.apply(batch, aside).await?;
        count(&report);
        // The Go service counted and timed each message; a message's share of its
        // batch's time is the closest measure here.
        if report.received > 0 {
            let n = report.received as u64;
            let each = started.elapsed().as_secs_f64() / n as f64;
            metrics::counter!(GO_REQUESTS, "method" => "save_states").increment(n);
            metrics::histogram!(GO_LATENCY, "method" => "save_states")
                .record_many(each, report.received);
        }
        Ok(report)
    }

    fn reset(&self) {
        self.inner.reset();
    }
}
