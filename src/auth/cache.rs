//! An opt-in memory of identified tokens (`MG_TWINS_AUTH_CACHE_TTL`, off by default):
//! a decorator that answers a token identified less than `ttl` ago without asking the
//! authenticator again.
//!
//! What it trades: a token revoked at the auth service keeps working here for up to
//! `ttl`. So it is off unless asked for, its `ttl` is bounded by [`MAX_TTL`], only
//! successful identifications are kept (a rejected token is asked about every time),
//! and it holds at most [`CAPACITY`] tokens, least recently used first out. Tokens are
//! kept as their SHA-256 digests, never in clear.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hashlink::LruCache;

use super::{AuthError, Authenticator, Identity};

/// Longest time an identification may be reused.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// Most tokens remembered: about 100 bytes each.
pub const CAPACITY: usize = 10_000;

type Digest = [u8; 32];

pub struct Cached<A> {
    inner: A,
    ttl: Duration,
    known: Mutex<LruCache<Digest, (Identity, Instant)>>,
}

impl<A: Authenticator> Cached<A> {
    /// `inner` remembered for `ttl`, at most [`MAX_TTL`].
    pub fn new(inner: A, ttl: Duration) -> Self {
        Self {
            inner,
            ttl: ttl.min(MAX_TTL),
            known: Mutex::new(LruCache::new(CAPACITY)),
        }
    }

    fn digest(token: &str) -> Digest {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

#[async_trait]
impl<A: Authenticator> Authenticator for Cached<A> {
    async fn identify(&self, token: &str) -> Result<Identity, AuthError> {
        let key = Self::digest(token);
        let now = Instant::now();
        {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            match known.get(&key) {
                Some((identity, until)) if *until > now => return Ok(identity.clone()),
                Some(_) => {
                    known.remove(&key);
                }
                None => {}
            }
        }
        let identity = self.inner.identify(token).await?;
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (identity.clone(), now + self.ttl));
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Knows `good-<n>` as `user-<n>`; counts the calls it answers.
    #[derive(Default)]
    struct Counting {
        calls: AtomicUsize,
    }

    #[async_trait]
    impl Authenticator for Counting {
        async fn identify(&self, token: &str) -> Result<Identity, AuthError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match token.strip_prefix("good-") {
                Some(n) => Ok(Identity {
                    id: format!("user-{n}"),
                }),
                None => Err(AuthError::Unauthenticated),
            }
        }
    }

    fn calls(c: &Cached<Counting>) -> usize {
        c.inner.calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_known_token_is_answered_from_memory_until_its_time_runs_out() {
        let c = Cached::new(Counting::default(), Duration::from_millis(200));
        for _ in 0..3 {
            assert_eq!(c.identify("good-1").await.unwrap().id, "user-1");
        }
        assert_eq!(calls(&c), 1);
        assert_eq!(c.identify("good-2").await.unwrap().id, "user-2");
        assert_eq!(calls(&c), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.identify("good-1").await.unwrap().id, "user-1");
        assert_eq!(calls(&c), 3, "asked again once the time ran out");
    }

    #[tokio::test]
    async fn a_rejected_token_is_asked_about_every_time() {
        let c = Cached::new(Counting::default(), Duration::from_secs(60));
        for n in 1..=3 {
            assert!(matches!(
                c.identify("bad").await,
                Err(AuthError::Unauthenticated)
            ));
            assert_eq!(calls(&c), n);
        }
    }

    #[tokio::test]
    async fn memory_holds_a_bounded_number_of_tokens_and_time() {
        let c = Cached::new(Counting::default(), Duration::from_secs(3600));
        assert_eq!(c.ttl, MAX_TTL);
        for n in 0..CAPACITY + 10 {
            c.identify(&format!("good-{n}")).await.unwrap();
        }
        assert_eq!(c.known.lock().unwrap().len(), CAPACITY);
        // The least recently used went first.
        let before = calls(&c);
        c.identify("good-0").await.unwrap();
        assert_eq!(calls(&c), before + 1);
        c.identify(&format!("good-{}", CAPACITY + 9)).await.unwrap();
        assert_eq!(calls(&c), before + 1);
    }
}
