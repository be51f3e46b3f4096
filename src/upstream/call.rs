//! The upstream call: pick a peer, get a pooled connection, send, wait for
//! the response head within the read timeout. When nothing reached a peer
//! (connect failed, or a pooled connection was found closed before the
//! request went out) the same request goes to the next peer, up to `tries`.
//!
//! When the peer closes or resets the connection under a request already
//! sent, an idempotent request with a replayable body is sent again from a
//! copy kept for that (as nginx's `proxy_next_upstream error`), to the next
//! peer, counting a try. On a kept-alive connection that failure most likely
//! means the peer closed it while idle, so, as nginx does for its cached
//! connections, the first one per call counts no try and does not rule the
//! peer out. The copy is kept only when a retry could follow: another peer
//! is left to try, or the connection sat idle for at least [`STALE_RISK`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use super::balancer::{InFlight, Peer, PickInput};
use super::pool::{Conn, Pool};
use super::{Timeouts, Upstream};
use crate::error::ProxyError;
use crate::phase::body::{RequestTally, UpstreamBody};
use crate::phase::lua::LuaBalancer;

/// A response head from a peer, with what the log and the body need.
pub struct Answer {
    pub response: Response<Incoming>,
    pub peer: SocketAddr,
    pub in_flight: InFlight,
    /// From sending to the response head.
    pub elapsed: std::time::Duration,
    /// The read timeout of this try (a Lua balancer may have set it): it
    /// bounds each wait for the response body too.
    pub read_timeout: Duration,
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
        let checkout = pool.checkout(
            peer.addr,
            upstream.protocol,
            upstream.keepalive,
            upstream.conns,
            timeouts.connect,
            timeouts.send,
        );
        let conn = match checkout.await {
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
        let progress = req.body().progress();
        let mut reused = false;
        let mut replay = None;
        let result = match conn {
            Conn::H1(mut h1, idle) => {
                reused = idle.is_some() && !stale_retried;
                // A copy costs ~1.8k instructions, so it is kept only where a retry could use
                // it: another peer left to try, or a connection idle long enough that the peer
                // may have closed it meanwhile (one busy a moment ago is unlikely to be).
                let next_peer = attempt < tries && (lua.is_some() || tried.len() < upstream.peers.len());
                if next_peer || (reused && idle >= Some(STALE_RISK)) {
                    replay = replay_copy(&req);
                }
                let sending = h1.sender.try_send_request(req);
                let result = response_head(sending, progress.as_deref(), &timeouts).await;
                if let Ok(Ok(_)) = &result {
                    pool.checkin_when_ready(peer.addr, h1, upstream.keepalive);
                }
                result
            }
            Conn::H2(mut sender) => {
                if let Err(e) = sender.ready().await {
                    // A shared connection that went away: nothing was sent on it.
                    last_err = Some(ProxyError::Upstream { peer: peer.addr, source: e });
                    continue;
                }
                response_head(sender.try_send_request(req), progress.as_deref(), &timeouts).await
            }
        };
        match result {
            Err(Stalled::Read) => return Err(ProxyError::ReadTimeout { peer: peer.addr, after: timeouts.read }),
            Err(Stalled::Send) => return Err(ProxyError::SendTimeout { peer: peer.addr, after: timeouts.send }),
            Ok(Ok(response)) => {
                let elapsed = sent.elapsed();
                peer.stats.observe(elapsed);
                return Ok(Answer { response, peer: peer.addr, in_flight, elapsed, read_timeout: timeouts.read });
            }
            Ok(Err(mut e)) => {
                if let Some(after) = send_timed_out(e.error()) {
                    return Err(ProxyError::SendTimeout { peer: peer.addr, after });
                }
                // Either the connection closed before the request left (hyper hands it back:
                // nothing reached the peer), or the peer closed or reset it under the request,
                // which only a kept copy can send again.
                let back = match e.take_message() {
                    Some(back) => back,
                    None => match replay.filter(|_| closed_by_peer(e.error())) {
                        Some(copy) => copy,
                        None => return Err(ProxyError::Upstream { peer: peer.addr, source: e.into_error() }),
                    },
                };
                if reused {
                    tracing::debug!(peer = %peer.addr, error = %e.error(), "kept-alive connection was closed, sending again");
                    stale_retried = true;
                    attempt -= 1;
                    if let Some(i) = picked {
                        tried.retain(|&t| t != i);
                    }
                } else {
                    tracing::warn!(upstream = %upstream.name, peer = %peer.addr, error = %e.error(), "peer failed, trying the next one");
                }
                req = back;
                last_err = Some(ProxyError::Upstream { peer: peer.addr, source: e.into_error() });
            }
        }
    }
    Err(last_err.unwrap_or(ProxyError::NoPeer { upstream: upstream.name.to_string() }))
}

