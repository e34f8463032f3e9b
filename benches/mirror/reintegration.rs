//! Reintegration of a large tree after a small part changed while SECOND was away,
//! against rsync of the same trees and a plain copy of the changed files over the
//! replica's old versions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::targets::MirrorPair;
use crate::{drop_caches, pattern, Plan, ROOT};

/// Size of tree file `i`: 1 to 16 KiB.
fn tree_file_size(i: usize) -> usize {
    1024 * (1 + (i.wrapping_mul(2654435761) >> 7) % 16)
}

fn tree_file(root: &Path, i: usize) -> PathBuf {
    root.join(format!("d{:03}/f{i:06}", i % 100))
}

fn write_tree(roots: &[PathBuf], files: usize) {
    for root in roots {
        for d in 0..100 {
            std::fs::create_dir_all(root.join(format!("d{d:03}"))).unwrap();
        }
    }
    let content = pattern(16 << 10, 11);
    for i in 0..files {
        let size = tree_file_size(i);
        let start = i % 1024;
        let data = [&content[start..], &content[..start]].concat();
        for root in roots {
            std::fs::write(tree_file(root, i), &data[..size]).unwrap();
        }
    }
}

/// Copies the `changed` files of tree `from` to `to(i)`, then syncs the file system of
/// `synced`: seconds.
fn copy_and_sync(
    changed: &[usize],
    from: &Path,
    synced: &Path,
    to: impl Fn(usize) -> PathBuf,
) -> f64 {
    let started = Instant::now();
    for &i in changed {
        std::fs::copy(tree_file(from, i), to(i)).unwrap();
    }
    let _ = Command::new("sync").arg("-f").arg(synced).status();
    started.elapsed().as_secs_f64()
}

/// The files changed in round `round`: 1 % of the tree, spread over every directory.
fn changed_files(files: usize, round: usize) -> Vec<usize> {
    (0..files / 100).map(|k| k * 100 + 37 + round).collect()
}

pub fn run(plan: &Plan) {
    let root = Path::new(ROOT).join("reintegration");
    for sub in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let started = Instant::now();
    write_tree(
        &[root.join("a"), root.join("b"), root.join("c")],
        plan.tree_files,
    );
    println!(
        "\nreintegration: {} files in 100 directories, 1 to 16 KiB each (three copies written in {:.0} s)",
        plan.tree_files,
        started.elapsed().as_secs_f64()
    );

    // Both copies equal, no sync point: a full comparison that sends nothing.
    drop_caches();
    let mut pair = MirrorPair::new(&root, "write");
    pair.start_second();
    pair.start_prim();
    let (connected, _) = pair
        .prim()
        .wait_for("peer_connected", Duration::from_secs(60));
    let (synced, event) = pair.prim().wait_for("synced", Duration::from_secs(1800));
    println!(
        "  full comparison of equal trees (no sync point): {:.2} s, {} examined, {} bytes sent",
        (synced - connected).as_secs_f64(),
        event["examined"],
        event["bytes_sent"]
    );

    for round in 0..plan.reintegration_rounds {
        // SECOND leaves; 1 % of the files change on PRIM.
        pair.second.take().unwrap().terminate();
        pair.prim().wait_for("peer_lost", Duration::from_secs(60));
        let changed = changed_files(plan.tree_files, round);
        let mut changed_bytes = 0;
        for &i in &changed {
            let size = tree_file_size(i);
            changed_bytes += size;
            std::fs::write(
                tree_file(&pair.prim_dir(), i),
                pattern(size, (round * 1_000_000 + i) as u64),
            )
            .unwrap();
        }

        // SECOND returns: incremental reintegration.
        drop_caches();
        pair.start_second();
        let (connected, _) = pair
            .prim()
            .wait_for("peer_connected", Duration::from_secs(60));
        let (synced, event) = pair.prim().wait_for("synced", Duration::from_secs(600));
        let reintegration = (synced - connected).as_secs_f64();
        pair.stop();

        // rsync from the same changed tree into a copy of the tree before the change.
        drop_caches();
        let rsync_started = Instant::now();
        let out = Command::new("rsync")
            .args(["-a", "--delete", "--stats"])
            .arg(format!("{}/", root.join("a").display()))
            .arg(format!("{}/", root.join("c").display()))
            .output()
            .expect("run rsync");
        let _ = Command::new("sync").arg("-f").arg(root.join("c")).status();
        let rsync = rsync_started.elapsed().as_secs_f64();
        assert!(out.status.success(), "rsync failed");
        let stats = String::from_utf8_lossy(&out.stdout);
        let stat = |label: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(label))
                .map(|v| v.trim().split(' ').next().unwrap_or("").replace(',', ""))
                .unwrap_or_default()
        };

        // The least any method must do: copy the changed files over their old versions
        // in the replica's tree and make them durable (into a fresh directory instead,
        // shown for reference, skips the replica's cold lookups of 100 directories).
        drop_caches();
        let scratch = root.join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let fresh_copy = copy_and_sync(&changed, &root.join("a"), &scratch, |i| {
            scratch.join(i.to_string())
        });
        std::fs::remove_dir_all(&scratch).unwrap();
        drop_caches();
        let copy = copy_and_sync(&changed, &root.join("a"), &root.join("c"), |i| {
            tree_file(&root.join("c"), i)
        });
        // Untimed: the copy's mtimes as rsync left them, so its next round sees only
        // the next round's changes.
        for &i in &changed {
            let modified = std::fs::metadata(tree_file(&root.join("a"), i))
                .and_then(|m| m.modified())
                .unwrap();
            std::fs::File::options()
                .write(true)
                .open(tree_file(&root.join("c"), i))
                .and_then(|f| f.set_modified(modified))
                .unwrap();
        }

        println!(
            "  round {}: {} files changed ({} KiB)\n    rampart: {:.3} s, {} files examined, {} bytes sent\n    rsync:   {:.3} s, {} files examined, {} transferred\n    copy of the changed files over the copy's + sync: {:.3} s (into a new directory: {:.3} s)\n    rampart / copy = {:.2} (target <= 2; / copy into a new directory = {:.2})   rampart / rsync = {:.3}",
            round + 1,
            changed.len(),
            changed_bytes / 1024,
            reintegration,
            event["examined"],
            event["bytes_sent"],
            rsync,
            stat("Number of files:"),
            stat("Number of regular files transferred:"),
            copy,
            fresh_copy,
            reintegration / copy,
            reintegration / fresh_copy,
            reintegration / rsync,
        );

        // Back in step for the next round (incremental, nothing to send).
        pair.start();
    }
    pair.stop();
}
