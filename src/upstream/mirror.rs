//! Mirroring (`mirror` of a route, nginx's `mirror`): a copy of a sampled
//! share of requests goes to a shadow upstream, fire and forget.
//!
//! The copy is sent from its own task on the worker (`spawn_local`) and
//! never awaited by the client's request: the shadow's latency, errors and
//! answers change nothing for the client. Its responses are read to the end
//! (so the connection is reused) and dropped; outcomes are counted
//! ([`MirrorStats`]) and logged at debug level (target `mirror`).
//!
//! The request body is copied as it streams to the main upstream (a tee on
//! the request body, no extra wait for the client), up to `body_limit`; a
//! larger body is not mirrored. The copy leaves once the client's body has
//! ended (a gRPC unary call: its one message), so a mirrored request is
//! always whole. At most `max_in_flight` copies per route are out at once:
//! past that a copy is dropped (counted), never queued.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderValue, Request, Uri, Version};
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;

use super::pool::Pool;
use super::{call, Protocol, Upstream};
use crate::phase::body::UpstreamBody;

/// A route's mirror, compiled.
pub struct Mirror {
    pub upstream: Arc<Upstream>,
    /// Share of requests copied, 0–100.
    pub percent: f64,
    /// Largest request body copied (bytes).
    pub body_limit: usize,
    pub max_in_flight: usize,
    /// Longest a copy may take, body included.
    pub timeout: Duration,
    pub stats: Arc<MirrorStats>,
}

/// What became of the copies.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Sent to the shadow.
    pub sent: AtomicU64,
    /// Answered by the shadow (any status); the answer was dropped.
    pub answered: AtomicU64,
    /// Failed or timed out.
    pub failed: AtomicU64,
    /// Not sent: `max_in_flight` copies were out.
    pub dropped: AtomicU64,
    /// Not sent: the body was over `body_limit` or did not end.
    pub skipped: AtomicU64,
    in_flight: AtomicUsize,
}

/// Copies a request body as it streams upstream, up to a limit.
pub struct Tee {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    done: Option<oneshot::Sender<Bytes>>,
}

impl Tee {
    /// A data frame went upstream.
    pub fn data(&mut self, b: &Bytes) {
        if self.done.is_none() {
            return;
        }
        self.len += b.len();
        if self.len > self.limit {
            // Too large: the copy is abandoned (the receiver sees the sender dropped).
            self.done = None;
            self.chunks = Vec::new();
            return;
        }
        self.chunks.push(b.clone());
    }

    /// The body ended: the copy is whole.
    pub fn end(&mut self) {
        let Some(done) = self.done.take() else { return };
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.len);
                for c in self.chunks.drain(..) {
                    all.extend_from_slice(&c);
                }
                all.freeze()
            }
        };
        let _ = done.send(body);
    }
}

/// Frees a mirror slot when the copy's task ends.
struct Slot(Arc<MirrorStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Maybe mirror the request about to go upstream (`parts` as prepared for the
/// main upstream, `body` its body, teed here when it streams).
pub fn start(m: &Mirror, pool: &Rc<Pool>, parts: &Parts, body: &mut UpstreamBody, client_ip: IpAddr) {
    if m.percent < 100.0 && fastrand::f64() * 100.0 >= m.percent {
        return;
    }
    let stats = &m.stats;
    if stats.in_flight.fetch_add(1, Ordering::Relaxed) >= m.max_in_flight {
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "mirror", upstream = %m.upstream.name, "mirror dropped: {} copies in flight", m.max_in_flight);
        return;
    }
    let Some(head) = head_for(&m.upstream, parts) else { return skipped(m, "no request target") };
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let copy: Result<Bytes, oneshot::Receiver<Bytes>> = match body {
        _ if declared.is_some_and(|n| n > m.body_limit as u64) => return skipped(m, "body over body_limit"),
        UpstreamBody::Empty | UpstreamBody::Full(None) => Ok(Bytes::new()),
        UpstreamBody::Full(Some(b)) if b.len() > m.body_limit => return skipped(m, "body over body_limit"),
        UpstreamBody::Full(Some(b)) => Ok(b.clone()),
        UpstreamBody::Stream(s) => {
            let (tx, rx) = oneshot::channel();
            s.set_tee(Tee { chunks: Vec::new(), len: 0, limit: m.body_limit, done: Some(tx) });
            Err(rx)
        }
    };
    let slot = Slot(Arc::clone(stats));
    let (pool, upstream, stats, timeout) = (Rc::clone(pool), Arc::clone(&m.upstream), Arc::clone(stats), m.timeout);
    tokio::task::spawn_local(async move {
        let _slot = slot;
        let run = async {
            let body = match copy {
                Ok(b) => b,
                Err(rx) => match rx.await {
                    Ok(b) => b,
                    Err(_) => {
                        stats.skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(target: "mirror", upstream = %upstream.name, "mirror skipped: body over body_limit or cut");
                        return None;
                    }
                },
            };
            let mut req = Request::from_parts(head, UpstreamBody::Full((!body.is_empty()).then_some(body.clone())));
            if !body.is_empty() {
                req.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
            Some(match call::call(&pool, &upstream, req, client_ip, None, 1, None).await {
                Ok(answer) => {
                    let status = answer.response.status();
                    let mut incoming = answer.response.into_body();
                    while let Some(frame) = incoming.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                    Ok(status)
                }
                Err(e) => Err(e.to_string()),
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(None) => {}
            Ok(Some(Ok(status))) => {
                let n = stats.answered.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(target: "mirror", upstream = %upstream.name, status = status.as_u16(), answered = n, "mirror answered");
            }
            Ok(Some(Err(e))) => {
                let n = stats.failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(target: "mirror", upstream = %upstream.name, error = %e, failed = n, "mirror failed");
            }
            Err(_) => {
                let n = stats.failed.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(target: "mirror", upstream = %upstream.name, failed = n, "mirror timed out after {timeout:?}");
            }
        }
    });
}

fn skipped(m: &Mirror, why: &str) {
    m.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    m.stats.skipped.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(target: "mirror", upstream = %m.upstream.name, "mirror skipped: {why}");
}

/// The copy's head for the shadow's protocol: the same method, target and headers.
fn head_for(shadow: &Upstream, parts: &Parts) -> Option<Parts> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = match parts.headers.get(HOST) {
        Some(h) => h.clone(),
        None => HeaderValue::from_str(parts.uri.authority()?.as_str()).ok()?,
    };
    let mut head = Request::new(()).into_parts().0;
    head.method = parts.method.clone();
    head.headers = parts.headers.clone();
    head.headers.remove(TRANSFER_ENCODING);
    head.headers.remove(CONTENT_LENGTH);
    match shadow.protocol {
        Protocol::Http1 => {
            head.uri = Uri::try_from(path).ok()?;
            head.version = Version::HTTP_11;
            head.headers.insert(HOST, authority);
        }
        Protocol::H2c => {
            head.uri = Uri::try_from(format!("http://{}{path}", authority.to_str().ok()?)).ok()?;
            head.version = Version::HTTP_2;
            head.headers.remove(HOST);
        }
    }
    Some(head)
}
