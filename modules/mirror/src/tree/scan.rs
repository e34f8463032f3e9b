//! Reading the tree for comparison and copying: listings, entries, zones and their
//! hashes.

use std::io;

use rustix::fs::{self as rfs, OFlags};

use super::*;
use crate::protocol::{Kind, Meta, Op, RelPath};

impl Tree {
    /// An [`Op::Zone`] carrying zone `zone` of the file at `path` as it is now, or `None`
    /// when `path` is not a file.
    pub fn zone(
        &self,
        path: &[u8],
        zone: u64,
        zone_size: u64,
    ) -> io::Result<Option<(Op, Vec<u8>)>> {
        let Some(stat) = self.stat(path)? else {
            return Ok(None);
        };
        if kind_of(stat.st_mode) != Kind::File {
            return Ok(None);
        }
        let size = stat.st_size as u64;
        let offset = zone * zone_size;
        let (mut data, mut zeros) = (Vec::new(), 0);
        if offset < size {
            let fd = self.open_at(path, OFlags::RDONLY, 0)?;
            let end = size.min(offset + zone_size);
            // A zone that is one hole (a file grown by truncate, a punched range) goes
            // as its length: a sparse image must not cross the link as zeros.
            let hole = match rfs::seek(&fd, rfs::SeekFrom::Data(offset)) {
                Ok(next_data) => next_data >= end,
                Err(rustix::io::Errno::NXIO) => true,
                Err(_) => false,
            };
            if hole {
                zeros = end - offset;
            } else {
                data = read_at(&fd, offset, zone_size as usize)?;
            }
        }
        let path = path.to_vec();
        Ok(Some((
            Op::Zone {
                path,
                offset,
                zeros,
                size,
            },
            data,
        )))
    }

    /// Names and kinds of a directory's entries, sorted by name.
    pub fn children(&self, path: &[u8]) -> io::Result<Vec<Child>> {
        Ok(self
            .entries(path)?
            .into_iter()
            .map(|(name, kind, _)| (name, kind))
            .collect())
    }

    /// Names, kinds and inode numbers of a directory's entries, sorted by name.
    pub fn entries(&self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Kind, u64)>> {
        let fd = self.open_at(path, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        let mut entries = Vec::new();
        for entry in rfs::Dir::new(fd).io()? {
            let entry = entry.io()?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    let child = join(path, name);
                    match self.stat(&child)? {
                        Some(stat) => kind_of(stat.st_mode),
                        None => continue,
                    }
                }
                other => kind_of(other.as_raw_mode()),
            };
            entries.push((name.to_vec(), kind, entry.ino()));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Every entry beneath `path` with its metadata, in byte order of their paths
    /// (so parents before children). Entries that vanish during the walk are skipped.
    pub fn list(&self, path: &[u8]) -> io::Result<Vec<(RelPath, Meta)>> {
        Ok(self.list_after(path, None, usize::MAX)?.0)
    }

    /// The part of [`Tree::list`] after the path `after` (from the start when `None`)
    /// until about `budget` bytes of paths and metadata, and whether it reached the
    /// end. Reading a tree in parts costs one walk over all parts together: subtrees
    /// wholly before `after` are not entered.
    pub fn list_after(
        &self,
        path: &[u8],
        after: Option<&[u8]>,
        budget: usize,
    ) -> io::Result<(Vec<(RelPath, Meta)>, bool)> {
        let mut listing = Listing {
            out: Vec::new(),
            after,
            bytes: 0,
            budget,
        };
        let complete = self.list_into(path, &mut listing)?;
        Ok((listing.out, complete))
    }

    /// Walks `dir` in path order; false when the budget ran out first.
    fn list_into(&self, dir: &[u8], listing: &mut Listing) -> io::Result<bool> {
        let children = match self.children(dir) {
            Ok(children) => children,
            Err(e) if missing(&e) => return Ok(true),
            Err(e) => return Err(e),
        };
        // A directory `d` stands in this order twice: itself as `d`, its contents as
        // `d/`, which sorts after `d.x` and before `d0`.
        let mut keys: Vec<(RelPath, bool)> = Vec::with_capacity(children.len());
        for (name, kind) in children {
            let child = join(dir, &name);
            if kind == Kind::Dir {
                let mut contents = child.clone();
                contents.push(b'/');
                keys.push((contents, true));
            }
            keys.push((child, false));
        }
        keys.sort_unstable();
        for (key, contents) in keys {
            if contents {
                if listing
                    .after
                    .is_some_and(|a| a > &key[..] && !a.starts_with(&key))
                {
                    continue; // everything under it is before `after`
                }
                if !self.list_into(&key[..key.len() - 1], listing)? {
                    return Ok(false);
                }
                continue;
            }
            if listing.after.is_some_and(|a| &key[..] <= a) {
                continue;
            }
            if listing.bytes >= listing.budget {
                return Ok(false);
            }
            let Some(meta) = self.meta(&key)? else {
                continue;
            };
            listing.bytes += encoded_size(&key, &meta);
            listing.out.push((key, meta));
        }
        Ok(true)
    }

    /// The part of [`Tree::children`] after the name `after` until about `budget`
    /// bytes of names, and whether it reached the end.
    pub fn children_after(
        &self,
        path: &[u8],
        after: Option<&[u8]>,
        budget: usize,
    ) -> io::Result<(Vec<Child>, bool)> {
        let mut bytes = 0;
        let mut out = Vec::new();
        for (name, kind) in self.children(path)? {
            if after.is_some_and(|a| &name[..] <= a) {
                continue;
            }
            if bytes >= budget {
                return Ok((out, false));
            }
            bytes += name.len() + 8;
            out.push((name, kind));
        }
        Ok((out, true))
    }

    /// blake3 of each `zone_size` zone of a regular file; empty when it is absent or
    /// not a regular file.
    pub fn zone_hashes(&self, path: &[u8], zone_size: u64) -> io::Result<Vec<[u8; 32]>> {
        match self.stat(path)? {
            Some(stat) if kind_of(stat.st_mode) == Kind::File => {}
            _ => return Ok(Vec::new()),
        }
        let fd = self.open_at(path, OFlags::RDONLY, 0)?;
        let mut hashes = Vec::new();
        let mut offset = 0u64;
        loop {
            let zone = read_at(&fd, offset, zone_size as usize)?;
            if zone.is_empty() {
                break;
            }
            hashes.push(*blake3::hash(&zone).as_bytes());
            offset += zone.len() as u64;
            if (zone.len() as u64) < zone_size {
                break;
            }
        }
        Ok(hashes)
    }
}

/// A directory entry: its name and what it is.
pub type Child = (Vec<u8>, Kind);

/// A listing in progress: what it has, where it starts, what it may still take.
struct Listing<'a> {
    out: Vec<(RelPath, Meta)>,
    after: Option<&'a [u8]>,
    bytes: usize,
    budget: usize,
}

