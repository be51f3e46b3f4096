//! The compiled, immutable configuration. One `Arc<Snapshot>` is published
//! through `reload::current()`; each request loads it once and keeps it to its
//! end, so a reload never changes a request halfway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::route::RouteTable;
use crate::upstream::Upstream;

pub struct Snapshot {
    /// 1 for the first config, +1 for each successful reload.
    pub generation: u64,
    pub source: PathBuf,
    /// The first 16 hex digits of the config file's SHA-256, as it was read:
    /// logged on every swap, so an operator (or a test) can tell which file
    /// content is live.
    pub digest: String,
    pub workers: usize,
    pub pid_file: Option<PathBuf>,
    pub error_level: tracing::Level,
    pub access_log: AccessLogTarget,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// nginx's `merge_slashes`: runs of `/` in the request path count as one
    /// when the path is normalised (`protocol::uri::normalize`).
    pub merge_slashes: bool,
    pub limits: Arc<Limits>,
    /// Request headers with `_` in their name are kept (else dropped before routing).
    pub underscores_in_headers: bool,
    pub listeners: Vec<Arc<Listener>>,
    pub routes: Vec<Arc<Route>>,
    pub table: RouteTable,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub lua: crate::lua::Settings,
    /// Files besides the config itself whose change triggers a reload (TLS certificates and keys).
    pub files: Vec<PathBuf>,
}

impl Snapshot {
    pub fn listener(&self, addr: SocketAddr) -> Option<&Arc<Listener>> {
        self.listeners.iter().find(|l| l.addr == addr)
    }

    /// `files`, canonicalized as the file watcher reports them.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())).collect()
    }

    /// True when `ip` is one of the configured trusted proxies.
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

/// Client-side limits and timeouts (`limits:`); docs/security.md lists each
/// with its nginx counterpart and what happens past it.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_size: usize,
    /// Most header fields in a request head (431 past it).
    pub max_headers: usize,
    pub client_max_body_size: u64,
    /// From accept to a complete first request head (TLS handshake included),
    /// and from the first byte of a later head to its end.
    pub header_read_timeout: Duration,
    /// An HTTP/1.1 connection between requests, an HTTP/2 connection without streams.
    pub keepalive_timeout: Duration,
    /// Longest a write to the client may wait (socket full, or an HTTP/2 stream without window).
    pub send_timeout: Duration,
    /// Client connections per worker.
    pub worker_connections: usize,
    pub http2_max_concurrent_streams: u32,
    /// Response bytes an HTTP/2 connection may hold that the client has not taken yet.
    pub http2_send_buffer: usize,
    /// The receive window of an HTTP/2 connection (and of each of its streams).
    pub http2_recv_window: u32,
    /// Longest wait for the next piece of a request body (408 past it).
    pub client_body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_size: 16 << 10,
            client_max_body_size: 1 << 20,
            header_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            worker_connections: 10240,
            http2_max_concurrent_streams: 128,
            http2_send_buffer: 1 << 20,
            http2_recv_window: 1 << 20,
            client_body_timeout: Duration::from_secs(60),
            max_headers: 100,
        }
    }
}

pub struct Listener {
    pub addr: SocketAddr,
    pub name: String,
    pub http1: bool,
    pub h2c: bool,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

pub struct Route {
    pub name: Arc<str>,
    pub action: Action,
    /// `None` passes the client's Host through.
    pub host_header: Option<HeaderValue>,
    /// Whole-request deadline; also caps a gRPC client's `grpc-timeout`.
    pub timeout: Option<Duration>,
    /// 0 = no limit.
    pub client_max_body_size: u64,
    /// Peers to try in all when connecting fails (1 = no retry).
    pub tries: u32,
    /// WebSocket upgrades (HTTP/1.1 Upgrade, HTTP/2 extended CONNECT) are proxied.
    pub websocket: bool,
    /// Phase scripts, if the route has any.
    pub lua: Option<Arc<crate::lua::RouteLua>>,
    /// Rate and concurrency limits (the preaccess phase, `phase::limit`).
    pub limits: Option<Box<crate::limit::RouteLimits>>,
    /// A shadow upstream that gets a copy of sampled requests.
    pub mirror: Option<Arc<crate::upstream::mirror::Mirror>>,
}

pub enum Action {
    Proxy(Arc<Upstream>),
    /// The route's `lua.content` script answers.
    Content,
    Return {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}
