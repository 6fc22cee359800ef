//! Builds every component from the configuration, serves HTTP, shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity};

use crate::auth::cache::Cached;
use crate::auth::grpc::{self, GrpcAuth};
use crate::auth::standalone::Standalone;
use crate::auth::{AuthError, Authenticator};
use crate::broker::consumer::Ingestor;
use crate::broker::feed::{FeedRetention, ensure_feed_stream};
use crate::broker::feed_source::JetStreamFeed;
use crate::broker::inband::Responder;
use crate::broker::notifier::Notifier;
use crate::broker::presence::{Hello, Presence};
use crate::broker::relay::StreamPublisher;
use crate::cache::memory::MemoryCache;
use crate::cache::redis::RedisCache;
use crate::cache::repair::Repairing;
use crate::cache::{CacheError, TwinCache};
use crate::config::{AuthMode, Config, GrpcTls};
use crate::http::{self, AppState};
use crate::service::documents::{Documents, DocumentsService};
use crate::service::events::{EventStore, Recorded};
use crate::service::feed::Feed;
use crate::service::health::{CacheHealth, Dependency, Health};
use crate::service::history::HistoryService;
use crate::service::inband::Inband;
use crate::service::ingest::{Ingest, IngestService};
use crate::service::lookup::{CacheMaintaining, TwinLookup};
use crate::service::metered::Metered;
use crate::service::notify::{Notifying, Publish};
use crate::service::outbox::{HEAD_EVERY, HoldAt, Relay, RelaySettings};
use crate::service::retention::Retention;
use crate::service::traced::Traced;
use crate::service::twins::{Twins, TwinsService};
use crate::store::Store;
use crate::store::mongo::MAX_KEPT as MONGO_MAX_KEPT;

