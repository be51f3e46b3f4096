//! The control loop on the main thread: signals (SIGHUP reload, SIGUSR1
//! reopen the access log, SIGTERM/SIGQUIT/SIGINT graceful stop) and the file
//! watcher (a change to the config file, or a file it names, reloads).

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::reload;
use crate::observe::access_log;

/// The signals luagate handles, installed before the first listener opens so
/// that a SIGHUP right after start reloads instead of killing the process.
pub struct Signals {
    hup: Signal,
    term: Signal,
    quit: Signal,
    int: Signal,
    usr1: Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime context.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

pub async fn run(
    config: PathBuf,
    signals: Signals,
    generation: watch::Sender<u64>,
    stop: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let Signals { mut hup, mut term, mut quit, mut int, mut usr1 } = signals;
    let (changes_tx, mut changes) = mpsc::unbounded_channel::<()>();
    let _watcher = watch_files(&config, changes_tx);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                reload_and_notify(&config, &generation);
            }
            Some(()) = changes.recv() => {
                // Editors write in several steps: wait for the file to settle.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changes.try_recv().is_ok() {}
                tracing::info!("config file changed: reloading");
                reload_and_notify(&config, &generation);
            }
            _ = usr1.recv() => {
                if let Err(e) = access_log::configure(&reload::current().access_log, true) {
                    tracing::error!(error = %e, "cannot reopen the access log");
                }
            }
            _ = term.recv() => break,
            _ = quit.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(grace = ?reload::current().shutdown_grace, "shutting down: no new connections, finishing in-flight requests");
    super::STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop.send(true);
    Ok(())
}

fn reload_and_notify(config: &std::path::Path, generation: &watch::Sender<u64>) {
    if let Ok(gen) = reload::reload(config) {
        let _ = generation.send(gen);
    }
}

/// Watch the directory of the config file (editors replace files by rename)
/// and the directories of files the config names; report changes to them.
fn watch_files(config: &std::path::Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let files = move || {
        let mut files = vec![config.clone()];
        files.extend(reload::current().watched_files());
        files
    };
    let watched = files();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = files();
        if event.paths.iter().any(|p| ours.iter().any(|f| f == p)) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watching is off"))
    .ok()?;
    let mut dirs: Vec<PathBuf> = watched.iter().filter_map(|f| f.parent().map(|p| p.to_path_buf())).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch");
        }
    }
    Some(watcher)
}
