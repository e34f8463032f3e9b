//! Faults, and the seeded schedule that applies and heals them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::history::{Entry, History, Phase};
use crate::testbed::shell::{nft, run_quiet};
use crate::testbed::Testbed;

const NFT_TABLE: &str = "rampart_nemesis";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NemesisKind {
    /// kill -9 a node and everything it started; restart it on heal.
    Kill,
    /// SIGSTOP a node; SIGCONT on heal.
    Pause,
    /// Isolate one node, split majority/minority, a bridge node, or one-way loss.
    Partition,
    /// Cut the link between two given nodes only.
    LinkCut,
    /// Fill one node's data filesystem.
    DiskFull,
}

impl std::str::FromStr for NemesisKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(NemesisKind::Kill),
            "pause" => Ok(NemesisKind::Pause),
            "partition" => Ok(NemesisKind::Partition),
            "linkcut" => Ok(NemesisKind::LinkCut),
            "diskfull" => Ok(NemesisKind::DiskFull),
            other => Err(format!(
                "unknown nemesis '{other}': expected kill, pause, partition, linkcut or diskfull"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Fault {
    Kill {
        node: String,
    },
    Pause {
        node: String,
    },
    Isolate {
        node: String,
    },
    Split {
        minority: Vec<String>,
        majority: Vec<String>,
    },
    /// `left` and `right` cannot talk; `bridge` talks to both.
    Bridge {
        bridge: String,
        left: Vec<String>,
        right: Vec<String>,
    },
    /// Packets from `from` to `to` are lost; the other direction works.
    OneWay {
        from: String,
        to: String,
    },
    CutLink {
        a: String,
        b: String,
    },
    DiskFull {
        node: String,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Kill { node } => write!(f, "kill {node}"),
            Fault::Pause { node } => write!(f, "pause {node}"),
            Fault::Isolate { node } => write!(f, "isolate {node}"),
            Fault::Split { minority, majority } => {
                write!(f, "split {} | {}", minority.join(","), majority.join(","))
            }
            Fault::Bridge {
                bridge,
                left,
                right,
            } => {
                write!(
                    f,
                    "bridge {} <{bridge}> {}",
                    left.join(","),
                    right.join(",")
                )
            }
            Fault::OneWay { from, to } => write!(f, "drop {from}->{to}"),
            Fault::CutLink { a, b } => write!(f, "cut {a}<->{b}"),
            Fault::DiskFull { node } => write!(f, "fill disk of {node}"),
        }
    }
}

/// Picks a fault of one of `kinds` among `nodes` (at least 2 nodes).
pub fn generate(kinds: &[NemesisKind], nodes: &[String], rng: &mut StdRng) -> Fault {
    let kind = *kinds.choose(rng).expect("at least one nemesis kind");
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(rng);
    let one = shuffled[0].clone();
    match kind {
        NemesisKind::Kill => Fault::Kill { node: one },
        NemesisKind::Pause => Fault::Pause { node: one },
        NemesisKind::DiskFull => Fault::DiskFull { node: one },
        NemesisKind::LinkCut => Fault::CutLink {
            a: one,
            b: shuffled[1].clone(),
        },
        NemesisKind::Partition => match rng.gen_range(0..4) {
            0 => Fault::Isolate { node: one },
            1 => {
                let minority_size = (shuffled.len() - 1) / 2;
                let minority_size = minority_size.max(1);
                Fault::Split {
                    minority: shuffled[..minority_size].to_vec(),
                    majority: shuffled[minority_size..].to_vec(),
                }
            }
            2 if shuffled.len() >= 3 => {
                let rest = &shuffled[1..];
                let half = rest.len() / 2;
                Fault::Bridge {
                    bridge: one,
                    left: rest[..half].to_vec(),
                    right: rest[half..].to_vec(),
                }
            }
            _ => Fault::OneWay {
                from: one,
                to: shuffled[1].clone(),
            },
        },
    }
}

impl Fault {
    pub fn apply(&self, testbed: &Testbed) -> anyhow::Result<()> {
        match self {
            Fault::Kill { node } => testbed.kill_node(node),
            Fault::Pause { node } => testbed.pause_node(node, true),
            Fault::DiskFull { node } => fill_disk(testbed, node)?,
            Fault::Isolate { node } => {
                let others: Vec<String> = testbed
                    .servers
                    .iter()
                    .map(|s| s.host.name.clone())
                    .filter(|n| n != node)
                    .collect();
                block_both_ways(testbed, std::slice::from_ref(node), &others)?;
            }
            Fault::Split { minority, majority } => block_both_ways(testbed, minority, majority)?,
            Fault::Bridge { left, right, .. } => block_both_ways(testbed, left, right)?,
            Fault::CutLink { a, b } => {
                block_both_ways(testbed, std::slice::from_ref(a), std::slice::from_ref(b))?
            }
            Fault::OneWay { from, to } => {
                let addr = testbed.server(from).host.addr;
                drop_rules(testbed, to, &[addr.to_string()], &[])?;
            }
        }
        Ok(())
    }

    pub fn heal(&self, testbed: &Testbed) -> anyhow::Result<()> {
        match self {
            Fault::Kill { node } => testbed.start_node(node)?,
            Fault::Pause { node } => testbed.pause_node(node, false),
            Fault::DiskFull { node } => {
                let _ = std::fs::remove_file(testbed.server(node).data_dir.join("nemesis-fill"));
                // A node whose store failed exits; its supervisor would restart it.
                if !testbed.is_running(node) {
                    testbed.kill_node(node);
                    testbed.start_node(node)?;
                }
            }
            _ => heal_network(testbed),
        }
        Ok(())
    }
}

/// Removes every nemesis rule from every server.
pub fn heal_network(testbed: &Testbed) {
    for server in &testbed.servers {
        run_quiet(
            "ip",
            &[
                "netns",
                "exec",
                &server.host.ns,
                "nft",
                "delete",
                "table",
                "inet",
                NFT_TABLE,
            ],
        );
    }
}

fn block_both_ways(testbed: &Testbed, left: &[String], right: &[String]) -> anyhow::Result<()> {
    let addrs = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .map(|n| testbed.server(n).host.addr.to_string())
            .collect()
    };
    let (left_addrs, right_addrs) = (addrs(left), addrs(right));
    for node in left {
        drop_rules(testbed, node, &right_addrs, &right_addrs)?;
    }
    for node in right {
        drop_rules(testbed, node, &left_addrs, &left_addrs)?;
    }
    Ok(())
}

