//! Intents ahead of sequential writers.
//!
//! A write into a zone that is not yet an intent waits for a synced bookkeeping write
//! (the invariant: marked before applied). A sequential writer reaches a new zone
//! every zone size, so a window of zones is marked at once ([`window_at`]), and while
//! the writer is in the second half of its window the next one is recorded on the
//! marker thread: a sequential writer then never waits for the book. That matters
//! because a synced write waits for the device to flush everything written before it,
//! the writer's own data included: 9 synced writes per GiB cost 6 ms on an idle disk
//! here and 891 ms (up to 309 ms each) while the data's writeback ran beside them.
//!
//! The background marks follow the rules of the synchronous ones:
//! - a zone enters the cache (`Order::intent_zones`) only after the book holds it;
//! - a window recorded across a link loss (which clears the book's intents) or a
//!   rename (which moves them) is not taken into the cache; the book keeps it until it
//!   next drops intents, which only costs a resend after a crash;
//! - the cache does not clear zones of a window being recorded, so the book's copy of a
//!   zone is never cleared behind a record that the cache then takes in.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rampart_storage::{MarkKind, Marks, ReplicationBook};

use super::marks::{Intent, Order};
use crate::protocol::RelPath;

/// Zones marked ahead of a write into an unmarked zone: as many as are marked just
/// before it, within these bounds. A sequential writer thus doubles its window each
/// time it reaches the end (16, 32, … 256 zones). Zones marked ahead and never written
/// cost nothing at link loss (they are dropped); after a crash they are sent again,
/// which is cheap past the end of the file.
pub(super) const MARK_AHEAD_ZONES: u64 = 16;
pub(super) const MARK_AHEAD_MAX_ZONES: u64 = 256;

/// How many zones to mark from the unmarked `zone` of `path` on.
pub(super) fn window_at(order: &Order, path: &[u8], zone: u64) -> u64 {
    let mut key = (path.to_vec(), zone);
    let mut behind = 0;
    while behind < MARK_AHEAD_MAX_ZONES && key.1 > 0 {
        key.1 -= 1;
        if !order.intent_zones.contains_key(&key) {
            break;
        }
        behind += 1;
    }
    behind.clamp(MARK_AHEAD_ZONES, MARK_AHEAD_MAX_ZONES)
}

/// The last window marked for a file, and the next one while it is being recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Run {
    /// One past the last zone marked.
    pub(super) end: u64,
    /// Zones in the last window.
    pub(super) window: u64,
    pub(super) recording: Option<Recording>,
}

/// A window on its way to the book, and the epochs it was sent under: a job of an older
/// epoch never takes a newer run's window for its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Recording {
    pub(super) zones: Range<u64>,
    pub(super) epochs: Epochs,
}

/// Which intents leave the cache together: bumped when the book's intents are dropped
/// (link loss) and when marks move (rename). A window recorded under an older value is
/// not taken in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Epochs {
    pub(super) dropped: u64,
    pub(super) renamed: u64,
}

/// One window for the marker thread.
struct Job {
    path: RelPath,
    zones: Range<u64>,
    epochs: Epochs,
}

/// The marker thread: records windows of intents in the book, then in the cache.
pub(super) struct Marker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Marker {
    pub(super) fn start(book: Arc<ReplicationBook>, order: Arc<Mutex<Order>>) -> Marker {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("mirror-marker".into())
            .spawn(move || {
                for job in queue {
                    record(&book, &order, job);
                }
            })
            .expect("spawn the marker thread");
        Marker {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// After a change to `touched` zones: starts recording the next window of each
    /// file written sequentially into the second half of its last window.
    pub(super) fn after_change(&self, order: &mut Order, touched: &Marks) {
        for (path, zones) in &touched.zones {
            let Some(&zone) = zones.last() else { continue };
            let Some(run) = order.ahead.get(path) else {
                continue;
            };
            if run.recording.is_some() || zone >= run.end || zone + run.window / 2 < run.end {
                continue;
            }
            // Sequential: the zone before this one was written.
            let sequential = zone > 0
                && order
                    .intent_zones
                    .get(&(path.clone(), zone - 1))
                    .is_some_and(|intent| intent.written.is_some());
            if !sequential {
                continue;
            }
            let next = run.end..run.end + (run.window * 2).min(MARK_AHEAD_MAX_ZONES);
            let job = Job {
                path: path.clone(),
                zones: next.clone(),
                epochs: order.epochs,
            };
            let recording = Recording {
                zones: next,
                epochs: order.epochs,
            };
            if self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job).is_ok())
            {
                if let Some(run) = order.ahead.get_mut(path) {
                    run.recording = Some(recording);
                }
            }
        }
    }
}

