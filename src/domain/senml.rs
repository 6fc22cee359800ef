//! SenML JSON (RFC 8428) resolved into self-contained records.
//!
//! Devices publish SenML packs in which base fields (`bn`, `bt`, `bu`, `bv`, `bs`) carry
//! over from one record to the next and times may be relative to "now". The sampling rule
//! only needs, per record, one value and one absolute time, so this module does the
//! resolution once, up front, and refuses packs it cannot resolve with a message the
//! publisher can act on.
//!
//! It is deliberately lenient where the Go service was: unknown fields are ignored, `bver`
//! is not checked, names are not validated (twins never look at them) and a field set to
//! `null` counts as absent, as it did for Go's `encoding/json`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value};

use super::time;

/// Resolved times below this many seconds are offsets from now (RFC 8428 §4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0; // 2^28

/// Larger than any time we accept (`i64` nanoseconds end in 2262), so that the decimal
/// conversion below never handles long digit strings for hopeless values.
const SECONDS_LIMIT: f64 = 1e12;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// One SenML record with its base fields applied and its time made absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `bn` + `n`.
    pub name: String,
    /// `u`, or else `bu`.
    pub unit: Option<String>,
    /// A number (`v` or `s`, base value added), a string (`vs`, or `vd` kept as base64)
    /// or a bool (`vb`).
    pub value: Value,
    /// `bt` + `t`, resolved against now when relative, to the nanosecond.
    pub time: DateTime<Utc>,
}

/// Why a payload is not usable SenML. Messages are meant for the publisher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenmlError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("SenML payload must be a JSON array of records, not {0}")]
    NotArray(&'static str),
    #[error("SenML payload has no records")]
    Empty,
    #[error("SenML record {index} is not a JSON object")]
    NotObject { index: usize },
    #[error("SenML record {index}: field \"{field}\" must be {expected}")]
    WrongType {
        index: usize,
        field: &'static str,
        expected: &'static str,
    },
    #[error("SenML record {index}: \"{field}\" plus its base value is not a finite number")]
    NotFinite { index: usize, field: &'static str },
    #[error("SenML record {index} has no value: one of v, vs, vd, vb or s is required")]
    NoValue { index: usize },
    #[error(
        "SenML record {index}: time is out of range \
         (it must resolve to an instant between 1677-09-21 and 2262-04-11)"
    )]
    BadTime { index: usize },
}

impl SenmlError {
    /// Short, stable label for metrics; the message itself carries details.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NotArray(_) => "not_array",
            Self::Empty => "empty",
            Self::NotObject { .. } | Self::WrongType { .. } | Self::NotFinite { .. } => {
                "bad_record"
            }
            Self::NoValue { .. } => "no_value",
            Self::BadTime { .. } => "bad_time",
        }
    }
}

/// Resolves a SenML JSON pack; relative times are taken from `now`.
///
/// Records come back in pack order, one per input record; any unusable record rejects the
/// whole pack, since a partly applied message would be hard to explain to its publisher.
pub fn resolve(payload: &[u8], now: DateTime<Utc>) -> Result<Vec<Record>, SenmlError> {
    let json: Value =
        serde_json::from_slice(payload).map_err(|e| SenmlError::NotJson(e.to_string()))?;
    let items = match json {
        Value::Array(items) => items,
        other => return Err(SenmlError::NotArray(kind_of(&other))),
    };
    if items.is_empty() {
        return Err(SenmlError::Empty);
    }

    let mut base = Base::default();
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let obj = item.as_object().ok_or(SenmlError::NotObject { index })?;
            let raw = Raw::parse(index, obj)?;
            base.absorb(&raw);
            base.resolve(index, raw, now)
        })
        .collect()
}

/// Base fields in force for the current record (RFC 8428 §4.5: a base field applies to
/// its own record and every later one until the pack sets it again).
#[derive(Default)]
struct Base {
    name: String,
    time: f64,
    unit: Option<String>,
    value: f64,
    sum: f64,
}

