//! Linearizability of registers (read, write, compare-and-set), per key.
//!
//! The search is Wing & Gong's, with Lowe's memoisation of (linearized set, register
//! value): walk the history in time order; at an operation's call, try to linearize it
//! now (if the model allows and the configuration is new); at a return whose operation
//! is not yet linearized, backtrack. Operations with unknown outcome (`info`) have no
//! return: they may take effect at any point after their call, or never. Failed
//! operations did not happen and are left out; so are reads of unknown outcome.

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};

use super::{Checker, Verdict};
use crate::history::{Entry, OpKind};

/// Bound on search steps per key; beyond it the verdict is "unknown" (invalid).
const MAX_STEPS: usize = 20_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read(Option<u64>),
    Write(u64),
    Cas { expected: Option<u64>, new: u64 },
}

/// One operation: its call, and its return time (`None`: unknown outcome).
#[derive(Debug, Clone)]
struct RegisterOp {
    call: Call,
    invoked_ms: f64,
    returned_ms: Option<f64>,
    process: u64,
}

/// The register model: `None` until first written.
fn step(state: Option<u64>, call: Call) -> Option<Option<u64>> {
    match call {
        Call::Read(seen) => (seen == state).then_some(state),
        Call::Write(value) => Some(Some(value)),
        Call::Cas { expected, new } => (expected == state).then_some(Some(new)),
    }
}

pub struct LinearizableRegister;

fn parse_call(f: &str, invoke: &Value, result: Option<&Value>) -> Option<Call> {
    match f {
        "read" => Some(Call::Read(result?.as_u64())),
        "write" => Some(Call::Write(invoke.as_u64()?)),
        "cas" => Some(Call::Cas {
            expected: invoke.get("expected")?.as_u64(),
            new: invoke.get("new")?.as_u64()?,
        }),
        _ => None,
    }
}

/// Pairs invocations with completions, per key.
fn register_ops(history: &[Entry]) -> BTreeMap<String, Vec<RegisterOp>> {
    let mut open: BTreeMap<u64, (String, String, Value, f64)> = BTreeMap::new();
    let mut ops: BTreeMap<String, Vec<RegisterOp>> = BTreeMap::new();
    for entry in history {
        let Entry::Op(op) = entry else { continue };
        match op.kind {
            OpKind::Invoke => {
                open.insert(
                    op.process,
                    (op.f.clone(), op.key.clone(), op.value.clone(), op.time_ms),
                );
            }
            kind => {
                let Some((f, key, argument, invoked_ms)) = open.remove(&op.process) else {
                    continue;
                };
                let (call, returned_ms) = match kind {
                    OpKind::Ok => (parse_call(&f, &argument, Some(&op.value)), Some(op.time_ms)),
                    // Unknown outcome: a write or cas may have happened; a read says nothing.
                    OpKind::Info if f != "read" => (parse_call(&f, &argument, None), None),
                    _ => (None, None),
                };
                if let Some(call) = call {
                    ops.entry(key).or_default().push(RegisterOp {
                        call,
                        invoked_ms,
                        returned_ms,
                        process: op.process,
                    });
                }
            }
        }
    }
    // Still open at the end of the run: unknown outcome.
    for (process, (f, key, argument, invoked_ms)) in open {
        if let Some(call) = parse_call(&f, &argument, None).filter(|_| f != "read") {
            ops.entry(key).or_default().push(RegisterOp {
                call,
                invoked_ms,
                returned_ms: None,
                process,
            });
        }
    }
    ops
}

/// Outcome of the search for one key.
#[derive(Debug, PartialEq, Eq)]
enum Search {
    Linearizable,
    /// No order exists; `stuck` is the operation whose return could not be reached.
    NotLinearizable {
        stuck: usize,
    },
    GaveUp,
}

