//! `userconfig.xml`: what a module runs and how it is watched, in SafeKit's element
//! and attribute names, so that a SafeKit 8.2 module using only what Rampart supports
//! loads unchanged.
//!
//! ```xml
//! <safe>
//!   <macro name="VIP" value="198.18.0.99"/>
//!   <service mode="mirror" defaultprim="n1" failover="on" maxloop="3" loop_interval="24">
//!     <heart pulse="700" timeout="30000"><heartbeat name="default"/></heart>
//!     <vip><interface_list><interface check="on">
//!       <real_interface><virtual_addr addr="%VIP%" where="one_side_alias"/></real_interface>
//!     </interface></interface_list></vip>
//!     <rfs sync="write"><replicated dir="/var/lib/db"/></rfs>
//!     <user nicestoptimeout="300" forcestoptimeout="300"><var name="PORT" value="5432"/></user>
//!     <errd polltimer="10"><proc name="postgres" atleast="1" action="restart" class="prim"/></errd>
//!     <check><tcp ident="db" when="prim"><to addr="127.0.0.1" port="5432" interval="10" timeout="5"/></tcp></check>
//!   </service>
//! </safe>
//! ```
//!
//! Reading happens in [`read`]; this file holds the model. Every time is a
//! [`Duration`]; unit-less values keep SafeKit's unit for that attribute (see
//! [`crate::module::duration`]).

mod read;

use std::net::IpAddr;
use std::time::Duration;

use rampart_raft::command::ModuleKind;
use regex::Regex;

pub use read::parse;

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub mode: ModuleKind,
    /// Mirror: the node preferred as PRIM when both start.
    pub defaultprim: Option<String>,
    /// Automatic failover; `false` leaves failover to the operator.
    pub failover: bool,
    /// Restarts allowed within `loop_interval` before the module is stopped.
    pub maxloop: u32,
    pub loop_interval: Duration,
    pub heart: Option<Heart>,
    pub vip: Option<Vip>,
    pub rfs: Option<Rfs>,
    /// Farm: the LANs whose heartbeats define farm membership.
    pub farm_lans: Vec<String>,
    pub user: User,
    pub errd: Option<Errd>,
    pub checks: Vec<Check>,
    /// SafeKit failover rules, kept verbatim (see the warning when present).
    pub failover_rules: Option<String>,
    /// Accepted settings with no meaning here, each saying which and why.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Heart {
    /// Interval between heartbeats.
    pub pulse: Duration,
    /// A peer unheard for this long is down. Invariant: `pulse < timeout`.
    pub timeout: Duration,
    /// The LANs heartbeats go over, by name (from cluster.xml).
    pub lans: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Vip {
    pub interfaces: Vec<VipInterface>,
    /// Farm: load-balancing groups.
    pub groups: Vec<LoadBalancingGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipKind {
    /// The address is added to a real interface (mirror).
    Real,
    /// Farm: answered with a virtual MAC no node uses as a source.
    VmacInvisible,
}

#[derive(Debug, Clone)]
pub struct VipInterface {
    pub kind: VipKind,
    /// The interface, when named; otherwise the one whose subnet holds the address.
    pub name: Option<String>,
    /// Watch the interface's link and fail over when it goes down.
    pub check: bool,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct LoadBalancingGroup {
    pub name: String,
    /// Relative capacity per node (`power`), in cluster.xml names.
    pub hosts: Vec<(String, u32)>,
    pub rules: Vec<LoadBalancingRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceOn {
    /// Client address: session affinity.
    Addr,
    /// Client address and port.
    Port,
    /// IP identification field.
    IpId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancingRule {
    pub port: u16,
    pub proto: Proto,
    pub filter: BalanceOn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Writes return once SECOND received them (SafeKit's default).
    Write,
    /// Writes return once SECOND wrote them to disk.
    Durable,
    /// Writes stream; fsync waits for everything before it.
    Fsync,
}

#[derive(Debug, Clone)]
pub struct Rfs {
    pub sync: SyncMode,
    /// Size of a bookkeeping zone, bytes; a power of two.
    pub zone_size: u64,
    pub replicated: Vec<Replicated>,
}

#[derive(Debug, Clone)]
pub struct Replicated {
    /// Absolute, normalised, no `..`.
    pub dir: String,
    /// Paths under `dir` (relative) that are not replicated.
    pub notreplicated: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct User {
    /// Graceful stop scripts get this long before `force`.
    pub nicestoptimeout: Duration,
    /// Forced stop scripts get this long before the process group is killed.
    pub forcestoptimeout: Duration,
    /// Variables given to every script, in file order.
    pub vars: Vec<(String, String)>,
}

impl Default for User {
    fn default() -> Self {
        User {
            nicestoptimeout: Duration::from_secs(300),
            forcestoptimeout: Duration::from_secs(300),
            vars: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Restart,
    StopStart,
    Stop,
    NoAction,
}

/// When a checker or monitored process applies, by the node's module state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Only on PRIM (or the node running a light module).
    Prim,
    /// On PRIM, SECOND, ALONE and UP.
    Both,
    Second,
    /// Before the module starts (prestart), whatever the state.
    Pre,
}

#[derive(Debug, Clone)]
pub struct Errd {
    pub polltimer: Duration,
    pub procs: Vec<Proc>,
}

#[derive(Debug, Clone)]
pub enum ProcMatch {
    /// The process name (comm) equals this.
    Name(String),
    /// The process name matches this.
    NameRegex(Regex),
}

#[derive(Debug, Clone)]
pub struct Proc {
    /// Names the resource `proc.<name>`.
    pub name: String,
    pub matcher: ProcMatch,
    /// The command line must match this too.
    pub argregex: Option<Regex>,
    pub atleast: u32,
    pub atmax: Option<u32>,
    pub class: When,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp {
        addr: IpAddr,
        port: u16,
    },
    Ping {
        addr: IpAddr,
    },
    /// The interface's link is up (by name, or the one holding `addr`).
    Intf {
        interface: Option<String>,
        addr: Option<IpAddr>,
    },
    /// The address is configured on this node.
    Ip {
        addr: IpAddr,
    },
    /// A script's exit code: 0 is up.
    Custom {
        exec: String,
        args: Vec<String>,
    },
    /// Another module's state is not STOP.
    Module {
        name: String,
    },
}

#[derive(Debug, Clone)]
pub struct Check {
    /// Resource name: `tcp.<ident>`, `ping.<ident>`, ….
    pub resource: String,
    pub probe: Probe,
    pub when: When,
    pub interval: Duration,
    pub timeout: Duration,
    pub action: Action,
}

#[cfg(test)]
mod tests;
