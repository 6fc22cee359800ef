//! Redis cache in the Go service's key layout, shared by every instance.
//!
//! Keys (after an optional `prefix`, empty in production, which lets tests share one
//! Redis): set `twin:<channel>-<subtopic>` holds twin ids, and set `twin:<twinID>` holds
//! the keys of the former kind that the twin is listed under, so that update and remove
//! know what to clean without reading the store. A Go instance and this one can work on
//! the same Redis.
//!
//! The cache is an accelerator, never a dependency: start-up does not wait for Redis, the
//! connection manager reconnects by itself after Redis restarts, and every operation is
//! bounded by a short timeout so that a stopped or hung Redis costs ingestion a few
//! hundred milliseconds and a fall back to the store, never a stall.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult, RetryMethod, Script};
use tracing::Instrument;

use super::{CacheError, CacheResult, TwinCache};
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};

/// How long one cache operation, reconnection included, may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

/// Replaces the keys a twin is listed under, in one step so that no reader and no
/// crash can observe or leave a half-moved twin. KEYS[1] is the twin's reverse set,
/// KEYS[2..] its new forward keys (none for a remove), ARGV[1] the twin id. Old keys are
/// read from the reverse set inside the script, so the caller needs no prior round trip.
const REPLACE_KEYS: &str = r"
local old = redis.call('SMEMBERS', KEYS[1])
for _, key in ipairs(old) do
  redis.call('SREM', key, ARGV[1])
end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  redis.call('SADD', KEYS[1], KEYS[i])
end
return #old
";

/// [`TwinCache`] over Redis.
pub struct RedisCache {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    replace_script: Script,
}

impl RedisCache {
    /// Prepares a cache on `url` (`redis://host:port/db`). Only a malformed URL is an
    /// error: if Redis cannot be reached now, this logs a warning and every later call
    /// tries again, so the service starts and serves from the store meanwhile.
    pub async fn connect(url: &str, prefix: &str) -> CacheResult<Self> {
        let client = redis::Client::open(url).map_err(|e| CacheError::InvalidUrl(e.into()))?;
        let cache = Self {
            connection: connection_manager(client.clone(), DEFAULT_TIMEOUT)?,
            client,
            prefix: prefix.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            replace_script: Script::new(REPLACE_KEYS),
        };
        match cache.ping().await {
            Ok(()) => tracing::info!("connected to the Redis cache"),
            Err(e) => {
                tracing::warn!(error = %e, "Redis cache unreachable at start-up; retrying on use")
            }
        }
        Ok(cache)
    }

    /// Bounds every operation, reconnection included, by `timeout` instead of
    /// [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(self, timeout: Duration) -> CacheResult<Self> {
        Ok(Self {
            connection: connection_manager(self.client.clone(), timeout)?,
            timeout,
            ..self
        })
    }

    fn attribute_key(&self, channel: &str, subtopic: &str) -> String {
        format!("{}twin:{channel}-{subtopic}", self.prefix)
    }

    fn twin_key(&self, twin_id: &str) -> String {
        format!("{}twin:{twin_id}", self.prefix)
    }

    /// Forward keys of the twin's current definition.
    fn attribute_keys(&self, twin: &Twin) -> Vec<String> {
        twin.current_definition()
            .into_iter()
            .flat_map(|d| &d.attributes)
            .map(|a| self.attribute_key(&a.channel, &a.subtopic))
            .collect()
    }

    /// Runs `op` on the shared connection within the timeout. A connection-level failure
    /// is tried once more: the manager has started reconnecting by then, so the first
    /// call after a Redis restart succeeds instead of failing. Every operation here is
    /// idempotent, so a repeat is harmless even if the first attempt reached Redis.
    async fn run<T, F, Fut>(&self, name: &'static str, op: F) -> CacheResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            match op(self.connection.clone()).await {
                Err(e) if is_connection_error(&e) => op(self.connection.clone()).await,
                result => result,
            }
        };
        let span = tracing::info_span!(
            "cache",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "redis",
            db.operation.name = name,
        );
        let result = match tokio::time::timeout(self.timeout, attempts)
            .instrument(span.clone())
            .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(classify(name, e)),
            Err(_) => Err(CacheError::Timeout {
                operation: name,
                after: self.timeout,
            }),
        };
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        result
    }

    async fn replace_keys(
        &self,
        name: &'static str,
        twin_id: &str,
        keys: &[String],
    ) -> CacheResult<()> {
        let mut invocation = self.replace_script.key(self.twin_key(twin_id));
        invocation.key(keys).arg(twin_id);
        let invocation = &invocation;
        self.run(name, |mut con| async move {
            invocation.invoke_async::<i64>(&mut con).await.map(drop)
        })
        .await
    }
}

