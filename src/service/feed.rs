//! The change feed's read side (SPEC 12): a caller follows the events of their own twins
//! from a cursor, or from now.
//!
//! [`FeedSource`] is the port the broker adapter implements over the feed's stream; the
//! use case [`Feed`] decides what a request may see (only the caller's twins, through
//! subject filters that always start with the caller's owner key), where it starts (the
//! `Last-Event-ID` header or `?after=`) and whether that start is still on the stream.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use super::twins::{Twins, parse_twin_id};
use super::{ServiceError, ServiceResult};
use crate::domain::ValidationError;
use crate::domain::feed::{EventKind, StoredEvent, filters};
use crate::error::Cause;

/// An event with its cursor (its stream sequence).
#[derive(Debug, Clone)]
pub struct FeedEvent {
    pub cursor: u64,
    pub event: StoredEvent,
}

/// What the stream holds: events from `first` to `last` (none when `first > last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub first: u64,
    pub last: u64,
}

impl Bounds {
    /// The oldest cursor a client can resume from without losing an event the stream
    /// held: the one just before the first event kept.
    pub fn oldest_cursor(&self) -> u64 {
        self.first.saturating_sub(1)
    }
}

/// Why following the feed failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The broker cannot be reached, or the feed's tail is not running: retry later.
    #[error("change feed unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The reader fell further behind than its buffer holds; it resumes after
    /// `resume_after`, the last event it was given (or where it started).
    #[error("reader fell behind the feed")]
    Behind { resume_after: u64 },
    /// Events after the reader's position left the stream before they were read.
    #[error("cursor expired")]
    Expired { oldest: u64 },
}

/// The events of one follower, in stream order, each once; ends with an error when the
/// follower can no longer be served.
pub type EventStream = BoxStream<'static, Result<FeedEvent, FeedError>>;

/// The feed's stream, as the use case sees it.
#[async_trait]
pub trait FeedSource: Send + Sync {
    /// The cursors the stream holds now.
    async fn bounds(&self) -> Result<Bounds, FeedError>;

    /// Events on subjects matching any of `filters` (all of one owner) with a cursor
    /// above `after`, or, without `after`, those written from now on. The source holds
    /// a bounded number of events for a slow reader; one that falls further behind gets
    /// [`FeedError::Behind`] after the events it was given.
    async fn follow(
        &self,
        filters: Vec<String>,
        after: Option<u64>,
    ) -> Result<EventStream, FeedError>;
}

/// What a client asked to follow, as given.
#[derive(Debug, Clone, Default)]
pub struct FeedRequest {
    /// One twin (`/twins/{id}/events`), or all the caller's twins.
    pub twin: Option<String>,
    /// `?kinds=`: a comma-separated list; none or empty means every kind.
    pub kinds: Option<String>,
    /// The `Last-Event-ID` header.
    pub last_event_id: Option<String>,
    /// `?after=`.
    pub after: Option<String>,
}

/// The feed use case.
#[derive(Clone)]
pub struct Feed {
    source: Arc<dyn FeedSource>,
    twins: Arc<dyn Twins>,
}

impl Feed {
    pub fn new(source: Arc<dyn FeedSource>, twins: Arc<dyn Twins>) -> Self {
        Self { source, twins }
    }

    /// Opens `owner`'s feed: another owner's twin, or a missing one, is
    /// [`ServiceError::NotFound`]; a cursor whose next events have left the stream is
    /// [`ServiceError::CursorExpired`].
    pub async fn open(&self, owner: &str, request: FeedRequest) -> ServiceResult<EventStream> {
        let kinds = match request.kinds.as_deref() {
            Some(raw) => EventKind::parse_list(raw)?,
            None => Vec::new(),
        };
        let after = start(request.last_event_id.as_deref(), request.after.as_deref())?;
        let twin = match request.twin.as_deref() {
            Some(raw) => {
                let id = parse_twin_id(raw)?;
                self.twins.view(owner, &id).await?;
                Some(id)
            }
            None => None,
        };
        if let Some(after) = after {
            let bounds = self.source.bounds().await.map_err(ServiceError::from)?;
            check_cursor(after, bounds)?;
        }
        Ok(self
            .source
            .follow(filters(owner, twin.as_deref(), &kinds), after)
            .await?)
    }
}

