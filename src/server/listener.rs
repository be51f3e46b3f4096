//! Listening sockets: each worker binds its own socket per address with
//! SO_REUSEPORT, so the kernel spreads new connections across workers.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::connection;
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
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                let task = connection::serve(stream, client, local, Rc::clone(&worker), conns.enter(), stop.clone());
                tokio::task::spawn_local(task);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
