//! Clients the steps drive luagate with: HTTP/1.1 and HTTP/2 (h2c prior knowledge,
//! or TLS with ALPN) over hyper's connection API with a small keep-alive pool, the
//! testbed's tonic `EchoClient` for gRPC (over hyper-util's h2c client, which leaves
//! deadlines to the server), and a raw TCP writer/reader for malformed input. Every
//! call is bounded by a timeout; none retries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use testbed::pb::echo_client::EchoClient;
use testbed::pb::{EchoReply, EchoRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

use crate::case::{GrpcCall, GrpcMethod, HttpVersion};

/// Every HTTP request and gRPC call must finish within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A raw step must see a complete response head (or a close) within this.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest gRPC message the client sends or accepts.
const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// An HTTP answer, body read to its end.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// The body (what came before the cut, if `cut`).
    pub body: Bytes,
    pub elapsed: Duration,
    /// From sending to the first body byte (to the end when the body is empty).
    pub first_byte: Duration,
    /// The body ended in an error (connection closed or stream reset before its end).
    pub cut: Option<String>,
}

/// Reads `body` frame by frame: the bytes, when the first came, and the error that ended it, if any.
async fn read_body(mut body: hyper::body::Incoming, start: Instant) -> (Bytes, Duration, Option<String>) {
    let mut out = bytes::BytesMut::new();
    let mut first = None;
    let cut = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => break Some(format!("reading the body failed: {}", error_chain(&e))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                    first.get_or_insert_with(|| start.elapsed());
                    out.extend_from_slice(data);
                }
            }
        }
    };
    (out.freeze(), first.unwrap_or_else(|| start.elapsed()), cut)
}

type Body = Full<Bytes>;
/// Listener, TLS, the client's own address (`None`: the kernel's choice).
type PoolKey = (SocketAddr, bool, Option<std::net::IpAddr>);

/// HTTP client with one keep-alive pool per (listener, tls) for HTTP/1.1 and one
/// shared multiplexed connection per (listener, tls) for HTTP/2.
pub struct HttpClient {
    tls_h1: Option<tokio_rustls::TlsConnector>,
    tls_h2: Option<tokio_rustls::TlsConnector>,
    idle_h1: Mutex<HashMap<PoolKey, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<PoolKey, http2::SendRequest<Body>>>,
}

impl HttpClient {
    /// A client trusting `ca` (the case's self-signed certificate) for TLS.
    pub fn new(ca: Option<CertificateDer<'static>>) -> Result<Self, String> {
        let (tls_h1, tls_h2) = match ca {
            Some(ca) => (Some(tls_connector(ca.clone(), b"http/1.1")?), Some(tls_connector(ca, b"h2")?)),
            None => (None, None),
        };
        Ok(Self { tls_h1, tls_h2, idle_h1: Mutex::new(HashMap::new()), h2: Mutex::new(HashMap::new()) })
    }

    /// Sends `req` (URI: path and query only) to `addr`; reads the whole answer
    /// (a body cut before its end is an error).
    pub async fn send(
        &self,
        addr: SocketAddr,
        version: HttpVersion,
        req: http::Request<Body>,
    ) -> Result<HttpResponse, String> {
        let resp = self.send_allow_cut(addr, version, req, None).await?;
        match resp.cut {
            Some(e) => Err(e),
            None => Ok(resp),
        }
    }

