//! FUSE inode numbers by (parent, name): a path is rebuilt by walking parents, so a
//! rename moves a whole subtree at once. A node's number is the real file's inode
//! number (so `stat`, `readdir` and a later lookup after the kernel forgot it agree),
//! unless a live node already holds that number: two names of a file that had hard
//! links before mounting, or a number the disk gave again while an unlinked file is
//! still open. Those get a number above [`FRESH`] instead.

use std::collections::HashMap;
use std::sync::Weak;

use fuser::BackingId;

use crate::protocol::RelPath;

pub(super) struct Node {
    parent: u64,
    name: Vec<u8>,
    /// The kernel's references (lookups minus forgets); the node goes at zero.
    lookups: u64,
    /// False once unlinked or replaced: it has no path any more.
    linked: bool,
    /// Open handles by I/O mode (see [`super::handles::mode_for`] for the mixes allowed).
    pub(super) cached_opens: u32,
    pub(super) passthrough_opens: u32,
    pub(super) direct_opens: u32,
    /// The backing file the kernel reads for this inode's passthrough opens, shared by
    /// them and released with the last one.
    pub(super) backing: Weak<BackingId>,
    /// The file had no `security.capability` when the file system's count of changes
    /// to that attribute was this (see [`super::attrs::CAPABILITY`]).
    pub(super) capability_absent: Option<u64>,
    /// The pages the kernel may cache for this inode hold the file's bytes, so a cached
    /// open may keep them (FOPEN_KEEP_CACHE). True for a new node: the kernel's inode
    /// is new too (a node leaves the table only when the kernel forgets its inode), so
    /// it caches nothing yet. False for the rest of the node's life from the first
    /// change that may have bypassed those pages: a writable direct open, or a change of
    /// the file's bytes answered with an error (the kernel then keeps its pages as they
    /// were, though the file may have changed). Never true again: without
    /// KEEP_CACHE the kernel drops the pages only as that open completes, after the
    /// reply, so no later open could know they were dropped. Every other change comes
    /// through the mount and its success makes the kernel update or drop its pages.
    pub(super) pages_current: bool,
}

impl Node {
    /// A node the kernel has looked up once, with nothing open.
    pub(super) fn new(parent: u64, name: Vec<u8>) -> Node {
        Node {
            parent,
            name,
            lookups: 1,
            linked: true,
            cached_opens: 0,
            passthrough_opens: 0,
            direct_opens: 0,
            backing: Weak::new(),
            capability_absent: None,
            pages_current: true,
        }
    }
}

pub(super) struct Inodes {
    pub(super) nodes: HashMap<u64, Node>,
    /// Linked nodes by (parent, name).
    by_name: HashMap<(u64, Vec<u8>), u64>,
    /// The next number to try for a node whose real number is taken.
    next_fresh: u64,
}

const ROOT: u64 = 1;
/// Numbers given to nodes whose real number is taken start here, far above the inode
/// numbers disks give; one still in use by a real number is skipped.
const FRESH: u64 = 1 << 63;

