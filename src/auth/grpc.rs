//! Client of the Magistrala auth service's `Identify` call.

use std::time::Duration;

use async_trait::async_trait;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::{AuthError, Authenticator, Identity};
use crate::error::redact_url;
use crate::proto::magistrala::IdentityReq;
use crate::proto::magistrala::auth_service_client::AuthServiceClient;

/// Identifies tokens by asking the auth service, each call bounded by `timeout`.
pub struct GrpcAuth {
    client: AuthServiceClient<Channel>,
    timeout: Duration,
}

impl GrpcAuth {
    /// Builds a lazily connecting client on an endpoint from [`endpoint_for`] (TLS
    /// settings included): an auth service that is down at start-up makes requests fail
    /// with 503 until it comes back, instead of stopping the service.
    pub fn with_endpoint(endpoint: Endpoint, timeout: Duration) -> Self {
        let channel = endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Self {
            client: AuthServiceClient::new(channel),
            timeout,
        }
    }
}

/// Parses the configured URL (`host:port` as the Go service takes it, or
/// `http(s)://host:port`) for a plain or a TLS connection. The transport only speaks
/// TLS to `https://` URIs, so with TLS on, a URL without a scheme or with `http://` is
/// taken as `https://`; without TLS, no scheme means `http://`.
pub fn endpoint_for(url: &str, tls: bool) -> Result<Endpoint, AuthError> {
    let scheme = if tls { "https" } else { "http" };
    let uri = match url.split_once("://") {
        None => format!("{scheme}://{url}"),
        Some(("http", rest)) if tls => format!("https://{rest}"),
        Some(_) => url.to_owned(),
    };
    Endpoint::from_shared(uri).map_err(|e| AuthError::Setup {
        what: format!("invalid auth service URL {:?}", redact_url(url)),
        source: e.into(),
    })
}

/// The auth service did not answer a call in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct NoAnswer(Duration);

#[async_trait]
impl Authenticator for GrpcAuth {
    async fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Unauthenticated);
        }
        let mut client = self.client.clone();
        let request = IdentityReq {
            token: token.to_owned(),
        };
        let call = client.identify(request);
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => return Err(AuthError::Unavailable(NoAnswer(self.timeout).into())),
            Ok(r) => r,
        };
        match response {
            Ok(res) => {
                let id = res.into_inner().id;
                if id.is_empty() {
                    Err(AuthError::Unauthenticated)
                } else {
                    Ok(Identity { id })
                }
            }
            Err(status) => match status.code() {
                Code::Unauthenticated
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::NotFound => Err(AuthError::Unauthenticated),
                _ => Err(AuthError::Unavailable(status.into())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms_are_accepted() {
        for (given, want) in [
            ("localhost:7001", "http://localhost:7001/"),
            ("http://auth:7001", "http://auth:7001/"),
            ("https://auth:7001", "https://auth:7001/"),
        ] {
            assert_eq!(endpoint_for(given, false).unwrap().uri().to_string(), want);
        }
        assert!(endpoint_for("not a url", false).is_err());
    }

    #[test]
    fn tls_makes_the_scheme_https() {
        for given in [
            "localhost:7001",
            "http://localhost:7001",
            "https://localhost:7001",
        ] {
            assert_eq!(
                endpoint_for(given, true).unwrap().uri().to_string(),
                "https://localhost:7001/",
                "{given}"
            );
        }
    }

    #[test]
    fn a_malformed_url_is_a_setup_error_without_the_password() {
        let Err(e) = endpoint_for("http://user:hunter2@auth:7001/bad path", false) else {
            panic!("a malformed URL was accepted");
        };
        assert!(matches!(e, AuthError::Setup { .. }), "{e}");
        assert!(!e.is_transient());
        assert!(std::error::Error::source(&e).is_some());
        let text = crate::error::chain(&e);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("auth:7001"), "{text}");
    }
}
