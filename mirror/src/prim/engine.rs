//! PRIM's replication engine: orders changes, keeps the bookkeeping, streams frames and
//! answers the application once the acknowledgement mode is satisfied.
//!
//! Invariants:
//! - A change is marked (intent while streaming, dirty otherwise) durably *before* it is
//!   applied locally, so a crash never leaves a local change unknown to the book.
//! - Local apply and enqueueing of its frame happen under one lock ([`Engine::begin`]),
//!   so the stream carries changes in the order they hit the local tree; the
//!   reintegration copier takes the same lock to read and send a zone.
//! - A waiter is answered `Ok` only when the peer acknowledged its sequence at the
//!   waiter's level, or when the caller decided to continue alone
//!   ([`Engine::go_alone`]) after being told the peer was lost. Never otherwise.
//! - Lock order: `order` before `link`. Phase changes take both.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rampart_storage::{book, JournalEntry, MarkKind, Marks, ReplicationBook};
use tokio::sync::mpsc as amps;

use crate::prim::{Event, PrimConfig, PrimStatus};
use crate::protocol::{self, Answer, Down, Op, RelPath, Request};
use crate::tree::Tree;
use crate::AckMode;

/// Zones marked ahead of a write into an unmarked zone: sequential writers pay one
/// synced bookkeeping write per this many zones.
const MARK_AHEAD_ZONES: u64 = 16;

/// Where the stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// Connected: changes stream and wait for acknowledgements.
    Streaming,
    /// The peer stopped acknowledging; writes wait for the caller's decision.
    Stalled,
    /// The caller decided to continue without the peer: writes return at once and are
    /// recorded as dirty.
    Alone,
    /// No longer PRIM: writes are refused.
    Fenced,
}

/// What an application call waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Received,
    Durable,
}

pub type Done = Box<dyn FnOnce(Result<(), i32>) + Send>;

struct Waiter {
    level: Level,
    done: Done,
}

/// What a change touches, for the bookkeeping.
#[derive(Default)]
pub struct Touch {
    marks: Marks,
}

impl Touch {
    pub fn path(path: &[u8]) -> Touch {
        let mut touch = Touch::default();
        touch.marks.add_path(path);
        touch
    }

    pub fn and_path(mut self, path: &[u8]) -> Touch {
        self.marks.add_path(path);
        self
    }

    /// The zones covering `len` bytes at `offset`.
    pub fn range(path: &[u8], offset: u64, len: u64, zone_size: u64) -> Touch {
        let mut touch = Touch::default();
        let first = offset / zone_size;
        let last = (offset + len.max(1) - 1) / zone_size;
        for zone in first..=last {
            touch.marks.add_zone(path, zone);
        }
        touch
    }

    pub fn and_range(mut self, path: &[u8], offset: u64, len: u64, zone_size: u64) -> Touch {
        self.marks
            .extend(&Touch::range(path, offset, len, zone_size).marks);
        self
    }
}

/// Settled intents touched more recently than this stay recorded: a zone written again
/// soon does not pay a synced bookkeeping write each time (DRBD's activity log keeps
/// hot extents for the same reason). The price is resending them after a crash.
const INTENT_LINGER: Duration = Duration::from_secs(5);

/// One recorded intent. A zone marked ahead of a sequential writer may never be
/// written: only `written` intents the peer does not durably hold become dirty when the
/// link fails.
#[derive(Clone, Copy)]
struct Intent {
    /// The last sequence when it was recorded.
    marked: u64,
    /// The last change that touched it.
    written: Option<u64>,
    touched: Instant,
}

impl Intent {
    /// The peer durably holds every change this intent covers, and it is not hot.
    fn settled(&self, durable: u64) -> bool {
        self.written.unwrap_or(self.marked) <= durable && self.touched.elapsed() > INTENT_LINGER
    }

    fn unsettled_write(&self, durable: u64) -> bool {
        self.written.is_some_and(|seq| seq > durable)
    }
}

/// Bookkeeping cache and sequence, under the order lock.
#[derive(Default)]
struct Order {
    last_seq: u64,
    /// Intents recorded in the book.
    intent_zones: HashMap<(RelPath, u64), Intent>,
    intent_paths: HashMap<RelPath, Intent>,
    /// Mirror of the book's dirty set.
    dirty: Marks,
}

