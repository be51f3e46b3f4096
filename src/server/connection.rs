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

use std::cell::Cell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::LocalExec;
use crate::config::reload;
use crate::config::snapshot::{Limits, Listener};
use crate::phase::body::ResponseBody;
use crate::phase::pipeline::{self, ConnInfo, Worker};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts a worker's open connections, so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    open: Cell<usize>,
    idle: Notify,
}

pub struct Entered(Rc<Tracker>);

impl Tracker {
    pub fn enter(self: &Rc<Self>) -> Entered {
        self.open.set(self.open.get() + 1);
        Entered(Rc::clone(self))
    }

    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Resolves when no connection is open.
    pub async fn drained(&self) {
        while self.open.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let t = &self.0;
        t.open.set(t.open.get() - 1);
        if t.open.get() == 0 {
            t.idle.notify_waiters();
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
    local: SocketAddr,
    worker: Rc<Worker>,
    entered: Entered,
    stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> {
    let found = {
        let snap = reload::current();
        snap.listener(local).map(|l| (l.clone(), snap.limits.clone()))
    };
    let Some((listener, limits)) = found else {
        // The listener was removed by a reload.
        return Either::Left(Box::pin(std::future::ready(())) as Pin<Box<dyn Future<Output = ()>>>);
    };
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
    Either::Right(serve_conn(Conn { io: Io::new(stream, None), service, info, limits, stop, _entered: entered }, mode))
}

async fn serve_tls(
    stream: TcpStream,
    client: SocketAddr,
    listener: Arc<Listener>,
    limits: Limits,
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
    serve_conn(Conn { io: Io::new(tls_stream, None), service, info, limits, stop, _entered: entered }, mode).await
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
    limits: Limits,
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
        // An async block takes only the fields of `c` it uses: this keeps the
        // connection counted (for a graceful shutdown) until its task ends.
        let _entered = &c._entered;
        let mut watching = !*c.stop.borrow();
        // True when a shutdown had begun before the connection started.
        let mut graceful = !watching;
        // Cleartext HTTP/1.1 or h2c, told apart as hyper-util's auto server
        // does: by whether the first bytes are the HTTP/2 preface.
        let mut detecting = matches!(mode, Mode::Auto);
        // The deadline of the wait for the next request head: hyper's
        // header-read timer would start now, with the connection; the auto
        // server sets none until the version is known.
        let mut deadline = match mode {
            Mode::Http2 => return ended(Box::pin(serve_h2(c.io, c.service, &c.limits, c.stop)).await),
            Mode::Http1 => Some(Instant::now() + c.limits.header_read_timeout),
            Mode::Auto => None,
        };
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
                let expired = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(expired);
                let read = loop {
                    tokio::select! {
                        read = poll_fn(|cx| c.io.poll_read_idle(cx)) => break Some(read),
                        () = &mut expired => break None,
                        changed = c.stop.changed(), if watching => {
                            watching = false;
                            if changed.is_ok() {
                                graceful = true;
                                break None;
                            }
                        }
                    }
                };
                if detecting {
                    match read {
                        Some(Ok(bytes)) => {
                            let end = bytes.is_empty();
                            let seen = match c.io.prefix.take() {
                                Some(prefix) => [&prefix[..], &bytes[..]].concat().into(),
                                None => bytes,
                            };
                            let n = seen.len().min(H2_PREFACE.len());
                            if seen[..n] == H2_PREFACE[..n] && n == H2_PREFACE.len() {
                                c.io.prefix = Some(seen);
                                return ended(Box::pin(serve_h2(c.io, c.service, &c.limits, c.stop)).await);
                            }
                            // The end of the stream or other bytes than the
                            // preface's: HTTP/1.1 (and hyper sees the end).
                            detecting = !end && seen[..n] == H2_PREFACE[..n];
                            c.io.prefix = (!seen.is_empty()).then_some(seen);
                            if !detecting && c.io.prefix.is_none() {
                                return ended(shutdown(&mut c.io).await);
                            }
                        }
                        Some(Err(e)) => return ended(Err(e.into())),
                        None => {} // cancelled (graceful): see above
                    }
                    continue;
                }
                match read {
                    Some(Ok(bytes)) if !bytes.is_empty() => c.io.prefix = Some(bytes),
                    _ => return ended(shutdown(&mut c.io).await),
                }
            }
            let watch = Arc::new(Watch::new(deadline));
            c.io.watch = Some(Arc::clone(&watch));
            // Boxed, so that the task of an idle connection is small.
            let mut builder = http1::Builder::new();
            builder
                .timer(HeadTimer(Arc::clone(&watch)))
                .header_read_timeout(c.limits.header_read_timeout)
                .max_buf_size(c.limits.max_header_size.max(8192))
                .keep_alive(true);
            // hyper's own cap is 100, kept on the stack; another one is allocated per head.
            if c.limits.max_headers != 100 {
                builder.max_headers(c.limits.max_headers);
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
            deadline = watch.head().deadline;
            let parts = conn.into_parts();
            c.io = parts.io;
            c.io.watch = None;
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

/// The pipeline's future of one HTTP/2 stream.
type StreamFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>>>>;

fn ended(res: Result<(), BoxError>) {
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
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn serve_h2<I, S>(io: Io<I>, service: S, limits: &Limits, mut stop: watch::Receiver<bool>) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible> + 'static,
    S::Future: 'static,
{
    // hyper spawns a task per stream that holds the service's future: boxed, what the
    // spawn moves is a pointer, not the pipeline's ~4 KB state (several copies per stream).
    let service = service_fn(move |req| -> StreamFuture { Box::pin(service.call(req)) });
    let mut conn = Box::pin(
        http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .adaptive_window(true)
            .max_concurrent_streams(1024)
            // RFC 8441: WebSocket over HTTP/2 (routes decide whether they allow it).
            .enable_connect_protocol()
            .serve_connection(io, service),
    );
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => return res.map_err(Into::into),
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

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
/// existed are handed to it first, and what an HTTP/1.1 connection does on
/// the socket is noted in its [`Watch`].
struct Io<I> {
    inner: TokioIo<I>,
    prefix: Option<Bytes>,
    watch: Option<Arc<Watch>>,
}

impl<I> Io<I> {
    fn new(inner: I, prefix: Option<Bytes>) -> Self {
        Self { inner: TokioIo::new(inner), prefix, watch: None }
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
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> Write for Io<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote();
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote();
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
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
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
struct Watch {
    head: Mutex<HeadWait>,
    /// Something was written since the last successful flush.
    unflushed: AtomicBool,
    /// The last read from the socket found nothing to read.
    read_blocked: AtomicBool,
}

struct HeadWait {
    /// Waits for a request head begun by this hyper connection.
    waits: u32,
    /// The current wait's deadline; None when hyper waits for no head.
    deadline: Option<Instant>,
    /// The current wait has lasted [`IDLE_LINGER`].
    lingered: bool,
    /// The deadline of the wait this connection continues, if any: it bounds
    /// its first wait.
    carried: Option<Instant>,
}

impl Watch {
    fn new(carried: Option<Instant>) -> Self {
        Self {
            head: Mutex::new(HeadWait { waits: 0, deadline: None, lingered: false, carried }),
            unflushed: AtomicBool::new(false),
            read_blocked: AtomicBool::new(false),
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
            let deadline = head.carried.take().map_or(deadline, |c| c.min(deadline));
            head.waits += 1;
            head.deadline = Some(deadline);
            head.lingered = false;
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
        }
    }
}
