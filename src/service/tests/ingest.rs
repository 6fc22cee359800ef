//! Ingestion: routing, planning, setting aside and persisting a batch of messages.
//!
//! Expected states are computed by [`oracle`] with the pure domain rules (SenML
//! resolution and delta sampling, each message applied once in stream order) and
//! compared with what the fake store holds afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::super::ingest::{Batch, BatchReport, Ingest, IngestError, Message, Rejected, plan};
use super::super::twins::{NewTwin, Twins};
use super::{ALICE, Fixture, definition, object};
use crate::domain::sampling;
use crate::domain::senml;
use crate::domain::state::State;
use crate::domain::time::from_nanos;
use crate::domain::twin::{Twin, TwinName};
use crate::service::fakes::Failure;
use crate::store::{IngestStep, Lease};

const GROUP: &str = "twins";
/// Sampling window of the test twins: 10 s.
const DELTA: i64 = 10_000_000_000;
/// Base time of the records, in seconds (absolute: above 2^28).
const T0: i64 = 1_600_000_000;

/// A twin of Alice with these persisted attributes and [`DELTA`].
async fn twin(f: &Fixture, attributes: &[(&str, &str, &str)]) -> Twin {
    let name = TwinName::parse("t".into()).expect("name");
    f.twins
        .create(
            ALICE,
            NewTwin::new(name, Some(definition(attributes, DELTA)), None),
        )
        .await
        .expect("twin created")
}

/// Takes the group's lease; its position starts at 0.
async fn lease(f: &Fixture) {
    let lease = Lease {
        group: GROUP.into(),
        holder: "this instance".into(),
        ttl: Duration::from_secs(60),
        start: 0,
    };
    assert_eq!(f.store.ingest.lease(&lease).await.unwrap(), Some(0));
}

/// A SenML pack of one record `value` at `T0 + offset` seconds.
fn senml(offset: i64, value: f64) -> Vec<u8> {
    json!([{ "n": "reading", "t": T0 + offset, "v": value }])
        .to_string()
        .into_bytes()
}

/// Stream message `seq` on `channel`/`subtopic`, received at `T0`.
fn message(seq: u64, channel: &str, subtopic: &str, payload: Vec<u8>) -> Message {
    Message {
        seq,
        channel: channel.into(),
        subtopic: subtopic.into(),
        payload,
        created: T0 * 1_000_000_000,
    }
}

/// Messages the batch ignored, whatever the reason.
fn ignored(report: &BatchReport) -> usize {
    report.ignored.values().sum()
}

fn batch(from: u64, messages: &[Message]) -> Batch<'_> {
    Batch {
        group: GROUP,
        from,
        to: messages.last().map_or(from, |m| m.seq),
        messages,
        rejected: &[],
    }
}

/// The twin's states after applying `messages` once each, in order, to no states.
fn oracle(twin: &Twin, messages: &[Message]) -> Vec<State> {
    let definition = twin.current_definition().expect("definition");
    let mut states: BTreeMap<i64, State> = BTreeMap::new();
    for m in messages {
        let env = m;
        let Ok(records) = senml::resolve(&env.payload, from_nanos(env.created)) else {
            continue;
        };
        let last = states.last_key_value().map(|(_, s)| s.clone());
        for w in sampling::fold(
            &twin.id,
            last.as_ref(),
            definition,
            &env.channel,
            &env.subtopic,
            &records,
        ) {
            let s = w.into_state();
            states.insert(s.id, s);
        }
    }
    states.into_values().collect()
}