impl Base {
    fn absorb(&mut self, raw: &Raw) {
        if let Some(bn) = &raw.bn {
            self.name.clone_from(bn);
        }
        if let Some(bt) = raw.bt {
            self.time = bt;
        }
        if let Some(bu) = &raw.bu {
            self.unit = Some(bu.clone());
        }
        if let Some(bv) = raw.bv {
            self.value = bv;
        }
        if let Some(bs) = raw.bs {
            self.sum = bs;
        }
    }

    fn resolve(&self, index: usize, raw: Raw, now: DateTime<Utc>) -> Result<Record, SenmlError> {
        // A record should carry exactly one value (RFC 8428 §4.2); when a sender gives
        // several, this fixed order decides, as the twins spec does.
        let value = if let Some(v) = raw.v {
            number(index, "v", self.value + v)?
        } else if let Some(vs) = raw.vs {
            Value::String(vs)
        } else if let Some(vd) = raw.vd {
            Value::String(vd)
        } else if let Some(vb) = raw.vb {
            Value::Bool(vb)
        } else if let Some(s) = raw.s {
            number(index, "s", self.sum + s)?
        } else {
            return Err(SenmlError::NoValue { index });
        };

        let mut name = self.name.clone();
        if let Some(n) = &raw.n {
            name.push_str(n);
        }

        Ok(Record {
            name,
            unit: raw.u.or_else(|| self.unit.clone()),
            value,
            time: resolve_time(index, self.time + raw.t.unwrap_or(0.0), now)?,
        })
    }
}

/// The fields of one record, type-checked. Every known field is checked even when the
/// value precedence would ignore it, so a malformed record is refused consistently.
struct Raw {
    bn: Option<String>,
    bt: Option<f64>,
    bu: Option<String>,
    bv: Option<f64>,
    bs: Option<f64>,
    n: Option<String>,
    u: Option<String>,
    v: Option<f64>,
    vs: Option<String>,
    vb: Option<bool>,
    vd: Option<String>,
    s: Option<f64>,
    t: Option<f64>,
}

impl Raw {
    fn parse(index: usize, obj: &Map<String, Value>) -> Result<Self, SenmlError> {
        let f = Fields { index, obj };
        // `ut` is not used, but a wrong type there still means the sender is confused.
        f.number("ut")?;
        Ok(Self {
            bn: f.string("bn")?,
            bt: f.number("bt")?,
            bu: f.string("bu")?,
            bv: f.number("bv")?,
            bs: f.number("bs")?,
            n: f.string("n")?,
            u: f.string("u")?,
            v: f.number("v")?,
            vs: f.string("vs")?,
            vb: f.boolean("vb")?,
            vd: f.string("vd")?,
            s: f.number("s")?,
            t: f.number("t")?,
        })
    }
}

struct Fields<'a> {
    index: usize,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn wrong(&self, field: &'static str, expected: &'static str) -> SenmlError {
        SenmlError::WrongType {
            index: self.index,
            field,
            expected,
        }
    }

    fn string(&self, field: &'static str) -> Result<Option<String>, SenmlError> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.wrong(field, "a string"))
            })
            .transpose()
    }

    fn number(&self, field: &'static str) -> Result<Option<f64>, SenmlError> {
        self.get(field)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(field, "a number")))
            .transpose()
    }

    fn boolean(&self, field: &'static str) -> Result<Option<bool>, SenmlError> {
        self.get(field)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(field, "a boolean")))
            .transpose()
    }
}

/// A resolved number as JSON. Integral values become JSON integers because the Go service
/// kept values as float64 and `encoding/json` writes integral ones without a fraction
/// (`21`, not `21.0`), so stored states read as they did before (see [`super::json`]).
fn number(index: usize, field: &'static str, x: f64) -> Result<Value, SenmlError> {
    if let Some(i) = super::json::integer(x) {
        return Ok(i);
    }
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or(SenmlError::NotFinite { index, field })
}

