//! A cluster of real `rampart` processes, each server in its own network namespace,
//! joined by a Linux bridge; client hosts in namespaces of their own.
//!
//! Addresses: one /24 of 198.18.0.0/15 per run (servers .1…, clients .101…, the
//! bridge — the runner's own address — .254). Each server's data directory is a small
//! tmpfs of its own, so that a full disk can be simulated for one node. Everything is
//! removed when the [`Testbed`] is dropped; [`sweep::sweep_stale`] removes what a
//! killed run left.

pub mod shell;
pub mod sweep;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::Rng;

use shell::{pids_in, run, run_quiet, signal};

pub const RAFT_PORT: u16 = 4800;
pub const API_PORT: u16 = 4801;
const SECRET: &str = "rampart-jepsen-cluster-secret-0123456789";

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Network namespace name.
    pub ns: String,
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub host: Host,
    /// A tmpfs of its own.
    pub data_dir: PathBuf,
}

impl Server {
    pub fn api_addr(&self) -> String {
        format!("{}:{API_PORT}", self.host.addr)
    }
    pub fn raft_addr(&self) -> String {
        format!("{}:{RAFT_PORT}", self.host.addr)
    }
}

pub struct TestbedConfig {
    pub servers: usize,
    pub clients: usize,
    pub rampart_bin: PathBuf,
    /// Size of each server's data filesystem, MiB.
    pub disk_mib: u32,
}

pub struct Testbed {
    /// `rjXXXX`: starts the name of every namespace and link of this run.
    pub prefix: String,
    pub dir: PathBuf,
    pub bridge: String,
    pub servers: Vec<Server>,
    pub clients: Vec<Host>,
    rampart_bin: PathBuf,
    config_path: PathBuf,
    /// Running node processes by server name.
    processes: Mutex<BTreeMap<String, Child>>,
    /// What a server runs instead of `rampart node` (see [`Testbed::set_command`]).
    commands: Mutex<BTreeMap<String, Vec<String>>>,
    /// Where each server's log stood when its process last started.
    log_starts: Mutex<BTreeMap<String, u64>>,
}

/// Finds the `rampart` binary: `RAMPART_BIN`, else next to (or one folder above) the
/// running executable, as cargo lays out `target/<profile>/` and its `deps/`.
pub fn find_rampart_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("RAMPART_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("rampart");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the rampart binary near {}; build it or set RAMPART_BIN",
        exe.display()
    )
}

