//! ember-init's library side: the pieces of PID 1 that are plain data handling, unit-tested
//! on the host (kernel command line options, what the guest reports about itself).

pub mod cmdline;
pub mod ipconfig;
pub mod report;
