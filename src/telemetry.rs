//! Logs and traces.
//!
//! Logs go to stdout through a `tracing` subscriber filtered by `MG_TWINS_LOG_LEVEL`, as
//! text or JSON (`MG_TWINS_LOG_FORMAT`). When `MG_JAEGER_URL` is set, the service's
//! spans (target `twins`, level info and above, whatever the log filter) are also
//! exported with OpenTelemetry over OTLP/HTTP, sampled parent-based with ratio
//! `MG_JAEGER_TRACE_RATIO`; without it there is no OpenTelemetry layer at all, so
//! tracing costs only what the log filter enables.
//!
//! Trace context travels in W3C `traceparent`/`tracestate` headers: taken from incoming
//! HTTP requests and broker messages, put on published broker messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Service name reported to the trace backend (the Go service's name).
pub const SERVICE_NAME: &str = "twins";
/// Port of OTLP over HTTP, where the old Jaeger collector URL is mapped to.
const OTLP_HTTP_PORT: u16 = 4318;
/// Path of the OTLP/HTTP trace export.
const OTLP_TRACES_PATH: &str = "/v1/traces";
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most links a consumed batch's span gets (the SDK's default span limit).
const MAX_LINKS: usize = 128;

/// Whether spans are exported: trace context is only read and written then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What [`init`] needs, taken from the configuration by its reader (this module does
/// not read the environment).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A level (`debug`) or a full filter (`info,twins=debug`).
    pub log_level: String,
    pub log_format: LogFormat,
    /// Where spans are exported (`MG_JAEGER_URL`, see [`otlp_traces_endpoint`]); none
    /// means no export at all.
    pub export_url: Option<String>,
    /// Share of new traces sampled, between 0 and 1.
    pub trace_ratio: f64,
    /// Reported as `service.instance.id`.
    pub instance_id: String,
}

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("not a URL ({0}); expected http://host:4318/v1/traces")]
    InvalidUrl(#[source] axum::http::uri::InvalidUri),
    #[error(
        "https is not supported; export to a plain-HTTP OTLP endpoint such as \
         http://jaeger:4318/v1/traces"
    )]
    Https,
    #[error("unsupported scheme {0:?}; expected http")]
    UnsupportedScheme(String),
    #[error("missing scheme; expected http://host:4318/v1/traces")]
    MissingScheme,
    #[error("missing host; expected http://host:4318/v1/traces")]
    MissingHost,
    #[error("cannot build the trace exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

impl TelemetryError {
    /// Never: the URL or the exporter setup stays wrong until the configuration changes.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The installed telemetry; call [`Telemetry::shutdown`] before exiting so that the
/// spans still buffered are exported.
#[must_use = "shut telemetry down on exit to flush buffered spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the buffered spans (waiting at most `timeout`) and stops the exporter.
    /// Blocks the calling thread: call it outside the async runtime.
    pub fn shutdown(self, timeout: Duration) {
        if let Some(provider) = self.provider {
            match provider.shutdown_with_timeout(timeout) {
                Ok(()) => tracing::debug!("trace exporter flushed"),
                Err(e) => tracing::warn!(error = %e, "trace exporter not flushed cleanly"),
            }
        }
    }
}

/// Installs the global subscriber and, when an export URL is set, the OTLP exporter.
/// An invalid log filter falls back to `info` with a warning.
pub fn init(config: &Settings) -> Telemetry {
    let (filter, bad_filter) = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new("info"), true),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match config.log_format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };

    let mut export_error = None;
    let provider = match config.export_url.as_deref().map(otlp_traces_endpoint) {
        None => None,
        Some(Err(e)) => {
            export_error = Some(e);
            None
        }
        Some(Ok(endpoint)) => {
            match tracer_provider(&endpoint, config.trace_ratio, &config.instance_id) {
                Ok(p) => Some((p, endpoint)),
                Err(e) => {
                    export_error = Some(e);
                    None
                }
            }
        }
    };
    let traces = provider.as_ref().map(|(p, _)| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SERVICE_NAME))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("twins", tracing::Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();

    if installed && bad_filter {
        tracing::warn!(level = %config.log_level, "invalid MG_TWINS_LOG_LEVEL, using info");
    }
    if let Some(e) = export_error {
        tracing::warn!(error = %crate::error::chain(&e), "traces are not exported");
    }
    if let Some((_, endpoint)) = &provider {
        EXPORTING.store(installed, Ordering::Relaxed);
        tracing::info!(
            %endpoint,
            ratio = config.trace_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    Telemetry {
        provider: provider.map(|(p, _)| p),
    }
}

fn tracer_provider(
    endpoint: &str,
    ratio: f64,
    instance_id: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(TelemetryError::Exporter)?;
    let resource = Resource::builder()
        .with_service_name(SERVICE_NAME)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id.to_owned()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// The OTLP/HTTP trace endpoint for `MG_JAEGER_URL`.
///
/// - `http://host:4318/v1/traces` (or any other path) is used as given;
/// - `http://host:4318` or `host:4318` (no path) gets `/v1/traces`;
/// - the Jaeger collector's Thrift endpoint `http://host:14268/api/traces`, which older
///   Magistrala deployments configure, and the OTLP/gRPC port `host:4317` are mapped to
///   OTLP/HTTP on the same host: `http://host:4318/v1/traces`.
///
/// Only plain `http` is supported (the exporter carries no TLS stack).
pub fn otlp_traces_endpoint(url: &str) -> Result<String, TelemetryError> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: axum::http::Uri = full.parse().map_err(TelemetryError::InvalidUrl)?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(TelemetryError::Https),
        Some(other) => return Err(TelemetryError::UnsupportedScheme(other.to_owned())),
        None => return Err(TelemetryError::MissingScheme),
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or(TelemetryError::MissingHost)?;
    let path = uri.path();
    let legacy = path.starts_with("/api/traces") || matches!(uri.port_u16(), Some(14268 | 4317));
    if legacy {
        return Ok(format!(
            "http://{}:{OTLP_HTTP_PORT}{OTLP_TRACES_PATH}",
            authority.host()
        ));
    }
    if path.is_empty() || path == "/" {
        return Ok(format!("http://{authority}{OTLP_TRACES_PATH}"));
    }
    Ok(format!("http://{authority}{path}"))
}

/// Reads trace context from HTTP headers.
struct HttpHeaders<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Reads trace context from broker message headers (names compared case-insensitively).
struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if let Some(v) = self.0.get(key) {
            return Some(v.as_str());
        }
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes trace context into broker message headers; invalid values are skipped.
struct NatsHeadersMut<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            key.parse::<async_nats::HeaderName>(),
            value.parse::<async_nats::HeaderValue>(),
        ) {
            self.0.insert(name, value);
        }
    }
}

