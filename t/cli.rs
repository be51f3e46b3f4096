//! Whole-process tests the data-driven cases cannot express: the command
//! line (`--version`, `reload` through the pid file), a gRPC client
//! cancelling a stream, which must reset the upstream stream too, a
//! client going away while a Lua phase waits, which must end the script at
//! once (and `pcall` must not catch that end), the header-read deadline over
//! TLS (and its timing), what an HTTP/1.1 client sees on an h2c-only
//! listener, `workers: auto` starting one worker per core, SIGUSR1
//! reopening a rotated access log, and the pid file removed at exit.

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

/// A TLS client trusting `ca`, offering `alpn`.
fn tls_connector(ca: rustls::pki_types::CertificateDer<'static>, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("trust the test certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// Reads until the peer closes the connection (end of stream or an error),
/// for at most `limit`: what it sent, and when it closed (None: still open).
async fn read_until_closed<S>(s: &mut S, started: Instant, limit: Duration) -> (Vec<u8>, Option<Duration>)
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::from_std(started + limit);
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// `limits.header_read_timeout` on the listener kinds where it holds from
/// the first byte on: a silent connection and a half-sent head are closed,
/// unanswered, once the timeout has passed — not before, and not much after —
/// on a cleartext http1-only listener, and over TLS both before the handshake
/// (no ClientHello) and after it (ALPN http/1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_slow_heads_on_http1_and_tls_listeners() {
    use tokio::io::AsyncWriteExt;
    const TIMEOUT: Duration = Duration::from_millis(400);
    const LATE: Duration = Duration::from_millis(1400);
    let d = dir("head-timeout");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("certificate");
    std::fs::write(d.join("cert.pem"), ck.cert.pem()).expect("cert.pem");
    std::fs::write(d.join("key.pem"), ck.signing_key.serialize_pem()).expect("key.pem");
    let (plain, tls) = (free_port(), free_port());
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlimits: {{ header_read_timeout: 400ms }}\n\
         listen:\n\
         \x20 - {{ addr: \"127.0.0.1:{plain}\", protocols: [http1] }}\n\
         \x20 - {{ addr: \"127.0.0.1:{tls}\", tls: {{ cert: cert.pem, key: key.pem }} }}\n\
         routes: [ {{ match: {{ path_prefix: / }}, return: {{ status: 200, body: ok }} }} ]\n"
    );
    let _lg = Luagate::start(&d, &config, plain);
    let check = |what: &str, (got, closed): (Vec<u8>, Option<Duration>)| {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {LATE:?}"));
        assert!(closed >= TIMEOUT, "{what}: closed after {closed:?}, before the {TIMEOUT:?} timeout");
        assert!(got.is_empty(), "{what}: answered {:?}", String::from_utf8_lossy(&got));
    };

    for (what, head) in [("http1, silent", &b""[..]), ("http1, half a head", b"GET / HTTP/1.1\r\nHost: x\r\n")] {
        let started = Instant::now();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", plain)).await.expect("connect");
        s.write_all(head).await.expect("send");
        check(what, read_until_closed(&mut s, started, LATE).await);
    }

    // No ClientHello at all: the handshake is given up at the timeout.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tls)).await.expect("connect");
    check("tls, no handshake", read_until_closed(&mut s, started, LATE).await);

    // A prompt handshake, then half a head: closed at the timeout (counted from the handshake).
    let connector = tls_connector(ck.cert.der().clone(), b"http/1.1");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls)).await.expect("connect");
    let mut s = connector.connect(name.clone(), tcp).await.expect("TLS handshake");
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("send");
    check("tls http/1.1, half a head", read_until_closed(&mut s, started, LATE).await);

    // A whole request over TLS is answered.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls)).await.expect("connect");
    let mut s = connector.connect(name, tcp).await.expect("TLS handshake");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("send");
    let (got, closed) = read_until_closed(&mut s, Instant::now(), LATE).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("ok"), "{text}");
    assert!(closed.is_some(), "connection: close was not honoured");
}

/// An HTTP/1.1 client on an h2c-only listener gets no HTTP/1.1 answer: the
/// server's HTTP/2 SETTINGS frame (the server preface), then the close.
/// HTTP/2 prior knowledge on the same listener is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_only_listener_refuses_http1() {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let d = dir("h2c-only");
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\", protocols: [h2c] }} ]\n\
         routes: [ {{ match: {{ path_prefix: / }}, return: {{ status: 200, body: ok }} }} ]\n"
    );
    let _lg = Luagate::start(&d, &config, port);
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("send");
    let (got, closed) = read_until_closed(&mut s, started, Duration::from_secs(3)).await;
    assert!(closed.is_some(), "the connection stayed open; got {got:?}");
    // A frame header: 24-bit length, type 4 (SETTINGS), flags 0, stream 0.
    assert!(got.len() >= 9 && got[3] == 4 && got[5..9] == [0, 0, 0, 0], "not a SETTINGS frame: {got:?}");
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1"), "an HTTP/1 answer: {got:?}");

    let h2: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());
    let uri: http::Uri = format!("http://127.0.0.1:{port}/").parse().expect("uri");
    let resp = h2.get(uri).await.expect("an HTTP/2 answer");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// `workers: auto` starts one worker per core the process may run on: the
/// start-up line says `workers=N` and N worker threads exist.
#[test]
fn workers_auto_starts_one_worker_per_core() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).expect("the core count");
    let d = dir("workers-auto");
    let port = free_port();
    let config = format!(
        "workers: auto\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         routes: [ {{ return: {{ status: 200 }} }} ]\n"
    );
    let lg = Luagate::start(&d, &config, port);
    lg.wait_log("luagate started");
    assert!(lg.log().contains(&format!(" workers={cores} ")), "not workers={cores}:\n{}", lg.log());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", lg.child.id())).expect("/proc/PID/task");
    let workers = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("luagate-worker"))
        .count();
    assert_eq!(workers, cores, "worker threads");
}