/// Writes `messages` for `twin` as another writer would, without moving the group's
/// position (a backend without transactions writes states before the position).
async fn written_elsewhere(f: &Fixture, twin: &Twin, messages: &[Message]) {
    let cursor = f.store.ingest.cursor(&twin.id).await.unwrap();
    let resolved: Vec<(&Message, Vec<senml::Record>)> = messages
        .iter()
        .map(|m| {
            let env = m;
            (
                m,
                senml::resolve(&env.payload, from_nanos(env.created)).unwrap(),
            )
        })
        .collect();
    let p = plan(
        &twin.id,
        &cursor,
        twin.current_definition().unwrap(),
        resolved.iter().map(|(m, records)| {
            let env = m;
            (
                m.seq,
                env.channel.as_str(),
                env.subtopic.as_str(),
                records.as_slice(),
            )
        }),
    );
    let position = f.db.position(GROUP).unwrap();
    let step = IngestStep {
        group: GROUP.into(),
        from: position,
        to: position,
        twins: vec![p.writes],
    };
    f.store.ingest.apply(&step).await.unwrap();
}

#[tokio::test]
async fn data_messages_become_the_states_the_sampling_rule_gives() {
    let f = Fixture::new();
    let a = twin(&f, &[("temp", "ch-a", "engine")]).await;
    let b = twin(&f, &[("hum", "ch-b", ">")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch-a", "engine", senml(0, 1.0)),
        message(2, "ch-a", "engine", senml(5, 2.0)),
        message(3, "ch-b", "x", senml(0, 50.0)),
        message(4, "ch-a", "engine", senml(30, 3.0)),
        message(5, "ch-b", "y", senml(100, 51.0)),
        message(6, "ch-a", "engine", senml(31, 4.0)),
    ];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    let (want_a, want_b) = (oracle(&a, &messages), oracle(&b, &messages));
    assert_eq!(f.db.states_of(&a.id), want_a);
    assert_eq!(f.db.states_of(&b.id), want_b);
    assert!(want_a.len() > 1 && want_b.len() > 1, "the batch samples");
    // Within one batch a state is written once, as an insert.
    assert_eq!(report.inserted(), want_a.len() + want_b.len());
    assert_eq!(
        (report.updated(), report.rejected.len(), ignored(&report)),
        (0, 0, 0)
    );
    assert_eq!(f.db.position(GROUP), Some(6));
    assert!(f.aside.kept().is_empty());
}

#[tokio::test]
async fn the_next_batch_continues_from_the_states_of_the_last() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", senml(20, 2.0)),
        message(3, "ch", "", senml(25, 3.0)),
        message(4, "ch", "", senml(60, 4.0)),
    ];
    f.ingest
        .apply(&batch(0, &messages[..2]), &f.aside)
        .await
        .unwrap();
    let report = f
        .ingest
        .apply(&batch(2, &messages[2..]), &f.aside)
        .await
        .unwrap();
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
    assert_eq!((report.updated(), report.inserted()), (1, 1));
    assert_eq!(f.db.position(GROUP), Some(4));
}

#[tokio::test]
async fn inband_subtopics_are_ignored() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", ">")]).await;
    lease(&f).await;
    let messages = [message(
        1,
        "ch",
        &format!("twins.{}.desired.put", t.id),
        senml(0, 1.0),
    )];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    assert_eq!(ignored(&report), 1);
    assert!(f.db.states_of(&t.id).is_empty());
    assert_eq!(f.db.position(GROUP), Some(1));
}

#[tokio::test]
async fn messages_no_twin_listens_to_are_ignored() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "engine")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "wheels", senml(0, 1.0)),
        message(2, "elsewhere", "engine", senml(0, 1.0)),
        message(3, "elsewhere", "engine", b"not even json".to_vec()),
    ];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    assert_eq!((ignored(&report), report.rejected.len()), (3, 0));
    assert!(f.db.states_of(&t.id).is_empty());
    assert!(f.aside.kept().is_empty());
    assert_eq!(f.db.position(GROUP), Some(3));
}

#[tokio::test]
async fn a_garbage_payload_is_set_aside_with_its_reason_and_the_rest_is_written() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", b"{not json".to_vec()),
        message(3, "ch", "", b"[]".to_vec()),
        message(4, "ch", "", senml(40, 2.0)),
    ];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    let reason = |m: &Message| {
        senml::resolve(&m.payload, from_nanos(m.created))
            .unwrap_err()
            .reason()
    };
    let want: Vec<Rejected> = messages[1..3]
        .iter()
        .map(|m| Rejected {
            seq: m.seq,
            reason: reason(m),
            twin_id: None,
        })
        .collect();
    assert_eq!(f.aside.kept(), want);
    assert_eq!(report.rejected.len(), 2);
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
    assert_eq!(f.db.states_of(&t.id).len(), 2);
    assert_eq!(f.db.position(GROUP), Some(4));
}

