//! Prometheus text exposition of the node's Raft figures.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::cluster::cluster_status;
use super::Context;

pub async fn prometheus(State(context): State<Context>) -> impl IntoResponse {
    let status = cluster_status(&context).await;
    let node = &status.node;
    let mut out = String::new();
    let gauges: [(&str, &str, u64); 8] = [
        ("rampart_raft_term", "Current Raft term.", status.term),
        (
            "rampart_raft_is_leader",
            "1 when this node is the Raft leader.",
            u64::from(status.raft_state == "Leader"),
        ),
        (
            "rampart_raft_last_log_index",
            "Index of the last log entry.",
            status.last_log_index.unwrap_or(0),
        ),
        (
            "rampart_raft_commit_index",
            "Index of the last committed entry.",
            status.commit_index.unwrap_or(0),
        ),
        (
            "rampart_raft_last_applied_index",
            "Index of the last applied entry.",
            status.last_applied.unwrap_or(0),
        ),
        (
            "rampart_raft_snapshot_index",
            "Last log index covered by this node's snapshot.",
            status.snapshot_index.unwrap_or(0),
        ),
        (
            "rampart_raft_purged_index",
            "Last log index purged from this node's log.",
            status.purged_index.unwrap_or(0),
        ),
        (
            "rampart_cluster_members",
            "Members in the Raft membership.",
            status.members.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{node}\"}} {value}"
        );
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
