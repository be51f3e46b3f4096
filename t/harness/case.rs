//! The case file format: the serde model of `t/cases/<group>/<name>.yaml`
//! (`deny_unknown_fields` everywhere), its `${...}` placeholders, and the typed
//! [`Step`]s a case compiles to. `t/README.md` documents the format for authors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

pub use crate::process::ExitExpect;

/// An expected value in the matcher syntax of [`crate::expect::matches`]: exact,
/// `!absent`, `!present`, `~regex`, `!~regex`, `<N`, `<=N`, `>N`, `>=N`, `=literal`.
pub type Matcher = Value;

/// Listener placeholders the harness allocates a port for.
pub const LISTENERS: [&str; 3] = ["listen", "listen2", "listen_tls"];
/// Placeholder of an address where nothing listens (a "dead" peer).
pub const DEAD: &str = "dead";
/// Placeholder of an address that never completes a TCP handshake (SYNs dropped).
pub const BLACKHOLE: &str = "blackhole";

/// One case file found under `t/cases`.
#[derive(Debug, Clone)]
pub struct CaseFile {
    /// `group/stem`, the trial name.
    pub id: String,
    pub path: PathBuf,
}

/// Every `*.yaml` under `root`, one directory level of groups, sorted by id.
pub fn discover(root: &Path) -> Result<Vec<CaseFile>, String> {
    let mut out = Vec::new();
    let groups = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    for group in groups {
        let group = group.map_err(|e| e.to_string())?.path();
        if !group.is_dir() {
            continue;
        }
        let gname = file_name(&group);
        for entry in std::fs::read_dir(&group).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                let id = format!("{gname}/{}", stem.unwrap_or_default());
                out.push(CaseFile { id, path });
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Every `*.yaml` directly in `root` (id: the file stem), sorted by id.
pub fn discover_flat(root: &Path) -> Result<Vec<CaseFile>, String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(CaseFile { id, path });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Kind of a backend the harness starts from the testbed crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Http,
    Grpc,
    /// A real `redis-server` (`t/harness/redis.rs`).
    Redis,
}

/// A parsed, validated case.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub backends: BTreeMap<String, BackendKind>,
    pub files: BTreeMap<String, String>,
    pub config: String,
    pub steps: Vec<Step>,
    /// How luagate must end (default: exit 0 on the final SIGTERM, no panic).
    pub exit: ExitExpect,
    /// Harness self-tests only: a shell script luagate is started through.
    pub luagate_wrapper: Option<String>,
    /// Harness self-tests only: the case must fail, with every one of these in its error.
    pub expect_failure: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDoc {
    name: String,
    /// Read by [`skip_reason`] at listing time.
    #[allow(dead_code)]
    skip: Option<String>,
    /// Read by [`no_reload_reason`] at listing time.
    #[allow(dead_code)]
    no_reload: Option<String>,
    #[serde(default)]
    backends: BTreeMap<String, BackendKind>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    config: String,
    steps: Vec<StepDoc>,
    #[serde(default)]
    exit: ExitExpect,
    luagate_wrapper: Option<String>,
    expect_failure: Option<OneOrMany>,
}

/// One step as written: exactly one action key plus modifiers and `expect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDoc {
    request: Option<Request>,
    grpc: Option<GrpcCall>,
    raw: Option<String>,
    raw_repeat_header: Option<RepeatHeader>,
    raw_hold_ms: Option<u64>,
    reload: Option<String>,
    check: Option<String>,
    sleep_ms: Option<u64>,
    signal: Option<String>,
    stop_backend: Option<String>,
    log: Option<LogCheck>,
    backend_stats: Option<BTreeMap<String, StatsExpect>>,
    parallel: Option<Vec<Value>>,
    write_file: Option<WriteFile>,
    repeat: Option<u32>,
    expect_backends: Option<BTreeMap<String, Matcher>>,
    expect_one_backend: Option<bool>,
    expect: Option<Value>,
}

/// A step, ready to run.
#[derive(Debug)]
pub enum Step {
    Request {
        req: Request,
        repeat: u32,
        expect: HttpExpect,
        backends: BackendCount,
    },
    Grpc {
        call: GrpcCall,
        repeat: u32,
        expect: GrpcExpect,
        backends: BackendCount,
    },
    /// `hold_ms`: after the head, the connection stays open, unread, that long.
    Raw {
        data: Vec<u8>,
        expect: RawExpect,
        hold_ms: u64,
    },
    Reload {
        config: String,
        expect: ReloadExpect,
    },
    Check {
        config: String,
        expect: CheckExpect,
    },
    Sleep(u64),
    Signal {
        name: String,
        expect: SignalExpect,
    },
    StopBackend(String),
    Log(LogCheck),
    BackendStats(BTreeMap<String, StatsExpect>),
    Parallel(Vec<Vec<Step>>),
    WriteFile(WriteFile),
}

