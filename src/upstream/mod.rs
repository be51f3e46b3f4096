//! Upstreams: a named set of peers with a balancing policy, timeouts and
//! keepalive settings (compiled per snapshot), plus what lives longer than a
//! snapshot — per-peer statistics (`PeerStats`, shared by all workers and kept
//! across reloads) and each worker's connection pool.

pub mod balancer;
pub mod call;
pub mod mirror;
pub mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use balancer::{Balancer, Peer, PeerStats};

use crate::phase::variable::Variable;

/// How luagate speaks to an upstream's peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 with a keepalive pool.
    Http1,
    /// HTTP/2 prior knowledge, one multiplexed connection per peer and worker.
    H2c,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Longest the upstream leaves a request body frame untaken (nginx's
    /// `proxy_send_timeout`: between two writes, not for the whole body).
    pub send: Duration,
    /// Longest wait for the response head once the request has been sent
    /// (nginx's `proxy_read_timeout`), and between two response body frames.
    pub read: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

/// How many connections a worker may hold to each peer (nginx's `max_conns`
/// without a shared zone), and how long a request waits for one past that
/// before it is answered 503 (gRPC UNAVAILABLE).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimit {
    /// 0 = no limit.
    pub max: usize,
    pub queue_timeout: Duration,
}

impl Default for ConnLimit {
    fn default() -> Self {
        Self { max: 1024, queue_timeout: Duration::from_secs(10) }
    }
}

pub struct Upstream {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub peers: Vec<Peer>,
    pub balancer: Balancer,
    pub hash_key: Option<Variable>,
    pub keepalive: Keepalive,
    pub timeouts: Timeouts,
    pub conns: ConnLimit,
}

/// The statistics of the peer at `addr`: the same `Arc` for as long as any
/// snapshot names that address, so in-flight counts and latency survive reloads.
pub fn peer_stats(addr: SocketAddr) -> Arc<PeerStats> {
    static REGISTRY: OnceLock<Mutex<HashMap<SocketAddr, Weak<PeerStats>>>> = OnceLock::new();
    let mut map = REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(stats) = map.get(&addr).and_then(Weak::upgrade) {
        return stats;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let stats = Arc::new(PeerStats::new());
    map.insert(addr, Arc::downgrade(&stats));
    stats
}