/// Where a client resumes: `Last-Event-ID` and `?after=` name the same cursor when both
/// are given (a client that sends both with different values has a bug worth a 400,
/// not a guess).
pub fn start(
    last_event_id: Option<&str>,
    after: Option<&str>,
) -> Result<Option<u64>, ValidationError> {
    let header = last_event_id
        .map(|v| cursor("Last-Event-ID", v))
        .transpose()?;
    let query = after.map(|v| cursor("after", v)).transpose()?;
    match (header, query) {
        (Some(h), Some(q)) if h != q => Err(ValidationError::new(format!(
            "Last-Event-ID ({h}) and after ({q}) name different cursors"
        ))),
        (h, q) => Ok(h.or(q)),
    }
}

fn cursor(what: &str, raw: &str) -> Result<u64, ValidationError> {
    // Digits only: `u64::from_str` would also take a sign.
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| raw.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            ValidationError::new(format!(
                "{what} must be an event id (a non-negative integer), got {raw:?}"
            ))
        })
}

/// A cursor is resumable when no event after it has left the stream, and it names a
/// position the stream has reached.
fn check_cursor(after: u64, bounds: Bounds) -> ServiceResult<()> {
    if after > bounds.last {
        return Err(ValidationError::new(format!(
            "cursor {after} is beyond the last event ({})",
            bounds.last
        ))
        .into());
    }
    if after < bounds.oldest_cursor() {
        return Err(ServiceError::CursorExpired {
            oldest: bounds.oldest_cursor(),
        });
    }
    Ok(())
}

impl From<FeedError> for ServiceError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::Expired { oldest } => Self::CursorExpired { oldest },
            other => Self::Unavailable(Box::new(other)),
        }
    }
}

/// Whether `subject` matches the NATS subject filter `filter` (`*` one token, `>` the
/// rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::feed::subject;

    #[test]
    fn the_header_and_the_query_name_one_cursor() {
        assert_eq!(start(None, None).unwrap(), None);
        assert_eq!(start(Some("7"), None).unwrap(), Some(7));
        assert_eq!(start(None, Some("7")).unwrap(), Some(7));
        assert_eq!(start(Some("7"), Some("7")).unwrap(), Some(7));
        assert!(start(Some("7"), Some("8")).is_err());
        assert!(start(Some("x"), None).is_err());
        assert!(start(None, Some("-1")).is_err());
    }

    #[test]
    fn cursors_before_the_first_kept_event_are_expired() {
        let bounds = Bounds {
            first: 10,
            last: 20,
        };
        assert!(check_cursor(9, bounds).is_ok());
        assert!(check_cursor(20, bounds).is_ok());
        assert!(matches!(
            check_cursor(8, bounds),
            Err(ServiceError::CursorExpired { oldest: 9 })
        ));
        assert!(matches!(
            check_cursor(21, bounds),
            Err(ServiceError::Invalid(_))
        ));
        // An empty stream whose events all aged out.
        let empty = Bounds {
            first: 21,
            last: 20,
        };
        assert!(check_cursor(20, empty).is_ok());
        assert!(check_cursor(19, empty).is_err());
        let fresh = Bounds { first: 1, last: 0 };
        assert!(check_cursor(0, fresh).is_ok());
    }

    #[test]
    fn filters_match_only_their_owner_twin_and_kinds() {
        let s = subject("alice", "t1", EventKind::StateCreated);
        assert!(subject_matches(&filters("alice", None, &[])[0], &s));
        assert!(subject_matches(&filters("alice", Some("t1"), &[])[0], &s));
        assert!(!subject_matches(&filters("alice", Some("t2"), &[])[0], &s));
        assert!(!subject_matches(&filters("bob", None, &[])[0], &s));
        let kinds = filters("alice", None, &[EventKind::StateCreated]);
        assert!(subject_matches(&kinds[0], &s));
        let other = filters("alice", None, &[EventKind::StateUpdated]);
        assert!(!subject_matches(&other[0], &s));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
    }
}
