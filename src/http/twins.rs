//! `/twins` endpoints.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, JsonBody, PageQuery, Params, TwinPath};
use super::pages::TwinsPage;
use crate::domain::ValidationError;
use crate::domain::twin::{
    self, Attribute, DefinitionInput, Metadata, NewDefinition, Twin, TwinFilter, TwinName,
};
use crate::service::twins::{NewTwin, TwinUpdate};

/// Body of `POST /twins` and `PUT /twins/{id}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TwinRequest {
    /// At most 1024 bytes of UTF-8 (the schema can only count characters, and says 1024).
    #[serde(default)]
    #[schema(max_length = 1024)]
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

/// Body of `PUT /twins/{id}`: a [`TwinRequest`] that changes something. Its schema says
/// so (`anyOf` a non-empty name, non-empty metadata or a definition with attributes),
/// since a body the schema allows must not be refused with "nothing to update".
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct TwinUpdateRequest(pub TwinRequest);

impl utoipa::PartialSchema for TwinUpdateRequest {
    fn schema() -> RefOr<Schema> {
        let changes = |field: &str, schema: Schema| -> Schema {
            ObjectBuilder::new()
                .property(field, schema)
                .required(field)
                .into()
        };
        let attributes = ObjectBuilder::new()
            .property(
                "attributes",
                ArrayBuilder::new()
                    .items(Ref::from_schema_name(Attribute::name()))
                    .min_items(Some(1)),
            )
            .required("attributes")
            .build();
        let effective = AnyOfBuilder::new()
            .item(changes(
                "name",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .into(),
            ))
            .item(changes(
                "metadata",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .min_properties(Some(1))
                    .into(),
            ))
            .item(changes("definition", attributes.into()));
        AllOfBuilder::new()
            .item(Ref::from_schema_name(TwinRequest::name()))
            .item(effective)
            .into()
    }
}

impl ToSchema for TwinUpdateRequest {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((TwinRequest::name().into(), TwinRequest::schema()));
        TwinRequest::schemas(schemas);
    }
}

/// Filters of `GET /twins`, besides the page.
#[derive(Deserialize)]
pub struct TwinFilterQuery {
    name: Option<String>,
    metadata: Option<String>,
}

/// Written by hand because `metadata` is JSON in a query parameter, which the derive
/// cannot declare (`content: application/json` instead of a schema).
impl IntoParams for TwinFilterQuery {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ContentBuilder, Required};
        let name = ParameterBuilder::new()
            .name("name")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(
                "Exact twin name, at most 1024 bytes of UTF-8 (the schema counts characters)",
            ))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(twin::MAX_NAME_BYTES)),
            ))
            .build();
        let metadata = ParameterBuilder::new()
            .name("metadata")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some(
                "JSON object; every top-level key must match the twin's metadata",
            ))
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::Object)))
                    .build(),
            )
            .build();
        vec![name, metadata]
    }
}

fn parse_name(name: Option<String>) -> Result<TwinName, ValidationError> {
    TwinName::parse(name.unwrap_or_default())
}

fn parse_definition(d: Option<DefinitionInput>) -> Result<Option<NewDefinition>, ValidationError> {
    d.map(NewDefinition::parse).transpose()
}

/// Create a twin.
#[utoipa::path(post, path = "/twins", operation_id = "create_twin", tag = "twins", request_body = TwinRequest,
    responses(
        (status = 201, description = "Twin created", body = Twin,
            headers(("Location" = String, description = "/twins/<id>"))),
        (status = 400, description = "Malformed body or invalid twin", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
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
#[utoipa::path(get, path = "/twins", operation_id = "list_twins", tag = "twins", params(PageQuery, TwinFilterQuery),
    responses((status = 200, description = "A page of the caller's twins", body = TwinsPage),
        (status = 400, description = "Invalid page or filter", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Params(page): Params<PageQuery>,
    Params(query): Params<TwinFilterQuery>,
) -> ApiResult<Json<TwinsPage>> {
    let page = page.page()?;
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
#[utoipa::path(get, path = "/twins/{id}", operation_id = "view_twin", tag = "twins", params(TwinPath),
    responses((status = 200, description = "The twin", body = Twin),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn view(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
) -> ApiResult<Json<Twin>> {
    Ok(Json(app.twins.view(&who.id, &id).await?))
}

/// Update a twin: name and metadata replace, a definition with attributes is appended.
#[utoipa::path(put, path = "/twins/{id}", operation_id = "update_twin", tag = "twins", request_body = TwinUpdateRequest,
    params(TwinPath),
    responses((status = 200, description = "The updated twin", body = Twin),
        (status = 400, description = "Malformed body, invalid values or nothing to update",
            body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    JsonBody(TwinUpdateRequest(req)): JsonBody<TwinUpdateRequest>,
) -> ApiResult<Json<Twin>> {
    let update = TwinUpdate {
        name: req.name.map(|n| parse_name(Some(n))).transpose()?,
        definition: parse_definition(req.definition)?,
        metadata: req.metadata,
    };
    Ok(Json(app.twins.update(&who.id, &id, update).await?))
}

/// Delete a twin with its states. Missing or foreign twins are also answered with 204.
#[utoipa::path(delete, path = "/twins/{id}", operation_id = "remove_twin", tag = "twins", params(TwinPath),
    responses((status = 204, description = "Deleted, or nothing to delete"),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
) -> ApiResult<StatusCode> {
    app.twins.remove(&who.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
