//! One session with a PRIM: the handshake (epoch, zone size, Welcome with this copy's
//! sync point and its own marks), then the reader and writer tasks beside the applier
//! thread (see the module's description).

use super::*;

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accepting a PRIM connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Each connection on a task of its own: a PRIM that comes back (after a power
        // loss, say) must not wait for SECOND to notice that the old one is gone.
        let shared = shared.clone();
        tokio::spawn(async move {
            let channel =
                match SecureChannel::accept(stream, &shared.config.key, HANDSHAKE_TIMEOUT).await {
                    Ok(channel) => channel,
                    Err(e) => {
                        tracing::warn!(%from, "refused a replication connection: {e}");
                        return;
                    }
                };
            if let Err(e) = session(&shared, channel).await {
                tracing::warn!(%from, "replication session ended: {e}");
                shared.status.lock().expect("status lock").last_error = Some(e.to_string());
            }
        });
    }
}

async fn session(shared: &Arc<Shared>, channel: SecureChannel) -> Result<(), MirrorError> {
    let SecureChannel {
        mut reader,
        mut writer,
        peer,
    } = channel;
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv())
        .await
        .map_err(|_| MirrorError::Protocol("no Hello".into()))??;
    let (hello, _) = protocol::decode::<Down>(&frame)?;
    let Down::Hello {
        epoch,
        zone_size,
        sync_point: _,
        link_timeout_ms,
    } = hello
    else {
        return Err(MirrorError::Protocol("first message is not Hello".into()));
    };
    // Take over: the current session (an older connection of this PRIM, or of an
    // older epoch) ends, and its applier takes what it had queued, before this one
    // reads the book and says Welcome. Checked under the lock: a session that took
    // over meanwhile may have raised the oldest epoch accepted.
    let handover = shared.handover.lock().await;
    if let Err(reason) = admissible(shared, epoch, zone_size) {
        let refusal = protocol::encode(
            &Up::Refused {
                reason: reason.clone(),
            },
            &[],
        );
        writer.send(refusal).await?;
        return Err(MirrorError::Refused(reason));
    }
    shared.generation.send_modify(|g| *g += 1);
    let generation = *shared.generation.borrow();
    let mut replaced = shared.generation.subscribe();
    let previous = shared.applier.lock().expect("applier lock").take();
    if let Some((_, previous)) = previous {
        let _ = tokio::task::spawn_blocking(move || previous.join()).await;
    }
    shared.min_epoch.fetch_max(epoch, Ordering::SeqCst);
    shared.book.raise_min_epoch(epoch)?;
    shared.session_epoch.store(epoch, Ordering::SeqCst);
    // Silent for twice PRIM's link timeout (it pings every quarter of it): gone.
    let silent_after = Duration::from_millis(link_timeout_ms.max(250) * 2);
    remove_damaged(shared);
    let welcome = welcome(&shared.book)?;
    writer.send(protocol::encode(&welcome, &[])).await?;
    {
        let mut status = shared.status.lock().expect("status lock");
        status.connected = true;
        status.peer = Some(peer.clone());
        status.epoch = epoch;
        status.last_error = None;
        // Sequences are the connecting PRIM's, counted from its start.
        (status.received, status.applied, status.durable) = (0, 0, 0);
    }
    tracing::info!(%peer, epoch, "PRIM connected");

    let watermarks = Arc::new(Watermarks::default());
    let (up_tx, mut up_rx) = amps::unbounded_channel::<Up>();
    let (work_tx, work_rx) = mpsc::channel::<Work>();
    let backlog = Arc::new(Backlog::new());
    *shared.backlog.lock().expect("backlog lock") = backlog.clone();
    {
        let shared_for_applier = shared.clone();
        let watermarks = watermarks.clone();
        let up_tx = up_tx.clone();
        let backlog = backlog.clone();
        let applier = std::thread::Builder::new()
            .name("mirror-applier".into())
            .spawn(move || apply_loop(&shared_for_applier, work_rx, &backlog, &watermarks, &up_tx))
            .map_err(MirrorError::io("start the applier thread"))?;
        *shared.applier.lock().expect("applier lock") = Some((generation, applier));
    }
    drop(handover);

    let upstream = Arc::new(tokio::sync::Mutex::new(Upstream {
        writer,
        sent: (0, 0),
    }));
    let writer_task = {
        let watermarks = watermarks.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    biased;
                    message = up_rx.recv() => match message {
                        Some(message) => Some(message),
                        None => return Ok::<(), MirrorError>(()),
                    },
                    _ = watermarks.changed.notified() => None,
                };
                let mut up = upstream.lock().await;
                if let Some(message) = first {
                    up.writer.write(protocol::encode(&message, &[])).await?;
                }
                // The applier queues a Failed before it advances the durable mark: read
                // the marks, then drain the queue, and the Failed goes out first.
                let now = watermarks.get();
                while let Ok(message) = up_rx.try_recv() {
                    up.writer.write(protocol::encode(&message, &[])).await?;
                }
                if now != up.sent || watermarks.ping.swap(false, Ordering::SeqCst) {
                    up.write_ack(now.0, now.1).await?;
                }
                up.writer.flush().await?;
            }
        })
    };

    let mut writer_task = writer_task;
    let read_result: Result<(), MirrorError> = async {
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout(silent_after, reader.recv()) => match frame {
                    Ok(frame) => frame?,
                    Err(_) => {
                        return Err(MirrorError::Protocol(format!(
                            "PRIM silent for {silent_after:?}"
                        )))
                    }
                },
                _ = replaced.wait_for(|g| *g != generation) => {
                    return Err(MirrorError::Refused(
                        "replaced by a newer session, or fenced".into(),
                    ))
                }
                ended = &mut writer_task => {
                    // Acks of receipt must not go on once nothing else reaches PRIM.
                    let reason = match ended {
                        Ok(Ok(())) => "the writer stopped".to_string(),
                        Ok(Err(e)) => format!("sending to PRIM: {e}"),
                        Err(e) => format!("the writer failed: {e}"),
                    };
                    return Err(MirrorError::Protocol(reason));
                }
            };
            let (message, data_at) = protocol::decode::<Down>(&frame)?;
            let (frame_epoch, seq) = match &message {
                Down::Op { epoch, seq, .. }
                | Down::Ask { epoch, seq, .. }
                | Down::SyncPoint { epoch, seq, .. } => (*epoch, Some(*seq)),
                Down::Replay { epoch, .. } => (*epoch, None),
                Down::Ping { epoch } => (*epoch, None),
                Down::Hello { .. } => {
                    return Err(MirrorError::Protocol("Hello in the middle of a session".into()))
                }
            };
            let fence = shared.min_epoch.load(Ordering::SeqCst);
            if frame_epoch != epoch || frame_epoch < fence {
                return Err(MirrorError::Refused(format!(
                    "frame of epoch {frame_epoch} in a session of epoch {epoch} (oldest accepted {fence})"
                )));
            }
            if matches!(message, Down::Ping { .. }) {
                watermarks.ping.store(true, Ordering::SeqCst);
                watermarks.changed.notify_one();
                continue;
            }
            if let Some(seq) = seq {
                watermarks.received.store(seq, Ordering::SeqCst);
                // Acknowledge receipt from here when the writer is free (the common
                // case): waking the writer task costs more than the write. Before the
                // applier gets the frame: receipt does not wait for it, and waking it
                // first would delay the ack. The durable mark stays as last sent: only
                // the writer task orders it after Failed.
                match upstream.try_lock() {
                    Ok(mut up) => {
                        let durable = up.sent.1;
                        up.write_ack(seq, durable).await?;
                        up.writer.flush().await?;
                    }
                    Err(_) => watermarks.changed.notify_one(),
                }
            }
            if !admit_while_moving(&backlog, frame.len(), &watermarks).await
                || work_tx.send(Work::Frame(message, frame, data_at)).is_err()
            {
                return Err(MirrorError::Protocol("the applier stopped".into()));
            }
        }
    }
    .await;
    let _ = work_tx.send(Work::End);
    // This session's applier, unless a newer session already took it to wait for it.
    let applier = {
        let mut slot = shared.applier.lock().expect("applier lock");
        match &*slot {
            Some((owner, _)) if *owner == generation => slot.take(),
            _ => None,
        }
    };
    if let Some((_, applier)) = applier {
        let _ = tokio::task::spawn_blocking(move || applier.join()).await;
    }
    drop(up_tx);
    writer_task.abort();
    if *shared.generation.borrow() == generation {
        shared.session_epoch.store(0, Ordering::SeqCst);
        let mut status = shared.status.lock().expect("status lock");
        status.connected = false;
        status.peer = None;
    }
    read_result
}

