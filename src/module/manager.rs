//! All modules of one node, kept in line with the cluster state: each installed
//! package is materialised into `<data_dir>/modules/<name>`, each module gets a
//! [`Runtime`], and a module runs here exactly while the state says it is started on
//! this node. A new package (a config edit) replaces the runtime, which restarts the
//! module if it was running.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rampart_raft::NodeId;
use rampart_storage::StateView;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::log::{Level, ModuleLog};
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
            self.reconcile(&view);
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

    /// Brings the runtimes in line with the state. Reads the state briefly (names,
    /// digests, started flags) and package bytes only for modules whose package changed,
    /// so that unpacking never holds up the state machine.
    fn reconcile(&self, view: &StateView) {
        let wanted: BTreeMap<String, (String, bool)> = view.read(|s| {
            s.cluster
                .modules
                .values()
                .map(|m| {
                    (
                        m.name.clone(),
                        (m.digest.clone(), m.started_on.contains(&self.node_id)),
                    )
                })
                .collect()
        });
        let mut runtimes = self.runtimes.lock().expect("not poisoned");
        // Uninstalled modules: stop and forget.
        let gone: Vec<String> = runtimes
            .keys()
            .filter(|n| !wanted.contains_key(*n))
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
        for (name, (digest, run)) in &wanted {
            if runtimes.get(name).map(|h| h.digest.as_str()) != Some(digest.as_str()) {
                let Some(bytes) =
                    view.read(|s| s.cluster.modules.get(name).map(|m| m.package.clone()))
                else {
                    continue; // uninstalled meanwhile; the next change handles it
                };
                // A new package: the old runtime stops the application, and the new one
                // starts only once the old one has finished (see `build`).
                let previous = runtimes.remove(name).map(|old| {
                    old.shutdown.cancel();
                    old.task
                });
                match self.build(name, &bytes, previous) {
                    Ok(handle) => {
                        runtimes.insert(name.clone(), handle);
                        // Tell the new runtime whether to run, whatever the old one was told.
                        self.desired.lock().expect("not poisoned").remove(name);
                    }
                    Err(e) => {
                        error!(module = %name, error = %e, "cannot set up the module on this node");
                        continue;
                    }
                }
            }
            let mut desired = self.desired.lock().expect("not poisoned");
            if desired.get(name) != Some(run) {
                desired.insert(name.clone(), *run);
                if let Some(handle) = runtimes.get(name) {
                    let _ = handle
                        .control
                        .send(if *run { Control::Start } else { Control::Stop });
                }
            }
        }
    }

    /// Materialises the package and spawns its runtime. With `previous` (the task of
    /// the runtime it replaces), the new runtime waits for it to end first, so the two
    /// never run the application's scripts at the same time.
    fn build(
        &self,
        name: &str,
        bytes: &[u8],
        previous: Option<tokio::task::JoinHandle<()>>,
    ) -> anyhow::Result<RuntimeHandle> {
        let package = Package::open(bytes.to_vec())?;
        let dir = module_dir(&self.data_dir, name);
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
        // Unbounded: requests are few and small, and none may be dropped.
        let (control, control_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let runtime = Runtime {
            env: ScriptEnv {
                module: name.to_string(),
                module_dir: dir.clone(),
                var_dir,
                vars: package.config.user.vars.clone(),
            },
            config: package.config.clone(),
            log: log.clone(),
            node: self.node.clone(),
            status,
            events: self.events.clone(),
            modules: self
                .me
                .upgrade()
                .expect("the manager outlives its runtimes"),
        };
        let digest = package.digest.clone();
        let task_shutdown = shutdown.clone();
        let task_dir = dir.clone();
        let task = tokio::spawn(async move {
            // The old runtime may still be running scripts from the module folder:
            // unpack only once it has finished.
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let unpack = tokio::task::spawn_blocking(move || {
                package.materialize(&task_dir).map(|()| package)
            })
            .await;
            match unpack {
                Ok(Ok(package)) => {
                    runtime.log.append(
                        Level::Info,
                        "package",
                        &format!("package {} set up", &package.digest[..16]),
                    );
                    for warning in &package.config.warnings {
                        runtime.log.append(Level::Warn, "package", warning);
                    }
                    runtime.run(control_rx, task_shutdown).await
                }
                Ok(Err(e)) => runtime.fail_setup(&format!("cannot unpack the package: {e}")),
                Err(e) => runtime.fail_setup(&format!("unpacking the package stopped: {e}")),
            }
        });
        Ok(RuntimeHandle {
            control,
            status: status_rx,
            log,
            shutdown,
            task,
            digest,
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

    /// Restart or stopstart on this node; `false` when the module is unknown here or
    /// its runtime has ended.
    pub fn control(&self, name: &str, control: Control) -> bool {
        match self.runtimes.lock().expect("not poisoned").get(name) {
            Some(handle) => handle.control.send(control).is_ok(),
            None => false,
        }
    }

    /// Every state and resource change of every module on this node.
    pub fn subscribe(&self) -> broadcast::Receiver<ModuleStatus> {
        self.events.subscribe()
    }
}
