//! Raft's election safety: at most one leader per term, from the nodes' own answers.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::{Checker, Verdict};
use crate::history::Entry;

pub struct OneLeaderPerTerm;

impl Checker for OneLeaderPerTerm {
    fn name(&self) -> &'static str {
        "one-leader-per-term"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let mut leaders: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for entry in history {
            if let Entry::Observe {
                node,
                raft_state: Some(state),
                term: Some(term),
                ..
            } = entry
            {
                if state == "Leader" {
                    leaders.entry(*term).or_default().insert(node.clone());
                }
            }
        }
        let violations: BTreeMap<u64, BTreeSet<String>> = leaders
            .iter()
            .filter(|(_, n)| n.len() > 1)
            .map(|(t, n)| (*t, n.clone()))
            .collect();
        if leaders.is_empty() {
            return Verdict::not_applicable(
                self.name(),
                "no node was observed as Raft leader".into(),
                json!({ "terms_with_leader": 0 }),
            );
        }
        Verdict {
            checker: self.name().into(),
            outcome: super::outcome(violations.is_empty()),
            summary: if violations.is_empty() {
                format!("{} terms with a leader, one leader each", leaders.len())
            } else {
                format!("{} terms had several leaders", violations.len())
            },
            details: json!({ "terms_with_leader": leaders.len(), "violations": violations }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(time_ms: f64, node: &str, state: &str, term: u64) -> Entry {
        Entry::Observe {
            time_ms,
            node: node.into(),
            raft_state: Some(state.into()),
            term: Some(term),
            leader: None,
        }
    }

    #[test]
    fn two_leaders_in_one_term_are_flagged() {
        let fine = vec![
            observe(1.0, "n1", "Leader", 1),
            observe(2.0, "n2", "Leader", 2),
        ];
        assert!(OneLeaderPerTerm.check(&fine).is_valid());
        let bad = vec![
            observe(1.0, "n1", "Leader", 3),
            observe(2.0, "n2", "Leader", 3),
        ];
        let verdict = OneLeaderPerTerm.check(&bad);
        assert!(!verdict.is_valid());
        assert!(verdict.details["violations"]["3"].is_array());
    }
}
