//! HTTP transport: routing, extraction, responses. Business rules live in `service`.

pub mod documents;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod pages;
pub mod server;
pub mod states;
pub mod tls;
pub mod twins;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::auth::Authenticator;
use crate::service::documents::Documents;
use crate::service::health::Health;
use crate::service::history::History;
use crate::service::twins::Twins;
use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1 << 20;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub twins: Arc<dyn Twins>,
    pub documents: Arc<dyn Documents>,
    pub history: Arc<dyn History>,
    pub events: events::EventsState,
    pub auth: Arc<dyn Authenticator>,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub instance_id: Arc<str>,
}

/// The complete HTTP application; a request taking longer than `request_timeout` gets
/// a JSON 503.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/twins", get(twins::list).post(twins::create))
        .route(
            "/twins/{id}",
            get(twins::view).put(twins::update).delete(twins::remove),
        )
        .route("/twins/{id}/documents", get(documents::list))
        .route("/events", get(events::all))
        .route("/twins/{id}/events", get(events::twin))
        .route(
            "/twins/{id}/documents/{name}",
            get(documents::get)
                .put(documents::put)
                .patch(documents::patch)
                .delete(documents::delete),
        )
        .route("/twins/{id}/documents/{name}/delta", get(documents::delta))
        .route(
            "/twins/{id}/documents/{name}/versions",
            get(documents::versions),
        )
        .route("/twins/{id}/documents/{name}/diff", get(documents::diff))
        .route("/states/{id}", get(states::list))
        .route("/twins/{id}/states/at", get(states::at))
        .route("/twins/{id}/states/diff", get(states::diff))
        .route("/twins/{id}/states/summary", get(states::summary))
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .merge(openapi::docs())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Inside the metrics and the span, so that they see the timeout's 503.
        .layer(middleware::from_fn(move |req, next| {
            request_deadline(request_timeout, req, next)
        }))
        .layer(middleware::from_fn(metrics::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(record_response),
        )
        .with_state(state)
}

/// Answers 503 when the handler is not done within `limit`. The handler is dropped at
/// its next await point: a write it had started may or may not have been applied, as
/// with any 503.
async fn request_deadline(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// The span of one request, named after the route template (`GET /twins/{id}`) and
/// continuing the caller's trace when the request carries W3C trace headers.
fn request_span(req: &Request) -> Span {
    let method = req.method().as_str();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let span = tracing::info_span!(
        "http.request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        url.path = req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        span.record(
            "otel.name",
            match route {
                Some(r) => format!("{method} {r}"),
                None => method.to_owned(),
            },
        );
        crate::telemetry::set_http_parent(&span, req.headers());
    }
    span
}

fn record_response(res: &Response, latency: Duration, span: &Span) {
    let status = res.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    tracing::debug!(status = status.as_u16(), ?latency, "request finished");
}
