//! Whole-process tests the data-driven cases cannot express: the command
//! line (`--version`, `reload` through the pid file) and a gRPC client
//! cancelling a stream, which must reset the upstream stream too.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testbed::pb::echo_client::EchoClient;
use testbed::pb::EchoRequest;

const BIN: &str = env!("CARGO_BIN_EXE_luagate");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A luagate process, stopped by PID when dropped.
struct Luagate {
    child: Child,
    stderr: PathBuf,
}

impl Luagate {
    fn start(dir: &std::path::Path, config: &str, port: u16) -> Self {
        let cfg = dir.join("luagate.yaml");
        std::fs::write(&cfg, config).expect("config");
        let stderr = dir.join("stderr.log");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("luagate starts");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "luagate did not listen: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(5);
        while !self.log().contains(needle) {
            assert!(Instant::now() < until, "no {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Luagate {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
