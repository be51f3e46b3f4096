//! The preaccess phase: a route's rate limits (`rate_limit`, nginx's
//! `limit_req`) and concurrency limits (`concurrency_limit`, `limit_conn`).
//!
//! As in nginx, it runs after rewrite and before access (Lua's `access`
//! script sees only admitted requests; a key may be a variable the rewrite
//! script set). Rate limits come first: a request they reject takes no
//! concurrency slot. Local rate limits decide as nginx does with several
//! `limit_req`: all are checked, the request is counted in each only if none
//! rejects it. Cluster limits (Redis) decide next, one round trip each,
//! counting the request when they admit it. A request admitted over a limit's
//! `delay` waits (the largest delay of its limits) before going on.
//! A concurrency slot is held until the response body ends or is dropped.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::respond;
use super::variable::Variable;
use crate::limit::{redis, ConnGuard, OnError, ReqDecision, ReqLimit, RouteLimits, ONE};
use crate::observe::access_log::LogRecord;
use crate::protocol::grpc::Code;

/// Where limit keys come from: the request, the client address, and the variables scripts set.
pub struct KeySource<'a> {
    pub parts: &'a Parts,
    pub client: IpAddr,
    /// Values scripts set (`ngx.var.NAME = v`), for routes with Lua.
    pub vars: Option<&'a HashMap<String, String>>,
    /// Declared variables and their initial values (`lua.variables`).
    pub declared: &'a [(String, String)],
}

impl KeySource<'_> {
    /// Calls `f` with the key `var` names for this request (None: unset), copying nothing
    /// for addresses, headers and the like.
    pub fn with_key<R>(&self, var: &Variable, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        match var {
            Variable::RemoteAddr => {
                let mut buf = [0u8; 48];
                let n = match self.client {
                    IpAddr::V4(a) => dotted(a.octets(), &mut buf),
                    IpAddr::V6(a) => {
                        let mut w = &mut buf[..];
                        let _ = write!(w, "{a}");
                        48 - w.len()
                    }
                };
                f(Some(&buf[..n]))
            }
            Variable::BinaryRemoteAddr => match self.client {
                IpAddr::V4(a) => f(Some(&a.octets())),
                IpAddr::V6(a) => f(Some(&a.octets())),
            },
            Variable::Declared(name) => {
                let set = self.vars.and_then(|v| v.get(name));
                let value = set.or_else(|| self.declared.iter().find(|(k, _)| k == name).map(|(_, v)| v));
                f(value.map(|v| v.as_bytes()))
            }
            other => f(other.eval(self.parts, self.client).as_deref()),
        }
    }
}

/// An IPv4 address as text into `buf` (what `Display` writes, without the formatting machinery).
fn dotted(octets: [u8; 4], buf: &mut [u8; 48]) -> usize {
    let mut n = 0;
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    n
}

/// What the synchronous part decided.
pub enum Decision {
    Reject(Rejection),
    Pass(Pending),
}

/// An admitted request's rest: cluster limits to ask, the wait, the slots it holds.
#[derive(Default)]
pub struct Pending {
    cluster: Vec<(usize, Vec<u8>)>,
    delay_us: u64,
    guards: Vec<ConnGuard>,
    client: Option<IpAddr>,
}

pub struct Rejection {
    status: StatusCode,
    /// For `Retry-After` (µs), when known.
    retry_after_us: Option<u64>,
    code: Code,
    message: &'static str,
    zone: std::sync::Arc<str>,
}

