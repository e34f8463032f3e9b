//! Cluster-wide operations. Each is carried out by the Raft leader; a request that
//! arrives anywhere is routed there over the authenticated transport, following the
//! leader hints of the nodes it meets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::ChangeMembers;
use rampart_raft::command::NodeRecord;
use rampart_raft::transport::{
    call, CallError, LeaderError, LeaderOp, LeaderReply, Rpc, RpcReply, WriteReceipt,
};
use rampart_raft::{node_id_for_name, Command, CommandResponse, NodeId, NodeInfo};
use tokio::time::Instant;
use tracing::info;

use super::NodeContext;

/// How long a request may spend finding the leader (an election takes about one
/// election timeout; a failed leader is noticed after another).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one leader operation may take once it reached the leader. Joining waits
/// for the new node to catch up with the log.
const LEADER_OP_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long a write waits for this node to apply it (see `wait_applied`).
const APPLY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster has no reachable leader (no majority, or an election is under way): {0}")]
    NoLeader(String),
    #[error("refused by the cluster state: {0}")]
    Rejected(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the cluster is already initialized")]
    AlreadyInitialized,
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}: the peer does not hold this cluster's secret, or this node does not")]
    Authentication(String),
    #[error("{0}")]
    Failed(String),
}

impl NodeContext {
    /// Commits `command` and returns where it landed. A command the state machine
    /// refuses is committed but changes nothing, and comes back as
    /// [`ClusterError::Rejected`].
    pub async fn write(&self, command: Command) -> Result<WriteReceipt, ClusterError> {
        match self.route(LeaderOp::Write(command), None).await? {
            LeaderReply::Written(receipt) => {
                self.wait_applied(receipt.log_index).await;
                match &receipt.response {
                    CommandResponse::Applied => Ok(receipt),
                    CommandResponse::Rejected(reason) => {
                        Err(ClusterError::Rejected(reason.clone()))
                    }
                }
            }
            other => Err(ClusterError::Failed(format!(
                "unexpected reply to a write: {other:?}"
            ))),
        }
    }

    /// Waits (bounded) until this node has applied the log up to `index`, so that a
    /// client that wrote through this node reads its write here (read-your-writes).
    /// The write is committed either way; a node that lags longer is only late.
    async fn wait_applied(&self, index: u64) {
        let mut applied = self.view.changes();
        let caught_up = tokio::time::timeout(APPLY_WAIT, applied.wait_for(|i| *i >= index)).await;
        if caught_up.is_err() {
            tracing::warn!(
                index,
                "this node has not applied a committed write after {APPLY_WAIT:?}"
            );
        }
    }

