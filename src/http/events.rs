//! `GET /events` and `GET /twins/{id}/events`: the change feed over Server-Sent Events
//! (SPEC 12).
//!
//! Each event is `id: <cursor>`, `event: <kind>`, `data: <event JSON>`; a comment line
//! keeps an idle connection open. A client that reads too slowly gets a last `overflow`
//! event naming the cursor to resume after, and the stream closes. When the service
//! stops, every stream ends, so that graceful shutdown does not wait for clients that
//! never leave.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiResult, ErrorBody};
use super::extract::{Caller, Params, TwinPath};
use crate::service::feed::{Feed, FeedError, FeedEvent, FeedRequest};

/// Name of the gauge of open SSE streams.
pub const OPEN: &str = "twins_sse_connections";
/// Name of the counter of events sent over SSE.
pub const SENT: &str = "twins_sse_events_sent_total";
/// Name of the counter of SSE clients disconnected for reading too slowly.
pub const OVERFLOWS: &str = "twins_sse_overflow_disconnects_total";

/// The last event of a stream whose client fell behind.
pub const OVERFLOW_EVENT: &str = "overflow";

/// What the SSE handlers share.
#[derive(Clone)]
pub struct EventsState {
    pub feed: Feed,
    /// Time between keep-alive comments.
    pub keep_alive: Duration,
    /// Cancelled when the service stops: every stream ends.
    pub closing: CancellationToken,
}

/// The query of both endpoints.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Comma-separated event kinds to receive (default: every kind), e.g.
    /// `state.created,document.put`.
    #[param(required = false, example = "state.created,document.put")]
    pub kinds: Option<String>,
    /// Resume after this event id (the same as the `Last-Event-ID` header; when both
    /// are given they must agree).
    #[param(value_type = u64, required = false, minimum = 0)]
    pub after: Option<String>,
}

/// The `Last-Event-ID` header, read by the handlers; declared here for the document.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct LastEventIdHeader {
    /// Resume after this event id (sent back by browsers' `EventSource` on reconnect).
    #[param(rename = "Last-Event-ID", value_type = String, required = false, pattern = "^[0-9]{1,20}$")]
    pub last_event_id: Option<String>,
}

/// One event of the stream, by its fields.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedSseEvent {
    /// The event's cursor; on `overflow`, the cursor to resume after.
    pub id: String,
    /// The kind of change (`ChangeEventBody.kind`), or `overflow`.
    #[schema(example = "state.created")]
    pub event: String,
    /// JSON: a `ChangeEventBody`, or an `OverflowBody` for `overflow`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// The JSON of an event's `data:` line.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeEventBody {
    /// The cursor: the event's sequence on the `twins-events` stream, as a string (the
    /// `id:` line carries the same).
    pub id: String,
    /// `twin.created`, `twin.updated`, `twin.deleted`, `state.created`,
    /// `state.updated`, `document.put`, `document.patched` or `document.deleted`
    /// (the `event:` line carries the same).
    #[schema(example = "state.created")]
    pub kind: String,
    pub twin_id: String,
    /// When the change was committed.
    pub time: DateTime<Utc>,
    /// The twin, state or document before the change (null for a creation).
    #[schema(value_type = Option<Object>)]
    pub old: Option<Value>,
    /// The twin, state or document after the change (null for a deletion).
    #[schema(value_type = Option<Object>)]
    pub new: Option<Value>,
}

/// The JSON of the last event, `event: overflow`, sent to a client that fell behind.
#[derive(Debug, Serialize, ToSchema)]
pub struct OverflowBody {
    /// The id of the last event delivered: resume with it as `Last-Event-ID` or `after`.
    pub resume_after: String,
}

/// Body of a 410: the cursor's next events have left the stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct CursorExpiredBody {
    #[schema(example = "cursor expired")]
    pub error: String,
    /// The oldest cursor still resumable: resuming after it gets every event the stream
    /// keeps.
    pub oldest: u64,
}

