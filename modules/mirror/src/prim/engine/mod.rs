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
//!   waiter's level in the waiter's session, when a reintegration finished in the
//!   still current session covered its change, or when the caller decided to continue
//!   alone ([`Engine::go_alone`]) after being told of that loss; and in every case only
//!   while [`Engine::may_acknowledge`] (not fenced, within the lease). Never otherwise.
//! - Lock order: `order` before `link`. Phase changes take both, except the fence,
//!   which sets its flag first and then takes `link` only: a change holding `order`
//!   meanwhile is answered `EIO` when it waits.
//!
//! Parts:
//! - [`change`]: one change in progress (marks, sequence, frame).
//! - [`marks`]: the bookkeeping cache (intents, dirty set) under the order lock.
//! - [`ahead`]: intents recorded ahead of sequential writers, on a thread of their own.
//! - [`session`]: what the link and the reintegration copier call.

mod ahead;
mod change;
mod marks;
mod session;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use rampart_storage::{book, MarkKind, ReplicationBook};
use tokio::sync::mpsc as amps;

use crate::prim::resync::ResyncProgress;
use crate::prim::{Event, PrimConfig, PrimStatus};
use crate::protocol::Answer;
use crate::tree::Tree;
use crate::AckMode;
pub use change::{Change, Ticket, Touch};
use marks::Order;

/// How many times a change writes its marks without the order lock before it writes
/// them under it ([`Engine::begin`]).
const GROUP_COMMIT_ATTEMPTS: u32 = 2;

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

impl Waiter {
    fn new(level: Level, done: Done) -> Waiter {
        Waiter {
            level,
            done,
            since: Instant::now(),
        }
    }
}

struct Waiter {
    level: Level,
    done: Done,
    /// When the application call started waiting.
    since: Instant,
}

struct Link {
    phase: Phase,
    /// Frames for the current session's sender; `None` unless streaming.
    frames: Option<amps::UnboundedSender<Vec<u8>>>,
    /// Bumped whenever a session starts or ends: tickets and acknowledgements of an
    /// older session are never taken for the current one.
    session: u64,
    /// The highest sequence the peer acknowledged as received / as on its disk.
    received: u64,
    durable: u64,
    /// Sent, not yet received: (seq, bytes, when).
    in_flight: VecDeque<(u64, usize, Instant)>,
    in_flight_bytes: usize,
    /// Application calls waiting for the acknowledgement of a sequence.
    waiters: BTreeMap<u64, Vec<Waiter>>,
    /// Waiting for the caller's decision (stalled) or for reintegration to finish.
    /// Whoever releases them changes `phase` or `in_step` under the same lock, so a
    /// waiter that comes later sees it and is not parked (see [`Engine::wait`]).
    parked: Vec<Waiter>,
    /// Reintegration finished in this session: the peer holds every change recorded
    /// before, including those of parked waiters.
    in_step: bool,
    /// Questions asked of the peer, by sequence.
    answers: HashMap<u64, mpsc::Sender<Answer>>,
    /// When the peer last sent anything (the watchdog's clock).
    last_heard: Instant,
}

