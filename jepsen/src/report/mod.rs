//! One folder per run: `history.jsonl`, `verdicts.json`, `summary.txt` (verdicts and
//! availability during each fault) and `timeline.svg`.

mod svg;

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::checker::{Outcome, Verdict};
use crate::history::{self, Entry, OpKind, Phase};

/// How the cluster served clients while one fault was in place.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub fault: String,
    pub start_ms: f64,
    pub end_ms: f64,
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    /// Longest time in the window without a successful operation.
    pub longest_gap_ms: f64,
}

/// Fault windows, from the nemesis start/stop entries.
pub fn windows(entries: &[Entry]) -> Vec<Window> {
    let mut open: Vec<(String, f64)> = Vec::new();
    let mut spans = Vec::new();
    for entry in entries {
        if let Entry::Nemesis {
            time_ms,
            phase,
            fault,
        } = entry
        {
            match phase {
                Phase::Start => open.push((fault.clone(), *time_ms)),
                Phase::Stop => {
                    if let Some(i) = open.iter().position(|(f, _)| f == fault) {
                        let (fault, start) = open.remove(i);
                        spans.push((fault, start, *time_ms));
                    }
                }
            }
        }
    }
    let end_of_run = entries.last().map_or(0.0, Entry::time_ms);
    spans.extend(open.into_iter().map(|(f, s)| (f, s, end_of_run)));
    spans
        .into_iter()
        .map(|(fault, start_ms, end_ms)| {
            let mut window = Window {
                fault,
                start_ms,
                end_ms,
                ok: 0,
                fail: 0,
                info: 0,
                longest_gap_ms: 0.0,
            };
            let mut last_ok = start_ms;
            for entry in entries {
                let Entry::Op(op) = entry else { continue };
                if op.time_ms < start_ms || op.time_ms > end_ms {
                    continue;
                }
                match op.kind {
                    OpKind::Ok => {
                        window.ok += 1;
                        window.longest_gap_ms = window.longest_gap_ms.max(op.time_ms - last_ok);
                        last_ok = op.time_ms;
                    }
                    OpKind::Fail => window.fail += 1,
                    OpKind::Info => window.info += 1,
                    OpKind::Invoke => {}
                }
            }
            window.longest_gap_ms = window.longest_gap_ms.max(end_ms - last_ok);
            window
        })
        .collect()
}

pub fn summary(title: &str, verdicts: &[Verdict], windows: &[Window]) -> String {
    let valid = crate::checker::run_is_valid(verdicts);
    let mut out = format!(
        "{title}\nverdict: {}\n\n",
        if valid { "VALID" } else { "INVALID" }
    );
    for verdict in verdicts {
        let _ = writeln!(
            out,
            "  {:<24} {:<8} {}",
            verdict.checker,
            match verdict.outcome {
                Outcome::Valid => "valid",
                Outcome::Invalid => "INVALID",
                Outcome::NotApplicable => "n/a",
            },
            verdict.summary
        );
    }
    let _ = writeln!(out, "\navailability during faults:");
    for w in windows {
        let total = w.ok + w.fail + w.info;
        let _ = writeln!(
            out,
            "  {:>8.0}–{:<8.0} ms  {:<28} {:>4} ok {:>4} fail {:>4} info  ({:.0}% ok), longest gap {:.0} ms",
            w.start_ms,
            w.end_ms,
            w.fault,
            w.ok,
            w.fail,
            w.info,
            if total == 0 { 0.0 } else { 100.0 * w.ok as f64 / total as f64 },
            w.longest_gap_ms
        );
    }
    out
}

/// Writes the report folder.
pub fn write(
    dir: &Path,
    title: &str,
    entries: &[Entry],
    verdicts: &[Verdict],
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    history::write_jsonl(&dir.join("history.jsonl"), entries)?;
    std::fs::write(
        dir.join("verdicts.json"),
        serde_json::to_string_pretty(verdicts)?,
    )?;
    let windows = windows(entries);
    let text = summary(title, verdicts, &windows);
    std::fs::write(dir.join("summary.txt"), &text)?;
    std::fs::write(
        dir.join("timeline.svg"),
        svg::timeline(title, entries, &windows),
    )?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Op;

    #[test]
    fn availability_counts_operations_inside_each_fault() {
        let op = |t: f64, kind| {
            Entry::Op(Op {
                time_ms: t,
                process: 0,
                kind,
                f: "read".into(),
                key: "k".into(),
                value: serde_json::Value::Null,
            })
        };
        let nemesis = |t: f64, phase| Entry::Nemesis {
            time_ms: t,
            phase,
            fault: "kill n1".into(),
        };
        let entries = vec![
            op(50.0, OpKind::Ok),
            nemesis(100.0, Phase::Start),
            op(150.0, OpKind::Fail),
            op(700.0, OpKind::Ok),
            op(800.0, OpKind::Ok),
            nemesis(1000.0, Phase::Stop),
        ];
        let w = &windows(&entries)[0];
        assert_eq!((w.ok, w.fail, w.info), (2, 1, 0));
        assert_eq!(w.longest_gap_ms, 600.0);
        let svg = svg::timeline("t", &entries, &windows(&entries));
        assert!(svg.starts_with("<svg") && svg.contains("kill n1"));
    }
}
