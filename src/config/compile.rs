//! Validation and compilation: [`FileConfig`] → [`Snapshot`]. Every check
//! records `(key path, message)` and goes on, so one run reports every error;
//! `config::load` turns key paths into lines.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use super::file::{FileConfig, LimitsCfg, ListenCfg, LuaCfg, RouteCfg, Scalar, TimeoutsCfg, UpstreamCfg};
use super::snapshot::{AccessLogTarget, Action, Limits, Listener, Route, Snapshot};
use super::units;
use super::ConfigError;
use crate::lua::{Grants, RouteLua, Script, Settings as LuaSettings};
use crate::phase::variable::Variable;
use crate::route::{HeaderMatch, HostPattern, PathMatch, RouteMatch, RouteTable};
use crate::upstream::balancer::{Balancer, Peer, Policy};
use crate::upstream::{peer_stats, ConnLimit, Keepalive, Protocol, Timeouts, Upstream};

mod limits;

/// Errors as (key path, message).
pub type Errors = Vec<(String, String)>;

/// Why a config did not compile: errors at config keys, and errors inside Lua files.
pub struct Failed {
    pub errors: Errors,
    pub lua: Vec<ConfigError>,
}

/// The largest HTTP/2 window (and stream count) the protocol allows: 2^31 - 1.
const MAX_WINDOW: u32 = (1 << 31) - 1;

const DEFAULT_TIMEOUTS: Timeouts =
    Timeouts { connect: Duration::from_secs(5), send: Duration::from_secs(60), read: Duration::from_secs(60) };

/// Highest `limits.max_headers`: hyper parses a head's fields into an array
/// of this many entries (on the heap past 100), allocated per request head.
const MAX_HEADERS: usize = 10_000;

