//! The one place that reads the environment (SPEC section 9).
//!
//! Variables are read with envy into [`RawEnv`], then turned into the typed [`Config`];
//! any bad value is reported as one line naming the variable. An empty variable counts
//! as unset, as it does for the Go service.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

pub use crate::http::server::Limits as HttpLimits;
pub use crate::telemetry::LogFormat;
use crate::telemetry::Settings as TelemetrySettings;

/// Default HTTP port of the twins service.
pub const DEFAULT_HTTP_PORT: u16 = 9018;
/// Embedded store used when no database is configured.
pub const DEFAULT_DB_URL: &str = "sqlite://./data/twins.db";
/// Broker used when none is configured.
pub const DEFAULT_BROKER_URL: &str = "nats://localhost:4222";
/// What clients may hold when nothing is configured; the README says why these.
pub const DEFAULT_HTTP_LIMITS: HttpLimits = HttpLimits {
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(75),
    max_connections: 512,
    request_timeout: Duration::from_secs(30),
};

/// A configuration problem, already phrased for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn invalid(var: &str, value: &str, why: impl std::fmt::Display) -> Self {
        Self(format!("{var}: invalid value {value:?}: {why}"))
    }
}

/// Every variable as found in the environment (field name = variable name, lowercase).
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    mg_twins_log_level: Option<String>,
    mg_twins_log_format: Option<String>,
    mg_twins_http_host: Option<String>,
    mg_twins_http_port: Option<String>,
    mg_twins_http_server_cert: Option<String>,
    mg_twins_http_server_key: Option<String>,
    mg_twins_server_cert: Option<String>,
    mg_twins_server_key: Option<String>,
    mg_jaeger_url: Option<String>,
    mg_jaeger_trace_ratio: Option<String>,
    mg_twins_db_url: Option<String>,
    mg_twins_db_host: Option<String>,
    mg_twins_db_port: Option<String>,
    mg_twins_db_name: Option<String>,
    mg_twins_db: Option<String>,
    mg_twins_standalone_id: Option<String>,
    mg_twins_standalone_token: Option<String>,
    mg_things_standalone_id: Option<String>,
    mg_things_standalone_token: Option<String>,
    mg_twins_channel_id: Option<String>,
    mg_message_broker_url: Option<String>,
    mg_auth_grpc_url: Option<String>,
    mg_auth_grpc_timeout: Option<String>,
    mg_auth_grpc_client_cert: Option<String>,
    mg_auth_grpc_client_key: Option<String>,
    mg_auth_grpc_server_ca_certs: Option<String>,
    mg_twins_ca_certs: Option<String>,
    mg_twins_client_tls: Option<String>,
    mg_twins_cache_url: Option<String>,
    mg_twins_cache_prefix: Option<String>,
    mg_twins_lookup_cache_size: Option<String>,
    mg_twins_db_pool_size: Option<String>,
    mg_twins_instance_id: Option<String>,
    mg_twins_instance_group: Option<String>,
    mg_send_telemetry: Option<String>,
    mg_twins_shutdown_timeout: Option<String>,
    mg_twins_ingest_lease: Option<String>,
    mg_twins_max_definitions: Option<String>,
    mg_twins_request_reply: Option<String>,
    mg_twins_request_reply_prefix: Option<String>,
    mg_twins_document_revisions: Option<String>,
    mg_twins_http_header_timeout: Option<String>,
    mg_twins_http_idle_timeout: Option<String>,
    mg_twins_http_max_connections: Option<String>,
    mg_twins_http_request_timeout: Option<String>,
    mg_twins_es_url: Option<String>,
    mg_twins_states_retention: Option<String>,
    mg_twins_events_max_age: Option<String>,
    mg_twins_events_duplicate_window: Option<String>,
    mg_twins_auth_cache_ttl: Option<String>,
    mg_twins_events_buffer: Option<String>,
    mg_twins_events_keepalive: Option<String>,
    mg_twins_states_prune_interval: Option<String>,
    /// Every other `MG_*` variable: those of other services are none of ours, but an
    /// `MG_TWINS_*` one is probably misspelled.
    #[serde(flatten)]
    other: HashMap<String, String>,
}

/// Every `MG_TWINS_*` variable the service reads, for suggesting the closest to one it
/// does not know (a unit test checks each is read).
const KNOWN_TWINS_VARS: &[&str] = &[
    "MG_TWINS_LOG_LEVEL",
    "MG_TWINS_LOG_FORMAT",
    "MG_TWINS_HTTP_HOST",
    "MG_TWINS_HTTP_PORT",
    "MG_TWINS_HTTP_SERVER_CERT",
    "MG_TWINS_HTTP_SERVER_KEY",
    "MG_TWINS_SERVER_CERT",
    "MG_TWINS_SERVER_KEY",
    "MG_TWINS_DB_URL",
    "MG_TWINS_DB_HOST",
    "MG_TWINS_DB_PORT",
    "MG_TWINS_DB_NAME",
    "MG_TWINS_DB",
    "MG_TWINS_STANDALONE_ID",
    "MG_TWINS_STANDALONE_TOKEN",
    "MG_TWINS_CHANNEL_ID",
    "MG_TWINS_CA_CERTS",
    "MG_TWINS_CLIENT_TLS",
    "MG_TWINS_CACHE_URL",
    "MG_TWINS_CACHE_PREFIX",
    "MG_TWINS_LOOKUP_CACHE_SIZE",
    "MG_TWINS_DB_POOL_SIZE",
    "MG_TWINS_INSTANCE_ID",
    "MG_TWINS_INSTANCE_GROUP",
    "MG_TWINS_SHUTDOWN_TIMEOUT",
    "MG_TWINS_INGEST_LEASE",
    "MG_TWINS_MAX_DEFINITIONS",
    "MG_TWINS_REQUEST_REPLY",
    "MG_TWINS_REQUEST_REPLY_PREFIX",
    "MG_TWINS_DOCUMENT_REVISIONS",
    "MG_TWINS_HTTP_HEADER_TIMEOUT",
    "MG_TWINS_HTTP_IDLE_TIMEOUT",
    "MG_TWINS_HTTP_MAX_CONNECTIONS",
    "MG_TWINS_HTTP_REQUEST_TIMEOUT",
    "MG_TWINS_ES_URL",
    "MG_TWINS_STATES_RETENTION",
    "MG_TWINS_STATES_PRUNE_INTERVAL",
    "MG_TWINS_EVENTS_MAX_AGE",
    "MG_TWINS_EVENTS_DUPLICATE_WINDOW",
    "MG_TWINS_AUTH_CACHE_TTL",
    "MG_TWINS_EVENTS_BUFFER",
    "MG_TWINS_EVENTS_KEEPALIVE",
];

