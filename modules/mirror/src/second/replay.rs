//! Replaying on SECOND the renames PRIM journaled while SECOND was away.

use std::io;

use rampart_storage::JournalEntry;

use crate::protocol::{self, Op};
use crate::tree::Tree;

/// Replays a rename PRIM made while this copy was away; returns what it changed here.
///
/// The journal holds renames only, so this copy may lack the source (created since) or
/// still hold an entry at the destination (removed since). PRIM's rename left the
/// source's data at the destination and nothing else there, so what stands in the way
/// is replaced (`RENAME_NOREPLACE` held on PRIM, not here), and a rename that cannot
/// be made here leaves its destination empty: the reintegration then copies it whole,
/// where a stale entry of the same kind would pass for the right one.
pub(super) fn replay(tree: &Tree, entry: JournalEntry) -> Vec<Op> {
    let (op, names) = match entry {
        JournalEntry::Rename { from, to, flags } => {
            let flags = flags & libc::RENAME_EXCHANGE;
            let names = if flags != 0 {
                vec![from.clone(), to.clone()]
            } else {
                vec![to.clone()]
            };
            (Op::Rename { from, to, flags }, names)
        }
        JournalEntry::Link { from, to } => (
            Op::Link {
                from: from.clone(),
                to: to.clone(),
            },
            vec![to],
        ),
    };
    if op
        .paths()
        .iter()
        .any(|p| protocol::validate_path(p).is_err())
    {
        return Vec::new();
    }
    let in_the_way = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EEXIST | libc::ENOTEMPTY | libc::EISDIR | libc::ENOTDIR)
        )
    };
    let mut done = Vec::new();
    let mut result = tree.apply(&op, &[]);
    if matches!(&result, Err(e) if in_the_way(e)) && matches!(op, Op::Rename { flags: 0, .. }) {
        let to = op.path().to_vec();
        if tree.remove_tree(&to).is_ok() {
            done.push(Op::RemoveTree { path: to });
        }
        result = tree.apply(&op, &[]);
    }
    match result {
        Ok(()) => done.push(op),
        Err(e) => {
            tracing::debug!(?op, "replay: {e}; the destination is copied whole");
            for path in names {
                if tree.remove_tree(&path).is_ok() {
                    done.push(Op::RemoveTree { path });
                }
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename(from: &str, to: &str, flags: u32) -> JournalEntry {
        JournalEntry::Rename {
            from: from.into(),
            to: to.into(),
            flags,
        }
    }

    #[test]
    fn a_replayed_rename_replaces_what_stands_at_its_destination() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "new").unwrap();
        std::fs::create_dir_all(dir.path().join("y/stale")).unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        // NOREPLACE held on PRIM, where `y` had been removed first.
        replay(&tree, rename("x", "y", libc::RENAME_NOREPLACE));
        assert_eq!(std::fs::read(dir.path().join("y")).unwrap(), b"new");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn a_rename_that_cannot_be_replayed_leaves_its_destination_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("old", dir.path().join("y")).unwrap();
        std::fs::write(dir.path().join("a"), "a").unwrap();
        std::fs::write(dir.path().join("b"), "b").unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        // The source was made on PRIM while this copy was away: absent here.
        let done = replay(&tree, rename("made-since", "y", 0));
        assert!(std::fs::symlink_metadata(dir.path().join("y")).is_err());
        assert_eq!(
            done,
            vec![Op::RemoveTree {
                path: b"y".to_vec()
            }]
        );
        // An exchange with one side absent here: neither name keeps a stale entry.
        replay(&tree, rename("a", "absent", libc::RENAME_EXCHANGE));
        assert!(!dir.path().join("a").exists());
        // Names outside the tree are ignored.
        assert!(replay(&tree, rename("../b", "b", 0)).is_empty());
        assert!(dir.path().join("b").exists());
    }
}
