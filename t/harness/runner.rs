//! Runs one case: makes its directory, allocates ports, starts the backends, writes
//! the files, a self-signed certificate and the config, starts luagate, runs the
//! steps (optionally with a same-config reload between every two), and tears down.
//! The fixture pieces (temp dir, ports, certificate, runtime) are shared with
//! `reload_stress`.

use std::collections::{BTreeMap, BTreeSet};
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

use crate::case::{self, BackendCount, BackendKind, LogSince, Step, Vars, BLACKHOLE, DEAD, LISTENERS};
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

/// A loopback address whose TCP handshake never completes, held for the whole case: a
/// listener with a backlog of 0 whose one queue slot is taken by a connection never
/// accepted, so the kernel drops every further SYN. A connect to it lasts until the
/// connecting side's own timeout, as to a peer that is down behind a firewall.
pub struct Blackhole {
    _listener: tokio::net::TcpListener,
    _filler: std::net::TcpStream,
    pub addr: SocketAddr,
}

impl Blackhole {
    pub fn new() -> Result<Self, String> {
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(SocketAddr::from(([127, 0, 0, 1], 0))).map_err(|e| format!("blackhole bind: {e}"))?;
        let addr = sock.local_addr().map_err(|e| e.to_string())?;
        let listener = sock.listen(0).map_err(|e| format!("blackhole listen: {e}"))?;
        let filler = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("filling the blackhole's queue: {e}"))?;
        // The queue is full now: a further connect must not complete.
        let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100));
        if probe.is_ok() {
            return Err("blackhole: a second connection completed; the kernel does not drop SYNs here".into());
        }
        Ok(Self { _listener: listener, _filler: filler, addr })
    }
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
    let mut result = rt.block_on(run_case(&trial, path, &text, reload_between, false));
    // A port allocated and released can be taken by someone else before luagate binds
    // it: start over once with fresh ports.
    if result.as_ref().is_err_and(|e| port_clash(e)) {
        result = rt.block_on(run_case(&trial, path, &text, reload_between, false));
    }
    result
}

/// Runs a harness self-test (`t/selftest/NAME.yaml`, trial `selftest/NAME`): a case
/// that plays a broken luagate or is itself broken, which the harness must fail
/// with every text of its `expect_failure` in the error.
pub fn run_selftest(id: &str, path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let rt = runtime()?;
    let want = match case::parse(&text, None) {
        Ok(c) => c.expect_failure.ok_or("a self-test needs expect_failure")?,
        // A case the parser refuses: its expect_failure is read from the YAML alone.
        Err(e) => {
            let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())?;
            let want: Vec<String> = match v.get("expect_failure") {
                Some(serde_yaml_ng::Value::String(s)) => vec![s.clone()],
                Some(other) => serde_yaml_ng::from_value(other.clone()).map_err(|e| e.to_string())?,
                None => return Err(format!("a self-test needs expect_failure; the case was refused: {e}")),
            };
            let missing = expect::missing(&e, &want);
            return if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("the harness refused the case, but its error lacks {missing:?}:\n{e}"))
            };
        }
    };
    let mut result = rt.block_on(run_case(id, path, &text, false, true));
    if result.as_ref().is_err_and(|e| port_clash(e)) {
        result = rt.block_on(run_case(id, path, &text, false, true));
    }
    match result {
        Ok(()) => Err(format!("the harness passed a case it must fail (expected an error with {want:?})")),
        Err(e) => {
            let missing = expect::missing(&e, &want);
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("the case failed, but not with {missing:?}:\n{e}"))
            }
        }
    }
}

/// luagate could not start because a listener port was taken meanwhile.
pub fn port_clash(error: &str) -> bool {
    error.contains("luagate exited before accepting")
        && (error.contains("Address already in use") || error.contains("os error 98"))
}