/// In `node`'s namespace, drops packets from `inbound` and to `outbound` addresses
/// (added to what is already dropped).
fn drop_rules(
    testbed: &Testbed,
    node: &str,
    inbound: &[String],
    outbound: &[String],
) -> anyhow::Result<()> {
    let mut script = format!(
        "table inet {NFT_TABLE} {{\n  chain input {{ type filter hook input priority -10; policy accept; }}\n  chain output {{ type filter hook output priority -10; policy accept; }}\n}}\n"
    );
    if !inbound.is_empty() {
        script.push_str(&format!(
            "add rule inet {NFT_TABLE} input ip saddr {{ {} }} drop\n",
            inbound.join(", ")
        ));
    }
    if !outbound.is_empty() {
        script.push_str(&format!(
            "add rule inet {NFT_TABLE} output ip daddr {{ {} }} drop\n",
            outbound.join(", ")
        ));
    }
    nft(&testbed.server(node).host.ns, &script)
}

/// Writes zeros into the node's data filesystem until it is full.
fn fill_disk(testbed: &Testbed, node: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let path = testbed.server(node).data_dir.join("nemesis-fill");
    let mut file = std::fs::File::create(&path)?;
    let block = vec![0u8; 1 << 20];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
            Err(e) => bail!("filling the disk of {node}: {e}"),
        }
    }
}

/// Alternates healthy and faulty periods until `total` has passed, then heals.
/// Every fault is recorded in `history` when applied and when healed.
pub async fn run_schedule(
    testbed: Arc<Testbed>,
    kinds: Vec<NemesisKind>,
    mut rng: StdRng,
    history: Arc<History>,
    total: Duration,
) -> anyhow::Result<()> {
    if kinds.is_empty() {
        tokio::time::sleep(total).await;
        return Ok(());
    }
    let nodes: Vec<String> = testbed
        .servers
        .iter()
        .map(|s| s.host.name.clone())
        .collect();
    let end = tokio::time::Instant::now() + total;
    loop {
        let healthy = Duration::from_millis(rng.gen_range(1500..3500));
        tokio::time::sleep_until((tokio::time::Instant::now() + healthy).min(end)).await;
        if tokio::time::Instant::now() >= end {
            return Ok(());
        }
        let fault = generate(&kinds, &nodes, &mut rng);
        let faulty = Duration::from_millis(rng.gen_range(2000..5000));
        history.record(Entry::Nemesis {
            time_ms: history.now_ms(),
            phase: Phase::Start,
            fault: fault.to_string(),
        });
        let applied = {
            let (testbed, fault) = (testbed.clone(), fault.clone());
            tokio::task::spawn_blocking(move || fault.apply(&testbed)).await?
        };
        tokio::time::sleep_until((tokio::time::Instant::now() + faulty).min(end)).await;
        let healed = {
            let (testbed, fault) = (testbed.clone(), fault.clone());
            tokio::task::spawn_blocking(move || fault.heal(&testbed)).await?
        };
        history.record(Entry::Nemesis {
            time_ms: history.now_ms(),
            phase: Phase::Stop,
            fault: fault.to_string(),
        });
        applied?;
        healed?;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn schedules_are_reproducible_from_the_seed() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let kinds = [
            NemesisKind::Kill,
            NemesisKind::Pause,
            NemesisKind::Partition,
            NemesisKind::LinkCut,
        ];
        let faults = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| generate(&kinds, &nodes, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(faults(7), faults(7));
        assert_ne!(faults(7), faults(8));
    }

    #[test]
    fn a_split_leaves_a_majority() {
        let nodes: Vec<String> = ["n1", "n2", "n3", "n4", "n5"].map(String::from).to_vec();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            if let Fault::Split { minority, majority } =
                generate(&[NemesisKind::Partition], &nodes, &mut rng)
            {
                assert!(majority.len() > minority.len());
                assert_eq!(majority.len() + minority.len(), 5);
            }
        }
    }
}
