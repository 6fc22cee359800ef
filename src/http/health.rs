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
    /// `pass` when every dependency answers, `warn` when only the broker or the cache
    /// is away, `fail` (with 503) when the store is.
    pub status: &'static str,
    pub version: &'static str,
    pub commit: &'static str,
    pub description: &'static str,
    pub build_time: &'static str,
    pub instance_id: String,
    /// `releaseId` of the health-check draft: version and commit.
    #[serde(rename = "releaseId")]
    pub release_id: String,
    #[serde(rename = "serviceId")]
    pub service_id: String,
    /// Per dependency, under `<name>:responseTime`: how long it took to answer.
    #[schema(value_type = BTreeMap<String, Vec<ComponentCheck>>)]
    pub checks: BTreeMap<String, Vec<ComponentCheck>>,
}

/// One check of one dependency, in the shape of the health-check draft
/// (draft-inadarei-api-health-check).
#[derive(Debug, Serialize, ToSchema)]
pub struct ComponentCheck {
    #[serde(rename = "componentId")]
    pub component_id: &'static str,
    /// `datastore` (store, cache) or `component` (broker).
    #[serde(rename = "componentType")]
    pub component_type: &'static str,
    /// `pass`, or `fail` when it does not answer (`warn` overall when it is not
    /// critical).
    pub status: &'static str,
    /// Milliseconds the check took.
    #[serde(rename = "observedValue")]
    pub observed_value: f64,
    #[serde(rename = "observedUnit")]
    pub observed_unit: &'static str,
    /// When it was checked (RFC 3339).
    pub time: String,
    /// What is wrong in a word (`unavailable`, `disconnected`) when it does not pass;
    /// the cause goes to the log only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<&'static str>,
}

/// The liveness and readiness answer: just a status.
#[derive(Debug, Serialize, ToSchema)]
pub struct Probe {
    /// `pass`, or `fail` (with 503).
    pub status: &'static str,
}

const HEALTH_JSON: &str = "application/health+json";

fn word(status: Status) -> &'static str {
    match status {
        Status::Pass => "pass",
        Status::Warn => "warn",
        Status::Fail => "fail",
    }
}

fn code(status: Status) -> StatusCode {
    if status == Status::Fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Service health: every dependency, in the health-check draft's shape plus the fields
/// of Magistrala's services.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "health",
    responses(
        (status = 200, description = "Serving; `warn` when the broker or the cache is away",
            body = Health, content_type = "application/health+json"),
        (status = 503, description = "The store is unavailable", body = Health,
            content_type = "application/health+json")))]
pub async fn health(State(app): State<AppState>) -> impl IntoResponse {
    let report = app.health.check().await;
    let checks = report
        .checks
        .into_iter()
        .map(|c| {
            let (status, output) = match c.check {
                Check::Pass => ("pass", None),
                Check::Down(word) => ("fail", Some(word)),
            };
            let check = ComponentCheck {
                component_id: c.name,
                component_type: if c.name == "broker" {
                    "component"
                } else {
                    "datastore"
                },
                status,
                observed_value: (c.took.as_secs_f64() * 1e6).round() / 1e3,
                observed_unit: "ms",
                time: c.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                output,
            };
            (format!("{}:responseTime", c.name), vec![check])
        })
        .collect();
    let body = Health {
        status: word(report.status),
        version: VERSION,
        commit: COMMIT,
        description: "twins service",
        build_time: BUILD_TIME,
        instance_id: app.instance_id.to_string(),
        release_id: format!("{VERSION}+{COMMIT}"),
        service_id: app.instance_id.to_string(),
        checks,
    };
    (
        code(report.status),
        [(CONTENT_TYPE, HEALTH_JSON)],
        Json(body),
    )
}

/// Liveness for orchestrators: the process serves HTTP. Checks nothing else, so a
/// dependency outage never gets the instance restarted.
#[utoipa::path(get, path = "/health/live", operation_id = "liveness", tag = "health",
    responses((status = 200, description = "The process serves", body = Probe,
        content_type = "application/health+json")))]
pub async fn live() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, HEALTH_JSON)],
        Json(Probe { status: "pass" }),
    )
}

/// Readiness for orchestrators: 200 while the instance can answer requests (the store
/// answers), 503 while it cannot. The broker and the cache being away does not make it
/// unready: the API serves without them.
#[utoipa::path(get, path = "/health/ready", operation_id = "readiness", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Probe, content_type = "application/health+json"),
        (status = 503, description = "The store is unavailable", body = Probe,
            content_type = "application/health+json")))]
pub async fn ready(State(app): State<AppState>) -> impl IntoResponse {
    let report = app.health.check().await;
    let status = if report
        .checks
        .iter()
        .any(|c| c.critical && c.check != Check::Pass)
    {
        Status::Fail
    } else {
        Status::Pass
    };
    (
        code(status),
        [(CONTENT_TYPE, HEALTH_JSON)],
        Json(Probe {
            status: word(status),
        }),
    )
}
