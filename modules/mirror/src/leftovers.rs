//! What a killed predecessor left mounted over the replicated directory.
//!
//! A PRIM killed -9 leaves its FUSE mount (dead: every access fails with `ENOTCONN`); a
//! SECOND killed -9 leaves its read-only bind of the directory over itself. A role that
//! started on top of either would reach its files through it: PRIM could not open its
//! tree, and SECOND would fail every apply with `EROFS`. Each role therefore removes
//! them before it opens its tree, and only them: a mount the operator put at the
//! directory (a file system of its own) is never touched.
//!
//! Callers open the replication book first: its lock proves that no live role of this
//! node serves the directory, so whatever a role mounted there is a leftover.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::mount::{unmount, UnmountFlags};

use crate::tree::Tree;
use crate::MirrorError;

/// The FUSE subtype and source PRIM mounts with: the mount table shows type `fuse`
/// (`fuse.rampart` when mounted through fusermount) and source `rampart-mirror`.
pub(crate) const FUSE_SUBTYPE: &str = "rampart";
pub(crate) const FUSE_SOURCE: &str = "rampart-mirror";

/// A line of `/proc/self/mountinfo` (proc(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
struct MountEntry {
    id: u64,
    parent: u64,
    device: String,
    /// The directory of the mounted file system that appears at `mount_point`.
    root: PathBuf,
    mount_point: PathBuf,
    read_only: bool,
    fs_type: String,
    source: String,
}

/// Opens the tree at `dir` for a role, after removing what a predecessor left over it.
/// A tree that cannot be written (on a read-only mount) is refused: a SECOND that
/// cannot apply must never count as a copy.
pub(crate) fn open_tree_for_role(dir: &Path) -> Result<Tree, MirrorError> {
    remove_leftover_mounts(dir).map_err(MirrorError::io("remove what a previous run mounted"))?;
    let tree = Tree::open(dir).map_err(MirrorError::io("open the replicated dir"))?;
    let read_only = tree
        .read_only()
        .map_err(MirrorError::io("read the replicated dir's mount flags"))?;
    if read_only {
        return Err(MirrorError::Refused(format!(
            "{} is on a read-only mount: nothing could be replicated into or out of it",
            dir.display()
        )));
    }
    Ok(tree)
}

/// Removes the mounts a killed PRIM or SECOND left at `dir`, topmost first, logging
/// each. Stops at the first mount that is not one of them.
fn remove_leftover_mounts(dir: &Path) -> io::Result<()> {
    let dir = absolute_without_following(dir)?;
    // Each round removes one; a bound in case the table does not change under us.
    for _ in 0..16 {
        let table = String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo")?).into_owned();
        let entries: Vec<MountEntry> = table.lines().filter_map(parse_line).collect();
        let Some(what) = leftover_on_top(&entries, &dir) else {
            return Ok(());
        };
        unmount(&dir, UnmountFlags::DETACH).map_err(|e| {
            io::Error::other(format!("cannot remove {what} at {}: {e}", dir.display()))
        })?;
        tracing::warn!(dir = %dir.display(), "removed {what} a previous run left");
    }
    Err(io::Error::other(format!(
        "mounts at {} keep coming back",
        dir.display()
    )))
}

/// `dir` made absolute with its parent resolved, not `dir` itself: a dead FUSE mount
/// fails every `stat` of its mount point, so `canonicalize(dir)` would too.
fn absolute_without_following(dir: &Path) -> io::Result<PathBuf> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot be a replicated directory", dir.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok(parent.canonicalize()?.join(name))
}

/// What the topmost mount at `dir` is, when it is a leftover of ours.
fn leftover_on_top(entries: &[MountEntry], dir: &Path) -> Option<String> {
    let at: Vec<&MountEntry> = entries.iter().filter(|e| e.mount_point == dir).collect();
    // Mounts stacked at one point: each later one's parent is the one it covers.
    let top = at
        .iter()
        .find(|e| !at.iter().any(|other| other.parent == e.id))?;
    let fuse = top.fs_type == "fuse" || top.fs_type == format!("fuse.{FUSE_SUBTYPE}");
    if fuse && top.source == FUSE_SOURCE {
        return Some("the interception mount".into());
    }
    let below = entries.iter().find(|e| e.id == top.parent)?;
    let relative = dir.strip_prefix(&below.mount_point).ok()?;
    let bind_of_itself = top.device == below.device && top.root == below.root.join(relative);
    (bind_of_itself && top.read_only).then(|| "the read-only bind mount".into())
}

