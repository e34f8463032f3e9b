//! The bounded suite of the README's test command (root: namespaces, bridges, mounts):
//! the Raft control plane under every nemesis over a few seeds, and the sweeper.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rampart_jepsen::nemesis::NemesisKind;
use rampart_jepsen::runner::{run, RunConfig};
use rampart_jepsen::testbed::sweep;

const SEEDS: [u64; 3] = [11, 12, 13];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_control_plane_stays_linearizable_under_every_nemesis() {
    let out = std::env::temp_dir().join("rampart-jepsen-suite");
    let mut failures = Vec::new();
    for seed in SEEDS {
        let config = RunConfig {
            workload: "register".into(),
            nemeses: vec![
                NemesisKind::Partition,
                NemesisKind::Kill,
                NemesisKind::Pause,
                NemesisKind::LinkCut,
                NemesisKind::DiskFull,
            ],
            time: Duration::from_secs(20),
            seed,
            servers: 3,
            clients: 4,
            out: out.clone(),
        };
        let outcome = run(config, |prefix| eprintln!("seed {seed}: testbed {prefix}"))
            .await
            .expect("the run completes");
        eprintln!("{}", outcome.summary);
        // The history must hold enough to judge: successful operations and faults.
        let ops = outcome
            .verdicts
            .iter()
            .find(|v| v.checker == "linearizable-register")
            .unwrap();
        assert!(
            ops.details["operations"].as_u64().unwrap() > 50,
            "too few operations: {}",
            ops.summary
        );
        if !outcome.valid {
            failures.push(format!("seed {seed}: {}", outcome.report_dir.display()));
        }
    }
    assert!(failures.is_empty(), "invalid verdicts: {failures:?}");
}

#[test]
fn the_sweeper_removes_everything_a_killed_run_left() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rampart-jepsen"))
        .args(["run", "--time", "60", "--seed", "5", "--nemesis", "kill"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let prefix = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("prefix ").map(str::to_string))
        .expect("the run prints its prefix");
    // Let it start its nodes, then kill the runner so nothing cleans up.
    std::thread::sleep(Duration::from_secs(4));
    child.kill().unwrap();
    child.wait().unwrap();
    let left = sweep::leftovers(&prefix);
    assert!(
        left.iter().any(|l| l.starts_with("namespace")),
        "nothing left to sweep: {left:?}"
    );
    assert!(
        node_processes(&prefix) > 0,
        "the killed run's nodes should still be running"
    );

    let removed = sweep::sweep_stale();
    assert!(removed.contains(&prefix), "{removed:?}");
    assert_eq!(sweep::leftovers(&prefix), Vec::<String>::new());
    assert_eq!(node_processes(&prefix), 0);
}

/// Processes whose command line names the run's folder.
fn node_processes(prefix: &str) -> usize {
    let needle = format!("{}/{prefix}/", sweep::RUN_ROOT);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&needle))
        .count()
}