impl Testbed {
    /// Builds the network and the data filesystems; starts no node.
    pub fn create(config: TestbedConfig) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the testbed needs root (network namespaces, bridges, mounts)");
        }
        sweep::sweep_stale();
        let mut rng = rand::thread_rng();
        let prefix = format!("rj{:04x}", rng.gen::<u16>());
        let subnet = free_subnet(&mut rng)?;
        let dir = PathBuf::from(sweep::RUN_ROOT).join(&prefix);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;
        let mut testbed = Testbed {
            bridge: format!("{prefix}br"),
            prefix: prefix.clone(),
            dir: dir.clone(),
            servers: Vec::new(),
            clients: Vec::new(),
            rampart_bin: config.rampart_bin.clone(),
            config_path: dir.join("cluster.xml"),
            processes: Mutex::new(BTreeMap::new()),
            commands: Mutex::new(BTreeMap::new()),
            log_starts: Mutex::new(BTreeMap::new()),
        };
        // From here on, Drop cleans up whatever was made, even on error.
        testbed.build(config, subnet)?;
        Ok(testbed)
    }

    fn build(&mut self, config: TestbedConfig, subnet: [u8; 3]) -> anyhow::Result<()> {
        let address = |last: u8| Ipv4Addr::new(subnet[0], subnet[1], subnet[2], last);
        run("ip", &["link", "add", &self.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", address(254)),
                "dev",
                &self.bridge,
            ],
        )?;
        run("ip", &["link", "set", &self.bridge, "up"])?;
        for i in 0..config.servers {
            let host = self.add_host(&format!("n{}", i + 1), address(1 + i as u8))?;
            let data_dir = self.dir.join(&host.name);
            std::fs::create_dir_all(&data_dir)?;
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={}m", config.disk_mib),
                    "tmpfs",
                    &data_dir.to_string_lossy(),
                ],
            )?;
            self.servers.push(Server { host, data_dir });
        }
        for i in 0..config.clients {
            let host = self.add_host(&format!("c{}", i + 1), address(101 + i as u8))?;
            self.clients.push(host);
        }
        std::fs::write(self.dir.join("secret"), SECRET)?;
        std::fs::write(&self.config_path, self.cluster_xml())?;
        Ok(())
    }

    fn add_host(&self, name: &str, addr: Ipv4Addr) -> anyhow::Result<Host> {
        let ns = format!("{}-{name}", self.prefix);
        let outside = format!("{}{name}", self.prefix);
        let inside = format!("{}{name}i", self.prefix);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &outside, "master", &self.bridge, "up"],
        )?;
        run("ip", &["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Host {
            name: name.to_string(),
            ns,
            addr,
        })
    }

    fn cluster_xml(&self) -> String {
        let nodes: String = self
            .servers
            .iter()
            .map(|s| {
                format!(
                    "      <node name=\"{}\" addr=\"{}\" data_dir=\"{}\"/>\n",
                    s.host.name,
                    s.host.addr,
                    s.data_dir.display()
                )
            })
            .collect();
        format!(
            "<cluster>\n  <rampart secret_file=\"secret\" raft_port=\"{RAFT_PORT}\" api_port=\"{API_PORT}\" snapshot_every_entries=\"200\"/>\n  <lans>\n    <lan name=\"default\">\n{nodes}    </lan>\n  </lans>\n</cluster>\n"
        )
    }

    pub fn admin_token(&self) -> String {
        rampart::node::context::admin_token(SECRET.as_bytes())
    }

    pub fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .find(|s| s.host.name == name)
            .expect("a server of this testbed")
    }

    /// From now on, server `name` runs `rampart <args>` instead of its cluster node
    /// (the mirror data plane's roles run without a cluster).
    pub fn set_command(&self, name: &str, args: Vec<String>) {
        self.commands
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), args);
    }

    /// Starts the process of server `name` (its node, or what [`Testbed::set_command`]
    /// gave it) in its network namespace, appending to its log. It shares the runner's
    /// mount namespace (`nsenter --net`, where `ip netns exec` would make one of its
    /// own), so that a FUSE mount it makes is where the runner's clients can reach it.
    pub fn start_node(&self, name: &str) -> anyhow::Result<()> {
        let server = self.server(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let args = match self.commands.lock().expect("not poisoned").get(name) {
            Some(args) => args.clone(),
            None => vec![
                "node".into(),
                "--config".into(),
                self.config_path.to_string_lossy().into_owned(),
                "--name".into(),
                name.into(),
            ],
        };
        self.log_starts
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), log.metadata()?.len());
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", server.host.ns))
            .arg("--")
            .arg(&self.rampart_bin)
            .args(&args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.processes
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), child);
        Ok(())
    }

    /// What server `name`'s current process has logged so far.
    pub fn log_since_start(&self, name: &str) -> String {
        let start = self
            .log_starts
            .lock()
            .expect("not poisoned")
            .get(name)
            .copied();
        let log = std::fs::read(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let from = (start.unwrap_or(0) as usize).min(log.len());
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// kill -9 of the node and everything it started (all processes in its namespace).
    pub fn kill_node(&self, name: &str) {
        // Its own process first, by pid (see `pause_node`): once it is gone, nothing
        // waits on its mount and listing the namespace is safe.
        if let Some(child) = self.processes.lock().expect("not poisoned").get(name) {
            signal(child.id() as i32, libc::SIGCONT);
            signal(child.id() as i32, libc::SIGKILL);
        }
        for pid in pids_in(&self.server(name).host.ns) {
            signal(pid, libc::SIGKILL);
        }
        if let Some(mut child) = self.processes.lock().expect("not poisoned").remove(name) {
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns whether it exited
    /// with status 0 (a node that does not exit in time is killed).
    pub fn stop_node(&self, name: &str, timeout: Duration) -> bool {
        let Some(mut child) = self.processes.lock().expect("not poisoned").remove(name) else {
            return false;
        };
        signal(child.id() as i32, libc::SIGTERM);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if std::time::Instant::now() > deadline {
                self.kill_node(name);
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` on the node's admin API with the admin token, as JSON.
    pub async fn api_get<T: serde::de::DeserializeOwned>(
        &self,
        http: &reqwest::Client,
        name: &str,
        path: &str,
    ) -> anyhow::Result<T> {
        let url = format!("http://{}{path}", self.server(name).api_addr());
        let response = http
            .get(&url)
            .bearer_auth(self.admin_token())
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "GET {url}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response.json().await?)
    }

    /// Starts every node, waits for their APIs and initializes the cluster.
    pub async fn form_cluster(&self, http: &reqwest::Client) -> anyhow::Result<()> {
        for server in &self.servers {
            self.start_node(&server.host.name)?;
        }
        self.wait_for_apis(http, Duration::from_secs(20)).await?;
        let init = http
            .post(format!(
                "http://{}/v1/cluster/init",
                self.servers[0].api_addr()
            ))
            .bearer_auth(self.admin_token())
            .send()
            .await?;
        if !init.status().is_success() {
            bail!(
                "cluster init failed: {}",
                init.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// SIGSTOP (`pause`) or SIGCONT the node's process (`nsenter` execs it, so the
    /// child's pid is the node's). Signalled by pid, not by listing the namespace:
    /// while a FUSE server is stopped, reading /proc of a process waiting on its mount
    /// blocks, and `ip netns pids` reads every process's /proc entries.
    pub fn pause_node(&self, name: &str, pause: bool) {
        let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        if let Some(child) = self.processes.lock().expect("not poisoned").get(name) {
            signal(child.id() as i32, sig);
        }
    }

    pub fn is_running(&self, name: &str) -> bool {
        let mut processes = self.processes.lock().expect("not poisoned");
        match processes.get_mut(name) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs a command inside host `ns` and returns its output.
    pub fn exec(&self, ns: &str, command: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Path of the run's cluster.xml.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Copies the node logs into `dest`.
    pub fn save_logs(&self, dest: &Path) {
        for server in &self.servers {
            let name = format!("{}.log", server.host.name);
            let _ = std::fs::copy(self.dir.join(&name), dest.join(&name));
        }
    }

    /// Waits (bounded) for every node's API to answer.
    pub async fn wait_for_apis(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for server in &self.servers {
            let url = format!("http://{}/health", server.api_addr());
            while http.get(&url).send().await.is_err() {
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "node {} did not serve its API within {timeout:?}",
                        server.host.name
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for server in &self.servers {
            // Resume first: a stopped process cannot die of SIGKILL until continued on
            // some kernels' accounting, and its namespace must empty.
            self.pause_node(&server.host.name, false);
        }
        let names: Vec<String> = self.servers.iter().map(|s| s.host.name.clone()).collect();
        for name in names {
            self.kill_node(&name);
        }
        run_quiet("ip", &["link", "del", &self.bridge]);
        sweep::remove_prefix(&self.prefix);
    }
}

/// A /24 of 198.18.0.0/15 that no route on this machine uses yet.
fn free_subnet(rng: &mut impl Rng) -> anyhow::Result<[u8; 3]> {
    let routes = run("ip", &["-4", "route", "show"])?;
    for _ in 0..64 {
        let second = if rng.gen::<bool>() { 18 } else { 19 };
        let third: u8 = rng.gen();
        let candidate = format!("198.{second}.{third}.");
        if !routes.contains(&candidate) {
            return Ok([198, second, third]);
        }
    }
    bail!("no free /24 in 198.18.0.0/15")
}
