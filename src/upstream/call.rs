//! The upstream call: pick a peer, get a pooled connection, send, wait for
//! the response head within the read timeout. When nothing reached a peer
//! (connect failed, or a pooled connection was found closed before the
//! request went out) the same request goes to the next peer, up to `tries`.
//! A replayable body (`UpstreamBody::Empty`/`Full`) is what a later retry
//! policy needs to retry after sending, too.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

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
        let peer = match chosen {
            Some(p) => p,
            None => {
                let input = PickInput { client_ip, hash_key, tried: &tried, down: &[] };
                let Some(i) = upstream.balancer.pick(&upstream.peers, &input) else { break };
                tried.push(i);
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
        let result = match conn {
            Conn::H1(mut sender) => {
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
            Ok(Err(mut e)) => match e.take_message() {
                // The connection closed before the request left: nothing reached the peer.
                Some(back) => {
                    tracing::debug!(peer = %peer.addr, error = %e.error(), "pooled connection was closed, retrying");
                    req = back;
                    last_err = Some(ProxyError::Upstream { peer: peer.addr, source: e.into_error() });
                }
                None => return Err(ProxyError::Upstream { peer: peer.addr, source: e.into_error() }),
            },
        }
    }
    Err(last_err.unwrap_or(ProxyError::NoPeer { upstream: upstream.name.to_string() }))
}
