//! The Drover protocol, version 1.
//!
//! This crate is the only place that knows topic names and payload shapes.
//! The orchestrator, the agent, the tests and the load generator all build and
//! parse topics through [`topic`] and encode payloads through [`codec`]; none of
//! them formats a topic string by hand. It does no I/O.

#![forbid(unsafe_code)]

pub mod codec;
pub mod discovery;
pub mod filter;
pub mod identity;
pub mod ids;
pub mod job;
pub mod model;
pub mod payload;
pub mod platform;
pub mod topic;
pub mod update;

pub use codec::{decode, encode, DecodeError, PROTOCOL_VERSION};
pub use ids::{DeviceId, IdError, Name};
pub use platform::Platform;
