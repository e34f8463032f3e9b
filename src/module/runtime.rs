//! One module's supervisor on one node: runs its scripts, watches its processes and
//! checkers, applies their actions, and stops it after `maxloop` restarts within
//! `loop_interval`. Today it runs light modules; mirror and farm modules need their
//! replication and load-balancing layers and say so instead of starting.
//!
//! Light module lifecycle: STOP → (prestart, start_prim) → ALONE; a failing resource
//! triggers its action: `restart` (stop_prim, start_prim), `stopstart` (stop_prim,
//! poststop, prestart, start_prim), `stop`, or `noaction`; STOP ← (stop_prim,
//! poststop).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rampart_raft::command::ModuleKind;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::log::{Level, ModuleLog};
use super::probe::{self, ModuleStates};
use super::scripts::{self, ScriptEnv, Transition};
use super::state::{ModuleState, Readiness, ResourceState};
use super::userconfig::{Action, UserConfig, When};

/// Operator requests to a module on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Start,
    Stop,
    Restart,
    StopStart,
}

/// Transitions kept per resource.
const HISTORY: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub state: ResourceState,
    /// Milliseconds since the epoch of the last change.
    pub since_ms: u64,
    /// Last changes, oldest first: (time ms, state).
    pub history: Vec<(u64, ResourceState)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub module: String,
    pub node: String,
    pub state: ModuleState,
    pub readiness: Readiness,
    /// Why it is where it is: the last error, or what it is doing.
    pub reason: Option<String>,
    pub resources: BTreeMap<String, ResourceStatus>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything a runtime needs; owned by its task.
pub struct Runtime {
    pub config: UserConfig,
    pub env: ScriptEnv,
    pub log: Arc<ModuleLog>,
    pub node: String,
    pub status: watch::Sender<ModuleStatus>,
    pub events: broadcast::Sender<ModuleStatus>,
    pub modules: Arc<dyn ModuleStates>,
}

/// Why supervision ended.
enum Ending {
    /// Stop, with the reason when it is an error.
    Stop(Option<String>),
    /// The node is shutting down: stop the application, then end the task.
    Shutdown,
}

/// Restarts within the sliding `loop_interval`.
struct LoopBudget {
    maxloop: u32,
    window: Duration,
    restarts: VecDeque<Instant>,
}

impl LoopBudget {
    /// Records a restart if the budget allows one more.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= self.maxloop {
            return false;
        }
        self.restarts.push_back(now);
        true
    }
}

impl Runtime {
    fn set(&self, state: ModuleState, readiness: Readiness, reason: Option<String>) {
        let mut changed = false;
        self.status.send_if_modified(|s| {
            changed = s.state != state || s.readiness != readiness || s.reason != reason;
            s.state = state;
            s.readiness = readiness;
            s.reason = reason.clone();
            if state == ModuleState::Stop {
                s.resources.clear();
            }
            changed
        });
        if changed {
            let _ = self.events.send(self.status.borrow().clone());
            let text = match &reason {
                Some(r) => format!("{} ({readiness:?}): {r}", state.name()),
                None => format!("{} ({readiness:?})", state.name()),
            };
            self.log.append(Level::Info, "state", &text);
        }
    }

    fn set_resource(&self, resource: &str, state: ResourceState) {
        let mut changed = false;
        self.status.send_if_modified(|s| {
            let entry = s
                .resources
                .entry(resource.to_string())
                .or_insert_with(|| ResourceStatus {
                    state: ResourceState::Unknown,
                    since_ms: now_ms(),
                    history: Vec::new(),
                });
            if entry.state != state {
                changed = true;
                entry.state = state;
                entry.since_ms = now_ms();
                entry.history.push((entry.since_ms, state));
                if entry.history.len() > HISTORY {
                    entry.history.remove(0);
                }
            }
            changed
        });
        if changed {
            let _ = self.events.send(self.status.borrow().clone());
            let level = if state == ResourceState::Down {
                Level::Warn
            } else {
                Level::Info
            };
            self.log.append(
                level,
                resource,
                &format!("{resource} is {state:?}").to_lowercase(),
            );
        }
    }

    /// The module could not be set up on this node: STOP, with the reason.
    pub fn fail_setup(&self, reason: &str) {
        self.log.append(Level::Error, "package", reason);
        self.set(
            ModuleState::Stop,
            Readiness::NotReady,
            Some(reason.to_string()),
        );
    }

