//! The bookkeeping cache: intents and the dirty set as recorded in the book, kept
//! under the order lock so that a change consults them without reading RocksDB.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use rampart_storage::{book, MarkKind, Marks};

use super::ahead::{self, window_at, Epochs, Run};
use super::{Engine, Phase, Touch};
use crate::protocol::RelPath;

/// Settled intents touched more recently than this stay recorded: a zone written again
/// soon does not pay a synced bookkeeping write each time (DRBD's activity log keeps
/// hot extents for the same reason). The price is resending them after a crash.
const INTENT_LINGER: Duration = Duration::from_secs(5);

/// One recorded intent. A zone marked ahead of a sequential writer may never be
/// written: only `written` intents the peer does not durably hold become dirty when the
/// link fails.
#[derive(Clone, Copy)]
pub(super) struct Intent {
    /// The last sequence when it was recorded.
    pub(super) marked: u64,
    /// The last change that touched it.
    pub(super) written: Option<u64>,
    pub(super) touched: Instant,
}

impl Intent {
    /// The peer durably holds every change this intent covers, and it was not touched
    /// within `linger`.
    fn settled(&self, durable: u64, linger: Duration) -> bool {
        self.written.unwrap_or(self.marked) <= durable && self.touched.elapsed() >= linger
    }

    fn unsettled_write(&self, durable: u64) -> bool {
        self.written.is_some_and(|seq| seq > durable)
    }
}

/// Bookkeeping cache and sequence, under the order lock.
#[derive(Default)]
pub(super) struct Order {
    pub(super) last_seq: u64,
    /// Intents recorded in the book.
    pub(super) intent_zones: HashMap<(RelPath, u64), Intent>,
    pub(super) intent_paths: HashMap<RelPath, Intent>,
    /// Mirror of the book's dirty set.
    pub(super) dirty: Marks,
    /// Each sequentially written file's last window of intents.
    pub(super) ahead: HashMap<RelPath, Run>,
    pub(super) epochs: Epochs,
    /// Bumped whenever settled intents leave the book, and whenever reintegrated dirty
    /// marks do.
    pub(super) intents_cleared: u64,
    pub(super) dirty_cleared: u64,
}

/// What removes marks from the book, as seen at one instant: marks found missing under
/// the order lock and written without it ([`Engine::begin`]) are taken into the cache
/// only if this is unchanged, since whatever removed marks meanwhile may have removed
/// those (the cache must never hold a mark the book lost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Removals {
    epochs: Epochs,
    cleared: u64,
}

/// Marks a change needs in the book before it applies, and that the cache says are not
/// there yet.
pub(super) struct Missing {
    pub(super) kind: MarkKind,
    marks: Marks,
    /// Intents: the zones each window marks ahead of a writer.
    windows: Vec<(RelPath, Range<u64>)>,
    pub(super) removals: Removals,
}

impl Missing {
    pub(super) fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

impl Order {
    /// What removes marks of `kind` from the book, as of now.
    pub(super) fn removals(&self, kind: MarkKind) -> Removals {
        Removals {
            epochs: self.epochs,
            cleared: match kind {
                MarkKind::Intent => self.intents_cleared,
                MarkKind::Dirty => self.dirty_cleared,
            },
        }
    }

    /// The intents `touch` needs: each unmarked zone with a window ahead of it, and
    /// each unmarked path.
    pub(super) fn missing_intents(&self, touch: &Touch) -> Missing {
        let mut marks = Marks::default();
        let mut windows = Vec::new();
        for (path, zones) in &touch.marks.zones {
            for &zone in zones {
                if !self.intent_zones.contains_key(&(path.clone(), zone)) {
                    let window = window_at(self, path, zone);
                    for ahead in zone..zone + window {
                        if !self.intent_zones.contains_key(&(path.clone(), ahead)) {
                            marks.add_zone(path, ahead);
                        }
                    }
                    windows.push((path.clone(), zone..zone + window));
                }
            }
        }
        for path in &touch.marks.paths {
            if !self.intent_paths.contains_key(path) {
                marks.add_path(path);
            }
        }
        Missing {
            kind: MarkKind::Intent,
            marks,
            windows,
            removals: self.removals(MarkKind::Intent),
        }
    }

    /// The dirty marks of `marks` the dirty set lacks.
    pub(super) fn missing_dirty(&self, marks: &Marks) -> Missing {
        let mut new = Marks::default();
        for (path, zones) in &marks.zones {
            let known = self.dirty.zones.get(path);
            for zone in zones {
                if !known.is_some_and(|k| k.contains(zone)) {
                    new.add_zone(path, *zone);
                }
            }
        }
        for path in &marks.paths {
            if !self.dirty.paths.contains(path) {
                new.add_path(path);
            }
        }
        Missing {
            kind: MarkKind::Dirty,
            marks: new,
            windows: Vec::new(),
            removals: self.removals(MarkKind::Dirty),
        }
    }

