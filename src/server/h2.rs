//! One HTTP/2 connection (hyper's server) within luagate's limits
//! (docs/security.md):
//!
//! - at most `http2_max_concurrent_streams` streams: h2 refuses the ones past
//!   it with RST_STREAM REFUSED_STREAM;
//! - fixed receive windows (`http2_recv_window`) bound what a client may push
//!   ahead of its upstream;
//! - the response bytes handed to h2 and not yet written to the socket are
//!   bounded per connection (`http2_send_buffer`): past it no stream's body is
//!   polled, so no upstream is read faster than the client takes;
//! - a stream that cannot send for `send_timeout` (the client gives it no
//!   window, or the connection is over its buffer) is reset (CANCEL), which
//!   drops its upstream request; the socket itself has the same timeout (`Io`);
//! - a connection without streams is closed with GOAWAY after
//!   `keepalive_timeout` (`header_read_timeout` before its first stream), and
//!   dropped if it has not finished closing [`CLOSE_GRACE`] later. While it has
//!   no stream it is idle, and the worker may shed it.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http2;
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};

use super::connection::{shed_of, BoxError, Io, Tracker};
use crate::phase::body::ResponseBody;

/// How long a connection closed for idleness (or shed) may take to finish
/// closing (the GOAWAY, the PING hyper sends with it, the final GOAWAY) before
/// it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The pipeline's future of one HTTP/2 stream.
type StreamFuture = Pin<Box<dyn Future<Output = Result<Response<H2Body>, Infallible>>>>;

/// What the connection's task, its streams' tasks and its IO share.
struct Shared {
    /// Streams the service has begun and whose task or body still exists.
    streams: Cell<usize>,
    /// A stream has been opened.
    used: Cell<bool>,
    /// Since when no stream has been open (the connection's start before the first).
    idle_since: Cell<Instant>,
    /// Told when the last stream ends.
    quiet: Notify,
    /// The stream whose task the executor spawns next: hyper calls the
    /// service, then at once spawns the stream's task.
    next: Cell<Option<Rc<Stream>>>,
    /// Response bytes handed to h2 and not yet written to the socket
    /// (estimated: every byte written counts, frame headers included).
    unsent: Cell<usize>,
    send_buffer: usize,
    send_timeout: Duration,
    /// Bodies waiting for `unsent` to fall under `send_buffer`.
    blocked: RefCell<Vec<Waker>>,
}

impl Shared {
    fn over_budget(&self) -> bool {
        self.unsent.get() >= self.send_buffer
    }

