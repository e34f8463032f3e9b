//! `rampart demo`: a local cluster of real node processes on 127.0.0.1, for a first
//! look. Everything lives in one folder (configuration, secret, data, logs).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

use super::client::ApiClient;
use super::output;
use crate::api::views::ClusterStatus;
use crate::config::ClusterConfig;
use crate::node::context::admin_token;

/// Marks a folder as made by `rampart demo`, so a later run may wipe it.
const MARKER: &str = ".rampart-demo";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Folder for the demo's configuration, secret, data and logs (wiped if a
    /// previous demo made it).
    #[arg(long, default_value = "/tmp/rampart-demo")]
    pub dir: PathBuf,
    /// First port used; each node takes two (Raft, API).
    #[arg(long, default_value_t = 4810)]
    pub base_port: u16,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub nodes: u8,
    /// Print the status, then stop the cluster (instead of running until Ctrl-C).
    #[arg(long)]
    pub once: bool,
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    prepare_dir(&args.dir)?;
    let config_path = write_config(args)?;
    let config = ClusterConfig::load(&config_path)?;
    let token = admin_token(&config.read_secret().map_err(anyhow::Error::msg)?);
    let exe = std::env::current_exe().context("finding the rampart executable")?;

    let mut children = Vec::new();
    for node in &config.nodes {
        let log = std::fs::File::create(args.dir.join(format!("{}.log", node.name)))
            .context("creating a node log file")?;
        let child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&config_path)
            .arg("--name")
            .arg(&node.name)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {}", node.name))?;
        children.push((node.name.clone(), child));
    }
    let result = bring_up(&config, &token).await;
    match result {
        Ok(status) => {
            print!("{}", output::status_table(&status));
            let first = &config.nodes[0];
            println!(
                "\nThe demo cluster runs from {dir} (configuration, data, and one log per node).\n\
                 Look at it from any node:  {exe} --config {cfg} --name {name} status\n\
                 Its admin API:             http://{api}/v1/cluster (token in {dir}/admin-token)",
                dir = args.dir.display(),
                exe = exe.display(),
                cfg = config_path.display(),
                name = first.name,
                api = first.api_addr(),
            );
            std::fs::write(args.dir.join("admin-token"), format!("{token}\n"))?;
            if !args.once {
                println!("Press Ctrl-C to stop it.");
                wait_for_stop_signal().await?;
            }
            stop(children).await;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            stop(children).await;
            Err(e.context(format!(
                "the demo cluster did not come up; see the logs in {}",
                args.dir.display()
            )))
        }
    }
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let is_demo = dir.join(MARKER).exists();
        let is_empty = std::fs::read_dir(dir)?.next().is_none();
        if is_demo {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the previous demo in {}", dir.display()))?;
        } else if !is_empty {
            bail!(
                "{} exists and was not made by `rampart demo`; choose another --dir",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by rampart demo\n")?;
    Ok(())
}

fn write_config(args: &DemoArgs) -> anyhow::Result<PathBuf> {
    super::write_secret(&args.dir.join("secret"))?;
    let mut nodes = String::new();
    for i in 0..u16::from(args.nodes) {
        let raft = args.base_port + 2 * i;
        nodes.push_str(&format!(
            "      <node name=\"n{n}\" addr=\"127.0.0.1\" raft_port=\"{raft}\" api_port=\"{api}\" data_dir=\"n{n}\"/>\n",
            n = i + 1,
            api = raft + 1,
        ));
    }
    let xml = format!(
        "<cluster>\n  <rampart secret_file=\"secret\"/>\n  <lans>\n    <lan name=\"default\">\n{nodes}    </lan>\n  </lans>\n</cluster>\n"
    );
    let path = args.dir.join("cluster.xml");
    std::fs::write(&path, xml)?;
    Ok(path)
}

/// Waits for every node's API, initializes the cluster, and waits until every member
/// sees the same leader.
async fn bring_up(config: &ClusterConfig, token: &str) -> anyhow::Result<ClusterStatus> {
    let clients: Vec<ApiClient> = config
        .nodes
        .iter()
        .map(|n| ApiClient::new(n.api_addr(), token.to_string()))
        .collect();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for (client, node) in clients.iter().zip(&config.nodes) {
        while client.get::<serde_json::Value>("/health").await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not start", node.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _: ClusterStatus = clients[0].post("/v1/cluster/init", &()).await?;
    loop {
        let mut statuses = Vec::new();
        for client in &clients {
            statuses.push(client.get::<ClusterStatus>("/v1/cluster").await?);
        }
        let leader = statuses[0].leader.clone();
        let agreed = leader.is_some()
            && statuses.iter().all(|s| {
                s.leader == leader
                    && s.members.len() == config.nodes.len()
                    && s.members.iter().all(|m| m.role.is_some())
            });
        if agreed {
            return Ok(statuses.remove(0));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the nodes did not agree on a leader in {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// SIGTERM to every node, then SIGKILL to those still running after 10 s.
async fn stop(children: Vec<(String, Child)>) {
    for (_, child) in &children {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for (name, mut child) in children {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("node {name} ignored SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
    }
}
