//! The pipeline driver: one request from its head to its log line.
//!
//! ```text
//! accept ─► path normalise ─► route match ─► [return] ─► balancer ─► upstream ─► response ─► log
//! ```
//! Routes match the normalised path (`protocol::uri`, nginx's `$uri`). What
//! goes upstream is the client's request target when decoding its path once
//! gives the normalised path (`uri::decodes_to`), else the normalised path
//! re-escaped with the original query: a route and its upstream never
//! disagree about which resource was asked for.
//! The snapshot is loaded once, at the start; the request keeps it to its
//! end, so a reload never changes a request halfway. The log phase runs when
//! the response body ends or is dropped (see `body::ResponseBody`), so it
//! never delays the client.

use std::borrow::Cow;
use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::{Body as _, Incoming};
use tokio::time::Instant;

use super::body::{self, RequestStream, RequestTally, ResponseBody, UpstreamBody};
use super::lua::{ClientBody, Flow, LuaBalancer, LuaCtx};
use super::upgrade::{self, Ask, Tunnel};
use super::{headers, limit, respond};
use crate::config::snapshot::{Action, Listener, Route};
use crate::config::Snapshot;
use crate::error::ProxyError;
use crate::lua::Phase;
use crate::observe::access_log::LogRecord;
use crate::observe::trace::TraceContext;
use crate::protocol::{grpc, uri};
use crate::route::MatchInput;
use crate::upstream::pool::Pool;
use crate::upstream::{call, Protocol, Upstream};

/// What a connection knows about itself, shared by its requests.
pub struct ConnInfo {
    pub client: SocketAddr,
    /// The client's IP as a header value, formatted once per connection.
    pub client_ip: HeaderValue,
    pub listener: Arc<Listener>,
    pub tls: bool,
    /// An HTTP/1.1 WebSocket answered with 101: the connection task runs it
    /// once hyper has written the head (see `upgrade`).
    tunnel: RefCell<Option<Tunnel>>,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, listener: Arc<Listener>, tls: bool) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Self { client, client_ip, listener, tls, tunnel: RefCell::new(None) }
    }

    pub fn has_tunnel(&self) -> bool {
        self.tunnel.borrow().is_some()
    }

    pub fn take_tunnel(&self) -> Option<Tunnel> {
        self.tunnel.borrow_mut().take()
    }
}

/// A worker's own state, shared by all its connections.
pub struct Worker {
    pub id: usize,
    pub pool: Rc<Pool>,
}

/// Emits the access log line with status 499 if the client goes away before
/// a response exists (the request future is dropped).
struct LogGuard(Option<LogRecord>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(mut log) = self.0.take() {
            log.status = 499;
            log.error.get_or_insert_with(|| "client closed the request".into());
            log.emit();
        }
    }
}

