//! The delta sampling rule: how incoming values become a twin's states.
//!
//! A twin does not keep one state per message. Values that arrive within the current
//! definition's `delta` of the latest state are folded into it; a value further away (in
//! either direction, so late messages too) opens a new state that starts from the latest
//! one. Keeping the rule here, free of I/O, lets every store and the message handler share
//! one tested implementation.
//!
//! Only attributes with `persist_state` that match the message's channel and subtopic take
//! part, and each state's payload only ever holds attributes the current definition
//! persists, so a definition change drops stale keys the next time the twin is sampled.

use chrono::{DateTime, Utc};

use super::senml::Record;
use super::state::{Payload, State};
use super::time;
use super::twin::Definition;

/// What one value does to a twin's latest state.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No persisted attribute of the current definition matches the message.
    Nothing,
    /// A new state to store after the latest one.
    Save(State),
    /// The latest state, changed in place (same `id` and `created`).
    Update(State),
}

/// One write for the state store.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Insert(State),
    Update(State),
}

impl Write {
    pub fn state(&self) -> &State {
        match self {
            Self::Insert(s) | Self::Update(s) => s,
        }
    }

    pub fn into_state(self) -> State {
        match self {
            Self::Insert(s) | Self::Update(s) => s,
        }
    }
}

/// Applies one record received on `channel`/`subtopic` to a twin whose latest state is
/// `last` and whose current definition is `definition`.
///
/// Every persisted attribute that matches the channel and subtopic and takes the record
/// (see [`super::twin::Attribute::takes`]) gets its value. The state is new when there is no
/// `last` or `time` is more than `definition.delta` nanoseconds from `last.created`;
/// exactly `delta` away still updates, the rule being strictly greater.
pub fn apply(
    twin_id: &str,
    last: Option<&State>,
    definition: &Definition,
    channel: &str,
    subtopic: &str,
    record: &Record,
) -> Outcome {
    let (value, time) = (&record.value, record.time);
    let targets: Vec<&str> = definition
        .attributes
        .iter()
        .filter(|a| a.persist_state && a.matches(channel, subtopic) && a.takes(&record.name))
        .map(|a| a.name.as_str())
        .collect();
    if targets.is_empty() {
        return Outcome::Nothing;
    }

    let fresh = last.is_none_or(|l| beyond_delta(&l.created, &time, definition.delta));
    let mut state = match last {
        Some(l) if !fresh => State {
            twin_id: l.twin_id.clone(),
            id: l.id,
            definition: definition.id,
            created: l.created,
            payload: persisted(&l.payload, definition),
        },
        _ => State {
            twin_id: twin_id.to_owned(),
            // Saturating only matters after i64::MAX states, which cannot happen.
            id: last.map_or(0, |l| l.id.saturating_add(1)),
            definition: definition.id,
            created: time,
            payload: last
                .map(|l| persisted(&l.payload, definition))
                .unwrap_or_default(),
        },
    };
    for name in targets {
        state.payload.insert(name.to_owned(), value.clone());
    }

    if fresh {
        Outcome::Save(state)
    } else {
        Outcome::Update(state)
    }
}

/// The store writes one message needs: [`apply`] for each record in order, starting from
/// the stored latest state `last`, then reduced so the store sees each state at most once.
///
/// * Several updates of one state collapse into a single write of its final version.
/// * Updates of a state inserted earlier in the same message merge into that `Insert`.
/// * An update that leaves the stored state exactly as it was is not written at all.
///
/// Only the latest state can change, and it is always the one most recently written, so
/// the result holds at most one write per state id, in increasing id order: at most one
/// `Update` (of `last`, first) followed by `Insert`s.
pub fn fold(
    twin_id: &str,
    last: Option<&State>,
    definition: &Definition,
    channel: &str,
    subtopic: &str,
    records: &[Record],
) -> Vec<Write> {
    let mut writes: Vec<Write> = Vec::new();
    for record in records {
        // The latest state is the one written last, or the stored one before any.
        let latest = writes.last().map(Write::state).or(last);
        match apply(twin_id, latest, definition, channel, subtopic, record) {
            Outcome::Nothing => {}
            Outcome::Save(state) => writes.push(Write::Insert(state)),
            Outcome::Update(state) => match writes.last_mut() {
                Some(Write::Insert(w) | Write::Update(w)) if w.id == state.id => *w = state,
                _ => writes.push(Write::Update(state)),
            },
        }
    }
    // A repeated reading within delta changes nothing; skip the round trip.
    if let (Some(Write::Update(first)), Some(stored)) = (writes.first(), last)
        && first == stored
    {
        writes.remove(0);
    }
    writes
}

