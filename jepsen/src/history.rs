//! What happened during a run: client operations (invoke, then ok / fail / info),
//! nemesis windows, and observations of each node's Raft role and module roles.
//! Stored as JSON lines, one [`Entry`] per line.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Invoke,
    /// Completed and took effect.
    Ok,
    /// Definitely did not take effect.
    Fail,
    /// Unknown: it may or may not have taken effect (timeout, lost connection).
    Info,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Milliseconds since the start of the run.
    pub time_ms: f64,
    /// A client issues one operation at a time; after an `info` it continues under a
    /// new process id, since the old operation may still be in flight.
    pub process: u64,
    pub kind: OpKind,
    /// `read`, `write`, `cas`, `add`…
    pub f: String,
    pub key: String,
    /// For `invoke`: the argument; for `ok` of a read: what was read.
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Start,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    Op(Op),
    Nemesis {
        time_ms: f64,
        phase: Phase,
        fault: String,
    },
    /// A node's answer about its Raft role; `raft_state` is `None` when it did not
    /// answer.
    Observe {
        time_ms: f64,
        node: String,
        raft_state: Option<String>,
        term: Option<u64>,
        leader: Option<String>,
    },
    /// A node started (`acting: true`) or stopped acting in `role` for `module`.
    Role {
        time_ms: f64,
        node: String,
        module: String,
        role: String,
        acting: bool,
    },
}

impl Entry {
    pub fn time_ms(&self) -> f64 {
        match self {
            Entry::Op(op) => op.time_ms,
            Entry::Nemesis { time_ms, .. }
            | Entry::Observe { time_ms, .. }
            | Entry::Role { time_ms, .. } => *time_ms,
        }
    }
}

/// A recorder shared by every task of a run.
pub struct History {
    start: Instant,
    entries: Mutex<Vec<Entry>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        History {
            start: Instant::now(),
            entries: Mutex::new(Vec::new()),
        }
    }

    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    pub fn record(&self, entry: Entry) {
        self.entries.lock().expect("not poisoned").push(entry);
    }

    pub fn op(&self, process: u64, kind: OpKind, f: &str, key: &str, value: Value) {
        self.record(Entry::Op(Op {
            time_ms: self.now_ms(),
            process,
            kind,
            f: f.to_string(),
            key: key.to_string(),
            value,
        }));
    }

    /// The entries so far, in time order.
    pub fn entries(&self) -> Vec<Entry> {
        let mut entries = self.entries.lock().expect("not poisoned").clone();
        entries.sort_by(|a, b| a.time_ms().total_cmp(&b.time_ms()));
        entries
    }
}

pub fn write_jsonl(path: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for entry in entries {
        serde_json::to_writer(&mut out, entry)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut entries = Vec::new();
    for (number, line) in file.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(
            serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), number + 1))?,
        );
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_round_trip_through_json_lines() {
        let history = History::new();
        history.op(1, OpKind::Invoke, "write", "k", serde_json::json!(3));
        history.op(1, OpKind::Ok, "write", "k", serde_json::json!(3));
        history.record(Entry::Nemesis {
            time_ms: 1.0,
            phase: Phase::Start,
            fault: "kill n1".into(),
        });
        let dir = std::env::temp_dir().join(format!("rj-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.jsonl");
        write_jsonl(&path, &history.entries()).unwrap();
        let back = read_jsonl(&path).unwrap();
        assert_eq!(back, history.entries());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
