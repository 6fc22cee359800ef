//! Health of the service's dependencies, as `GET /health` reports it.
//!
//! Each dependency is a [`Dependency`] port: the store is critical (the service fails
//! without it), the broker and the cache are not (the API keeps serving while they are
//! away, the consumer reconnects by itself, lookups go to the store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::cache::TwinCache;
use crate::store::Store;

/// One dependency's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Pass,
    /// Not usable right now; the word is shown to clients (`unavailable`,
    /// `disconnected`), the cause only logged.
    Down(&'static str),
}

/// Something the service depends on.
#[async_trait]
pub trait Dependency: Send + Sync {
    /// Its name in the report.
    fn name(&self) -> &'static str;
    /// Whether the service fails without it (as opposed to serving degraded).
    fn critical(&self) -> bool;
    /// Whether it answers now.
    async fn check(&self) -> Check;
}

/// Overall state: every dependency answers, only non-critical ones are away, or a
/// critical one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One dependency's part of a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    pub critical: bool,
    pub check: Check,
    /// How long it took to answer.
    pub took: Duration,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// What [`Health::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub status: Status,
    pub checks: Vec<Component>,
}

/// Checks every dependency.
#[derive(Clone)]
pub struct Health {
    dependencies: Vec<Arc<dyn Dependency>>,
}

impl Health {
    pub fn new(dependencies: Vec<Arc<dyn Dependency>>) -> Self {
        Self { dependencies }
    }

    pub async fn check(&self) -> Report {
        let answers = futures::future::join_all(self.dependencies.iter().map(|d| async {
            let started = Instant::now();
            let check = d.check().await;
            (check, started.elapsed())
        }))
        .await;
        let mut status = Status::Pass;
        let mut checks = Vec::with_capacity(answers.len());
        let at = chrono::Utc::now();
        for (d, (check, took)) in self.dependencies.iter().zip(answers) {
            if check != Check::Pass {
                status = match (d.critical(), status) {
                    (true, _) | (false, Status::Fail) => Status::Fail,
                    (false, _) => Status::Warn,
                };
            }
            checks.push(Component {
                name: d.name(),
                critical: d.critical(),
                check,
                took,
                at,
            });
        }
        Report { status, checks }
    }
}

#[async_trait]
impl Dependency for Store {
    fn name(&self) -> &'static str {
        "store"
    }

    fn critical(&self) -> bool {
        true
    }

    async fn check(&self) -> Check {
        match self.ping().await {
            Ok(()) => Check::Pass,
            Err(e) => {
                // The driver's text names servers and topology: never in a response.
                tracing::warn!(error = %e, "health: store unavailable");
                Check::Down("unavailable")
            }
        }
    }
}

/// The channel cache as a dependency.
pub struct CacheHealth(pub Arc<dyn TwinCache>);

#[async_trait]
impl Dependency for CacheHealth {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Check {
        // The cache logs its outages once each; a line per health check would repeat it.
        match self.0.ping().await {
            Ok(()) => Check::Pass,
            Err(_) => Check::Down("unavailable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, bool, Check);

    #[async_trait]
    impl Dependency for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn critical(&self) -> bool {
            self.1
        }
        async fn check(&self) -> Check {
            self.2.clone()
        }
    }

    async fn status(deps: Vec<Fixed>) -> Status {
        let deps = deps
            .into_iter()
            .map(|d| Arc::new(d) as Arc<dyn Dependency>)
            .collect();
        Health::new(deps).check().await.status
    }

    #[tokio::test]
    async fn a_critical_dependency_down_fails_and_another_only_warns() {
        let down = || Check::Down("x");
        assert_eq!(
            status(vec![
                Fixed("a", true, Check::Pass),
                Fixed("b", false, Check::Pass)
            ])
            .await,
            Status::Pass
        );
        assert_eq!(
            status(vec![
                Fixed("a", true, Check::Pass),
                Fixed("b", false, down())
            ])
            .await,
            Status::Warn
        );
        assert_eq!(
            status(vec![Fixed("a", true, down()), Fixed("b", false, down())]).await,
            Status::Fail
        );
        assert_eq!(
            status(vec![Fixed("b", false, down()), Fixed("a", true, down())]).await,
            Status::Fail
        );
    }
}
