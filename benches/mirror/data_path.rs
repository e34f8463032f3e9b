//! Sequential writes, cold reads and 4 KiB write + fdatasync latency on every target,
//! rounds alternated.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::targets::targets;
use crate::{drop_caches, median, pattern, percentile, runs, Plan, MIB};

/// Writes `bytes` in 1 MiB writes to `seq` in every directory, then fsyncs: MB/s.
fn sequential_write(dirs: &[PathBuf], bytes: usize, block: &[u8]) -> f64 {
    let started = Instant::now();
    let mut files: Vec<File> = dirs
        .iter()
        .map(|d| File::create(d.join("seq")).expect("create seq"))
        .collect();
    for _ in 0..bytes / block.len() {
        for file in &mut files {
            file.write_all(block).expect("write");
        }
    }
    for file in &files {
        file.sync_all().expect("fsync");
    }
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Reads `seq` of the first directory in 1 MiB reads, the page cache dropped: MB/s.
///
/// Read twice, the figure from the second. The first read after a write depends on the
/// virtual disk's cache on the host, not on the file system: the same file read
/// 0.7 GB/s and then 2.3 GB/s here, whichever the target, and a run's medians swung
/// between 0.36 and 3.5 of native. The second read is as cold for the guest.
fn cold_read(dir: &Path) -> f64 {
    read_all(dir);
    read_all(dir)
}

fn read_all(dir: &Path) -> f64 {
    drop_caches();
    let started = Instant::now();
    let mut file = File::open(dir.join("seq")).expect("open seq");
    let mut buf = vec![0u8; MIB];
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    total as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// `ops` random 4 KiB writes into a 64 MiB file, each followed by fdatasync (in every
/// directory): the latency of each pair, sorted.
fn sync_latencies(dirs: &[PathBuf], ops: usize, seed: u64) -> Vec<Duration> {
    const SPAN: u64 = 64 << 20;
    let files: Vec<File> = dirs
        .iter()
        .map(|d| {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(d.join("lat"))
                .expect("create lat");
            let zeros = vec![0u8; MIB];
            for i in 0..SPAN / MIB as u64 {
                file.write_all_at(&zeros, i * MIB as u64).expect("fill lat");
            }
            file.sync_all().expect("fsync lat");
            file
        })
        .collect();
    let block = pattern(4096, seed);
    let mut state = seed | 1;
    let mut latencies = Vec::with_capacity(ops);
    for _ in 0..ops {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 16) % (SPAN / 4096) * 4096;
        let started = Instant::now();
        for file in &files {
            file.write_all_at(&block, offset).expect("write");
            file.sync_data().expect("fdatasync");
        }
        latencies.push(started.elapsed());
    }
    for dir in dirs {
        let _ = std::fs::remove_file(dir.join("lat"));
    }
    latencies.sort();
    latencies
}

/// The median round trip of one byte to an echoing thread over a socket pair, each
/// `gap` after the last, spent busy here: so the echo wakes on the other CPU, idle for
/// `gap`. What a hop between threads costs on this machine: a replicated write +
/// fdatasync makes about six more than a native one (application to FUSE, to the link,
/// to SECOND, its ack back, to the application; to FUSE, to a sync thread, back).
fn wake_round_trip(gap: Duration, count: usize) -> f64 {
    let (mut here, mut there) = UnixStream::pair().expect("socket pair");
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while there.read_exact(&mut byte).is_ok() && there.write_all(&byte).is_ok() {}
    });
    let mut times = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for _ in 0..count {
        let busy = Instant::now();
        while busy.elapsed() < gap {
            std::hint::spin_loop();
        }
        let started = Instant::now();
        here.write_all(&byte).expect("wake the echo");
        here.read_exact(&mut byte).expect("echo");
        times.push(started.elapsed());
    }
    drop(here);
    echo.join().expect("echo thread");
    times.sort();
    percentile(&times, 0.5).as_secs_f64() * 1e6
}

