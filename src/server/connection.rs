//! One client connection: TLS (when the listener has it), then HTTP/1.1 or
//! HTTP/2 (by ALPN, or by the prior-knowledge preface on cleartext), each
//! request handed to the pipeline. On shutdown the connection is told to
//! finish gracefully (HTTP/2 GOAWAY, HTTP/1.1 close after the current
//! response).
//!
//! Memory: an idle HTTP/1.1 keep-alive connection holds no hyper connection.
//! hyper keeps its buffers (8 KiB read, 8 KiB write), the in-flight request
//! slot and the last response's header map for the life of a connection, and
//! has no setting to release them between requests. So once hyper waits for
//! the next request head with nothing left to write (and has for
//! `IDLE_LINGER`), `serve_conn` takes the socket back (`into_parts`) and
//! drops the rest; it waits for the client's next bytes itself (with the
//! header-read deadline hyper had), and builds a new hyper connection for
//! them. See benches/NOTES.md, section 4.
//!
//! Deadlines (docs/security.md): the first request head must be complete
//! within `header_read_timeout` of the accept (of the TLS handshake's end);
//! between requests a connection waits `keepalive_timeout` for the next
//! one's first byte, and its head then gets `header_read_timeout`; a write
//! the client does not take for `send_timeout` ends the connection. HTTP/2
//! connections have their own (`super::h2`). A connection waiting for a
//! request is idle: the worker may shed it ([`Tracker::shed`]) to make room.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::config::snapshot::{Limits, Listener};
use crate::limit::fds::Fd;
use crate::phase::body::ResponseBody;
use crate::phase::pipeline::{self, ConnInfo, Worker};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts a worker's open connections, so shutdown can wait for them, and
/// knows which are idle (waiting for a request), so that the newest of
/// those can be shed when the worker or the process runs short.
#[derive(Default)]
pub struct Tracker {
    open: Cell<usize>,
    drained: Notify,
    /// Idle connections by the order they became idle, each with the waker
    /// of its task once polled; a shed connection's entry is taken away.
    idle: RefCell<BTreeMap<u64, Option<Waker>>>,
    next_idle: Cell<u64>,
}

/// A connection counted by its worker's [`Tracker`] and in the process's
/// descriptor budget.
pub struct Entered {
    tracker: Rc<Tracker>,
    _fd: Fd,
}

impl Tracker {
    pub fn enter(self: &Rc<Self>) -> Entered {
        self.open.set(self.open.get() + 1);
        Entered { tracker: Rc::clone(self), _fd: Fd::open() }
    }

    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Resolves when no connection is open.
    pub async fn drained(&self) {
        while self.open.get() > 0 {
            self.drained.notified().await;
        }
    }

    /// Closes up to `n` idle connections, the ones idle for the shortest time
    /// first (a flood of connections that send nothing sheds itself, not the
    /// established clients between two requests); returns how many.
    pub fn shed(&self, n: usize) -> usize {
        let mut wakers = Vec::new();
        let mut shed = 0;
        {
            let mut idle = self.idle.borrow_mut();
            while shed < n {
                let Some((_, waker)) = idle.pop_last() else { break };
                wakers.extend(waker);
                shed += 1;
            }
        }
        wakers.into_iter().for_each(Waker::wake);
        shed
    }

    /// Connections idle now.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    /// A wait that counts the caller's connection as idle from its first
    /// poll until it is dropped, and resolves if the connection is shed.
    pub(super) fn idle_wait(&self) -> IdleWait<'_> {
        IdleWait { tracker: self, seq: UNREGISTERED }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let t = &self.tracker;
        t.open.set(t.open.get() - 1);
        if t.open.get() == 0 {
            t.drained.notify_waiters();
        }
    }
}

/// A connection's place among its worker's idle ones (see [`Tracker::idle_wait`]).
pub(super) struct IdleWait<'a> {
    tracker: &'a Tracker,
    /// Its key in the tracker's idle map, from its first poll ([`UNREGISTERED`] before).
    seq: u64,
}

const UNREGISTERED: u64 = u64::MAX;

