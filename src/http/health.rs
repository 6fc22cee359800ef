//! `GET /health`, in the format of Magistrala services plus the state of dependencies.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::service::health::{Check, Status};

/// Build information of the running binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("TWINS_COMMIT");
pub const BUILD_TIME: &str = env!("TWINS_BUILD_TIME");

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `pass` when every dependency answers, `warn` when only the broker is away,
    /// `fail` (with 503) when the store is.
    pub status: &'static str,
    pub version: &'static str,
    pub commit: &'static str,
    pub description: &'static str,
    pub build_time: &'static str,
    pub instance_id: String,
    /// Per dependency: `pass`, or what is wrong in a word (`unavailable`,
    /// `disconnected`); the cause goes to the log only.
    pub checks: BTreeMap<&'static str, String>,
}

/// Service health.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "health",
    responses(
        (status = 200, description = "Serving; `warn` when the broker is away", body = Health,
            content_type = "application/health+json"),
        (status = 503, description = "The store is unavailable", body = Health,
            content_type = "application/health+json")))]
pub async fn health(State(app): State<AppState>) -> impl IntoResponse {
    let report = app.health.check().await;
    let checks = report
        .checks
        .into_iter()
        .map(|(name, check)| {
            let word = match check {
                Check::Pass => "pass",
                Check::Down(word) => word,
            };
            (name, word.to_owned())
        })
        .collect();
    let body = Health {
        status: match report.status {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        },
        version: VERSION,
        commit: COMMIT,
        description: "twins service",
        build_time: BUILD_TIME,
        instance_id: app.instance_id.to_string(),
        checks,
    };
    let status = if report.status == Status::Fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        [(CONTENT_TYPE, "application/health+json")],
        Json(body),
    )
}
