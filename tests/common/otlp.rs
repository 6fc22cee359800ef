//! An OTLP/HTTP trace receiver: the service exports its spans here and the test reads
//! them back flattened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// `service.name` of the resource that sent it.
    pub service: String,
}

/// An OTLP/HTTP endpoint (`POST /v1/traces`, protobuf) recording what it receives.
pub struct Collector {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    task: JoinHandle<()>,
}

pub async fn spawn_collector() -> Collector {
    let requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
    let store = requests.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        store.lock().expect("requests").push(req);
                        (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/x-protobuf")],
                            Vec::new(),
                        )
                    }
                    Err(_) => (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        b"not an ExportTraceServiceRequest".to_vec(),
                    ),
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Collector {
        addr,
        requests,
        task,
    }
}

impl Collector {
    /// `MG_JAEGER_URL` pointing here (the exporter appends `/v1/traces`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let mut out = Vec::new();
        for req in self.requests.lock().expect("requests").iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(|kv| value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(ReceivedSpan {
                            name: s.name.clone(),
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent_span_id: hex(&s.parent_span_id),
                            attributes: s
                                .attributes
                                .iter()
                                .map(|kv| {
                                    (
                                        kv.key.clone(),
                                        value_text(
                                            kv.value.as_ref().and_then(|v| v.value.as_ref()),
                                        ),
                                    )
                                })
                                .collect(),
                            links: s
                                .links
                                .iter()
                                .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                .collect(),
                            service: service.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn value_text(v: Option<&OtlpValue>) -> String {
    match v {
        Some(OtlpValue::StringValue(s)) => s.clone(),
        Some(OtlpValue::IntValue(i)) => i.to_string(),
        Some(OtlpValue::BoolValue(b)) => b.to_string(),
        Some(OtlpValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random W3C trace id and span id, as a caller's `traceparent` would carry.
pub fn random_trace() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (trace, span)
}

pub fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}
