//! Request extractors that turn malformed requests into the right 4xx JSON error.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, Identity};
use crate::domain::{DEFAULT_LIMIT, PageRequest};

/// The authenticated caller, from `Authorization: Bearer <token>`.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Unauthenticated)?;
        Ok(Self(state.auth.identify(token).await?))
    }
}

/// A JSON request body: 415 unless the content type is JSON, 413 over the body limit,
/// 400 when empty, not a JSON object or not the expected shape.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_object(req, state, &["application/json"])
            .await
            .map(Self)
    }
}

/// A JSON merge patch body (RFC 7396): like [`JsonBody`], also accepting
/// `application/merge-patch+json`.
pub struct PatchBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for PatchBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read_object(
            req,
            state,
            &["application/json", "application/merge-patch+json"],
        )
        .await
        .map(Self)
    }
}

/// Reads a body that must be a JSON object of one of the `accepted` media types.
async fn read_object<T: DeserializeOwned>(
    req: Request,
    state: &AppState,
    accepted: &'static [&'static str],
) -> Result<T, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if !accepted.iter().any(|a| content_type.contains(a)) {
        return Err(ApiError::UnsupportedMediaType(accepted.join(" or ")));
    }
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(format!("cannot read request body: {e}"))
        }
    })?;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ApiError::BadRequest("request body is empty".into())),
        // Derived struct deserializers also accept arrays; every body is an object.
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError::BadRequest(
                "request body must be a JSON object".into(),
            ));
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

/// Query parameters read into `T`; an undecodable query string is a 400. Numbers are
/// read as text by the query types, so a bad number gets a message naming the parameter.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| ApiError::BadRequest(format!("malformed query: {e}")))
    }
}

/// Where a listing's page starts and how long it is. The bounds in the document are
/// those [`PageRequest::new`] enforces (`MAX_LIMIT`, `i64::MAX`); a unit test of the
/// document keeps them equal, as attribute values must be literals.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items to skip (default 0).
    #[param(value_type = u64, required = false, minimum = 0, maximum = 9223372036854775807_i64)]
    pub offset: Option<String>,
    /// Page size (default 10).
    #[param(value_type = u64, required = false, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
}

impl PageQuery {
    /// `offset` (>= 0, default 0) and `limit` (1..=100, default 10).
    pub fn page(&self) -> Result<PageRequest, ApiError> {
        let offset = number("offset", self.offset.as_deref(), 0)?;
        let limit = number("limit", self.limit.as_deref(), DEFAULT_LIMIT)?;
        Ok(PageRequest::new(offset, limit)?)
    }
}

fn number(key: &str, value: Option<&str>, default: u64) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            ApiError::BadRequest(format!("{key} must be a non-negative integer, got {v:?}"))
        }),
    }
}

/// The twin of a path such as `/twins/{id}`. Ids are UUIDs, but any text is accepted:
/// one that is not a UUID names no twin (404, or 204 on delete), so no format is declared.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TwinPath {
    /// Twin id (a UUID).
    pub id: String,
}

/// A document of a twin, `/twins/{id}/documents/{name}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DocumentPath {
    /// Twin id (a UUID).
    pub id: String,
    /// Document name (`DocumentName` parses it; the pattern is its rule).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
}

/// `If-Match` of a conditional document write, read by the handlers from the headers;
/// declared here so the document says which values are accepted.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatchHeader {
    /// Expected version: `"3"`, `W/"3"` or `3` (the `IF_MATCH_PATTERN` of the handlers).
    #[param(rename = "If-Match", value_type = String, required = false,
        pattern = r#"^(W/)?("[0-9]{1,18}"|[0-9]{1,18})$"#)]
    pub if_match: Option<String>,
}
