//! A set: every acknowledged `add` is in the final read of every copy, and no read
//! holds what was never added or what cannot be read as an element.
//!
//! A read's value is an array of elements, or `{"elements": [...], "unreadable": [...]}`
//! when the reader found records it could not parse (torn or foreign bytes). Reads are
//! per key: with several copies (a mirror's PRIM and SECOND), each key's last read is
//! judged on its own.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::{Checker, Verdict};
use crate::history::{Entry, OpKind};

pub struct SetChecker;

fn elements(value: &Value) -> BTreeSet<u64> {
    value
        .get("elements")
        .unwrap_or(value)
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

fn unreadable(value: &Value) -> Vec<Value> {
    value
        .get("unreadable")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

impl Checker for SetChecker {
    fn name(&self) -> &'static str {
        "set"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let mut attempted = BTreeSet::new();
        let mut acknowledged = BTreeSet::new();
        let mut final_reads: BTreeMap<&str, &Value> = BTreeMap::new();
        let mut unexpected = BTreeSet::new();
        let mut garbage = Vec::new();
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
                    final_reads.insert(&op.key, &op.value);
                }
                _ => {}
            }
        }
        // Every read, not only the last: an element read before it was added is as
        // wrong at any time.
        for entry in history {
            let Entry::Op(op) = entry else { continue };
            if op.f == "read" && op.kind == OpKind::Ok {
                unexpected.extend(elements(&op.value).difference(&attempted).copied());
                garbage.extend(
                    unreadable(&op.value)
                        .into_iter()
                        .map(|record| json!({ "key": op.key, "record": record })),
                );
            }
        }
        if final_reads.is_empty() {
            return Verdict {
                checker: self.name().into(),
                outcome: super::Outcome::Invalid,
                summary: "no successful read: nothing can be concluded".into(),
                details: json!({ "acknowledged": acknowledged.len() }),
            };
        }
        let mut lost = BTreeMap::new();
        let mut present = Vec::new();
        for (key, value) in &final_reads {
            let read = elements(value);
            let missing: Vec<u64> = acknowledged.difference(&read).copied().collect();
            present.push(format!("{key}: {}", read.len()));
            if !missing.is_empty() {
                lost.insert(key.to_string(), missing);
            }
        }
        let lost_count: usize = lost.values().map(Vec::len).sum();
        let valid = lost.is_empty() && unexpected.is_empty() && garbage.is_empty();
        Verdict {
            checker: self.name().into(),
            outcome: super::outcome(valid),
            summary: format!(
                "{} acknowledged of {} attempted; final reads {}; {} lost, {} unexpected, {} unreadable",
                acknowledged.len(),
                attempted.len(),
                present.join(", "),
                lost_count,
                unexpected.len(),
                garbage.len(),
            ),
            details: json!({
                "lost": lost,
                "unexpected": unexpected,
                "unreadable": garbage,
                "acknowledged": acknowledged.len(),
                "attempted": attempted.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    fn op(kind: OpKind, f: &str, value: Value) -> Entry {
        keyed(kind, f, "s", value)
    }

    fn keyed(kind: OpKind, f: &str, key: &str, value: Value) -> Entry {
        Entry::Op(Op {
            time_ms: 0.0,
            process: 0,
            kind,
            f: f.into(),
            key: key.into(),
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
        assert!(SetChecker.check(&history).is_valid());
        history.push(op(OpKind::Ok, "read", json!([1])));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["lost"], json!({"s": [2]}));
    }

    #[test]
    fn an_element_never_written_is_flagged() {
        let mut history = add(1, true);
        history.push(op(OpKind::Ok, "read", json!([1, 9])));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["unexpected"], json!([9]));
    }

    #[test]
    fn each_copy_is_judged_on_its_own_final_read() {
        let mut history: Vec<Entry> = [add(1, true), add(2, true)].concat();
        history.push(keyed(OpKind::Ok, "read", "prim", json!([1, 2])));
        history.push(keyed(OpKind::Ok, "read", "second", json!([1])));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["lost"], json!({"second": [2]}));
    }

    #[test]
    fn an_unreadable_record_is_flagged() {
        let mut history = add(1, true);
        let value = json!({"elements": [1], "unreadable": [{"record": "\0\0"}]});
        history.push(op(OpKind::Ok, "read", value));
        let verdict = SetChecker.check(&history);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["unreadable"][0]["key"], "s");
    }
}