impl Inodes {
    pub(super) fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(ROOT, Vec::new()));
        Inodes {
            nodes,
            by_name: HashMap::new(),
            next_fresh: FRESH,
        }
    }

    /// The path of a linked node.
    pub(super) fn path(&self, ino: u64) -> Option<RelPath> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let node = self.nodes.get(&at)?;
            if !node.linked {
                return None;
            }
            parts.push(&node.name[..]);
            at = node.parent;
        }
        parts.reverse();
        Some(parts.join(&b'/'))
    }

    /// The node for (parent, name), created if new with the number of the real file,
    /// `real_ino`, when no live node holds it; counts one lookup.
    pub(super) fn lookup(&mut self, parent: u64, name: &[u8], real_ino: u64) -> u64 {
        if let Some(&ino) = self.by_name.get(&(parent, name.to_vec())) {
            self.nodes
                .get_mut(&ino)
                .expect("by_name is consistent")
                .lookups += 1;
            return ino;
        }
        let ino = if real_ino > ROOT && !self.nodes.contains_key(&real_ino) {
            real_ino
        } else {
            self.fresh()
        };
        self.nodes.insert(ino, Node::new(parent, name.to_vec()));
        self.by_name.insert((parent, name.to_vec()), ino);
        ino
    }

    fn fresh(&mut self) -> u64 {
        loop {
            let ino = self.next_fresh;
            self.next_fresh = self.next_fresh.checked_add(1).unwrap_or(FRESH);
            if !self.nodes.contains_key(&ino) {
                return ino;
            }
        }
    }

    /// The number `readdir` gives for `name` in the directory `parent`: its node's when
    /// the kernel holds one, else the real file's (which a lookup will then give).
    pub(super) fn listed(&self, parent: u64, name: &[u8], real_ino: u64) -> u64 {
        match self.by_name.get(&(parent, name.to_vec())) {
            Some(&ino) => ino,
            None => real_ino,
        }
    }

    /// The number of a node's parent directory (for "..").
    pub(super) fn parent(&self, ino: u64) -> u64 {
        self.nodes.get(&ino).map_or(ROOT, |node| node.parent)
    }

    /// Whether `ino` is a node whose last name was removed (it lives while open).
    pub(super) fn is_unlinked(&self, ino: u64) -> bool {
        self.nodes.get(&ino).is_some_and(|node| !node.linked)
    }

    pub(super) fn unlink(&mut self, parent: u64, name: &[u8]) {
        if let Some(ino) = self.by_name.remove(&(parent, name.to_vec())) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.linked = false;
            }
        }
    }

    pub(super) fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        let moving = self.by_name.remove(&(parent, name.to_vec()));
        let replaced = self.by_name.remove(&(new_parent, new_name.to_vec()));
        if let Some(ino) = moving {
            let node = self.nodes.get_mut(&ino).expect("by_name is consistent");
            node.parent = new_parent;
            node.name = new_name.to_vec();
            self.by_name.insert((new_parent, new_name.to_vec()), ino);
        }
        if let Some(ino) = replaced {
            let node = self.nodes.get_mut(&ino).expect("by_name is consistent");
            if exchange {
                node.parent = parent;
                node.name = name.to_vec();
                self.by_name.insert((parent, name.to_vec()), ino);
            } else {
                node.linked = false;
            }
        }
    }

    pub(super) fn forget(&mut self, ino: u64, count: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups == 0 {
            let node = self.nodes.remove(&ino).expect("just found");
            if node.linked && self.by_name.get(&(node.parent, node.name.clone())) == Some(&ino) {
                self.by_name.remove(&(node.parent, node.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_takes_the_real_number_unless_a_live_node_holds_it() {
        let mut inodes = Inodes::new();
        assert_eq!(inodes.lookup(ROOT, b"a", 500), 500);
        assert_eq!(inodes.lookup(ROOT, b"a", 500), 500, "same name, same node");
        // A second name of the same file (hard links from before mounting).
        let other = inodes.lookup(ROOT, b"b", 500);
        assert!(other >= FRESH, "{other}");
        assert_eq!(inodes.listed(ROOT, b"b", 500), other, "readdir agrees");
        // "a" unlinked but still held by the kernel: the disk's reuse of 500 is fresh.
        inodes.unlink(ROOT, b"a");
        assert!(inodes.is_unlinked(500));
        let reused = inodes.lookup(ROOT, b"c", 500);
        assert!(reused >= FRESH && reused != other);
        // Once forgotten, the number is the real one again.
        inodes.forget(500, 2);
        inodes.forget(reused, 1);
        assert_eq!(inodes.lookup(ROOT, b"c", 500), 500);
        assert!(inodes.lookup(ROOT, b"root-like", ROOT) >= FRESH);
        assert_eq!(inodes.parent(500), ROOT);
    }
}
