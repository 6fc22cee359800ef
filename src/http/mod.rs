//! HTTP transport: routing, extraction, responses. Business rules live in `service`.

pub mod documents;
pub mod error;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod pages;
pub mod states;
pub mod tls;
pub mod twins;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware;
use axum::response::Response;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::auth::Authenticator;
use crate::service::documents::Documents;
use crate::service::health::Health;
use crate::service::twins::Twins;
use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1 << 20;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub twins: Arc<dyn Twins>,
    pub documents: Arc<dyn Documents>,
    pub auth: Arc<dyn Authenticator>,
    pub health: Health,
    pub metrics: PrometheusHandle,
    pub instance_id: Arc<str>,
}

/// The complete HTTP application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/twins", get(twins::list).post(twins::create))
        .route(
            "/twins/{id}",
            get(twins::view).put(twins::update).delete(twins::remove),
        )
        .route("/twins/{id}/documents", get(documents::list))
        .route(
            "/twins/{id}/documents/{name}",
            get(documents::get)
                .put(documents::put)
                .patch(documents::patch)
                .delete(documents::delete),
        )
        .route("/twins/{id}/documents/{name}/delta", get(documents::delta))
        .route("/states/{id}", get(states::list))
        .route("/health", get(health::health))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(metrics::track))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(record_response),
        )
        .with_state(state)
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
