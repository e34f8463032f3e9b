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
async fn a_write_second_cannot_store_waits_until_second_holds_it() {
    let mut disk = SmallDisk::new(AckMode::Durable, "b", "4m");
    let pair = &mut disk.pair;
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    // As the mirror module runs it: nothing goes on alone without a decision.
    config.continue_alone = false;
    pair.start_prim(config);
    pair.wait_synced().await;
    let (a, b) = (pair.dir("a"), pair.dir("b"));
    blocking({
        let a = a.clone();
        move || std::fs::write(a.join("filler"), vec![1u8; 3 << 20]).unwrap()
    })
    .await;

    // PRIM's disk has room, SECOND's does not: SECOND is not up to date, so the write
    // does not return, however often PRIM reconnects and tries to repair the copy.
    let writer = tokio::task::spawn_blocking({
        let a = a.clone();
        move || std::fs::write(a.join("data"), vec![2u8; 2 << 20])
    });
    let lost = pair
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
        })
        .await;
    assert!(format!("{lost:?}").contains("No space left"), "{lost:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.is_finished(),
        "a write SECOND could not store returned"
    );

    // Room again on SECOND: a session repairs the copy and only then the write returns.
    let status = std::process::Command::new("mount")
        .args(["-o", "remount,rw,size=16m"])
        .arg(&b)
        .status()
        .unwrap();
    assert!(status.success(), "grow the tmpfs");
    let written = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the write returned once SECOND had room")
        .unwrap();
    written.unwrap();
    assert_eq!(std::fs::read(b.join("data")).unwrap(), vec![2u8; 2 << 20]);
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

/// SECOND's copy on an ext4 image (no journal) kept on a small tmpfs: the file system
/// has room, the device under it does not, so writeback fails and fsync reports it
/// once. A later fsync on a fresh descriptor then reports success for pages the kernel
/// dropped (PostgreSQL's "fsyncgate").
struct FailingDevice {
    pair: Pair,
    backing: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl FailingDevice {
    fn new(ack: AckMode) -> FailingDevice {
        let pair = Pair::new(ack);
        let backing = pair.root.path().join("b-device");
        std::fs::create_dir(&backing).unwrap();
        run(
            "mount",
            &[
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                "size=16m".as_ref(),
                "tmpfs".as_ref(),
                backing.as_os_str(),
            ],
        );
        let image = backing.join("b.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let device = FailingDevice {
            pair,
            backing,
            image,
        };
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-O".as_ref(),
                "^has_journal".as_ref(),
                device.image.as_os_str(),
            ],
        );
        device.mount_copy();
        std::fs::remove_dir(device.pair.dir("b").join("lost+found")).unwrap();
        device
    }

    fn mount_copy(&self) {
        let dir = self.pair.dir("b");
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                self.image.as_os_str(),
                dir.as_os_str(),
            ],
        );
    }

    fn unmount(dir: &std::path::Path) {
        let status = std::process::Command::new("umount").arg(dir).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(dir)
                .status();
        }
    }

    /// Room on the device again.
    fn grow(&self) {
        run(
            "mount",
            &[
                "-o".as_ref(),
                "remount,size=256m".as_ref(),
                self.backing.as_os_str(),
            ],
        );
    }
}

impl Drop for FailingDevice {
    fn drop(&mut self) {
        drop(self.pair.prim.take());
        drop(self.pair.second.take());
        Self::unmount(&self.pair.dir("b"));
        Self::unmount(&self.backing);
    }
}

/// A failed sync is never taken for durable, and what it covered is repaired: ext4
/// leaves a range whose writeback failed reading as zeros even after an in-place
/// rewrite and a successful fsync (seen here without Rampart), so SECOND removes such
/// files before the next session and PRIM sends them whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_on_second_is_never_taken_for_durable() {
    let mut device = FailingDevice::new(AckMode::Durable);
    let pair = &mut device.pair;
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    config.continue_alone = false;
    pair.start_prim(config);
    pair.wait_synced().await;
    let a = pair.dir("a");

    // 30 MiB, each write durable on SECOND before it returns: the device fills at
    // about 16 MiB and SECOND's sync fails. That write, and the rest, wait.
    let writer = tokio::task::spawn_blocking({
        let a = a.clone();
        move || {
            use std::io::Write;
            let mut file = std::fs::File::create(a.join("big"))?;
            for i in 0..30u8 {
                file.write_all(&vec![i + 1; 1 << 20])?;
            }
            file.sync_all()
        }
    });
    let lost = pair
        .wait_event(Duration::from_secs(30), |e| {
            matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
        })
        .await;
    assert!(format!("{lost:?}").contains("sync failed"), "{lost:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.is_finished(),
        "a write SECOND failed to sync returned"
    );

    // Room again: a new session resends what SECOND never held durably.
    device.grow();
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer went on once SECOND could sync")
        .unwrap()
        .unwrap();
    let pair = &mut device.pair;
    drop(pair.prim.take());
    drop(pair.second.take());
    // What SECOND's disk holds, not its page cache.
    let b = pair.dir("b");
    FailingDevice::unmount(&b);
    device.mount_copy();
    let copy = std::fs::read(b.join("big")).unwrap();
    let prim_copy = std::fs::read(a.join("big")).unwrap();
    assert_eq!(prim_copy.len(), 30 << 20);
    assert!(
        prim_copy[16 << 20..17 << 20].iter().all(|&x| x == 17),
        "PRIM's own copy"
    );
    assert_eq!(copy.len(), 30 << 20);
    for (i, chunk) in copy.chunks(1 << 20).enumerate() {
        let wrong = chunk.iter().position(|&x| x != i as u8 + 1);
        assert!(
            wrong.is_none(),
            "MiB {i} of SECOND's copy is not what PRIM acknowledged: at +{wrong:?}, {:?}",
            wrong.map(|w| chunk[w])
        );
    }
}

/// Unmounts on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Durable mode: a write that returned is on SECOND's disk, so SECOND losing power
/// right after keeps it. The power loss is the image of SECOND's device taken at that
/// instant (the loop device's backing file holds what reached the device, not what
/// sits in SECOND's page cache), then recovered and mounted as after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_survives_second_losing_power_right_after_it_returned() {
    let mut disk = FreezableDisk::new(AckMode::Durable, "b", 128 << 20);
    let addr = disk.pair.start_second("b", "127.0.0.1:0");
    disk.pair.start_prim(disk.pair.prim_config("a", addr, 1));
    disk.pair.wait_synced().await;
    let content: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    let root = disk.pair.root.path().to_path_buf();
    let image = root.join("b.img");
    let lost_power = root.join("b-lost-power.img");
    blocking({
        let (a, content) = (disk.pair.dir("a"), content.clone());
        let lost_power = lost_power.clone();
        move || {
            // No fsync: the write's own return is the promise.
            std::fs::write(a.join("f"), &content).unwrap();
            std::fs::copy(&image, &lost_power).unwrap();
        }
    })
    .await;
    // Journal recovery, as at the next boot (1: errors corrected).
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fy")
        .arg(&lost_power)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(matches!(fsck.code(), Some(0 | 1)), "e2fsck: {fsck}");
    let after = root.join("after");
    std::fs::create_dir(&after).unwrap();
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop,ro".as_ref(),
            lost_power.as_os_str(),
            after.as_os_str(),
        ],
    );
    let after = Mounted(after);
    let held = std::fs::read(after.0.join("f")).unwrap_or_default();
    assert!(
        held == content,
        "SECOND's disk holds {} of the {} bytes acknowledged",
        held.len(),
        content.len()
    );
}
