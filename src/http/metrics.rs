//! Prometheus metrics: the recorder, the per-request middleware and `/metrics`.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// Name of the request counter.
pub const REQUESTS: &str = "twins_http_requests_total";
/// Name of the request latency histogram.
pub const LATENCY: &str = "twins_http_request_duration_seconds";
/// Name of the counter of connections closed unserved because the cap was reached.
pub const CONNECTIONS_REFUSED: &str = "twins_http_connections_refused_total";
/// Name of the gauge of open connections (TLS handshakes in progress included).
pub const CONNECTIONS_OPEN: &str = "twins_http_connections_open";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The process-wide recorder, installed on first use. A process has one recorder, so
/// several applications in one process (as in tests) share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The method as a label value: the standard methods by name, anything a client
/// makes up as `other`, so that no request can add a series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Counts each request and records its latency, labelled by method, route template
/// (not the raw path, which would explode cardinality) and status: every label has a
/// bounded set of values whatever clients send.
pub async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // Routes are the router's templates or `unmatched`; statuses are three digits.
    let response = next.run(req).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(LATENCY, &labels).record(start.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: Prometheus text format.
pub async fn render(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_fold_into_one_label_value() {
        let made_up: Vec<&str> = (0..50)
            .map(|i| Method::from_bytes(format!("M{i}").as_bytes()).expect("a token"))
            .map(|m| method_label(&m))
            .collect();
        assert!(made_up.iter().all(|l| *l == "other"), "{made_up:?}");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
    }
}