struct Link {
    phase: Phase,
    /// Frames for the current session's sender; `None` unless streaming.
    frames: Option<amps::UnboundedSender<Vec<u8>>>,
    session: u64,
    received: u64,
    durable: u64,
    /// Sent, not yet received: (seq, bytes, when).
    in_flight: VecDeque<(u64, usize, Instant)>,
    in_flight_bytes: usize,
    waiters: BTreeMap<u64, Vec<Waiter>>,
    /// Waiting for the caller's decision (stalled) or for reintegration to finish.
    parked: Vec<Waiter>,
    answers: HashMap<u64, mpsc::Sender<Answer>>,
    last_heard: Instant,
}

/// A change in progress: the order lock is held until it is committed or dropped.
pub struct Change<'a> {
    engine: &'a Engine,
    order: MutexGuard<'a, Order>,
    phase: Phase,
    touch: Touch,
}

/// Where a committed change stands.
pub enum Ticket {
    /// Nothing to wait for.
    Now,
    /// Wait for the peer's acknowledgement of `seq` in `session`.
    Sent { seq: u64, session: u64 },
    /// Wait for the caller's decision.
    Parked,
}

pub struct Engine {
    pub tree: Tree,
    pub book: ReplicationBook,
    pub config: PrimConfig,
    order: Mutex<Order>,
    link: Mutex<Link>,
    link_changed: Condvar,
    events: amps::UnboundedSender<Event>,
    pub(crate) status: Mutex<PrimStatus>,
}

impl Engine {
    pub fn new(
        tree: Tree,
        book: ReplicationBook,
        config: PrimConfig,
        events: amps::UnboundedSender<Event>,
    ) -> Result<Engine, crate::MirrorError> {
        // Intents of an earlier run as PRIM were never acknowledged as far as we know.
        book.intents_to_dirty()?;
        let dirty = book.marks(MarkKind::Dirty)?;
        Ok(Engine {
            tree,
            book,
            config,
            order: Mutex::new(Order {
                dirty,
                ..Order::default()
            }),
            link: Mutex::new(Link {
                phase: Phase::Stalled,
                frames: None,
                session: 0,
                received: 0,
                durable: 0,
                in_flight: VecDeque::new(),
                in_flight_bytes: 0,
                waiters: BTreeMap::new(),
                parked: Vec::new(),
                answers: HashMap::new(),
                last_heard: Instant::now(),
            }),
            link_changed: Condvar::new(),
            events,
            status: Mutex::new(PrimStatus::default()),
        })
    }

