//! The Drover orchestrator. `drover serve` runs [`server::start`]; the other
//! subcommands are a CLI over the REST API ([`cli`]).
//!
//! Layers, from the inside out (the rules are in ARCHITECTURE.md):
//! - [`contract`]: the REST API's request and response types.
//! - [`core`]: the pure state machines (fleet, operations, commands,
//!   secrets book). No tokio, axum, redb or rumqttc.
//! - [`store`]: the redb file and its one writer.
//! - [`engine`]: the task that owns the fleet and answers commands.
//! - [`link`]: the orchestrator's MQTT client.
//! - [`security`]: identities, API tokens, the audit log.
//! - [`history`]: telemetry history and container logs, in their own file.
//! - [`registry`]: which platforms an image provides, asked of its
//!   registry (OCI distribution API) and cached per digest.
//! - [`rules`]: the rules task, the I/O around `core::rules`.
//! - [`http`]: the REST adapter; [`cli`]: the command line client.

#![forbid(unsafe_code)]

pub mod automation;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod contract;
pub mod core;
pub mod engine;
pub mod history;
pub mod http;
pub mod link;
pub mod mdns;
pub mod metrics;
pub mod registry;
pub mod rules;
pub mod security;
pub mod server;
pub mod store;
