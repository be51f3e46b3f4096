//! The response side of `ngx`: `ngx.say`, `ngx.print`, `ngx.flush`,
//! `ngx.eof`, `ngx.exit`, `ngx.redirect`, `ngx.status` and `ngx.header`.
//!
//! Output is buffered in the request. In the phases that may answer
//! (rewrite, access, content: those that get a [`Stream`]), the first
//! `ngx.flush`, output beyond [`OUTPUT_BUFFER`] or `ngx.eof` sends the
//! response head (`headers_sent`); from then on output goes to the client as
//! body chunks through the stream's channel (`phase::body` reads it) while
//! the script runs on. Without any of these, the response is sent when the
//! phase ends, in one piece. `ngx.exit` ends the running phase by raising a
//! sentinel error that the `pcall` wrapper lets through, where OpenResty
//! yields instead.

use std::ffi::c_int;
use std::task::Waker;

use bytes::{BufMut, Bytes};
use http::{HeaderName, HeaderValue};
use mlua::{ffi, Lua, MultiValue, Table, Value};
use tokio::sync::{mpsc, oneshot};

use super::cfn;
use crate::lua::ceiling;
use crate::lua::request::{self, LuaRequest};
use crate::lua::Phase;

/// Output a phase may buffer before the head goes out by itself (nginx's
/// output buffers).
pub const OUTPUT_BUFFER: usize = 64 * 1024;

/// What a streamed response body carries, in order.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    /// `ngx.flush(true)`: answered once everything before it was handed to the connection.
    Flushed(oneshot::Sender<()>),
    /// The phase failed after the head went out: the body is cut.
    Abort(String),
}

/// The output side of a phase that may answer (see `LuaResponse::stream`).
#[derive(Debug, Default)]
pub struct Stream {
    /// Body chunks, from the first flush until the body ends (eof, end of phase).
    tx: Option<mpsc::UnboundedSender<Chunk>>,
    /// Their receiving end, until the pipeline takes it with the head.
    rx: Option<mpsc::UnboundedReceiver<Chunk>>,
    /// The channel was opened (the body streams).
    opened: bool,
    /// The pipeline, waiting for the head or the end of the phase.
    waker: Option<Waker>,
}

impl Stream {
    /// Wake `waker` when the head goes out (a light thread may send it).
    pub fn set_waker(&mut self, waker: &Waker) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            self.waker = Some(waker.clone());
        }
    }

    /// The body's receiving end: `None` when the head went out with the whole body (`ngx.eof` before any flush).
    pub fn take_receiver(&mut self) -> Option<mpsc::UnboundedReceiver<Chunk>> {
        self.rx.take()
    }

    fn send(&mut self, chunk: Chunk) -> Result<(), ()> {
        if self.tx.is_none() && !self.opened {
            let (tx, rx) = mpsc::unbounded_channel();
            (self.tx, self.rx, self.opened) = (Some(tx), Some(rx), true);
        }
        self.tx.as_ref().ok_or(())?.send(chunk).map_err(|_| ())
    }
}

/// Fix the status and headers and let the pipeline send them.
fn send_head(r: &mut LuaRequest) {
    if r.resp.headers_sent {
        return;
    }
    r.resp.headers_sent = true;
    if r.resp.status == 0 {
        r.resp.status = 200;
    }
    if let Some(waker) = r.resp.stream.as_mut().and_then(|s| s.waker.take()) {
        waker.wake();
    }
}

/// Send the head if not yet sent and the buffered output as a body chunk;
/// `Err` when the client is gone. Only in phases with a stream.
fn push(r: &mut LuaRequest) -> Result<(), ()> {
    send_head(r);
    let body = r.resp.body.split().freeze();
    let Some(stream) = r.resp.stream.as_mut() else { return Ok(()) };
    if body.is_empty() && stream.opened {
        return if stream.tx.as_ref().is_some_and(|tx| !tx.is_closed()) { Ok(()) } else { Err(()) };
    }
    stream.send(Chunk::Data(body))
}

