//! External programs the tests run, named by environment variables that `scripts/test`
//! sets; a plain `cargo test` leaves them unset and the tests needing them are skipped.

/// The path in `var`, or None (after saying that `suite` was skipped) when it is unset.
pub fn tool(var: &str, suite: &str) -> Option<String> {
    let path = std::env::var(var).ok().filter(|v| !v.is_empty());
    if path.is_none() {
        use std::io::Write as _;
        // Straight to stderr: the harness swallows the output of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "{suite} skipped: {var} is not set (the path of the tool)"
        );
    }
    path
}
