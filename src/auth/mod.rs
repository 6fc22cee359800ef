//! Who is calling: turns a bearer token into the identity that owns twins.
//!
//! Three ways, chosen once at start-up (SPEC section 3): a fixed standalone identity,
//! the Magistrala auth service over gRPC, or a development identity with a random token.

pub mod cache;
pub mod grpc;
pub mod standalone;

use async_trait::async_trait;

use crate::error::Cause;

/// Why a token was not turned into an identity, or the authenticator not built.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown or expired token.
    #[error("missing or invalid token")]
    Unauthenticated,
    /// The auth service could not answer (down, slow or failing); the client may retry.
    #[error("authentication service unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The client of the auth service cannot be set up as configured (a malformed URL,
    /// an unreadable certificate); `what` names the setting or file at fault.
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: Cause,
    },
}

impl AuthError {
    /// Whether the same token may be identified later: only when the auth service
    /// could not answer, never for a rejected token or a broken configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// The identity behind a token: the owner of the twins it creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
}

#[async_trait]
pub trait Authenticator: Send + Sync {
    async fn identify(&self, token: &str) -> Result<Identity, AuthError>;
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn only_an_unanswered_call_is_transient() {
        let io = || Box::new(std::io::Error::other("connection refused"));
        assert!(AuthError::Unavailable(io()).is_transient());
        assert!(!AuthError::Unauthenticated.is_transient());
        let setup = AuthError::Setup {
            what: "cannot read ca.pem".into(),
            source: io(),
        };
        assert!(!setup.is_transient());
    }

    #[test]
    fn the_cause_is_the_source() {
        let e = AuthError::Unavailable(Box::new(tonic::Status::unavailable("auth is down")));
        let status = e
            .source()
            .and_then(|s| s.downcast_ref::<tonic::Status>())
            .expect("the gRPC status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
