//! The copies of a mirror are identical once the run is over and PRIM has stopped:
//! judged on the runner's `verify` of the two directories (entries, attributes, bytes).

use serde_json::{json, Value};

use super::{Checker, Verdict};
use crate::history::{Entry, OpKind};

pub struct CopiesIdentical;

impl Checker for CopiesIdentical {
    fn name(&self) -> &'static str {
        "copies-identical"
    }

    fn check(&self, history: &[Entry]) -> Verdict {
        let verify = history.iter().rev().find_map(|entry| match entry {
            Entry::Op(op) if op.f == "verify" && op.kind == OpKind::Ok => Some(&op.value),
            _ => None,
        });
        let Some(verify) = verify else {
            return Verdict::not_applicable(
                self.name(),
                "no copies were compared".into(),
                Value::Null,
            );
        };
        let differences = verify["differences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Verdict {
            checker: self.name().into(),
            outcome: super::outcome(differences.is_empty()),
            summary: if differences.is_empty() {
                "PRIM's and SECOND's copies are identical".into()
            } else {
                format!("{} differences between the copies", differences.len())
            },
            details: json!({ "differences": differences }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Outcome;
    use crate::history::Op;

    fn verify(differences: Value) -> Entry {
        Entry::Op(Op {
            time_ms: 0.0,
            process: 0,
            kind: OpKind::Ok,
            f: "verify".into(),
            key: "copies".into(),
            value: json!({ "differences": differences }),
        })
    }

    #[test]
    fn differences_are_flagged_and_no_comparison_is_not_judged() {
        assert_eq!(CopiesIdentical.check(&[]).outcome, Outcome::NotApplicable);
        assert!(CopiesIdentical.check(&[verify(json!([]))]).is_valid());
        let verdict = CopiesIdentical.check(&[verify(json!(["f: content differs"]))]);
        assert_eq!(verdict.outcome, Outcome::Invalid);
    }
}
