//! Cluster-wide limits on Redis: a small RESP client and the leaky-bucket
//! script, one round trip per decision.
//!
//! Why not the `redis` crate: a decision needs one command (`EVALSHA`) and a
//! two-integer reply, with a hard bound on the wait and no reconnect storm
//! when Redis is gone. The crate's multiplexed connection brings ~20 crates
//! (see benches/NOTES.md) and its own reconnect policy; this file is the
//! part we use, with the policy we need:
//!
//! * one connection per worker thread and Redis address, pipelined: calls
//!   are written in order and their replies matched in order;
//! * every call waits at most `timeout` (the caller then applies its
//!   `on_error` behaviour); a late reply is read and thrown away;
//! * a failed connect, a closed connection, or replies stalled for
//!   [`STALL`] mark the link down for `retry`: calls meanwhile fail at once,
//!   without touching the network, then one new connect is tried;
//! * at most [`MAX_PENDING`] calls wait on one connection; more fail at once.
//!
//! The script is loaded (`SCRIPT LOAD`) on every new connection, so
//! `EVALSHA` finds it even after Redis restarted empty; a `NOSCRIPT` answer
//! (a `SCRIPT FLUSH` meanwhile) fails that call and reloads the script.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::zone::{Bucket, ReqDecision};

/// Calls waiting for replies on one connection, at most.
pub const MAX_PENDING: usize = 1024;
/// A reply this late means Redis is stuck: the connection is dropped and the link marked down.
pub const STALL: Duration = Duration::from_secs(1);

/// nginx's leaky bucket on Redis, with Redis's clock (every instance sees the same time).
/// KEYS[1] = the key; ARGV = rate (milli-requests/s), burst (milli-requests), TTL (ms).
/// Returns {admitted 0/1, excess in milli-requests}.
pub const BUCKET_SCRIPT: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local excess = 0
local s = redis.call('HMGET', KEYS[1], 'e', 'l')
if s[1] and s[2] then
  local elapsed = now - tonumber(s[2])
  if elapsed < 0 then elapsed = 0 end
  excess = tonumber(s[1]) + 1000 - math.floor(rate * elapsed / 1000000)
  if excess < 0 then excess = 0 end
  if excess > burst then return {0, excess} end
end
redis.call('HSET', KEYS[1], 'e', string.format('%.0f', excess), 'l', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, excess}
"#;

/// Where Redis is and how long to wait for it (`redis:` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisConfig {
    pub addr: SocketAddr,
    /// Longest wait for one decision.
    pub timeout: Duration,
    /// Longest wait for a new connection (in the background: no call waits longer than `timeout`).
    pub connect_timeout: Duration,
    /// After a failure, how long calls skip Redis before the next connect.
    pub retry: Duration,
    pub password: Option<String>,
    pub db: u32,
    /// Prepended to every key (`PREFIX` + zone + `:` + key).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    #[error("redis is unavailable (next try within {0:?})")]
    Down(Duration),
    #[error("no redis reply within {0:?}")]
    Timeout(Duration),
    #[error("too many redis calls waiting")]
    Busy,
    #[error("redis connection lost")]
    Lost,
    #[error("redis error: {0}")]
    Server(String),
    #[error("unexpected redis reply")]
    Protocol,
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(Bytes),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Reply>>),
}

