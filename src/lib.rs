//! Rampart: a high-availability cluster manager. This crate is the node agent, its
//! admin API and the `rampart` command line; the Raft state machine and transport are
//! in `rampart-raft`, storage in `rampart-storage`.

pub mod api;
pub mod cli;
pub mod config;
pub mod module;
pub mod node;
