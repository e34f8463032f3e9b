//! Rampart's Jepsen-style harness.
//!
//! - [`testbed`]: a cluster of real `rampart` processes, one per network namespace,
//!   joined by a Linux bridge, with addresses from 198.18.0.0/15; torn down on drop,
//!   and a sweeper for the leftovers of runs that were killed.
//! - [`nemesis`]: faults (kill, pause, partitions, link cuts, full disk) and the seeded
//!   schedule that applies and heals them.
//! - [`history`]: every client operation and every observation, as JSON lines.
//! - [`checker`]: verdicts over a history (set, single PRIM, linearizable register,
//!   one leader per term), each with a self-test on a known violation.
//! - [`workload`]: clients that generate the operations.
//! - [`report`]: a folder per run with the history, verdicts, availability and an SVG
//!   timeline.
//! - [`runner`]: all of the above for one run.

pub mod checker;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod runner;
pub mod testbed;
pub mod workload;