impl Drop for Marker {
    /// Waits for the window being recorded: the book must be free once the engine is.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn record(book: &ReplicationBook, order: &Mutex<Order>, job: Job) {
    let mut marks = Marks::default();
    for zone in job.zones.clone() {
        marks.add_zone(&job.path, zone);
    }
    let recorded = book.add(MarkKind::Intent, &marks);
    let mut order = order.lock().expect("order lock");
    let current = order.epochs == job.epochs;
    let ours = Recording {
        zones: job.zones.clone(),
        epochs: job.epochs,
    };
    if let Some(run) = order.ahead.get_mut(&job.path) {
        if run.recording.as_ref() == Some(&ours) {
            run.recording = None;
            if recorded.is_ok() && current && job.zones.end > run.end {
                run.end = job.zones.end;
                run.window = job.zones.end - job.zones.start;
            }
        }
    }
    if let Err(e) = recorded {
        // The writer records the zones itself when it gets there.
        tracing::warn!("cannot record intents ahead of a writer: {e}");
        return;
    }
    if !current {
        return;
    }
    let mark = Intent {
        marked: order.last_seq,
        written: None,
        touched: Instant::now(),
    };
    for zone in job.zones {
        order
            .intent_zones
            .entry((job.path.clone(), zone))
            .or_insert(mark);
    }
}

