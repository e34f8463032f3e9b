//! FUSE inode numbers by (parent, name): a path is rebuilt by walking parents, so a
//! rename moves a whole subtree at once. Hard links therefore appear as distinct FUSE
//! inodes (st_ino is still the real one).

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
        }
    }
}

pub(super) struct Inodes {
    pub(super) nodes: HashMap<u64, Node>,
    /// Linked nodes by (parent, name).
    by_name: HashMap<(u64, Vec<u8>), u64>,
    /// The next inode number; numbers are never reused.
    next: u64,
}

const ROOT: u64 = 1;

impl Inodes {
    pub(super) fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(ROOT, Vec::new()));
        Inodes {
            nodes,
            by_name: HashMap::new(),
            next: ROOT + 1,
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

    /// The node for (parent, name), created if new; counts one lookup.
    pub(super) fn lookup(&mut self, parent: u64, name: &[u8]) -> u64 {
        if let Some(&ino) = self.by_name.get(&(parent, name.to_vec())) {
            self.nodes
                .get_mut(&ino)
                .expect("by_name is consistent")
                .lookups += 1;
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node::new(parent, name.to_vec()));
        self.by_name.insert((parent, name.to_vec()), ino);
        ino
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
