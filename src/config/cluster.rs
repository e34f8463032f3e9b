//! `cluster.xml`: which servers form the cluster and how to reach them.
//!
//! SafeKit's shape, with Rampart's additions in a `<rampart>` element and as extra
//! node attributes:
//!
//! ```xml
//! <cluster>
//!   <rampart secret_file="secret" data_dir="/var/lib/rampart"
//!            raft_port="4800" api_port="4801" heartbeat_ms="100"
//!            election_timeout_min_ms="300" election_timeout_max_ms="600"
//!            snapshot_every_entries="1000"/>
//!   <lans>
//!     <lan name="default">
//!       <node name="n1" addr="198.18.0.1"/>
//!       <node name="n2" addr="198.18.0.2" api_port="4901" data_dir="/srv/rampart"/>
//!       <node name="w"  addr="198.18.0.3" witness="on"/>
//!     </lan>
//!     <lan name="backup"> … the same node names, other addresses … </lan>
//!   </lans>
//! </cluster>
//! ```
//!
//! The first LAN carries Raft and the API. Per-node settings (ports, data_dir, witness)
//! are written on the node's entry in the first LAN. Relative paths are relative to the
//! directory of cluster.xml.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_raft::command::{LanAddress, NodeAdmin, NodeRecord, NodeRole};
use rampart_raft::{node_id_for_name, validate_name, NodeId, NodeInfo};

use super::xml::{self, ConfigError, Element};

pub const DEFAULT_RAFT_PORT: u16 = 4800;
pub const DEFAULT_API_PORT: u16 = 4801;
const DEFAULT_DATA_DIR: &str = "/var/lib/rampart";
const DEFAULT_SECRET_FILE: &str = "secret";
/// Shortest accepted cluster secret, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the file was read from (for messages and relative paths).
    pub path: PathBuf,
    /// LAN names, in file order; the first carries Raft and the API.
    pub lans: Vec<String>,
    pub nodes: Vec<NodeConfig>,
    pub secret_file: PathBuf,
    pub timing: RaftTiming,
    /// Accepted but meaningless settings, each naming the setting and why.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub id: NodeId,
    /// One address per LAN, in the order of [`ClusterConfig::lans`].
    pub addrs: Vec<IpAddr>,
    pub raft_port: u16,
    pub api_port: u16,
    pub data_dir: PathBuf,
    pub witness: bool,
}

/// Raft timing. Invariant (checked by [`RaftTiming::validate`]):
/// `3 × heartbeat_ms ≤ election_timeout_min_ms < election_timeout_max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    /// Leader → follower heartbeat period, in milliseconds.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Log entries applied since the last snapshot that trigger a new snapshot (after
    /// which the log before it is purged; a lagging node then receives the snapshot).
    pub snapshot_every_entries: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every_entries: 1000,
        }
    }
}

