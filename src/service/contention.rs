//! Retries of a compare-and-set write that lost to another writer of the same twin or
//! document: until a deadline, with growing random pauses so that contenders spread
//! out instead of colliding again in step. Only a store that stays unavailable, or
//! contention that outlasts the deadline, makes such a write fail.
//!
//! Writers of one twin within this process take turns first (a lock per twin, from a
//! fixed table of [`STRIPES`] locks, so memory does not grow with the twins written):
//! each then reads what the writer before it committed and wins its compare-and-set at
//! once, instead of every contender paying for a losing write, change feed entries
//! included, round after round. The compare-and-set still decides between instances.
//! A write waits at most [`DEADLINE`] for its turn, then has [`DEADLINE`] for its
//! attempts.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::LazyLock;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

/// How long a write keeps trying against other writers.
const DEADLINE: Duration = Duration::from_secs(10);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_millis(50);
/// Locks writers of one twin take turns on; twins that share one only wait longer.
const STRIPES: usize = 1024;

static TURNS: LazyLock<Box<[Mutex<()>]>> =
    LazyLock::new(|| (0..STRIPES).map(|_| Mutex::new(())).collect());

/// The attempts of one write.
pub struct Contention {
    deadline: Instant,
    attempt: u32,
    /// The turn lock of the twin written, taken before the first attempt.
    stripe: Option<&'static Mutex<()>>,
    _turn: Option<MutexGuard<'static, ()>>,
}

impl Default for Contention {
    fn default() -> Self {
        Self {
            deadline: Instant::now() + DEADLINE,
            attempt: 0,
            stripe: None,
            _turn: None,
        }
    }
}

impl Contention {
    /// The attempts of a write to the twin `twin_id`, which take their turn after the
    /// other writers of that twin in this process.
    pub fn of_twin(twin_id: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        twin_id.hash(&mut hasher);
        let i = (hasher.finish() % STRIPES as u64) as usize;
        Self {
            stripe: TURNS.get(i),
            ..Self::default()
        }
    }

    /// Whether another attempt may be made; waits a random pause first (none before
    /// the first attempt, which waits for the twin's turn instead).
    pub async fn next(&mut self) -> bool {
        self.attempt += 1;
        if self.attempt == 1 {
            if let Some(stripe) = self.stripe {
                match tokio::time::timeout_at(self.deadline, stripe.lock()).await {
                    // The attempts get their full time once it is this write's turn.
                    Ok(turn) => {
                        self._turn = Some(turn);
                        self.deadline = Instant::now() + DEADLINE;
                    }
                    Err(_) => return false,
                }
            }
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

    #[tokio::test]
    async fn writers_of_one_twin_take_turns_and_others_do_not_wait() {
        let mut first = Contention::of_twin("twin-a");
        assert!(first.next().await);
        let mut second = Contention::of_twin("twin-a");
        let waited = tokio::time::timeout(Duration::from_millis(50), second.next()).await;
        assert!(waited.is_err(), "the second writer waits for its turn");
        let other = (0..)
            .map(|i| format!("twin-{i}"))
            .find(|t| {
                !std::ptr::eq(
                    Contention::of_twin(t).stripe.unwrap(),
                    first.stripe.unwrap(),
                )
            })
            .expect("a twin on another stripe");
        let mut unrelated = Contention::of_twin(&other);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), unrelated.next())
                .await
                .expect("a writer of another twin does not wait")
        );
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), second.next())
                .await
                .expect("the turn passes once the first writer is done")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_that_does_not_come_before_the_deadline_gives_up() {
        let mut holder = Contention::of_twin("twin-held");
        assert!(holder.next().await);
        let mut waiter = Contention::of_twin("twin-held");
        assert!(!waiter.next().await, "no attempt once the deadline passed");
    }

    #[test]
    fn random_fractions_stay_in_range_and_vary() {
        let xs: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }
}
