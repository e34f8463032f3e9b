//! `rampart-jepsen run --workload register --nemesis partition,kill,pause --time 60 --seed 7`
//! `rampart-jepsen run --workload set --nemesis kill,linkcut,pause --ack fsync`
//! `rampart-jepsen sweep`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rampart_jepsen::nemesis::NemesisKind;
use rampart_jepsen::runner::{self, RunConfig};
use rampart_jepsen::testbed::sweep;

#[derive(Parser)]
#[command(
    name = "rampart-jepsen",
    about = "Fault-injection runs against a Rampart cluster in network namespaces (root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run: workload, faults, checks, report.
    Run {
        /// register (the Raft cluster state) or set (the mirror data plane).
        #[arg(long, default_value = "register")]
        workload: String,
        /// Comma-separated: kill, pause, partition, linkcut, diskfull (empty: none).
        #[arg(long, default_value = "partition,kill,pause")]
        nemesis: String,
        /// Seconds of workload under faults.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Seeds the schedule and the clients; printed in every report.
        #[arg(long)]
        seed: Option<u64>,
        /// Servers: 3 by default for register; set runs exactly 2 (PRIM, SECOND).
        #[arg(long)]
        servers: Option<usize>,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// set: PRIM's acknowledgement mode (write, durable, fsync).
        #[arg(long, default_value = "fsync")]
        ack: String,
        #[arg(long, default_value = "/tmp/rampart-jepsen-reports")]
        out: PathBuf,
    },
    /// Remove what killed runs left behind.
    Sweep,
}

fn parse_nemeses(list: &str) -> Result<Vec<NemesisKind>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Sweep => {
            let removed = sweep::sweep_stale();
            println!(
                "removed {} stale runs{}",
                removed.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", removed.join(", "))
                }
            );
            ExitCode::SUCCESS
        }
        Command::Run {
            workload,
            nemesis,
            time,
            seed,
            servers,
            clients,
            ack,
            out,
        } => {
            let nemeses = match parse_nemeses(&nemesis) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let seed = seed.unwrap_or_else(rand::random);
            println!("seed {seed}");
            let servers = servers.unwrap_or(if workload == "set" { 2 } else { 3 });
            let config = RunConfig {
                workload,
                nemeses,
                time: Duration::from_secs(time),
                seed,
                servers,
                clients,
                ack,
                out,
            };
            match runner::run(config, |prefix| println!("prefix {prefix}")).await {
                Ok(outcome) => {
                    print!("{}", outcome.summary);
                    println!("report: {}", outcome.report_dir.display());
                    if outcome.valid {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
