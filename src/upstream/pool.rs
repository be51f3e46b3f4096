//! A worker's upstream connections, as nginx keeps them: per peer, a list of
//! idle HTTP/1.1 connections (bounded by `keepalive.max_idle`, closed after
//! `keepalive.idle_timeout`) and one multiplexed HTTP/2 connection. Pools are
//! keyed by peer address, not by snapshot, so they survive reloads.
//!
//! An HTTP/1.1 connection's socket carries the send timeout (nginx's
//! `proxy_send_timeout`): a write the peer leaves waiting that long — it
//! stopped reading the request — fails, and the request with it.
//!
//! Each peer's open connections are counted: past the upstream's `max_conns`,
//! or when the process runs short of file descriptors (`limit::fds`), a
//! request waits for one of that peer's connections to come back idle or
//! close, up to `queue_timeout`, then fails with 503 (gRPC UNAVAILABLE).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

use super::{ConnLimit, Keepalive, Protocol};
use crate::error::ProxyError;
use crate::limit::fds::{self, Fd};
use crate::phase::body::UpstreamBody;
use crate::server::LocalExec;

/// The most an upstream HTTP/1.1 connection reads ahead of the client (as
/// nginx's proxy_buffers do): hyper's read buffer grows up to this (its
/// default is ~400 KiB), and each chunk it yields is no larger.
const UPSTREAM_READ_BUFFER: usize = 64 << 10;

/// The receive window of each stream on an upstream HTTP/2 connection.
const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 << 10;

