//! What a killed predecessor left mounted over the replicated directory.
//!
//! A PRIM killed -9 leaves its FUSE mount (dead: every access fails with `ENOTCONN`); a
//! SECOND killed -9 leaves its read-only bind of the directory over itself. A role that
//! started on top of either would reach its files through it: PRIM could not open its
//! tree, and SECOND would fail every apply with `EROFS`. SECOND therefore removes them
//! before it opens its tree; PRIM opens its tree beneath them and mounts over them, and
//! removes them once its own mount is gone, so that the bare directory is never shown
//! while an application may still write to it. Only leftovers are touched: a mount the
//! operator put at the directory (a file system of its own) never is.
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
    writable(tree, dir)
}

/// Opens the tree at `dir` for PRIM, which mounts its interception over it: from
/// beneath what a predecessor left there, which stays until this PRIM's own mount is
/// gone ([`remove_leftover_mounts`] at its stop). Removing it first would show the bare
/// directory to applications until the new mount is up (an application that survived
/// the killed PRIM, writing by path): writes no mark records, SECOND never gets, and a
/// reintegration never looks at. A dead mount fails every access instead.
///
/// When the directory is itself a mount point (the operator's own file system) under
/// the leftovers, or holds one, nothing can reach it past them: they are removed first,
/// as for SECOND, and the moment in between is logged.
pub(crate) fn open_tree_beneath_leftovers(dir: &Path) -> Result<Tree, MirrorError> {
    let at =
        absolute_without_following(dir).map_err(MirrorError::io("resolve the replicated dir"))?;
    let entries = mount_table().map_err(MirrorError::io("read the mount table"))?;
    let (stack, beneath) = leftover_stack(&entries, &at);
    let (Some(beneath), false) = (beneath, stack.is_empty()) else {
        return open_tree_for_role(dir);
    };
    let Ok(relative) = at.strip_prefix(&beneath.mount_point) else {
        return open_tree_for_role(dir);
    };
    // The copy below holds neither a file system mounted at the directory itself nor
    // those mounted inside it; only removing the leftovers first shows them again.
    let nested = entries
        .iter()
        .any(|e| e.mount_point != at && e.mount_point.starts_with(&at));
    if relative.as_os_str().is_empty() || nested {
        tracing::warn!(
            dir = %at.display(),
            "the replicated dir is or holds a mount point under what a previous run left: \
             removing that first; until the interception is mounted the bare directory is \
             exposed"
        );
        return open_tree_for_role(dir);
    }
    use rustix::fs::{Mode, OFlags, CWD};
    use rustix::mount::{open_tree, OpenTreeFlags};
    let io = |e: rustix::io::Errno| io::Error::from_raw_os_error(e.raw_os_error());
    // A copy of the file system the directory is in, without the mounts on it.
    let clone = open_tree(
        CWD,
        &beneath.mount_point,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(io)
    .map_err(MirrorError::io(
        "reach the replicated dir beneath a previous run's mounts",
    ))?;
    let root = rustix::fs::openat(
        &clone,
        relative,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)
    .map_err(MirrorError::io("open the replicated dir"))?;
    tracing::warn!(
        dir = %at.display(),
        mounts = stack.len(),
        "serving the dir from beneath what a previous run left; removed at this PRIM's stop"
    );
    writable(Tree::from_root(root), dir)
}

fn writable(tree: Tree, dir: &Path) -> Result<Tree, MirrorError> {
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

fn mount_table() -> io::Result<Vec<MountEntry>> {
    let table = String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo")?).into_owned();
    Ok(table.lines().filter_map(parse_line).collect())
}

/// Removes the mounts a killed PRIM or SECOND left at `dir`, topmost first, logging
/// each. Stops at the first mount that is not one of them.
pub(crate) fn remove_leftover_mounts(dir: &Path) -> io::Result<()> {
    let dir = absolute_without_following(dir)?;
    // Each round removes one; a bound in case the table does not change under us.
    for _ in 0..16 {
        let entries = mount_table()?;
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
    let (stack, _) = leftover_stack(entries, dir);
    let top = stack.first()?;
    Some(leftover_kind(entries, top, dir)?.into())
}

/// The leftovers of ours stacked at `dir`, topmost first, and the mount beneath the
/// lowest of them (the one that holds the directory, or the operator's mount at it).
fn leftover_stack<'a>(
    entries: &'a [MountEntry],
    dir: &Path,
) -> (Vec<&'a MountEntry>, Option<&'a MountEntry>) {
    let at: Vec<&MountEntry> = entries.iter().filter(|e| e.mount_point == dir).collect();
    // Mounts stacked at one point: each later one's parent is the one it covers.
    let Some(mut top) = at
        .iter()
        .copied()
        .find(|e| !at.iter().any(|other| other.parent == e.id))
    else {
        return (Vec::new(), None);
    };
    let mut stack = Vec::new();
    loop {
        if top.mount_point != dir || leftover_kind(entries, top, dir).is_none() {
            return (stack, Some(top));
        }
        stack.push(top);
        match entries.iter().find(|e| e.id == top.parent) {
            Some(below) => top = below,
            None => return (stack, None),
        }
    }
}

/// Which leftover of ours `mount` (at `dir`) is, if it is one.
fn leftover_kind(entries: &[MountEntry], mount: &MountEntry, dir: &Path) -> Option<&'static str> {
    let fuse = mount.fs_type == "fuse" || mount.fs_type == format!("fuse.{FUSE_SUBTYPE}");
    if fuse && mount.source == FUSE_SOURCE {
        return Some("the interception mount");
    }
    let below = entries.iter().find(|e| e.id == mount.parent)?;
    let relative = dir.strip_prefix(&below.mount_point).ok()?;
    let bind_of_itself = mount.device == below.device && mount.root == below.root.join(relative);
    (bind_of_itself && mount.read_only).then_some("the read-only bind mount")
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
    fn finds_what_lies_beneath_the_leftovers() {
        let mut entries = table();
        let ids = |dir: &str, entries: &[MountEntry]| {
            let (stack, beneath) = leftover_stack(entries, Path::new(dir));
            let stack: Vec<u64> = stack.iter().map(|e| e.id).collect();
            (stack, beneath.map(|e| e.id))
        };
        assert_eq!(ids("/srv/data/my dir", &entries), (vec![44, 40], Some(30)));
        assert_eq!(ids("/srv/pg", &entries), (vec![41], Some(30)));
        assert_eq!(ids("/srv/own", &entries), (vec![], Some(42)));
        assert_eq!(ids("/srv/nothing", &entries), (vec![], None));
        // A dead interception mount over the operator's own file system at the dir.
        entries.push(parse_line("46 42 0:54 / /srv/own rw - fuse rampart-mirror rw").unwrap());
        assert_eq!(ids("/srv/own", &entries), (vec![46], Some(42)));
    }

    #[test]
    fn unescapes_only_octal_escapes() {
        assert_eq!(unescape("/a\\040b\\134c\\x"), Path::new("/a b\\c\\x"));
    }
}
