//! One PRIM at a time: no two nodes act as PRIM of the same module at overlapping
//! times, from the role transitions the nodes record (start and end of acting).

use std::collections::BTreeMap;

use serde_json::json;

use super::{Checker, Verdict};
use crate::history::Entry;

pub struct SinglePrim;

/// [start, end) during which `node` acted as PRIM; `end` is `None` while still acting.
#[derive(Debug, Clone)]
struct Interval {
    node: String,
    start: f64,
    end: Option<f64>,
}

impl Checker for SinglePrim {
    fn name(&self) -> &'static str {
        "single-prim"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let mut intervals: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
        for entry in history {
            if let Entry::Role {
                time_ms,
                node,
                module,
                role,
                acting,
            } = entry
            {
                if role != "PRIM" {
                    continue;
                }
                let list = intervals.entry(module.clone()).or_default();
                let open = list.iter_mut().find(|i| i.node == *node && i.end.is_none());
                match (acting, open) {
                    (true, None) => list.push(Interval {
                        node: node.clone(),
                        start: *time_ms,
                        end: None,
                    }),
                    (false, Some(interval)) => interval.end = Some(*time_ms),
                    _ => {}
                }
            }
        }
        let mut violations = Vec::new();
        for (module, list) in &intervals {
            for (i, a) in list.iter().enumerate() {
                for b in &list[i + 1..] {
                    let a_end = a.end.unwrap_or(f64::INFINITY);
                    let b_end = b.end.unwrap_or(f64::INFINITY);
                    if a.node != b.node && a.start < b_end && b.start < a_end {
                        violations.push(json!({
                            "module": module,
                            "nodes": [a.node, b.node],
                            "from_ms": a.start.max(b.start),
                            "to_ms": a_end.min(b_end),
                        }));
                    }
                }
            }
        }
        let periods: usize = intervals.values().map(Vec::len).sum();
        if periods == 0 {
            return Verdict::not_applicable(
                self.name(),
                "no node reported acting as PRIM".into(),
                json!({ "prim_periods": 0 }),
            );
        }
        Verdict {
            checker: self.name().into(),
            outcome: super::outcome(violations.is_empty()),
            summary: if violations.is_empty() {
                format!("{periods} PRIM periods, never two at once")
            } else {
                format!("{} overlaps of two PRIMs", violations.len())
            },
            details: json!({ "prim_periods": periods, "violations": violations }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(time_ms: f64, node: &str, acting: bool) -> Entry {
        Entry::Role {
            time_ms,
            node: node.into(),
            module: "db".into(),
            role: "PRIM".into(),
            acting,
        }
    }

    #[test]
    fn a_handover_is_fine_and_an_overlap_is_flagged() {
        let handover = vec![
            role(0.0, "n1", true),
            role(10.0, "n1", false),
            role(11.0, "n2", true),
        ];
        assert!(SinglePrim.check(&handover).is_valid());
        // n2 starts before n1 stopped: two PRIMs between 9 and 10 ms.
        let overlap = vec![
            role(0.0, "n1", true),
            role(9.0, "n2", true),
            role(10.0, "n1", false),
        ];
        let verdict = SinglePrim.check(&overlap);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["violations"][0]["from_ms"], 9.0);
    }

    #[test]
    fn a_history_without_prim_periods_is_not_judged() {
        let verdict = SinglePrim.check(&[]);
        assert_eq!(verdict.outcome, crate::checker::Outcome::NotApplicable);
    }

    #[test]
    fn a_prim_that_never_stops_overlaps_every_later_prim() {
        let history = vec![role(0.0, "n1", true), role(50.0, "n2", true)];
        assert!(!SinglePrim.check(&history).is_valid());
    }
}
