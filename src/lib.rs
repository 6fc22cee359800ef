//! twins: digital twins service, a drop-in replacement for the Magistrala twins service.

pub mod app;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod config;
pub mod domain;
pub mod error;
pub mod healthcheck;
pub mod http;
pub mod migrate;
pub mod proto;
pub mod service;
pub mod store;
pub mod telemetry;

/// What `twins --version` prints after the name: the version, the commit and when it
/// was built (the same as `/health` reports).
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TWINS_COMMIT"),
    ", built ",
    env!("TWINS_BUILD_TIME"),
    ")"
);