/// Every metric of the service with its HELP text (see [`http::metrics::describe`]).
const METRIC_HELP: &[(&str, &str)] = &[
    (
        http::metrics::REQUESTS,
        "HTTP requests answered, by method, route template and status.",
    ),
    (
        http::metrics::LATENCY,
        "Time from a request's arrival to its answer, by method, route template and status, in seconds.",
    ),
    (
        http::metrics::CONNECTIONS_REFUSED,
        "HTTP connections closed unserved because MG_TWINS_HTTP_MAX_CONNECTIONS were open.",
    ),
    (
        http::metrics::CONNECTIONS_OPEN,
        "HTTP connections open, TLS handshakes in progress included.",
    ),
    (
        http::metrics::GO_REQUESTS,
        "Number of requests received (the Go service's metric), by method.",
    ),
    (
        http::metrics::GO_LATENCY,
        "Total duration of requests in seconds (the Go service's metric and unit, whatever the name says), by method.",
    ),
    (
        http::metrics::BUILD_INFO,
        "Version and commit of the running binary; always 1.",
    ),
    (
        http::metrics::DEPENDENCY_UP,
        "Whether a dependency answers (1) or not (0) at the scrape, by dependency: store, broker, cache.",
    ),
    (
        crate::service::metered::RECEIVED,
        "Broker messages applied.",
    ),
    (
        crate::service::metered::DUPLICATES,
        "Broker messages a twin already had (delivered again after a crash), skipped.",
    ),
    (
        crate::service::metered::IGNORED,
        "Broker messages that concern no twin, by reason.",
    ),
    (
        crate::service::metered::REJECTED,
        "Broker messages refused and dead-lettered on twins.deadletter.<reason>, by reason.",
    ),
    (
        crate::service::metered::STATE_WRITES,
        "State writes of ingestion, by kind (insert, update).",
    ),
    (
        crate::broker::consumer::POSITION,
        "Stream sequence of the last message this instance's group applied (set by the instance ingesting).",
    ),
    (
        crate::broker::consumer::PENDING,
        "Messages of the channels stream not yet delivered to the ingesting instance: the ingest lag.",
    ),
    (
        crate::service::outbox::RELAYED,
        "Change events put on the twins-events stream by this instance's relay.",
    ),
    (
        crate::service::outbox::BACKLOG,
        "Change events recorded and not yet on the twins-events stream (set by the instance relaying).",
    ),
    (
        crate::service::outbox::LAG,
        "Seconds from a change event's time stamp (taken just before its change commits) to the twins-events stream's acknowledgement of it, on the instance relaying.",
    ),
    (
        crate::broker::inband::UNANSWERED,
        "Inband document requests left unanswered, by reason.",
    ),
    (
        crate::service::lookup::STORE_LOOKUPS,
        "Channel lookups answered by the store (cache misses).",
    ),
    (
        crate::service::lookup::ANSWERS,
        "Channel lookup answers held in process.",
    ),
    (
        crate::service::lookup::ANSWERS_EVICTED,
        "Channel lookup answers dropped to stay within MG_TWINS_LOOKUP_CACHE_SIZE.",
    ),
    (
        crate::cache::repair::WRITES_QUEUED,
        "Cache writes queued to be made again once Redis is back.",
    ),
    (
        crate::broker::feed_source::BEHIND,
        "Change feed followers dropped for holding MG_TWINS_EVENTS_BUFFER events unread (a catch-up in progress reads on from the stream; an SSE client gets a last overflow event when it reads again).",
    ),
    (http::events::OPEN, "Change feed streams (SSE) open."),
    (http::events::SENT, "Change events sent to SSE clients."),
    (
        http::events::OVERFLOWS,
        "SSE clients disconnected for reading slower than their events came (MG_TWINS_EVENTS_BUFFER).",
    ),
    (
        http::metrics::process::CPU,
        "Total user and system CPU time spent in seconds.",
    ),
    (
        http::metrics::process::RESIDENT,
        "Resident memory size in bytes.",
    ),
    (
        http::metrics::process::VIRTUAL,
        "Virtual memory size in bytes.",
    ),
    (
        http::metrics::process::OPEN_FDS,
        "Number of open file descriptors.",
    ),
    (
        http::metrics::process::MAX_FDS,
        "Maximum number of open file descriptors.",
    ),
    (
        http::metrics::process::START_TIME,
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// The store-wide lease of the change feed relay: one relay per store.
const FEED_RELAY_LEASE: &str = "twins.feed-relay";
/// Outbox entries a relay reads at a time.
const FEED_RELAY_BATCH: usize = 1024;
/// Pause between two looks at an empty outbox: most of an event's way from commit to
/// client when changes are few, and one indexed read of the outbox per pause by the
/// instance that relays (100 a second).
const FEED_RELAY_IDLE: std::time::Duration = std::time::Duration::from_millis(10);
/// Test-only: where the relay stops for good, for a test to kill the process there
/// (`feed-before-publish`, `feed-after-publish`). Not part of the configuration.
const HOLD_VAR: &str = "TWINS_TEST_HOLD_AT";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store at {url}: {source}")]
    Store {
        /// Without its password.
        url: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("auth: {0}")]
    Auth(#[source] AuthError),
    #[error("{0}")]
    Broker(#[source] crate::broker::ConnectError),
    #[error("{0}")]
    Cache(#[source] CacheError),
    #[error("event store at {url}: {source}")]
    Events {
        /// Without its password.
        url: String,
        #[source]
        source: crate::error::Cause,
    },
    #[error("change feed stream: {0}")]
    Feed(#[source] crate::error::Cause),
    #[error("HTTPS: {0}")]
    Tls(#[source] http::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A built service, listening but not yet serving.
pub struct Application {
    listener: TcpListener,
    /// Set when the server certificate and key are configured: HTTPS only.
    tls: Option<Arc<ServerConfig>>,
    router: axum::Router,
    store: Store,
    broker: async_nats::Client,
    ingest: Arc<dyn Ingest>,
    inband: Responder,
    feed: JetStreamFeed,
    /// The one stop signal of every task, streams included.
    stop: CancellationToken,
    config: Config,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let tls = config
            .http_tls
            .as_ref()
            .map(|files| http::tls::server_config(&files.cert, &files.key))
            .transpose()
            .map_err(StartError::Tls)?;
        let store = Store::connect_with(&config.db_url, config.db_pool_size)
            .await
            .map_err(|source| StartError::Store {
                url: crate::error::redact_url(&config.db_url),
                source,
            })?;
        if config.db_url.starts_with("mongodb") && config.document_revisions > MONGO_MAX_KEPT {
            tracing::warn!(
                configured = config.document_revisions,
                kept = MONGO_MAX_KEPT,
                "MG_TWINS_DOCUMENT_REVISIONS is above what a MongoDB document record holds: \
                 fewer revisions are kept"
            );
        }
        let auth = authenticator(&config.auth, config.auth_cache_ttl)?;
        let broker = crate::broker::connect(&config.broker_url)
            .await
            .map_err(StartError::Broker)?;
        let cache: Arc<dyn TwinCache> = match &config.cache_url {
            // Shared and remote: what fails to reach it is made again once it is back.
            Some(url) => Arc::new(Repairing::new(Arc::new(
                RedisCache::connect(url, &config.cache_prefix)
                    .await
                    .map_err(StartError::Cache)?,
            ))),
            None => Arc::new(MemoryCache::default()),
        };
        // The use cases see a store whose twins repository keeps the cache exact.
        let lookup = TwinLookup::new(store.twins.clone(), cache.clone())
            .with_answers(config.lookup_cache_size);
        let events: Option<Arc<dyn EventStore>> = match &config.es_url {
            Some(url) => Some(Arc::from(
                crate::broker::events::connect(url)
                    .await
                    .map_err(|source| StartError::Events {
                        url: crate::error::redact_url(url),
                        source,
                    })?,
            )),
            None => None,
        };
        let mut maintained = store.clone();
        maintained.twins = Arc::new(CacheMaintaining::new(store.twins.clone(), lookup.clone()));
        let (twins, documents, ingest) = use_cases(
            &maintained,
            lookup,
            config.channel_id.as_ref().map(|channel| {
                Arc::new(Notifier::new(broker.clone(), channel.clone())) as Arc<dyn Publish>
            }),
            events,
            &config,
        );
        let inband = Responder::new(Inband::new(documents.clone()), broker.clone());
        let dependencies: Vec<Arc<dyn Dependency>> = vec![
            Arc::new(store.clone()),
            Arc::new(crate::broker::Connection(broker.clone())),
            Arc::new(CacheHealth(cache)),
        ];
        let history = Arc::new(Traced(HistoryService::new(store.clone())));
        let js = async_nats::jetstream::new(broker.clone());
        let feed_retention = feed_retention(&config);
        ensure_feed_stream(&js, feed_retention)
            .await
            .map_err(StartError::Feed)?;
        let feed = JetStreamFeed::new(js, config.events_buffer, feed_retention);
        let stop = CancellationToken::new();
        let events = http::events::EventsState {
            feed: Feed::new(Arc::new(feed.clone()), twins.clone()),
            keep_alive: config.events_keepalive,
            closing: stop.clone(),
        };
        let state = AppState {
            twins,
            documents,
            history,
            events,
            auth,
            health: Health::new(dependencies),
            metrics: {
                http::metrics::describe(METRIC_HELP);
                http::metrics::handle()
            },
            instance_id: config.instance_id.as_str().into(),
        };
        let addr = format!("{}:{}", config.http_host, config.http_port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        Ok(Self {
            listener,
            tls,
            router: http::router(state, config.http_limits.request_timeout),
            store,
            broker,
            ingest,
            inband,
            feed,
            stop,
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], self.config.http_port)))
    }

    /// The store the service writes to, for tests and tools running in-process.
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting connections, lets
    /// in-flight requests finish, stops the consumer after its current batch is applied
    /// and acked, and flushes what the broker client still buffers (acks, notifications),
    /// all within `MG_TWINS_SHUTDOWN_TIMEOUT` from the signal.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = self.local_addr();
        let Self {
            listener,
            tls,
            router,
            store,
            broker,
            ingest,
            inband,
            feed,
            stop,
            config,
        } = self;
        tracing::info!(
            %addr,
            scheme = if tls.is_some() { "https" } else { "http" },
            "twins service listening"
        );
        // One stop signal for every task, and one deadline from the moment it fires.
        let ingestor = Ingestor {
            js: async_nats::jetstream::new(broker.clone()),
            group: config.instance_group.clone(),
            holder: format!("{}/{}", config.instance_id, uuid::Uuid::new_v4().simple()),
            lease: config.ingest_lease,
            ingest,
            log: store.ingest.clone(),
            inband: Some(inband.clone()),
            own_channel: config.channel_id.clone(),
        };
        let presence = Presence {
            client: broker.clone(),
            group: config.instance_group.clone(),
            me: Hello {
                holder: ingestor.holder.clone(),
                single: config.single_instance(),
            },
        };
        let retention = config
            .states_retention
            .and_then(|keep| {
                Retention::new(store.states.clone(), keep, config.states_prune_interval)
            })
            .map(|r| tokio::spawn(r.run(stop.clone())));
        let relay = Relay::new(
            store.outbox.clone(),
            store.ingest.clone(),
            Arc::new(StreamPublisher::new(
                async_nats::jetstream::new(broker.clone()),
                feed_retention(&config),
            )),
            RelaySettings {
                lease_group: FEED_RELAY_LEASE.into(),
                holder: ingestor.holder.clone(),
                lease_ttl: config.ingest_lease,
                batch: FEED_RELAY_BATCH,
                idle: FEED_RELAY_IDLE,
                head_every: HEAD_EVERY,
                hold_at: std::env::var(HOLD_VAR).ok().and_then(|v| HoldAt::parse(&v)),
            },
        )
        .woken_by(store.recorded.clone());
        let relay = tokio::spawn(relay.run(stop.clone()));
        let consumer = tokio::spawn(ingestor.run(stop.clone()));
        // Ends with the stop signal, and with it every change feed stream.
        let tail = tokio::spawn(feed.tail(stop.clone()));
        let presence = tokio::spawn(presence.run(stop.clone()));
        let inband = tokio::spawn({
            let (group, stop) = (config.instance_group.clone(), stop.clone());
            let prefix = config.request_reply.clone();
            async move {
                match prefix {
                    Some(prefix) => inband.serve(prefix, group, stop).await,
                    None => tracing::debug!("inband request/reply is off"),
                }
            }
        });
        let signal = {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    () = shutdown => {
                        tracing::info!("shutting down: finishing in-flight requests and messages");
                        stop.cancel();
                    }
                    () = stop.cancelled() => {}
                }
            }
        };
        let mut server = Box::pin(http::server::serve(
            listener,
            tls,
            router,
            config.http_limits,
            signal,
        ));
        let early = tokio::select! {
            served = &mut server => Some(served),
            () = stop.cancelled() => None,
        };
        stop.cancel();
        let grace = config.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + grace;
        let served = match early {
            Some(served) => served,
            None => match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!(?grace, "shutdown timeout: dropping in-flight requests");
                    Ok(())
                }
            },
        };
        drop(server);
        // The consumer hands back what it buffered and releases its lease; what it had
        // not applied stays unacked below the stored position, for the next holder.
        tail.abort();
        let aborts = [
            consumer.abort_handle(),
            inband.abort_handle(),
            presence.abort_handle(),
            relay.abort_handle(),
        ];
        let tasks = futures::future::join4(consumer, inband, presence, relay);
        if tokio::time::timeout_at(deadline, tasks).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown timeout: leaving unapplied messages to the next holder"
            );
            for task in aborts {
                task.abort();
            }
        }
        // Retention stops between two batches; a batch is one short store call.
        if let Some(task) = retention {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        // Acks and notifications are buffered by the client: write them out, unless the
        // broker is away and the time is up.
        match tokio::time::timeout_at(deadline, broker.flush()).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "broker flush at shutdown failed"),
            Err(_) => tracing::warn!(?grace, "shutdown timeout: broker not flushed"),
            Ok(Ok(())) => {}
        }
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The use cases with their decorators, outermost first: spans, notifications (when a
/// channel is configured), counters on ingestion.
fn use_cases(
    store: &Store,
    lookup: TwinLookup,
    publish: Option<Arc<dyn Publish>>,
    events: Option<Arc<dyn EventStore>>,
    config: &Config,
) -> (Arc<dyn Twins>, Arc<dyn Documents>, Arc<dyn Ingest>) {
    let twins = Recorded::new(
        TwinsService::new(store.clone(), config.max_definitions),
        events.clone(),
    );
    let documents = DocumentsService::new(store.clone(), config.document_revisions);
    let own_channel = config.channel_id.clone();
    let ingest = Recorded::new(
        Metered::new(IngestService::new(store.clone(), lookup, own_channel)),
        events,
    );
    match publish {
        Some(p) => (
            Arc::new(Traced(Notifying::new(twins, p.clone()))),
            Arc::new(Traced(Notifying::new(documents, p.clone()))),
            Arc::new(Traced(Notifying::new(ingest, p))),
        ),
        None => (
            Arc::new(Traced(twins)),
            Arc::new(Traced(documents)),
            Arc::new(Traced(ingest)),
        ),
    }
}

fn authenticator(
    mode: &AuthMode,
    cache_ttl: Option<std::time::Duration>,
) -> Result<Arc<dyn Authenticator>, StartError> {
    Ok(match mode {
        AuthMode::Standalone { id, token } => Arc::new(Standalone::new(id, token)),
        AuthMode::Grpc { url, timeout, tls } => {
            let mut endpoint = grpc::endpoint_for(url, tls.enabled).map_err(StartError::Auth)?;
            if tls.enabled {
                endpoint = endpoint.tls_config(client_tls(tls)?).map_err(|e| {
                    StartError::Auth(AuthError::Setup {
                        what: "TLS to the auth service".into(),
                        source: e.into(),
                    })
                })?;
            }
            let grpc = GrpcAuth::with_endpoint(endpoint, *timeout);
            match cache_ttl {
                Some(ttl) => {
                    tracing::warn!(
                        ttl = ?ttl,
                        "MG_TWINS_AUTH_CACHE_TTL: identified tokens are reused without asking \
                         the auth service; a revoked token keeps working for up to this long"
                    );
                    Arc::new(Cached::new(grpc, ttl))
                }
                None => Arc::new(grpc),
            }
        }
        AuthMode::Development => {
            let dev = Standalone::development();
            tracing::warn!(
                token = %dev.token(),
                "development mode: no MG_TWINS_STANDALONE_ID/_TOKEN and no MG_AUTH_GRPC_URL; \
                 requests must carry this bearer token, valid until restart"
            );
            Arc::new(dev)
        }
    })
}

fn client_tls(tls: &GrpcTls) -> Result<ClientTlsConfig, StartError> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| {
            StartError::Auth(AuthError::Setup {
                what: format!("cannot read {path}"),
                source: e.into(),
            })
        })
    };
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_certs {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
        // TLS without a CA bundle: trust the system's roots.
        None => config.with_native_roots(),
    };
    if let Some(client) = &tls.client {
        config = config.identity(TlsIdentity::from_pem(
            read(&client.cert)?,
            read(&client.key)?,
        ));
    }
    Ok(config)
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called (not
/// when the future is first polled), so a signal that arrives while the service is still
/// starting is not lost: the service then stops as soon as it runs. Must be called
/// within the runtime.
#[cfg(unix)]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "signal handler not installed");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(term) => {},
            () = wait(int) => {},
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How the feed's stream keeps events, from the configuration.
fn feed_retention(config: &Config) -> FeedRetention {
    FeedRetention {
        max_age: config.events_max_age,
        duplicate_window: config.events_duplicate_window,
    }
}
