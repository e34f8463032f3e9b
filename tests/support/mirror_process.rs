//! A `rampart mirror prim|second` process for tests and benchmarks: its JSON event lines
//! are collected with the time they were printed; killed, and its mounts removed, on
//! drop, whether the caller passed or not.
//!
//! Included with `#[path]` by the `tests/mirror*.rs` tests and `benches/mirror/`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct MirrorProcess {
    child: Child,
    /// The mirrored directory: a killed PRIM leaves a dead FUSE mount on it, a killed
    /// SECOND its read-only bind mount.
    dir: PathBuf,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl MirrorProcess {
    /// Runs `rampart mirror ARGS` for `dir`; `log` is its RUST_LOG.
    pub fn spawn(args: &[impl AsRef<OsStr>], dir: &Path, log: &str) -> MirrorProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rampart"))
            .arg("mirror")
            .args(args)
            .env("RUST_LOG", log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rampart mirror");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        MirrorProcess {
            child,
            dir: dir.to_path_buf(),
            lines,
        }
    }

    /// The first event named `event` within `timeout` (earlier events are skipped): when
    /// it was printed, and the event.
    pub fn wait_for(&self, event: &str, timeout: Duration) -> (Instant, serde_json::Value) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {event:?} event within {timeout:?}"));
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
                if value["event"] == event {
                    return (at, value);
                }
            }
        }
    }

    /// The events printed since the last call or wait, without waiting.
    #[allow(
        dead_code,
        reason = "used by tests/mirror_model.rs, not by every includer"
    )]
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| self.lines.try_recv().ok())
            .filter_map(|(_, line)| serde_json::from_str::<serde_json::Value>(&line).ok())
            .filter(|value| value["event"].is_string())
            .collect()
    }

    /// The events it printed that have not been read yet, up to the end of its output
    /// (call after it exited; bounded by `timeout`).
    #[allow(
        dead_code,
        reason = "used by tests/mirror_model.rs, not by every includer"
    )]
    pub fn last_events(&self, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        std::iter::from_fn(|| {
            let left = deadline.saturating_duration_since(Instant::now());
            self.lines.recv_timeout(left).ok()
        })
        .filter_map(|(_, line)| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter(|value| value["event"].is_string())
        .collect()
    }

    /// SIGTERM, then SIGKILL if it has not stopped within 20 s.
    pub fn terminate(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGSTOP: frozen, its sockets open. Never for a PRIM while the caller touches its
    /// mount (the caller would wait on the frozen FUSE server).
    #[allow(dead_code, reason = "not used by every includer")]
    pub fn pause(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// SIGCONT after [`MirrorProcess::pause`].
    #[allow(dead_code, reason = "not used by every includer")]
    pub fn resume(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// SIGKILL, and the mount it left removed.
    pub fn kill(&mut self) {
        self.crash();
        self.remove_mounts();
    }

    /// SIGKILL, leaving its mount behind as a crash does, for the next run to clean up.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lazily unmounts whatever is stacked on the directory (bounded: a few mounts at most).
    fn remove_mounts(&self) {
        for _ in 0..8 {
            let removed = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            if !matches!(removed, Ok(status) if status.success()) {
                return;
            }
        }
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.crash();
        }
        // A crashed process's mounts, or what a later one of the same directory left.
        self.remove_mounts();
    }
}