/// Whether `time` is more than `delta` nanoseconds away from `created`. Computed in i128
/// from exact nanoseconds so no pair of representable times can overflow or saturate.
fn beyond_delta(created: &DateTime<Utc>, time: &DateTime<Utc>, delta: i64) -> bool {
    (time::to_nanos_exact(time) - time::to_nanos_exact(created)).abs() > i128::from(delta)
}

/// `payload` restricted to the attributes `definition` persists.
fn persisted(payload: &Payload, definition: &Definition) -> Payload {
    payload
        .iter()
        .filter(|(key, _)| {
            definition
                .attributes
                .iter()
                .any(|a| a.persist_state && a.name == **key)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time;
    use crate::domain::twin::{Attribute, WILDCARD_SUBTOPIC};
    use serde_json::{Value, json};

    const TWIN: &str = "twin-1";
    const CHANNEL: &str = "ch";
    const SUBTOPIC: &str = "engine";
    /// Base time of the fixtures: 2020-05-05T08:41:39Z.
    const T0: i64 = 1_588_668_099_000_000_000;

    fn payload_of(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Payload {
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
    const DELTA: i64 = 1_000_000_000;

    fn at(nanos: i64) -> DateTime<Utc> {
        time::from_nanos(nanos)
    }

    fn attr(name: &str, channel: &str, subtopic: &str, persist_state: bool) -> Attribute {
        Attribute {
            name: name.into(),
            channel: channel.into(),
            subtopic: subtopic.into(),
            persist_state,
            record: None,
        }
    }

    fn record(name: &str, value: Value, time: DateTime<Utc>) -> Record {
        Record {
            name: name.into(),
            unit: None,
            value,
            time,
        }
    }

    /// Persisted attribute on the fixtures' channel and subtopic.
    fn kept(name: &str) -> Attribute {
        attr(name, CHANNEL, SUBTOPIC, true)
    }

    fn def(id: i64, delta: i64, attributes: Vec<Attribute>) -> Definition {
        Definition {
            id,
            created: at(0),
            attributes,
            delta,
        }
    }

    fn state(id: i64, definition: i64, created: i64, payload: Payload) -> State {
        State {
            twin_id: TWIN.into(),
            id,
            definition,
            created: at(created),
            payload,
        }
    }

    struct Case {
        label: &'static str,
        last: Option<State>,
        definition: Definition,
        channel: &'static str,
        subtopic: &'static str,
        value: Value,
        time: DateTime<Utc>,
        want: Outcome,
    }

    /// A case on the fixtures' channel/subtopic with a value of 21.5.
    fn case(
        label: &'static str,
        last: Option<State>,
        definition: Definition,
        time: i64,
        want: Outcome,
    ) -> Case {
        Case {
            label,
            last,
            definition,
            channel: CHANNEL,
            subtopic: SUBTOPIC,
            value: json!(21.5),
            time: at(time),
            want,
        }
    }

    fn run(cases: Vec<Case>) {
        for c in cases {
            let got = apply(
                TWIN,
                c.last.as_ref(),
                &c.definition,
                c.channel,
                c.subtopic,
                &record("", c.value.clone(), c.time),
            );
            assert_eq!(got, c.want, "{}", c.label);
        }
    }

    #[test]
    fn delta_decides_between_update_and_new_state() {
        let d = def(0, DELTA, vec![kept("temp")]);
        let last = || Some(state(4, 0, T0, payload_of([("temp", json!(1))])));
        let temp = || payload_of([("temp", json!(21.5))]);
        run(vec![
            case(
                "first state has id 0 and the record's time",
                None,
                d.clone(),
                T0,
                Outcome::Save(state(0, 0, T0, temp())),
            ),
            case(
                "within delta updates the latest state in place",
                last(),
                d.clone(),
                T0 + DELTA / 2,
                Outcome::Update(state(4, 0, T0, temp())),
            ),
            case(
                "same instant updates",
                last(),
                d.clone(),
                T0,
                Outcome::Update(state(4, 0, T0, temp())),
            ),
            case(
                "exactly delta later still updates",
                last(),
                d.clone(),
                T0 + DELTA,
                Outcome::Update(state(4, 0, T0, temp())),
            ),
            case(
                "exactly delta earlier still updates",
                last(),
                d.clone(),
                T0 - DELTA,
                Outcome::Update(state(4, 0, T0, temp())),
            ),
            case(
                "one nanosecond beyond delta saves the next id at the record's time",
                last(),
                d.clone(),
                T0 + DELTA + 1,
                Outcome::Save(state(5, 0, T0 + DELTA + 1, temp())),
            ),
            case(
                "late record older than delta saves a new state at its own time",
                last(),
                d.clone(),
                T0 - DELTA - 1,
                Outcome::Save(state(5, 0, T0 - DELTA - 1, temp())),
            ),
            case(
                "zero delta saves on any difference",
                last(),
                def(0, 0, vec![kept("temp")]),
                T0 + 1,
                Outcome::Save(state(5, 0, T0 + 1, temp())),
            ),
            case(
                "zero delta updates at the same instant",
                last(),
                def(0, 0, vec![kept("temp")]),
                T0,
                Outcome::Update(state(4, 0, T0, temp())),
            ),
            case(
                "times at the ends of i64 nanoseconds do not overflow",
                Some(state(4, 0, i64::MIN, payload_of([]))),
                def(0, i64::MAX, vec![kept("temp")]),
                i64::MAX,
                Outcome::Save(state(5, 0, i64::MAX, temp())),
            ),
            case(
                "the widest delta covers half the i64 range",
                Some(state(4, 0, 0, payload_of([]))),
                def(0, i64::MAX, vec![kept("temp")]),
                i64::MIN + 1,
                Outcome::Update(state(4, 0, 0, temp())),
            ),
        ]);
    }

    #[test]
    fn times_beyond_i64_nanoseconds_compare_exactly() {
        // Year 3000 and year 3000 plus two seconds: both saturate as i64 nanoseconds, so a
        // saturating comparison would call them equal.
        let Some(far) = DateTime::from_timestamp(32_503_680_000, 0) else {
            panic!("fixture time out of chrono's range");
        };
        let later = far + chrono::Duration::seconds(2);
        let last = State {
            created: far,
            ..state(0, 0, 0, payload_of([]))
        };
        let got = apply(
            TWIN,
            Some(&last),
            &def(0, DELTA, vec![kept("a")]),
            CHANNEL,
            SUBTOPIC,
            &record("", json!(1), later),
        );
        let want = State {
            created: later,
            ..state(1, 0, 0, payload_of([("a", json!(1))]))
        };
        assert_eq!(got, Outcome::Save(want));
    }

    #[test]
    fn only_matching_persisted_attributes_are_written() {
        let last = || Some(state(2, 0, T0, payload_of([("a", json!(0))])));
        run(vec![
            case(
                "no attribute on the channel does nothing",
                last(),
                def(0, DELTA, vec![attr("a", "other", SUBTOPIC, true)]),
                T0,
                Outcome::Nothing,
            ),
            case(
                "no matching attribute does nothing even without a state",
                None,
                def(0, DELTA, vec![attr("a", "other", SUBTOPIC, true)]),
                T0,
                Outcome::Nothing,
            ),
            case(
                "other subtopic does nothing",
                last(),
                def(0, DELTA, vec![attr("a", CHANNEL, "chassis", true)]),
                T0,
                Outcome::Nothing,
            ),
            case(
                "empty subtopic only matches messages without one",
                last(),
                def(0, DELTA, vec![attr("a", CHANNEL, "", true)]),
                T0,
                Outcome::Nothing,
            ),
            case(
                "matching attribute that is not persisted does nothing",
                last(),
                def(0, DELTA, vec![attr("a", CHANNEL, SUBTOPIC, false)]),
                T0 + 10 * DELTA,
                Outcome::Nothing,
            ),
            case(
                "wildcard subtopic matches",
                last(),
                def(0, DELTA, vec![attr("a", CHANNEL, WILDCARD_SUBTOPIC, true)]),
                T0,
                Outcome::Update(state(2, 0, T0, payload_of([("a", json!(21.5))]))),
            ),
            case(
                "every matching persisted attribute gets the value",
                None,
                def(
                    0,
                    DELTA,
                    vec![
                        kept("a"),
                        attr("b", CHANNEL, WILDCARD_SUBTOPIC, true),
                        kept("c"),
                        attr("other", "elsewhere", SUBTOPIC, true),
                    ],
                ),
                T0,
                Outcome::Save(state(
                    0,
                    0,
                    T0,
                    payload_of([("a", json!(21.5)), ("b", json!(21.5)), ("c", json!(21.5))]),
                )),
            ),
            case(
                "matching attribute that is not persisted is never stored",
                None,
                def(
                    0,
                    DELTA,
                    vec![kept("a"), attr("shadow", CHANNEL, SUBTOPIC, false)],
                ),
                T0,
                Outcome::Save(state(0, 0, T0, payload_of([("a", json!(21.5))]))),
            ),
        ]);
    }

    #[test]
    fn values_are_stored_as_given() {
        for value in [
            json!(21.5),
            json!(7),
            json!("on"),
            json!(true),
            json!("aGk="),
        ] {
            let got = apply(
                TWIN,
                None,
                &def(0, DELTA, vec![kept("a")]),
                CHANNEL,
                SUBTOPIC,
                &record("", value.clone(), at(T0)),
            );
            let want = state(0, 0, T0, payload_of([("a", value.clone())]));
            assert_eq!(got, Outcome::Save(want), "{value}");
        }
    }

    #[test]
    fn payload_is_carried_over_and_filtered_to_current_persisted_attributes() {
        // State built with definition 0; definition 1 keeps "a", stops persisting "b",
        // drops "gone" and adds "new" on another subtopic.
        let last = || {
            Some(state(
                3,
                0,
                T0,
                payload_of([
                    ("a", json!(1)),
                    ("b", json!(2)),
                    ("gone", json!(3)),
                    ("new", json!(4)),
                ]),
            ))
        };
        let current = || {
            def(
                1,
                DELTA,
                vec![
                    kept("a"),
                    attr("b", CHANNEL, SUBTOPIC, false),
                    attr("new", CHANNEL, "chassis", true),
                    kept("x"),
                ],
            )
        };
        run(vec![
            case(
                "new state keeps persisted keys and takes the current definition id",
                last(),
                current(),
                T0 + 2 * DELTA,
                Outcome::Save(state(
                    4,
                    1,
                    T0 + 2 * DELTA,
                    payload_of([("a", json!(21.5)), ("new", json!(4)), ("x", json!(21.5))]),
                )),
            ),
            case(
                "update drops stale keys and takes the current definition id",
                last(),
                current(),
                T0,
                Outcome::Update(state(
                    3,
                    1,
                    T0,
                    payload_of([("a", json!(21.5)), ("new", json!(4)), ("x", json!(21.5))]),
                )),
            ),
            Case {
                channel: "elsewhere",
                ..case(
                    "unmatched message leaves stale keys and old definition alone",
                    last(),
                    current(),
                    T0,
                    Outcome::Nothing,
                )
            },
            case(
                "new delta of the current definition is the one used",
                last(),
                def(1, 3 * DELTA, vec![kept("a")]),
                T0 + 2 * DELTA,
                Outcome::Update(state(3, 1, T0, payload_of([("a", json!(21.5))]))),
            ),
        ]);
    }

    #[test]
    fn new_state_belongs_to_the_given_twin() {
        let got = apply(
            "twin-2",
            None,
            &def(7, DELTA, vec![kept("a")]),
            CHANNEL,
            SUBTOPIC,
            &record("", json!(1), at(T0)),
        );
        let want = State {
            twin_id: "twin-2".into(),
            ..state(0, 7, T0, payload_of([("a", json!(1))]))
        };
        assert_eq!(got, Outcome::Save(want));
    }

    fn records(values: &[(i64, Value)]) -> Vec<Record> {
        values
            .iter()
            .map(|(t, v)| record("", v.clone(), at(*t)))
            .collect()
    }

    #[test]
    fn an_attribute_with_a_record_takes_only_that_record() {
        let bound = |name: &str, r: Option<&str>| Attribute {
            record: r.map(Into::into),
            ..kept(name)
        };
        let d = def(
            0,
            DELTA,
            vec![
                bound("temperature", Some("room/temperature")),
                bound("humidity", Some("room/humidity")),
                bound("any", None),
            ],
        );
        let message = [
            record("room/temperature", json!(21.5), at(T0)),
            record("room/humidity", json!(40), at(T0)),
            record("room/pressure", json!(1013), at(T0)),
        ];
        let writes = fold(TWIN, None, &d, CHANNEL, SUBTOPIC, &message);
        let want = payload_of([
            ("temperature", json!(21.5)),
            ("humidity", json!(40)),
            ("any", json!(1013)),
        ]);
        assert_eq!(writes, vec![Write::Insert(state(0, 0, T0, want))]);

        // A record no attribute takes changes nothing, not even the time of a state.
        let only_bound = def(0, DELTA, vec![bound("temperature", Some("t"))]);
        let other = [record("h", json!(1), at(T0))];
        assert_eq!(
            fold(TWIN, None, &only_bound, CHANNEL, SUBTOPIC, &other),
            vec![]
        );
    }

    #[test]
    fn fold_gives_at_most_one_write_per_state_in_id_order() {
        let d = def(0, DELTA, vec![kept("a")]);
        let stored = || Some(state(4, 0, T0, payload_of([("a", json!(0))])));
        let a = |v: Value| payload_of([("a", v)]);
        // (label, stored latest state, current definition, records, expected writes)
        type FoldCase = (
            &'static str,
            Option<State>,
            Definition,
            Vec<Record>,
            Vec<Write>,
        );
        let cases: Vec<FoldCase> = vec![
            (
                "updates of the stored state collapse into one",
                stored(),
                d.clone(),
                records(&[(T0 + 1, json!(1)), (T0 + 2, json!(2)), (T0 + 3, json!(3))]),
                vec![Write::Update(state(4, 0, T0, a(json!(3))))],
            ),
            (
                "updates of an inserted state merge into the insert",
                None,
                d.clone(),
                records(&[(T0, json!(1)), (T0 + 1, json!(2)), (T0 - 1, json!(3))]),
                vec![Write::Insert(state(0, 0, T0, a(json!(3))))],
            ),
            (
                "records more than delta apart insert two states",
                None,
                d.clone(),
                records(&[(T0, json!(1)), (T0 + DELTA + 1, json!(2))]),
                vec![
                    Write::Insert(state(0, 0, T0, a(json!(1)))),
                    Write::Insert(state(1, 0, T0 + DELTA + 1, a(json!(2)))),
                ],
            ),
            (
                "update of the stored state then inserts that absorb later records",
                stored(),
                d.clone(),
                records(&[
                    (T0 + 1, json!(1)),
                    (T0 + 2 * DELTA, json!(2)),
                    (T0 + 2 * DELTA + 5, json!(3)),
                    (T0 + 4 * DELTA, json!(4)),
                ]),
                vec![
                    Write::Update(state(4, 0, T0, a(json!(1)))),
                    Write::Insert(state(5, 0, T0 + 2 * DELTA, a(json!(3)))),
                    Write::Insert(state(6, 0, T0 + 4 * DELTA, a(json!(4)))),
                ],
            ),
            (
                "a record near an older state still compares with the newest",
                stored(),
                d.clone(),
                records(&[(T0 + 2 * DELTA, json!(1)), (T0, json!(2))]),
                vec![
                    Write::Insert(state(5, 0, T0 + 2 * DELTA, a(json!(1)))),
                    Write::Insert(state(6, 0, T0, a(json!(2)))),
                ],
            ),
            (
                "unchanged stored state is not written",
                stored(),
                d.clone(),
                records(&[(T0 + 1, json!(0))]),
                vec![],
            ),
            (
                "update back to the stored value is not written",
                stored(),
                d.clone(),
                records(&[(T0 + 1, json!(9)), (T0 + 2, json!(0))]),
                vec![],
            ),
            (
                "same value under a new definition is written",
                stored(),
                def(1, DELTA, vec![kept("a")]),
                records(&[(T0 + 1, json!(0))]),
                vec![Write::Update(state(4, 1, T0, a(json!(0))))],
            ),
            (
                "no matching attribute writes nothing",
                stored(),
                def(0, DELTA, vec![attr("a", CHANNEL, SUBTOPIC, false)]),
                records(&[(T0, json!(1)), (T0 + 5 * DELTA, json!(2))]),
                vec![],
            ),
            (
                "no records write nothing",
                stored(),
                d.clone(),
                vec![],
                vec![],
            ),
        ];
        for (label, last, definition, recs, want) in cases {
            let got = fold(TWIN, last.as_ref(), &definition, CHANNEL, SUBTOPIC, &recs);
            assert_eq!(got, want, "{label}");
            let ids: Vec<i64> = got.iter().map(|w| w.state().id).collect();
            assert!(ids.windows(2).all(|p| p[0] < p[1]), "{label}: ids {ids:?}");
        }
    }
}