/// The phase that owned `r`'s stream ended after the head went out: send
/// what is left and end the body, or cut it (`failure`).
pub fn finish(r: &mut LuaRequest, failure: Option<String>) {
    let Some(mut stream) = r.resp.stream.take() else { return };
    let rest = r.resp.body.split().freeze();
    if let Some(tx) = stream.tx.take() {
        if !rest.is_empty() {
            let _ = tx.send(Chunk::Data(rest));
        }
        if let Some(msg) = failure {
            let _ = tx.send(Chunk::Abort(msg));
        }
    }
}

/// `ngx.headers_sent`: the head went out (nginx sets it after the header filters ran).
pub fn headers_sent() -> bool {
    request::current().is_some_and(|r| {
        r.try_borrow().is_ok_and(|r| match r.phase {
            Phase::HeaderFilter => false,
            Phase::BodyFilter | Phase::Log => true,
            _ => r.resp.headers_sent,
        })
    })
}

/// `ngx.flush(wait?)`.
async fn flush(wait: bool) -> mlua::Result<(Option<i64>, Option<&'static str>)> {
    let ack = request::with("ngx.flush", |r| -> Result<Option<oneshot::Receiver<()>>, &'static str> {
        if r.resp.eof {
            return Err("seen eof");
        }
        if r.resp.stream.is_none() {
            return Ok(None);
        }
        if !r.resp.headers_sent && r.resp.body.is_empty() {
            return Err("nothing to flush");
        }
        push(r).map_err(|()| "nginx output filter error")?;
        if !wait {
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        let stream = r.resp.stream.as_mut().ok_or("nginx output filter error")?;
        stream.send(Chunk::Flushed(tx)).map_err(|()| "nginx output filter error")?;
        Ok(Some(rx))
    })?;
    Ok(match ack {
        Err(e) => (None, Some(e)),
        Ok(None) => (Some(1), None),
        Ok(Some(rx)) => match rx.await {
            Ok(()) => (Some(1), None),
            // The response body was dropped: the client is gone.
            Err(_) => (None, Some("client aborted")),
        },
    })
}

/// True while an `ngx.exit` of the current request unwinds (pcall must re-raise).
pub fn exiting() -> bool {
    request::current().is_some_and(|r| r.try_borrow().is_ok_and(|r| r.exit.is_some() && r.phase != Phase::HeaderFilter))
}

/// Append a say/print argument the way lua-nginx-module does: strings,
/// numbers, booleans, nil, ngx.null, and (nested) arrays of those.
fn append(out: &mut bytes::BytesMut, v: &Value, depth: usize) -> mlua::Result<()> {
    match v {
        Value::String(s) => out.put_slice(&s.as_bytes()),
        Value::Integer(i) => out.put_slice(super::format_number(*i as f64).as_bytes()),
        Value::Number(n) => out.put_slice(super::format_number(*n).as_bytes()),
        Value::Boolean(b) => out.put_slice(if *b { b"true" } else { b"false" }),
        Value::Nil => out.put_slice(b"nil"),
        Value::LightUserData(p) if p.0.is_null() => out.put_slice(b"null"),
        Value::Table(t) if depth < 32 => {
            let len = t.raw_len();
            let mut keys = 0usize;
            for kv in t.clone().pairs::<Value, Value>() {
                let (k, _) = kv?;
                keys += 1;
                if !matches!(k, Value::Integer(i) if i >= 1 && i as usize <= len)
                    && !matches!(k, Value::Number(n) if n.fract() == 0.0 && n >= 1.0 && n as usize <= len)
                {
                    return Err(mlua::Error::RuntimeError("bad argument #1 to 'say' (non-array table found)".into()));
                }
            }
            if keys != len {
                return Err(mlua::Error::RuntimeError("bad argument #1 to 'say' (non-array table found)".into()));
            }
            for item in t.clone().sequence_values::<Value>() {
                append(out, &item?, depth + 1)?;
            }
        }
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "bad argument #1 to 'say' (string, number, boolean, nil, ngx.null, or array table expected, got {})",
                other.type_name()
            )))
        }
    }
    Ok(())
}