    /// Takes marks the book now holds into the cache.
    pub(super) fn take(&mut self, missing: Missing) {
        let Missing {
            kind,
            marks,
            windows,
            ..
        } = missing;
        if kind == MarkKind::Dirty {
            self.dirty.extend(&marks);
            return;
        }
        let mark = Intent {
            marked: self.last_seq,
            written: None,
            touched: Instant::now(),
        };
        // A zone another change took in meanwhile keeps its entry: it may already say
        // which change wrote it, which a link loss must turn into dirty.
        for (path, zones) in marks.zones {
            for zone in zones {
                self.intent_zones
                    .entry((path.clone(), zone))
                    .or_insert(mark);
            }
        }
        for path in marks.paths {
            self.intent_paths.entry(path).or_insert(mark);
        }
        for (path, zones) in windows {
            let run = self.ahead.entry(path).or_default();
            if zones.end > run.end {
                run.end = zones.end;
                run.window = zones.end - zones.start;
            }
        }
    }
}

impl Engine {
    /// Records `missing` in the book (synced) and in the cache, under the order lock.
    pub(super) fn record(&self, order: &mut Order, missing: Missing) -> Result<(), i32> {
        if missing.is_empty() {
            return Ok(());
        }
        self.write_marks(&missing)?;
        order.take(missing);
        Ok(())
    }

    /// The synced book write of `missing`; the order lock need not be held.
    pub(super) fn write_marks(&self, missing: &Missing) -> Result<(), i32> {
        self.book.add(missing.kind, &missing.marks).map_err(|e| {
            tracing::error!("cannot record {:?} marks: {e}", missing.kind);
            libc::EIO
        })
    }

    pub(super) fn record_dirty(&self, order: &mut Order, marks: &Marks) -> Result<(), i32> {
        let missing = order.missing_dirty(marks);
        self.record(order, missing)
    }

    /// Written intents the peer does not durably hold become dirty; the others (settled,
    /// or marked ahead and never written) are dropped.
    pub(super) fn intents_to_dirty(&self, order: &mut Order, durable: u64) {
        order.ahead.clear();
        order.epochs.dropped += 1;
        let mut unsettled = Marks::default();
        for ((path, zone), intent) in order.intent_zones.drain() {
            if intent.unsettled_write(durable) {
                unsettled.add_zone(&path, zone);
            }
        }
        for (path, intent) in order.intent_paths.drain() {
            if intent.unsettled_write(durable) {
                unsettled.add_path(&path);
            }
        }
        let moved = self.book.add(MarkKind::Dirty, &unsettled).and_then(|()| {
            order.dirty.extend(&unsettled);
            let recorded = self.book.marks(MarkKind::Intent)?;
            self.book.clear(MarkKind::Intent, &recorded)
        });
        if let Err(e) = moved {
            // Keep the conservative answer: every recorded intent is dirty.
            tracing::error!("cannot move unsettled intents to the dirty set: {e}");
            match self.book.intents_to_dirty() {
                Ok(all) => order.dirty.extend(&all),
                Err(e) => tracing::error!("cannot move intents to the dirty set: {e}"),
            }
        }
    }

    /// Clears intents whose every change the peer holds durably, except those touched
    /// within [`INTENT_LINGER`]. Not synced.
    pub(crate) fn clear_settled_intents(&self) {
        self.clear_intents_settled_for(INTENT_LINGER)
    }

    /// The peer's durable watermark while a session streams: what a stop may still
    /// clear intents by once it fenced ([`Engine::clear_settled_after_stop`]).
    pub(crate) fn durable_in_session(&self) -> Option<u64> {
        let link = self.lock_link();
        (link.phase == Phase::Streaming).then_some(link.durable)
    }

    /// On a clean stop, after the fence: every intent the peer durably holds by
    /// `durable`, hot or not, so that the next session (this node as SECOND, say) does
    /// not send them again. Never waits for a change in progress: with the order lock
    /// taken, nothing is cleared, which only costs that resend.
    pub(crate) fn clear_settled_after_stop(&self, durable: u64) {
        if let Ok(mut order) = self.order.try_lock() {
            self.clear_settled_in(&mut order, durable, Duration::ZERO);
        }
    }

    fn clear_intents_settled_for(&self, linger: Duration) {
        let mut order = self.lock_order();
        let durable = {
            let link = self.lock_link();
            if link.phase != Phase::Streaming {
                return;
            }
            link.durable
        };
        self.clear_settled_in(&mut order, durable, linger);
    }

