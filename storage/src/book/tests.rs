//! The book's tests: marks, renames, the journal and the sync point, on a real RocksDB.

use super::*;

fn marks(zones: &[(&str, u64)], paths: &[&str]) -> Marks {
    let mut m = Marks::default();
    for (p, z) in zones {
        m.add_zone(p.as_bytes(), *z);
    }
    for p in paths {
        m.add_path(p.as_bytes());
    }
    m
}

#[test]
fn marks_survive_a_reopen_and_intents_become_dirty() {
    let dir = tempfile::tempdir().unwrap();
    {
        let book = ReplicationBook::open(dir.path()).unwrap();
        book.add(MarkKind::Intent, &marks(&[("a", 0), ("a", 7)], &["d"]))
            .unwrap();
        book.add(MarkKind::Dirty, &marks(&[("b", 1)], &[])).unwrap();
        book.set_sync_point(Some(SyncPoint { id: 42, epoch: 3 }))
            .unwrap();
    }
    let book = ReplicationBook::open(dir.path()).unwrap();
    assert_eq!(
        book.marks(MarkKind::Intent).unwrap(),
        marks(&[("a", 0), ("a", 7)], &["d"])
    );
    assert_eq!(
        book.sync_point().unwrap(),
        Some(SyncPoint { id: 42, epoch: 3 })
    );
    book.intents_to_dirty().unwrap();
    assert!(book.marks(MarkKind::Intent).unwrap().is_empty());
    assert_eq!(
        book.marks(MarkKind::Dirty).unwrap(),
        marks(&[("a", 0), ("a", 7), ("b", 1)], &["d"])
    );
    book.clear(MarkKind::Dirty, &marks(&[("a", 7)], &["d"]))
        .unwrap();
    assert_eq!(
        book.marks(MarkKind::Dirty).unwrap(),
        marks(&[("a", 0), ("b", 1)], &[])
    );
}

#[test]
fn a_book_in_use_can_be_read_and_a_missing_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    book.add(MarkKind::Dirty, &marks(&[("f", 2)], &["d"]))
        .unwrap();
    let reader = ReplicationBook::open_read_only(dir.path()).unwrap();
    assert_eq!(
        reader.marks(MarkKind::Dirty).unwrap(),
        marks(&[("f", 2)], &["d"])
    );
    let absent = ReplicationBook::open_read_only(&dir.path().join("absent"));
    assert!(matches!(absent, Err(BookError::Open { .. })));
}

#[test]
fn renaming_a_directory_moves_the_marks_beneath_it_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    book.add(
        MarkKind::Dirty,
        &marks(
            &[("d/x", 2), ("d/sub/y", 0), ("dd/z", 1), ("d", 0)],
            &["d", "d/new", "dd"],
        ),
    )
    .unwrap();
    book.rename(b"d", b"e").unwrap();
    assert_eq!(
        book.marks(MarkKind::Dirty).unwrap(),
        marks(
            &[("e/x", 2), ("e/sub/y", 0), ("dd/z", 1), ("e", 0)],
            &["e", "e/new", "dd"],
        )
    );
}

#[test]
fn the_journal_keeps_order_and_overflow_disables_replay() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    let first = JournalEntry::Rename {
        from: b"a".to_vec(),
        to: b"b".to_vec(),
        flags: 0,
    };
    let second = JournalEntry::Link {
        from: b"b".to_vec(),
        to: b"c".to_vec(),
    };
    book.journal_push(&first).unwrap();
    book.journal_push(&second).unwrap();
    assert_eq!(
        book.journal().unwrap(),
        Some(vec![first.clone(), second.clone()])
    );
    book.journal_clear().unwrap();
    assert_eq!(book.journal().unwrap(), Some(Vec::new()));
    book.journal_push(&first).unwrap();
    assert_eq!(book.journal().unwrap(), Some(vec![first.clone()]));

    // Past the limit, the journal is unknown until cleared, even if it empties.
    book.journal_push_within(&second, 1).unwrap();
    assert_eq!(book.journal().unwrap(), None);
    book.journal_push(&first).unwrap();
    assert_eq!(book.journal().unwrap(), None);
    book.journal_clear().unwrap();
    assert_eq!(book.journal().unwrap(), Some(Vec::new()));
}

