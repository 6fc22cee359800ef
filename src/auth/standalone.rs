//! A single fixed identity, used when the deployment has no auth service.

use async_trait::async_trait;

use super::{AuthError, Authenticator, Identity};

/// Accepts exactly one token, which identifies exactly one id.
pub struct Standalone {
    id: String,
    token: String,
}

impl Standalone {
    pub fn new(id: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            token: token.into(),
        }
    }

    /// A development identity with a fresh random token (122 random bits).
    pub fn development() -> Self {
        Self::new("development", uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn token(&self) -> &str {
        &self.token
    }
}

/// Compares without stopping at the first differing byte, so response time does not
/// reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl Authenticator for Standalone {
    async fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        if !token.is_empty() && constant_time_eq(token.as_bytes(), self.token.as_bytes()) {
            Ok(Identity {
                id: self.id.clone(),
            })
        } else {
            Err(AuthError::Unauthenticated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_configured_token_is_accepted() {
        let a = Standalone::new("owner", "secret");
        let identity = a.identify("secret").await.expect("the configured token");
        assert_eq!(identity.id, "owner");
        for bad in ["", "secre", "secret2", "SECRET"] {
            assert!(
                matches!(a.identify(bad).await, Err(AuthError::Unauthenticated)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn development_tokens_are_random() {
        assert_ne!(
            Standalone::development().token(),
            Standalone::development().token()
        );
        assert_eq!(Standalone::development().token().len(), 32);
    }
}
