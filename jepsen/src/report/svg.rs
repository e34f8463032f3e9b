//! The run as a picture: fault windows, each node's Raft role over time, PRIM periods,
//! and every completed operation.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::Window;
use crate::history::{Entry, OpKind};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 110.0;
const ROW: f64 = 26.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn colour(state: Option<&str>) -> &'static str {
    match state {
        Some("Leader") => "#2e7d32",
        Some("Follower") => "#90caf9",
        Some("Candidate") => "#ffb74d",
        Some("Learner") => "#ce93d8",
        Some(_) => "#bdbdbd",
        None => "#e0e0e0",
    }
}

pub fn timeline(title: &str, entries: &[Entry], windows: &[Window]) -> String {
    let end = entries.last().map_or(1.0, Entry::time_ms).max(1.0);
    let x = |t: f64| LEFT + (WIDTH - LEFT - 10.0) * t / end;

    // Rows: one per node (Raft role), one per (module, node) PRIM, then operations.
    let mut states: BTreeMap<String, Vec<(f64, Option<String>)>> = BTreeMap::new();
    let mut prims: BTreeMap<String, Vec<(f64, bool)>> = BTreeMap::new();
    for entry in entries {
        match entry {
            Entry::Observe {
                time_ms,
                node,
                raft_state,
                ..
            } => {
                states
                    .entry(node.clone())
                    .or_default()
                    .push((*time_ms, raft_state.clone()));
            }
            Entry::Role {
                time_ms,
                node,
                module,
                role,
                acting,
            } if role == "PRIM" => {
                prims
                    .entry(format!("{module} PRIM {node}"))
                    .or_default()
                    .push((*time_ms, *acting));
            }
            _ => {}
        }
    }
    let rows = states.len() + prims.len() + 1;
    let height = 60.0 + ROW * rows as f64 + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    // Fault windows, behind everything.
    for w in windows {
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"30\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ffcdd2\" opacity=\"0.6\"><title>{}</title></rect>\n<text x=\"{:.1}\" y=\"42\" fill=\"#b71c1c\">{}</text>",
            x(w.start_ms),
            (x(w.end_ms) - x(w.start_ms)).max(1.0),
            height - 60.0,
            escape(&w.fault),
            x(w.start_ms) + 2.0,
            escape(&w.fault)
        );
    }
    let mut y = 55.0;
    for (node, changes) in &states {
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.1}\">{}</text>",
            y + 13.0,
            escape(node)
        );
        for (i, (start, state)) in changes.iter().enumerate() {
            let stop = changes.get(i + 1).map_or(end, |c| c.0);
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}</title></rect>",
                x(*start),
                (x(stop) - x(*start)).max(0.5),
                ROW - 6.0,
                colour(state.as_deref()),
                escape(state.as_deref().unwrap_or("no answer"))
            );
        }
        y += ROW;
    }
    for (label, changes) in &prims {
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{:.1}\">{}</text>",
            y + 13.0,
            escape(label)
        );
        let mut since: Option<f64> = None;
        for (time, acting) in changes.iter().chain([(end, false)].iter()) {
            match (acting, since) {
                (true, None) => since = Some(*time),
                (false, Some(start)) => {
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#6a1b9a\"/>",
                        x(start),
                        (x(*time) - x(start)).max(0.5),
                        ROW - 6.0
                    );
                    since = None;
                }
                _ => {}
            }
        }
        y += ROW;
    }
    let _ = writeln!(
        svg,
        "<text x=\"10\" y=\"{:.1}\">operations</text>",
        y + 13.0
    );
    for entry in entries {
        let Entry::Op(op) = entry else { continue };
        let fill = match op.kind {
            OpKind::Ok => "#2e7d32",
            OpKind::Fail => "#c62828",
            OpKind::Info => "#ef6c00",
            OpKind::Invoke => continue,
        };
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"1\" height=\"{:.1}\" fill=\"{fill}\"/>",
            x(op.time_ms),
            ROW - 6.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.1} s</text>",
        height - 12.0,
        WIDTH - 10.0,
        height - 12.0,
        end / 1e3
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\">leader ■ green, follower ■ blue, candidate ■ orange, no answer ■ grey; ops: ok green, fail red, unknown orange; faults shaded red</text>",
        LEFT + 60.0,
        height - 12.0
    );
    svg.push_str("</svg>\n");
    svg
}
