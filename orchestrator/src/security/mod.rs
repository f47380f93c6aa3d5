//! Who may do what: device credentials and enrollment (the broker's
//! authority), REST API tokens with roles, the audit log, and secrets.

pub mod access;
pub mod identity;
pub mod secret;