/// Which clock ran out while waiting for a response head.
enum Stalled {
    Read,
    Send,
}

/// Waits for the response head. As nginx's `proxy_read_timeout`, the read
/// timeout starts once the request has been sent: at once for a body that is
/// there whole, after its last frame for a streamed one — a slow client's
/// upload does not count against the upstream. While a streamed body is on
/// its way, the send timeout bounds how long the upstream leaves a frame
/// untaken; while the body waits for the client, no clock of the upstream's
/// runs (`client_body_timeout`, in the body, bounds the client).
async fn response_head<T>(
    sending: impl Future<Output = T>,
    progress: Option<&RequestTally>,
    timeouts: &Timeouts,
) -> Result<T, Stalled> {
    let start = tokio::time::Instant::now();
    let mut sending = std::pin::pin!(sending);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(start + timeouts.read));
    let mut armed = Some(start + timeouts.read);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = sending.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let (at, stalled) = match progress {
            None => (start + timeouts.read, Stalled::Read),
            Some(p) => {
                p.register(cx.waker());
                match (p.sent.get(), p.handed.get()) {
                    (Some(sent), _) => (sent + timeouts.read, Stalled::Read),
                    (None, Some(handed)) => (handed + timeouts.send, Stalled::Send),
                    (None, None) => return Poll::Pending,
                }
            }
        };
        if armed != Some(at) {
            timer.as_mut().reset(at);
            armed = Some(at);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(stalled))
    })
    .await
}

/// How long a kept-alive connection sits idle before a request sent on it
/// keeps a copy for a free retry, in case the peer closed it meanwhile (a
/// peer stopping, or its own keep-alive timeout).
const STALE_RISK: Duration = Duration::from_millis(1);

/// Whether `e` says the peer closed or reset the connection (as opposed to,
/// say, a malformed response, which sending again would not mend).
fn closed_by_peer(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = s.source();
    }
    false
}

/// The send timeout, when `e` is a write that waited for the peer longer
/// than that (see `pool::SendTimed`).
fn send_timed_out(e: &hyper::Error) -> Option<Duration> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // An io::Error's `source` skips the error it wraps: look at that one itself.
        let wrapped = s.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if let Some(t) = wrapped.and_then(|w| w.downcast_ref::<super::pool::SendTimedOut>()) {
            return Some(t.0);
        }
        source = s.source();
    }
    None
}

