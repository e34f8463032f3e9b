//! A cluster of real `rampart` node processes on 127.0.0.1, for integration tests.
//!
//! Every node runs the binary under test with its own data directory in a temporary
//! folder. Dropping the cluster kills every process it started and removes the folder,
//! whether the test passed or not.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rampart::api::views::ClusterStatus;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_rampart");
/// Small, so that tests see snapshots built, log purged and snapshots sent.
pub const SNAPSHOT_EVERY: u64 = 20;
pub const SECRET: &str = "integration-test-secret-0123456789";

/// Ports that were free a moment ago (bound to port 0, then released).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub raft_port: u16,
    pub api_port: u16,
}

impl NodeSpec {
    pub fn raft_addr(&self) -> String {
        format!("127.0.0.1:{}", self.raft_port)
    }
    pub fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub specs: Vec<NodeSpec>,
    processes: Vec<(String, Child)>,
    pub http: reqwest::Client,
}

impl TestCluster {
    /// Plans `count` nodes named n1..; nothing runs yet.
    pub fn new(count: usize) -> Self {
        let ports = free_ports(2 * count);
        let specs = (0..count)
            .map(|i| NodeSpec {
                name: format!("n{}", i + 1),
                raft_port: ports[2 * i],
                api_port: ports[2 * i + 1],
            })
            .collect();
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(
            dir.path().join("wrong-secret"),
            "another-secret-entirely-9876543210",
        )
        .unwrap();
        TestCluster {
            dir,
            specs,
            processes: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(40))
                .build()
                .unwrap(),
        }
    }

    /// Writes a cluster.xml listing the first `members` nodes; returns its path.
    pub fn write_config(&self, file: &str, members: usize, secret_file: &str) -> PathBuf {
        let mut nodes = String::new();
        for spec in &self.specs[..members] {
            nodes.push_str(&format!(
                "<node name=\"{}\" addr=\"127.0.0.1\" raft_port=\"{}\" api_port=\"{}\" data_dir=\"data-{}\"/>\n",
                spec.name, spec.raft_port, spec.api_port, spec.name
            ));
        }
        let xml = format!(
            "<cluster>\n<rampart secret_file=\"{secret_file}\" snapshot_every_entries=\"{SNAPSHOT_EVERY}\"/>\n<lans><lan name=\"default\">\n{nodes}</lan></lans>\n</cluster>\n"
        );
        let path = self.dir.path().join(file);
        std::fs::write(&path, xml).unwrap();
        path
    }

    pub fn admin_token(&self) -> String {
        rampart::node::context::admin_token(SECRET.as_bytes())
    }

    /// Starts node `name` with the given cluster.xml and waits for its API.
    pub async fn start(&mut self, name: &str, config: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(BIN)
            .args(["node", "--config"])
            .arg(config)
            .args(["--name", name])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the rampart binary starts");
        self.processes.push((name.to_string(), child));
        let spec = self.spec(name).clone();
        wait_until(
            Duration::from_secs(15),
            &format!("{name} serves its API"),
            || async {
                self.http
                    .get(format!("http://{}/health", spec.api_addr()))
                    .send()
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    pub fn spec(&self, name: &str) -> &NodeSpec {
        self.specs
            .iter()
            .find(|s| s.name == name)
            .expect("a planned node")
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// The running process of node `name`, no longer tracked.
    fn take_process(&mut self, name: &str) -> Child {
        let index = self
            .processes
            .iter()
            .position(|(n, _)| n == name)
            .expect("a running node");
        self.processes.remove(index).1
    }

    /// kill -9, and reap.
    pub fn kill(&mut self, name: &str) {
        let mut child = self.take_process(name);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and wait for a clean exit; returns whether it exited with status 0.
    pub fn terminate(&mut self, name: &str) -> bool {
        let mut child = self.take_process(name);
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, name: &str, path: &str) -> String {
        format!("http://{}{path}", self.spec(name).api_addr())
    }

    /// GET with the admin token; panics on a non-2xx answer.
    pub async fn get<T: DeserializeOwned>(&self, name: &str, path: &str) -> T {
        let response = self
            .http
            .get(self.url(name, path))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "GET {path} on {name}: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// POST with the admin token; returns the status code and JSON body.
    pub async fn post(&self, name: &str, path: &str, body: Value) -> (u16, Value) {
        self.answer(self.http.post(self.url(name, path)).json(&body))
            .await
    }

    /// DELETE with the admin token; returns the status code and JSON body.
    pub async fn delete(&self, name: &str, path: &str) -> (u16, Value) {
        self.answer(self.http.delete(self.url(name, path))).await
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The node's Prometheus text.
    pub async fn metrics(&self, name: &str) -> String {
        self.http
            .get(self.url(name, "/metrics"))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn status(&self, name: &str) -> ClusterStatus {
        self.get(name, "/v1/cluster").await
    }

    /// Waits until every named node reports the same leader and exactly `members` as
    /// voters (each with a committed record); returns the leader's name.
    pub async fn wait_for_agreement(&self, nodes: &[&str], members: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(leader) = self.agreed_leader(nodes, members).await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "{nodes:?} did not agree on members {members:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agreed_leader(&self, nodes: &[&str], members: &[&str]) -> Option<String> {
        let mut expected: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        expected.sort();
        let mut leaders = Vec::new();
        for node in nodes {
            let response = self
                .http
                .get(self.url(node, "/v1/cluster"))
                .bearer_auth(self.admin_token())
                .send()
                .await
                .ok()?;
            let status: ClusterStatus = response.json().await.ok()?;
            let voters: Vec<String> = status
                .members
                .iter()
                .filter(|m| m.voter)
                .map(|m| m.name.clone())
                .collect();
            if voters != expected || status.members.iter().any(|m| m.role.is_none()) {
                return None;
            }
            leaders.push(status.leader?);
        }
        let first = leaders.first()?.clone();
        leaders.iter().all(|l| *l == first).then_some(first)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test visible in its output.
            for spec in &self.specs {
                if let Ok(log) =
                    std::fs::read_to_string(self.dir.path().join(format!("{}.log", spec.name)))
                {
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    eprintln!("---- last lines of {} ----", spec.name);
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
}

/// Polls `check` every 50 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a gauge in Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// True when nothing listens on the port any more.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}
