//! The `set` workload on the mirror data plane alone (no cluster, no roles yet): one
//! PRIM (`n1`, epoch 1) and one SECOND (`n2`), each `rampart mirror …` in its own
//! network namespace with its copy and book on its own tmpfs. Clients append to files
//! in PRIM's mount while the nemesis kills either side (restarted in the same role, PRIM
//! with the same epoch), pauses it or cuts the link. Then: heal, wait until PRIM
//! reports SECOND up to date, stop both cleanly, read both copies from disk and
//! compare them.
//!
//! Acknowledged appends must be in both copies; the Raft checkers have nothing to
//! judge here and say so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::{end_nemesis, finish, start_nemesis, RunConfig, RunOutcome};
use crate::history::{History, OpKind};
use crate::testbed::{find_rampart_bin, Server, Testbed, TestbedConfig};
use crate::workload::append::{read_copy, AppendClient};

const PRIM: &str = "n1";
const SECOND: &str = "n2";
const MIRROR_PORT: u16 = 4810;
/// PRIM takes a silent SECOND for lost after this long, then goes on alone.
const LINK_TIMEOUT: &str = "1s";
/// How long PRIM gets to reach SECOND at the start, and to bring it up to date after
/// the last fault.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the workload's end an append may still be running (PRIM parks a
/// write for at most 60 s without a session before answering EIO).
const APPEND_GRACE: Duration = Duration::from_secs(90);
/// Process numbers of the runner's own operations (final reads, the comparison).
const RUNNER_PROCESS: u64 = 1 << 40;

fn copy_of(server: &Server) -> PathBuf {
    server.data_dir.join("copy")
}