pub struct Engine {
    pub tree: Tree,
    pub book: Arc<ReplicationBook>,
    pub config: PrimConfig,
    order: Arc<Mutex<Order>>,
    marker: ahead::Marker,
    link: Mutex<Link>,
    link_changed: Condvar,
    events: amps::UnboundedSender<Event>,
    pub(crate) status: Mutex<PrimStatus>,
    /// The mirror epoch every frame carries ([`Engine::set_epoch`] changes it).
    epoch: AtomicU64,
    /// Set first by [`Engine::fence`], without any lock: every acknowledgement path
    /// checks it (and the lease) before answering success.
    fenced: AtomicBool,
    /// No acknowledgement at or after this many nanoseconds past `started`
    /// (`u64::MAX`: no lease).
    lease_deadline: AtomicU64,
    started: Instant,
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
        let book = Arc::new(book);
        let config_epoch = config.epoch;
        let order = Arc::new(Mutex::new(Order {
            dirty,
            ..Order::default()
        }));
        Ok(Engine {
            marker: ahead::Marker::start(book.clone(), order.clone()),
            tree,
            book,
            config,
            order,
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
                in_step: false,
                answers: HashMap::new(),
                last_heard: Instant::now(),
            }),
            link_changed: Condvar::new(),
            events,
            status: Mutex::new(PrimStatus::default()),
            epoch: AtomicU64::new(config_epoch),
            fenced: AtomicBool::new(false),
            lease_deadline: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A new epoch: the current session ends, and the link reconnects at once with it.
    pub fn set_epoch(&self, epoch: u64) {
        let mut order = self.lock_order();
        self.epoch.store(epoch, Ordering::SeqCst);
        let session = self.lock_link().session;
        self.end_session(&mut order, session, format!("new epoch {epoch}"));
    }

    /// True while `session` is the current one (started or lost).
    pub(crate) fn is_current(&self, session: u64) -> bool {
        self.lock_link().session == session
    }

    pub fn set_lease_deadline(&self, deadline: Option<Instant>) {
        let nanos = deadline.map_or(u64::MAX, |d| {
            d.saturating_duration_since(self.started)
                .as_nanos()
                .min(u64::MAX as u128 - 1) as u64
        });
        self.lease_deadline.store(nanos, Ordering::SeqCst);
    }

    /// Until when the lease runs, if there is one.
    pub(crate) fn lease_deadline(&self) -> Option<Instant> {
        match self.lease_deadline.load(Ordering::SeqCst) {
            u64::MAX => None,
            nanos => Some(self.started + std::time::Duration::from_nanos(nanos)),
        }
    }

    /// Whether a change may be acknowledged now: not fenced, and within the lease.
    pub(crate) fn may_acknowledge(&self) -> bool {
        !self.fenced.load(Ordering::SeqCst)
            && (self.started.elapsed().as_nanos() as u64)
                < self.lease_deadline.load(Ordering::SeqCst)
    }

    /// Answers an application call: success only while [`Engine::may_acknowledge`].
    fn answer(&self, done: Done, result: Result<(), i32>) {
        match result {
            Ok(()) if !self.may_acknowledge() => done(Err(libc::EIO)),
            result => done(result),
        }
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
        let mut gaps = 0;
        let phase = loop {
            let phase = self.lock_link().phase;
            if !self.may_acknowledge() {
                return Err(libc::EROFS);
            }
            let missing = match phase {
                Phase::Fenced => return Err(libc::EROFS),
                Phase::Streaming => order.missing_intents(&touch),
                Phase::Stalled | Phase::Alone => order.missing_dirty(&touch.marks),
            };
            if missing.is_empty() {
                break phase;
            }
            gaps += 1;
            if gaps > GROUP_COMMIT_ATTEMPTS {
                // Marks keep leaving the book meanwhile (a reintegration clearing what
                // it repaired, say): written under the lock, so that this change gets on.
                self.record(&mut order, missing)?;
                continue;
            }
            // Group commit: the synced write runs without the order lock, so that
            // writers reaching new zones together share one WAL sync (RocksDB groups
            // concurrent synced writes). The caller's names lock keeps the paths valid.
            // Taken into the cache only if nothing left the book meanwhile and the
            // phase still asks for this kind of mark; else found again (the book
            // keeps the extra marks, which only costs a resend after a crash).
            drop(order);
            let written = self.write_marks(&missing);
            #[cfg(test)]
            tests::in_gap(self);
            order = self.lock_order();
            written?;
            if order.removals(missing.kind) == missing.removals && self.lock_link().phase == phase {
                order.take(missing);
            }
        };
        if phase == Phase::Streaming {
            self.marker.after_change(&mut order, &touch.marks);
        }
        for (from, to) in &touch.copies {
            if let Err(e) = self.book.copy_marks(from, to) {
                tracing::error!("cannot copy marks before a rename: {e}");
                return Err(libc::EIO);
            }
        }
        Ok(Change {
            engine: self,
            order,
            phase,
            touch,
        })
    }

