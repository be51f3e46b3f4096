//! Cosockets: `ngx.socket.tcp()` (alias `ngx.socket.stream`),
//! `ngx.socket.udp()` and the `ngx.socket.connect(host, port)` shortcut.
//!
//! Client libraries written for OpenResty (lua-resty-redis, lua-resty-http,
//! lua-resty-mysql, lua-resty-memcached...) talk to their servers through
//! these objects, so they follow lua-nginx-module's semantics closely: the
//! same method names, argument checks, return values and error strings
//! (`nil, "closed"`, `nil, "timeout", partial`, `"socket busy reading"`...),
//! the same per-worker keepalive pools (keyed by `host:port` or the `pool`
//! option, bounded by `pool_size`, idle timeout, `backlog` queueing) and the
//! same per-socket read buffer, so `receive("*l")` and `receiveuntil` work
//! on arbitrarily chunked input.
//!
//! Every method that waits is an async Rust function: the calling coroutine
//! yields to the worker's event loop and never blocks it. Unlike OpenResty,
//! cosockets work in every phase (header_filter, body_filter, log, balancer,
//! init_worker and timers included) and a socket may be used across
//! requests.
//!
//! Like OpenResty's, a socket object is a table holding its state (a
//! userdata) at index 1, with the methods in its metatable: calling a method
//! with `.` instead of `:` raises `bad argument #1 to 'connect' (table
//! expected, got string)`. Errors are raised as plain strings at the
//! caller's line, as the sibling `ngx` modules raise theirs.
//!
//! Names are resolved with the system resolver (getaddrinfo, /etc/hosts),
//! not nginx's `resolver` directive; TLS is rustls, verified against the
//! system CA bundle when `ssl_verify` is true.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use mlua::{Function, Lua, MultiValue, Table, UserData, Value};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UdpSocket, UnixDatagram, UnixStream};
use tokio::sync::{oneshot, Mutex, MutexGuard};
use tokio::time::Instant;

use super::format_number;
use super::raise::{api_function, raise, wrap};

/// lua_socket_connect_timeout / send_timeout / read_timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// lua_socket_pool_size.
const DEFAULT_POOL_SIZE: i64 = 30;
/// lua_socket_keepalive_timeout.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// How much a read asks the kernel for at a time.
const READ_CHUNK: usize = 8192;
/// `udpsock:receive()` without a size.
const UDP_DEFAULT_SIZE: usize = 8192;
const UDP_MAX_SIZE: usize = 65536;
/// Nesting depth of `send({...})` tables (guards against cyclic tables).
const MAX_SEND_DEPTH: usize = 100;

/// What a socket table holds at index 1.
struct Handle<T>(Rc<T>);

impl<T: 'static> UserData for Handle<T> {}

/// What `sslhandshake` returns when asked for a session. rustls resumes
/// sessions by itself (a per-worker cache keyed by server name), so this is
/// an opaque token: passing it back is accepted and changes nothing.
struct SslSession;

impl UserData for SslSession {}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let socket = lua.create_table()?;
    let tcp_mt = tcp_metatable(lua)?;
    let tcp = wrapped(lua, move |lua, args: MultiValue| {
        if !args.is_empty() {
            return Err(rt(format!("expecting zero arguments, but got {}", args.len())));
        }
        values(vec![Value::Table(new_object(lua, &tcp_mt, Tcp::default())?)])
    })?;
    socket.set("tcp", tcp.clone())?;
    socket.set("stream", tcp)?;

    let udp_mt = udp_metatable(lua)?;
    let udp = wrapped(lua, move |lua, args: MultiValue| {
        if !args.is_empty() {
            return Err(rt(format!("expecting zero arguments, but got {}", args.len())));
        }
        values(vec![Value::Table(new_object(lua, &udp_mt, Udp::default())?)])
    })?;
    socket.set("udp", udp)?;

    ngx.set("socket", socket.clone())?;
    lua.load(SHORTCUTS).set_name("=ngx.socket").call::<()>(socket)
}

/// The implementations report caller mistakes as `mlua::Error::RuntimeError`s; these are raised
/// as plain strings at the caller's line (see [`super::raise`]), other errors pass through.
fn raising(lua: &Lua, result: Ret) -> Ret {
    match result {
        Err(mlua::Error::RuntimeError(msg)) => raise(lua, msg),
        other => other,
    }
}

fn wrapped<F>(lua: &Lua, f: F) -> mlua::Result<Function>
where
    F: Fn(&Lua, MultiValue) -> Ret + 'static,
{
    api_function(lua, move |lua, args| raising(lua, f(lua, args)))
}

fn wrapped_async<F, Fut>(lua: &Lua, f: F) -> mlua::Result<Function>
where
    F: Fn(Lua, MultiValue) -> Fut + 'static,
    Fut: Future<Output = Ret> + 'static,
{
    let f = crate::lua::coroutine::async_function(lua, move |lua, args: MultiValue| {
        let fut = f(lua.clone(), args);
        async move { raising(&lua, fut.await) }
    })?;
    wrap(lua, f)
}

/// `ngx.socket.connect(host, port, opts?)` = `tcp()` + `connect`.
const SHORTCUTS: &str = r#"
local socket = ...
local tcp = socket.tcp
socket.connect = function(...)
    local sock = tcp()
    local ok, err = sock:connect(...)
    if not ok then
        return nil, err
    end
    return sock
end
"#;

fn new_object<T: 'static>(lua: &Lua, mt: &Table, state: T) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(1, lua.create_userdata(Handle(Rc::new(state)))?)?;
    t.set_metatable(Some(mt.clone()))?;
    Ok(t)
}

type Ret = mlua::Result<MultiValue>;

fn add_sync(lua: &Lua, methods: &Table, name: &str, f: fn(&Lua, Vec<Value>) -> Ret) -> mlua::Result<()> {
    methods.set(name, wrapped(lua, move |lua, args| f(lua, args.into_vec()))?)
}

fn add_async<F, Fut>(lua: &Lua, methods: &Table, name: &str, f: F) -> mlua::Result<()>
where
    F: Fn(Lua, Vec<Value>) -> Fut + 'static,
    Fut: Future<Output = Ret> + 'static,
{
    methods.set(name, wrapped_async(lua, move |lua, args| f(lua, args.into_vec()))?)
}

fn tcp_metatable(lua: &Lua) -> mlua::Result<Table> {
    let methods = lua.create_table()?;
    add_async(lua, &methods, "connect", tcp_connect)?;
    add_async(lua, &methods, "sslhandshake", tcp_sslhandshake)?;
    add_async(lua, &methods, "tlshandshake", tcp_tlshandshake)?;
    add_async(lua, &methods, "send", tcp_send)?;
    add_async(lua, &methods, "receive", tcp_receive)?;
    add_async(lua, &methods, "receiveany", tcp_receiveany)?;
    add_sync(lua, &methods, "receiveuntil", tcp_receiveuntil)?;
    add_sync(lua, &methods, "close", tcp_close)?;
    add_sync(lua, &methods, "settimeout", tcp_settimeout)?;
    add_sync(lua, &methods, "settimeouts", tcp_settimeouts)?;
    add_sync(lua, &methods, "setkeepalive", tcp_setkeepalive)?;
    add_sync(lua, &methods, "getreusedtimes", tcp_getreusedtimes)?;
    add_sync(lua, &methods, "setoption", tcp_setoption)?;
    add_sync(lua, &methods, "getoption", tcp_getoption)?;
    let mt = lua.create_table()?;
    mt.set("__index", methods)?;
    Ok(mt)
}

fn udp_metatable(lua: &Lua) -> mlua::Result<Table> {
    let methods = lua.create_table()?;
    add_async(lua, &methods, "setpeername", udp_setpeername)?;
    add_async(lua, &methods, "send", udp_send)?;
    add_async(lua, &methods, "receive", udp_receive)?;
    add_sync(lua, &methods, "settimeout", udp_settimeout)?;
    add_sync(lua, &methods, "close", udp_close)?;
    let mt = lua.create_table()?;
    mt.set("__index", methods)?;
    Ok(mt)
}

// ---------------------------------------------------------------------------
// Argument and return-value helpers (luaL_check* wording).

fn rt(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(msg.into())
}

fn arg_error(n: usize, func: &str, msg: &str) -> mlua::Error {
    rt(format!("bad argument #{n} to '{func}' ({msg})"))
}

/// Lua's own type names (`lua_typename`).
fn type_name(v: Option<&Value>) -> &'static str {
    match v {
        None => "no value",
        Some(Value::Integer(_)) | Some(Value::Number(_)) => "number",
        Some(Value::LightUserData(_)) => "userdata",
        Some(v) => v.type_name(),
    }
}

/// The object a method was called on (index 1 of the socket table); `None`
/// for a table that is not a socket of this kind (OpenResty: "closed").
fn this<T: 'static>(args: &[Value], func: &str) -> mlua::Result<Option<Rc<T>>> {
    match args.first() {
        Some(Value::Table(t)) => Ok(match t.raw_get::<Value>(1)? {
            Value::UserData(ud) => ud.borrow::<Handle<T>>().ok().map(|h| Rc::clone(&h.0)),
            _ => None,
        }),
        other => Err(arg_error(1, func, &format!("table expected, got {}", type_name(other)))),
    }
}

/// luaL_checklstring: strings, or numbers converted the way Lua prints them.
fn check_bytes(v: Option<&Value>, n: usize, func: &str) -> mlua::Result<Vec<u8>> {
    match v {
        Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(Value::Integer(i)) => Ok(i.to_string().into_bytes()),
        Some(Value::Number(f)) => Ok(format_number(*f).into_bytes()),
        other => Err(arg_error(n, func, &format!("string expected, got {}", type_name(other)))),
    }
}

/// lua_tonumber: numbers and numeric strings.
fn to_number(lua: &Lua, v: Option<&Value>) -> Option<f64> {
    match v {
        Some(Value::Integer(i)) => Some(*i as f64),
        Some(Value::Number(f)) => Some(*f),
        Some(v @ Value::String(_)) => lua.coerce_number(v.clone()).ok().flatten(),
        _ => None,
    }
}

/// luaL_checkinteger.
fn check_integer(lua: &Lua, v: Option<&Value>, n: usize, func: &str) -> mlua::Result<i64> {
    to_number(lua, v)
        .map(|f| f as i64)
        .ok_or_else(|| arg_error(n, func, &format!("number expected, got {}", type_name(v))))
}