pub async fn handle(
    req: Request<Incoming>,
    conn: Rc<ConnInfo>,
    worker: Rc<Worker>,
) -> Result<Response<ResponseBody>, Infallible> {
    let snap = crate::config::reload::current();
    let (mut parts, body) = req.into_parts();
    if !snap.underscores_in_headers {
        headers::drop_underscored(&mut parts.headers);
    }
    let trace = TraceContext::from_headers(&parts.headers);
    let started = std::time::Instant::now();
    let mut guard = LogGuard(Some(LogRecord {
        start: started,
        client: conn.client,
        method: parts.method.clone(),
        uri: parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        route: None,
        upstream: None,
        peer: None,
        status: 0,
        grpc_status: None,
        bytes_sent: 0,
        bytes_received: 0,
        upstream_time: None,
        trace_id: trace.trace_id,
        error: None,
    }));
    let is_grpc = grpc::is_grpc(&parts.headers);
    if let Some(err) = refused(&parts, &snap) {
        tracing::debug!(client = %conn.client, error = %err, "request refused");
        return Ok(closing(respond::error(&err, is_grpc, guard.0.take()), parts.version));
    }
    // A gRPC method is named by its path exactly: `/a.B/../C` is no way to call `/C`.
    if is_grpc && !uri::is_canonical(parts.uri.path().as_bytes(), true) {
        let err = ProxyError::GrpcPath { path: parts.uri.path().to_string() };
        return Ok(respond::error(&err, is_grpc, guard.0.take()));
    }
    let path = match uri::normalize(parts.uri.path().as_bytes(), snap.merge_slashes) {
        Ok(p) => p,
        Err(e) => {
            let resp = respond::error(&ProxyError::BadPath(e), is_grpc, guard.0.take());
            return Ok(closing(resp, parts.version));
        }
    };
    let host = request_host(&parts);
    let route = {
        let input = MatchInput {
            listener: &conn.listener.name,
            host: &host,
            path: &path,
            method: &parts.method,
            headers: &parts.headers,
            grpc: if is_grpc { grpc::parse_path(parts.uri.path()) } else { None },
        };
        snap.table.find(&input).map(|i| Arc::clone(&snap.routes[i]))
    };
    let Some(route) = route else {
        let err = ProxyError::NoRoute { method: parts.method.to_string(), path: parts.uri.path().to_string() };
        return Ok(respond::error(&err, is_grpc, guard.0.take()));
    };
    // None: the raw path is the normalised one (the usual case, nothing allocated).
    // `rewrite`: the raw path cannot go upstream as sent.
    let (normalised, rewrite) = match path {
        Cow::Borrowed(_) => (None, false),
        Cow::Owned(p) => {
            let rewrite = !uri::decodes_to(parts.uri.path().as_bytes(), &p);
            (Some(p), rewrite)
        }
    };
    drop(host);
    if let Some(log) = &mut guard.0 {
        log.route = Some(Arc::clone(&route.name));
    }
    if parts.method == http::Method::CONNECT && !(route.websocket && upgrade::asked(&parts).is_some()) {
        let err = ProxyError::MethodNotAllowed(parts.method.to_string());
        return Ok(respond::error(&err, is_grpc, guard.0.take()));
    }
    if route.lua.is_none() {
        if let Some(p) = normalised.as_ref().filter(|_| rewrite) {
            match uri::with_path(&parts.uri, p) {
                Ok(u) => parts.uri = u,
                Err(e) => return Ok(respond::error(&ProxyError::BadRequest(e.to_string()), is_grpc, guard.0.take())),
            }
        }
        // preaccess: the route's rate and concurrency limits (`phase::limit`).
        let held = match &route.limits {
            None => None,
            Some(limits) => {
                let client = headers::real_client_ip(&parts.headers, conn.client.ip(), |ip| snap.is_trusted(ip));
                let src = limit::KeySource { parts: &parts, client, vars: None, declared: &snap.lua.variables };
                let decision = limit::decide(limits, &src, &route.name);
                match limit::complete(limits, decision, &route.name, is_grpc, &mut guard.0).await {
                    Ok(held) => held,
                    Err(resp) => return Ok(resp),
                }
            }
        };
        let resp = match &route.action {
            Action::Proxy(upstream) => {
                let ctx = Proxy { snap: &snap, conn: &conn, worker: &worker, route: &route, upstream, is_grpc, trace };
                ctx.run(parts, ClientBody::Stream(body), None, &mut guard).await.0
            }
            action => answer(action, guard.0.take()),
        };
        return Ok(hold(resp, held));
    }
    let lua = match LuaCtx::start(&snap, &route, parts, body, &conn, is_grpc, started) {
        Ok(l) => l,
        Err(e) => return Ok(respond::error(&e, is_grpc, guard.0.take())),
    };
    // Scripts read the normalised path as `ngx.var.uri`; `ngx.var.request_uri` keeps the raw one.
    if let Some(p) = normalised {
        if let Err(e) = lua.req.borrow_mut().set_normalised(p, rewrite) {
            return Ok(respond::error(&ProxyError::BadRequest(e.to_string()), is_grpc, guard.0.take()));
        }
    }
    if !lua.runtime.is_ready() {
        lua.runtime.ready().await;
    }
    let mut held = None;
    let mut flow = lua.request_phase(Phase::Rewrite, &mut guard.0).await;
    if let (Flow::Continue, Some(limits)) = (&flow, &route.limits) {
        // preaccess, between rewrite and access as in nginx: a key may be a variable rewrite set.
        let decision = {
            let r = lua.req.borrow();
            let client = headers::real_client_ip(&r.parts.headers, conn.client.ip(), |ip| snap.is_trusted(ip));
            let src = limit::KeySource { parts: &r.parts, client, vars: Some(&r.vars), declared: &snap.lua.variables };
            limit::decide(limits, &src, &route.name)
        };
        match limit::complete(limits, decision, &route.name, is_grpc, &mut guard.0).await {
            Ok(h) => held = h,
            Err(resp) => flow = Flow::Respond(Box::new(resp)),
        }
    }
    if let Flow::Continue = flow {
        flow = lua.request_phase(Phase::Access, &mut guard.0).await;
    }
    let (resp, upstream) = match flow {
        Flow::Respond(resp) => (*resp, None),
        Flow::Continue => match &route.action {
            Action::Content => (lua.content(guard.0.take()).await, None),
            Action::Proxy(upstream) => {
                let (parts, body) = lua.take_request();
                let balancer = lua.balancer();
                let ctx = Proxy { snap: &snap, conn: &conn, worker: &worker, route: &route, upstream, is_grpc, trace };
                ctx.run(parts, body, balancer.as_ref(), &mut guard).await
            }
            action => (answer(action, guard.0.take()), None),
        },
    };
    let resp = if lua.passes_through() { resp } else { lua.respond(resp, upstream).await };
    if route.websocket && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        // header_filter answered otherwise: no tunnel (its peer connection closes).
        drop(conn.take_tunnel());
    }
    Ok(hold(resp, held))
}

