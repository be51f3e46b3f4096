//! The running snapshot and how it is replaced. `current()` is one atomic
//! load (arc-swap); `reload()` compiles the file beside the running snapshot
//! and swaps only if it compiles — a refused config changes nothing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use super::{ConfigErrors, Snapshot};
use crate::observe::access_log;

static CURRENT: OnceLock<ArcSwap<Snapshot>> = OnceLock::new();
static RELOADING: Mutex<()> = Mutex::new(());

/// Publish the first snapshot (generation 1).
pub fn install(mut snapshot: Snapshot) {
    snapshot.generation = 1;
    if CURRENT.set(ArcSwap::from_pointee(snapshot)).is_err() {
        tracing::error!("install called twice; keeping the first snapshot");
    }
}

/// The running snapshot. Panics only if called before `install`, which `server::run` does first.
pub fn current() -> Arc<Snapshot> {
    CURRENT.get().expect("snapshot installed at start").load_full()
}

/// Compile `path` and swap it in; returns the new generation.
pub fn reload(path: &Path) -> Result<u64, ConfigErrors> {
    let _one_at_a_time = RELOADING.lock().unwrap_or_else(|e| e.into_inner());
    let old = current();
    let mut next = match super::load(path) {
        Ok(s) => s,
        Err(e) => {
            for line in &e.0 {
                tracing::error!("reload refused: {line}");
            }
            let digest = std::fs::read(path).map(|b| super::digest(&b)).unwrap_or_default();
            tracing::error!(
                generation = old.generation,
                "reload refused; the running configuration keeps serving (refused config={digest})"
            );
            return Err(e);
        }
    };
    next.generation = old.generation + 1;
    if next.workers != old.workers {
        tracing::warn!(running = old.workers, configured = next.workers, "workers changes on restart only");
    }
    if let Err(e) = access_log::configure(&next.access_log, false) {
        tracing::error!(error = %e, "cannot open the new access log; keeping the old one");
    }
    let summary = describe_changes(&old, &next);
    let generation = next.generation;
    let digest = next.digest.clone();
    if let Some(cell) = CURRENT.get() {
        cell.store(Arc::new(next));
    }
    tracing::info!(generation, changes = %summary, "snapshot swapped generation={generation} config={digest}");
    Ok(generation)
}

/// What a reload changes, in one line for the log.
fn describe_changes(old: &Snapshot, new: &Snapshot) -> String {
    let names = |s: &Snapshot| s.upstreams.keys().cloned().collect::<BTreeSet<_>>();
    let addrs = |s: &Snapshot| s.listeners.iter().map(|l| l.addr.to_string()).collect::<BTreeSet<_>>();
    let (ou, nu) = (names(old), names(new));
    let (ol, nl) = (addrs(old), addrs(new));
    let mut parts = vec![format!("routes {} -> {}", old.routes.len(), new.routes.len())];
    let added: Vec<_> = nu.difference(&ou).collect();
    let removed: Vec<_> = ou.difference(&nu).collect();
    if !added.is_empty() {
        parts.push(format!("upstreams added {added:?}"));
    }
    if !removed.is_empty() {
        parts.push(format!("upstreams removed {removed:?}"));
    }
    let added: Vec<_> = nl.difference(&ol).collect();
    let removed: Vec<_> = ol.difference(&nl).collect();
    if !added.is_empty() {
        parts.push(format!("listeners added {added:?}"));
    }
    if !removed.is_empty() {
        parts.push(format!("listeners removed {removed:?}"));
    }
    parts.join("; ")
}
