//! Verdicts over a history. Each checker is pure: a history in, a [`Verdict`] out.
//!
//! Checkers for a run are listed by [`for_run`]. The farm module's bucket-partition
//! checker plugs in here: implement [`Checker`] and add it for farm workloads.

pub mod copies;
pub mod election;
pub mod linearizable;
pub mod set;
pub mod single_prim;

use serde::Serialize;
use serde_json::Value;

use crate::history::Entry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Valid,
    Invalid,
    /// The history holds nothing this checker can judge (no PRIM periods, no leader
    /// observed): neither a pass nor a failure.
    NotApplicable,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub checker: String,
    pub outcome: Outcome,
    /// One line for people.
    pub summary: String,
    /// The evidence: violating operations, counts…
    pub details: Value,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        self.outcome == Outcome::Valid
    }

    pub fn not_applicable(checker: &str, summary: String, details: Value) -> Verdict {
        Verdict {
            checker: checker.into(),
            outcome: Outcome::NotApplicable,
            summary,
            details,
        }
    }
}

/// `Valid` when `ok`, else `Invalid`.
pub fn outcome(ok: bool) -> Outcome {
    if ok {
        Outcome::Valid
    } else {
        Outcome::Invalid
    }
}

/// A run is valid when no verdict is invalid and at least one checker judged it.
pub fn run_is_valid(verdicts: &[Verdict]) -> bool {
    verdicts.iter().all(|v| v.outcome != Outcome::Invalid) && verdicts.iter().any(Verdict::is_valid)
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
        "set" => {
            checkers.push(Box::new(set::SetChecker));
            checkers.push(Box::new(copies::CopiesIdentical));
        }
        _ => {}
    }
    checkers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(outcome: Outcome) -> Verdict {
        Verdict {
            checker: "c".into(),
            outcome,
            summary: String::new(),
            details: Value::Null,
        }
    }

    #[test]
    fn a_run_nothing_judged_is_not_valid() {
        use Outcome::*;
        assert!(!run_is_valid(&[
            verdict(NotApplicable),
            verdict(NotApplicable)
        ]));
        assert!(!run_is_valid(&[]));
        assert!(run_is_valid(&[verdict(NotApplicable), verdict(Valid)]));
        assert!(!run_is_valid(&[verdict(Valid), verdict(Invalid)]));
    }
}
