//! The two bodies a proxied request streams, frame by frame, never buffered
//! whole: [`UpstreamBody`] (client → upstream: counts bytes, enforces the
//! body size limit and the send timeout) and [`ResponseBody`] (upstream or
//! luagate → client: counts bytes, enforces the read timeout and the request
//! deadline, and runs the log phase when it ends or is dropped). A Lua phase
//! that flushed streams its output through a channel ([`Chunk`]s) while it
//! runs on.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;
use crate::lua::ngx::resp::Chunk;
use crate::lua::request::Shared;
use crate::lua::runtime::Begun;
use crate::lua::{Outcome, Phase, Runtime, Script};
use crate::observe::access_log::LogRecord;
use crate::protocol::grpc::{self, Code};
use crate::upstream::balancer::InFlight;
use std::sync::Arc;

/// What the request body tells the rest of the request, and how far it has
/// gone: shared by the body (polled by the upstream connection's task) and
/// the call waiting for the response head (`upstream::call`), which it wakes
/// when that call's clock should change (see [`RequestTally::register`]).
#[derive(Default)]
pub struct RequestTally {
    pub bytes: Cell<u64>,
    pub limit_hit: Cell<bool>,
    /// The client sent nothing for `client_body_timeout`.
    pub timed_out: Cell<bool>,
    /// The client's body failed: `Some(true)` it went away, `Some(false)` it was malformed.
    pub client_failed: Cell<Option<bool>>,
    /// When the body last handed a frame to the upstream connection, which has not asked for the next yet.
    pub handed: Cell<Option<Instant>>,
    /// When the body's last frame was handed over: the request has been sent.
    pub sent: Cell<Option<Instant>>,
    waiter: Cell<Option<Waker>>,
}

impl RequestTally {
    /// The task waiting for the response head, woken when the body moves on.
    pub fn register(&self, waker: &Waker) {
        self.waiter.set(Some(waker.clone()));
    }

    fn moved(&self) {
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }
}

/// The body sent upstream. `Empty` and `Full` can be replayed to another peer.
pub enum UpstreamBody {
    Empty,
    Full(Option<Bytes>),
    Stream(RequestStream),
}

pub struct RequestStream {
    inner: Incoming,
    limit: u64,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    tally: Rc<RequestTally>,
    /// A mirror's copy of the body (`upstream::mirror`).
    tee: Option<crate::upstream::mirror::Tee>,
}

impl RequestStream {
    /// `limit` 0 = none; `idle` = longest wait for the client's next frame (`client_body_timeout`).
    pub fn new(inner: Incoming, limit: u64, idle: Duration, tally: Rc<RequestTally>) -> Self {
        Self { inner, limit, idle, timer: None, tally, tee: None }
    }

    /// Copy the body into `tee` as it streams.
    pub fn set_tee(&mut self, tee: crate::upstream::mirror::Tee) {
        self.tee = Some(tee);
    }
}

impl UpstreamBody {
    /// How far a streamed body has gone (None: the body is there whole, sent at once).
    pub fn progress(&self) -> Option<Rc<RequestTally>> {
        match self {
            Self::Stream(s) => Some(Rc::clone(&s.tally)),
            _ => None,
        }
    }

