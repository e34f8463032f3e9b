//! Reintegration planning, without I/O: what a full comparison of both listings
//! decides, which zones differ, how hash requests are batched.

use std::collections::BTreeMap;

use crate::protocol::{Kind, Meta, RelPath};

/// Files hashed per request in a full comparison, and the bytes they may hold: many
/// small files share a round trip, a large file keeps the answer prompt.
const HASH_BATCH_FILES: usize = 512;
const HASH_BATCH_BYTES: u64 = 256 << 20;

/// The outcome of comparing both trees in a full synchronisation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FullPlan {
    /// Entries only SECOND has (topmost only).
    pub remove: Vec<RelPath>,
    /// Entries whose kind or attributes differ, or that SECOND lacks.
    pub reconcile: Vec<RelPath>,
    /// Files SECOND lacks entirely: every zone is sent.
    pub copy: Vec<RelPath>,
    /// Files on both sides, not empty here: compared zone by zone. (An empty file
    /// has no zones; reconciling its size empties SECOND's.)
    pub compare: Vec<RelPath>,
}

/// Compares both listings. Pure.
pub fn plan_full(local: &[(RelPath, Meta)], remote: &[(RelPath, Meta)]) -> FullPlan {
    let local_map: BTreeMap<&[u8], &Meta> = local.iter().map(|(p, m)| (&p[..], m)).collect();
    let remote_map: BTreeMap<&[u8], &Meta> = remote.iter().map(|(p, m)| (&p[..], m)).collect();
    let mut plan = FullPlan::default();
    for (path, meta) in remote {
        let stale = local_map.get(&path[..]).is_none_or(|l| l.kind != meta.kind);
        let under_removed = plan
            .remove
            .last()
            .is_some_and(|r| rampart_storage::book::is_within(path, r));
        if stale && !local_map.contains_key(&path[..]) && !under_removed {
            plan.remove.push(path.clone());
        }
    }
    for (path, meta) in local {
        match remote_map.get(&path[..]) {
            None => {
                plan.reconcile.push(path.clone());
                if meta.kind == Kind::File {
                    plan.copy.push(path.clone());
                }
            }
            Some(remote) if remote.kind != meta.kind => {
                plan.reconcile.push(path.clone());
                if meta.kind == Kind::File {
                    plan.copy.push(path.clone());
                }
            }
            Some(remote) => {
                if !same_attributes(meta, remote) {
                    plan.reconcile.push(path.clone());
                }
                if meta.kind == Kind::File && meta.size > 0 {
                    plan.compare.push(path.clone());
                }
            }
        }
    }
    plan
}

/// Splits `paths` into runs of at most [`HASH_BATCH_FILES`] files holding at most
/// [`HASH_BATCH_BYTES`] together (a larger file goes alone). Pure.
pub(super) fn hash_batches<'p>(
    paths: &'p [RelPath],
    sizes: &BTreeMap<&[u8], u64>,
) -> Vec<&'p [RelPath]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, path) in paths.iter().enumerate() {
        let size = sizes.get(&path[..]).copied().unwrap_or(0);
        if i > start && (i - start == HASH_BATCH_FILES || bytes + size > HASH_BATCH_BYTES) {
            batches.push(&paths[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < paths.len() {
        batches.push(&paths[start..]);
    }
    batches
}

fn same_attributes(a: &Meta, b: &Meta) -> bool {
    a.perm == b.perm
        && a.uid == b.uid
        && a.gid == b.gid
        && a.size == b.size
        && a.target == b.target
        && a.rdev == b.rdev
        && a.xattrs == b.xattrs
        && (a.kind == Kind::Dir || a.mtime == b.mtime)
}

/// Zones whose hashes differ, plus zones only one side has.
pub fn differing_zones(local: &[[u8; 32]], remote: &[[u8; 32]]) -> Vec<u64> {
    (0..local.len())
        .filter(|&i| remote.get(i) != Some(&local[i]))
        .map(|i| i as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Time;

    fn meta(kind: Kind, size: u64) -> Meta {
        Meta {
            kind,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime: Time { secs: 1, nanos: 0 },
            rdev: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
        }
    }

    fn p(s: &str) -> RelPath {
        s.as_bytes().to_vec()
    }

    #[test]
    fn full_plan_removes_extra_trees_once_copies_missing_files_and_compares_the_rest() {
        let local = vec![
            (p("a"), meta(Kind::File, 10)),
            (p("d"), meta(Kind::Dir, 0)),
            (p("d/new"), meta(Kind::File, 5)),
            (p("e"), meta(Kind::File, 0)),
            (p("k"), meta(Kind::File, 1)),
        ];
        let mut changed = meta(Kind::File, 10);
        changed.perm = 0o600;
        let remote = vec![
            (p("a"), changed),
            (p("d"), meta(Kind::Dir, 0)),
            (p("e"), meta(Kind::File, 0)),
            (p("gone"), meta(Kind::Dir, 0)),
            (p("gone/x"), meta(Kind::File, 3)),
            (p("k"), meta(Kind::Dir, 0)),
        ];
        let plan = plan_full(&local, &remote);
        assert_eq!(
            plan,
            FullPlan {
                remove: vec![p("gone")],
                reconcile: vec![p("a"), p("d/new"), p("k")],
                copy: vec![p("d/new"), p("k")],
                compare: vec![p("a")],
            }
        );
    }

    #[test]
    fn hash_batches_bound_files_and_bytes_and_keep_every_path_once() {
        let paths: Vec<RelPath> = (0..1200).map(|i| p(&format!("f{i}"))).collect();
        let mut sizes: BTreeMap<&[u8], u64> = paths.iter().map(|p| (&p[..], 1000)).collect();
        // f600 alone exceeds the byte bound; f601 and f602 together do.
        sizes.insert(b"f600", HASH_BATCH_BYTES + 1);
        sizes.insert(b"f601", HASH_BATCH_BYTES / 2 + 1);
        sizes.insert(b"f602", HASH_BATCH_BYTES / 2 + 1);
        let batches = hash_batches(&paths, &sizes);
        let lengths: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        assert_eq!(lengths, vec![512, 88, 1, 1, 512, 86]);
        assert_eq!(batches.concat(), paths);
        assert!(hash_batches(&[], &sizes).is_empty());
    }

    #[test]
    fn differing_zones_include_zones_the_peer_lacks() {
        let a = [[1u8; 32], [2; 32], [3; 32]];
        let b = [[1u8; 32], [9; 32]];
        assert_eq!(differing_zones(&a, &b), vec![1, 2]);
        assert!(differing_zones(&a, &a).is_empty());
    }
}
