//! `/states/{id}` and the history endpoints under `/twins/{id}/states`.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Caller, PageQuery, Params, TwinPath};
use super::pages::StatesPage;
use crate::domain::history::{StateDiff, StateInForce, Window, WindowSummary, parse_time};

/// An optional window of time, `from <= created <= to`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WindowQuery {
    /// Earliest `created` included (RFC 3339); open when absent.
    #[param(value_type = Option<String>, format = DateTime, required = false)]
    pub from: Option<String>,
    /// Latest `created` included (RFC 3339); open when absent.
    #[param(value_type = Option<String>, format = DateTime, required = false)]
    pub to: Option<String>,
}

impl WindowQuery {
    /// The window; 400 on a time that is not RFC 3339 or bounds out of order.
    pub fn window(&self) -> ApiResult<Window> {
        let time = |param: &str, raw: &Option<String>| {
            raw.as_deref().map(|v| parse_time(param, v)).transpose()
        };
        Ok(Window::new(
            time("from", &self.from)?,
            time("to", &self.to)?,
        )?)
    }
}

/// The instant of `GET /twins/{id}/states/at`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AtQuery {
    /// The instant (RFC 3339).
    #[param(value_type = String, format = DateTime)]
    pub time: String,
}

/// The two instants of `GET /twins/{id}/states/diff`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// The earlier instant (RFC 3339).
    #[param(value_type = String, format = DateTime)]
    pub from: String,
    /// The later instant (RFC 3339), not before `from`.
    #[param(value_type = String, format = DateTime)]
    pub to: String,
}

/// List a twin's states: by id ascending, or with `from` and/or `to` the states created
/// in that window, by `created` then id.
#[utoipa::path(get, path = "/states/{id}", operation_id = "list_states", tag = "states",
    params(TwinPath, PageQuery, WindowQuery),
    responses((status = 200, description = "A page of the twin's states; `total` counts the window", body = StatesPage),
        (status = 400, description = "Invalid page or time, or from later than to", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    Params(query): Params<PageQuery>,
    Params(window): Params<WindowQuery>,
) -> ApiResult<Json<StatesPage>> {
    let page = query.page()?;
    let window = window.window()?;
    let states = if window.is_unbounded() {
        app.twins.list_states(&who.id, &id, page).await?
    } else {
        app.history.range(&who.id, &id, window, page).await?
    };
    Ok(Json(states.into()))
}

/// The state in force at an instant: the one with the greatest `created` not after it
/// (ties: the greatest id), with the definition it was built with.
#[utoipa::path(get, path = "/twins/{id}/states/at", operation_id = "state_at", tag = "states",
    params(TwinPath, AtQuery),
    responses((status = 200, description = "The state in force", body = StateInForce),
        (status = 400, description = "Missing or invalid time", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller, or no state at that time", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn at(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    Params(query): Params<AtQuery>,
) -> ApiResult<Json<StateInForce>> {
    let at = parse_time("time", &query.time)?;
    Ok(Json(app.history.at(&who.id, &id, at).await?))
}

/// What changed between the states in force at two instants: each differing attribute
/// and an RFC 6902 patch from the first payload to the second.
#[utoipa::path(get, path = "/twins/{id}/states/diff", operation_id = "states_diff", tag = "states",
    params(TwinPath, DiffQuery),
    responses((status = 200, description = "The two states (null when none was in force) and their differences", body = StateDiff),
        (status = 400, description = "Missing or invalid times, or from later than to", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn diff(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    Params(query): Params<DiffQuery>,
) -> ApiResult<Json<StateDiff>> {
    let window = Window::new(
        Some(parse_time("from", &query.from)?),
        Some(parse_time("to", &query.to)?),
    )?;
    Ok(Json(app.history.diff(&who.id, &id, window).await?))
}

/// Each attribute over a window of states: how many states have it, its first and last
/// values, and the minimum, maximum and mean of its numeric values.
#[utoipa::path(get, path = "/twins/{id}/states/summary", operation_id = "states_summary", tag = "states",
    params(TwinPath, WindowQuery),
    responses((status = 200, description = "The window's summary", body = WindowSummary),
        (status = 400, description = "Invalid time, or from later than to", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 503, description = "Auth service or store unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn summary(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    Params(window): Params<WindowQuery>,
) -> ApiResult<Json<WindowSummary>> {
    let window = window.window()?;
    Ok(Json(app.history.summary(&who.id, &id, window).await?))
}
