//! PRIM and SECOND when a disk misbehaves: full (a small tmpfs), slow or stuck (an
//! ext4 image frozen with `fsfreeze`).

mod support;

use std::time::Duration;

use rampart_mirror::AckMode;
use support::*;

/// A pair with one side's copy on a small tmpfs, unmounted once both sides stopped.
struct SmallDisk {
    pair: Pair,
    side: &'static str,
}

impl SmallDisk {
    fn new(ack: AckMode, side: &'static str, size: &str) -> SmallDisk {
        let pair = Pair::new(ack);
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(pair.dir(side))
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs");
        SmallDisk { pair, side }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        drop(self.pair.prim.take());
        drop(self.pair.second.take());
        let status = std::process::Command::new("umount")
            .arg(self.pair.dir(self.side))
            .status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.pair.dir(self.side))
                .status();
            if !std::thread::panicking() {
                panic!("the tmpfs was still busy after both sides stopped");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_on_prim_is_taken_back_on_second() {
    let mut disk = SmallDisk::new(AckMode::Write, "a", "1m");
    let pair = &mut disk.pair;
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    pair.wait_synced().await;

    // PRIM's disk fills in the middle of the write: SECOND received bytes PRIM could
    // not store, and has them taken back to what PRIM holds.
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    let error = blocking({
        let a = a.clone();
        move || std::fs::write(a.join("big"), vec![9u8; 4 << 20]).unwrap_err()
    })
    .await;
    assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
    converge(&a, &b, Duration::from_secs(5)).await;
    assert!(
        std::fs::metadata(b.join("big")).unwrap().len() <= 1 << 20,
        "SECOND holds no more than PRIM could"
    );

    // The stream is still up: once there is room again, writes go through.
    blocking({
        let a = a.clone();
        move || {
            std::fs::remove_file(a.join("big")).unwrap();
            std::fs::write(a.join("small"), vec![1u8; 100_000]).unwrap();
        }
    })
    .await;
    assert!(pair.prim.as_ref().unwrap().status().connected);
    converge(&a, &b, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_whose_disk_filled_converges_once_there_is_room_again() {
    let mut disk = SmallDisk::new(AckMode::Write, "b", "4m");
    let pair = &mut disk.pair;
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    pair.wait_synced().await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    blocking({
        let a = a.clone();
        move || std::fs::write(a.join("filler"), vec![1u8; 3 << 20]).unwrap()
    })
    .await;

    // PRIM's disk has room, SECOND's does not: the write succeeds on PRIM and PRIM is
    // told that SECOND diverged.
    blocking({
        let a = a.clone();
        move || std::fs::write(a.join("data"), vec![2u8; 2 << 20]).unwrap()
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::Diverged { .. })
    })
    .await;

    // Room again on SECOND: the same session reconciles the file.
    blocking({
        let a = a.clone();
        move || std::fs::remove_file(a.join("filler")).unwrap()
    })
    .await;
    pair.wait_event(Duration::from_secs(30), |e| {
        matches!(e, rampart_mirror::prim::Event::Synced { .. })
    })
    .await;
    converge(&a, &b, Duration::from_secs(5)).await;
    assert!(pair.prim.as_ref().unwrap().status().connected);
}

/// One side's copy on a small ext4 image that the test can freeze (`fsfreeze`: writes
/// to it wait until it is thawed); thawed and unmounted once both sides stopped, also
/// when the test fails.
struct FreezableDisk {
    pair: Pair,
    side: &'static str,
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?}");
}

impl FreezableDisk {
    fn new(ack: AckMode, side: &'static str, size: u64) -> FreezableDisk {
        let pair = Pair::new(ack);
        let image = pair.root.path().join(format!("{side}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        );
        let dir = pair.dir(side);
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                dir.as_os_str(),
            ],
        );
        std::fs::remove_dir(dir.join("lost+found")).unwrap();
        FreezableDisk { pair, side }
    }

    /// A pair in step with SECOND's copy on the image, then the image frozen.
    async fn frozen_second() -> FreezableDisk {
        let mut disk = FreezableDisk::new(AckMode::Write, "b", 512 << 20);
        let addr = disk.pair.start_second("b", "127.0.0.1:0");
        disk.pair.start_prim(disk.pair.prim_config("a", addr, 1));
        disk.pair.wait_synced().await;
        disk.freeze();
        disk
    }

    fn freeze(&self) {
        run(
            "fsfreeze",
            &["-f".as_ref(), self.pair.dir(self.side).as_os_str()],
        );
    }

    fn thaw(&self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(self.pair.dir(self.side))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        self.thaw();
        drop(self.pair.prim.take());
        drop(self.pair.second.take());
        let dir = self.pair.dir(self.side);
        let status = std::process::Command::new("umount").arg(&dir).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&dir)
                .status();
            if !std::thread::panicking() {
                panic!("the image was still busy after both sides stopped");
            }
        }
    }
}

