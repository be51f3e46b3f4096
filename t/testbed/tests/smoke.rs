//! Smoke tests of the testbed backends through real clients: hyper's legacy client
//! over HTTP/1.1 and h2c, and the generated tonic client for all four Echo methods,
//! including large messages, error statuses and client-side cancellation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use testbed::pb::echo_client::EchoClient;
use testbed::pb::{EchoReply, EchoRequest};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body: collected.to_bytes(), trailers }
}

async fn get(client: &HttpClient, url: &str) -> Reply {
    let req = http::Request::get(url).body(Full::default()).unwrap();
    send(client, req).await
}

fn json(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).expect("json body")
}

#[tokio::test]
async fn http1_and_h2c_describe_the_request() {
    let b = testbed::spawn_http("web1").await.unwrap();
    let base = format!("http://{}", b.addr());

    let req = http::Request::post(format!("{base}/status/201/x?a=1&b=2"))
        .header("x-test", "one")
        .header("x-test", "two")
        .header("x-single", "v")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.headers["x-backend"], "web1");
    assert_eq!(r.headers["content-type"], "application/json");
    let j = json(&r);
    assert_eq!(j["backend"], "web1");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["uri"], "/status/201/x?a=1&b=2");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["x-test"], serde_json::json!(["one", "two"]));
    assert_eq!(j["headers"]["x-single"], "v");
    assert_eq!(j["headers"]["host"], b.addr().to_string());
    assert_eq!(j["body_len"], 5);

    let started = Instant::now();
    let r = get(&h2c_client(), &format!("{base}/delay/50/status/503")).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["x-backend"], "web1");
    let j = json(&r);
    assert_eq!(j["version"], "HTTP/2.0");
    assert_eq!(j["uri"], "/delay/50/status/503");
    assert_eq!(j["authority"], b.addr().to_string());
    assert_eq!(j["body_len"], 0);

    let stats = b.stats();
    assert_eq!(stats.requests.load(Ordering::Relaxed), 2);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 2);
    b.shutdown().await;
}

#[tokio::test]
async fn echo_streams_one_mib_back() {
    let b = testbed::spawn_http("echo").await.unwrap();
    let body: Bytes = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    for client in [h1_client(), h2c_client()] {
        let req = http::Request::put(format!("http://{}/echo/x", b.addr()))
            .header("content-type", "application/x-test")
            .body(Full::new(body.clone()))
            .unwrap();
        let r = send(&client, req).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/x-test");
        assert_eq!(r.headers["x-backend"], "echo");
        assert!(r.body == body, "echoed body differs");
    }
}

