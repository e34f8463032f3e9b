//! The replication stream's messages.
//!
//! One authenticated connection per mirrored directory, PRIM → SECOND. Every message
//! from PRIM carries the mirror epoch it was decided under; SECOND refuses an epoch
//! older than the newest it has seen (a deposed PRIM cannot write). Operations and
//! requests share one sequence space and SECOND handles them strictly in order, so the
//! live stream and the reintegration copier never overtake each other.
//!
//! Wire format of one frame: `header_len: u32 BE ‖ bincode(header) ‖ data`, where
//! `data` is a write's bytes or an xattr's value, kept out of bincode so that bulk bytes
//! are copied once.

use rampart_storage::{JournalEntry, Marks, SyncPoint};
use serde::{Deserialize, Serialize};

/// Relative path inside the replicated directory: `/`-separated, no NUL, no `.`/`..`
/// component, no leading `/`; empty for the directory itself.
pub type RelPath = Vec<u8>;

/// The directory holding `path` (empty for an entry of the replicated directory).
pub fn parent_of(path: &[u8]) -> RelPath {
    match path.iter().rposition(|b| *b == b'/') {
        Some(slash) => path[..slash].to_vec(),
        None => Vec::new(),
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// A time to set: now (on the applying node) or a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Time),
}

/// Kind of a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Everything about one path but file contents: what reconciliation makes equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (no file type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes, for files; 0 otherwise.
    pub size: u64,
    pub mtime: Time,
    /// Device number, for character and block devices.
    pub rdev: u64,
    /// Link target, for symlinks.
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A change to the replicated tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `pwrite(data, offset)`.
    Write {
        path: RelPath,
        offset: u64,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    /// Create a regular file (no error if it exists: a retried create).
    Create {
        path: RelPath,
        perm: u32,
        uid: u32,
        gid: u32,
    },
    Mknod {
        path: RelPath,
        kind: Kind,
        perm: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        path: RelPath,
        perm: u32,
        uid: u32,
        gid: u32,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    Link {
        from: RelPath,
        to: RelPath,
    },
    Symlink {
        path: RelPath,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    /// Permission bits, owner (each part optional), times.
    SetAttr {
        path: RelPath,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    /// `setxattr(name, data, flags)`.
    SetXattr {
        path: RelPath,
        name: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: RelPath,
        name: Vec<u8>,
    },
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// The application asked for this file to be durable.
    Fsync {
        path: RelPath,
        datasync: bool,
    },
    /// Reintegration: remove `path` and everything under it, if present.
    RemoveTree {
        path: RelPath,
    },
    /// Reintegration: make `path` exist with this kind and these attributes (a file's
    /// size included); replaces an entry of another kind.
    Ensure {
        path: RelPath,
        meta: Meta,
    },
    /// Reintegration: one zone's current bytes at `offset` (data), then `zeros` bytes
    /// of zeros (a hole on PRIM, sent as a length), then the file is set to `size`
    /// bytes.
    Zone {
        path: RelPath,
        offset: u64,
        zeros: u64,
        size: u64,
    },
}

impl Op {
    /// The path an error applying this operation is about.
    pub fn path(&self) -> &[u8] {
        match self {
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Create { path, .. }
            | Op::Mknod { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Fsync { path, .. }
            | Op::RemoveTree { path }
            | Op::Ensure { path, .. }
            | Op::Zone { path, .. } => path,
            Op::Rename { to, .. } | Op::Link { to, .. } => to,
        }
    }

    /// Every path this operation changes: both names of a rename or a link.
    pub fn paths(&self) -> Vec<RelPath> {
        match self {
            Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from.clone(), to.clone()],
            op => vec![op.path().to_vec()],
        }
    }
}

/// About how many bytes of entries one [`Answer::List`] or [`Answer::Children`]
/// carries: a tree of millions of entries crosses in parts, each far below the
/// transport's frame limit.
pub const ANSWER_BUDGET: usize = 8 << 20;

/// At least as many bytes as `marks` take in a frame (bincode's variable-length
/// integers: at most 10 bytes for a length or a zone number).
pub fn encoded_size_bound(marks: &Marks) -> usize {
    let zones: usize = (marks.zones.iter())
        .map(|(path, zones)| path.len() + 20 + 10 * zones.len())
        .sum();
    let paths: usize = marks.paths.iter().map(|path| path.len() + 10).sum();
    20 + zones + paths
}

/// A question PRIM asks SECOND during reintegration; answered in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Kind and size of each path (absent → `None`).
    Probe { paths: Vec<RelPath> },
    /// Entries under `path` (recursive) with their metadata, in byte order of their
    /// paths, from the first after `after`: as many as fit in [`ANSWER_BUDGET`].
    List {
        path: RelPath,
        after: Option<RelPath>,
    },
    /// Names and kinds of a directory's entries (none when it is not a directory),
    /// sorted, from the first after `after`: as many as fit in [`ANSWER_BUDGET`].
    Children {
        path: RelPath,
        after: Option<Vec<u8>>,
    },
    /// blake3 of every zone of each file (many per request: one round trip per file
    /// would dominate the comparison of a tree of small files).
    Hashes { paths: Vec<RelPath> },
    /// Make everything applied so far durable now (the copier's settle point, rather
    /// than waiting for SECOND's periodic sync).
    Sync,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Probe(Vec<Option<(Kind, u64)>>),
    /// `complete`: nothing follows the last entry; otherwise ask again after it.
    List {
        entries: Vec<(RelPath, Meta)>,
        complete: bool,
    },
    Children {
        entries: Vec<(Vec<u8>, Kind)>,
        complete: bool,
    },
    /// Per requested path; empty when the file is absent or not a regular file.
    Hashes(Vec<Vec<[u8; 32]>>),
    Synced,
    /// SECOND could not answer (a listing that failed part way): the reintegration
    /// cannot trust what it would have compared, and stops.
    Failed(String),
}

/// PRIM → SECOND.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Down {
    /// First message of a session. PRIM sends something at least every quarter of
    /// `link_timeout_ms`: SECOND ends a session silent for twice that.
    Hello {
        epoch: u64,
        zone_size: u64,
        sync_point: Option<SyncPoint>,
        link_timeout_ms: u64,
    },
    /// Renames and links made while SECOND was away, replayed best-effort before the
    /// live stream resumes (a failure is fine: the paths are reconciled afterwards).
    Replay {
        epoch: u64,
        entries: Vec<JournalEntry>,
    },
    Op {
        epoch: u64,
        seq: u64,
        op: Op,
    },
    Ask {
        epoch: u64,
        seq: u64,
        request: Request,
    },
    /// Reintegration complete up to `seq`: SECOND records the sync point once everything
    /// before it is durable, then acknowledges as usual.
    SyncPoint {
        epoch: u64,
        seq: u64,
        point: SyncPoint,
    },
    /// Liveness when idle; answered by an `Ack`.
    Ping {
        epoch: u64,
    },
}

/// SECOND → PRIM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Up {
    /// Session accepted. `sync_point` is SECOND's; `overwrite` are zones and paths that
    /// SECOND changed without PRIM knowing (its intents and dirty marks from a time it
    /// was PRIM): PRIM must overwrite them.
    Welcome {
        sync_point: Option<SyncPoint>,
        overwrite: Marks,
    },
    /// Session refused (older epoch, wrong zone size, …).
    Refused {
        reason: String,
    },
    /// Every message up to `received` was read; up to `durable` applied and synced.
    Ack {
        received: u64,
        durable: u64,
    },
    /// Applying `seq` failed here although it succeeded on PRIM: the paths it
    /// changes ([`Op::paths`]) diverged and PRIM must reconcile them. Always sent
    /// before an `Ack` covering `seq`.
    Failed {
        seq: u64,
        paths: Vec<RelPath>,
        error: String,
    },
    Answer {
        seq: u64,
        answer: Answer,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("malformed replication frame: {0}")]
pub struct DecodeError(String);

/// Encodes `message` followed by `data` into one frame payload.
pub fn encode<T: Serialize>(message: &T, data: &[u8]) -> Vec<u8> {
    let header = bincode::serde::encode_to_vec(message, bincode::config::standard())
        .expect("protocol messages always encode");
    let mut frame = Vec::with_capacity(4 + header.len() + data.len());
    frame.extend_from_slice(
        &u32::try_from(header.len())
            .expect("headers are small")
            .to_be_bytes(),
    );
    frame.extend_from_slice(&header);
    frame.extend_from_slice(data);
    frame
}

/// Splits a frame payload into its message and the offset where its data starts.
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<(T, usize), DecodeError> {
    let len: [u8; 4] = frame
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| DecodeError("shorter than its length prefix".into()))?;
    let end = 4 + u32::from_be_bytes(len) as usize;
    let header = frame
        .get(4..end)
        .ok_or_else(|| DecodeError("header longer than the frame".into()))?;
    let (message, used) = bincode::serde::decode_from_slice(header, bincode::config::standard())
        .map_err(|e| DecodeError(e.to_string()))?;
    if used != header.len() {
        return Err(DecodeError("trailing bytes in the header".into()));
    }
    Ok((message, end))
}

/// Checks a path received from the network before it is used on the local tree.
pub fn validate_path(path: &[u8]) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains(&0) {
        return Err("path contains NUL".into());
    }
    for component in path.split(|b| *b == b'/') {
        if component.is_empty() || component == b"." || component == b".." {
            return Err(format!(
                "path {:?} has an empty, '.' or '..' component",
                String::from_utf8_lossy(path)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips_with_its_data() {
        let message = Down::Op {
            epoch: 3,
            seq: 9,
            op: Op::Write {
                path: b"a/b".to_vec(),
                offset: 4096,
            },
        };
        let frame = encode(&message, b"bytes");
        let (decoded, data_at) = decode::<Down>(&frame).unwrap();
        assert_eq!(decoded, message);
        assert_eq!(&frame[data_at..], b"bytes");
    }

    #[test]
    fn the_size_bound_of_marks_is_never_below_their_encoding() {
        let mut marks = Marks::default();
        assert!(encoded_size_bound(&marks) >= encode(&marks, &[]).len());
        for i in 0..300u64 {
            marks.add_zone(format!("dir/file{i}").as_bytes(), i * i * 1_000_003);
            marks.add_zone(b"big", u64::MAX - i);
            marks.add_path(format!("entry-{i}-{}", "x".repeat(i as usize)).as_bytes());
        }
        let welcome = Up::Welcome {
            sync_point: Some(SyncPoint {
                id: u128::MAX,
                epoch: u64::MAX,
            }),
            overwrite: marks.clone(),
        };
        assert!(encoded_size_bound(&marks) >= encode(&welcome, &[]).len());
    }

    #[test]
    fn truncated_or_garbage_frames_are_errors() {
        assert!(decode::<Down>(&[0, 0]).is_err());
        assert!(decode::<Down>(&[0, 0, 0, 9, 1]).is_err());
        assert!(decode::<Down>(&[0, 0, 0, 1, 0xff]).is_err());
    }

    #[test]
    fn network_paths_cannot_escape_the_tree() {
        for bad in [
            &b"../x"[..],
            b"a/../../x",
            b"/abs",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"a/",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        for good in [&b""[..], b"a", b"a/b.c/..d"] {
            assert!(validate_path(good).is_ok(), "{good:?}");
        }
    }
}
