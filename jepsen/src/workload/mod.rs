//! Clients that generate a history against the testbed, and the observer that records
//! each node's Raft role.

pub mod append;
pub mod observer;
pub mod register;