/// The change events of every twin of the caller, as Server-Sent Events.
#[utoipa::path(get, path = "/events", operation_id = "events", tag = "events",
    params(EventsQuery, LastEventIdHeader),
    responses((status = 200, description = "An endless `text/event-stream`: each event has `id: <cursor>`, `event: <kind>` and `data:` the event JSON; a comment line every 15 s; a client that falls behind gets a last `event: overflow` whose data is an `OverflowBody`",
            content_type = "text/event-stream", body = FeedSseEvent),
        (status = 400, description = "Unknown kind, or malformed or disagreeing cursors", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 410, description = "The events after the cursor are no longer kept", body = CursorExpiredBody),
        (status = 503, description = "Auth service or broker unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn all(
    State(app): State<AppState>,
    Caller(who): Caller,
    headers: HeaderMap,
    Params(query): Params<EventsQuery>,
) -> ApiResult<Response> {
    open(&app.events, &who.id, None, &headers, query).await
}

/// The change events of one twin of the caller, as Server-Sent Events.
#[utoipa::path(get, path = "/twins/{id}/events", operation_id = "twin_events", tag = "events",
    params(TwinPath, EventsQuery, LastEventIdHeader),
    responses((status = 200, description = "An endless `text/event-stream`, as for `GET /events`, of this twin's events",
            content_type = "text/event-stream", body = FeedSseEvent),
        (status = 400, description = "Unknown kind, or malformed or disagreeing cursors", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such twin of the caller", body = ErrorBody),
        (status = 410, description = "The events after the cursor are no longer kept", body = CursorExpiredBody),
        (status = 503, description = "Auth service, store or broker unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn twin(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(TwinPath { id }): Path<TwinPath>,
    headers: HeaderMap,
    Params(query): Params<EventsQuery>,
) -> ApiResult<Response> {
    open(&app.events, &who.id, Some(id), &headers, query).await
}

async fn open(
    events: &EventsState,
    owner: &str,
    twin: Option<String>,
    headers: &HeaderMap,
    query: EventsQuery,
) -> ApiResult<Response> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    super::error::ApiError::BadRequest("Last-Event-ID must be ASCII".into())
                })?
                .to_owned(),
        ),
        None => None,
    };
    let stream = events
        .feed
        .open(
            owner,
            FeedRequest {
                twin,
                kinds: query.kinds,
                last_event_id,
                after: query.after,
            },
        )
        .await?;
    // A comment first: the client (and any proxy) gets bytes at once, also while a
    // resume reads a long stream for its first matching event.
    let opened = futures::stream::once(async { Ok(Event::default().comment("following")) });
    let stream = opened
        .chain(served(stream))
        .take_until(events.closing.clone().cancelled_owned());
    Ok(Sse::new(Counted::new(stream))
        .keep_alive(KeepAlive::new().interval(events.keep_alive))
        .into_response())
}

/// The feed's events as SSE events; a follower that fell behind gets a last `overflow`
/// event, one the feed cannot serve any more ends (the client reconnects with its last
/// id).
fn served(
    events: crate::service::feed::EventStream,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    futures::stream::unfold((events, false), |(mut events, done)| async move {
        if done {
            return None;
        }
        match events.next().await? {
            Ok(FeedEvent { cursor, event }) => {
                let data = event.served(cursor);
                let sse = Event::default()
                    .id(cursor.to_string())
                    .event(event.kind.as_str())
                    .data(data);
                ::metrics::counter!(SENT).increment(1);
                Some((Ok(sse), (events, false)))
            }
            Err(FeedError::Behind { resume_after }) => {
                ::metrics::counter!(OVERFLOWS).increment(1);
                let body = OverflowBody {
                    resume_after: resume_after.to_string(),
                };
                let data = serde_json::to_string(&body).unwrap_or_default();
                // Its id makes an `EventSource` reconnect from there by itself.
                let sse = Event::default()
                    .id(resume_after.to_string())
                    .event(OVERFLOW_EVENT)
                    .data(data);
                Some((Ok(sse), (events, true)))
            }
            Err(e) => {
                tracing::info!(error = %crate::error::chain(&e), "change feed stream ended");
                None
            }
        }
    })
}

/// A stream counted in the open-streams gauge while it lives.
struct Counted<S> {
    inner: std::pin::Pin<Box<S>>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        ::metrics::gauge!(OPEN).increment(1.0);
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        ::metrics::gauge!(OPEN).decrement(1.0);
    }
}

impl<S: Stream> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
