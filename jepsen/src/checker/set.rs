//! A set: every acknowledged `add` is in the final read, and the reads hold nothing
//! that was never added.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{Checker, Verdict};
use crate::history::{Entry, OpKind};

pub struct SetChecker;

fn elements(value: &Value) -> BTreeSet<u64> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

impl Checker for SetChecker {
    fn name(&self) -> &'static str {
        "set"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let mut attempted = BTreeSet::new();
        let mut acknowledged = BTreeSet::new();
        let mut final_read: Option<BTreeSet<u64>> = None;
        let mut unexpected = BTreeSet::new();
        for entry in history {
            let Entry::Op(op) = entry else { continue };
            match (op.f.as_str(), op.kind) {
                ("add", OpKind::Invoke) => {
                    attempted.extend(op.value.as_u64());
                }
                ("add", OpKind::Ok) => {
                    acknowledged.extend(op.value.as_u64());
                }
                ("read", OpKind::Ok) => {
                    let read = elements(&op.value);
                    unexpected.extend(read.difference(&attempted).copied());
                    final_read = Some(read);
                }
                _ => {}
            }
        }
        let Some(read) = final_read else {
            return Verdict {
                checker: self.name().into(),
                valid: false,
                summary: "no successful read: nothing can be concluded".into(),
                details: json!({ "acknowledged": acknowledged.len() }),
            };
        };
        let lost: Vec<u64> = acknowledged.difference(&read).copied().collect();
        let recovered = read
            .intersection(&attempted)
            .filter(|e| !acknowledged.contains(e))
            .count();
        let valid = lost.is_empty() && unexpected.is_empty();
        Verdict {
            checker: self.name().into(),
            valid,
            summary: format!(
                "{} acknowledged, {} lost, {} unexpected, {} unacknowledged but present",
                acknowledged.len(),
                lost.len(),
                unexpected.len(),
                recovered
            ),
            details: json!({ "lost": lost, "unexpected": unexpected, "acknowledged": acknowledged.len() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn op(kind: OpKind, f: &str, value: Value) -> Entry {
        Entry::Op(Op {
            time_ms: 0.0,
            process: 0,
            kind,
            f: f.into(),
            key: "s".into(),
            value,
        })
    }

    fn add(e: u64, ok: bool) -> Vec<Entry> {
        let mut ops = vec![op(OpKind::Invoke, "add", json!(e))];
        ops.push(op(
            if ok { OpKind::Ok } else { OpKind::Info },
            "add",
            json!(e),
        ));
        ops
    }

    #[test]
    fn a_lost_acknowledged_element_is_flagged() {
        let mut history: Vec<Entry> = [add(1, true), add(2, true), add(3, false)].concat();
        history.push(op(OpKind::Ok, "read", json!([1, 2])));
        assert!(SetChecker.check(&history).valid);
        history.push(op(OpKind::Ok, "read", json!([1])));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.valid);
        assert_eq!(verdict.details["lost"], json!([2]));
    }

    #[test]
    fn an_element_never_written_is_flagged() {
        let mut history = add(1, true);
        history.push(op(OpKind::Ok, "read", json!([1, 9])));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.valid);
        assert_eq!(verdict.details["unexpected"], json!([9]));
    }
}
