//! The HTTP echo service: reports what it received as JSON and offers a few paths
//! that produce specific wire behaviour (status codes, delays, sized or chunked
//! bodies, streaming echo, slow bodies, trailers, connection close, arbitrary
//! response headers, a WebSocket handshake that echoes raw bytes) for
//! exercising a proxy against a real hyper server.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;

use crate::Stats;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// Size of the chunks `/bytes` and `/chunked` stream.
const CHUNK: usize = 16 * 1024;
static A_CHUNK: [u8; CHUNK] = [b'a'; CHUNK];

/// hyper service answering every request of one HTTP backend.
#[derive(Clone)]
pub(crate) struct HttpEcho {
    name: Arc<str>,
    stats: Arc<Stats>,
}

impl HttpEcho {
    pub(crate) fn new(name: Arc<str>, stats: Arc<Stats>) -> Self {
        Self { name, stats }
    }
}

impl hyper::service::Service<Request<Incoming>> for HttpEcho {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let name = self.name.clone();
        Box::pin(async move {
            let mut resp = handle(&name, req).await;
            if let Ok(v) = HeaderValue::from_str(&name) {
                resp.headers_mut().insert("x-backend", v);
            }
            Ok(resp)
        })
    }
}

async fn handle(name: &str, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_owned();
    let mut segs = path.trim_start_matches('/').split('/');
    match segs.next().unwrap_or("") {
        "bytes" | "chunked" => {
            let sized = path.starts_with("/bytes");
            let Some(n) = segs.next().and_then(|s| s.parse::<u64>().ok()) else {
                return bad_request("expected /bytes/{n} or /chunked/{n}");
            };
            drain(req.into_body()).await;
            let mut resp = Response::new(Repeat { remaining: n, sized }.boxed_unsync());
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            resp
        }
        "echo" => {
            let content_type = req.headers().get(CONTENT_TYPE).cloned();
            let mut resp = Response::new(req.into_body().map_err(BoxError::from).boxed_unsync());
            if let Some(ct) = content_type {
                resp.headers_mut().insert(CONTENT_TYPE, ct);
            }
            resp
        }
        "slow" => {
            let Some(ms) = segs.next().and_then(|s| s.parse::<u64>().ok()) else {
                return bad_request("expected /slow/{ms}");
            };
            drain(req.into_body()).await;
            let body = futures_util::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"slow")))
            });
            let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert(CONTENT_LENGTH, HeaderValue::from_static("4"));
            resp
        }
        "noread" => {
            // A peer that takes no request body: the body is never polled (hyper reads no
            // more than its buffer of it), the answer comes after ms, then the connection closes.
            let Some(ms) = segs.next().and_then(|s| s.parse::<u64>().ok()) else {
                return bad_request("expected /noread/{ms}");
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(req);
            let mut resp = Response::new(full(r#"{"noread":true}"#));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        "trailers" => {
            drain(req.into_body()).await;
            let mut trailers = HeaderMap::new();
            trailers.insert("x-trailer", HeaderValue::from_static("yes"));
            let frames = [Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ok"))), Ok(Frame::trailers(trailers))];
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let mut resp = Response::new(body.boxed_unsync());
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            // hyper's HTTP/1 encoder only sends trailer fields declared here.
            h.insert("trailer", HeaderValue::from_static("x-trailer"));
            resp
        }
        "ws" => websocket(req),
        "close" => {
            let mut resp = describe(name, req, StatusCode::OK).await;
            resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        "set-header" => {
            let pairs: Vec<(String, String)> = req.uri().query().map(parse_query).unwrap_or_default();
            let mut resp = describe(name, req, StatusCode::OK).await;
            for (k, v) in pairs {
                let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) else {
                    continue;
                };
                // Framing headers would corrupt the response; everything else goes.
                if k != TRANSFER_ENCODING && k != CONTENT_LENGTH {
                    resp.headers_mut().append(k, v);
                }
            }
            resp
        }
        first => {
            // `/status/{code}` and `/delay/{ms}`, which may be chained:
            // `/delay/100/status/503/anything`.
            let mut status = StatusCode::OK;
            let mut seg = Some(first);
            while let Some(s) = seg {
                match s {
                    "status" => match segs.next().and_then(|c| c.parse::<u16>().ok()) {
                        Some(c) => match StatusCode::from_u16(c) {
                            Ok(c) => status = c,
                            Err(_) => return bad_request("bad status code"),
                        },
                        None => return bad_request("expected /status/{code}"),
                    },
                    "delay" => match segs.next().and_then(|c| c.parse::<u64>().ok()) {
                        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        None => return bad_request("expected /delay/{ms}"),
                    },
                    _ => break,
                }
                seg = segs.next();
            }
            describe(name, req, status).await
        }
    }
}

/// `/ws`: a WebSocket handshake (101 with `Sec-WebSocket-Accept` for the
/// request's key, the request's `Sec-WebSocket-Version`/`-Protocol` and key
/// echoed in `x-seen-*`), after which every byte received is sent back as it
/// is — frames are not parsed: enough to see a proxy relay both ways. It
/// answers 101 even to a request that did not ask to upgrade (a sloppy peer).
fn websocket(mut req: Request<Incoming>) -> Response<RespBody> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(key) = &key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        ctx.update(key.as_bytes());
        ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        if let Ok(v) = HeaderValue::from_str(&base64(ctx.finish().as_ref())) {
            h.insert("sec-websocket-accept", v);
        }
        h.insert("x-seen-key", key.clone());
    }
    for (name, seen) in [("sec-websocket-version", "x-seen-version"), ("sec-websocket-protocol", "x-seen-protocol")] {
        if let Some(v) = req.headers().get(name).cloned() {
            h.insert(seen, v);
        }
    }
    if let Some(p) = req.headers().get("sec-websocket-protocol").cloned() {
        h.insert("sec-websocket-protocol", p);
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on.await else { return };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = io.shutdown().await;
    });
    resp
}

