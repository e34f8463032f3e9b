//! What the tests running `rampart mirror prim|second` as processes share: a scratch
//! root with both sides' directories and books, spawning each role, `verify` and
//! `estimate`, and the mount table.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::mirror_process::MirrorProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_rampart");

pub struct Setup {
    pub root: tempfile::TempDir,
    pub secret: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        std::fs::create_dir_all("/var/tmp/rampart-mirror-tests").unwrap();
        let root = tempfile::Builder::new()
            .prefix("proc")
            .tempdir_in("/var/tmp/rampart-mirror-tests")
            .unwrap();
        for dir in ["a", "b", "a.book", "b.book"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        let secret = root.path().join("secret");
        std::fs::write(&secret, "mirror process test").unwrap();
        Setup { root, secret }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `rampart mirror ROLE` for node `side`, with the arguments both roles take.
    pub fn spawn(&self, role: &str, side: &str, extra: &[String]) -> MirrorProcess {
        let dir = self.path(side);
        let mut args: Vec<String> = vec![
            role.into(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
            "--book".into(),
            self.path(&format!("{side}.book"))
                .to_string_lossy()
                .into_owned(),
            "--secret-file".into(),
            self.secret.to_string_lossy().into_owned(),
            "--zone-size".into(),
            "65536".into(),
        ];
        args.extend_from_slice(extra);
        MirrorProcess::spawn(&args, &dir, "warn")
    }

    pub fn second(&self, side: &str, port: u16, epoch: u64) -> MirrorProcess {
        let s = self.spawn(
            "second",
            side,
            &[
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--epoch".into(),
                epoch.to_string(),
            ],
        );
        s.wait_for("listening", Duration::from_secs(10));
        s
    }

    pub fn prim(&self, side: &str, port: u16, epoch: u64) -> MirrorProcess {
        let s = self.spawn(
            "prim",
            side,
            &[
                "--peer".into(),
                format!("127.0.0.1:{port}"),
                "--epoch".into(),
                epoch.to_string(),
                "--link-timeout".into(),
                "1s".into(),
            ],
        );
        s.wait_for("mounted", Duration::from_secs(10));
        s
    }

    pub fn verify(&self) -> (bool, String) {
        let out = Command::new(BIN)
            .args(["mirror", "verify"])
            .arg(self.path("a"))
            .arg(self.path("b"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `rampart mirror estimate` on `side`'s book (zones of 64 KiB, as spawned).
    #[allow(dead_code, reason = "used by tests/mirror.rs, not by every includer")]
    pub fn estimate(&self, side: &str) -> serde_json::Value {
        let out = run(Command::new(BIN)
            .args(["mirror", "estimate", "--zone-size", "65536", "--book"])
            .arg(self.path(&format!("{side}.book"))));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("estimate printed {out:?}: {e}"))
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The mounts at `dir` in this process's mount table, by file system type.
#[allow(
    dead_code,
    reason = "used by tests/mirror_restarts.rs, not by every includer"
)]
pub fn mounts_at(dir: &std::path::Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy().replace(' ', "\\040");
    table
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(dir.as_str()))
        .filter_map(|line| Some(line.split_once(" - ")?.1.split(' ').next()?.to_string()))
        .collect()
}

/// Lazily unmounts its directory when dropped, whether the test passed or not.
#[allow(
    dead_code,
    reason = "used by tests/mirror_restarts.rs, not by every includer"
)]
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
