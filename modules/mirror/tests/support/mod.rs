//! A PRIM and a SECOND on loopback, each with its own directory and book under a
//! scratch folder on the real disk; unmounted and removed on drop, even when a test
//! fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rampart_mirror::prim::{Event, PrimConfig, Primary};
use rampart_mirror::second::{SecondConfig, Secondary};
use rampart_mirror::tree::Tree;
use rampart_mirror::AckMode;
use rampart_raft::transport::ClusterKey;
use tokio::sync::mpsc::UnboundedReceiver;

pub const SECRET: &[u8] = b"mirror test secret";
/// SECOND syncs this often in the tests, so that they can wait for PRIM's intents to
/// be durable on SECOND without waiting for the default interval.
pub const SECOND_SYNC_EVERY: Duration = Duration::from_millis(200);

pub struct Pair {
    pub root: tempfile::TempDir,
    pub prim: Option<Primary>,
    pub events: Option<UnboundedReceiver<Event>>,
    pub second: Option<Secondary>,
    pub ack: AckMode,
    pub zone_size: u64,
}

pub fn key() -> ClusterKey {
    ClusterKey::from_secret(SECRET)
}

/// Logs to the test's output, filtered by `RUST_LOG` (nothing when unset).
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

impl Pair {
    /// Directories only; start the sides with [`Pair::start_second`] / [`Pair::start_prim`].
    pub fn new(ack: AckMode) -> Pair {
        init_logging();
        std::fs::create_dir_all("/var/tmp/rampart-mirror-tests").unwrap();
        let root = tempfile::Builder::new()
            .prefix("pair")
            .tempdir_in("/var/tmp/rampart-mirror-tests")
            .unwrap();
        for dir in ["a", "b", "a.book", "b.book"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        Pair {
            root,
            prim: None,
            events: None,
            second: None,
            ack,
            zone_size: 64 << 10,
        }
    }

    pub fn dir(&self, side: &str) -> PathBuf {
        self.root.path().join(side)
    }

    /// The usual start: SECOND on "b", PRIM of epoch 1 on "a", the first sync done.
    pub async fn in_step(ack: AckMode) -> Pair {
        let mut pair = Pair::new(ack);
        let addr = pair.start_second("b", "127.0.0.1:0");
        pair.start_prim(pair.prim_config("a", addr, 1));
        pair.wait_synced().await;
        pair
    }

    pub fn start_second(&mut self, side: &str, listen: &str) -> std::net::SocketAddr {
        let second = Secondary::start(
            SecondConfig {
                dir: self.dir(side),
                book: self.dir(&format!("{side}.book")),
                key: key(),
                zone_size: self.zone_size,
                ack: self.ack,
                sync_every: SECOND_SYNC_EVERY,
                protect: true,
            },
            listen,
        )
        .unwrap();
        let addr = second.addr();
        self.second = Some(second);
        addr
    }

    pub fn prim_config(&self, side: &str, peer: std::net::SocketAddr, epoch: u64) -> PrimConfig {
        let mut config = PrimConfig::new(
            self.dir(side),
            self.dir(&format!("{side}.book")),
            peer.to_string(),
            key(),
            epoch,
        );
        config.zone_size = self.zone_size;
        config.ack = self.ack;
        config.link_timeout = Duration::from_millis(1500);
        config.continue_alone = true;
        config
    }

    pub fn start_prim(&mut self, config: PrimConfig) {
        let (prim, events) = Primary::start(config).unwrap();
        self.prim = Some(prim);
        self.events = Some(events);
    }

    /// Waits for an event matching `pred` (others are skipped), within `timeout`.
    pub async fn wait_event(&mut self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        let events = self.events.as_mut().expect("PRIM started");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) if pred(&event) => return event,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("PRIM stopped"),
                Err(_) => panic!("no matching event within {timeout:?}"),
            }
        }
    }

    pub async fn wait_synced(&mut self) -> Event {
        self.wait_event(Duration::from_secs(60), |e| {
            matches!(e, Event::Synced { .. })
        })
        .await
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        drop(self.prim.take());
        drop(self.second.take());
    }
}

/// Runs blocking file work off the runtime (the FUSE replies come from its threads).
/// A call that never returns fails the test after two minutes instead of hanging it;
/// dropping the pair then fences PRIM, which fails the stuck call.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    blocking_within(Duration::from_secs(120), f).await
}

/// [`blocking`] for work that takes long on a slow machine (a million files), failing
/// after `limit`.
pub async fn blocking_within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(result) => result.unwrap(),
        Err(_) => panic!("file operations on the mount did not return within {limit:?}"),
    }
}

/// Both trees hold the same entries, kinds, sizes, modes, owners, link targets,
/// extended attributes and bytes. Returns the number of entries compared.
pub fn assert_same_trees(a: &Path, b: &Path) -> usize {
    compare_trees(a, b).unwrap_or_else(|difference| panic!("{difference}"))
}

/// The number of entries compared, or the first difference found.
pub fn compare_trees(a: &Path, b: &Path) -> Result<usize, String> {
    let (ta, tb) = (Tree::open(a).unwrap(), Tree::open(b).unwrap());
    let (la, lb) = (ta.list(b"").unwrap(), tb.list(b"").unwrap());
    let names = |l: &[(Vec<u8>, rampart_mirror::protocol::Meta)]| {
        l.iter()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    };
    if names(&la) != names(&lb) {
        return Err(format!(
            "entries differ: {:?} != {:?}",
            names(&la),
            names(&lb)
        ));
    }
    for ((path, ma), (_, mb)) in la.iter().zip(&lb) {
        let shown = String::from_utf8_lossy(path);
        let differs = |what: &str| Err(format!("{shown}: {what} differs"));
        if ma.kind != mb.kind {
            return differs("kind");
        }
        if ma.perm != mb.perm {
            return differs("mode");
        }
        if (ma.uid, ma.gid) != (mb.uid, mb.gid) {
            return differs("owner");
        }
        if ma.size != mb.size {
            return Err(format!("{shown}: size {} != {}", ma.size, mb.size));
        }
        if ma.target != mb.target {
            return differs("symlink target");
        }
        if ma.xattrs != mb.xattrs {
            return differs("xattrs");
        }
        if ma.kind == rampart_mirror::protocol::Kind::File {
            // A file may change or vanish while it is being compared.
            let ha = ta.zone_hashes(path, 1 << 20).map_err(|e| e.to_string())?;
            let hb = tb.zone_hashes(path, 1 << 20).map_err(|e| e.to_string())?;
            if ha != hb {
                return differs("content");
            }
        }
    }
    Ok(la.len())
}

/// Waits until both trees are the same (see [`compare_trees`]), at most `timeout`.
pub async fn converge(a: &Path, b: &Path, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        match compare_trees(a, b) {
            Ok(entries) => return entries,
            Err(difference) if Instant::now() >= deadline => {
                panic!("the trees did not converge within {timeout:?}: {difference}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