/// How often retention looks for old states by default: removal within a minute of a
/// state's time running out, at the cost of one indexed read per twin a minute.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Definitions a twin keeps by default: far more than any device model changes, and a
/// twin of that many 1 KiB definitions still fits a MongoDB document with room to spare.
pub const DEFAULT_MAX_DEFINITIONS: usize = 1000;

/// Certificate and key files in PEM format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// TLS settings of the connection to the auth service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcTls {
    /// Turn TLS on even without a CA file (system roots are not bundled: give a CA).
    pub enabled: bool,
    pub ca_certs: Option<String>,
    pub client: Option<TlsFiles>,
}

/// How bearer tokens are turned into identities (SPEC section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// One fixed token for one fixed id.
    Standalone { id: String, token: String },
    /// The Magistrala auth service over gRPC.
    Grpc {
        url: String,
        timeout: Duration,
        tls: GrpcTls,
    },
    /// Nothing configured: a random token, printed at start-up.
    Development,
}

/// The whole typed configuration of the service.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub log_level: String,
    pub log_format: LogFormat,
    pub http_host: String,
    pub http_port: u16,
    pub http_tls: Option<TlsFiles>,
    pub http_limits: HttpLimits,
    pub jaeger_url: Option<String>,
    pub jaeger_trace_ratio: f64,
    pub db_url: String,
    pub auth: AuthMode,
    pub channel_id: Option<String>,
    pub broker_url: String,
    pub cache_url: Option<String>,
    /// Prepended to every Redis key, so deployments can share one Redis.
    pub cache_prefix: String,
    /// Store answers for a (channel, subtopic) remembered in process, "no twin"
    /// included (at least 1).
    pub lookup_cache_size: usize,
    /// Most connections to a PostgreSQL store (at least 1).
    pub db_pool_size: u32,
    pub instance_id: String,
    pub instance_group: String,
    pub shutdown_timeout: Duration,
    /// How long the group's ingestion lease lasts without renewal: how soon another
    /// instance takes over from one that died.
    pub ingest_lease: Duration,
    /// Most definitions a twin keeps: every message reads them all, and MongoDB keeps
    /// a twin in one document of at most 16 MiB.
    pub max_definitions: usize,
    /// The subject prefix on which trusted callers use the inband API over NATS
    /// request/reply; None (the default) when that is off, since it carries no
    /// credentials.
    pub request_reply: Option<String>,
    /// Magistrala's event store (`nats://` or `redis://`), where the Go service's events
    /// go; None: none are published.
    pub es_url: Option<String>,
    /// Things worth a warning once logging runs (misspelled variables, say).
    pub warnings: Vec<String>,
    /// How long states are kept (`MG_TWINS_STATES_RETENTION`); None keeps them forever.
    pub states_retention: Option<Duration>,
    /// How often retention looks for old states.
    pub states_prune_interval: Duration,
    /// Earlier revisions kept per document besides its current version (0: none).
    pub document_revisions: u32,
    /// How long the change feed's stream keeps events (`MG_TWINS_EVENTS_MAX_AGE`).
    pub events_max_age: Duration,
    /// How long the feed's stream remembers an event's message id, so that a relay
    /// publishing it again within that time is de-duplicated
    /// (`MG_TWINS_EVENTS_DUPLICATE_WINDOW`; the stream gets at most `events_max_age`).
    pub events_duplicate_window: Duration,
    /// How long an identified token is reused without asking the auth service again
    /// (`MG_TWINS_AUTH_CACHE_TTL`); None, the default, asks on every request.
    pub auth_cache_ttl: Option<Duration>,
    /// Events held for one SSE client that reads slower than they come
    /// (`MG_TWINS_EVENTS_BUFFER`); a client further behind is disconnected.
    pub events_buffer: usize,
    /// Time between the comment lines that keep an idle SSE connection open
    /// (`MG_TWINS_EVENTS_KEEPALIVE`).
    pub events_keepalive: Duration,
}

/// Events held per SSE client by default: a burst of a few seconds of one busy twin.
pub const DEFAULT_EVENTS_BUFFER: usize = 1024;

/// Time between keep-alive comments on an SSE connection by default (SPEC 12).
pub const DEFAULT_EVENTS_KEEPALIVE: Duration = Duration::from_secs(15);

/// How long the change feed keeps events by default: a week of disconnection.
pub const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long the feed's stream remembers message ids by default: long enough for the
/// publishes still on their way when one relay hands over to another (a relay that
/// starts looks on the stream for what an earlier one published). NATS keeps every id
/// of the window in memory (about 190 bytes each).
pub const DEFAULT_EVENTS_DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Most earlier revisions a document may keep: each can hold 64 KiB of data.
pub const MAX_DOCUMENT_REVISIONS: u32 = 10_000;

/// A whole number of at least 1 in `var`, `default` when unset.
fn count(var: &'static str, value: Option<String>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ConfigError::invalid(
                var,
                &v,
                "must be a whole number of at least 1".to_owned(),
            )),
        },
    }
}

impl Config {
    /// What telemetry needs of this configuration.
    pub fn telemetry(&self) -> TelemetrySettings {
        TelemetrySettings {
            log_level: self.log_level.clone(),
            log_format: self.log_format,
            export_url: self.jaeger_url.clone(),
            trace_ratio: self.jaeger_trace_ratio,
            instance_id: self.instance_id.clone(),
        }
    }

