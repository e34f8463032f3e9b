//! Removes what crashed runs left behind: namespaces, links, mounts, processes and
//! run folders whose owning process is gone.
//!
//! Every run owns a prefix `rjXXXX`; its folder `RUN_ROOT/<prefix>` holds `owner`, the
//! pid of the process that made it. Names of namespaces and links start with the
//! prefix, so everything of a run can be found from the prefix alone.

use std::path::{Path, PathBuf};

use super::shell::{pids_in, run, run_quiet, signal};

/// Where run folders live.
pub const RUN_ROOT: &str = "/tmp/rampart-jepsen";

/// True for names this harness makes: `rj` and four hex digits.
pub fn is_prefix(name: &str) -> bool {
    name.len() == 6 && name.starts_with("rj") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn owner_alive(run_dir: &Path) -> bool {
    std::fs::read_to_string(run_dir.join("owner"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(super::shell::is_alive)
}

/// Removes every resource of `prefix`: processes in its namespaces, the namespaces,
/// its links, mounts under its folder, and the folder.
pub fn remove_prefix(prefix: &str) {
    for ns in namespaces().into_iter().filter(|n| n.starts_with(prefix)) {
        for pid in pids_in(&ns) {
            signal(pid, libc::SIGKILL);
        }
        run_quiet("ip", &["netns", "del", &ns]);
    }
    for link in links().into_iter().filter(|l| l.starts_with(prefix)) {
        run_quiet("ip", &["link", "del", &link]);
    }
    let dir = PathBuf::from(RUN_ROOT).join(prefix);
    for mount in mounts_under(&dir) {
        run_quiet("umount", &["-l", &mount]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sweeps every run whose owner is dead. Returns the prefixes removed.
pub fn sweep_stale() -> Vec<String> {
    let mut prefixes: Vec<String> = namespaces()
        .into_iter()
        .chain(links())
        .filter_map(|n| n.get(..6).map(str::to_string))
        .chain(
            std::fs::read_dir(RUN_ROOT)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        )
        .filter(|p| is_prefix(p))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes.retain(|p| !owner_alive(&PathBuf::from(RUN_ROOT).join(p)));
    for prefix in &prefixes {
        remove_prefix(prefix);
    }
    prefixes
}

pub fn namespaces() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn links() -> Vec<String> {
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// What of `prefix` is still on the machine, for tests and the CLI.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| format!("namespace {n}"))
        .collect();
    found.extend(
        links()
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .map(|l| format!("link {l}")),
    );
    let dir = PathBuf::from(RUN_ROOT).join(prefix);
    found.extend(mounts_under(&dir).into_iter().map(|m| format!("mount {m}")));
    if dir.exists() {
        found.push(format!("folder {}", dir.display()));
    }
    found
}