fn truthy(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

fn values(v: Vec<Value>) -> Ret {
    Ok(MultiValue::from_vec(v))
}

fn fail(lua: &Lua, msg: &str) -> Ret {
    values(vec![Value::Nil, Value::String(lua.create_string(msg)?)])
}

fn fail_partial(lua: &Lua, msg: &str, partial: &[u8]) -> Ret {
    values(vec![Value::Nil, Value::String(lua.create_string(msg)?), Value::String(lua.create_string(partial)?)])
}

fn data(lua: &Lua, bytes: &[u8]) -> Ret {
    values(vec![Value::String(lua.create_string(bytes)?)])
}

/// What `settimeout` and `settimeouts` return: a single nil (lua-nginx-module returns no value).
fn single_nil() -> Ret {
    values(vec![Value::Nil])
}

fn int(n: i64) -> Ret {
    values(vec![Value::Integer(n)])
}

/// `settimeout` values: `timeout >> 31` must be 0 ("bad timeout value").
fn timeout_arg(lua: &Lua, v: Option<&Value>) -> mlua::Result<i64> {
    let ms = to_number(lua, v).unwrap_or(0.0) as i64;
    if ms >> 31 != 0 {
        return Err(rt("bad timeout value"));
    }
    Ok(ms)
}

/// A timeout set by `settimeout(s)`: 0 means the default.
fn ms_or_default(ms: i64) -> Duration {
    if ms > 0 {
        Duration::from_millis(ms as u64)
    } else {
        DEFAULT_TIMEOUT
    }
}

/// strerror() in lower case, as LuaSocket and lua-nginx-module report errors.
fn errstr(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout".into();
    }
    let s = e.to_string();
    let s = s.find(" (os error").map_or(&s[..], |i| &s[..i]);
    s.to_ascii_lowercase()
}

/// The bytes `send` puts on the wire for `v` (string, number, boolean, nil,
/// or an array table of strings, numbers and such tables).
fn send_data(v: Option<&Value>, func: &str) -> mlua::Result<Vec<u8>> {
    let mut out = Vec::new();
    match v {
        Some(Value::String(s)) => out.extend_from_slice(&s.as_bytes()),
        Some(Value::Integer(i)) => out.extend_from_slice(i.to_string().as_bytes()),
        Some(Value::Number(f)) => out.extend_from_slice(format_number(*f).as_bytes()),
        Some(Value::Nil) => out.extend_from_slice(b"nil"),
        Some(Value::Boolean(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Some(Value::Table(t)) => table_data(t, func, 0, &mut out)?,
        other => {
            return Err(arg_error(
                2,
                func,
                &format!("string, number, boolean, nil, or array table expected, got {}", type_name(other)),
            ))
        }
    }
    Ok(out)
}

fn table_data(t: &Table, func: &str, depth: usize, out: &mut Vec<u8>) -> mlua::Result<()> {
    if depth > MAX_SEND_DEPTH {
        return Err(arg_error(2, func, "table nesting too deep"));
    }
    let mut max = 0i64;
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair?;
        let key = match k {
            Value::Integer(i) if i >= 1 => i,
            Value::Number(f) if f >= 1.0 && f.fract() == 0.0 => f as i64,
            _ => return Err(arg_error(2, func, "non-array table found")),
        };
        max = max.max(key);
    }
    for i in 1..=max {
        match t.raw_get::<Value>(i)? {
            Value::String(s) => out.extend_from_slice(&s.as_bytes()),
            Value::Integer(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Value::Number(f) => out.extend_from_slice(format_number(f).as_bytes()),
            Value::Table(inner) => table_data(&inner, func, depth + 1, out)?,
            other => return Err(arg_error(2, func, &format!("bad data type {} found", type_name(Some(&other))))),
        }
    }
    Ok(())
}

/// Sets a flag for as long as it lives.
struct Flag<'a>(&'a Cell<bool>);

impl<'a> Flag<'a> {
    fn set(cell: &'a Cell<bool>) -> Self {
        cell.set(true);
        Self(cell)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

// ---------------------------------------------------------------------------
// Connections.

/// A connected byte stream: TCP, unix, or TLS over either.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<Stream>>),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tls(s) => s.get_ref().0.fd(),
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Self::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Self::Unix(_) => None,
            Self::Tls(s) => s.get_ref().0.peer_ip(),
        }
    }

    /// True when reading would not wait: the peer closed or sent something.
    fn readable_now(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(self).poll_read(&mut cx, &mut buf).is_ready()
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn unix_path(host: &str) -> Option<&str> {
    (host.len() >= 5 && host[..5].eq_ignore_ascii_case("unix:")).then(|| &host[5..])
}

/// Resolve `host` (an IP literal, `[v6]`, or a name via the system resolver).
async fn resolve(host: &str, port: u16, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if bare.is_empty() {
        return Err(format!("failed to parse host name \"{host}\": no host"));
    }
    match tokio::time::timeout_at(deadline, tokio::net::lookup_host((bare, port))).await {
        Err(_) => Err(format!("{host} could not be resolved (110: Operation timed out)")),
        Ok(Err(_)) => Err(format!("{host} could not be resolved (3: Host not found)")),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                return Err(format!("{host} could not be resolved (3: Host not found)"));
            }
            Ok(addrs)
        }
    }
}

/// Open a connection to `host:port` or `unix:/path` within `timeout`. A name
/// with several addresses: start at a random one (as nginx's resolver), try
/// the others if it refuses.
async fn open(host: &str, port: Option<u16>, timeout: Duration) -> Result<Stream, String> {
    let deadline = Instant::now() + timeout;
    if let Some(path) = unix_path(host) {
        return match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
            Err(_) => Err("timeout".into()),
            Ok(Err(e)) => Err(errstr(&e)),
            Ok(Ok(s)) => Ok(Stream::Unix(s)),
        };
    }
    let addrs = resolve(host, port.unwrap_or(0), deadline).await?;
    let start = fastrand::usize(..addrs.len());
    let mut last = String::from("error");
    for i in 0..addrs.len() {
        let addr = addrs[(start + i) % addrs.len()];
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(e)) => last = errstr(&e),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(Stream::Tcp(s));
            }
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------
// The TCP socket object.

/// The read side of a connection and the bytes received but not yet consumed.
struct Reader {
    half: ReadHalf<Stream>,
    buf: BytesMut,
    /// The peer closed its side (everything left is in `buf`).
    eof: bool,
}

type Writer = WriteHalf<Stream>;

#[derive(Debug)]
enum ReadErr {
    Closed,
    Timeout,
    Io(String),
    /// More buffered than the Lua state could hold as a string.
    TooLarge,
}

impl ReadErr {
    fn msg(&self) -> &str {
        match self {
            Self::Closed => "closed",
            Self::Timeout => "timeout",
            Self::Io(s) => s,
            Self::TooLarge => "not enough memory",
        }
    }
}

/// What a read waits for.
enum Op {
    /// `*l`: a line, without its `\n` and without any `\r`.
    Line,
    /// `*a`: everything until the peer closes.
    All,
    /// `n`: exactly n bytes.
    Bytes(usize),
    /// `receiveany(max)`: whatever is there, at most max bytes.
    Any(usize),
    /// A `receiveuntil` iterator call.
    Until { pat: Rc<[u8]>, inclusive: bool, size: Option<usize>, done: Rc<Cell<bool>> },
}

fn strip_cr(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().copied().filter(|&b| b != b'\r').collect()
}

fn find(hay: &[u8], pat: &[u8], from: usize) -> Option<usize> {
    if hay.len() < pat.len() || from > hay.len() - pat.len() {
        return None;
    }
    hay[from..].windows(pat.len()).position(|w| w == pat).map(|p| p + from)
}

/// The length of the longest tail of `hay` that could start `pat`.
fn pending_prefix(hay: &[u8], pat: &[u8]) -> usize {
    (1..pat.len().min(hay.len() + 1)).rev().find(|&k| hay.ends_with(&pat[..k])).unwrap_or(0)
}

impl Reader {
    /// Read more from the peer (each wait for data gets the whole timeout).
    async fn fill(&mut self, timeout: Duration) -> Result<(), ReadErr> {
        if crate::lua::ceiling::exceeds(self.buf.len()) {
            // A line or body larger than the Lua memory ceiling could never be returned.
            return Err(ReadErr::TooLarge);
        }
        self.buf.reserve(READ_CHUNK);
        match tokio::time::timeout(timeout, self.half.read_buf(&mut self.buf)).await {
            Err(_) => Err(ReadErr::Timeout),
            Ok(Ok(0)) => {
                self.eof = true;
                Ok(())
            }
            Ok(Ok(_)) => Ok(()),
            // A TLS peer that closes without close_notify.
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.eof = true;
                Ok(())
            }
            Ok(Err(e)) => Err(ReadErr::Io(errstr(&e))),
        }
    }

    fn take_all(&mut self) -> Vec<u8> {
        self.buf.split().to_vec()
    }

    /// Run `op`; on failure, the partial data (consumed) comes with the error.
    async fn read(&mut self, op: &Op, timeout: Duration) -> Result<Vec<u8>, (ReadErr, Vec<u8>)> {
        let mut from = 0;
        loop {
            match op {
                Op::Line => {
                    if let Some(i) = self.buf[from..].iter().position(|&b| b == b'\n') {
                        let line = self.buf.split_to(from + i + 1);
                        return Ok(strip_cr(&line[..line.len() - 1]));
                    }
                    from = self.buf.len();
                }
                Op::All => {
                    if self.eof {
                        return Ok(self.take_all());
                    }
                }
                Op::Bytes(n) => {
                    if self.buf.len() >= *n {
                        return Ok(self.buf.split_to(*n).to_vec());
                    }
                }
                Op::Any(max) => {
                    if !self.buf.is_empty() {
                        let n = self.buf.len().min(*max);
                        return Ok(self.buf.split_to(n).to_vec());
                    }
                }
                Op::Until { pat, inclusive, size, done } => {
                    if let Some(i) = find(&self.buf, pat, from) {
                        // As OpenResty: `size` bytes are returned as soon as
                        // they are known to precede the pattern, even when the
                        // pattern comes right after them (the next call then
                        // returns "").
                        if let Some(size) = size.filter(|&s| i >= s) {
                            return Ok(self.buf.split_to(size).to_vec());
                        }
                        let mut out = self.buf.split_to(i).to_vec();
                        self.buf.advance(pat.len());
                        if *inclusive {
                            out.extend_from_slice(pat);
                        }
                        if size.is_some() {
                            done.set(true);
                        }
                        return Ok(out);
                    }
                    if let Some(size) = *size {
                        if self.buf.len() - pending_prefix(&self.buf, pat) >= size {
                            return Ok(self.buf.split_to(size).to_vec());
                        }
                    }
                    from = self.buf.len().saturating_sub(pat.len() - 1);
                }
            }
            if self.eof {
                let rest = self.take_all();
                let rest = if matches!(op, Op::Line) { strip_cr(&rest) } else { rest };
                let rest = if matches!(op, Op::Any(_)) { Vec::new() } else { rest };
                return Err((ReadErr::Closed, rest));
            }
            if let Err(e) = self.fill(timeout).await {
                if matches!(e, ReadErr::TooLarge) {
                    // Nothing of it could be handed to Lua either: dropped.
                    self.buf = BytesMut::new();
                    return Err((e, Vec::new()));
                }
                let rest = self.take_all();
                let rest = if matches!(op, Op::Line) { strip_cr(&rest) } else { rest };
                return Err((e, rest));
            }
        }
    }
}

