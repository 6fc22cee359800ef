//! Who is calling: turns a bearer token into the identity that owns twins.
//!
//! Three ways, chosen once at start-up (SPEC section 3): a fixed standalone identity,
//! the Magistrala auth service over gRPC, or a development identity with a random token.

pub mod grpc;
pub mod standalone;

use async_trait::async_trait;

/// Why a token was not turned into an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing, malformed, unknown or expired token.
    #[error("missing or invalid token")]
    Unauthenticated,
    /// The auth service could not answer; the client may retry.
    #[error("authentication service unavailable: {0}")]
    Unavailable(String),
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
