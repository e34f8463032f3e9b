//! The module log: one append-only file of JSON lines per module on each node.
//!
//! Normal entries say what the module did (state changes, actions, script results);
//! verbose entries add every line the scripts printed. When the file passes
//! [`MAX_BYTES`] it is moved to `<file>.1` (replacing the previous one) and a new one
//! starts, so a chatty script cannot fill the disk.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub const MAX_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Script output and details, shown with `-v`.
    Verbose,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub level: Level,
    /// What wrote it: `state`, `errd`, a script name, a resource…
    pub source: String,
    pub message: String,
}

pub struct ModuleLog {
    path: PathBuf,
    file: Mutex<(File, u64)>,
}

impl ModuleLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(ModuleLog {
            path: path.to_path_buf(),
            file: Mutex::new((file, size)),
        })
    }

    /// Appends one entry. A failure to write is reported on the node's own log and
    /// otherwise ignored: the module must not stop because its log cannot be written.
    pub fn append(&self, level: Level, source: &str, message: &str) {
        let entry = LogEntry {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            level,
            source: source.to_string(),
            message: message.to_string(),
        };
        let mut line = serde_json::to_vec(&entry).expect("log entries always serialize");
        line.push(b'\n');
        let mut guard = self.file.lock().expect("not poisoned");
        if guard.1 + line.len() as u64 > MAX_BYTES {
            if let Err(e) = self.rotate(&mut guard) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate the module log");
            }
        }
        match guard.0.write_all(&line) {
            Ok(()) => guard.1 += line.len() as u64,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the module log")
            }
        }
    }

    fn rotate(&self, guard: &mut (File, u64)) -> std::io::Result<()> {
        std::fs::rename(&self.path, self.path.with_extension("log.1"))?;
        guard.0 = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        guard.1 = 0;
        Ok(())
    }

    /// Entries of the current file from `offset` (an entry index), at most `limit`,
    /// verbose ones only when asked. Returns them and the offset to continue from.
    pub fn read(
        &self,
        offset: usize,
        limit: usize,
        verbose: bool,
    ) -> std::io::Result<(Vec<LogEntry>, usize)> {
        let reader = BufReader::new(File::open(&self.path)?);
        let mut entries = Vec::new();
        let mut next = offset;
        for (index, line) in reader.lines().enumerate().skip(offset) {
            if entries.len() == limit {
                break;
            }
            next = index + 1;
            let Ok(entry) = serde_json::from_str::<LogEntry>(&line?) else {
                continue; // a line torn by a crash mid-write
            };
            if verbose || entry.level != Level::Verbose {
                entries.push(entry);
            }
        }
        Ok((entries, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_paged_and_verbose_ones_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let log = ModuleLog::open(&dir.path().join("m.log")).unwrap();
        for i in 0..5 {
            log.append(Level::Info, "state", &format!("step {i}"));
            log.append(Level::Verbose, "start_prim", &format!("output {i}"));
        }
        let (page, next) = log.read(0, 3, true).unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(page[1].message, "output 0");
        let (rest, _) = log.read(next, 100, true).unwrap();
        assert_eq!(rest.len(), 7);
        let (quiet, _) = log.read(0, 100, false).unwrap();
        assert_eq!(quiet.len(), 5);
        assert!(quiet.iter().all(|e| e.level == Level::Info));
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let log = ModuleLog::open(&path).unwrap();
        log.append(Level::Warn, "errd", "proc.x down");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"time_ms\":1,\"lev")
            .unwrap();
        let (entries, _) = log.read(0, 10, false).unwrap();
        assert_eq!(entries.len(), 1);
    }
}
