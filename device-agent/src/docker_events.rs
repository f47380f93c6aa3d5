//! Watches Docker's event stream for this device's containers dying,
//! stopping or disappearing, and pokes the reconciler so drift is repaired
//! at once instead of at the next periodic pass.
//!
//! The stream is a hint, never the truth: the reconciler re-reads the
//! runtime on every pass. So a lost event costs latency only, and after the
//! stream breaks (daemon restart, socket gone) the watcher reconnects with
//! backoff and asks for a pass, because events may have been missed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::query_parameters::EventsOptionsBuilder;
use drover_shared::model::{LABEL_DEVICE, LABEL_MANAGED};
use drover_shared::DeviceId;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::reconcile::ReconcileEvent;
use crate::runtime::DockerRuntime;

/// The container events that can mean drift, and health changes (a
/// container may be waiting for a dependency to become healthy).
const ACTIONS: [&str; 5] = ["die", "stop", "destroy", "oom", "health_status"];
/// A stream that stayed up this long counts as healthy: backoff restarts.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// The daemon is local, so there is no herd to spread: a short cap brings
/// repairs back soon after the daemon returns.
const RECONNECT: Backoff = Backoff {
    base: Duration::from_millis(250),
    max: Duration::from_secs(5),
};

/// Runs until the trigger channel closes. Tells `health` when the daemon
/// stops or starts answering (only the changes).
pub async fn watch(
    runtime: DockerRuntime,
    device: DeviceId,
    trigger: mpsc::Sender<()>,
    health: mpsc::Sender<ReconcileEvent>,
) {
    let filters: HashMap<&str, Vec<String>> = HashMap::from([
        ("type", vec!["container".to_string()]),
        (
            "label",
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DEVICE}={device}"),
            ],
        ),
        ("event", ACTIONS.iter().map(|a| a.to_string()).collect()),
    ]);
    let mut failures: u32 = 0;
    let mut was_down = false;
    // What `health` was last told: None before the first look.
    let mut reported: Option<bool> = None;
    loop {
        if trigger.is_closed() {
            return;
        }
        let connected = match runtime.client().await {
            Ok(docker) => match docker.ping().await {
                Ok(_) => Ok(docker),
                Err(e) => {
                    debug!(error = %e, "docker ping failed");
                    runtime.forget().await;
                    Err(format!("docker is not reachable: {e}"))
                }
            },
            Err(e) => {
                debug!(error = %e, "docker not reachable");
                Err(e.to_string())
            }
        };
        let up = connected.is_ok();
        if reported != Some(up) {
            reported = Some(up);
            let news = connected.as_ref().map(|_| ()).map_err(Clone::clone);
            let _ = health.send(ReconcileEvent::Docker(news)).await;
        }
        if let Ok(docker) = connected {
            if was_down {
                info!("docker is reachable again; watching container events");
            }
            was_down = false;
            let since = Instant::now();
            let mut stream =
                docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
            // Anything may have happened while nobody watched.
            let _ = trigger.try_send(());
            loop {
                match stream.next().await {
                    Some(Ok(ev)) => {
                        let id = ev
                            .actor
                            .as_ref()
                            .and_then(|a| a.id.as_deref())
                            .unwrap_or("");
                        debug!(action = ev.action.as_deref().unwrap_or(""), container = %short(id), "docker event");
                        // Full channel: a pass is already due, which is enough.
                        if trigger.try_send(()).is_err() && trigger.is_closed() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "docker event stream failed");
                        break;
                    }
                    None => {
                        debug!("docker event stream ended");
                        break;
                    }
                }
            }
            runtime.forget().await;
            if since.elapsed() >= HEALTHY_AFTER {
                failures = 0;
            }
        }
        if !was_down {
            warn!("docker event stream lost; reconnecting with backoff");
        }
        was_down = true;
        failures = failures.saturating_add(1);
        tokio::time::sleep(RECONNECT.delay(failures)).await;
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
