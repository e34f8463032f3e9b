//! Verdicts over a history. Each checker is pure: a history in, a [`Verdict`] out.
//!
//! Checkers for a run are listed by [`for_run`]. The farm module's bucket-partition
//! checker plugs in here: implement [`Checker`] and add it for farm workloads.

pub mod election;
pub mod linearizable;
pub mod set;
pub mod single_prim;

use serde::Serialize;
use serde_json::Value;

use crate::history::Entry;

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub checker: String,
    pub valid: bool,
    /// One line for people.
    pub summary: String,
    /// The evidence: violating operations, counts…
    pub details: Value,
}

pub trait Checker: Send + Sync {
    fn name(&self) -> &'static str;
    fn check(&self, history: &[Entry]) -> Verdict;
}

/// The checkers that apply to every run of `workload`.
pub fn for_run(workload: &str) -> Vec<Box<dyn Checker>> {
    let mut checkers: Vec<Box<dyn Checker>> = vec![
        Box::new(election::OneLeaderPerTerm),
        Box::new(single_prim::SinglePrim),
    ];
    match workload {
        "register" => checkers.push(Box::new(linearizable::LinearizableRegister)),
        "set" => checkers.push(Box::new(set::SetChecker)),
        _ => {}
    }
    checkers
}