fn output(args: MultiValue, newline: bool, api: &str) -> mlua::Result<(Option<i64>, Option<String>)> {
    request::with(api, |r| {
        if r.resp.eof {
            return Ok((None, Some("seen eof".to_string())));
        }
        // All arguments are checked before anything is written, as lua-nginx-module does.
        let mut out = bytes::BytesMut::new();
        for v in args.iter() {
            append(&mut out, v, 0)?;
        }
        if newline {
            out.put_u8(b'\n');
        }
        r.resp.body.extend_from_slice(&out);
        if r.resp.stream.is_some() && (r.resp.headers_sent || r.resp.body.len() > OUTPUT_BUFFER) && push(r).is_err() {
            return Ok((None, Some("nginx output filter error".to_string())));
        }
        Ok((Some(1), None))
    })?
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    ngx.set("say", lua.create_function(|_, args: MultiValue| output(args, true, "ngx.say"))?)?;
    ngx.set("print", lua.create_function(|_, args: MultiValue| output(args, false, "ngx.print"))?)?;
    ngx.set(
        "flush",
        crate::lua::coroutine::async_function(lua, |_, wait: Option<bool>| flush(wait.unwrap_or(false)))?,
    )?;
    ngx.set(
        "send_headers",
        lua.create_function(|_, ()| {
            request::with("ngx.send_headers", |r| {
                if r.resp.headers_sent {
                    return Ok((None, Some("header already sent")));
                }
                if r.resp.stream.is_none() {
                    let phase = r.phase.name();
                    return Err(mlua::Error::RuntimeError(format!("API disabled in the context of {phase}")));
                }
                Ok(match push(r) {
                    Ok(()) => (Some(1), None),
                    Err(()) => (None, Some("nginx output filter error")),
                })
            })?
        })?,
    )?;
    ngx.set(
        "eof",
        lua.create_function(|_, ()| {
            request::with("ngx.eof", |r| {
                if r.resp.eof {
                    return (None, Some("seen eof"));
                }
                r.resp.eof = true;
                if r.resp.stream.is_some() {
                    send_head(r);
                    // A streaming body ends now; without one, the pipeline sends the buffered body whole.
                    if r.resp.stream.as_ref().is_some_and(|s| s.opened) {
                        let _ = push(r);
                        if let Some(s) = r.resp.stream.as_mut() {
                            s.tx = None;
                        }
                    }
                }
                (Some(1), None)
            })
        })?,
    )?;
    ngx.set(
        "exit",
        lua.create_function(|_, code: i64| -> mlua::Result<()> {
            let unwinds = request::with("ngx.exit", |r| {
                // As lua-nginx-module: a filter of the body or the log cannot end the request
                // (raised, the error aborts a body_filter's response).
                if matches!(r.phase, Phase::BodyFilter | Phase::Log) {
                    return Err(mlua::Error::RuntimeError(format!(
                        "API disabled in the context of {}_by_lua*",
                        r.phase.name()
                    )));
                }
                if r.resp.headers_sent
                    && r.phase != Phase::HeaderFilter
                    && code >= 300
                    && code != 444
                    && code != i64::from(r.resp.status)
                {
                    tracing::error!(
                        target: "lua",
                        "attempt to set status {code} via ngx.exit after sending out the response status {}",
                        r.resp.status
                    );
                }
                r.exit = Some(code);
                if r.phase == Phase::HeaderFilter {
                    // As lua-nginx-module: in header_filter the exit is noted and the
                    // script goes on; the pipeline applies it when the filter ends.
                    return Ok(false);
                }
                if code >= 200 && r.resp.status == 0 {
                    r.resp.status = code as u16;
                }
                Ok(true)
            })??;
            if unwinds {
                Err(mlua::Error::external(ExitError))
            } else {
                Ok(())
            }
        })?,
    )?;
    ngx.set(
        "redirect",
        lua.create_function(|_, (uri, status): (mlua::LuaString, Option<i64>)| -> mlua::Result<()> {
            let status = status.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(mlua::Error::RuntimeError(format!("only ngx.HTTP_MOVED_TEMPORARILY, ngx.HTTP_MOVED_PERMANENTLY, ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, and ngx.HTTP_TEMPORARY_REDIRECT are allowed, got {status}")));
            }
            let loc = HeaderValue::from_bytes(&uri.as_bytes())
                .map_err(|_| mlua::Error::RuntimeError("bad argument #1 to 'redirect' (invalid uri)".into()))?;
            request::with("ngx.redirect", |r| {
                if r.resp.headers_sent && r.phase != Phase::HeaderFilter {
                    return Err(mlua::Error::RuntimeError(
                        "attempt to call ngx.redirect after sending out the headers".into(),
                    ));
                }
                r.resp.headers.insert(http::header::LOCATION, loc);
                note_filter_set(r, &http::header::LOCATION);
                r.resp.status = status as u16;
                r.exit = Some(status);
                Ok(())
            })??;
            Err(mlua::Error::external(ExitError))
        })?,
    )?;

    let header = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, name): (Value, mlua::LuaString)| {
            let name = header_name(&name.to_str()?)?;
            let values: Vec<Vec<u8>> = request::with("ngx.header", |r| {
                r.resp.headers.get_all(&name).iter().map(|v| v.as_bytes().to_vec()).collect()
            })?;
            ceiling::lifted(lua, || match values.len() {
                0 => Ok(Value::Nil),
                1 => Ok(Value::String(lua.create_string(&values[0])?)),
                _ => Ok(Value::Table(lua.create_sequence_from(
                    values.iter().map(|v| lua.create_string(v)).collect::<mlua::Result<Vec<_>>>()?,
                )?)),
            })
        })?,
    )?;
    let general_set = lua.create_function(|_, (_, name, value): (Value, mlua::LuaString, Value)| {
        let name = header_name(&name.to_str()?)?;
        let values = header_values(&value)?;
        request::with("ngx.header", |r| {
            if !header_settable(r) {
                return Err(mlua::Error::RuntimeError(
                    "attempt to set ngx.header.HEADER after sending out response headers".into(),
                ));
            }
            r.resp.headers.remove(&name);
            for v in values {
                r.resp.headers.append(name.clone(), v);
            }
            note_filter_set(r, &name);
            Ok(())
        })?
    })?;
    mt.set("__newindex", cfn::closure(lua, general_set, set_header)?)?;
    header.set_metatable(Some(mt))?;
    ngx.set("header", header)?;
    Ok(())
}