    fn clear_settled_in(&self, order: &mut Order, durable: u64, linger: Duration) {
        let mut settled = Marks::default();
        let Order {
            intent_zones,
            intent_paths,
            ahead,
            ..
        } = order;
        intent_zones.retain(|(path, zone), intent| {
            let settle = intent.settled(durable, linger) && !ahead::recording(ahead, path, *zone);
            if settle {
                settled.add_zone(path, *zone);
            }
            !settle
        });
        intent_paths.retain(|path, intent| {
            let settle = intent.settled(durable, linger);
            if settle {
                settled.add_path(path);
            }
            !settle
        });
        // A file's run is forgotten once its last window has settled.
        ahead.retain(|path, run| {
            run.recording.is_some()
                || intent_zones.contains_key(&(path.clone(), run.end.saturating_sub(1)))
        });
        if settled.is_empty() {
            return;
        }
        order.intents_cleared += 1;
        if let Err(e) = self.book.clear(MarkKind::Intent, &settled) {
            tracing::warn!("cannot clear settled intents: {e}");
        }
    }

    /// A copy of the dirty set.
    pub(crate) fn dirty(&self) -> Marks {
        self.lock_order().dirty.clone()
    }

    /// Marks more work for reintegration (durably).
    pub(crate) fn add_dirty(&self, marks: &Marks) -> Result<(), i32> {
        let mut order = self.lock_order();
        self.record_dirty(&mut order, marks)
    }

    /// Forgets dirty marks the peer durably holds in `session`. Not synced. Nothing is
    /// forgotten once the session ended: what ended it (a `Failed` from SECOND, say)
    /// may have marked the same zones again, after the acknowledgement the caller saw.
    pub(crate) fn clear_dirty(&self, session: u64, marks: &Marks) {
        let mut order = self.lock_order();
        if self.lock_link().session != session {
            return;
        }
        if marks.is_empty() {
            return;
        }
        order.dirty.remove(marks);
        order.dirty_cleared += 1;
        if let Err(e) = self.book.clear(MarkKind::Dirty, marks) {
            tracing::warn!("cannot clear reintegrated marks: {e}");
        }
    }
}

pub(super) fn rename_in(order: &mut Order, from: &[u8], to: &[u8]) {
    let moved = |path: &[u8]| book::is_within(path, from).then(|| book::reroot(path, from, to));
    order.epochs.renamed += 1;
    order
        .ahead
        .retain(|path, _| !book::is_within(path, from) && !book::is_within(path, to));
    order.intent_zones = std::mem::take(&mut order.intent_zones)
        .into_iter()
        .map(|((path, zone), seq)| ((moved(&path).unwrap_or(path), zone), seq))
        .collect();
    order.intent_paths = std::mem::take(&mut order.intent_paths)
        .into_iter()
        .map(|(path, seq)| (moved(&path).unwrap_or(path), seq))
        .collect();
    let mut renamed = Marks::default();
    let dirty = std::mem::take(&mut order.dirty);
    for (path, zones) in dirty.zones {
        let path = moved(&path).unwrap_or(path);
        renamed.zones.entry(path).or_default().extend(zones);
    }
    for path in dirty.paths {
        renamed.paths.insert(moved(&path).unwrap_or(path));
    }
    order.dirty = renamed;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks what `window_at` asks for at the first unmarked zone a writer reaches, as
    /// `Order::missing_intents` finds them; returns how many bookkeeping writes that took.
    fn write_zones(order: &mut Order, path: &[u8], zones: impl Iterator<Item = u64>) -> usize {
        let mut book_writes = 0;
        for zone in zones {
            if !order.intent_zones.contains_key(&(path.to_vec(), zone)) {
                book_writes += 1;
                for ahead in zone..zone + window_at(order, path, zone) {
                    let intent = Intent {
                        marked: 0,
                        written: None,
                        touched: Instant::now(),
                    };
                    order.intent_zones.insert((path.to_vec(), ahead), intent);
                }
            }
        }
        book_writes
    }

    #[test]
    fn a_sequential_writer_doubles_its_window_up_to_the_bound() {
        let mut order = Order::default();
        // 16 + 16 + 32 + 64 + 128 + 256 + 256 + 256 zones.
        assert_eq!(write_zones(&mut order, b"big", 0..1024), 8);
        assert_eq!(order.intent_zones.len(), 1024);
    }

    #[test]
    fn a_write_away_from_marked_zones_marks_the_smallest_window() {
        let mut order = Order::default();
        write_zones(&mut order, b"f", 0..64);
        assert_eq!(window_at(&order, b"f", 500), ahead::MARK_AHEAD_ZONES);
        assert_eq!(window_at(&order, b"other", 64), ahead::MARK_AHEAD_ZONES);
        // Right after the marked run, the window is as long as the run.
        assert_eq!(window_at(&order, b"f", 64), 64);
    }
}