pub fn compile(cfg: FileConfig, source: &Path) -> Result<Snapshot, Failed> {
    let mut c = Compiler {
        errors: Vec::new(),
        lua_errors: Vec::new(),
        dir: source.parent().unwrap_or(Path::new(".")).to_path_buf(),
        files: Vec::new(),
    };

    let workers = match &cfg.workers {
        None => default_workers(),
        Some(Scalar::Str(s)) if s == "auto" => default_workers(),
        Some(Scalar::Int(n)) if *n >= 1 && *n <= 1024 => *n as usize,
        Some(_) => {
            c.err("workers", "must be `auto` or a number from 1 to 1024");
            1
        }
    };
    let error_level = match cfg.error_log.level.as_deref().unwrap_or("info") {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        other => {
            c.err("error_log.level", format!("unknown level {other:?} (trace, debug, info, warn, error)"));
            tracing::Level::INFO
        }
    };
    let access_log = match cfg.access_log.path.as_deref() {
        None | Some("stdout") => AccessLogTarget::Stdout,
        Some("stderr") => AccessLogTarget::Stderr,
        Some("off") => AccessLogTarget::Off,
        Some("") => {
            c.err("access_log.path", "empty: give stdout, stderr, off or a file path");
            AccessLogTarget::Off
        }
        Some(p) => AccessLogTarget::File(c.path(p)),
    };
    let shutdown_grace = c.duration("shutdown.grace", cfg.shutdown.grace.as_deref(), Duration::from_secs(30));
    let trusted_proxies = cfg
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let parsed = s.parse::<ipnet::IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            parsed
                .map_err(|_| c.err(format!("trusted_proxies[{i}]"), format!("{s:?} is not an IP address or CIDR")))
                .ok()
        })
        .collect();
    let limits = c.limits(&cfg.limits);
    let defaults = c.timeouts("timeouts", &cfg.timeouts, DEFAULT_TIMEOUTS);

    let checker = mlua::Lua::new();
    let lua = c.lua_settings(&cfg.lua, &checker);
    let listeners = c.listeners(&cfg.listen);
    let listener_names: HashSet<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let upstreams: HashMap<String, Arc<Upstream>> = cfg
        .upstreams
        .iter()
        .filter_map(|(name, u)| c.upstream(name, u, defaults).map(|u| (name.clone(), Arc::new(u))))
        .collect();
    let mut limit_ctx = c.limit_ctx(&cfg);
    let mut routes = Vec::new();
    let mut matchers = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        if let Some((route, matcher)) =
            c.route(i, r, &upstreams, &listener_names, &cfg, limits.client_max_body_size, &checker, &mut limit_ctx)
        {
            routes.push(Arc::new(route));
            matchers.push(matcher);
        }
    }
    if !c.errors.is_empty() || !c.lua_errors.is_empty() {
        return Err(Failed { errors: c.errors, lua: c.lua_errors });
    }
    Ok(Snapshot {
        generation: 0,
        source: source.to_path_buf(),
        digest: String::new(),
        workers,
        pid_file: cfg.pid_file.as_deref().map(|p| c.path(p)),
        error_level,
        access_log,
        shutdown_grace,
        trusted_proxies,
        merge_slashes: cfg.merge_slashes.unwrap_or(true),
        underscores_in_headers: cfg.underscores_in_headers,
        limits: Arc::new(limits),
        listeners,
        routes,
        table: RouteTable::new(matchers),
        upstreams,
        lua,
        files: c.files,
    })
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Compiler {
    errors: Errors,
    /// Errors located in Lua files rather than the config.
    lua_errors: Vec<ConfigError>,
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Compiler {
    fn err(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        self.errors.push((key.into(), msg.into()));
    }

    /// Relative paths are relative to the config file's directory.
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        match v.map(units::duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.err(key, e);
                default
            }
        }
    }

    fn size(&mut self, key: &str, v: Option<&Scalar>, default: u64) -> u64 {
        match v.map(units::size) {
            None => default,
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                self.err(key, e);
                default
            }
        }
    }

    /// `limits:`, each checked against the range it can work in.
    fn limits(&mut self, l: &LimitsCfg) -> Limits {
        let d = Limits::default();
        let limits = Limits {
            max_header_size: self.size("limits.max_header_size", l.max_header_size.as_ref(), d.max_header_size as u64)
                as usize,
            client_max_body_size: self.size(
                "limits.client_max_body_size",
                l.client_max_body_size.as_ref(),
                d.client_max_body_size,
            ),
            header_read_timeout: self.positive(
                "limits.header_read_timeout",
                l.header_read_timeout.as_deref(),
                d.header_read_timeout,
            ),
            keepalive_timeout: self.positive(
                "limits.keepalive_timeout",
                l.keepalive_timeout.as_deref(),
                d.keepalive_timeout,
            ),
            send_timeout: self.positive("limits.send_timeout", l.send_timeout.as_deref(), d.send_timeout),
            worker_connections: l.worker_connections.unwrap_or(d.worker_connections),
            http2_max_concurrent_streams: l.http2_max_concurrent_streams.unwrap_or(d.http2_max_concurrent_streams),
            http2_send_buffer: self.size(
                "limits.http2_send_buffer",
                l.http2_send_buffer.as_ref(),
                d.http2_send_buffer as u64,
            ) as usize,
            http2_recv_window: u32::try_from(self.size(
                "limits.http2_recv_window",
                l.http2_recv_window.as_ref(),
                u64::from(d.http2_recv_window),
            ))
            .unwrap_or(u32::MAX),
            max_headers: l.max_headers.unwrap_or(d.max_headers),
            client_body_timeout: self.positive(
                "limits.client_body_timeout",
                l.client_body_timeout.as_deref(),
                d.client_body_timeout,
            ),
        };
        if !(1..=MAX_HEADERS).contains(&limits.max_headers) {
            self.err("limits.max_headers", format!("must be from 1 to {MAX_HEADERS}"));
        }
        if limits.max_header_size < 8192 {
            self.err("limits.max_header_size", "must be at least 8k (hyper reads request heads in 8k buffers)");
        }
        if limits.worker_connections == 0 {
            self.err("limits.worker_connections", "must be at least 1");
        }
        if !(1..=MAX_WINDOW).contains(&limits.http2_max_concurrent_streams) {
            self.err("limits.http2_max_concurrent_streams", format!("must be from 1 to {MAX_WINDOW}"));
        }
        if !(16 << 10..=1 << 30).contains(&limits.http2_send_buffer) {
            self.err("limits.http2_send_buffer", "must be from 16k (one HTTP/2 frame) to 1g");
        }
        if !(65535..=MAX_WINDOW).contains(&limits.http2_recv_window) {
            self.err("limits.http2_recv_window", format!("must be from 64k to {MAX_WINDOW} bytes"));
        }
        limits
    }

    /// A duration that must be more than zero.
    fn positive(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        let d = self.duration(key, v, default);
        if d.is_zero() {
            self.err(key, "must be more than 0");
            return default;
        }
        d
    }

    fn timeouts(&mut self, key: &str, t: &TimeoutsCfg, base: Timeouts) -> Timeouts {
        Timeouts {
            connect: self.duration(&format!("{key}.connect"), t.connect.as_deref(), base.connect),
            send: self.duration(&format!("{key}.send"), t.send.as_deref(), base.send),
            read: self.duration(&format!("{key}.read"), t.read.as_deref(), base.read),
        }
    }

    fn listeners(&mut self, cfg: &[ListenCfg]) -> Vec<Arc<Listener>> {
        if cfg.is_empty() {
            self.err("listen", "at least one listener is required");
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, l) in cfg.iter().enumerate() {
            let key = format!("listen[{i}]");
            let Ok(addr) = l.addr.parse::<SocketAddr>() else {
                self.err(format!("{key}.addr"), format!("{:?} is not an IP:port address", l.addr));
                continue;
            };
            if !seen.insert(addr) {
                self.err(format!("{key}.addr"), format!("{addr} is listed twice"));
            }
            let (mut http1, mut h2c) = (true, true);
            if let Some(protocols) = &l.protocols {
                http1 = false;
                h2c = false;
                for (j, p) in protocols.iter().enumerate() {
                    match p.as_str() {
                        "http1" => http1 = true,
                        "h2c" | "h2" | "http2" => h2c = true,
                        other => self
                            .err(format!("{key}.protocols[{j}]"), format!("unknown protocol {other:?} (http1, h2c)")),
                    }
                }
                if !http1 && !h2c {
                    self.err(format!("{key}.protocols"), "name at least one protocol");
                }
            }
            let tls = l.tls.as_ref().and_then(|t| {
                let (cert, key_file) = (self.path(&t.cert), self.path(&t.key));
                self.files.extend([cert.clone(), key_file.clone()]);
                crate::server::tls::server_config(&cert, &key_file, http1, h2c)
                    .map_err(|e| self.err(format!("{key}.tls"), e))
                    .ok()
            });
            out.push(Arc::new(Listener {
                addr,
                name: l.name.clone().unwrap_or_else(|| addr.to_string()),
                http1,
                h2c,
                tls,
            }));
        }
        out
    }

    fn upstream(&mut self, name: &str, u: &UpstreamCfg, defaults: Timeouts) -> Option<Upstream> {
        let key = format!("upstreams.{name}");
        let policy = match u.lb.as_deref().unwrap_or("round_robin") {
            "round_robin" => Policy::RoundRobin,
            "weighted_round_robin" => Policy::WeightedRoundRobin,
            "ip_hash" => Policy::IpHash,
            "consistent_hash" => Policy::ConsistentHash,
            "least_conn" => Policy::LeastConn,
            "p2c_ewma" => Policy::P2cEwma,
            other => {
                self.err(
                    format!("{key}.lb"),
                    format!("unknown policy {other:?} (round_robin, weighted_round_robin, ip_hash, consistent_hash, least_conn, p2c_ewma)"),
                );
                Policy::RoundRobin
            }
        };
        let hash_key = match (&u.hash_key, policy) {
            (Some(k), Policy::ConsistentHash) => {
                Variable::parse(k).map_err(|e| self.err(format!("{key}.hash_key"), e)).ok()
            }
            (None, Policy::ConsistentHash) => {
                self.err(format!("{key}.lb"), "consistent_hash needs hash_key (e.g. \"$http_x_user\")");
                None
            }
            (Some(_), _) => {
                self.err(format!("{key}.hash_key"), "hash_key is only used with lb: consistent_hash");
                None
            }
            (None, _) => None,
        };
        let protocol = match u.protocol.as_deref().unwrap_or("http1") {
            "http1" => Protocol::Http1,
            "h2c" | "grpc" | "http2" => Protocol::H2c,
            other => {
                self.err(format!("{key}.protocol"), format!("unknown protocol {other:?} (http1, h2c)"));
                Protocol::Http1
            }
        };
        if u.peers.is_empty() {
            self.err(format!("{key}.peers"), "an upstream needs at least one peer");
        }
        let mut peers = Vec::new();
        for (i, p) in u.peers.iter().enumerate() {
            if p.weight == Some(0) {
                self.err(format!("{key}.peers[{i}].weight"), "a weight is at least 1 (to take a peer out, remove it)");
            }
            match p.addr.parse::<SocketAddr>() {
                Ok(addr) => peers.push(Peer { addr, weight: p.weight.unwrap_or(1).max(1), stats: peer_stats(addr) }),
                Err(_) => self.err(format!("{key}.peers[{i}].addr"), format!("{:?} is not an IP:port address", p.addr)),
            }
        }
        let keepalive = Keepalive {
            max_idle: u.keepalive.max_idle.unwrap_or(32),
            idle_timeout: self.duration(
                &format!("{key}.keepalive.idle_timeout"),
                u.keepalive.idle_timeout.as_deref(),
                Duration::from_secs(60),
            ),
        };
        let timeouts = self.timeouts(&format!("{key}.timeouts"), &u.timeouts, defaults);
        let d = ConnLimit::default();
        let conns = ConnLimit {
            max: u.max_conns.unwrap_or(d.max),
            queue_timeout: self.duration(&format!("{key}.queue_timeout"), u.queue_timeout.as_deref(), d.queue_timeout),
        };
        Some(Upstream {
            name: Arc::from(name),
            protocol,
            balancer: Balancer::new(policy, &peers),
            peers,
            hash_key,
            keepalive,
            timeouts,
            conns,
        })
    }

    #[allow(clippy::too_many_arguments)] // one call site; the arguments are the compile context
    fn route(
        &mut self,
        i: usize,
        r: &RouteCfg,
        upstreams: &HashMap<String, Arc<Upstream>>,
        listeners: &HashSet<&str>,
        cfg: &FileConfig,
        default_body_limit: u64,
        checker: &mlua::Lua,
        limit_ctx: &mut limits::LimitCtx,
    ) -> Option<(Route, RouteMatch)> {
        let key = format!("routes[{i}]");
        let m = &r.matches;
        let mkey = format!("{key}.match");
        let mut matcher = RouteMatch::default();
        if let Some(l) = &m.listener {
            if !listeners.contains(l.as_str()) {
                self.err(format!("{mkey}.listener"), format!("no listener is named {l:?}"));
            }
            matcher.listener = Some(l.clone());
        }
        if let Some(hosts) = &m.host {
            for (j, h) in hosts.clone().into_vec().iter().enumerate() {
                match HostPattern::parse(h) {
                    Ok(p) => matcher.hosts.push(p),
                    Err(e) => self.err(format!("{mkey}.host"), format!("host #{}: {e}", j + 1)),
                }
            }
        }
        let path_kinds = [m.path.is_some(), m.path_prefix.is_some(), m.path_regex.is_some()];
        if path_kinds.iter().filter(|b| **b).count() > 1 {
            self.err(mkey.clone(), "use only one of path, path_prefix, path_regex");
        }
        if m.stop_regex.is_some() && m.path_prefix.is_none() {
            self.err(format!("{mkey}.stop_regex"), "stop_regex only applies to path_prefix");
        }
        matcher.path = if let Some(p) = &m.path {
            self.check_path(&format!("{mkey}.path"), p, true, cfg.merge_slashes.unwrap_or(true));
            PathMatch::Exact(p.clone())
        } else if let Some(p) = &m.path_prefix {
            self.check_path(&format!("{mkey}.path_prefix"), p, false, cfg.merge_slashes.unwrap_or(true));
            PathMatch::Prefix { prefix: p.clone(), stop_regex: m.stop_regex.unwrap_or(false) }
        } else if let Some(re) = &m.path_regex {
            // On bytes, without Unicode, like nginx's PCRE: the normalised path need not be UTF-8
            // (`/%ff`), and `.` must match any byte of it or `^/admin/.*$` is bypassed with one.
            match regex::bytes::RegexBuilder::new(re).unicode(false).build() {
                Ok(re) => PathMatch::Regex(re),
                Err(e) => {
                    self.err(
                        format!("{mkey}.path_regex"),
                        format!("regex does not compile: {}", one_line(&e.to_string())),
                    );
                    PathMatch::Any
                }
            }
        } else {
            PathMatch::Any
        };
        for (j, meth) in m.methods.iter().flatten().enumerate() {
            match Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
                Ok(x) => matcher.methods.push(x),
                Err(_) => self.err(format!("{mkey}.methods[{j}]"), format!("{meth:?} is not an HTTP method")),
            }
        }
        for (name, want) in m.headers.iter().flatten() {
            let hkey = format!("{mkey}.headers.{name}");
            let Ok(hname) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
                self.err(hkey, format!("{name:?} is not a header name"));
                continue;
            };
            let matcher_value = if want == "*" {
                Some(HeaderMatch::Present)
            } else if let Some(re) = want.strip_prefix('~') {
                Regex::new(re)
                    .map(HeaderMatch::Regex)
                    .map_err(|e| {
                        self.err(hkey.clone(), format!("regex does not compile: {}", one_line(&e.to_string())))
                    })
                    .ok()
            } else {
                HeaderValue::from_str(want)
                    .map(HeaderMatch::Exact)
                    .map_err(|_| self.err(hkey.clone(), "not a valid header value"))
                    .ok()
            };
            if let Some(v) = matcher_value {
                matcher.headers.push((hname, v));
            }
        }
        if m.grpc_method.is_some() && m.grpc_service.is_none() {
            self.err(format!("{mkey}.grpc_method"), "grpc_method needs grpc_service");
        }
        matcher.grpc_service = m.grpc_service.clone();
        matcher.grpc_method = m.grpc_method.clone();
        // A gRPC call's path is /service/method: without a path condition a gRPC
        // route ranks as that path would in nginx (exact with a method, else prefix).
        if let (PathMatch::Any, Some(service)) = (&matcher.path, &m.grpc_service) {
            matcher.path = match &m.grpc_method {
                Some(method) => PathMatch::Exact(format!("/{service}/{method}")),
                None => PathMatch::Prefix { prefix: format!("/{service}/"), stop_regex: false },
            };
        }

        let lua = r.lua.as_ref().map(|l| {
            let lkey = format!("{key}.lua");
            let mut one = |phase: &str, v: &Option<String>| {
                v.as_deref().and_then(|v| self.script(checker, &format!("{lkey}.{phase}"), v))
            };
            Arc::new(RouteLua {
                rewrite: one("rewrite", &l.rewrite),
                access: one("access", &l.access),
                content: one("content", &l.content),
                balancer: one("balancer", &l.balancer),
                header_filter: one("header_filter", &l.header_filter),
                body_filter: one("body_filter", &l.body_filter),
                log: one("log", &l.log),
            })
        });
        let has_content = lua.as_ref().is_some_and(|l| l.content.is_some());
        let action = match (&r.upstream, &r.ret) {
            (Some(_), Some(_)) => {
                self.err(key.clone(), "a route has either `upstream` or `return`, not both");
                None
            }
            (None, None) if has_content => Some(Action::Content),
            (None, None) => {
                self.err(key.clone(), "a route needs `upstream`, `return` or a `lua.content` script");
                None
            }
            (Some(name), None) => match upstreams.get(name) {
                Some(u) => Some(Action::Proxy(u.clone())),
                None if cfg.upstreams.contains_key(name) => None, // its own errors are reported
                None => {
                    self.err(format!("{key}.upstream"), format!("no upstream is named {name:?}"));
                    None
                }
            },
            (None, Some(ret)) => self.ret(&format!("{key}.return"), ret),
        };
        let host_header = match r.host_header.as_deref() {
            None | Some("pass") => None,
            Some(h) if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) => {
                self.err(format!("{key}.host_header"), "not a valid host");
                None
            }
            Some(h) => {
                HeaderValue::from_str(h).map_err(|_| self.err(format!("{key}.host_header"), "not a valid host")).ok()
            }
        };
        let timeout = r
            .timeout
            .as_deref()
            .and_then(|t| units::duration(t).map_err(|e| self.err(format!("{key}.timeout"), e)).ok());
        let client_max_body_size =
            self.size(&format!("{key}.client_max_body_size"), r.client_max_body_size.as_ref(), default_body_limit);
        let tries = r.retry.as_ref().and_then(|r| r.tries).unwrap_or(2);
        if tries == 0 {
            self.err(format!("{key}.retry.tries"), "tries counts the first attempt: at least 1");
        }
        let websocket = r.websocket.unwrap_or(false);
        if websocket && !matches!(&action, Some(Action::Proxy(u)) if u.protocol == Protocol::Http1) {
            self.err(format!("{key}.websocket"), "WebSocket needs an upstream speaking http1");
        }
        let name = r.name.clone().unwrap_or_else(|| key.clone());
        let route_limits =
            self.route_limits(limit_ctx, &key, &name, r.rate_limit.as_ref(), r.concurrency_limit.as_ref(), cfg);
        let mirror = self.mirror(&key, r.mirror.as_ref(), upstreams, cfg);
        if mirror.is_some() && !matches!(action, Some(Action::Proxy(_))) {
            self.err(format!("{key}.mirror"), "mirror applies to routes with an upstream");
        }
        Some((
            Route {
                name: Arc::from(name),
                action: action?,
                host_header,
                timeout,
                client_max_body_size,
                tries: tries.max(1),
                websocket,
                lua,
                limits: route_limits,
                mirror,
            },
            matcher,
        ))
    }

    /// A script (file or inline), syntax-checked; file errors point into the Lua file.
    fn script(&mut self, checker: &mlua::Lua, key: &str, value: &str) -> Option<Arc<Script>> {
        match crate::lua::compile::script(checker, &self.dir, key, value) {
            Ok(s) => {
                if crate::lua::compile::is_file_ref(value) {
                    self.files.push(self.path(value.trim()));
                }
                Some(s)
            }
            Err(e) => {
                match e.file_line {
                    Some((file, line)) => {
                        self.lua_errors.push(ConfigError { file, line, column: 0, message: e.message })
                    }
                    None => self.err(key, e.message),
                }
                None
            }
        }
    }

    fn lua_settings(&mut self, cfg: &LuaCfg, checker: &mlua::Lua) -> LuaSettings {
        let mut shared_dicts = Vec::new();
        for (name, size) in &cfg.shared_dicts {
            match units::size(size) {
                Ok(n) if n >= 8192 => {
                    shared_dicts.push((name.clone(), crate::lua::ngx::shared::dict(name, n as usize)))
                }
                Ok(_) => self.err(format!("lua.shared_dicts.{name}"), "a shared dict needs at least 8k"),
                Err(e) => self.err(format!("lua.shared_dicts.{name}"), e),
            }
        }
        let mut grants = Grants::default();
        for (i, g) in cfg.allow.iter().enumerate() {
            match g.as_str() {
                "os_execute" => grants.os_execute = true,
                "io_popen" => grants.io_popen = true,
                // mlua's safe mode refuses package.loadlib, and the binary exports no
                // lua_* symbols for a C module to link against: refuse the grant
                // rather than accept one that cannot work.
                "native_modules" => self.err(
                    format!("lua.allow[{i}]"),
                    "native_modules is not available: this build cannot load C modules (cjson is built in)",
                ),
                other => self.err(
                    format!("lua.allow[{i}]"),
                    format!("unknown grant {other:?} (os_execute, io_popen, native_modules)"),
                ),
            }
        }
        for name in cfg.variables.keys() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                self.err(format!("lua.variables.{name}"), "variable names are letters, digits and _");
            }
        }
        let package_path = cfg.package_path.clone().unwrap_or_else(|| "lua/?.lua;lua/lib/?.lua".to_string());
        let package_path = package_path
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| if Path::new(p).is_absolute() { p.to_string() } else { self.dir.join(p).display().to_string() })
            .chain(std::iter::once(";".to_string()))
            .collect::<Vec<_>>()
            .join(";");
        LuaSettings {
            package_path,
            shared_dicts,
            init_worker: cfg.init_worker.as_deref().and_then(|v| self.script(checker, "lua.init_worker", v)),
            time_budget: self.duration("lua.time_budget", cfg.time_budget.as_deref(), Duration::from_secs(1)),
            memory_limit: self.size("lua.memory_limit", cfg.memory_limit.as_ref(), 256 << 20) as usize,
            grants,
            variables: cfg.variables.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            prefix: format!("{}/", self.dir.display()),
        }
    }

    /// A route path must start with `/` and be one a normalised request path
    /// can have (`protocol::uri`): no `.` or `..` segment (a prefix may end in
    /// one: `/a/.` is a prefix of `/a/.b`) and, with merge_slashes, no `//`.
    /// Otherwise it could never match, and a rule meant to guard it would guard nothing.
    fn check_path(&mut self, key: &str, p: &str, exact: bool, merge_slashes: bool) {
        if !p.starts_with('/') {
            self.err(key, format!("{p:?} must start with /"));
            return;
        }
        let segments: Vec<&str> = p[1..].split('/').collect();
        let last = segments.len() - 1;
        let dot = segments.iter().enumerate().any(|(i, s)| (*s == "." || *s == "..") && (exact || i < last));
        let double = merge_slashes && p.contains("//");
        if dot || double {
            self.err(
                key,
                format!(
                    "{p:?} can never match: routes see the normalised path (dot segments resolved{}); write it normalised",
                    if merge_slashes { ", slashes merged" } else { "" }
                ),
            );
        }
    }

    fn ret(&mut self, key: &str, ret: &super::file::ReturnCfg) -> Option<Action> {
        let Ok(status) = StatusCode::from_u16(ret.status) else {
            self.err(format!("{key}.status"), format!("{} is not an HTTP status", ret.status));
            return None;
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &ret.headers {
            match (HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()), HeaderValue::from_str(v)) {
                (Ok(k), Ok(v)) => {
                    headers.append(k, v);
                }
                _ => self.err(format!("{key}.headers.{k}"), "not a valid header"),
            }
        }
        Some(Action::Return { status, headers, body: Bytes::from(ret.body.clone()) })
    }
}