    /// Why this configuration serves one instance only (SPEC section 13): a SQLite
    /// store, the in-process cache, or both; None when instances can share the group.
    pub fn single_instance(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.db_url.starts_with("sqlite://") {
            why.push("SQLite store");
        }
        if self.cache_url.is_none() {
            why.push("in-process cache");
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables as if they were the environment.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, v)| k.starts_with("MG_") && !v.is_empty())
            .collect();
        let raw: RawEnv = envy::from_iter(vars).map_err(|e| ConfigError(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawEnv) -> Result<Self, ConfigError> {
        let warnings = unknown_vars(&raw.other);
        let log_level = log_level(raw.mg_twins_log_level)?;
        let instance_group = instance_group(raw.mg_twins_instance_group)?;
        if let Some(url) = &raw.mg_message_broker_url {
            check_broker_url(url)?;
        }
        if let Some(url) = &raw.mg_twins_cache_url {
            check_cache_url(url)?;
        }
        if let Some(url) = &raw.mg_twins_es_url {
            check_schemes("MG_TWINS_ES_URL", url, &["nats", "tls", "redis", "rediss"])?;
        }
        let log_format = match raw.mg_twins_log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "MG_TWINS_LOG_FORMAT",
                    other,
                    "expected text or json",
                ));
            }
        };
        let http_port = match raw.mg_twins_http_port {
            None => DEFAULT_HTTP_PORT,
            Some(p) => p
                .parse()
                .map_err(|e| ConfigError::invalid("MG_TWINS_HTTP_PORT", &p, e))?,
        };
        let http_tls = tls_pair(
            (
                "MG_TWINS_HTTP_SERVER_CERT",
                raw.mg_twins_http_server_cert.or(raw.mg_twins_server_cert),
            ),
            (
                "MG_TWINS_HTTP_SERVER_KEY",
                raw.mg_twins_http_server_key.or(raw.mg_twins_server_key),
            ),
        )?;
        let jaeger_trace_ratio = match raw.mg_jaeger_trace_ratio {
            None => 1.0,
            Some(r) => match r.parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => v,
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        "MG_JAEGER_TRACE_RATIO",
                        &r,
                        "must be between 0 and 1",
                    ));
                }
                Err(e) => return Err(ConfigError::invalid("MG_JAEGER_TRACE_RATIO", &r, e)),
            },
        };
        if let Some(url) = &raw.mg_jaeger_url {
            crate::telemetry::otlp_traces_endpoint(url)
                .map_err(|e| ConfigError::invalid("MG_JAEGER_URL", url, e))?;
        }
        let db_url = match (raw.mg_twins_db_url, raw.mg_twins_db_host) {
            (Some(url), _) => url,
            (None, Some(host)) => {
                let port = match raw.mg_twins_db_port {
                    None => 27017,
                    Some(p) => p
                        .parse::<u16>()
                        .map_err(|e| ConfigError::invalid("MG_TWINS_DB_PORT", &p, e))?,
                };
                let name = raw
                    .mg_twins_db_name
                    .or(raw.mg_twins_db)
                    .unwrap_or_else(|| "magistrala".into());
                format!("mongodb://{host}:{port}/{name}")
            }
            (None, None) => DEFAULT_DB_URL.into(),
        };
        check_db_url(&db_url)?;
        let auth = auth_mode(
            raw.mg_twins_standalone_id.or(raw.mg_things_standalone_id),
            raw.mg_twins_standalone_token
                .or(raw.mg_things_standalone_token),
            raw.mg_auth_grpc_url,
            raw.mg_auth_grpc_timeout,
            GrpcTlsRaw {
                enabled: raw.mg_twins_client_tls,
                ca: raw.mg_auth_grpc_server_ca_certs.or(raw.mg_twins_ca_certs),
                cert: raw.mg_auth_grpc_client_cert,
                key: raw.mg_auth_grpc_client_key,
            },
        )?;
        if let Some(v) = raw.mg_send_telemetry {
            parse_bool("MG_SEND_TELEMETRY", &v)?;
        }
        let shutdown_timeout = match raw.mg_twins_shutdown_timeout {
            None => Duration::from_secs(10),
            Some(v) => parse_duration(&v)
                .map_err(|e| ConfigError::invalid("MG_TWINS_SHUTDOWN_TIMEOUT", &v, e))?,
        };
        let ingest_lease = match raw.mg_twins_ingest_lease {
            None => Duration::from_secs(10),
            Some(v) => match parse_duration(&v) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        "MG_TWINS_INGEST_LEASE",
                        &v,
                        "must be at least 1s".to_owned(),
                    ));
                }
                Err(e) => return Err(ConfigError::invalid("MG_TWINS_INGEST_LEASE", &v, e)),
            },
        };
        let max_definitions = count(
            "MG_TWINS_MAX_DEFINITIONS",
            raw.mg_twins_max_definitions,
            DEFAULT_MAX_DEFINITIONS,
        )?;
        let lookup_cache_size = count(
            "MG_TWINS_LOOKUP_CACHE_SIZE",
            raw.mg_twins_lookup_cache_size,
            crate::service::lookup::DEFAULT_ANSWERS,
        )?;
        let db_pool_size = count(
            "MG_TWINS_DB_POOL_SIZE",
            raw.mg_twins_db_pool_size,
            crate::store::postgres::DEFAULT_POOL_SIZE as usize,
        )?;
        let db_pool_size = u32::try_from(db_pool_size).map_err(|e| {
            ConfigError::invalid("MG_TWINS_DB_POOL_SIZE", &db_pool_size.to_string(), e)
        })?;
        let request_reply = request_reply(
            raw.mg_twins_request_reply,
            raw.mg_twins_request_reply_prefix,
        )?;
        let states_retention = raw
            .mg_twins_states_retention
            .map(|v| positive_duration("MG_TWINS_STATES_RETENTION", Some(v), Duration::ZERO))
            .transpose()?;
        let auth_cache_ttl = match raw.mg_twins_auth_cache_ttl {
            None => None,
            Some(v) => {
                match positive_duration("MG_TWINS_AUTH_CACHE_TTL", Some(v.clone()), Duration::ZERO)?
                {
                    d if d > crate::auth::cache::MAX_TTL => {
                        return Err(ConfigError::invalid(
                            "MG_TWINS_AUTH_CACHE_TTL",
                            &v,
                            "must be at most 5m: a revoked token keeps working for that long",
                        ));
                    }
                    d => Some(d),
                }
            }
        };
        let events_max_age = positive_duration(
            "MG_TWINS_EVENTS_MAX_AGE",
            raw.mg_twins_events_max_age,
            DEFAULT_EVENTS_MAX_AGE,
        )?;
        let events_duplicate_window = positive_duration(
            "MG_TWINS_EVENTS_DUPLICATE_WINDOW",
            raw.mg_twins_events_duplicate_window,
            DEFAULT_EVENTS_DUPLICATE_WINDOW,
        )?;
        let events_buffer = count(
            "MG_TWINS_EVENTS_BUFFER",
            raw.mg_twins_events_buffer,
            DEFAULT_EVENTS_BUFFER,
        )?;
        let events_keepalive = positive_duration(
            "MG_TWINS_EVENTS_KEEPALIVE",
            raw.mg_twins_events_keepalive,
            DEFAULT_EVENTS_KEEPALIVE,
        )?;
        let states_prune_interval = positive_duration(
            "MG_TWINS_STATES_PRUNE_INTERVAL",
            raw.mg_twins_states_prune_interval,
            DEFAULT_PRUNE_INTERVAL,
        )?;
        let document_revisions = match raw.mg_twins_document_revisions {
            None => crate::service::documents::DEFAULT_REVISIONS,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if n <= MAX_DOCUMENT_REVISIONS => n,
                _ => {
                    return Err(ConfigError::invalid(
                        "MG_TWINS_DOCUMENT_REVISIONS",
                        &v,
                        format!("must be a whole number from 0 to {MAX_DOCUMENT_REVISIONS}"),
                    ));
                }
            },
        };
        let defaults = DEFAULT_HTTP_LIMITS;
        let http_limits = HttpLimits {
            header_timeout: positive_duration(
                "MG_TWINS_HTTP_HEADER_TIMEOUT",
                raw.mg_twins_http_header_timeout,
                defaults.header_timeout,
            )?,
            idle_timeout: positive_duration(
                "MG_TWINS_HTTP_IDLE_TIMEOUT",
                raw.mg_twins_http_idle_timeout,
                defaults.idle_timeout,
            )?,
            max_connections: match raw.mg_twins_http_max_connections {
                None => defaults.max_connections,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    Ok(_) => {
                        return Err(ConfigError::invalid(
                            "MG_TWINS_HTTP_MAX_CONNECTIONS",
                            &v,
                            "must be at least 1",
                        ));
                    }
                    Err(e) => {
                        return Err(ConfigError::invalid("MG_TWINS_HTTP_MAX_CONNECTIONS", &v, e));
                    }
                },
            },
            request_timeout: positive_duration(
                "MG_TWINS_HTTP_REQUEST_TIMEOUT",
                raw.mg_twins_http_request_timeout,
                defaults.request_timeout,
            )?,
        };
        Ok(Self {
            log_level,
            log_format,
            http_host: raw.mg_twins_http_host.unwrap_or_else(|| "0.0.0.0".into()),
            http_port,
            http_tls,
            http_limits,
            jaeger_url: raw.mg_jaeger_url,
            jaeger_trace_ratio,
            db_url,
            auth,
            channel_id: raw.mg_twins_channel_id,
            broker_url: raw
                .mg_message_broker_url
                .unwrap_or_else(|| DEFAULT_BROKER_URL.into()),
            cache_url: raw.mg_twins_cache_url,
            cache_prefix: raw.mg_twins_cache_prefix.unwrap_or_default(),
            lookup_cache_size,
            db_pool_size,
            instance_id: raw
                .mg_twins_instance_id
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            instance_group,
            shutdown_timeout,
            ingest_lease,
            max_definitions,
            request_reply,
            es_url: raw.mg_twins_es_url,
            warnings,
            states_retention,
            events_max_age,
            events_duplicate_window,
            auth_cache_ttl,
            events_buffer,
            events_keepalive,
            states_prune_interval,
            document_revisions,
        })
    }
}

