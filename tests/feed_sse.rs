//! The change feed over Server-Sent Events (SPEC 12): `GET /events` and
//! `GET /twins/{id}/events` against the running service and the real broker.
//!
//! The events come from [`make_changes`], which publishes each change's event on the
//! feed's stream exactly as the relay of committed changes does (an acked JetStream
//! publish on the subject of the owner, twin and kind); the publish acks give the
//! cursors, which are the oracle the streams are compared with. Every test has owners
//! of its own (tokens of [`token_of`]), so tests sharing the broker never see each
//! other's events.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::proxy::Proxy;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use twins::broker::feed::FEED_STREAM;
use twins::domain::feed::{ChangeEvent, EventKind, subject};

/// One SSE frame: an event, or a comment line.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Event {
        id: Option<String>,
        event: Option<String>,
        data: String,
    },
    Comment(String),
}

impl Frame {
    fn data(&self) -> Value {
        match self {
            Frame::Event { data, .. } => serde_json::from_str(data).expect("event data is JSON"),
            Frame::Comment(c) => panic!("comment {c:?} where an event was expected"),
        }
    }

    fn id(&self) -> u64 {
        match self {
            Frame::Event { id: Some(id), .. } => id.parse().expect("numeric id"),
            other => panic!("no id in {other:?}"),
        }
    }

    fn event(&self) -> &str {
        match self {
            Frame::Event { event: Some(e), .. } => e,
            other => panic!("no event name in {other:?}"),
        }
    }
}

/// Parses the frames of an SSE text, and keeps what follows the last complete one.
#[derive(Default)]
struct Parser {
    text: String,
}

impl Parser {
    fn push(&mut self, bytes: &[u8]) {
        self.text
            .push_str(std::str::from_utf8(bytes).expect("UTF-8 stream"));
    }

    fn frame(&mut self) -> Option<Frame> {
        let end = self.text.find("\n\n")?;
        let block: String = self.text.drain(..end + 2).collect();
        let (mut id, mut event, mut data, mut comment) = (None, None, Vec::new(), None);
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                comment = Some(c.trim().to_owned());
            } else if let Some((field, value)) = line.split_once(':') {
                let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                match field {
                    "id" => id = Some(value),
                    "event" => event = Some(value),
                    "data" => data.push(value),
                    other => panic!("unexpected SSE field {other:?}"),
                }
            }
        }
        Some(match comment {
            Some(c) if data.is_empty() && id.is_none() => Frame::Comment(c),
            _ => Frame::Event {
                id,
                event,
                data: data.join("\n"),
            },
        })
    }
}

/// An open SSE response.
struct Sse {
    resp: reqwest::Response,
    parser: Parser,
}

/// A client without the harness's overall timeout, which would cut a stream.
fn streaming_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

impl Sse {
    /// Opens `path` (with `query`), `Last-Event-ID` when given; the answer must be 200.
    async fn open(
        app: &TestApp,
        path: &str,
        token: &str,
        query: &[(&str, &str)],
        last_event_id: Option<u64>,
    ) -> Self {
        let resp = request(app, path, token, query, last_event_id).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&resp, "content-type"), "text/event-stream");
        Self {
            resp,
            parser: Parser::default(),
        }
    }

    /// The next frame, or None when the stream ends; fails the test after [`DEADLINE`].
    async fn frame(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(frame) = self.parser.frame() {
                return Some(frame);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("a frame within the deadline");
            match chunk {
                Ok(Some(bytes)) => self.parser.push(&bytes),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next event, skipping keep-alive comments.
    async fn event(&mut self) -> Frame {
        loop {
            match self.frame().await.expect("the stream goes on") {
                Frame::Comment(_) => continue,
                event => return event,
            }
        }
    }

    /// The next `n` events.
    async fn events(&mut self, n: usize) -> Vec<Frame> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.event().await);
        }
        out
    }
}

async fn request(
    app: &TestApp,
    path: &str,
    token: &str,
    query: &[(&str, &str)],
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut req = streaming_client()
        .get(app.url(path))
        .bearer_auth(token)
        .query(query);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    req.send().await.expect("request reaches the service")
}