    /// A copy for another attempt, when the body can be replayed.
    pub fn try_clone(&self) -> Option<Self> {
        match self {
            Self::Empty => Some(Self::Empty),
            Self::Full(b) => Some(Self::Full(b.clone())),
            Self::Stream(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("client sent no request body data for {0:?}")]
    ClientTimeout(Duration),
    #[error("upstream sent no data for {0:?}")]
    ReadTimeout(Duration),
    #[error("request deadline exceeded")]
    Deadline,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(b) => b.is_none(),
            Self::Stream(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Stream(s) => s.inner.size_hint(),
        }
    }
}

impl RequestStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Asked for the next frame: the upstream connection took the last one.
        self.tally.handed.set(None);
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.timer = None;
                if let Some(data) = frame.data_ref() {
                    let total = self.tally.bytes.get() + data.len() as u64;
                    self.tally.bytes.set(total);
                    if self.limit > 0 && total > self.limit {
                        self.tally.limit_hit.set(true);
                        self.tee = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(self.limit).into())));
                    }
                    if let Some(tee) = &mut self.tee {
                        tee.data(data);
                        // hyper stops polling once the body says it ended: the copy is whole now.
                        if self.inner.is_end_stream() {
                            tee.end();
                        }
                    }
                }
                // hyper polls no further once the body says it has ended.
                let now = Some(Instant::now());
                if self.inner.is_end_stream() {
                    self.tally.sent.set(now);
                } else {
                    self.tally.handed.set(now);
                }
                self.tally.moved();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.tally.client_failed.set(Some(crate::error::client_went_away(&e)));
                self.tee = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.tally.sent.set(Some(Instant::now()));
                self.tally.moved();
                if let Some(mut tee) = self.tee.take() {
                    tee.end();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(timer.as_mut().poll(cx));
                self.tally.timed_out.set(true);
                Poll::Ready(Some(Err(BodyError::ClientTimeout(idle).into())))
            }
        }
    }
}

use std::future::Future;

enum Inner {
    Upstream(Incoming),
    Full(Option<Bytes>),
    /// A proxy-made gRPC answer that ends with trailers (after a deadline or read timeout).
    Trailers(Option<HeaderMap>),
    /// The output of a Lua phase still running (it flushed): ends when the phase drops the sender.
    Channel(tokio::sync::mpsc::UnboundedReceiver<Chunk>),
}

/// The body sent to the client; its end (or drop) is the log phase.
pub struct ResponseBody {
    inner: Inner,
    grpc: bool,
    read_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
    deadline: Option<Pin<Box<Sleep>>>,
    log: Option<LogRecord>,
    lua: Option<Box<LuaTail>>,
    /// The Lua phase writing this body, still running: the log phase waits for its end.
    writer: Option<tokio::task::JoinHandle<()>>,
    _in_flight: Option<InFlight>,
    /// Kept until the body ends or is dropped (a request's concurrency slots, `phase::limit`).
    _held: Option<Box<dyn std::any::Any>>,
}

pub type PhaseFuture = Pin<Box<dyn Future<Output = Outcome>>>;

/// `fut` (a phase of `req`) with `req.phase` set to `phase` whenever it is
/// polled: a phase may run while another of the same request waits (a
/// streaming content phase sleeps while body_filter runs on its output).
pub async fn as_phase<F: Future>(req: Shared, phase: Phase, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Ok(mut r) = req.try_borrow_mut() {
            r.phase = phase;
        }
        fut.as_mut().poll(cx)
    })
    .await
}

/// A route's body_filter and log scripts, run as the body streams and after it.
pub struct LuaTail {
    pub runtime: Rc<Runtime>,
    pub req: Shared,
    pub body_filter: Option<Arc<Script>>,
    pub log: Option<Arc<Script>>,
    running: Option<PhaseFuture>,
    /// A body_filter run that ended without waiting.
    filtered: Option<Outcome>,
    /// The filter has seen eof: nothing more to filter.
    filtered_eof: bool,
    held_trailers: Option<HeaderMap>,
}

impl LuaTail {
    pub fn new(runtime: Rc<Runtime>, req: Shared, body_filter: Option<Arc<Script>>, log: Option<Arc<Script>>) -> Self {
        Self { runtime, req, body_filter, log, running: None, filtered: None, filtered_eof: false, held_trailers: None }
    }

    fn start_filter(&mut self, chunk: Bytes, eof: bool) {
        let Some(script) = self.body_filter.clone() else { return };
        {
            let mut r = self.req.borrow_mut();
            r.chunk = Some(chunk);
            r.chunk_eof = eof;
        }
        match Runtime::begin(&self.runtime, Phase::BodyFilter, &script, &self.req) {
            Begun::Over(outcome) => self.filtered = Some(outcome),
            Begun::Running(run) => {
                self.running = Some(Box::pin(as_phase(Rc::clone(&self.req), Phase::BodyFilter, run)));
            }
        }
    }
}

