//! Application modules: their configuration (`userconfig.xml`), packages, scripts,
//! checkers and process monitoring.
//!
//! - [`userconfig`]: the module's configuration, SafeKit's element and attribute
//!   names, validated with file, line and element in every error.
//! - [`duration`]: times with units, and SafeKit's legacy unit-less values.
//! - [`log`]: the module log (JSON lines; verbose entries hold script output).
//! - [`package`]: `.safe` archives: validation, materialising a module folder.
//! - [`state`]: module states (STOP, WAIT, ALONE, UP, PRIM, SECOND) and readiness.
//! - [`probe`]: the checks behind resources (tcp, ping, intf, ip, custom, module,
//!   errd's process count).
//! - [`runtime`]: one module's supervisor on one node.
//! - [`manager`]: all modules of a node, reconciled with the cluster state.
//! - [`scripts`]: running the module's scripts with arguments, environment, timeouts.

pub mod duration;
pub mod log;
pub mod manager;
pub mod package;
pub mod probe;
pub mod runtime;
pub mod scripts;
pub mod state;
pub mod userconfig;
