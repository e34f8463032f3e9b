//! Human-readable tables.

use crate::api::views::{ClusterStatus, TokenSummary};

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
