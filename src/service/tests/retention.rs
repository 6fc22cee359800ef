//! Retention over the in-memory store: a pass walks every twin, page after page, removes
//! each one's old states in batches, and never its latest state.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::domain::state::State;
use crate::service::retention::{BATCH, Retention};

/// Two hours before the first call of the test binary: older than the retention of one hour.
fn two_hours_ago() -> chrono::DateTime<Utc> {
    static AT: std::sync::OnceLock<chrono::DateTime<Utc>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| Utc::now() - chrono::Duration::hours(2))
}

fn old_state(twin_id: &str, id: i64) -> State {
    State {
        twin_id: twin_id.into(),
        id,
        definition: 0,
        created: two_hours_ago() + chrono::Duration::milliseconds(id),
        payload: object(json!({"i": id})),
    }
}

fn retention(f: &Fixture) -> Retention {
    Retention::new(
        f.store.states.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    )
    .expect("a retention")
}

#[tokio::test]
async fn a_pass_prunes_every_twin_in_batches_and_keeps_each_latest_state() {
    let f = Fixture::new();
    // More twins than a page of the walk; the first with more states than two batches.
    let mut twins = Vec::new();
    for i in 0..150 {
        let t = f.twin(ALICE, &format!("t{i}"), &[]).await;
        let n = if i == 0 { 2 * BATCH as i64 + 500 } else { 3 };
        for id in 0..n {
            f.store.states.save(&old_state(&t.id, id)).await.unwrap();
        }
        twins.push((t.id, n));
    }
    let removed = retention(&f).pass(&CancellationToken::new()).await.unwrap();
    let expected: i64 = twins.iter().map(|(_, n)| n - 1).sum();
    assert_eq!(removed, expected as u64);
    for (id, n) in &twins {
        assert_eq!(f.db.states_of(id), vec![old_state(id, n - 1)], "{id}");
    }
    assert_eq!(
        retention(&f).pass(&CancellationToken::new()).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn a_pass_asked_to_stop_removes_nothing_more() {
    let f = Fixture::new();
    let t = f.twin(ALICE, "t", &[]).await;
    for id in 0..5 {
        f.store.states.save(&old_state(&t.id, id)).await.unwrap();
    }
    let stop = CancellationToken::new();
    stop.cancel();
    assert_eq!(retention(&f).pass(&stop).await.unwrap(), 0);
    assert_eq!(f.db.states_of(&t.id).len(), 5);
}
