//! WebSocket through the proxy, on routes that allow it (`websocket: true`),
//! as nginx does with `proxy_http_version 1.1` and the Upgrade headers: an
//! HTTP/1.1 `Upgrade: websocket` request, or an HTTP/2 extended CONNECT
//! (RFC 8441, `:protocol websocket`), goes to an HTTP/1.1 peer as an
//! Upgrade request; its `101` makes both connections a byte tunnel.
//!
//! hyper's HTTP/1.1 server hands a connection over only to `with_upgrades`
//! connections, which luagate's server does not use (it takes idle
//! connections apart, see `server::connection`). So the HTTP/1.1 client side
//! is upgraded by hand: the pipeline leaves a [`Tunnel`] in the connection's
//! [`ConnInfo`](super::pipeline::ConnInfo), and once hyper has written the
//! 101 and stopped, the connection task takes the socket back and runs it.
//! An HTTP/2 stream is upgraded by hyper itself; its tunnel runs in a task.
//!
//! A tunnel ends when either side closes (the other side's write half is
//! shut down, the rest drains), or when no byte moved either way for the
//! upstream's read timeout (nginx's `proxy_read_timeout` on a WebSocket).

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Method, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::observe::access_log::LogRecord;

static SEC_WEBSOCKET_KEY: http::HeaderName = http::HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: http::HeaderName = http::HeaderName::from_static("sec-websocket-accept");
static SEC_WEBSOCKET_VERSION: http::HeaderName = http::HeaderName::from_static("sec-websocket-version");

/// How the client asks for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// HTTP/1.1 `GET` with `Connection: upgrade` and `Upgrade: websocket`.
    Upgrade,
    /// HTTP/2 `CONNECT` with `:protocol websocket` (RFC 8441).
    ExtendedConnect,
}