/// A copy of `req` to send again if the peer closes or resets the connection
/// under it: only for idempotent methods (RFC 9110 §9.2.2; nginx retries no others by
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

    use http::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::balancer::{Balancer, Policy};
    use crate::upstream::{peer_stats, ConnLimit, Keepalive, Protocol, Timeouts};

    /// How the peer ends the kept-alive connection under the second request.
    #[derive(Clone, Copy)]
    enum Close {
        /// FIN: hyper sees "connection closed before message completed".
        Graceful,
        /// RST (SO_LINGER 0): hyper sees "connection reset by peer".
        Reset,
    }

    /// One peer that answers the first request of its first connection, then
    /// closes that connection when the next request arrives on it without
    /// answering (a peer that went away under a kept-alive connection); later
    /// connections are answered. Returns its address and its answered-request count.
    async fn closing_peer(close: Close) -> (SocketAddr, Arc<AtomicUsize>) {
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
                            if let Close::Reset = close {
                                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                            }
                            return;
                        }
                        served += 1;
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                });
            }
        });
        (addr, answered)
    }

    /// A peer that reads each request and closes its connection unanswered.
    async fn dropping_peer() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let read = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&read);
        tokio::task::spawn_local(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                if let Ok(n) = s.read(&mut buf).await {
                    if n > 0 {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        (addr, read)
    }

    /// Round robin over `addrs`, starting with the first.
    fn upstream_of(addrs: &[SocketAddr]) -> Upstream {
        let peers: Vec<Peer> = addrs.iter().map(|&addr| Peer { addr, weight: 1, stats: peer_stats(addr) }).collect();
        Upstream {
            name: Arc::from("test"),
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
            conns: ConnLimit::default(),
        }
    }

    fn request(method: Method) -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::Empty);
        *req.method_mut() = method;
        *req.uri_mut() = "/x".parse().unwrap();
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("peer"));
        req
    }

    /// Sends `second` after a first GET, on the connection the first left in the pool.
    async fn second_on_stale_connection(second: Method, close: Close) -> (Result<u16, String>, usize) {
        let (addr, answered) = closing_peer(close).await;
        let upstream = upstream_of(&[addr]);
        let pool = Rc::new(Pool::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let first = call(&pool, &upstream, request(Method::GET), ip, None, 1, None).await.unwrap();
        drop(first.response.into_body());
        // Back in the pool once hyper has read the response.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.idle_count(upstream.peers[0].addr), 1);
        let second = call(&pool, &upstream, request(second), ip, None, 1, None).await;
        (second.map(|a| a.response.status().as_u16()).map_err(|e| e.to_string()), answered.load(Ordering::SeqCst))
    }

    #[test]
    fn an_idempotent_request_on_a_connection_closed_under_it_is_sent_again_to_the_same_peer() {
        crate::lua::ngx::thread::testing::block_on(async {
            // tries = 1 and a single peer: the retry neither counts nor rules the peer out.
            for close in [Close::Graceful, Close::Reset] {
                let (status, answered) = second_on_stale_connection(Method::GET, close).await;
                assert_eq!(status, Ok(200));
                assert_eq!(answered, 2);
            }
        });
    }

    #[test]
    fn a_non_idempotent_request_is_not_sent_again() {
        crate::lua::ngx::thread::testing::block_on(async {
            let (status, answered) = second_on_stale_connection(Method::POST, Close::Graceful).await;
            let err = status.unwrap_err();
            assert!(err.contains("connection closed before message completed"), "{err}");
            assert_eq!(answered, 1);
            let (status, answered) = second_on_stale_connection(Method::POST, Close::Reset).await;
            assert!(status.is_err(), "{status:?}");
            assert_eq!(answered, 1);
        });
    }

    #[test]
    fn an_idempotent_request_the_peer_dropped_goes_to_the_next_peer_as_a_counted_try() {
        crate::lua::ngx::thread::testing::block_on(async {
            let ip: IpAddr = "127.0.0.1".parse().unwrap();
            let pool = Rc::new(Pool::default());
            let (bad, dropped) = dropping_peer().await;
            let (good, answered) = closing_peer(Close::Graceful).await;
            let got = call(&pool, &upstream_of(&[bad, good]), request(Method::GET), ip, None, 2, None).await;
            assert_eq!(got.map(|a| a.peer).map_err(|e| e.to_string()), Ok(good));
            assert_eq!((dropped.load(Ordering::SeqCst), answered.load(Ordering::SeqCst)), (1, 1));

            // tries = 1: no second try, and no copy kept for one.
            let got = call(&pool, &upstream_of(&[bad, good]), request(Method::GET), ip, None, 1, None).await;
            let err = got.map(|a| a.peer).unwrap_err().to_string();
            assert!(err.contains(&bad.to_string()), "{err}");
            assert_eq!(dropped.load(Ordering::SeqCst), 2);

            // A POST may have taken effect: never sent twice.
            let got = call(&pool, &upstream_of(&[bad, good]), request(Method::POST), ip, None, 2, None).await;
            assert!(got.is_err());
            assert_eq!((dropped.load(Ordering::SeqCst), answered.load(Ordering::SeqCst)), (3, 1));
        });
    }
}