fn base64(bytes: &[u8]) -> String {
    const CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() { CHARS[(n >> shift & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The default answer: a JSON description of the request (its body is read fully).
async fn describe(name: &str, req: Request<Incoming>, status: StatusCode) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body_len = drain(body).await;
    let mut headers = serde_json::Map::new();
    for key in parts.headers.keys() {
        let mut values: Vec<serde_json::Value> = parts
            .headers
            .get_all(key)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        let value = if values.len() == 1 { values.pop().unwrap_or_default() } else { values.into() };
        headers.insert(key.as_str().to_owned(), value);
    }
    let doc = serde_json::json!({
        "backend": name,
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
    });
    let mut resp = Response::new(full(doc.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn bad_request(msg: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(full(msg));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// Reads a request body to its end without keeping it; returns its length. A body
/// error (client gone) just ends the count.
async fn drain(mut body: Incoming) -> u64 {
    let mut n = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            n += d.len() as u64;
        }
    }
    n
}

/// `a` bytes in 16 KiB chunks; with `sized` its exact size is known (content-length),
/// without it the length is hidden (chunked on HTTP/1.1).
struct Repeat {
    remaining: u64,
    sized: bool,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64);
        self.remaining -= n;
        let chunk = Bytes::from_static(&A_CHUNK).slice(..n as usize);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// `a=1&b=x%3Dy` -> [("a","1"), ("b","x=y")] (`+` is a space, as in forms).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("connection=x-foo&x-foo=1&keep-alive=timeout%3D5&a+b=c%2"),
            vec![
                ("connection".into(), "x-foo".into()),
                ("x-foo".into(), "1".into()),
                ("keep-alive".into(), "timeout=5".into()),
                ("a b".into(), "c%2".into()),
            ]
        );
    }
}