/// When the client leaves while a script waits inside `pcall` (a semaphore
/// wait, a sleep) or `xpcall`, the error that ends the script is not caught:
/// nothing after the protected call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcall_does_not_catch_the_end_of_a_script_whose_client_left() {
    let d = dir("abort-pcall");
    std::fs::create_dir_all(d.join("lua")).expect("lua dir");
    std::fs::write(d.join("lua/sema.lua"), "return require('ngx.semaphore').new(0)\n").expect("module");
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         lua: {{ package_path: \"{}/lua/?.lua\", shared_dicts: {{ d: 1m }} }}\n\
         routes:\n\
         \x20 - {{ match: {{ path: /wait }}, lua: {{ content: \"local s = require('sema') local ok, err = pcall(s.wait, s, 30) ngx.log(ngx.ERR, 'caught in pcall: ', tostring(err))\" }} }}\n\
         \x20 - {{ match: {{ path: /sleep }}, lua: {{ content: \"ngx.shared.d:set('sleeping', true) local ok, err = xpcall(ngx.sleep, tostring, 30) ngx.log(ngx.ERR, 'caught in xpcall: ', tostring(err))\" }} }}\n\
         \x20 - {{ match: {{ path: /count }}, lua: {{ content: \"ngx.print(require('sema'):count())\" }} }}\n\
         \x20 - {{ match: {{ path: /sleeping }}, lua: {{ content: \"ngx.print(ngx.shared.d:get('sleeping') and 1 or 0)\" }} }}\n",
        d.display()
    );
    let lg = Luagate::start(&d, &config, port);
    let h2: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new());

    let uri: http::Uri = format!("http://127.0.0.1:{port}/wait").parse().expect("uri");
    let waiting = tokio::spawn({
        let h2 = h2.clone();
        async move { h2.get(uri).await }
    });
    wait_for(port, "/count", "-1").await;
    waiting.abort();
    wait_for(port, "/count", "0").await;

    let uri: http::Uri = format!("http://127.0.0.1:{port}/sleep").parse().expect("uri");
    let sleeping = tokio::spawn(async move { h2.get(uri).await });
    wait_for(port, "/sleeping", "1").await;
    sleeping.abort();

    // A caught error would be logged at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = lg.log();
    assert!(!log.contains("caught in"), "{log}");
}

/// Polls GET `path` (HTTP/1.1) until its body is `want` (3 s at most).
async fn wait_for(port: u16, path: &str, want: &str) {
    use http_body_util::BodyExt;
    let client: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let uri: http::Uri = format!("http://127.0.0.1:{port}{path}").parse().expect("uri");
        let resp = client.get(uri).await.expect("GET");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        if body == want.as_bytes() {
            return;
        }
        assert!(Instant::now() < until, "GET {path}: {:?}, not {want:?}", String::from_utf8_lossy(&body));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `path` over a new HTTP/1.1 connection: the status line.
fn get_status(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer.lines().next().unwrap_or_default().to_string()
}

/// Polls `file` until it contains `needle` (3 s at most).
fn wait_file(file: &std::path::Path, needle: &str) {
    let until = Instant::now() + Duration::from_secs(3);
    while !std::fs::read_to_string(file).unwrap_or_default().contains(needle) {
        assert!(Instant::now() < until, "no {needle:?} in {}", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGUSR1 reopens the access log (log rotation): after the file was moved
/// away, the lines written before the signal are in the moved file, and the
/// ones after it in a new file at the configured path.
#[test]
fn sigusr1_reopens_the_access_log() {
    let d = dir("usr1");
    let port = free_port();
    let config = format!(
        "workers: 1\naccess_log: {{ path: access.log }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         routes: [ {{ return: {{ status: 200, body: ok }} }} ]\n"
    );
    let lg = Luagate::start(&d, &config, port);
    let (log, moved) = (d.join("access.log"), d.join("access.log.1"));
    assert!(get_status(port, "/one").contains("200"));
    wait_file(&log, "\"/one\"");
    std::fs::rename(&log, &moved).expect("rotate");
    assert!(get_status(port, "/two").contains("200"));
    // Still the open file, now under its new name.
    wait_file(&moved, "\"/two\"");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(lg.child.id() as i32, libc::SIGUSR1) };
    let until = Instant::now() + Duration::from_secs(3);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("\"/three\"") {
        assert!(Instant::now() < until, "no new access.log with /three after SIGUSR1");
        assert!(get_status(port, "/three").contains("200"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let new = std::fs::read_to_string(&log).expect("new access.log");
    assert!(!new.contains("\"/one\"") && !new.contains("\"/two\""), "{new}");
    let old = std::fs::read_to_string(&moved).expect("moved access.log");
    assert!(old.contains("\"/one\"") && old.contains("\"/two\""), "{old}");
}

/// On a graceful stop luagate exits 0 and removes the pid file it wrote.
#[test]
fn the_pid_file_is_removed_on_exit() {
    let d = dir("pidfile");
    let port = free_port();
    let config = format!(
        "pid_file: luagate.pid\naccess_log: {{ path: off }}\nlisten: [ {{ addr: \"127.0.0.1:{port}\" }} ]\n\
         routes: [ {{ return: {{ status: 200 }} }} ]\n"
    );
    let mut lg = Luagate::start(&d, &config, port);
    let pid_file = d.join("luagate.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file).expect("pid file").trim().parse().expect("a pid");
    assert_eq!(pid, lg.child.id());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = lg.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < until, "luagate did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", lg.log());
    assert!(!pid_file.exists(), "the pid file is still there");
}
