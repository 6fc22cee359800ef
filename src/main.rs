//! Wiring only: the command line, configuration, telemetry, application, run until a
//! signal.
//!
//! `twins` (or `twins serve`) runs the service; `twins healthcheck` (also
//! `twins --healthcheck`, as container images call it) checks a running instance (see
//! `healthcheck`); `twins migrate ...` copies the data of one store into another (see
//! `migrate`). Unknown arguments are an error.
//!
//! Exit codes: 0 after a graceful shutdown (SIGTERM or SIGINT) or a healthy check,
//! 1 when start-up, serving or the check fails, 2 for bad arguments or an invalid
//! configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use twins::app::{Application, shutdown_signal};
use twins::config::Config;
use twins::error::chain;

/// The allocator: the service allocates and frees many small buffers per message and
/// per event (JSON values, strings), which glibc's allocator serves at about twice the
/// cost. With the `override` feature it also serves SQLite's own allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest wait for the trace exporter to send the last spans on exit.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait, after the service stopped, for background work still running.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Digital twins for Magistrala: twins, their states from device messages, and
/// versioned documents, over a REST API and the message broker.
#[derive(Debug, Parser)]
#[command(
    name = "twins",
    version = twins::VERSION_LINE,
    after_help = "Configuration comes from the environment (MG_TWINS_*, MG_AUTH_GRPC_*, \
MG_MESSAGE_BROKER_URL, ...; see the README). With none, the service runs on an embedded \
SQLite store in ./data with a development token printed at start-up."
)]
struct Cli {
    /// Same as `twins healthcheck` (kept for container images).
    #[arg(long, hide = true)]
    healthcheck: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (what `twins` alone does).
    Serve,
    /// Ask the instance configured by the environment for GET /health; exit 0 when it
    /// answers 200.
    Healthcheck,
    /// Copy twins, states, documents and ingest positions from one store to another.
    Migrate(twins::migrate::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; mistakes to stderr with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match (cli.healthcheck, cli.command) {
        (true, _) | (false, Some(Command::Healthcheck)) => twins::healthcheck::run(),
        (false, Some(Command::Migrate(args))) => twins::migrate::main(&args),
        (false, None | Some(Command::Serve)) => run_service(),
    }
}

fn run_service() -> ExitCode {
    without_huge_pages();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twins: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime: the exporter runs on threads of its own.
    let telemetry = twins::telemetry::init(&config.telemetry());
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
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

/// Turns transparent huge pages off for this process. The allocator gives memory back
/// to the system in small pieces and takes it again under load; where a region is
/// backed by huge pages, each reuse faults in and zeroes a whole 2 MiB page. Under
/// ingestion that zeroing took 11-20% of the service's CPU (BENCHMARKS.md, "Without
/// transparent huge pages"). A kernel that refuses leaves the setting as it was.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integers only and sets a flag of this
        // process; no memory is passed.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            eprintln!(
                "twins: transparent huge pages left as they are: {}",
                std::io::Error::last_os_error()
            );
        }
    }
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