/// Removes the regular files a failed sync covered; they are in the dirty set PRIM is
/// told, and come back whole.
pub(super) fn remove_damaged(shared: &Shared) {
    let mut known = shared.damaged.lock().expect("damaged lock");
    for path in std::mem::take(&mut *known) {
        let shown = String::from_utf8_lossy(&path).into_owned();
        let is_file = matches!(
            shared.tree.meta(&path),
            Ok(Some(meta)) if meta.kind == crate::protocol::Kind::File
        );
        if !is_file {
            continue;
        }
        match shared
            .tree
            .apply(&crate::protocol::Op::Unlink { path }, &[])
        {
            Ok(()) => tracing::warn!(path = %shown, "removed a file a failed sync left damaged"),
            Err(e) => tracing::error!(path = %shown, "cannot remove a damaged file: {e}"),
        }
    }
    if let Err(e) = shared.book.set_damaged(&[]) {
        tracing::error!("cannot clear the list of damaged files: {e}");
    }
}

/// Whether a PRIM of `epoch` with zones of `zone_size` may start a session.
pub(super) fn admissible(shared: &Shared, epoch: u64, zone_size: u64) -> Result<(), String> {
    let oldest = shared.min_epoch.load(Ordering::SeqCst);
    if epoch < oldest {
        return Err(format!(
            "epoch {epoch} is older than epoch {oldest} already seen"
        ));
    }
    if zone_size != shared.config.zone_size {
        return Err(format!(
            "zone size {zone_size} differs from this node's {}",
            shared.config.zone_size
        ));
    }
    Ok(())
}

