//! Where the pipeline meets Lua: a route's scripts run at their phases —
//! rewrite and access before the upstream (either may answer), content
//! instead of it, balancer at each try, header_filter on the response head,
//! body_filter and log through the response body (`body::LuaTail`).
//! Routes without scripts never come here.
//!
//! The phases that may answer run with an output stream (`resp::Stream`):
//! when the script sends the head before it ends (`ngx.flush`, output past
//! the buffer, `ngx.eof`), the response goes out at once and the rest of the
//! phase runs on in its own task, writing the body as it goes.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;

use super::body::{as_phase, LuaTail, PhaseFuture, ResponseBody};
use super::pipeline::ConnInfo;
use super::respond;
use crate::config::snapshot::Route;
use crate::config::Snapshot;
use crate::error::ProxyError;
use crate::lua::ngx::resp;
use crate::lua::request::{LuaRequest, Shared};
use crate::lua::runtime::Begun;
use crate::lua::{runtime, Outcome, Phase, RouteLua, Runtime, Script};
use crate::observe::access_log::LogRecord;
use crate::protocol::grpc;

/// The request body after the Lua phases: still streaming, or read by `ngx.req.read_body` / set by a script.
pub enum ClientBody {
    Stream(Incoming),
    Read(Bytes),
}

pub struct LuaCtx {
    pub runtime: Rc<Runtime>,
    pub req: Shared,
    pub scripts: Arc<RouteLua>,
    pub is_grpc: bool,
}

/// What the request phases decided.
pub enum Flow {
    Continue,
    Respond(Box<Response<ResponseBody>>),
}

/// How a phase that may answer went.
enum Ran {
    /// It ended without sending the head.
    Done(Outcome),
    /// It sent the head: the response, its body written by the phase (maybe still running).
    Answered(Box<Response<ResponseBody>>),
}

impl LuaCtx {
    pub fn start(
        snap: &Snapshot,
        route: &Route,
        parts: http::request::Parts,
        body: Incoming,
        conn: &ConnInfo,
        is_grpc: bool,
        started: std::time::Instant,
    ) -> Result<Self, ProxyError> {
        let runtime = runtime::get(snap.generation, &snap.lua).map_err(|e| {
            tracing::error!(target: "lua", error = %e, "cannot start the Lua state");
            ProxyError::Lua(format!("cannot start the Lua state: {e}"))
        })?;
        let mut parts = parts;
        // HTTP/2 requests carry the host in the authority: scripts read it as the Host header.
        if let Some(authority) = parts.uri.authority().filter(|_| !parts.headers.contains_key(http::header::HOST)) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        let (client, server, route_name) = (conn.client, conn.listener.addr, Arc::clone(&route.name));
        let mut r = LuaRequest::new(parts, client, server, conn.tls, route_name, is_grpc, started);
        r.incoming = Some(body);
        r.body_limit = route.client_max_body_size;
        r.body_timeout = snap.limits.client_body_timeout;
        let scripts = route.lua.clone().ok_or_else(|| ProxyError::Lua("the route has no Lua scripts".into()))?;
        Ok(Self { runtime, req: Rc::new(RefCell::new(r)), scripts, is_grpc })
    }

    /// rewrite, then access: either may answer the request.
    pub async fn request_phases(&self, log: &mut Option<LogRecord>) -> Flow {
        match self.request_phase(Phase::Rewrite, log).await {
            Flow::Continue => self.request_phase(Phase::Access, log).await,
            answered => answered,
        }
    }

    /// The rewrite or the access phase (the route's limits run between them, as nginx's preaccess).
    pub async fn request_phase(&self, phase: Phase, log: &mut Option<LogRecord>) -> Flow {
        let script = match phase {
            Phase::Rewrite => &self.scripts.rewrite,
            _ => &self.scripts.access,
        };
        let Some(script) = script else { return Flow::Continue };
        match self.answering(phase, script, log).await {
            // Headers sent: the request is answered, whatever the phase returned (as lua-nginx-module).
            Ran::Answered(resp) => Flow::Respond(resp),
            Ran::Done(Outcome::Continue) => Flow::Continue,
            Ran::Done(Outcome::Exit(code)) => Flow::Respond(Box::new(self.exit_response(code, log.take()))),
            Ran::Done(Outcome::Error(msg)) => {
                Flow::Respond(Box::new(respond::error(&ProxyError::Lua(msg), self.is_grpc, log.take())))
            }
        }
    }

