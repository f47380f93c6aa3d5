//! `drover-loadtest`: thousands of simulated device agents in one process
//! against a real orchestrator, and the scenarios that measure it.
//!
//! What is real: every agent's MQTT client (rumqttc, one connection each),
//! the protocol (`drover_shared` topics, payloads and codec), the ack rules
//! (the real agent's `Intake`), the orchestrator process and the broker
//! (embedded rumqttd or Mosquitto). What is simulated: the container
//! runtime ([`runtime`]) — pulls and starts are sleeps.
//!
//! - [`sim`]: the simulated agents and their counters.
//! - [`runtime`]: the SIMULATED container runtime.
//! - [`target`]: the orchestrator (and Mosquitto) under test, as processes.
//! - [`procs`]: /proc sampling (RSS, CPU) and the open-file limit.
//! - [`api`]: the REST calls the scenarios make.
//! - [`scenario`]: ramp, steady, rollout, rtt, storm, agent-footprint;
//!   [`scenario::rollout_request`] the rollout scenario's one-request path;
//!   [`scenario::console`] what the web console costs at fleet scale.
//! - [`sse`]: counting a server-sent-event stream (pure).
//! - [`browser`]: a real headless Chromium on the console (chromedriver).
//! - [`latency`]: e2e-latency, `drover deploy/remove --wait` next to raw Docker.
//! - [`report`]: markdown tables and the `RESULTS.md` record.

#![forbid(unsafe_code)]

pub mod api;
pub mod browser;
pub mod latency;
pub mod procs;
pub mod report;
pub mod runtime;
pub mod scenario;
pub mod sim;
pub mod sse;
pub mod target;

/// A short suffix unique to this process and call, for app names and
/// data directories.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{:x}{}", t % 0xff_ffff, N.fetch_add(1, Ordering::Relaxed))
}
