//! Compiling a route's `rate_limit`, `concurrency_limit` and `mirror`, the
//! top-level `limit_zones` and `redis` (kept apart from the rest of
//! `compile` so the resilience settings read as one piece).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use super::Compiler;
use crate::config::file::{ConcurrencyLimits, FileConfig, MirrorCfg, RateLimitCfg, RateLimits, ZoneCfg};
use crate::config::units;
use crate::limit::redis::RedisConfig;
use crate::limit::zone::{self, MIN_SIZE};
use crate::limit::{Bucket, Cluster, ConnLimit, OnError, ReqLimit, RouteLimits, ONE};
use crate::phase::variable::Variable;
use crate::upstream::mirror::{Mirror, MirrorStats};
use crate::upstream::Upstream;

/// A zone a route names without declaring it in `limit_zones`, or its own.
const DEFAULT_ZONE_SIZE: usize = 10 << 20;

/// What the compiler keeps between routes.
#[derive(Default)]
pub struct LimitCtx {
    /// Declared zones: name → size.
    zones: HashMap<String, usize>,
    /// Which kind of limit uses a zone (a zone holds one kind).
    kinds: HashMap<String, &'static str>,
    redis: Option<Arc<RedisConfig>>,
}

impl Compiler {
    pub(super) fn limit_ctx(&mut self, cfg: &FileConfig) -> LimitCtx {
        let mut ctx = LimitCtx::default();
        for (name, z) in &cfg.limit_zones {
            let key = format!("limit_zones.{name}");
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                self.err(&key, "zone names are letters, digits, _ and -");
            }
            let size = match z {
                ZoneCfg::Size(s) => units::size(s),
                ZoneCfg::Full(f) => units::size(&f.size),
            };
            match size {
                Ok(n) if n >= MIN_SIZE as u64 => {
                    ctx.zones.insert(name.clone(), n as usize);
                    // Lua limiters find declared zones by name, used by a route or not.
                    zone::registry(name, n as usize);
                }
                Ok(_) => self.err(&key, format!("a limit zone needs at least {}k", MIN_SIZE >> 10)),
                Err(e) => self.err(&key, e),
            }
        }
        if let Some(r) = &cfg.redis {
            let addr =
                r.addr.parse().map_err(|_| self.err("redis.addr", format!("{:?} is not an IP:port address", r.addr)));
            let timeout = self.duration("redis.timeout", r.timeout.as_deref(), Duration::from_millis(5));
            let connect_timeout =
                self.duration("redis.connect_timeout", r.connect_timeout.as_deref(), Duration::from_millis(200));
            let retry = self.duration("redis.retry", r.retry.as_deref(), Duration::from_secs(1));
            if timeout.is_zero() {
                self.err("redis.timeout", "must be above 0");
            }
            if let Ok(addr) = addr {
                ctx.redis = Some(Arc::new(RedisConfig {
                    addr,
                    timeout,
                    connect_timeout,
                    retry,
                    password: r.password.clone(),
                    db: r.db.unwrap_or(0),
                    prefix: r.prefix.clone().unwrap_or_else(|| "luagate:".to_string()),
                }));
            }
        }
        ctx
    }

    fn limit_status(&mut self, key: &str, v: Option<u16>, default: StatusCode) -> StatusCode {
        match v {
            None => default,
            Some(s @ 400..=599) => StatusCode::from_u16(s).unwrap_or(default),
            Some(s) => {
                self.err(key, format!("{s} is not a status from 400 to 599"));
                default
            }
        }
    }

    fn limit_key(&mut self, key: &str, v: Option<&str>, cfg: &FileConfig) -> Option<Variable> {
        let v = v.unwrap_or("$remote_addr");
        Variable::parse_with(v, |n| cfg.lua.variables.contains_key(n)).map_err(|e| self.err(key, e)).ok()
    }

    /// The zone a limit uses: a declared one, or one of its own named after the route.
    fn limit_zone(
        &mut self,
        ctx: &mut LimitCtx,
        key: &str,
        named: Option<&str>,
        own: String,
        kind: &'static str,
    ) -> Option<Arc<zone::Zone>> {
        let (name, size) = match named {
            Some(n) => match ctx.zones.get(n) {
                Some(size) => (n.to_string(), *size),
                None => {
                    self.err(
                        format!("{key}.zone"),
                        format!("no limit zone is named {n:?} (declare it in limit_zones)"),
                    );
                    return None;
                }
            },
            None => (own, DEFAULT_ZONE_SIZE),
        };
        match ctx.kinds.insert(name.clone(), kind) {
            Some(other) if other != kind => {
                self.err(
                    format!("{key}.zone"),
                    format!("zone {name:?} is used by a {other} already: a zone holds one kind"),
                );
                None
            }
            _ => Some(zone::registry(&name, size)),
        }
    }

    fn rate_limit(
        &mut self,
        ctx: &mut LimitCtx,
        key: &str,
        l: &RateLimitCfg,
        own_zone: String,
        cfg: &FileConfig,
    ) -> Option<ReqLimit> {
        let rate = crate::limit::parse_rate(&l.rate).map_err(|e| self.err(format!("{key}.rate"), e)).ok();
        let burst = l.burst.unwrap_or(0);
        if burst > 1_000_000 {
            self.err(format!("{key}.burst"), "burst is at most 1000000");
        }
        let delay = match (l.nodelay, l.delay) {
            (Some(true), Some(_)) => {
                self.err(format!("{key}.delay"), "use nodelay or delay, not both");
                0
            }
            (Some(true), None) => burst,
            (_, Some(d)) if d > burst => {
                self.err(format!("{key}.delay"), format!("delay {d} is above burst {burst}"));
                0
            }
            (_, Some(d)) => d,
            (_, None) => 0,
        };
        let status = self.limit_status(&format!("{key}.status"), l.status, StatusCode::TOO_MANY_REQUESTS);
        let var = self.limit_key(&format!("{key}.key"), l.key.as_deref(), cfg);
        let cluster = match (l.cluster.unwrap_or(false), &ctx.redis) {
            (false, _) => {
                if l.on_error.is_some() {
                    self.err(format!("{key}.on_error"), "on_error applies to cluster limits (cluster: true)");
                }
                None
            }
            (true, None) => {
                self.err(format!("{key}.cluster"), "a cluster limit needs the top-level `redis:` settings");
                None
            }
            (true, Some(redis)) => {
                let on_error = match l.on_error.as_deref().unwrap_or("local") {
                    "local" => OnError::Local,
                    "allow" => OnError::Allow,
                    "deny" => OnError::Deny,
                    other => {
                        self.err(
                            format!("{key}.on_error"),
                            format!("unknown behaviour {other:?} (local, allow, deny)"),
                        );
                        OnError::Local
                    }
                };
                Some(Cluster { redis: Arc::clone(redis), on_error })
            }
        };
        let zone = self.limit_zone(ctx, key, l.zone.as_deref(), own_zone, "rate_limit");
        Some(ReqLimit {
            zone: zone?,
            key: var?,
            bucket: Bucket { rate: rate?, burst: burst * ONE },
            delay: delay.saturating_mul(ONE),
            status,
            dry_run: l.dry_run.unwrap_or(false),
            cluster,
        })
    }

    pub(super) fn route_limits(
        &mut self,
        ctx: &mut LimitCtx,
        key: &str,
        route_name: &str,
        rate: Option<&RateLimits>,
        conn: Option<&ConcurrencyLimits>,
        cfg: &FileConfig,
    ) -> Option<Box<RouteLimits>> {
        if rate.is_none() && conn.is_none() {
            return None;
        }
        let mut limits = RouteLimits::default();
        let rates: Vec<&RateLimitCfg> = match rate {
            None => Vec::new(),
            Some(RateLimits::One(l)) => vec![l],
            Some(RateLimits::Many(v)) => v.iter().collect(),
        };
        let many = matches!(rate, Some(RateLimits::Many(_)));
        if rates.len() > crate::limit::MAX_LIMITS {
            self.err(format!("{key}.rate_limit"), format!("at most {} rate limits", crate::limit::MAX_LIMITS));
        }
        for (j, l) in rates.into_iter().enumerate() {
            let lkey = if many { format!("{key}.rate_limit[{j}]") } else { format!("{key}.rate_limit") };
            if let Some(l) = self.rate_limit(ctx, &lkey, l, format!("{route_name}/rate_limit[{j}]"), cfg) {
                limits.req.push(l);
            }
        }
        let conns: Vec<_> = match conn {
            None => Vec::new(),
            Some(ConcurrencyLimits::One(l)) => vec![l],
            Some(ConcurrencyLimits::Many(v)) => v.iter().collect(),
        };
        let many = matches!(conn, Some(ConcurrencyLimits::Many(_)));
        if conns.len() > crate::limit::MAX_LIMITS {
            self.err(
                format!("{key}.concurrency_limit"),
                format!("at most {} concurrency limits", crate::limit::MAX_LIMITS),
            );
        }
        for (j, l) in conns.into_iter().enumerate() {
            let lkey = if many { format!("{key}.concurrency_limit[{j}]") } else { format!("{key}.concurrency_limit") };
            if l.max == 0 {
                self.err(format!("{lkey}.max"), "max is at least 1");
            }
            let status = self.limit_status(&format!("{lkey}.status"), l.status, StatusCode::TOO_MANY_REQUESTS);
            let var = self.limit_key(&format!("{lkey}.key"), l.key.as_deref(), cfg);
            let own = format!("{route_name}/concurrency_limit[{j}]");
            let zone = self.limit_zone(ctx, &lkey, l.zone.as_deref(), own, "concurrency_limit");
            if let (Some(zone), Some(key)) = (zone, var) {
                limits.conn.push(ConnLimit { zone, key, max: l.max, status, dry_run: l.dry_run.unwrap_or(false) });
            }
        }
        Some(Box::new(limits))
    }

    pub(super) fn mirror(
        &mut self,
        key: &str,
        m: Option<&MirrorCfg>,
        upstreams: &HashMap<String, Arc<Upstream>>,
        cfg: &FileConfig,
    ) -> Option<Arc<Mirror>> {
        let m = m?;
        let key = format!("{key}.mirror");
        let upstream = match upstreams.get(&m.upstream) {
            Some(u) => Some(Arc::clone(u)),
            None if cfg.upstreams.contains_key(&m.upstream) => None,
            None => {
                self.err(format!("{key}.upstream"), format!("no upstream is named {:?}", m.upstream));
                None
            }
        };
        let percent = m.percent.unwrap_or(100.0);
        if !(0.0..=100.0).contains(&percent) {
            self.err(format!("{key}.percent"), "a percentage from 0 to 100");
        }
        let body_limit = self.size(&format!("{key}.body_limit"), m.body_limit.as_ref(), 64 << 10) as usize;
        let max_in_flight = m.max_in_flight.unwrap_or(64);
        if max_in_flight == 0 {
            self.err(format!("{key}.max_in_flight"), "at least 1");
        }
        let timeout = self.duration(&format!("{key}.timeout"), m.timeout.as_deref(), Duration::from_secs(10));
        Some(Arc::new(Mirror {
            upstream: upstream?,
            percent,
            body_limit,
            max_in_flight,
            timeout,
            stats: Arc::new(MirrorStats::default()),
        }))
    }
}
