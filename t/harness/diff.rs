//! Differential tests against real OpenResty: every `t/diff/<name>.yaml` is one Lua
//! snippet run by nginx + lua-nginx-module and by luagate on the same request; the
//! answers must agree on what the case compares. One nginx (`daemon off; master_process
//! off; worker_processes 1;`, private prefix) and one luagate serve every case (a
//! `location = /diff/<name>` / a route `path: /diff/<name>` each), started lazily by
//! the first diff trial and stopped by PID after the run ([`shutdown`]). A case is
//! its own trial `diff/<name>`; a mismatch fails it with a side-by-side diff.
//!
//! ```yaml
//! phase: content              # content | access | rewrite (access/rewrite proxy upstream)
//! lua: |                      # the snippet, written to a file both servers load
//!   ngx.say(ngx.var.arg_a)
//! header_filter: "..."        # optional
//! body_filter: "..."          # optional
//! upstream: true              # default: phase != content (both proxy to one testbed http backend)
//! variables: { foo: "" }      # optional: `set $foo "";` / lua.variables
//!                             # shared dicts: `diff` (use keys prefixed with the case name)
//!                             # and `diff_private` (one case only: expiry, flush_all)
//! request: { method: GET, path: "?a=1", headers: { x-a: "1" }, body: "" }   # path: "?query" or "/diff/<name>?query"
//! compare: [status, body, { headers: [x-foo, content-type] }, { json: [headers.x-foo] }]
//! normalize: [ { regex: "nginx/[0-9.]+", replace: "SERVER" } ]   # applied to both bodies
//! expect_status: 403         # optional: what nginx must answer (default: anything but 500)
//! skip: "engine bug: ..."     # optional: listed as ignored, left out of both configs
//! ```
//!
//! One more trial, `diff/uri_corpus` ([`uri_corpus`]), sends a generated corpus of
//! request paths to a catch-all location / route of both servers that answers
//! `ngx.var.uri`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use libtest_mimic::{Failed, Trial};
use serde::Deserialize;

use crate::case::{HttpVersion, OneOrMany};
use crate::client::{HttpClient, HttpResponse};
use crate::expect;
use crate::process::BIN;
use crate::runner::{free_ports, runtime, TempDir};

mod uri_corpus;

const NGINX: &str = "/usr/sbin/nginx";
const NGINX_MODULES: [&str; 2] =
    ["/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so"];
/// Both servers must accept within this.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The Host header every request carries unless the case sets one.
const HOST: &str = "diff.test";