#[derive(Default)]
struct TcpState {
    /// As set by settimeout(s), in ms; 0 = the default.
    connect_ms: i64,
    send_ms: i64,
    read_ms: i64,
    /// The keepalive pool key of the last connect.
    key: Option<String>,
    /// The pool this connection is counted in (for `backlog`).
    counted: Option<String>,
    reused: i64,
    read_open: bool,
    write_open: bool,
    tls: bool,
    fd: Option<RawFd>,
}

/// One `ngx.socket.tcp()` object. The read and write sides are locked
/// separately, so one light thread may read while another writes; a second
/// reader (or writer) gets "socket busy reading" ("socket busy writing").
#[derive(Default)]
struct Tcp {
    rd: Mutex<Option<Reader>>,
    wr: Mutex<Option<Writer>>,
    /// connect / sslhandshake in progress (both sides locked).
    connecting: Cell<bool>,
    st: RefCell<TcpState>,
}

impl Tcp {
    fn connect_timeout(&self) -> Duration {
        ms_or_default(self.st.borrow().connect_ms)
    }

    fn send_timeout(&self) -> Duration {
        ms_or_default(self.st.borrow().send_ms)
    }

    fn read_timeout(&self) -> Duration {
        ms_or_default(self.st.borrow().read_ms)
    }

    fn install(&self, rd: &mut Option<Reader>, wr: &mut Option<Writer>, stream: Stream, buf: BytesMut) {
        let mut st = self.st.borrow_mut();
        st.fd = Some(stream.fd());
        st.tls = stream.is_tls();
        st.read_open = true;
        st.write_open = true;
        let (r, w) = tokio::io::split(stream);
        *rd = Some(Reader { half: r, buf, eof: false });
        *wr = Some(w);
    }

    /// The read and/or write side was dropped: once both are, the connection
    /// is closed and leaves its pool's count.
    fn mark_closed(&self, read: bool, write: bool) {
        let counted = {
            let mut st = self.st.borrow_mut();
            if read {
                st.read_open = false;
            }
            if write {
                st.write_open = false;
            }
            if st.read_open || st.write_open {
                return;
            }
            st.fd = None;
            st.tls = false;
            st.counted.take()
        };
        if let Some(key) = counted {
            pool_release(&key);
        }
    }

    fn busy_error(&self, side: &str) -> &'static str {
        if self.connecting.get() {
            "socket busy connecting"
        } else if side == "read" {
            "socket busy reading"
        } else {
            "socket busy writing"
        }
    }
}

impl Drop for Tcp {
    fn drop(&mut self) {
        if let Some(key) = self.st.get_mut().counted.take() {
            pool_release(&key);
        }
    }
}

type Guards<'a> = (MutexGuard<'a, Option<Reader>>, MutexGuard<'a, Option<Writer>>);

/// Both sides locked, or the "busy" error to return.
fn lock_both(tcp: &Tcp) -> Result<Guards<'_>, &'static str> {
    if tcp.connecting.get() {
        return Err("socket busy connecting");
    }
    let rd = tcp.rd.try_lock().map_err(|_| tcp.busy_error("read"))?;
    let wr = tcp.wr.try_lock().map_err(|_| tcp.busy_error("write"))?;
    Ok((rd, wr))
}

async fn tcp_connect(lua: Lua, args: Vec<Value>) -> Ret {
    let mut n = args.len();
    if !(2..=4).contains(&n) {
        return Err(rt(format!(
            "ngx.socket connect: expecting 2, 3, or 4 arguments (including the object), but seen {n}"
        )));
    }
    let Some(tcp) = this::<Tcp>(&args, "connect")? else {
        return Err(arg_error(1, "connect", "socket object expected"));
    };
    let host = String::from_utf8_lossy(&check_bytes(args.get(1), 2, "connect")?).into_owned();

    let mut pool_size = 0i64;
    let mut backlog = None;
    let mut custom_key = None;
    if let Some(Value::Table(opts)) = args.get(n - 1) {
        let bad = |msg: String| arg_error(n, "connect", &msg);
        match opts.get::<Value>("pool_size")? {
            Value::Nil => {}
            v => match to_number(&lua, Some(&v)) {
                Some(size) if size as i64 <= 0 => {
                    return Err(bad(format!("bad \"pool_size\" option value: {}", size as i64)))
                }
                Some(size) => pool_size = size as i64,
                None => return Err(bad(format!("bad \"pool_size\" option type: {}", type_name(Some(&v))))),
            },
        }
        if let Some(b) = to_number(&lua, Some(&opts.get::<Value>("backlog")?)) {
            let b = b as i64;
            if b < 0 {
                return Err(bad(format!("bad \"backlog\" option value: {b}")));
            }
            backlog = Some(b as usize);
            if pool_size == 0 {
                pool_size = DEFAULT_POOL_SIZE;
            }
        }
        match opts.get::<Value>("pool")? {
            Value::Nil => {}
            Value::String(s) => custom_key = Some(s.to_string_lossy()),
            Value::Integer(i) => custom_key = Some(i.to_string()),
            Value::Number(f) => custom_key = Some(format_number(f)),
            v => return Err(bad(format!("bad \"pool\" option type: {}", type_name(Some(&v))))),
        }
        n -= 1;
    }
    if n == 4 {
        n -= 1;
    }
    let port_arg = args.get(2).filter(|_| n == 3).and_then(|v| to_number(&lua, Some(v)));
    let (port, key) = if let Some(port) = port_arg {
        let port = port as i64;
        if !(0..=65535).contains(&port) {
            return fail(&lua, &format!("bad port number: {port}"));
        }
        (Some(port as u16), custom_key.unwrap_or_else(|| format!("{host}:{port}")))
    } else if unix_path(&host).is_some() {
        (None, custom_key.unwrap_or_else(|| host.clone()))
    } else {
        return fail(&lua, "missing the port number");
    };

    let (mut rd, mut wr) = match lock_both(&tcp) {
        Ok(guards) => guards,
        Err(busy) => return fail(&lua, busy),
    };
    let _connecting = Flag::set(&tcp.connecting);
    // Reconnecting closes the current connection first.
    *rd = None;
    *wr = None;
    tcp.mark_closed(true, true);
    {
        let mut st = tcp.st.borrow_mut();
        st.key = Some(key.clone());
        st.reused = 0;
    }
    let timeout = tcp.connect_timeout();

    let counted = pool_exists(&key) || {
        if pool_size > 0 {
            pool_create(&key, pool_size as usize, backlog);
        }
        pool_size > 0
    };
    if counted {
        let mut resuming = false;
        loop {
            if let Some((stream, reused)) = pool_take_idle(&key) {
                tcp.install(&mut rd, &mut wr, stream, BytesMut::new());
                let mut st = tcp.st.borrow_mut();
                st.reused = reused + 1;
                st.counted = Some(key);
                return int(1);
            }
            match pool_acquire(&key, !resuming) {
                Acquire::Go => break,
                Acquire::TooMany => return fail(&lua, "too many waiting connect operations"),
                Acquire::Wait(rx) => {
                    let pending = Pending(key.clone());
                    let woken = tokio::time::timeout(timeout, rx).await.is_ok();
                    drop(pending);
                    if !woken {
                        return fail(&lua, "timeout");
                    }
                    resuming = true;
                }
            }
        }
    }

    match open(&host, port, timeout).await {
        Ok(stream) => {
            tcp.install(&mut rd, &mut wr, stream, BytesMut::new());
            if counted {
                tcp.st.borrow_mut().counted = Some(key);
            }
            int(1)
        }
        Err(msg) => {
            if counted {
                pool_release(&key);
            }
            fail(&lua, &msg)
        }
    }
}

async fn tcp_sslhandshake(lua: Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if !(1..=5).contains(&n) {
        return Err(rt(format!(
            "ngx.socket sslhandshake: expecting 1 ~ 5 arguments (including the object), but seen {n}"
        )));
    }
    let Some(tcp) = this::<Tcp>(&args, "sslhandshake")? else { return fail(&lua, "closed") };
    let reuse = !matches!(args.get(1), Some(Value::Boolean(false)));
    let name = match args.get(2) {
        Some(v @ (Value::String(_) | Value::Integer(_) | Value::Number(_))) => {
            Some(String::from_utf8_lossy(&check_bytes(Some(v), 3, "sslhandshake")?).into_owned())
        }
        _ => None,
    };
    let verify = truthy(args.get(3));
    handshake(lua, tcp, reuse, name, verify).await
}

/// `tcpsock:tlshandshake{ reused_session, server_name, verify, ocsp_status_req }`
/// (lua-resty-core's table form of `sslhandshake`).
async fn tcp_tlshandshake(lua: Lua, args: Vec<Value>) -> Ret {
    let Some(tcp) = this::<Tcp>(&args, "tlshandshake")? else { return fail(&lua, "closed") };
    let (reuse, name, verify) = match args.get(1) {
        None | Some(Value::Nil) => (true, None, false),
        Some(Value::Table(opts)) => {
            let reuse = !matches!(opts.get::<Value>("reused_session")?, Value::Boolean(false));
            let name = match opts.get::<Value>("server_name")? {
                Value::String(s) => Some(s.to_string_lossy()),
                _ => None,
            };
            (reuse, name, truthy(Some(&opts.get::<Value>("verify")?)))
        }
        other => return Err(arg_error(2, "tlshandshake", &format!("table expected, got {}", type_name(other)))),
    };
    handshake(lua, tcp, reuse, name, verify).await
}

async fn handshake(lua: Lua, tcp: Rc<Tcp>, reuse: bool, name: Option<String>, verify: bool) -> Ret {
    {
        let st = tcp.st.borrow();
        if !st.read_open || !st.write_open {
            return fail(&lua, "closed");
        }
    }
    let (mut rd, mut wr) = match lock_both(&tcp) {
        Ok(guards) => guards,
        Err(busy) => return fail(&lua, busy),
    };
    let result = || -> Ret {
        if reuse {
            values(vec![Value::UserData(lua.create_userdata(SslSession)?)])
        } else {
            values(vec![Value::Boolean(true)])
        }
    };
    if tcp.st.borrow().tls {
        return result();
    }
    let _connecting = Flag::set(&tcp.connecting);
    let (Some(reader), Some(writer)) = (rd.take(), wr.take()) else {
        tcp.mark_closed(true, true);
        return fail(&lua, "closed");
    };
    let Reader { half, buf, .. } = reader;
    let stream = half.unsplit(writer);
    let server_name = name.as_deref().and_then(|n| ServerName::try_from(n).ok().map(|n| n.to_owned())).unwrap_or_else(
        || match stream.peer_ip() {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
        },
    );
    let config = tls_config(verify, name.is_some());
    let connector = tokio_rustls::TlsConnector::from(config);
    let timeout = tcp.connect_timeout();
    match tokio::time::timeout(timeout, connector.connect(server_name, stream)).await {
        Err(_) => {
            tcp.mark_closed(true, true);
            fail(&lua, "timeout")
        }
        Ok(Err(e)) => {
            tcp.mark_closed(true, true);
            fail(&lua, &tls_error(&e))
        }
        Ok(Ok(tls)) => {
            tcp.install(&mut rd, &mut wr, Stream::Tls(Box::new(tls)), buf);
            result()
        }
    }
}

