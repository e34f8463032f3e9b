//! Application modules: their configuration (`userconfig.xml`), packages, scripts,
//! checkers and process monitoring.
//!
//! - [`userconfig`]: the module's configuration, SafeKit's element and attribute
//!   names, validated with file, line and element in every error.
//! - [`duration`]: times with units, and SafeKit's legacy unit-less values.
//! - [`log`]: the module log (JSON lines; verbose entries hold script output).
//! - [`package`]: `.safe` archives: validation, materialising a module folder.
//! - [`scripts`]: running the module's scripts with arguments, environment, timeouts.

pub mod duration;
pub mod log;
pub mod package;
pub mod scripts;
pub mod userconfig;
