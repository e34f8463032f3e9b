//! The API the mirror module drives, as it will use it: a new epoch forcing a new
//! session, a PRIM whose SECOND never comes (and the decision to go on alone, which a
//! stale session number cannot take), and a reintegration that fails with the session
//! still up.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rampart_mirror::prim::{Event, Phase};
use rampart_mirror::AckMode;
use support::{assert_same_trees, blocking, converge, Pair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_ends_the_session_and_the_next_one_carries_it() {
    let mut pair = Pair::in_step(AckMode::Write).await;
    pair.prim.as_ref().unwrap().set_epoch(7);
    let Event::PeerLost { session: lost, .. } = pair
        .wait_event(Duration::from_secs(5), |e| {
            matches!(e, Event::PeerLost { .. })
        })
        .await
    else {
        unreachable!()
    };
    let Event::Synced { session, .. } = pair.wait_synced().await else {
        unreachable!()
    };
    assert!(session > lost, "session {session} after the loss of {lost}");
    assert_eq!(pair.second.as_ref().unwrap().status().epoch, 7);
    // That loss is over: a decision taken on it is refused.
    assert!(pair.prim.as_ref().unwrap().go_alone(lost).is_err());
    let a = pair.dir("a");
    blocking(move || std::fs::write(a.join("after"), b"epoch 7").unwrap()).await;
    converge(&pair.dir("a"), &pair.dir("b"), Duration::from_secs(10)).await;
}

/// An address nothing listens on (yet).
fn unused_address() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prim_whose_second_never_comes_waits_for_the_decision_to_go_alone() {
    let mut pair = Pair::new(AckMode::Write);
    let addr = unused_address();
    let mut config = pair.prim_config("a", addr, 1);
    config.continue_alone = false;
    pair.start_prim(config);
    let writer = std::thread::spawn({
        let a = pair.dir("a");
        move || std::fs::write(a.join("f"), b"written before any SECOND")
    });
    let Event::PeerAbsent { session } = pair
        .wait_event(Duration::from_secs(10), |e| {
            matches!(e, Event::PeerAbsent { .. })
        })
        .await
    else {
        unreachable!()
    };
    // The write waits: nothing decided that SECOND may be left behind.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "a write returned with no SECOND and no decision"
    );
    let prim = pair.prim.as_ref().unwrap();
    let status = prim.status();
    assert!(
        status.parked >= 1 && status.oldest_parked_ms.is_some(),
        "{status:?}"
    );
    assert!(
        prim.go_alone(session + 1).is_err(),
        "a loss that never happened"
    );
    prim.go_alone(session).unwrap();
    blocking(move || writer.join().unwrap()).await.unwrap();
    assert_eq!(prim.status().phase, Phase::Alone);
    // SECOND comes at last and gets everything.
    pair.start_second("b", &addr.to_string());
    pair.wait_synced().await;
    assert_same_trees(&pair.dir("a"), &pair.dir("b"));
}

/// A FUSE mount whose server was killed: every access to it fails with `ENOTCONN`.
/// Unmounted on drop.
struct DeadMount {
    at: PathBuf,
}

impl DeadMount {
    fn at(at: &Path, source: &Path) -> DeadMount {
        std::fs::create_dir_all(at).unwrap();
        std::fs::create_dir_all(source).unwrap();
        let mut server: Child = Command::new("bindfs")
            .arg("-f")
            .arg(source)
            .arg(at)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bindfs (Debian package bindfs)");
        let mount = DeadMount { at: at.into() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mount_point(at) {
            assert!(Instant::now() < deadline, "bindfs did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill().unwrap();
        server.wait().unwrap();
        let error = std::fs::read_dir(at).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOTCONN), "{error}");
        mount
    }
}

fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path))
}

impl Drop for DeadMount {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.at, rustix::mount::UnmountFlags::DETACH);
    }
}

