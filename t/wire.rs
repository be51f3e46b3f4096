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
    assert!(waited >= Duration::from_millis(350) && waited < Duration::from_millis(1500), "{waited:?}");
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