    /// The content phase answers instead of an upstream.
    pub async fn content(&self, mut log: Option<LogRecord>) -> Response<ResponseBody> {
        let Some(script) = &self.scripts.content else {
            return respond::error(&ProxyError::Lua("route has no content script".into()), self.is_grpc, log);
        };
        match self.answering(Phase::Content, script, &mut log).await {
            Ran::Answered(resp) => *resp,
            Ran::Done(Outcome::Continue) => self.exit_response(0, log),
            Ran::Done(Outcome::Exit(code)) => self.exit_response(code, log),
            Ran::Done(Outcome::Error(msg)) => respond::error(&ProxyError::Lua(msg), self.is_grpc, log),
        }
    }

    /// Run a phase that may answer with an output stream. It is polled here
    /// until it ends or sends the head; in the latter case the response is
    /// built at once and the phase, if not over, goes on in its own task.
    async fn answering(&self, phase: Phase, script: &Arc<Script>, log: &mut Option<LogRecord>) -> Ran {
        self.req.borrow_mut().resp.stream = Some(resp::Stream::default());
        let mut rest = None;
        let ended = match Runtime::begin(&self.runtime, phase, script, &self.req) {
            Begun::Over(outcome) => Some(outcome),
            Begun::Running(run) => {
                let fut: &mut PhaseFuture = rest.insert(Box::pin(as_phase(Rc::clone(&self.req), phase, run)));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(outcome) = fut.as_mut().poll(cx) {
                        return Poll::Ready(Some(outcome));
                    }
                    let mut r = self.req.borrow_mut();
                    if r.resp.headers_sent {
                        return Poll::Ready(None);
                    }
                    if let Some(stream) = &mut r.resp.stream {
                        stream.set_waker(cx.waker());
                    }
                    Poll::Pending
                })
                .await
            }
        };
        if !self.req.borrow().resp.headers_sent {
            self.req.borrow_mut().resp.stream = None;
            return Ran::Done(ended.unwrap_or(Outcome::Continue));
        }
        let resp = self.head_response(log.take());
        let (None, Some(fut)) = (&ended, rest) else {
            end_stream(&self.req, ended.unwrap_or(Outcome::Continue));
            return Ran::Answered(Box::new(resp));
        };
        // The head went out while the phase runs on: it goes on in its own task.
        let req = Rc::clone(&self.req);
        let task = tokio::task::spawn_local(async move {
            let outcome = fut.await;
            end_stream(&req, outcome);
        });
        let (head, body) = resp.into_parts();
        Ran::Answered(Box::new(Response::from_parts(head, body.written_by(task))))
    }

    /// The response once the head went out: the body streams from the
    /// phase's output, or (`ngx.eof` before any flush) is the buffered output.
    fn head_response(&self, mut log: Option<LogRecord>) -> Response<ResponseBody> {
        let rx = self.req.borrow_mut().resp.stream.as_mut().and_then(|s| s.take_receiver());
        let Some(rx) = rx else { return self.exit_response(0, log) };
        let mut r = self.req.borrow_mut();
        let status = StatusCode::from_u16(r.resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut headers = std::mem::take(&mut r.resp.headers);
        if !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if let Some(log) = &mut log {
            log.status = status.as_u16();
        }
        let mut resp = Response::new(ResponseBody::channel(rx, log));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// The answer for `ngx.exit(code)` (0 = the output so far, as a finished content phase).
    fn exit_response(&self, code: i64, mut log: Option<LogRecord>) -> Response<ResponseBody> {
        let mut r = self.req.borrow_mut();
        if let Some((grpc_code, message)) = r.grpc_exit.take() {
            return respond::grpc_status(grpc_code, &message, log);
        }
        if code == -1 {
            return respond::error(&ProxyError::Lua("ngx.exit(ngx.ERROR)".into()), self.is_grpc, log);
        }
        // Output already written means OpenResty had sent the headers: the exit code no longer changes the status.
        let sent = !r.resp.body.is_empty() && r.resp.status != 0;
        let status = match code {
            _ if sent => r.resp.status,
            c if c >= 200 => c as u16,
            _ if r.resp.status != 0 => r.resp.status,
            _ => 200,
        };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if self.is_grpc && status != StatusCode::OK {
            let reason = status.canonical_reason().unwrap_or("error");
            return respond::grpc_status(grpc::from_http_status(status.as_u16()), reason, log);
        }
        let mut body = std::mem::take(&mut r.resp.body).freeze();
        let mut headers = std::mem::take(&mut r.resp.headers);
        // Like nginx: an exit with an error or redirect status and no output gets the built-in page.
        if body.is_empty() && code >= 300 {
            if let Some(page) = respond::error_page(status) {
                body = page;
                headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            }
        }
        if !headers.contains_key(http::header::CONTENT_TYPE) && !body.is_empty() {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if let Some(log) = &mut log {
            log.status = status.as_u16();
        }
        let mut resp = Response::new(ResponseBody::full(body, log));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// The request as the scripts left it, for the upstream.
    pub fn take_request(&self) -> (http::request::Parts, ClientBody) {
        let mut r = self.req.borrow_mut();
        let body = match (r.body.clone(), r.incoming.take()) {
            (Some(b), _) => ClientBody::Read(b),
            (None, Some(i)) => ClientBody::Stream(i),
            (None, None) => ClientBody::Read(Bytes::new()),
        };
        // Later phases read the request (ngx.var, ngx.req): keep a copy only if any will run.
        let s = &self.scripts;
        let later = s.balancer.is_some() || s.header_filter.is_some() || s.body_filter.is_some() || s.log.is_some();
        let parts = if later {
            r.parts.clone()
        } else {
            std::mem::replace(&mut r.parts, http::Request::new(()).into_parts().0)
        };
        (parts, body)
    }

    pub fn balancer(&self) -> Option<LuaBalancer> {
        self.scripts.balancer.clone().map(|script| LuaBalancer {
            runtime: Rc::clone(&self.runtime),
            script,
            req: Rc::clone(&self.req),
        })
    }

    /// No later script reads the response, no script changed its headers,
    /// and no phase that answered runs on (it reads the headers it sent):
    /// the response goes out untouched, without [`respond`](Self::respond).
    pub fn passes_through(&self) -> bool {
        let s = &self.scripts;
        s.header_filter.is_none() && s.body_filter.is_none() && s.log.is_none() && {
            let r = self.req.borrow();
            r.resp.headers.is_empty() && !r.resp.headers_sent
        }
    }

    /// header_filter on the response head; body_filter and log ride on the body.
    pub async fn respond(
        &self,
        resp: Response<ResponseBody>,
        upstream: Option<(SocketAddr, std::time::Duration)>,
    ) -> Response<ResponseBody> {
        let (mut head, body) = resp.into_parts();
        {
            let mut r = self.req.borrow_mut();
            r.resp.status = head.status.as_u16();
            // Headers scripts set before the response existed (rewrite/access) replace the response's own.
            let early = std::mem::take(&mut r.resp.headers);
            r.resp.headers = std::mem::take(&mut head.headers);
            r.resp.headers.extend(early);
            if let Some((addr, time)) = upstream {
                r.upstream.addr = Some(addr);
                r.upstream.status = Some(head.status.as_u16());
                r.upstream.response_time = Some(time);
            }
        }
        let mut body = body;
        if let Some(script) = &self.scripts.header_filter {
            // A phase that answered may still run: its ngx.exit state is its own.
            let exit = self.req.borrow().exit;
            let outcome = match Runtime::begin(&self.runtime, Phase::HeaderFilter, script, &self.req) {
                Begun::Over(outcome) => outcome,
                Begun::Running(run) => as_phase(Rc::clone(&self.req), Phase::HeaderFilter, run).await,
            };
            if self.req.borrow().resp.headers_sent {
                self.req.borrow_mut().exit = exit;
            }
            match outcome {
                Outcome::Error(msg) => {
                    let mut r = self.req.borrow_mut();
                    r.resp.status = 500;
                    drop(r);
                    body.set_error(msg);
                    return respond::error(
                        &ProxyError::Lua("header_filter failed".into()),
                        self.is_grpc,
                        body.take_log(),
                    );
                }
                // As OpenResty: the head is not sent yet, so the exit's status takes effect —
                // the response body is dropped for the status's page (none below 300) and
                // keeps only the headers header_filter set. ngx.exit(ngx.OK) only ends the filter.
                Outcome::Exit(code) if code != 0 => {
                    {
                        let mut r = self.req.borrow_mut();
                        let set = std::mem::take(&mut r.resp.filter_set);
                        let mut kept = http::HeaderMap::new();
                        for name in set {
                            for v in r.resp.headers.get_all(&name) {
                                kept.append(name.clone(), v.clone());
                            }
                        }
                        r.resp.headers = kept;
                        r.resp.body.clear();
                        r.resp.status = 0;
                    }
                    let log = body.take_log();
                    let resp = self.exit_response(code, log);
                    self.req.borrow_mut().resp.status = resp.status().as_u16();
                    return resp;
                }
                _ => {}
            }
        }
        {
            let mut r = self.req.borrow_mut();
            head.status = StatusCode::from_u16(r.resp.status).unwrap_or(head.status);
            // A phase still running after it answered reads the headers it sent.
            head.headers =
                if r.resp.headers_sent { r.resp.headers.clone() } else { std::mem::take(&mut r.resp.headers) };
            if self.scripts.body_filter.is_some() {
                head.headers.remove(http::header::CONTENT_LENGTH);
            }
        }
        body.set_status(head.status.as_u16());
        if self.scripts.body_filter.is_some() || self.scripts.log.is_some() {
            let tail = LuaTail::new(
                Rc::clone(&self.runtime),
                Rc::clone(&self.req),
                self.scripts.body_filter.clone(),
                self.scripts.log.clone(),
            );
            body = body.with_lua(tail);
        }
        Response::from_parts(head, body)
    }
}

/// A phase that answered ended: the rest of its output ends the body; a
/// failure (error, stopped script, `ngx.exit(ngx.ERROR)`) cuts it. Lua
/// errors were logged by the runtime.
fn end_stream(req: &Shared, outcome: Outcome) {
    let failure = match outcome {
        Outcome::Error(msg) => Some(msg),
        Outcome::Exit(-1) => Some("ngx.exit(ngx.ERROR) after sending the response head".to_string()),
        Outcome::Continue | Outcome::Exit(_) => None,
    };
    resp::finish(&mut req.borrow_mut(), failure);
}

/// The balancer phase, run before each try.
pub struct LuaBalancer {
    runtime: Rc<Runtime>,
    script: Arc<Script>,
    req: Shared,
}

/// The balancer script's choice for one try.
pub struct Choice {
    pub peer: Option<SocketAddr>,
    pub more_tries: u32,
    pub timeouts: (Option<std::time::Duration>, Option<std::time::Duration>, Option<std::time::Duration>),
}

impl LuaBalancer {
    pub async fn pick(&self, last_failure: Option<(&'static str, u16)>) -> Result<Choice, ProxyError> {
        {
            let mut r = self.req.borrow_mut();
            r.balancer.peer = None;
            r.balancer.last_failure = last_failure;
        }
        match self.runtime.run(Phase::Balancer, &self.script, &self.req).await {
            Outcome::Error(msg) => return Err(ProxyError::Lua(msg)),
            Outcome::Exit(code) if code != 0 => {
                return Err(ProxyError::Lua(format!("{}: ngx.exit({code}) in the balancer phase", self.script.name)))
            }
            _ => {}
        }
        let r = self.req.borrow();
        let b = &r.balancer;
        Ok(Choice {
            peer: b.peer,
            more_tries: b.more_tries,
            timeouts: (b.connect_timeout, b.send_timeout, b.read_timeout),
        })
    }
}