/// Writes 256 MiB to `big` in `dir` and syncs it, off the runtime: far more than SECOND
/// may hold plus PRIM's window (64 MiB each).
fn write_big_file(dir: std::path::PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::File::create(dir.join("big")).unwrap();
        for i in 0..256u32 {
            file.write_all(&vec![i as u8; 1 << 20]).unwrap();
        }
        file.sync_all().unwrap();
    })
}

/// SECOND acknowledges what it received before applying it, so a disk slower than the
/// link would grow its memory without bound: it holds at most its backlog (64 MiB),
/// then stops reading, and PRIM's window fills. A disk that does not move at all makes
/// SECOND go quiet after 10 s: PRIM reports the peer lost, goes on alone, and
/// reintegrates once SECOND's disk moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_whose_disk_stops_holds_a_bounded_backlog_and_prim_goes_on() {
    const MIB: usize = 1 << 20;
    const BACKLOG: u64 = 64 << 20;
    let mut disk = FreezableDisk::frozen_second().await;

    let writer = write_big_file(disk.pair.dir("a"));
    let (events, second) = (
        disk.pair.events.as_mut().unwrap(),
        disk.pair.second.as_ref().unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        most = most.max(second.status().backlog_bytes);
        match tokio::time::timeout(Duration::from_millis(20), events.recv()).await {
            Ok(Some(rampart_mirror::prim::Event::PeerLost { .. })) => break,
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("PRIM stopped"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "PRIM never noticed that SECOND stopped taking data (backlog {most})"
        );
    }
    most = most.max(second.status().backlog_bytes);
    assert!(
        most > BACKLOG / 2 && most <= BACKLOG + 2 * MIB as u64,
        "SECOND held {most} bytes it had not applied"
    );

    disk.thaw();
    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("the writer went on once PRIM was alone")
        .unwrap();
    disk.pair.wait_synced().await;
    let (a, b) = (disk.pair.dir("a"), disk.pair.dir("b"));
    converge(&a, &b, Duration::from_secs(30)).await;
}

/// A disk that pauses for longer than the link timeout (but moves again within 10 s)
/// throttles PRIM: its writers wait for the window while SECOND says it is alive, and
/// nobody reports the peer lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_whose_disk_pauses_throttles_prim_without_being_lost() {
    let mut disk = FreezableDisk::frozen_second().await;

    let writer = write_big_file(disk.pair.dir("a"));
    // Twice the link timeout (1.5 s) with the disk frozen: the backlog and PRIM's
    // window fill long before.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!writer.is_finished(), "PRIM did not wait for the window");
    disk.thaw();
    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("the writer went on once SECOND's disk moved")
        .unwrap();
    let events = disk.pair.events.as_mut().unwrap();
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, rampart_mirror::prim::Event::PeerLost { .. }),
            "{event:?}"
        );
    }
    assert!(disk.pair.prim.as_ref().unwrap().status().connected);
    let (a, b) = (disk.pair.dir("a"), disk.pair.dir("b"));
    converge(&a, &b, Duration::from_secs(30)).await;
}
