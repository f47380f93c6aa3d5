//! `--wait`: follows an operation to its outcome on the server's change
//! stream (`GET /api/v1/changes?operation=ID`, server-sent events) instead
//! of asking for it again and again.
//!
//! The stream rather than the long poll (`?wait=`), because the stream
//! carries every step on the way (pulling 40 %, creating, starting), which
//! the table output prints as it happens; the long poll only answers at the
//! end. The command is sent first and the stream opened after, so opening
//! it overlaps with the device's work instead of delaying the command; the
//! operation is read once after the subscription stands, so a step taken
//! before it is not missed.

use std::pin::pin;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;

use super::{Client, Output};
use crate::contract::{ErrorBody, Operation};

/// How much longer than `--timeout` the stream's request may live; the
/// CLI's own deadline ends the wait first, with a clearer message.
const REQUEST_SLACK: Duration = Duration::from_secs(5);

/// One thing the change stream said about the operation.
enum Seen {
    /// The operation as it is now.
    Now(Box<Operation>),
    /// The server dropped changes for this client: read the operation again.
    Lagged,
    /// Something else (a keep-alive, a kind this CLI does not know).
    Other,
}

fn parse_event(data: &str, id: &str) -> Result<Seen> {
    let v: Value = serde_json::from_str(data)
        .with_context(|| format!("the change stream sent an event that is not JSON: {data:?}"))?;
    Ok(match v.get("kind").and_then(Value::as_str) {
        Some("operation") => {
            let op: Operation = serde_json::from_value(v["operation"].clone())
                .context("the change stream sent an operation this CLI cannot read")?;
            if op.id == id {
                Seen::Now(Box::new(op))
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
        let followed = tokio::time::timeout(timeout, self.follow_stream(&mut last, timeout)).await;
        match followed {
            Ok(r) => r,
            Err(_) => bail!(
                "operation {id} still {} after {}s",
                last.status.as_str(),
                timeout.as_secs()
            ),
        }
    }

    async fn follow_stream(&self, op: &mut Operation, timeout: Duration) -> Result<Operation> {
        let id = op.id.clone();
        if op.status.is_final() {
            return Ok(op.clone());
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/changes", self.base))
            .query(&[("operation", id.as_str())])
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(timeout + REQUEST_SLACK)
            .send()
            .await
            .with_context(|| format!("cannot reach the Drover API at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            if let Ok(e) = serde_json::from_str::<ErrorBody>(&text) {
                bail!(
                    "cannot follow operation {id}: {} ({status})",
                    e.error.message
                );
            }
            bail!("cannot follow operation {id}: {status}: {text}");
        }
        // Subscribed now: what the operation looked like before is in this
        // read, everything after it comes on the stream. The first progress
        // line is printed only now, so it also says "following".
        self.reread(op).await?;
        let mut shown = String::new();
        self.show_progress(op, &mut shown);
        let chunks = futures_util::stream::try_unfold(resp, |mut r| async move {
            Ok::<_, reqwest::Error>(r.chunk().await?.map(|b| (b, r)))
        });
        let mut events = pin!(chunks.eventsource());
        while !op.status.is_final() {
            let Some(event) = events.next().await else {
                bail!(
                    "the Drover API at {} closed the change stream before operation {id} ended (last seen: {}); see `drover ops show {id}`",
                    self.base,
                    op.status.as_str()
                );
            };
            let event = event.with_context(|| {
                format!(
                    "lost the change stream from the Drover API at {} while operation {id} was {}; see `drover ops show {id}`",
                    self.base,
                    op.status.as_str()
                )
            })?;
            match parse_event(&event.data, &id)? {
                // Changes come in order, but the read above may already
                // be newer than the first few of them.
                Seen::Now(now) if now.updated_at_ms >= op.updated_at_ms => *op = *now,
                Seen::Now(_) | Seen::Other => {}
                Seen::Lagged => self.reread(op).await?,
            }
            self.show_progress(op, &mut shown);
        }
        Ok(op.clone())
    }

    async fn reread(&self, op: &mut Operation) -> Result<()> {
        let v = self.get(&format!("/api/v1/operations/{}", op.id)).await?;
        *op = serde_json::from_value(v)?;
        Ok(())
    }

    fn show_progress(&self, op: &Operation, shown: &mut String) {
        if self.output != Output::Table || op.status.is_final() {
            return;
        }
        let line = super::progress_line(op);
        if line != *shown {
            eprintln!("{line}");
            *shown = line;
        }
    }
}

#[cfg(test)]
mod tests;
