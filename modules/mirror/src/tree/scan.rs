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
    pub fn children(&self, path: &[u8]) -> io::Result<Vec<(Vec<u8>, Kind)>> {
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

    /// Every entry beneath `path` with its metadata, parents before children, sorted.
    /// Entries that vanish during the walk are skipped.
    pub fn list(&self, path: &[u8]) -> io::Result<Vec<(RelPath, Meta)>> {
        let mut out = Vec::new();
        let mut stack = vec![path.to_vec()];
        while let Some(dir) = stack.pop() {
            let children = match self.children(&dir) {
                Ok(children) => children,
                Err(e) if missing(&e) => continue,
                Err(e) => return Err(e),
            };
            let mut subdirs = Vec::new();
            for (name, kind) in children {
                let child = join(&dir, &name);
                let Some(meta) = self.meta(&child)? else {
                    continue;
                };
                if kind == Kind::Dir {
                    subdirs.push(child.clone());
                }
                out.push((child, meta));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
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
}