async fn tcp_send(lua: Lua, args: Vec<Value>) -> Ret {
    if args.len() != 2 {
        return Err(rt(format!("expecting 2 arguments (including the object), but got {}", args.len())));
    }
    let Some(tcp) = this::<Tcp>(&args, "send")? else { return fail(&lua, "closed") };
    if !tcp.st.borrow().write_open {
        return fail(&lua, "closed");
    }
    if tcp.connecting.get() {
        return fail(&lua, "socket busy connecting");
    }
    let Ok(mut wr) = tcp.wr.try_lock() else { return fail(&lua, "socket busy writing") };
    let bytes = send_data(args.get(1), "send")?;
    if bytes.is_empty() {
        return int(0);
    }
    let Some(w) = wr.as_mut() else { return fail(&lua, "closed") };
    let timeout = tcp.send_timeout();
    let err = match tokio::time::timeout(timeout, async {
        w.write_all(&bytes).await?;
        w.flush().await
    })
    .await
    {
        Ok(Ok(())) => return int(bytes.len() as i64),
        Ok(Err(e)) => errstr(&e),
        Err(_) => "timeout".into(),
    };
    *wr = None;
    tcp.mark_closed(false, true);
    fail(&lua, &err)
}

/// The shared part of `receive`, `receiveany` and `receiveuntil` iterators.
async fn tcp_read(lua: &Lua, tcp: &Tcp, op: Op) -> Ret {
    if !tcp.st.borrow().read_open {
        return fail(lua, "closed");
    }
    if tcp.connecting.get() {
        return fail(lua, "socket busy connecting");
    }
    let Ok(mut rd) = tcp.rd.try_lock() else { return fail(lua, "socket busy reading") };
    if let Op::Until { done, .. } = &op {
        if done.replace(false) {
            return values(vec![Value::Nil, Value::Nil, Value::Nil]);
        }
    }
    let Some(reader) = rd.as_mut() else { return fail(lua, "closed") };
    let timeout = tcp.read_timeout();
    match reader.read(&op, timeout).await {
        Ok(bytes) => data(lua, &bytes),
        Err((e, partial)) => {
            // A read timeout leaves the socket usable; other errors close
            // the read side.
            if !matches!(e, ReadErr::Timeout) {
                *rd = None;
                tcp.mark_closed(true, false);
            }
            fail_partial(lua, e.msg(), &partial)
        }
    }
}

async fn tcp_receive(lua: Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if n != 1 && n != 2 {
        return Err(rt(format!("expecting 1 or 2 arguments (including the object), but got {n}")));
    }
    let Some(tcp) = this::<Tcp>(&args, "receive")? else { return fail(&lua, "closed") };
    let bad = || arg_error(2, "receive", "bad pattern argument");
    let op = match args.get(1) {
        None | Some(Value::Nil) if n == 1 => Op::Line,
        Some(v @ (Value::Integer(_) | Value::Number(_))) => match to_number(&lua, Some(v)).unwrap_or(-1.0) as i64 {
            bytes if bytes < 0 => return Err(bad()),
            0 => return data(&lua, b""),
            bytes => Op::Bytes(bytes as usize),
        },
        Some(v @ Value::String(s)) => {
            if let Some(bytes) = to_number(&lua, Some(v)) {
                match bytes as i64 {
                    b if b < 0 => return Err(bad()),
                    0 => return data(&lua, b""),
                    b => Op::Bytes(b as usize),
                }
            } else {
                match &*s.as_bytes() {
                    b"*l" | b"l" => Op::Line,
                    b"*a" | b"a" => Op::All,
                    other => {
                        let msg = format!("bad pattern argument: {}", String::from_utf8_lossy(other));
                        return Err(arg_error(2, "receive", &msg));
                    }
                }
            }
        }
        _ => return Err(bad()),
    };
    tcp_read(&lua, &tcp, op).await
}

async fn tcp_receiveany(lua: Lua, args: Vec<Value>) -> Ret {
    if args.len() != 2 {
        return Err(rt(format!("expecting 2 arguments (including the object), but got {}", args.len())));
    }
    let Some(tcp) = this::<Tcp>(&args, "receiveany")? else { return fail(&lua, "closed") };
    let max = match to_number(&lua, args.get(1)) {
        Some(m) if m as i64 > 0 => m as i64 as usize,
        _ => return Err(arg_error(2, "receiveany", "bad max argument")),
    };
    tcp_read(&lua, &tcp, Op::Any(max)).await
}

fn tcp_receiveuntil(lua: &Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if n != 2 && n != 3 {
        return Err(rt(format!("expecting 2 or 3 arguments (including the object), but got {n}")));
    }
    let mut inclusive = false;
    if n == 3 {
        let Some(Value::Table(opts)) = args.get(2) else {
            return Err(arg_error(3, "receiveuntil", &format!("table expected, got {}", type_name(args.get(2)))));
        };
        match opts.get::<Value>("inclusive")? {
            Value::Nil => {}
            Value::Boolean(b) => inclusive = b,
            v => return Err(rt(format!("bad \"inclusive\" option value type: {}", type_name(Some(&v))))),
        }
    }
    let tcp = this::<Tcp>(&args, "receiveuntil")?;
    let pat = check_bytes(args.get(1), 2, "receiveuntil")?;
    if pat.is_empty() {
        return fail(lua, "pattern is empty");
    }
    let pat: Rc<[u8]> = pat.into();
    let done = Rc::new(Cell::new(false));
    let iter = wrapped_async(lua, move |lua, args: MultiValue| {
        let tcp = tcp.clone();
        let pat = Rc::clone(&pat);
        let done = Rc::clone(&done);
        async move {
            if args.len() > 1 {
                return Err(rt(format!("expecting 0 or 1 arguments, but seen {}", args.len())));
            }
            let size = match args.front() {
                None => 0,
                Some(v) => check_integer(&lua, Some(v), 1, "receiveuntil iterator")?.max(0) as usize,
            };
            let Some(tcp) = tcp else { return fail(&lua, "closed") };
            let size = (size > 0).then_some(size);
            tcp_read(&lua, &tcp, Op::Until { pat, inclusive, size, done }).await
        }
    })?;
    values(vec![Value::Function(iter)])
}

fn tcp_close(lua: &Lua, args: Vec<Value>) -> Ret {
    if args.len() != 1 {
        return Err(rt(format!("expecting 1 argument (including the object) but seen {}", args.len())));
    }
    let Some(tcp) = this::<Tcp>(&args, "close")? else { return fail(lua, "closed") };
    {
        let st = tcp.st.borrow();
        if !st.read_open && !st.write_open {
            return fail(lua, "closed");
        }
    }
    let (mut rd, mut wr) = match lock_both(&tcp) {
        Ok(guards) => guards,
        Err(busy) => return fail(lua, busy),
    };
    *rd = None;
    *wr = None;
    tcp.mark_closed(true, true);
    int(1)
}

fn tcp_settimeout(lua: &Lua, args: Vec<Value>) -> Ret {
    set_tcp_timeouts(lua, &args, "settimeout", 2)
}

fn tcp_settimeouts(lua: &Lua, args: Vec<Value>) -> Ret {
    set_tcp_timeouts(lua, &args, "settimeouts", 4)
}

/// `settimeout(ms)` sets the connect, send and read timeouts to one value; `settimeouts(connect,
/// send, read)` sets each (both say "settimeout" in their argument-count error, as OpenResty).
fn set_tcp_timeouts(lua: &Lua, args: &[Value], func: &str, want: usize) -> Ret {
    if args.len() != want {
        return Err(rt(format!(
            "ngx.socket settimeout: expecting {want} arguments (including the object) but seen {}",
            args.len()
        )));
    }
    let connect = timeout_arg(lua, args.get(1))?;
    let (send, read) =
        if want == 4 { (timeout_arg(lua, args.get(2))?, timeout_arg(lua, args.get(3))?) } else { (connect, connect) };
    if let Some(tcp) = this::<Tcp>(args, func)? {
        let mut st = tcp.st.borrow_mut();
        st.connect_ms = connect;
        st.send_ms = send;
        st.read_ms = read;
    }
    single_nil()
}

fn tcp_getreusedtimes(lua: &Lua, args: Vec<Value>) -> Ret {
    if args.len() != 1 {
        return Err(rt(format!("expecting 1 argument (including the object), but got {}", args.len())));
    }
    let Some(tcp) = this::<Tcp>(&args, "getreusedtimes")? else { return fail(lua, "closed") };
    let st = tcp.st.borrow();
    if !st.read_open && !st.write_open {
        return fail(lua, "closed");
    }
    int(st.reused)
}

fn tcp_setkeepalive(lua: &Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if !(1..=3).contains(&n) {
        return Err(rt(format!("expecting 1 to 3 arguments (including the object), but got {n}")));
    }
    let Some(tcp) = this::<Tcp>(&args, "setkeepalive")? else { return fail(lua, "closed") };
    {
        let st = tcp.st.borrow();
        if !st.read_open || !st.write_open {
            return fail(lua, "closed");
        }
    }
    let (mut rd, mut wr) = match lock_both(&tcp) {
        Ok(guards) => guards,
        Err(busy) => return fail(lua, busy),
    };
    match rd.as_ref() {
        None => return fail(lua, "closed"),
        Some(r) if !r.buf.is_empty() => return fail(lua, "unread data in buffer"),
        Some(r) if r.eof => return fail(lua, "invalid connection"),
        Some(_) => {}
    }
    let timeout = match args.get(1) {
        None | Some(Value::Nil) => Some(DEFAULT_KEEPALIVE),
        v => Some(check_integer(lua, v, 2, "setkeepalive")?)
            .filter(|&ms| ms > 0)
            .map(|ms| Duration::from_millis(ms as u64)),
    };
    let size = match args.get(2) {
        None | Some(Value::Nil) => None,
        v => Some(check_integer(lua, v, 3, "setkeepalive")?),
    };
    let Some(key) = tcp.st.borrow().key.clone() else { return fail(lua, "key not found") };
    let size = size.unwrap_or(DEFAULT_POOL_SIZE);
    if size <= 0 && !pool_exists(&key) {
        return Err(arg_error(n, "setkeepalive", &format!("bad \"pool_size\" option value: {size}")));
    }
    let (Some(reader), Some(writer)) = (rd.take(), wr.take()) else { return fail(lua, "closed") };
    let mut stream = reader.half.unsplit(writer);
    let (counted, reused) = {
        let mut st = tcp.st.borrow_mut();
        st.read_open = false;
        st.write_open = false;
        st.fd = None;
        st.tls = false;
        (st.counted.take(), st.reused)
    };
    if crate::server::stopping() || stream.readable_now() {
        let dubious = !crate::server::stopping();
        drop(stream);
        if let Some(key) = counted {
            pool_release(&key);
        }
        if dubious {
            return fail(lua, "connection in dubious state");
        }
        return int(1);
    }
    pool_put(&key, stream, reused, timeout, counted.is_some(), size.max(1) as usize);
    int(1)
}

fn option_name(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.to_string_lossy()),
        _ => None,
    }
}