#[tokio::test]
async fn messages_are_not_passed_before_they_are_set_aside() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", b"garbage".to_vec()),
    ];
    f.aside.fail(1);
    let err = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::Transient(_)), "{err:?}");
    assert!(f.db.states_of(&t.id).is_empty());
    assert_eq!(f.db.position(GROUP), Some(0));
    f.ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    assert_eq!(f.aside.kept().len(), 1);
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
}

#[tokio::test]
async fn messages_for_a_twin_removed_elsewhere_are_set_aside() {
    let f = Fixture::new();
    let kept = twin(&f, &[("temp", "ch", "")]).await;
    let gone = twin(&f, &[("temp", "ch", "")]).await;
    // Removed by another instance: this one's cache still names it.
    assert!(f.store.twins.remove(ALICE, &gone.id).await.unwrap());
    lease(&f).await;
    let messages = [message(1, "ch", "", senml(0, 1.0))];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    assert_eq!(
        f.aside.kept(),
        vec![Rejected {
            seq: 1,
            reason: "unknown_twin",
            twin_id: Some(gone.id.clone()),
        }]
    );
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(f.db.states_of(&kept.id), oracle(&kept, &messages));
    assert_eq!(f.db.position(GROUP), Some(1));
}

#[tokio::test]
async fn a_twin_updated_elsewhere_is_read_anew_by_the_next_batch() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let first = [message(1, "ch", "", senml(0, 1.0))];
    f.ingest.apply(&batch(0, &first), &f.aside).await.unwrap();
    // Another instance gives the twin a new definition: the channel now feeds `pressure`.
    let mut changed = t.clone();
    let mut moved = t.current_definition().expect("definition").clone();
    moved.id += 1;
    moved.attributes[0].name = "pressure".into();
    changed.definitions.push(moved);
    changed.revision += 1;
    assert!(f.store.twins.update(&changed, t.revision).await.unwrap());
    let second = [message(2, "ch", "", senml(30, 2.0))];
    f.ingest.apply(&batch(1, &second), &f.aside).await.unwrap();
    let states = f.db.states_of(&t.id);
    let last = states.last().expect("a state");
    assert_eq!((states.len(), last.definition), (2, 1), "{states:?}");
    assert_eq!(last.payload, object(json!({"pressure": 2})));
    assert_eq!(f.db.calls("twins.retrieve_many"), 2, "one read per batch");
}

#[tokio::test]
async fn messages_a_twin_already_has_are_skipped() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", senml(20, 2.0)),
        message(3, "ch", "", senml(40, 3.0)),
    ];
    written_elsewhere(&f, &t, &messages[..2]).await;
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    assert_eq!(report.duplicates, 2);
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
    assert_eq!(f.db.position(GROUP), Some(3));
}

#[tokio::test]
async fn a_twin_written_elsewhere_meanwhile_is_redone_from_its_stored_cursor() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", senml(20, 2.0)),
        message(3, "ch", "", senml(25, 3.0)),
    ];
    f.ingest
        .apply(&batch(0, &messages[..1]), &f.aside)
        .await
        .unwrap();
    // Unknown to this instance, which remembers the twin where it left it.
    written_elsewhere(&f, &t, &messages[1..2]).await;
    f.ingest
        .apply(&batch(1, &messages[1..]), &f.aside)
        .await
        .unwrap();
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
    assert_eq!(f.db.position(GROUP), Some(3));
}

/// Batch 1 applied; message 2 then written by another instance, so that batch 2
/// conflicts for the twin and is redone from its stored cursor.
async fn conflicting_batch(f: &Fixture, t: &Twin) -> [Message; 3] {
    lease(f).await;
    let messages = [
        message(1, "ch", "", senml(0, 1.0)),
        message(2, "ch", "", senml(20, 2.0)),
        message(3, "ch", "", senml(25, 3.0)),
    ];
    f.ingest
        .apply(&batch(0, &messages[..1]), &f.aside)
        .await
        .unwrap();
    written_elsewhere(f, t, &messages[1..2]).await;
    messages
}

