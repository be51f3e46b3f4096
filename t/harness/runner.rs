//! Runs one case: makes its directory, allocates ports, starts the backends, writes
//! the files, a self-signed certificate and the config, starts luagate, runs the
//! steps (optionally with a same-config reload between every two), and tears down.
//! The fixture pieces (temp dir, ports, certificate, runtime) are shared with
//! `reload_stress`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use rustls::pki_types::CertificateDer;
use testbed::{Backend, Stats};

use crate::case::{self, BackendKind, Step, Vars, DEAD, LISTENERS};
use crate::client::{self, GrpcClients, HttpClient};
use crate::expect;
use crate::process::{self, Luagate, Reload};
use crate::redis::RedisServer;

/// A log step polls its file this long for the expected lines.
const LOG_WAIT: Duration = Duration::from_secs(2);
/// `signal` with `expect: { exit_code }` waits this long for the exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// A per-trial tokio runtime (2 worker threads: backends, clients, timers).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// A case's directory under cargo's target tmp dir; removed on drop unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// A fresh, empty directory for the trial named `name`.
    pub fn new(name: &str) -> Result<Self, String> {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("t").join(name.replace('/', "__"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (for looking at a failure).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// `n` distinct free loopback ports (bound together, then released).
pub fn free_ports(n: usize) -> Result<Vec<SocketAddr>, String> {
    let socks = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("allocating a port: {e}"))?;
    socks.iter().map(|s| s.local_addr().map_err(|e| e.to_string())).collect()
}

/// A loopback port bound but not listening, held for the whole case: connecting to
/// it is refused, and no one else can take it meanwhile.
pub fn dead_port() -> Result<(tokio::net::TcpSocket, SocketAddr), String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| format!("reserving a dead port: {e}"))?;
    let addr = sock.local_addr().map_err(|e| e.to_string())?;
    Ok((sock, addr))
}

/// Writes a self-signed certificate for localhost/127.0.0.1 to `dir/cert.pem` and
/// `dir/key.pem`; returns it for the client to trust.
pub fn write_cert(dir: &Path) -> Result<CertificateDer<'static>, String> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| format!("rcgen: {e}"))?;
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).map_err(|e| e.to_string())?;
    Ok(ck.cert.der().clone())
}

/// Starts one testbed backend.
pub async fn spawn_backend(name: &str, kind: BackendKind) -> Result<Backend, String> {
    let b = match kind {
        BackendKind::Http => testbed::spawn_http(name).await,
        BackendKind::Grpc => testbed::spawn_grpc(name).await,
        BackendKind::Redis => return Err(format!("backend {name}: redis is not a testbed server")),
    };
    b.map_err(|e| format!("starting backend {name}: {e}"))
}

/// A backend of a case: a testbed server or a redis-server process.
enum Server {
    Testbed(Backend),
    Redis(RedisServer),
}

impl Server {
    async fn start(name: &str, kind: BackendKind, dir: &Path) -> Result<Self, String> {
        match kind {
            // Started right here, on the trial's own thread (block_on), not on a
            // blocking-pool thread: PR_SET_PDEATHSIG follows the thread that forked,
            // and pool threads exit when idle.
            BackendKind::Redis => RedisServer::start(name, dir).map(Server::Redis),
            _ => spawn_backend(name, kind).await.map(Server::Testbed),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Testbed(b) => b.addr(),
            Server::Redis(r) => r.addr(),
        }
    }

    /// Counters (a redis server counts nothing).
    fn stats(&self) -> Arc<Stats> {
        match self {
            Server::Testbed(b) => b.stats(),
            Server::Redis(_) => Arc::new(Stats::default()),
        }
    }

    async fn shutdown(self) {
        match self {
            Server::Testbed(b) => b.shutdown().await,
            Server::Redis(mut r) => r.stop(),
        }
    }
}

/// Runs the case in `path` (trial `id`); `reload_between` is the reload mode.
pub fn run_trial(id: &str, path: &Path, reload_between: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let rt = runtime()?;
    let trial = if reload_between { format!("reload/{id}") } else { id.to_string() };
    let mut result = rt.block_on(run_case(&trial, path, &text, reload_between));
    // A port allocated and released can be taken by someone else before luagate binds
    // it: start over once with fresh ports.
    if result.as_ref().is_err_and(|e| port_clash(e)) {
        result = rt.block_on(run_case(&trial, path, &text, reload_between));
    }
    result
}