fn with_fd<R>(tcp: &Tcp, f: impl FnOnce(socket2::SockRef<'_>) -> io::Result<R>) -> Option<io::Result<R>> {
    let fd = tcp.st.borrow().fd?;
    // SAFETY: `fd` is set only while this socket holds its connection open
    // (cleared whenever both sides are dropped), and nothing can close it
    // during this synchronous call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Some(f(socket2::SockRef::from(&borrowed)))
}

fn tcp_setoption(lua: &Lua, args: Vec<Value>) -> Ret {
    let Some(tcp) = this::<Tcp>(&args, "setoption")? else { return fail(lua, "closed") };
    let Some(option) = args.get(1).filter(|v| !v.is_nil()) else {
        return fail(lua, "missing the \"option\" argument");
    };
    let Some(value) = args.get(2).filter(|v| !v.is_nil()) else {
        return fail(lua, "missing the \"value\" argument");
    };
    let on = match value {
        Value::Boolean(b) => *b,
        v => to_number(lua, Some(v)).unwrap_or(0.0) != 0.0,
    };
    let size = to_number(lua, Some(value)).unwrap_or(0.0).max(0.0) as usize;
    let name = option_name(Some(option)).unwrap_or_default();
    let result = match name.as_str() {
        "keepalive" => with_fd(&tcp, |s| s.set_keepalive(on)),
        "reuseaddr" => with_fd(&tcp, |s| s.set_reuse_address(on)),
        "tcp-nodelay" => with_fd(&tcp, |s| s.set_tcp_nodelay(on)),
        "sndbuf" => with_fd(&tcp, |s| s.set_send_buffer_size(size)),
        "rcvbuf" => with_fd(&tcp, |s| s.set_recv_buffer_size(size)),
        _ => return fail(lua, &format!("unsupported option {}", option_text(option))),
    };
    match result {
        None => fail(lua, "closed"),
        Some(Err(e)) => fail(lua, &errstr(&e)),
        Some(Ok(())) => values(vec![Value::Boolean(true)]),
    }
}

fn option_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string_lossy(),
        Value::Integer(i) => i.to_string(),
        Value::Number(f) => format_number(*f),
        other => type_name(Some(other)).to_string(),
    }
}

fn tcp_getoption(lua: &Lua, args: Vec<Value>) -> Ret {
    let Some(tcp) = this::<Tcp>(&args, "getoption")? else { return fail(lua, "closed") };
    let Some(option) = args.get(1).filter(|v| !v.is_nil()) else {
        return fail(lua, "missing the \"option\" argument");
    };
    let name = option_name(Some(option)).unwrap_or_default();
    let result = match name.as_str() {
        "keepalive" => with_fd(&tcp, |s| s.keepalive().map(i64::from)),
        "reuseaddr" => with_fd(&tcp, |s| s.reuse_address().map(i64::from)),
        "tcp-nodelay" => with_fd(&tcp, |s| s.tcp_nodelay().map(i64::from)),
        "sndbuf" => with_fd(&tcp, |s| s.send_buffer_size().map(|n| n as i64)),
        "rcvbuf" => with_fd(&tcp, |s| s.recv_buffer_size().map(|n| n as i64)),
        _ => return fail(lua, &format!("unsupported option {}", option_text(option))),
    };
    match result {
        None => fail(lua, "closed"),
        Some(Err(e)) => fail(lua, &errstr(&e)),
        Some(Ok(v)) => int(v),
    }
}

// ---------------------------------------------------------------------------
// Keepalive pools: one set per worker thread, as OpenResty's are per worker.

struct Idle {
    id: u64,
    /// Shared with the watcher task, which closes the connection when it
    /// idles out or the peer closes it (or sends something unexpected).
    slot: Rc<RefCell<Option<Stream>>>,
    reused: i64,
    watcher: tokio::task::JoinHandle<()>,
}

impl Idle {
    fn discard(self) -> Option<Stream> {
        self.watcher.abort();
        self.slot.borrow_mut().take()
    }
}

struct Pool {
    /// Bound on idle connections (and, with `backlog`, on open ones).
    size: usize,
    backlog: Option<usize>,
    /// Connections counted in this pool: open ones created through it, idle
    /// ones, and connect operations waiting in the backlog.
    connections: usize,
    /// Most recently used first.
    idle: VecDeque<Idle>,
    waiters: VecDeque<oneshot::Sender<()>>,
}

impl Pool {
    fn new(size: usize, backlog: Option<usize>) -> Self {
        Self { size, backlog, connections: 0, idle: VecDeque::new(), waiters: VecDeque::new() }
    }

    /// Let one queued connect operation proceed.
    fn resume_waiter(&mut self) {
        while let Some(tx) = self.waiters.pop_front() {
            if tx.send(()).is_ok() {
                break;
            }
        }
    }
}

thread_local! {
    static POOLS: RefCell<HashMap<String, Pool>> = RefCell::new(HashMap::new());
    static NEXT_IDLE: Cell<u64> = const { Cell::new(0) };
}

fn with_pools<R>(f: impl FnOnce(&mut HashMap<String, Pool>) -> R) -> Option<R> {
    POOLS.try_with(|p| f(&mut p.borrow_mut())).ok()
}

fn pool_exists(key: &str) -> bool {
    with_pools(|p| p.contains_key(key)).unwrap_or(false)
}

fn pool_create(key: &str, size: usize, backlog: Option<usize>) {
    with_pools(|p| {
        p.entry(key.to_string()).or_insert_with(|| Pool::new(size, backlog));
    });
}

fn pool_take_idle(key: &str) -> Option<(Stream, i64)> {
    with_pools(|p| {
        let pool = p.get_mut(key)?;
        while let Some(idle) = pool.idle.pop_front() {
            let reused = idle.reused;
            if let Some(stream) = idle.discard() {
                return Some((stream, reused));
            }
            // Closed by its watcher in the meantime.
            pool.connections = pool.connections.saturating_sub(1);
        }
        None
    })
    .flatten()
}

enum Acquire {
    Go,
    TooMany,
    Wait(oneshot::Receiver<()>),
}

/// Count a new connection in `key`'s pool, queueing it if the backlog says so.
fn pool_acquire(key: &str, check_backlog: bool) -> Acquire {
    with_pools(|p| {
        let pool = p.entry(key.to_string()).or_insert_with(|| Pool::new(DEFAULT_POOL_SIZE as usize, None));
        pool.connections += 1;
        match pool.backlog {
            Some(backlog) if check_backlog => {
                if pool.connections > pool.size + backlog {
                    pool.connections -= 1;
                    Acquire::TooMany
                } else if pool.connections > pool.size {
                    let (tx, rx) = oneshot::channel();
                    pool.waiters.push_back(tx);
                    Acquire::Wait(rx)
                } else {
                    Acquire::Go
                }
            }
            _ => Acquire::Go,
        }
    })
    .unwrap_or(Acquire::Go)
}

/// A counted connection closed: uncount it, wake a queued connect, and free
/// the pool once nothing is counted in it.
fn pool_release(key: &str) {
    with_pools(|p| {
        let Some(pool) = p.get_mut(key) else { return };
        pool.connections = pool.connections.saturating_sub(1);
        if pool.connections == 0 && pool.idle.is_empty() {
            p.remove(key);
        } else {
            pool.resume_waiter();
        }
    });
}

/// A connect operation waiting in the backlog; uncounted when it stops
/// waiting (woken, timed out, or its coroutine abandoned).
struct Pending(String);

impl Drop for Pending {
    fn drop(&mut self) {
        with_pools(|p| {
            if let Some(pool) = p.get_mut(&self.0) {
                pool.connections = pool.connections.saturating_sub(1);
            }
        });
    }
}

fn pool_put(key: &str, stream: Stream, reused: i64, timeout: Option<Duration>, counted: bool, size: usize) {
    let id = NEXT_IDLE.with(|n| {
        n.set(n.get() + 1);
        n.get()
    });
    let slot = Rc::new(RefCell::new(Some(stream)));
    let watcher = tokio::task::spawn_local(watch(key.to_string(), id, Rc::clone(&slot), timeout));
    let evicted = with_pools(|p| {
        let pool = p.entry(key.to_string()).or_insert_with(|| Pool::new(size, None));
        let mut evicted = None;
        if pool.idle.len() >= pool.size {
            // Full: the least recently used idle connection makes room.
            evicted = pool.idle.pop_back().and_then(Idle::discard);
            if counted {
                pool.connections = pool.connections.saturating_sub(1);
            }
        } else if !counted {
            pool.connections += 1;
        }
        pool.idle.push_front(Idle { id, slot, reused, watcher });
        pool.resume_waiter();
        evicted
    });
    drop(evicted);
}

/// Watch an idle connection until it is taken, idles out, or the peer
/// closes it or sends data nobody asked for; then close it.
async fn watch(key: String, id: u64, slot: Rc<RefCell<Option<Stream>>>, timeout: Option<Duration>) {
    let dead = std::future::poll_fn(|cx| {
        let mut slot = slot.borrow_mut();
        let Some(stream) = slot.as_mut() else { return Poll::Ready(()) };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    });
    match timeout {
        Some(t) => {
            let _ = tokio::time::timeout(t, dead).await;
        }
        None => dead.await,
    }
    let stream = with_pools(|p| {
        let pool = p.get_mut(&key)?;
        let pos = pool.idle.iter().position(|i| i.id == id)?;
        let idle = pool.idle.remove(pos)?;
        let stream = idle.slot.borrow_mut().take();
        pool.connections = pool.connections.saturating_sub(1);
        if pool.connections == 0 && pool.idle.is_empty() {
            p.remove(&key);
        } else {
            pool.resume_waiter();
        }
        stream
    });
    drop(stream);
}

// ---------------------------------------------------------------------------
// TLS.

#[derive(Debug)]
struct Verifier {
    /// None when verifying is off, or no CA certificate could be loaded.
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    verify: bool,
    /// Without a server name OpenResty checks the chain only.
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(inner) = &self.inner else {
            return Err(rustls::Error::InvalidCertificate(C::UnknownIssuer));
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The system CA bundle ($SSL_CERT_FILE or the usual distribution paths).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let env = std::env::var("SSL_CERT_FILE").ok();
            let paths = env.iter().map(String::as_str).chain([
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/ca-bundle.pem",
                "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
                "/etc/ssl/cert.pem",
            ]);
            for path in paths {
                if let Ok(pem) = std::fs::read(path) {
                    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                        let _ = store.add(cert);
                    }
                    if !store.is_empty() {
                        break;
                    }
                }
            }
            Arc::new(store)
        })
        .clone()
}

thread_local! {
    static TLS_CONFIGS: RefCell<HashMap<(bool, bool), Arc<ClientConfig>>> = RefCell::new(HashMap::new());
}