fn search(ops: &[RegisterOp]) -> Search {
    // Events: (time, is_return, op). Calls sort before returns at equal times, which
    // treats touching operations as concurrent (the permissive choice).
    let mut events: Vec<(f64, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoked_ms, false, i));
        if let Some(ret) = op.returned_ms {
            events.push((ret, true, i));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    // A doubly linked list over events; index 0 is the head sentinel, n+1 the end.
    let n = events.len();
    let end = n + 1;
    let mut next: Vec<usize> = (1..=n + 1).chain([end]).collect();
    let mut prev: Vec<usize> = [0].into_iter().chain(0..=n).collect();
    let mut call_at = vec![0usize; ops.len()];
    let mut return_at = vec![None; ops.len()];
    for (position, (_, is_return, op)) in events.iter().enumerate() {
        if *is_return {
            return_at[*op] = Some(position + 1);
        } else {
            call_at[*op] = position + 1;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        next[prev[at]] = next[at];
        prev[next[at]] = prev[at];
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        next[prev[at]] = at;
        prev[next[at]] = at;
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut remaining_ok = ops.iter().filter(|o| o.returned_ms.is_some()).count();
    let mut state: Option<u64> = None;
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut cursor = next[0];
    let mut steps = 0usize;
    loop {
        if remaining_ok == 0 {
            return Search::Linearizable;
        }
        steps += 1;
        if steps > MAX_STEPS {
            return Search::GaveUp;
        }
        let is_call = cursor != end && !events[cursor - 1].1;
        if is_call {
            let op = events[cursor - 1].2;
            if let Some(new_state) = step(state, ops[op].call) {
                linearized[op / 64] |= 1 << (op % 64);
                if seen.insert((linearized.clone(), new_state)) {
                    stack.push((op, state));
                    state = new_state;
                    if ops[op].returned_ms.is_some() {
                        remaining_ok -= 1;
                    }
                    unlink(&mut next, &mut prev, call_at[op]);
                    if let Some(r) = return_at[op] {
                        unlink(&mut next, &mut prev, r);
                    }
                    cursor = next[0];
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            cursor = next[cursor];
        } else {
            // A return of an operation not yet linearized, or the end: backtrack.
            let Some((op, previous)) = stack.pop() else {
                let stuck = if cursor == end {
                    0
                } else {
                    events[cursor - 1].2
                };
                return Search::NotLinearizable { stuck };
            };
            state = previous;
            linearized[op / 64] &= !(1 << (op % 64));
            if ops[op].returned_ms.is_some() {
                remaining_ok += 1;
            }
            if let Some(r) = return_at[op] {
                relink(&mut next, &mut prev, r);
            }
            relink(&mut next, &mut prev, call_at[op]);
            cursor = next[call_at[op]];
        }
    }
}

fn describe(op: &RegisterOp) -> Value {
    json!({
        "process": op.process,
        "call": format!("{:?}", op.call),
        "invoked_ms": op.invoked_ms,
        "returned_ms": op.returned_ms,
    })
}

impl Checker for LinearizableRegister {
    fn name(&self) -> &'static str {
        "linearizable-register"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let per_key = register_ops(history);
        let mut failures = Vec::new();
        let mut total = 0;
        for (key, ops) in &per_key {
            total += ops.len();
            match search(ops) {
                Search::Linearizable => {}
                Search::NotLinearizable { stuck } => failures.push(json!({
                    "key": key,
                    "result": "not linearizable",
                    "cannot_linearize": describe(&ops[stuck]),
                })),
                Search::GaveUp => failures.push(json!({
                    "key": key,
                    "result": format!("unknown: search exceeded {MAX_STEPS} steps"),
                })),
            }
        }
        Verdict {
            checker: self.name().into(),
            outcome: super::outcome(failures.is_empty()),
            summary: if failures.is_empty() {
                format!(
                    "{total} operations on {} keys are linearizable",
                    per_key.len()
                )
            } else {
                format!(
                    "{} of {} keys are not shown linearizable",
                    failures.len(),
                    per_key.len()
                )
            },
            details: json!({ "operations": total, "keys": per_key.len(), "failures": failures }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    /// (process, kind, f, value, time) → entry on key "k".
    fn e(process: u64, kind: OpKind, f: &str, value: Value, time_ms: f64) -> Entry {
        Entry::Op(Op {
            time_ms,
            process,
            kind,
            f: f.into(),
            key: "k".into(),
            value,
        })
    }

    fn check(history: &[Entry]) -> Verdict {
        LinearizableRegister.check(history)
    }

    #[test]
    fn sequential_reads_of_the_last_write_are_linearizable() {
        let history = [
            e(1, OpKind::Invoke, "write", json!(1), 0.0),
            e(1, OpKind::Ok, "write", json!(1), 1.0),
            e(2, OpKind::Invoke, "read", Value::Null, 2.0),
            e(2, OpKind::Ok, "read", json!(1), 3.0),
        ];
        assert!(check(&history).is_valid());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_flagged() {
        let history = [
            e(1, OpKind::Invoke, "write", json!(1), 0.0),
            e(1, OpKind::Ok, "write", json!(1), 1.0),
            e(1, OpKind::Invoke, "write", json!(2), 2.0),
            e(1, OpKind::Ok, "write", json!(2), 3.0),
            e(2, OpKind::Invoke, "read", Value::Null, 4.0),
            e(2, OpKind::Ok, "read", json!(1), 5.0),
        ];
        let verdict = check(&history);
        assert!(!verdict.is_valid(), "{verdict:?}");
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps both writes; it may see either value.
        let history = [
            e(1, OpKind::Invoke, "write", json!(1), 0.0),
            e(3, OpKind::Invoke, "read", Value::Null, 0.5),
            e(2, OpKind::Invoke, "write", json!(2), 0.6),
            e(1, OpKind::Ok, "write", json!(1), 1.0),
            e(2, OpKind::Ok, "write", json!(2), 1.1),
            e(3, OpKind::Ok, "read", json!(1), 2.0),
        ];
        assert!(check(&history).is_valid());
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let happened = [
            e(1, OpKind::Invoke, "write", json!(7), 0.0),
            e(1, OpKind::Info, "write", Value::Null, 1.0),
            e(2, OpKind::Invoke, "read", Value::Null, 5.0),
            e(2, OpKind::Ok, "read", json!(7), 6.0),
        ];
        assert!(check(&happened).is_valid());
        let did_not = [
            e(1, OpKind::Invoke, "write", json!(7), 0.0),
            e(1, OpKind::Info, "write", Value::Null, 1.0),
            e(2, OpKind::Invoke, "read", Value::Null, 5.0),
            e(2, OpKind::Ok, "read", Value::Null, 6.0),
        ];
        assert!(check(&did_not).is_valid());
    }

    #[test]
    fn a_lost_acknowledged_cas_is_flagged() {
        let history = [
            e(1, OpKind::Invoke, "write", json!(1), 0.0),
            e(1, OpKind::Ok, "write", json!(1), 1.0),
            e(
                1,
                OpKind::Invoke,
                "cas",
                json!({"expected": 1, "new": 5}),
                2.0,
            ),
            e(1, OpKind::Ok, "cas", Value::Null, 3.0),
            e(2, OpKind::Invoke, "read", Value::Null, 4.0),
            e(2, OpKind::Ok, "read", json!(1), 5.0),
        ];
        let verdict = check(&history);
        assert!(!verdict.is_valid());
        assert_eq!(verdict.details["failures"][0]["key"], "k");
    }

    #[test]
    fn failed_operations_did_not_happen() {
        let history = [
            e(1, OpKind::Invoke, "write", json!(3), 0.0),
            e(1, OpKind::Fail, "write", Value::Null, 1.0),
            e(2, OpKind::Invoke, "read", Value::Null, 2.0),
            e(2, OpKind::Ok, "read", json!(3), 3.0),
        ];
        assert!(!check(&history).is_valid());
    }
}
