//! Cluster and node handlers.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::Json;

use super::error::ApiError;
use super::json::ApiJson;
use super::views::{ClusterStatus, Health, JoinRequest, Member, ModuleSummary};
use super::Context;

pub async fn health(State(context): State<Context>) -> Json<Health> {
    Json(Health {
        node: context.me.name.clone(),
        status: "ok".into(),
    })
}

pub async fn status(State(context): State<Context>) -> Json<ClusterStatus> {
    Json(cluster_status(&context).await)
}

pub async fn cluster_status(context: &Context) -> ClusterStatus {
    let metrics = context.raft.metrics().borrow().clone();
    let commit_index = context
        .raft
        .with_raft_state(|state| state.committed.map(|c| c.index))
        .await
        .ok()
        .flatten();
    let membership = metrics.membership_config.membership();
    let records = context.view.read(|s| s.cluster.nodes.clone());
    let replication: BTreeMap<u64, Option<u64>> = metrics
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, log)| (*id, log.map(|l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, info)| {
            let record = records.get(id);
            Member {
                id: *id,
                name: info.name.clone(),
                raft_addr: info.raft_addr.clone(),
                api_addr: info.api_addr.clone(),
                voter: voters.contains(id),
                leader: metrics.current_leader == Some(*id),
                role: record.map(|r| r.role),
                admin: record.map(|r| r.admin),
                lans: record
                    .map(|r| {
                        r.lans
                            .iter()
                            .map(|l| format!("{}={}", l.lan, l.addr))
                            .collect()
                    })
                    .unwrap_or_default(),
                matched_index: replication.get(id).copied().flatten(),
            }
        })
        .collect::<Vec<_>>();
    let mut members = members;
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let leader = metrics
        .current_leader
        .and_then(|l| membership.get_node(&l).map(|n| n.name.clone()));
    ClusterStatus {
        node: context.me.name.clone(),
        initialized: !members.is_empty(),
        raft_state: format!("{:?}", metrics.state),
        leader,
        term: metrics.current_term,
        commit_index,
        last_applied: metrics.last_applied.map(|l| l.index),
        last_log_index: metrics.last_log_index,
        snapshot_index: metrics.snapshot.map(|l| l.index),
        purged_index: metrics.purged.map(|l| l.index),
        members,
    }
}

pub async fn nodes(State(context): State<Context>) -> Json<Vec<Member>> {
    Json(cluster_status(&context).await.members)
}

pub async fn node(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Json<Member>, ApiError> {
    cluster_status(&context)
        .await
        .members
        .into_iter()
        .find(|m| m.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no node named '{name}' in the cluster")))
}

pub async fn modules(State(context): State<Context>) -> Json<Vec<ModuleSummary>> {
    Json(context.view.read(|s| {
        s.cluster
            .modules
            .values()
            .map(|m| ModuleSummary {
                name: m.name.clone(),
                kind: m.kind,
                digest: m.digest.clone(),
                started_on: s.cluster.node_names(&m.started_on),
                failover: m.failover,
            })
            .collect()
    }))
}

pub async fn init(State(context): State<Context>) -> Result<Json<ClusterStatus>, ApiError> {
    context.initialize().await?;
    Ok(Json(cluster_status(&context).await))
}

pub async fn join(
    State(context): State<Context>,
    ApiJson(request): ApiJson<JoinRequest>,
) -> Result<Json<ClusterStatus>, ApiError> {
    if request.seed.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "'seed' must be the Raft address (host:port) of a member".into(),
        ));
    }
    context.join(request.seed.trim()).await?;
    Ok(Json(cluster_status(&context).await))
}

pub async fn leave(State(context): State<Context>) -> Result<Json<ClusterStatus>, ApiError> {
    let name = context.me.name.clone();
    context.remove(&name).await?;
    Ok(Json(cluster_status(&context).await))
}

pub async fn remove_node(
    State(context): State<Context>,
    Path(name): Path<String>,
) -> Result<Json<ClusterStatus>, ApiError> {
    context.remove(&name).await?;
    Ok(Json(cluster_status(&context).await))
}