/// One reply from the front of `buf`, if it is complete; `Err` on bytes no RESP reply starts with.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RedisError> {
    fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
        let end = buf[from..].windows(2).position(|w| w == b"\r\n")? + from;
        Some((&buf[from..end], end + 2))
    }
    fn int(s: &[u8]) -> Result<i64, RedisError> {
        std::str::from_utf8(s).ok().and_then(|s| s.parse().ok()).ok_or(RedisError::Protocol)
    }
    fn at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, RedisError> {
        if depth > 8 {
            return Err(RedisError::Protocol);
        }
        let Some(&kind) = buf.get(pos) else { return Ok(None) };
        let Some((text, next)) = line(buf, pos + 1) else { return Ok(None) };
        Ok(Some(match kind {
            b'+' => (Reply::Status(Bytes::copy_from_slice(text)), next),
            b'-' => (Reply::Error(String::from_utf8_lossy(text).into_owned()), next),
            b':' => (Reply::Int(int(text)?), next),
            b'$' => {
                let n = int(text)?;
                if n < 0 {
                    return Ok(Some((Reply::Bulk(None), next)));
                }
                let n = usize::try_from(n).map_err(|_| RedisError::Protocol)?;
                if buf.len() < next + n + 2 {
                    return Ok(None);
                }
                (Reply::Bulk(Some(Bytes::copy_from_slice(&buf[next..next + n]))), next + n + 2)
            }
            b'*' => {
                let n = int(text)?;
                if n < 0 {
                    return Ok(Some((Reply::Array(None), next)));
                }
                let mut items = Vec::with_capacity((n as usize).min(16));
                let mut pos = next;
                for _ in 0..n {
                    let Some((item, after)) = at(buf, pos, depth + 1)? else { return Ok(None) };
                    items.push(item);
                    pos = after;
                }
                (Reply::Array(Some(items)), pos)
            }
            _ => return Err(RedisError::Protocol),
        }))
    }
    at(buf, 0, 0)
}

/// A command in RESP form.
pub fn command(args: &[&[u8]]) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    b.put_u8(b'*');
    b.put_slice(args.len().to_string().as_bytes());
    b.put_slice(b"\r\n");
    for a in args {
        b.put_u8(b'$');
        b.put_slice(a.len().to_string().as_bytes());
        b.put_slice(b"\r\n");
        b.put_slice(a);
        b.put_slice(b"\r\n");
    }
    b.freeze()
}

