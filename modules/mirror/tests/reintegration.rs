//! Reintegration with real mounts and bookkeeping: a returning SECOND gets only what
//! changed, a full sync sends only differing zones, the copier keeps to its rate,
//! reports progress and resumes after an interruption.

mod support;

use std::time::Duration;

use rampart_mirror::AckMode;
use support::*;

fn write_at(path: &std::path::Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// truncate(2): by path, with no open handle (setattr without a file handle).
fn truncate_path(path: &std::path::Path, size: i64) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let result = unsafe { libc::truncate(path.as_ptr(), size) };
    assert_eq!(result, 0, "truncate: {}", std::io::Error::last_os_error());
}

fn synced_bytes(event: &rampart_mirror::prim::Event) -> u64 {
    match event {
        rampart_mirror::prim::Event::Synced { bytes_sent, .. } => *bytes_sent,
        other => panic!("not a Synced event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_second_receives_only_what_changed_while_it_was_away() {
    let mut pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking({
        let a = a.clone();
        move || {
            for i in 0..20 {
                std::fs::write(a.join(format!("f{i}")), vec![i as u8; 256 << 10]).unwrap();
            }
        }
    })
    .await;
    // Let SECOND sync and PRIM clear its settled intents.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // SECOND dies; PRIM goes on alone.
    let addr = pair.second.as_ref().unwrap().addr();
    drop(pair.second.take());
    let zone = pair.zone_size as usize;
    let changed = blocking({
        let a = a.clone();
        move || {
            // Writes right after the loss wait for the link timeout, then go on alone.
            write_at(&a.join("f3"), 0, &vec![0xAA; zone]);
            write_at(&a.join("f3"), 2 * zone as u64, &[0xBB; 10]);
            write_at(&a.join("f7"), 3 * zone as u64, &vec![0xCC; zone]);
            std::fs::write(a.join("new"), vec![5u8; 100_000]).unwrap();
            std::fs::remove_file(a.join("f1")).unwrap();
            std::fs::rename(a.join("f2"), a.join("f2-renamed")).unwrap();
            // Changed zones: f3 0 and 2, f7 3, new (two zones).
            3 * zone as u64 + 100_000
        }
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;

    // SECOND returns on the same address.
    pair.start_second("b", &addr.to_string());
    let event = pair.wait_synced().await;
    // Exactly the changed zones: each once, none of the others.
    assert_eq!(synced_bytes(&event), changed, "bytes sent");
    assert_same_trees(&pair.dir("a"), &pair.dir("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_of_mostly_equal_trees_sends_only_differing_zones() {
    let mut pair = Pair::new(AckMode::Write);
    let zone = pair.zone_size as usize;
    // Both copies hold the same 10 files; PRIM's differ in two zones; SECOND has an
    // extra file and lacks one. No sync point on either side: a full sync.
    for side in ["a", "b"] {
        for i in 0..10 {
            std::fs::write(
                pair.dir(side).join(format!("f{i}")),
                vec![i as u8; 8 * zone],
            )
            .unwrap();
        }
    }
    write_at(&pair.dir("a").join("f4"), 5 * zone as u64, &[1u8; 100]);
    write_at(&pair.dir("a").join("f9"), 0, &[1u8; 100]);
    std::fs::write(pair.dir("b").join("extra"), b"only on SECOND").unwrap();
    std::fs::write(pair.dir("a").join("missing"), vec![3u8; zone / 2]).unwrap();
    let addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", addr, 1));
    let sent = synced_bytes(&pair.wait_synced().await);
    assert_eq!(sent, 2 * zone as u64 + (zone / 2) as u64);
    assert_same_trees(&pair.dir("a"), &pair.dir("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_and_regrown_while_second_is_away_reads_as_zeros_on_second() {
    let mut pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking({
        let a = a.clone();
        move || std::fs::write(a.join("f"), vec![0x11; 5 << 20]).unwrap()
    })
    .await;
    // SECOND holds the 5 MiB; it goes away and PRIM cuts the file to 1 MiB and grows
    // it back to 5 MiB: zeros on PRIM from 1 MiB on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = pair.second.as_ref().unwrap().addr();
    drop(pair.second.take());
    blocking({
        let a = a.clone();
        move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(a.join("f"))
                .unwrap();
            f.set_len(1 << 20).unwrap();
            f.set_len(5 << 20).unwrap();
            // And the same by path, on a second file, with no handle open.
            std::fs::write(a.join("g"), vec![0x22; 3 << 20]).unwrap();
        }
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;
    pair.start_second("b", &addr.to_string());
    let sent = synced_bytes(&pair.wait_synced().await);
    let b = pair.dir("b");
    let copy = std::fs::read(b.join("f")).unwrap();
    assert_eq!(copy.len(), 5 << 20);
    assert!(copy[..1 << 20].iter().all(|&x| x == 0x11));
    let stale = copy[1 << 20..].iter().filter(|&&x| x != 0).count();
    assert_eq!(stale, 0, "bytes of SECOND's old copy in the regrown range");
    // The regrown range is a hole on PRIM: it crossed the link as lengths.
    assert!(sent <= (3 << 20) + (64 << 10), "sent {sent} bytes");

    // Cut and regrown by path (truncate(2), no open handle) while SECOND is away again.
    drop(pair.second.take());
    blocking({
        let a = a.clone();
        move || {
            truncate_path(&a.join("g"), 64 << 10);
            truncate_path(&a.join("g"), 3 << 20);
        }
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;
    pair.start_second("b", &addr.to_string());
    pair.wait_synced().await;
    assert_same_trees(&a, &b);
}

/// SECOND goes away; PRIM writes `files` files of 1 MiB alone. Returns the bytes changed.
async fn change_while_second_is_away(pair: &mut Pair, files: usize) -> u64 {
    drop(pair.second.take());
    let a = pair.dir("a");
    blocking(move || {
        for i in 0..files {
            std::fs::write(a.join(format!("away{i}")), vec![i as u8; 1 << 20]).unwrap();
        }
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;
    (files as u64) << 20
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reintegration_keeps_to_its_rate_and_reports_progress() {
    let mut pair = Pair::new(AckMode::Write);
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    let rate = 4 << 20;
    config.resync_rate = Some(rate);
    pair.start_prim(config);
    pair.wait_synced().await;
    let changed = change_while_second_is_away(&mut pair, 8).await;

    // SECOND returns: sample PRIM's progress report until it is in step again.
    pair.start_second("b", &addr.to_string());
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    let sent = loop {
        let events = pair.events.as_mut().unwrap();
        match tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
            Ok(Some(event @ rampart_mirror::prim::Event::Synced { .. })) => {
                break synced_bytes(&event)
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("PRIM stopped"),
        }
        samples.extend(pair.prim.as_ref().unwrap().status().resync);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no Synced event"
        );
    };
    let took = started.elapsed();

    // At 4 MiB/s, 8 MiB take about two seconds (a generous lower bound: 1.5 s).
    assert!(sent >= changed, "sent {sent} of {changed}");
    assert!(took >= Duration::from_millis(1500), "took only {took:?}");
    let midway = samples
        .iter()
        .find(|p| !p.done && p.zones_sent > 0 && p.zones_sent < p.zones_total)
        .unwrap_or_else(|| panic!("no progress report midway: {samples:?}"));
    assert!(midway.eta_secs.is_some_and(|eta| eta > 0.0), "{midway:?}");
    assert!(
        midway.bytes_sent > 0 && midway.bytes_sent < changed,
        "{midway:?}"
    );
    let last = pair.prim.as_ref().unwrap().status().resync.unwrap();
    assert!(last.done && last.zones_sent == last.zones_total, "{last:?}");
    converge(&pair.dir("a"), &pair.dir("b"), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_reintegration_resumes_where_it_stopped() {
    let mut pair = Pair::new(AckMode::Write);
    let addr = pair.start_second("b", "127.0.0.1:0");
    let mut config = pair.prim_config("a", addr, 1);
    config.resync_rate = Some(4 << 20);
    pair.start_prim(config);
    pair.wait_synced().await;
    let changed = change_while_second_is_away(&mut pair, 8).await;

    // SECOND returns and leaves again once part of the work is durably copied.
    pair.start_second("b", &addr.to_string());
    let started = std::time::Instant::now();
    loop {
        let durable_part = pair
            .prim
            .as_ref()
            .unwrap()
            .status()
            .resync
            .is_some_and(|p| !p.done && p.bytes_sent >= changed / 3);
        if durable_part {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past SECOND's periodic sync, so the copied zones are durable and settled.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(pair.second.take());
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;

    // Back again: only what was not copied yet is sent.
    pair.start_second("b", &addr.to_string());
    let sent = synced_bytes(&pair.wait_synced().await);
    assert!(
        sent > 0 && sent <= changed * 3 / 4,
        "the second run sent {sent} of {changed} changed bytes"
    );
    converge(&pair.dir("a"), &pair.dir("b"), Duration::from_secs(5)).await;
}

/// Names removed and made again, or renamed over, while SECOND is away: SECOND still
/// holds an entry of the same kind under each name, with other attributes, another
/// link target or other data. Its listing matches PRIM's; what each name holds must
/// too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_replaced_while_second_is_away_hold_what_prim_holds() {
    use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
    let mut pair = Pair::in_step(AckMode::Write).await;
    let a = pair.dir("a");
    blocking({
        let a = a.clone();
        move || {
            symlink("old", a.join("link")).unwrap();
            std::fs::write(a.join("f"), b"same length").unwrap();
            std::fs::create_dir(a.join("d")).unwrap();
            std::fs::write(a.join("x"), b"the new data").unwrap();
            std::fs::write(a.join("y"), b"the old data").unwrap();
        }
    })
    .await;
    let b = pair.dir("b");
    converge(&a, &b, Duration::from_secs(20)).await;
    // Durable on SECOND, so that no mark is left: only the replacements below are.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = pair.prim.as_ref().unwrap().status();
        if status.durable >= status.acked && status.bytes_in_flight == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not durable: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = pair.second.as_ref().unwrap().addr();
    drop(pair.second.take());
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, rampart_mirror::prim::Event::PeerLost { .. })
    })
    .await;
    blocking({
        let a = a.clone();
        move || {
            // `ln -sf`: unlink and symlink, no rename.
            std::fs::remove_file(a.join("link")).unwrap();
            symlink("new", a.join("link")).unwrap();
            // Recreated with another mode (and the same length).
            std::fs::remove_file(a.join("f")).unwrap();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(a.join("f"))
                .unwrap();
            std::io::Write::write_all(&mut f, b"SAME LENGTH").unwrap();
            std::fs::remove_dir(a.join("d")).unwrap();
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(a.join("d"))
                .unwrap();
            // `mv -n` onto a name removed first: SECOND still has the old `y`.
            std::fs::remove_file(a.join("y")).unwrap();
            let renamed = rustix::fs::renameat_with(
                rustix::fs::CWD,
                a.join("x"),
                rustix::fs::CWD,
                a.join("y"),
                rustix::fs::RenameFlags::NOREPLACE,
            );
            renamed.unwrap();
        }
    })
    .await;
    pair.start_second("b", &addr.to_string());
    pair.wait_synced().await;
    assert_same_trees(&a, &b);
}
