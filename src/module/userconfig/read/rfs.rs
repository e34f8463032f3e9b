//! `<rfs>`: replicated directories and replication settings.

use super::parse_with;
use super::*;
use crate::config::xml::{ConfigError, Element};

pub(super) fn read_rfs(rfs: &Element, warnings: &mut Vec<String>) -> Result<Rfs, ConfigError> {
    warnings.extend(rfs.check_attributes(
        &["sync", "zone_size"],
        &[
            ("mountover", "Rampart always mounts its replication layer over the directory itself"),
            ("async", "SECOND's disk writes follow <rfs sync=…> (write: acknowledged on receipt; durable: on SECOND's disk)"),
            ("acl", "ACLs are replicated as extended attributes"),
            ("locktimeout", "replication takes no file locks"),
            ("nbrei", "reintegration copies only changed zones, from its bookkeeping"),
            ("nbremconn", "each module has one ordered replication stream"),
        ],
    )?);
    rfs.check_children(&["replicated"])?;
    let sync = parse_with(rfs, "sync", "write, durable or fsync", |v| match v {
        "write" => Some(SyncMode::Write),
        "durable" => Some(SyncMode::Durable),
        "fsync" => Some(SyncMode::Fsync),
        _ => None,
    })?
    .unwrap_or(SyncMode::Write);
    let zone_size = parse_with(
        rfs,
        "zone_size",
        "a power of two from 4K to 64M (bytes, or with K or M)",
        |v| {
            let (digits, scale) = match v.strip_suffix(['K', 'k']) {
                Some(d) => (d, 1 << 10),
                None => match v.strip_suffix(['M', 'm']) {
                    Some(d) => (d, 1 << 20),
                    None => (v, 1),
                },
            };
            let size = digits.parse::<u64>().ok()?.checked_mul(scale)?;
            (size.is_power_of_two() && (4 << 10..=64 << 20).contains(&size)).then_some(size)
        },
    )?
    .unwrap_or(1 << 20);
    let mut replicated: Vec<Replicated> = Vec::new();
    for dir in rfs.children_named("replicated") {
        dir.check_attributes(&["dir", "mode"], &[])?;
        dir.check_children(&["notreplicated"])?;
        if let Some(mode) = dir.attr("mode") {
            if mode != "read_only" {
                return Err(dir.error(format!(
                    "mode=\"{mode}\" of <replicated>: only read_only (the SECOND copy is always read-only)"
                )));
            }
        }
        let path = normal_path(dir.required("dir")?, true).ok_or_else(|| {
            dir.error("'dir' of <replicated> must be an absolute path without '..'")
        })?;
        if path == "/" {
            return Err(dir.error("the root directory cannot be replicated"));
        }
        if let Some(other) = replicated
            .iter()
            .find(|r| nested(&r.dir, &path) || nested(&path, &r.dir))
        {
            return Err(dir.error(format!(
                "{path} overlaps the replicated directory {}",
                other.dir
            )));
        }
        let mut notreplicated = Vec::new();
        for skip in dir.children_named("notreplicated") {
            skip.check_attributes(&["path"], &[])?;
            skip.check_children(&[])?;
            let relative = normal_path(skip.required("path")?, false).ok_or_else(|| {
                skip.error("'path' of <notreplicated> must be relative to the replicated directory, without '..'")
            })?;
            notreplicated.push(relative);
        }
        replicated.push(Replicated {
            dir: path,
            notreplicated,
        });
    }
    Ok(Rfs {
        sync,
        zone_size,
        replicated,
    })
}

/// `path` without `.`, empty parts and trailing `/`; `None` when it has `..` or is not
/// absolute (relative) as asked.
fn normal_path(path: &str, absolute: bool) -> Option<String> {
    if path.starts_with('/') != absolute {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    if !absolute && parts.is_empty() {
        return None;
    }
    let joined = parts.join("/");
    Some(if absolute {
        format!("/{joined}")
    } else {
        joined
    })
}

fn nested(outer: &str, inner: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}