fn diff_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("t").join("diff")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Content,
    Access,
    Rewrite,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffCase {
    /// Read by [`skip_reason`] at listing time.
    #[allow(dead_code)]
    skip: Option<String>,
    phase: Phase,
    lua: String,
    header_filter: Option<String>,
    body_filter: Option<String>,
    upstream: Option<bool>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    request: DiffRequest,
    compare: Vec<Compare>,
    #[serde(default)]
    normalize: Vec<Normalize>,
    /// The status nginx must answer (a check on the case itself); default: anything but 500.
    expect_status: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffRequest {
    method: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, OneOrMany>,
    body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Compare {
    /// `status` or `body`.
    What(String),
    Headers {
        headers: Vec<String>,
    },
    Json {
        json: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Normalize {
    regex: String,
    #[serde(default)]
    replace: String,
}

impl DiffCase {
    fn upstream(&self) -> bool {
        self.upstream.unwrap_or(self.phase != Phase::Content)
    }

    fn validate(&self) -> Result<(), String> {
        if self.phase == Phase::Content && self.upstream() {
            return Err("upstream: true needs phase access or rewrite".into());
        }
        if self.phase != Phase::Content && !self.upstream() {
            return Err("phase access/rewrite proxies upstream (upstream: false is not possible)".into());
        }
        if self.compare.is_empty() {
            return Err("compare: nothing to compare".into());
        }
        for c in &self.compare {
            if let Compare::What(w) = c {
                if w != "status" && w != "body" {
                    return Err(format!("compare: {w:?}: expected status, body, {{headers: [..]}} or {{json: [..]}}"));
                }
            }
        }
        for n in &self.normalize {
            regex::bytes::Regex::new(&n.regex).map_err(|e| format!("normalize: {e}"))?;
        }
        for k in self.variables.keys() {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("variables: bad name {k:?}"));
            }
        }
        Ok(())
    }

    /// The scripts of this case: (nginx directive, luagate phase key, code).
    fn scripts(&self) -> Vec<(&'static str, &'static str, &str)> {
        let main = match self.phase {
            Phase::Content => ("content_by_lua_file", "content"),
            Phase::Access => ("access_by_lua_file", "access"),
            Phase::Rewrite => ("rewrite_by_lua_file", "rewrite"),
        };
        let mut v = vec![(main.0, main.1, self.lua.as_str())];
        if let Some(h) = &self.header_filter {
            v.push(("header_filter_by_lua_file", "header_filter", h.as_str()));
        }
        if let Some(b) = &self.body_filter {
            v.push(("body_filter_by_lua_file", "body_filter", b.as_str()));
        }
        v
    }
}

/// `t/diff/*.yaml`, sorted: (name, path).
fn discover() -> Result<Vec<(String, PathBuf)>, String> {
    let dir = diff_dir();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

fn parse(path: &Path) -> Result<DiffCase, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let case: DiffCase = serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    case.validate().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(case)
}

/// One trial per diff case, named `diff/<name>`.
pub fn trials() -> Vec<Trial> {
    let files = match discover() {
        Ok(f) => f,
        Err(e) => return vec![Trial::test("diff", move || Err(Failed::from(e)))],
    };
    let corpus = Trial::test(format!("diff/{}", uri_corpus::NAME), || run_corpus().map_err(Failed::from));
    files
        .into_iter()
        .map(|(name, path)| {
            let skip = std::fs::read_to_string(&path).ok().and_then(|t| crate::case::skip_reason(&t));
            let n = name.clone();
            Trial::test(format!("diff/{name}"), move || run_trial(&n).map_err(Failed::from))
                .with_ignored_flag(skip.is_some())
        })
        .chain(std::iter::once(corpus))
        .collect()
}

fn run_corpus() -> Result<(), String> {
    let fx = FIXTURE.get_or_init(start).as_ref().map_err(Clone::clone)?;
    let result = fx.rt.block_on(uri_corpus::run(fx.nginx, fx.luagate, HOST));
    if result.is_err() {
        FAILED.store(true, Ordering::SeqCst);
    }
    result.map_err(|e| format!("{e}\n--- dir kept: {} ---", fx.dir.display()))
}

/// The two servers and everything needed to query them.
struct Fixture {
    rt: tokio::runtime::Runtime,
    http: HttpClient,
    nginx: SocketAddr,
    luagate: SocketAddr,
    cases: BTreeMap<String, Result<DiffCase, String>>,
    dir: PathBuf,
    /// The testbed backend both proxy to; lives as long as the fixture.
    _backend: testbed::Backend,
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
/// The thread holding both server processes: send `()` to stop them.
static KEEPER: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>> = Mutex::new(None);
/// Some diff trial failed: keep the directory.
static FAILED: AtomicBool = AtomicBool::new(false);
/// The fixture's directory, to remove at shutdown when nothing failed.
static DIR: Mutex<Option<TempDir>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops nginx and luagate (by PID) if a diff trial started them. Called by `main`
/// once every trial has run.
pub fn shutdown() {
    let keeper = lock(&KEEPER).take();
    if let Some((stop, thread)) = keeper {
        let _ = stop.send(());
        let _ = thread.join();
    }
    if let Some(mut dir) = lock(&DIR).take() {
        if FAILED.load(Ordering::SeqCst) {
            dir.keep();
        }
    }
}

fn run_trial(name: &str) -> Result<(), String> {
    let fx = FIXTURE.get_or_init(start).as_ref().map_err(Clone::clone)?;
    let result = match fx.cases.get(name) {
        Some(Ok(case)) => fx.rt.block_on(fx.compare(name, case)),
        Some(Err(e)) => Err(e.clone()),
        None => Err(format!("case {name} appeared after the servers started")),
    };
    if result.is_err() {
        FAILED.store(true, Ordering::SeqCst);
    }
    result.map_err(|e| format!("{e}\n--- dir kept: {} ---", fx.dir.display()))
}

fn q(s: &str) -> String {
    // A double-quoted nginx string.
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('$', "${dollar}"))
}

/// Writes the scripts and both configs; returns (nginx.conf, luagate config.yaml).
fn write_configs(
    dir: &Path,
    cases: &BTreeMap<String, Result<DiffCase, String>>,
    nginx: SocketAddr,
    luagate: SocketAddr,
    upstream: SocketAddr,
) -> Result<(PathBuf, PathBuf), String> {
    let lua_dir = dir.join("lua");
    std::fs::create_dir_all(&lua_dir).map_err(|e| e.to_string())?;
    for sub in ["logs", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("nginx").join(sub)).map_err(|e| e.to_string())?;
    }
    let ng = dir.join("nginx");
    let mut variables = BTreeMap::new();
    let mut locations = String::new();
    let mut routes = String::new();
    for (name, case) in cases {
        let Ok(case) = case else { continue };
        locations.push_str(&format!("        location = /diff/{name} {{\n"));
        routes.push_str(&format!("  - match: {{ path: /diff/{name} }}\n"));
        if case.upstream() {
            routes.push_str("    upstream: up\n");
        }
        routes.push_str("    lua:\n");
        for (k, v) in &case.variables {
            locations.push_str(&format!("            set ${k} {};\n", q(v)));
            variables.insert(k.clone(), v.clone());
        }
        for (directive, key, code) in case.scripts() {
            let file = lua_dir.join(format!("{name}.{key}.lua"));
            std::fs::write(&file, code).map_err(|e| e.to_string())?;
            locations.push_str(&format!("            {directive} {};\n", file.display()));
            routes.push_str(&format!("      {key}: {}\n", serde_json::Value::from(file.display().to_string())));
        }
        if case.upstream() {
            locations.push_str(&format!("            proxy_pass http://{upstream};\n"));
        }
        locations.push_str("        }\n");
    }
    // The catch-all of `diff/uri_corpus`: exact locations / routes above still win.
    let corpus = lua_dir.join(format!("{}.content.lua", uri_corpus::NAME));
    std::fs::write(&corpus, uri_corpus::SCRIPT).map_err(|e| e.to_string())?;
    locations.push_str(&format!(
        "        location / {{\n            content_by_lua_file {};\n        }}\n",
        corpus.display()
    ));
    routes.push_str(&format!(
        "  - match: {{ path_prefix: / }}\n    lua:\n      content: {}\n",
        serde_json::Value::from(corpus.display().to_string())
    ));
    let ng_conf = format!(
        r#"load_module {m0};
load_module {m1};
daemon off;
master_process off;
worker_processes 1;
pid {ng}/nginx.pid;
error_log {ng}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {ng}/client_body;
    proxy_temp_path {ng}/proxy;
    fastcgi_temp_path {ng}/fastcgi;
    uwsgi_temp_path {ng}/uwsgi;
    scgi_temp_path {ng}/scgi;
    lua_package_path '/usr/share/lua/5.1/?.lua;;';
    lua_package_cpath '/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;';
    lua_shared_dict diff 1m;
    lua_shared_dict diff_private 1m;
    proxy_http_version 1.1;
    proxy_set_header Host $host;
    geo $dollar {{ default "$"; }}
    server {{
        listen {nginx};
        server_name {HOST};
        client_body_buffer_size 1m;
{locations}    }}
}}
"#,
        m0 = NGINX_MODULES[0],
        m1 = NGINX_MODULES[1],
        ng = ng.display(),
    );
    let ng_path = ng.join("nginx.conf");
    std::fs::write(&ng_path, ng_conf).map_err(|e| e.to_string())?;

    let vars: Vec<String> =
        variables.iter().map(|(k, v)| format!("{k}: {}", serde_json::Value::from(v.as_str()))).collect();
    let lg_conf = format!(
        r#"workers: 1
error_log: {{ level: info }}
listen: [ {{ addr: "{luagate}" }} ]
lua:
  shared_dicts: {{ diff: 1m, diff_private: 1m }}
  variables: {{ {vars} }}
upstreams: {{ up: {{ peers: [ {{ addr: "{upstream}" }} ] }} }}
routes:
{routes}"#,
        vars = vars.join(", "),
    );
    let lg_path = dir.join("config.yaml");
    std::fs::write(&lg_path, lg_conf).map_err(|e| e.to_string())?;
    Ok((ng_path, lg_path))
}

