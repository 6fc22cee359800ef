//! Logging: the tracing subscriber, filtered by `MG_TWINS_LOG_LEVEL`.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. `MG_TWINS_LOG_LEVEL` takes a level (`debug`) or a
/// full filter (`info,twins=debug`); an invalid one falls back to `info` with a warning.
pub fn init(config: &Config) {
    let (filter, bad) = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new("info"), true),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let installed = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_ok() && bad {
        tracing::warn!(level = %config.log_level, "invalid MG_TWINS_LOG_LEVEL, using info");
    }
}