/// What luagate refuses before routing, as nginx does: a method that is not
/// uppercase letters, `_` and `-` (400), a request target that is not a path
/// or an absolute URI (`*`, `host:port`: 400), `CONNECT` (405; HTTP/2's
/// extended CONNECT of a WebSocket is decided by the route), more header
/// fields than `limits.max_headers` (431; hyper counts them itself on HTTP/1.1).
fn refused(parts: &http::request::Parts, snap: &Snapshot) -> Option<ProxyError> {
    let method = parts.method.as_str();
    if !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-') {
        return Some(ProxyError::BadRequest(format!("invalid method {method:?}")));
    }
    if !parts.uri.path().starts_with('/') {
        return Some(ProxyError::BadRequest(format!("invalid request target {:?}", parts.uri.to_string())));
    }
    if parts.method == http::Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_none() {
        return Some(ProxyError::MethodNotAllowed(method.to_string()));
    }
    if parts.headers.len() > snap.limits.max_headers {
        return Some(ProxyError::TooManyHeaders { limit: snap.limits.max_headers });
    }
    None
}

/// `resp` with `Connection: close` on HTTP/1.x: after a request refused for
/// its framing or a failed body, the connection's next bytes cannot be trusted.
fn closing(mut resp: Response<ResponseBody>, version: Version) -> Response<ResponseBody> {
    if version < Version::HTTP_2 {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The response, keeping the request's concurrency slots until its body ends.
fn hold(resp: Response<ResponseBody>, held: Option<limit::Held>) -> Response<ResponseBody> {
    match held {
        None => resp,
        Some(h) => resp.map(|b| b.hold(Box::new(h))),
    }
}

/// A route that answers by itself (`return`), or a content route reached without its script.
fn answer(action: &Action, mut log: Option<LogRecord>) -> Response<ResponseBody> {
    match action {
        Action::Return { status, headers, body } => {
            if let Some(log) = &mut log {
                log.status = status.as_u16();
            }
            let mut resp = Response::new(ResponseBody::full(body.clone(), log));
            *resp.status_mut() = *status;
            *resp.headers_mut() = headers.clone();
            resp
        }
        _ => respond::error(&ProxyError::Lua("route has no answer".into()), false, log),
    }
}

struct Proxy<'a> {
    snap: &'a Snapshot,
    conn: &'a ConnInfo,
    worker: &'a Worker,
    route: &'a Route,
    upstream: &'a Arc<Upstream>,
    is_grpc: bool,
    trace: TraceContext,
}

impl Proxy<'_> {
    /// Forward the request; the response, and the peer and its time when one answered.
    async fn run(
        &self,
        mut parts: http::request::Parts,
        body: ClientBody,
        balancer: Option<&LuaBalancer>,
        guard: &mut LogGuard,
    ) -> (Response<ResponseBody>, Option<(SocketAddr, Duration)>) {
        let up = self.upstream;
        let version = parts.version;
        if let Some(log) = &mut guard.0 {
            log.upstream = Some(Arc::clone(&up.name));
        }
        // A gRPC stream is not one body: its size is bounded per message by the peers, not in total.
        let limit = if self.is_grpc { 0 } else { self.route.client_max_body_size };
        let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if limit > 0 && declared.is_some_and(|n| n > limit) {
            return (respond::error(&ProxyError::BodyTooLarge { limit }, self.is_grpc, guard.0.take()), None);
        }

        let deadline = self.deadline(&parts);
        let ask = if self.route.websocket { upgrade::asked(&parts) } else { None };
        let client_upgrade = match ask {
            Some(Ask::ExtendedConnect) => parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
            _ => None,
        };
        // Hop-by-hop headers go first: what the client's Connection header names is not
        // there for the real address (so X-Real-IP and X-Forwarded-For agree) nor the hash key.
        headers::strip_hop_by_hop(&mut parts.headers, up.protocol == Protocol::H2c);
        let expected_accept = ask.and_then(|ask| upgrade::upstream_request(&mut parts, ask));
        let client_ip = self.conn.client.ip();
        let trusted = self.snap.is_trusted(client_ip);
        let real_ip = headers::real_client_ip(&parts.headers, client_ip, |ip| self.snap.is_trusted(ip));
        let hash_key: Option<Vec<u8>> =
            up.hash_key.as_ref().and_then(|v| v.eval(&parts, real_ip)).map(|c| c.into_owned());

        let h = &mut parts.headers;
        headers::set_forwarded(h, &self.conn.client_ip, trusted, real_ip, if self.conn.tls { "https" } else { "http" });
        h.insert(&crate::observe::trace::TRACEPARENT, self.trace.header_value());
        let authority = match &self.route.host_header {
            Some(v) => v.clone(),
            None => match parts.headers.get(HOST) {
                Some(h) => h.clone(),
                None => HeaderValue::from_str(original_host(&parts)).unwrap_or(HeaderValue::from_static("localhost")),
            },
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match up.protocol {
            Protocol::Http1 => {
                parts.uri = Uri::try_from(path).unwrap_or_default();
                parts.version = Version::HTTP_11;
                parts.headers.insert(HOST, authority);
            }
            Protocol::H2c => {
                let uri = format!("http://{}{path}", authority.to_str().unwrap_or("localhost"));
                parts.uri = Uri::try_from(uri).unwrap_or_default();
                parts.version = Version::HTTP_2;
                parts.headers.remove(HOST);
            }
        }
        if let Some((d, _)) = deadline.filter(|_| self.is_grpc) {
            let left = d.saturating_duration_since(Instant::now());
            parts.headers.insert("grpc-timeout", grpc::format_timeout(left));
        }

        let tally = Rc::new(RequestTally::default());
        let upstream_body = match body {
            ClientBody::Stream(body) if body.is_end_stream() => UpstreamBody::Empty,
            ClientBody::Stream(body) => UpstreamBody::Stream(RequestStream::new(
                body,
                limit,
                self.snap.limits.client_body_timeout,
                Rc::clone(&tally),
            )),
            ClientBody::Read(bytes) => {
                tally.bytes.set(bytes.len() as u64);
                // Lua read, replaced or discarded the body: the length sent is the body's now (nginx
                // sends `Content-Length: 0` after `ngx.req.discard_body`), never the client's.
                if !bytes.is_empty() || parts.headers.contains_key(CONTENT_LENGTH) {
                    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                }
                UpstreamBody::Full((!bytes.is_empty()).then_some(bytes))
            }
        };
        let mut upstream_body = upstream_body;
        if let Some(m) = &self.route.mirror {
            crate::upstream::mirror::start(m, &self.worker.pool, &parts, &mut upstream_body, real_ip);
        }
        let req = Request::from_parts(parts, upstream_body);
        let calling = call::call(&self.worker.pool, up, req, real_ip, hash_key.as_deref(), self.route.tries, balancer);
        let result = match deadline {
            Some((at, after)) => match tokio::time::timeout_at(at, calling).await {
                Ok(r) => r,
                Err(_) => Err(ProxyError::Deadline { after }),
            },
            None => calling.await,
        };
        if let Some(log) = &mut guard.0 {
            log.bytes_received = tally.bytes.get();
        }
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                // A request body that failed is the client's doing, whatever the upstream call
                // made of it (hyper aborts the upstream request: the peer sees it cut).
                let e = if tally.limit_hit.get() {
                    ProxyError::BodyTooLarge { limit }
                } else if tally.timed_out.get() {
                    ProxyError::ClientBodyTimeout(self.snap.limits.client_body_timeout)
                } else if let Some(gone) = tally.client_failed.get() {
                    if gone {
                        ProxyError::ClientGone
                    } else {
                        ProxyError::BadRequest("malformed request body".into())
                    }
                } else {
                    e
                };
                match e.side() {
                    crate::error::Side::Downstream => {
                        tracing::info!(route = %self.route.name, upstream = %up.name, error = %e, "request aborted: client error")
                    }
                    _ => tracing::warn!(route = %self.route.name, upstream = %up.name, error = %e, "request failed"),
                }
                let resp = respond::error(&e, self.is_grpc, guard.0.take());
                return (if e.side() == crate::error::Side::Downstream { closing(resp, version) } else { resp }, None);
            }
        };
        let (mut head, incoming) = answer.response.into_parts();
        let upstream_upgrade = head.headers.get(http::header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut head.headers, false);
        let Some(mut log) = guard.0.take() else {
            return (respond::error(&ProxyError::ClientGone, self.is_grpc, None), None);
        };
        log.peer = Some(answer.peer);
        log.status = head.status.as_u16();
        log.upstream_time = Some(answer.elapsed);
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            let opened = match ask {
                None => Err(ProxyError::BadUpgrade("the peer switched protocols unasked")),
                Some(ask) => upgrade::client_head(&mut head, ask, upstream_upgrade, expected_accept.as_ref())
                    .and_then(|()| {
                        head.extensions
                            .remove::<hyper::upgrade::OnUpgrade>()
                            .ok_or(ProxyError::BadUpgrade("the peer connection cannot be handed over"))
                    })
                    .map(|on| (ask, on)),
            };
            let (ask, on) = match opened {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(route = %self.route.name, upstream = %up.name, peer = %answer.peer, error = %e, "request failed");
                    return (respond::error(&e, self.is_grpc, Some(log)), None);
                }
            };
            log.status = head.status.as_u16();
            let tunnel = Tunnel::new(on, up.timeouts.read, Some(log));
            match (ask, client_upgrade) {
                (Ask::Upgrade, _) => *self.conn.tunnel.borrow_mut() = Some(tunnel),
                (Ask::ExtendedConnect, Some(client)) => tunnel.spawn_h2(client),
                (Ask::ExtendedConnect, None) => {
                    let e = ProxyError::BadUpgrade("the client stream cannot be handed over");
                    return (respond::error(&e, self.is_grpc, None), None);
                }
            }
            let resp = Response::from_parts(head, ResponseBody::full(bytes::Bytes::new(), None));
            return (resp, Some((answer.peer, answer.elapsed)));
        }
        if self.is_grpc && (head.status != http::StatusCode::OK || !grpc::is_grpc(&head.headers)) {
            // A peer that does not speak gRPC (an HTTP/1.1 error page, a JSON answer): the caller
            // gets a gRPC status mapped from the HTTP one, as gRPC clients map it, never the page.
            let status = head.status.as_u16();
            tracing::warn!(route = %self.route.name, upstream = %up.name, peer = %answer.peer, status, "upstream answered a gRPC call without gRPC");
            log.error = Some(format!("upstream answered HTTP {status} without gRPC"));
            let code = if status == 200 { grpc::Code::Unknown as u32 } else { grpc::from_http_status(status) };
            let msg = format!("upstream answered without gRPC (HTTP {status})");
            return (respond::grpc_status(code, &msg, Some(log)), Some((answer.peer, answer.elapsed)));
        }
        log.grpc_status = if self.is_grpc { body::grpc_status(&head.headers) } else { None };
        let body = ResponseBody::upstream(
            incoming,
            self.is_grpc,
            answer.read_timeout,
            deadline.map(|(at, _)| at),
            log,
            answer.in_flight,
        );
        (Response::from_parts(head, body), Some((answer.peer, answer.elapsed)))
    }

    /// The request's deadline: the route's timeout, capped further by the
    /// client's `grpc-timeout`.
    fn deadline(&self, parts: &http::request::Parts) -> Option<(Instant, Duration)> {
        let client = if self.is_grpc { parts.headers.get("grpc-timeout").and_then(grpc::parse_timeout) } else { None };
        let limit: Option<Duration> = match (self.route.timeout, client) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        limit.map(|d| (Instant::now() + d, d))
    }
}

/// The Host as sent (header, or the HTTP/2 authority), port included.
fn original_host(parts: &http::request::Parts) -> &str {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

/// The host for route matching and `ngx.var.host`: lowercase, without the
/// port; borrowed when the client already sent it lowercase.
pub fn request_host(parts: &http::request::Parts) -> std::borrow::Cow<'_, str> {
    let raw = original_host(parts);
    let without_port = if raw.starts_with('[') {
        raw.split_once(']').map_or(raw, |(h, _)| h).trim_start_matches('[')
    } else {
        raw.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(raw, |(h, _)| h)
    };
    if without_port.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(without_port.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(without_port)
    }
}