/// Whether `zone` of `path` is in a window being recorded (the cache keeps it then).
pub(super) fn recording(ahead: &HashMap<RelPath, Run>, path: &[u8], zone: u64) -> bool {
    ahead
        .get(path)
        .and_then(|run| run.recording.as_ref())
        .is_some_and(|recording| recording.zones.contains(&zone))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::prim::engine::tests::engine;
    use crate::prim::engine::{Engine, Touch};
    use crate::protocol::Op;

    const ZONE: u64 = 1 << 20;

    /// Writes one byte into each of `zones` of `f` through the engine, as a writer would.
    fn write_zones(engine: &Engine, zones: Range<u64>) {
        for zone in zones {
            let change = engine
                .begin(Touch::range(b"f", zone * ZONE, 1, ZONE))
                .unwrap();
            let op = Op::Write {
                path: b"f".to_vec(),
                offset: zone * ZONE,
            };
            change.commit(op, b"x");
        }
    }

    fn cached(engine: &Engine, zones: Range<u64>) -> bool {
        let order = engine.lock_order();
        zones
            .clone()
            .all(|zone| order.intent_zones.contains_key(&(b"f".to_vec(), zone)))
    }

    /// Waits until the marker recorded `zones` (or gives up after ten seconds).
    fn wait_cached(engine: &Engine, zones: Range<u64>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cached(engine, zones.clone()) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The book holds every intent the cache does.
    fn assert_cache_within_book(engine: &Engine) {
        let order = engine.lock_order();
        let book = engine.book.marks(MarkKind::Intent).unwrap();
        for (path, zone) in order.intent_zones.keys() {
            assert!(
                book.zones.get(path).is_some_and(|z| z.contains(zone)),
                "zone {zone} of {path:?} cached but not in the book"
            );
        }
    }

    /// Starts a session; the frames stay in the returned queue.
    fn streaming(engine: &Engine) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
        let (frames, queue) = tokio::sync::mpsc::unbounded_channel();
        engine
            .start_session(frames, None, &Marks::default())
            .unwrap();
        queue
    }

    #[test]
    fn a_sequential_writer_finds_its_next_windows_recorded_ahead_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let _frames = streaming(&engine);
        // The first write waits for its window, 0..16; the second half of it sends the
        // writer's next window, twice as long, to the marker.
        write_zones(&engine, 0..9);
        assert!(wait_cached(&engine, 16..48), "window 16..48 not recorded");
        assert!(
            !cached(&engine, 48..49),
            "marked further than one window ahead"
        );
        assert_cache_within_book(&engine);
        write_zones(&engine, 9..33);
        assert!(wait_cached(&engine, 48..112), "window 48..112 not recorded");
        assert_cache_within_book(&engine);
        let run = engine.lock_order().ahead.get(&b"f"[..]).cloned();
        assert_eq!(
            run,
            Some(Run {
                end: 112,
                window: 64,
                recording: None
            })
        );
    }

    #[test]
    fn random_writes_mark_nothing_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let _frames = streaming(&engine);
        for zone in [40, 3, 90, 12, 55, 8, 70] {
            write_zones(&engine, zone..zone + 1);
        }
        std::thread::sleep(Duration::from_millis(200));
        let order = engine.lock_order();
        assert!(order.ahead.values().all(|run| run.recording.is_none()));
        // Only the synchronous windows: 16 zones from each first write of a region.
        assert!(
            order.intent_zones.len() <= 7 * 16,
            "{}",
            order.intent_zones.len()
        );
    }

    #[test]
    fn a_window_recorded_across_a_link_loss_or_a_rename_stays_out_of_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        for (bump, name) in [((1, 0), "link loss"), ((0, 1), "rename")] {
            let epochs = engine.lock_order().epochs;
            let zones = 100..132;
            engine.lock_order().ahead.insert(
                b"f".to_vec(),
                Run {
                    end: 100,
                    window: 16,
                    recording: Some(Recording {
                        zones: zones.clone(),
                        epochs,
                    }),
                },
            );
            {
                let mut order = engine.lock_order();
                order.epochs.dropped += bump.0;
                order.epochs.renamed += bump.1;
            }
            let job = Job {
                path: b"f".to_vec(),
                zones: zones.clone(),
                epochs,
            };
            record(&engine.book, &engine.order, job);
            assert!(!cached(&engine, 100..101), "taken in after a {name}");
            // The book kept it: a resend after a crash, never a zone forgotten.
            let book = engine.book.marks(MarkKind::Intent).unwrap();
            assert!(book.zones.get(&b"f"[..]).is_some_and(|z| z.contains(&100)));
            assert_eq!(engine.lock_order().ahead[&b"f"[..]].recording, None);
        }
    }

    #[test]
    fn a_window_of_an_older_epoch_leaves_a_newer_run_recording_the_same_zones_alone() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let old = engine.lock_order().epochs;
        let zones = 100..132;
        let newer = {
            let mut order = engine.lock_order();
            order.epochs.dropped += 1;
            let recording = Recording {
                zones: zones.clone(),
                epochs: order.epochs,
            };
            let run = Run {
                end: 100,
                window: 16,
                recording: Some(recording),
            };
            order.ahead.insert(b"f".to_vec(), run.clone());
            run
        };
        let job = Job {
            path: b"f".to_vec(),
            zones,
            epochs: old,
        };
        record(&engine.book, &engine.order, job);
        // The newer window still guards its zones until its own job is done.
        assert_eq!(engine.lock_order().ahead[&b"f"[..]], newer);
        assert!(!cached(&engine, 100..101));
    }

    #[test]
    fn settled_zones_of_a_window_being_recorded_stay_in_the_book() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let _frames = streaming(&engine);
        write_zones(&engine, 0..1);
        {
            // Everything settled long ago, and zone 3 is in a window being recorded.
            let mut order = engine.lock_order();
            let old = Instant::now() - Duration::from_secs(60);
            for intent in order.intent_zones.values_mut() {
                intent.touched = old;
            }
            let epochs = order.epochs;
            order.ahead.get_mut(&b"f"[..]).unwrap().recording = Some(Recording {
                zones: 3..5,
                epochs,
            });
        }
        engine.lock_link().durable = u64::MAX;
        engine.clear_settled_intents();
        let book = engine.book.marks(MarkKind::Intent).unwrap();
        let kept: Vec<u64> = book.zones[&b"f"[..]].iter().copied().collect();
        assert_eq!(kept, vec![3, 4]);
        assert!(cached(&engine, 3..5) && !cached(&engine, 0..1));
    }
}
