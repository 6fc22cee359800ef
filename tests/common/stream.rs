//! A stream of SenML messages to many twins and its oracle: the states each twin must
//! have, computed by applying its messages once each, in stream order, with the
//! domain's SenML and sampling functions. Progress is read from the broker (a group's
//! consumer acks a batch only once it is durable), never guessed with sleeps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use twins::broker::{self, Envelope};
use twins::domain::sampling::{self, Write};
use twins::domain::senml;
use twins::domain::state::State;
use twins::domain::twin::{Attribute, Definition};

use super::TestApp;

/// Sampling window of the twins: 1 s.
pub const DELTA: i64 = 1_000_000_000;
/// Time of the first record, in seconds since the epoch.
pub const T0: f64 = 1_700_000_000.0;
/// How long a scenario may take to make the progress it waits for before it fails.
pub const PROGRESS: Duration = Duration::from_secs(180);

/// How long a publisher waits for the broker to acknowledge one publish.
const PUBLISH_ACK: Duration = Duration::from_secs(60);

/// A message as the device sends it: on a twin's channel, one record.
#[derive(Clone)]
pub struct Published {
    pub twin: String,
    pub channel: String,
    pub payload: Vec<u8>,
}

/// Messages `k in range` spread over `twins` in turn, each with an explicit time such
/// that about half of them open a new state and half update the last one.
pub fn messages(twins: &[(String, String)], range: std::ops::Range<usize>) -> Vec<Published> {
    range
        .map(|k| {
            let (twin, channel) = &twins[k % twins.len()];
            let round = (k / twins.len()) as f64;
            let senml = json!([{"n": "v", "v": k, "t": T0 + round * 0.6}]);
            Published {
                twin: twin.clone(),
                channel: channel.clone(),
                payload: senml.to_string().into_bytes(),
            }
        })
        .collect()
}

/// Publishes with acks, 512 in flight; the stream sequence of the last one.
pub async fn publish_on(js: &jetstream::Context, messages: &[Published]) -> u64 {
    // A loaded machine (the whole suite on two cores) can take longer than the
    // default 5 s to acknowledge a publish; a publisher that gave up would look like
    // ingestion that stopped.
    let mut js = js.clone();
    js.set_timeout(PUBLISH_ACK);
    let mut last = 0;
    for chunk in messages.chunks(512) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let env = Envelope {
                channel: m.channel.clone(),
                subtopic: String::new(),
                publisher: "fault-test".into(),
                protocol: "nats".into(),
                payload: m.payload.clone(),
                created: 0,
            };
            acks.push(
                js.publish(broker::subject(&m.channel, ""), broker::encode(&env).into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            last = last.max(ack.await.expect("publish ack").sequence);
        }
    }
    last
}

/// The states each twin must have: its messages applied once each, in order.
#[derive(Default)]
pub struct Oracle {
    pub states: HashMap<String, Vec<State>>,
}

impl Oracle {
    pub fn new(twins: &[(String, String)]) -> Self {
        Self {
            states: twins.iter().map(|(t, _)| (t.clone(), Vec::new())).collect(),
        }
    }

    pub fn apply(&mut self, messages: &[Published]) {
        for m in messages {
            let definition = Definition {
                id: 0,
                created: Utc.timestamp_opt(0, 0).single().expect("time"),
                attributes: vec![Attribute {
                    name: "v".into(),
                    channel: m.channel.clone(),
                    subtopic: String::new(),
                    persist_state: true,
                    record: None,
                }],
                delta: DELTA,
            };
            let records = senml::resolve(&m.payload, Utc::now()).expect("SenML");
            let states = self.states.entry(m.twin.clone()).or_default();
            let last = states.last().cloned();
            for w in sampling::fold(
                &m.twin,
                last.as_ref(),
                &definition,
                &m.channel,
                "",
                &records,
            ) {
                match w {
                    Write::Insert(s) => states.push(s),
                    Write::Update(s) => {
                        let i = usize::try_from(s.id).expect("state id");
                        states[i] = s;
                    }
                }
            }
        }
    }
}

