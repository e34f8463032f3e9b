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
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use rampart_storage::{book, MarkKind, ReplicationBook};
use tokio::sync::mpsc as amps;

use crate::prim::{Event, PrimConfig, PrimStatus};
use crate::protocol::Answer;
use crate::tree::Tree;
use crate::AckMode;
pub use change::{Change, Ticket, Touch};
use marks::Order;

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
    /// Signalled when SECOND failed to apply a change: the link runs the copier again.
    pub(crate) diverged: tokio::sync::Notify,
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
        let book = Arc::new(book);
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
            diverged: tokio::sync::Notify::new(),
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

    /// Waits while the bytes in flight exceed the window and the link is up: a peer
    /// that acknowledges slowly throttles the writers; one that goes quiet is declared
    /// lost by the watchdog, which ends the wait.
    fn wait_for_window(&self) {
        let mut link = self.lock_link();
        while link.phase == Phase::Streaming && link.in_flight_bytes > self.config.window_bytes {
            link = self
                .link_changed
                .wait_timeout(link, self.config.link_timeout)
                .expect("link lock")
                .0;
        }
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
            Ticket::Parked => Self::park(link, Waiter { level, done }),
            Ticket::Sent { seq, session } => {
                if session != link.session {
                    // The session ended since: the change is in the dirty set.
                    return Self::park(link, Waiter { level, done });
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

    /// Parks a waiter whose change is in the dirty set, unless what would release it
    /// already happened: the caller chose to go on alone, PRIM was fenced, or the
    /// reintegration of this session finished.
    fn park(mut link: MutexGuard<'_, Link>, waiter: Waiter) {
        let outcome = match link.phase {
            Phase::Alone => Ok(()),
            Phase::Fenced => Err(libc::EIO),
            Phase::Streaming if link.in_step => Ok(()),
            Phase::Streaming | Phase::Stalled => return link.parked.push(waiter),
        };
        drop(link);
        (waiter.done)(outcome);
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
        // Writers waiting for the window see the fence at once.
        self.link_changed.notify_all();
        for waiter in parked.into_iter().chain(waiters.into_values().flatten()) {
            (waiter.done)(Err(libc::EIO));
        }
    }

    /// Reintegration finished: the peer holds everything; parked writes return.
    pub(crate) fn release_parked(&self) {
        let parked = {
            let mut link = self.lock_link();
            link.in_step = true;
            std::mem::take(&mut link.parked)
        };
        for waiter in parked {
            (waiter.done)(Ok(()));
        }
    }

    pub(crate) fn event(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut PrimStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rampart_raft::transport::ClusterKey;

    use rampart_storage::Marks;

    use super::*;
    use crate::protocol::Op;

    /// An engine over scratch directories, not connected (phase Stalled).
    pub(super) fn engine(dir: &tempfile::TempDir) -> Engine {
        let (tree_dir, book_dir) = (dir.path().join("tree"), dir.path().join("book"));
        std::fs::create_dir_all(&tree_dir).unwrap();
        let config = PrimConfig::new(
            tree_dir.clone(),
            book_dir.clone(),
            "127.0.0.1:9".into(),
            ClusterKey::from_secret(b"engine test"),
            1,
        );
        let (events, _) = amps::unbounded_channel();
        let tree = Tree::open(&tree_dir).unwrap();
        Engine::new(
            tree,
            ReplicationBook::open(&book_dir).unwrap(),
            config,
            events,
        )
        .unwrap()
    }

    /// Commits a change while stalled and returns its (parked) ticket.
    fn parked_change(engine: &Engine) -> Ticket {
        let change = engine.begin(Touch::path(b"f")).unwrap();
        let op = Op::Unlink {
            path: b"f".to_vec(),
        };
        let ticket = change.commit(op, &[]);
        assert!(matches!(ticket, Ticket::Parked));
        ticket
    }

    fn answer(engine: &Engine, ticket: Ticket) -> Option<Result<(), i32>> {
        let (tx, rx) = mpsc::channel();
        let done = Box::new(move |result| tx.send(result).unwrap());
        engine.wait(ticket, Level::Received, done);
        rx.recv_timeout(Duration::from_secs(1)).ok()
    }

    #[test]
    fn a_waiter_that_comes_after_the_decision_to_go_alone_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        // The change is parked while stalled; the caller decides before it waits.
        let ticket = parked_change(&engine);
        engine.go_alone();
        assert_eq!(answer(&engine, ticket), Some(Ok(())));
    }

    #[test]
    fn a_waiter_that_comes_after_the_fence_fails() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let ticket = parked_change(&engine);
        engine.fence();
        assert_eq!(answer(&engine, ticket), Some(Err(libc::EIO)));
    }

    #[test]
    fn a_parked_waiter_is_answered_when_the_caller_decides() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        let ticket = parked_change(&engine);
        let (tx, rx) = mpsc::channel();
        engine.wait(
            ticket,
            Level::Received,
            Box::new(move |r| tx.send(r).unwrap()),
        );
        assert!(rx.try_recv().is_err(), "answered before the decision");
        engine.go_alone();
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(Ok(())));
    }

    #[test]
    fn a_failure_reported_before_an_earlier_send_settles_keeps_the_marks_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(&dir);
        std::fs::write(dir.path().join("tree/f"), vec![1u8; 100]).unwrap();
        // The copier sent zone 0 of f; SECOND reports it could not apply it, then
        // acknowledges the sequence as durable, which settles the copier's send.
        let mut sent = Marks::default();
        sent.add_zone(b"f", 0);
        engine.add_dirty(&sent).unwrap();
        engine.on_failed(b"f", "No space left on device");
        engine.clear_dirty(&sent);
        let dirty = engine.dirty();
        assert_eq!(
            dirty.zones.get(&b"f"[..]).map(|z| z.len()),
            Some(1),
            "{dirty:?}"
        );
        assert!(dirty.paths.contains(&b"f"[..]));
    }
}