/// luagate could not start because a listener port was taken meanwhile.
pub fn port_clash(error: &str) -> bool {
    error.contains("luagate exited before accepting")
        && (error.contains("Address already in use") || error.contains("os error 98"))
}

async fn run_case(trial: &str, path: &Path, text: &str, reload_between: bool) -> Result<(), String> {
    let plain = case::parse(text, None).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut dir = TempDir::new(trial)?;
    let mut vars = Vars::default();
    // Backends first: they keep their ports, so the free ones picked next differ.
    let mut backends = BTreeMap::new();
    let mut stats = BTreeMap::new();
    for (name, kind) in &plain.backends {
        let b = Server::start(name, *kind, dir.path()).await?;
        vars.0.insert(name.clone(), b.addr().to_string());
        stats.insert(name.clone(), b.stats());
        backends.insert(name.clone(), b);
    }
    let ports = free_ports(LISTENERS.len())?;
    let mut listeners = BTreeMap::new();
    for (name, addr) in LISTENERS.iter().zip(&ports) {
        vars.0.insert(name.to_string(), addr.to_string());
        listeners.insert(name.to_string(), *addr);
    }
    let (dead_socket, dead) = dead_port()?;
    vars.0.insert(DEAD.into(), dead.to_string());
    vars.0.insert("dir".into(), dir.path().display().to_string());
    let case = case::parse(text, Some(&vars)).map_err(|e| format!("{}: {e}", path.display()))?;
    for (rel, content) in &case.files {
        let p = dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(&p, content).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let cert = write_cert(dir.path())?;
    std::fs::write(dir.path().join("config.yaml"), &case.config).map_err(|e| e.to_string())?;
    let ready: Vec<SocketAddr> =
        LISTENERS.iter().filter(|l| plain.config.contains(&format!("${{{l}}}"))).map(|l| listeners[*l]).collect();

    let luagate = Luagate::start(dir.path())?;
    let run = Run {
        luagate,
        listeners,
        backend_names: plain.backends.keys().cloned().collect(),
        backends: Mutex::new(backends),
        stats,
        http: HttpClient::new(Some(cert))?,
        grpc: GrpcClients::default(),
        good_config: Mutex::new(case.config.clone()),
        dir: dir.path().to_path_buf(),
        terminated: AtomicBool::new(false),
    };
    let mut result = async {
        run.luagate.wait_ready(&ready).await?;
        run.steps(&case.steps, "", reload_between).await
    }
    .await;
    if result.is_ok() {
        if let Some(st) = run.luagate.exited() {
            if !run.terminated.load(Ordering::SeqCst) {
                result = Err(format!("luagate exited unexpectedly ({st})"));
            }
        }
    }
    run.http.clear();
    let _ = run.luagate.stop().await;
    if result.is_ok() && run.luagate.stderr_text().contains("panicked at") {
        result = Err("luagate panicked (see stderr)".into());
    }
    let tail = run.luagate.stderr_tail(40);
    drop(run);
    drop(dead_socket);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            dir.keep();
            Err(format!("{trial} ({}):\n{e}\n{tail}\n--- case dir kept: {} ---", case.name, dir.path().display()))
        }
    }
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One running case: luagate, its backends and the clients.
struct Run {
    luagate: Luagate,
    listeners: BTreeMap<String, SocketAddr>,
    backend_names: Vec<String>,
    backends: Mutex<BTreeMap<String, Server>>,
    stats: BTreeMap<String, Arc<Stats>>,
    http: HttpClient,
    grpc: GrpcClients,
    /// The last config luagate accepted (what reload mode re-sends).
    good_config: Mutex<String>,
    dir: PathBuf,
    /// A stopping signal was sent: exiting is expected, reload mode pauses.
    terminated: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prefixes a failure of one of several repeated requests.
fn nth(k: u32, n: u32, e: String) -> String {
    if n > 1 {
        format!("answer {}/{n}: {e}", k + 1)
    } else {
        e
    }
}

/// A request body of `n` bytes: the alphabet, repeated.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

impl Run {
    fn steps<'a>(&'a self, steps: &'a [Step], prefix: &'a str, reload_between: bool) -> StepFuture<'a> {
        Box::pin(async move {
            for (i, step) in steps.iter().enumerate() {
                let label = format!("{prefix}{}", i + 1);
                if reload_between && i > 0 && self.alive() {
                    self.reload_same().await.map_err(|e| format!("reload mode: SIGHUP before step {label}: {e}"))?;
                }
                self.step(step, &label).await.map_err(|e| format!("step {label} ({}): {e}", step.summary()))?;
            }
            Ok(())
        })
    }

    fn alive(&self) -> bool {
        !self.terminated.load(Ordering::SeqCst) && self.luagate.exited().is_none()
    }

    async fn reload_same(&self) -> Result<(), String> {
        let config = lock(&self.good_config).clone();
        match self.luagate.reload(Some(&config)).await? {
            Reload::Swapped(_) => Ok(()),
            Reload::Refused(text) => Err(format!("the same config was refused: {text}")),
        }
    }

    fn listener(&self, name: &str) -> Result<SocketAddr, String> {
        self.listeners.get(name).copied().ok_or_else(|| format!("unknown listener {name:?}"))
    }

    async fn step(&self, step: &Step, label: &str) -> Result<(), String> {
        match step {
            Step::Request { req, repeat, expect, backends } => {
                let default = if req.http.is_tls() { "listen_tls" } else { "listen" };
                let addr = self.listener(req.listener.as_deref().unwrap_or(default))?;
                let body = Bytes::from(match (&req.body, req.body_size) {
                    (Some(b), _) => b.clone().into_bytes(),
                    (None, Some(n)) => pattern(n),
                    (None, None) => Vec::new(),
                });
                let mut counts = BTreeMap::new();
                for k in 0..*repeat {
                    let mut b = http::Request::builder().method(req.method.as_str()).uri(req.path.as_str());
                    for (name, values) in &req.headers {
                        for v in &values.0 {
                            b = b.header(name.as_str(), v.as_str());
                        }
                    }
                    let r = b.body(Full::new(body.clone())).map_err(|e| format!("cannot build the request: {e}"))?;
                    let resp = self.http.send_allow_cut(addr, req.http, r).await.map_err(|e| nth(k, *repeat, e))?;
                    expect::check_http(expect, &resp, &body).map_err(|e| nth(k, *repeat, e))?;
                    if let Some(v) = resp.headers.get("x-backend") {
                        let name = String::from_utf8_lossy(v.as_bytes()).into_owned();
                        *counts.entry(name).or_insert(0) += 1;
                    }
                }
                expect::check_backends(backends, &counts, self.backend_names.iter().cloned())
            }
            Step::Grpc { call, repeat, expect, backends } => {
                let addr = self.listener(call.listener.as_deref().unwrap_or("listen"))?;
                let mut counts = BTreeMap::new();
                for k in 0..*repeat {
                    let out = self.grpc.call(addr, call).await.map_err(|e| nth(k, *repeat, e))?;
                    expect::check_grpc(expect, &out).map_err(|e| nth(k, *repeat, e))?;
                    if let Some(r) = out.replies.first() {
                        *counts.entry(r.backend.clone()).or_insert(0) += 1;
                    }
                }
                expect::check_backends(backends, &counts, self.backend_names.iter().cloned())
            }
            Step::Raw { data, expect } => {
                let addr = self.listener("listen")?;
                let resp = client::raw(addr, data, expect.closed.is_some()).await?;
                expect::check_raw(expect, &resp)
            }
            Step::Reload { config, expect } => match self.luagate.reload(Some(config)).await? {
                Reload::Swapped(g) if expect.refused => {
                    Err(format!("expected the reload to be refused, but it swapped (generation={g})"))
                }
                Reload::Swapped(_) => {
                    *lock(&self.good_config) = config.clone();
                    Ok(())
                }
                Reload::Refused(text) if !expect.refused => Err(format!("reload refused:\n{text}")),
                Reload::Refused(text) => {
                    let missing = expect::missing(&text, &expect.error_contains.0);
                    if missing.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("refusal does not mention {missing:?}; logged:\n{text}"))
                    }
                }
            },
            Step::Check { config, expect } => {
                let file = self.dir.join("check.yaml");
                std::fs::write(&file, config).map_err(|e| e.to_string())?;
                let (code, stderr) = process::check(&file).await?;
                let mut errors = Vec::new();
                let want = if expect.ok { 0 } else { 1 };
                if code != want {
                    errors.push(format!("exit code: expected {want}, got {code}"));
                }
                let missing = expect::missing(&stderr, &expect.stderr_contains.0);
                if !missing.is_empty() {
                    errors.push(format!("stderr lacks {missing:?}"));
                }
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{}\n--- check stderr ---\n{stderr}", errors.join("; ")))
                }
            }
            Step::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(())
            }
            Step::Signal { name, expect } => {
                let sig = process::signal_number(name).ok_or("unknown signal")?;
                if sig != libc::SIGHUP && sig != libc::SIGUSR1 {
                    self.terminated.store(true, Ordering::SeqCst);
                }
                self.luagate.signal(sig)?;
                if let Some(want) = expect.exit_code {
                    let st = self.luagate.wait_exit(EXIT_WAIT).await?;
                    if st.code() != Some(want) {
                        return Err(format!("exit: expected code {want}, got {st}"));
                    }
                }
                Ok(())
            }
            Step::StopBackend(name) => {
                let b = lock(&self.backends).remove(name);
                match b {
                    Some(b) => {
                        b.shutdown().await;
                        Ok(())
                    }
                    None => Err(format!("backend {name} is already stopped")),
                }
            }
            Step::Log(check) => self.log(check).await,
            Step::WriteFile(w) => {
                let p = self.dir.join(&w.path);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::fs::write(&p, &w.content).map_err(|e| format!("{}: {e}", p.display()))
            }
            Step::BackendStats(want) => {
                let mut errors = Vec::new();
                for (name, exp) in want {
                    let s = &self.stats[name];
                    let fields = [
                        ("requests", &exp.requests, &s.requests),
                        ("connections", &exp.connections, &s.connections),
                        ("grpc_cancelled", &exp.grpc_cancelled, &s.grpc_cancelled),
                        ("grpc_completed", &exp.grpc_completed, &s.grpc_completed),
                    ];
                    for (field, m, v) in fields {
                        if let Some(m) = m {
                            let got = serde_json::Value::from(v.load(Ordering::SeqCst));
                            if let Err(e) = expect::matches(m, Some(&got)) {
                                errors.push(format!("{name}.{field}: {e}"));
                            }
                        }
                    }
                }
                expect::done(errors)
            }
            Step::Parallel(branches) => {
                let prefixes: Vec<String> = (1..=branches.len()).map(|b| format!("{label}.{b}.")).collect();
                let runs = branches.iter().zip(&prefixes).map(|(steps, prefix)| self.steps(steps, prefix, false));
                let errors: Vec<String> =
                    futures_util::future::join_all(runs).await.into_iter().filter_map(Result::err).collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("\n"))
                }
            }
        }
    }

    async fn log(&self, check: &case::LogCheck) -> Result<(), String> {
        let name = check.file.as_deref().unwrap_or("stderr.log");
        let path = self.dir.join(name);
        let deadline = tokio::time::Instant::now() + LOG_WAIT;
        loop {
            let raw = std::fs::read(&path).unwrap_or_default();
            let text = process::strip_ansi(&String::from_utf8_lossy(&raw));
            let missing = expect::missing(&text, &check.contains.0);
            let json_ok = check.json.is_empty() || expect::json_line_matches(&text, &check.json);
            if missing.is_empty() && json_ok {
                let found: Vec<&String> = check.not_contains.0.iter().filter(|n| text.contains(n.as_str())).collect();
                if found.is_empty() {
                    return Ok(());
                }
                return Err(format!("{name} contains {found:?}\n{}", process::tail(name, &text, 20)));
            }
            if tokio::time::Instant::now() >= deadline {
                let mut what = Vec::new();
                if !missing.is_empty() {
                    what.push(format!("lacks {missing:?}"));
                }
                if !json_ok {
                    what.push(format!("has no JSON line matching {}", expect::show_map(&check.json)));
                }
                return Err(format!(
                    "{name} {} after {LOG_WAIT:?}\n{}",
                    what.join(" and "),
                    process::tail(name, &text, 20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
