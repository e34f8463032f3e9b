//! One change in progress: what it touches, its sequence and its frame.

use std::time::Instant;

use rampart_storage::{JournalEntry, Marks};
use std::sync::MutexGuard;

use super::marks::{rename_in, Intent, Order};
use super::{Engine, Phase};
use crate::protocol::{self, parent_of, Down, Op, RelPath};

/// What a change touches, for the bookkeeping.
#[derive(Default)]
pub struct Touch {
    pub(super) marks: Marks,
    /// Renames: the marks of each `from` are copied to `to` before the change applies.
    pub(super) copies: Vec<(RelPath, RelPath)>,
}

impl Touch {
    pub fn path(path: &[u8]) -> Touch {
        let mut touch = Touch::default();
        touch.marks.add_path(path);
        touch
    }

    /// A new entry at `path`: its parent's listing changes, and the entry itself is
    /// reconciled whole (kind, attributes, link target), since an entry of the same
    /// kind with other attributes may stand under that name on SECOND (one removed
    /// and created again while SECOND was away: `ln -sf`, a file recreated 0600).
    pub fn entry(path: &[u8]) -> Touch {
        Touch::path(&parent_of(path)).and_path(path)
    }

    /// A rename of `from` to `to` (an exchange when `exchange`): the parents change,
    /// and the marks of the data follow it from before the local rename on.
    pub fn rename(from: &[u8], to: &[u8], exchange: bool) -> Touch {
        let mut touch = Touch::path(&parent_of(from)).and_path(&parent_of(to));
        touch.copies.push((from.to_vec(), to.to_vec()));
        if exchange {
            touch.copies.push((to.to_vec(), from.to_vec()));
        }
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

    /// The zones between two sizes of a file (the zone at the size when they are equal).
    pub fn and_between(self, path: &[u8], a: u64, b: u64, zone_size: u64) -> Touch {
        let (low, high) = (a.min(b), a.max(b));
        self.and_range(path, low, high - low, zone_size)
    }

    pub fn and_range(mut self, path: &[u8], offset: u64, len: u64, zone_size: u64) -> Touch {
        self.marks
            .extend(&Touch::range(path, offset, len, zone_size).marks);
        self
    }
}

/// A change in progress: the order lock is held until it is committed or dropped.
pub struct Change<'a> {
    pub(super) engine: &'a Engine,
    pub(super) order: MutexGuard<'a, Order>,
    pub(super) phase: Phase,
    pub(super) touch: Touch,
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
                let epoch = engine.epoch();
                let frame = protocol::encode(&Down::Op { epoch, seq, op }, data);
                match engine.send_frame(&mut self.order, frame, Some(seq)) {
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
