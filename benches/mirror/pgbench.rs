//! PostgreSQL 15 (Debian's) with its data directory on each target: `pgbench` read-write
//! (TPC-B-like) and select-only, 8 clients, runs of the targets alternated; one server
//! per target, listening on a Unix socket only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::targets::{targets, Target};
use crate::{median, runs, Plan, ROOT};

const BIN: &str = "/usr/lib/postgresql/15/bin";
const CLIENTS: &str = "8";
const THREADS: &str = "2";

/// One PostgreSQL server over a target's directory; stopped on drop.
struct Server {
    data: PathBuf,
    socket: PathBuf,
    port: u16,
}

/// Runs `program` of PostgreSQL as the `postgres` user; its output, or a panic with it.
fn as_postgres(program: &str, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(Path::new(BIN).join(program))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown {}", path.display());
}

impl Server {
    /// initdb in `dir/pg`, then start; `n` numbers the server (its port and socket).
    fn start(dir: &Path, n: u16) -> Server {
        let data = dir.join("pg");
        std::fs::create_dir_all(&data).unwrap();
        chown_postgres(&data);
        let socket = Path::new(ROOT).join(format!("pgsock-{n}"));
        std::fs::create_dir_all(&socket).unwrap();
        chown_postgres(&socket);
        let server = Server {
            data,
            socket,
            port: 54320 + n,
        };
        let data = server.data.to_str().unwrap();
        as_postgres("initdb", &["-D", data, "-A", "trust", "--no-instructions"]);
        let options = format!(
            "-k {} -p {} -c listen_addresses=''",
            server.socket.display(),
            server.port
        );
        let log = server.data.join("server.log");
        as_postgres(
            "pg_ctl",
            &[
                "-D",
                data,
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        server
    }

    fn pgbench(&self, args: &[&str]) -> String {
        let (host, port) = (self.socket.to_str().unwrap(), self.port.to_string());
        let mut all = vec!["-h", host, "-p", &port, "-U", "postgres"];
        all.extend_from_slice(args);
        all.push("postgres");
        as_postgres("pgbench", &all)
    }

    /// Transactions per second of one run.
    fn run(&self, select_only: bool, seconds: u32) -> f64 {
        let seconds = seconds.to_string();
        let mut args = vec!["-c", CLIENTS, "-j", THREADS, "-T", &seconds, "-n"];
        if select_only {
            args.push("-S");
        }
        let out = self.pgbench(&args);
        tps(&out).unwrap_or_else(|| panic!("no tps in pgbench's output:\n{out}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.data.to_str().unwrap();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(BIN).join("pg_ctl"))
            .args(["-D", data, "-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_dir_all(&self.socket);
    }
}

/// `tps = 5469.123 (without initial connection time)`.
fn tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn run(plan: &Plan) {
    if !Path::new(BIN).join("pgbench").exists() {
        println!("\npgbench: PostgreSQL 15 not installed (./dev bench installs it); skipped");
        return;
    }
    let names = ["native", "glusterfs-r2", "rampart-write"];
    let targets: Vec<Target> = targets()
        .into_iter()
        .filter(|t| names.contains(&t.name))
        .collect();
    for &scale in &plan.pg_scales {
        let servers: Vec<Server> = targets
            .iter()
            .zip(0..)
            .map(|(target, n)| {
                let server = Server::start(&target.dirs[0], n);
                server.pgbench(&["-i", "-q", "-s", &scale.to_string()]);
                server
            })
            .collect();
        // (read-write, select-only) TPS per target and round.
        let mut figures = vec![(Vec::new(), Vec::new()); servers.len()];
        for round in 0..plan.pg_rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..servers.len()).collect()
            } else {
                (0..servers.len()).rev().collect()
            };
            for select_only in [false, true] {
                for &i in &order {
                    let tps = servers[i].run(select_only, plan.pg_seconds);
                    let runs = if select_only {
                        &mut figures[i].1
                    } else {
                        &mut figures[i].0
                    };
                    runs.push(tps);
                }
            }
            println!(
                "pgbench scale {scale}: round {} of {} done",
                round + 1,
                plan.pg_rounds
            );
        }
        report(scale, plan.pg_seconds, &targets, &figures);
        drop(servers);
    }
}

fn report(scale: u32, seconds: u32, targets: &[Target], figures: &[(Vec<f64>, Vec<f64>)]) {
    let find = |name: &str| targets.iter().position(|t| t.name == name).unwrap();
    let (native, gluster, rampart) = (find("native"), find("glusterfs-r2"), find("rampart-write"));
    for (label, pick) in [
        (
            "read-write",
            (|f: &(Vec<f64>, Vec<f64>)| f.0.clone()) as fn(&_) -> Vec<f64>,
        ),
        ("select-only", |f: &(Vec<f64>, Vec<f64>)| f.1.clone()),
    ] {
        println!(
            "\npgbench {label}, scale {scale}, {CLIENTS} clients, {seconds} s runs (TPS, median; every run)"
        );
        for (target, f) in targets.iter().zip(figures) {
            let values = pick(f);
            println!(
                "  {:<16} {:>8.0}   {}",
                target.name,
                median(&values),
                runs(&values)
            );
        }
        let tps = |i: usize| median(&pick(&figures[i]));
        let native_target = if label == "read-write" { 0.7 } else { 0.9 };
        println!(
            "  rampart-write / native = {:.2} (target >= {native_target})   / glusterfs-r2 = {:.2}{}",
            tps(rampart) / tps(native),
            tps(rampart) / tps(gluster),
            if label == "read-write" {
                " (target >= 2)"
            } else {
                ""
            }
        );
    }
}
