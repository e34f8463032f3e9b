//! All modules of one node, kept in line with the cluster state: each installed
//! package is materialised into `<data_dir>/modules/<name>`, each module gets a
//! [`Runtime`], and a module runs here exactly while the state says it is started on
//! this node. A new package (a config edit) replaces the runtime, which restarts the
//! module if it was running.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rampart_raft::NodeId;
use rampart_storage::{AppliedState, StateView};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::log::ModuleLog;
use super::package::{module_dir, Package};
use super::probe::ModuleStates;
use super::runtime::{Control, ModuleStatus, Runtime, RuntimeHandle};
use super::scripts::ScriptEnv;
use super::state::{ModuleState, Readiness};

pub struct ModuleManager {
    node: String,
    node_id: NodeId,
    data_dir: PathBuf,
    runtimes: Mutex<BTreeMap<String, RuntimeHandle>>,
    /// Whether each module was last told to run (to send each change once).
    desired: Mutex<BTreeMap<String, bool>>,
    events: broadcast::Sender<ModuleStatus>,
    me: std::sync::Weak<ModuleManager>,
}

impl ModuleStates for ModuleManager {
    fn is_running(&self, name: &str) -> bool {
        self.status(name)
            .is_some_and(|s| s.state != ModuleState::Stop)
    }
}

impl ModuleManager {
    pub fn new(node: String, node_id: NodeId, data_dir: PathBuf) -> Arc<Self> {
        Arc::new_cyclic(|me| ModuleManager {
            node,
            node_id,
            data_dir,
            runtimes: Mutex::new(BTreeMap::new()),
            desired: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(256).0,
            me: me.clone(),
        })
    }

    /// Reconciles on every applied change until `shutdown`; then stops every module.
    pub async fn run(self: Arc<Self>, view: StateView, shutdown: CancellationToken) {
        let mut changes = view.changes();
        loop {
            view.read(|state| self.reconcile(state));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
        let handles: Vec<RuntimeHandle> =
            std::mem::take(&mut *self.runtimes.lock().expect("not poisoned"))
                .into_values()
                .collect();
        for handle in handles {
            handle.shutdown.cancel();
            let _ = handle.task.await;
        }
    }

    fn reconcile(&self, state: &AppliedState) {
        let mut runtimes = self.runtimes.lock().expect("not poisoned");
        // Uninstalled modules: stop and forget.
        let gone: Vec<String> = runtimes
            .keys()
            .filter(|n| !state.cluster.modules.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(handle) = runtimes.remove(&name) {
                info!(module = %name, "module uninstalled: stopping it");
                handle.shutdown.cancel();
                let dir = handle.dir.clone();
                tokio::spawn(async move {
                    let _ = handle.task.await;
                    let _ = std::fs::remove_dir_all(dir);
                });
            }
            self.desired.lock().expect("not poisoned").remove(&name);
        }
        for (name, record) in &state.cluster.modules {
            let current = runtimes.get(name).map(|h| h.digest.clone());
            if current.as_deref() != Some(record.digest.as_str()) {
                let was_running = runtimes
                    .get(name)
                    .is_some_and(|h| h.status.borrow().state != ModuleState::Stop);
                if let Some(old) = runtimes.remove(name) {
                    old.shutdown.cancel();
                    // The old runtime stops the application before the new one starts it:
                    // the new one's Start waits in its queue behind this.
                    let task = old.task;
                    tokio::spawn(async move {
                        let _ = task.await;
                    });
                }
                match self.build(name, &record.package) {
                    Ok(handle) => {
                        runtimes.insert(name.clone(), handle);
                        if was_running {
                            self.desired.lock().expect("not poisoned").remove(name);
                        }
                    }
                    Err(e) => {
                        error!(module = %name, error = %e, "cannot set up the module on this node");
                        continue;
                    }
                }
            }
            let run = record.started_on.contains(&self.node_id);
            let mut desired = self.desired.lock().expect("not poisoned");
            if desired.get(name) != Some(&run) {
                desired.insert(name.clone(), run);
                if let Some(handle) = runtimes.get(name) {
                    let _ =
                        handle
                            .control
                            .try_send(if run { Control::Start } else { Control::Stop });
                }
            }
        }
    }

    fn build(&self, name: &str, bytes: &[u8]) -> anyhow::Result<RuntimeHandle> {
        let package = Package::open(bytes.to_vec())?;
        let dir = module_dir(&self.data_dir, name);
        package.materialize(&dir)?;
        let var_dir = self.data_dir.join("modules-var").join(name);
        std::fs::create_dir_all(&var_dir)?;
        let log = Arc::new(ModuleLog::open(
            &self.data_dir.join("logs").join(format!("{name}.log")),
        )?);
        let initial = ModuleStatus {
            module: name.to_string(),
            node: self.node.clone(),
            state: ModuleState::Stop,
            readiness: Readiness::Ready,
            reason: None,
            resources: BTreeMap::new(),
        };
        let (status, status_rx) = watch::channel(initial);
        let (control, control_rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let runtime = Runtime {
            env: ScriptEnv {
                module: name.to_string(),
                module_dir: dir.clone(),
                var_dir,
                vars: package.config.user.vars.clone(),
            },
            config: package.config,
            log: log.clone(),
            node: self.node.clone(),
            status,
            events: self.events.clone(),
            modules: self
                .me
                .upgrade()
                .expect("the manager outlives its runtimes"),
        };
        let task = tokio::spawn(runtime.run(control_rx, shutdown.clone()));
        Ok(RuntimeHandle {
            control,
            status: status_rx,
            log,
            shutdown,
            task,
            digest: package.digest,
            dir,
        })
    }

    pub fn status(&self, name: &str) -> Option<ModuleStatus> {
        self.runtimes
            .lock()
            .expect("not poisoned")
            .get(name)
            .map(|h| h.status.borrow().clone())
    }

    pub fn log(&self, name: &str) -> Option<Arc<ModuleLog>> {
        self.runtimes
            .lock()
            .expect("not poisoned")
            .get(name)
            .map(|h| h.log.clone())
    }

    /// Restart or stopstart on this node; `false` when the module is unknown here.
    pub fn control(&self, name: &str, control: Control) -> bool {
        match self.runtimes.lock().expect("not poisoned").get(name) {
            Some(handle) => handle.control.try_send(control).is_ok(),
            None => false,
        }
    }

    /// Every state and resource change of every module on this node.
    pub fn subscribe(&self) -> broadcast::Receiver<ModuleStatus> {
        self.events.subscribe()
    }
}
