//! The mirror data plane: what makes a directory on PRIM and its copy on SECOND hold the
//! same bytes (DESIGN "Mirror data plane").
//!
//! - [`protocol`]: the replication stream's messages (epoch, sequence, operations).
//! - [`tree`]: a directory tree reached through a descriptor opened before mounting.
//! - [`second`]: SECOND's receiver and applier, behind a read-only bind mount.
//! - [`prim`]: PRIM's FUSE interception, replication engine and reintegration.
//! - `io_thread`: each role's network I/O on a runtime thread of its own.
//! - `leftovers`: the mounts a killed predecessor left over the directory.
//!
//! Bookkeeping (intents, dirty zones, journal, sync point) lives in
//! [`rampart_storage::ReplicationBook`].

mod io_thread;
mod leftovers;
pub mod prim;
pub mod protocol;
pub mod second;
pub mod tree;

use rampart_raft::transport::ChannelError;
use rampart_storage::BookError;

/// When a change counts as replicated (`<rfs sync="...">`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AckMode {
    /// A change returns once it is applied locally and SECOND has received it; an
    /// fsync then only waits for the local disk (what it covers was received already).
    #[default]
    Write,
    /// ... and SECOND has written it to its disk.
    Durable,
    /// Writes stream without waiting; fsync waits until SECOND durably holds every
    /// earlier change (the crash semantics of a local disk).
    Fsync,
}

impl std::str::FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "write" => Ok(AckMode::Write),
            "durable" => Ok(AckMode::Durable),
            "fsync" => Ok(AckMode::Fsync),
            other => Err(format!(
                "unknown acknowledgement mode {other:?} (write, durable or fsync)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Book(#[from] BookError),
    #[error("replication link: {0}")]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Decode(#[from] protocol::DecodeError),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// Waits (at most two seconds) until `shared` has no other owner. When PRIM or SECOND
/// stops, its aborted tasks still hold the directory's descriptor and the book until
/// the runtime drops them; waiting lets the caller unmount the file system underneath
/// or reopen the book as soon as the stop returns.
pub(crate) fn wait_for_sole_owner<T>(shared: &std::sync::Arc<T>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::sync::Arc::strong_count(shared) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

impl MirrorError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MirrorError {
        move |source| MirrorError::Io { what, source }
    }
}