impl RaftTiming {
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be above 0".into());
        }
        if self.election_timeout_min_ms < 3 * self.heartbeat_ms {
            return Err(format!(
                "election_timeout_min_ms ({}) must be at least 3 × heartbeat_ms ({}), or \
                 followers start elections while the leader is healthy",
                self.election_timeout_min_ms, self.heartbeat_ms
            ));
        }
        if self.snapshot_every_entries == 0 {
            return Err("snapshot_every_entries must be above 0".into());
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(format!(
                "election_timeout_max_ms ({}) must be above election_timeout_min_ms ({})",
                self.election_timeout_max_ms, self.election_timeout_min_ms
            ));
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

impl NodeConfig {
    pub fn raft_addr(&self) -> String {
        SocketAddr::new(self.addrs[0], self.raft_port).to_string()
    }

    pub fn api_addr(&self) -> String {
        SocketAddr::new(self.addrs[0], self.api_port).to_string()
    }

    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            raft_addr: self.raft_addr(),
            api_addr: self.api_addr(),
        }
    }

    pub fn record(&self, lans: &[String]) -> NodeRecord {
        NodeRecord {
            id: self.id,
            name: self.name.clone(),
            lans: lans
                .iter()
                .zip(&self.addrs)
                .map(|(lan, addr)| LanAddress {
                    lan: lan.clone(),
                    addr: addr.to_string(),
                })
                .collect(),
            role: if self.witness {
                NodeRole::Witness
            } else {
                NodeRole::Voter
            },
            admin: NodeAdmin::Active,
        }
    }
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            pos: None,
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&path.display().to_string(), &text, base)?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// Parses cluster.xml text; `base` resolves relative paths.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Self, ConfigError> {
        let root = xml::parse(file, text)?;
        if root.name != "cluster" {
            return Err(root.error(format!(
                "the root element is <{}>: expected <cluster>",
                root.name
            )));
        }
        root.check_attributes(&[], &[])?;
        root.check_children(&["rampart", "lans"])?;
        let mut warnings = Vec::new();

        let settings = root.single_child("rampart")?;
        let mut timing = RaftTiming::default();
        let mut default_raft_port = DEFAULT_RAFT_PORT;
        let mut default_api_port = DEFAULT_API_PORT;
        let mut data_dir = PathBuf::from(DEFAULT_DATA_DIR);
        let mut secret_file = PathBuf::from(DEFAULT_SECRET_FILE);
        if let Some(s) = settings {
            s.check_attributes(
                &[
                    "secret_file",
                    "data_dir",
                    "raft_port",
                    "api_port",
                    "heartbeat_ms",
                    "election_timeout_min_ms",
                    "election_timeout_max_ms",
                    "snapshot_every_entries",
                ],
                &[],
            )?;
            s.check_children(&[])?;
            if let Some(v) = s.attr("secret_file") {
                secret_file = PathBuf::from(v);
            }
            if let Some(v) = s.attr("data_dir") {
                data_dir = PathBuf::from(v);
            }
            default_raft_port = port(s, "raft_port")?.unwrap_or(default_raft_port);
            default_api_port = port(s, "api_port")?.unwrap_or(default_api_port);
            let ms = "a whole number of milliseconds";
            timing.heartbeat_ms = s.parsed("heartbeat_ms", ms)?.unwrap_or(timing.heartbeat_ms);
            timing.election_timeout_min_ms = s
                .parsed("election_timeout_min_ms", ms)?
                .unwrap_or(timing.election_timeout_min_ms);
            timing.election_timeout_max_ms = s
                .parsed("election_timeout_max_ms", ms)?
                .unwrap_or(timing.election_timeout_max_ms);
            timing.snapshot_every_entries = s
                .parsed("snapshot_every_entries", "a whole number of log entries")?
                .unwrap_or(timing.snapshot_every_entries);
            timing.validate().map_err(|e| s.error(e))?;
        }

        let lans_element = root
            .single_child("lans")?
            .ok_or_else(|| root.error("<cluster> needs a <lans> element listing the nodes"))?;
        lans_element.check_attributes(&[], &[])?;
        lans_element.check_children(&["lan"])?;
        let lan_elements: Vec<&Element> = lans_element.children_named("lan").collect();
        if lan_elements.is_empty() {
            return Err(lans_element.error("<lans> needs at least one <lan>"));
        }

        let mut lans = Vec::new();
        let mut nodes: Vec<NodeConfig> = Vec::new();
        for (lan_index, lan) in lan_elements.iter().enumerate() {
            warnings.extend(lan.check_attributes(
                &["name"],
                &[
                    ("command", "commands always use the first LAN"),
                    ("framework", "Raft and the API always use the first LAN"),
                    (
                        "console",
                        "the web console is served on every node's API port",
                    ),
                ],
            )?);
            lan.check_children(&["node"])?;
            let lan_name = lan.required("name")?.to_string();
            if lans.contains(&lan_name) {
                return Err(lan.error(format!("LAN '{lan_name}' is listed twice")));
            }
            let mut seen = Vec::new();
            for node in lan.children_named("node") {
                let name = node.required("name")?.to_string();
                if seen.contains(&name) {
                    return Err(
                        node.error(format!("node '{name}' is listed twice in LAN '{lan_name}'"))
                    );
                }
                seen.push(name.clone());
                let addr: IpAddr = node
                    .parsed("addr", "an IPv4 or IPv6 address")?
                    .ok_or_else(|| node.error("<node> needs the attribute 'addr'"))?;
                if lan_index == 0 {
                    node.check_attributes(
                        &[
                            "name",
                            "addr",
                            "raft_port",
                            "api_port",
                            "data_dir",
                            "witness",
                        ],
                        &[],
                    )?;
                    validate_name("node", &name).map_err(|e| node.error(e))?;
                    nodes.push(NodeConfig {
                        id: node_id_for_name(&name),
                        name,
                        addrs: vec![addr],
                        raft_port: port(node, "raft_port")?.unwrap_or(default_raft_port),
                        api_port: port(node, "api_port")?.unwrap_or(default_api_port),
                        data_dir: node
                            .attr("data_dir")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| data_dir.clone()),
                        witness: node.flag("witness")?.unwrap_or(false),
                    });
                } else {
                    node.check_attributes(&["name", "addr"], &[])?;
                    let known = nodes.iter_mut().find(|n| n.name == name).ok_or_else(|| {
                        node.error(format!(
                            "node '{name}' is in LAN '{lan_name}' but not in the first LAN '{}'",
                            lans[0]
                        ))
                    })?;
                    known.addrs.push(addr);
                }
            }
            if lan_index > 0 {
                if let Some(missing) = nodes.iter().find(|n| n.addrs.len() != lan_index + 1) {
                    return Err(lan.error(format!(
                        "LAN '{lan_name}' has no address for node '{}'",
                        missing.name
                    )));
                }
            }
            lans.push(lan_name);
        }
        if nodes.is_empty() {
            return Err(lan_elements[0].error("the first <lan> lists no <node>"));
        }
        check_distinct_endpoints(lan_elements[0], &nodes)?;

        for node in &mut nodes {
            node.data_dir = base.join(&node.data_dir);
        }
        Ok(ClusterConfig {
            path: PathBuf::from(file),
            lans,
            nodes,
            secret_file: base.join(secret_file),
            timing,
            warnings,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node this process runs as: the one named, or else the only node whose first
    /// address belongs to this machine.
    pub fn local_node(&self, name: Option<&str>) -> Result<&NodeConfig, String> {
        if let Some(name) = name {
            return self.node(name).ok_or_else(|| {
                format!(
                    "no node named '{name}' in {}; nodes: {}",
                    self.path.display(),
                    self.node_names()
                )
            });
        }
        let local: Vec<&NodeConfig> = self
            .nodes
            .iter()
            .filter(|n| UdpSocket::bind((n.addrs[0], 0)).is_ok())
            .collect();
        match local.as_slice() {
            [one] => Ok(one),
            [] => Err(format!(
                "none of the addresses in {} belongs to this machine; name the node with --name",
                self.path.display()
            )),
            several => Err(format!(
                "several nodes of {} have a local address ({}); name the node with --name",
                self.path.display(),
                several
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Reads the cluster secret. Surrounding white space is not part of it.
    pub fn read_secret(&self) -> Result<Vec<u8>, String> {
        let raw = std::fs::read(&self.secret_file).map_err(|e| {
            format!(
                "cannot read the cluster secret {}: {e} (create one with `rampart cluster secret --out {}`)",
                self.secret_file.display(),
                self.secret_file.display()
            )
        })?;
        let secret = raw.trim_ascii().to_vec();
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the cluster secret {} is {} bytes long: at least {MIN_SECRET_LEN} are needed",
                self.secret_file.display(),
                secret.len()
            ));
        }
        Ok(secret)
    }
}

fn port(element: &Element, name: &str) -> Result<Option<u16>, ConfigError> {
    let port: Option<u16> = element.parsed(name, "a TCP port between 1 and 65535")?;
    if port == Some(0) {
        return Err(element.error(format!(
            "attribute '{name}' of <{}> is 0: expected a TCP port between 1 and 65535",
            element.name
        )));
    }
    Ok(port)
}

/// Two nodes, or one node's two services, must not share an address and port.
fn check_distinct_endpoints(lan: &Element, nodes: &[NodeConfig]) -> Result<(), ConfigError> {
    let mut endpoints: Vec<(String, &str)> = Vec::new();
    for node in nodes {
        for endpoint in [node.raft_addr(), node.api_addr()] {
            if let Some((_, other)) = endpoints.iter().find(|(e, _)| *e == endpoint) {
                return Err(lan.error(format!(
                    "nodes '{other}' and '{}' both use {endpoint}: give each service its own port",
                    node.name
                )));
            }
            endpoints.push((endpoint, &node.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
