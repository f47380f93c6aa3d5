//! `--wait`: follows an operation or a rollout to its outcome on the
//! server's change stream (`GET /api/v1/changes?operation=ID`, `?rollout=ID`;
//! server-sent events) instead of asking for it again and again.
//!
//! The stream rather than the long poll (`?wait=`), because the stream
//! carries every step on the way (pulling 40 %, creating, starting; a
//! rollout's batches), which the table output prints as it happens; the
//! long poll only answers at the end. The command is sent first and the
//! stream opened after, so opening it overlaps with the device's work
//! instead of delaying the command; the followed thing is read once after
//! the subscription stands, so a step taken before it is not missed.

use std::pin::pin;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Client, Output};
use crate::contract::{ErrorBody, Operation, Rollout};

/// How much longer than `--timeout` the stream's request may live; the
/// CLI's own deadline ends the wait first, with a clearer message.
const REQUEST_SLACK: Duration = Duration::from_secs(5);

/// What `--wait` can follow: a REST resource whose changes come on the
/// change stream as `{"kind": KIND, KIND: {...}}`, filtered by `?KIND=ID`.
pub(crate) trait Followed: DeserializeOwned + Clone {
    /// The change's kind, its field and the stream's filter.
    const KIND: &'static str;
    /// Where it is read: `/api/v1/{COLLECTION}/{id}`.
    const COLLECTION: &'static str;
    /// The CLI command that shows it: `drover {SHOW} show ID`.
    const SHOW: &'static str;
    fn id(&self) -> &str;
    fn updated_at_ms(&self) -> u64;
    /// Its status or phase, in the API's words.
    fn state(&self) -> &'static str;
    fn is_final(&self) -> bool;
}

impl Followed for Operation {
    const KIND: &'static str = "operation";
    const COLLECTION: &'static str = "operations";
    const SHOW: &'static str = "ops";
    fn id(&self) -> &str {
        &self.id
    }
    fn updated_at_ms(&self) -> u64 {
        self.updated_at_ms
    }
    fn state(&self) -> &'static str {
        self.status.as_str()
    }
    fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

impl Followed for Rollout {
    const KIND: &'static str = "rollout";
    const COLLECTION: &'static str = "rollouts";
    const SHOW: &'static str = "rollouts";
    fn id(&self) -> &str {
        &self.id
    }
    fn updated_at_ms(&self) -> u64 {
        self.updated_at_ms
    }
    fn state(&self) -> &'static str {
        super::rollouts::phase_str(self.phase)
    }
    fn is_final(&self) -> bool {
        self.phase.is_final()
    }
}

/// One thing the change stream said about the followed resource.
enum Seen<T> {
    /// It as it is now.
    Now(Box<T>),
    /// The server dropped changes for this client: read it again.
    Lagged,
    /// Something else (a keep-alive, a kind this CLI does not know).
    Other,
}

fn parse_event<T: Followed>(data: &str, id: &str) -> Result<Seen<T>> {
    let v: Value = serde_json::from_str(data)
        .with_context(|| format!("the change stream sent an event that is not JSON: {data:?}"))?;
    Ok(match v.get("kind").and_then(Value::as_str) {
        Some(k) if k == T::KIND => {
            let now: T = serde_json::from_value(v[T::KIND].clone()).with_context(|| {
                format!(
                    "the change stream sent a change of kind {} this CLI cannot read",
                    T::KIND
                )
            })?;
            if now.id() == id {
                Seen::Now(Box::new(now))
            } else {
                Seen::Other
            }
        }
        Some("lagged") => Seen::Lagged,
        _ => Seen::Other,
    })
}

impl Client {
    /// Follows `op` until it is final or `timeout` passes. Table output
    /// prints each new step on standard error.
    pub(crate) async fn wait_final(&self, op: Operation, timeout: Duration) -> Result<Operation> {
        let id = op.id.clone();
        let mut last = op;
        let mut shown = String::new();
        let table = self.output == Output::Table;
        let followed = tokio::time::timeout(
            timeout,
            self.follow_changes(&mut last, timeout + REQUEST_SLACK, |op: &Operation| {
                if table && !op.status.is_final() {
                    let line = super::progress_line(op);
                    if line != shown {
                        eprintln!("{line}");
                        shown = line;
                    }
                }
            }),
        )
        .await;
        match followed {
            Ok(r) => r.map(|()| last),
            Err(_) => bail!(
                "operation {id} still {} after {}s",
                last.status.as_str(),
                timeout.as_secs()
            ),
        }
    }

    /// Follows `now` on the change stream until it is final, keeping it the
    /// newest seen (also when the caller's deadline cuts this short) and
    /// calling `show` with every state it moves to, from the read after
    /// the subscription on. `request_limit` bounds the stream's request.
    pub(crate) async fn follow_changes<T: Followed>(
        &self,
        now: &mut T,
        request_limit: Duration,
        mut show: impl FnMut(&T),
    ) -> Result<()> {
        let id = now.id().to_string();
        let what = format!("{} {id}", T::KIND);
        let see = format!("see `drover {} show {id}`", T::SHOW);
        if now.is_final() {
            return Ok(());
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/changes", self.base))
            .query(&[(T::KIND, id.as_str())])
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(request_limit)
            .send()
            .await
            .with_context(|| format!("cannot reach the Drover API at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            if let Ok(e) = serde_json::from_str::<ErrorBody>(&text) {
                bail!("cannot follow {what}: {} ({status})", e.error.message);
            }
            bail!("cannot follow {what}: {status}: {text}");
        }
        // Subscribed now: what it looked like before is in this read,
        // everything after it comes on the stream. The first progress is
        // shown only now, so it also says "following".
        self.reread(now).await?;
        show(now);
        let chunks = futures_util::stream::try_unfold(resp, |mut r| async move {
            Ok::<_, reqwest::Error>(r.chunk().await?.map(|b| (b, r)))
        });
        let mut events = pin!(chunks.eventsource());
        while !now.is_final() {
            let Some(event) = events.next().await else {
                bail!(
                    "the Drover API at {} closed the change stream before {what} ended (last seen: {}); {see}",
                    self.base,
                    now.state()
                );
            };
            let event = event.with_context(|| {
                format!(
                    "lost the change stream from the Drover API at {} while {what} was {}; {see}",
                    self.base,
                    now.state()
                )
            })?;
            match parse_event::<T>(&event.data, &id)? {
                // Changes come in order, but the read above may already
                // be newer than the first few of them.
                Seen::Now(n) if n.updated_at_ms() >= now.updated_at_ms() => *now = *n,
                Seen::Now(_) | Seen::Other => continue,
                Seen::Lagged => self.reread(now).await?,
            }
            show(now);
        }
        Ok(())
    }

    async fn reread<T: Followed>(&self, now: &mut T) -> Result<()> {
        let v = self
            .get(&format!("/api/v1/{}/{}", T::COLLECTION, now.id()))
            .await?;
        *now = serde_json::from_value(v)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
