//! Reintegration: brings a returning SECOND up to date while the application writes.
//!
//! - **Incremental** (both copies hold the same sync point): the work is PRIM's dirty
//!   set, to which the session start added the peer's own marks. Nothing else is looked
//!   at, so the cost follows what changed, not the size of the tree.
//! - **Full** (sync points differ): both trees are listed, files on both sides are
//!   compared zone by zone with blake3 on each side, and only differing zones, missing
//!   entries and differing attributes become work; then as incremental.
//!
//! Every operation the copier sends is read and queued under the engine's order lock
//! ([`Engine::send_current`]), so a live change and the copier's view of the same bytes
//! reach SECOND in the order they happened here. A mark is cleared only once SECOND
//! durably holds what was sent for it; an interrupted reintegration resumes from the
//! marks left. When nothing is dirty a fresh sync point is sent and, once durable,
//! recorded on both sides.
//!
//! The decisions themselves are pure functions in [`plan`].

mod plan;

use plan::hash_batches;
pub use plan::{differing_zones, plan_full, FullPlan};

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rampart_storage::{Marks, SyncPoint};

use crate::prim::engine::Engine;
use crate::prim::Event;
use crate::protocol::{Answer, Kind, Meta, Op, RelPath, Request};
use crate::tree::join;

/// A request answered after a tree walk or hashing a large file may take this long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
const PROBE_CHUNK: usize = 1024;

/// What reintegration reports while it runs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResyncProgress {
    pub full: bool,
    /// Files and directories looked at (listed, probed or hashed).
    pub examined: u64,
    pub zones_total: u64,
    pub zones_sent: u64,
    pub bytes_sent: u64,
    pub paths_reconciled: u64,
    pub elapsed_secs: f64,
    /// Estimated seconds left at the current rate.
    pub eta_secs: Option<f64>,
    pub done: bool,
}

struct Copier<'a> {
    engine: &'a Engine,
    session: u64,
    progress: ResyncProgress,
    started: Instant,
    /// Sent and not yet durable: (last sequence, marks it settles).
    pending: VecDeque<(u64, Marks)>,
    last_seq: u64,
    bucket: TokenBucket,
    /// Paths looked at, for [`ResyncProgress::examined`].
    examined: HashSet<RelPath>,
}

/// Runs reintegration for `session` until the peer is in sync or the session ends.
pub(crate) fn run(engine: &Engine, session: u64, full: bool) -> Result<(), String> {
    let mut copier = Copier {
        engine,
        session,
        progress: ResyncProgress {
            full,
            ..ResyncProgress::default()
        },
        started: Instant::now(),
        pending: VecDeque::new(),
        last_seq: 0,
        bucket: TokenBucket::new(engine.config.resync_rate),
        examined: HashSet::new(),
    };
    let result = copier.run(full);
    if let Err(e) = &result {
        engine.set_status(|s| s.last_error = Some(format!("reintegration: {e}")));
    }
    result
}