/// SECOND's half of the connection, shared by the reader (receipt acks) and the
/// writer task (everything else), and the marks PRIM was last told.
pub(super) struct Upstream {
    pub(super) writer: FrameWriter,
    /// (received, durable) as last sent.
    pub(super) sent: (u64, u64),
}

impl Upstream {
    /// Buffers an ack; the received mark never goes back (the reader and the writer
    /// task each send what they last saw).
    pub(super) async fn write_ack(
        &mut self,
        received: u64,
        durable: u64,
    ) -> Result<(), MirrorError> {
        self.sent = (self.sent.0.max(received), durable);
        let ack = Up::Ack {
            received: self.sent.0,
            durable,
        };
        Ok(self.writer.write(protocol::encode(&ack, &[])).await?)
    }
}

/// Waits for room in the backlog for a frame of `len` bytes (false once the applier has
/// stopped). Meanwhile the reader reads nothing, pings included, so SECOND tells PRIM
/// it is alive every [`KEEPALIVE_EVERY`] while the applier keeps taking frames: a slow
/// disk throttles PRIM rather than making it report the peer lost. A disk stuck for
/// [`STUCK_AFTER`] goes quiet, and PRIM reports the peer lost a link timeout later.
pub(super) async fn admit_while_moving(
    backlog: &Backlog,
    len: usize,
    watermarks: &Watermarks,
) -> bool {
    let admit = backlog.admit(len);
    tokio::pin!(admit);
    loop {
        tokio::select! {
            admitted = &mut admit => return admitted,
            _ = tokio::time::sleep(KEEPALIVE_EVERY) => {
                if backlog.moved_within(STUCK_AFTER) {
                    // Answered like a ping, by the writer task, after any Failed.
                    watermarks.ping.store(true, Ordering::SeqCst);
                    watermarks.changed.notify_one();
                }
            }
        }
    }
}

#[derive(Default)]
pub(super) struct Watermarks {
    pub(super) received: AtomicU64,
    pub(super) durable: AtomicU64,
    /// A sync failed in this session: `durable` never moves again (see
    /// `SyncFailure::report`).
    pub(super) poisoned: AtomicBool,
    pub(super) ping: AtomicBool,
    pub(super) changed: Notify,
}

impl Watermarks {
    pub(super) fn get(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::SeqCst),
            self.durable.load(Ordering::SeqCst),
        )
    }
}

/// The answer to a Hello: this copy's sync point and its own marks (what it changed
/// as PRIM that its peer may lack). Marks too many for one frame (a node that changed
/// millions of entries alone) are not sent: without a sync point PRIM compares both
/// trees whole, which covers them, and the sync point that ends it clears them here.
pub(super) fn welcome(book: &ReplicationBook) -> Result<Up, MirrorError> {
    let budget = protocol::ANSWER_BUDGET;
    let mut overwrite = book.marks_within(MarkKind::Intent, budget)?;
    if let Some(marks) = &mut overwrite {
        match book.marks_within(MarkKind::Dirty, budget)? {
            Some(dirty) => marks.extend(&dirty),
            None => overwrite = None,
        }
    }
    match overwrite.filter(|marks| protocol::encoded_size_bound(marks) <= budget) {
        Some(overwrite) => Ok(Up::Welcome {
            sync_point: book.sync_point()?,
            overwrite,
        }),
        None => {
            tracing::warn!("too many marks of our own to send: asking for a full reintegration");
            Ok(Up::Welcome {
                sync_point: None,
                overwrite: Marks::default(),
            })
        }
    }
}

/// Marks SECOND has to report (exposed for tools).
pub fn pending_overwrite(book: &ReplicationBook) -> Result<Marks, MirrorError> {
    let mut marks = book.marks(MarkKind::Intent)?;
    marks.extend(&book.marks(MarkKind::Dirty)?);
    Ok(marks)
}