/// A user of the test's own: (identity id, token).
fn user() -> (String, String) {
    let id = unique("owner-");
    let token = token_of(&id);
    (id, token)
}

/// The change `i` of a twin, as its event says it.
fn change(twin: &str, kind: EventKind, i: usize) -> ChangeEvent {
    ChangeEvent {
        kind,
        twin_id: twin.to_owned(),
        time: chrono::Utc::now(),
        old: (i > 0).then(|| json!({ "n": i - 1 })),
        new: Some(json!({ "n": i })),
    }
}

/// Makes `n` changes of `kind` to `owner`'s twin and returns their events with their
/// cursors, in commit order. The events are published as the relay of committed changes
/// publishes them; this is the one place to switch to real changes through the API.
async fn make_changes(
    js: &jetstream::Context,
    owner: &str,
    twin: &str,
    kind: EventKind,
    n: usize,
) -> Vec<(u64, ChangeEvent)> {
    let mut made = Vec::with_capacity(n);
    for i in 0..n {
        let event = change(twin, kind, i);
        made.push((publish(js, owner, &event).await, event));
    }
    made
}

/// Publishes one event on the feed's stream and returns its cursor.
async fn publish(js: &jetstream::Context, owner: &str, event: &ChangeEvent) -> u64 {
    let payload = serde_json::to_vec(event).expect("event JSON");
    js.publish(subject(owner, &event.twin_id, event.kind), payload.into())
        .await
        .expect("publish")
        .await
        .expect("the stream acks the event")
        .sequence
}

/// Asserts `frames` are exactly `expected`, in order, each as SPEC 12 serves it.
fn assert_served(frames: &[Frame], expected: &[(u64, ChangeEvent)]) {
    let got: Vec<u64> = frames.iter().map(Frame::id).collect();
    let want: Vec<u64> = expected.iter().map(|(c, _)| *c).collect();
    assert_eq!(got, want, "cursors");
    for (frame, (cursor, event)) in frames.iter().zip(expected) {
        assert_eq!(frame.event(), event.kind.as_str());
        let mut served = event.served(*cursor);
        // Times go through JSON on both sides; compare them as instants.
        let data = frame.data();
        let time = |v: &Value| {
            chrono::DateTime::parse_from_rfc3339(v["time"].as_str().expect("time"))
                .expect("RFC 3339 time")
        };
        assert_eq!(time(&data), time(&served));
        served["time"] = data["time"].clone();
        assert_eq!(data, served);
    }
}

async fn spawn() -> TestApp {
    TestApp::builder().spawn().await
}

/// A new twin of the token's user, once the event of its creation is on the stream:
/// followers opened afterwards start after it (the stream's last event when they
/// open, whether or not the service's tail has handed it out).
async fn twin_of(app: &TestApp, token: &str) -> String {
    let twin = app.create_id(token, &json!({})).await;
    let owner = token
        .strip_prefix(USER_TOKEN_PREFIX)
        .expect("a token of a test's own user");
    created_on_stream(app.js(), owner, &twin).await;
    twin
}