impl Future for IdleWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut idle = this.tracker.idle.borrow_mut();
        if this.seq == UNREGISTERED {
            this.seq = this.tracker.next_idle.get();
            this.tracker.next_idle.set(this.seq + 1);
            idle.insert(this.seq, None);
        }
        match idle.get_mut(&this.seq) {
            None => Poll::Ready(()),
            Some(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        if self.seq != UNREGISTERED {
            self.tracker.idle.borrow_mut().remove(&self.seq);
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Auto,
    Http1,
    Http2,
}

/// The connection's task. The setup is done here, so that the task holds no
/// more than the connection needs (an idle HTTP/1.1 connection's task is a
/// few hundred bytes; TLS and HTTP/2 connections are boxed in it).
pub fn serve(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<Listener>,
    limits: Arc<Limits>,
    worker: Rc<Worker>,
    entered: Entered,
    stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> {
    if listener.tls.is_some() {
        return Either::Left(Box::pin(serve_tls(stream, client, listener, limits, worker, entered, stop)));
    }
    let mode = match (listener.http1, listener.h2c) {
        (true, false) => Mode::Http1,
        (false, true) => Mode::Http2,
        _ => Mode::Auto,
    };
    let info = Rc::new(ConnInfo::new(client, listener, false));
    let service = service(Rc::clone(&info), worker);
    let io = Io::new(stream, limits);
    Either::Right(serve_conn(Conn { io, service, info, stop, _entered: entered }, mode))
}

async fn serve_tls(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<Listener>,
    limits: Arc<Limits>,
    worker: Rc<Worker>,
    entered: Entered,
    stop: watch::Receiver<bool>,
) {
    let Some(tls) = listener.tls.clone() else { return };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls_stream = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "TLS handshake timed out");
            return;
        }
    };
    let mode = if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") { Mode::Http2 } else { Mode::Http1 };
    let info = Rc::new(ConnInfo::new(client, listener, true));
    let service = service(Rc::clone(&info), worker);
    let io = Io::new(tls_stream, limits);
    serve_conn(Conn { io, service, info, stop, _entered: entered }, mode).await
}

/// The pipeline as the connection's hyper service.
fn service(
    info: Rc<ConnInfo>,
    worker: Rc<Worker>,
) -> impl Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible, Future: 'static> + 'static {
    service_fn(move |req| pipeline::handle(req, Rc::clone(&info), Rc::clone(&worker)))
}

/// What a connection's task holds. [`serve_conn`] uses it in place (moving
/// `io` and `service` into a hyper connection and back), so that the task's
/// state has one copy of each.
struct Conn<I, S> {
    io: Io<I>,
    service: S,
    /// Where a request that upgraded the connection leaves its WebSocket tunnel.
    info: Rc<ConnInfo>,
    stop: watch::Receiver<bool>,
    _entered: Entered,
}

