//! `/states/{id}` endpoint.

use axum::Json;
use axum::extract::{Path, State};

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Caller, PageQuery, Params, TwinPath};
use super::pages::StatesPage;

/// List a twin's states by id ascending.
#[utoipa::path(get, path = "/states/{id}", operation_id = "list_states", tag = "states",
    params(TwinPath, PageQuery),
    responses((status = 200, description = "A page of the twin's states", body = StatesPage),
        (status = 400, description = "Invalid page", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    Params(query): Params<PageQuery>,
) -> ApiResult<Json<StatesPage>> {
    let page = query.page()?;
    Ok(Json(
        app.twins.list_states(&who.id, &id, page).await?.into(),
    ))
}
