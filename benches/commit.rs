//! Commit latency and throughput of the Raft control plane, through the admin API, on
//! a 3-node loopback cluster of real node processes.
//!
//! Baseline, measured in the same run on the same disk: a 1-node cluster (the same
//! HTTP path and the same synced RocksDB write, without replication). Figures are
//! reported as absolute values and as ratios to the baseline.
//!
//! Run: `cargo bench --bench commit` (add `-- --quick` for a short run).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::TestCluster;

struct Figures {
    p50: Duration,
    p99: Duration,
    /// Commits per second for each client count in [`CLIENTS`].
    throughput: Vec<f64>,
}

const CLIENTS: [usize; 3] = [1, 16, 64];

async fn start(nodes: usize) -> TestCluster {
    let mut cluster = TestCluster::new(nodes);
    let config = cluster.write_config("cluster.xml", nodes, "secret");
    let names: Vec<String> = cluster.specs.iter().map(|s| s.name.clone()).collect();
    for name in &names {
        cluster.start(name, &config).await;
    }
    assert_eq!(
        cluster.post("n1", "/v1/cluster/init", json!({})).await.0,
        200
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    cluster.wait_for_agreement(&refs, &refs).await;
    cluster
}

/// Commits `total` small commands from `clients` concurrent clients on the leader;
/// returns each commit's latency and the wall time.
async fn run(
    cluster: &Arc<TestCluster>,
    leader: &str,
    prefix: &str,
    clients: usize,
    total: usize,
) -> (Vec<Duration>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let cluster = cluster.clone();
        let next = next.clone();
        let url = cluster.url(leader, "/v1/tokens");
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return latencies;
                }
                let t = Instant::now();
                let response = cluster
                    .http
                    .post(&url)
                    .bearer_auth(cluster.admin_token())
                    .json(&json!({"name": format!("{prefix}-{i}"), "role": "monitor"}))
                    .send()
                    .await
                    .expect("the leader answers");
                assert!(
                    response.status().is_success(),
                    "commit failed: {}",
                    response.status()
                );
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    (latencies, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(cluster: &Arc<TestCluster>, leader: &str, label: &str, ops: usize) -> Figures {
    let (mut latencies, _) = run(cluster, leader, &format!("{label}-lat"), 1, ops).await;
    latencies.sort();
    let mut throughput = Vec::new();
    for clients in CLIENTS {
        let (_, wall) = run(
            cluster,
            leader,
            &format!("{label}-c{clients}"),
            clients,
            ops,
        )
        .await;
        throughput.push(ops as f64 / wall.as_secs_f64());
    }
    Figures {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        throughput,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ops = if quick { 200 } else { 2000 };
    let baseline_cluster = Arc::new(start(1).await);
    let cluster = Arc::new(start(3).await);
    let leader = cluster.status("n1").await.leader.expect("a leader");

    // Alternate the two clusters, twice, so that disk noise hits both alike.
    let mut baseline = Vec::new();
    let mut replicated = Vec::new();
    for round in 0..2 {
        baseline.push(measure(&baseline_cluster, "n1", &format!("b{round}"), ops).await);
        replicated.push(measure(&cluster, &leader, &format!("r{round}"), ops).await);
    }
    let best = |runs: &[Figures]| Figures {
        p50: runs.iter().map(|f| f.p50).min().unwrap(),
        p99: runs.iter().map(|f| f.p99).min().unwrap(),
        throughput: (0..CLIENTS.len())
            .map(|i| runs.iter().map(|f| f.throughput[i]).fold(0.0, f64::max))
            .collect(),
    };
    let (b, r) = (best(&baseline), best(&replicated));
    println!("commit of a small command through the admin API ({ops} ops per figure, best of 2 alternated rounds)");
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "", "1 node (base)", "3 nodes", "ratio"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{:<28} {:>11.2} ms {:>11.2} ms {:>7.2}x",
        "latency p50",
        ms(b.p50),
        ms(r.p50),
        ms(r.p50) / ms(b.p50)
    );
    println!(
        "{:<28} {:>11.2} ms {:>11.2} ms {:>7.2}x",
        "latency p99",
        ms(b.p99),
        ms(r.p99),
        ms(r.p99) / ms(b.p99)
    );
    for (i, clients) in CLIENTS.iter().enumerate() {
        println!(
            "{:<28} {:>10.0} /s {:>10.0} /s {:>7.2}x",
            format!("throughput, {clients} clients"),
            b.throughput[i],
            r.throughput[i],
            r.throughput[i] / b.throughput[i]
        );
    }
}