/// Serves HTTP/1.1 on a connection, holding a hyper connection only while
/// there is a request to read or serve (see the module doc); HTTP/2 is left
/// to hyper.
// Not an `async fn`: its future would hold `c` twice (the argument, and the
// local it is moved into).
#[allow(clippy::manual_async_fn)]
fn serve_conn<I, S>(mut c: Conn<I, S>, mode: Mode) -> impl Future<Output = ()>
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible> + 'static,
    S::Future: 'static,
{
    async move {
        // An async block takes only the fields of `c` it uses: this one keeps
        // the connection counted (for a graceful shutdown) until its task ends.
        let tracker = &*c._entered.tracker;
        let mut watching = !*c.stop.borrow();
        // True when a shutdown had begun before the connection started.
        let mut graceful = !watching;
        // Cleartext HTTP/1.1 or h2c, told apart as hyper-util's auto server
        // does: by whether the first bytes are the HTTP/2 preface.
        let mut detecting = matches!(mode, Mode::Auto);
        // The deadline of the wait for the next request head: the first
        // request's head is due within header_read_timeout of the accept
        // (whichever protocol it turns out to be).
        let mut deadline = match mode {
            Mode::Http2 => return ended(Box::pin(super::h2::serve(c.io, c.service, c.stop, tracker)).await),
            Mode::Http1 | Mode::Auto => Instant::now() + c.io.limits.header_read_timeout,
        };
        // The wait is between two requests, no byte of the next one seen: its
        // deadline is keepalive_timeout's, and the first byte gives the head
        // header_read_timeout from then.
        let mut between = false;
        // Which wait for a request head (counted from 1 in each hyper
        // connection) may be the one to give the connection up at.
        let mut first_idle_wait = 1;
        loop {
            while c.io.prefix.is_none() || detecting {
                // Idle, between requests: hyper would now close the connection
                // (and shut the socket down) on a graceful shutdown, at the
                // header-read deadline, at the end of the stream and on a read
                // error; else it reads the next request.
                if graceful {
                    return ended(if detecting { Err(cancelled()) } else { shutdown(&mut c.io).await });
                }
                // Waiting with no byte in hand, the connection is idle (the
                // worker may shed it) once a read found nothing: bytes that are
                // there already (a new connection's request usually is) are
                // taken first.
                let mut idle = c.io.prefix.is_none().then(|| tracker.idle_wait());
                let expired = tokio::time::sleep_until(deadline.into());
                tokio::pin!(expired);
                let woke = loop {
                    tokio::select! {
                        biased;
                        read = poll_fn(|cx| c.io.poll_read_idle(cx)) => break Woke::Read(read),
                        () = &mut expired => break Woke::Closing,
                        () = shed_of(idle.as_mut()) => break Woke::Closing,
                        changed = c.stop.changed(), if watching => {
                            watching = false;
                            if changed.is_ok() {
                                graceful = true;
                                break Woke::Stopping;
                            }
                        }
                    }
                };
                drop(idle);
                let read = match woke {
                    Woke::Read(read) => read,
                    Woke::Stopping => continue,
                    Woke::Closing => return ended(shutdown(&mut c.io).await),
                };
                if between && read.as_ref().is_ok_and(|b| !b.is_empty()) {
                    between = false;
                    deadline = Instant::now() + c.io.limits.header_read_timeout;
                }
                if detecting {
                    match read {
                        Ok(bytes) => {
                            let end = bytes.is_empty();
                            let seen = match c.io.prefix.take() {
                                Some(prefix) => [&prefix[..], &bytes[..]].concat().into(),
                                None => bytes,
                            };
                            let n = seen.len().min(H2_PREFACE.len());
                            if seen[..n] == H2_PREFACE[..n] && n == H2_PREFACE.len() {
                                c.io.prefix = Some(seen);
                                return ended(Box::pin(super::h2::serve(c.io, c.service, c.stop, tracker)).await);
                            }
                            // The end of the stream or other bytes than the
                            // preface's: HTTP/1.1 (and hyper sees the end).
                            detecting = !end && seen[..n] == H2_PREFACE[..n];
                            c.io.prefix = (!seen.is_empty()).then_some(seen);
                            if !detecting && c.io.prefix.is_none() {
                                return ended(shutdown(&mut c.io).await);
                            }
                        }
                        Err(e) => return ended(Err(e.into())),
                    }
                    continue;
                }
                match read {
                    Ok(bytes) if !bytes.is_empty() => c.io.prefix = Some(bytes),
                    _ => return ended(shutdown(&mut c.io).await),
                }
            }
            let watch = Arc::new(Watch::new(deadline, &c.io.limits));
            c.io.watch = Some(Arc::clone(&watch));
            // Boxed, so that the task of an idle connection is small.
            let mut builder = http1::Builder::new();
            builder
                .timer(HeadTimer(Arc::clone(&watch)))
                .header_read_timeout(c.io.limits.header_read_timeout)
                .max_buf_size(c.io.limits.max_header_size.max(8192))
                .keep_alive(true);
            // hyper's own cap is 100, kept on the stack; another one is allocated per head.
            if c.io.limits.max_headers != 100 {
                builder.max_headers(c.io.limits.max_headers);
            }
            let mut conn = Box::new(builder.serve_connection(c.io, c.service));
            if graceful {
                Pin::new(&mut *conn).graceful_shutdown();
            }
            loop {
                tokio::select! {
                    ended_ = poll_fn(|cx| match Pin::new(&mut *conn).poll(cx) {
                        Poll::Ready(res) => Poll::Ready(Some(res)),
                        Poll::Pending if !graceful && watch.idle(first_idle_wait) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }) => match ended_ {
                        // hyper wrote a 101 and stopped: the socket is the tunnel's (phase::upgrade).
                        Some(Ok(())) if c.info.has_tunnel() => {
                            let Some(tunnel) = c.info.take_tunnel() else { return };
                            let parts = conn.into_parts();
                            let early = match parts.io.prefix {
                                Some(rest) => [&parts.read_buf[..], &rest[..]].concat().into(),
                                None => parts.read_buf,
                            };
                            return tunnel.run(parts.io.inner.into_inner(), early).await;
                        }
                        Some(res) => return ended(res.map_err(Into::into)),
                        None => break,
                    },
                    changed = c.stop.changed(), if watching => {
                        watching = false;
                        if changed.is_ok() {
                            graceful = true;
                            Pin::new(&mut *conn).graceful_shutdown();
                        }
                    }
                }
            }
            // hyper waits for a request head, has written and flushed all it
            // had, and its last read found nothing: it holds nothing else of
            // the connection's than the socket and (rarely) part of a request
            // head. (Before `into_parts`, which drops hyper's timer and so
            // ends the wait.)
            (deadline, between) = {
                let head = watch.head();
                (head.deadline.unwrap_or_else(|| Instant::now() + watch.keepalive_timeout), head.between)
            };
            let parts = conn.into_parts();
            c.io = parts.io;
            c.io.watch = None;
            c.io.idle();
            c.service = parts.service;
            first_idle_wait = 1;
            if !parts.read_buf.is_empty() {
                // Part of the next request head: hand it to a new hyper
                // connection at once, and keep that one until it has read
                // the head.
                c.io.prefix = Some(parts.read_buf);
                first_idle_wait = 2;
            }
        }
    }
}

