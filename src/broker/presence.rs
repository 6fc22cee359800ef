//! Which live instances share the group, to say at start when a single-instance
//! configuration (SQLite, or the in-process cache) is not alone (SPEC section 13).
//!
//! Each instance answers on the core NATS subject `twins.instances.<group>` for as long
//! as it runs, and asks there once when it starts: every live instance of the group,
//! ingesting or standing by, answers with its name and whether its configuration is
//! single-instance. The signal is liveness itself: a killed instance never answers, so
//! a restart after a crash is not mistaken for company (a stored lease or a consumer's
//! waiting pull requests outlive their holder for a while), and a standby instance is
//! found as well as the one ingesting. When either side of a pair is single-instance,
//! both log a warning saying what goes wrong; nothing else changes.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Subjects of the presence requests: `twins.instances.<group>`. Three tokens, so the
/// request/reply subscription (`<prefix>.*.*.*`) never sees them.
pub const SUBJECT_PREFIX: &str = "twins.instances";
/// How long the question at start collects answers.
const ASK_FOR: Duration = Duration::from_secs(1);

/// What an instance says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The instance's name in the group's lease (unique per process).
    pub holder: String,
    /// Why its configuration serves one instance only (None: it can share the group).
    pub single: Option<String>,
}

/// This instance's side of the presence protocol.
pub struct Presence {
    pub client: async_nats::Client,
    pub group: String,
    pub me: Hello,
}

impl Presence {
    fn subject(&self) -> String {
        format!("{SUBJECT_PREFIX}.{}", self.group)
    }

    /// Asks once who else is there, then answers the others' questions until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut questions = match self.client.subscribe(self.subject()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "presence subject not subscribed");
                return;
            }
        };
        let ask = self.ask();
        tokio::pin!(ask);
        let mut asked = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                others = &mut ask, if !asked => {
                    asked = true;
                    self.report(&others);
                }
                question = questions.next() => match question {
                    Some(q) => self.answer(q).await,
                    None => break,
                },
            }
        }
        let _ = questions.unsubscribe().await;
    }

    /// The other live instances of the group, by name.
    async fn ask(&self) -> BTreeMap<String, Hello> {
        let mut others = BTreeMap::new();
        let inbox = self.client.new_inbox();
        let mut answers = match self.client.subscribe(inbox.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "presence answers not subscribed");
                return others;
            }
        };
        let question = self
            .client
            .publish_with_reply(self.subject(), inbox, self.hello())
            .await;
        if let Err(e) = question {
            tracing::debug!(error = %e, "presence question not published");
            return others;
        }
        let deadline = tokio::time::Instant::now() + ASK_FOR;
        while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await {
            match serde_json::from_slice::<Hello>(&answer.payload) {
                Ok(hello) if hello.holder != self.me.holder => {
                    others.insert(hello.holder.clone(), hello);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "unreadable presence answer"),
            }
        }
        let _ = answers.unsubscribe().await;
        others
    }

    fn hello(&self) -> bytes::Bytes {
        // A struct of strings always serializes.
        serde_json::to_vec(&self.me).unwrap_or_default().into()
    }

    /// Says what the answers to the question at start mean.
    fn report(&self, others: &BTreeMap<String, Hello>) {
        if others.is_empty() {
            tracing::debug!(group = %self.group, "no other live instance in the instance group");
            return;
        }
        tracing::info!(
            group = %self.group,
            instances = others.len() + 1,
            "other live instances share the instance group"
        );
        for other in others.values() {
            self.warn_if_single(other);
        }
    }

    /// Answers another instance's question, and says what its arrival means.
    async fn answer(&self, question: async_nats::Message) {
        let Ok(other) = serde_json::from_slice::<Hello>(&question.payload) else {
            tracing::debug!("unreadable presence question");
            return;
        };
        if other.holder == self.me.holder {
            return;
        }
        if let Some(reply) = question.reply
            && let Err(e) = super::publish(&self.client, reply, self.hello()).await
        {
            tracing::debug!(error = %e, "presence answer not published");
        }
        self.warn_if_single(&other);
    }

    /// Warns when this instance or `other` is configured for one instance only.
    fn warn_if_single(&self, other: &Hello) {
        let group = &self.group;
        if let Some(why) = &self.me.single {
            tracing::warn!(
                %group,
                other = %other.holder,
                reason = %why,
                "this configuration is single-instance ({why}), but another live instance \
                 uses the instance group {group}. {} Run several instances on MongoDB or \
                 PostgreSQL with Redis (MG_TWINS_CACHE_URL), or give each deployment its \
                 own MG_TWINS_INSTANCE_GROUP",
                consequences(why)
            );
        } else if let Some(why) = &other.single {
            tracing::warn!(
                %group,
                other = %other.holder,
                reason = %why,
                "an instance with a single-instance configuration ({why}) uses the \
                 instance group {group} too. {}",
                consequences(why)
            );
        }
    }
}

/// What goes wrong when an instance configured with `why` shares its group.
fn consequences(why: &str) -> String {
    let mut out = Vec::new();
    if why.contains("SQLite") {
        out.push(
            "With SQLite, instances on separate databases each hold the group's lease in \
             their own file: they recreate the group's durable consumer in turn and split \
             the messages between their databases, and twins written through one are \
             unknown to the others.",
        );
    }
    if why.contains("in-process cache") {
        out.push(
            "With the in-process cache, an instance does not see the twins created, moved \
             or deleted through another one, and their messages are not applied.",
        );
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consequences_name_each_reason() {
        let both = consequences("SQLite store, in-process cache");
        assert!(both.contains("With SQLite"), "{both}");
        assert!(both.contains("in-process cache, an instance"), "{both}");
        assert!(consequences("other").is_empty());
    }
}