impl Step {
    /// A step that acts on luagate (a log step checks what the last one caused);
    /// `log`, `sleep_ms` and `backend_stats` only look or wait.
    pub fn acts(&self) -> bool {
        !matches!(self, Step::Log(_) | Step::Sleep(_) | Step::BackendStats(_))
    }

    /// Every file a `log` step reads (besides stderr), in this step and below it.
    pub fn log_files(&self, out: &mut Vec<String>) {
        match self {
            Step::Log(LogCheck { file: Some(f), .. }) if !out.contains(f) => out.push(f.clone()),
            Step::Parallel(branches) => branches.iter().flatten().for_each(|s| s.log_files(out)),
            _ => {}
        }
    }

    /// Short description for failure messages.
    pub fn summary(&self) -> String {
        match self {
            Step::Request { req, repeat, .. } => {
                let times = if *repeat > 1 { format!(" x{repeat}") } else { String::new() };
                format!("request {} {} http {}{times}", req.method, req.path, req.http.as_str())
            }
            Step::Grpc { call, repeat, .. } => {
                let times = if *repeat > 1 { format!(" x{repeat}") } else { String::new() };
                format!("grpc {:?}{times}", call.method)
            }
            Step::Raw { data, .. } => {
                let first = data.split(|b| *b == b'\n').next().unwrap_or_default();
                let first = String::from_utf8_lossy(&first[..first.len().min(60)]).into_owned();
                format!("raw {:?}", first.trim_end())
            }
            Step::Reload { .. } => "reload".into(),
            Step::Check { .. } => "check".into(),
            Step::Sleep(ms) => format!("sleep_ms {ms}"),
            Step::Signal { name, .. } => format!("signal {name}"),
            Step::StopBackend(b) => format!("stop_backend {b}"),
            Step::Log(l) => format!("log {}", l.file.as_deref().unwrap_or("stderr")),
            Step::BackendStats(_) => "backend_stats".into(),
            Step::Parallel(b) => format!("parallel ({} branches)", b.len()),
            Step::WriteFile(w) => format!("write_file {}", w.path),
        }
    }
}

/// What a repeated request asserts about the `x-backend` (or gRPC `backend`) values.
#[derive(Debug, Clone)]
pub enum BackendCount {
    Any,
    /// Counts per backend name (a number, or a matcher such as `">=4"`); unlisted
    /// backends must count 0.
    Exact(BTreeMap<String, Matcher>),
    /// Every response came from the same backend (whichever it is).
    One,
}

/// HTTP version and transport of a request step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    #[default]
    H1,
    H2c,
    TlsH1,
    TlsH2,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::H1 => "1.1",
            HttpVersion::H2c => "2",
            HttpVersion::TlsH1 => "tls1.1",
            HttpVersion::TlsH2 => "tls2",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, HttpVersion::TlsH1 | HttpVersion::TlsH2)
    }
}

impl<'de> Deserialize<'de> for HttpVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `http: 1.1` and `http: 2` arrive as numbers when not quoted.
        let v = Value::deserialize(d)?;
        let s = match &v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        match s.as_str() {
            "1.1" => Ok(HttpVersion::H1),
            "2" => Ok(HttpVersion::H2c),
            "tls1.1" => Ok(HttpVersion::TlsH1),
            "tls2" => Ok(HttpVersion::TlsH2),
            _ => Err(serde::de::Error::custom(format!(
                "http: expected \"1.1\", \"2\", \"tls1.1\" or \"tls2\", got {}",
                show(&v)
            ))),
        }
    }
}

