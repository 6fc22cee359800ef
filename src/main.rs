//! Wiring only: configuration, telemetry, application, run until a signal.
//!
//! `twins --healthcheck` checks a running instance instead (see `healthcheck`);
//! `twins migrate ...` copies the data of one store into another (see `migrate`).
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or SIGINT) or a healthy check,
//! 1 when start-up, serving or the check fails, 2 for an invalid configuration.

use std::process::ExitCode;
use std::time::Duration;

use twins::app::{Application, shutdown_signal};
use twins::config::Config;
use twins::error::chain;

/// Longest wait for the trace exporter to send the last spans on exit.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait, after the service stopped, for background work still running.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--healthcheck") {
        return twins::healthcheck::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("migrate") {
        return twins::migrate::main(&args[1..]);
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twins: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime: the exporter runs on threads of its own.
    let telemetry = twins::telemetry::init(&config.telemetry());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twins: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(serve(config));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    telemetry.shutdown(TRACE_FLUSH_TIMEOUT);
    code
}

async fn serve(config: Config) -> ExitCode {
    // Installed first: a SIGTERM during start-up still means a graceful stop.
    let signal = shutdown_signal();
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            // The whole chain: which component failed, and the driver's reason why.
            let error = chain(&e);
            tracing::error!(%error, "start-up failed");
            eprintln!("twins: start-up failed: {error}");
            return ExitCode::from(1);
        }
    };
    match app.run_until(signal).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %chain(&e), "server failed");
            ExitCode::from(1)
        }
    }
}
