//! The upstream call: pick a peer, get a pooled connection, send, wait for
//! the response head within the read timeout. When nothing reached a peer
//! (connect failed, or a pooled connection was found closed before the
//! request went out) the same request goes to the next peer, up to `tries`.
//!
//! A kept-alive connection the peer has just closed may be found out only
//! once the request is on it ("connection closed before message
//! completed"). As nginx does for its cached connections, that failure does
//! not count as a try and does not rule the peer out: the request is sent
//! again — the one hyper gives back, or, for an idempotent request with a
//! replayable body on a connection idle for at least [`STALE_RISK`], a copy
//! kept for that — once per call.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use super::balancer::{InFlight, Peer, PickInput};
use super::pool::{Conn, Pool};
use super::{Timeouts, Upstream};
use crate::error::ProxyError;
use crate::phase::body::UpstreamBody;
use crate::phase::lua::LuaBalancer;

/// A response head from a peer, with what the log and the body need.
pub struct Answer {
    pub response: Response<Incoming>,
    pub peer: SocketAddr,
    pub in_flight: InFlight,
    /// From sending to the response head.
    pub elapsed: std::time::Duration,
}

pub async fn call(
    pool: &Rc<Pool>,
    upstream: &Upstream,
    mut req: Request<UpstreamBody>,
    client_ip: IpAddr,
    hash_key: Option<&[u8]>,
    tries: u32,
    lua: Option<&LuaBalancer>,
) -> Result<Answer, ProxyError> {
    let mut tried: Vec<usize> = Vec::new();
    let mut last_err: Option<ProxyError> = None;
    // A stale kept-alive connection has already had its free retry.
    let mut stale_retried = false;
    let mut tries = tries.max(1);
    let mut attempt = 0;
    while attempt < tries {
        attempt += 1;
        let mut timeouts = upstream.timeouts;
        let chosen = match lua {
            Some(lb) => {
                let failure = last_err.as_ref().map(|_| ("failed", 502));
                let choice = lb.pick(failure).await?;
                tries = tries.max(1 + choice.more_tries);
                let (c, s, r) = choice.timeouts;
                timeouts = Timeouts {
                    connect: c.unwrap_or(timeouts.connect),
                    send: s.unwrap_or(timeouts.send),
                    read: r.unwrap_or(timeouts.read),
                };
                choice.peer.map(|addr| Peer { addr, weight: 1, stats: super::peer_stats(addr) })
            }
            None => None,
        };
        let mut picked = None;
        let peer = match chosen {
            Some(p) => p,
            None => {
                let input = PickInput { client_ip, hash_key, tried: &tried, down: &[] };
                let Some(i) = upstream.balancer.pick(&upstream.peers, &input) else { break };
                tried.push(i);
                picked = Some(i);
                upstream.peers[i].clone()
            }
        };
        let peer = &peer;
        let conn = match pool.checkout(peer.addr, upstream.protocol, upstream.keepalive, timeouts.connect).await {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                tracing::warn!(upstream = %upstream.name, peer = %peer.addr, error = %e, "peer failed, trying the next one");
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let in_flight = peer.stats.start();
        let sent = Instant::now();
        let read = timeouts.read;
        let mut reused = false;
        let mut replay = None;
        let result = match conn {
            Conn::H1(mut sender, idle) => {
                reused = idle.is_some() && !stale_retried;
                // A copy costs ~1.5k instructions; a connection busy a moment ago is one the
                // peer is unlikely to have closed in between, so only idler ones get one.
                if reused && idle >= Some(STALE_RISK) {
                    replay = replay_copy(&req);
                }
                let sending = sender.try_send_request(req);
                let result = tokio::time::timeout(read, sending).await;
                if let Ok(Ok(_)) = &result {
                    pool.checkin_when_ready(peer.addr, sender, upstream.keepalive);
                }
                result
            }
            Conn::H2(mut sender) => {
                if let Err(e) = sender.ready().await {
                    // A shared connection that went away: nothing was sent on it.
                    last_err = Some(ProxyError::Upstream { peer: peer.addr, source: e });
                    continue;
                }
                tokio::time::timeout(read, sender.try_send_request(req)).await
            }
        };
        match result {
            Err(_) => return Err(ProxyError::ReadTimeout { peer: peer.addr, after: read }),
            Ok(Ok(response)) => {
                let elapsed = sent.elapsed();
                peer.stats.observe(elapsed);
                return Ok(Answer { response, peer: peer.addr, in_flight, elapsed });
            }
            Ok(Err(mut e)) => {
                // The connection closed before the request left (nothing reached the peer), or a
                // kept-alive one closed under it (the peer had gone away before reading it).
                let stale = reused && e.error().is_incomplete_message();
                let back = e.take_message().or_else(|| replay.filter(|_| stale));
                let Some(back) = back else {
                    return Err(ProxyError::Upstream { peer: peer.addr, source: e.into_error() });
                };
                tracing::debug!(peer = %peer.addr, error = %e.error(), "pooled connection was closed, retrying");
                if reused {
                    stale_retried = true;
                    attempt -= 1;
                    if let Some(i) = picked {
                        tried.retain(|&t| t != i);
                    }
                }
                req = back;
                last_err = Some(ProxyError::Upstream { peer: peer.addr, source: e.into_error() });
            }
        }
    }
    Err(last_err.unwrap_or(ProxyError::NoPeer { upstream: upstream.name.to_string() }))
}

/// How long a kept-alive connection sits idle before a request sent on it
/// keeps a copy, in case the peer closed it meanwhile (a peer stopping, or
/// its own keep-alive timeout).
const STALE_RISK: Duration = Duration::from_millis(1);

/// A copy of `req` to send again if a kept-alive connection turns out closed:
/// only for idempotent methods (RFC 9110 §9.2.2; nginx retries no others by
/// default) with a body that can be replayed.
fn replay_copy(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    if !req.method().is_idempotent() {
        return None;
    }
    let mut copy = Request::new(req.body().try_clone()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use http::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::balancer::{Balancer, Policy};
    use crate::upstream::{peer_stats, Keepalive, Protocol, Timeouts};

    /// One peer that answers the first request of its first connection, then
    /// closes that connection when the next request arrives on it without
    /// answering (a peer that went away under a kept-alive connection); later
    /// connections are answered. Returns its upstream and its request count.
    async fn closing_peer() -> (Upstream, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&answered);
        tokio::task::spawn_local(async move {
            let mut conn_no = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                conn_no += 1;
                let first_conn = conn_no == 1;
                let count = Arc::clone(&count);
                tokio::task::spawn_local(async move {
                    let mut buf = [0u8; 4096];
                    let mut served = 0;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || (first_conn && served == 1) {
                            return;
                        }
                        served += 1;
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                });
            }
        });
        let peers = vec![Peer { addr, weight: 1, stats: peer_stats(addr) }];
        let upstream = Upstream {
            name: Arc::from("closing"),
            protocol: Protocol::Http1,
            balancer: Balancer::new(Policy::RoundRobin, &peers),
            peers,
            hash_key: None,
            keepalive: Keepalive { max_idle: 4, idle_timeout: Duration::from_secs(60) },
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                send: Duration::from_secs(2),
                read: Duration::from_secs(2),
            },
        };
        (upstream, answered)
    }

    fn request(method: Method) -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::Empty);
        *req.method_mut() = method;
        *req.uri_mut() = "/x".parse().unwrap();
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("peer"));
        req
    }

    /// Sends `second` after a first GET, on the connection the first left in the pool.
    async fn second_on_stale_connection(second: Method) -> (Result<u16, String>, usize) {
        let (upstream, answered) = closing_peer().await;
        let pool = Rc::new(Pool::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let first = call(&pool, &upstream, request(Method::GET), ip, None, 1, None).await.unwrap();
        drop(first.response.into_body());
        // Back in the pool once hyper has read the response; idle past STALE_RISK.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.idle_count(upstream.peers[0].addr), 1);
        let second = call(&pool, &upstream, request(second), ip, None, 1, None).await;
        (second.map(|a| a.response.status().as_u16()).map_err(|e| e.to_string()), answered.load(Ordering::SeqCst))
    }

    #[test]
    fn an_idempotent_request_on_a_connection_closed_under_it_is_sent_again_to_the_same_peer() {
        crate::lua::ngx::thread::testing::block_on(async {
            // tries = 1 and a single peer: the retry neither counts nor rules the peer out.
            let (status, answered) = second_on_stale_connection(Method::GET).await;
            assert_eq!(status, Ok(200));
            assert_eq!(answered, 2);
        });
    }

    #[test]
    fn a_non_idempotent_request_is_not_sent_again() {
        crate::lua::ngx::thread::testing::block_on(async {
            let (status, answered) = second_on_stale_connection(Method::POST).await;
            let err = status.unwrap_err();
            assert!(err.contains("connection closed before message completed"), "{err}");
            assert_eq!(answered, 1);
        });
    }
}