/// Waits until the event of `twin`'s creation is on the stream.
async fn created_on_stream(js: &jetstream::Context, owner: &str, twin: &str) {
    let subject = subject(owner, twin, EventKind::TwinCreated);
    let stream = js.get_stream(FEED_STREAM).await.expect("the feed stream");
    eventually(
        "the twin's creation on the feed",
        || async {
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok()
        },
        |found| *found,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_served_as_sse_with_cursor_kind_and_json() {
    let app = spawn().await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let mut sse = Sse::open(&app, &format!("/twins/{twin}/events"), &token, &[], None).await;
    assert_eq!(header(&sse.resp, "cache-control"), "no-cache");

    let made = make_changes(app.js(), &owner, &twin, EventKind::DocumentPut, 3).await;
    let frames = sse.events(3).await;
    assert_served(&frames, &made);
    let data = frames[0].data();
    let keys: Vec<&str> = data
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["id", "kind", "new", "old", "time", "twin_id"]);
    assert_eq!(data["id"], made[0].0.to_string());
    assert_eq!(data["old"], Value::Null);
    assert_timestamp(&data["time"]);
}

/// The resume scenario of SPEC 12 with the cursor in `Last-Event-ID` or in `?after=`.
async fn resume_gets_exactly_the_missed_events(by_header: bool) {
    let app = spawn().await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let path = format!("/twins/{twin}/events");
    let mut sse = Sse::open(&app, &path, &token, &[], None).await;
    let first = make_changes(app.js(), &owner, &twin, EventKind::StateCreated, 100).await;
    let read = sse.events(100).await;
    assert_served(&read, &first);
    let last = read[99].id();
    drop(sse);

    let missed = make_changes(app.js(), &owner, &twin, EventKind::StateUpdated, 50).await;
    let after = last.to_string();
    let mut sse = if by_header {
        Sse::open(&app, &path, &token, &[], Some(last)).await
    } else {
        Sse::open(&app, &path, &token, &[("after", &after)], None).await
    };
    assert_served(&sse.events(50).await, &missed);
    // Nothing repeated or extra: the next event is the one made next.
    let next = make_changes(app.js(), &owner, &twin, EventKind::TwinUpdated, 1).await;
    assert_served(&sse.events(1).await, &next);
}

/// A follower without a cursor gets the events written after its request, also those
/// the feed's tail has not handed out yet when the request comes: the service's broker
/// connection runs through a proxy that holds what the broker sends.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_a_cursor_starts_after_the_last_event_written() {
    let proxy = Proxy::to(NATS_URL.trim_start_matches("nats://")).await;
    let app = TestApp::builder()
        .var("MG_MESSAGE_BROKER_URL", &format!("nats://{}", proxy.addr))
        .spawn()
        .await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    proxy.hold();
    // On the stream, not yet seen by the service's tail.
    let earlier = make_changes(app.js(), &owner, &twin, EventKind::DocumentPut, 20).await;
    let sent = proxy.sent();
    let path = format!("/twins/{twin}/events");
    let open = Sse::open(&app, &path, &token, &[], None);
    tokio::pin!(open);
    // Let the broker's messages through once the service has the request: it answered
    // (its follower is registered) or asked the broker something.
    let asked = eventually(
        "a request of the service",
        || async { proxy.sent() },
        |n| *n > sent,
    );
    let mut sse = tokio::select! {
        sse = &mut open => sse,
        _ = asked => {
            proxy.release();
            open.await
        }
    };
    proxy.release();
    let next = make_changes(app.js(), &owner, &twin, EventKind::TwinUpdated, 1).await;
    let first = sse.event().await;
    assert_eq!(
        first.id(),
        next[0].0,
        "served an event written before the request (the earlier ones end at {})",
        earlier[earlier.len() - 1].0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_with_last_event_id_gets_exactly_the_missed_events_in_order() {
    resume_gets_exactly_the_missed_events(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_with_after_gets_exactly_the_missed_events_in_order() {
    resume_gets_exactly_the_missed_events(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_owners_streams_never_mix() {
    let app = spawn().await;
    let (alice, alice_token) = user();
    let (bob, bob_token) = user();
    let mut alice_sse = Sse::open(&app, "/events", &alice_token, &[], None).await;
    let mut bob_sse = Sse::open(&app, "/events", &bob_token, &[], None).await;
    let shared_twin = uuid::Uuid::new_v4().to_string();
    let alice_twin = uuid::Uuid::new_v4().to_string();
    let (mut for_alice, mut for_bob) = (Vec::new(), Vec::new());
    for i in 0..20 {
        // Bob's events even name a twin id Alice has: the owner decides.
        let a = change(
            if i % 2 == 0 {
                &shared_twin
            } else {
                &alice_twin
            },
            EventKind::StateCreated,
            i,
        );
        for_alice.push((publish(app.js(), &alice, &a).await, a));
        let b = change(&shared_twin, EventKind::StateCreated, i);
        for_bob.push((publish(app.js(), &bob, &b).await, b));
    }
    assert_served(&alice_sse.events(20).await, &for_alice);
    assert_served(&bob_sse.events(20).await, &for_bob);
    // And nothing of the other came after: the next events are their own markers.
    let a = make_changes(app.js(), &alice, &alice_twin, EventKind::TwinDeleted, 1).await;
    let b = make_changes(app.js(), &bob, &shared_twin, EventKind::TwinDeleted, 1).await;
    assert_served(&alice_sse.events(1).await, &a);
    assert_served(&bob_sse.events(1).await, &b);
    // Resuming from before Bob's events reads the stream itself: still only Alice's.
    let from = for_alice[0].0.min(for_bob[0].0) - 1;
    let mut again = Sse::open(&app, "/events", &alice_token, &[], Some(from)).await;
    let mut expected = for_alice.clone();
    expected.extend(a);
    assert_served(&again.events(21).await, &expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn kinds_select_the_events_sent_and_an_unknown_kind_is_400() {
    let app = spawn().await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let path = format!("/twins/{twin}/events");
    let kinds = [("kinds", "state.created,document.put")];
    let mut two = Sse::open(&app, &path, &token, &kinds, None).await;
    let mut one = Sse::open(&app, "/events", &token, &[("kinds", "document.put")], None).await;
    let order = [
        EventKind::StateCreated,
        EventKind::TwinUpdated,
        EventKind::DocumentPut,
        EventKind::StateUpdated,
        EventKind::DocumentPatched,
        EventKind::StateCreated,
        EventKind::DocumentPut,
    ];
    let mut made = Vec::new();
    for (i, kind) in order.into_iter().enumerate() {
        let e = change(&twin, kind, i);
        made.push((publish(app.js(), &owner, &e).await, e));
    }
    let of = |wanted: &[EventKind]| -> Vec<(u64, ChangeEvent)> {
        made.iter()
            .filter(|(_, e)| wanted.contains(&e.kind))
            .cloned()
            .collect()
    };
    let both = of(&[EventKind::StateCreated, EventKind::DocumentPut]);
    assert_served(&two.events(both.len()).await, &both);
    let puts = of(&[EventKind::DocumentPut]);
    assert_served(&one.events(puts.len()).await, &puts);
    // The same from the stream (a resume reads several kinds through one filter).
    let from = made[0].0 - 1;
    let mut resumed = Sse::open(&app, &path, &token, &kinds, Some(from)).await;
    assert_served(&resumed.events(both.len()).await, &both);
    let marker = make_changes(app.js(), &owner, &twin, EventKind::DocumentPut, 1).await;
    assert_served(&resumed.events(1).await, &marker);
    assert_served(&two.events(1).await, &marker);

    for bad in ["state.created,twin.renamed", "STATE.CREATED"] {
        let resp = request(&app, &path, &token, &[("kinds", bad)], None).await;
        let message = assert_error(resp, StatusCode::BAD_REQUEST).await;
        assert!(message.contains("unknown event kind"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_cursors_are_400() {
    let app = spawn().await;
    let (_, token) = user();
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case; 4] = [
        (&[("after", "x")], None),
        (&[], Some("-3")),
        (&[("after", "1")], Some("2")),
        (&[("after", "18446744073709551615")], None),
    ];
    for (query, header) in cases {
        let mut req = streaming_client()
            .get(app.url("/events"))
            .bearer_auth(&token)
            .query(query);
        if let Some(h) = header {
            req = req.header("Last-Event-ID", h);
        }
        let resp = req.send().await.expect("answer");
        assert_error(resp, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_owners_twin_or_a_missing_one_is_404_and_no_token_is_401() {
    let app = spawn().await;
    let (_, alice) = user();
    let (_, bob) = user();
    let twin = twin_of(&app, &alice).await;
    for (path, token) in [
        (format!("/twins/{twin}/events"), &bob),
        (format!("/twins/{}/events", uuid::Uuid::new_v4()), &alice),
        ("/twins/not-a-uuid/events".to_owned(), &alice),
    ] {
        let resp = request(&app, &path, token, &[], None).await;
        assert_error(resp, StatusCode::NOT_FOUND).await;
    }
    let resp = streaming_client()
        .get(app.url("/events"))
        .send()
        .await
        .expect("answer");
    assert_error(resp, StatusCode::UNAUTHORIZED).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_remembers_message_ids_for_the_configured_window() {
    // A broker of the test's own: the shared stream's settings are never changed.
    let mut app = TestApp::builder()
        .own_broker()
        .var("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "90s")
        .spawn()
        .await;
    let js = app.js().clone();
    let settings = || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(FEED_STREAM).await.expect("feed stream");
            let config = stream.info().await.expect("stream info").config.clone();
            (config.duplicate_window, config.max_age)
        }
    };
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(settings().await, (Duration::from_secs(90), week));
    // An instance started with another window brings the stream to it.
    app.set_var("MG_TWINS_EVENTS_DUPLICATE_WINDOW", "5m");
    app.start().await;
    assert_eq!(settings().await, (Duration::from_secs(300), week));
    // Never beyond the max age, which JetStream would refuse.
    app.set_var("MG_TWINS_EVENTS_MAX_AGE", "1m");
    app.start().await;
    let minute = Duration::from_secs(60);
    assert_eq!(settings().await, (minute, minute));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_whose_events_aged_out_is_410_with_the_oldest_cursor() {
    // A broker of the test's own: the shared stream's settings are never changed.
    let app = TestApp::builder()
        .own_broker()
        .var("MG_TWINS_EVENTS_MAX_AGE", "1s")
        .spawn()
        .await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let old = make_changes(app.js(), &owner, &twin, EventKind::StateCreated, 3).await;
    // Wait until the broker dropped them (it checks ages on its own schedule).
    let js = app.js().clone();
    eventually(
        "the feed stream dropping old events",
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(FEED_STREAM).await.expect("feed stream");
                stream.info().await.expect("stream info").state.messages
            }
        },
        |messages| *messages == 0,
    )
    .await;
    let kept = make_changes(app.js(), &owner, &twin, EventKind::StateUpdated, 2).await;
    let oldest = kept[0].0 - 1;
    assert_eq!(oldest, old[2].0, "the stream numbers on");

    let resp = request(&app, "/events", &token, &[], Some(old[0].0)).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let body: Value = resp.json().await.expect("JSON body");
    assert_eq!(body, json!({"error": "cursor expired", "oldest": oldest}));
    // The oldest cursor is resumable and gets every event kept.
    let mut sse = Sse::open(&app, "/events", &token, &[], Some(oldest)).await;
    assert_served(&sse.events(2).await, &kept);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_streams_get_keep_alive_comments() {
    let app = TestApp::builder()
        .var("MG_TWINS_EVENTS_KEEPALIVE", "200ms")
        .spawn()
        .await;
    let (_, token) = user();
    let mut sse = Sse::open(&app, "/events", &token, &[], None).await;
    // The stream opens with a comment at once, then keeps alive with empty ones.
    assert_eq!(sse.frame().await, Some(Frame::Comment("following".into())));
    for _ in 0..2 {
        assert_eq!(sse.frame().await, Some(Frame::Comment(String::new())));
    }
}

/// Reads from `socket` until the end of a response head: the stream is open.
async fn read_head(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(DEADLINE, socket.read(&mut buf))
            .await
            .expect("a response head")
            .expect("read");
        assert!(n > 0, "closed before a response head");
        raw.extend_from_slice(&buf[..n]);
    }
    raw
}

/// Reads an HTTP/1.1 response with a chunked body from `socket` until it closes, after
/// the `raw` bytes already read: (head, body).
async fn read_chunked(socket: &mut tokio::net::TcpStream, mut raw: Vec<u8>) -> (String, Vec<u8>) {
    tokio::time::timeout(DEADLINE, socket.read_to_end(&mut raw))
        .await
        .expect("the server closes the stream")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end]).expect("size").trim(),
            16,
        )
        .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    (head, body)
}

async fn counter(app: &TestApp, name: &str) -> f64 {
    app.metrics()
        .await
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_falls_behind_gets_a_resume_cursor_and_loses_nothing() {
    let app = TestApp::builder()
        .var("MG_TWINS_EVENTS_BUFFER", "4")
        .spawn()
        .await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    // A client that reads nothing, with a small receive window.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stalled = socket.connect(app.addr()).await.expect("connect");
    let head = format!(
        "GET /twins/{twin}/events HTTP/1.1\r\nHost: twins\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stalled.write_all(head.as_bytes()).await.expect("request");
    // Its head is sent once it follows the feed.
    let opened = read_head(&mut stalled).await;
    let mut live = Sse::open(&app, &format!("/twins/{twin}/events"), &token, &[], None).await;
    let before = counter(&app, "twins_feed_followers_behind_total").await;
    let sent_before = counter(&app, "twins_sse_overflow_disconnects_total").await;
    // Large events fill the socket buffers, then the client's buffer of 4.
    let big = "x".repeat(64 * 1024);
    let mut made = Vec::new();
    for round in 0.. {
        assert!(round < 4000, "not dropped after {} events", made.len());
        let mut e = change(&twin, EventKind::DocumentPut, made.len());
        e.new = Some(json!({ "n": made.len(), "pad": big }));
        made.push((publish(app.js(), &owner, &e).await, e));
        // The live reader keeps up, one event at a time.
        assert_served(&live.events(1).await, &made[made.len() - 1..]);
        // The feed drops it as soon as its buffer is full; it learns so when it reads.
        if counter(&app, "twins_feed_followers_behind_total").await > before {
            break;
        }
    }
    let (head, body) = read_chunked(&mut stalled, opened).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut parser = Parser::default();
    parser.push(&body);
    let mut frames = Vec::new();
    while let Some(frame) = parser.frame() {
        if !matches!(frame, Frame::Comment(_)) {
            frames.push(frame);
        }
    }
    let overflow = frames.pop().expect("a last event");
    assert_eq!(overflow.event(), "overflow");
    let resume_after: u64 = overflow.data()["resume_after"]
        .as_str()
        .expect("resume_after is a string")
        .parse()
        .expect("a cursor");
    assert_eq!(overflow.id(), resume_after);
    assert!(counter(&app, "twins_sse_overflow_disconnects_total").await > sent_before);
    let delivered = frames.len();
    assert!(delivered < made.len(), "some events were not delivered");
    assert_served(&frames, &made[..delivered]);
    if let Some(last) = frames.last() {
        assert_eq!(last.id(), resume_after);
    }
    // Resuming from there gets the rest, none missing.
    let mut resumed = Sse::open(
        &app,
        &format!("/twins/{twin}/events"),
        &token,
        &[],
        Some(resume_after),
    )
    .await;
    let rest = &made[delivered..];
    assert_served(&resumed.events(rest.len()).await, rest);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_streams_and_the_process_exits_promptly() {
    let mut app = TestApp::builder()
        .process()
        .own_broker()
        .var("MG_TWINS_SHUTDOWN_TIMEOUT", "1h")
        .spawn()
        .await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let mut sse = Sse::open(&app, &format!("/twins/{twin}/events"), &token, &[], None).await;
    let made = make_changes(app.js(), &owner, &twin, EventKind::TwinUpdated, 1).await;
    assert_served(&sse.events(1).await, &made);

    app.instance().terminate();
    loop {
        match sse.frame().await {
            None => break,
            Some(Frame::Comment(_)) => continue,
            Some(other) => panic!("unexpected {other:?} after SIGTERM"),
        }
    }
    let status = app.instance().wait(DEADLINE).await;
    let logs = app.instance().logs();
    assert!(status.success(), "exit {status:?}; logs {logs:#?}");
    assert!(
        !logs.iter().any(|l| l.contains("shutdown timeout")),
        "exited when the streams ended, not at the shutdown timeout: {logs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_describes_both_event_endpoints() {
    let app = spawn().await;
    let doc: Value = app
        .request(Method::GET, "/openapi.json")
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON");
    for path in ["/events", "/twins/{id}/events"] {
        let op = &doc["paths"][path]["get"];
        assert!(
            op["responses"]["200"]["content"]["text/event-stream"].is_object(),
            "{path}: {op}"
        );
        assert!(op["responses"]["410"].is_object(), "{path}");
    }
    assert!(doc["components"]["schemas"]["ChangeEventBody"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected() {
    // Its own process, so that its gauge counts only this test's streams.
    let app = TestApp::builder()
        .process()
        .var("MG_TWINS_HTTP_IDLE_TIMEOUT", "1s")
        .var("MG_TWINS_EVENTS_BUFFER", "4")
        .spawn()
        .await;
    let (owner, token) = user();
    let twin = twin_of(&app, &token).await;
    let path = format!("/twins/{twin}/events");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stalled = socket.connect(app.addr()).await.expect("connect");
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: twins\r\nAuthorization: Bearer {token}\r\n\r\n");
    stalled.write_all(head.as_bytes()).await.expect("request");
    let mut live = Sse::open(&app, &path, &token, &[], None).await;
    let open = || async { counter(&app, "twins_sse_connections").await };
    eventually("both streams open", open, |n| *n == 2.0).await;
    let big = "x".repeat(64 * 1024);
    let mut made = Vec::new();
    while open().await > 1.0 {
        assert!(made.len() < 4000, "the stalled stream is still open");
        let mut e = change(&twin, EventKind::DocumentPut, made.len());
        e.new = Some(json!({ "n": made.len(), "pad": big }));
        made.push((publish(app.js(), &owner, &e).await, e));
        assert_served(&live.events(1).await, &made[made.len() - 1..]);
    }
    // The server closed it: what the socket holds is read, then the end (or a reset).
    let mut sink = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut sink)).await;
    assert!(
        read.is_ok(),
        "the stalled connection was closed by the server"
    );
    // The live stream goes on.
    let next = make_changes(app.js(), &owner, &twin, EventKind::TwinUpdated, 1).await;
    assert_served(&live.events(1).await, &next);
}

/// Real changes through the API: a client reads 100 events, disconnects, 50 more
/// changes are committed, and it reconnects with `Last-Event-ID`: it gets exactly those
/// 50, in order, then the next change and nothing repeated.
#[tokio::test(flavor = "multi_thread")]
async fn committed_changes_resume_from_last_event_id_with_none_missing_or_repeated() {
    let app = spawn().await;
    let (_, token) = user();
    let twin = twin_of(&app, &token).await;
    let path = format!("/twins/{twin}/events");
    let put = |n: usize| {
        let app = &app;
        let token = &token;
        let twin = &twin;
        async move {
            let resp = send(
                app.request(Method::PUT, &format!("/twins/{twin}/documents/desired"))
                    .bearer_auth(token)
                    .json(&json!({ "data": { "n": n } })),
            )
            .await;
            assert!(resp.status().is_success(), "PUT {n}: {}", resp.status());
        }
    };
    let versions = |frames: &[Frame]| -> Vec<(String, i64)> {
        frames
            .iter()
            .map(|f| {
                let d = f.data();
                (
                    d["kind"].as_str().expect("kind").to_owned(),
                    d["new"]["data"]["n"].as_i64().expect("the document's n"),
                )
            })
            .collect()
    };
    let want = |from: usize, to: usize| -> Vec<(String, i64)> {
        (from..to)
            .map(|n| ("document.put".to_owned(), n as i64))
            .collect()
    };

    let mut sse = Sse::open(&app, &path, &token, &[], None).await;
    for n in 0..100 {
        put(n).await;
    }
    let first = sse.events(100).await;
    assert_eq!(versions(&first), want(0, 100));
    let last = first.last().expect("100 events").id();
    drop(sse);

    for n in 100..150 {
        put(n).await;
    }
    let mut resumed = Sse::open(&app, &path, &token, &[], Some(last)).await;
    let rest = resumed.events(50).await;
    assert_eq!(versions(&rest), want(100, 150));
    let ids: Vec<u64> = first.iter().chain(&rest).map(Frame::id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "cursors increase: {ids:?}"
    );
    // The next change is the next event: nothing of the 150 comes again.
    put(150).await;
    assert_eq!(versions(&resumed.events(1).await), want(150, 151));
}
