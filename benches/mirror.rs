//! The mirror data plane against its baselines, all measured in the same run on the
//! same filesystem (/var/tmp), with the runs of the different targets alternated
//! because the disk here is noisy. Every figure is reported with its ratio to the
//! baselines.
//!
//! Targets: `native` (one copy), `native-two` (every write done to two files: the least
//! work a replica pair on one machine can do), `glusterfs-r2` (a GlusterFS replica-2
//! volume through its FUSE client, both bricks on this machine), `bindfs` (plain FUSE
//! passthrough, no replication) and `rampart-write` / `rampart-durable` (`rampart
//! mirror prim|second` processes on loopback, in that acknowledgement mode).
//!
//! Workloads: sequential 1 MiB writes of a 1 GiB file then fsync; a sequential read of
//! that file after dropping the page cache; 4 KiB random writes each followed by
//! fdatasync (p50, p99); reintegration of a 100,000-file tree after 1 % of it changed,
//! against rsync of the same trees and a plain copy of the changed files.
//!
//! Run as root: `cargo bench --bench mirror` (`-- --quick` for a short run).
//! The baselines need glusterfs-server, bindfs and rsync (`./dev bench` installs them).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");
const ROOT: &str = "/var/tmp/rampart-bench";
const MIB: usize = 1 << 20;