struct GrpcTlsRaw {
    enabled: Option<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

fn auth_mode(
    id: Option<String>,
    token: Option<String>,
    url: Option<String>,
    timeout: Option<String>,
    tls: GrpcTlsRaw,
) -> Result<AuthMode, ConfigError> {
    // Checked whichever mode is chosen: a bad value is a mistake even when unused.
    if let Some(url) = &url {
        check_grpc_url(url).map_err(|e| ConfigError::invalid("MG_AUTH_GRPC_URL", url, e))?;
    }
    if let Some(t) = &timeout {
        parse_duration(t).map_err(|e| ConfigError::invalid("MG_AUTH_GRPC_TIMEOUT", t, e))?;
    }
    for (var, file) in [
        ("MG_AUTH_GRPC_SERVER_CA_CERTS", &tls.ca),
        ("MG_AUTH_GRPC_CLIENT_CERT", &tls.cert),
        ("MG_AUTH_GRPC_CLIENT_KEY", &tls.key),
    ] {
        if let Some(path) = file {
            readable_file(var, path)?;
        }
    }
    match (id, token) {
        (Some(id), Some(token)) => return Ok(AuthMode::Standalone { id, token }),
        (Some(_), None) => {
            return Err(ConfigError(
                "MG_TWINS_STANDALONE_TOKEN: must be set together with MG_TWINS_STANDALONE_ID"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError(
                "MG_TWINS_STANDALONE_ID: must be set together with MG_TWINS_STANDALONE_TOKEN"
                    .into(),
            ));
        }
        (None, None) => {}
    }
    let Some(url) = url else {
        return Ok(AuthMode::Development);
    };
    let timeout = match timeout {
        None => Duration::from_secs(1),
        Some(t) => {
            parse_duration(&t).map_err(|e| ConfigError::invalid("MG_AUTH_GRPC_TIMEOUT", &t, e))?
        }
    };
    let enabled = match tls.enabled {
        None => false,
        Some(v) => parse_bool("MG_TWINS_CLIENT_TLS", &v)?,
    };
    let client = tls_pair(
        ("MG_AUTH_GRPC_CLIENT_CERT", tls.cert),
        ("MG_AUTH_GRPC_CLIENT_KEY", tls.key),
    )?;
    let https = url.to_ascii_lowercase().starts_with("https://");
    Ok(AuthMode::Grpc {
        url,
        timeout,
        tls: GrpcTls {
            enabled: enabled || https || tls.ca.is_some() || client.is_some(),
            ca_certs: tls.ca,
            client,
        },
    })
}

/// Checks the auth service URL the way the gRPC client will take it: `host:port` (the
/// Go service's form) or `http(s)://host[:port][/]`, with a host and a valid port. The
/// client itself is built at start-up, from the same string.
fn check_grpc_url(url: &str) -> Result<(), String> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let uri: axum::http::Uri = full.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "unsupported scheme {other:?}; expected http or https"
            ));
        }
        None => return Err("missing scheme; expected http or https".into()),
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err("missing host; expected host:port".into());
    };
    // The URI parser leaves the port unchecked; a port that is there must be a number.
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'));
    if has_port && authority.port_u16().is_none() {
        return Err("invalid port; expected host:port".into());
    }
    Ok(())
}

fn tls_pair(
    cert: (&str, Option<String>),
    key: (&str, Option<String>),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert.1, key.1) {
        (Some(c), Some(k)) => {
            readable_file(cert.0, &c)?;
            readable_file(key.0, &k)?;
            Ok(Some(TlsFiles { cert: c, key: k }))
        }
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError(format!(
            "{}: must be set together with {}",
            key.0, cert.0
        ))),
        (None, Some(_)) => Err(ConfigError(format!(
            "{}: must be set together with {}",
            cert.0, key.0
        ))),
    }
}

