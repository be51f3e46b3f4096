//! The YAML file as serde sees it: plain structs mirroring the keys, with
//! `deny_unknown_fields` so a typo is an error. Values stay loosely typed
//! (strings for durations, sizes, addresses) and are checked in `compile`,
//! where each error gets its key path and so its line.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub workers: Option<Scalar>,
    #[serde(default)]
    pub pid_file: Option<String>,
    #[serde(default)]
    pub error_log: ErrorLogCfg,
    #[serde(default)]
    pub access_log: AccessLogCfg,
    #[serde(default)]
    pub shutdown: ShutdownCfg,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// nginx's `merge_slashes`: `//` in a request path counts as `/` (default true).
    #[serde(default)]
    pub merge_slashes: Option<bool>,
    /// Accept request headers whose name has an `_` (nginx's `underscores_in_headers`).
    #[serde(default)]
    pub underscores_in_headers: bool,
    #[serde(default)]
    pub limits: LimitsCfg,
    #[serde(default)]
    pub timeouts: TimeoutsCfg,
    pub listen: Vec<ListenCfg>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamCfg>,
    #[serde(default)]
    pub routes: Vec<RouteCfg>,
    #[serde(default)]
    pub lua: LuaCfg,
    /// Named limit zones (nginx's `limit_req_zone` / `limit_conn_zone`): NAME: SIZE or NAME: { size }.
    #[serde(default)]
    pub limit_zones: BTreeMap<String, ZoneCfg>,
    /// The Redis that cluster-wide rate limits share.
    #[serde(default)]
    pub redis: Option<RedisCfg>,
}

/// A limit zone: its size (`10m`), or `{ size: 10m }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ZoneCfg {
    Size(Scalar),
    Full(ZoneFullCfg),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneFullCfg {
    pub size: Scalar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisCfg {
    pub addr: String,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub retry: Option<String>,
    pub password: Option<String>,
    pub db: Option<u32>,
    pub prefix: Option<String>,
}

/// `rate_limit` of a route: one limit or a list (nginx allows several `limit_req`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RateLimits {
    One(RateLimitCfg),
    Many(Vec<RateLimitCfg>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitCfg {
    pub rate: String,
    pub key: Option<String>,
    pub burst: Option<u64>,
    pub nodelay: Option<bool>,
    pub delay: Option<u64>,
    pub status: Option<u16>,
    pub dry_run: Option<bool>,
    pub zone: Option<String>,
    pub cluster: Option<bool>,
    pub on_error: Option<String>,
}

/// `concurrency_limit` of a route: one limit or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ConcurrencyLimits {
    One(ConcurrencyCfg),
    Many(Vec<ConcurrencyCfg>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyCfg {
    pub max: u64,
    pub key: Option<String>,
    pub status: Option<u16>,
    pub dry_run: Option<bool>,
    pub zone: Option<String>,
}

/// `mirror` of a route: a sampled copy of requests to a shadow upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorCfg {
    pub upstream: String,
    pub percent: Option<f64>,
    pub body_limit: Option<Scalar>,
    pub max_in_flight: Option<usize>,
    pub timeout: Option<String>,
}

/// Global Lua settings (`lua:`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuaCfg {
    pub package_path: Option<String>,
    #[serde(default)]
    pub shared_dicts: BTreeMap<String, Scalar>,
    pub init_worker: Option<String>,
    /// Longest a script may run without yielding.
    pub time_budget: Option<String>,
    /// Memory ceiling of each worker's Lua state.
    pub memory_limit: Option<Scalar>,
    /// Sandbox grants: os_execute, io_popen (native_modules is refused).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Variables scripts may set with `ngx.var.NAME = v` (nginx's `set $NAME`), with their initial value.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

/// Per-route phase scripts (`routes[i].lua`): a file path ending in .lua, or inline code.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLuaCfg {
    pub rewrite: Option<String>,
    pub access: Option<String>,
    pub content: Option<String>,
    pub balancer: Option<String>,
    pub header_filter: Option<String>,
    pub body_filter: Option<String>,
    pub log: Option<String>,
}

/// A YAML scalar that may be written as a number or a string (`16k`, `auto`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Int(u64),
    Str(String),
}

/// A YAML value that may be one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorLogCfg {
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogCfg {
    pub path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownCfg {
    pub grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsCfg {
    pub max_header_size: Option<Scalar>,
    pub max_headers: Option<usize>,
    pub client_max_body_size: Option<Scalar>,
    pub header_read_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub worker_connections: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub http2_send_buffer: Option<Scalar>,
    pub http2_recv_window: Option<Scalar>,
    pub client_body_timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsCfg {
    pub connect: Option<String>,
    pub send: Option<String>,
    pub read: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenCfg {
    pub addr: String,
    pub name: Option<String>,
    pub protocols: Option<Vec<String>>,
    pub tls: Option<TlsCfg>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCfg {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamCfg {
    pub lb: Option<String>,
    pub hash_key: Option<String>,
    pub protocol: Option<String>,
    pub peers: Vec<PeerCfg>,
    #[serde(default)]
    pub keepalive: KeepaliveCfg,
    #[serde(default)]
    pub timeouts: TimeoutsCfg,
    /// Connections per peer and worker (0 = no limit).
    pub max_conns: Option<usize>,
    /// How long a request waits for a connection past `max_conns`.
    pub queue_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerCfg {
    pub addr: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveCfg {
    pub max_idle: Option<usize>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCfg {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matches: MatchCfg,
    pub upstream: Option<String>,
    #[serde(rename = "return")]
    pub ret: Option<ReturnCfg>,
    pub host_header: Option<String>,
    pub timeout: Option<String>,
    pub client_max_body_size: Option<Scalar>,
    pub retry: Option<RetryCfg>,
    pub websocket: Option<bool>,
    pub lua: Option<RouteLuaCfg>,
    pub rate_limit: Option<RateLimits>,
    pub concurrency_limit: Option<ConcurrencyLimits>,
    pub mirror: Option<MirrorCfg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchCfg {
    pub listener: Option<String>,
    pub host: Option<OneOrMany>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub stop_regex: Option<bool>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, String>>,
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReturnCfg {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryCfg {
    pub tries: Option<u32>,
}