pub enum Conn {
    /// An HTTP/1.1 connection, and for how long it sat idle if it was kept
    /// alive from an earlier request.
    H1(H1Conn, Option<Duration>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// An HTTP/1.1 connection: hyper's sender, and the send timeout its socket
/// applies (set for each request: a Lua balancer may change it per try).
pub struct H1Conn {
    pub sender: http1::SendRequest<UpstreamBody>,
    send_timeout: Arc<SendTimeout>,
}

#[derive(Default)]
struct PeerPool {
    idle: VecDeque<(H1Conn, Instant)>,
    h2: Option<http2::SendRequest<UpstreamBody>>,
    /// Connections open (or being opened) to the peer, idle ones included.
    open: usize,
    /// Requests waiting for a connection; told when one is idle again or closes.
    freed: Rc<Notify>,
}

/// One of a peer's open connections, counted until dropped (with the
/// connection's task).
struct Slot {
    pool: Weak<Pool>,
    peer: SocketAddr,
    _fd: Fd,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else { return };
        let peer = self.peer;
        let release = move |pool: &Pool| {
            if let Some(p) = pool.peers.borrow_mut().get_mut(&peer) {
                p.open = p.open.saturating_sub(1);
                p.freed.notify_one();
            }
        };
        // Never dropped while the pool is borrowed today; should that change,
        // the count is released a moment later instead of panicking.
        if pool.peers.try_borrow_mut().is_ok() {
            release(&pool);
        } else {
            tokio::task::spawn_local(async move { release(&pool) });
        }
    }
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
    /// there is one, else a new one (bounded by `connect_timeout`). Past
    /// `limit.max` open connections to the peer, or short of descriptors,
    /// waits for one up to `limit.queue_timeout`. An HTTP/1.1 connection
    /// fails a write that waits longer than `send_timeout`.
    pub async fn checkout(
        self: &Rc<Self>,
        peer: SocketAddr,
        protocol: Protocol,
        keepalive: Keepalive,
        limit: ConnLimit,
        connect_timeout: Duration,
        send_timeout: Duration,
    ) -> Result<Conn, ProxyError> {
        let mut queued: Option<tokio::time::Instant> = None;
        let slot = loop {
            if let Some(conn) = self.take_idle(peer, protocol, keepalive) {
                self.stats.borrow_mut().reuses += 1;
                if let Conn::H1(h1, _) = &conn {
                    h1.send_timeout.set(send_timeout);
                }
                return Ok(conn);
            }
            let why = match self.take_slot(peer, protocol, limit) {
                Ok(slot) => break slot,
                Err((why, freed)) => {
                    let deadline = *queued.get_or_insert_with(|| tokio::time::Instant::now() + limit.queue_timeout);
                    if tokio::time::timeout_at(deadline, freed.notified()).await.is_ok() {
                        continue;
                    }
                    why
                }
            };
            return Err(ProxyError::Saturated { peer, after: limit.queue_timeout, why });
        };
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(peer)).await {
            Err(_) => return Err(ProxyError::ConnectTimeout { peer, after: connect_timeout }),
            Ok(Err(source)) => return Err(ProxyError::Connect { peer, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        self.stats.borrow_mut().connects += 1;
        let connect_err = |e: hyper::Error| ProxyError::Upstream { peer, source: e };
        match protocol {
            Protocol::Http1 => {
                let send_timeout = Arc::new(SendTimeout::new(send_timeout));
                let io = TokioIo::new(SendTimed { stream, send_timeout: Arc::clone(&send_timeout), stalled: None });
                let (sender, conn) = http1::Builder::new()
                    .max_buf_size(UPSTREAM_READ_BUFFER)
                    .handshake(io)
                    .await
                    .map_err(connect_err)?;
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    // A 101 hands the socket to the response's upgrade (a WebSocket tunnel).
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(%peer, error = %e, "upstream connection ended");
                    }
                });
                Ok(Conn::H1(H1Conn { sender, send_timeout }, None))
            }
            Protocol::H2c => {
                let io = TokioIo::new(stream);
                // Fixed windows, not hyper's adaptive ones (which grow both to the
                // measured bandwidth-delay product, up to 16 MiB): a stream whose
                // client does not read holds at most its stream window here, and
                // the connection window leaves room for 64 such streams before
                // the others sharing the connection stall.
                let (sender, conn) = http2::Builder::new(LocalExec)
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(UPSTREAM_H2_STREAM_WINDOW)
                    .initial_connection_window_size(UPSTREAM_H2_STREAM_WINDOW * 64)
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(connect_err)?;
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "upstream h2 connection ended");
                    }
                });
                self.peers.borrow_mut().entry(peer).or_default().h2 = Some(sender.clone());
                Ok(Conn::H2(sender))
            }
        }
    }

    /// Counts a new connection to `peer`, or says why there is none to be had
    /// and what tells when one is freed.
    fn take_slot(
        self: &Rc<Self>,
        peer: SocketAddr,
        protocol: Protocol,
        limit: ConnLimit,
    ) -> Result<Slot, (&'static str, Rc<Notify>)> {
        let mut peers = self.peers.borrow_mut();
        let pool = peers.entry(peer).or_default();
        // An HTTP/2 peer gets one multiplexed connection: max_conns does not apply.
        let full = protocol == Protocol::Http1 && limit.max > 0 && pool.open >= limit.max;
        if full || !fds::may_connect() {
            let why = if full { "max_conns reached" } else { "file descriptors running out" };
            return Err((why, Rc::clone(&pool.freed)));
        }
        pool.open += 1;
        Ok(Slot { pool: Rc::downgrade(self), peer, _fd: Fd::open() })
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
                while let Some((conn, since)) = pool.idle.pop_back() {
                    let idle = since.elapsed();
                    if conn.sender.is_ready() && idle < keepalive.idle_timeout {
                        return Some(Conn::H1(conn, Some(idle)));
                    }
                }
                None
            }
        }
    }

    /// Give an HTTP/1.1 connection back once its response has been read to the
    /// end (hyper reports it ready again then); dropped if the pool is full.
    pub fn checkin_when_ready(self: &Rc<Self>, peer: SocketAddr, mut conn: H1Conn, keepalive: Keepalive) {
        if keepalive.max_idle == 0 {
            return;
        }
        let pool = Rc::clone(self);
        tokio::task::spawn_local(async move {
            if conn.sender.ready().await.is_err() {
                return;
            }
            let mut peers = pool.peers.borrow_mut();
            let p = peers.entry(peer).or_default();
            if p.idle.len() < keepalive.max_idle {
                p.idle.push_back((conn, Instant::now()));
                p.freed.notify_one();
            }
        });
    }

    /// Close idle connections older than `max_age` and forget peers no longer
    /// configured (`keep` says which are).
    pub fn sweep(&self, max_age: impl Fn(SocketAddr) -> Option<Duration>) {
        self.peers.borrow_mut().retain(|addr, pool| match max_age(*addr) {
            None => false,
            Some(age) => {
                pool.idle.retain(|(c, since)| !c.sender.is_closed() && since.elapsed() < age);
                if pool.h2.as_ref().is_some_and(|h| h.is_closed()) {
                    pool.h2 = None;
                }
                // A peer with connections still open keeps its count.
                !pool.idle.is_empty() || pool.h2.is_some() || pool.open > 0
            }
        });
    }

    /// Connections open to `peer` (idle, busy or being opened).
    pub fn open_count(&self, peer: SocketAddr) -> usize {
        self.peers.borrow().get(&peer).map_or(0, |p| p.open)
    }

    pub fn idle_count(&self, peer: SocketAddr) -> usize {
        self.peers.borrow().get(&peer).map_or(0, |p| p.idle.len())
    }
}

/// What a write that waited longer than the send timeout fails with; the
/// upstream call finds it among the causes of hyper's error.
#[derive(Debug, thiserror::Error)]
#[error("the peer took no request data for {0:?}")]
pub struct SendTimedOut(pub Duration);

/// The send timeout a connection's socket applies, set per request (a Lua
/// balancer may change it per try). An atomic, not a `Cell`: a socket that a
/// 101 hands to a WebSocket tunnel must be `Send`.
pub struct SendTimeout(AtomicU64);

impl SendTimeout {
    fn new(d: Duration) -> Self {
        Self(AtomicU64::new(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }

    fn set(&self, d: Duration) {
        self.0.store(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// An upstream HTTP/1.1 socket whose writes time out: once a write finds the
/// socket full (the peer reads nothing), a timer of the send timeout starts;
/// a write that goes through stops it; if it fires first, the write fails
/// with [`SendTimedOut`]. Reads pass through. No timer exists while writes go
/// through at once, so a peer that keeps up costs nothing.
struct SendTimed {
    stream: TcpStream,
    send_timeout: Arc<SendTimeout>,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl SendTimed {
    /// The result of a write attempt, with the stall timer applied.
    fn timed<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let after = self.send_timeout.get();
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, SendTimedOut(after))))
    }
}

impl AsyncRead for SendTimed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendTimed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
