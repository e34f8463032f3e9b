//! Human-readable tables.

use crate::api::views::{ClusterStatus, ModuleSummary, TokenSummary};
use crate::module::log::LogEntry;
use crate::module::runtime::ModuleStatus;

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

pub fn status_table(status: &ClusterStatus) -> String {
    if !status.initialized {
        return format!(
            "node {} is not part of a cluster yet: run `rampart cluster init` on one node, or `rampart cluster join --seed HOST:PORT`\n",
            status.node
        );
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut out = format!(
        "cluster seen from {}: leader {}, term {}, commit index {}, applied {}\n\n",
        status.node,
        status.leader.as_deref().unwrap_or("none (no majority?)"),
        status.term,
        opt(status.commit_index),
        opt(status.last_applied),
    );
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                if m.leader {
                    "leader".into()
                } else if m.voter {
                    "follower".into()
                } else {
                    "learner".into()
                },
                m.role
                    .map_or("-".into(), |r| format!("{r:?}").to_lowercase()),
                m.raft_addr.clone(),
                m.api_addr.clone(),
                opt(m.matched_index),
            ]
        })
        .collect();
    out.push_str(&table(
        &["NAME", "RAFT", "ROLE", "RAFT ADDR", "API ADDR", "MATCHED"],
        &rows,
    ));
    out
}

pub fn token_table(tokens: &[TokenSummary]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| vec![t.name.clone(), format!("{:?}", t.role).to_lowercase()])
        .collect();
    table(&["NAME", "ROLE"], &rows)
}

pub fn module_table(modules: &[ModuleSummary]) -> String {
    let rows: Vec<Vec<String>> = modules
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                format!("{:?}", m.kind).to_lowercase(),
                if m.started_on.is_empty() {
                    "-".into()
                } else {
                    m.started_on.join(",")
                },
                m.digest[..16.min(m.digest.len())].to_string(),
            ]
        })
        .collect();
    table(&["NAME", "MODE", "STARTED ON", "PACKAGE"], &rows)
}

pub fn module_status(status: &ModuleStatus) -> String {
    let mut out = format!(
        "{} on {}: {} ({:?}){}\n",
        status.module,
        status.node,
        status.state.name(),
        status.readiness,
        status
            .reason
            .as_ref()
            .map_or(String::new(), |r| format!(" — {r}"))
    );
    if !status.resources.is_empty() {
        let rows: Vec<Vec<String>> = status
            .resources
            .iter()
            .map(|(name, r)| vec![name.clone(), format!("{:?}", r.state).to_lowercase()])
            .collect();
        out.push_str(&table(&["RESOURCE", "STATE"], &rows));
    }
    out
}

pub fn log_lines(entries: &[LogEntry]) -> String {
    entries
        .iter()
        .map(|e| {
            let secs = e.time_ms / 1000;
            let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            format!(
                "{h:02}:{m:02}:{s:02}.{:03} {:<7} {:<12} {}\n",
                e.time_ms % 1000,
                format!("{:?}", e.level).to_uppercase(),
                e.source,
                e.message
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let out = table(
            &["A", "B"],
            &[
                vec!["long-name".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        assert_eq!(out, "A          B\nlong-name  x\ns          y\n");
    }
}
