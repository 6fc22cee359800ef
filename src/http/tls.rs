//! HTTPS: the server's rustls configuration (ring crypto) from PEM files.
//!
//! Handshakes run in `http::server`, one per connection under the connection cap and
//! within the header timeout, so a slow or silent client never holds up the others; a
//! client speaking plain HTTP fails its handshake and is disconnected.

use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the server's TLS configuration could not be built; each kind names the file at
/// fault and keeps the parser's error as its source.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {source}")]
    Certificate {
        path: String,
        #[source]
        source: pem::Error,
    },
    #[error("certificate {path}: no certificate found")]
    NoCertificate { path: String },
    #[error("private key {path}: {source}")]
    PrivateKey {
        path: String,
        #[source]
        source: pem::Error,
    },
    /// The files parse but do not make a usable pair (a key of another certificate, an
    /// unsupported algorithm).
    #[error("certificate {cert} with key {key}: {source}")]
    Pair {
        cert: String,
        key: String,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
}

impl TlsError {
    /// Never: the files are read once at start-up, and whatever is wrong with them stays
    /// wrong until an operator replaces them.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The server configuration from PEM files: the certificate chain (leaf first) at
/// `cert` and its private key (PKCS#8, PKCS#1 or SEC1) at `key`.
pub fn server_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::PrivateKey {
        path: key.to_owned(),
        source,
    })?;
    let pair = |source| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(pair)?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(pair)?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_missing_file_is_named_and_its_io_error_kept() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cert = dir.path().join("missing-cert.pem");
        let cert = cert.to_string_lossy();
        let e = server_config(&cert, "missing-key.pem").expect_err("no such file");
        assert!(matches!(e, TlsError::Certificate { .. }), "{e}");
        assert!(e.to_string().contains("missing-cert.pem"), "{e}");
        assert!(!e.is_transient());
        let source = e.source().expect("the parser error");
        assert!(matches!(
            source.downcast_ref::<pem::Error>(),
            Some(pem::Error::Io(_))
        ));
    }
}