struct Figures {
    write: Vec<f64>,
    read: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

pub fn run(plan: &Plan) {
    let targets = targets();
    let mut figures: Vec<Figures> = targets
        .iter()
        .map(|_| Figures {
            write: Vec::new(),
            read: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
        })
        .collect();
    let block = pattern(MIB, 7);
    // Round trips to another thread (µs): back to back, and to a CPU idle for 1 ms.
    let (mut wake_hot, mut wake_idle) = (Vec::new(), Vec::new());
    for round in 0..plan.rounds {
        // Alternate the order too, so no target always follows the same neighbour.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for &i in &order {
            let target = &targets[i];
            if !target.latency_only {
                drop_caches();
                figures[i]
                    .write
                    .push(sequential_write(&target.dirs, plan.seq_bytes, &block));
                if target.name != "native-two" {
                    figures[i].read.push(cold_read(&target.dirs[0]));
                }
                for dir in &target.dirs {
                    std::fs::remove_file(dir.join("seq")).expect("remove seq");
                }
            }
            drop_caches();
            let latencies = sync_latencies(&target.dirs, plan.latency_ops, round as u64 + 1);
            figures[i]
                .p50
                .push(percentile(&latencies, 0.5).as_secs_f64() * 1e6);
            figures[i]
                .p99
                .push(percentile(&latencies, 0.99).as_secs_f64() * 1e6);
        }
        wake_hot.push(wake_round_trip(Duration::ZERO, 2000));
        wake_idle.push(wake_round_trip(Duration::from_millis(1), 1000));
        println!("round {} of {} done", round + 1, plan.rounds);
    }
    let find = |name: &str| targets.iter().position(|t| t.name == name).unwrap();
    let (native, two, gluster, rampart) = (
        find("native"),
        find("native-two"),
        find("glusterfs-r2"),
        find("rampart-write"),
    );

    println!(
        "\nsequential write: {} MiB in 1 MiB writes, then fsync (MB/s, median; every run)",
        plan.seq_bytes / MIB
    );
    for (target, f) in targets.iter().zip(&figures) {
        if !f.write.is_empty() {
            println!(
                "  {:<16} {:>7.0}   {}",
                target.name,
                median(&f.write),
                runs(&f.write)
            );
        }
    }
    let w = |i: usize| median(&figures[i].write);
    println!(
        "  rampart-write / glusterfs-r2 = {:.2} (target >= 2)   / native-two = {:.2} (target >= 0.5)   / native = {:.2}",
        w(rampart) / w(gluster),
        w(rampart) / w(two),
        w(rampart) / w(native)
    );

    println!("\ncold sequential read of that file, its second (MB/s, median; every run)");
    for (target, f) in targets.iter().zip(&figures) {
        if !f.read.is_empty() {
            println!(
                "  {:<16} {:>7.0}   {}",
                target.name,
                median(&f.read),
                runs(&f.read)
            );
        }
    }
    let r = |i: usize| median(&figures[i].read);
    println!(
        "  rampart-write / native = {:.2} (target >= 0.9; FUSE passthrough)",
        r(rampart) / r(native)
    );

    println!(
        "\n4 KiB random write + fdatasync, {} per round (µs; median over rounds of p50 and p99)",
        plan.latency_ops
    );
    for (target, f) in targets.iter().zip(&figures) {
        println!(
            "  {:<16} p50 {:>7.0}   p99 {:>7.0}",
            target.name,
            median(&f.p50),
            median(&f.p99)
        );
    }
    let p50 = |i: usize| median(&figures[i].p50);
    println!(
        "  rampart-write p50 - native p50 = {:.0} µs (target <= 200)   rampart-write / glusterfs-r2 p50 = {:.2}",
        p50(rampart) - p50(native),
        p50(rampart) / p50(gluster)
    );
    let durable = find("rampart-durable");
    println!(
        "  rampart-durable p50 - native p50 = {:.0} µs",
        p50(durable) - p50(native)
    );
    println!(
        "  this machine: a hop to a thread and back takes {:.0} µs back to back, {:.0} µs to a CPU idle for 1 ms (median; every run {} / {})",
        median(&wake_hot),
        median(&wake_idle),
        runs(&wake_hot),
        runs(&wake_idle)
    );
    drop(targets);
}
