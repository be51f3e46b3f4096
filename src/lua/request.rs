//! The request as Lua sees it, and which request that is right now.
//!
//! All of a worker's requests share one Lua state; a callback such as
//! `ngx.req.get_headers` acts on the request whose coroutine is being
//! resumed. [`Scoped`] wraps a phase's future and publishes its request in a
//! thread-local slot for the duration of each poll (and starts the budget
//! clock), so no lookup by coroutine is needed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use super::{budget, Phase};

/// The response a script builds (content phase, `ngx.exit`, `ngx.say`) or
/// sees and changes (header_filter).
#[derive(Debug, Default)]
pub struct LuaResponse {
    /// 0 until set.
    pub status: u16,
    pub headers: HeaderMap,
    /// What `ngx.say` / `ngx.print` wrote.
    pub body: BytesMut,
    /// `ngx.eof()` was called: no more output.
    pub eof: bool,
    /// The response head went out (first `ngx.flush`, output past the buffer,
    /// `ngx.eof`): status and headers are fixed.
    pub headers_sent: bool,
    /// Where output goes while a phase that may answer (rewrite, access,
    /// content) runs; `None` in the other phases (output stays buffered).
    pub stream: Option<super::ngx::resp::Stream>,
    /// Headers header_filter set: what an `ngx.exit(status)` there keeps of
    /// the response's headers (as OpenResty, not the upstream's).
    pub filter_set: Vec<http::HeaderName>,
}

/// What the balancer phase asked for.
#[derive(Debug, Default, Clone)]
pub struct BalancerChoice {
    pub peer: Option<SocketAddr>,
    pub more_tries: u32,
    pub connect_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    pub read_timeout: Option<Duration>,
    /// ("failed" | "next", status) of the previous try, for `get_last_failure`.
    pub last_failure: Option<(&'static str, u16)>,
}

/// What the upstream did, for `ngx.var.upstream_*` in later phases.
#[derive(Debug, Default, Clone)]
pub struct UpstreamInfo {
    pub addr: Option<SocketAddr>,
    pub status: Option<u16>,
    pub response_time: Option<Duration>,
}

pub struct LuaRequest {
    pub parts: http::request::Parts,
    /// The request target as the client sent it (`ngx.var.request_uri`), whatever scripts change.
    pub request_uri: http::uri::PathAndQuery,
    /// `ngx.var.uri` (nginx's `$uri`: decoded, normalised) when it is not the
    /// path of `parts.uri` as is: the path was not canonical, or a script set
    /// it (`ngx.req.set_uri`). `parts.uri` then holds it escaped.
    pub decoded_uri: Option<Vec<u8>>,
    /// The request body once `ngx.req.read_body()` read it, or set by `set_body_data`.
    pub body: Option<Bytes>,
    /// The unread client body, until `read_body` takes it.
    pub incoming: Option<hyper::body::Incoming>,
    pub body_read: bool,
    /// The route's client_max_body_size (0 = none), for `read_body`.
    pub body_limit: u64,
    /// `limits.client_body_timeout`: `read_body`'s longest wait for the next piece.
    pub body_timeout: Duration,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub tls: bool,
    pub start: Instant,
    pub phase: Phase,
    pub route: Arc<str>,
    pub ctx: Option<mlua::Table>,
    pub resp: LuaResponse,
    /// `ngx.exit(code)` was called with this code.
    pub exit: Option<i64>,
    /// `luagate.grpc.exit(code, message)`: answer with this gRPC status.
    pub grpc_exit: Option<(u32, String)>,
    /// Values of declared variables (`lua.variables`) set by scripts.
    pub vars: HashMap<String, String>,
    pub upstream: UpstreamInfo,
    pub balancer: BalancerChoice,
    pub grpc: Option<(String, String)>,
    /// body_filter's `ngx.arg[1]`, `ngx.arg[2]`.
    pub chunk: Option<Bytes>,
    pub chunk_eof: bool,
    /// Bytes sent to the client so far (log phase).
    pub bytes_sent: u64,
}

impl LuaRequest {
    /// `ngx.var.uri`: the normalised path, or what `ngx.req.set_uri` set.
    pub fn uri(&self) -> &[u8] {
        self.decoded_uri.as_deref().unwrap_or(self.parts.uri.path().as_bytes())
    }

    /// `ngx.req.set_uri`: `ngx.var.uri` reads `uri` exactly; the upstream gets it escaped, args kept.
    pub fn set_uri(&mut self, uri: &[u8]) -> Result<(), http::Error> {
        self.parts.uri = crate::protocol::uri::with_path(&self.parts.uri, uri)?;
        self.decoded_uri = Some(uri.to_vec());
        Ok(())
    }