#[tokio::test]
async fn a_transient_failure_while_redoing_passes_nothing_and_the_batch_can_be_retried() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    let messages = conflicting_batch(&f, &t).await;
    // The redo reads the twin's stored cursor: unavailable once.
    f.db.fail("ingest.cursor", Failure::Unavailable, 1);
    let err = f
        .ingest
        .apply(&batch(1, &messages[1..]), &f.aside)
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::Transient(_)), "{err:?}");
    assert_eq!(
        f.db.position(GROUP),
        Some(1),
        "message 3 is not passed over"
    );
    f.ingest
        .apply(&batch(1, &messages[1..]), &f.aside)
        .await
        .unwrap();
    assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages));
    assert_eq!(f.db.position(GROUP), Some(3));
}

#[tokio::test]
async fn a_twin_that_cannot_be_redone_has_its_messages_set_aside() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    let messages = conflicting_batch(&f, &t).await;
    f.db.fail("ingest.cursor", Failure::Internal, 1);
    let report = f
        .ingest
        .apply(&batch(1, &messages[1..]), &f.aside)
        .await
        .unwrap();
    let kept: Vec<(u64, &str)> = f.aside.kept().iter().map(|r| (r.seq, r.reason)).collect();
    assert_eq!(kept, [(2, "corrupt_state"), (3, "corrupt_state")]);
    assert_eq!(report.rejected.len(), 2, "counted once");
    assert_eq!(f.db.position(GROUP), Some(3));
}

#[tokio::test]
async fn a_transient_store_failure_moves_nothing_and_the_batch_can_be_retried() {
    for call in [
        "twins.ids_by_attribute",
        "twins.retrieve_many",
        "ingest.cursor",
        "ingest.apply",
    ] {
        let f = Fixture::new();
        // Created by another instance: nothing about it is cached here.
        let t = twin(&Fixture::new(), &[("temp", "ch", "")]).await;
        f.store.twins.save(&t).await.unwrap();
        lease(&f).await;
        let messages = [
            message(1, "ch", "", senml(0, 1.0)),
            message(2, "ch", "", senml(30, 2.0)),
        ];
        f.db.fail(call, Failure::Unavailable, 1);
        let err = f
            .ingest
            .apply(&batch(0, &messages), &f.aside)
            .await
            .unwrap_err();
        assert!(matches!(err, IngestError::Transient(_)), "{call}: {err:?}");
        assert_eq!(f.db.calls(call), 1, "{call} was reached");
        assert!(f.db.states_of(&t.id).is_empty(), "{call}");
        assert_eq!(f.db.position(GROUP), Some(0), "{call}");
        f.ingest
            .apply(&batch(0, &messages), &f.aside)
            .await
            .unwrap();
        assert_eq!(f.db.states_of(&t.id), oracle(&t, &messages), "{call}");
        assert_eq!(f.db.position(GROUP), Some(2), "{call}");
        assert!(f.aside.kept().is_empty(), "{call}");
    }
}

#[tokio::test]
async fn a_step_fenced_by_another_instance_is_fenced_and_writes_nothing() {
    let f = Fixture::new();
    let t = twin(&f, &[("temp", "ch", "")]).await;
    lease(&f).await;
    let elsewhere = IngestStep {
        group: GROUP.into(),
        from: 0,
        to: 5,
        twins: Vec::new(),
    };
    f.store.ingest.apply(&elsewhere).await.unwrap();
    let messages = [message(1, "ch", "", senml(0, 1.0))];
    let err = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::Fenced), "{err:?}");
    assert!(f.db.states_of(&t.id).is_empty());
    assert_eq!(f.db.position(GROUP), Some(5));
}

