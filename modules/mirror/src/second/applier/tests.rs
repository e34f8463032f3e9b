//! The applier's own tests.

use std::time::Duration;

use super::*;

async fn admitted_within(backlog: &Backlog, len: usize, wait: Duration) -> Option<bool> {
    tokio::time::timeout(wait, backlog.admit(len)).await.ok()
}

fn unsynced_after(ops: &[Op]) -> Vec<String> {
    let mut unsynced = Unsynced::default();
    for (seq, op) in ops.iter().enumerate() {
        note_unsynced(&mut unsynced, op, seq as u64 + 1);
    }
    let paths = unsynced.paths.iter();
    paths
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

fn write(path: &str) -> Op {
    Op::Write {
        path: path.as_bytes().to_vec(),
        offset: 0,
    }
}

fn rename(from: &str, to: &str, flags: u32) -> Op {
    Op::Rename {
        from: from.as_bytes().to_vec(),
        to: to.as_bytes().to_vec(),
        flags,
    }
}

#[test]
fn what_was_written_under_a_renamed_path_is_synced_under_its_new_name() {
    // Write, then rename into place: the sync must reach the data under "f".
    let ops = [write("d/tmp"), rename("d/tmp", "f", 0)];
    assert_eq!(unsynced_after(&ops), ["", "d", "f"]);
    // A renamed directory carries what was written beneath it.
    let ops = [write("d/x"), rename("d", "e", 0)];
    assert_eq!(unsynced_after(&ops), ["", "e/x"]);
    // An exchange swaps the names both ways.
    let exchange = libc::RENAME_EXCHANGE;
    let ops = [write("a"), write("b/y"), rename("a", "b", exchange)];
    assert_eq!(unsynced_after(&ops), ["", "a/y", "b"]);
}

#[tokio::test]
async fn the_reader_waits_for_the_applier_once_the_backlog_is_full() {
    let backlog = Backlog::new();
    assert!(backlog.admit(Backlog::LIMIT - 10).await);
    assert!(backlog.admit(10).await);
    assert_eq!(backlog.queued(), Backlog::LIMIT);
    let short = Duration::from_millis(50);
    assert_eq!(admitted_within(&backlog, 1, short).await, None);
    backlog.taken(10);
    assert_eq!(admitted_within(&backlog, 1, short).await, Some(true));
    assert_eq!(backlog.queued(), Backlog::LIMIT - 9);
    // A frame larger than the whole backlog waits for it to empty.
    backlog.taken(Backlog::LIMIT - 9);
    assert_eq!(
        admitted_within(&backlog, 2 * Backlog::LIMIT, short).await,
        Some(true)
    );
}

#[tokio::test]
async fn a_reader_waiting_for_a_stopped_applier_is_told() {
    let backlog = std::sync::Arc::new(Backlog::new());
    assert!(backlog.admit(Backlog::LIMIT).await);
    let waiting = tokio::spawn({
        let backlog = backlog.clone();
        async move { backlog.admit(1).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(Closing(&backlog));
    let admitted = tokio::time::timeout(Duration::from_secs(1), waiting).await;
    assert!(!admitted.expect("told at once").unwrap());
}
