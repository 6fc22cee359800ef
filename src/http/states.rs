//! `/states/{id}` endpoint.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Caller, QueryMap};
use crate::domain::StatesPage;

/// Query of `GET /states/{id}`.
#[derive(Deserialize, IntoParams)]
#[allow(dead_code)]
pub struct ListStatesQuery {
    /// States to skip (default 0).
    offset: Option<u64>,
    /// Page size, 1 to 100 (default 10).
    limit: Option<u64>,
}

/// List a twin's states by id ascending.
#[utoipa::path(get, path = "/states/{id}", tag = "states",
    params(("id" = String, Path, description = "Twin id (UUID)"), ListStatesQuery),
    responses((status = 200, body = StatesPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    query: QueryMap,
) -> ApiResult<Json<StatesPage>> {
    let page = query.page()?;
    Ok(Json(
        app.twins.list_states(&who.id, &id, page).await?.into(),
    ))
}
