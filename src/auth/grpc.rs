//! Client of the Magistrala auth service's `Identify` call.

use std::time::Duration;

use async_trait::async_trait;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::{AuthError, Authenticator, Identity};
use crate::proto::magistrala::IdentityReq;
use crate::proto::magistrala::auth_service_client::AuthServiceClient;

/// Identifies tokens by asking the auth service, each call bounded by `timeout`.
pub struct GrpcAuth {
    client: AuthServiceClient<Channel>,
    timeout: Duration,
}

impl GrpcAuth {
    /// Builds a lazily connecting client: an auth service that is down at start-up
    /// makes requests fail with 503 until it comes back, instead of stopping the service.
    /// `url` is `host:port` (as the Go service takes it) or `http(s)://host:port`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Self::with_endpoint(endpoint(url)?, timeout)
    }

    /// Like [`GrpcAuth::new`] with an endpoint already configured (e.g. with TLS).
    pub fn with_endpoint(endpoint: Endpoint, timeout: Duration) -> Result<Self, String> {
        let channel = endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Ok(Self {
            client: AuthServiceClient::new(channel),
            timeout,
        })
    }
}

/// Parses the configured URL, defaulting to plain `http://` when it has no scheme.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    endpoint_for(url, false)
}

/// Parses the configured URL for a plain or a TLS connection. The transport only
/// speaks TLS to `https://` URIs, so with TLS on, a URL without a scheme (the Go
/// service's `host:port`) or with `http://` is taken as `https://`.
pub fn endpoint_for(url: &str, tls: bool) -> Result<Endpoint, String> {
    let scheme = if tls { "https" } else { "http" };
    let uri = match url.split_once("://") {
        None => format!("{scheme}://{url}"),
        Some(("http", rest)) if tls => format!("https://{rest}"),
        Some(_) => url.to_owned(),
    };
    Endpoint::from_shared(uri).map_err(|e| format!("invalid auth service URL {url:?}: {e}"))
}

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
            Err(_) => return Err(AuthError::Unavailable("timed out".into())),
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
                _ => Err(AuthError::Unavailable(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                ))),
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
            assert_eq!(endpoint(given).unwrap().uri().to_string(), want);
        }
        assert!(endpoint("not a url").is_err());
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
}