/// The request's concurrency slots, released when dropped.
pub struct Held(#[allow(dead_code)] Vec<ConnGuard>);

fn milli(v: u64) -> String {
    format!("{}.{:03}", v / ONE, v % ONE)
}

/// The local part: local rate limits decided and counted, concurrency slots
/// taken; cluster keys copied for [`complete`]. No await: `src` may borrow
/// the request from a Lua state that other tasks of the request use.
pub fn decide(limits: &RouteLimits, src: &KeySource<'_>, route: &str) -> Decision {
    let now = crate::limit::now_us();
    let mut pending = Pending { client: Some(src.client), ..Pending::default() };
    // Every local limit but the last is only checked; the last one counts at once if it admits
    // (nginx's order). No allocation: `admitted` marks the limits checked so far (a route has
    // at most `limit::MAX_LIMITS`).
    let last = limits.req.iter().rposition(|l| l.cluster.is_none());
    let mut admitted: u32 = 0;
    for (i, l) in limits.req.iter().enumerate().filter(|(_, l)| l.cluster.is_none()) {
        let commit = Some(i) == last;
        let verdict = src.with_key(&l.key, |key| {
            let key = key.filter(|k| !k.is_empty())?;
            Some(l.zone.req(key, l.bucket, commit, now))
        });
        match verdict {
            None => {}
            Some(Ok(d)) if d.admitted => {
                admitted |= 1 << i;
                if commit {
                    pending.delay_us = pending.delay_us.max(delay_us(l, d.excess));
                }
            }
            Some(Ok(d)) if l.dry_run => {
                tracing::info!(target: "limit", route, zone = %l.zone.name, client = %src.client,
                    "limiting requests, dry run, excess: {} by zone {:?}", milli(d.excess), &*l.zone.name);
            }
            Some(Ok(d)) => {
                tracing::warn!(target: "limit", route, zone = %l.zone.name, client = %src.client,
                    "limiting requests, excess: {} by zone {:?}", milli(d.excess), &*l.zone.name);
                return Decision::Reject(rejected(l, Some(l.bucket.wait_us(d.excess))));
            }
            Some(Err(e)) => {
                tracing::error!(target: "limit", route, zone = %l.zone.name, error = %e, "rate limit zone refused the request");
                return Decision::Reject(rejected(l, None));
            }
        }
    }
    // None rejected: count the request in the limits only checked so far.
    for (i, l) in limits.req.iter().enumerate() {
        if admitted & (1 << i) == 0 || Some(i) == last {
            continue;
        }
        let counted = src.with_key(&l.key, |k| k.filter(|k| !k.is_empty()).map(|k| l.zone.req(k, l.bucket, true, now)));
        if let Some(Ok(d)) = counted {
            pending.delay_us = pending.delay_us.max(delay_us(l, d.excess));
        }
    }
    if pending.delay_us > 0 {
        tracing::info!(target: "limit", route, client = %src.client, "delaying request for {}ms", pending.delay_us / 1000);
    }
    for (i, l) in limits.req.iter().enumerate().filter(|(_, l)| l.cluster.is_some()) {
        if let Some(key) = src.with_key(&l.key, |k| k.filter(|k| !k.is_empty()).map(<[u8]>::to_vec)) {
            pending.cluster.push((i, key));
        }
    }
    for l in &limits.conn {
        let verdict = src.with_key(&l.key, |key| {
            let key = key.filter(|k| !k.is_empty())?;
            Some(l.zone.conn_acquire(key, l.max, true).map(|r| r.map(|_| ConnGuard::new(l.zone.clone(), key))))
        });
        match verdict {
            None => {}
            Some(Ok(Ok(guard))) => pending.guards.push(guard),
            Some(Ok(Err(count))) if l.dry_run => {
                tracing::info!(target: "limit", route, zone = %l.zone.name, client = %src.client, in_flight = count,
                    "limiting connections, dry run, by zone {:?}", &*l.zone.name);
            }
            Some(other) => {
                match other {
                    Err(e) => tracing::error!(target: "limit", route, zone = %l.zone.name, error = %e,
                        "concurrency zone refused the request"),
                    Ok(_) => tracing::warn!(target: "limit", route, zone = %l.zone.name, client = %src.client,
                        "limiting connections by zone {:?}", &*l.zone.name),
                }
                return Decision::Reject(Rejection {
                    status: l.status,
                    retry_after_us: None,
                    code: Code::ResourceExhausted,
                    message: "concurrency limit exceeded",
                    zone: l.zone.name.clone(),
                });
            }
        }
    }
    Decision::Pass(pending)
}

fn rejected(l: &ReqLimit, retry_after_us: Option<u64>) -> Rejection {
    Rejection {
        status: l.status,
        retry_after_us,
        code: Code::ResourceExhausted,
        message: "rate limit exceeded",
        zone: l.zone.name.clone(),
    }
}

/// nginx's delay: the excess above the limit's `delay`, drained at its rate.
fn delay_us(l: &ReqLimit, excess: u64) -> u64 {
    if l.dry_run || excess <= l.delay {
        return 0;
    }
    ((excess - l.delay) as u128 * 1_000_000 / l.bucket.rate.max(1) as u128) as u64
}

/// The rest: cluster limits (Redis, bounded waits), then the delay. The
/// request's concurrency slots, if any, or its rejection.
pub async fn complete(
    limits: &RouteLimits,
    decision: Decision,
    route: &str,
    is_grpc: bool,
    log: &mut Option<LogRecord>,
) -> Result<Option<Held>, Response<ResponseBody>> {
    let mut pending = match decision {
        Decision::Pass(p) => p,
        Decision::Reject(r) => return Err(reject_response(&r, is_grpc, log.take())),
    };
    let client = pending.client.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    for (i, key) in std::mem::take(&mut pending.cluster) {
        let l = &limits.req[i];
        let Some(cluster) = &l.cluster else { continue };
        let link = redis::link(&cluster.redis);
        let decided = match link.bucket(&l.zone.name, &key, l.bucket).await {
            Ok(d) => Some(d),
            Err(e) => {
                let level_warn = link.should_warn();
                let on_error = match cluster.on_error {
                    OnError::Allow => "allow",
                    OnError::Deny => "deny",
                    OnError::Local => "local",
                };
                if level_warn {
                    tracing::warn!(target: "limit", route, zone = %l.zone.name, error = %e, on_error,
                        "cluster limit without redis: {on_error}");
                } else {
                    tracing::debug!(target: "limit", route, zone = %l.zone.name, error = %e, on_error,
                        "cluster limit without redis: {on_error}");
                }
                match cluster.on_error {
                    OnError::Allow => None,
                    OnError::Deny => Some(ReqDecision { admitted: false, excess: l.bucket.burst + ONE }),
                    OnError::Local => l.zone.req(&key, l.bucket, true, crate::limit::now_us()).ok(),
                }
            }
        };
        let Some(d) = decided else { continue };
        if d.admitted {
            pending.delay_us = pending.delay_us.max(delay_us(l, d.excess));
        } else if l.dry_run {
            tracing::info!(target: "limit", route, zone = %l.zone.name, client = %client,
                "limiting requests, dry run, excess: {} by zone {:?}", milli(d.excess), &*l.zone.name);
        } else {
            tracing::warn!(target: "limit", route, zone = %l.zone.name, client = %client,
                "limiting requests, excess: {} by zone {:?}", milli(d.excess), &*l.zone.name);
            return Err(reject_response(&rejected(l, Some(l.bucket.wait_us(d.excess))), is_grpc, log.take()));
        }
    }
    if pending.delay_us > 0 {
        tokio::time::sleep(Duration::from_micros(pending.delay_us)).await;
    }
    Ok((!pending.guards.is_empty()).then(|| Held(pending.guards)))
}

/// The answer to a limited request: the status (default 429) with
/// `Retry-After`, or for gRPC RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`.
fn reject_response(r: &Rejection, is_grpc: bool, mut log: Option<LogRecord>) -> Response<ResponseBody> {
    if let Some(log) = &mut log {
        log.error = Some(format!("{} (zone {:?})", r.message, &*r.zone));
    }
    if is_grpc {
        let mut resp = respond::grpc_status(r.code as u32, r.message, log);
        if let Some(us) = r.retry_after_us {
            resp.headers_mut().insert("grpc-retry-pushback-ms", HeaderValue::from(us.div_ceil(1000).max(1)));
        }
        return resp;
    }
    if let Some(log) = &mut log {
        log.status = r.status.as_u16();
    }
    let body = respond::error_page(r.status).unwrap_or_default();
    let mut resp = Response::new(ResponseBody::full(body, log));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    if let Some(us) = r.retry_after_us {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(us.div_ceil(1_000_000).max(1)));
    }
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::limit::{Bucket, ConnLimit, Zone};

    fn parts() -> Parts {
        http::Request::builder().uri("/x").header("x-key", "k1").body(()).unwrap().into_parts().0
    }

    fn req_limit(zone: &Arc<Zone>, burst: u64, delay: u64) -> ReqLimit {
        ReqLimit {
            zone: Arc::clone(zone),
            key: Variable::parse("$http_x_key").unwrap(),
            bucket: Bucket { rate: ONE, burst: burst * ONE },
            delay: delay * ONE,
            status: StatusCode::TOO_MANY_REQUESTS,
            dry_run: false,
            cluster: None,
        }
    }

    fn src(p: &Parts) -> KeySource<'_> {
        KeySource { parts: p, client: "10.0.0.1".parse().unwrap(), vars: None, declared: &[] }
    }

    #[test]
    fn addresses_as_keys_read_as_nginx_prints_them() {
        let p = parts();
        for ip in ["10.0.0.1", "192.168.100.255", "0.0.0.0", "::1", "2001:db8::7"] {
            let src = KeySource { parts: &p, client: ip.parse().unwrap(), vars: None, declared: &[] };
            let got = src.with_key(&Variable::RemoteAddr, |k| k.map(<[u8]>::to_vec));
            assert_eq!(got.as_deref(), Some(ip.as_bytes()));
        }
    }

    #[test]
    fn a_request_rejected_by_one_limit_is_counted_in_none() {
        let (a, b) = (Arc::new(Zone::new("a", 1 << 20)), Arc::new(Zone::new("b", 1 << 20)));
        let limits = RouteLimits { req: vec![req_limit(&a, 5, 5), req_limit(&b, 0, 0)], conn: vec![] };
        let p = parts();
        assert!(matches!(decide(&limits, &src(&p), "r"), Decision::Pass(_)));
        // b (burst 0) rejects the second: a must not count it.
        assert!(matches!(decide(&limits, &src(&p), "r"), Decision::Reject(_)));
        let d = a.req(b"k1", Bucket { rate: ONE, burst: 5 * ONE }, false, crate::limit::now_us()).unwrap();
        assert!(d.excess < 2 * ONE, "{d:?}");
    }

    #[test]
    fn delay_is_the_excess_over_the_delay_threshold() {
        let z = Arc::new(Zone::new("z", 1 << 20));
        // rate 1r/s, burst 5, delay 2: excess 0..2 pass at once, 3 waits 1 s, 4 waits 2 s.
        let limits = RouteLimits { req: vec![req_limit(&z, 5, 2)], conn: vec![] };
        let p = parts();
        let delays: Vec<u64> = (0..5)
            .map(|_| match decide(&limits, &src(&p), "r") {
                Decision::Pass(p) => (p.delay_us + 500_000) / 1_000_000,
                Decision::Reject(_) => 99,
            })
            .collect();
        assert_eq!(delays, [0, 0, 0, 1, 2]);
    }

    #[test]
    fn concurrency_slots_are_released_with_the_guard() {
        let z = Arc::new(Zone::new("c", 1 << 20));
        let limits = RouteLimits {
            req: vec![],
            conn: vec![ConnLimit {
                zone: Arc::clone(&z),
                key: Variable::parse("$remote_addr").unwrap(),
                max: 1,
                status: StatusCode::SERVICE_UNAVAILABLE,
                dry_run: false,
            }],
        };
        let p = parts();
        let Decision::Pass(first) = decide(&limits, &src(&p), "r") else { panic!("first rejected") };
        assert_eq!(z.conn_count(b"10.0.0.1"), 1);
        let Decision::Reject(r) = decide(&limits, &src(&p), "r") else { panic!("second admitted") };
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        drop(first);
        assert_eq!(z.conn_count(b"10.0.0.1"), 0);
        assert!(matches!(decide(&limits, &src(&p), "r"), Decision::Pass(_)));
    }
}
