//! Numbers of free-form JSON (metadata, state payloads, document data) as the Go service
//! wrote them.
//!
//! The Go service decoded every such number into a float64, and `encoding/json` writes an
//! integral float64 without a fraction: `3`, not `3.0`. Its MongoDB data holds them as
//! doubles, and its clients may decode them into integer types. So an integral number is
//! served as an integer whatever type it is stored with; stores keep what they were given
//! (a metadata filter compares numbers by value either way).
//!
//! The other way round, an integer field of client input takes any whole number, `263.0`
//! included: JSON Schema (and so the OpenAPI document) counts it an integer, and a client
//! that decoded numbers into floats, as the Go service did, writes it back that way.

use serde::de::{Deserializer, Error};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Number, Value};

/// 2^63 and 2^64, exactly representable as f64.
const I64_END: f64 = 9_223_372_036_854_775_808.0;
const U64_END: f64 = 18_446_744_073_709_551_616.0;

/// `x` as a JSON integer when it is integral and an i64 or u64 holds it exactly.
pub fn integer(x: f64) -> Option<Value> {
    if x.fract() != 0.0 || !x.is_finite() {
        return None;
    }
    if (-I64_END..I64_END).contains(&x) {
        // Exact: an integral f64 in range converts without rounding.
        Some(Value::from(x as i64))
    } else if (0.0..U64_END).contains(&x) {
        Some(Value::from(x as u64))
    } else {
        None
    }
}

/// An i64 from any JSON number with that whole value (`#[serde(deserialize_with = ...)]`).
pub fn whole_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = Number::deserialize(d)?;
    n.as_i64()
        .or_else(|| n.as_f64().and_then(integer).and_then(|v| v.as_i64()))
        .ok_or_else(|| D::Error::custom(format!("expected a whole number in i64 range, got {n}")))
}

/// [`whole_i64`] of an optional field; `null` is `None`.
pub fn optional_whole_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_i64")] i64);
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(n)| n))
}

/// Serializes a JSON object with every integral number written as an integer
/// (`#[serde(serialize_with = ...)]` on free-form fields).
pub fn serialize_object<S: Serializer>(m: &Map<String, Value>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(m.iter().map(|(k, v)| (k, GoNumbers(v))))
}

/// A JSON value serialized with integral numbers as integers.
struct GoNumbers<'a>(&'a Value);

impl Serialize for GoNumbers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Number(n) if n.is_f64() => match n.as_f64().and_then(integer) {
                Some(i) => i.serialize(s),
                None => n.serialize(s),
            },
            Value::Array(items) => s.collect_seq(items.iter().map(GoNumbers)),
            Value::Object(m) => serialize_object(m, s),
            other => other.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Serialize)]
    struct Holder {
        #[serde(serialize_with = "serialize_object")]
        data: Map<String, Value>,
    }

    fn served(v: Value) -> String {
        let data = v.as_object().cloned().expect("an object");
        serde_json::to_string(&Holder { data }).expect("serializes")
    }

    #[test]
    fn integral_floats_are_written_as_go_wrote_them() {
        assert_eq!(
            served(json!({"a": 3.0, "b": 72.0, "c": -4.0, "d": 0.5, "e": 7, "f": "3.0"})),
            r#"{"data":{"a":3,"b":72,"c":-4,"d":0.5,"e":7,"f":"3.0"}}"#
        );
    }

    #[test]
    fn nested_values_too() {
        assert_eq!(
            served(json!({"a": [1.0, [2.0, {"b": 3.0}], 2.5], "o": {"x": {"y": 10.0}}})),
            r#"{"data":{"a":[1,[2,{"b":3}],2.5],"o":{"x":{"y":10}}}}"#
        );
    }

    #[derive(Debug, Deserialize)]
    struct Input {
        #[serde(default, deserialize_with = "whole_i64")]
        n: i64,
        #[serde(default, deserialize_with = "optional_whole_i64")]
        o: Option<i64>,
    }

    fn read(v: Value) -> Result<(i64, Option<i64>), String> {
        serde_json::from_value::<Input>(v)
            .map(|i| (i.n, i.o))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integer_fields_take_whole_number_floats() {
        for (label, input, want) in [
            ("integer", json!({"n": 263, "o": 4}), (263, Some(4))),
            ("whole float", json!({"n": 263.0, "o": 4.0}), (263, Some(4))),
            ("negative whole float", json!({"n": -2.0}), (-2, None)),
            ("zero float", json!({"n": 0.0, "o": null}), (0, None)),
            ("absent", json!({}), (0, None)),
            (
                "largest",
                json!({"n": i64::MAX, "o": i64::MIN}),
                (i64::MAX, Some(i64::MIN)),
            ),
        ] {
            assert_eq!(read(input), Ok(want), "{label}");
        }
    }

    #[test]
    fn integer_fields_refuse_fractions_and_out_of_range_numbers() {
        for (label, input) in [
            ("fraction", json!({"n": 263.5})),
            ("optional fraction", json!({"o": 0.25})),
            ("beyond i64 as integer", json!({"n": u64::MAX})),
            ("beyond i64 as float", json!({"n": 1e19})),
            ("string", json!({"n": "3"})),
        ] {
            assert!(read(input).is_err(), "{label}");
        }
    }

    #[test]
    fn integers_beyond_64_bits_stay_floats() {
        assert_eq!(integer(1e18), Some(json!(1_000_000_000_000_000_000_i64)));
        assert_eq!(integer(-I64_END), Some(json!(i64::MIN)));
        assert_eq!(integer(1e19), Some(json!(10_000_000_000_000_000_000_u64)));
        assert_eq!(integer(U64_END), None);
        assert_eq!(integer(-1e19), None);
        assert_eq!(integer(f64::INFINITY), None);
        assert_eq!(integer(f64::NAN), None);
        assert_eq!(served(json!({"big": 1e20})), r#"{"data":{"big":1e+20}}"#);
    }
}