async fn run_case(trial: &str, path: &Path, text: &str, reload_between: bool, selftest: bool) -> Result<(), String> {
    let plain = case::parse(text, None).map_err(|e| format!("{}: {e}", path.display()))?;
    if !selftest && (plain.luagate_wrapper.is_some() || plain.expect_failure.is_some()) {
        return Err(format!("{}: luagate_wrapper and expect_failure are for t/selftest cases only", path.display()));
    }
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
    let blackhole = if text.contains("${blackhole}") { Some(Blackhole::new()?) } else { None };
    let blackhole_addr = blackhole.as_ref().map_or_else(|| "<no blackhole>".to_string(), |b| b.addr.to_string());
    vars.0.insert(BLACKHOLE.into(), blackhole_addr);
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

    let wrapper = match &case.luagate_wrapper {
        Some(script) => {
            let p = dir.path().join("luagate_wrapper.sh");
            std::fs::write(&p, script).map_err(|e| e.to_string())?;
            Some(p)
        }
        None => None,
    };
    let luagate = Luagate::start_wrapped(dir.path(), wrapper.as_deref())?;
    let mut log_files = vec![STDERR.to_string()];
    case.steps.iter().for_each(|s| s.log_files(&mut log_files));
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
        log_files,
        deferred: Mutex::new(Vec::new()),
    };
    let mut result = async {
        run.luagate.wait_ready(&ready).await?;
        run.steps(&case.steps, "", reload_between, Marks::default()).await
    }
    .await;
    run.http.clear();
    // How luagate ends is checked even when a step failed: a crash explains a failure.
    let ending = run.luagate.finish(&case.exit, run.terminated.load(Ordering::SeqCst)).await;
    let late = run.recheck_not_contains();
    result = match (result, ending.and(late)) {
        (Ok(()), end) => end.map_err(|e| format!("after the steps: {e}")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(end)) => Err(format!("{e}\nand after the steps: {end}")),
    };
    let tail = run.luagate.stderr_tail(40);
    drop(run);
    drop(dead_socket);
    drop(blackhole);
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
    /// The files log steps read, `stderr.log` first (names relative to `dir`).
    log_files: Vec<String>,
    /// Every `not_contains` a log step checked, checked again once luagate has exited.
    deferred: Mutex<Vec<Deferred>>,
}

/// luagate's stderr, in the case directory.
const STDERR: &str = "stderr.log";

/// How long each log file was when a step began: a log step searches from there.
#[derive(Debug, Clone, Default)]
struct Marks(BTreeMap<String, u64>);

impl Marks {
    /// Where the search of `file` starts (0 for a file that is shorter now: rotated).
    fn from(&self, file: &str, len: usize) -> usize {
        let at = self.0.get(file).copied().unwrap_or(0) as usize;
        if at > len {
            0
        } else {
            at
        }
    }
}