/// A pair and a dead mount in SECOND's copy, stopped in this order: the roles
/// (SECOND's read-only mount over its copy hides the dead one), the dead mount, then
/// the pair's scratch directory (which cannot be removed while the mount is in it).
struct PairOverDeadMount {
    pair: Pair,
    dead: Option<DeadMount>,
}

impl PairOverDeadMount {
    fn new() -> PairOverDeadMount {
        PairOverDeadMount {
            pair: Pair::new(AckMode::Write),
            dead: None,
        }
    }
}

impl Drop for PairOverDeadMount {
    fn drop(&mut self) {
        drop(self.pair.prim.take());
        drop(self.pair.second.take());
        drop(self.dead.take());
    }
}

/// SECOND's copy holds a mount whose server died: listing it fails, so the
/// reintegration stops. PRIM says so for that session, which stays up; once the mount
/// is gone, the next session reintegrates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reintegration_that_cannot_list_second_reports_it_and_the_next_session_repairs() {
    let mut test = PairOverDeadMount::new();
    let pair = &mut test.pair;
    std::fs::write(pair.dir("a").join("f"), b"to reintegrate").unwrap();
    test.dead = Some(DeadMount::at(
        &pair.dir("b").join("broken"),
        &pair.root.path().join("bindfs-source"),
    ));
    let pair = &mut test.pair;
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    let Event::ResyncFailed { session, reason } = pair
        .wait_event(Duration::from_secs(20), |e| {
            matches!(e, Event::ResyncFailed { .. } | Event::Synced { .. })
        })
        .await
    else {
        panic!("synced over a copy it cannot list")
    };
    assert!(reason.contains("SECOND"), "{reason}");
    let status = pair.prim.as_ref().unwrap().status();
    assert!(status.connected, "the session ended: {status:?}");
    assert!(status
        .last_error
        .is_some_and(|e| e.contains("reintegration")));

    // The operator removes the dead mount; SECOND restarts; the next session repairs.
    drop(pair.second.take());
    drop(test.dead.take());
    let pair = &mut test.pair;
    std::fs::remove_dir(pair.dir("b").join("broken")).unwrap();
    pair.start_second("b", &addr.to_string());
    let Event::Synced { session: next, .. } = pair.wait_synced().await else {
        unreachable!()
    };
    assert!(next > session);
    assert_same_trees(&pair.dir("a"), &pair.dir("b"));
}

/// A write parked before SECOND came (no decision to go on alone) waits for the
/// reintegration that repairs it. When that reintegration cannot finish, and the session
/// stays up, the write still fails after the park timeout instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_parked_across_a_reintegration_that_cannot_finish_fails_in_time() {
    let mut test = PairOverDeadMount::new();
    test.dead = Some(DeadMount::at(
        &test.pair.dir("b").join("broken"),
        &test.pair.root.path().join("bindfs-source"),
    ));
    let pair = &mut test.pair;
    let addr = unused_address();
    let mut config = pair.prim_config("a", addr, 1);
    config.continue_alone = false;
    config.park_timeout = Duration::from_secs(4);
    pair.start_prim(config);
    let started = Instant::now();
    let writer = std::thread::spawn({
        let a = pair.dir("a");
        move || {
            let result = std::fs::write(a.join("f"), b"parked");
            (result, Instant::now())
        }
    });
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, Event::PeerAbsent { .. })
    })
    .await;
    pair.start_second("b", &addr.to_string());
    pair.wait_event(Duration::from_secs(20), |e| {
        matches!(e, Event::ResyncFailed { .. })
    })
    .await;
    let (result, returned) = blocking(move || writer.join().unwrap()).await;
    let error = result.expect_err("acknowledged without SECOND holding it");
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    let status = pair.prim.as_ref().unwrap().status();
    assert!(
        status.connected,
        "the session ended, which expires parked writes anyway"
    );
    // The park timeout and a watchdog period or two, generously.
    assert!(
        returned - started < Duration::from_secs(20),
        "{:?}",
        returned - started
    );
}
