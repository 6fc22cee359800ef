//! `/twins/{id}/documents` endpoints (SPEC section 7), with their history (section 11):
//! kept versions, a revision by version or time, and the diff of two revisions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header::{ETAG, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{
    Caller, DocumentPath, IfMatchHeader, JsonBody, PageQuery, Params, PatchBody, TwinPath,
};
use super::pages::VersionsPage;
use crate::domain::document::{Document, DocumentSummary};
use crate::service::VersionMismatch;
use crate::service::documents::{Access, AsOf, Change, DeltaView, RevisionDiff};

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

/// Query of `GET /twins/{id}/documents/{name}`: an earlier revision instead of the
/// current document (at most one of the two).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevisionQuery {
    /// The revision with this version.
    #[param(value_type = i64, required = false, minimum = 1)]
    version: Option<String>,
    /// The revision in force at this time (RFC 3339): the newest written at or before it.
    #[param(value_type = String, format = DateTime, required = false)]
    at: Option<String>,
}

/// Query of `GET /twins/{id}/documents/{name}/diff`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// The version to compare from. Optional in the type only so that its absence gets
    /// an error naming it.
    #[param(value_type = i64, required = true, minimum = 1)]
    from: Option<String>,
    /// The version to compare to (default: the current version).
    #[param(value_type = i64, required = false, minimum = 1)]
    to: Option<String>,
}

/// A version number of a query: a positive integer.
fn version_param(key: &str, value: &str) -> ApiResult<i64> {
    value
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            ApiError::BadRequest(format!("{key} must be a positive integer, got {value:?}"))
        })
}

/// A time of a query, in RFC 3339.
fn time_param(key: &str, value: &str) -> ApiResult<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.to_utc())
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{key} must be an RFC 3339 time such as 2026-01-02T03:04:05.123Z, got {value:?}"
            ))
        })
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

/// Read a document, or one of its kept revisions (`?version=` or `?at=`); `ETag`
/// carries the version served.
#[utoipa::path(get, path = "/twins/{id}/documents/{name}", operation_id = "get_document", tag = "documents",
    params(DocumentPath, RevisionQuery),
    responses((status = 200, description = "The document or the revision asked for", body = Document,
            headers(("ETag" = String, description = "The version, quoted"))),
        (status = 400, description = "Invalid document name, version or time, or both version and at", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document, version not kept, or no document at that time", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
    Params(query): Params<RevisionQuery>,
) -> ApiResult<(HeaderMap, Json<Document>)> {
    let as_of = match (query.version, query.at) {
        (None, None) => None,
        (Some(v), None) => Some(AsOf::Version(version_param("version", &v)?)),
        (None, Some(t)) => Some(AsOf::Time(time_param("at", &t)?)),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("give version or at, not both".into()));
        }
    };
    let access = Access::Owner(&who.id);
    let doc = match as_of {
        None => app.documents.get(access, &id, &name).await?,
        Some(as_of) => app.documents.revision(access, &id, &name, as_of).await?,
    };
    Ok((with_etag(&doc), Json(doc)))
}

/// The document's kept versions, newest first: when, how and by whom each was written.
#[utoipa::path(get, path = "/twins/{id}/documents/{name}/versions", operation_id = "list_document_versions", tag = "documents",
    params(DocumentPath, PageQuery),
    responses((status = 200, description = "A page of the kept versions", body = VersionsPage),
        (status = 400, description = "Invalid document name or page", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn versions(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
    Params(query): Params<PageQuery>,
) -> ApiResult<Json<VersionsPage>> {
    let page = query.page()?;
    Ok(Json(
        app.documents
            .versions(Access::Owner(&who.id), &id, &name, page)
            .await?
            .into(),
    ))
}

/// What changed from one kept revision to another, as an RFC 6902 JSON Patch and an
/// RFC 7396 merge patch of the data.
#[utoipa::path(get, path = "/twins/{id}/documents/{name}/diff", operation_id = "diff_document_versions", tag = "documents",
    params(DocumentPath, DiffQuery),
    responses((status = 200, description = "The patches from one revision to the other", body = RevisionDiff),
        (status = 400, description = "Invalid document name or version", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin or document, or version not kept", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn diff(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(DocumentPath { id, name }): Path<DocumentPath>,
    Params(query): Params<DiffQuery>,
) -> ApiResult<Json<RevisionDiff>> {
    let from = query
        .from
        .ok_or_else(|| ApiError::BadRequest("query parameter from is required".into()))?;
    let from = version_param("from", &from)?;
    let to = query.to.map(|v| version_param("to", &v)).transpose()?;
    Ok(Json(
        app.documents
            .diff(Access::Owner(&who.id), &id, &name, from, to)
            .await?,
    ))
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
