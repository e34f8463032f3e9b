//! Module packages: `NAME.safe`, a zip holding `NAME/conf/userconfig.xml` and
//! `NAME/bin/*` (SafeKit's shape).
//!
//! [`Package::open`] accepts an archive only if everything in it is safe to unpack
//! and the configuration is valid; otherwise it says which entry is wrong and why:
//! paths that climb out (`..`) or are absolute, links that point outside the module,
//! special files, archives or contents over the size limits, a missing
//! `conf/userconfig.xml`, scripts without the run bit.

use std::collections::BTreeSet;
use std::io::{Cursor, Read, Write};
use std::path::{Component, Path, PathBuf};

use rampart_raft::validate_name;

use super::userconfig::{self, UserConfig};
use crate::config::ConfigError;

/// Largest package accepted (it is written to the Raft log as is).
pub const MAX_PACKAGE_BYTES: usize = 16 << 20;
/// Largest total size of the unpacked files (zip bombs).
pub const MAX_UNPACKED_BYTES: u64 = 128 << 20;
pub const MAX_ENTRIES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("the package is {0} bytes; the limit is {MAX_PACKAGE_BYTES}")]
    TooLarge(usize),
    #[error("not a zip archive: {0}")]
    NotZip(String),
    #[error("the archive has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("the unpacked files would exceed {MAX_UNPACKED_BYTES} bytes")]
    UnpackedTooLarge,
    #[error("entry '{path}': {reason}")]
    Entry { path: String, reason: String },
    #[error("the archive is empty")]
    Empty,
    #[error("{0}")]
    Name(String),
    #[error("the package has no {0}/conf/userconfig.xml")]
    MissingUserconfig(String),
    #[error("{0}")]
    Config(#[from] ConfigError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Dir,
    File {
        mode: u32,
        data: Vec<u8>,
    },
    /// Relative target that stays inside the module folder.
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub config: UserConfig,
    pub userconfig: String,
    /// Paths relative to the module folder (`bin/start_prim`), in archive order.
    pub entries: Vec<(String, Content)>,
    /// blake3 of `bytes`, hex.
    pub digest: String,
    pub bytes: Vec<u8>,
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

impl Package {
    pub fn open(bytes: Vec<u8>) -> Result<Package, PackageError> {
        if bytes.len() > MAX_PACKAGE_BYTES {
            return Err(PackageError::TooLarge(bytes.len()));
        }
        let mut archive = zip::ZipArchive::new(Cursor::new(&bytes))
            .map_err(|e| PackageError::NotZip(e.to_string()))?;
        if archive.len() > MAX_ENTRIES {
            return Err(PackageError::TooManyEntries);
        }
        if archive.is_empty() {
            return Err(PackageError::Empty);
        }
        let mut name: Option<String> = None;
        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        let mut unpacked = 0u64;
        for index in 0..archive.len() {
            let mut file = archive
                .by_index(index)
                .map_err(|e| PackageError::NotZip(e.to_string()))?;
            let raw = file
                .name()
                .map_err(|e| {
                    PackageError::NotZip(format!("entry {index} has an unreadable name: {e}"))
                })?
                .to_string();
            let entry_error = |reason: &str| PackageError::Entry {
                path: raw.clone(),
                reason: reason.to_string(),
            };
            let parts = safe_parts(&raw).map_err(&entry_error)?;
            let top = parts[0].clone();
            match &name {
                None => {
                    validate_name("module", &top).map_err(PackageError::Name)?;
                    name = Some(top);
                }
                Some(n) if *n != top => {
                    return Err(entry_error(&format!("outside the module folder '{n}/'")));
                }
                Some(_) => {}
            }
            let relative = parts[1..].join("/");
            if relative.is_empty() {
                continue; // the module folder itself
            }
            if !seen.insert(relative.clone()) {
                return Err(entry_error("appears twice"));
            }
            let mode = file.unix_mode();
            let kind = mode.map(|m| m & S_IFMT);
            let content = if file.is_dir() || kind == Some(S_IFDIR) {
                Content::Dir
            } else {
                let declared = file.size();
                unpacked += declared;
                if unpacked > MAX_UNPACKED_BYTES {
                    return Err(PackageError::UnpackedTooLarge);
                }
                // Never trust the declared size: read at most one byte more.
                let mut data = Vec::new();
                (&mut file)
                    .take(declared + 1)
                    .read_to_end(&mut data)
                    .map_err(|e| entry_error(&format!("cannot be read: {e}")))?;
                if data.len() as u64 != declared {
                    return Err(entry_error(
                        "its size does not match the archive's directory",
                    ));
                }
                match kind {
                    Some(S_IFLNK) => {
                        let target = String::from_utf8(data)
                            .map_err(|_| entry_error("link target is not UTF-8"))?;
                        check_link(&parts[1..], &target).map_err(|reason| entry_error(&reason))?;
                        Content::Symlink { target }
                    }
                    Some(S_IFREG) | None | Some(0) => {
                        let mode = mode.map_or(0o644, |m| m & 0o7777);
                        if relative.starts_with("bin/") && mode & 0o111 == 0 {
                            return Err(entry_error(
                                "a script without the run bit (chmod +x it before zipping, and zip on a Unix system)",
                            ));
                        }
                        Content::File { mode, data }
                    }
                    Some(other) => {
                        return Err(entry_error(&format!(
                            "special file (type {other:o}) is not allowed"
                        )));
                    }
                }
            };
            entries.push((relative, content));
        }
        let name = name.ok_or(PackageError::Empty)?;
        let userconfig = entries
            .iter()
            .find_map(|(path, content)| match (path.as_str(), content) {
                ("conf/userconfig.xml", Content::File { data, .. }) => Some(data.clone()),
                _ => None,
            })
            .ok_or_else(|| PackageError::MissingUserconfig(name.clone()))?;
        let userconfig = String::from_utf8(userconfig).map_err(|_| PackageError::Entry {
            path: format!("{name}/conf/userconfig.xml"),
            reason: "is not UTF-8".into(),
        })?;
        let config = userconfig::parse(&format!("{name}/conf/userconfig.xml"), &userconfig)?;
        Ok(Package {
            digest: blake3::hash(&bytes).to_hex().to_string(),
            name,
            config,
            userconfig,
            entries,
            bytes,
        })
    }

    /// The same package with another `conf/userconfig.xml`, validated.
    pub fn with_userconfig(&self, text: &str) -> Result<Package, PackageError> {
        userconfig::parse(&format!("{}/conf/userconfig.xml", self.name), text)?;
        let mut entries = self.entries.clone();
        for (path, content) in &mut entries {
            if path == "conf/userconfig.xml" {
                if let Content::File { data, .. } = content {
                    *data = text.as_bytes().to_vec();
                }
            }
        }
        Package::open(build_zip(&self.name, &entries))
    }

    /// Writes the module folder `dir` (replacing what was there) from this package.
    /// The new folder is complete before it takes the place of the old one.
    pub fn materialize(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let staging = parent.join(format!(".{}.new", self.name));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        for (path, content) in &self.entries {
            let target = staging.join(path);
            if let Some(up) = target.parent() {
                std::fs::create_dir_all(up)?;
            }
            match content {
                Content::Dir => std::fs::create_dir_all(&target)?,
                Content::File { mode, data } => {
                    std::fs::write(&target, data)?;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
                }
                Content::Symlink { target: link } => std::os::unix::fs::symlink(link, &target)?,
            }
        }
        let old = parent.join(format!(".{}.old", self.name));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old)?;
        }
        std::fs::rename(&staging, dir)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

/// Splits an entry name into components; refuses absolute paths, `..`, backslashes
/// and empty names.
fn safe_parts(raw: &str) -> Result<Vec<String>, &'static str> {
    if raw.starts_with('/') || raw.contains('\\') || raw.contains(':') {
        return Err("absolute path (paths must be relative to the archive)");
    }
    let mut parts = Vec::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("path traversal ('..') out of the module folder"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute path (paths must be relative to the archive)")
            }
        }
    }
    if parts.is_empty() {
        return Err("empty path");
    }
    Ok(parts)
}

