//! Twins, their append-only definitions and the attributes that bind them to channels.
//!
//! Input is parsed into values that cannot be invalid ([`TwinName`], [`NewDefinition`]),
//! so the service and the stores never re-check it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::{ValidationError, time};

/// Delta used when a definition gives none or gives 0: one millisecond, in nanoseconds.
pub const DEFAULT_DELTA: i64 = 1_000_000;
/// Longest accepted twin name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Subtopic of an attribute that matches every subtopic of its channel.
pub const WILDCARD_SUBTOPIC: &str = ">";

/// A JSON object of free-form data attached to a twin.
pub type Metadata = Map<String, Value>;

/// Filters of a twin listing besides the owner.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinFilter {
    /// Exact name.
    pub name: Option<String>,
    /// Every top-level key must be present with an equal value.
    pub metadata: Option<Metadata>,
}

/// An attribute binds a named value of the twin to a channel and subtopic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attribute {
    /// Unique within its definition.
    #[schema(min_length = 1)]
    pub name: String,
    #[schema(min_length = 1)]
    pub channel: String,
    #[serde(default)]
    pub subtopic: String,
    #[serde(default)]
    pub persist_state: bool,
    /// The SenML record (its resolved name, `bn` + `n`) this attribute takes its value
    /// from; absent, every record of a matching message gives it a value (as in the Go
    /// service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 1024)]
    pub record: Option<String>,
}

impl Attribute {
    /// Whether a message on `channel`/`subtopic` carries this attribute's value.
    pub fn matches(&self, channel: &str, subtopic: &str) -> bool {
        self.channel == channel && (self.subtopic == subtopic || self.subtopic == WILDCARD_SUBTOPIC)
    }

    /// Whether the SenML record named `record` (resolved: `bn` + `n`) gives this
    /// attribute its value.
    pub fn takes(&self, record: &str) -> bool {
        self.record.as_deref().is_none_or(|r| r == record)
    }
}

/// One entry of a twin's append-only list of definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Definition {
    pub id: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created: DateTime<Utc>,
    pub attributes: Vec<Attribute>,
    /// Sampling window in nanoseconds.
    pub delta: i64,
}

/// A digital twin as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Twin {
    pub owner: String,
    pub id: String,
    pub name: String,
    pub revision: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created: DateTime<Utc>,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated: DateTime<Utc>,
    pub definitions: Vec<Definition>,
    #[schema(value_type = Object)]
    #[serde(serialize_with = "super::json::serialize_object")]
    pub metadata: Metadata,
}

impl Twin {
    /// The current (last) definition. Every twin has at least one.
    pub fn current_definition(&self) -> Option<&Definition> {
        self.definitions.last()
    }
}

/// A twin name of at most [`MAX_NAME_BYTES`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinName(String);

impl TwinName {
    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        if raw.len() > MAX_NAME_BYTES {
            return Err(ValidationError::new(format!(
                "name is longer than {MAX_NAME_BYTES} bytes"
            )));
        }
        Ok(Self(raw))
    }

    pub fn into_inner(self) -> String {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A definition as a client sends it, before validation.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DefinitionInput {
    /// Attribute names are unique within a definition (not expressible in the schema).
    #[serde(default, deserialize_with = "json_object::list")]
    pub attributes: Vec<Attribute>,
    /// Sampling window in nanoseconds; 0 or absent means 1 ms.
    #[serde(default, deserialize_with = "super::json::whole_i64")]
    #[schema(minimum = 0)]
    pub delta: i64,
}

/// serde adapters for client input that take a struct only from a JSON object: derived
/// `Deserialize` implementations also accept an array of the field values in order,
/// which a client's `[]` must never be taken for.
pub mod json_object {
    use serde::Deserialize;
    use serde::de::{DeserializeOwned, Deserializer, Error};
    use serde_json::{Map, Value};

    fn from_map<T: DeserializeOwned, E: Error>(map: Map<String, Value>) -> Result<T, E> {
        serde_json::from_value(Value::Object(map)).map_err(E::custom)
    }

    /// An optional struct; `null` is `None`.
    pub fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        Option::<Map<String, Value>>::deserialize(d)?
            .map(from_map)
            .transpose()
    }

    /// A list of structs.
    pub fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        Vec::<Map<String, Value>>::deserialize(d)?
            .into_iter()
            .map(from_map)
            .collect()
    }
}

/// A validated definition that has not yet been given its id and creation time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDefinition {
    attributes: Vec<Attribute>,
    delta: i64,
}