/// Response headers can change until they are sent (header_filter may still change them).
fn header_settable(r: &LuaRequest) -> bool {
    r.phase == Phase::HeaderFilter || !(r.phase.is_after_headers() || r.resp.headers_sent)
}

/// `ngx.header.NAME = "value"` on the C API (`cfn`); lists, numbers, nil, a
/// request not there or headers already sent go to the general
/// `__newindex` (upvalue 1), which sets them or raises.
unsafe extern "C-unwind" fn set_header(state: *mut ffi::lua_State) -> c_int {
    let simple = ffi::lua_type(state, 2) == ffi::LUA_TSTRING
        && ffi::lua_type(state, 3) == ffi::LUA_TSTRING
        && request::current().is_some_and(|req| req.try_borrow().is_ok_and(|r| header_settable(&r)));
    if !simple {
        return cfn::delegate(state);
    }
    set_string_header(state, 2, "ngx.header", |r, name| {
        note_filter_set(r, name);
        &mut r.resp.headers
    })
}

/// Remembers a header header_filter set (see `LuaResponse::filter_set`).
fn note_filter_set(r: &mut LuaRequest, name: &http::HeaderName) {
    if r.phase == Phase::HeaderFilter && !r.resp.filter_set.contains(name) {
        r.resp.filter_set.push(name.clone());
    }
}

/// Sets the header named by the string at stack slot `at` to the string at
/// `at + 1`, replacing its values, in the header map `which` picks: the
/// C-API setters of `ngx.header` and `ngx.req.set_header`.
///
/// # Safety
/// A C function's `state`, both slots holding strings.
pub(super) unsafe fn set_string_header(
    state: *mut ffi::lua_State,
    at: c_int,
    api: &str,
    which: impl for<'a> FnOnce(&'a mut LuaRequest, &http::HeaderName) -> &'a mut http::HeaderMap,
) -> c_int {
    cfn::call(state, || {
        // The callers checked both are strings.
        let (name, value) = (cfn::string(state, at), cfn::string(state, at + 1));
        let name = header_name_bytes(name)?;
        let value = HeaderValue::from_bytes(value).map_err(|_| "invalid header value".to_string())?;
        let req = request::current().ok_or_else(|| request::outside_message(api))?;
        let mut r = req.try_borrow_mut().map_err(|_| format!("{api}: request busy"))?;
        // `insert` replaces every value the header had.
        which(&mut r, &name).insert(name, value);
        Ok(0)
    })
}