impl ResponseBody {
    /// A body made by luagate itself.
    pub fn full(body: Bytes, log: Option<LogRecord>) -> Self {
        Self::made(Inner::Full((!body.is_empty()).then_some(body)), log)
    }

    /// The output of a Lua phase that flushed, streamed as the phase writes it.
    pub fn channel(rx: tokio::sync::mpsc::UnboundedReceiver<Chunk>, log: Option<LogRecord>) -> Self {
        Self::made(Inner::Channel(rx), log)
    }

    fn made(inner: Inner, log: Option<LogRecord>) -> Self {
        Self {
            inner,
            grpc: false,
            read_timeout: None,
            idle: None,
            deadline: None,
            log,
            lua: None,
            writer: None,
            _in_flight: None,
            _held: None,
        }
    }

    /// The Lua phase still running after it answered: the log phase runs after it ends.
    pub fn written_by(mut self, task: tokio::task::JoinHandle<()>) -> Self {
        self.writer = Some(task);
        self
    }

    /// A streamed upstream body. `deadline` ends it (gRPC: with
    /// DEADLINE_EXCEEDED trailers); `read_timeout` bounds each wait for data.
    pub fn upstream(
        inner: Incoming,
        grpc: bool,
        read_timeout: Duration,
        deadline: Option<Instant>,
        log: LogRecord,
        in_flight: InFlight,
    ) -> Self {
        Self {
            inner: Inner::Upstream(inner),
            grpc,
            read_timeout: Some(read_timeout),
            idle: None,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            log: Some(log),
            lua: None,
            writer: None,
            _in_flight: Some(in_flight),
            _held: None,
        }
    }

    /// Keep `held` until the body ends or is dropped.
    pub fn hold(mut self, held: Box<dyn std::any::Any>) -> Self {
        self._held = Some(held);
        self
    }

    /// The status the log line reports (after header_filter changed it).
    pub fn set_status(&mut self, status: u16) {
        if let Some(log) = &mut self.log {
            log.status = status;
        }
    }

    pub fn set_error(&mut self, msg: String) {
        if let Some(log) = &mut self.log {
            log.error = Some(msg);
        }
    }

    /// Take the log record away (the body will not be sent).
    pub fn take_log(&mut self) -> Option<LogRecord> {
        self.log.take()
    }

    /// Run the route's body_filter on each chunk and its log script at the end.
    pub fn with_lua(mut self, tail: LuaTail) -> Self {
        self.lua = Some(Box::new(tail));
        self
    }