struct Plan {
    rounds: usize,
    seq_bytes: usize,
    latency_ops: usize,
    tree_files: usize,
    reintegration_rounds: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            rounds: 5,
            seq_bytes: 1 << 30,
            latency_ops: 2000,
            tree_files: 100_000,
            reintegration_rounds: 2,
        }
    }

    fn quick() -> Plan {
        Plan {
            rounds: 1,
            seq_bytes: 256 << 20,
            latency_ops: 300,
            tree_files: 10_000,
            reintegration_rounds: 1,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; anything else we do not know is a mistake.
    for arg in &args[1..] {
        if !["--bench", "--quick"].contains(&arg.as_str()) {
            eprintln!("unknown argument {arg:?}; usage: cargo bench --bench mirror [-- --quick]");
            std::process::exit(2);
        }
    }
    let plan = if args.iter().any(|a| a == "--quick") {
        Plan::quick()
    } else {
        Plan::full()
    };
    if !is_root() {
        eprintln!("the mirror benchmark mounts file systems: run it as root");
        std::process::exit(2);
    }
    let _ = std::fs::remove_dir_all(ROOT);
    std::fs::create_dir_all(ROOT).expect("create the benchmark directory");
    let started = Instant::now();
    println!("mirror data plane, {} round(s), alternated\n", plan.rounds);
    data_path(&plan);
    reintegration(&plan);
    println!("\ntotal {:.0} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(ROOT);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---- targets ------------------------------------------------------------------------

/// A place to write: one directory, or two for `native-two`; torn down on drop.
struct Target {
    name: &'static str,
    dirs: Vec<PathBuf>,
    /// Not part of the sequential and read workloads (too slow by design).
    latency_only: bool,
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

fn targets() -> Vec<Target> {
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

// ---- rampart mirror processes -------------------------------------------------------

/// A `rampart mirror` process whose JSON event lines are collected with their time.
struct Side {
    child: Child,
    dir: PathBuf,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Side {
    fn spawn(args: &[String], dir: &Path) -> Side {
        let mut child = Command::new(BIN)
            .arg("mirror")
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn rampart mirror");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
        Side {
            child,
            dir: dir.to_path_buf(),
            lines,
        }
    }

    /// The first event named `event` within `timeout`: when it was printed, and it.
    fn wait_for(&self, event: &str, timeout: Duration) -> (Instant, serde_json::Value) {
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

    fn terminate(&mut self) {
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

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// PRIM on `<root>/a`, SECOND on `<root>/b`, books beside them, on loopback.
struct MirrorPair {
    root: PathBuf,
    ack: String,
    port: u16,
    prim: Option<Side>,
    second: Option<Side>,
}

impl MirrorPair {
    /// Directories, books and secret; nothing runs yet.
    fn new(root: &Path, ack: &str) -> MirrorPair {
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
    fn start(&mut self) {
        self.start_second();
        self.start_prim();
        self.prim().wait_for("synced", Duration::from_secs(600));
    }

    fn common(&self, side: &str) -> Vec<String> {
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

    fn start_second(&mut self) {
        let mut args = vec!["second".to_string()];
        args.extend(self.common("b"));
        args.extend(["--listen".into(), format!("127.0.0.1:{}", self.port)]);
        let side = Side::spawn(&args, &self.root.join("b"));
        side.wait_for("listening", Duration::from_secs(30));
        self.second = Some(side);
    }

    fn start_prim(&mut self) {
        let mut args = vec!["prim".to_string()];
        args.extend(self.common("a"));
        args.extend([
            "--peer".into(),
            format!("127.0.0.1:{}", self.port),
            "--epoch".into(),
            "1".into(),
        ]);
        let side = Side::spawn(&args, &self.root.join("a"));
        side.wait_for("mounted", Duration::from_secs(30));
        self.prim = Some(side);
    }

    fn prim(&self) -> &Side {
        self.prim.as_ref().expect("PRIM runs")
    }

    fn prim_dir(&self) -> PathBuf {
        self.root.join("a")
    }

    fn stop(&mut self) {
        if let Some(mut prim) = self.prim.take() {
            prim.terminate();
        }
        if let Some(mut second) = self.second.take() {
            second.terminate();
        }
    }
}

// ---- data path ----------------------------------------------------------------------

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Incompressible bytes, the same in every run.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes `bytes` in 1 MiB writes to `seq` in every directory, then fsyncs: MB/s.
fn sequential_write(dirs: &[PathBuf], bytes: usize, block: &[u8]) -> f64 {
    let started = Instant::now();
    let mut files: Vec<File> = dirs
        .iter()
        .map(|d| File::create(d.join("seq")).expect("create seq"))
        .collect();
    for _ in 0..bytes / block.len() {
        for file in &mut files {
            file.write_all(block).expect("write");
        }
    }
    for file in &files {
        file.sync_all().expect("fsync");
    }
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Reads `seq` of the first directory in 1 MiB reads: MB/s.
fn cold_read(dir: &Path) -> f64 {
    drop_caches();
    let started = Instant::now();
    let mut file = File::open(dir.join("seq")).expect("open seq");
    let mut buf = vec![0u8; MIB];
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    total as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// `ops` random 4 KiB writes into a 64 MiB file, each followed by fdatasync (in every
/// directory): the latency of each pair, sorted.
fn sync_latencies(dirs: &[PathBuf], ops: usize, seed: u64) -> Vec<Duration> {
    const SPAN: u64 = 64 << 20;
    let files: Vec<File> = dirs
        .iter()
        .map(|d| {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(d.join("lat"))
                .expect("create lat");
            let zeros = vec![0u8; MIB];
            for i in 0..SPAN / MIB as u64 {
                file.write_all_at(&zeros, i * MIB as u64).expect("fill lat");
            }
            file.sync_all().expect("fsync lat");
            file
        })
        .collect();
    let block = pattern(4096, seed);
    let mut state = seed | 1;
    let mut latencies = Vec::with_capacity(ops);
    for _ in 0..ops {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 16) % (SPAN / 4096) * 4096;
        let started = Instant::now();
        for file in &files {
            file.write_all_at(&block, offset).expect("write");
            file.sync_data().expect("fdatasync");
        }
        latencies.push(started.elapsed());
    }
    for dir in dirs {
        let _ = std::fs::remove_file(dir.join("lat"));
    }
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

struct Figures {
    write: Vec<f64>,
    read: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

fn data_path(plan: &Plan) {
    let targets = targets();
    let mut figures: Vec<Figures> = targets
        .iter()
        .map(|_| Figures {
            write: Vec::new(),
            read: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
        })
        .collect();
    let block = pattern(MIB, 7);
    for round in 0..plan.rounds {
        // Alternate the order too, so no target always follows the same neighbour.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for &i in &order {
            let target = &targets[i];
            if !target.latency_only {
                drop_caches();
                figures[i]
                    .write
                    .push(sequential_write(&target.dirs, plan.seq_bytes, &block));
                if target.name != "native-two" {
                    figures[i].read.push(cold_read(&target.dirs[0]));
                }
                for dir in &target.dirs {
                    std::fs::remove_file(dir.join("seq")).expect("remove seq");
                }
            }
            drop_caches();
            let latencies = sync_latencies(&target.dirs, plan.latency_ops, round as u64 + 1);
            figures[i]
                .p50
                .push(percentile(&latencies, 0.5).as_secs_f64() * 1e6);
            figures[i]
                .p99
                .push(percentile(&latencies, 0.99).as_secs_f64() * 1e6);
        }
        println!("round {} of {} done", round + 1, plan.rounds);
    }
    let find = |name: &str| targets.iter().position(|t| t.name == name).unwrap();
    let (native, two, gluster, rampart) = (
        find("native"),
        find("native-two"),
        find("glusterfs-r2"),
        find("rampart-write"),
    );

    println!(
        "\nsequential write: {} MiB in 1 MiB writes, then fsync (MB/s, median; every run)",
        plan.seq_bytes / MIB
    );
    for (target, f) in targets.iter().zip(&figures) {
        if !f.write.is_empty() {
            println!(
                "  {:<16} {:>7.0}   {}",
                target.name,
                median(&f.write),
                runs(&f.write)
            );
        }
    }
    let w = |i: usize| median(&figures[i].write);
    println!(
        "  rampart-write / glusterfs-r2 = {:.2} (target >= 2)   / native-two = {:.2} (target >= 0.5)   / native = {:.2}",
        w(rampart) / w(gluster),
        w(rampart) / w(two),
        w(rampart) / w(native)
    );

    println!("\ncold sequential read of that file (MB/s, median; every run)");
    for (target, f) in targets.iter().zip(&figures) {
        if !f.read.is_empty() {
            println!(
                "  {:<16} {:>7.0}   {}",
                target.name,
                median(&f.read),
                runs(&f.read)
            );
        }
    }
    let r = |i: usize| median(&figures[i].read);
    println!(
        "  rampart-write / native = {:.2} (target >= 0.9; FUSE passthrough)",
        r(rampart) / r(native)
    );

    println!(
        "\n4 KiB random write + fdatasync, {} per round (µs; median over rounds of p50 and p99)",
        plan.latency_ops
    );
    for (target, f) in targets.iter().zip(&figures) {
        println!(
            "  {:<16} p50 {:>7.0}   p99 {:>7.0}",
            target.name,
            median(&f.p50),
            median(&f.p99)
        );
    }
    let p50 = |i: usize| median(&figures[i].p50);
    println!(
        "  rampart-write p50 - native p50 = {:.0} µs (target <= 200)   rampart-write / glusterfs-r2 p50 = {:.2}",
        p50(rampart) - p50(native),
        p50(rampart) / p50(gluster)
    );
    let durable = find("rampart-durable");
    println!(
        "  rampart-durable p50 - native p50 = {:.0} µs",
        p50(durable) - p50(native)
    );
    drop(targets);
}

fn runs(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- reintegration ------------------------------------------------------------------

/// Size of tree file `i`: 1 to 16 KiB.
fn tree_file_size(i: usize) -> usize {
    1024 * (1 + (i.wrapping_mul(2654435761) >> 7) % 16)
}

fn tree_file(root: &Path, i: usize) -> PathBuf {
    root.join(format!("d{:03}/f{i:06}", i % 100))
}

fn write_tree(roots: &[PathBuf], files: usize) {
    for root in roots {
        for d in 0..100 {
            std::fs::create_dir_all(root.join(format!("d{d:03}"))).unwrap();
        }
    }
    let content = pattern(16 << 10, 11);
    for i in 0..files {
        let size = tree_file_size(i);
        let start = i % 1024;
        let data = [&content[start..], &content[..start]].concat();
        for root in roots {
            std::fs::write(tree_file(root, i), &data[..size]).unwrap();
        }
    }
}

/// The files changed in round `round`: 1 % of the tree, spread over every directory.
fn changed_files(files: usize, round: usize) -> Vec<usize> {
    (0..files / 100).map(|k| k * 100 + 37 + round).collect()
}

fn reintegration(plan: &Plan) {
    let root = Path::new(ROOT).join("reintegration");
    for sub in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let started = Instant::now();
    write_tree(
        &[root.join("a"), root.join("b"), root.join("c")],
        plan.tree_files,
    );
    println!(
        "\nreintegration: {} files in 100 directories, 1 to 16 KiB each (three copies written in {:.0} s)",
        plan.tree_files,
        started.elapsed().as_secs_f64()
    );

    // Both copies equal, no sync point: a full comparison that sends nothing.
    drop_caches();
    let mut pair = MirrorPair::new(&root, "write");
    pair.start_second();
    pair.start_prim();
    let (connected, _) = pair
        .prim()
        .wait_for("peer_connected", Duration::from_secs(60));
    let (synced, event) = pair.prim().wait_for("synced", Duration::from_secs(1800));
    println!(
        "  full comparison of equal trees (no sync point): {:.2} s, {} examined, {} bytes sent",
        (synced - connected).as_secs_f64(),
        event["examined"],
        event["bytes_sent"]
    );

    for round in 0..plan.reintegration_rounds {
        // SECOND leaves; 1 % of the files change on PRIM.
        pair.second.take().unwrap().terminate();
        pair.prim().wait_for("peer_lost", Duration::from_secs(60));
        let changed = changed_files(plan.tree_files, round);
        let mut changed_bytes = 0;
        for &i in &changed {
            let size = tree_file_size(i);
            changed_bytes += size;
            std::fs::write(
                tree_file(&pair.prim_dir(), i),
                pattern(size, (round * 1_000_000 + i) as u64),
            )
            .unwrap();
        }

        // SECOND returns: incremental reintegration.
        drop_caches();
        pair.start_second();
        let (connected, _) = pair
            .prim()
            .wait_for("peer_connected", Duration::from_secs(60));
        let (synced, event) = pair.prim().wait_for("synced", Duration::from_secs(600));
        let reintegration = (synced - connected).as_secs_f64();
        pair.stop();

        // rsync from the same changed tree into a copy of the tree before the change.
        drop_caches();
        let rsync_started = Instant::now();
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats"])
            .arg(format!("{}/", root.join("a").display()))
            .arg(format!("{}/", root.join("c").display()))
            .output()
            .expect("run rsync");
        let _ = Command::new("sync").arg("-f").arg(root.join("c")).status();
        let rsync = rsync_started.elapsed().as_secs_f64();
        assert!(out.status.success(), "rsync failed");
        let stats = String::from_utf8_lossy(&out.stdout);
        let stat = |label: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .map(|v| v.trim().split(' ').next().unwrap_or("").replace(',', ""))
                .unwrap_or_default()
        };

        // The least any method must do: copy the changed files and make them durable.
        drop_caches();
        let scratch = root.join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let copy_started = Instant::now();
        for &i in &changed {
            std::fs::copy(tree_file(&root.join("a"), i), scratch.join(i.to_string())).unwrap();
        }
        let _ = Command::new("sync").arg("-f").arg(&scratch).status();
        let copy = copy_started.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&scratch).unwrap();

        println!(
            "  round {}: {} files changed ({} KiB)\n    rampart: {:.3} s, {} files examined, {} bytes sent\n    rsync:   {:.3} s, {} files examined, {} transferred\n    copy of the changed files + sync: {:.3} s\n    rampart / copy = {:.2} (target <= 2)   rampart / rsync = {:.3}",
            round + 1,
            changed.len(),
            changed_bytes / 1024,
            reintegration,
            event["examined"],
            event["bytes_sent"],
            rsync,
            stat("Number of files:"),
            stat("Number of regular files transferred:"),
            copy,
            reintegration / copy,
            reintegration / rsync,
        );

        // Back in step for the next round (incremental, nothing to send).
        pair.start();
    }
    pair.stop();
}
