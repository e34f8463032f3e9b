//! The bounded suite of the README's test command (root: namespaces, bridges, mounts):
//! the Raft control plane under every nemesis over a few seeds, the mirror data plane's
//! set workload, and the sweeper.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rampart_jepsen::nemesis::NemesisKind;
use rampart_jepsen::runner::{run, RunConfig};
use rampart_jepsen::testbed::sweep;

const SEEDS: [u64; 3] = [11, 12, 13];

/// Runs `config` once per seed. Each run must leave nothing behind and hold more than
/// `at_least` of `checker`'s `count` (enough to judge); the invalid runs' reports.
async fn invalid_runs(
    config: impl Fn(u64) -> RunConfig,
    seeds: &[u64],
    checker: &str,
    count: &str,
    at_least: u64,
) -> Vec<String> {
    let mut failures = Vec::new();
    for &seed in seeds {
        let mut prefix = String::new();
        let outcome = run(config(seed), |p| prefix = p.to_string())
            .await
            .expect("the run completes");
        // The testbed is gone once the run returns: no namespace, link, mount, folder.
        assert_eq!(
            sweep::leftovers(&prefix),
            Vec::<String>::new(),
            "seed {seed}"
        );
        eprintln!("{}", outcome.summary);
        // The history must hold enough to judge.
        let verdict = outcome
            .verdicts
            .iter()
            .find(|v| v.checker == checker)
            .unwrap();
        assert!(
            verdict.details[count].as_u64().unwrap() > at_least,
            "seed {seed}: too few {count}: {}",
            verdict.summary
        );
        if !outcome.valid {
            failures.push(format!("seed {seed}: {}", outcome.report_dir.display()));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_control_plane_stays_linearizable_under_every_nemesis() {
    let config = |seed| RunConfig {
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
        ack: "fsync".into(),
        out: std::env::temp_dir().join("rampart-jepsen-suite"),
    };
    let failures = invalid_runs(config, &SEEDS, "linearizable-register", "operations", 50).await;
    assert!(failures.is_empty(), "invalid verdicts: {failures:?}");
}

/// fsync'd appends through PRIM's mount while SECOND or PRIM is killed (PRIM restarted
/// with the same epoch), paused, or cut off: both copies hold every acknowledged
/// append and are identical at the end. Seed 2 kills PRIM; seed 3 cuts the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_data_plane_loses_no_acknowledged_append() {
    let config = |seed| RunConfig {
        workload: "set".into(),
        nemeses: vec![NemesisKind::Kill, NemesisKind::LinkCut, NemesisKind::Pause],
        time: Duration::from_secs(20),
        seed,
        servers: 2,
        clients: 3,
        ack: "fsync".into(),
        out: std::env::temp_dir().join("rampart-jepsen-suite"),
    };
    let failures = invalid_runs(config, &[2, 3], "set", "acknowledged", 100).await;
    assert!(failures.is_empty(), "invalid verdicts: {failures:?}");
}

/// The other two acknowledgement modes, with full disks too. `write` (appends
/// acknowledged once SECOND received them), seed 22: PRIM killed twice under its
/// clients and restarted (the restart once showed the bare directory: appends landed
/// beneath replication), both disks filled in turn. `durable`, seed 23: SECOND killed
/// twice while appends stream (acknowledged ones on its disk, the others in flight),
/// then paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_data_plane_loses_no_acknowledged_append_in_write_and_durable_modes() {
    use NemesisKind::{DiskFull, Kill, LinkCut, Pause};
    let runs = [
        ("write", 22, vec![Kill, DiskFull]),
        ("durable", 23, vec![Kill, LinkCut, Pause, DiskFull]),
    ];
    for (ack, seed, nemeses) in runs {
        let config = |seed| RunConfig {
            workload: "set".into(),
            nemeses: nemeses.clone(),
            time: Duration::from_secs(20),
            seed,
            servers: 2,
            clients: 3,
            ack: ack.into(),
            out: std::env::temp_dir().join("rampart-jepsen-suite"),
        };
        let failures = invalid_runs(config, &[seed], "set", "acknowledged", 100).await;
        assert!(
            failures.is_empty(),
            "{ack} mode: invalid verdicts: {failures:?}"
        );
    }
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

/// The testbed as other crates' tests use it: form a cluster, read a node's API, run
/// a command in a client host, stop a node gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_testbed_serves_as_a_library() {
    use rampart::api::views::ClusterStatus;
    use rampart_jepsen::testbed::{find_rampart_bin, Testbed, TestbedConfig};

    let testbed = Testbed::create(TestbedConfig {
        servers: 3,
        clients: 1,
        rampart_bin: find_rampart_bin().unwrap(),
        disk_mib: 32,
    })
    .unwrap();
    let http = reqwest::Client::new();
    testbed.form_cluster(&http).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status: ClusterStatus = testbed.api_get(&http, "n2", "/v1/cluster").await.unwrap();
        if status.leader.is_some() && status.members.len() == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no leader: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = &testbed.clients[0];
    let addresses = testbed
        .exec(&client.ns, &["ip", "-o", "-4", "addr", "show", "eth0"])
        .unwrap();
    assert!(addresses.contains(&client.addr.to_string()), "{addresses}");
    assert!(
        testbed.stop_node("n3", Duration::from_secs(10)),
        "n3 did not exit cleanly"
    );
    assert!(!testbed.is_running("n3"));
    let prefix = testbed.prefix.clone();
    drop(testbed);
    assert_eq!(sweep::leftovers(&prefix), Vec::<String>::new());
}
