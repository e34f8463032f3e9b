//! PRIM's side of the connection: connect, handshake, then one sender task, one reader
//! task and a watchdog per session; reintegration starts with each session.
//!
//! The watchdog pings every quarter of the link timeout and stalls the session when the
//! peer has said nothing for a whole timeout, so a dead peer is noticed within one
//! timeout whether or not the application is writing.

use std::sync::Arc;
use std::time::Duration;

use rampart_raft::transport::SecureChannel;
use rampart_storage::{book, JournalEntry, Marks};
use tokio::sync::mpsc as amps;

use crate::prim::engine::{Engine, Phase};
use crate::prim::{resync, Event};
use crate::protocol::{self, Down, Up};

/// Delay between connection attempts while the peer is away.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// Keeps a session up whenever the peer is reachable, until `stop` fires.
pub(crate) async fn run(engine: Arc<Engine>, mut stop: tokio::sync::watch::Receiver<bool>) {
    // Dropped with this future (the I/O thread's stop).
    let _lease = AbortOnDrop(tokio::spawn(watch_lease(engine.clone())));
    let started = tokio::time::Instant::now();
    let mut absent_reported = false;
    loop {
        if *stop.borrow() {
            return;
        }
        engine.expire_parked();
        if !absent_reported
            && engine.is_current(0)
            && started.elapsed() >= engine.config.link_timeout
        {
            // Never connected: the caller decides as after a loss (session 0).
            absent_reported = true;
            tracing::warn!(
                "no replication peer within {:?}",
                engine.config.link_timeout
            );
            engine.event(Event::PeerAbsent { session: 0 });
            if engine.config.continue_alone {
                let _ = engine.go_alone(0);
            }
        }
        let phase = engine.phase();
        if phase != Phase::Streaming && phase != Phase::Fenced {
            match connect(&engine).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!("replication peer not reachable: {e}");
                    engine.set_status(|s| s.last_error = Some(e));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fences the engine when its lease runs out. Acknowledgements already stop at the
/// deadline by themselves ([`Engine::may_acknowledge`]); this fails what waits.
async fn watch_lease(engine: Arc<Engine>) {
    const CHECK_EVERY: Duration = Duration::from_millis(20);
    loop {
        match engine.lease_deadline() {
            Some(deadline) if std::time::Instant::now() >= deadline => {
                engine.fence("the PRIM lease ran out");
                return;
            }
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                tokio::time::sleep(left.min(CHECK_EVERY)).await;
            }
            None => tokio::time::sleep(CHECK_EVERY).await,
        }
    }
}

async fn connect(engine: &Arc<Engine>) -> Result<(), String> {
    let config = &engine.config;
    let channel = SecureChannel::connect(&config.peer, &config.key, config.link_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let SecureChannel {
        mut reader,
        mut writer,
        peer,
    } = channel;
    let sync_point = engine.book.sync_point().map_err(|e| e.to_string())?;
    let hello = Down::Hello {
        epoch: engine.epoch(),
        zone_size: config.zone_size,
        sync_point,
        link_timeout_ms: config.link_timeout.as_millis() as u64,
    };
    writer
        .send(protocol::encode(&hello, &[]))
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(config.link_timeout, reader.recv())
        .await
        .map_err(|_| "no Welcome from the peer".to_string())?
        .map_err(|e| e.to_string())?;
    let (reply, _) = protocol::decode::<Up>(&reply).map_err(|e| e.to_string())?;
    let (peer_point, overwrite) = match reply {
        Up::Welcome {
            sync_point,
            overwrite,
        } => (sync_point, overwrite),
        Up::Refused { reason } => return Err(format!("the peer refused: {reason}")),
        other => return Err(format!("unexpected reply to Hello: {other:?}")),
    };
    // Incremental only between copies that shared the same last state, and while every
    // rename since is known (otherwise a name may hold other data on SECOND).
    let journal = engine.book.journal().map_err(|e| e.to_string())?;
    let incremental = sync_point.is_some() && sync_point == peer_point && journal.is_some();
    let journal = journal.unwrap_or_default();
    let overwrite = map_through(&overwrite, &journal);

    let (frames_tx, mut frames_rx) = amps::unbounded_channel::<Vec<u8>>();
    let session = engine
        .start_session(frames_tx, incremental.then_some(journal), &overwrite)
        .map_err(|e| e.to_string())?;
    tracing::info!(%peer, incremental, "replication session started");
    engine.event(Event::PeerConnected {
        session,
        incremental,
        peer: peer.clone(),
    });

    // Sender: writes whatever is queued, flushing when the queue is empty.
    let sender = {
        let engine = engine.clone();
        tokio::spawn(async move {
            while let Some(frame) = frames_rx.recv().await {
                let mut result = writer.write(frame).await;
                while result.is_ok() {
                    match frames_rx.try_recv() {
                        Ok(frame) => result = writer.write(frame).await,
                        Err(_) => break,
                    }
                }
                if let Err(e) = result.and(writer.flush().await) {
                    engine.stall(session, format!("sending to the peer: {e}"));
                    return;
                }
            }
        })
    };
    let receiver = {
        let engine = engine.clone();
        tokio::spawn(async move {
            loop {
                let frame = match reader.recv().await {
                    Ok(frame) => frame,
                    Err(e) => {
                        engine.stall(session, format!("reading from the peer: {e}"));
                        return;
                    }
                };
                match protocol::decode::<Up>(&frame) {
                    Ok((Up::Ack { received, durable }, _)) => {
                        engine.on_ack(session, received, durable)
                    }
                    Ok((Up::Failed { paths, error, .. }, _)) => {
                        // Waits for the order lock: off this thread (see the watchdog).
                        // The session ends with it; nothing after it is read.
                        let engine = engine.clone();
                        let failed = move || engine.on_failed(session, &paths, &error);
                        let _ = tokio::task::spawn_blocking(failed).await;
                        return;
                    }
                    Ok((Up::Answer { seq, answer }, _)) => engine.on_answer(session, seq, answer),
                    Ok((other, _)) => {
                        engine.stall(session, format!("unexpected message {other:?}"));
                        return;
                    }
                    Err(e) => {
                        engine.stall(session, e.to_string());
                        return;
                    }
                }
            }
        })
    };
    let watchdog = {
        let engine = engine.clone();
        let ping = protocol::encode(
            &Down::Ping {
                epoch: engine.epoch(),
            },
            &[],
        );
        tokio::spawn(async move {
            let period = engine.config.link_timeout / 4;
            let mut cleanup = tokio::time::interval(Duration::from_secs(1));
            // The cleanup waits for the order lock, which a change holds for as long as
            // its local write takes (seconds on a saturated disk): off this thread, or
            // the acknowledgements would go unread meanwhile and the peer seem silent.
            let mut cleaning: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = cleanup.tick() => {
                        if cleaning.as_ref().is_none_or(|c| c.is_finished()) {
                            let engine = engine.clone();
                            cleaning = Some(tokio::task::spawn_blocking(move || {
                                engine.clear_settled_intents()
                            }));
                        }
                    }
                }
                // Parked writes stay bounded during a session too: one whose
                // reintegration is long, or stopped (ResyncFailed), releases none.
                engine.expire_parked();
                if engine.silent_too_long(session) {
                    let timeout = engine.config.link_timeout;
                    engine.stall(session, format!("no answer from the peer for {timeout:?}"));
                    return;
                }
                if !engine.send_unsequenced(session, ping.clone()) {
                    return;
                }
            }
        })
    };

    // Reintegration runs beside the live stream, on its own thread. A change SECOND
    // fails to apply later (a full disk, say) ends the session; the next one repairs it.
    reintegrate(engine, session, !incremental).await;
    let _ = receiver.await;
    sender.abort();
    watchdog.abort();
    Ok(())
}

async fn reintegrate(engine: &Arc<Engine>, session: u64, full: bool) {
    let copier = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || resync::run(&engine, session, full))
    };
    match copier.await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            tracing::warn!("reintegration stopped: {reason}");
            // Not when the session ended under it: that loss is reported as such.
            if engine.is_current(session) {
                engine.event(Event::ResyncFailed { session, reason });
            }
        }
        Err(e) => tracing::error!("reintegration panicked: {e}"),
    }
}

