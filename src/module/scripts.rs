//! Running a module's scripts (`bin/prestart`, `start_prim`, `stop_prim`, …).
//!
//! Each script gets the current state, the next state and the action as arguments, an
//! environment naming the module and its folders (Rampart's names and SafeKit's) plus
//! the module's `<user><var>` variables, and runs in a process group of its own. Its
//! output goes line by line into the module log (verbose). When it outlives its
//! timeout, the whole group is killed. A stop runs twice at most: gracefully within
//! `nicestoptimeout`, then — if that failed or timed out — with the action `force`
//! within `forcestoptimeout`.
//!
//! A script that does not exist is skipped (modules provide only what they need).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use super::log::{Level, ModuleLog};
use super::userconfig::User;

/// What a module's scripts run with.
#[derive(Debug, Clone)]
pub struct ScriptEnv {
    pub module: String,
    /// The module's folder: `bin/` and `conf/` are inside.
    pub module_dir: PathBuf,
    /// The module's working folder on this node (state, pid files…).
    pub var_dir: PathBuf,
    /// `<user><var>` variables, in file order.
    pub vars: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptOutcome {
    Succeeded,
    /// Exit code, or `None` when killed by a signal.
    Failed(Option<i32>),
    TimedOut,
    /// No such script: nothing to do.
    Missing,
}

impl ScriptOutcome {
    /// Whether the caller may go on as if the script succeeded.
    pub fn ok(self) -> bool {
        matches!(self, ScriptOutcome::Succeeded | ScriptOutcome::Missing)
    }
}

/// The arguments every script receives.
#[derive(Debug, Clone, Copy)]
pub struct Transition<'a> {
    pub current: &'a str,
    pub next: &'a str,
    pub action: &'a str,
}

/// Runs `bin/<script>` with `transition` as arguments, within `timeout`.
pub async fn run(
    env: &ScriptEnv,
    log: &Arc<ModuleLog>,
    script: &str,
    transition: Transition<'_>,
    timeout: Duration,
) -> ScriptOutcome {
    let path = env.module_dir.join("bin").join(script);
    if !path.exists() {
        return ScriptOutcome::Missing;
    }
    log.append(
        Level::Info,
        script,
        &format!(
            "run {} {} {}",
            transition.current, transition.next, transition.action
        ),
    );
    let mut command = Command::new(&path);
    command
        .args([transition.current, transition.next, transition.action])
        .current_dir(&env.module_dir)
        .env("RAMPART_MODULE", &env.module)
        .env("RAMPART_MODULE_DIR", &env.module_dir)
        .env("RAMPART_MODULE_BIN", env.module_dir.join("bin"))
        .env("RAMPART_MODULE_VAR", &env.var_dir)
        // SafeKit's names, so that SafeKit scripts run unchanged.
        .env("SAFEMODULE", &env.module)
        .env("SAFEUSERBIN", env.module_dir.join("bin"))
        .env("SAFEVAR", &env.var_dir)
        .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            log.append(
                Level::Error,
                script,
                &format!("cannot run {}: {e}", path.display()),
            );
            return ScriptOutcome::Failed(None);
        }
    };
    let group = child.id().map(|pid| pid as i32);
    // Output is logged until the pipe closes, which may be after the script exits
    // when it started a daemon that kept its output: that output is logged too.
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_lines(out, log.clone(), script.to_string()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_lines(err, log.clone(), script.to_string()));
    }
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => ScriptOutcome::Succeeded,
        Ok(Ok(status)) => ScriptOutcome::Failed(status.code()),
        Ok(Err(e)) => {
            log.append(
                Level::Error,
                script,
                &format!("waiting for the script: {e}"),
            );
            ScriptOutcome::Failed(None)
        }
        Err(_) => {
            if let Some(group) = group {
                // SAFETY: killpg(2) on the group this script leads; no memory effects.
                unsafe { libc::killpg(group, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            ScriptOutcome::TimedOut
        }
    };
    let (level, what) = match outcome {
        ScriptOutcome::Succeeded => (Level::Info, "succeeded".to_string()),
        ScriptOutcome::Failed(Some(code)) => (Level::Warn, format!("failed with exit code {code}")),
        ScriptOutcome::Failed(None) => (Level::Warn, "was killed by a signal".to_string()),
        ScriptOutcome::TimedOut => (
            Level::Warn,
            format!("timed out after {timeout:?}: its process group was killed"),
        ),
        ScriptOutcome::Missing => unreachable!("handled above"),
    };
    log.append(level, script, &what);
    outcome
}

/// Runs a stop script gracefully, then with action `force` if that did not succeed.
pub async fn run_stop(
    env: &ScriptEnv,
    log: &Arc<ModuleLog>,
    script: &str,
    current: &str,
    next: &str,
    user: &User,
) -> ScriptOutcome {
    let graceful = Transition {
        current,
        next,
        action: "stop",
    };
    let outcome = run(env, log, script, graceful, user.nicestoptimeout).await;
    if outcome.ok() {
        return outcome;
    }
    let forced = Transition {
        current,
        next,
        action: "force",
    };
    run(env, log, script, forced, user.forcestoptimeout).await
}

async fn copy_lines(stream: impl AsyncRead + Unpin, log: Arc<ModuleLog>, source: String) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.append(Level::Verbose, &source, &line);
    }
}

#[cfg(test)]
mod tests;
