//! Compiles the wire contracts in `proto/` with a pure-Rust protobuf compiler (no system
//! `protoc` needed) and records build information for `/health`.

use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/auth.proto", "proto/message.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    println!("cargo:rerun-if-changed=.git/HEAD");
    // Builds without a git checkout (container images) pass the commit in TWINS_COMMIT.
    println!("cargo:rerun-if-env-changed=TWINS_COMMIT");
    let from_env = std::env::var("TWINS_COMMIT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "unknown");
    let commit = from_env.unwrap_or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    });
    println!("cargo:rustc-env=TWINS_COMMIT={commit}");
    let built = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    println!("cargo:rustc-env=TWINS_BUILD_TIME={built}");
    Ok(())
}
