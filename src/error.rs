//! What every layer's error type builds on.
//!
//! Each layer has its own error enum whose variants say what kind of failure it was
//! (and so whether a retry can help); the driver's error that caused it is kept whole
//! as the `source()`, so logs show the full chain and nothing is flattened to text.

/// The cause of an error, kept whole for logs and `source()` chains.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources on one line, `outer: inner: innermost`, for logs and for
/// messages to the operator. Sources whose text the outer error already shows are
/// skipped, so wrappers that print `{0}` do not repeat themselves.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// `url` fit for logs and error messages: the password of every `scheme://user:pass@host`
/// in a comma-separated list is replaced by `***` (a lone user part, which some brokers
/// take as a token, is replaced whole). Anything else is kept as given.
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let userinfo = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{userinfo}@{host}{tail}"),
        None => format!("{userinfo}@{host}{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Cause);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_lists_every_source_once() {
        let io = std::io::Error::other("disk on fire");
        assert_eq!(chain(&Middle(io)), "middle: disk on fire");
        let io = std::io::Error::other("disk on fire");
        let outer = Outer(Box::new(Middle(io)));
        assert_eq!(chain(&outer), "outer: middle: disk on fire");
    }

    #[test]
    fn urls_lose_their_passwords_and_tokens() {
        for (given, want) in [
            ("nats://localhost:4222", "nats://localhost:4222"),
            ("nats://u:hunter2@nats:4222", "nats://u:***@nats:4222"),
            ("nats://hunter2@nats:4222", "nats://***@nats:4222"),
            (
                "redis://:hunter2@redis:6379/0?x=a@b",
                "redis://:***@redis:6379/0?x=a@b",
            ),
            (
                "nats://a:hunter2@n1:4222,nats://n2:4222",
                "nats://a:***@n1:4222,nats://n2:4222",
            ),
            ("u:hunter2@host:1", "u:***@host:1"),
            ("host:7001", "host:7001"),
        ] {
            assert_eq!(redact_url(given), want, "{given}");
        }
    }
}