/// One client config per (verify, check name), kept per worker so rustls's
/// session cache gives resumption across connections.
fn tls_config(verify: bool, check_name: bool) -> Arc<ClientConfig> {
    if let Some(c) = TLS_CONFIGS.with(|c| c.borrow().get(&(verify, check_name)).cloned()) {
        return c;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = if verify {
        let roots = system_roots();
        if roots.is_empty() {
            None
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider)).build().ok()
        }
    } else {
        None
    };
    let verifier = Arc::new(Verifier { inner, verify, check_name, provider: Arc::clone(&provider) });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let config = Arc::new(config);
    TLS_CONFIGS.with(|c| c.borrow_mut().insert((verify, check_name), Arc::clone(&config)));
    config
}

/// OpenResty's messages: OpenSSL's "%d: %s" verify results, "certificate
/// host mismatch", or "handshake failed".
fn tls_error(e: &io::Error) -> String {
    use rustls::CertificateError as C;
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let msg = match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer => "20: unable to get local issuer certificate",
            C::Expired | C::ExpiredContext { .. } => "10: certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "9: certificate is not yet valid",
            C::BadSignature => "7: certificate signature failure",
            C::Revoked => "23: certificate revoked",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "26: unsupported certificate purpose",
            C::NotValidForName | C::NotValidForNameContext { .. } => "certificate host mismatch",
            _ => "handshake failed",
        },
        _ => "handshake failed",
    };
    msg.to_string()
}

// ---------------------------------------------------------------------------
// UDP.

enum UdpConn {
    Inet(UdpSocket),
    Unix(UnixDatagram),
}

impl UdpConn {
    async fn send(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Inet(s) => s.send(data).await,
            Self::Unix(s) => s.send(data).await,
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Inet(s) => s.recv(buf).await,
            Self::Unix(s) => s.recv(buf).await,
        }
    }
}

/// One `ngx.socket.udp()` object.
#[derive(Default)]
struct Udp {
    conn: RefCell<Option<Rc<UdpConn>>>,
    timeout_ms: Cell<i64>,
    busy: Cell<bool>,
}

async fn udp_open(host: &str, port: Option<u16>, timeout: Duration) -> Result<UdpConn, String> {
    if let Some(path) = unix_path(host) {
        let sock = UnixDatagram::unbound().map_err(|e| errstr(&e))?;
        sock.connect(path).map_err(|e| errstr(&e))?;
        return Ok(UdpConn::Unix(sock));
    }
    let (host, port) = match port {
        Some(p) => (host, p),
        None => match host.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) {
            Some(hp) => hp,
            None => return Err("missing the port number".into()),
        },
    };
    let addrs = resolve(host, port, Instant::now() + timeout).await?;
    let addr = addrs[fastrand::usize(..addrs.len())];
    let local: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal address");
    let sock = UdpSocket::bind(local).await.map_err(|e| errstr(&e))?;
    sock.connect(addr).await.map_err(|e| errstr(&e))?;
    Ok(UdpConn::Inet(sock))
}

async fn udp_setpeername(lua: Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if n != 2 && n != 3 {
        return Err(rt(format!(
            "ngx.socket.udp setpeername: expecting 2 or 3 arguments (including the object), but seen {n}"
        )));
    }
    let Some(udp) = this::<Udp>(&args, "setpeername")? else {
        return Err(arg_error(1, "setpeername", "socket object expected"));
    };
    let host = String::from_utf8_lossy(&check_bytes(args.get(1), 2, "setpeername")?).into_owned();
    let port = if n == 3 {
        let p = check_integer(&lua, args.get(2), 3, "setpeername")?;
        if !(0..=65535).contains(&p) {
            return fail(&lua, &format!("bad port number: {p}"));
        }
        Some(p as u16)
    } else {
        None
    };
    if udp.busy.get() {
        return fail(&lua, "socket busy");
    }
    let _busy = Flag::set(&udp.busy);
    udp.conn.borrow_mut().take();
    match udp_open(&host, port, ms_or_default(udp.timeout_ms.get())).await {
        Ok(conn) => {
            *udp.conn.borrow_mut() = Some(Rc::new(conn));
            int(1)
        }
        Err(msg) => fail(&lua, &msg),
    }
}

async fn udp_send(lua: Lua, args: Vec<Value>) -> Ret {
    if args.len() != 2 {
        return Err(rt(format!("expecting 2 arguments (including the object), but got {}", args.len())));
    }
    let Some(udp) = this::<Udp>(&args, "send")? else { return fail(&lua, "closed") };
    let Some(conn) = udp.conn.borrow().clone() else { return fail(&lua, "closed") };
    let bytes = send_data(args.get(1), "send")?;
    match conn.send(&bytes).await {
        Ok(_) => int(1),
        Err(e) => fail(&lua, &errstr(&e)),
    }
}

async fn udp_receive(lua: Lua, args: Vec<Value>) -> Ret {
    let n = args.len();
    if n != 1 && n != 2 {
        return Err(rt(format!("expecting 1 or 2 arguments (including the object), but got {n}")));
    }
    let Some(udp) = this::<Udp>(&args, "receive")? else { return fail(&lua, "closed") };
    let size = match args.get(1) {
        None | Some(Value::Nil) => UDP_DEFAULT_SIZE,
        v => match check_integer(&lua, v, 2, "receive")? {
            s if s <= 0 || s as usize > UDP_MAX_SIZE => UDP_MAX_SIZE,
            s => s as usize,
        },
    };
    let Some(conn) = udp.conn.borrow().clone() else { return fail(&lua, "closed") };
    if udp.busy.get() {
        return fail(&lua, "socket busy");
    }
    let _busy = Flag::set(&udp.busy);
    let mut buf = vec![0u8; size];
    let timeout = ms_or_default(udp.timeout_ms.get());
    match tokio::time::timeout(timeout, conn.recv(&mut buf)).await {
        Err(_) => fail(&lua, "timeout"),
        Ok(Ok(len)) => data(&lua, &buf[..len]),
        Ok(Err(e)) => {
            udp.conn.borrow_mut().take();
            fail(&lua, &errstr(&e))
        }
    }
}

fn udp_settimeout(lua: &Lua, args: Vec<Value>) -> Ret {
    if args.len() != 2 {
        return Err(rt(format!(
            "ngx.socket settimeout: expecting at least 2 arguments (including the object) but seen {}",
            args.len()
        )));
    }
    let ms = timeout_arg(lua, args.get(1))?;
    if let Some(udp) = this::<Udp>(&args, "settimeout")? {
        udp.timeout_ms.set(ms);
    }
    single_nil()
}