#[test]
fn reroot_and_within() {
    assert!(is_within(b"d/x", b"d"));
    assert!(is_within(b"d", b"d"));
    assert!(!is_within(b"dd", b"d"));
    assert!(is_within(b"anything", b""));
    assert_eq!(reroot(b"d/x", b"d", b"e/f"), b"e/f/x");
    assert_eq!(reroot(b"d", b"d", b"e"), b"e");
}

#[test]
fn the_oldest_accepted_epoch_survives_a_restart_and_never_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    {
        let book = ReplicationBook::open(dir.path()).unwrap();
        assert_eq!(book.min_epoch().unwrap(), 0);
        assert_eq!(book.raise_min_epoch(7).unwrap(), 7);
        assert_eq!(book.raise_min_epoch(3).unwrap(), 7);
    }
    let book = ReplicationBook::open(dir.path()).unwrap();
    assert_eq!(book.min_epoch().unwrap(), 7);
}

#[test]
fn copied_marks_stay_under_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    book.add(MarkKind::Intent, &marks(&[("d/f", 3)], &["d/g"]))
        .unwrap();
    book.copy_marks(b"d", b"e").unwrap();
    assert_eq!(
        book.marks(MarkKind::Intent).unwrap(),
        marks(&[("d/f", 3), ("e/f", 3)], &["d/g", "e/g"])
    );
}

#[test]
fn damaged_files_survive_a_restart_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    {
        let book = ReplicationBook::open(dir.path()).unwrap();
        assert!(book.damaged().unwrap().is_empty());
        book.set_damaged(&[b"d/f".to_vec(), b"g".to_vec()]).unwrap();
    }
    let book = ReplicationBook::open(dir.path()).unwrap();
    assert_eq!(
        book.damaged().unwrap(),
        vec![b"d/f".to_vec(), b"g".to_vec()]
    );
    book.set_damaged(&[]).unwrap();
    assert!(book.damaged().unwrap().is_empty());
}

#[test]
fn synced_writes_are_counted_and_clears_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    let before = book.wal_syncs();
    for zone in 0..3 {
        book.add(MarkKind::Intent, &marks(&[("f", zone)], &[]))
            .unwrap();
    }
    assert_eq!(book.wal_syncs() - before, 3);
    book.clear(MarkKind::Intent, &marks(&[("f", 0)], &[]))
        .unwrap();
    assert_eq!(book.wal_syncs() - before, 3);
}

#[test]
fn marks_over_a_budget_are_not_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let book = ReplicationBook::open(dir.path()).unwrap();
    let all = marks(&[("f", 1), ("f", 2)], &["a", "b", "c"]);
    book.add(MarkKind::Dirty, &all).unwrap();
    assert_eq!(book.marks_within(MarkKind::Dirty, 1000).unwrap(), Some(all));
    assert_eq!(book.marks_within(MarkKind::Dirty, 10).unwrap(), None);
    assert_eq!(
        book.marks_within(MarkKind::Intent, 0).unwrap(),
        Some(Marks::default())
    );
}

#[test]
fn adopting_a_sync_point_forgets_every_mark_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let point = SyncPoint { id: 7, epoch: 3 };
    {
        let book = ReplicationBook::open(dir.path()).unwrap();
        // An empty book, and a set of one mark (first key = last key).
        book.adopt_sync_point(point).unwrap();
        book.add(MarkKind::Intent, &marks(&[("only", 0)], &[]))
            .unwrap();
        book.add(
            MarkKind::Dirty,
            &marks(
                &[("a", 0), ("a", 9), ("z/y", 1)],
                &["", "m", "\u{ff}\u{ff}"],
            ),
        )
        .unwrap();
        book.journal_push(&JournalEntry::Link {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
        })
        .unwrap();
        book.adopt_sync_point(SyncPoint { id: 8, epoch: 4 })
            .unwrap();
    }
    let book = ReplicationBook::open(dir.path()).unwrap();
    assert!(book.marks(MarkKind::Intent).unwrap().is_empty());
    assert!(book.marks(MarkKind::Dirty).unwrap().is_empty());
    assert_eq!(
        book.sync_point().unwrap(),
        Some(SyncPoint { id: 8, epoch: 4 })
    );
    assert_eq!(
        book.journal().unwrap().map(|j| j.len()),
        Some(1),
        "the journal stays"
    );
    // Marks added after it are kept as usual.
    book.add(MarkKind::Dirty, &marks(&[("new", 2)], &[]))
        .unwrap();
    assert_eq!(
        book.marks(MarkKind::Dirty).unwrap(),
        marks(&[("new", 2)], &[])
    );
}
