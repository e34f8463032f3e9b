//! The cluster state machine.
//!
//! [`ClusterState::apply`] is the only way the state changes. It reads no clock, no
//! randomness, no network and no file, and iterates only ordered maps, so every replica
//! that applies the same log computes the same state, byte for byte once encoded.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{
    ApiRole, Command, CommandResponse, FarmAssignment, MirrorAssignment, ModuleKind, NodeAdmin,
    NodeRecord, OperatorIntent, FARM_BUCKETS,
};
use crate::types::{node_id_for_name, validate_name, NodeId};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub modules: BTreeMap<String, ModuleRecord>,
    /// API tokens by name; the value holds the blake3 hash of the token, never the token.
    pub api_tokens: BTreeMap<String, ApiToken>,
    /// Registers by key (see [`Command::RegisterWrite`]).
    pub registers: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub name: String,
    pub kind: ModuleKind,
    /// blake3 of `package`, hex.
    pub digest: String,
    pub package: Vec<u8>,
    /// Nodes on which the operator started the module.
    pub started_on: BTreeSet<NodeId>,
    /// Earlier packages, newest first; with the current one, the last
    /// [`KEPT_PACKAGES`] configurations.
    pub previous: Vec<PackageVersion>,
    pub failover: bool,
    /// Nodes on which the operator disabled this module.
    pub disabled_nodes: BTreeSet<NodeId>,
    /// Present for mirror modules once the controller assigned roles.
    pub mirror: Option<MirrorAssignment>,
    /// Present for farm modules once the controller assigned buckets.
    pub farm: Option<FarmAssignment>,
    /// Operator requests not yet carried out, by request id.
    pub intents: BTreeMap<String, OperatorIntent>,
}

/// How many package versions of a module the state keeps (current included).
pub const KEPT_PACKAGES: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    pub digest: String,
    pub package: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub role: ApiRole,
    pub token_hash: String,
}

/// Why a command was refused; becomes [`CommandResponse::Rejected`].
type Refusal = String;

impl ClusterState {
    /// Applies one committed command. Never fails: an invalid command is answered with
    /// [`CommandResponse::Rejected`] and leaves the state untouched.
    pub fn apply(&mut self, command: &Command) -> CommandResponse {
        match self.try_apply(command) {
            Ok(()) => CommandResponse::Applied,
            Err(reason) => CommandResponse::Rejected(reason),
        }
    }

