//! Application modules: their configuration (`userconfig.xml`), packages, scripts,
//! checkers and process monitoring.
//!
//! - [`userconfig`]: the module's configuration, SafeKit's element and attribute
//!   names, validated with file, line and element in every error.
//! - [`duration`]: times with units, and SafeKit's legacy unit-less values.

pub mod duration;
pub mod userconfig;