/// Whether the request asks for a WebSocket (checked on routes that allow it).
pub fn asked(parts: &http::request::Parts) -> Option<Ask> {
    if parts.method == Method::CONNECT {
        let protocol = parts.extensions.get::<hyper::ext::Protocol>()?;
        return protocol.as_str().eq_ignore_ascii_case("websocket").then_some(Ask::ExtendedConnect);
    }
    let h = &parts.headers;
    let upgrade = h.get(UPGRADE).is_some_and(|v| has_token(v, "websocket"));
    let connection = h.get_all(CONNECTION).iter().any(|v| has_token(v, "upgrade"));
    (parts.method == Method::GET && parts.version == Version::HTTP_11 && upgrade && connection).then_some(Ask::Upgrade)
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Turns the request (hop-by-hop headers already stripped) into the
/// upstream's HTTP/1.1 Upgrade request. For an extended CONNECT, a
/// `Sec-WebSocket-Key` is made (HTTP/2 WebSockets have none): its expected
/// `Sec-WebSocket-Accept` is returned, to check the peer's 101 with.
pub fn upstream_request(parts: &mut http::request::Parts, ask: Ask) -> Option<HeaderValue> {
    parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if ask == Ask::Upgrade {
        return None;
    }
    parts.method = Method::GET;
    let key = encode(&fastrand::u128(..).to_le_bytes());
    let accept = accept_for(key.as_bytes());
    parts.headers.insert(&SEC_WEBSOCKET_KEY, key);
    if !parts.headers.contains_key(&SEC_WEBSOCKET_VERSION) {
        parts.headers.insert(&SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    Some(accept)
}

fn encode(bytes: &[u8]) -> HeaderValue {
    let text = crate::lua::ngx::util::encode_base64(bytes, false);
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA=="))
}

/// RFC 6455 §4.2.2: base64(SHA-1(key + the WebSocket GUID)).
fn accept_for(key: &[u8]) -> HeaderValue {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    encode(ctx.finish().as_ref())
}

/// The client's head for the peer's `101` (its hop-by-hop headers already
/// stripped): `101` with `Upgrade` for an HTTP/1.1 client, `200` for an
/// extended CONNECT — whose made-up key's answer is checked and dropped.
pub fn client_head(
    head: &mut http::response::Parts,
    ask: Ask,
    upstream_upgrade: Option<HeaderValue>,
    expected_accept: Option<&HeaderValue>,
) -> Result<(), ProxyError> {
    let upgrade = upstream_upgrade.filter(|v| has_token(v, "websocket"));
    if upgrade.is_none() {
        return Err(ProxyError::BadUpgrade("the peer switched to another protocol than websocket"));
    }
    match ask {
        Ask::Upgrade => {
            head.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            head.headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }
        Ask::ExtendedConnect => {
            if head.headers.get(&SEC_WEBSOCKET_ACCEPT) != expected_accept {
                return Err(ProxyError::BadUpgrade("the peer's Sec-WebSocket-Accept does not match the key"));
            }
            head.headers.remove(&SEC_WEBSOCKET_ACCEPT);
            head.status = StatusCode::OK;
        }
    }
    Ok(())
}

/// A WebSocket whose head is answered and whose bytes are still to relay:
/// the peer's side (resolved once hyper hands its connection over), the idle
/// timeout, and the request's log line, written when the tunnel ends.
pub struct Tunnel {
    upstream: OnUpgrade,
    idle: Duration,
    log: Option<LogRecord>,
}

impl Tunnel {
    pub fn new(upstream: OnUpgrade, idle: Duration, log: Option<LogRecord>) -> Self {
        Self { upstream, idle, log }
    }

    /// Relays between `client` and the peer until either closes or nothing
    /// moves for the idle timeout. `early` is what the client sent after its
    /// request head, already read.
    pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(mut self, client: C, early: Bytes) {
        let upstream = match (&mut self.upstream).await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                self.fail(format!("the peer's connection was not handed over: {e}"));
                return;
            }
        };
        let (to_client, to_peer) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
        let last = Rc::new(Cell::new(Instant::now()));
        let mut client = Watched { inner: client, read: Rc::clone(&to_peer), last: Rc::clone(&last) };
        let mut peer = Watched { inner: upstream, read: Rc::clone(&to_client), last: Rc::clone(&last) };
        if !early.is_empty() {
            to_peer.set(early.len() as u64);
            if peer.inner.write_all(&early).await.is_err() {
                self.fail("the peer closed at once".into());
                return;
            }
        }
        let idle = self.idle;
        let idled = async {
            loop {
                let at = last.get() + idle;
                if Instant::now() >= at {
                    return;
                }
                tokio::time::sleep_until(at).await;
            }
        };
        let ended = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut peer) => r.err().map(|e| e.to_string()),
            () = idled => Some(format!("idle for {idle:?}")),
        };
        if let Some(log) = &mut self.log {
            log.bytes_sent += to_client.get();
            log.bytes_received += to_peer.get();
            if let Some(why) = ended {
                log.error = Some(format!("websocket ended: {why}"));
            }
        }
        tracing::debug!(sent = to_client.get(), received = to_peer.get(), "websocket tunnel closed");
    }

    fn fail(&mut self, msg: String) {
        tracing::warn!(error = %msg, "websocket tunnel not opened");
        if let Some(log) = &mut self.log {
            log.error = Some(msg);
        }
    }

    /// An HTTP/2 stream's tunnel, in its own task: waits for hyper to hand
    /// the client's stream over (after the 200 went out), then relays.
    pub fn spawn_h2(self, client: OnUpgrade) {
        tokio::task::spawn_local(async move {
            match client.await {
                Ok(c) => self.run(TokioIo::new(c), Bytes::new()).await,
                Err(e) => {
                    let mut t = self;
                    t.fail(format!("the client's stream was not handed over: {e}"));
                }
            }
        });
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.emit();
        }
    }
}

/// A side of the tunnel: counts what is read from it and when.
struct Watched<T> {
    inner: T,
    read: Rc<Cell<u64>>,
    last: Rc<Cell<Instant>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.set(this.read.get() + n as u64);
            this.last.set(Instant::now());
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_of_the_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn only_a_websocket_upgrade_is_asked() {
        let req = |m: &str, up: &str, conn: &str| {
            let mut b = http::Request::builder().method(m).uri("/ws").version(Version::HTTP_11);
            if !up.is_empty() {
                b = b.header("upgrade", up);
            }
            if !conn.is_empty() {
                b = b.header("connection", conn);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert_eq!(asked(&req("GET", "websocket", "keep-alive, Upgrade")), Some(Ask::Upgrade));
        assert_eq!(asked(&req("GET", "WebSocket", "upgrade")), Some(Ask::Upgrade));
        assert_eq!(asked(&req("GET", "h2c", "upgrade")), None);
        assert_eq!(asked(&req("GET", "websocket", "")), None);
        assert_eq!(asked(&req("POST", "websocket", "upgrade")), None);
    }
}
