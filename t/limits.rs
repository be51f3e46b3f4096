//! Rate limits measured over time, and shared by two luagate processes
//! through a real redis-server — what the one-process data-driven cases
//! cannot express:
//!
//! * sending at 3× a limit's rate for 5 s admits `rate × 5 s + burst` (±10 %);
//! * two luagate instances with a cluster limit admit that much *together*
//!   (each on its own would admit it alone, twice as much in all);
//! * with Redis stopped, every decision falls back (`on_error: local`)
//!   within the configured bound: no request waits for Redis.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[path = "harness/redis.rs"]
#[allow(dead_code)]
mod redis;

/// What `harness/redis.rs` asks of the harness it lives in.
mod runner {
    pub fn free_ports(n: usize) -> Result<Vec<std::net::SocketAddr>, String> {
        (0..n).map(|_| Ok(super::free_addr())).collect()
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_luagate");

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("limits-{name}-{}", std::process::id()));
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
    fn start(dir: &Path, name: &str, config: &str, addr: SocketAddr) -> Self {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).expect("config");
        let stderr = dir.join(format!("{name}.stderr.log"));
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&cfg)
            .env_remove("LUAGATE_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("luagate starts");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
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
}

impl Drop for Luagate {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
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

fn config(listen: SocketAddr, rate_limit: &str, redis: Option<SocketAddr>) -> String {
    let redis = redis.map(|r| format!("redis: {{ addr: \"{r}\", timeout: 20ms, retry: 200ms }}\n")).unwrap_or_default();
    format!(
        "workers: 2\nlisten: [ {{ addr: \"{listen}\" }} ]\naccess_log: {{ path: off }}\n{redis}routes:\n  - match: {{ path_prefix: / }}\n    return: {{ status: 200, body: ok }}\n    rate_limit: {rate_limit}\n"
    )
}

/// What paced traffic got: admitted (200), limited (429), and the slowest answer.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
    slowest_us: AtomicU64,
}

/// Sends `per_second` requests a second, spread over `targets` in turn, for
/// `seconds`, each without waiting for the previous one.
async fn paced(targets: &[SocketAddr], per_second: u64, seconds: u64) -> Arc<Tally> {
    let client: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let tally = Arc::new(Tally::default());
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    let mut tasks = Vec::new();
    for i in 0..per_second * seconds {
        tick.tick().await;
        let uri: http::Uri = format!("http://{}/x", targets[i as usize % targets.len()]).parse().expect("uri");
        let (client, tally) = (client.clone(), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let status = match tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await {
                Ok(Ok(resp)) => resp.status().as_u16(),
                _ => 0,
            };
            tally.slowest_us.fetch_max(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
            match status {
                200 => &tally.ok,
                429 => &tally.limited,
                _ => &tally.other,
            }
            .fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }
    tally
}

fn within_10_percent(got: u64, want: u64) -> bool {
    got * 10 >= want * 9 && got * 10 <= want * 11
}

/// 20r/s with burst 10, nodelay; 60 r/s for 5 s: 20 × 5 + 10 = 110 admitted.
const RATE_LIMIT: &str = "{ rate: 20r/s, burst: 10, nodelay: true }";
const WANT: u64 = 20 * 5 + 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_rate_for_five_seconds_admits_rate_times_time_plus_burst() {
    let d = dir("accuracy");
    let listen = free_addr();
    let lg = Luagate::start(&d, "one", &config(listen, RATE_LIMIT, None), listen);
    let t = paced(&[listen], 60, 5).await;
    let (ok, limited) = (t.ok.load(Ordering::Relaxed), t.limited.load(Ordering::Relaxed));
    assert_eq!(t.other.load(Ordering::Relaxed), 0, "{}", lg.log());
    eprintln!("single instance: {ok} admitted, {limited} limited (want {WANT} ±10 %)");
    assert_eq!(ok + limited, 300);
    assert!(within_10_percent(ok, WANT), "admitted {ok}, want {WANT} ±10 %");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_cluster_limit_through_redis() {
    let d = dir("cluster");
    let redis = redis::RedisServer::start("r", &d).expect("redis-server");
    let (a, b) = (free_addr(), free_addr());
    let limit = "{ rate: 20r/s, burst: 10, nodelay: true, cluster: true, on_error: deny }";
    let la = Luagate::start(&d, "a", &config(a, limit, Some(redis.addr())), a);
    let lb = Luagate::start(&d, "b", &config(b, limit, Some(redis.addr())), b);
    // 60 r/s in all, alternating between the two instances.
    let t = paced(&[a, b], 60, 5).await;
    let ok = t.ok.load(Ordering::Relaxed);
    assert_eq!(t.other.load(Ordering::Relaxed), 0, "{}\n{}", la.log(), lb.log());
    eprintln!("two instances: {ok} admitted in all (want {WANT} ±10 %)");
    // Counted apart, each would admit ~110 of its 150: ~220 in all.
    assert!(within_10_percent(ok, WANT), "admitted {ok} in all, want {WANT} ±10 %\n{}\n{}", la.log(), lb.log());
    assert!(!la.log().contains("cluster limit without redis"), "{}", la.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_decisions_fall_back_within_the_bound() {
    let d = dir("fallback");
    let mut redis = redis::RedisServer::start("r", &d).expect("redis-server");
    let listen = free_addr();
    let limit = "{ rate: 20r/s, burst: 10, nodelay: true, cluster: true, on_error: local }";
    let lg = Luagate::start(&d, "one", &config(listen, limit, Some(redis.addr())), listen);
    let before = paced(&[listen], 60, 1).await;
    assert_eq!(before.other.load(Ordering::Relaxed), 0);
    redis.stop();
    // 3× the rate for 2 s on the local fallback: 20 × 2 + 10 admitted, none waiting on Redis
    // (timeout 20 ms; the bound allows for a loaded debug build).
    let t = paced(&[listen], 60, 2).await;
    let ok = t.ok.load(Ordering::Relaxed);
    assert_eq!(t.other.load(Ordering::Relaxed), 0, "{}", lg.log());
    assert!(within_10_percent(ok, 20 * 2 + 10), "admitted {ok} on the fallback, want 50 ±10 %\n{}", lg.log());
    let slowest = Duration::from_micros(t.slowest_us.load(Ordering::Relaxed));
    eprintln!("redis stopped: {ok} admitted on the fallback, slowest answer {slowest:?}");
    assert!(slowest < Duration::from_millis(150), "slowest answer {slowest:?}\n{}", lg.log());
    assert!(lg.log().contains("redis unavailable"), "{}", lg.log());
}
