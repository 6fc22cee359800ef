//! A twin's history (SPEC section 11): time windows over its states, the state in force
//! at an instant, what changed between two states, and a summary of each attribute over
//! a window.
//!
//! The stores find states and aggregate them where the data is; this module says what
//! their answers mean, state by state ([`in_force`], [`summarize`]), which is also what
//! the in-memory store of the use-case tests runs and what the tests compare with.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::ValidationError;
use super::state::{Payload, State};
use super::time::{self, to_nanos};
use super::twin::Definition;

/// The states with `from <= created <= to`; an absent bound is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl Window {
    /// A window whose bounds are in order.
    pub fn new(
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Self, ValidationError> {
        if let (Some(f), Some(t)) = (from, to)
            && f > t
        {
            return Err(ValidationError::new("from must not be later than to"));
        }
        Ok(Self { from, to })
    }

    /// No bound at all: every state.
    pub fn is_unbounded(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    pub fn contains(&self, t: &DateTime<Utc>) -> bool {
        self.from.is_none_or(|f| f <= *t) && self.to.is_none_or(|to| *t <= to)
    }

    /// The bounds in Unix nanoseconds, open ends as the extremes of i64, as the SQL
    /// stores compare them.
    pub fn nanos(&self) -> (i64, i64) {
        (
            self.from.as_ref().map_or(i64::MIN, to_nanos),
            self.to.as_ref().map_or(i64::MAX, to_nanos),
        )
    }
}

/// An RFC 3339 time from the query parameter `param`.
pub fn parse_time(param: &str, raw: &str) -> Result<DateTime<Utc>, ValidationError> {
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ValidationError::new(format!(
                "{param} must be an RFC 3339 time such as 2026-01-02T03:04:05.123Z, got {raw:?}: {e}"
            ))
        })
}

/// Where a run of a twin's states stops being in time order: the greatest id among
/// `states` (consecutive ids, ascending) whose state was created before the one before
/// it. None when each follows its predecessor in time (ties included). A history whose
/// last such break is at or before its first kept state is ordered by id and by time
/// alike, so a window of it is a run of ids.
pub fn last_break<'a>(states: impl IntoIterator<Item = &'a State>) -> Option<i64> {
    let mut before: Option<&State> = None;
    let mut found = None;
    for s in states {
        if before.is_some_and(|b| s.created < b.created) {
            found = Some(s.id);
        }
        before = Some(s);
    }
    found
}

/// History order: by `created`, then by id.
pub fn chronological(a: &State, b: &State) -> Ordering {
    a.created.cmp(&b.created).then(a.id.cmp(&b.id))
}

/// The state in force at `at`: the greatest `created <= at`, ties going to the greatest id.
pub fn in_force<'a>(
    states: impl IntoIterator<Item = &'a State>,
    at: &DateTime<Utc>,
) -> Option<&'a State> {
    states
        .into_iter()
        .filter(|s| s.created <= *at)
        .max_by(|a, b| chronological(a, b))
}

/// A state with the definition it was built with, as `GET /twins/{id}/states/at` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StateInForce {
    #[serde(flatten)]
    pub state: State,
    /// The twin's definition whose id is the state's `definition`; null when the twin
    /// no longer has it (data written by hand).
    pub definition_in_force: Option<Definition>,
}

/// One attribute whose value differs between two states.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Change {
    pub attribute: String,
    /// Value in the earlier state; null when absent there.
    #[schema(value_type = Object, nullable = true)]
    pub from: Value,
    /// Value in the later state; null when absent there.
    #[schema(value_type = Object, nullable = true)]
    pub to: Value,
}

/// What changed between the states in force at two instants.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StateDiff {
    pub from: Option<State>,
    pub to: Option<State>,
    /// Every attribute whose value differs, by attribute name.
    pub changes: Vec<Change>,
    /// RFC 6902 operations turning `from.payload` into `to.payload` (a missing state
    /// counts as an empty payload).
    #[schema(value_type = Vec<Object>)]
    pub patch: Value,
}