    fn wrote(&self, n: usize) {
        self.unsent.set(self.unsent.get().saturating_sub(n));
        if !self.over_budget() && !self.blocked.borrow().is_empty() {
            let wakers = std::mem::take(&mut *self.blocked.borrow_mut());
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// One stream, from the service call until both its task and its body are gone.
struct Stream {
    conn: Rc<Shared>,
    /// Since when the stream has had data it could not send (no window, or
    /// the connection over its buffer); None while it waits for its source.
    stalled_since: Cell<Option<Instant>>,
}

impl Stream {
    fn open(conn: &Rc<Shared>) -> Rc<Self> {
        conn.streams.set(conn.streams.get() + 1);
        conn.used.set(true);
        Rc::new(Self { conn: Rc::clone(conn), stalled_since: Cell::new(None) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let c = &self.conn;
        c.streams.set(c.streams.get() - 1);
        if c.streams.get() == 0 {
            c.idle_since.set(Instant::now());
            c.quiet.notify_one();
        }
    }
}

/// Serves HTTP/2 on `io` until the connection ends, is closed for idleness,
/// or (with a graceful shutdown) its streams are done.
pub(super) async fn serve<I, S>(
    io: Io<I>,
    service: S,
    mut stop: watch::Receiver<bool>,
    tracker: &Tracker,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible> + 'static,
    S::Future: 'static,
{
    let limits = Arc::clone(io.limits());
    let shared = Rc::new(Shared {
        streams: Cell::new(0),
        used: Cell::new(false),
        idle_since: Cell::new(Instant::now()),
        quiet: Notify::new(),
        next: Cell::new(None),
        unsent: Cell::new(0),
        send_buffer: limits.http2_send_buffer,
        send_timeout: limits.send_timeout,
        blocked: RefCell::new(Vec::new()),
    });
    let for_service = Rc::clone(&shared);
    // hyper spawns a task per stream that holds the service's future: boxed, what the
    // spawn moves is a pointer, not the pipeline's ~4 KB state (several copies per stream).
    let service = service_fn(move |req| -> StreamFuture {
        let stream = Stream::open(&for_service);
        for_service.next.set(Some(Rc::clone(&stream)));
        let fut = service.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| H2Body { inner, stream }))
        })
    });
    let mut conn = Box::pin(
        http2::Builder::new(StreamExec(Rc::clone(&shared)))
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .initial_stream_window_size(limits.http2_recv_window)
            .initial_connection_window_size(limits.http2_recv_window)
            .max_send_buf_size(limits.http2_send_buffer.min(u32::MAX as usize))
            // RFC 8441: WebSocket over HTTP/2 (routes decide whether they allow it).
            .enable_connect_protocol()
            .serve_connection(H2Io { io, shared: Rc::clone(&shared) }, service),
    );
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    // Once closing for idleness: when to give up waiting for the close.
    let mut closing: Option<Instant> = None;
    loop {
        let idle = closing.is_none() && !stopping && shared.streams.get() == 0;
        let timeout = if shared.used.get() { limits.keepalive_timeout } else { limits.header_read_timeout };
        let idle_at = shared.idle_since.get() + timeout;
        let mut slot = idle.then(|| tracker.idle_wait());
        let close = tokio::select! {
            res = conn.as_mut() => return res.map_err(Into::into),
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
                false
            }
            // (A stream may have come and gone meanwhile: then look again.)
            () = tokio::time::sleep_until(idle_at), if idle => {
                shared.streams.get() == 0 && shared.idle_since.get() + timeout <= Instant::now()
            }
            () = shed_of(slot.as_mut()) => shared.streams.get() == 0,
            () = shared.quiet.notified(), if !idle => false,
            () = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {
                tracing::debug!("HTTP/2 connection did not close in time: dropped");
                return Ok(());
            }
        };
        if close {
            conn.as_mut().graceful_shutdown();
            closing = Some(Instant::now() + CLOSE_GRACE.min(timeout));
        }
    }
}

/// The executor of a connection's stream tasks: each is watched for
/// `send_timeout` (see [`Watched`]).
#[derive(Clone)]
struct StreamExec(Rc<Shared>);

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + 'static,
{
    fn execute(&self, fut: F) {
        match self.0.next.take() {
            Some(stream) => tokio::task::spawn_local(Watched { fut, stream, timer: None }),
            None => tokio::task::spawn_local(fut),
        };
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, ended (which resets the stream and drops its upstream
    /// request) once the stream has had data it could not send for `send_timeout`.
    struct Watched<F> {
        #[pin]
        fut: F,
        stream: Rc<Stream>,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.fut.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let Some(since) = this.stream.stalled_since.get() else { return Poll::Pending };
        let at = since + this.stream.conn.send_timeout;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_ready() {
            tracing::debug!(after = ?this.stream.conn.send_timeout, "HTTP/2 stream could not send: reset");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A stream's response body: polled only while the connection is under its
/// send buffer; notes when the stream has data it cannot send.
pub struct H2Body {
    inner: ResponseBody,
    stream: Rc<Stream>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let stream = &this.stream;
        let conn = &stream.conn;
        if conn.over_budget() {
            let mut blocked = conn.blocked.borrow_mut();
            if !blocked.iter().any(|w| w.will_wake(cx.waker())) {
                blocked.push(cx.waker().clone());
            }
            if stream.stalled_since.get().is_none() {
                stream.stalled_since.set(Some(Instant::now()));
            }
            return Poll::Pending;
        }
        stream.stalled_since.set(None);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                conn.unsent.set(conn.unsent.get() + data.len());
                // Until hyper polls again: it does at once if h2 takes more.
                stream.stalled_since.set(Some(Instant::now()));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's IO, counting what goes out against the send buffer.
struct H2Io<I> {
    io: Io<I>,
    shared: Rc<Shared>,
}

impl<I: AsyncRead + Unpin> Read for H2Io<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> Write for H2Io<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.shared.wrote(n);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.shared.wrote(n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
