//! HTTP transport: routing, extraction, responses. Business rules live in `service`.

pub mod documents;
pub mod error;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod states;
pub mod twins;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::service::documents::DocumentsService;
use crate::service::twins::TwinsService;
use crate::store::Store;
use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 1 << 20;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub twins: TwinsService,
    pub documents: DocumentsService,
    pub auth: Arc<dyn Authenticator>,
    pub broker: async_nats::Client,
    pub store: Store,
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
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
