//! Whole-process tests the data-driven cases cannot express: the command
//! line (`--version`, `reload` through the pid file), a gRPC client
//! cancelling a stream, which must reset the upstream stream too, and a
//! client going away while a Lua phase waits, which must end the script at
//! once.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testbed::pb::echo_client::EchoClient;
use testbed::pb::EchoRequest;

mod support;

use support::{free_port, Luagate, BIN};

fn dir(name: &str) -> std::path::PathBuf {
    support::dir("cli", name)
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("--version").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("luagate {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn reload_command_signals_the_pid_in_the_pid_file() {
    let d = dir("reload");
    let port = free_port();
    let config = |body: &str| {
        format!(
            "pid_file: luagate.pid\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\nroutes:\n  - {{ match: {{ path: / }}, return: {{ status: 200, body: \"{body}\" }} }}\n"
        )
    };
    let lg = Luagate::start(&d, &config("one"), port);
    let pid: u32 = std::fs::read_to_string(d.join("luagate.pid")).expect("pid file").trim().parse().expect("a pid");
    assert_eq!(pid, lg.child.id());
    std::fs::write(d.join("luagate.yaml"), config("two")).expect("new config");
    let out = Command::new(BIN).args(["reload", "-c"]).arg(d.join("luagate.yaml")).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pid.to_string()));
    lg.wait_log("snapshot swapped");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.ends_with("two"), "{answer}");
}

#[test]
fn reload_without_a_running_instance_fails_clearly() {
    let d = dir("nopid");
    std::fs::write(
        d.join("luagate.yaml"),
        "pid_file: luagate.pid\nlisten: [ { addr: \"127.0.0.1:1\" } ]\nroutes: [ { return: { status: 200 } } ]\n",
    )
    .expect("config");
    let out = Command::new(BIN).args(["reload", "-c"]).arg(d.join("luagate.yaml")).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("luagate.pid"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_resets_the_upstream_stream() {
    let backend = testbed::spawn_grpc("g").await.expect("grpc backend");
    let d = dir("cancel");
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         upstreams: {{ g: {{ protocol: h2c, peers: [ {{ addr: \"{}\" }} ] }} }}\n\
         routes: [ {{ match: {{ grpc_service: echo.v1.Echo }}, upstream: g }} ]\n",
        backend.addr()
    );
    let _lg = Luagate::start(&d, &config, port);
    let transport: Client<HttpConnector, tonic::body::Body> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
    let origin: http::Uri = format!("http://{}", SocketAddr::from(([127, 0, 0, 1], port))).parse().expect("uri");
    let mut client = EchoClient::with_origin(transport, origin);
    let req = EchoRequest { message: "tick".into(), count: 100, delay_ms: 50, ..Default::default() };
    let mut stream = client.server_stream(req).await.expect("stream starts").into_inner();
    let first = stream.message().await.expect("a reply").expect("not ended");
    assert_eq!(first.index, 0);
    assert_eq!(backend.stats().grpc_cancelled.load(Ordering::Relaxed), 0);
    drop(stream);
    let until = Instant::now() + Duration::from_secs(3);
    while backend.stats().grpc_cancelled.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < until, "the upstream stream was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend.stats().grpc_completed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_ends_a_waiting_script_at_once() {
    let d = dir("abort");
    std::fs::create_dir_all(d.join("lua")).expect("lua dir");
    std::fs::write(d.join("lua/sema.lua"), "return require('ngx.semaphore').new(0)\n").expect("module");
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         lua: {{ package_path: \"{}/lua/?.lua\" }}\n\
         routes:\n\
         \x20 - {{ match: {{ path: /wait }}, lua: {{ content: \"require('sema'):wait(30) ngx.log(ngx.ERR, 'went on')\" }} }}\n\
         \x20 - {{ match: {{ path: /count }}, lua: {{ content: \"ngx.print(require('sema'):count())\" }} }}\n",
        d.display()
    );
    let lg = Luagate::start(&d, &config, port);
    let h2: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
    let count = || async {
        let resp = get_count(port).await;
        resp.trim().parse::<i64>().unwrap_or_else(|_| panic!("a count: {resp:?}"))
    };
    let uri: http::Uri = format!("http://127.0.0.1:{port}/wait").parse().expect("uri");
    let waiting = tokio::spawn(async move { h2.get(uri).await });
    let until = Instant::now() + Duration::from_secs(5);
    while count().await != -1 {
        assert!(Instant::now() < until, "the script never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Dropping the request resets its HTTP/2 stream: the script must leave the semaphore's queue now, not at some GC.
    waiting.abort();
    let until = Instant::now() + Duration::from_secs(3);
    while count().await != 0 {
        assert!(Instant::now() < until, "the aborted script still waits on the semaphore");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!lg.log().contains("went on"), "{}", lg.log());
}

/// GET /count over HTTP/1.1: the body.
async fn get_count(port: u16) -> String {
    use http_body_util::BodyExt;
    let client: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: http::Uri = format!("http://127.0.0.1:{port}/count").parse().expect("uri");
    let resp = client.get(uri).await.expect("GET /count");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
