//! A worker's upstream connections, as nginx keeps them: per peer, a list of
//! idle HTTP/1.1 connections (bounded by `keepalive.max_idle`, closed after
//! `keepalive.idle_timeout`) and one multiplexed HTTP/2 connection. Pools are
//! keyed by peer address, not by snapshot, so they survive reloads.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{Keepalive, Protocol};
use crate::error::ProxyError;
use crate::phase::body::UpstreamBody;
use crate::server::LocalExec;

pub enum Conn {
    /// An HTTP/1.1 connection, and for how long it sat idle if it was kept
    /// alive from an earlier request.
    H1(http1::SendRequest<UpstreamBody>, Option<Duration>),
    H2(http2::SendRequest<UpstreamBody>),
}

#[derive(Default)]
struct PeerPool {
    idle: VecDeque<(http1::SendRequest<UpstreamBody>, Instant)>,
    h2: Option<http2::SendRequest<UpstreamBody>>,
}

/// Counters for reuse measurements (per worker).
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolStats {
    pub connects: u64,
    pub reuses: u64,
}

#[derive(Default)]
pub struct Pool {
    peers: RefCell<HashMap<SocketAddr, PeerPool>>,
    stats: RefCell<PoolStats>,
}

impl Pool {
    pub fn stats(&self) -> PoolStats {
        *self.stats.borrow()
    }

    /// A connection to `peer` ready for one request: an idle or shared one if
    /// there is one, else a new one (bounded by `connect_timeout`).
    pub async fn checkout(
        self: &Rc<Self>,
        peer: SocketAddr,
        protocol: Protocol,
        keepalive: Keepalive,
        connect_timeout: Duration,
    ) -> Result<Conn, ProxyError> {
        if let Some(conn) = self.take_idle(peer, protocol, keepalive) {
            self.stats.borrow_mut().reuses += 1;
            return Ok(conn);
        }
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(peer)).await {
            Err(_) => return Err(ProxyError::ConnectTimeout { peer, after: connect_timeout }),
            Ok(Err(source)) => return Err(ProxyError::Connect { peer, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        self.stats.borrow_mut().connects += 1;
        let io = TokioIo::new(stream);
        let connect_err = |e: hyper::Error| ProxyError::Upstream { peer, source: e };
        match protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(connect_err)?;
                tokio::task::spawn_local(async move {
                    // A 101 hands the socket to the response's upgrade (a WebSocket tunnel).
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(%peer, error = %e, "upstream connection ended");
                    }
                });
                Ok(Conn::H1(sender, None))
            }
            Protocol::H2c => {
                let (sender, conn) = http2::Builder::new(LocalExec)
                    .timer(TokioTimer::new())
                    .adaptive_window(true)
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(connect_err)?;
                tokio::task::spawn_local(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "upstream h2 connection ended");
                    }
                });
                self.peers.borrow_mut().entry(peer).or_default().h2 = Some(sender.clone());
                Ok(Conn::H2(sender))
            }
        }
    }

    fn take_idle(&self, peer: SocketAddr, protocol: Protocol, keepalive: Keepalive) -> Option<Conn> {
        let mut peers = self.peers.borrow_mut();
        let pool = peers.get_mut(&peer)?;
        match protocol {
            Protocol::H2c => {
                let h2 = pool.h2.as_ref()?;
                if h2.is_closed() {
                    pool.h2 = None;
                    return None;
                }
                Some(Conn::H2(h2.clone()))
            }
            Protocol::Http1 => {
                // Most recently used first: it is the least likely to have been closed by the peer.
                while let Some((sender, since)) = pool.idle.pop_back() {
                    let idle = since.elapsed();
                    if sender.is_ready() && idle < keepalive.idle_timeout {
                        return Some(Conn::H1(sender, Some(idle)));
                    }
                }
                None
            }
        }
    }

    /// Give an HTTP/1.1 connection back once its response has been read to the
    /// end (hyper reports it ready again then); dropped if the pool is full.
    pub fn checkin_when_ready(
        self: &Rc<Self>,
        peer: SocketAddr,
        mut sender: http1::SendRequest<UpstreamBody>,
        keepalive: Keepalive,
    ) {
        if keepalive.max_idle == 0 {
            return;
        }
        let pool = Rc::clone(self);
        tokio::task::spawn_local(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut peers = pool.peers.borrow_mut();
            let idle = &mut peers.entry(peer).or_default().idle;
            if idle.len() < keepalive.max_idle {
                idle.push_back((sender, Instant::now()));
            }
        });
    }

    /// Close idle connections older than `max_age` and forget peers no longer
    /// configured (`keep` says which are).
    pub fn sweep(&self, max_age: impl Fn(SocketAddr) -> Option<Duration>) {
        self.peers.borrow_mut().retain(|addr, pool| match max_age(*addr) {
            None => false,
            Some(age) => {
                pool.idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < age);
                if pool.h2.as_ref().is_some_and(|h| h.is_closed()) {
                    pool.h2 = None;
                }
                !pool.idle.is_empty() || pool.h2.is_some()
            }
        });
    }

    pub fn idle_count(&self, peer: SocketAddr) -> usize {
        self.peers.borrow().get(&peer).map_or(0, |p| p.idle.len())
    }
}
