//! The process: N worker threads, each with its own single-threaded tokio
//! runtime and its own SO_REUSEPORT listeners (nginx's worker model, as
//! threads), and a control loop on the main thread that reloads on SIGHUP or
//! a watched file change and shuts down gracefully on SIGTERM/SIGQUIT.

pub mod connection;
pub mod control;
mod h2;
pub mod listener;
pub mod tls;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::config::{self, reload};
use crate::observe;

/// hyper's executor for a worker: tasks stay on the worker's thread, so
/// per-request state (and later the worker's Lua state) need not be `Send`.
#[derive(Clone, Copy, Debug)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// `luagate run`: serve until SIGTERM/SIGQUIT/SIGINT.
pub fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let snapshot = config::load(&config_path).map_err(|e| anyhow::anyhow!("configuration refused:\n{e}"))?;
    observe::init(snapshot.error_level);
    observe::access_log::configure(&snapshot.access_log, false).context("opening the access log")?;
    let nofile = crate::limit::fds::raise_limit();
    let workers = snapshot.workers;
    let pid_file = snapshot.pid_file.clone();
    reload::install(snapshot);
    if let Some(pid_file) = &pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pid file {}", pid_file.display()))?;
    }

    let control = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signals = {
        let _inside = control.enter();
        control::Signals::install().context("installing signal handlers")?
    };
    let (generation_tx, generation_rx) = tokio::sync::watch::channel(1u64);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for id in 0..workers {
        let (generation_rx, stop_rx, ready_tx) = (generation_rx.clone(), stop_rx.clone(), ready_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("luagate-worker-{id}"))
            .spawn(move || worker::run(id, workers, generation_rx, stop_rx, ready_tx))
            .context("starting a worker thread")?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = stop_tx.send(true);
                bail!("{e}");
            }
            Err(_) => bail!("a worker thread died while starting"),
        }
    }
    crate::limit::fds::set_base();
    let snap = reload::current();
    let addrs: Vec<String> = snap.listeners.iter().map(|l| l.addr.to_string()).collect();
    tracing::info!(version = crate::VERSION, workers, listen = ?addrs, open_files_limit = ?nofile, "luagate started");
    drop(snap);

    control.block_on(control::run(config_path, signals, generation_tx, stop_tx))?;
    for t in threads {
        let _ = t.join();
    }
    if let Some(pid_file) = &pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    tracing::info!("luagate stopped");
    observe::access_log::close();
    Ok(())
}

static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once a graceful shutdown has begun (`ngx.worker.exiting()`).
pub fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::Relaxed)
}