/// A manager that connects on first use, tries once per call rather than sleeping
/// through a backoff schedule, and never waits longer than `timeout` on Redis.
fn connection_manager(client: redis::Client, timeout: Duration) -> CacheResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| classify("connect", e))
}

/// Sorts a Redis error by whether the same call can succeed later, as the driver
/// itself would decide whether to retry it.
fn classify(operation: &'static str, e: RedisError) -> CacheError {
    if matches!(e.retry_method(), RetryMethod::NoRetry) {
        CacheError::Failed {
            operation,
            source: e.into(),
        }
    } else {
        CacheError::Unavailable {
            operation,
            source: e.into(),
        }
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

#[async_trait]
impl TwinCache for RedisCache {
    async fn save(&self, twin: &Twin) -> CacheResult<()> {
        let keys = self.attribute_keys(twin);
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in &keys {
            pipe.sadd(key, &twin.id).ignore();
        }
        pipe.sadd(self.twin_key(&twin.id), &keys).ignore();
        let pipe = &pipe;
        self.run(
            "save",
            |mut con| async move { pipe.exec_async(&mut con).await },
        )
        .await
    }

    async fn update(&self, twin: &Twin) -> CacheResult<()> {
        self.replace_keys("update", &twin.id, &self.attribute_keys(twin))
            .await
    }

    async fn save_ids(&self, channel: &str, subtopic: &str, ids: &[String]) -> CacheResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = self.attribute_key(channel, subtopic);
        let mut pipe = redis::pipe();
        pipe.atomic().sadd(&key, ids).ignore();
        for id in ids {
            pipe.sadd(self.twin_key(id), &key).ignore();
        }
        let pipe = &pipe;
        self.run("save_ids", |mut con| async move {
            pipe.exec_async(&mut con).await
        })
        .await
    }

    async fn ids(&self, channel: &str, subtopic: &str) -> CacheResult<Vec<String>> {
        let exact = self.attribute_key(channel, subtopic);
        let wildcard = self.attribute_key(channel, WILDCARD_SUBTOPIC);
        let (exact, wildcard) = (&exact, &wildcard);
        self.run("ids", |mut con| async move {
            redis::cmd("SUNION")
                .arg(exact)
                .arg(wildcard)
                .query_async::<Vec<String>>(&mut con)
                .await
        })
        .await
    }

    async fn remove(&self, twin_id: &str) -> CacheResult<()> {
        self.replace_keys("remove", twin_id, &[]).await
    }

    async fn ping(&self) -> CacheResult<()> {
        self.run("ping", |mut con| async move {
            redis::cmd("PING").query_async::<()>(&mut con).await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_lost_connection_is_transient_and_a_wrong_answer_is_not() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = classify("ids", refused);
        assert!(e.is_transient(), "{e}");
        let source = e.source().expect("the driver error");
        assert!(source.downcast_ref::<RedisError>().is_some());

        let wrong = RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a set"));
        let e = classify("ids", wrong);
        assert!(!e.is_transient(), "{e}");
        assert!(e.source().is_some());
    }

    #[tokio::test]
    async fn a_malformed_url_is_a_permanent_error_that_hides_the_password() {
        let Err(e) = RedisCache::connect("redis://:hunter2@host:port/db", "").await else {
            panic!("a malformed URL was accepted");
        };
        assert!(matches!(e, CacheError::InvalidUrl(_)), "{e}");
        assert!(!e.is_transient());
        assert!(!crate::error::chain(&e).contains("hunter2"), "{e}");
    }
}