/// A `not_contains` to check again at the end of the case.
struct Deferred {
    label: String,
    file: String,
    from: Marks,
    needles: Vec<String>,
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
    /// Runs `steps` in order; `anchor` is where a leading log step's search starts.
    fn steps<'a>(
        &'a self,
        steps: &'a [Step],
        prefix: &'a str,
        reload_between: bool,
        mut anchor: Marks,
    ) -> StepFuture<'a> {
        Box::pin(async move {
            for (i, step) in steps.iter().enumerate() {
                let label = format!("{prefix}{}", i + 1);
                if reload_between && i > 0 && self.alive() {
                    self.reload_same().await.map_err(|e| format!("reload mode: SIGHUP before step {label}: {e}"))?;
                }
                if step.acts() {
                    anchor = self.marks();
                }
                self.step(step, &label, &anchor)
                    .await
                    .map_err(|e| format!("step {label} ({}): {e}", step.summary()))?;
            }
            Ok(())
        })
    }

    /// The current length of every log file the case reads.
    fn marks(&self) -> Marks {
        Marks(
            self.log_files
                .iter()
                .map(|f| (f.clone(), std::fs::metadata(self.dir.join(f)).map(|m| m.len()).unwrap_or(0)))
                .collect(),
        )
    }

    /// A log file's text from byte `from` on (lossy, ANSI colours removed), and its length.
    fn log_text(&self, file: &str, from: &Marks) -> String {
        let raw = std::fs::read(self.dir.join(file)).unwrap_or_default();
        let at = from.from(file, raw.len());
        process::strip_ansi(&String::from_utf8_lossy(&raw[at..]))
    }

    /// Checks every deferred `not_contains` over what was logged from its step on.
    fn recheck_not_contains(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        for d in lock(&self.deferred).iter() {
            let text = self.log_text(&d.file, &d.from);
            let found: Vec<&String> = d.needles.iter().filter(|n| text.contains(n.as_str())).collect();
            if !found.is_empty() {
                errors.push(format!(
                    "{} contains {found:?}, which the log step {} said must not be there (logged after that step ran)\n{}",
                    d.file,
                    d.label,
                    process::tail(&d.file, &text, 20)
                ));
            }
        }
        expect::done(errors)
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

    async fn step(&self, step: &Step, label: &str, anchor: &Marks) -> Result<(), String> {
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
                    // `{{n}}` in the path, a header value or source_ip is the answer's number, 1 to repeat.
                    let n = |s: &str| s.replace("{{n}}", &(k + 1).to_string());
                    let mut b = http::Request::builder().method(req.method.as_str()).uri(n(&req.path).as_str());
                    for (name, values) in &req.headers {
                        for v in &values.0 {
                            b = b.header(name.as_str(), n(v).as_str());
                        }
                    }
                    let source = match &req.source_ip {
                        Some(ip) => Some(n(ip).parse().map_err(|e| format!("source_ip {ip:?}: {e}"))?),
                        None => None,
                    };
                    let r = b.body(Full::new(body.clone())).map_err(|e| format!("cannot build the request: {e}"))?;
                    let resp =
                        self.http.send_allow_cut(addr, req.http, r, source).await.map_err(|e| nth(k, *repeat, e))?;
                    expect::check_http(expect, &resp, &body).map_err(|e| nth(k, *repeat, e))?;
                    if !matches!(backends, BackendCount::Any) {
                        let Some(v) = resp.headers.get("x-backend") else {
                            let e = "the answer has no x-backend header, so it cannot be counted".to_string();
                            return Err(nth(k, *repeat, e));
                        };
                        let name = String::from_utf8_lossy(v.as_bytes()).into_owned();
                        *counts.entry(name).or_insert(0) += 1;
                    }
                }
                expect::check_backends(backends, &counts, *repeat, self.backend_names.iter().cloned())
            }
            Step::Grpc { call, repeat, expect, backends } => {
                let addr = self.listener(call.listener.as_deref().unwrap_or("listen"))?;
                let mut counts = BTreeMap::new();
                for k in 0..*repeat {
                    let out = self.grpc.call(addr, call).await.map_err(|e| nth(k, *repeat, e))?;
                    expect::check_grpc(expect, &out).map_err(|e| nth(k, *repeat, e))?;
                    if !matches!(backends, BackendCount::Any) {
                        let named: BTreeSet<&str> = out.replies.iter().map(|r| r.backend.as_str()).collect();
                        let backend = match named.into_iter().collect::<Vec<_>>()[..] {
                            [one] if !one.is_empty() => one.to_string(),
                            [] => {
                                return Err(nth(
                                    k,
                                    *repeat,
                                    "no reply names a backend, so the call cannot be counted".into(),
                                ))
                            }
                            ref several => {
                                let e = format!("the replies of one call name different backends {several:?}");
                                return Err(nth(k, *repeat, e));
                            }
                        };
                        *counts.entry(backend).or_insert(0) += 1;
                    }
                }
                expect::check_backends(backends, &counts, *repeat, self.backend_names.iter().cloned())
            }
            Step::Raw { data, expect, hold_ms } => {
                let addr = self.listener("listen")?;
                let resp = client::raw(addr, data, expect.closed.is_some(), *hold_ms).await?;
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
                let sent = std::time::Instant::now();
                self.luagate.signal(sig)?;
                if let Some(want) = expect.exit_code {
                    let st = self.luagate.wait_exit(EXIT_WAIT).await?;
                    let took = sent.elapsed();
                    if st.code() != Some(want) {
                        return Err(format!("exit: expected code {want}, got {st}"));
                    }
                    if let Some(ms) = expect.exit_within_ms {
                        if took > Duration::from_millis(ms) {
                            return Err(format!("exit: expected within {ms} ms of the signal, took {took:?}"));
                        }
                    }
                } else if expect.exit_within_ms.is_some() {
                    return Err("exit_within_ms goes with exit_code".into());
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
            Step::Log(check) => self.log(check, label, anchor).await,
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
                let runs = branches
                    .iter()
                    .zip(&prefixes)
                    .map(|(steps, prefix)| self.steps(steps, prefix, false, anchor.clone()));
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

    async fn log(&self, check: &case::LogCheck, label: &str, anchor: &Marks) -> Result<(), String> {
        let name = check.file.as_deref().unwrap_or(STDERR);
        let from = match check.since {
            Some(LogSince::Start) => Marks::default(),
            None => anchor.clone(),
        };
        if !check.not_contains.0.is_empty() {
            lock(&self.deferred).push(Deferred {
                label: label.to_string(),
                file: name.to_string(),
                from: from.clone(),
                needles: check.not_contains.0.clone(),
            });
        }
        let scope = if check.since.is_some() { "" } else { " since the step before this one began" };
        let deadline = tokio::time::Instant::now() + LOG_WAIT;
        loop {
            let text = self.log_text(name, &from);
            let missing = expect::missing(&text, &check.contains.0);
            let json_ok = check.json.is_empty() || expect::json_line_matches(&text, &check.json);
            let found: Vec<&String> = check.not_contains.0.iter().filter(|n| text.contains(n.as_str())).collect();
            if !found.is_empty() {
                return Err(format!("{name} contains {found:?}{scope}\n{}", process::tail(name, &text, 20)));
            }
            if missing.is_empty() && json_ok {
                return Ok(());
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
                    "{name} {}{scope} after {LOG_WAIT:?}\n{}",
                    what.join(" and "),
                    process::tail(&format!("{name}{scope}"), &text, 20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
