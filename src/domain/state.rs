//! States: the time series a twin builds from incoming messages.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::time;

/// Attribute name to the last value received for it.
pub type Payload = Map<String, Value>;

/// One sample of a twin's attributes. `id` is a zero-based sequence per twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct State {
    pub twin_id: String,
    pub id: i64,
    /// Id of the twin definition the state was built with.
    pub definition: i64,
    #[serde(with = "time::serde_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created: DateTime<Utc>,
    #[schema(value_type = Object)]
    #[serde(serialize_with = "super::json::serialize_object")]
    pub payload: Payload,
}