    /// Makes a cluster of every node in cluster.xml, then records each node.
    pub async fn initialize(&self) -> Result<(), ClusterError> {
        let members: BTreeMap<NodeId, NodeInfo> =
            self.config.nodes.iter().map(|n| (n.id, n.info())).collect();
        match self.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(ClusterError::AlreadyInitialized)
            }
            Err(e) => return Err(ClusterError::Failed(format!("initializing Raft: {e}"))),
        }
        info!(nodes = self.config.nodes.len(), "cluster initialized");
        for node in &self.config.nodes {
            self.write(Command::UpsertNode(node.record(&self.config.lans)))
                .await?;
        }
        Ok(())
    }

    /// Joins the cluster that the node at `seed` (its Raft address) belongs to.
    pub async fn join(&self, seed: &str) -> Result<(), ClusterError> {
        if self.is_voter(self.me.id) {
            return Err(ClusterError::Invalid(format!(
                "node '{}' is already a member of a cluster",
                self.me.name
            )));
        }
        let op = LeaderOp::Join {
            record: self.me.record(&self.config.lans),
            info: self.me.info(),
        };
        self.route(op, Some(seed.to_string())).await?;
        Ok(())
    }

    /// Reads a register as of now: the leader confirms it still leads (a round of
    /// heartbeats) and has applied everything committed before answering.
    pub async fn read_register(&self, key: &str) -> Result<Option<u64>, ClusterError> {
        match self
            .route(
                LeaderOp::ReadRegister {
                    key: key.to_string(),
                },
                None,
            )
            .await?
        {
            LeaderReply::Register(value) => Ok(value),
            other => Err(ClusterError::Failed(format!(
                "unexpected reply to a read: {other:?}"
            ))),
        }
    }

    /// Removes the named node from the cluster (this node, for `leave`).
    pub async fn remove(&self, name: &str) -> Result<(), ClusterError> {
        let id = node_id_for_name(name);
        self.route(LeaderOp::Remove { id }, None).await?;
        Ok(())
    }

    fn is_voter(&self, id: NodeId) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let is_voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        is_voter
    }

    /// Sends `op` to the leader (or first to `seed`), following leader hints, until it
    /// is answered or [`ROUTE_TIMEOUT`] passes.
    async fn route(&self, op: LeaderOp, seed: Option<String>) -> Result<LeaderReply, ClusterError> {
        let deadline = Instant::now() + ROUTE_TIMEOUT;
        let mut next_target = seed;
        let mut last_problem = "no leader known yet".to_string();
        loop {
            let target = next_target
                .take()
                .or_else(|| self.leader().map(|(_, info)| info.raft_addr));
            let outcome = match &target {
                None => None,
                Some(addr) if *addr == self.me.raft_addr() => {
                    Some(self.handle_as_leader(op.clone()).await)
                }
                Some(addr) => {
                    let rpc = Rpc::Leader(op.clone());
                    match call(addr, &self.key, &rpc, LEADER_OP_TIMEOUT).await {
                        Ok(RpcReply::Leader(result)) => Some(result),
                        Ok(other) => {
                            return Err(ClusterError::Failed(format!(
                                "{addr} answered a leader request with {other:?}"
                            )))
                        }
                        Err(e) if e.is_authentication() => {
                            return Err(ClusterError::Authentication(e.to_string()))
                        }
                        Err(e @ CallError::Connect { .. }) => {
                            last_problem = e.to_string();
                            None
                        }
                        Err(e) => return Err(ClusterError::Unreachable(e.to_string())),
                    }
                }
            };
            match outcome {
                Some(Ok(reply)) => return Ok(reply),
                Some(Err(LeaderError::NotLeader { leader })) => {
                    last_problem = "the node asked is not the leader".into();
                    next_target = leader.map(|l| l.raft_addr);
                }
                Some(Err(LeaderError::Invalid(reason))) => {
                    return Err(ClusterError::Invalid(reason))
                }
                Some(Err(LeaderError::Failed(reason))) => return Err(ClusterError::Failed(reason)),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(match target {
                    Some(_) if last_problem.starts_with("cannot reach") => {
                        ClusterError::Unreachable(last_problem)
                    }
                    _ => ClusterError::NoLeader(last_problem),
                });
            }
            if next_target.is_none() {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    /// Carries out `op` if this node is the leader.
    pub async fn handle_as_leader(&self, op: LeaderOp) -> Result<LeaderReply, LeaderError> {
        match op {
            LeaderOp::Write(command) => self.leader_write(command).await.map(LeaderReply::Written),
            LeaderOp::Join { record, info } => self
                .leader_join(record, info)
                .await
                .map(|()| LeaderReply::MembershipChanged),
            LeaderOp::Remove { id } => self
                .leader_remove(id)
                .await
                .map(|()| LeaderReply::MembershipChanged),
            LeaderOp::ReadRegister { key } => {
                self.raft.ensure_linearizable().await.map_err(|e| match e {
                    RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)) => {
                        LeaderError::NotLeader {
                            leader: forward.leader_node,
                        }
                    }
                    other => LeaderError::Failed(format!("cannot confirm leadership: {other}")),
                })?;
                let value = self.view.read(|s| s.cluster.registers.get(&key).copied());
                Ok(LeaderReply::Register(value))
            }
        }
    }

    async fn leader_write(&self, command: Command) -> Result<WriteReceipt, LeaderError> {
        let response = self.raft.client_write(command).await.map_err(write_error)?;
        Ok(WriteReceipt {
            log_index: response.log_id.index,
            response: response.data,
        })
    }

    async fn leader_join(&self, record: NodeRecord, info: NodeInfo) -> Result<(), LeaderError> {
        let id = record.id;
        if id != node_id_for_name(&info.name) || record.name != info.name {
            return Err(LeaderError::Invalid(
                "the node record and address disagree".into(),
            ));
        }
        if let Some(clash) = self.member_infos().into_iter().find(|(other, i)| {
            *other != id && (i.raft_addr == info.raft_addr || i.api_addr == info.api_addr)
        }) {
            return Err(LeaderError::Invalid(format!(
                "node '{}' already uses the address of '{}' ({})",
                clash.1.name, info.name, info.raft_addr
            )));
        }
        // Record first: a voter without a record would be a node nobody can name.
        match self
            .leader_write(Command::UpsertNode(record))
            .await?
            .response
        {
            CommandResponse::Applied => {}
            CommandResponse::Rejected(reason) => return Err(LeaderError::Invalid(reason)),
        }
        info!(node = %info.name, "adding a learner and waiting for it to catch up");
        tokio::time::timeout(
            LEADER_OP_TIMEOUT,
            self.raft.add_learner(id, info.clone(), true),
        )
        .await
        .map_err(|_| {
            LeaderError::Failed(format!(
                "'{}' did not catch up with the log in time",
                info.name
            ))
        })?
        .map_err(write_error)?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(write_error)?;
        info!(node = %info.name, "node joined as a voter");
        Ok(())
    }

    async fn leader_remove(&self, id: NodeId) -> Result<(), LeaderError> {
        let members = self.member_infos();
        let Some(info) = members.get(&id) else {
            return Err(LeaderError::Invalid(format!(
                "node {id} is not a member of this cluster"
            )));
        };
        let metrics = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if voters.len() == 1 && voters.contains(&id) {
            return Err(LeaderError::Invalid(
                "the last voter cannot be removed".into(),
            ));
        }
        // The record goes first, the membership last. The state machine refuses to drop
        // a node that still has a role, atomically with respect to the assignments, so
        // a refused removal changes nothing. And a leader removing itself steps down
        // soon after the membership change is applied: a write proposed after it could
        // stay unanswered forever, since a node outside the membership is sent no more
        // entries. A removal interrupted in between is finished by running it again:
        // the record is gone, which the refusal of a second RemoveNode shows (read once
        // it is applied here; before, this leader's view may lag), and the membership
        // change is what remains.
        match self
            .raft
            .client_write(Command::RemoveNode { id })
            .await
            .map_err(write_error)?
            .data
        {
            CommandResponse::Applied => {}
            CommandResponse::Rejected(_)
                if !self.view.read(|s| s.cluster.nodes.contains_key(&id)) => {}
            CommandResponse::Rejected(reason) => return Err(LeaderError::Invalid(reason)),
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        info!(node = %info.name, "node removed");
        Ok(())
    }

    fn member_infos(&self) -> BTreeMap<NodeId, NodeInfo> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, info)| (*id, info.clone()))
            .collect()
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> LeaderError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => LeaderError::NotLeader {
            leader: forward.leader_node,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            LeaderError::Invalid(e.to_string())
        }
        RaftError::Fatal(e) => LeaderError::Failed(format!("Raft stopped: {e}")),
    }
}
