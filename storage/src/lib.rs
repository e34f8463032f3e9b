//! Rampart's durable storage, on one RocksDB database per node.
//!
//! - [`log_store`]: the Raft log, vote and committed pointer (openraft `RaftLogStorage`).
//! - [`state_machine`]: the applied cluster state and its snapshots
//!   (openraft `RaftStateMachine`), plus [`StateView`], the read handle the node uses.
//! - [`db`]: opening the database and the column families every part uses.
//! - [`book`]: the replication bookkeeping of one mirrored directory (its own database).
//!
//! Durability contract, stated on each method and checked by openraft's conformance
//! suite: the vote and appended entries are on disk (RocksDB WAL synced) before
//! openraft is told they are; snapshots are on disk before they are reported built
//! or installed.
#![allow(clippy::result_large_err)]

pub mod book;
pub mod db;
pub mod log_store;
pub mod state_machine;

pub use book::{BookError, JournalEntry, MarkKind, Marks, ReplicationBook, SyncPoint};
pub use db::{open, StoreError};
pub use log_store::LogStore;
pub use state_machine::{AppliedState, StateMachineStore, StateView};
