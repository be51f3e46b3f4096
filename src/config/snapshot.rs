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
    pub workers: usize,
    pub pid_file: Option<PathBuf>,
    pub error_level: tracing::Level,
    pub access_log: AccessLogTarget,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// nginx's `merge_slashes`: runs of `/` in the request path count as one
    /// when the path is normalised (`protocol::uri::normalize`).
    pub merge_slashes: bool,
    pub limits: Limits,
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

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_size: usize,
    pub client_max_body_size: u64,
    pub header_read_timeout: Duration,
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