/// What ended an idle connection's wait.
enum Woke {
    Read(io::Result<Bytes>),
    /// Its deadline passed, or the worker shed it.
    Closing,
    /// A graceful shutdown began.
    Stopping,
}

/// Resolves when the worker sheds the connection waiting on `idle` (never without one).
pub(super) async fn shed_of(idle: Option<&mut IdleWait<'_>>) {
    match idle {
        Some(idle) => idle.await,
        None => std::future::pending().await,
    }
}

pub(super) fn ended(res: Result<(), BoxError>) {
    if let Err(e) = res {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// What hyper-util's auto server ends a connection with when it is shut
/// down before the HTTP version is known.
fn cancelled() -> BoxError {
    io::Error::new(io::ErrorKind::Interrupted, "Cancelled").into()
}

/// HTTP/2 connection preface, which a prior-knowledge h2c client sends first.
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Shuts the socket down, as hyper does when it closes a connection.
async fn shutdown<I>(io: &mut Io<I>) -> Result<(), BoxError>
where
    I: AsyncWrite + Unpin,
{
    poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await.map_err(Into::into)
}

/// How long an HTTP/1.1 connection waits for the next request before it
/// gives up its hyper connection. Rebuilding one costs some 11k instructions
/// (allocating its buffers again, mostly): a client that sends its requests
/// back to back never pays it, an idle one gives 20 KiB back soon.
const IDLE_LINGER: Duration = Duration::from_millis(100);

/// Size of the stack buffer of a read while idle.
const IDLE_READ: usize = 4096;

/// The client's stream as hyper's IO: bytes read before the hyper connection
/// existed are handed to it first, what an HTTP/1.1 connection does on the
/// socket is noted in its [`Watch`], and a write that cannot go out for
/// `send_timeout` fails (nginx's `send_timeout`: the time between two writes
/// that make progress, not the whole response).
pub(super) struct Io<I> {
    inner: TokioIo<I>,
    prefix: Option<Bytes>,
    watch: Option<Arc<Watch>>,
    /// The connection's limits (its listener's snapshot's).
    limits: Arc<Limits>,
    /// Armed while a write waits for the socket; kept for the next wait
    /// while the connection serves, dropped when it goes idle.
    send_wait: Option<Pin<Box<SendWait>>>,
}

pin_project_lite::pin_project! {
    /// The send timer, and whether the last write (or flush) could not go out.
    struct SendWait {
        #[pin]
        sleep: tokio::time::Sleep,
        blocked: bool,
    }
}

impl<I> Io<I> {
    pub(super) fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    fn new(inner: I, limits: Arc<Limits>) -> Self {
        Self { inner: TokioIo::new(inner), prefix: None, watch: None, limits, send_wait: None }
    }

    /// The connection waits for a request: nothing is being written.
    fn idle(&mut self) {
        self.send_wait = None;
    }

    /// `res` of a write or flush, failed with TimedOut once writes have made
    /// no progress for `send_timeout`.
    fn send_progress<T>(&mut self, res: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if res.is_ready() {
            if let Some(wait) = &mut self.send_wait {
                *wait.as_mut().project().blocked = false;
            }
            return res;
        }
        let at = tokio::time::Instant::now() + self.limits.send_timeout;
        let wait = self
            .send_wait
            .get_or_insert_with(|| Box::pin(SendWait { sleep: tokio::time::sleep_until(at), blocked: false }));
        let mut wait = wait.as_mut().project();
        if !*wait.blocked {
            *wait.blocked = true;
            wait.sleep.as_mut().reset(at);
        }
        if wait.sleep.poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client took nothing within send_timeout",
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> Io<I> {
    /// A read into a buffer on the stack, so that nothing is allocated while
    /// nothing arrives; the bytes read are copied out.
    fn poll_read_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let mut storage = [MaybeUninit::<u8>::uninit(); IDLE_READ];
        let mut buf = ReadBuf::uninit(&mut storage);
        ready!(Pin::new(self.inner.inner_mut()).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(Bytes::copy_from_slice(buf.filled())))
    }
}

impl<I: AsyncRead + Unpin> Read for Io<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = &mut this.prefix {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix[..n]);
            prefix.advance(n);
            if prefix.is_empty() {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(w) = &this.watch {
            w.read_blocked.store(res.is_pending(), Ordering::Relaxed);
            // Bytes (or the end of the stream) in a wait between requests.
            if res.is_ready() && w.between.load(Ordering::Relaxed) {
                w.first_byte();
            }
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> Write for Io<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.send_progress(res, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.send_progress(res, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        if let (Poll::Ready(Ok(())), Some(w)) = (&res, &this.watch) {
            w.unflushed.store(false, Ordering::Relaxed);
        }
        this.send_progress(res, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.send_progress(res, cx)
    }
}

impl<I> Io<I> {
    fn wrote(&self) {
        if let Some(w) = &self.watch {
            w.unflushed.store(true, Ordering::Relaxed);
        }
    }
}

/// What tells [`serve_conn`] that its hyper connection is idle between two
/// requests, shared with the connection's IO and timer. hyper arms its
/// header-read timer exactly when it starts waiting for a request head, both
/// reading and writing being done with the previous exchange, and drops it
/// once the head is read: the timer being armed, all writes flushed and the
/// last read having found nothing, hyper has nothing in hand but the socket
/// and its read buffer. The connection is given up once such a wait has
/// lasted [`IDLE_LINGER`].
///
/// It also keeps the deadlines of those waits: the first continues the wait
/// `serve_conn` began (`carried`); a later one, between two requests, lasts
/// `keepalive_timeout` until a byte of the next request arrives, then
/// `header_read_timeout` from that byte.
struct Watch {
    head: Mutex<HeadWait>,
    /// Something was written since the last successful flush.
    unflushed: AtomicBool,
    /// The last read from the socket found nothing to read.
    read_blocked: AtomicBool,
    /// The current wait is between requests and has seen no byte (a copy of
    /// `HeadWait::between`, read on every read without the lock).
    between: AtomicBool,
    /// The current wait's deadline moved (its first byte came).
    moved: AtomicBool,
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
}

struct HeadWait {
    /// Waits for a request head begun by this hyper connection.
    waits: u32,
    /// The current wait's deadline; None when hyper waits for no head.
    deadline: Option<Instant>,
    /// The current wait has lasted [`IDLE_LINGER`].
    lingered: bool,
    /// The deadline of the wait this connection continues: it bounds its
    /// first wait.
    carried: Option<Instant>,
    /// The current wait is between two requests and no byte of the next has come.
    between: bool,
}

impl Watch {
    fn new(carried: Instant, limits: &Limits) -> Self {
        Self {
            head: Mutex::new(HeadWait {
                waits: 0,
                deadline: None,
                lingered: false,
                carried: Some(carried),
                between: false,
            }),
            unflushed: AtomicBool::new(false),
            read_blocked: AtomicBool::new(false),
            between: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            header_read_timeout: limits.header_read_timeout,
            keepalive_timeout: limits.keepalive_timeout,
        }
    }

    /// The first byte of a request came in a wait between requests: its head
    /// has `header_read_timeout` from now.
    fn first_byte(&self) {
        self.between.store(false, Ordering::Relaxed);
        let mut head = self.head();
        if head.between && head.deadline.is_some() {
            head.between = false;
            head.deadline = Some(Instant::now() + self.header_read_timeout);
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    fn head(&self) -> MutexGuard<'_, HeadWait> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle(&self, first_wait: u32) -> bool {
        if self.unflushed.load(Ordering::Relaxed) || !self.read_blocked.load(Ordering::Relaxed) {
            return false;
        }
        let head = self.head();
        head.deadline.is_some() && head.lingered && head.waits >= first_wait
    }
}

/// hyper's timer for an HTTP/1.1 connection; it only serves the header-read
/// timeout.
struct HeadTimer(Arc<Watch>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let (deadline, wait) = {
            let mut head = self.0.head();
            head.waits += 1;
            let (deadline, between) = match head.carried.take() {
                Some(carried) => (carried.min(deadline), false),
                None if head.waits == 1 => (deadline, false),
                // Waiting for the next request on a kept-alive connection.
                None => (Instant::now() + self.0.keepalive_timeout, true),
            };
            head.deadline = Some(deadline);
            head.lingered = false;
            head.between = between;
            self.0.between.store(between, Ordering::Relaxed);
            self.0.moved.store(false, Ordering::Relaxed);
            (deadline, head.waits)
        };
        let linger = (Instant::now() + IDLE_LINGER).min(deadline);
        Box::pin(HeadSleep {
            sleep: tokio::time::sleep_until(linger.into()),
            deadline: (linger < deadline).then_some(deadline),
            guard: HeadGuard { watch: Arc::clone(&self.0), wait },
        })
    }
}

pin_project_lite::pin_project! {
    /// Fires at the header-read deadline; on the way, at the end of the
    /// linger, notes it in the [`Watch`] (which wakes the connection's task).
    struct HeadSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        // The header-read deadline, while the sleep is set to the end of the linger.
        deadline: Option<Instant>,
        guard: HeadGuard,
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.guard.watch.moved.swap(false, Ordering::Relaxed) {
            let head = this.guard.watch.head();
            if let (true, Some(moved)) = (head.waits == this.guard.wait, head.deadline) {
                drop(head);
                if this.deadline.is_some() && moved > this.sleep.deadline().into_std() {
                    // Still lingering: the linger ends first.
                    *this.deadline = Some(moved);
                } else {
                    *this.deadline = None;
                    this.sleep.as_mut().reset(moved.into());
                }
            }
        }
        if let Some(deadline) = *this.deadline {
            ready!(this.sleep.as_mut().poll(cx));
            *this.deadline = None;
            let mut head = this.guard.watch.head();
            if head.waits == this.guard.wait {
                head.lingered = true;
            }
            drop(head);
            this.sleep.as_mut().reset(deadline.into());
        }
        this.sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// Ends the wait for a request head when hyper drops its timer.
struct HeadGuard {
    watch: Arc<Watch>,
    wait: u32,
}

impl Drop for HeadGuard {
    fn drop(&mut self) {
        let mut head = self.watch.head();
        if head.waits == self.wait {
            head.deadline = None;
            head.between = false;
            self.watch.between.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once: true when the connection was shed.
    fn shed_now(wait: &mut IdleWait<'_>) -> bool {
        Pin::new(wait).poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[test]
    fn the_newest_idle_connections_are_shed_first() {
        let tracker = Tracker::default();
        let (mut oldest, mut middle, mut newest) = (tracker.idle_wait(), tracker.idle_wait(), tracker.idle_wait());
        // Idle from the first poll.
        assert_eq!(tracker.idle_count(), 0);
        assert!(!shed_now(&mut oldest) && !shed_now(&mut middle) && !shed_now(&mut newest));
        assert_eq!(tracker.idle_count(), 3);
        assert_eq!(tracker.shed(2), 2);
        assert!(shed_now(&mut newest) && shed_now(&mut middle) && !shed_now(&mut oldest));
        assert_eq!(tracker.idle_count(), 1);
        drop((middle, newest));
        // A connection that stopped being idle is not shed.
        drop(oldest);
        assert_eq!(tracker.shed(1), 0);
        let mut again = tracker.idle_wait();
        assert!(!shed_now(&mut again));
        assert_eq!(tracker.shed(5), 1);
        assert!(shed_now(&mut again));
    }
}