/// Maps the peer's own marks (in the names of the tree as it was when it last shared
/// our state) through the renames we made since, so they name the same data here.
pub(crate) fn map_through(marks: &Marks, journal: &[JournalEntry]) -> Marks {
    let follow = |path: &[u8]| -> Vec<u8> {
        let mut path = path.to_vec();
        for entry in journal {
            if let JournalEntry::Rename { from, to, .. } = entry {
                if book::is_within(&path, from) {
                    path = book::reroot(&path, from, to);
                }
            }
        }
        path
    };
    let mut mapped = Marks::default();
    for (path, zones) in &marks.zones {
        let path = follow(path);
        for zone in zones {
            mapped.add_zone(&path, *zone);
        }
    }
    for path in &marks.paths {
        // The name as it was, and where its data went, both get reconciled.
        mapped.add_path(path);
        mapped.add_path(&follow(path));
    }
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_marks_follow_our_renames() {
        let mut marks = Marks::default();
        marks.add_zone(b"d/f", 3);
        marks.add_path(b"d/g");
        marks.add_zone(b"other", 0);
        let journal = vec![
            JournalEntry::Rename {
                from: b"d".to_vec(),
                to: b"e".to_vec(),
                flags: 0,
            },
            JournalEntry::Rename {
                from: b"e/f".to_vec(),
                to: b"f2".to_vec(),
                flags: 0,
            },
        ];
        let mapped = map_through(&marks, &journal);
        let mut expected = Marks::default();
        expected.add_zone(b"f2", 3);
        expected.add_zone(b"other", 0);
        expected.add_path(b"d/g");
        expected.add_path(b"e/g");
        assert_eq!(mapped, expected);
    }
}