/// Redis names a script by the hex SHA-1 of its text.
pub fn script_sha(script: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, script.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

struct Call {
    bytes: Bytes,
    reply: oneshot::Sender<Reply>,
}

enum LinkState {
    /// Never connected, or the connection task ended cleanly.
    Idle,
    Up(mpsc::Sender<Call>),
    Down(Instant),
}

/// One worker's connection to one Redis.
pub struct Link {
    cfg: Arc<RedisConfig>,
    state: RefCell<LinkState>,
    /// Last time a failure was logged at warn level (one a second at most).
    warned: Cell<Option<Instant>>,
}

thread_local! {
    static LINKS: RefCell<HashMap<Arc<RedisConfig>, Rc<Link>>> = RefCell::new(HashMap::new());
}

/// This worker's link to the Redis `cfg` names.
pub fn link(cfg: &Arc<RedisConfig>) -> Rc<Link> {
    LINKS.with(|l| {
        Rc::clone(l.borrow_mut().entry(Arc::clone(cfg)).or_insert_with(|| {
            Rc::new(Link { cfg: Arc::clone(cfg), state: RefCell::new(LinkState::Idle), warned: Cell::new(None) })
        }))
    })
}

impl Link {
    /// Send `bytes` (one command) and wait for its reply, `timeout` at most.
    pub async fn call(self: &Rc<Self>, bytes: Bytes) -> Result<Reply, RedisError> {
        let tx = self.sender()?;
        let (reply, rx) = oneshot::channel();
        tx.try_send(Call { bytes, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RedisError::Busy,
            mpsc::error::TrySendError::Closed(_) => RedisError::Lost,
        })?;
        match tokio::time::timeout(self.cfg.timeout, rx).await {
            Err(_) => Err(RedisError::Timeout(self.cfg.timeout)),
            Ok(Err(_)) => Err(RedisError::Lost),
            Ok(Ok(Reply::Error(e))) => Err(RedisError::Server(e)),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// The live connection's queue, starting a connection if there is none and none failed lately.
    fn sender(self: &Rc<Self>) -> Result<mpsc::Sender<Call>, RedisError> {
        let mut state = self.state.borrow_mut();
        match &*state {
            LinkState::Up(tx) if !tx.is_closed() => return Ok(tx.clone()),
            LinkState::Down(until) if Instant::now() < *until => {
                return Err(RedisError::Down(until.saturating_duration_since(Instant::now())))
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel(MAX_PENDING);
        *state = LinkState::Up(tx.clone());
        tokio::task::spawn_local(run(Rc::downgrade(self), Arc::clone(&self.cfg), rx));
        Ok(tx)
    }

    fn went_down(&self, err: &str) {
        *self.state.borrow_mut() = LinkState::Down(Instant::now() + self.cfg.retry);
        tracing::warn!(target: "limit", redis = %self.cfg.addr, error = %err, retry = ?self.cfg.retry, "redis unavailable; cluster limits use their on_error behaviour meanwhile");
    }

    /// Whether a per-call failure should be logged at warn (once a second per worker).
    pub fn should_warn(&self) -> bool {
        let now = Instant::now();
        if self.warned.get().is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        self.warned.set(Some(now));
        true
    }

    /// A leaky-bucket decision for `key` of `zone` on Redis (committed when admitted).
    pub async fn bucket(self: &Rc<Self>, zone: &str, key: &[u8], bucket: Bucket) -> Result<ReqDecision, RedisError> {
        let mut full = Vec::with_capacity(self.cfg.prefix.len() + zone.len() + 1 + key.len());
        full.extend_from_slice(self.cfg.prefix.as_bytes());
        full.extend_from_slice(zone.as_bytes());
        full.push(b':');
        full.extend_from_slice(key);
        let ttl_ms = bucket.drain_us().div_ceil(1000).max(1) + 1000;
        let sha = bucket_sha();
        let cmd = command(&[
            b"EVALSHA",
            sha.as_bytes(),
            b"1",
            &full,
            bucket.rate.to_string().as_bytes(),
            bucket.burst.to_string().as_bytes(),
            ttl_ms.to_string().as_bytes(),
        ]);
        let reply = self.call(cmd).await;
        if let Err(RedisError::Server(e)) = &reply {
            if e.starts_with("NOSCRIPT") {
                // Flushed meanwhile: load it again for the next calls (this one fails).
                let load = command(&[b"SCRIPT", b"LOAD", BUCKET_SCRIPT.as_bytes()]);
                if let Ok(tx) = self.sender() {
                    let (reply, _) = oneshot::channel();
                    let _ = tx.try_send(Call { bytes: load, reply });
                }
            }
        }
        match reply? {
            Reply::Array(Some(items)) => match items.as_slice() {
                [Reply::Int(admitted), Reply::Int(excess)] => {
                    Ok(ReqDecision { admitted: *admitted == 1, excess: (*excess).max(0) as u64 })
                }
                _ => Err(RedisError::Protocol),
            },
            _ => Err(RedisError::Protocol),
        }
    }
}

fn bucket_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| script_sha(BUCKET_SCRIPT))
}

/// The connection task: connect, greet, then write calls and match replies until something fails.
async fn run(link: Weak<Link>, cfg: Arc<RedisConfig>, mut rx: mpsc::Receiver<Call>) {
    let result = serve(&cfg, &mut rx).await;
    let Some(link) = link.upgrade() else { return };
    match result {
        Ok(()) => {
            // Closed while idle (Redis's `timeout`), or the link was dropped: the next call reconnects.
            rx.close();
            *link.state.borrow_mut() = LinkState::Idle;
        }
        Err(e) => {
            // Calls still queued fail now (their senders drop with `rx`), not at their timeout.
            rx.close();
            link.went_down(&e);
        }
    }
}

async fn serve(cfg: &RedisConfig, rx: &mut mpsc::Receiver<Call>) -> Result<(), String> {
    let mut stream = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err(format!("connect timed out after {:?}", cfg.connect_timeout)),
    };
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(4096);
    // Greeting: AUTH, SELECT, SCRIPT LOAD, each answered before serving.
    let mut hello: Vec<Bytes> = Vec::new();
    if let Some(p) = &cfg.password {
        hello.push(command(&[b"AUTH", p.as_bytes()]));
    }
    if cfg.db != 0 {
        hello.push(command(&[b"SELECT", cfg.db.to_string().as_bytes()]));
    }
    hello.push(command(&[b"SCRIPT", b"LOAD", BUCKET_SCRIPT.as_bytes()]));
    let greet = async {
        for cmd in &hello {
            stream.write_all(cmd).await.map_err(|e| format!("write: {e}"))?;
            loop {
                if let Some((reply, used)) = parse(&rbuf).map_err(|e| e.to_string())? {
                    rbuf.advance(used);
                    if let Reply::Error(e) = reply {
                        return Err(format!("greeting refused: {e}"));
                    }
                    break;
                }
                if stream.read_buf(&mut rbuf).await.map_err(|e| format!("read: {e}"))? == 0 {
                    return Err("closed by redis".to_string());
                }
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(cfg.connect_timeout, greet).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no greeting reply within {:?}", cfg.connect_timeout)),
    }
    tracing::debug!(target: "limit", redis = %cfg.addr, "redis connected");
    let (mut read, mut write) = stream.into_split();
    let mut pending: VecDeque<(oneshot::Sender<Reply>, Instant)> = VecDeque::new();
    let mut wbuf = BytesMut::new();
    loop {
        let stall = pending.front().map(|(_, at)| *at + STALL);
        tokio::select! {
            call = rx.recv() => {
                let Some(call) = call else { return Ok(()) };
                let now = Instant::now();
                wbuf.put_slice(&call.bytes);
                pending.push_back((call.reply, now));
                while let Ok(more) = rx.try_recv() {
                    wbuf.put_slice(&more.bytes);
                    pending.push_back((more.reply, now));
                }
                write.write_all(&wbuf).await.map_err(|e| format!("write: {e}"))?;
                wbuf.clear();
            }
            n = read.read_buf(&mut rbuf) => {
                match n {
                    Ok(0) if pending.is_empty() => return Ok(()),
                    Ok(0) => return Err("closed by redis".to_string()),
                    Err(e) => return Err(format!("read: {e}")),
                    Ok(_) => {}
                }
                while let Some((reply, used)) = parse(&rbuf).map_err(|e| e.to_string())? {
                    rbuf.advance(used);
                    let Some((tx, _)) = pending.pop_front() else {
                        return Err("a reply nobody asked for".to_string());
                    };
                    // The caller may have given up (timeout): the reply is dropped.
                    let _ = tx.send(reply);
                }
                if rbuf.len() > 1 << 20 {
                    return Err("reply too large".to_string());
                }
            }
            _ = async { tokio::time::sleep_until(stall.unwrap_or_else(Instant::now)).await }, if stall.is_some() => {
                return Err(format!("no reply for {STALL:?}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_waits_for_whole_ones() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Some((Reply::Status(Bytes::from_static(b"OK")), 5)));
        assert_eq!(parse(b":42\r\n").unwrap(), Some((Reply::Int(42), 5)));
        assert_eq!(parse(b"-ERR x\r\n").unwrap(), Some((Reply::Error("ERR x".into()), 8)));
        assert_eq!(parse(b"$3\r\nab").unwrap(), None);
        assert_eq!(parse(b"$3\r\nabc\r\n").unwrap(), Some((Reply::Bulk(Some(Bytes::from_static(b"abc"))), 9)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert_eq!(parse(b"*2\r\n:1\r\n:").unwrap(), None);
        assert_eq!(
            parse(b"*2\r\n:1\r\n:7\r\n").unwrap(),
            Some((Reply::Array(Some(vec![Reply::Int(1), Reply::Int(7)])), 12))
        );
        assert!(parse(b"?\r\n").is_err());
    }

    #[test]
    fn commands_and_script_names() {
        assert_eq!(&command(&[b"GET", b"k"])[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        // SHA-1 of "return 1", as `redis-cli SCRIPT LOAD "return 1"` prints it.
        assert_eq!(script_sha("return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }
}
