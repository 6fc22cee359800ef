//! `/twins` endpoints.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, JsonBody, Params, page};
use super::pages::TwinsPage;
use crate::domain::ValidationError;
use crate::domain::twin::{DefinitionInput, Metadata, NewDefinition, Twin, TwinFilter, TwinName};
use crate::service::twins::{NewTwin, TwinUpdate};

/// Body of `POST /twins` and `PUT /twins/{id}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TwinRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "crate::domain::twin::json_object::optional"
    )]
    pub definition: Option<DefinitionInput>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Metadata>,
}

/// Query of `GET /twins`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListTwinsQuery {
    /// Items to skip (default 0).
    #[param(value_type = Option<u64>)]
    offset: Option<String>,
    /// Page size, 1 to 100 (default 10).
    #[param(value_type = Option<u64>)]
    limit: Option<String>,
    /// Exact twin name.
    name: Option<String>,
    /// JSON object; every top-level key must match the twin's metadata.
    metadata: Option<String>,
}

fn parse_name(name: Option<String>) -> Result<TwinName, ValidationError> {
    TwinName::parse(name.unwrap_or_default())
}

fn parse_definition(d: Option<DefinitionInput>) -> Result<Option<NewDefinition>, ValidationError> {
    d.map(NewDefinition::parse).transpose()
}

/// Create a twin.
#[utoipa::path(post, path = "/twins", tag = "twins", request_body = TwinRequest,
    responses(
        (status = 201, description = "Twin created", body = Twin,
            headers(("Location" = String, description = "/twins/<id>"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    Caller(who): Caller,
    JsonBody(req): JsonBody<TwinRequest>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Twin>)> {
    let name = parse_name(req.name)?;
    let definition = parse_definition(req.definition)?;
    let new = NewTwin::new(name, definition, req.metadata);
    let twin = app.twins.create(&who.id, new).await?;
    let mut headers = HeaderMap::new();
    let location = HeaderValue::from_str(&format!("/twins/{}", twin.id))
        .map_err(|e| ApiError::Service(crate::service::ServiceError::Internal(e.into())))?;
    headers.insert(LOCATION, location);
    Ok((StatusCode::CREATED, headers, Json(twin)))
}

/// List the caller's twins.
#[utoipa::path(get, path = "/twins", tag = "twins", params(ListTwinsQuery),
    responses((status = 200, body = TwinsPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Params(query): Params<ListTwinsQuery>,
) -> ApiResult<Json<TwinsPage>> {
    let page = page(query.offset.as_deref(), query.limit.as_deref())?;
    let name = query
        .name
        .map(|n| parse_name(Some(n)).map(TwinName::into_inner))
        .transpose()?;
    let metadata = query
        .metadata
        .map(|m| {
            serde_json::from_str::<Metadata>(&m)
                .map_err(|e| ApiError::BadRequest(format!("metadata must be a JSON object: {e}")))
        })
        .transpose()?;
    let filter = TwinFilter { name, metadata };
    let page = app.twins.list(&who.id, &filter, page).await?;
    Ok(Json(page.into()))
}

/// View one twin.
#[utoipa::path(get, path = "/twins/{id}", tag = "twins",
    params(("id" = String, Path, description = "Twin id (UUID)")),
    responses((status = 200, body = Twin), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn view(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Twin>> {
    Ok(Json(app.twins.view(&who.id, &id).await?))
}

/// Update a twin: name and metadata replace, a definition with attributes is appended.
#[utoipa::path(put, path = "/twins/{id}", tag = "twins", request_body = TwinRequest,
    params(("id" = String, Path, description = "Twin id (UUID)")),
    responses((status = 200, body = Twin), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<TwinRequest>,
) -> ApiResult<Json<Twin>> {
    let update = TwinUpdate {
        name: req.name.map(|n| parse_name(Some(n))).transpose()?,
        definition: parse_definition(req.definition)?,
        metadata: req.metadata,
    };
    Ok(Json(app.twins.update(&who.id, &id, update).await?))
}

/// Delete a twin with its states. Missing or foreign twins are also answered with 204.
#[utoipa::path(delete, path = "/twins/{id}", tag = "twins",
    params(("id" = String, Path, description = "Twin id (UUID)")),
    responses((status = 204, description = "Deleted, or nothing to delete"),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    app.twins.remove(&who.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
