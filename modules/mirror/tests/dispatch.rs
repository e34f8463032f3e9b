//! Several dispatch threads (the default, [`rampart_mirror::prim::DISPATCH_THREADS`]):
//! requests run side by side, and the changes still reach SECOND in the order they hit
//! PRIM's tree, under the names they had then.

mod support;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_mirror::prim::Event;
use rampart_mirror::AckMode;
use rustix::fs::{Mode, OFlags};
use support::{blocking, converge, Pair};

/// Writes, attribute changes and creates under a directory, each through a descriptor
/// the application opened before (so the kernel names them by inode), race renames of
/// that directory. A change whose path was resolved before a rename and streamed after
/// it would reach SECOND under a name that no longer exists there: SECOND fails it
/// (`not_up_to_date`, the session lost) or makes a file PRIM does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_racing_changes_under_the_renamed_directory_keep_second_in_step() {
    let mut pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking({
        let a = a.clone();
        move || {
            std::fs::create_dir_all(a.join("d/sub")).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..4u8)
                .map(|i| {
                    let (dir, stop) = (a.join("d/sub"), stop.clone());
                    std::thread::spawn(move || change_under(&dir, i, &stop))
                })
                .collect();
            // Renames of the grandparent lock neither `d/sub` nor the files in it.
            let started = Instant::now();
            let (mut renames, mut from, mut to) = (0, a.join("d"), a.join("e"));
            while renames < 400 && started.elapsed() < Duration::from_secs(20) {
                std::fs::rename(&from, &to).unwrap();
                std::mem::swap(&mut from, &mut to);
                renames += 1;
                if writers.iter().all(|w| w.is_finished()) {
                    break;
                }
            }
            stop.store(true, Ordering::SeqCst);
            let changes: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
            assert!(
                renames >= 20 && changes >= 100,
                "{renames} renames, {changes} changes"
            );
        }
    })
    .await;
    converge(&a, &pair.dir("b"), Duration::from_secs(30)).await;
    let events = pair.events.as_mut().unwrap();
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event,
                Event::NotUpToDate { .. } | Event::PeerLost { .. } | Event::ResyncFailed { .. }
            ),
            "SECOND fell out of step: {event:?}"
        );
    }
}

/// Writer `i`: through a descriptor of `dir` and of a file in it, writes, changes the
/// mode and creates files until `stop` or its own bound. Returns how many changes.
fn change_under(dir: &std::path::Path, i: u8, stop: &AtomicBool) -> usize {
    let dirfd = rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    let name = format!("f{i}");
    let file = rustix::fs::openat(
        &dirfd,
        name.as_str(),
        OFlags::CREATE | OFlags::RDWR,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let started = Instant::now();
    let mut changes = 0;
    for n in 0..600u32 {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let offset = u64::from(n.wrapping_mul(2_654_435_761) % 64) * 4096;
        rustix::io::pwrite(file.as_fd(), &[i.wrapping_add(n as u8); 4096], offset).unwrap();
        if n % 8 == 0 {
            // The answer is read while the path is current: `d` may be renamed
            // before SECOND acknowledges (this once failed with ENOENT).
            let mode = Mode::from_raw_mode(0o600 | ((n % 2) * 0o44));
            rustix::fs::fchmod(&file, mode).unwrap();
        }
        if n % 16 == 0 {
            let created = format!("n{i}-{n}");
            let fd = rustix::fs::openat(
                &dirfd,
                created.as_str(),
                OFlags::CREATE | OFlags::WRONLY,
                Mode::from_raw_mode(0o640),
            )
            .unwrap();
            rustix::io::write(&fd, created.as_bytes()).unwrap();
        }
        changes += 1;
    }
    changes
}

/// An attribute change (fchmod, ftruncate through a descriptor) answers with the
/// attributes the change left, even when the file's directory is renamed before
/// SECOND's acknowledgement arrives: they are read while the path is current. Durable
/// mode, so that each acknowledgement waits for SECOND's disk and renames land in
/// between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_changes_answer_while_their_directory_is_renamed() {
    let pair = Pair::in_step(AckMode::Durable).await;
    let a = pair.dir("a");
    blocking({
        let a = a.clone();
        move || {
            std::fs::create_dir_all(a.join("d/sub")).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..2u32)
                .map(|i| {
                    let (path, stop) = (a.join(format!("d/sub/f{i}")), stop.clone());
                    std::thread::spawn(move || {
                        let file = std::fs::File::create(path).unwrap();
                        let started = Instant::now();
                        let mut n = 0u32;
                        while n < 300
                            && !stop.load(Ordering::SeqCst)
                            && started.elapsed() < Duration::from_secs(20)
                        {
                            let mode = Mode::from_raw_mode(0o600 | ((n % 2) * 0o44));
                            rustix::fs::fchmod(&file, mode)
                                .unwrap_or_else(|e| panic!("fchmod {n}: {e}"));
                            rustix::fs::ftruncate(&file, u64::from(n % 7) * 1000)
                                .unwrap_or_else(|e| panic!("ftruncate {n}: {e}"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let (mut from, mut to) = (a.join("d"), a.join("e"));
            let started = Instant::now();
            while !writers.iter().all(|w| w.is_finished())
                && started.elapsed() < Duration::from_secs(25)
            {
                std::fs::rename(&from, &to).unwrap();
                std::mem::swap(&mut from, &mut to);
            }
            stop.store(true, Ordering::SeqCst);
            let changes: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
            assert!(changes >= 100, "{changes} changes");
        }
    })
    .await;
    converge(&a, &pair.dir("b"), Duration::from_secs(30)).await;
}