    /// End a gRPC stream with a status in trailers instead of the upstream's.
    fn end_grpc(&mut self, code: Code, msg: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.header_value());
        t.insert("grpc-message", grpc::encode_message(msg));
        if let Some(log) = &mut self.log {
            log.error = Some(msg.to_string());
        }
        self.inner = Inner::Trailers(None);
        self.deadline = None;
        self.idle = None;
        Poll::Ready(Some(Ok(Frame::trailers(t))))
    }

    fn fail(&mut self, err: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(log) = &mut self.log {
            log.error = Some(err.to_string());
        }
        self.inner = Inner::Trailers(None);
        Poll::Ready(Some(Err(err.into())))
    }

    /// The next frame from the source, with deadline and read timeout applied.
    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = &mut self.deadline {
            if d.as_mut().poll(cx).is_ready() {
                return if self.grpc {
                    self.end_grpc(Code::DeadlineExceeded, "deadline exceeded")
                } else {
                    self.fail(BodyError::Deadline)
                };
            }
        }
        let polled = match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Trailers(t) => Poll::Ready(t.take().map(|t| Ok(Frame::trailers(t)))),
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx).map(|o| o.map(|r| r.map_err(BoxError::from))),
            Inner::Channel(rx) => loop {
                match ready!(rx.poll_recv(cx)) {
                    Some(Chunk::Data(b)) if b.is_empty() => {}
                    Some(Chunk::Data(b)) => break Poll::Ready(Some(Ok(Frame::data(b)))),
                    Some(Chunk::Flushed(ack)) => {
                        let _ = ack.send(());
                    }
                    Some(Chunk::Abort(msg)) => {
                        if let Some(log) = &mut self.log {
                            log.error = Some(msg);
                        }
                        self.inner = Inner::Trailers(None);
                        return Poll::Ready(Some(Err("the Lua phase failed after sending the response head".into())));
                    }
                    None => break Poll::Ready(None),
                }
            },
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.idle = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let Some(read) = self.read_timeout else { return Poll::Pending };
                let idle = self.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(read)));
                ready!(idle.as_mut().poll(cx));
                if self.grpc {
                    self.end_grpc(Code::Unavailable, "upstream read timeout")
                } else {
                    self.fail(BodyError::ReadTimeout(read))
                }
            }
            other => other,
        }
    }

    /// The next frame after the Lua body_filter (if any) had its say.
    fn poll_filtered(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(tail) = self.lua.as_mut().filter(|t| t.body_filter.is_some()) else {
                return self.poll_source(cx);
            };
            let outcome = match (tail.filtered.take(), &mut tail.running) {
                (Some(outcome), _) => Some(outcome),
                (None, Some(running)) => {
                    let outcome = ready!(running.as_mut().poll(cx));
                    tail.running = None;
                    Some(outcome)
                }
                (None, None) => None,
            };
            if let Some(outcome) = outcome {
                if let Outcome::Error(msg) = outcome {
                    if let Some(log) = &mut self.log {
                        log.error = Some(msg);
                    }
                    self.inner = Inner::Trailers(None);
                    return Poll::Ready(Some(Err("body_filter failed".into())));
                }
                let (chunk, eof) = {
                    let mut r = tail.req.borrow_mut();
                    (r.chunk.take().unwrap_or_default(), r.chunk_eof)
                };
                if eof {
                    tail.filtered_eof = true;
                }
                if !chunk.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                continue;
            }
            if tail.filtered_eof {
                let trailers = tail.held_trailers.take();
                self.inner = Inner::Trailers(None);
                return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(self.poll_source(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.lua.as_mut().map_or((), |t| t.start_filter(data, false)),
                    Err(frame) => {
                        if let (Some(tail), Ok(t)) = (self.lua.as_mut(), frame.into_trailers()) {
                            tail.held_trailers = Some(t);
                            tail.start_filter(Bytes::new(), true);
                        }
                    }
                },
                None => {
                    if let Some(tail) = self.lua.as_mut() {
                        tail.start_filter(Bytes::new(), true);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_filtered(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(log)) = (&polled, &mut this.log) {
            if let Some(data) = frame.data_ref() {
                log.bytes_sent += data.len() as u64;
            } else if let Some(t) = frame.trailers_ref() {
                log.grpc_status = grpc_status(t).or(log.grpc_status);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.lua.as_ref().is_some_and(|t| t.body_filter.is_some() && !t.filtered_eof) {
            return false;
        }
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Trailers(t) => t.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.lua.as_ref().is_some_and(|t| t.body_filter.is_some()) {
            return SizeHint::default();
        }
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Trailers(_) | Inner::Channel(_) => SizeHint::default(),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let log = self.log.take();
        if let Some(log) = &log {
            log.emit();
        }
        let Some(tail) = self.lua.take() else { return };
        let Some(script) = tail.log.clone() else { return };
        {
            let mut r = tail.req.borrow_mut();
            if let Some(log) = &log {
                r.bytes_sent = log.bytes_sent;
                if r.resp.status == 0 {
                    r.resp.status = log.status;
                }
            }
        }
        // The log phase runs after the response, on its own task: it never delays the client.
        // A content phase still running after it answered (ngx.eof, or the client left) ends first.
        let writer = self.writer.take();
        tokio::task::spawn_local(async move {
            if let Some(writer) = writer {
                let _ = writer.await;
            }
            tail.runtime.run(Phase::Log, &script, &tail.req).await;
        });
    }
}

/// `grpc-status` of a header or trailer block.
pub fn grpc_status(h: &HeaderMap) -> Option<u32> {
    // A pre-parsed name: looking up by &str parses and hashes it every time.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(&GRPC_STATUS).and_then(|v: &HeaderValue| v.to_str().ok()).and_then(|s| s.parse().ok())
}