/// `ngx.status` read.
pub fn status() -> mlua::Result<i64> {
    request::with("ngx.status", |r| i64::from(r.resp.status))
}

/// `ngx.status = n`.
pub fn set_status(v: Value) -> mlua::Result<()> {
    let code = match v {
        Value::Integer(i) => i,
        Value::Number(n) => n as i64,
        Value::String(s) => s
            .to_str()?
            .trim()
            .parse()
            .map_err(|_| mlua::Error::RuntimeError("attempt to set ngx.status to a non-number".into()))?,
        _ => return Err(mlua::Error::RuntimeError("attempt to set ngx.status to a non-number".into())),
    };
    request::with("ngx.status", |r| {
        if r.phase != Phase::HeaderFilter && (r.phase.is_after_headers() || r.resp.headers_sent) {
            tracing::error!(target: "lua", "attempt to set ngx.status after sending out response headers");
            return;
        }
        r.resp.status = code.clamp(0, 999) as u16;
    })
}

/// `ngx.header.content_type` → `content-type`, as lua-nginx-module maps names.
pub fn header_name(name: &str) -> mlua::Result<HeaderName> {
    header_name_bytes(name.as_bytes()).map_err(mlua::Error::RuntimeError)
}

/// How many names [`header_name_bytes`] remembers (a power of two).
const NAME_CACHE: usize = 16;

/// A name as a script spelled it, and what it parsed to.
type Parsed = Option<(Box<[u8]>, HeaderName)>;

thread_local! {
    /// Names [`header_name_bytes`] parsed lately, as the script spelled them:
    /// a script sets the same few names on every request, and a clone of the
    /// parsed name (a copy, or a reference count) costs a fraction of parsing
    /// it again (~250 instructions, and an allocation for a non-standard name).
    static NAMES: std::cell::RefCell<[Parsed; NAME_CACHE]> =
        const { std::cell::RefCell::new([const { None }; NAME_CACHE]) };
}

/// [`header_name`] of raw bytes (`HeaderName::from_bytes` lowercases; only `_`
/// needs replacing, and only then is the name copied).
pub fn header_name_bytes(name: &[u8]) -> Result<HeaderName, String> {
    let slot = name.len().wrapping_add(name.last().map_or(0, |&b| usize::from(b))) % NAME_CACHE;
    let hit = NAMES.with(|c| match &c.borrow()[slot] {
        Some((spelled, parsed)) if **spelled == *name => Some(parsed.clone()),
        _ => None,
    });
    if let Some(parsed) = hit {
        return Ok(parsed);
    }
    let parsed = parse_header_name(name)?;
    NAMES.with(|c| c.borrow_mut()[slot] = Some((name.into(), parsed.clone())));
    Ok(parsed)
}

fn parse_header_name(name: &[u8]) -> Result<HeaderName, String> {
    let parsed = if name.contains(&b'_') {
        let dashed: Vec<u8> = name.iter().map(|&b| if b == b'_' { b'-' } else { b }).collect();
        HeaderName::from_bytes(&dashed)
    } else {
        HeaderName::from_bytes(name)
    };
    parsed.map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(name)))
}

/// A header value or list of them; nil clears.
pub fn header_values(v: &Value) -> mlua::Result<Vec<HeaderValue>> {
    let one = |v: &Value| -> mlua::Result<HeaderValue> {
        let s = match v {
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Integer(i) => i.to_string().into_bytes(),
            Value::Number(n) => super::format_number(*n).into_bytes(),
            Value::Boolean(b) => b.to_string().into_bytes(),
            other => return Err(mlua::Error::RuntimeError(format!("invalid header value type {}", other.type_name()))),
        };
        HeaderValue::from_bytes(&s).map_err(|_| mlua::Error::RuntimeError("invalid header value".into()))
    };
    match v {
        Value::Nil => Ok(vec![]),
        Value::Table(t) => t.clone().sequence_values::<Value>().map(|x| one(&x?)).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// The error `ngx.exit` raises; the pcall wrapper recognises the exit by the request state.
#[derive(Debug)]
struct ExitError;

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ngx.exit")
    }
}

impl std::error::Error for ExitError {}
