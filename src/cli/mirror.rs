//! `rampart mirror`: the mirror data plane by hand, for operators and tests.
//!
//! `prim` and `second` run one side of a replicated directory in the foreground (the
//! mirror module drives the same engine from the cluster state); `verify` compares two
//! copies by content; `estimate` tells what a reintegration would send from a book.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use rampart_mirror::prim::{PrimConfig, Primary};
use rampart_mirror::second::{SecondConfig, Secondary};
use rampart_mirror::tree::Tree;
use rampart_mirror::AckMode;
use rampart_raft::transport::ClusterKey;
use rampart_storage::{MarkKind, ReplicationBook};

use crate::module::duration::{self, Unit};

fn parse_duration(raw: &str) -> Result<Duration, String> {
    duration::parse(raw, Unit::Seconds)
}

#[derive(Subcommand, Debug)]
pub enum MirrorCommand {
    /// Run PRIM for a directory: mount the interception and stream to SECOND.
    Prim(PrimArgs),
    /// Run SECOND for a directory: receive and apply the stream.
    Second(SecondArgs),
    /// Compare two copies (entries, attributes, bytes); exit 1 when they differ.
    Verify { first: PathBuf, second: PathBuf },
    /// What a reintegration would send, from a node's replication book.
    Estimate {
        #[arg(long)]
        book: PathBuf,
        /// Bytes per zone of that book.
        #[arg(long, default_value = "1048576")]
        zone_size: u64,
    },
}

#[derive(Args, Debug)]
pub struct Common {
    /// The replicated directory.
    #[arg(long)]
    dir: PathBuf,
    /// The replication book (a directory outside `--dir`).
    #[arg(long)]
    book: PathBuf,
    /// File holding the cluster secret.
    #[arg(long)]
    secret_file: PathBuf,
    /// Bytes per zone; both sides must agree.
    #[arg(long, default_value = "1048576")]
    zone_size: u64,
    /// write (default), durable or fsync.
    #[arg(long, default_value = "write")]
    ack: AckMode,
}

#[derive(Args, Debug)]
pub struct PrimArgs {
    #[command(flatten)]
    common: Common,
    /// SECOND's replication address, host:port.
    #[arg(long)]
    peer: String,
    /// Mirror epoch of this PRIM.
    #[arg(long)]
    epoch: u64,
    /// A silent peer is lost after this long (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    link_timeout: Duration,
    /// Reintegration rate limit in bytes per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Relative paths not replicated (repeatable).
    #[arg(long)]
    not_replicated: Vec<String>,
    /// Serve read-only opens without FUSE passthrough.
    #[arg(long)]
    no_passthrough: bool,
    /// Threads answering the kernel's requests on the mount.
    #[arg(long, default_value_t = rampart_mirror::prim::DISPATCH_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    dispatch_threads: u16,
}

#[derive(Args, Debug)]
pub struct SecondArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on for PRIM, host:port.
    #[arg(long)]
    listen: String,
    /// Oldest epoch accepted.
    #[arg(long, default_value = "0")]
    epoch: u64,
    /// In write and fsync modes, sync the copy at least this often (e.g. 5s, 200ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    sync_every: Duration,
}

fn key(path: &PathBuf) -> anyhow::Result<ClusterKey> {
    let secret = std::fs::read(path)
        .with_context(|| format!("read the cluster secret {}", path.display()))?;
    Ok(ClusterKey::from_secret(secret.trim_ascii()))
}

async fn until_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// One JSON object per line on stdout, for scripts and tests.
fn emit(value: serde_json::Value) {
    println!("{value}");
}

