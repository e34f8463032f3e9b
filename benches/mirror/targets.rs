//! Where the benchmark writes: the baselines (set up by `benches/baselines.sh`) and a
//! pair of `rampart mirror` processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::mirror_process::MirrorProcess;
use crate::ROOT;

/// A place to write: one directory, or two for `native-two`; torn down on drop.
pub struct Target {
    pub name: &'static str,
    pub dirs: Vec<PathBuf>,
    /// Not part of the sequential and read workloads (too slow by design).
    pub latency_only: bool,
    teardown: Teardown,
}

enum Teardown {
    Nothing,
    Script(Vec<String>),
    Mirror(MirrorPair),
}

impl Drop for Target {
    fn drop(&mut self) {
        match &mut self.teardown {
            Teardown::Nothing => {}
            Teardown::Script(args) => {
                let _ = Command::new("bash").args(args.iter()).status();
            }
            Teardown::Mirror(pair) => pair.stop(),
        }
    }
}

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baselines.sh").to_string()
}

fn run_script(args: &[&str]) {
    let status = Command::new("bash")
        .arg(script())
        .args(args)
        .status()
        .expect("run baselines.sh");
    assert!(status.success(), "baselines.sh {args:?} failed");
}

pub fn targets() -> Vec<Target> {
    let dir = |name: &str| {
        let path = Path::new(ROOT).join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    };
    let mut targets = vec![
        Target {
            name: "native",
            dirs: vec![dir("native")],
            latency_only: false,
            teardown: Teardown::Nothing,
        },
        Target {
            name: "native-two",
            dirs: vec![dir("native-two/1"), dir("native-two/2")],
            latency_only: false,
            teardown: Teardown::Nothing,
        },
    ];
    let (base, mount) = (format!("{ROOT}/gluster"), format!("{ROOT}/gluster-mnt"));
    run_script(&["gluster-up", &base, &mount]);
    targets.push(Target {
        name: "glusterfs-r2",
        dirs: vec![PathBuf::from(&mount)],
        latency_only: false,
        teardown: Teardown::Script(vec![script(), "gluster-down".into(), base, mount]),
    });
    let (source, mount) = (dir("bindfs-src"), format!("{ROOT}/bindfs"));
    run_script(&["bindfs-up", source.to_str().unwrap(), &mount]);
    targets.push(Target {
        name: "bindfs",
        dirs: vec![PathBuf::from(&mount)],
        latency_only: false,
        teardown: Teardown::Script(vec![script(), "bindfs-down".into(), mount]),
    });
    for (name, ack, latency_only) in [
        ("rampart-write", "write", false),
        ("rampart-durable", "durable", true),
    ] {
        let mut pair = MirrorPair::new(&dir(name), ack);
        pair.start();
        targets.push(Target {
            name,
            dirs: vec![pair.prim_dir()],
            latency_only,
            teardown: Teardown::Mirror(pair),
        });
    }
    targets
}

/// PRIM on `<root>/a`, SECOND on `<root>/b`, books beside them, on loopback.
pub struct MirrorPair {
    pub root: PathBuf,
    pub ack: String,
    pub port: u16,
    pub prim: Option<MirrorProcess>,
    pub second: Option<MirrorProcess>,
}

impl MirrorPair {
    /// Directories, books and secret; nothing runs yet.
    pub fn new(root: &Path, ack: &str) -> MirrorPair {
        for sub in ["a", "b", "a.book", "b.book"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::write(root.join("secret"), "rampart benchmark").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        MirrorPair {
            root: root.to_path_buf(),
            ack: ack.to_string(),
            port,
            prim: None,
            second: None,
        }
    }

    /// Starts both sides and waits until they are in step.
    pub fn start(&mut self) {
        self.start_second();
        self.start_prim();
        self.prim().wait_for("synced", Duration::from_secs(600));
    }

    pub fn common(&self, side: &str) -> Vec<String> {
        let path = |name: &str| self.root.join(name).to_string_lossy().into_owned();
        vec![
            "--dir".into(),
            path(side),
            "--book".into(),
            path(&format!("{side}.book")),
            "--secret-file".into(),
            path("secret"),
            "--ack".into(),
            self.ack.clone(),
        ]
    }

    pub fn start_second(&mut self) {
        let mut args = vec!["second".to_string()];
        args.extend(self.common("b"));
        args.extend(["--listen".into(), format!("127.0.0.1:{}", self.port)]);
        let side = MirrorProcess::spawn(&args, &self.root.join("b"), "error");
        side.wait_for("listening", Duration::from_secs(30));
        self.second = Some(side);
    }

    pub fn start_prim(&mut self) {
        let mut args = vec!["prim".to_string()];
        args.extend(self.common("a"));
        args.extend([
            "--peer".into(),
            format!("127.0.0.1:{}", self.port),
            "--epoch".into(),
            "1".into(),
        ]);
        let side = MirrorProcess::spawn(&args, &self.root.join("a"), "error");
        side.wait_for("mounted", Duration::from_secs(30));
        self.prim = Some(side);
    }

    pub fn prim(&self) -> &MirrorProcess {
        self.prim.as_ref().expect("PRIM runs")
    }

    pub fn prim_dir(&self) -> PathBuf {
        self.root.join("a")
    }

    pub fn stop(&mut self) {
        if let Some(mut prim) = self.prim.take() {
            prim.terminate();
        }
        if let Some(mut second) = self.second.take() {
            second.terminate();
        }
    }
}
