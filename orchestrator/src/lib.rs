//! The Drover orchestrator. `drover serve` runs [`server::start`]; the other
//! subcommands are a CLI over the REST API ([`cli`]).

#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod backoff;
pub mod certs;
pub mod cli;
pub mod cli_security;
pub mod fleet;
pub mod identity;
pub mod metrics;
pub mod mqtt;
pub mod ops;
pub mod records;
pub mod registries;
pub mod secret;
pub mod security_api;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod writer;