pub async fn run(command: &MirrorCommand) -> anyhow::Result<ExitCode> {
    match command {
        MirrorCommand::Prim(args) => {
            let mut config = PrimConfig::new(
                args.common.dir.clone(),
                args.common.book.clone(),
                args.peer.clone(),
                key(&args.common.secret_file)?,
                args.epoch,
            );
            config.zone_size = args.common.zone_size;
            config.ack = args.common.ack;
            config.link_timeout = args.link_timeout;
            config.resync_rate = args.rate;
            config.not_replicated = args
                .not_replicated
                .iter()
                .map(|p| p.trim_matches('/').as_bytes().to_vec())
                .collect();
            config.passthrough = !args.no_passthrough;
            config.dispatch_threads = args.dispatch_threads.into();
            // By hand there is no cluster to record "SECOND not up to date" in: go on
            // alone as soon as the peer is lost.
            config.continue_alone = true;
            let (prim, mut events) = Primary::start(config).context("start PRIM")?;
            emit(serde_json::json!({"event": "mounted", "dir": args.common.dir}));
            let printer = tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    emit(serde_json::to_value(&event).expect("events serialize"));
                }
            });
            until_signal().await?;
            let status = prim.status();
            let released = prim.stop();
            printer.abort();
            emit(serde_json::json!({"event": "stopped", "status": status}));
            released.context("stop PRIM")?;
            Ok(ExitCode::SUCCESS)
        }
        MirrorCommand::Second(args) => {
            let second = Secondary::start(
                SecondConfig {
                    dir: args.common.dir.clone(),
                    book: args.common.book.clone(),
                    key: key(&args.common.secret_file)?,
                    zone_size: args.common.zone_size,
                    ack: args.common.ack,
                    sync_every: args.sync_every,
                    protect: true,
                },
                &args.listen,
            )
            .context("start SECOND")?;
            second.fence(args.epoch).context("record the epoch")?;
            emit(serde_json::json!({"event": "listening", "addr": second.addr().to_string()}));
            until_signal().await?;
            emit(serde_json::json!({"event": "stopped", "status": second.status()}));
            drop(second);
            Ok(ExitCode::SUCCESS)
        }
        MirrorCommand::Verify { first, second } => {
            let differences = verify(first, second)?;
            for difference in &differences {
                println!("{difference}");
            }
            if differences.is_empty() {
                println!("identical");
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
        MirrorCommand::Estimate { book, zone_size } => {
            let book =
                ReplicationBook::open_read_only(book).context("open the replication book")?;
            let mut pending = book.marks(MarkKind::Dirty)?;
            pending.extend(&book.marks(MarkKind::Intent)?);
            let zones = pending.zone_count() as u64;
            emit(serde_json::json!({
                "files": pending.zones.len(),
                "paths": pending.paths.len(),
                "zones": zones,
                "bytes_at_most": zones * zone_size,
                "sync_point": book.sync_point()?.map(|p| format!("{:032x}@{}", p.id, p.epoch)),
            }));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Differences between two copies, by path; empty when identical.
pub fn verify(first: &Path, second: &Path) -> anyhow::Result<Vec<String>> {
    let a = Tree::open(first).with_context(|| format!("open {}", first.display()))?;
    let b = Tree::open(second).with_context(|| format!("open {}", second.display()))?;
    let (la, lb) = (a.list(b"")?, b.list(b"")?);
    let mut out = Vec::new();
    let mut ib = lb.iter().peekable();
    for (path, ma) in &la {
        while let Some((pb, _)) = ib.peek() {
            if pb < path {
                out.push(format!(
                    "only in {}: {}",
                    second.display(),
                    String::from_utf8_lossy(pb)
                ));
                ib.next();
            } else {
                break;
            }
        }
        let shown = String::from_utf8_lossy(path);
        match ib.peek() {
            Some((pb, mb)) if pb == path => {
                let mut what = Vec::new();
                if ma.kind != mb.kind {
                    what.push("kind");
                }
                if ma.perm != mb.perm {
                    what.push("mode");
                }
                if (ma.uid, ma.gid) != (mb.uid, mb.gid) {
                    what.push("owner");
                }
                if ma.size != mb.size {
                    what.push("size");
                }
                if ma.target != mb.target {
                    what.push("link target");
                }
                if ma.xattrs != mb.xattrs {
                    what.push("xattrs");
                }
                if what.is_empty()
                    && ma.kind == rampart_mirror::protocol::Kind::File
                    && a.zone_hashes(path, 1 << 20)? != b.zone_hashes(path, 1 << 20)?
                {
                    what.push("contents");
                }
                if !what.is_empty() {
                    out.push(format!("differs: {shown} ({})", what.join(", ")));
                }
                ib.next();
            }
            _ => out.push(format!("only in {}: {shown}", first.display())),
        }
    }
    for (pb, _) in ib {
        out.push(format!(
            "only in {}: {}",
            second.display(),
            String::from_utf8_lossy(pb)
        ));
    }
    Ok(out)
}