impl StateDiff {
    pub fn between(from: Option<State>, to: Option<State>) -> Self {
        let empty = Payload::new();
        let a = from.as_ref().map_or(&empty, |s| &s.payload);
        let b = to.as_ref().map_or(&empty, |s| &s.payload);
        let patch = json_patch::diff(&Value::Object(a.clone()), &Value::Object(b.clone()));
        Self {
            changes: changes(a, b),
            // A patch is a list of plain operations, which always serialize.
            patch: serde_json::to_value(&patch).unwrap_or_else(|_| Value::Array(Vec::new())),
            from,
            to,
        }
    }
}

/// Every attribute whose value differs between two payloads, an absent value being
/// null, sorted by attribute name.
pub fn changes(from: &Payload, to: &Payload) -> Vec<Change> {
    let mut names: Vec<&String> = from.keys().chain(to.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let a = from.get(name).cloned().unwrap_or(Value::Null);
            let b = to.get(name).cloned().unwrap_or(Value::Null);
            (a != b).then(|| Change {
                attribute: name.clone(),
                from: a,
                to: b,
            })
        })
        .collect()
}

/// One attribute over a window.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AttributeSummary {
    /// States of the window that have the attribute.
    pub count: u64,
    /// Its value in the first of those states (by `created`, then id).
    #[schema(value_type = Object, nullable = true)]
    pub first: Value,
    /// Its value in the last of those states.
    #[schema(value_type = Object, nullable = true)]
    pub last: Value,
    /// Smallest numeric value; null when it never had one.
    #[schema(value_type = f64, nullable = true)]
    pub min: Value,
    /// Largest numeric value; null when it never had one.
    #[schema(value_type = f64, nullable = true)]
    pub max: Value,
    /// Mean of the numeric values; null when it never had one.
    pub mean: Option<f64>,
}

/// The states of a window, counted, and each attribute summarised.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub states: u64,
    pub attributes: BTreeMap<String, AttributeSummary>,
}

/// A summary as `GET /twins/{id}/states/summary` serves it, with the window asked for.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct WindowSummary {
    /// The window's lower bound; null when open.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<String>,
    /// The window's upper bound; null when open.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<String>,
    /// States in the window.
    pub states: u64,
    pub attributes: BTreeMap<String, AttributeSummary>,
}

impl WindowSummary {
    pub fn new(window: &Window, summary: Summary) -> Self {
        Self {
            from: window.from.as_ref().map(time::format),
            to: window.to.as_ref().map(time::format),
            states: summary.states,
            attributes: summary.attributes,
        }
    }
}