    /// Like `send`, but a body cut before its end is reported in `cut`; `source`
    /// is the loopback address to connect from (`None`: the kernel's choice).
    pub async fn send_allow_cut(
        &self,
        addr: SocketAddr,
        version: HttpVersion,
        req: http::Request<Body>,
        source: Option<std::net::IpAddr>,
    ) -> Result<HttpResponse, String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.send_inner(addr, version, req, source))
            .await
            .map_err(|_| format!("no complete answer within {REQUEST_TIMEOUT:?} (hung)"))?
    }

    async fn send_inner(
        &self,
        addr: SocketAddr,
        version: HttpVersion,
        mut req: http::Request<Body>,
        source: Option<std::net::IpAddr>,
    ) -> Result<HttpResponse, String> {
        let start = Instant::now();
        let tls = version.is_tls();
        let key = (addr, tls, source);
        let pq = req.uri().path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
        match version {
            HttpVersion::H1 | HttpVersion::TlsH1 => {
                if !req.headers().contains_key(http::header::HOST) {
                    let host = http::HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
                    req.headers_mut().insert(http::header::HOST, host);
                }
                let mut sender = self.h1_sender(key).await?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("HTTP/1.1 request failed: {}", error_chain(&e)))?;
                let (parts, body) = resp.into_parts();
                let (body, first_byte, cut) = read_body(body, start).await;
                let close = cut.is_some()
                    || parts
                        .headers
                        .get_all(http::header::CONNECTION)
                        .iter()
                        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("close")));
                if !close && !sender.is_closed() && parts.version == http::Version::HTTP_11 {
                    lock(&self.idle_h1).entry(key).or_default().push(sender);
                }
                Ok(HttpResponse {
                    status: parts.status.as_u16(),
                    version: parts.version,
                    headers: parts.headers,
                    body,
                    elapsed: start.elapsed(),
                    first_byte,
                    cut,
                })
            }
            HttpVersion::H2c | HttpVersion::TlsH2 => {
                // HTTP/2 has no Host header: a case's `host` becomes the :authority.
                let authority = match req.headers_mut().remove(http::header::HOST) {
                    Some(h) => h.to_str().map_err(|e| e.to_string())?.to_string(),
                    None => addr.to_string(),
                };
                let scheme = if tls { "https" } else { "http" };
                *req.uri_mut() = format!("{scheme}://{authority}{pq}").parse().map_err(|e| format!("bad URI: {e}"))?;
                *req.version_mut() = http::Version::HTTP_2;
                let mut sender = self.h2_sender(key).await?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("HTTP/2 request failed: {}", error_chain(&e)))?;
                let (parts, body) = resp.into_parts();
                let (body, first_byte, cut) = read_body(body, start).await;
                Ok(HttpResponse {
                    status: parts.status.as_u16(),
                    version: parts.version,
                    headers: parts.headers,
                    body,
                    elapsed: start.elapsed(),
                    first_byte,
                    cut,
                })
            }
        }
    }

    async fn h1_sender(&self, key: PoolKey) -> Result<http1::SendRequest<Body>, String> {
        loop {
            let Some(mut s) = lock(&self.idle_h1).get_mut(&key).and_then(Vec::pop) else {
                break;
            };
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let tls = if key.1 { self.tls_h1.as_ref() } else { None };
        let io = connect(key.0, tls, key.1, key.2).await?;
        let (sender, conn) =
            http1::handshake(io).await.map_err(|e| format!("HTTP/1.1 handshake: {}", error_chain(&e)))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn h2_sender(&self, key: PoolKey) -> Result<http2::SendRequest<Body>, String> {
        let cached = lock(&self.h2).get(&key).cloned();
        if let Some(mut s) = cached {
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let tls = if key.1 { self.tls_h2.as_ref() } else { None };
        let io = connect(key.0, tls, key.1, key.2).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {}", error_chain(&e)))?;
        tokio::spawn(conn);
        lock(&self.h2).insert(key, sender.clone());
        Ok(sender)
    }

    /// Forgets every pooled connection (they close once their tasks notice).
    pub fn clear(&self) {
        lock(&self.idle_h1).clear();
        lock(&self.h2).clear();
    }
}

/// Either side of a TCP or TLS client connection, as hyper IO.
type Io = TokioIo<Box<dyn IoStream>>;

/// A byte stream hyper can run a client connection on.
pub trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

async fn connect(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    want_tls: bool,
    source: Option<std::net::IpAddr>,
) -> Result<Io, String> {
    let tcp = match source {
        None => TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?,
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("binding the client to {ip}: {e}"))?;
            sock.connect(addr).await.map_err(|e| format!("connect {addr} from {ip}: {e}"))?
        }
    };
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    if !want_tls {
        return Ok(TokioIo::new(Box::new(tcp)));
    }
    let tls = tls.ok_or("TLS asked for but the harness has no certificate")?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    let (_, session) = stream.get_ref();
    let offered = session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
    let asked = tls.config().alpn_protocols[0].clone();
    if asked == b"h2" && offered.as_deref() != Some("h2") {
        return Err(format!("TLS ALPN: asked for h2, server negotiated {offered:?}"));
    }
    Ok(TokioIo::new(Box::new(stream)))
}