#[tokio::test]
async fn a_twin_the_store_refuses_is_set_aside_and_the_others_are_written() {
    let f = Fixture::new();
    let good = twin(&f, &[("temp", "ch-good", "")]).await;
    let bad = twin(&f, &[("temp", "ch-bad", "")]).await;
    lease(&f).await;
    f.db.refuse_writes_of(&bad.id);
    let messages = [
        message(1, "ch-good", "", senml(0, 1.0)),
        message(2, "ch-bad", "", senml(0, 1.0)),
        message(3, "ch-good", "", senml(30, 2.0)),
        message(4, "ch-bad", "", senml(30, 2.0)),
    ];
    let report = f
        .ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    let refused = |seq| Rejected {
        seq,
        reason: "store_refused",
        twin_id: Some(bad.id.clone()),
    };
    assert_eq!(f.aside.kept(), vec![refused(2), refused(4)]);
    assert_eq!(report.rejected.len(), 2);
    assert_eq!(f.db.states_of(&good.id), oracle(&good, &messages));
    assert!(f.db.states_of(&bad.id).is_empty());
    assert_eq!(f.db.position(GROUP), Some(4));
}

/// Payloads with a value that is not a number still sample as the rule says.
#[tokio::test]
async fn string_and_bool_values_are_sampled_like_numbers() {
    let f = Fixture::new();
    let t = twin(&f, &[("state", "ch", "")]).await;
    lease(&f).await;
    let pack = |offset: i64, field: &str, value: Value| {
        json!([{ "n": "s", "t": T0 + offset, field: value }])
            .to_string()
            .into_bytes()
    };
    let messages = [
        message(1, "ch", "", pack(0, "vs", json!("on"))),
        message(2, "ch", "", pack(50, "vb", json!(true))),
    ];
    f.ingest
        .apply(&batch(0, &messages), &f.aside)
        .await
        .unwrap();
    let want = oracle(&t, &messages);
    assert_eq!(f.db.states_of(&t.id), want);
    assert_eq!(want.last().unwrap().payload["state"], json!(true));
}

/// The breaks of time order an oracle sees in a twin's whole history: the greatest id
/// whose state was created before the state before it.
fn oracle_break(states: &[State]) -> Option<i64> {
    states
        .windows(2)
        .filter(|p| p[1].created < p[0].created)
        .map(|p| p[1].id)
        .max()
}

#[tokio::test]
async fn a_plan_names_its_greatest_state_created_before_the_one_before_it() {
    let f = Fixture::new();
    let a = twin(&f, &[("temp", "ch-a", "engine")]).await;
    let definition = a.current_definition().unwrap().clone();
    // 40 s, 60 s, then 20 s (late, beyond the delta: a new state), 80 s, then 50 s and
    // 55 s (one late state, the second folded into it).
    let offsets = [40, 60, 20, 80, 50, 55, 100];
    let messages: Vec<Message> = offsets
        .iter()
        .enumerate()
        .map(|(i, &t)| message(i as u64 + 1, "ch-a", "engine", senml(t, t as f64)))
        .collect();
    let whole = oracle(&a, &messages);
    assert_eq!(oracle_break(&whole), Some(4), "{whole:?}");
    // Planned in every split of the run into two steps, the second from the first's
    // cursor: the breaks of both steps are the whole history's.
    for split in 0..=messages.len() {
        let mut cursor = crate::store::IngestCursor::default();
        let mut found = Vec::new();
        for part in [&messages[..split], &messages[split..]] {
            let resolved: Vec<(&Message, Vec<senml::Record>)> = part
                .iter()
                .map(|m| {
                    (
                        m,
                        senml::resolve(&m.payload, from_nanos(m.created)).unwrap(),
                    )
                })
                .collect();
            let p = plan(
                &a.id,
                &cursor,
                &definition,
                resolved
                    .iter()
                    .map(|(m, r)| (m.seq, m.channel.as_str(), m.subtopic.as_str(), r.as_slice())),
            );
            found.extend(p.writes.last_break);
            cursor = p.after;
        }
        assert_eq!(found.into_iter().max(), Some(4), "split at {split}");
    }
}
