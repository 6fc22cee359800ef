//! `/states/{id}` endpoint.

use axum::Json;
use axum::extract::{Path, State};

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Caller, PageQuery, Params};
use super::pages::StatesPage;

/// List a twin's states by id ascending.
#[utoipa::path(get, path = "/states/{id}", tag = "states",
    params(("id" = String, Path, description = "Twin id (UUID)"), PageQuery),
    responses((status = 200, body = StatesPage), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Params(query): Params<PageQuery>,
) -> ApiResult<Json<StatesPage>> {
    let page = query.page()?;
    Ok(Json(
        app.twins.list_states(&who.id, &id, page).await?.into(),
    ))
}
