//! Listening sockets: each worker binds its own socket per address with
//! SO_REUSEPORT, so the kernel spreads new connections across workers.
//!
//! Admission: a worker serves at most `limits.worker_connections` client
//! connections, and takes none that would eat into the process's descriptor
//! reserve (`limit::fds`). Past either, a new connection first sheds the
//! worker's newest idle one (see `connection::Tracker::shed`); with none to
//! shed it is closed at once, and that is logged (once a second at most).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::connection;
use crate::config::reload;
use crate::limit::fds;
use crate::phase::pipeline::Worker;

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Idle connections shed at once when accept finds no descriptor left.
const SHED_ON_EMFILE: usize = 16;

/// Accept until the task is aborted; each connection runs as its own local task.
pub async fn accept_loop(
    listener: TcpListener,
    worker: Rc<Worker>,
    conns: Rc<connection::Tracker>,
    stop: watch::Receiver<bool>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    let mut refused = Refused::default();
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let (listener, limits) = {
                    let snap = reload::current();
                    match snap.listener(local) {
                        Some(l) => (Arc::clone(l), Arc::clone(&snap.limits)),
                        // The listener was removed by a reload.
                        None => continue,
                    }
                };
                let full = conns.open() >= limits.worker_connections;
                if full || fds::near_limit() {
                    if conns.shed(1) == 0 {
                        let why = if full { "worker_connections reached" } else { "file descriptors running out" };
                        refused.note(local, why, limits.worker_connections);
                        drop(stream);
                        continue;
                    }
                    // Let the shed connection close (its descriptor with it)
                    // before the next accept: a burst would otherwise pile up
                    // shed connections not closed yet.
                    tokio::task::yield_now().await;
                }
                let _ = stream.set_nodelay(true);
                let task = connection::serve(
                    stream,
                    client,
                    listener,
                    limits,
                    Rc::clone(&worker),
                    conns.enter(),
                    stop.clone(),
                );
                tokio::task::spawn_local(task);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // Out of descriptors all the same (some not counted, or other
                // workers'): make room, and come back once the shed ones closed.
                let shed = conns.shed(SHED_ON_EMFILE);
                refused.note(local, "accept failed: too many open files", shed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => {
                // Other errors: back off instead of spinning.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connections closed at accept, logged once a second at most.
#[derive(Default)]
struct Refused {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refused {
    fn note(&mut self, local: SocketAddr, why: &'static str, n: usize) {
        self.since_log += 1;
        if self.logged.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        if why.starts_with("accept failed") {
            tracing::warn!(%local, shed_idle = n, times = self.since_log, "{why}");
        } else {
            tracing::warn!(%local, worker_connections = n, refused = self.since_log, "connection closed at once: {why}");
        }
        self.since_log = 0;
        self.logged = Some(Instant::now());
    }
}
