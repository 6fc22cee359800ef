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

    watch_git_head();
    // Builds without a git checkout (container images) pass the commit in TWINS_COMMIT.
    println!("cargo:rerun-if-env-changed=TWINS_COMMIT");
    let from_env = std::env::var("TWINS_COMMIT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "unknown");
    let commit = from_env
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TWINS_COMMIT={commit}");
    let built = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    println!("cargo:rustc-env=TWINS_BUILD_TIME={built}");
    Ok(())
}

/// Makes cargo rerun this script when the checked-out commit changes: HEAD itself (a
/// switch of branch or a detached checkout), the directory of the branch it points at (a
/// commit), and the packed refs (a branch whose ref was packed), each only if it exists.
/// Works in worktrees, where `.git` is a file, by asking git where its directories are.
fn watch_git_head() {
    let Some(git_dir) = git(&["rev-parse", "--git-dir"]) else {
        return;
    };
    let common = git(&["rev-parse", "--git-common-dir"]).unwrap_or_else(|| git_dir.clone());
    // A path that does not exist would make cargo run this script on every build, and
    // the build time it records would then rebuild the crate each time.
    let watch = |path: String| {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    watch(format!("{git_dir}/HEAD"));
    watch(format!("{common}/packed-refs"));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // The directory, not the file: a branch whose ref was packed gets its file back
        // with its next commit.
        if let Some((dir, _)) = branch.rsplit_once('/') {
            watch(format!("{common}/{dir}"));
        }
    }
}

/// What `git <args>` prints, trimmed; None when git fails or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
