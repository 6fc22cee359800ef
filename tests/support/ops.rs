//! Support of the operations tests: the real `twins` binary as a child process, an
//! OTLP/HTTP trace receiver, certificates made on the spot, an auth service that can be
//! slow or speak TLS, and a small HTTPS client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as OtlpValue;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Status};

use twins::proto::magistrala::auth_service_server::{AuthService, AuthServiceServer};
use twins::proto::magistrala::{IdentityReq, IdentityRes};

/// Token the in-test auth services know, and the identity it stands for.
pub const TOKEN: &str = "ops-token";
pub const USER: &str = "ops-user";

// ---------------------------------------------------------------------------------------
// The binary

/// The `twins` binary running as a child process with JSON logs; killed on drop.
pub struct Binary {
    child: tokio::process::Child,
    /// Where it listens (taken from its "listening" log line).
    pub addr: SocketAddr,
    /// Every log line it wrote so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// Starts the binary with `vars` over a clean environment (no inherited `MG_*` or
/// `OTEL_*`), on 127.0.0.1 with a free port, and waits until it listens.
pub async fn start_binary(vars: &[(&str, &str)]) -> Binary {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_twins"));
    for (k, _) in std::env::vars() {
        if k.starts_with("MG_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("MG_TWINS_LOG_FORMAT", "json")
        .env("MG_TWINS_LOG_LEVEL", "info")
        .env("MG_TWINS_HTTP_HOST", "127.0.0.1")
        .env("MG_TWINS_HTTP_PORT", "0");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the twins binary starts");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["fields"]["message"] == "twins service listening"
                    && let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok())
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
                logs.lock().expect("logs").push(line);
            }
        });
    }
    {
        let logs = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                logs.lock().expect("logs").push(format!("stderr: {line}"));
            }
        });
    }
    let addr = match tokio::time::timeout(Duration::from_secs(30), addr_rx).await {
        Ok(Ok(addr)) => addr,
        _ => panic!(
            "the binary did not report listening; logs: {:#?}",
            logs.lock().expect("logs")
        ),
    };
    Binary { child, addr, logs }
}

impl Binary {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends SIGTERM, as a container runtime does to stop the service.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the binary is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM delivered");
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("exit status"),
            Err(_) => panic!(
                "the binary did not exit within {within:?}; logs: {:#?}",
                self.logs()
            ),
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("logs").clone()
    }
}

// ---------------------------------------------------------------------------------------
// OTLP/HTTP receiver

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

// ---------------------------------------------------------------------------------------
// Certificates

/// A CA with a server certificate (for `localhost` and 127.0.0.1) and a client
/// certificate, written as PEM files into a directory.
pub struct Pki {
    pub ca_pem: String,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn make_pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert_pem, server_key_pem) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "localhost",
    );
    let (client_cert_pem, client_key_pem) =
        leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "twins");

    let write = |file: &str, pem: &str| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        ca_pem: ca_cert.pem(),
        server_cert: write("server.pem", &server_cert_pem),
        server_key: write("server.key", &server_key_pem),
        client_cert: write("client.pem", &client_cert_pem),
        client_key: write("client.key", &client_key_pem),
        server_cert_pem,
        server_key_pem,
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------
// HTTPS client

/// A response read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub body: String,
}

/// Sends one HTTP/1.1 request over TLS to `addr`, verifying the server against `ca_pem`
/// for the name `localhost`.
pub async fn https_request(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<RawResponse> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    Ok(RawResponse {
        status,
        body: body.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// Auth service

/// An auth service knowing [`TOKEN`]; it answers after `delay` and reports each call.
#[derive(Clone)]
pub struct Users {
    pub delay: Duration,
    pub calls: Option<mpsc::UnboundedSender<()>>,
}

impl Users {
    pub fn quick() -> Self {
        Self {
            delay: Duration::ZERO,
            calls: None,
        }
    }
}

#[tonic::async_trait]
impl AuthService for Users {
    async fn identify(
        &self,
        request: Request<IdentityReq>,
    ) -> Result<tonic::Response<IdentityRes>, Status> {
        if let Some(calls) = &self.calls {
            let _ = calls.send(());
        }
        tokio::time::sleep(self.delay).await;
        if request.into_inner().token == TOKEN {
            Ok(tonic::Response::new(IdentityRes {
                id: USER.into(),
                user_id: USER.into(),
                domain_id: "domain".into(),
            }))
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
}

/// A running in-test auth service; stopped on drop.
pub struct Auth {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Starts `users` on 127.0.0.1, over TLS when `tls` is given.
pub async fn spawn_auth(users: Users, tls: Option<ServerTlsConfig>) -> Auth {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("server TLS configuration");
    }
    let task = tokio::spawn(async move {
        let _ = builder
            .add_service(AuthServiceServer::new(users))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Auth {
        addr,
        stop: Some(stop),
        task,
    }
}

impl Drop for Auth {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