fn tls_connector(ca: CertificateDer<'static>, alpn: &[u8]) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| format!("trusting the test certificate: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a raw TCP exchange produced.
#[derive(Debug)]
pub struct RawResponse {
    /// The complete response head (up to and without the blank line); `None` when
    /// the connection closed before a head was complete.
    pub head: Option<String>,
    /// Without a complete head: the bytes that came before the close.
    pub partial: Vec<u8>,
    /// The server closed (or reset) the connection: after its answer, or without one.
    pub closed: bool,
}

/// Writes `data` on a fresh connection, reads the response head; with `watch_close`,
/// keeps reading (up to 2 s) to see whether the server closes the connection; with
/// `hold_ms`, keeps the connection open that long without reading, then closes it.
pub async fn raw(addr: SocketAddr, data: &[u8], watch_close: bool, hold_ms: u64) -> Result<RawResponse, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    // The server may answer and close before reading everything: ignore write errors.
    let _ = tcp.write_all(data).await;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + RAW_TIMEOUT;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => {
                return Err(format!(
                    "no complete response head within {RAW_TIMEOUT:?} (hung connection); got {:?}",
                    crate::expect::preview(&buf, 300)
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => break None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let Some(end) = head_end else {
        return Ok(RawResponse { head: None, partial: buf, closed: true });
    };
    let head = Some(String::from_utf8_lossy(&buf[..end]).into_owned());
    if hold_ms > 0 {
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    }
    if !watch_close {
        return Ok(RawResponse { head, partial: Vec::new(), closed: false });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let closed = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
    };
    Ok(RawResponse { head, partial: Vec::new(), closed })
}

/// The result of one gRPC call: status and every reply received before it.
#[derive(Debug, Default)]
pub struct GrpcOutcome {
    pub code: i32,
    pub message: String,
    pub replies: Vec<EchoReply>,
}

/// The transport under the gRPC clients: hyper-util's pooling client speaking h2c.
/// Unlike tonic's `Channel` it does not enforce `grpc-timeout` itself, so a
/// DEADLINE_EXCEEDED seen by a case comes from luagate, not from the client.
pub type GrpcTransport = LegacyClient<HttpConnector, tonic::body::Body>;
/// The testbed's `EchoClient` over [`GrpcTransport`].
pub type Echo = EchoClient<GrpcTransport>;

/// gRPC clients, one (lazily connecting) client per listener.
#[derive(Default)]
pub struct GrpcClients {
    clients: Mutex<HashMap<SocketAddr, Echo>>,
}

impl GrpcClients {
    /// The shared client for `addr`.
    pub fn client(&self, addr: SocketAddr) -> Result<Echo, String> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(&addr) {
            return Ok(c.clone());
        }
        let c = echo_client(addr)?;
        clients.insert(addr, c.clone());
        Ok(c)
    }

    /// Runs one call as a case step describes it.
    pub async fn call(&self, addr: SocketAddr, call: &GrpcCall) -> Result<GrpcOutcome, String> {
        let client = self.client(addr)?;
        tokio::time::timeout(REQUEST_TIMEOUT, run_call(client, call))
            .await
            .map_err(|_| format!("gRPC call not finished within {REQUEST_TIMEOUT:?} (hung)"))?
    }
}

/// A new `EchoClient` for `addr` with its own connection, windows large enough for
/// 8 MiB messages, accepting messages up to 64 MiB.
pub fn echo_client(addr: SocketAddr) -> Result<Echo, String> {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(2)));
    let transport = LegacyClient::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(4 << 20)
        .http2_initial_connection_window_size(8 << 20)
        .build(conn);
    let origin: http::Uri = format!("http://{addr}").parse().map_err(|e| format!("origin: {e}"))?;
    Ok(EchoClient::with_origin(transport, origin)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE))
}

fn echo_request(call: &GrpcCall) -> EchoRequest {
    EchoRequest {
        message: call.message.clone(),
        payload: vec![b'p'; call.payload_size],
        count: call.count.unwrap_or(3),
        delay_ms: call.delay_ms,
        status_code: call.status_code,
        reply_size: call.reply_size,
    }
}

fn with_meta<T>(msg: T, call: &GrpcCall) -> Result<tonic::Request<T>, String> {
    let mut r = tonic::Request::new(msg);
    for (k, v) in &call.metadata {
        let key = AsciiMetadataKey::from_bytes(k.as_bytes()).map_err(|e| format!("metadata key {k:?}: {e}"))?;
        let val = AsciiMetadataValue::try_from(v.as_str()).map_err(|e| format!("metadata value {v:?}: {e}"))?;
        r.metadata_mut().append(key, val);
    }
    if let Some(ms) = call.timeout_ms {
        r.set_timeout(Duration::from_millis(ms));
    }
    Ok(r)
}

async fn run_call(mut client: Echo, call: &GrpcCall) -> Result<GrpcOutcome, String> {
    let mut out = GrpcOutcome::default();
    let req = echo_request(call);
    let n = call.count.unwrap_or(3) as usize;
    let result = match call.method {
        GrpcMethod::Unary => client.unary(with_meta(req, call)?).await.map(|r| out.replies.push(r.into_inner())),
        GrpcMethod::ClientStream => {
            let msgs = futures_util::stream::iter(vec![req; n]);
            client.client_stream(with_meta(msgs, call)?).await.map(|r| out.replies.push(r.into_inner()))
        }
        GrpcMethod::ServerStream | GrpcMethod::Bidi => {
            let resp = if call.method == GrpcMethod::ServerStream {
                client.server_stream(with_meta(req, call)?).await
            } else {
                let msgs = futures_util::stream::iter(vec![req; n]);
                client.bidi(with_meta(msgs, call)?).await
            };
            match resp {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(r)) => out.replies.push(r),
                            Ok(None) => break Ok(()),
                            Err(s) => break Err(s),
                        }
                    }
                }
                Err(s) => Err(s),
            }
        }
    };
    if let Err(status) = result {
        out.code = status.code() as i32;
        out.message = status.message().to_string();
    }
    for (i, r) in out.replies.iter().enumerate() {
        if call.method != GrpcMethod::Unary && call.method != GrpcMethod::ClientStream && r.index as usize != i {
            return Err(format!("stream replies out of order: reply {i} has index {}", r.index));
        }
    }
    Ok(out)
}