/// Messages being published in the background, counted from the end of the stream
/// when publishing started.
pub struct Publishing {
    base: u64,
    task: JoinHandle<u64>,
}

impl Publishing {
    /// The stream's last sequence when publishing started.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The stream sequence of the last message, once all are published.
    pub async fn finished(self) -> u64 {
        self.task.await.expect("publisher")
    }
}

/// Starts publishing `messages` in the background.
pub async fn publish_in_background(app: &TestApp, messages: &[Published]) -> Publishing {
    // The stream's end, not the group's ack floor: a consumer that has acked nothing
    // yet may report a floor of 0, and every target counted from it is met at once.
    let base = app
        .js()
        .get_stream(twins::broker::STREAM)
        .await
        .expect("the messages' stream")
        .get_info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let js = app.js().clone();
    let messages = messages.to_vec();
    Publishing {
        base,
        task: tokio::spawn(async move { publish_on(&js, &messages).await }),
    }
}

/// Waits until the group has acked `count` of the messages `publishing`.
pub async fn wait_progress(app: &TestApp, publishing: &Publishing, count: u64) {
    let target = publishing.base + count;
    let deadline = Instant::now() + PROGRESS;
    while app.acked().await < target {
        assert!(
            Instant::now() < deadline,
            "no progress to {target} within {PROGRESS:?} (acked {}; {}; publisher {}); \
             last log lines: {:#?}",
            app.acked().await,
            app.consumer_summary().await,
            if publishing.task.is_finished() {
                "ended"
            } else {
                "still publishing"
            },
            log_tail(app, 40)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until everything up to `seq` is applied (acked after it was made durable).
pub async fn wait_applied(app: &TestApp, seq: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while app.acked().await < seq {
        if Instant::now() >= deadline {
            panic!(
                "not applied up to {seq} within {within:?} (acked {}; {}); last log lines: {:#?}",
                app.acked().await,
                app.consumer_summary().await,
                log_tail(app, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` warnings and errors logged by the instances the app runs as processes.
fn log_warnings(app: &TestApp, n: usize) -> Vec<String> {
    let lines: Vec<String> = log_tail(app, usize::MAX)
        .into_iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let skip = lines.len().saturating_sub(n);
    lines.into_iter().skip(skip).collect()
}

/// The last `n` log lines of each instance the app runs as a process.
fn log_tail(app: &TestApp, n: usize) -> Vec<String> {
    app.instances()
        .iter()
        .enumerate()
        .flat_map(|(i, instance)| {
            let lines = instance.log_lines();
            let skip = lines.len().saturating_sub(n);
            lines
                .into_iter()
                .skip(skip)
                .map(move |line| format!("[{i}] {line}"))
        })
        .collect()
}

/// Asserts that every twin has exactly the oracle's states. The consumer's ack floor
/// can run ahead of what the current holder applied (a late ack of an instance that
/// lost the lease lands on the recreated consumer of the same name), so each twin is
/// given until a deadline to match.
pub async fn assert_matches(app: &TestApp, oracle: &Oracle) {
    let deadline = Instant::now() + PROGRESS;
    for (twin, expected) in &oracle.states {
        let expected: Vec<Value> = expected
            .iter()
            .map(|s| serde_json::to_value(s).expect("state JSON"))
            .collect();
        loop {
            let served = app.states(twin).await;
            if served == expected {
                break;
            }
            if Instant::now() >= deadline {
                assert_eq!(
                    served.len(),
                    expected.len(),
                    "twin {twin}: {} states served, {} expected; warnings logged: {:#?}",
                    served.len(),
                    expected.len(),
                    log_warnings(app, 60)
                );
                assert_eq!(served, expected, "twin {twin}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