/// The request/reply prefix when request/reply is on. The prefix is one or more NATS
/// subject tokens (no wildcards, no empty tokens), so the subscription covers exactly
/// `<prefix>.<twinID>.<document>.<op>`.
fn request_reply(
    enabled: Option<String>,
    prefix: Option<String>,
) -> Result<Option<String>, ConfigError> {
    let enabled = match enabled {
        Some(v) => parse_bool("MG_TWINS_REQUEST_REPLY", &v)?,
        None => false,
    };
    let prefix = prefix.unwrap_or_else(|| "twins".into());
    let valid = prefix.split('.').all(|token| {
        !token.is_empty()
            && token
                .chars()
                .all(|c| !c.is_whitespace() && c != '*' && c != '>')
    });
    if !valid {
        return Err(ConfigError::invalid(
            "MG_TWINS_REQUEST_REPLY_PREFIX",
            &prefix,
            "must be NATS subject tokens separated by dots, without wildcards or spaces".to_owned(),
        ));
    }
    Ok(enabled.then_some(prefix))
}

/// A duration that must be more than zero (a zero limit would close every connection
/// or fail every request), or `default` when unset.
fn positive_duration(
    var: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else {
        return Ok(default);
    };
    match parse_duration(&v) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(ConfigError::invalid(var, &v, "must be more than 0")),
        Err(e) => Err(ConfigError::invalid(var, &v, e)),
    }
}

/// A file the service will read at start-up: it must be there and be a file.
fn readable_file(var: &str, path: &str) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(var, path, "not a file")),
        Err(e) => Err(ConfigError::invalid(var, path, e)),
    }
}

/// Level names of `MG_TWINS_LOG_LEVEL`.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// A level name (any case), or filter directives (`info,twins=debug`): every bare word
/// must be a level, since a bare word is otherwise taken as a target name and silences
/// every log line.
fn log_level(value: Option<String>) -> Result<String, ConfigError> {
    let Some(v) = value else {
        return Ok("info".into());
    };
    let lower = v.trim().to_ascii_lowercase();
    let bad = |why: String| ConfigError::invalid("MG_TWINS_LOG_LEVEL", &v, why);
    for directive in lower.split(',') {
        if !directive.contains('=') && !LOG_LEVELS.contains(&directive.trim()) {
            return Err(bad(format!(
                "expected one of {} (or target=level directives)",
                LOG_LEVELS.join(", ")
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(&lower).map_err(|e| bad(e.to_string()))?;
    Ok(lower)
}

/// The group names the durable consumer and the `twins.instances.<group>` subject, so
/// it must be one NATS name token.
fn instance_group(value: Option<String>) -> Result<String, ConfigError> {
    let group = value.unwrap_or_else(|| "twins".into());
    let ok = group.len() <= 64
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(ConfigError::invalid(
            "MG_TWINS_INSTANCE_GROUP",
            &group,
            "must be 1 to 64 letters, digits, '-' or '_' (it names a NATS consumer)",
        ));
    }
    Ok(group)
}

/// Each comma-separated URL's scheme is one of `schemes` and a host follows it.
fn check_schemes(var: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let shown = crate::error::redact_url(url);
    for one in url.split(',') {
        let Some((scheme, rest)) = one.trim().split_once("://") else {
            return Err(ConfigError::invalid(
                var,
                &shown,
                format!("expected a URL starting with {}://", schemes.join("://, ")),
            ));
        };
        if !schemes.contains(&scheme.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::invalid(
                var,
                &shown,
                format!(
                    "unsupported scheme {scheme:?}; expected {}",
                    schemes.join(", ")
                ),
            ));
        }
        if rest.is_empty() || rest.starts_with('/') && !scheme.starts_with("redis+unix") {
            return Err(ConfigError::invalid(var, &shown, "missing host"));
        }
    }
    Ok(())
}

fn check_broker_url(url: &str) -> Result<(), ConfigError> {
    check_schemes("MG_MESSAGE_BROKER_URL", url, &["nats", "tls", "ws", "wss"])
}

fn check_cache_url(url: &str) -> Result<(), ConfigError> {
    check_schemes(
        "MG_TWINS_CACHE_URL",
        url,
        &["redis", "rediss", "redis+unix", "unix"],
    )
}

/// The store URL (from `MG_TWINS_DB_URL`, or built from `MG_TWINS_DB_HOST`).
fn check_db_url(url: &str) -> Result<(), ConfigError> {
    const VAR: &str = "MG_TWINS_DB_URL";
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path.ends_with('/') {
            return Err(ConfigError::invalid(
                VAR,
                url,
                "missing file path; expected sqlite://<path to a file>",
            ));
        }
        let file = std::path::Path::new(path);
        if file.is_dir() {
            return Err(ConfigError::invalid(VAR, url, "the path is a directory"));
        }
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
            && parent.exists()
            && !parent.is_dir()
        {
            return Err(ConfigError::invalid(
                VAR,
                url,
                format!("{} is not a directory", parent.display()),
            ));
        }
        return Ok(());
    }
    check_schemes(
        VAR,
        url,
        &["mongodb", "mongodb+srv", "postgres", "postgresql"],
    )
    .map_err(|_| {
        ConfigError::invalid(
            VAR,
            &crate::error::redact_url(url),
            "expected sqlite://<path>, mongodb://<host>/<database> or postgres://<host>/<database>",
        )
    })
}

/// A warning per `MG_TWINS_*` variable the service does not read, naming the closest
/// one it does.
fn unknown_vars(other: &HashMap<String, String>) -> Vec<String> {
    let mut names: Vec<String> = other
        .keys()
        .map(|k| k.to_ascii_uppercase())
        .filter(|k| k.starts_with("MG_TWINS_"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let closest = KNOWN_TWINS_VARS
                .iter()
                .min_by_key(|known| edit_distance(&name, known))
                .copied()
                .unwrap_or("MG_TWINS_LOG_LEVEL");
            format!("{name} is not a variable of this service (ignored); did you mean {closest}?")
        })
        .collect()
}

/// Levenshtein distance, for suggesting a variable name.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn parse_bool(var: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "t" | "yes" => Ok(true),
        "false" | "0" | "f" | "no" => Ok(false),
        _ => Err(ConfigError::invalid(var, v, "expected true or false")),
    }
}

