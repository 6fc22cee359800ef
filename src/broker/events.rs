//! The event store's adapters (`MG_TWINS_ES_URL`), as Magistrala's own publishers
//! store events, so Magistrala's consumers read ours:
//!
//! - `nats://` (or `tls://`): the JetStream stream `events` on `events.>` (created when
//!   missing, with Magistrala's settings), each event a protobuf `messaging.Message` on
//!   `events.magistrala.twins` whose payload is the event's JSON;
//! - `redis://` (or `rediss://`): the Redis stream `magistrala.twins`, each event an
//!   entry whose field `data` holds its JSON (capped near a billion entries, as
//!   Magistrala caps it).
//!
//! Every publish is awaited (JetStream acks, Redis replies) and several events go out
//! together: one round of acks for a batch of messages.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;

use crate::error::Cause;
use crate::service::events::{Event, EventStore, STREAM_ID, stamped};

/// Magistrala's event stream and its subjects.
pub const EVENTS_STREAM: &str = "events";
const EVENTS_SUBJECTS: &str = "events.>";
/// Where twins events are published on NATS.
pub const EVENTS_SUBJECT: &str = "events.magistrala.twins";
/// Longest Redis stream Magistrala keeps (approximately).
const REDIS_MAX_LEN: u64 = 1_000_000_000;

/// Opens the event store named by the URL's scheme.
pub async fn connect(url: &str) -> Result<Box<dyn EventStore>, Cause> {
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme.to_ascii_lowercase().as_str() {
        "nats" | "tls" => Ok(Box::new(JetStreamEvents::connect(url).await?)),
        "redis" | "rediss" => Ok(Box::new(RedisEvents::connect(url).await?)),
        other => Err(format!("unsupported event store scheme {other:?}").into()),
    }
}

/// Events in Magistrala's JetStream stream.
pub struct JetStreamEvents {
    js: jetstream::Context,
}

impl JetStreamEvents {
    pub async fn connect(url: &str) -> Result<Self, Cause> {
        let client = super::connect(url).await?;
        let js = jetstream::new(client);
        js.get_or_create_stream(stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![EVENTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1_000_000_000,
            max_age: Duration::from_secs(24 * 3600),
            max_message_size: 1024 * 1024,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        Ok(Self { js })
    }
}

#[async_trait]
impl EventStore for JetStreamEvents {
    async fn publish(&self, events: Vec<Event>) -> Result<(), Cause> {
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let json = serde_json::to_vec(&stamped(e))?;
            let envelope = super::Envelope {
                payload: json,
                ..Default::default()
            };
            acks.push(
                self.js
                    .publish(EVENTS_SUBJECT, super::encode(&envelope).into())
                    .await?,
            );
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack?;
        }
        Ok(())
    }
}

/// Events in a Redis stream.
pub struct RedisEvents {
    conn: redis::aio::ConnectionManager,
}

impl RedisEvents {
    pub async fn connect(url: &str) -> Result<Self, Cause> {
        let client = redis::Client::open(url)?;
        Ok(Self {
            conn: redis::aio::ConnectionManager::new(client).await?,
        })
    }
}

#[async_trait]
impl EventStore for RedisEvents {
    async fn publish(&self, events: Vec<Event>) -> Result<(), Cause> {
        let mut pipe = redis::pipe();
        for e in events {
            let json = serde_json::to_string(&stamped(e))?;
            pipe.cmd("XADD")
                .arg(STREAM_ID)
                .arg("MAXLEN")
                .arg("~")
                .arg(REDIS_MAX_LEN)
                .arg("*")
                .arg("data")
                .arg(json)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }
}
