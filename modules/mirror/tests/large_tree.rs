//! A full sync of a tree of more than a million entries: SECOND's listing crosses in
//! parts (one answer would be far over the transport's frame limit) and the copies
//! end identical.

mod support;

use std::time::{Duration, Instant};

use rampart_mirror::prim::Event;
use rampart_mirror::tree::Tree;
use rampart_mirror::AckMode;
use support::*;

const DIRS: usize = 1_000;
const FILES_PER_DIR: usize = 1_000;
/// Long names, so that the listing is well over 64 MiB.
const NAME_PADDING: &str = "-a-name-long-enough-that-a-million-of-them-fill-many-frames-";

fn populate(root: &std::path::Path, extra_dir: &str) {
    for d in 0..DIRS {
        let dir = root.join(format!("dir{d:04}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::File::create(dir.join(format!("{f:04}{NAME_PADDING}"))).unwrap();
        }
    }
    // A tree on SECOND that PRIM does not have, and a few files with bytes.
    std::fs::create_dir(root.join(extra_dir)).unwrap();
    for f in 0..10 {
        std::fs::write(root.join(extra_dir).join(format!("{f}")), [f as u8; 5000]).unwrap();
    }
}

/// How long making or listing a million entries may take on a slow or loaded machine
/// (the two minutes of [`blocking`] ran out here under a CPU stressor).
const HUGE_WORK: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_of_more_than_a_million_entries_completes() {
    let mut pair = Pair::new(AckMode::Write);
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    let started = Instant::now();
    // The same million entries on both sides (the comparison lists them all), and a
    // directory on each side that the other lacks.
    blocking_within(HUGE_WORK, {
        let (a, b) = (a.clone(), b.clone());
        move || {
            std::thread::scope(|s| {
                s.spawn(|| populate(&a, "only-on-prim"));
                s.spawn(|| populate(&b, "only-on-second"));
            })
        }
    })
    .await;
    let entries = DIRS * (FILES_PER_DIR + 1) + 11;
    eprintln!("{entries} entries per side made in {:?}", started.elapsed());

    let started = Instant::now();
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    let synced = pair
        .wait_event(Duration::from_secs(900), |e| {
            matches!(e, Event::Synced { .. } | Event::ResyncFailed { .. })
        })
        .await;
    assert!(matches!(synced, Event::Synced { .. }), "{synced:?}");
    eprintln!("full sync in {:?}", started.elapsed());
    // Compared beneath PRIM's mount: a million lookups through FUSE would only be slow.
    drop(pair.prim.take());

    let listed = blocking_within(HUGE_WORK, move || {
        let (ta, tb) = (Tree::open(&a).unwrap(), Tree::open(&b).unwrap());
        let (la, lb) = (ta.list(b"").unwrap(), tb.list(b"").unwrap());
        assert_eq!(la.len(), lb.len(), "both sides list as many entries");
        for ((pa, ma), (pb, mb)) in la.iter().zip(&lb) {
            assert_eq!(pa, pb);
            assert_eq!((ma.kind, ma.size, ma.perm), (mb.kind, mb.size, mb.perm));
        }
        for f in 0..10u8 {
            let copy = std::fs::read(b.join(format!("only-on-prim/{f}"))).unwrap();
            assert_eq!(copy, [f; 5000]);
        }
        assert!(!b.join("only-on-second").exists());
        la.len()
    })
    .await;
    assert_eq!(listed, entries);
}

/// A node back as SECOND with more marks of its own than one frame holds (it changed
/// a million entries alone): its Welcome would be over the frame limit, so it asks for a
/// full reintegration instead, which repairs what it changed and clears the marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_with_more_marks_than_a_frame_holds_is_reintegrated_whole() {
    use rampart_storage::{MarkKind, Marks, ReplicationBook};
    let mut pair = Pair::in_step(AckMode::Write).await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    blocking({
        let a = a.clone();
        move || std::fs::write(a.join("f"), vec![1u8; 300_000]).unwrap()
    })
    .await;
    converge(&a, &b, Duration::from_secs(10)).await;
    let addr = pair.second.as_ref().unwrap().addr();
    drop(pair.second.take());
    // What b changed on its own, as if it had been PRIM since: a zone of f, and a
    // million names (long ones: well over the 64 MiB frame limit together).
    std::fs::write(b.join("f"), vec![2u8; 300_000]).unwrap();
    {
        let book = ReplicationBook::open(&pair.dir("b.book")).unwrap();
        let mut marks = Marks::default();
        marks.add_zone(b"f", 0);
        for i in 0..1_100_000 {
            marks.add_path(format!("gone/{i:07}{NAME_PADDING}").as_bytes());
        }
        assert!(rampart_mirror::protocol::encoded_size_bound(&marks) > 64 << 20);
        book.add(MarkKind::Dirty, &marks).unwrap();
    }
    pair.start_second("b", &addr.to_string());
    let event = pair
        .wait_event(Duration::from_secs(120), |e| {
            matches!(e, Event::Synced { .. } | Event::ResyncFailed { .. })
        })
        .await;
    assert!(matches!(event, Event::Synced { .. }), "{event:?}");
    assert_same_trees(&a, &b);
    // Cleared once SECOND holds the sync point durably (just after PRIM hears so);
    // generous: the other test of this file may be listing a million entries beside.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let second = pair.second.as_ref().unwrap();
        // Within a budget of nothing: `Some` only when there is no mark at all.
        if second
            .book()
            .marks_within(MarkKind::Dirty, 0)
            .unwrap()
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "b's own marks are still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