/// Applies RFC 8428 §4.5.3: below 2^28 seconds (zero and negatives included) the time is
/// an offset from now, otherwise seconds since the Unix epoch. Zero therefore is now.
fn resolve_time(index: usize, secs: f64, now: DateTime<Utc>) -> Result<DateTime<Utc>, SenmlError> {
    let offset = seconds_to_nanos(secs).ok_or(SenmlError::BadTime { index })?;
    let nanos = if secs < RELATIVE_LIMIT {
        time::to_nanos_exact(&now) + offset
    } else {
        offset
    };
    // The stores and the API keep times as i64 nanoseconds; anything beyond would be
    // silently clamped later, so refuse it here where the publisher can be told.
    i64::try_from(nanos)
        .map(time::from_nanos)
        .map_err(|_| SenmlError::BadTime { index })
}

/// Nanoseconds in `secs`, taken from the shortest decimal that reads back as `secs`.
///
/// Publishers write decimal seconds such as `1588668099.142`; the nearest f64 is
/// 1588668099.14199995..., so converting its binary value would store `.141999959`.
/// Rust's `Display` for f64 prints that shortest decimal and never uses an exponent,
/// which lets us read the digits the publisher meant.
fn seconds_to_nanos(secs: f64) -> Option<i128> {
    if !secs.is_finite() || secs.abs() >= SECONDS_LIMIT {
        return None;
    }
    let text = secs.abs().to_string();
    let (whole, frac) = text.split_once('.').unwrap_or((text.as_str(), ""));
    let whole: i128 = whole.parse().ok()?;
    let mut digits = frac.chars().map(|c| c.to_digit(10));
    let mut nanos: i128 = 0;
    for _ in 0..9 {
        nanos = nanos * 10 + i128::from(digits.next().flatten().unwrap_or(0));
    }
    // Finer than a nanosecond: round half up on the next digit.
    if digits.next().flatten().is_some_and(|d| d >= 5) {
        nanos += 1;
    }
    let total = whole * NANOS_PER_SEC + nanos;
    Some(if secs < 0.0 { -total } else { total })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2020-05-05T08:41:39Z, a "now" with no fraction so expected times are easy to read.
    const NOW_NS: i64 = 1_588_668_099_000_000_000;

    fn now() -> DateTime<Utc> {
        time::from_nanos(NOW_NS)
    }

    fn at(nanos: i64) -> DateTime<Utc> {
        time::from_nanos(nanos)
    }

    fn rec(name: &str, unit: Option<&str>, value: Value, time: DateTime<Utc>) -> Record {
        Record {
            name: name.into(),
            unit: unit.map(str::to_owned),
            value,
            time,
        }
    }

    fn check(cases: Vec<(&str, Value, Vec<Record>)>) {
        for (label, pack, want) in cases {
            let bytes = pack.to_string();
            match resolve(bytes.as_bytes(), now()) {
                Ok(got) => assert_eq!(got, want, "{label}"),
                Err(e) => panic!("{label}: unexpected error {e}"),
            }
        }
    }

    #[test]
    fn base_fields_apply_to_their_record_and_all_following() {
        check(vec![
            (
                "base name, unit and time carry over",
                json!([
                    {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e9, "bu": "%RH", "v": 20},
                    {"n": "temp", "u": "Cel", "t": 1, "v": 21.5},
                    {"n": "hum", "t": 2, "v": 30}
                ]),
                vec![
                    rec(
                        "urn:dev:ow:10e2073a01080063:",
                        Some("%RH"),
                        json!(20),
                        at(1_320_067_464_000_000_000),
                    ),
                    rec(
                        "urn:dev:ow:10e2073a01080063:temp",
                        Some("Cel"),
                        json!(21.5),
                        at(1_320_067_465_000_000_000),
                    ),
                    rec(
                        "urn:dev:ow:10e2073a01080063:hum",
                        Some("%RH"),
                        json!(30),
                        at(1_320_067_466_000_000_000),
                    ),
                ],
            ),
            (
                "base value is added to v on every later record",
                json!([
                    {"n": "a", "bv": 10, "v": 1.5},
                    {"n": "b", "v": -3}
                ]),
                vec![
                    rec("a", None, json!(11.5), now()),
                    rec("b", None, json!(7), now()),
                ],
            ),
            (
                "base sum is added to s on every later record",
                json!([
                    {"n": "a", "bs": 100, "s": 5},
                    {"n": "b", "s": 0.25}
                ]),
                vec![
                    rec("a", None, json!(105), now()),
                    rec("b", None, json!(100.25), now()),
                ],
            ),
            (
                "base value does not touch non-numeric values",
                json!([{"n": "a", "bv": 10, "bs": 5, "vs": "on"}]),
                vec![rec("a", None, json!("on"), now())],
            ),
            (
                "base fields change mid-pack",
                json!([
                    {"bn": "x:", "bu": "A", "bv": 1, "bt": 1.6e9, "n": "1", "v": 1},
                    {"n": "2", "v": 1},
                    {"bn": "y:", "bu": "V", "bv": 100, "bt": 1.7e9, "n": "3", "v": 1},
                    {"n": "4", "u": "W", "v": 1, "t": 5}
                ]),
                vec![
                    rec("x:1", Some("A"), json!(2), at(1_600_000_000_000_000_000)),
                    rec("x:2", Some("A"), json!(2), at(1_600_000_000_000_000_000)),
                    rec("y:3", Some("V"), json!(101), at(1_700_000_000_000_000_000)),
                    rec("y:4", Some("W"), json!(101), at(1_700_000_005_000_000_000)),
                ],
            ),
            (
                "name is bn alone when n is absent and n alone when bn is",
                json!([{"n": "only", "v": 1}, {"bn": "base", "v": 2}]),
                vec![
                    rec("only", None, json!(1), now()),
                    rec("base", None, json!(2), now()),
                ],
            ),
            (
                "unknown fields, bver, ut and null fields are tolerated",
                json!([{"bver": 10, "n": "a", "v": 1, "ut": 60, "extra": {"x": 1}, "vs": null, "u": null}]),
                vec![rec("a", None, json!(1), now())],
            ),
        ]);
    }

    #[test]
    fn times_resolve_relative_below_2_pow_28_and_absolute_from_it() {
        let sec = 1_000_000_000;
        check(vec![
            (
                "absent time is now",
                json!([{"v": 1}]),
                vec![rec("", None, json!(1), now())],
            ),
            (
                "zero time is now",
                json!([{"v": 1, "t": 0}, {"v": 1, "bt": 0, "t": 0}]),
                vec![
                    rec("", None, json!(1), now()),
                    rec("", None, json!(1), now()),
                ],
            ),
            (
                "base time and time cancelling to zero is now",
                json!([{"v": 1, "bt": 5, "t": -5}]),
                vec![rec("", None, json!(1), now())],
            ),
            (
                "positive relative time is in the future",
                json!([{"v": 1, "t": 1.5}]),
                vec![rec("", None, json!(1), at(NOW_NS + 3 * sec / 2))],
            ),
            (
                "negative time is in the past",
                json!([{"v": 1, "t": -60}]),
                vec![rec("", None, json!(1), at(NOW_NS - 60 * sec))],
            ),
            (
                "relative base time plus time",
                json!([{"v": 1, "bt": -10, "t": 2.25}]),
                vec![rec("", None, json!(1), at(NOW_NS - 7_750_000_000))],
            ),
            (
                "just below 2^28 is still relative",
                json!([{"v": 1, "t": 268_435_455}]),
                vec![rec("", None, json!(1), at(NOW_NS + 268_435_455 * sec))],
            ),
            (
                "2^28 itself is absolute",
                json!([{"v": 1, "t": 268_435_456}]),
                vec![rec("", None, json!(1), at(268_435_456 * sec))],
            ),
            (
                "absolute time keeps the decimal milliseconds written",
                json!([{"v": 1, "t": 1_588_668_099.142}]),
                vec![rec("", None, json!(1), at(1_588_668_099_142_000_000))],
            ),
            (
                "absolute base time plus fractional time",
                json!([{"v": 1, "bt": 1_588_668_000, "t": 99.000_001}]),
                vec![rec("", None, json!(1), at(1_588_668_099_000_001_000))],
            ),
            (
                "sub-nanosecond digits round to the nearest nanosecond",
                json!([{"v": 1, "t": 0.000_000_001_6}, {"v": 1, "t": 0.000_000_001_4}]),
                vec![
                    rec("", None, json!(1), at(NOW_NS + 2)),
                    rec("", None, json!(1), at(NOW_NS + 1)),
                ],
            ),
        ]);
    }

    #[test]
    fn value_is_the_first_present_of_v_vs_vd_vb_s() {
        check(vec![
            (
                "v",
                json!([{"v": 21.5}]),
                vec![rec("", None, json!(21.5), now())],
            ),
            (
                "integral v is a JSON integer",
                json!([{"v": 21.0}]),
                vec![rec("", None, json!(21), now())],
            ),
            (
                "vs",
                json!([{"vs": "on"}]),
                vec![rec("", None, json!("on"), now())],
            ),
            (
                "vd is kept as its base64 text",
                json!([{"vd": "aGk="}]),
                vec![rec("", None, json!("aGk="), now())],
            ),
            (
                "vb",
                json!([{"vb": false}]),
                vec![rec("", None, json!(false), now())],
            ),
            (
                "s",
                json!([{"s": 3.5}]),
                vec![rec("", None, json!(3.5), now())],
            ),
            (
                "v wins over everything",
                json!([{"v": 1, "vs": "x", "vd": "eA==", "vb": true, "s": 2}]),
                vec![rec("", None, json!(1), now())],
            ),
            (
                "vs wins over vd, vb and s",
                json!([{"vs": "x", "vd": "eA==", "vb": true, "s": 2}]),
                vec![rec("", None, json!("x"), now())],
            ),
            (
                "vd wins over vb and s",
                json!([{"vd": "eA==", "vb": true, "s": 2}]),
                vec![rec("", None, json!("eA=="), now())],
            ),
            (
                "vb wins over s",
                json!([{"vb": true, "s": 2}]),
                vec![rec("", None, json!(true), now())],
            ),
            (
                "null v falls through to the next value",
                json!([{"v": null, "vs": "x"}]),
                vec![rec("", None, json!("x"), now())],
            ),
        ]);
    }

    #[test]
    fn unusable_payloads_are_refused_with_a_reason() {
        let cases: Vec<(&str, &[u8], SenmlError, &str)> = vec![
            (
                "not JSON",
                b"{not json",
                SenmlError::NotJson(String::new()),
                "not_json",
            ),
            (
                "empty input",
                b"",
                SenmlError::NotJson(String::new()),
                "not_json",
            ),
            (
                "object",
                br#"{"v": 1}"#,
                SenmlError::NotArray("an object"),
                "not_array",
            ),
            (
                "number",
                b"42",
                SenmlError::NotArray("a number"),
                "not_array",
            ),
            (
                "string",
                br#""[]""#,
                SenmlError::NotArray("a string"),
                "not_array",
            ),
            ("null", b"null", SenmlError::NotArray("null"), "not_array"),
            ("empty array", b"[]", SenmlError::Empty, "empty"),
            (
                "record not an object",
                br#"[{"v": 1}, 5]"#,
                SenmlError::NotObject { index: 1 },
                "bad_record",
            ),
            (
                "string v",
                br#"[{"v": "abc"}]"#,
                SenmlError::WrongType {
                    index: 0,
                    field: "v",
                    expected: "a number",
                },
                "bad_record",
            ),
            (
                "numeric name",
                br#"[{"v": 1}, {"n": 7, "v": 1}]"#,
                SenmlError::WrongType {
                    index: 1,
                    field: "n",
                    expected: "a string",
                },
                "bad_record",
            ),
            (
                "string vb",
                br#"[{"vb": "true"}]"#,
                SenmlError::WrongType {
                    index: 0,
                    field: "vb",
                    expected: "a boolean",
                },
                "bad_record",
            ),
            (
                "string base time",
                br#"[{"bt": "now", "v": 1}]"#,
                SenmlError::WrongType {
                    index: 0,
                    field: "bt",
                    expected: "a number",
                },
                "bad_record",
            ),
            (
                "wrong type in a field the precedence would skip",
                br#"[{"v": 1, "vs": 2}]"#,
                SenmlError::WrongType {
                    index: 0,
                    field: "vs",
                    expected: "a string",
                },
                "bad_record",
            ),
            (
                "wrong type in ut",
                br#"[{"v": 1, "ut": "soon"}]"#,
                SenmlError::WrongType {
                    index: 0,
                    field: "ut",
                    expected: "a number",
                },
                "bad_record",
            ),
            (
                "value overflowing with its base value",
                br#"[{"bv": 1.7e308, "v": 1.7e308}]"#,
                SenmlError::NotFinite {
                    index: 0,
                    field: "v",
                },
                "bad_record",
            ),
            (
                "record without value",
                br#"[{"v": 1}, {"v": 2}, {"n": "x", "u": "Cel", "t": 1}]"#,
                SenmlError::NoValue { index: 2 },
                "no_value",
            ),
            (
                "base fields alone are no value",
                br#"[{"bn": "x", "bv": 1, "bs": 2}]"#,
                SenmlError::NoValue { index: 0 },
                "no_value",
            ),
            (
                "absolute time after 2262",
                br#"[{"v": 1, "t": 1e10}]"#,
                SenmlError::BadTime { index: 0 },
                "bad_time",
            ),
            (
                "absolute time far beyond any range",
                br#"[{"v": 1, "t": 1e300}]"#,
                SenmlError::BadTime { index: 0 },
                "bad_time",
            ),
            (
                "relative time before 1677",
                br#"[{"v": 1, "t": -2e10}]"#,
                SenmlError::BadTime { index: 0 },
                "bad_time",
            ),
            (
                "base time and time overflowing to infinity",
                br#"[{"v": 1}, {"bt": 1.7e308, "t": 1.7e308, "v": 1}]"#,
                SenmlError::BadTime { index: 1 },
                "bad_time",
            ),
        ];
        for (label, payload, want, reason) in cases {
            let err = match resolve(payload, now()) {
                Ok(got) => panic!("{label}: expected an error, got {got:?}"),
                Err(e) => e,
            };
            match (&err, &want) {
                // The parser's own wording is not ours to pin.
                (SenmlError::NotJson(msg), SenmlError::NotJson(_)) => {
                    assert!(!msg.is_empty(), "{label}")
                }
                _ => assert_eq!(err, want, "{label}"),
            }
            assert_eq!(err.reason(), reason, "{label}");
            assert!(!err.to_string().is_empty(), "{label}");
        }
    }

    #[test]
    fn error_messages_name_the_record_and_field() {
        let err = resolve(br#"[{"v": 1}, {"v": "abc"}]"#, now()).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("SenML record 1: field \"v\" must be a number")
        );
        let err = resolve(br#"{"v": 1}"#, now()).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("SenML payload must be a JSON array of records, not an object")
        );
    }

    #[test]
    fn now_keeps_its_nanoseconds() {
        let now = time::from_nanos(NOW_NS + 123_456_789);
        let got = resolve(br#"[{"v": 1}, {"v": 1, "t": 0.5}]"#, now).map(|r| {
            r.into_iter()
                .map(|r| time::to_nanos(&r.time))
                .collect::<Vec<_>>()
        });
        assert_eq!(got, Ok(vec![NOW_NS + 123_456_789, NOW_NS + 623_456_789]));
    }
}
