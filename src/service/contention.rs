//! Retries of a compare-and-set write that lost to another writer of the same twin or
//! document: until a deadline, with growing random pauses so that contenders spread
//! out instead of colliding again in step. Only a store that stays unavailable, or
//! contention that outlasts the deadline, makes such a write fail.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::time::Instant;

/// How long a write keeps trying against other writers.
const DEADLINE: Duration = Duration::from_secs(10);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// The attempts of one write.
pub struct Contention {
    deadline: Instant,
    attempt: u32,
}

impl Default for Contention {
    fn default() -> Self {
        Self {
            deadline: Instant::now() + DEADLINE,
            attempt: 0,
        }
    }
}

impl Contention {
    /// Whether another attempt may be made; waits a random pause first (none before
    /// the first attempt).
    pub async fn next(&mut self) -> bool {
        self.attempt += 1;
        if self.attempt == 1 {
            return true;
        }
        let ceiling = Duration::from_micros(500u64 << self.attempt.min(7)).min(MAX_PAUSE);
        let pause = ceiling.mul_f64(random_fraction());
        if Instant::now() + pause >= self.deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        true
    }
}

/// A uniformly random number in [0, 1), from the standard library's per-instance
/// random hashing keys (no extra dependency for jitter).
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn attempts_continue_until_the_deadline_and_stop_after_it() {
        let mut c = Contention::default();
        let start = Instant::now();
        let mut attempts = 0;
        while c.next().await {
            attempts += 1;
        }
        assert!(
            attempts > 100,
            "many attempts within the deadline: {attempts}"
        );
        assert!(start.elapsed() <= DEADLINE, "{:?}", start.elapsed());
    }

    #[test]
    fn random_fractions_stay_in_range_and_vary() {
        let xs: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }
}