    fn lock_order(&self) -> MutexGuard<'_, Order> {
        self.order.lock().expect("order lock")
    }

    fn lock_link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().expect("link lock")
    }

    pub fn phase(&self) -> Phase {
        self.lock_link().phase
    }

    /// True when `path` is excluded from replication.
    pub fn not_replicated(&self, path: &[u8]) -> bool {
        self.config
            .not_replicated
            .iter()
            .any(|root| !root.is_empty() && book::is_within(path, root))
    }

    /// Starts a change: waits for room in the send window, takes the order lock and
    /// records what the change touches (durably, when not already recorded).
    pub fn begin(&self, touch: Touch) -> Result<Change<'_>, i32> {
        self.wait_for_window();
        let mut order = self.lock_order();
        let phase = self.lock_link().phase;
        match phase {
            Phase::Fenced => return Err(libc::EROFS),
            Phase::Streaming => self.record_intents(&mut order, &touch)?,
            Phase::Stalled | Phase::Alone => self.record_dirty(&mut order, &touch.marks)?,
        }
        Ok(Change {
            engine: self,
            order,
            phase,
            touch,
        })
    }

    fn wait_for_window(&self) {
        let deadline = Instant::now() + self.config.link_timeout;
        let mut link = self.lock_link();
        while link.phase == Phase::Streaming && link.in_flight_bytes > self.config.window_bytes {
            let now = Instant::now();
            if now >= deadline {
                return; // The watchdog stalls the link; the change is then marked dirty.
            }
            link = self
                .link_changed
                .wait_timeout(link, deadline - now)
                .expect("link lock")
                .0;
        }
    }

    fn record_intents(&self, order: &mut Order, touch: &Touch) -> Result<(), i32> {
        let mut new = Marks::default();
        for (path, zones) in &touch.marks.zones {
            for zone in zones {
                if !order.intent_zones.contains_key(&(path.clone(), *zone)) {
                    for ahead in *zone..*zone + MARK_AHEAD_ZONES {
                        if !order.intent_zones.contains_key(&(path.clone(), ahead)) {
                            new.add_zone(path, ahead);
                        }
                    }
                }
            }
        }
        for path in &touch.marks.paths {
            if !order.intent_paths.contains_key(path) {
                new.add_path(path);
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        self.book.add(MarkKind::Intent, &new).map_err(|e| {
            tracing::error!("cannot record replication intents: {e}");
            libc::EIO
        })?;
        let mark = Intent {
            marked: order.last_seq,
            written: None,
            touched: Instant::now(),
        };
        for (path, zones) in new.zones {
            for zone in zones {
                order.intent_zones.insert((path.clone(), zone), mark);
            }
        }
        for path in new.paths {
            order.intent_paths.insert(path, mark);
        }
        Ok(())
    }

    fn record_dirty(&self, order: &mut Order, marks: &Marks) -> Result<(), i32> {
        let mut new = Marks::default();
        for (path, zones) in &marks.zones {
            let known = order.dirty.zones.get(path);
            for zone in zones {
                if !known.is_some_and(|k| k.contains(zone)) {
                    new.add_zone(path, *zone);
                }
            }
        }
        for path in &marks.paths {
            if !order.dirty.paths.contains(path) {
                new.add_path(path);
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        self.book.add(MarkKind::Dirty, &new).map_err(|e| {
            tracing::error!("cannot record dirty zones: {e}");
            libc::EIO
        })?;
        order.dirty.extend(&new);
        Ok(())
    }

    /// Sends a frame (the caller holds the order lock and the phase is Streaming).
    fn send_frame(&self, frame: Vec<u8>, seq: Option<u64>) -> Option<u64> {
        let mut link = self.lock_link();
        let session = link.session;
        let frames = link.frames.as_ref()?;
        let len = frame.len();
        if frames.send(frame).is_err() {
            return None;
        }
        if let Some(seq) = seq {
            link.in_flight.push_back((seq, len, Instant::now()));
            link.in_flight_bytes += len;
        }
        Some(session)
    }

    /// Queues a frame outside the sequence (pings); false once `session` ended.
    pub(crate) fn send_unsequenced(&self, session: u64, frame: Vec<u8>) -> bool {
        let link = self.lock_link();
        link.session == session && link.frames.as_ref().is_some_and(|f| f.send(frame).is_ok())
    }

    /// Answers `done` when `ticket` is satisfied at `level`.
    pub fn wait(&self, ticket: Ticket, level: Level, done: Done) {
        let mut link = self.lock_link();
        match ticket {
            Ticket::Now => {
                drop(link);
                done(Ok(()));
            }
            Ticket::Parked => link.parked.push(Waiter { level, done }),
            Ticket::Sent { seq, session } => {
                if session != link.session {
                    // The session ended since: the change is in the dirty set.
                    if link.phase == Phase::Alone {
                        drop(link);
                        return done(Ok(()));
                    }
                    return link.parked.push(Waiter { level, done });
                }
                let reached = match level {
                    Level::Received => link.received,
                    Level::Durable => link.durable,
                };
                if reached >= seq {
                    drop(link);
                    done(Ok(()));
                } else {
                    link.waiters
                        .entry(seq)
                        .or_default()
                        .push(Waiter { level, done });
                }
            }
        }
    }

    /// The level a write waits for in this module's mode, if any.
    pub fn write_level(&self) -> Option<Level> {
        match self.config.ack {
            AckMode::Write => Some(Level::Received),
            AckMode::Durable => Some(Level::Durable),
            AckMode::Fsync => None,
        }
    }

    /// The level an fsync waits for.
    pub fn fsync_level(&self) -> Level {
        match self.config.ack {
            AckMode::Write => Level::Received,
            AckMode::Durable | AckMode::Fsync => Level::Durable,
        }
    }

    // ---- session side -------------------------------------------------------------

    /// A session is up: from now on changes stream to `frames`. Returns the session id.
    /// `overwrite` are the peer's own marks, already mapped to this tree's names.
    pub(crate) fn start_session(
        &self,
        frames: amps::UnboundedSender<Vec<u8>>,
        replay: Option<Vec<JournalEntry>>,
        overwrite: &Marks,
    ) -> Result<u64, crate::MirrorError> {
        let mut order = self.lock_order();
        self.book.add(MarkKind::Dirty, overwrite)?;
        order.dirty.extend(overwrite);
        let mut link = self.lock_link();
        if let Some(entries) = replay.filter(|e| !e.is_empty()) {
            let epoch = self.config.epoch;
            let _ = frames.send(protocol::encode(&Down::Replay { epoch, entries }, &[]));
        }
        link.session += 1;
        link.frames = Some(frames);
        link.phase = Phase::Streaming;
        link.received = order.last_seq;
        link.durable = order.last_seq;
        link.in_flight.clear();
        link.in_flight_bytes = 0;
        link.last_heard = Instant::now();
        let session = link.session;
        drop(link);
        self.set_status(|s| {
            s.phase = Phase::Streaming;
            s.connected = true;
        });
        Ok(session)
    }

    /// The peer acknowledged.
    pub(crate) fn on_ack(&self, session: u64, received: u64, durable: u64) {
        let mut ready = Vec::new();
        {
            let mut link = self.lock_link();
            if link.session != session {
                return;
            }
            link.last_heard = Instant::now();
            link.received = link.received.max(received);
            link.durable = link.durable.max(durable);
            while let Some(&(seq, len, _)) = link.in_flight.front() {
                if seq > link.received {
                    break;
                }
                link.in_flight.pop_front();
                link.in_flight_bytes -= len;
            }
            let (received, durable) = (link.received, link.durable);
            let settled: Vec<u64> = link.waiters.range(..=received).map(|(s, _)| *s).collect();
            for seq in settled {
                let waiters = link.waiters.remove(&seq).expect("just listed");
                let mut keep = Vec::new();
                for waiter in waiters {
                    if waiter.level == Level::Received || durable >= seq {
                        ready.push(waiter.done);
                    } else {
                        keep.push(waiter);
                    }
                }
                if !keep.is_empty() {
                    link.waiters.insert(seq, keep);
                }
            }
        }
        self.link_changed.notify_all();
        for done in ready {
            done(Ok(()));
        }
        self.set_status(|s| {
            s.acked = received;
            s.durable = durable;
        });
    }

    pub(crate) fn on_heard(&self, session: u64) {
        let mut link = self.lock_link();
        if link.session == session {
            link.last_heard = Instant::now();
        }
    }

    pub(crate) fn on_answer(&self, session: u64, seq: u64, answer: Answer) {
        let mut link = self.lock_link();
        if link.session == session {
            link.last_heard = Instant::now();
            if let Some(tx) = link.answers.remove(&seq) {
                let _ = tx.send(answer);
            }
        }
    }

    /// SECOND could not apply `seq` on `path`: reconcile the path (whole content).
    pub(crate) fn on_failed(&self, path: &[u8], error: &str) {
        tracing::warn!(path = %String::from_utf8_lossy(path), "SECOND failed to apply a change: {error}");
        let mut order = self.lock_order();
        let mut marks = Marks::default();
        marks.add_path(path);
        let parent = match path.iter().rposition(|b| *b == b'/') {
            Some(slash) => path[..slash].to_vec(),
            None => Vec::new(),
        };
        marks.add_path(&parent);
        if let Ok(Some(meta)) = self.tree.meta(path) {
            for zone in 0..meta.size.div_ceil(self.config.zone_size) {
                marks.add_zone(path, zone);
            }
        }
        if let Err(e) = self.record_dirty(&mut order, &marks) {
            tracing::error!("cannot record a divergence: errno {e}");
        }
        drop(order);
        let _ = self.events.send(Event::Diverged {
            path: String::from_utf8_lossy(path).into_owned(),
            error: error.to_string(),
        });
    }

    /// True when the current session heard nothing for the link timeout.
    pub(crate) fn silent_too_long(&self, session: u64) -> bool {
        let link = self.lock_link();
        link.session == session
            && link.phase == Phase::Streaming
            && link.last_heard.elapsed() > self.config.link_timeout
    }

    /// The session ended (error or timeout): in-flight changes become dirty and the
    /// waiters are parked until the caller decides. Reported as [`Event::PeerLost`].
    pub(crate) fn stall(&self, session: u64, reason: String) {
        let mut order = self.lock_order();
        let mut link = self.lock_link();
        if link.session != session || link.phase != Phase::Streaming {
            return;
        }
        link.session += 1;
        link.frames = None;
        link.phase = Phase::Stalled;
        link.in_flight.clear();
        link.in_flight_bytes = 0;
        link.answers.clear();
        let durable = link.durable;
        let waiters = std::mem::take(&mut link.waiters);
        for (_, waiters) in waiters {
            link.parked.extend(waiters);
        }
        drop(link);
        self.intents_to_dirty(&mut order, durable);
        drop(order);
        self.link_changed.notify_all();
        tracing::warn!("replication peer lost: {reason}");
        self.set_status(|s| {
            s.phase = Phase::Stalled;
            s.connected = false;
            s.last_error = Some(reason.clone());
        });
        let _ = self.events.send(Event::PeerLost { reason });
        if self.config.continue_alone {
            self.go_alone();
        }
    }

    /// Written intents the peer does not durably hold become dirty; the others (settled,
    /// or marked ahead and never written) are dropped.
    fn intents_to_dirty(&self, order: &mut Order, durable: u64) {
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

    /// The caller recorded that the peer is not up to date: continue without it.
    /// Parked writes return success.
    pub fn go_alone(&self) {
        let parked = {
            let mut link = self.lock_link();
            if link.phase != Phase::Stalled {
                return;
            }
            link.phase = Phase::Alone;
            std::mem::take(&mut link.parked)
        };
        self.set_status(|s| s.phase = Phase::Alone);
        for waiter in parked {
            (waiter.done)(Ok(()));
        }
    }

    /// Stop acting as PRIM: every waiting and later change fails.
    pub fn fence(&self) {
        let _order = self.lock_order();
        let (parked, waiters) = {
            let mut link = self.lock_link();
            link.phase = Phase::Fenced;
            link.session += 1;
            link.frames = None;
            link.answers.clear();
            (
                std::mem::take(&mut link.parked),
                std::mem::take(&mut link.waiters),
            )
        };
        self.set_status(|s| s.phase = Phase::Fenced);
        for waiter in parked.into_iter().chain(waiters.into_values().flatten()) {
            (waiter.done)(Err(libc::EIO));
        }
    }

    /// Reintegration finished: the peer holds everything; parked writes return.
    pub(crate) fn release_parked(&self) {
        let parked = std::mem::take(&mut self.lock_link().parked);
        for waiter in parked {
            (waiter.done)(Ok(()));
        }
    }

    /// Clears intents whose every change the peer holds durably. Not synced.
    pub(crate) fn clear_settled_intents(&self) {
        let mut order = self.lock_order();
        let durable = {
            let link = self.lock_link();
            if link.phase != Phase::Streaming {
                return;
            }
            link.durable
        };
        let mut settled = Marks::default();
        order.intent_zones.retain(|(path, zone), intent| {
            let settle = intent.settled(durable);
            if settle {
                settled.add_zone(path, *zone);
            }
            !settle
        });
        order.intent_paths.retain(|path, intent| {
            let settle = intent.settled(durable);
            if settle {
                settled.add_path(path);
            }
            !settle
        });
        if let Err(e) = self.book.clear(MarkKind::Intent, &settled) {
            tracing::warn!("cannot clear settled intents: {e}");
        }
    }

    // ---- reintegration side -------------------------------------------------------

    /// A copy of the dirty set.
    pub(crate) fn dirty(&self) -> Marks {
        self.lock_order().dirty.clone()
    }

    /// Marks more work for reintegration (durably).
    pub(crate) fn add_dirty(&self, marks: &Marks) -> Result<(), i32> {
        let mut order = self.lock_order();
        self.record_dirty(&mut order, marks)
    }

    /// Forgets dirty marks the peer now durably holds. Not synced.
    pub(crate) fn clear_dirty(&self, marks: &Marks) {
        let mut order = self.lock_order();
        for (path, zones) in &marks.zones {
            if let Some(known) = order.dirty.zones.get_mut(path) {
                for zone in zones {
                    known.remove(zone);
                }
                if known.is_empty() {
                    order.dirty.zones.remove(path);
                }
            }
        }
        for path in &marks.paths {
            order.dirty.paths.remove(path);
        }
        if let Err(e) = self.book.clear(MarkKind::Dirty, marks) {
            tracing::warn!("cannot clear reintegrated marks: {e}");
        }
    }

    /// Runs `read` under the order lock and sends the operation it returns, for the
    /// copier: what it read cannot be overtaken by a live change. Returns the sequence
    /// sent, `Ok(None)` if `read` chose to send nothing.
    pub(crate) fn send_current(
        &self,
        session: u64,
        read: impl FnOnce(&Tree) -> std::io::Result<Option<(Op, Vec<u8>)>>,
    ) -> Result<Option<u64>, String> {
        let mut order = self.lock_order();
        if self.lock_link().session != session {
            return Err("the session ended".into());
        }
        let Some((op, data)) = read(&self.tree).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        order.last_seq += 1;
        let seq = order.last_seq;
        let frame = protocol::encode(
            &Down::Op {
                epoch: self.config.epoch,
                seq,
                op,
            },
            &data,
        );
        self.send_frame(frame, Some(seq))
            .ok_or_else(|| "the session ended".to_string())?;
        Ok(Some(seq))
    }

    /// Asks the peer a question and waits for the answer.
    pub(crate) fn ask(
        &self,
        session: u64,
        request: Request,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let rx = {
            let mut order = self.lock_order();
            order.last_seq += 1;
            let seq = order.last_seq;
            let (tx, rx) = mpsc::channel();
            {
                let mut link = self.lock_link();
                if link.session != session {
                    return Err("the session ended".into());
                }
                link.answers.insert(seq, tx);
            }
            let frame = protocol::encode(
                &Down::Ask {
                    epoch: self.config.epoch,
                    seq,
                    request,
                },
                &[],
            );
            self.send_frame(frame, Some(seq))
                .ok_or_else(|| "the session ended".to_string())?;
            rx
        };
        rx.recv_timeout(timeout)
            .map_err(|_| "no answer from the peer".to_string())
    }

    /// Waits until the peer durably holds everything up to `seq`.
    pub(crate) fn wait_durable(&self, session: u64, seq: u64) -> Result<(), String> {
        let mut link = self.lock_link();
        loop {
            if link.session != session {
                return Err("the session ended".into());
            }
            if link.durable >= seq {
                return Ok(());
            }
            link = self
                .link_changed
                .wait_timeout(link, Duration::from_millis(100))
                .expect("link lock")
                .0;
        }
    }

    /// Sends the new sync point once nothing is dirty; `None` if something is.
    pub(crate) fn send_sync_point(
        &self,
        session: u64,
        point: rampart_storage::SyncPoint,
    ) -> Result<Option<u64>, String> {
        let mut order = self.lock_order();
        if self.lock_link().session != session {
            return Err("the session ended".into());
        }
        if !order.dirty.is_empty() {
            return Ok(None);
        }
        order.last_seq += 1;
        let seq = order.last_seq;
        let frame = protocol::encode(
            &Down::SyncPoint {
                epoch: self.config.epoch,
                seq,
                point,
            },
            &[],
        );
        self.send_frame(frame, Some(seq))
            .ok_or_else(|| "the session ended".to_string())?;
        Ok(Some(seq))
    }

    pub(crate) fn event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut PrimStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }
}

impl Change<'_> {
    /// The local apply succeeded: assign the next sequence and stream `op`.
    pub fn commit(mut self, op: Op, data: &[u8]) -> Ticket {
        if let Op::Rename { from, to, flags } = &op {
            self.move_marks(from, to, *flags);
        }
        if self.phase != Phase::Streaming {
            if let Some(entry) = journal_entry(&op) {
                if let Err(e) = self.engine.book.journal_push(&entry) {
                    tracing::warn!("cannot journal a rename: {e}");
                }
            }
        }
        let touched = std::mem::take(&mut self.touch.marks);
        self.stream(op, data, &touched)
    }

    /// Streams a write before applying it locally, so that the peer receives it while
    /// the local copy is written. A failed local apply is repaired by streaming the
    /// touched zones as they are now; the peer never keeps bytes PRIM does not have.
    /// Safe against a crash in between: the zones are intents before anything is sent.
    pub fn write_ahead(
        mut self,
        op: Op,
        data: &[u8],
        apply: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<Ticket> {
        debug_assert!(matches!(op, Op::Write { .. }));
        if self.phase != Phase::Streaming {
            apply()?;
            return Ok(self.commit(op, data));
        }
        let touched = std::mem::take(&mut self.touch.marks);
        let ticket = self.stream(op, data, &touched);
        let Err(e) = apply() else {
            return Ok(ticket);
        };
        let zone_size = self.engine.config.zone_size;
        for (path, zones) in &touched.zones {
            for &zone in zones {
                let mut marks = Marks::default();
                marks.add_zone(path, zone);
                match self.engine.tree.zone(path, zone, zone_size) {
                    Ok(Some((op, data))) => {
                        self.stream(op, &data, &marks);
                    }
                    Ok(None) => {}
                    Err(read) => {
                        // The reintegration copies it once the peer is back in step.
                        tracing::warn!("cannot resend a zone after a failed write: {read}");
                        let _ = self.engine.record_dirty(&mut self.order, &marks);
                    }
                }
            }
        }
        Err(e)
    }

    /// Assigns the next sequence to `op` and streams it when connected. (Splitting a
    /// large write into smaller frames, so that authenticating and verifying overlap,
    /// measured slower: per-frame costs outweigh the overlap on two cores.)
    fn stream(&mut self, op: Op, data: &[u8], touched: &Marks) -> Ticket {
        let engine = self.engine;
        self.order.last_seq += 1;
        let seq = self.order.last_seq;
        match self.phase {
            Phase::Streaming => {
                let mark = Intent {
                    marked: seq,
                    written: Some(seq),
                    touched: Instant::now(),
                };
                for (path, zones) in &touched.zones {
                    for &zone in zones {
                        self.order.intent_zones.insert((path.clone(), zone), mark);
                    }
                }
                for path in &touched.paths {
                    self.order.intent_paths.insert(path.clone(), mark);
                }
                let epoch = engine.config.epoch;
                let frame = protocol::encode(&Down::Op { epoch, seq, op }, data);
                match engine.send_frame(frame, Some(seq)) {
                    Some(session) => Ticket::Sent { seq, session },
                    None => Ticket::Parked,
                }
            }
            Phase::Stalled => Ticket::Parked,
            Phase::Alone | Phase::Fenced => Ticket::Now,
        }
    }

    /// Marks follow renamed data (an exchange swaps them).
    fn move_marks(&mut self, from: &[u8], to: &[u8], flags: u32) {
        const SWAP: &[u8] = b"//swap";
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let moves: Vec<(&[u8], &[u8])> = if exchange {
            vec![(from, SWAP), (to, from), (SWAP, to)]
        } else {
            vec![(from, to)]
        };
        for (a, b) in moves {
            if let Err(e) = self.engine.book.rename(a, b) {
                tracing::error!("cannot move marks on rename: {e}");
            }
            rename_in(&mut self.order, a, b);
        }
    }
}

fn rename_in(order: &mut Order, from: &[u8], to: &[u8]) {
    let moved = |path: &[u8]| book::is_within(path, from).then(|| book::reroot(path, from, to));
    order.intent_zones = std::mem::take(&mut order.intent_zones)
        .into_iter()
        .map(|((path, zone), seq)| ((moved(&path).unwrap_or(path), zone), seq))
        .collect();
    order.intent_paths = std::mem::take(&mut order.intent_paths)
        .into_iter()
        .map(|(path, seq)| (moved(&path).unwrap_or(path), seq))
        .collect();
    let dirty = std::mem::take(&mut order.dirty);
    for (path, zones) in dirty.zones {
        let path = moved(&path).unwrap_or(path);
        order.dirty.zones.entry(path).or_default().extend(zones);
    }
    for path in dirty.paths {
        order.dirty.paths.insert(moved(&path).unwrap_or(path));
    }
}

fn journal_entry(op: &Op) -> Option<JournalEntry> {
    match op {
        Op::Rename { from, to, flags } => Some(JournalEntry::Rename {
            from: from.clone(),
            to: to.clone(),
            flags: *flags,
        }),
        Op::Link { from, to } => Some(JournalEntry::Link {
            from: from.clone(),
            to: to.clone(),
        }),
        _ => None,
    }
}
