//! Set workload on the mirror data plane: each client appends numbered records to a
//! file of its own in PRIM's mount, each append `fdatasync`ed; an append is `ok` once
//! the sync returned, `info` when anything failed (the bytes may or may not be there:
//! a killed PRIM, a mount gone, a full disk). After an `info` the client reopens its
//! file under a new process number and cuts it back to its length after the last `ok`
//! (a short write before `ENOSPC` leaves part of a record).
//!
//! A copy is read back with [`read_copy`]: one element per line, anything else —
//! zeros, a torn record, a stray byte — reported as unreadable.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{History, OpKind};

/// The client files are `set-<client>` at the top of the replicated directory.
const FILE_PREFIX: &str = "set-";

pub struct AppendClient {
    pub id: u64,
    /// Number of clients, to number processes: `id + clients × generation`.
    pub clients: u64,
    /// PRIM's mount.
    pub dir: PathBuf,
    pub history: Arc<History>,
}

impl AppendClient {
    /// Appends until `until`, pausing a little between appends. Blocking: run it on a
    /// thread of its own (an append can wait as long as PRIM parks it).
    pub fn run(self, seed: u64, until: Instant) {
        let mut rng = StdRng::seed_from_u64(seed ^ self.id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let path = self.dir.join(format!("{FILE_PREFIX}{}", self.id));
        let mut file: Option<File> = None;
        // The file's length after the last acknowledged append: a failed one may have
        // left part of its record (a short write before ENOSPC), which the next append
        // would otherwise extend into a record nobody wrote. Cut back before appending,
        // as a log that writes at known offsets would.
        let mut acknowledged_len: Option<u64> = None;
        let mut failed = false;
        let (mut generation, mut count) = (0u64, 0u64);
        while Instant::now() < until {
            let process = self.id + self.clients * generation;
            let element = self.id * 1_000_000 + count;
            count += 1;
            self.history
                .op(process, OpKind::Invoke, "add", "set", json!(element));
            let cut = failed.then_some(acknowledged_len.unwrap_or(0));
            match append(&mut file, &path, cut, element) {
                Ok(len) => {
                    (acknowledged_len, failed) = (Some(len), false);
                    self.history
                        .op(process, OpKind::Ok, "add", "set", json!(element))
                }
                Err(e) => {
                    self.history.op(
                        process,
                        OpKind::Info,
                        "add",
                        "set",
                        json!({ "element": element, "error": e.to_string() }),
                    );
                    file = None;
                    failed = true;
                    generation += 1;
                    // A dead mount fails at once: do not spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(2..15)));
        }
    }
}

/// One record, `element` and a newline in a single write, then `fdatasync`; first the
/// file is cut back to `cut` bytes when given. Returns the file's length after it.
fn append(
    file: &mut Option<File>,
    path: &Path,
    cut: Option<u64>,
    element: u64,
) -> std::io::Result<u64> {
    if file.is_none() {
        *file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)?,
        );
    }
    let file = file.as_mut().expect("just opened");
    if let Some(len) = cut {
        file.set_len(len)?;
    }
    file.write_all(format!("{element}\n").as_bytes())?;
    file.sync_data()?;
    Ok(file.metadata()?.len())
}

/// Every record of every client file in `dir`: `{"elements": [...], "unreadable": [...]}`.
pub fn read_copy(dir: &Path) -> std::io::Result<Value> {
    let mut elements = Vec::new();
    let mut unreadable = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(FILE_PREFIX))
        .collect();
    names.sort();
    for name in names {
        let bytes = std::fs::read(dir.join(&name))?;
        let mut records = bytes.split(|&b| b == b'\n').peekable();
        while let Some(record) = records.next() {
            let last = records.peek().is_none();
            if last && record.is_empty() {
                break; // the newline that ends the file
            }
            match std::str::from_utf8(record)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(element) if !last => elements.push(element),
                _ => unreadable.push(json!({
                    "file": name,
                    "record": String::from_utf8_lossy(record),
                    "unterminated": last,
                })),
            }
        }
    }
    elements.sort_unstable();
    Ok(json!({ "elements": elements, "unreadable": unreadable }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_reads_back_its_records_and_flags_the_rest() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("set-0"), b"1\n2\n").unwrap();
        std::fs::write(dir.join("set-1"), b"1000000\n\0\0\n7").unwrap();
        std::fs::write(dir.join("other"), b"x\n").unwrap();
        let read = read_copy(&dir).unwrap();
        assert_eq!(read["elements"], json!([1, 2, 1_000_000]));
        let unreadable = read["unreadable"].as_array().unwrap();
        assert_eq!(unreadable.len(), 2, "{unreadable:?}");
        assert_eq!(unreadable[1]["unterminated"], true);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rampart-append-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
