//! What the link (acknowledgements, answers, loss) and the reintegration copier
//! (reads sent under the order lock, questions, the sync point) call.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rampart_storage::{JournalEntry, MarkKind, Marks};
use tokio::sync::mpsc as amps;

use super::marks::Order;
use super::{Engine, Level, Phase};
use crate::prim::Event;
use crate::protocol::{self, Answer, Down, Op, RelPath, Request};
use crate::tree::Tree;

impl Engine {
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
            let epoch = self.epoch();
            let _ = frames.send(protocol::encode(&Down::Replay { epoch, entries }, &[]));
        }
        link.session += 1;
        link.frames = Some(frames);
        link.phase = Phase::Streaming;
        link.received = order.last_seq;
        link.durable = order.last_seq;
        link.in_flight.clear();
        link.in_flight_bytes = 0;
        link.in_step = false;
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
        // The status first: it is never behind what an application was already told.
        self.set_status(|s| {
            s.acked = received;
            s.durable = durable;
        });
        self.link_changed.notify_all();
        for done in ready {
            self.answer(done, Ok(()));
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

    /// SECOND could not apply a change on `paths` in `session`: its copy no longer
    /// holds what it acknowledged, so it is not up to date. Each path (both names of a
    /// rename) and its parent are marked for a whole reconciliation, content included,
    /// and the session ends as if the peer were lost: waiters are parked, never
    /// answered from this session's acknowledgements (the `Failed` precedes the ack
    /// that covers its sequence), and the next session repairs it.
    pub(crate) fn on_failed(&self, session: u64, paths: &[RelPath], error: &str) {
        let path_text = (paths.iter())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(path = %path_text, "SECOND failed to apply a change: {error}");
        let mut order = self.lock_order();
        let mut marks = Marks::default();
        for path in paths {
            marks.add_path(path);
            marks.add_path(&protocol::parent_of(path));
            if let Ok(Some(meta)) = self.tree.meta(path) {
                for zone in 0..meta.size.div_ceil(self.config.zone_size) {
                    marks.add_zone(path, zone);
                }
            }
        }
        if let Err(e) = self.record_dirty(&mut order, &marks) {
            tracing::error!("cannot record a divergence: errno {e}");
        }
        let reason = format!("SECOND failed to apply a change on {path_text:?}: {error}");
        let notice = Event::NotUpToDate {
            session,
            path: path_text,
            error: error.to_string(),
        };
        #[cfg(test)]
        super::tests::in_gap(self);
        self.end_session_with(&mut order, session, reason, Some(notice));
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
        self.end_session(&mut order, session, reason);
    }

    /// Ends `session` if it is still the current one and streaming; the caller holds
    /// the order lock.
    pub(super) fn end_session(&self, order: &mut Order, session: u64, reason: String) {
        self.end_session_with(order, session, reason, None);
    }

    /// [`Engine::end_session`], reporting `notice` first if it ends the session. Sent
    /// under the link lock, as `synced` is ([`Engine::declare_in_step`]): nothing can
    /// report the session in step after it.
    fn end_session_with(
        &self,
        order: &mut Order,
        session: u64,
        reason: String,
        notice: Option<Event>,
    ) {
        let mut link = self.lock_link();
        if link.session != session || link.phase != Phase::Streaming {
            return;
        }
        if let Some(notice) = notice {
            let _ = self.events.send(notice);
        }
        link.session += 1;
        let stalled = link.session;
        link.frames = None;
        link.phase = Phase::Stalled;
        link.in_flight.clear();
        link.in_flight_bytes = 0;
        link.in_step = false;
        link.answers.clear();
        let durable = link.durable;
        let waiters = std::mem::take(&mut link.waiters);
        for (_, waiters) in waiters {
            link.parked.extend(waiters);
        }
        drop(link);
        self.intents_to_dirty(order, durable);
        self.link_changed.notify_all();
        tracing::warn!("replication peer lost: {reason}");
        self.set_status(|s| {
            s.phase = Phase::Stalled;
            s.connected = false;
            s.last_error = Some(reason.clone());
        });
        let _ = self.events.send(Event::PeerLost {
            session: stalled,
            reason,
        });
        if self.config.continue_alone {
            let _ = self.go_alone(stalled);
        }
    }

    /// Runs `read` under the order lock and sends the operation it returns, for the
    /// copier: what it read cannot be overtaken by a live change. Returns the sequence
    /// sent, `Ok(None)` if `read` chose to send nothing. Waits for room in the send
    /// window first, as live changes do: a copy to a slow peer would otherwise queue
    /// its whole tree in memory here.
    pub(crate) fn send_current(
        &self,
        session: u64,
        read: impl FnOnce(&Tree) -> std::io::Result<Option<(Op, Vec<u8>)>>,
    ) -> Result<Option<u64>, String> {
        self.wait_for_window();
        let mut order = self.lock_order();
        if self.lock_link().session != session {
            return Err("the session ended".into());
        }
        let Some((op, data)) = read(&self.tree).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let seq = self.send_next(&mut order, &data, |epoch, seq| Down::Op { epoch, seq, op })?;
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
                    epoch: self.epoch(),
                    seq,
                    request,
                },
                &[],
            );
            self.send_frame(&mut order, frame, Some(seq))
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
        let message = |epoch, seq| Down::SyncPoint { epoch, seq, point };
        Ok(Some(self.send_next(&mut order, &[], message)?))
    }

    /// Sends the message `make` builds with the next sequence (the caller holds the
    /// order lock, so the sequence is the stream's order). Returns the sequence.
    fn send_next(
        &self,
        order: &mut Order,
        data: &[u8],
        make: impl FnOnce(u64, u64) -> Down,
    ) -> Result<u64, String> {
        order.last_seq += 1;
        let seq = order.last_seq;
        let frame = protocol::encode(&make(self.epoch(), seq), data);
        self.send_frame(order, frame, Some(seq))
            .ok_or_else(|| "the session ended".to_string())?;
        Ok(seq)
    }
}