/// A string or a list of strings (header values, `contains` lists).
#[derive(Debug, Clone, Default)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        match Raw::deserialize(d) {
            Ok(Raw::One(s)) => Ok(OneOrMany(vec![s])),
            Ok(Raw::Many(v)) => Ok(OneOrMany(v)),
            Err(_) => Err(serde::de::Error::custom("expected a string or a list of strings")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub http: HttpVersion,
    /// `listen` (default; `listen_tls` for tls versions), `listen2`, `listen_tls`.
    pub listener: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, OneOrMany>,
    pub body: Option<String>,
    /// A generated body of this many bytes (a-z pattern), instead of `body`.
    pub body_size: Option<usize>,
    /// The loopback address the client connects from (e.g. `127.0.0.7`).
    pub source_ip: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    /// Default 200.
    pub status: Option<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, Matcher>,
    pub body: Option<String>,
    #[serde(default)]
    pub body_contains: OneOrMany,
    pub body_len: Option<usize>,
    /// The response body equals the request body.
    #[serde(default)]
    pub echo_body: bool,
    /// Dotted paths into the JSON body.
    #[serde(default)]
    pub json: BTreeMap<String, Matcher>,
    /// Response HTTP version seen by the client: "1.1" or "2".
    pub version: Option<String>,
    /// Milliseconds from sending to the end of the body.
    pub time_ms: Option<Matcher>,
    /// Milliseconds from sending to the first body byte (to the end when the body is empty).
    pub first_byte_ms: Option<Matcher>,
    /// The body is cut (connection closed or stream reset before its end); `body*` see what came before.
    #[serde(default)]
    pub cut: bool,
}