/// A link at `link_path` (inside the module folder) may only point inside it.
fn check_link(link_path: &[String], target: &str) -> Result<(), String> {
    if target.starts_with('/') {
        return Err(format!(
            "link to the absolute path '{target}' escapes the module"
        ));
    }
    let mut depth: Vec<&str> = link_path[..link_path.len() - 1]
        .iter()
        .map(String::as_str)
        .collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return Err(format!("link to '{target}' escapes the module"));
                }
            }
            p => depth.push(p),
        }
    }
    Ok(())
}

/// A zip of `entries` under the folder `name/`, with Unix modes.
pub fn build_zip(name: &str, entries: &[(String, Content)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (path, content) in entries {
        let full = format!("{name}/{path}");
        let result = match content {
            Content::Dir => writer.add_directory(full, options),
            Content::File { mode, data } => writer
                .start_file(full, options.unix_permissions(*mode))
                .and_then(|()| writer.write_all(data).map_err(Into::into)),
            Content::Symlink { target } => writer.add_symlink(full, target, options),
        };
        result.expect("writing a zip to memory cannot fail");
    }
    writer
        .finish()
        .expect("writing a zip to memory cannot fail")
        .into_inner()
}

/// Where a module's folder lives on a node.
pub fn module_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("modules").join(name)
}

#[cfg(test)]
mod tests;