/// Starts the backend, nginx and luagate; servers run under a keeper thread (so
/// PR_SET_PDEATHSIG fires only when the harness is gone, not when a trial thread ends).
fn start() -> Result<Fixture, String> {
    for f in std::iter::once(NGINX).chain(NGINX_MODULES) {
        if !Path::new(f).exists() {
            return Err(format!("{f} is missing: the diff tests need nginx with lua-nginx-module"));
        }
    }
    let rt = runtime()?;
    let backend = rt.block_on(testbed::spawn_http("up")).map_err(|e| format!("starting the backend: {e}"))?;
    let tmp = TempDir::new("diff")?;
    let dir = tmp.path().to_path_buf();
    *lock(&DIR) = Some(tmp);
    let mut cases = BTreeMap::new();
    for (name, path) in discover()? {
        let skipped = std::fs::read_to_string(&path).ok().and_then(|t| crate::case::skip_reason(&t)).is_some();
        if !skipped {
            cases.insert(name, parse(&path));
        }
    }
    // A port allocated and released may be taken before a server binds it: one more
    // try with fresh ports.
    let mut attempt = 0;
    let (nginx, luagate) = loop {
        attempt += 1;
        let ports = free_ports(2)?;
        let (nginx, luagate) = (ports[0], ports[1]);
        let (ng_conf, lg_conf) = write_configs(&dir, &cases, nginx, luagate, backend.addr())?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let kdir = dir.clone();
        let thread = std::thread::Builder::new()
            .name("diff-servers".into())
            .spawn(move || keeper(&kdir, &ng_conf, &lg_conf, [nginx, luagate], ready_tx, stop_rx))
            .map_err(|e| e.to_string())?;
        match ready_rx.recv().map_err(|_| "the server keeper thread died".to_string())? {
            Ok(()) => {
                *lock(&KEEPER) = Some((stop_tx, thread));
                break (nginx, luagate);
            }
            Err(e) => {
                let _ = thread.join();
                if attempt >= 2 || !e.contains("exited at start") {
                    return Err(e);
                }
            }
        }
    };
    Ok(Fixture { rt, http: HttpClient::new(None)?, nginx, luagate, cases, dir, _backend: backend })
}

fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// SIGTERM to `child`'s PID, SIGKILL after 5 s; reaps it.
fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill(2) on the pid of our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn keeper(
    dir: &Path,
    ng_conf: &Path,
    lg_conf: &Path,
    addrs: [SocketAddr; 2],
    ready: mpsc::Sender<Result<(), String>>,
    stop_rx: mpsc::Receiver<()>,
) {
    let mut children: Vec<Child> = Vec::new();
    let result = (|| {
        let ng_prefix = dir.join("nginx");
        let out = |n: &str| std::fs::File::create(dir.join(n)).map_err(|e| e.to_string());
        let nginx = spawn(
            Command::new(NGINX)
                .arg("-p")
                .arg(&ng_prefix)
                .arg("-c")
                .arg(ng_conf)
                .current_dir(&ng_prefix)
                .stdin(Stdio::null())
                .stdout(out("nginx.stdout.log")?)
                .stderr(out("nginx.stderr.log")?),
        )
        .map_err(|e| format!("cannot start {NGINX}: {e}"))?;
        children.push(nginx);
        let luagate = spawn(
            Command::new(BIN)
                .arg("run")
                .arg("-c")
                .arg(lg_conf)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(out("luagate.stdout.log")?)
                .stderr(out("luagate.stderr.log")?)
                .env("NO_COLOR", "1")
                .env_remove("RUST_LOG"),
        )
        .map_err(|e| format!("cannot start {BIN}: {e}"))?;
        children.push(luagate);
        let deadline = Instant::now() + READY_TIMEOUT;
        for (i, addr) in addrs.iter().enumerate() {
            let what = ["nginx", "luagate"][i];
            loop {
                if let Ok(Some(st)) = children[i].try_wait() {
                    return Err(format!("{what} exited at start ({st}); see {}", dir.display()));
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("{what} not accepting on {addr} after {READY_TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    })();
    let failed = result.is_err();
    let _ = ready.send(result.map_err(|e| format!("{e}\n{}", logs_tail(dir, ""))));
    if !failed {
        let _ = stop_rx.recv();
    }
    for c in &mut children {
        stop(c);
    }
}

/// The last lines of both servers' logs; with a case name, only the lines naming it
/// (its location or its script files).
fn logs_tail(dir: &Path, case: &str) -> String {
    let mut out = String::new();
    for (what, file) in [("nginx error.log", "nginx/logs/error.log"), ("luagate stderr", "luagate.stderr.log")] {
        let text = crate::process::strip_ansi(&std::fs::read_to_string(dir.join(file)).unwrap_or_default());
        let text = if case.is_empty() {
            text
        } else {
            let (loc, script) = (format!("/diff/{case} "), format!("/{case}."));
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(&loc) || l.contains(&script)).collect();
            lines.join("\n")
        };
        out.push_str(&crate::process::tail(what, &text, 15));
        out.push('\n');
    }
    out
}

impl Fixture {
    async fn send(&self, addr: SocketAddr, name: &str, case: &DiffCase) -> Result<HttpResponse, String> {
        let base = format!("/diff/{name}");
        let path = match &case.request.path {
            None => base,
            Some(p) if p.starts_with('?') => format!("{base}{p}"),
            Some(p) => p.clone(),
        };
        let method = case.request.method.as_deref().unwrap_or("GET");
        let mut b = http::Request::builder().method(method).uri(path.as_str());
        if !case.request.headers.keys().any(|k| k.eq_ignore_ascii_case("host")) {
            b = b.header("host", HOST);
        }
        for (k, vs) in &case.request.headers {
            for v in &vs.0 {
                b = b.header(k.as_str(), v.as_str());
            }
        }
        let body = Bytes::from(case.request.body.clone().unwrap_or_default());
        let req = b.body(Full::new(body)).map_err(|e| format!("cannot build the request: {e}"))?;
        self.http.send(addr, HttpVersion::H1, req).await
    }

    async fn compare(&self, name: &str, case: &DiffCase) -> Result<(), String> {
        let (ng, lg) = tokio::join!(self.send(self.nginx, name, case), self.send(self.luagate, name, case));
        let ng = ng.map_err(|e| format!("nginx: {e}"))?;
        let lg = lg.map_err(|e| format!("luagate: {e}"))?;
        if std::env::var_os("LUAGATE_T_DIFF_DUMP").is_some() {
            eprintln!(
                "diff/{name}: nginx {} {:?}\n{pad}luagate {} {:?}",
                ng.status,
                expect::preview(&ng.body, 2000),
                lg.status,
                expect::preview(&lg.body, 2000),
                pad = " ".repeat(name.len() + 7),
            );
        }
        match case.expect_status {
            Some(want) if ng.status != want => {
                return Err(format!(
                    "the case is wrong: nginx answered {} (expect_status: {want}): {}\n{}",
                    ng.status,
                    expect::preview(&ng.body, 400),
                    logs_tail(&self.dir, name)
                ))
            }
            None if ng.status == 500 => {
                return Err(format!(
                    "the case is wrong: nginx answered 500 (set expect_status: 500 if meant)\n{}",
                    logs_tail(&self.dir, name)
                ))
            }
            _ => {}
        }
        let mut errors = Vec::new();
        let norm = |b: &[u8]| -> Vec<u8> {
            let mut out = b.to_vec();
            for n in &case.normalize {
                if let Ok(re) = regex::bytes::Regex::new(&n.regex) {
                    out = re.replace_all(&out, n.replace.as_bytes()).into_owned();
                }
            }
            out
        };
        for c in &case.compare {
            match c {
                Compare::What(w) if w == "status" => {
                    if ng.status != lg.status {
                        errors.push(format!("status: nginx {} | luagate {}", ng.status, lg.status));
                    }
                }
                Compare::What(_) => {
                    let (a, b) = (norm(&ng.body), norm(&lg.body));
                    if a != b {
                        errors.push(format!("body differs (after normalize):\n{}", side_by_side(&a, &b)));
                    }
                }
                Compare::Headers { headers } => {
                    for h in headers {
                        let (a, b) = (header(&ng, h), header(&lg, h));
                        if a != b {
                            errors.push(format!("header {h}: nginx {a:?} | luagate {b:?}"));
                        }
                    }
                }
                Compare::Json { json } => {
                    let parse = |r: &HttpResponse, who: &str| {
                        serde_json::from_slice::<serde_json::Value>(&r.body)
                            .map_err(|e| format!("{who}'s body is not JSON ({e}): {}", expect::preview(&r.body, 300)))
                    };
                    match (parse(&ng, "nginx"), parse(&lg, "luagate")) {
                        (Ok(a), Ok(b)) => {
                            for p in json {
                                let (x, y) = (expect::json_path(&a, p), expect::json_path(&b, p));
                                if x != y {
                                    errors.push(format!("json {p}: nginx {x:?} | luagate {y:?}"));
                                }
                            }
                        }
                        (a, b) => errors.extend(a.err().into_iter().chain(b.err())),
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "diff/{name}: nginx and luagate disagree\n{}\n--- nginx: {} {:?} | luagate: {} {:?}\n{}",
                errors.join("\n"),
                ng.status,
                expect::preview(&ng.body, 400),
                lg.status,
                expect::preview(&lg.body, 400),
                logs_tail(&self.dir, name),
            ))
        }
    }
}

/// All values of a response header, joined with ", " (None if absent).
fn header(r: &HttpResponse, name: &str) -> Option<String> {
    let vals: Vec<String> =
        r.headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    (!vals.is_empty()).then(|| vals.join(", "))
}

/// Two bodies line by line in two columns; differing lines are marked `!`.
fn side_by_side(a: &[u8], b: &[u8]) -> String {
    let show = |s: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(s).split_inclusive('\n').map(|l| format!("{l:?}")).collect()
    };
    let (la, lb) = (show(a), show(b));
    let width = la.iter().map(String::len).max().unwrap_or(0).clamp(6, 60);
    let mut out = format!("  {:<width$} | luagate\n", "nginx");
    for i in 0..la.len().max(lb.len()) {
        let x = la.get(i).map_or("", String::as_str);
        let y = lb.get(i).map_or("", String::as_str);
        let mark = if x == y { ' ' } else { '!' };
        out.push_str(&format!("{mark} {x:<width$} | {y}\n"));
    }
    out
}
