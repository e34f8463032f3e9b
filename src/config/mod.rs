//! Configuration files: parsing, validation and clear errors.
//!
//! - [`xml`]: a small XML tree with line and column for every element, and the checks
//!   every Rampart file shares (known attributes, known children, typed values).
//! - [`cluster`]: `cluster.xml`, SafeKit's shape plus what Rampart needs.

pub mod cluster;
pub mod xml;

pub use cluster::{ClusterConfig, NodeConfig};
pub use xml::ConfigError;
