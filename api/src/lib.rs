//! Ember's control plane on the host: the configuration and API models (Firecracker's
//! dialect), HTTP framing and routing for the API socket, the API socket's client, and the
//! client for ember-init's guest agent, and merging diff snapshot memory files ([`memfile`]).
//! Nothing here touches KVM.

pub mod agent;
pub mod client;
pub mod http;
pub mod memfile;
pub mod models;
pub mod requests;
