//! ember-init's library side: the pieces of PID 1 that are plain data handling, unit-tested
//! on the host (kernel command line options, what the guest reports about itself), and the
//! agent's wire protocol, shared with the host client (`api::agent`).

pub mod cmdline;
pub mod ipconfig;
pub mod proto;
pub mod report;
