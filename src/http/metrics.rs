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
pub use crate::service::metered::{GO_LATENCY, GO_REQUESTS};
/// Always 1, labelled with the version and commit of the running binary.
pub const BUILD_INFO: &str = "twins_build_info";
/// 1 when a dependency answers, 0 when not, by dependency (store, broker, cache);
/// checked at each scrape.
pub const DEPENDENCY_UP: &str = "twins_dependency_up";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Buckets of the change feed relay's lag: from a few milliseconds to a broker outage.
const FEED_LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process-wide recorder, installed on first use. A process has one recorder, so
/// several applications in one process (as in tests) share it.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(crate::service::outbox::LAG.into()),
                        FEED_LAG_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            metrics::gauge!(
                BUILD_INFO,
                "version" => crate::http::health::VERSION,
                "commit" => crate::http::health::COMMIT
            )
            .set(1.0);
            handle
        })
        .clone()
}

/// Gives each metric its HELP text; `/metrics` renders no family without one. The
/// composition root passes the list of every metric of the service.
pub fn describe(descriptions: &[(&'static str, &'static str)]) {
    let _ = handle();
    for (name, help) in descriptions {
        metrics::describe_counter!(*name, *help);
    }
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
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(go) = go_method(method, &labels[1].1) {
        metrics::counter!(GO_REQUESTS, "method" => go).increment(1);
        metrics::histogram!(GO_LATENCY, "method" => go).record(elapsed);
    }
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(LATENCY, &labels).record(elapsed);
    response
}

/// The Go service's name of the operation a request is, for the operations it had.
fn go_method(method: &str, route: &str) -> Option<&'static str> {
    Some(match (method, route) {
        ("POST", "/twins") => "add_twin",
        ("GET", "/twins") => "list_twins",
        ("GET", "/twins/{id}") => "view_twin",
        ("PUT", "/twins/{id}") => "update_twin",
        ("DELETE", "/twins/{id}") => "remove_twin",
        ("GET", "/states/{id}") => "list_states",
        _ => return None,
    })
}

/// Prometheus metrics of this instance (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn render(State(app): State<AppState>) -> impl IntoResponse {
    process::sample();
    for c in app.health.check().await.checks {
        let up = if c.check == crate::service::health::Check::Pass {
            1.0
        } else {
            0.0
        };
        metrics::gauge!(DEPENDENCY_UP, "dependency" => c.name).set(up);
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// The process metrics every Prometheus client library exports, read from `/proc` when
/// `/metrics` is asked for (nothing is exported where there is no `/proc`).
pub mod process {
    pub const CPU: &str = "process_cpu_seconds_total";
    pub const RESIDENT: &str = "process_resident_memory_bytes";
    pub const VIRTUAL: &str = "process_virtual_memory_bytes";
    pub const OPEN_FDS: &str = "process_open_fds";
    pub const MAX_FDS: &str = "process_max_fds";
    pub const START_TIME: &str = "process_start_time_seconds";

    /// Clock ticks per second of `/proc/<pid>/stat` times: 100 on every Linux
    /// architecture the service is built for.
    const TICKS: f64 = 100.0;
    const PAGE: f64 = 4096.0;

    pub fn sample() {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return;
        };
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        // rest[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
        let field = |n: usize| f.get(n - 3).copied().unwrap_or(0.0);
        metrics::counter!(CPU).absolute(((field(14) + field(15)) / TICKS) as u64);
        metrics::gauge!(VIRTUAL).set(field(23));
        metrics::gauge!(RESIDENT).set(field(24) * PAGE);
        if let Some(boot) = boot_time() {
            metrics::gauge!(START_TIME).set(boot + field(22) / TICKS);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            metrics::gauge!(OPEN_FDS).set(dir.count() as f64);
        }
        if let Some(max) = max_fds() {
            metrics::gauge!(MAX_FDS).set(max);
        }
    }

    fn boot_time() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn max_fds() -> Option<f64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
    }
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