/// Parses one line: `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`.
fn parse_line(line: &str) -> Option<MountEntry> {
    let (mine, theirs) = line.split_once(" - ")?;
    let mut fields = mine.split(' ');
    let id = fields.next()?.parse().ok()?;
    let parent = fields.next()?.parse().ok()?;
    let device = fields.next()?.to_string();
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let read_only = fields.next()?.split(',').any(|option| option == "ro");
    let mut theirs = theirs.split(' ');
    let fs_type = theirs.next()?.to_string();
    let source = theirs.next().map(unescape)?.to_string_lossy().into_owned();
    Some(MountEntry {
        id,
        parent,
        device,
        root,
        mount_point,
        read_only,
        fs_type,
        source,
    })
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:17 / /srv rw,relatime shared:9 - ext4 /dev/sdb1 rw
40 30 8:17 /data/my\\040dir /srv/data/my\\040dir ro,relatime shared:9 - ext4 /dev/sdb1 rw
41 30 0:52 / /srv/pg rw,nosuid - fuse rampart-mirror rw,user_id=0
42 30 8:33 / /srv/own rw,relatime - ext4 /dev/sdc1 rw
43 30 8:17 /elsewhere /srv/moved ro,relatime - ext4 /dev/sdb1 rw
44 40 8:17 /data/my\\040dir /srv/data/my\\040dir ro,relatime - ext4 /dev/sdb1 rw
";

    fn table() -> Vec<MountEntry> {
        TABLE.lines().filter_map(parse_line).collect()
    }

    #[test]
    fn parses_escaped_paths_and_options() {
        let entries = table();
        assert_eq!(entries.len(), 7);
        assert_eq!(entries[2].mount_point, Path::new("/srv/data/my dir"));
        assert_eq!(entries[2].root, Path::new("/data/my dir"));
        assert!(entries[2].read_only);
        assert!(!entries[1].read_only);
        assert_eq!(entries[3].fs_type, "fuse");
        assert_eq!(entries[3].source, "rampart-mirror");
    }

    #[test]
    fn finds_binds_of_a_directory_over_itself_topmost_first() {
        let entries = table();
        let dir = Path::new("/srv/data/my dir");
        assert_eq!(
            leftover_on_top(&entries, dir).as_deref(),
            Some("the read-only bind mount")
        );
        // Once the top one (44) is gone, the one below it (40) is next.
        let fewer: Vec<_> = entries.iter().filter(|e| e.id != 44).cloned().collect();
        assert!(leftover_on_top(&fewer, dir).is_some());
        let none: Vec<_> = fewer.into_iter().filter(|e| e.id != 40).collect();
        assert_eq!(leftover_on_top(&none, dir), None);
    }

    #[test]
    fn finds_the_interception_mount() {
        assert_eq!(
            leftover_on_top(&table(), Path::new("/srv/pg")).as_deref(),
            Some("the interception mount")
        );
    }

    #[test]
    fn leaves_the_operators_mounts_alone() {
        let mut entries = table();
        // Someone else's FUSE file system.
        entries.push(parse_line("45 30 0:53 / /srv/sshfs rw - fuse.sshfs host:/x rw").unwrap());
        assert_eq!(leftover_on_top(&entries, Path::new("/srv/sshfs")), None);
        // A file system of its own, and a read-only bind of another directory.
        assert_eq!(leftover_on_top(&entries, Path::new("/srv/own")), None);
        assert_eq!(leftover_on_top(&entries, Path::new("/srv/moved")), None);
        assert_eq!(leftover_on_top(&entries, Path::new("/srv")), None);
        assert_eq!(leftover_on_top(&entries, Path::new("/srv/nothing")), None);
    }

    #[test]
    fn unescapes_only_octal_escapes() {
        assert_eq!(unescape("/a\\040b\\134c\\x"), Path::new("/a b\\c\\x"));
    }
}