fn udp_close(lua: &Lua, args: Vec<Value>) -> Ret {
    if args.len() != 1 {
        return Err(rt(format!("expecting 1 argument (including the object) but seen {}", args.len())));
    }
    let Some(udp) = this::<Udp>(&args, "close")? else { return fail(lua, "closed") };
    if udp.conn.borrow().is_none() {
        return fail(lua, "closed");
    }
    if udp.busy.get() {
        return fail(lua, "socket busy");
    }
    udp.conn.borrow_mut().take();
    int(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lua::ngx::thread::testing::block_on;
    use mlua::{FromLuaMulti, IntoLuaMulti};
    use std::process::{Child, Command, Stdio};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    fn new_lua() -> Lua {
        let lua = Lua::new();
        let ngx = lua.create_table().unwrap();
        register(&lua, &ngx).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        let sleep = lua
            .create_async_function(|_, secs: f64| async move {
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                Ok(())
            })
            .unwrap();
        lua.globals().set("sleep", sleep).unwrap();
        lua
    }

    async fn eval<R: FromLuaMulti>(lua: &Lua, src: &str, args: impl IntoLuaMulti) -> R {
        match lua.load(src).call_async(args).await {
            Ok(r) => r,
            Err(e) => panic!("lua error: {e}"),
        }
    }

    /// A server on 127.0.0.1 running `handler` for each connection.
    async fn serve<F, Fut>(handler: F) -> u16
    where
        F: Fn(TcpStream) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::task::spawn_local(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::task::spawn_local(handler(s));
            }
        });
        port
    }

    /// Answers each line with "echo: <line>\r\n"; "quit" closes at once,
    /// "close-later" after 100 ms.
    async fn echo_lines<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
        let (r, mut w) = tokio::io::split(s);
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match line.as_str() {
                "quit" => return,
                "close-later" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                _ => {}
            }
            if w.write_all(format!("echo: {line}\r\n").as_bytes()).await.is_err() {
                return;
            }
            let _ = w.flush().await;
        }
    }

    /// Writes `parts` 30 ms apart, then closes (or idles for 5 s).
    async fn chunks(parts: &'static [&'static [u8]], close: bool, mut s: TcpStream) {
        for part in parts {
            s.write_all(part).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        if !close {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    #[test]
    fn lines_bytes_any_and_close() {
        block_on(async {
            let port = serve(echo_lines).await;
            let lua = new_lua();
            let r: (i64, i64, String, i64, String, String, String, String) = eval(
                &lua,
                r#"
                local port = ...
                sock = ngx.socket.tcp()
                local ok = sock:connect("127.0.0.1", port)
                local sent = sock:send("hello\r\n")
                local l1 = sock:receive()
                local sent2 = sock:send({"a\n", "b\r\n"})
                local l2 = sock:receive("*l")
                local l3 = sock:receive("l")
                sock:send("xyz\n")
                local exact = sock:receive(4)
                local rest = sock:receive("*l")
                return ok, sent, l1, sent2, l2, l3, exact, rest
                "#,
                port,
            )
            .await;
            assert_eq!(
                r,
                (1, 7, "echo: hello".into(), 5, "echo: a".into(), "echo: b".into(), "echo".into(), ": xyz".into())
            );

            type Closed =
                (String, i64, Option<i64>, String, Option<i64>, String, Option<String>, String, Option<i64>, String);
            let r: Closed = eval(
                &lua,
                r#"
                sock:send("any\n")
                local any = sock:receiveany(100)
                local c1 = sock:close()
                local c2, e2 = sock:close()
                local s3, e3 = sock:send("x")
                local r4, e4 = sock:receive()
                local n5, e5 = sock:getreusedtimes()
                return any, c1, c2, e2, s3, e3, r4, e4, n5, e5
                "#,
                (),
            )
            .await;
            assert!(!r.0.is_empty() && "echo: any\r\n".starts_with(&r.0), "receiveany got {:?}", r.0);
            assert_eq!(r.1, 1);
            assert_eq!((r.2, r.3.as_str()), (None, "closed"));
            assert_eq!((r.4, r.5.as_str()), (None, "closed"));
            assert_eq!((r.6, r.7.as_str()), (None, "closed"));
            assert_eq!((r.8, r.9.as_str()), (None, "closed"));
        });
    }

    #[test]
    fn receiveuntil_with_boundary_split_across_chunks() {
        block_on(async {
            static PARTS: &[&[u8]] = &[b"AAA\r\n--ab", b"Xz\r\n--abcdeBBB\r", b"\n--abcdetail"];
            let port = serve(|s| chunks(PARTS, true, s)).await;
            let lua = new_lua();
            let r: (String, String, Option<String>, String, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", port))
                local it = sock:receiveuntil("\r\n--abcde")
                local d1 = it()
                local d2 = it()
                local d3, e3, p3 = it()
                return d1, d2, d3, e3, p3
                "#,
                port,
            )
            .await;
            assert_eq!(r, ("AAA\r\n--abXz".into(), "BBB".into(), None, "closed".into(), "tail".into()));

            // With a size: chunks of at most 4 bytes, the pattern kept
            // (inclusive), then nil once the pattern was seen.
            static SIZED: &[&[u8]] = &[b"01234567", b"89--E", b"ND--rest"];
            let port = serve(|s| chunks(SIZED, false, s)).await;
            let r: (String, String, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", port))
                local it = sock:receiveuntil("--END--", { inclusive = true })
                local got, last = {}, "none"
                for _ = 1, 10 do
                    local data, err = it(4)
                    if not data then
                        last = tostring(err)
                        break
                    end
                    got[#got + 1] = data
                end
                return table.concat(got, "|"), last, sock:receive(4)
                "#,
                port,
            )
            .await;
            assert_eq!(r, ("0123|4567|89--END--".into(), "nil".into(), "rest".into()));

            static EXACT: &[&[u8]] = &[b"0123--END--"];
            let port = serve(|s| chunks(EXACT, false, s)).await;
            let r: String = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", port))
                local it = sock:receiveuntil("--END--")
                local got = {}
                for _ = 1, 10 do
                    local data = it(4)
                    if not data then
                        break
                    end
                    got[#got + 1] = "[" .. data .. "]"
                end
                return table.concat(got)
                "#,
                port,
            )
            .await;
            assert_eq!(r, "[0123][]");
        });
    }

    #[test]
    fn a_read_larger_than_the_memory_ceiling_fails_instead_of_growing() {
        block_on(async {
            // 3 MiB without a newline, then the connection stays open.
            let port = serve(|mut s| async move {
                let _ = s.write_all(&vec![b'x'; 3 << 20]).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
            .await;
            let lua = new_lua();
            crate::lua::ceiling::set(&lua, 1 << 20);
            let r: (Option<String>, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", port))
                local line, err = sock:receive("*l")
                return line, err
                "#,
                port,
            )
            .await;
            crate::lua::ceiling::set(&lua, 0);
            assert_eq!(r, (None, "not enough memory".into()));
        })
    }

    #[test]
    fn read_all_until_close_and_partial_reads() {
        block_on(async {
            static ALL: &[&[u8]] = &[b"line1\r\n", b"line2"];
            let port = serve(|s| chunks(ALL, true, s)).await;
            let lua = new_lua();
            let r: (String, String, Option<String>, String, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", port))
                local all = sock:receive("*a")
                local again = sock:receive("*a")
                local l, err, partial = sock:receive()
                return all, again, l, err, partial
                "#,
                port,
            )
            .await;
            assert_eq!(r, ("line1\r\nline2".into(), "".into(), None, "closed".into(), "".into()));

            static SHORT: &[&[u8]] = &[b"abc"];
            let port = serve(|s| chunks(SHORT, true, s)).await;
            let r: (Option<String>, String, String, i64, String, i64) = eval(
                &lua,
                r##"
                local port = ...
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", port))
                local d, err, partial = sock:receive(10)
                local n = select("#", sock:receive(1))
                local _, err2 = sock:receive(1)
                return d, err, partial, n, err2, sock:close()
                "##,
                port,
            )
            .await;
            assert_eq!(r, (None, "closed".into(), "abc".into(), 2, "closed".into(), 1));
        });
    }

    #[test]
    fn connect_errors_and_bad_calls() {
        block_on(async {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let lua = new_lua();
            let r: (Option<i64>, String, String, String, bool, String, String, Option<String>, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                local ok, err = sock:connect("127.0.0.1", port)
                local _, err2 = sock:connect("127.0.0.1")
                local _, err3 = sock:connect("127.0.0.1", 70000)
                local ok4, e4 = pcall(sock.connect, "127.0.0.1", 80)
                local _, e5 = pcall(sock.receive)
                assert(type(e4) == "string" and type(e5) == "string")
                local s7, e7 = ngx.socket.connect("127.0.0.1", port)
                return ok, err, err2, err3, ok4, tostring(e4), tostring(e5), s7, e7
                "#,
                port,
            )
            .await;
            assert_eq!(r.0, None);
            assert_eq!(r.1, "connection refused");
            assert_eq!(r.2, "missing the port number");
            assert_eq!(r.3, "bad port number: 70000");
            assert!(!r.4);
            assert!(r.5.contains("bad argument #1 to 'connect' (table expected, got string)"), "{}", r.5);
            assert!(r.6.contains("expecting 1 or 2 arguments (including the object), but got 0"), "{}", r.6);
            assert_eq!((r.7, r.8.as_str()), (None, "connection refused"));
        });
    }

    #[test]
    fn read_timeout_keeps_the_socket_usable() {
        block_on(async {
            let port = serve(|mut s| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = s.write_all(b"late\n").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            })
            .await;
            let lua = new_lua();
            let r: (Option<String>, String, String, String) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                assert(sock:connect("127.0.0.1", port))
                sock:settimeout(100)
                local d, err, partial = sock:receive()
                sock:settimeout(3000)
                return d, err, partial, sock:receive()
                "#,
                port,
            )
            .await;
            assert_eq!(r, (None, "timeout".into(), "".into(), "late".into()));
        });
    }

    #[test]
    fn send_tables_and_argument_errors() {
        block_on(async {
            let port = serve(echo_lines).await;
            let lua = new_lua();
            let r: (i64, i64, String, i64, String, String, String, String, i64) = eval(
                &lua,
                r#"
                local port = ...
                local sock = ngx.socket.tcp()
                local ok = sock:connect("localhost", port)
                local n = sock:send({"a", {"b", 1, {2.5, "c"}}, "\n"})
                local line = sock:receive()
                local n2 = sock:send(true)
                sock:send("\n")
                local line2 = sock:receive()
                local _, e6 = pcall(sock.send, sock, {"a", true})
                local _, e7 = pcall(sock.send, sock, {x = 1})
                local _, e8 = pcall(sock.receive, sock, "*x")
                return ok, n, line, n2, line2, tostring(e6), tostring(e7), tostring(e8), sock:send("")
                "#,
                port,
            )
            .await;
            assert_eq!((r.0, r.1, r.2.as_str()), (1, 8, "echo: ab12.5c"));
            assert_eq!((r.3, r.4.as_str()), (4, "echo: true"));
            assert!(r.5.contains("bad argument #2 to 'send' (bad data type boolean found)"), "{}", r.5);
            assert!(r.6.contains("bad argument #2 to 'send' (non-array table found)"), "{}", r.6);
            assert!(r.7.contains("bad argument #2 to 'receive' (bad pattern argument: *x)"), "{}", r.7);
            assert_eq!(r.8, 0);
        });
    }

    #[test]
    fn a_second_reader_gets_socket_busy_reading() {
        block_on(async {
            let port = serve(|s| async move {
                let (r, mut w) = s.into_split();
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = w.write_all(b"x\n").await;
                let mut lines = BufReader::new(r).lines();
                if let Ok(Some(line)) = lines.next_line().await {
                    let _ = w.write_all(format!("{line}\n").as_bytes()).await;
                }
            })
            .await;
            let lua = new_lua();
            let first = eval::<String>(
                &lua,
                r#"
                local port = ...
                sock = ngx.socket.tcp()
                sock:settimeout(2000)
                assert(sock:connect("127.0.0.1", port))
                return sock:receive()
                "#,
                port,
            );
            let second = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                eval::<(Option<String>, String, Option<i64>, String, Option<i64>, String, i64)>(
                    &lua,
                    r#"
                    local d, err = sock:receive()
                    local c, cerr = sock:close()
                    local k, kerr = sock:setkeepalive()
                    return d, err, c, cerr, k, kerr, sock:send("written meanwhile\n")
                    "#,
                    (),
                )
                .await
            };
            let (first, second) = tokio::join!(first, second);
            assert_eq!(first, "x");
            let busy = "socket busy reading".to_string();
            assert_eq!(second, (None, busy.clone(), None, busy.clone(), None, busy, 18));
            let echoed: String = eval(&lua, "return sock:receive()", ()).await;
            assert_eq!(echoed, "written meanwhile");
        });
    }

    #[test]
    fn keepalive_pool_rules() {
        block_on(async {
            let port = serve(echo_lines).await;
            let lua = new_lua();
            let r: Table = eval(
                &lua,
                r#"
                local port = ...
                local function conn()
                    local s = ngx.socket.tcp()
                    s:settimeout(2000)
                    assert(s:connect("127.0.0.1", port))
                    return s
                end
                local r = {}
                local s = conn()
                s:send("p\nq\n")
                sleep(0.05)
                r.first = s:receive()
                r.unread_ok, r.unread = s:setkeepalive()
                r.second = s:receive()
                r.idle_short = s:setkeepalive(50)
                sleep(0.2)
                r.after_idle_timeout = conn():getreusedtimes()

                local a, b, c = conn(), conn(), conn()
                for _, x in ipairs({a, b, c}) do
                    x:send("hi\n")
                    assert(x:receive() == "echo: hi")
                    assert(x:setkeepalive(10000, 2) == 1)
                end
                r.bound = conn():getreusedtimes() .. conn():getreusedtimes() .. conn():getreusedtimes()

                local d = conn()
                d:send("quit\n")
                sleep(0.05)
                r.dubious_ok, r.dubious = d:setkeepalive()

                local e = conn()
                e:send("close-later\n")
                r.closing_later = e:setkeepalive()
                sleep(0.3)
                r.after_peer_close = conn():getreusedtimes()
                return r
                "#,
                port,
            )
            .await;
            let get = |k: &str| r.get::<Option<String>>(k).unwrap();
            assert_eq!(get("first").as_deref(), Some("echo: p"));
            assert_eq!(get("unread_ok"), None);
            assert_eq!(get("unread").as_deref(), Some("unread data in buffer"));
            assert_eq!(get("second").as_deref(), Some("echo: q"));
            assert_eq!(get("idle_short").as_deref(), Some("1"));
            assert_eq!(get("after_idle_timeout").as_deref(), Some("0"));
            assert_eq!(get("bound").as_deref(), Some("110"));
            assert_eq!(get("dubious_ok"), None);
            assert_eq!(get("dubious").as_deref(), Some("connection in dubious state"));
            assert_eq!(get("closing_later").as_deref(), Some("1"));
            assert_eq!(get("after_peer_close").as_deref(), Some("0"));
        });
    }

    #[test]
    fn backlog_queues_connects_beyond_the_pool_size() {
        block_on(async {
            let port = serve(echo_lines).await;
            let lua = new_lua();
            let ok: i64 = eval(
                &lua,
                r#"
                port = ...
                opts = { pool = "limited", pool_size = 1, backlog = 1 }
                s1 = ngx.socket.tcp()
                return s1:connect("127.0.0.1", port, opts)
                "#,
                port,
            )
            .await;
            assert_eq!(ok, 1);
            let waiting = eval::<(i64, i64)>(
                &lua,
                r#"
                local s2 = ngx.socket.tcp()
                s2:settimeout(2000)
                local ok, err = s2:connect("127.0.0.1", port, opts)
                return ok or -1, s2:getreusedtimes()
                "#,
                (),
            );
            let others = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                eval::<(Option<i64>, String, i64, Option<i64>, String)>(
                    &lua,
                    r#"
                    local s3 = ngx.socket.tcp()
                    local ok3, err3 = s3:connect("127.0.0.1", port, opts)
                    local k = s1:setkeepalive()
                    -- s2 is woken and takes the connection s1 just pooled
                    sleep(0.05)
                    local s4 = ngx.socket.tcp()
                    s4:settimeout(50)
                    local ok4, err4 = s4:connect("127.0.0.1", port, opts)
                    return ok3, err3, k, ok4, err4
                    "#,
                    (),
                )
                .await
            };
            let (waiting, others) = tokio::join!(waiting, others);
            assert_eq!(waiting, (1, 1));
            assert_eq!(others, (None, "too many waiting connect operations".into(), 1, None, "timeout".into()));
        });
    }

    #[test]
    fn udp_send_receive_timeout_close() {
        block_on(async {
            let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = server.local_addr().unwrap().port();
            tokio::task::spawn_local(async move {
                let mut buf = [0u8; 2048];
                while let Ok((n, peer)) = server.recv_from(&mut buf).await {
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&buf[..n]);
                    let _ = server.send_to(&out, peer).await;
                }
            });
            let lua = new_lua();
            type R = (i64, i64, String, Option<String>, String, i64, Option<i64>, String, Option<i64>, String);
            let r: R = eval(
                &lua,
                r#"
                local port = ...
                local udp = ngx.socket.udp()
                local ok = udp:setpeername("127.0.0.1", port)
                local sent = udp:send({"pi", "ng"})
                local reply = udp:receive()
                udp:settimeout(50)
                local d, err = udp:receive()
                local c = udp:close()
                local c2, e2 = udp:close()
                local s3, e3 = udp:send("x")
                return ok, sent, reply, d, err, c, c2, e2, s3, e3
                "#,
                port,
            )
            .await;
            assert_eq!((r.0, r.1, r.2.as_str()), (1, 1, "echo:ping"));
            assert_eq!((r.3, r.4.as_str()), (None, "timeout"));
            assert_eq!((r.5, r.6, r.7.as_str()), (1, None, "closed"));
            assert_eq!((r.8, r.9.as_str()), (None, "closed"));
        });
    }

    fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    #[test]
    fn sslhandshake_verify_and_pooled_tls() {
        block_on(async {
            let acceptor = tls_acceptor();
            let port = serve(move |s| {
                let acceptor = acceptor.clone();
                async move {
                    if let Ok(tls) = acceptor.accept(s).await {
                        echo_lines(tls).await;
                    }
                }
            })
            .await;
            let lua = new_lua();
            type R = (String, Option<String>, i64, String, bool, i64, i64, String, Option<bool>, String, String);
            let r: R = eval(
                &lua,
                r#"
                local port = ...
                local function conn()
                    local s = ngx.socket.tcp()
                    s:settimeout(2000)
                    assert(s:connect("127.0.0.1", port))
                    return s
                end
                local sock = conn()
                local sess, err = sock:sslhandshake(nil, "localhost", false)
                local n = sock:send("over tls\n")
                local line = sock:receive()
                local again = sock:sslhandshake(false)
                local ka = sock:setkeepalive()
                local sock2 = conn()
                local reused = sock2:getreusedtimes()
                sock2:send("pooled\n")
                local line2 = sock2:receive()
                sock2:close()
                local sock3 = conn()
                local s3, e3 = sock3:sslhandshake(false, "localhost", true)
                local _, e3b = sock3:send("x")
                return type(sess), err, n, line, again, ka, reused, line2, s3, e3, e3b
                "#,
                port,
            )
            .await;
            assert_eq!((r.0.as_str(), r.1), ("userdata", None));
            assert_eq!((r.2, r.3.as_str()), (9, "echo: over tls"));
            assert!(r.4);
            assert_eq!((r.5, r.6, r.7.as_str()), (1, 1, "echo: pooled"));
            assert_eq!((r.8, r.9.as_str()), (None, "20: unable to get local issuer certificate"));
            assert_eq!(r.10, "closed");
        });
    }

    #[test]
    fn unix_sockets_and_options() {
        block_on(async {
            let path = std::env::temp_dir().join(format!("luagate-sock-{}-{}", std::process::id(), fastrand::u64(..)));
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            tokio::task::spawn_local(async move {
                while let Ok((s, _)) = listener.accept().await {
                    tokio::task::spawn_local(echo_lines(s));
                }
            });
            let port = serve(echo_lines).await;
            let lua = new_lua();
            type R = (bool, bool, String, String, Option<String>, String, bool, i64, Option<i64>, String);
            let r: R = eval(
                &lua,
                r#"
                local path, port = ...
                local sock = ngx.socket.tcp()
                assert(sock:connect("unix:" .. path))
                local so = sock:setoption("sndbuf", 65536)
                local big = sock:getoption("sndbuf") > 0
                local _, unsupported = sock:setoption("bogus", 1)
                sock:send("hi\n")
                local line = sock:receive()
                local it, perr = sock:receiveuntil("")
                local tcp = ngx.socket.tcp()
                assert(tcp:connect("127.0.0.1", port))
                local nodelay = tcp:setoption("tcp-nodelay", true)
                local got = tcp:getoption("tcp-nodelay")
                tcp:close()
                local after, aerr = tcp:getoption("tcp-nodelay")
                return so, big, unsupported, line, it, perr, nodelay, got, after, aerr
                "#,
                (path.to_str().unwrap(), port),
            )
            .await;
            let _ = std::fs::remove_file(&path);
            assert!(r.0 && r.1);
            assert_eq!(r.2, "unsupported option bogus");
            assert_eq!(r.3, "echo: hi");
            assert_eq!((r.4, r.5.as_str()), (None, "pattern is empty"));
            assert!(r.6);
            assert_eq!(r.7, 1);
            assert_eq!((r.8, r.9.as_str()), (None, "closed"));
        });
    }

    /// A redis-server on an ephemeral port, killed (by pid) when dropped.
    struct Redis {
        child: Child,
        port: u16,
    }

    impl Redis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let redis = Self { child, port };
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return redis;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server did not start on port {port}");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A client in the style of lua-resty-redis.
    const REDIS_CLIENT: &str = r#"
        local port = ...
        local null = {}
        local function gen_req(args)
            local req = { "*", #args, "\r\n" }
            for _, a in ipairs(args) do
                a = tostring(a)
                req[#req + 1] = { "$", #a, "\r\n", a, "\r\n" }
            end
            return req
        end
        local function read_reply(sock)
            local line, err = sock:receive()
            if not line then
                return nil, err
            end
            local prefix, rest = line:sub(1, 1), line:sub(2)
            if prefix == "$" then
                local size = tonumber(rest)
                if size < 0 then
                    return null
                end
                local data, err = sock:receive(size + 2)
                if not data then
                    return nil, err
                end
                return data:sub(1, -3)
            elseif prefix == "+" then
                return rest
            elseif prefix == ":" then
                return tonumber(rest)
            elseif prefix == "-" then
                return false, rest
            elseif prefix == "*" then
                local vals = {}
                for i = 1, tonumber(rest) do
                    local v, err = read_reply(sock)
                    if v == nil then
                        return nil, err
                    end
                    vals[i] = v
                end
                return vals
            end
            return nil, "bad reply: " .. line
        end
        local function connect()
            local sock = ngx.socket.tcp()
            sock:settimeouts(1000, 1000, 1000)
            local ok, err = sock:connect("127.0.0.1", port)
            if not ok then
                error("connect: " .. err)
            end
            return sock
        end
        local function cmd(sock, ...)
            local bytes, err = sock:send(gen_req({ ... }))
            if not bytes then
                return nil, err
            end
            return read_reply(sock)
        end

        local r = {}
        local sock = connect()
        r.reused1 = sock:getreusedtimes()
        r.set = cmd(sock, "SET", "k", "hello world\r\nwith crlf")
        r.get = cmd(sock, "GET", "k")
        r.incr1 = cmd(sock, "INCR", "n")
        r.incr2 = cmd(sock, "INCR", "n")
        r.missing = cmd(sock, "GET", "nope") == null
        r.err_ok, r.err = cmd(sock, "INCR", "k")

        local reqs = {}
        for i = 1, 3 do
            reqs[#reqs + 1] = gen_req({ "RPUSH", "list", "v" .. i })
        end
        reqs[#reqs + 1] = gen_req({ "LRANGE", "list", 0, -1 })
        sock:send(reqs)
        local pipe = {}
        for i = 1, 4 do
            pipe[i] = read_reply(sock)
        end
        r.pipe_len = pipe[3]
        r.lrange = table.concat(pipe[4], ",")

        r.keepalive = sock:setkeepalive(10000, 10)
        r.after_keepalive = select(2, sock:send("PING\r\n"))
        local sock2 = connect()
        r.reused2 = sock2:getreusedtimes()
        r.get2 = cmd(sock2, "GET", "k")
        sock2:setkeepalive()
        local sock3 = connect()
        r.reused3 = sock3:getreusedtimes()
        r.ping = cmd(sock3, "PING")
        r.close = sock3:close()
        r.fresh = connect():getreusedtimes()
        return r
    "#;

    #[test]
    fn redis_client_with_keepalive() {
        let redis = Redis::start();
        block_on(async {
            let lua = new_lua();
            let r: Table = eval(&lua, REDIS_CLIENT, redis.port).await;
            let get = |k: &str| r.get::<Value>(k).unwrap();
            let s = |k: &str| r.get::<Option<String>>(k).unwrap();
            assert_eq!(r.get::<i64>("reused1").unwrap(), 0);
            assert_eq!(s("set").as_deref(), Some("OK"));
            assert_eq!(s("get").as_deref(), Some("hello world\r\nwith crlf"));
            assert_eq!(r.get::<i64>("incr1").unwrap(), 1);
            assert_eq!(r.get::<i64>("incr2").unwrap(), 2);
            assert_eq!(get("missing"), Value::Boolean(true));
            assert_eq!(get("err_ok"), Value::Boolean(false));
            assert_eq!(s("err").as_deref(), Some("ERR value is not an integer or out of range"));
            assert_eq!(r.get::<i64>("pipe_len").unwrap(), 3);
            assert_eq!(s("lrange").as_deref(), Some("v1,v2,v3"));
            assert_eq!(r.get::<i64>("keepalive").unwrap(), 1);
            assert_eq!(s("after_keepalive").as_deref(), Some("closed"));
            assert_eq!(r.get::<i64>("reused2").unwrap(), 1);
            assert_eq!(s("get2").as_deref(), Some("hello world\r\nwith crlf"));
            assert_eq!(r.get::<i64>("reused3").unwrap(), 2);
            assert_eq!(s("ping").as_deref(), Some("PONG"));
            assert_eq!(r.get::<i64>("close").unwrap(), 1);
            assert_eq!(r.get::<i64>("fresh").unwrap(), 0);
        });
    }
}
