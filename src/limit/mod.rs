//! Rate and concurrency limits: nginx's `limit_req` (a leaky bucket per key,
//! with burst, nodelay and two-stage delay) and `limit_conn` (requests in
//! flight per key), local to the process or, for rate limits, shared by
//! several luagate instances through Redis.
//!
//! * [`zone`]: the state, a bounded sharded map shared by all workers;
//! * [`fds`]: the process's file-descriptor budget, shared by the layers that
//!   open connections (client accepts, upstream connects);
//! * [`redis`]: the cluster-wide bucket (one Lua script call per decision);
//! * the compiled per-route settings live here ([`RouteLimits`]); the phase
//!   that applies them before the access phase is `phase::limit`, and Lua
//!   reaches the same zones through `luagate.limit` (`lua::ngx::limit`).

pub mod fds;
pub mod redis;
pub mod zone;

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use http::StatusCode;

pub use zone::{Bucket, ReqDecision, Zone, ZoneError, ONE};

use crate::phase::variable::Variable;

/// Microseconds on a process-wide monotonic clock (the local zones' time).
pub fn now_us() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Most limits of each kind a route may have.
pub const MAX_LIMITS: usize = 16;

/// A rate as nginx writes it (`10r/s`, `600r/m`), in milli-requests per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid rate {s:?} (use N r/s or N r/m, e.g. 10r/s)");
    let t = s.trim();
    let (n, per_minute) = if let Some(n) = t.strip_suffix("r/s") {
        (n, false)
    } else if let Some(n) = t.strip_suffix("r/m") {
        (n, true)
    } else {
        return Err(bad());
    };
    let n: u64 = n.trim().parse().map_err(|_| bad())?;
    let milli = if per_minute { n.saturating_mul(ONE) / 60 } else { n.saturating_mul(ONE) };
    if milli == 0 {
        return Err(format!("rate {s:?} is zero: the slowest is 1r/m"));
    }
    if milli > 1_000_000 * ONE {
        return Err(format!("rate {s:?} is above 1000000r/s"));
    }
    Ok(milli)
}

/// What a cluster limit does when Redis does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Admit the request.
    Allow,
    /// Reject it, as if over the limit.
    Deny,
    /// Decide with this instance's own zone (the same bucket, counting only this instance's requests).
    Local,
}

/// A rate limit of a route (`rate_limit`), nginx's `limit_req`.
pub struct ReqLimit {
    pub zone: Arc<Zone>,
    pub key: Variable,
    pub bucket: Bucket,
    /// Excess (milli-requests) admitted without delay: 0 by default, the burst with nodelay.
    pub delay: u64,
    pub status: StatusCode,
    pub dry_run: bool,
    /// Decided on Redis, shared with other instances.
    pub cluster: Option<Cluster>,
}

pub struct Cluster {
    pub redis: Arc<redis::RedisConfig>,
    pub on_error: OnError,
}

/// A concurrency limit of a route (`concurrency_limit`), nginx's `limit_conn`.
pub struct ConnLimit {
    pub zone: Arc<Zone>,
    pub key: Variable,
    pub max: u64,
    pub status: StatusCode,
    pub dry_run: bool,
}

/// A route's limits, in the order they apply: rate limits, then concurrency limits.
#[derive(Default)]
pub struct RouteLimits {
    pub req: Vec<ReqLimit>,
    pub conn: Vec<ConnLimit>,
}

/// One request counted in a concurrency zone, until dropped (the request ended).
pub struct ConnGuard {
    zone: Arc<Zone>,
    key: Box<[u8]>,
}

impl ConnGuard {
    pub fn new(zone: Arc<Zone>, key: &[u8]) -> Self {
        Self { zone, key: key.into() }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let _ = self.zone.conn_release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10r/s"), Ok(10_000));
        assert_eq!(parse_rate(" 30r/m"), Ok(500));
        assert_eq!(parse_rate("1r/m"), Ok(16));
        assert!(parse_rate("0r/s").is_err());
        assert!(parse_rate("10/s").is_err());
        assert!(parse_rate("ten r/s").is_err());
    }
}
