//! One run: testbed up, cluster formed, workload + observer + nemesis for `time`,
//! heal, final reads, check, report, teardown. The `register` workload runs against
//! the Raft cluster state; `set` against the mirror data plane ([`data_plane`]).

mod data_plane;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use crate::checker::{self, Verdict};
use crate::history::History;
use crate::nemesis::{self, NemesisKind};
use crate::report;
use crate::testbed::{find_rampart_bin, Testbed, TestbedConfig};
use crate::workload::observer::observe;
use crate::workload::register::{RegisterClient, KEYS};

pub struct RunConfig {
    pub workload: String,
    pub nemeses: Vec<NemesisKind>,
    pub time: Duration,
    pub seed: u64,
    pub servers: usize,
    pub clients: usize,
    /// `set`: PRIM's acknowledgement mode (`write`, `durable` or `fsync`).
    pub ack: String,
    /// Reports go to `<out>/<workload>-seed<seed>-<prefix>/`.
    pub out: PathBuf,
}

pub struct RunOutcome {
    pub valid: bool,
    pub report_dir: PathBuf,
    pub summary: String,
    pub verdicts: Vec<Verdict>,
}

/// How long the cluster gets to recover after the last fault is healed, before the
/// final reads.
const RECOVERY: Duration = Duration::from_secs(3);

pub async fn run(config: RunConfig, on_prefix: impl FnOnce(&str)) -> anyhow::Result<RunOutcome> {
    match config.workload.as_str() {
        "register" => run_register(config, on_prefix).await,
        "set" => data_plane::run(config, on_prefix).await,
        other => bail!(
            "unknown workload '{other}': 'register' runs on the Raft cluster state, 'set' on the mirror data plane"
        ),
    }
}

async fn run_register(
    config: RunConfig,
    on_prefix: impl FnOnce(&str),
) -> anyhow::Result<RunOutcome> {
    if config.servers < 3 {
        bail!("a run needs at least 3 servers to keep a majority through faults");
    }
    let testbed = Arc::new(Testbed::create(TestbedConfig {
        servers: config.servers,
        clients: 1,
        rampart_bin: find_rampart_bin()?,
        disk_mib: 64,
    })?);
    on_prefix(&testbed.prefix);
    let report_dir = config.out.join(format!(
        "{}-seed{}-{}",
        config.workload, config.seed, testbed.prefix
    ));
    let http = reqwest::Client::builder()
        .build()
        .context("an HTTP client")?;
    let token = testbed.admin_token();

    testbed.form_cluster(&http).await?;

    let history = Arc::new(History::new());
    let workload_end = tokio::time::Instant::now() + config.time;
    let observer_end = workload_end + RECOVERY + Duration::from_secs(5);
    let observer = tokio::spawn(observe(
        testbed.clone(),
        history.clone(),
        http.clone(),
        token.clone(),
        observer_end,
    ));
    let nemesis = start_nemesis(&config, &testbed, &history);
    let client = |id: u64| RegisterClient {
        id,
        clients: config.clients as u64,
        testbed: testbed.clone(),
        history: history.clone(),
        http: http.clone(),
        token: token.clone(),
    };
    let mut clients = Vec::new();
    for id in 0..config.clients as u64 {
        clients.push(tokio::spawn(client(id).run(config.seed, workload_end)));
    }
    for task in clients {
        task.await?;
    }
    end_nemesis(nemesis, &testbed).await?;

    // Final reads, once healed: every key through a node that answers.
    tokio::time::sleep(RECOVERY).await;
    let reader = client(config.clients as u64 * 1000);
    for key in KEYS {
        let mut read = false;
        for attempt in 0..20 {
            let server = testbed.servers[attempt % testbed.servers.len()].api_addr();
            let process = reader.id + attempt as u64 + 1000 * key.len() as u64;
            reader
                .invoke(&server, process, "read", key, Value::Null)
                .await;
            if history_has_ok_read(&history, process) {
                read = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if !read {
            tracing::warn!(key, "no final read succeeded: the cluster did not recover");
        }
    }
    observer.await?;
    finish(&config, &testbed, &history, report_dir)
}

/// The seeded fault schedule for the run's time, recorded in `history`.
fn start_nemesis(
    config: &RunConfig,
    testbed: &Arc<Testbed>,
    history: &Arc<History>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(nemesis::run_schedule(
        testbed.clone(),
        config.nemeses.clone(),
        StdRng::seed_from_u64(config.seed),
        history.clone(),
        config.time,
    ))
}

/// Waits for the schedule's end, then heals the network even when a fault failed.
async fn end_nemesis(
    nemesis: tokio::task::JoinHandle<anyhow::Result<()>>,
    testbed: &Testbed,
) -> anyhow::Result<()> {
    let result = nemesis.await?;
    nemesis::heal_network(testbed);
    result.context("applying a fault")
}

/// Checks the history, writes the report folder with the nodes' logs.
fn finish(
    config: &RunConfig,
    testbed: &Testbed,
    history: &History,
    report_dir: PathBuf,
) -> anyhow::Result<RunOutcome> {
    let entries = history.entries();
    let verdicts: Vec<Verdict> = checker::for_run(&config.workload)
        .iter()
        .map(|c| c.check(&entries))
        .collect();
    let valid = checker::run_is_valid(&verdicts);
    let title = format!(
        "rampart-jepsen {} · nemesis {} · {} s · seed {} · {}",
        config.workload,
        if config.nemeses.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", config.nemeses).to_lowercase()
        },
        config.time.as_secs(),
        config.seed,
        testbed.prefix
    );
    let summary = report::write(&report_dir, &title, &entries, &verdicts)?;
    testbed.save_logs(&report_dir);
    Ok(RunOutcome {
        valid,
        report_dir,
        summary,
        verdicts,
    })
}

fn history_has_ok_read(history: &History, process: u64) -> bool {
    history.entries().iter().rev().any(|e| {
        matches!(e, crate::history::Entry::Op(op) if op.process == process && op.kind == crate::history::OpKind::Ok)
    })
}
