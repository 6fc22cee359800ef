//! `twins --healthcheck`: asks the running service for `GET /health` and exits 0 when
//! it answers 200, 1 otherwise. It reads the same environment as the service, so in a
//! container (Docker `HEALTHCHECK`) it finds the port and the scheme by itself, and the
//! runtime image needs no shell, curl or wget.
//!
//! Over HTTPS the check connects to the loopback address, where the certificate's name
//! cannot match; instead of trusting anything, it requires the server to present exactly
//! the certificate configured in `MG_TWINS_HTTP_SERVER_CERT` (and to prove it holds
//! the key), which is what "this process is serving" means.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{Config, TlsFiles};

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the check from the process environment.
pub fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twins: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match check(&config, TIMEOUT) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twins: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ok when the service configured by `config` answers `GET /health` with 200.
pub fn check(config: &Config, timeout: Duration) -> Result<(), String> {
    let host = match config.http_host.as_str() {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        h => h.trim_start_matches('[').trim_end_matches(']'),
    };
    let addr = (host, config.http_port)
        .to_socket_addrs()
        .map_err(|e| format!("address {host}:{}: {e}", config.http_port))?
        .next()
        .ok_or_else(|| format!("address {host}:{} resolves to nothing", config.http_port))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = "GET /health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: twins-healthcheck\r\n\
                   Connection: close\r\n\r\n";
    let status_line = match &config.http_tls {
        None => exchange(tcp, request)?,
        Some(files) => {
            let tls = rustls::ClientConnection::new(
                client_config(files)?,
                ServerName::try_from("localhost").map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            exchange(rustls::StreamOwned::new(tls, tcp), request)?
        }
    };
    let status = status_line.split(' ').nth(1).unwrap_or_default();
    if status == "200" {
        Ok(())
    } else {
        Err(format!("GET /health answered {status_line:?}"))
    }
}

/// Sends the request and returns the response's status line.
fn exchange(mut stream: impl Read + Write, request: &str) -> Result<String, String> {
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 512];
    while !received.windows(2).any(|w| w == b"\r\n") && received.len() < 8192 {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the response: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&received);
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err("no response".into());
    }
    Ok(line.to_owned())
}

fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let expected = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("certificate {}: {e}", files.cert))?
        .next()
        .ok_or_else(|| format!("certificate {}: no certificate found", files.cert))?
        .map_err(|e| format!("certificate {}: {e}", files.cert))?;
    let provider = Arc::new(ring::default_provider());
    let verifier = Arc::new(ConfiguredCertificate {
        expected,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate: the one the service is configured with.
#[derive(Debug)]
struct ConfiguredCertificate {
    expected: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ConfiguredCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server presents another certificate than MG_TWINS_HTTP_SERVER_CERT".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
