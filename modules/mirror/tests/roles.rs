//! Role switches in one process, each node keeping its own book: SECOND drained and
//! promoted (failover), the old PRIM back as its SECOND (failback), and the swap back.
//! Each reintegration sends what changed while the other was away, and nothing else.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rampart_mirror::prim::Event;
use rampart_mirror::AckMode;
use support::{assert_same_trees, blocking, converge, Pair, SECOND_SYNC_EVERY};

fn bytes_sent(event: &Event) -> u64 {
    match event {
        Event::Synced { bytes_sent, .. } => *bytes_sent,
        other => panic!("not a Synced event: {other:?}"),
    }
}

/// PRIM on `prim` stops and SECOND on `second` drains: the two copies are then the
/// same, and both books are free for the next roles.
async fn stop_both(pair: &mut Pair, prim: &str, second: &str) {
    // SECOND syncs what it applied, so that PRIM's last intents are settled.
    tokio::time::sleep(SECOND_SYNC_EVERY * 3).await;
    let primary = pair.prim.take().unwrap();
    let released = blocking(move || primary.stop()).await.unwrap();
    assert_eq!(released.book, pair.dir(&format!("{prim}.book")));
    let secondary = pair.second.take().unwrap();
    let drained = blocking(move || secondary.stop_and_drain()).await;
    assert_eq!(
        drained.applied, drained.durable,
        "a drain syncs what it applied"
    );
    assert_same_trees(&pair.dir(prim), &pair.dir(second));
}

/// Writes `len` bytes of `byte` at `offset` of `path` and syncs them.
fn write_at(path: &Path, offset: u64, byte: u8, len: usize) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .unwrap();
    file.write_all_at(&vec![byte; len], offset).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_switch_both_ways_in_one_process_on_the_same_books() {
    let mut pair = Pair::in_step(AckMode::Write).await;
    let zone = pair.zone_size as usize;
    blocking({
        let a = pair.dir("a");
        move || {
            for i in 0..8u8 {
                write_at(&a.join(format!("f{i}")), 0, i, 4 * zone);
            }
        }
    })
    .await;

    // Failover: b, drained, becomes PRIM of epoch 2; a comes back as its SECOND. A
    // clean stop leaves no intent behind, so nothing is sent again.
    stop_both(&mut pair, "a", "b").await;
    let a_addr = pair.start_second("a", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("b", a_addr, 2));
    assert_eq!(
        bytes_sent(&pair.wait_synced().await),
        0,
        "after the failover"
    );

    // a away: b goes on alone, then a returns and gets only what changed.
    let drained = blocking({
        let second = pair.second.take().unwrap();
        move || second.stop_and_drain()
    })
    .await;
    assert!(drained.applied > 0, "a applied nothing as SECOND");
    let changed = blocking({
        let b = pair.dir("b");
        move || {
            write_at(&b.join("f3"), 0, 0xAA, zone);
            write_at(&b.join("new"), 0, 5, 100_000);
            zone as u64 + 100_000
        }
    })
    .await;
    pair.wait_event(Duration::from_secs(10), |e| {
        matches!(e, Event::PeerLost { .. } | Event::PeerAbsent { .. })
    })
    .await;
    pair.start_second("a", &a_addr.to_string());
    assert_eq!(
        bytes_sent(&pair.wait_synced().await),
        changed,
        "after the failback"
    );

    // Swap back: a is PRIM again (epoch 3), b its SECOND, and writes through a's mount
    // reach b.
    stop_both(&mut pair, "b", "a").await;
    let b_addr = pair.start_second("b", "127.0.0.1:0");
    pair.start_prim(pair.prim_config("a", b_addr, 3));
    assert_eq!(bytes_sent(&pair.wait_synced().await), 0, "after the swap");
    blocking({
        let a = pair.dir("a");
        move || write_at(&a.join("f5"), zone as u64, 0xBB, 10)
    })
    .await;
    converge(&pair.dir("a"), &pair.dir("b"), Duration::from_secs(10)).await;
    let f5 = std::fs::read(pair.dir("b").join("f5")).unwrap();
    assert_eq!(&f5[zone..zone + 10], &[0xBB; 10]);
}