/// gRPC method of `echo.v1.Echo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum GrpcMethod {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCall {
    pub method: GrpcMethod,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Sets `grpc-timeout` on the call.
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub delay_ms: u32,
    #[serde(default)]
    pub status_code: u32,
    /// ServerStream: replies asked for; ClientStream/Bidi: messages sent. Default 3.
    pub count: Option<u32>,
    #[serde(default)]
    pub payload_size: usize,
    #[serde(default)]
    pub reply_size: u32,
    pub listener: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcExpect {
    /// gRPC status code; default 0 (OK).
    #[serde(default)]
    pub code: i32,
    /// Matched against the first reply's `message`.
    pub message: Option<Matcher>,
    /// Matched against the first reply's `backend`.
    pub backend: Option<Matcher>,
    /// Number of replies received (before any error).
    pub replies: Option<u32>,
    /// Matched against the first reply's `metadata` (what the backend received).
    #[serde(default)]
    pub metadata: BTreeMap<String, Matcher>,
    /// Substring of the status message (on a non-OK code).
    pub error_contains: Option<String>,
    /// Length of the first reply's payload.
    pub payload_len: Option<usize>,
    pub received_messages: Option<u32>,
    pub received_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatHeader {
    pub name: String,
    pub bytes: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    pub status_line_contains: Option<String>,
    #[serde(default)]
    pub head_contains: OneOrMany,
    /// `true`: the server answered (a complete head), then closed the connection;
    /// `false`: it answered and kept the connection open (watched for 2 s).
    pub closed: Option<bool>,
    /// The server closed the connection without sending a byte. Without it (or
    /// `no_head`), a raw step fails when no complete response head arrives.
    #[serde(default)]
    pub no_answer: bool,
    /// The server closed the connection without an HTTP/1.x response head; it may
    /// have sent other bytes first (HTTP/2 frames, a TLS alert): they must not be empty.
    #[serde(default)]
    pub no_head: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadExpect {
    #[serde(default)]
    pub refused: bool,
    #[serde(default)]
    pub error_contains: OneOrMany,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckExpect {
    #[serde(default = "yes")]
    pub ok: bool,
    #[serde(default)]
    pub stderr_contains: OneOrMany,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalExpect {
    /// Waits (10 s) for luagate to exit with this code.
    pub exit_code: Option<i32>,
    /// With `exit_code`: the exit came within this many milliseconds of the signal.
    pub exit_within_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogCheck {
    /// A file in the case dir; default: luagate's stderr.
    pub file: Option<String>,
    #[serde(default)]
    pub contains: OneOrMany,
    #[serde(default)]
    pub not_contains: OneOrMany,
    /// Some line of the file is a JSON object matching all these dotted paths.
    #[serde(default)]
    pub json: BTreeMap<String, Matcher>,
    /// Where the search starts: by default at what was logged since the step
    /// before it began (the step whose effect it checks; `sleep_ms`, `log` and
    /// `backend_stats` steps are skipped over); `start`: the whole file.
    pub since: Option<LogSince>,
}

/// `log.since`: where a log step's search starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSince {
    /// The beginning of the file.
    Start,
}

/// Writes (replaces) a file of the case dir, e.g. a watched Lua script.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// Relative to the case dir.
    pub path: String,
    pub content: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsExpect {
    pub requests: Option<Matcher>,
    pub connections: Option<Matcher>,
    pub grpc_cancelled: Option<Matcher>,
    pub grpc_completed: Option<Matcher>,
}

/// Values of the `${name}` placeholders of one run.
#[derive(Debug, Default, Clone)]
pub struct Vars(pub BTreeMap<String, String>);

impl Vars {
    /// Replaces every `${name}`; an unknown name is an error.
    pub fn sub(&self, s: &str) -> Result<String, String> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(j) = after.find('}') else {
                out.push_str(&rest[i..]);
                return Ok(out);
            };
            let name = &after[..j];
            match self.0.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    let known: Vec<&str> = self.0.keys().map(String::as_str).collect();
                    return Err(format!("unknown placeholder ${{{name}}} (known: {})", known.join(", ")));
                }
            }
            rest = &after[j + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn sub_value(&self, v: &mut Value) -> Result<(), String> {
        match v {
            Value::String(s) => *s = self.sub(s)?,
            Value::Sequence(seq) => {
                for x in seq {
                    self.sub_value(x)?;
                }
            }
            Value::Mapping(m) => {
                for (_, x) in m.iter_mut() {
                    self.sub_value(x)?;
                }
            }
            Value::Tagged(t) => self.sub_value(&mut t.value)?,
            _ => {}
        }
        Ok(())
    }

    /// Placeholder values that only name-check (for validating a case before a run).
    pub fn dummy(backends: impl IntoIterator<Item = String>) -> Self {
        let mut m = BTreeMap::new();
        for k in LISTENERS.iter().chain([&DEAD, &BLACKHOLE, &"dir"]) {
            m.insert(k.to_string(), format!("<{k}>"));
        }
        for b in backends {
            m.insert(b.clone(), format!("<{b}>"));
        }
        Vars(m)
    }
}

/// Parses a case. Without `vars` the placeholders are only checked for known names
/// (errors carry the file's line and column); with `vars` they are substituted.
pub fn parse(text: &str, vars: Option<&Vars>) -> Result<Case, String> {
    let doc: CaseDoc = match vars {
        None => {
            let doc: CaseDoc = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
            let names = doc.backends.keys().cloned();
            let dummy = Vars::dummy(names);
            for (i, line) in text.lines().enumerate() {
                dummy.sub(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            }
            doc
        }
        Some(vars) => {
            let mut v: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
            vars.sub_value(&mut v)?;
            serde_yaml_ng::from_value(v).map_err(|e| e.to_string())?
        }
    };
    for name in doc.backends.keys() {
        if LISTENERS.contains(&name.as_str()) || [DEAD, BLACKHOLE, "dir"].contains(&name.as_str()) {
            return Err(format!("backend name {name:?} is a reserved placeholder"));
        }
    }
    let ctx = Ctx { backends: &doc.backends, assertions: std::cell::Cell::new(0) };
    let steps = doc
        .steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| ctx.step(s).map_err(|e| format!("step {}: {e}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    if ctx.assertions.get() == 0 {
        return Err("the case asserts nothing beyond the defaults: give some step an `expect` (or \
             expect_backends / expect_one_backend), or add a `log` or `backend_stats` step"
            .into());
    }
    Ok(Case {
        name: doc.name,
        backends: doc.backends,
        files: doc.files,
        config: doc.config,
        steps,
        exit: doc.exit,
        luagate_wrapper: doc.luagate_wrapper,
        expect_failure: doc.expect_failure.map(|f| f.0),
    })
}

/// Reads just the `skip:` reason of a case (for listing); errors are left for the run.
pub fn skip_reason(text: &str) -> Option<String> {
    let v: Value = serde_yaml_ng::from_str(text).ok()?;
    v.get("skip")?.as_str().map(str::to_owned)
}

/// Reads just the `no_reload:` reason of a case: a case about reloads themselves,
/// which reload mode's own reloads would change, is not listed in reload mode.
pub fn no_reload_reason(text: &str) -> Option<String> {
    let v: Value = serde_yaml_ng::from_str(text).ok()?;
    v.get("no_reload")?.as_str().map(str::to_owned)
}

struct Ctx<'a> {
    backends: &'a BTreeMap<String, BackendKind>,
    /// Steps seen so far that assert something beyond the defaults.
    assertions: std::cell::Cell<usize>,
}

fn expect_as<T: serde::de::DeserializeOwned + Default>(v: Option<Value>) -> Result<T, String> {
    match v {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_yaml_ng::from_value(v).map_err(|e| format!("expect: {e}")),
    }
}

fn check_listener(l: &Option<String>) -> Result<(), String> {
    match l {
        Some(l) if !LISTENERS.contains(&l.as_str()) => {
            Err(format!("listener {l:?}: expected one of {}", LISTENERS.join(", ")))
        }
        _ => Ok(()),
    }
}

impl Ctx<'_> {
    fn backend_count(&self, s: &StepDoc) -> Result<BackendCount, String> {
        match (&s.expect_backends, s.expect_one_backend) {
            (Some(_), Some(true)) => Err("expect_backends and expect_one_backend are exclusive".into()),
            (Some(m), _) => {
                for name in m.keys() {
                    if !self.backends.contains_key(name) {
                        return Err(format!("expect_backends: unknown backend {name:?}"));
                    }
                }
                Ok(BackendCount::Exact(m.clone()))
            }
            (None, Some(true)) => Ok(BackendCount::One),
            _ => Ok(BackendCount::Any),
        }
    }

    fn step(&self, s: StepDoc) -> Result<Step, String> {
        let actions = [
            ("request", s.request.is_some()),
            ("grpc", s.grpc.is_some()),
            ("raw", s.raw.is_some()),
            ("reload", s.reload.is_some()),
            ("check", s.check.is_some()),
            ("sleep_ms", s.sleep_ms.is_some()),
            ("signal", s.signal.is_some()),
            ("stop_backend", s.stop_backend.is_some()),
            ("log", s.log.is_some()),
            ("backend_stats", s.backend_stats.is_some()),
            ("parallel", s.parallel.is_some()),
            ("write_file", s.write_file.is_some()),
        ];
        let present: Vec<&str> = actions.iter().filter(|a| a.1).map(|a| a.0).collect();
        if present.len() != 1 {
            return Err(format!("a step needs exactly one action key, found {present:?}"));
        }
        let action = present[0];
        let repeatable = matches!(action, "request" | "grpc");
        if !repeatable && (s.repeat.is_some() || s.expect_backends.is_some() || s.expect_one_backend.is_some()) {
            return Err(format!(
                "repeat/expect_backends/expect_one_backend only go with request or grpc, not {action}"
            ));
        }
        if action != "raw" && (s.raw_repeat_header.is_some() || s.raw_hold_ms.is_some()) {
            return Err("raw_repeat_header and raw_hold_ms only go with raw".into());
        }
        let takes_expect = matches!(action, "request" | "grpc" | "raw" | "reload" | "check" | "signal");
        if !takes_expect && s.expect.is_some() {
            return Err(format!("{action} takes no expect"));
        }
        let repeat = s.repeat.unwrap_or(1).max(1);
        let backends = self.backend_count(&s)?;
        let explicit = s.expect.as_ref().is_some_and(|e| !e.is_null());
        let asserts = match action {
            "request" | "grpc" => explicit || !matches!(backends, BackendCount::Any),
            "raw" | "reload" | "check" => explicit,
            "signal" => explicit && s.expect.as_ref().and_then(|e| e.get("exit_code")).is_some_and(|c| !c.is_null()),
            "log" => {
                let l = s.log.as_ref().unwrap_or_else(|| unreachable!());
                if l.contains.0.is_empty() && l.not_contains.0.is_empty() && l.json.is_empty() {
                    return Err("log: give contains, not_contains or json".into());
                }
                true
            }
            "backend_stats" => {
                let m = s.backend_stats.as_ref().unwrap_or_else(|| unreachable!());
                let any = m.values().any(|e| {
                    e.requests.is_some()
                        || e.connections.is_some()
                        || e.grpc_cancelled.is_some()
                        || e.grpc_completed.is_some()
                });
                if !any {
                    return Err("backend_stats: give at least one counter to check".into());
                }
                true
            }
            _ => false,
        };
        if asserts {
            self.assertions.set(self.assertions.get() + 1);
        }
        let step = match action {
            "request" => {
                let req = s.request.unwrap_or_else(|| unreachable!());
                check_listener(&req.listener)?;
                if req.body.is_some() && req.body_size.is_some() {
                    return Err("request: body and body_size are exclusive".into());
                }
                Step::Request { req, repeat, expect: expect_as(s.expect)?, backends }
            }
            "grpc" => {
                let call = s.grpc.unwrap_or_else(|| unreachable!());
                check_listener(&call.listener)?;
                Step::Grpc { call, repeat, expect: expect_as(s.expect)?, backends }
            }
            "raw" => {
                let mut data = s.raw.unwrap_or_default().into_bytes();
                if let Some(h) = s.raw_repeat_header {
                    data = insert_header(&data, &h);
                }
                let expect: RawExpect = expect_as(s.expect)?;
                let other = expect.closed.is_some()
                    || expect.status_line_contains.is_some()
                    || !expect.head_contains.0.is_empty();
                if (expect.no_answer || expect.no_head) && other {
                    return Err(
                        "raw: no_answer and no_head exclude closed, status_line_contains and head_contains".into()
                    );
                }
                if expect.no_answer && expect.no_head {
                    return Err(
                        "raw: no_answer (no byte at all) and no_head (some bytes, no head) are exclusive".into()
                    );
                }
                if s.raw_hold_ms.is_some() && expect.closed.is_some() {
                    return Err("raw: raw_hold_ms excludes closed".into());
                }
                Step::Raw { data, expect, hold_ms: s.raw_hold_ms.unwrap_or(0) }
            }
            "reload" => Step::Reload { config: s.reload.unwrap_or_default(), expect: expect_as(s.expect)? },
            "check" => Step::Check {
                config: s.check.unwrap_or_default(),
                expect: match s.expect {
                    None => CheckExpect { ok: true, stderr_contains: OneOrMany::default() },
                    Some(v) => serde_yaml_ng::from_value(v).map_err(|e| format!("expect: {e}"))?,
                },
            },
            "sleep_ms" => Step::Sleep(s.sleep_ms.unwrap_or_default()),
            "signal" => {
                let name = s.signal.unwrap_or_default();
                if crate::process::signal_number(&name).is_none() {
                    return Err(format!("signal {name:?}: expected TERM, HUP, INT, QUIT, KILL or USR1"));
                }
                Step::Signal { name, expect: expect_as(s.expect)? }
            }
            "stop_backend" => {
                let b = s.stop_backend.unwrap_or_default();
                if !self.backends.contains_key(&b) {
                    return Err(format!("stop_backend: unknown backend {b:?}"));
                }
                Step::StopBackend(b)
            }
            "log" => Step::Log(s.log.unwrap_or_else(|| unreachable!())),
            "backend_stats" => {
                let m = s.backend_stats.unwrap_or_default();
                for b in m.keys() {
                    if !self.backends.contains_key(b) {
                        return Err(format!("backend_stats: unknown backend {b:?}"));
                    }
                }
                Step::BackendStats(m)
            }
            "parallel" => {
                let mut branches = Vec::new();
                for (i, b) in s.parallel.unwrap_or_default().into_iter().enumerate() {
                    let docs: Vec<StepDoc> = match b {
                        Value::Sequence(_) => serde_yaml_ng::from_value(b),
                        other => serde_yaml_ng::from_value(other).map(|d| vec![d]),
                    }
                    .map_err(|e| format!("parallel branch {}: {e}", i + 1))?;
                    let steps = docs
                        .into_iter()
                        .enumerate()
                        .map(|(j, d)| {
                            self.step(d).map_err(|e| format!("parallel branch {} step {}: {e}", i + 1, j + 1))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    branches.push(steps);
                }
                Step::Parallel(branches)
            }
            "write_file" => {
                let w = s.write_file.unwrap_or_else(|| unreachable!());
                if w.path.is_empty() || Path::new(&w.path).is_absolute() || w.path.split('/').any(|p| p == "..") {
                    return Err(format!("write_file: {:?} must be a relative path inside the case dir", w.path));
                }
                Step::WriteFile(w)
            }
            _ => unreachable!(),
        };
        Ok(step)
    }
}

/// Inserts `name: xxx…` (`bytes` value bytes) as the last header of a raw request head.
fn insert_header(data: &[u8], h: &RepeatHeader) -> Vec<u8> {
    let line = format!("{}: {}\r\n", h.name, "x".repeat(h.bytes));
    let end = data.windows(4).position(|w| w == b"\r\n\r\n");
    let mut out = Vec::with_capacity(data.len() + line.len());
    match end {
        Some(i) => {
            out.extend_from_slice(&data[..i + 2]);
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(&data[i + 2..]);
        }
        None => {
            out.extend_from_slice(data);
            out.extend_from_slice(line.as_bytes());
        }
    }
    out
}

/// A YAML value in one line, for messages.
pub fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"))
}
