//! The mirror data plane against its baselines, all measured in the same run on the
//! same filesystem (/var/tmp), with the runs of the different targets alternated
//! because the disk here is noisy. Every figure is reported with its ratio to the
//! baselines.
//!
//! Targets: `native` (one copy), `native-two` (every write done to two files: the least
//! work a replica pair on one machine can do), `glusterfs-r2` (a GlusterFS replica-2
//! volume through its FUSE client, both bricks on this machine), `bindfs` (plain FUSE
//! passthrough, no replication) and `rampart-write` / `rampart-durable` (`rampart
//! mirror prim|second` processes on loopback, in that acknowledgement mode).
//!
//! Workloads: sequential 1 MiB writes of a 1 GiB file then fsync; a sequential read of
//! that file after dropping the page cache; 4 KiB random writes each followed by
//! fdatasync (p50, p99), beside what waking a thread costs on this machine (each
//! replication hop is one); reintegration of a 100,000-file tree after 1 % of it changed,
//! against rsync of the same trees and a plain copy of the changed files over the
//! replica's old versions; PostgreSQL's pgbench (read-write and select-only, 8 clients)
//! on `native`, `glusterfs-r2` and `rampart-write`.
//!
//! Run as root: `cargo bench --bench mirror` (`-- --quick` for a short run; naming
//! workloads, e.g. `-- pgbench`, runs only those).
//! The baselines need glusterfs-server, bindfs, rsync and postgresql-15 (`./dev bench`
//! installs them).

mod data_path;
mod pgbench;
mod reintegration;
mod targets;

use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../tests/support/mirror_process.rs"]
mod mirror_process;

const ROOT: &str = "/var/tmp/rampart-bench";
const MIB: usize = 1 << 20;

struct Plan {
    rounds: usize,
    seq_bytes: usize,
    latency_ops: usize,
    tree_files: usize,
    reintegration_rounds: usize,
    /// pgbench: scale factors, rounds (each a read-write then a select-only run per
    /// target) and seconds per run.
    pg_scales: Vec<u32>,
    pg_rounds: usize,
    pg_seconds: u32,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            rounds: 5,
            seq_bytes: 1 << 30,
            latency_ops: 2000,
            tree_files: 100_000,
            reintegration_rounds: 2,
            pg_scales: vec![20, 100],
            pg_rounds: 3,
            pg_seconds: 30,
        }
    }

    fn quick() -> Plan {
        Plan {
            rounds: 1,
            seq_bytes: 256 << 20,
            latency_ops: 300,
            tree_files: 10_000,
            reintegration_rounds: 1,
            pg_scales: vec![20],
            pg_rounds: 1,
            pg_seconds: 10,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    const WORKLOADS: [&str; 3] = ["data-path", "reintegration", "pgbench"];
    // `cargo bench` passes `--bench`; anything else we do not know is a mistake.
    for arg in &args[1..] {
        if !["--bench", "--quick"].contains(&arg.as_str()) && !WORKLOADS.contains(&arg.as_str()) {
            eprintln!(
                "unknown argument {arg:?}; usage: cargo bench --bench mirror -- [--quick] [{}]...",
                WORKLOADS.join("|")
            );
            std::process::exit(2);
        }
    }
    // The workloads named, or all of them.
    let chosen: Vec<&str> = WORKLOADS
        .into_iter()
        .filter(|w| args.iter().any(|a| a == w))
        .collect();
    let runs_workload = |w: &str| chosen.is_empty() || chosen.contains(&w);
    let plan = if args.iter().any(|a| a == "--quick") {
        Plan::quick()
    } else {
        Plan::full()
    };
    if !is_root() {
        eprintln!("the mirror benchmark mounts file systems: run it as root");
        std::process::exit(2);
    }
    let _ = std::fs::remove_dir_all(ROOT);
    std::fs::create_dir_all(ROOT).expect("create the benchmark directory");
    let started = Instant::now();
    println!("mirror data plane, {} round(s), alternated\n", plan.rounds);
    if runs_workload("data-path") {
        data_path::run(&plan);
    }
    if runs_workload("reintegration") {
        reintegration::run(&plan);
    }
    if runs_workload("pgbench") {
        pgbench::run(&plan);
    }
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(ROOT);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Incompressible bytes, the same in every run.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn runs(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}