#[tokio::test]
async fn sized_chunked_slow_trailers_close_and_headers() {
    let b = testbed::spawn_http("misc").await.unwrap();
    let base = format!("http://{}", b.addr());
    let h1 = h1_client();
    let h2 = h2c_client();

    let r = get(&h1, &format!("{base}/bytes/100000")).await;
    assert_eq!(r.headers["content-length"], "100000");
    assert_eq!(r.headers["content-type"], "application/octet-stream");
    assert_eq!(r.body.len(), 100_000);
    assert!(r.body.iter().all(|&c| c == b'a'));

    let r = get(&h1, &format!("{base}/chunked/40000")).await;
    assert!(r.headers.get("content-length").is_none());
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    assert_eq!(r.body.len(), 40_000);

    let started = Instant::now();
    let r = get(&h2, &format!("{base}/slow/100")).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(&r.body[..], b"slow");

    let r = get(&h2, &format!("{base}/trailers")).await;
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(r.trailers.expect("h2 trailers")["x-trailer"], "yes");

    let req = http::Request::get(format!("{base}/trailers")).header("te", "trailers").body(Full::default()).unwrap();
    let r = send(&h1, req).await;
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(r.trailers.expect("h1 trailers")["x-trailer"], "yes");

    let r = get(
        &h1,
        &format!("{base}/set-header?x-foo=1&connection=x-foo&keep-alive=timeout%3D5&transfer-encoding=gzip&x-foo=2"),
    )
    .await;
    assert_eq!(r.status, 200);
    let foo: Vec<_> = r.headers.get_all("x-foo").iter().collect();
    assert_eq!(foo, ["1", "2"]);
    assert_eq!(r.headers["keep-alive"], "timeout=5");
    assert!(json(&r)["backend"] == "misc");

    let fresh = h1_client();
    let before = b.stats().connections.load(Ordering::Relaxed);
    let r = get(&fresh, &format!("{base}/close")).await;
    assert_eq!(r.headers["connection"], "close");
    let r = get(&fresh, &format!("{base}/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.stats().connections.load(Ordering::Relaxed), before + 2);
}

#[tokio::test]
async fn shutdown_releases_the_port() {
    let b = testbed::spawn_http("first").await.unwrap();
    let addr = b.addr();
    b.shutdown().await;
    let _second = testbed::spawn_http_at("second", addr).await.unwrap();
    let r = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(r.headers["x-backend"], "second");
}

async fn grpc_client(addr: std::net::SocketAddr) -> EchoClient<tonic::transport::Channel> {
    EchoClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_all_methods() {
    let b = testbed::spawn_grpc("g1").await.unwrap();
    let mut c = grpc_client(b.addr()).await;

    // Unary, with metadata and a deadline.
    let mut req =
        tonic::Request::new(EchoRequest { message: "hi".into(), payload: b"abc".to_vec(), ..Default::default() });
    req.metadata_mut().insert("x-custom", "v1".parse().unwrap());
    req.set_timeout(Duration::from_secs(5));
    let r = c.unary(req).await.unwrap().into_inner();
    assert_eq!(r.message, "hi");
    assert_eq!(r.payload, b"abc");
    assert_eq!(r.backend, "g1");
    assert_eq!(r.metadata["x-custom"], "v1");
    assert!(r.metadata.contains_key("grpc-timeout"), "{:?}", r.metadata);
    assert_eq!(r.metadata[":authority"], b.addr().to_string());

    // 8 MiB each way.
    let big = vec![7u8; 8 << 20];
    let r = c.unary(EchoRequest { payload: big.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert!(r.payload == big);
    let r = c.unary(EchoRequest { reply_size: 9 << 20, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.payload.len(), 9 << 20);

    // Error status.
    let err = c
        .unary(EchoRequest {
            message: "nope".into(),
            status_code: tonic::Code::PermissionDenied as u32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "nope");

    // ServerStream, then one ending with a status.
    let mut s = c
        .server_stream(EchoRequest { message: "s".into(), count: 3, reply_size: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<EchoReply> = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m);
    }
    assert_eq!(got.iter().map(|m| m.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(got.iter().all(|m| m.payload == b"aaaaaaaaaa" && m.backend == "g1"));
    let mut s = c
        .server_stream(EchoRequest {
            message: "gone".into(),
            count: 2,
            status_code: tonic::Code::Unavailable as u32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().index, 0);
    assert_eq!(s.message().await.unwrap().unwrap().index, 1);
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.message(), "gone");

    // ClientStream.
    let msgs = (0..4).map(|i| EchoRequest { message: format!("m{i}"), payload: vec![0; 100], ..Default::default() });
    let r = c.client_stream(futures_util::stream::iter(msgs)).await.unwrap().into_inner();
    assert_eq!(r.message, "m3");
    assert_eq!(r.received_messages, 4);
    assert_eq!(r.received_bytes, 400);
    assert!(r.metadata.contains_key("content-type"));

    // Bidi: replies as each message arrives.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut inbound = c.bidi(outbound).await.unwrap().into_inner();
    for i in 0..3u32 {
        tx.send(EchoRequest { message: format!("b{i}"), payload: vec![1; i as usize * 10], ..Default::default() })
            .await
            .unwrap();
        let m = inbound.message().await.unwrap().unwrap();
        assert_eq!(m.message, format!("b{i}"));
        assert_eq!(m.index, i);
        assert_eq!(m.received_bytes, u64::from(i) * 10);
        assert_eq!(m.payload.len(), i as usize * 10);
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());

    let stats = b.stats();
    assert_eq!(stats.requests.load(Ordering::Relaxed), 8);
    assert_eq!(stats.grpc_completed.load(Ordering::Relaxed), 8);
    assert_eq!(stats.grpc_cancelled.load(Ordering::Relaxed), 0);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn grpc_cancelled_server_stream_is_counted() {
    let b = testbed::spawn_grpc("g2").await.unwrap();
    let mut c = grpc_client(b.addr()).await;
    let s =
        c.server_stream(EchoRequest { count: 5, delay_ms: 10_000, ..Default::default() }).await.unwrap().into_inner();
    drop(s);
    let stats = b.stats();
    let deadline = Instant::now() + Duration::from_secs(2);
    while stats.grpc_cancelled.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "cancellation not seen in 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.grpc_cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(stats.grpc_completed.load(Ordering::Relaxed), 0);

    // A unary call abandoned at its deadline is cancelled too.
    let mut req = tonic::Request::new(EchoRequest { delay_ms: 10_000, ..Default::default() });
    req.set_timeout(Duration::from_millis(100));
    let err = c.unary(req).await.unwrap_err();
    // Client (CANCELLED) and server (DEADLINE_EXCEEDED) timers race.
    assert!(matches!(err.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while stats.grpc_cancelled.load(Ordering::Relaxed) == 1 {
        assert!(Instant::now() < deadline, "unary cancellation not seen in 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.grpc_cancelled.load(Ordering::Relaxed), 2);
    assert_eq!(stats.grpc_completed.load(Ordering::Relaxed), 0);

    // The server enforces grpc-timeout on streams too (the client's timer only covers
    // the response headers): one reply at 150 ms, then DEADLINE_EXCEEDED at 250 ms.
    let mut req = tonic::Request::new(EchoRequest { count: 3, delay_ms: 150, ..Default::default() });
    req.set_timeout(Duration::from_millis(250));
    let mut s = c.server_stream(req).await.unwrap().into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().index, 0);
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(stats.grpc_cancelled.load(Ordering::Relaxed), 3);
    assert_eq!(stats.grpc_completed.load(Ordering::Relaxed), 0);

    // Within the deadline nothing changes.
    let mut req = tonic::Request::new(EchoRequest { count: 2, delay_ms: 10, ..Default::default() });
    req.set_timeout(Duration::from_secs(5));
    let mut s = c.server_stream(req).await.unwrap().into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 2);
    assert_eq!(stats.grpc_completed.load(Ordering::Relaxed), 1);
}

#[test]
fn descriptor_is_embedded() {
    let d = testbed::ECHO_DESCRIPTOR;
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"echo.proto") && has(b"echo.v1") && has(b"ServerStream") && has(b"EchoReply"));
}
