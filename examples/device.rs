//! A stand-in for a device or back-end talking to twins through the broker, for trying
//! the service out by hand (the README's walk-throughs use it).
//!
//! ```text
//! cargo run --example device -- publish <channel> <subtopic|""> '<SenML JSON>'
//! cargo run --example device -- inband  <channel> <twinID> <document> <get|put|patch|delete> '<JSON>'
//! cargo run --example device -- request <twinID> <document> <get|put|patch|delete> '<JSON>'
//! ```
//! The broker is `MG_MESSAGE_BROKER_URL` (default `nats://localhost:4222`).

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use twins::broker::{self, Envelope};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn envelope(channel: &str, subtopic: &str, payload: &str) -> Vec<u8> {
    broker::encode(&Envelope {
        channel: channel.into(),
        subtopic: subtopic.into(),
        publisher: "device".into(),
        protocol: "nats".into(),
        payload: payload.as_bytes().to_vec(),
        created: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
    })
}

async fn run(args: &[String]) -> Result<(), BoxError> {
    let url = std::env::var("MG_MESSAGE_BROKER_URL")
        .unwrap_or_else(|_| twins::config::DEFAULT_BROKER_URL.into());
    let nats = async_nats::connect(url.as_str()).await?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["publish", channel, subtopic, senml] => {
            let js = async_nats::jetstream::new(nats);
            let ack = js
                .publish(
                    broker::subject(channel, subtopic),
                    envelope(channel, subtopic, senml).into(),
                )
                .await?
                .await?;
            println!("published as stream message {}", ack.sequence);
        }
        ["inband", channel, twin, document, op, body] => {
            let subtopic = format!("twins.{twin}.{document}.{op}");
            let mut answers = nats
                .subscribe(format!("channels.{channel}.{subtopic}.response.*"))
                .await?;
            nats.flush().await?;
            let js = async_nats::jetstream::new(nats.clone());
            js.publish(
                broker::subject(channel, &subtopic),
                envelope(channel, &subtopic, body).into(),
            )
            .await?
            .await?;
            let msg = tokio::time::timeout(Duration::from_secs(5), answers.next())
                .await
                .map_err(|_| "no answer within 5 s")?
                .ok_or("subscription closed")?;
            let answer = broker::decode(&msg.payload)?;
            println!("{}", answer.subtopic);
            println!("{}", String::from_utf8_lossy(&answer.payload));
        }
        ["request", twin, document, op, body] => {
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                nats.request(
                    format!("twins.{twin}.{document}.{op}"),
                    body.to_string().into(),
                ),
            )
            .await
            .map_err(|_| "no answer within 5 s")??;
            println!("{}", String::from_utf8_lossy(&reply.payload));
        }
        _ => return Err("usage: see the comment at the top of examples/device.rs".into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device: {e}");
            ExitCode::FAILURE
        }
    }
}
