//! `/twins/{id}/documents` endpoints (SPEC section 7).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::{ETAG, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Caller, DocumentPath, IfMatchHeader, JsonBody, Params, PatchBody, TwinPath};
use crate::domain::document::{Document, DocumentSummary};
use crate::service::VersionMismatch;
use crate::service::documents::{Access, Change, DeltaView};

/// Body of `PUT` and `PATCH`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct DocumentRequest {
    /// Write only if this is the stored version (0: only if the document is absent).
    #[serde(default, deserialize_with = "crate::domain::json::optional_whole_i64")]
    #[schema(minimum = 0)]
    pub version: Option<i64>,
    /// New data (`PUT`) or a JSON merge patch (`PATCH`).
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
}

/// Body of `GET /twins/{id}/documents`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentList {
    pub documents: Vec<DocumentSummary>,
}

/// Query of `DELETE /twins/{id}/documents/{name}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete only at this version.
    #[param(value_type = i64, required = false, minimum = 0)]
    version: Option<String>,
}

/// Query of `GET /twins/{id}/documents/{name}/delta`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeltaQuery {
    /// Name of the document to compare with. Optional in the type only so that its
    /// absence gets an error naming it.
    #[param(required = true, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    against: Option<String>,
}

/// `If-Match` of a conditional write: `"3"`, `W/"3"` or `3`. Exactly the header
/// parameter's pattern, so what the document allows is accepted and the rest is a 400.
pub const IF_MATCH_PATTERN: &str = r#"^(W/)?("[0-9]{1,18}"|[0-9]{1,18})$"#;

/// The version of an `If-Match` header, in the form of [`IF_MATCH_PATTERN`].
fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(raw) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .map(|v| v.strip_prefix("W/").unwrap_or(v))
        .map(|v| {
            v.strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or(v)
        })
        // 18 digits always fit an i64.
        .filter(|d| (1..=18).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::BadRequest("If-Match must be a document version, e.g. \"3\"".into())
        })
}

/// The version a write is conditional on, from the body or `If-Match` (which must agree).
fn expected_version(headers: &HeaderMap, body: Option<i64>) -> ApiResult<Option<i64>> {
    match (if_match(headers)?, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::BadRequest(format!(
            "If-Match version {h} disagrees with body version {b}"
        ))),
        (h, b) => Ok(h.or(b)),
    }
}

fn with_etag(doc: &Document) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", doc.version)) {
        headers.insert(ETAG, v);
    }
    headers
}

/// List a twin's documents.
#[utoipa::path(get, path = "/twins/{id}/documents", operation_id = "list_documents", tag = "documents",
    params(TwinPath),
    responses((status = 200, description = "The twin's documents", body = DocumentList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
) -> ApiResult<Json<DocumentList>> {
    let documents = app.documents.list(Access::Owner(&who.id), &id).await?;
    Ok(Json(DocumentList { documents }))
}

/// Read a document; `ETag` carries its version.
#[utoipa::path(get, path = "/twins/{id}/documents/{name}", operation_id = "get_document", tag = "documents",
    params(DocumentPath),
    responses((status = 200, description = "The document", body = Document,
            headers(("ETag" = String, description = "The version, quoted"))),
        (status = 400, description = "Invalid document name", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
) -> ApiResult<(HeaderMap, Json<Document>)> {
    let doc = app
        .documents
        .get(Access::Owner(&who.id), &id, &name)
        .await?;
    Ok((with_etag(&doc), Json(doc)))
}

async fn write(
    app: &AppState,
    owner: &str,
    (id, name): (String, String),
    headers: &HeaderMap,
    change: Change,
    body_version: Option<i64>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Document>)> {
    let version = expected_version(headers, body_version)?;
    let (doc, created) = app
        .documents
        .write(Access::Owner(owner), &id, &name, change, version)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, with_etag(&doc), Json(doc)))
}

/// `PUT` and `PATCH` differ only in what the body means and in the media types it may
/// have; everything else is written once here.
macro_rules! write_handler {
    ($(#[$doc:meta])* $name:ident, $method:ident, $operation:literal, $change:path, $body:ident,
        content($($content:tt)*)) => {
        $(#[$doc])*
        #[utoipa::path($method, path = "/twins/{id}/documents/{name}", operation_id = $operation, tag = "documents",
            request_body(content($($content)*)),
            params(DocumentPath, IfMatchHeader),
            responses(
                (status = 200, description = "Written", body = Document,
                    headers(("ETag" = String, description = "The new version, quoted"))),
                (status = 201, description = "Created", body = Document,
                    headers(("ETag" = String, description = "The new version, quoted"))),
                (status = 400, description = "Malformed body, name or If-Match", body = ErrorBody),
                (status = 401, description = "Missing or invalid token", body = ErrorBody),
                (status = 404, description = "No such twin of the caller", body = ErrorBody),
                (status = 409, description = "Version mismatch", body = VersionMismatch),
                (status = 413, description = "Body over the size limit", body = ErrorBody),
                (status = 415, description = "Body is not JSON", body = ErrorBody),
                (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
            security(("bearer" = [])))]
        pub async fn $name(
            State(app): State<AppState>,
            Caller(who): Caller,
            Path(DocumentPath { id, name }): Path<DocumentPath>,
            headers: HeaderMap,
            $body(req): $body<DocumentRequest>,
        ) -> ApiResult<(StatusCode, HeaderMap, Json<Document>)> {
            write(&app, &who.id, (id, name), &headers, $change(req.data), req.version).await
        }
    };
}

write_handler!(
    /// Replace a document's data (creating it with version 1 when absent).
    put, put, "put_document", Change::Put, JsonBody,
    content((DocumentRequest = "application/json"))
);

write_handler!(
    /// Merge-patch a document's data (RFC 7396; creating it from `{}` when absent).
    patch, patch, "patch_document", Change::Patch, PatchBody,
    content((DocumentRequest = "application/merge-patch+json"), (DocumentRequest = "application/json"))
);

/// Delete a document, optionally only at a given version (`?version=` or `If-Match`).
#[utoipa::path(delete, path = "/twins/{id}/documents/{name}", operation_id = "delete_document", tag = "documents",
    params(DocumentPath, IfMatchHeader, DeleteQuery),
    responses((status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name, version or If-Match", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document", body = ErrorBody),
        (status = 409, description = "Version mismatch", body = VersionMismatch),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
    headers: HeaderMap,
    Params(query): Params<DeleteQuery>,
) -> ApiResult<StatusCode> {
    let query_version = query
        .version
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::BadRequest(format!("version must be an integer, got {v:?}")))
        })
        .transpose()?;
    let version = expected_version(&headers, query_version)?;
    app.documents
        .delete(Access::Owner(&who.id), &id, &name, version)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What differs between this document and another of the same twin, key by key.
#[utoipa::path(get, path = "/twins/{id}/documents/{name}/delta", operation_id = "document_delta", tag = "documents",
    params(DocumentPath, DeltaQuery),
    responses((status = 200, description = "What differs, key by key", body = DeltaView),
        (status = 400, description = "Invalid or missing document name", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delta(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
    Params(query): Params<DeltaQuery>,
) -> ApiResult<Json<DeltaView>> {
    let against = query
        .against
        .ok_or_else(|| ApiError::BadRequest("query parameter against is required".into()))?;
    Ok(Json(
        app.documents
            .delta(Access::Owner(&who.id), &id, &name, &against)
            .await?,
    ))
}