impl Copier<'_> {
    fn run(&mut self, full: bool) -> Result<(), String> {
        if full {
            self.compare_trees()?;
        }
        let mut rounds = 0u32;
        loop {
            let dirty = self.engine.dirty();
            if dirty.is_empty() {
                let point = SyncPoint {
                    id: rand::random(),
                    epoch: self.engine.epoch(),
                };
                let Some(seq) = self.engine.send_sync_point(self.session, point)? else {
                    continue; // Something became dirty in between.
                };
                self.engine.wait_durable(self.session, seq)?;
                self.engine
                    .book
                    .set_sync_point(Some(point))
                    .and_then(|()| self.engine.book.journal_clear())
                    .map_err(|e| e.to_string())?;
                let synced = Event::Synced {
                    session: self.session,
                    bytes_sent: self.progress.bytes_sent,
                    examined: self.progress.examined,
                };
                self.progress.done = true;
                let finished = self.snapshot();
                if !self.engine.declare_in_step(self.session, synced, finished) {
                    self.progress.done = false;
                    return Err("the session ended".into());
                }
                tracing::info!(
                    bytes = self.progress.bytes_sent,
                    examined = self.progress.examined,
                    secs = self.started.elapsed().as_secs_f64(),
                    "reintegration complete"
                );
                return Ok(());
            }
            if rounds > 0 {
                // Work that keeps coming back (SECOND failing to apply it) is retried
                // with a growing pause rather than in a tight loop.
                std::thread::sleep(Duration::from_millis(100 * u64::from(rounds.min(50))));
            }
            rounds += 1;
            self.reconcile_all_paths()?;
            // Zones only after the paths: a file created while SECOND was away exists
            // there once its parent's reconciliation made it.
            let dirty = self.engine.dirty();
            self.progress.zones_total = self.progress.zones_sent + dirty.zone_count() as u64;
            self.copy_zones(&dirty)?;
            self.settle_all()?;
        }
    }

    fn ask(&self, request: Request) -> Result<Answer, String> {
        match self.engine.ask(self.session, request, ANSWER_TIMEOUT)? {
            Answer::Failed(e) => Err(format!("SECOND: {e}")),
            answer => Ok(answer),
        }
    }

    /// SECOND's whole tree, read in parts. Each part reflects the stream at the point
    /// it was asked; an entry renamed between parts is missing or listed twice, which
    /// the comparison repairs because the local listing is taken after the last part
    /// (an entry missing on SECOND is copied whole, an extra one is removed).
    fn remote_tree(&self) -> Result<Vec<(RelPath, Meta)>, String> {
        let mut tree: Vec<(RelPath, Meta)> = Vec::new();
        loop {
            let after = tree.last().map(|(path, _)| path.clone());
            let Answer::List { entries, complete } = self.ask(Request::List {
                path: Vec::new(),
                after,
            })?
            else {
                return Err("the peer answered List with something else".into());
            };
            if !complete && entries.is_empty() {
                return Err("the peer answered an empty part of its listing".into());
            }
            tree.extend(entries);
            if complete {
                return Ok(tree);
            }
        }
    }

    /// The names and kinds in SECOND's directory `path`, read in parts.
    fn remote_children(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Kind)>, String> {
        let mut children: Vec<(Vec<u8>, Kind)> = Vec::new();
        loop {
            let after = children.last().map(|(name, _)| name.clone());
            let Answer::Children { entries, complete } = self.ask(Request::Children {
                path: path.to_vec(),
                after,
            })?
            else {
                return Err("the peer answered Children with something else".into());
            };
            if !complete && entries.is_empty() {
                return Err("the peer answered an empty part of a directory".into());
            }
            children.extend(entries);
            if complete {
                return Ok(children);
            }
        }
    }

    fn compare_trees(&mut self) -> Result<(), String> {
        let remote = self.remote_tree()?;
        let engine = self.engine;
        let local: Vec<_> = engine
            .tree
            .list(b"")
            .map_err(|e| format!("listing the local tree: {e}"))?
            .into_iter()
            .filter(|(p, _)| !engine.not_replicated(p))
            .collect();
        let remote: Vec<_> = remote
            .into_iter()
            .filter(|(p, _)| !engine.not_replicated(p))
            .collect();
        for (path, _) in local.iter().chain(&remote) {
            self.examine(path);
        }
        let plan = plan_full(&local, &remote);
        for path in &plan.remove {
            let path = path.clone();
            self.send(Marks::default(), move |tree| {
                Ok(tree
                    .stat(&path)?
                    .is_none()
                    .then_some((Op::RemoveTree { path }, Vec::new())))
            })?;
        }
        let mut work = Marks::default();
        work.add_path(b"");
        for path in &plan.reconcile {
            work.add_path(path);
        }
        let zone_size = engine.config.zone_size;
        let sizes: BTreeMap<&[u8], u64> = local.iter().map(|(p, m)| (&p[..], m.size)).collect();
        for path in &plan.copy {
            for zone in 0..sizes[&path[..]].div_ceil(zone_size) {
                work.add_zone(path, zone);
            }
        }
        for batch in hash_batches(&plan.compare, &sizes) {
            let Answer::Hashes(remote) = self.ask(Request::Hashes {
                paths: batch.to_vec(),
            })?
            else {
                return Err("the peer answered Hashes with something else".into());
            };
            if remote.len() != batch.len() {
                return Err("the peer answered Hashes for other files".into());
            }
            for (path, remote) in batch.iter().zip(remote) {
                let local = engine
                    .tree
                    .zone_hashes(path, zone_size)
                    .map_err(|e| format!("hashing {}: {e}", String::from_utf8_lossy(path)))?;
                for zone in differing_zones(&local, &remote) {
                    work.add_zone(path, zone);
                }
                if local.len() != remote.len() {
                    work.add_path(path);
                }
            }
        }
        engine
            .add_dirty(&work)
            .map_err(|e| format!("recording reintegration work: errno {e}"))
    }

    /// Reconciles every marked path, then the paths that reconciling marked (a
    /// directory marks the children SECOND lacks), parents before children, until
    /// nothing new is marked.
    fn reconcile_all_paths(&mut self) -> Result<(), String> {
        let mut reconciled: HashSet<RelPath> = HashSet::new();
        loop {
            let fresh: Vec<RelPath> = (self.engine.dirty().paths.iter())
                .filter(|path| !reconciled.contains(*path))
                .cloned()
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            reconciled.extend(fresh.iter().cloned());
            self.reconcile_paths(&fresh)?;
        }
    }

    /// Makes each of `marked` exist on SECOND as it does here.
    fn reconcile_paths(&mut self, marked: &[RelPath]) -> Result<(), String> {
        let engine = self.engine;
        let paths: Vec<RelPath> = marked
            .iter()
            .filter(|p| !engine.not_replicated(p))
            .cloned()
            .collect();
        // Paths marked but excluded from replication are simply settled.
        let excluded: Vec<RelPath> = marked
            .iter()
            .filter(|p| engine.not_replicated(p))
            .cloned()
            .collect();
        if !excluded.is_empty() {
            let mut marks = Marks::default();
            excluded.iter().for_each(|p| marks.add_path(p));
            engine.clear_dirty(self.session, &marks);
        }
        for chunk in paths.chunks(PROBE_CHUNK) {
            let Answer::Probe(remote) = self.ask(Request::Probe {
                paths: chunk.to_vec(),
            })?
            else {
                return Err("the peer answered Probe with something else".into());
            };
            chunk.iter().for_each(|path| self.examine(path));
            for (path, remote) in chunk.iter().zip(remote) {
                self.reconcile_path(path, remote)?;
            }
        }
        Ok(())
    }

    fn reconcile_path(
        &mut self,
        path: &RelPath,
        remote: Option<(Kind, u64)>,
    ) -> Result<(), String> {
        let engine = self.engine;
        let zone_size = engine.config.zone_size;
        let mut settles = Marks::default();
        settles.add_path(path);
        let mut more = Marks::default();
        let local = engine.tree.meta(path).map_err(|e| e.to_string())?;
        {
            let path = path.clone();
            let more = &mut more;
            self.send(settles, move |tree| match tree.meta(&path)? {
                None => Ok(remote
                    .is_some()
                    .then_some((Op::RemoveTree { path }, Vec::new()))),
                Some(meta) => {
                    if meta.kind == Kind::File && remote.map(|r| r.0) != Some(Kind::File) {
                        for zone in 0..meta.size.div_ceil(zone_size) {
                            more.add_zone(&path, zone);
                        }
                    }
                    Ok(Some((Op::Ensure { path, meta }, Vec::new())))
                }
            })?;
        }
        self.progress.paths_reconciled += 1;
        if local.as_ref().is_some_and(|m| m.kind == Kind::Dir) {
            let remote_children = self.remote_children(path)?;
            let local_children = engine.tree.children(path).map_err(|e| e.to_string())?;
            let local_kinds: BTreeMap<&[u8], Kind> =
                local_children.iter().map(|(n, k)| (&n[..], *k)).collect();
            let remote_kinds: BTreeMap<&[u8], Kind> =
                remote_children.iter().map(|(n, k)| (&n[..], *k)).collect();
            for (name, kind) in &local_children {
                if remote_kinds.get(&name[..]) != Some(kind) {
                    more.add_path(&join(path, name));
                }
            }
            for (name, _) in &remote_children {
                if !local_kinds.contains_key(&name[..]) {
                    let child = join(path, name);
                    if engine.not_replicated(&child) {
                        continue;
                    }
                    self.send(Marks::default(), move |tree| {
                        Ok(tree
                            .stat(&child)?
                            .is_none()
                            .then_some((Op::RemoveTree { path: child }, Vec::new())))
                    })?;
                }
            }
        }
        if !more.is_empty() {
            engine
                .add_dirty(&more)
                .map_err(|e| format!("recording reintegration work: errno {e}"))?;
        }
        Ok(())
    }

    /// Sends the current bytes of every marked zone.
    fn copy_zones(&mut self, dirty: &Marks) -> Result<(), String> {
        let zone_size = self.engine.config.zone_size;
        for (path, zones) in &dirty.zones {
            if self.engine.not_replicated(path) {
                let mut marks = Marks::default();
                zones.iter().for_each(|z| marks.add_zone(path, *z));
                self.engine.clear_dirty(self.session, &marks);
                continue;
            }
            self.examine(path);
            for &zone in zones {
                self.bucket.take(zone_size);
                let mut settles = Marks::default();
                settles.add_zone(path, zone);
                let path = path.clone();
                let sent = self.send(settles, move |tree| tree.zone(&path, zone, zone_size))?;
                self.progress.zones_sent += 1;
                self.progress.bytes_sent += sent as u64;
                self.settle_some();
                self.publish();
            }
        }
        Ok(())
    }

    /// Sends what `read` returns (read under the order lock); `settles` is cleared once
    /// SECOND durably holds it. Returns the bytes of data sent.
    fn send(
        &mut self,
        settles: Marks,
        read: impl FnOnce(&crate::tree::Tree) -> std::io::Result<Option<(Op, Vec<u8>)>>,
    ) -> Result<usize, String> {
        let mut sent = 0;
        let seq = self.engine.send_current(self.session, |tree| {
            let out = read(tree)?;
            if let Some((_, data)) = &out {
                sent = data.len();
            }
            Ok(out)
        })?;
        if let Some(seq) = seq {
            self.last_seq = seq;
        }
        self.pending.push_back((self.last_seq, settles));
        Ok(sent)
    }

    /// Clears the marks of everything SECOND already holds durably.
    fn settle_some(&mut self) {
        let durable = self.engine.status.lock().expect("status lock").durable;
        let mut settled = Marks::default();
        while let Some((seq, _)) = self.pending.front() {
            if *seq > durable {
                break;
            }
            let (_, marks) = self.pending.pop_front().expect("just peeked");
            settled.extend(&marks);
        }
        if !settled.is_empty() {
            self.engine.clear_dirty(self.session, &settled);
        }
    }

    fn settle_all(&mut self) -> Result<(), String> {
        if !self.pending.is_empty() {
            let Answer::Synced = self.ask(Request::Sync)? else {
                return Err("the peer answered Sync with something else".into());
            };
        }
        self.engine.wait_durable(self.session, self.last_seq)?;
        let mut settled = Marks::default();
        for (_, marks) in self.pending.drain(..) {
            settled.extend(&marks);
        }
        self.engine.clear_dirty(self.session, &settled);
        self.publish();
        Ok(())
    }

    fn examine(&mut self, path: &RelPath) {
        if !self.examined.contains(path) {
            self.examined.insert(path.clone());
            self.progress.examined += 1;
        }
    }

    fn publish(&mut self) {
        let progress = self.snapshot();
        self.engine.set_status(|s| s.resync = Some(progress));
    }

    /// The progress as of now, for the status.
    fn snapshot(&mut self) -> ResyncProgress {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.progress.elapsed_secs = elapsed;
        let left = self
            .progress
            .zones_total
            .saturating_sub(self.progress.zones_sent);
        self.progress.eta_secs = (self.progress.zones_sent > 0 && elapsed > 0.0)
            .then(|| left as f64 * elapsed / self.progress.zones_sent as f64);
        self.progress.clone()
    }
}

/// Limits the copier to a byte rate (none when unset).
struct TokenBucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: Option<u64>) -> Self {
        TokenBucket {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    fn take(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let now = Instant::now();
        // At most one second of burst.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate as f64)
            .min(rate as f64);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate as f64));
        }
    }
}