    /// Names of the nodes `ids` (an id without a record shows as the number).
    pub fn node_names<'a>(&self, ids: impl IntoIterator<Item = &'a NodeId>) -> Vec<String> {
        ids.into_iter()
            .map(|id| {
                self.nodes
                    .get(id)
                    .map_or(id.to_string(), |n| n.name.clone())
            })
            .collect()
    }

    pub fn node_by_name(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.name == name)
    }

    /// The role of the API token whose blake3 hash is `token_hash`, if any.
    pub fn token_role(&self, token_hash: &str) -> Option<ApiRole> {
        self.api_tokens
            .values()
            .find(|t| t.token_hash == token_hash)
            .map(|t| t.role)
    }

    fn try_apply(&mut self, command: &Command) -> Result<(), Refusal> {
        match command {
            Command::UpsertNode(record) => self.upsert_node(record),
            Command::RemoveNode { id } => self.remove_node(*id),
            Command::SetNodeAdmin { id, admin } => self.set_node_admin(*id, *admin),
            Command::InstallModule {
                name,
                kind,
                digest,
                package,
            } => self.install_module(name, *kind, digest, package),
            Command::UninstallModule { name } => {
                self.modules
                    .remove(name)
                    .ok_or_else(|| format!("no module '{name}'"))?;
                Ok(())
            }
            Command::SetModuleFailover { name, failover } => {
                self.module_mut(name)?.failover = *failover;
                Ok(())
            }
            Command::SetModuleStarted {
                name,
                node,
                started,
            } => self.set_module_started(name, *node, *started),
            Command::SetModuleNodeEnabled {
                name,
                node,
                enabled,
            } => {
                self.known_node(*node)?;
                let module = self.module_mut(name)?;
                if *enabled {
                    module.disabled_nodes.remove(node);
                } else {
                    module.disabled_nodes.insert(*node);
                }
                Ok(())
            }
            Command::AssignMirror { module, assignment } => self.assign_mirror(module, assignment),
            Command::AssignFarm { module, assignment } => self.assign_farm(module, assignment),
            Command::RecordIntent {
                module,
                request_id,
                intent,
            } => self.record_intent(module, request_id, intent),
            Command::ClearIntent { module, request_id } => {
                self.module_mut(module)?
                    .intents
                    .remove(request_id)
                    .ok_or_else(|| format!("no intent '{request_id}' on module '{module}'"))?;
                Ok(())
            }
            Command::AddApiToken {
                name,
                role,
                token_hash,
            } => {
                validate_name("token", name)?;
                if token_hash.len() != 64 || !token_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("token hash must be 64 hex digits (blake3)".into());
                }
                if self.api_tokens.contains_key(name) {
                    return Err(format!("a token named '{name}' already exists"));
                }
                self.api_tokens.insert(
                    name.clone(),
                    ApiToken {
                        role: *role,
                        token_hash: token_hash.clone(),
                    },
                );
                Ok(())
            }
            Command::RevokeApiToken { name } => {
                self.api_tokens
                    .remove(name)
                    .ok_or_else(|| format!("no token named '{name}'"))?;
                Ok(())
            }
            Command::RegisterWrite { key, value } => {
                validate_name("register", key)?;
                self.registers.insert(key.clone(), *value);
                Ok(())
            }
            Command::RegisterCas { key, expected, new } => {
                validate_name("register", key)?;
                let current = self.registers.get(key).copied();
                if current != *expected {
                    return Err(format!(
                        "compare-and-set failed: register '{key}' holds {}, not {}",
                        show_register(current),
                        show_register(*expected)
                    ));
                }
                self.registers.insert(key.clone(), *new);
                Ok(())
            }
        }
    }

    fn upsert_node(&mut self, record: &NodeRecord) -> Result<(), Refusal> {
        validate_name("node", &record.name)?;
        if record.id != node_id_for_name(&record.name) {
            return Err(format!(
                "node id {} does not belong to name '{}'",
                record.id, record.name
            ));
        }
        if record.lans.is_empty() {
            return Err(format!("node '{}' has no address", record.name));
        }
        self.nodes.insert(record.id, record.clone());
        Ok(())
    }

    fn remove_node(&mut self, id: NodeId) -> Result<(), Refusal> {
        let name = self.known_node(id)?.name.clone();
        for module in self.modules.values() {
            let in_mirror = module
                .mirror
                .as_ref()
                .is_some_and(|m| m.prim == Some(id) || m.second == Some(id));
            let in_farm = module
                .farm
                .as_ref()
                .is_some_and(|f| f.members_up.contains(&id));
            if in_mirror || in_farm {
                return Err(format!(
                    "node '{name}' still has a role in module '{}'",
                    module.name
                ));
            }
        }
        for module in self.modules.values_mut() {
            module.disabled_nodes.remove(&id);
            module.started_on.remove(&id);
        }
        self.nodes.remove(&id);
        Ok(())
    }

    fn set_node_admin(&mut self, id: NodeId, admin: NodeAdmin) -> Result<(), Refusal> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| format!("no node with id {id}"))?
            .admin = admin;
        Ok(())
    }

    fn install_module(
        &mut self,
        name: &str,
        kind: ModuleKind,
        digest: &str,
        package: &[u8],
    ) -> Result<(), Refusal> {
        validate_name("module", name)?;
        let actual = blake3::hash(package).to_hex();
        if actual.as_str() != digest {
            return Err(format!(
                "package digest {digest} does not match its bytes ({actual})"
            ));
        }
        match self.modules.get_mut(name) {
            Some(module) if module.kind != kind => Err(format!(
                "module '{name}' is a {:?} module; uninstall it before installing a {kind:?} module",
                module.kind
            )),
            Some(module) if module.digest == digest => Ok(()),
            Some(module) => {
                let replaced = PackageVersion {
                    digest: std::mem::replace(&mut module.digest, digest.to_string()),
                    package: std::mem::replace(&mut module.package, package.to_vec()),
                };
                module.previous.insert(0, replaced);
                module.previous.truncate(KEPT_PACKAGES - 1);
                Ok(())
            }
            None => {
                self.modules.insert(
                    name.to_string(),
                    ModuleRecord {
                        name: name.to_string(),
                        kind,
                        digest: digest.to_string(),
                        package: package.to_vec(),
                        started_on: BTreeSet::new(),
                        previous: Vec::new(),
                        failover: true,
                        disabled_nodes: BTreeSet::new(),
                        mirror: None,
                        farm: None,
                        intents: BTreeMap::new(),
                    },
                );
                Ok(())
            }
        }
    }

    fn set_module_started(
        &mut self,
        name: &str,
        node: NodeId,
        started: bool,
    ) -> Result<(), Refusal> {
        let node_name = self.known_node(node)?.name.clone();
        let module = self.module_mut(name)?;
        if !started {
            module.started_on.remove(&node);
            return Ok(());
        }
        if module.disabled_nodes.contains(&node) {
            return Err(format!("module '{name}' is disabled on node '{node_name}'"));
        }
        if module.kind == ModuleKind::Light {
            if let Some(other) = module.started_on.iter().find(|n| **n != node) {
                return Err(format!(
                    "light module '{name}' already runs on node {other}; stop it there first"
                ));
            }
        }
        module.started_on.insert(node);
        Ok(())
    }

    fn assign_mirror(&mut self, name: &str, next: &MirrorAssignment) -> Result<(), Refusal> {
        for node in [next.prim, next.second].into_iter().flatten() {
            self.known_node(node)?;
        }
        if next.prim.is_some() && next.prim == next.second {
            return Err("PRIM and SECOND must be different nodes".into());
        }
        let assigned: BTreeSet<NodeId> = [next.prim, next.second].into_iter().flatten().collect();
        if !next.uptodate.is_subset(&assigned) {
            return Err("an up-to-date node must be PRIM or SECOND".into());
        }
        if let Some(prim) = next.prim {
            if !next.uptodate.contains(&prim) {
                return Err("PRIM must be up to date".into());
            }
        }
        let module = self.module_of_kind(name, ModuleKind::Mirror)?;
        let current = module.mirror.as_ref().map_or(0, |m| m.epoch);
        if next.epoch <= current {
            return Err(format!(
                "stale mirror assignment: epoch {} is not above {current}",
                next.epoch
            ));
        }
        module.mirror = Some(next.clone());
        Ok(())
    }

    fn assign_farm(&mut self, name: &str, next: &FarmAssignment) -> Result<(), Refusal> {
        for node in &next.members_up {
            self.known_node(*node)?;
        }
        if next.buckets.len() != FARM_BUCKETS {
            return Err(format!(
                "a farm assignment has {FARM_BUCKETS} buckets, not {}",
                next.buckets.len()
            ));
        }
        if let Some(owner) = next
            .buckets
            .iter()
            .flatten()
            .find(|owner| !next.members_up.contains(owner))
        {
            return Err(format!("bucket owner {owner} is not an up member"));
        }
        let module = self.module_of_kind(name, ModuleKind::Farm)?;
        let current = module.farm.as_ref().map_or(0, |f| f.epoch);
        if next.epoch <= current {
            return Err(format!(
                "stale farm assignment: epoch {} is not above {current}",
                next.epoch
            ));
        }
        module.farm = Some(next.clone());
        Ok(())
    }

    fn record_intent(
        &mut self,
        module: &str,
        request_id: &str,
        intent: &OperatorIntent,
    ) -> Result<(), Refusal> {
        validate_name("request id", request_id)?;
        match intent {
            OperatorIntent::Prim { node, .. }
            | OperatorIntent::Second { node, .. }
            | OperatorIntent::PrimForce { node }
            | OperatorIntent::Stop { node: Some(node) }
            | OperatorIntent::Start { node: Some(node) } => {
                self.known_node(*node)?;
            }
            _ => {}
        }
        let intents = &mut self.module_mut(module)?.intents;
        if intents.contains_key(request_id) {
            return Err(format!("request '{request_id}' was already recorded"));
        }
        intents.insert(request_id.to_string(), intent.clone());
        Ok(())
    }

    fn known_node(&self, id: NodeId) -> Result<&NodeRecord, Refusal> {
        self.nodes
            .get(&id)
            .ok_or_else(|| format!("no node with id {id}"))
    }

    fn module_mut(&mut self, name: &str) -> Result<&mut ModuleRecord, Refusal> {
        self.modules
            .get_mut(name)
            .ok_or_else(|| format!("no module '{name}'"))
    }

    fn module_of_kind(
        &mut self,
        name: &str,
        kind: ModuleKind,
    ) -> Result<&mut ModuleRecord, Refusal> {
        let module = self.module_mut(name)?;
        if module.kind != kind {
            return Err(format!("module '{name}' is not a {kind:?} module"));
        }
        Ok(module)
    }
}

fn show_register(value: Option<u64>) -> String {
    value.map_or("nothing".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests;
