//! Wiring only: configuration, telemetry, application, run until a signal.

use std::process::ExitCode;

use twins::app::{Application, shutdown_signal};
use twins::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twins: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    twins::telemetry::init(&config);
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            eprintln!("twins: start-up failed: {e}");
            return ExitCode::from(1);
        }
    };
    match app.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::from(1)
        }
    }
}