/// About what an entry takes in an answer (an upper bound on its bincode size).
fn encoded_size(path: &[u8], meta: &Meta) -> usize {
    let xattrs: usize = meta
        .xattrs
        .iter()
        .map(|(n, v)| n.len() + v.len() + 20)
        .sum();
    path.len() + meta.target.len() + xattrs + 80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_hashes_cover_the_file_in_zones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![7u8; 2500]).unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let hashes = tree.zone_hashes(b"f", 1024).unwrap();
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes[0], hashes[1]);
        assert_eq!(hashes[2], *blake3::hash(&[7u8; 452]).as_bytes());
        assert!(tree.zone_hashes(b"absent", 1024).unwrap().is_empty());
    }

    #[test]
    fn a_listing_read_in_parts_is_the_whole_listing_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["d", "d/e", "d-x", "d0", "e"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        for f in ["d.x", "d/a", "d/e/b", "d/e.c", "d0/z", "a", "z", "d-x/y"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        let tree = Tree::open(dir.path()).unwrap();
        let whole = tree.list(b"").unwrap();
        let names: Vec<RelPath> = whole.iter().map(|(p, _)| p.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "byte order of the paths");
        assert_eq!(names.len(), 13);
        for budget in [1, 100, 200, 1000] {
            let (mut parts, mut after) = (Vec::new(), None::<RelPath>);
            loop {
                let (part, complete) = tree.list_after(b"", after.as_deref(), budget).unwrap();
                assert!(complete || !part.is_empty(), "every part makes progress");
                after = part.last().map(|(p, _)| p.clone()).or(after);
                parts.extend(part);
                if complete {
                    break;
                }
            }
            assert_eq!(parts, whole, "budget {budget}");
        }
        let (under_d, complete) = tree.list_after(b"d", None, usize::MAX).unwrap();
        assert!(complete);
        let under_d: Vec<&[u8]> = under_d.iter().map(|(p, _)| &p[..]).collect();
        assert_eq!(under_d, [&b"d/a"[..], b"d/e", b"d/e.c", b"d/e/b"]);
        let (part, complete) = tree.children_after(b"", Some(b"d0"), 1).unwrap();
        assert!(!complete);
        assert_eq!(part, [(b"e".to_vec(), Kind::Dir)]);
    }
}
