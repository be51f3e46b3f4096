//! Whole-process tests where the bytes and their timing on the wire matter
//! and the data-driven cases cannot say it: a client uploading slower than
//! the upstream read timeout, an upstream that stops reading the request,
//! and WebSocket tunnels (HTTP/1.1 Upgrade, HTTP/2 extended CONNECT).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::{free_port, Luagate};

fn dir(name: &str) -> std::path::PathBuf {
    support::dir("wire", name)
}

/// A luagate with one route to `peer` over HTTP/1.1; `extra` is more YAML for the upstream and route.
fn proxy_to(name: &str, peer: SocketAddr, upstream: &str, route: &str) -> (Luagate, u16) {
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         upstreams: {{ app: {{ peers: [ {{ addr: \"{peer}\" }} ]{upstream} }} }}\n\
         routes: [ {{ match: {{ path_prefix: / }}, upstream: app{route} }} ]\n"
    );
    (Luagate::start(&dir(name), &config, port), port)
}

/// Reads until the peer closes or `limit` passes; what came.
async fn read_all(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + limit;
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_count_against_the_upstream_read_timeout() {
    let backend = testbed::spawn_http("a").await.expect("http backend");
    // The testbed answers /x once it has read the whole body: its head comes after the upload.
    let (_lg, port) = proxy_to("slow-upload", backend.addr(), ", timeouts: { read: 400ms }", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n").await.expect("head");
    let started = Instant::now();
    for b in b"abcdef" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(&[*b]).await.expect("a body byte");
    }
    let answer = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":6"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_timeout_runs_once_the_request_is_sent() {
    // A peer that reads the whole request and never answers.
    let peer = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = peer.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = peer.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let (lg, port) = proxy_to("read-after-send", addr, ", timeouts: { read: 400ms }", "");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n").await.expect("head");
    for b in b"abc" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(&[*b]).await.expect("a body byte");
    }
    let sent = Instant::now();
    let answer = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    let waited = sent.elapsed();
    // The 504 comes a read timeout after the last byte: the 900 ms upload did not count.
    assert!(waited >= Duration::from_millis(350) && waited < Duration::from_secs(3), "{waited:?}");
    lg.wait_log("sent no response headers within 400ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_request_gets_the_send_timeout() {
    // A peer that accepts and never reads: once the socket buffers fill, the body stalls.
    let peer = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = peer.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = peer.accept().await {
            conns.push(s);
        }
    });
    let (lg, port) =
        proxy_to("send-timeout", addr, ", timeouts: { read: 30s, send: 300ms }", ", client_max_body_size: 64m");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let size = 32 << 20;
    s.write_all(format!("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes())
        .await
        .expect("head");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            if wr.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
    });
    let started = Instant::now();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            other => panic!("no answer within 10 s: {other:?} after {:?}", String::from_utf8_lossy(&head)),
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(10));
    lg.wait_log("took no request data for 300ms");
    writer.abort();
    held.abort();
}

/// A luagate with a WebSocket route to the testbed; the access log to a file.
fn websocket_proxy(name: &str, backend: SocketAddr, read: &str) -> (Luagate, u16, std::path::PathBuf) {
    let port = free_port();
    let d = dir(name);
    let access = d.join("access.log");
    let config = format!(
        "workers: 1\naccess_log: {{ path: \"{}\" }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         upstreams: {{ app: {{ peers: [ {{ addr: \"{backend}\" }} ], timeouts: {{ read: {read} }} }} }}\n\
         routes:\n\
         \x20 - {{ match: {{ path: /ws }}, upstream: app, websocket: true }}\n\
         \x20 - {{ match: {{ path: /plain }}, upstream: app }}\n",
        access.display()
    );
    (Luagate::start(&d, &config, port), port, access)
}

/// Reads up to the end of a response head; the head and any bytes after it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("no response head: {other:?} after {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

/// Reads exactly `n` bytes (after `have`).
async fn read_exact(s: &mut TcpStream, mut have: Vec<u8>, n: usize) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    while have.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(k)) if k > 0 => have.extend_from_slice(&chunk[..k]),
            other => panic!("tunnel ended early: {other:?} after {:?}", String::from_utf8_lossy(&have)),
        }
    }
    have
}

const WS_HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http1_is_tunnelled_both_ways() {
    let backend = testbed::spawn_http("a").await.expect("http backend");
    let (lg, port, access) = websocket_proxy("ws-h1", backend.addr(), "5s");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    // Bytes right behind the head, in the same write: they must reach the peer too.
    s.write_all(&[WS_HEAD, b"early"].concat()).await.expect("handshake");
    let (head, rest) = read_head(&mut s).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"), "{head}");
    // RFC 6455's example key and accept: the peer's answer reached the client unchanged.
    assert!(lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let echoed = read_exact(&mut s, rest, 5).await;
    assert_eq!(echoed, b"early");
    for msg in [&b"\x81\x85abcd hello"[..], &[0u8; 70_000][..]] {
        s.write_all(msg).await.expect("send");
        let back = read_exact(&mut s, Vec::new(), msg.len()).await;
        assert_eq!(back, msg);
    }
    // The client closes: the tunnel ends and the access line has the tunnel's bytes.
    drop(s);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&access).unwrap_or_default();
        if log.contains("\"status\":101") {
            assert!(log.contains("\"bytes_received\":70017"), "{log}");
            assert!(log.contains("\"bytes_sent\":70017"), "{log}");
            break;
        }
        assert!(Instant::now() < until, "no access log line for the tunnel: {log}\n{}", lg.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_after_the_read_timeout() {
    let backend = testbed::spawn_http("a").await.expect("http backend");
    let (_lg, port, _) = websocket_proxy("ws-idle", backend.addr(), "400ms");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(WS_HEAD).await.expect("handshake");
    let (head, _) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"ping").await.expect("send");
        assert_eq!(read_exact(&mut s, Vec::new(), 4).await, b"ping");
    }
    // ...silence closes it.
    let quiet = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("closed within 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(350) && waited < Duration::from_secs(4), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_extended_connect_reaches_an_http1_peer() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let backend = testbed::spawn_http("a").await.expect("http backend");
    let (_lg, port, _) = websocket_proxy("ws-h2", backend.addr(), "5s");
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.expect("h2 handshake");
    tokio::spawn(conn);
    let connect = |path: &str| {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    // SETTINGS_ENABLE_CONNECT_PROTOCOL comes with the server's first SETTINGS.
    send.ready().await.expect("ready");
    let mut resp = send.send_request(connect("/ws")).await.expect("extended CONNECT answered");
    assert_eq!(resp.status(), 200, "{resp:?}");
    let h = resp.headers();
    assert_eq!(h.get("sec-websocket-protocol").map(|v| v.as_bytes()), Some(&b"chat"[..]));
    assert!(h.get("sec-websocket-accept").is_none() && h.get("upgrade").is_none(), "{h:?}");
    // The peer got an HTTP/1.1 handshake with a key luagate made (and checked its accept).
    assert!(h.get("x-seen-key").is_some_and(|k| k.len() == 24), "{h:?}");
    assert_eq!(h.get("x-seen-version").map(|v| v.as_bytes()), Some(&b"13"[..]));
    let upgraded = hyper::upgrade::on(&mut resp).await.expect("stream handed over");
    let mut io = TokioIo::new(upgraded);
    for msg in [&b"over h2"[..], &[7u8; 40_000][..]] {
        io.write_all(msg).await.expect("send");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, msg);
    }
    // A route without websocket refuses the extended CONNECT.
    let resp = send.send_request(connect("/plain")).await.expect("answered");
    assert_eq!(resp.status(), 405);
}
