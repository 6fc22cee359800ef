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
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = Health, content_type = "application/health+json"),
        (status = 503, body = Health, content_type = "application/health+json")))]
pub async fn health(State(app): State<AppState>) -> impl IntoResponse {
    let mut checks = BTreeMap::new();
    checks.insert(
        "store",
        match app.store.ping().await {
            Ok(()) => "pass".to_owned(),
            Err(e) => {
                // The driver's text names servers and topology: never in a response.
                tracing::warn!(error = %e, "health: store unavailable");
                "unavailable".to_owned()
            }
        },
    );
    let ok = checks.values().all(|v| v == "pass");
    // The API keeps serving while the broker is away (the consumer reconnects by
    // itself), so a broker outage is a warning, not a failure.
    let broker_ok = crate::broker::is_connected(&app.broker);
    checks.insert(
        "broker",
        if broker_ok {
            "pass".into()
        } else {
            "disconnected".into()
        },
    );
    let body = Health {
        status: match (ok, broker_ok) {
            (false, _) => "fail",
            (true, false) => "warn",
            (true, true) => "pass",
        },
        version: VERSION,
        commit: COMMIT,
        description: "twins service",
        build_time: BUILD_TIME,
        instance_id: app.instance_id.to_string(),
        checks,
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(CONTENT_TYPE, "application/health+json")],
        Json(body),
    )
}
