//! One worker thread: a current-thread tokio runtime for `!Send` tasks
//! (`LocalRuntime`), its own listeners, its own upstream pool. It follows reloads (opening and
//! closing listeners the new snapshot adds or drops) and drains its
//! connections on shutdown, up to the grace period.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::connection::Tracker;
use super::listener;
use crate::config::{reload, Snapshot};
use crate::phase::pipeline::Worker;
use crate::upstream::pool::Pool;

pub fn run(
    id: usize,
    count: usize,
    mut generation: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build_local(Default::default()) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: cannot start its runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let worker = Rc::new(Worker { id, pool: Rc::new(Pool::default()) });
        let conns = Rc::new(Tracker::default());
        let mut listeners: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
        let conn_stop = stop.clone();
        let sync = |listeners: &mut HashMap<SocketAddr, JoinHandle<()>>, snap: &Snapshot| -> Result<(), String> {
            listeners.retain(|addr, task| {
                let keep = snap.listener(*addr).is_some();
                if !keep {
                    task.abort();
                }
                keep
            });
            for l in &snap.listeners {
                if listeners.contains_key(&l.addr) {
                    continue;
                }
                let sock = listener::bind(l.addr).map_err(|e| format!("cannot listen on {}: {e}", l.addr))?;
                let task = listener::accept_loop(sock, Rc::clone(&worker), Rc::clone(&conns), conn_stop.clone());
                listeners.insert(l.addr, tokio::task::spawn_local(task));
            }
            Ok(())
        };
        crate::lua::runtime::set_worker(id, count);
        if let Err(e) = sync(&mut listeners, &reload::current()) {
            let _ = ready.send(Err(e));
            return;
        }
        start_lua(&reload::current());
        let _ = ready.send(Ok(()));
        tokio::task::spawn_local(timer_horizon());
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                changed = generation.changed() => {
                    if changed.is_err() { break; }
                    let snap = reload::current();
                    if let Err(e) = sync(&mut listeners, &snap) {
                        tracing::error!(worker = id, error = %e, "reload: listener not opened");
                    }
                    start_lua(&snap);
                }
                _ = stop.changed() => break,
                _ = sweep.tick() => {
                    let snap = reload::current();
                    worker.pool.sweep(|addr| keepalive_of(&snap, addr));
                }
            }
        }
        for (_, task) in listeners.drain() {
            task.abort();
        }
        let grace = reload::current().shutdown_grace;
        // Pending Lua timers fire with premature = true and may finish within the grace period too.
        let timers = tokio::time::timeout(grace, crate::lua::ngx::timer::shutdown());
        let (drained, timers) = tokio::join!(tokio::time::timeout(grace, conns.drained()), timers);
        if timers.is_err() {
            tracing::warn!(worker = id, "grace period over, abandoning running Lua timers");
        }
        if drained.is_err() {
            tracing::warn!(worker = id, open = conns.open(), "grace period over, closing connections");
        }
    });
}

/// tokio wakes its own driver (an eventfd write, then one more `epoll_wait`)
/// whenever a timer is armed earlier than the driver's next planned wake-up —
/// and with no timer pending, any timer is. A proxied request arms two or
/// three (header read, upstream timeouts) and drops them within a
/// millisecond, so that happened for about every other request. A wake-up
/// planned at most 50 ms ahead keeps later timers from paying it; it costs an
/// idle worker 20 wake-ups a second.
async fn timer_horizon() {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// With an init_worker script, the Lua state starts with the worker (and
/// re-runs it after each reload) instead of at the first Lua request; a
/// state that exists follows each reload at once (its old timers fire
/// prematurely then, not at the next Lua request).
fn start_lua(snap: &Snapshot) {
    if snap.lua.init_worker.is_some() || crate::lua::runtime::started() {
        if let Err(e) = crate::lua::runtime::get(snap.generation, &snap.lua) {
            tracing::error!(target: "lua", error = %e, "cannot start the Lua state");
        }
    }
}

/// The idle timeout for pooled connections to `addr`, or None when no
/// upstream names it any more.
fn keepalive_of(snap: &Snapshot, addr: SocketAddr) -> Option<Duration> {
    snap.upstreams.values().filter(|u| u.peers.iter().any(|p| p.addr == addr)).map(|u| u.keepalive.idle_timeout).max()
}
