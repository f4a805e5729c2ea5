//! Ember's control plane on the host: the configuration and API models (Firecracker's
//! dialect) and the client for ember-init's guest agent.

pub mod agent;
pub mod models;