/// The summary of `states`, which must come in history order ([`chronological`]):
/// the definition of what the stores aggregate.
pub fn summarize<'a>(states: impl IntoIterator<Item = &'a State>) -> Summary {
    struct Acc {
        count: u64,
        first: Value,
        last: Value,
        min: Option<(f64, Value)>,
        max: Option<(f64, Value)>,
        sum: f64,
        numbers: u64,
    }
    let mut total = 0;
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    for s in states {
        total += 1;
        for (name, value) in &s.payload {
            let a = acc.entry(name.clone()).or_insert_with(|| Acc {
                count: 0,
                first: value.clone(),
                last: Value::Null,
                min: None,
                max: None,
                sum: 0.0,
                numbers: 0,
            });
            a.count += 1;
            a.last = value.clone();
            if let Some(x) = value.as_f64() {
                a.sum += x;
                a.numbers += 1;
                if a.min.as_ref().is_none_or(|(m, _)| x < *m) {
                    a.min = Some((x, value.clone()));
                }
                if a.max.as_ref().is_none_or(|(m, _)| x > *m) {
                    a.max = Some((x, value.clone()));
                }
            }
        }
    }
    Summary {
        states: total,
        attributes: acc
            .into_iter()
            .map(|(name, a)| {
                let summary = AttributeSummary {
                    count: a.count,
                    first: a.first,
                    last: a.last,
                    min: a.min.map_or(Value::Null, |(_, v)| v),
                    max: a.max.map_or(Value::Null, |(_, v)| v),
                    mean: (a.numbers > 0).then(|| a.sum / a.numbers as f64),
                };
                (name, summary)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::from_nanos;
    use serde_json::json;

    fn state(id: i64, created_ms: i64, payload: Value) -> State {
        State {
            twin_id: "t".into(),
            id,
            definition: 0,
            created: from_nanos(created_ms * 1_000_000),
            payload: payload.as_object().cloned().unwrap_or_default(),
        }
    }

    fn ms(v: i64) -> DateTime<Utc> {
        from_nanos(v * 1_000_000)
    }

    #[test]
    fn a_window_refuses_bounds_out_of_order() {
        assert!(Window::new(Some(ms(2)), Some(ms(1))).is_err());
        let w = Window::new(Some(ms(1)), Some(ms(1))).unwrap();
        assert!(w.contains(&ms(1)) && !w.contains(&ms(2)) && !w.contains(&ms(0)));
        assert_eq!(Window::default().nanos(), (i64::MIN, i64::MAX));
        assert!(Window::default().is_unbounded());
    }

    #[test]
    fn times_must_be_rfc3339() {
        assert_eq!(
            parse_time("time", "2020-05-05T08:41:39.142Z").unwrap(),
            ms(1_588_668_099_142)
        );
        assert_eq!(
            parse_time("time", "2020-05-05T10:41:39.142+02:00").unwrap(),
            ms(1_588_668_099_142)
        );
        for bad in ["", "yesterday", "2020-05-05", "1588668099"] {
            let e = parse_time("time", bad).unwrap_err().to_string();
            assert!(e.starts_with("time must be an RFC 3339 time"), "{e}");
        }
    }

    #[test]
    fn the_state_in_force_is_the_latest_created_not_after_the_instant_ties_to_the_greatest_id() {
        let states = [
            state(0, 10, json!({})),
            state(1, 30, json!({})),
            // Out of order: older than the state before it.
            state(2, 20, json!({})),
            state(3, 30, json!({})),
        ];
        let at = |t| in_force(&states, &ms(t)).map(|s| s.id);
        assert_eq!(at(9), None);
        assert_eq!(at(10), Some(0));
        assert_eq!(at(25), Some(2));
        assert_eq!(at(30), Some(3));
        assert_eq!(at(1000), Some(3));
    }

    #[test]
    fn changes_list_every_differing_attribute_by_name_absent_as_null() {
        let a = json!({"b": 1, "a": "x", "same": true})
            .as_object()
            .cloned()
            .unwrap();
        let b = json!({"a": "y", "c": [1], "same": true})
            .as_object()
            .cloned()
            .unwrap();
        let c = changes(&a, &b);
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!([
                {"attribute": "a", "from": "x", "to": "y"},
                {"attribute": "b", "from": 1, "to": null},
                {"attribute": "c", "from": null, "to": [1]},
            ])
        );
    }

    #[test]
    fn the_patch_turns_the_first_payload_into_the_second() {
        let from = state(0, 1, json!({"a": 1, "b": {"x": 1}}));
        let to = state(1, 2, json!({"a": 2, "c": "new"}));
        let d = StateDiff::between(Some(from.clone()), Some(to.clone()));
        let patch: json_patch::Patch = serde_json::from_value(d.patch.clone()).unwrap();
        let mut doc = Value::Object(from.payload);
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, Value::Object(to.payload.clone()));
        let none = StateDiff::between(None, Some(to));
        assert_eq!(none.changes.len(), 2);
    }

    #[test]
    fn summaries_keep_first_last_and_numeric_extremes() {
        let states = [
            state(0, 1, json!({"t": 5, "s": "a"})),
            state(1, 2, json!({"t": 2.5, "s": "b", "n": null})),
            state(2, 3, json!({"t": "hot", "s": "c"})),
        ];
        let s = summarize(&states);
        assert_eq!(s.states, 3);
        let t = &s.attributes["t"];
        assert_eq!((t.count, &t.first, &t.last), (3, &json!(5), &json!("hot")));
        assert_eq!(
            (&t.min, &t.max, t.mean),
            (&json!(2.5), &json!(5), Some(3.75))
        );
        let str_only = &s.attributes["s"];
        assert_eq!(
            (&str_only.min, &str_only.max, str_only.mean),
            (&Value::Null, &Value::Null, None)
        );
        assert_eq!(s.attributes["n"].count, 1);
        assert_eq!(summarize(&[]), Summary::default());
    }
}