fn book_of(server: &Server) -> PathBuf {
    server.data_dir.join("book")
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub(super) async fn run(
    config: RunConfig,
    on_prefix: impl FnOnce(&str),
) -> anyhow::Result<RunOutcome> {
    if config.servers != 2 {
        bail!("the set workload runs one PRIM and one SECOND: 2 servers");
    }
    if !["write", "durable", "fsync"].contains(&config.ack.as_str()) {
        bail!(
            "unknown acknowledgement mode '{}': write, durable or fsync",
            config.ack
        );
    }
    let rampart_bin = find_rampart_bin()?;
    let testbed = Arc::new(Testbed::create(TestbedConfig {
        servers: 2,
        clients: 0,
        rampart_bin: rampart_bin.clone(),
        disk_mib: 256,
    })?);
    on_prefix(&testbed.prefix);
    let report_dir = config.out.join(format!(
        "{}-{}-seed{}-{}",
        config.workload, config.ack, config.seed, testbed.prefix
    ));
    let (prim, second) = (testbed.server(PRIM).clone(), testbed.server(SECOND).clone());
    for server in [&prim, &second] {
        std::fs::create_dir_all(copy_of(server))?;
        std::fs::create_dir_all(book_of(server))?;
    }
    let secret = path_arg(&testbed.dir.join("secret"));
    let role = |server: &Server, role: &str| -> Vec<String> {
        vec![
            "mirror".into(),
            role.into(),
            "--dir".into(),
            path_arg(&copy_of(server)),
            "--book".into(),
            path_arg(&book_of(server)),
            "--secret-file".into(),
            secret.clone(),
            "--ack".into(),
            config.ack.clone(),
        ]
    };
    let second_addr = format!("{}:{MIRROR_PORT}", second.host.addr);
    let mut second_args = role(&second, "second");
    second_args.extend(["--listen".into(), second_addr.clone()]);
    second_args.extend(["--sync-every".into(), "200ms".into()]);
    let mut prim_args = role(&prim, "prim");
    prim_args.extend(["--peer".into(), second_addr, "--epoch".into(), "1".into()]);
    prim_args.extend(["--link-timeout".into(), LINK_TIMEOUT.into()]);
    testbed.set_command(SECOND, second_args);
    testbed.set_command(PRIM, prim_args);
    testbed.start_node(SECOND)?;
    testbed.start_node(PRIM)?;
    wait_synced(&testbed)
        .await
        .context("PRIM never brought SECOND up to date at the start")?;

    let history = Arc::new(History::new());
    let nemesis = start_nemesis(&config, &testbed, &history);
    let workload_end = std::time::Instant::now() + config.time;
    let mut clients = Vec::new();
    for id in 0..config.clients as u64 {
        let client = AppendClient {
            id,
            clients: config.clients as u64,
            dir: copy_of(&prim),
            history: history.clone(),
        };
        let seed = config.seed;
        clients.push(tokio::task::spawn_blocking(move || {
            client.run(seed, workload_end)
        }));
    }
    let appends_end = tokio::time::Instant::now() + config.time + APPEND_GRACE;
    for mut client in clients {
        if tokio::time::timeout_at(appends_end, &mut client)
            .await
            .is_err()
        {
            // Kept for diagnosis. Killing PRIM ends its FUSE connection, which frees
            // the stuck clients (and with them the testbed, which then cleans up).
            std::fs::create_dir_all(&report_dir)?;
            crate::history::write_jsonl(&report_dir.join("history.jsonl"), &history.entries())?;
            testbed.save_logs(&report_dir);
            testbed.kill_node(PRIM);
            let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
            bail!(
                "an append never returned ({APPEND_GRACE:?} after the end); history and logs in {}",
                report_dir.display()
            );
        }
    }
    end_nemesis(nemesis, &testbed).await?;
    for name in [SECOND, PRIM] {
        testbed.pause_node(name, false);
        if !testbed.is_running(name) {
            testbed.start_node(name)?;
        }
    }
    if let Err(e) = wait_synced(&testbed).await {
        // The copies are read anyway: the verdicts say what SECOND is missing.
        tracing::warn!("{e:#}");
    }

    // Both stopped cleanly (PRIM unmounts, SECOND drains), then read from disk.
    let stopped_prim = stop(&testbed, PRIM).await;
    let stopped_second = stop(&testbed, SECOND).await;
    if !(stopped_prim && stopped_second) {
        tracing::warn!(stopped_prim, stopped_second, "a side did not stop cleanly");
    }
    let mut process = RUNNER_PROCESS;
    for (key, server) in [("prim", &prim), ("second", &second)] {
        history.op(process, OpKind::Invoke, "read", key, Value::Null);
        match read_copy(&copy_of(server)) {
            Ok(read) => history.op(process, OpKind::Ok, "read", key, read),
            Err(e) => history.op(process, OpKind::Fail, "read", key, json!(e.to_string())),
        }
        process += 1;
    }
    let differences = compare(&rampart_bin, &copy_of(&prim), &copy_of(&second))?;
    history.op(process, OpKind::Invoke, "verify", "copies", Value::Null);
    history.op(
        process,
        OpKind::Ok,
        "verify",
        "copies",
        json!({ "differences": differences }),
    );
    finish(&config, &testbed, &history, report_dir)
}

/// SIGTERM, and a bounded wait for a clean exit.
async fn stop(testbed: &Arc<Testbed>, name: &'static str) -> bool {
    let testbed = testbed.clone();
    tokio::task::spawn_blocking(move || testbed.stop_node(name, Duration::from_secs(20)))
        .await
        .unwrap_or(false)
}

/// Waits until the latest event of PRIM's current process says SECOND holds everything.
async fn wait_synced(testbed: &Testbed) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
    loop {
        let log = testbed.log_since_start(PRIM);
        let last = last_event(&log);
        if last.as_deref() == Some("synced") && testbed.is_running(PRIM) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "PRIM's last event after {SYNC_TIMEOUT:?} is {}, not synced",
                last.as_deref().unwrap_or("none")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name of the last event `rampart mirror prim` printed (one JSON object a line).
fn last_event(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| {
        let value: Value = serde_json::from_str(line.trim()).ok()?;
        value["event"].as_str().map(str::to_string)
    })
}

/// `rampart mirror verify`: the differences between two copies (none when identical).
fn compare(rampart_bin: &Path, first: &Path, second: &Path) -> anyhow::Result<Vec<String>> {
    let output = std::process::Command::new(rampart_bin)
        .args(["mirror", "verify"])
        .arg(first)
        .arg(second)
        .output()
        .context("running rampart mirror verify")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match output.status.code() {
        Some(0) => Ok(Vec::new()),
        Some(1) => Ok(stdout.lines().map(str::to_string).collect()),
        _ => bail!(
            "rampart mirror verify failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_event_is_read_past_log_lines() {
        let log = "{\"event\":\"mounted\",\"dir\":\"/x\"}\n\
                   2026-12-03T10:00:00Z INFO something\n\
                   {\"event\":\"synced\",\"session\":1,\"bytes_sent\":0,\"examined\":3}\n\
                   {\"event\":\"peer_lost\",\"session\":2,\"reason\":\"cut\"}\n\
                   a trailing log line\n";
        assert_eq!(last_event(log).as_deref(), Some("peer_lost"));
        assert_eq!(last_event("nothing yet"), None);
    }
}