fn has_trace_header(found: Option<&str>) -> bool {
    found.is_some_and(|v| !v.is_empty())
}

/// Makes the caller's trace (W3C headers of an incoming HTTP request) the parent of
/// `span`, which must not have been entered yet. Does nothing without such headers or
/// when spans are not exported.
pub fn set_http_parent(span: &Span, headers: &axum::http::HeaderMap) {
    let carrier = HttpHeaders(headers);
    if !exporting() || span.is_disabled() || !has_trace_header(carrier.get("traceparent")) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The publisher's trace context carried by a broker message, if any.
pub fn message_context(headers: Option<&async_nats::HeaderMap>) -> Option<Context> {
    let carrier = NatsHeaders(headers?);
    if !has_trace_header(carrier.get("traceparent")) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes the publisher's trace (W3C headers of a broker message) the parent of `span`,
/// which must not have been entered yet.
pub fn set_message_parent(span: &Span, headers: Option<&async_nats::HeaderMap>) {
    if !exporting() || span.is_disabled() {
        return;
    }
    if let Some(cx) = message_context(headers) {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` (not entered yet) to the publisher's trace of each message that
/// carries one: a batch consumed together has many parents, so they become links (at
/// most [`MAX_LINKS`]).
pub fn link_messages<'a>(
    span: &Span,
    headers: impl IntoIterator<Item = Option<&'a async_nats::HeaderMap>>,
) {
    if !exporting() || span.is_disabled() {
        return;
    }
    let contexts = headers.into_iter().filter_map(message_context);
    for cx in contexts.take(MAX_LINKS) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// Headers carrying the current span's trace context, for a message about to be
/// published; None when there is no trace to propagate (e.g. nothing is exported).
pub fn current_headers() -> Option<async_nats::HeaderMap> {
    if !exporting() {
        return None;
    }
    let span = Span::current();
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = async_nats::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut NatsHeadersMut(&mut headers));
    (!headers.is_empty()).then_some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaeger_urls_map_to_the_otlp_http_endpoint() {
        for (given, want) in [
            (
                "http://jaeger:14268/api/traces",
                "http://jaeger:4318/v1/traces",
            ),
            (
                "http://jaeger:4318/v1/traces",
                "http://jaeger:4318/v1/traces",
            ),
            ("http://jaeger:4318", "http://jaeger:4318/v1/traces"),
            ("http://jaeger:4318/", "http://jaeger:4318/v1/traces"),
            ("jaeger:4318", "http://jaeger:4318/v1/traces"),
            ("http://jaeger:4317", "http://jaeger:4318/v1/traces"),
            (
                "http://10.0.0.7:14268/api/traces",
                "http://10.0.0.7:4318/v1/traces",
            ),
            (
                "http://[::1]:14268/api/traces",
                "http://[::1]:4318/v1/traces",
            ),
            (
                "http://collector:9999/custom/path",
                "http://collector:9999/custom/path",
            ),
        ] {
            assert_eq!(
                otlp_traces_endpoint(given).ok().as_deref(),
                Some(want),
                "{given}"
            );
        }
        for bad in [
            "https://jaeger:4318",
            "udp://jaeger:6831",
            "http://",
            "not a url",
        ] {
            assert!(otlp_traces_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_malformed_export_url_keeps_the_parser_error() {
        let e = otlp_traces_endpoint("http://jae ger:4318").expect_err("a space in the host");
        assert!(matches!(e, TelemetryError::InvalidUrl(_)), "{e}");
        assert!(!e.is_transient());
        let source = std::error::Error::source(&e).expect("the parser error");
        assert!(
            source
                .downcast_ref::<axum::http::uri::InvalidUri>()
                .is_some()
        );
    }

    #[test]
    fn no_headers_without_a_trace() {
        assert!(current_headers().is_none());
        assert!(message_context(None).is_none());
        let mut h = async_nats::HeaderMap::new();
        h.insert("traceparent", "garbage");
        assert!(message_context(Some(&h)).is_none());
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            "Traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let cx = message_context(Some(&h)).expect("context from a valid traceparent");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }
}