    /// The normalised path of a request whose raw path was not canonical; with
    /// `rewrite`, it also replaces the path that goes upstream (escaped).
    pub fn set_normalised(&mut self, path: Vec<u8>, rewrite: bool) -> Result<(), http::Error> {
        if rewrite {
            self.parts.uri = crate::protocol::uri::with_path(&self.parts.uri, &path)?;
        }
        self.decoded_uri = Some(path);
        Ok(())
    }

    /// Wall-clock start in seconds since the epoch (`ngx.req.start_time`), derived
    /// when asked rather than read from the clock for every request.
    pub fn start_epoch(&self) -> f64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let start = now.saturating_sub(self.start.elapsed());
        (start.as_millis() as f64) / 1000.0
    }

    pub fn new(
        parts: http::request::Parts,
        client: SocketAddr,
        server: SocketAddr,
        tls: bool,
        route: Arc<str>,
        is_grpc: bool,
        start: Instant,
    ) -> Self {
        let grpc = is_grpc
            .then(|| crate::protocol::grpc::parse_path(parts.uri.path()))
            .flatten()
            .map(|(s, m)| (s.to_string(), m.to_string()));
        let request_uri =
            parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        Self {
            parts,
            request_uri,
            decoded_uri: None,
            body: None,
            incoming: None,
            body_read: false,
            body_limit: 0,
            body_timeout: Duration::from_secs(60),
            client,
            server,
            tls,
            start,
            phase: Phase::Rewrite,
            route,
            ctx: None,
            resp: LuaResponse::default(),
            exit: None,
            grpc_exit: None,
            vars: HashMap::new(),
            upstream: UpstreamInfo::default(),
            balancer: BalancerChoice::default(),
            grpc,
            chunk: None,
            chunk_eof: false,
            bytes_sent: 0,
        }
    }
}

pub type Shared = Rc<RefCell<LuaRequest>>;

thread_local! {
    static CURRENT: RefCell<Option<Shared>> = const { RefCell::new(None) };
    /// The phase of requestless code being polled (init_worker); timers otherwise.
    static DETACHED: std::cell::Cell<Option<Phase>> = const { std::cell::Cell::new(None) };
}

/// What `ngx.get_phase()` reports for code running outside a request.
pub fn detached_phase() -> Phase {
    DETACHED.with(|d| d.get()).unwrap_or(Phase::Timer)
}

pin_project_lite::pin_project! {
    /// Requestless code (init_worker) with its phase published while it is polled.
    pub struct InPhase<F> {
        phase: Phase,
        #[pin]
        inner: F,
    }
}

impl<F> InPhase<F> {
    pub fn new(phase: Phase, inner: F) -> Self {
        Self { phase, inner }
    }
}

impl<F: Future> Future for InPhase<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let previous = DETACHED.with(|d| d.replace(Some(*this.phase)));
        let out = this.inner.poll(cx);
        DETACHED.with(|d| d.set(previous));
        out
    }
}

/// The request being served by the running coroutine, if any.
pub fn current() -> Option<Shared> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The error of an API that needs a request, called outside one.
pub fn outside(api: &str) -> mlua::Error {
    mlua::Error::RuntimeError(outside_message(api))
}

pub fn outside_message(api: &str) -> String {
    format!("API disabled in the current context: {api} needs a request")
}

/// Run `f` on the current request; outside a request (init_worker, timers)
/// the error names the API, as OpenResty's "API disabled" does.
pub fn with<R>(api: &str, f: impl FnOnce(&mut LuaRequest) -> R) -> mlua::Result<R> {
    let req = current().ok_or_else(|| outside(api))?;
    let mut r = req.try_borrow_mut().map_err(|_| mlua::Error::RuntimeError(format!("{api}: request busy")))?;
    Ok(f(&mut r))
}

pin_project_lite::pin_project! {
    /// A phase's future with its request published while it is polled.
    pub struct Scoped<F> {
        req: Option<Shared>,
        #[pin]
        inner: F,
    }
}

impl<F> Scoped<F> {
    pub fn new(req: Option<Shared>, inner: F) -> Self {
        Self { req, inner }
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _published = Published::new(this.req.clone());
        this.inner.poll(cx)
    }
}

/// While alive: `req` is the current request and the budget clock runs (a
/// phase's run, or one poll of it).
pub struct Published {
    previous: Option<Shared>,
    _slice: budget::Slice,
}

impl Published {
    pub fn new(req: Option<Shared>) -> Self {
        let previous = CURRENT.with(|c| c.replace(req));
        Self { previous, _slice: budget::Slice::start() }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}
