//! The network side of a data-plane role (PRIM's link, SECOND's listener and sessions)
//! runs on a current-thread runtime of its own, beside the FUSE and applier threads:
//! - acknowledgements never queue behind the control plane's tasks (Raft, the console);
//! - a frame handed over by the FUSE thread wakes one thread. On a work-stealing
//!   runtime the woken worker may also wake an idle one to steal from it: the network
//!   side of a 4 KiB write + fdatasync took 4.7 context switches on the node's runtime
//!   and takes 3.75 here (perf stat, both roles).

use std::future::Future;

use tokio::sync::oneshot;

/// A thread running one task (and whatever it spawns) until stopped.
pub(crate) struct IoThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoThread {
    /// Starts `task` on a new thread named `name`. Sockets must be created inside it
    /// (a tokio socket belongs to the runtime it was made in).
    pub(crate) fn spawn<F>(name: &str, task: F) -> std::io::Result<IoThread>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        () = task => {}
                        _ = stopped => {}
                    }
                });
                // Drops the tasks it spawned, here and now; blocking jobs (the
                // reintegration copier) end on their own when their session does.
                runtime.shutdown_background();
            })?;
        Ok(IoThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the task and every task it spawned; returns once they are dropped.
    pub(crate) fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("a replication I/O thread panicked");
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A guard that records being dropped: a task holding one was cancelled.
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn stopping_drops_the_task_and_what_it_spawned_before_returning() {
        let (main_dropped, child_dropped) = (Arc::default(), Arc::default());
        let (main_flag, child_flag) = (
            Flag(Arc::clone(&main_dropped)),
            Flag(Arc::clone(&child_dropped)),
        );
        let (started, running) = std::sync::mpsc::channel();
        let mut io = IoThread::spawn("io-test", async move {
            let _main = main_flag;
            tokio::spawn(async move {
                let _child = child_flag;
                std::future::pending::<()>().await
            });
            // Timers work: the runtime has its drivers.
            tokio::time::sleep(Duration::from_millis(1)).await;
            started.send(()).unwrap();
            std::future::pending::<()>().await
        })
        .unwrap();
        running.recv_timeout(Duration::from_secs(10)).unwrap();
        io.stop();
        assert!(main_dropped.load(Ordering::SeqCst));
        assert!(child_dropped.load(Ordering::SeqCst));
    }
}