    /// Waits while the bytes in flight exceed the window and the link is up: a peer
    /// that acknowledges slowly throttles the writers; one that goes quiet is declared
    /// lost by the watchdog, which ends the wait.
    pub(crate) fn wait_for_window(&self) {
        let mut link = self.lock_link();
        while link.phase == Phase::Streaming && link.in_flight_bytes > self.config.window_bytes {
            link = self
                .link_changed
                .wait_timeout(link, self.config.link_timeout)
                .expect("link lock")
                .0;
        }
    }

    /// Sends a frame of the current session; the caller holds the order lock. Returns
    /// the session, or `None` when there is none or its sender is gone, in which case
    /// the session ends here: a change that was not sent is never acknowledged by it.
    fn send_frame(&self, order: &mut Order, frame: Vec<u8>, seq: Option<u64>) -> Option<u64> {
        let mut link = self.lock_link();
        let session = link.session;
        let frames = link.frames.as_ref()?;
        let len = frame.len();
        if frames.send(frame).is_err() {
            drop(link);
            let reason = "the replication link's sender stopped".to_string();
            self.end_session(order, session, reason);
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

    /// A ticket for everything streamed so far: waiting on it at a level waits until
    /// the peer holds every earlier change at that level.
    pub fn barrier(&self) -> Ticket {
        let order = self.lock_order();
        let link = self.lock_link();
        let ticket = match link.phase {
            Phase::Streaming => Ticket::Sent {
                seq: order.last_seq,
                session: link.session,
            },
            Phase::Stalled => Ticket::Parked,
            Phase::Alone | Phase::Fenced => Ticket::Now,
        };
        drop((link, order));
        ticket
    }

    /// Answers `done` when `ticket` is satisfied at `level`.
    pub fn wait(&self, ticket: Ticket, level: Level, done: Done) {
        let mut link = self.lock_link();
        if link.phase == Phase::Fenced {
            drop(link);
            return done(Err(libc::EIO));
        }
        match ticket {
            Ticket::Now => {
                drop(link);
                self.answer(done, Ok(()));
            }
            Ticket::Parked => self.park(link, Waiter::new(level, done)),
            Ticket::Sent { seq, session } => {
                if session != link.session {
                    // The session ended since: the change is in the dirty set.
                    return self.park(link, Waiter::new(level, done));
                }
                let reached = match level {
                    Level::Received => link.received,
                    Level::Durable => link.durable,
                };
                if reached >= seq {
                    drop(link);
                    self.answer(done, Ok(()));
                } else {
                    link.waiters
                        .entry(seq)
                        .or_default()
                        .push(Waiter::new(level, done));
                }
            }
        }
    }

    /// Parks a waiter whose change is in the dirty set, unless what would release it
    /// already happened: the caller chose to go on alone, PRIM was fenced, or the
    /// reintegration of this session finished.
    fn park(&self, mut link: MutexGuard<'_, Link>, waiter: Waiter) {
        let outcome = match link.phase {
            Phase::Alone => Ok(()),
            Phase::Fenced => Err(libc::EIO),
            Phase::Streaming if link.in_step => Ok(()),
            Phase::Streaming | Phase::Stalled => return link.parked.push(waiter),
        };
        drop(link);
        self.answer(waiter.done, outcome);
    }

    /// The level a write waits for in this module's mode, if any.
    pub fn write_level(&self) -> Option<Level> {
        match self.config.ack {
            AckMode::Write => Some(Level::Received),
            AckMode::Durable => Some(Level::Durable),
            AckMode::Fsync => None,
        }
    }

    /// What an fsync waits for from the peer, besides the local sync. Nothing in
    /// `write` and `durable` modes: every change an fsync covers has returned, so the
    /// peer already holds it at the level the mode promises.
    pub fn fsync_level(&self) -> Option<Level> {
        match self.config.ack {
            AckMode::Write | AckMode::Durable => None,
            AckMode::Fsync => Some(Level::Durable),
        }
    }

    /// The caller recorded that the peer is not up to date after the loss numbered
    /// `lost`: continue without it. Parked writes return success.
    pub fn go_alone(&self, lost: u64) -> Result<(), crate::MirrorError> {
        let parked = {
            let mut link = self.lock_link();
            if link.phase != Phase::Stalled || link.session != lost {
                return Err(crate::MirrorError::Refused(format!(
                    "no longer the loss numbered {lost} (now {:?}, session {})",
                    link.phase, link.session
                )));
            }
            link.phase = Phase::Alone;
            std::mem::take(&mut link.parked)
        };
        self.set_status(|s| s.phase = Phase::Alone);
        for waiter in parked {
            self.answer(waiter.done, Ok(()));
        }
        Ok(())
    }

    /// Stop acting as PRIM: every waiting and later change fails. The flag goes first,
    /// without any lock, so that nothing is acknowledged from here on even while a
    /// change holds the order lock; the waiters are failed under the link lock only.
    pub fn fence(&self, reason: &str) {
        let first = !self.fenced.swap(true, Ordering::SeqCst);
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
        // Writers waiting for the window see the fence at once.
        self.link_changed.notify_all();
        for waiter in parked.into_iter().chain(waiters.into_values().flatten()) {
            (waiter.done)(Err(libc::EIO));
        }
        if first {
            tracing::warn!("fenced: {reason}");
            self.event(Event::Fenced {
                reason: reason.to_string(),
            });
        }
    }

    /// Fails (`EIO`) the application calls parked for longer than the park timeout:
    /// nobody decided whether to go on without the peer, and an application must not
    /// hang for ever. Their changes stay recorded for reintegration. Returns how many.
    pub(crate) fn expire_parked(&self) -> usize {
        let timeout = self.config.park_timeout;
        let expired: Vec<Waiter> = {
            let mut link = self.lock_link();
            if link.parked.iter().all(|w| w.since.elapsed() < timeout) {
                return 0;
            }
            let (expired, kept) = std::mem::take(&mut link.parked)
                .into_iter()
                .partition(|w| w.since.elapsed() >= timeout);
            link.parked = kept;
            expired
        };
        tracing::warn!(
            count = expired.len(),
            "failing writes parked for {timeout:?} with no decision about the peer"
        );
        let count = expired.len();
        for waiter in expired {
            (waiter.done)(Err(libc::EIO));
        }
        count
    }

    pub(crate) fn bytes_in_flight(&self) -> usize {
        self.lock_link().in_flight_bytes
    }

    /// The parked application calls: how many, and how long the oldest has waited.
    pub(crate) fn parked(&self) -> (usize, Option<std::time::Duration>) {
        let link = self.lock_link();
        let oldest = link.parked.iter().map(|w| w.since.elapsed()).max();
        (link.parked.len(), oldest)
    }

    /// Reintegration finished in `session`: the peer holds everything; parked writes
    /// return, the status shows `finished` and `synced` is reported. Not once the
    /// session ended: waiters parked by its end were not covered, and the peer may lack
    /// what was acknowledged alone since. Returns false then. The status and the event
    /// are set under the link lock, so a loss of the session is reported after them,
    /// never before, and the status is never behind the event.
    pub(crate) fn declare_in_step(
        &self,
        session: u64,
        synced: Event,
        finished: ResyncProgress,
    ) -> bool {
        let parked = {
            let mut link = self.lock_link();
            if link.session != session || link.phase != Phase::Streaming {
                return false;
            }
            link.in_step = true;
            self.set_status(|s| s.resync = Some(finished));
            let _ = self.events.send(synced);
            std::mem::take(&mut link.parked)
        };
        for waiter in parked {
            self.answer(waiter.done, Ok(()));
        }
        true
    }

    pub(crate) fn event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut PrimStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }
}

#[cfg(test)]
mod tests;