impl NewDefinition {
    /// Checks attribute names and channels are non-empty, names are unique and `delta`
    /// is not negative; a `delta` of 0 becomes [`DEFAULT_DELTA`].
    pub fn parse(input: DefinitionInput) -> Result<Self, ValidationError> {
        if input.delta < 0 {
            return Err(ValidationError::new("delta must not be negative"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in input.attributes.iter().enumerate() {
            if a.name.is_empty() {
                return Err(ValidationError::new(format!(
                    "attribute {i} has an empty name"
                )));
            }
            if a.channel.is_empty() {
                return Err(ValidationError::new(format!(
                    "attribute {:?} has an empty channel",
                    a.name
                )));
            }
            if let Some(r) = &a.record
                && (r.is_empty() || r.len() > MAX_NAME_BYTES)
            {
                return Err(ValidationError::new(format!(
                    "attribute {:?}: record must be 1 to {MAX_NAME_BYTES} bytes",
                    a.name
                )));
            }
            if !seen.insert(a.name.as_str()) {
                return Err(ValidationError::new(format!(
                    "attribute name {:?} is used more than once",
                    a.name
                )));
            }
        }
        let delta = if input.delta == 0 {
            DEFAULT_DELTA
        } else {
            input.delta
        };
        Ok(Self {
            attributes: input.attributes,
            delta,
        })
    }

    /// The definition a twin gets when it is created without one.
    pub fn empty() -> Self {
        Self {
            attributes: Vec::new(),
            delta: DEFAULT_DELTA,
        }
    }

    pub fn has_attributes(&self) -> bool {
        !self.attributes.is_empty()
    }

    pub fn into_definition(self, id: i64, created: DateTime<Utc>) -> Definition {
        Definition {
            id,
            created,
            attributes: self.attributes,
            delta: self.delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(name: &str, channel: &str) -> Attribute {
        Attribute {
            name: name.into(),
            channel: channel.into(),
            subtopic: String::new(),
            persist_state: true,
            record: None,
        }
    }

    #[test]
    fn definition_validation_table() {
        let cases: Vec<(&str, DefinitionInput, Result<i64, &str>)> = vec![
            (
                "empty is valid",
                DefinitionInput::default(),
                Ok(DEFAULT_DELTA),
            ),
            (
                "zero delta becomes one millisecond",
                DefinitionInput {
                    attributes: vec![attr("a", "c")],
                    delta: 0,
                },
                Ok(DEFAULT_DELTA),
            ),
            (
                "explicit delta is kept",
                DefinitionInput {
                    attributes: vec![attr("a", "c")],
                    delta: 5,
                },
                Ok(5),
            ),
            (
                "negative delta",
                DefinitionInput {
                    attributes: vec![],
                    delta: -1,
                },
                Err("negative"),
            ),
            (
                "empty attribute name",
                DefinitionInput {
                    attributes: vec![attr("", "c")],
                    delta: 0,
                },
                Err("empty name"),
            ),
            (
                "empty channel",
                DefinitionInput {
                    attributes: vec![attr("a", "")],
                    delta: 0,
                },
                Err("empty channel"),
            ),
            (
                "duplicate attribute names",
                DefinitionInput {
                    attributes: vec![attr("a", "c"), attr("a", "d")],
                    delta: 0,
                },
                Err("more than once"),
            ),
            (
                "empty record",
                DefinitionInput {
                    attributes: vec![Attribute {
                        record: Some(String::new()),
                        ..attr("a", "c")
                    }],
                    delta: 0,
                },
                Err("record must be 1 to 1024 bytes"),
            ),
            (
                "record too long",
                DefinitionInput {
                    attributes: vec![Attribute {
                        record: Some("r".repeat(MAX_NAME_BYTES + 1)),
                        ..attr("a", "c")
                    }],
                    delta: 0,
                },
                Err("record must be"),
            ),
            (
                "a record is kept",
                DefinitionInput {
                    attributes: vec![Attribute {
                        record: Some("room/temperature".into()),
                        ..attr("a", "c")
                    }],
                    delta: 5,
                },
                Ok(5),
            ),
        ];
        for (label, input, want) in cases {
            match (NewDefinition::parse(input), want) {
                (Ok(d), Ok(delta)) => assert_eq!(d.delta, delta, "{label}"),
                (Err(e), Err(fragment)) => {
                    assert!(e.to_string().contains(fragment), "{label}: {e}")
                }
                (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn definition_delta_may_be_written_as_a_whole_number_float() {
        let input: DefinitionInput =
            serde_json::from_value(serde_json::json!({"delta": 263.0})).expect("an integer");
        assert_eq!(input.delta, 263);
        assert!(
            serde_json::from_value::<DefinitionInput>(serde_json::json!({"delta": 263.5})).is_err()
        );
    }

    #[test]
    fn name_limit_is_in_bytes() {
        assert!(TwinName::parse("a".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(TwinName::parse("a".repeat(MAX_NAME_BYTES + 1)).is_err());
        // 342 three-byte characters are 1026 bytes.
        assert!(TwinName::parse("€".repeat(342)).is_err());
    }

    #[test]
    fn wildcard_subtopic_matches_any_subtopic_of_its_channel() {
        let mut a = attr("a", "c");
        a.subtopic = WILDCARD_SUBTOPIC.into();
        assert!(a.matches("c", "engine"));
        assert!(a.matches("c", ""));
        assert!(!a.matches("d", "engine"));
        let exact = Attribute {
            subtopic: "engine".into(),
            ..attr("a", "c")
        };
        assert!(exact.matches("c", "engine"));
        assert!(!exact.matches("c", "chassis"));
    }
}