/// regex errors span several lines; a config error is one.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(yaml: &str) -> Snapshot {
        let cfg: FileConfig = serde_yaml_ng::from_str(yaml).expect("yaml");
        match compile(cfg, Path::new("/tmp/luagate-test.yaml")) {
            Ok(s) => s,
            Err(f) => panic!("{:?}", f.errors),
        }
    }

    #[test]
    fn connection_limits_default_to_nginx_values() {
        let snap = compiled(
            "listen: [ { addr: \"127.0.0.1:1\" } ]\nupstreams: { a: { peers: [ { addr: \"127.0.0.1:2\" } ] } }\n",
        );
        let l = &snap.limits;
        assert_eq!(l.header_read_timeout, Duration::from_secs(30));
        assert_eq!(l.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(l.send_timeout, Duration::from_secs(60));
        assert_eq!(l.http2_max_concurrent_streams, 128);
        assert_eq!(l.worker_connections, 10240);
        assert_eq!((l.http2_send_buffer, l.http2_recv_window), (1 << 20, 1 << 20));
        let a = &snap.upstreams["a"].conns;
        assert_eq!((a.max, a.queue_timeout), (1024, Duration::from_secs(10)));
    }

    #[test]
    fn connection_limits_are_read() {
        let snap = compiled(
            "listen: [ { addr: \"127.0.0.1:1\" } ]\n\
             limits: { keepalive_timeout: 5s, send_timeout: 2s, worker_connections: 9, http2_max_concurrent_streams: 3, http2_send_buffer: 64k, http2_recv_window: 128k }\n\
             upstreams: { a: { peers: [ { addr: \"127.0.0.1:2\" } ], max_conns: 0, queue_timeout: 250ms } }\n",
        );
        let l = &snap.limits;
        assert_eq!((l.keepalive_timeout, l.send_timeout), (Duration::from_secs(5), Duration::from_secs(2)));
        assert_eq!((l.worker_connections, l.http2_max_concurrent_streams), (9, 3));
        assert_eq!((l.http2_send_buffer, l.http2_recv_window), (64 << 10, 128 << 10));
        let a = &snap.upstreams["a"].conns;
        assert_eq!((a.max, a.queue_timeout), (0, Duration::from_millis(250)));
    }
}