    /// The task: waits for Start, runs, supervises, stops; until `shutdown`.
    pub async fn run(
        self,
        mut control: mpsc::UnboundedReceiver<Control>,
        shutdown: CancellationToken,
    ) {
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return,
                request = control.recv() => match request {
                    None => return,
                    Some(request) => request,
                },
            };
            if request == Control::Stop {
                continue;
            }
            if self.config.mode != ModuleKind::Light {
                let reason = format!(
                    "{:?} modules cannot run yet: their replication and load-balancing layers are not built",
                    self.config.mode
                )
                .to_lowercase();
                self.log.append(Level::Error, "state", &reason);
                self.set(ModuleState::Stop, Readiness::NotReady, Some(reason));
                continue;
            }
            if let Err(reason) = self.start(true).await {
                self.stop(Some(reason)).await;
                continue;
            }
            match self.supervise(&mut control, &shutdown).await {
                Ending::Stop(reason) => self.stop(reason).await,
                Ending::Shutdown => {
                    self.stop(Some(
                        "stopped by the node agent (a new package, or the agent stopping)".into(),
                    ))
                    .await;
                    return;
                }
            }
        }
    }

    fn script_timeout(&self) -> Duration {
        self.config.user.nicestoptimeout
    }

    /// prestart (when `full`), then start_prim. On failure, the reason.
    async fn start(&self, full: bool) -> Result<(), String> {
        // A restart keeps the module ALONE (and its resources' history); a full start
        // comes from STOP.
        if full {
            self.set(
                ModuleState::Stop,
                Readiness::Transient,
                Some("starting".into()),
            );
        }
        let action = if full { "start" } else { "restart" };
        let go = Transition {
            current: "STOP",
            next: "ALONE",
            action,
        };
        if full {
            let outcome =
                scripts::run(&self.env, &self.log, "prestart", go, self.script_timeout()).await;
            if !outcome.ok() {
                return Err(format!("prestart did not succeed ({outcome:?})"));
            }
        }
        let outcome = scripts::run(
            &self.env,
            &self.log,
            "start_prim",
            go,
            self.script_timeout(),
        )
        .await;
        if !outcome.ok() {
            return Err(format!("start_prim did not succeed ({outcome:?})"));
        }
        self.set(ModuleState::Alone, Readiness::Ready, None);
        Ok(())
    }

    /// stop_prim (graceful, then forced), poststop, then STOP. `reason`: an error, or
    /// `None` for an operator's stop.
    async fn stop(&self, reason: Option<String>) {
        self.set(
            ModuleState::Stop,
            Readiness::Transient,
            Some("stopping".into()),
        );
        self.stop_scripts(true).await;
        let readiness = if reason.is_some() {
            Readiness::NotReady
        } else {
            Readiness::Ready
        };
        if let Some(reason) = &reason {
            self.log
                .append(Level::Error, "state", &format!("stopped: {reason}"));
        }
        self.set(ModuleState::Stop, readiness, reason);
    }

    async fn stop_scripts(&self, full: bool) {
        let user = &self.config.user;
        scripts::run_stop(&self.env, &self.log, "stop_prim", "ALONE", "STOP", user).await;
        if full {
            let done = Transition {
                current: "ALONE",
                next: "STOP",
                action: "stop",
            };
            scripts::run(
                &self.env,
                &self.log,
                "poststop",
                done,
                user.forcestoptimeout,
            )
            .await;
        }
    }

    async fn supervise(
        &self,
        control: &mut mpsc::UnboundedReceiver<Control>,
        shutdown: &CancellationToken,
    ) -> Ending {
        let mut budget = LoopBudget {
            maxloop: self.config.maxloop,
            window: self.config.loop_interval,
            restarts: VecDeque::new(),
        };
        let applies = |when: When| matches!(when, When::Prim | When::Both);
        let procs: Vec<_> = self
            .config
            .errd
            .iter()
            .flat_map(|e| e.procs.iter())
            .filter(|p| applies(p.class))
            .cloned()
            .collect();
        let polltimer = self
            .config
            .errd
            .as_ref()
            .map_or(Duration::from_secs(10), |e| e.polltimer);
        let checks: Vec<_> = self
            .config
            .checks
            .iter()
            .filter(|c| applies(c.when))
            .cloned()
            .collect();
        // The first look at each resource comes one period after (re)start.
        let schedule = |checks: &[super::userconfig::Check]| -> (Instant, Vec<Instant>) {
            let now = Instant::now();
            (
                now + polltimer,
                checks.iter().map(|c| now + c.interval).collect(),
            )
        };
        let (mut errd_due, mut checks_due) = schedule(&checks);
        for p in &procs {
            self.set_resource(&format!("proc.{}", p.name), ResourceState::Unknown);
        }
        for c in &checks {
            self.set_resource(&c.resource, ResourceState::Unknown);
        }
        loop {
            let mut next = if procs.is_empty() {
                Instant::now() + Duration::from_secs(3600)
            } else {
                errd_due
            };
            for due in &checks_due {
                next = next.min(*due);
            }
            let failure: Option<(String, Action)> = tokio::select! {
                _ = shutdown.cancelled() => return Ending::Shutdown,
                request = control.recv() => match request {
                    None => return Ending::Shutdown,
                    Some(Control::Stop) => return Ending::Stop(None),
                    Some(Control::Start) => None,
                    Some(Control::Restart) => Some(("operator".to_string(), Action::Restart)),
                    Some(Control::StopStart) => Some(("operator".to_string(), Action::StopStart)),
                },
                _ = tokio::time::sleep_until(next) => {
                    let mut failure = None;
                    let now = Instant::now();
                    if !procs.is_empty() && now >= errd_due {
                        errd_due = now + polltimer;
                        for p in &procs {
                            let count = probe::count_processes(p);
                            let ok = count >= p.atleast && p.atmax.is_none_or(|max| count <= max);
                            let resource = format!("proc.{}", p.name);
                            self.set_resource(&resource, if ok { ResourceState::Up } else { ResourceState::Down });
                            if !ok && failure.is_none() {
                                failure = Some((format!("{resource} ({count} running)"), p.action));
                            }
                        }
                    }
                    for (check, due) in checks.iter().zip(checks_due.iter_mut()) {
                        if now < *due {
                            continue;
                        }
                        let up = probe::probe(&check.probe, check.timeout, &self.env.module_dir, &*self.modules).await;
                        *due = Instant::now() + check.interval;
                        self.set_resource(&check.resource, if up { ResourceState::Up } else { ResourceState::Down });
                        if !up && failure.is_none() {
                            failure = Some((check.resource.clone(), check.action));
                        }
                    }
                    failure
                }
            };
            let Some((cause, action)) = failure else {
                continue;
            };
            let operator = cause == "operator";
            match action {
                Action::NoAction => {
                    self.log.append(
                        Level::Warn,
                        "action",
                        &format!("{cause} is down; its action is noaction"),
                    );
                    continue;
                }
                Action::Stop => {
                    return Ending::Stop(Some(format!("{cause} is down; its action is stop")))
                }
                Action::Restart | Action::StopStart => {
                    if !operator && !budget.take() {
                        return Ending::Stop(Some(format!(
                            "{cause} is down and the module was already restarted {} times within {:?} (maxloop)",
                            self.config.maxloop, self.config.loop_interval
                        )));
                    }
                    let full = action == Action::StopStart;
                    self.log.append(
                        Level::Warn,
                        "action",
                        &format!(
                            "{} because of {cause}",
                            if full { "stopstart" } else { "restart" }
                        ),
                    );
                    self.set(
                        ModuleState::Alone,
                        Readiness::Transient,
                        Some(format!("restarting: {cause}")),
                    );
                    self.stop_scripts(full).await;
                    if let Err(reason) = self.start(full).await {
                        return Ending::Stop(Some(reason));
                    }
                    (errd_due, checks_due) = schedule(&checks);
                    for c in &checks {
                        self.set_resource(&c.resource, ResourceState::Unknown);
                    }
                }
            }
        }
    }
}

/// What the manager keeps of a running runtime.
pub struct RuntimeHandle {
    pub control: mpsc::UnboundedSender<Control>,
    pub status: watch::Receiver<ModuleStatus>,
    pub log: Arc<ModuleLog>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    /// Package digest the runtime was built from.
    pub digest: String,
    pub dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_budget_allows_maxloop_restarts_per_window() {
        let mut budget = LoopBudget {
            maxloop: 2,
            window: Duration::from_secs(3600),
            restarts: VecDeque::new(),
        };
        assert!(budget.take());
        assert!(budget.take());
        assert!(!budget.take());
        let mut short = LoopBudget {
            maxloop: 1,
            window: Duration::ZERO,
            restarts: VecDeque::new(),
        };
        assert!(short.take());
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            short.take(),
            "restarts older than the window no longer count"
        );
    }
}