/// Parses a Go duration such as `1s`, `500ms`, `1m30s` or `1.5h`, or a number of days
/// (`30d`, which Go lacks); a bare number is taken as seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {s:?}"))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid number in duration {s:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(format!("unknown unit {unit:?} in duration {s:?}")),
        };
        total += value * scale;
        rest = tail;
    }
    secs_to_duration(total)
}

fn secs_to_duration(secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// Empty files named `names` in a directory of their own (dropped with it), as
    /// certificate and key paths that exist.
    fn files(names: &[&str]) -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = names
            .iter()
            .map(|n| {
                let p = dir.path().join(n);
                std::fs::write(&p, "").unwrap();
                p.display().to_string()
            })
            .collect();
        (dir, paths)
    }

    #[test]
    fn defaults_need_no_environment() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_port, 9018);
        assert_eq!(c.http_host, "0.0.0.0");
        assert_eq!(c.db_url, DEFAULT_DB_URL);
        assert_eq!(c.broker_url, DEFAULT_BROKER_URL);
        assert_eq!(c.auth, AuthMode::Development);
        assert_eq!(c.cache_url, None);
        assert_eq!(c.instance_group, "twins");
        assert_eq!(c.jaeger_trace_ratio, 1.0);
        assert_eq!(c.max_definitions, DEFAULT_MAX_DEFINITIONS);
        assert_eq!(
            c.request_reply, None,
            "request/reply is off unless asked for"
        );
        assert_eq!(c.http_limits, DEFAULT_HTTP_LIMITS);
    }

    #[test]
    fn request_reply_takes_a_prefix_of_subject_tokens() {
        let on = cfg(&[("MG_TWINS_REQUEST_REPLY", "true")]).unwrap();
        assert_eq!(on.request_reply.as_deref(), Some("twins"));
        let prefixed = cfg(&[
            ("MG_TWINS_REQUEST_REPLY", "true"),
            ("MG_TWINS_REQUEST_REPLY_PREFIX", "site-a.twins"),
        ])
        .unwrap();
        assert_eq!(prefixed.request_reply.as_deref(), Some("site-a.twins"));
    }

    #[test]
    fn http_limits_are_read_from_their_variables() {
        let c = cfg(&[
            ("MG_TWINS_HTTP_HEADER_TIMEOUT", "2s"),
            ("MG_TWINS_HTTP_IDLE_TIMEOUT", "1m"),
            ("MG_TWINS_HTTP_MAX_CONNECTIONS", "7"),
            ("MG_TWINS_HTTP_REQUEST_TIMEOUT", "500ms"),
        ])
        .unwrap();
        assert_eq!(
            c.http_limits,
            HttpLimits {
                header_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(60),
                max_connections: 7,
                request_timeout: Duration::from_millis(500),
            }
        );
    }

    #[test]
    fn document_revisions_default_to_100_and_may_be_zero() {
        assert_eq!(cfg(&[]).unwrap().document_revisions, 100);
        for (value, want) in [("0", 0), ("7", 7), ("10000", 10_000)] {
            let c = cfg(&[("MG_TWINS_DOCUMENT_REVISIONS", value)]).unwrap();
            assert_eq!(c.document_revisions, want, "{value}");
        }
    }

    #[test]
    fn db_pool_size_has_a_default_and_is_at_least_one() {
        assert_eq!(cfg(&[]).unwrap().db_pool_size, 10);
        assert_eq!(
            cfg(&[("MG_TWINS_DB_POOL_SIZE", "32")])
                .unwrap()
                .db_pool_size,
            32
        );
        for bad in ["0", "-1", "lots", "99999999999"] {
            let err = cfg(&[("MG_TWINS_DB_POOL_SIZE", bad)])
                .expect_err(bad)
                .to_string();
            assert!(err.starts_with("MG_TWINS_DB_POOL_SIZE"), "{err}");
        }
    }

    #[test]
    fn lookup_cache_size_has_a_default_and_is_at_least_one() {
        assert_eq!(
            cfg(&[]).unwrap().lookup_cache_size,
            crate::service::lookup::DEFAULT_ANSWERS
        );
        let c = cfg(&[("MG_TWINS_LOOKUP_CACHE_SIZE", "50")]).unwrap();
        assert_eq!(c.lookup_cache_size, 50);
        for bad in ["0", "-1", "many"] {
            let err = cfg(&[("MG_TWINS_LOOKUP_CACHE_SIZE", bad)])
                .expect_err(bad)
                .to_string();
            assert!(err.starts_with("MG_TWINS_LOOKUP_CACHE_SIZE"), "{err}");
        }
    }

    #[test]
    fn the_feed_remembers_message_ids_for_ten_minutes_unless_told() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.events_duplicate_window, Duration::from_secs(600));
        let c = cfg(&[("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "2h")]).unwrap();
        assert_eq!(c.events_duplicate_window, Duration::from_secs(2 * 3600));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("MG_TWINS_HTTP_PORT", "abc"),
            ("MG_TWINS_HTTP_PORT", "70000"),
            ("MG_AUTH_GRPC_TIMEOUT", "soon"),
            ("MG_JAEGER_TRACE_RATIO", "2"),
            ("MG_TWINS_CLIENT_TLS", "maybe"),
            ("MG_TWINS_LOG_FORMAT", "xml"),
            ("MG_TWINS_DB_PORT", "x"),
            ("MG_SEND_TELEMETRY", "perhaps"),
            ("MG_TWINS_SHUTDOWN_TIMEOUT", "-1s"),
            ("MG_JAEGER_URL", "https://jaeger:4318"),
            ("MG_TWINS_MAX_DEFINITIONS", "0"),
            ("MG_TWINS_MAX_DEFINITIONS", "many"),
            ("MG_TWINS_REQUEST_REPLY", "sometimes"),
            ("MG_TWINS_REQUEST_REPLY_PREFIX", "a.*"),
            ("MG_TWINS_REQUEST_REPLY_PREFIX", "a..b"),
            ("MG_TWINS_HTTP_HEADER_TIMEOUT", "0s"),
            ("MG_TWINS_HTTP_IDLE_TIMEOUT", "soon"),
            ("MG_TWINS_HTTP_MAX_CONNECTIONS", "0"),
            ("MG_TWINS_HTTP_MAX_CONNECTIONS", "many"),
            ("MG_TWINS_HTTP_REQUEST_TIMEOUT", "0"),
            ("MG_TWINS_DOCUMENT_REVISIONS", "-1"),
            ("MG_TWINS_DOCUMENT_REVISIONS", "some"),
            ("MG_TWINS_DOCUMENT_REVISIONS", "10001"),
            ("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "0s"),
            ("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "a while"),
        ];
        for (var, value) in cases {
            let mut vars = vec![(var, value)];
            if var.starts_with("MG_AUTH") || var == "MG_TWINS_CLIENT_TLS" {
                vars.push(("MG_AUTH_GRPC_URL", "localhost:7001"));
            }
            if var == "MG_TWINS_DB_PORT" {
                vars.push(("MG_TWINS_DB_HOST", "mongo"));
            }
            let err = cfg(&vars).expect_err(var).to_string();
            assert!(err.starts_with(var), "{var}={value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    /// The mistakes operators make (each once seen to start a broken service or fail
    /// later with a vaguer message): one line, naming the variable, no secret.
    #[test]
    fn operator_mistakes_are_one_line_naming_the_variable() {
        let (_dir, f) = files(&["k.pem"]);
        let missing = "/nonexistent/cert.pem";
        // One variable with a bad value each; then mistakes that take several.
        let single = [
            ("MG_TWINS_LOG_LEVEL", "WARNING"),
            ("MG_TWINS_LOG_LEVEL", "verbose"),
            ("MG_TWINS_LOG_LEVEL", "info,loud"),
            ("MG_TWINS_INSTANCE_GROUP", "a.b"),
            ("MG_TWINS_INSTANCE_GROUP", "a b"),
            ("MG_TWINS_INSTANCE_GROUP", "tw*"),
            ("MG_AUTH_GRPC_URL", "ftp://x"),
            ("MG_MESSAGE_BROKER_URL", "amqp://guest:s3cret@rabbit"),
            ("MG_MESSAGE_BROKER_URL", "localhost:4222"),
            ("MG_TWINS_CACHE_URL", "memcached://c:11211"),
            ("MG_TWINS_DB_URL", "mysql://root:s3cret@db/twins"),
            ("MG_TWINS_DB_URL", "postgre://u:s3cret@db/twins"),
            ("MG_TWINS_DB_URL", "sqlite://"),
            ("MG_TWINS_DB_URL", "sqlite:///tmp/"),
            ("MG_TWINS_DB_URL", "sqlite:///etc/hostname/x.db"),
        ];
        let mut cases: Vec<(&str, Vec<(&str, &str)>)> = single
            .iter()
            .map(|&(var, value)| (var, vec![(var, value)]))
            .collect();
        cases.extend([
            (
                "MG_AUTH_GRPC_TIMEOUT",
                vec![
                    ("MG_AUTH_GRPC_TIMEOUT", "fast"),
                    ("MG_TWINS_STANDALONE_ID", "u"),
                    ("MG_TWINS_STANDALONE_TOKEN", "t"),
                ],
            ),
            (
                "MG_TWINS_HTTP_SERVER_CERT",
                vec![
                    ("MG_TWINS_HTTP_SERVER_CERT", missing),
                    ("MG_TWINS_HTTP_SERVER_KEY", &f[0]),
                ],
            ),
            (
                "MG_AUTH_GRPC_SERVER_CA_CERTS",
                vec![
                    ("MG_AUTH_GRPC_URL", "auth:7001"),
                    ("MG_AUTH_GRPC_SERVER_CA_CERTS", missing),
                ],
            ),
        ]);
        for (var, vars) in cases {
            let err = cfg(&vars).expect_err(var).to_string();
            assert!(err.starts_with(var), "{vars:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains("s3cret"), "a password in {err}");
        }
    }

    #[test]
    fn log_levels_take_any_case_and_directives() {
        for (given, kept) in [
            ("WARN", "warn"),
            ("debug", "debug"),
            ("info,twins=debug", "info,twins=debug"),
            ("Off", "off"),
        ] {
            assert_eq!(
                cfg(&[("MG_TWINS_LOG_LEVEL", given)]).unwrap().log_level,
                kept
            );
        }
    }

    #[test]
    fn good_urls_of_every_kind_are_taken() {
        for (var, url) in [
            ("MG_MESSAGE_BROKER_URL", "nats://a:4222,nats://b:4222"),
            ("MG_MESSAGE_BROKER_URL", "tls://nats:4222"),
            ("MG_TWINS_CACHE_URL", "redis://:pw@redis:6379/0"),
            ("MG_TWINS_CACHE_URL", "rediss://redis"),
            (
                "MG_TWINS_DB_URL",
                "postgresql://u:pw@db:5432/twins?sslmode=require",
            ),
            ("MG_TWINS_DB_URL", "mongodb+srv://cluster.example.com/twins"),
            ("MG_TWINS_DB_URL", "sqlite://./data/twins.db"),
        ] {
            assert!(cfg(&[(var, url)]).is_ok(), "{var}={url}");
        }
    }

    #[test]
    fn a_misspelled_variable_is_warned_about_with_the_closest_name() {
        let c = cfg(&[
            ("MG_TWINS_LOG_LEVLE", "debug"),
            ("MG_TWINS_HTTP_PROT", "1"),
            ("MG_THINGS_AUTH_GRPC_URL", "things:7000"),
        ])
        .unwrap();
        assert_eq!(
            c.warnings,
            vec![
                "MG_TWINS_HTTP_PROT is not a variable of this service (ignored); did you mean MG_TWINS_HTTP_PORT?",
                "MG_TWINS_LOG_LEVLE is not a variable of this service (ignored); did you mean MG_TWINS_LOG_LEVEL?",
            ]
        );
        assert!(cfg(&[]).unwrap().warnings.is_empty());
    }

    #[test]
    fn every_known_variable_is_read() {
        let vars = KNOWN_TWINS_VARS
            .iter()
            .map(|v| (v.to_string(), "x".to_string()));
        let raw: RawEnv = envy::from_iter(vars).unwrap();
        assert!(raw.other.is_empty(), "not read: {:?}", raw.other.keys());
    }

    #[test]
    fn the_auth_url_needs_an_http_scheme_and_a_host() {
        for good in [
            "auth:7001",
            "http://auth:7001",
            "https://auth:7001/",
            "[::1]:7001",
        ] {
            assert!(cfg(&[("MG_AUTH_GRPC_URL", good)]).is_ok(), "{good}");
        }
        for bad in ["not a url", "ftp://auth:7001", "http://", "auth:port"] {
            let err = cfg(&[("MG_AUTH_GRPC_URL", bad)])
                .expect_err(bad)
                .to_string();
            assert!(err.starts_with("MG_AUTH_GRPC_URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn empty_variables_count_as_unset() {
        assert_eq!(cfg(&[("MG_TWINS_HTTP_PORT", "")]).unwrap().http_port, 9018);
    }

    #[test]
    fn auth_precedence_is_standalone_then_grpc_then_development() {
        let both = cfg(&[
            ("MG_TWINS_STANDALONE_ID", "u"),
            ("MG_TWINS_STANDALONE_TOKEN", "t"),
            ("MG_AUTH_GRPC_URL", "auth:7001"),
        ])
        .unwrap();
        assert_eq!(
            both.auth,
            AuthMode::Standalone {
                id: "u".into(),
                token: "t".into()
            }
        );
        let alias = cfg(&[
            ("MG_THINGS_STANDALONE_ID", "u"),
            ("MG_THINGS_STANDALONE_TOKEN", "t"),
        ])
        .unwrap();
        assert_eq!(
            alias.auth,
            AuthMode::Standalone {
                id: "u".into(),
                token: "t".into()
            }
        );
        let grpc = cfg(&[
            ("MG_AUTH_GRPC_URL", "auth:7001"),
            ("MG_AUTH_GRPC_TIMEOUT", "250ms"),
        ])
        .unwrap();
        assert!(matches!(
            grpc.auth,
            AuthMode::Grpc { ref url, timeout, .. } if url == "auth:7001" && timeout == Duration::from_millis(250)
        ));
        assert!(cfg(&[("MG_TWINS_STANDALONE_ID", "u")]).is_err());
    }

    #[test]
    fn auth_tls_is_on_with_a_ca_a_client_certificate_https_or_the_flag() {
        let tls_of = |vars: &[(&str, &str)]| match cfg(vars).unwrap().auth {
            AuthMode::Grpc { tls, .. } => tls,
            other => panic!("not gRPC: {other:?}"),
        };
        assert!(!tls_of(&[("MG_AUTH_GRPC_URL", "auth:7001")]).enabled);
        assert!(tls_of(&[("MG_AUTH_GRPC_URL", "https://auth:7001")]).enabled);
        assert!(
            tls_of(&[
                ("MG_AUTH_GRPC_URL", "auth:7001"),
                ("MG_TWINS_CLIENT_TLS", "true")
            ])
            .enabled
        );
        let (_dir, f) = files(&["ca.pem", "c.pem", "k.pem"]);
        let ca = tls_of(&[
            ("MG_AUTH_GRPC_URL", "auth:7001"),
            ("MG_TWINS_CA_CERTS", &f[0]),
        ]);
        assert!(ca.enabled);
        assert_eq!(ca.ca_certs.as_deref(), Some(f[0].as_str()));
        let mtls = tls_of(&[
            ("MG_AUTH_GRPC_URL", "auth:7001"),
            ("MG_AUTH_GRPC_CLIENT_CERT", &f[1]),
            ("MG_AUTH_GRPC_CLIENT_KEY", &f[2]),
        ]);
        assert!(mtls.enabled && mtls.client.is_some());
        assert!(
            cfg(&[
                ("MG_AUTH_GRPC_URL", "auth:7001"),
                ("MG_AUTH_GRPC_CLIENT_CERT", &f[1])
            ])
            .is_err()
        );
    }

    #[test]
    fn mongodb_from_host_port_and_name_aliases() {
        let c = cfg(&[("MG_TWINS_DB_HOST", "mongo"), ("MG_TWINS_DB", "legacy")]).unwrap();
        assert_eq!(c.db_url, "mongodb://mongo:27017/legacy");
        let c = cfg(&[
            ("MG_TWINS_DB_HOST", "m"),
            ("MG_TWINS_DB_PORT", "1"),
            ("MG_TWINS_DB_NAME", "n"),
        ])
        .unwrap();
        assert_eq!(c.db_url, "mongodb://m:1/n");
        let c = cfg(&[
            ("MG_TWINS_DB_URL", "sqlite:///tmp/x.db"),
            ("MG_TWINS_DB_HOST", "m"),
        ])
        .unwrap();
        assert_eq!(c.db_url, "sqlite:///tmp/x.db");
    }

    #[test]
    fn server_cert_aliases() {
        let (_dir, f) = files(&["c.pem", "k.pem"]);
        let c = cfg(&[
            ("MG_TWINS_SERVER_CERT", &f[0]),
            ("MG_TWINS_SERVER_KEY", &f[1]),
        ])
        .unwrap();
        assert_eq!(
            c.http_tls,
            Some(TlsFiles {
                cert: f[0].clone(),
                key: f[1].clone()
            })
        );
        assert!(cfg(&[("MG_TWINS_HTTP_SERVER_CERT", &f[0])]).is_err());
    }

    #[test]
    fn go_durations() {
        for (s, ms) in [
            ("1s", 1000),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("1.5s", 1500),
            ("2", 2000),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "s", "1x", "abc", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn states_retention_takes_days_and_hours_and_is_off_by_default() {
        assert_eq!(cfg(&[]).unwrap().states_retention, None);
        for (v, secs) in [("30d", 30 * 86_400), ("12h", 12 * 3600), ("1d12h", 129_600)] {
            let c = cfg(&[("MG_TWINS_STATES_RETENTION", v)]).unwrap();
            assert_eq!(c.states_retention, Some(Duration::from_secs(secs)), "{v}");
        }
        assert_eq!(
            cfg(&[]).unwrap().states_prune_interval,
            DEFAULT_PRUNE_INTERVAL
        );
    }

    #[test]
    fn the_identity_cache_is_off_by_default_and_bounded() {
        assert_eq!(cfg(&[]).unwrap().auth_cache_ttl, None);
        for (v, secs) in [("30s", 30), ("5m", 300), ("1m30s", 90)] {
            let c = cfg(&[("MG_TWINS_AUTH_CACHE_TTL", v)]).unwrap();
            assert_eq!(c.auth_cache_ttl, Some(Duration::from_secs(secs)), "{v}");
        }
        for bad in ["5m1s", "1h", "0s", "soon"] {
            let e = cfg(&[("MG_TWINS_AUTH_CACHE_TTL", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("MG_TWINS_AUTH_CACHE_TTL") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn a_bad_states_retention_names_the_variable() {
        for bad in ["forever", "0", "0d", "-1d", "30 days"] {
            let e = cfg(&[("MG_TWINS_STATES_RETENTION", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("MG_TWINS_STATES_RETENTION: invalid value"),
                "{bad}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
