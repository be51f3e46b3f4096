//! A limit zone: the state of every key of one limiter, shared by all
//! workers (nginx's `limit_req_zone` / `limit_conn_zone` shared memory).
//!
//! Keys come from requests (an address, a header, an API key), so the store
//! is bounded: each entry is charged its key plus [`ENTRY_OVERHEAD`] bytes
//! against the zone's size, and making room evicts the least recently used
//! entries first (nginx evicts from the tail of its LRU queue too). An entry
//! that counts requests in flight (a concurrency limit) is never evicted:
//! its count would be lost; when only such entries are left the zone is full
//! and the limiter refuses the request, as nginx does when its slab is full.
//!
//! The store is split into [`SHARDS`] shards, each behind its own short
//! mutex, chosen by the key's hash; the hash is computed once per decision
//! (foldhash with a per-process seed: keys are client-controlled).

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashlink::linked_hash_map::RawEntryMut;
use hashlink::LinkedHashMap;

/// Bytes charged per entry besides its key (map slot, links, state, allocation).
pub const ENTRY_OVERHEAD: usize = 96;
/// Shards per zone (a power of two).
pub const SHARDS: usize = 16;
/// Smallest zone size accepted by the config.
pub const MIN_SIZE: usize = 16 << 10;
/// One request, in the milli-request unit of [`State::Req`]'s excess (as nginx counts).
pub const ONE: u64 = 1000;

type Hasher = foldhash::quality::RandomState;

/// What a zone keeps per key, by kind of limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Leaky bucket: requests over the rate not yet drained (milli-requests), as of `last` (µs).
    Req { excess: u64, last: u64 },
    /// Requests in flight.
    Conn { count: u64 },
    /// Fixed window: requests left, and when the window ends (µs).
    Count { remaining: i64, reset: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("the zone is full")]
    Full,
    /// Two kinds of limiter share a zone and met on one key (lua-resty-limit-traffic: "shdict abused by other users").
    #[error("zone entry is used by another kind of limiter")]
    WrongKind,
    #[error("not found")]
    NotFound,
}

/// A leaky-bucket decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReqDecision {
    pub admitted: bool,
    /// The key's excess with this request counted (milli-requests); on a
    /// rejection, what it would have been.
    pub excess: u64,
}

/// Leaky-bucket parameters in nginx's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Milli-requests per second (10r/s = 10000).
    pub rate: u64,
    /// Excess allowed before rejecting, milli-requests.
    pub burst: u64,
}

impl Bucket {
    /// nginx's step: the excess drains at `rate` since `last`, then this request adds one.
    /// A key unseen (or fully drained) starts at 0.
    pub fn next_excess(&self, excess: u64, last: u64, now: u64) -> u64 {
        let elapsed = now.saturating_sub(last) as u128;
        let leaked = (self.rate as u128 * elapsed / 1_000_000).min(u64::MAX as u128) as u64;
        (excess + ONE).saturating_sub(leaked)
    }

    /// How long until a key at `excess` may pass again (µs), for `Retry-After`.
    pub fn wait_us(&self, excess: u64) -> u64 {
        let over = excess.saturating_sub(self.burst) as u128;
        (over * 1_000_000).div_ceil(self.rate.max(1) as u128).min(u64::MAX as u128) as u64
    }

    /// How long a state takes to drain to "unseen" (µs): the TTL of a cluster entry.
    pub fn drain_us(&self) -> u64 {
        ((self.burst as u128 + ONE as u128) * 1_000_000).div_ceil(self.rate.max(1) as u128).min(u64::MAX as u128) as u64
    }
}

struct Shard {
    map: LinkedHashMap<Box<[u8]>, State, Hasher>,
    used: usize,
    capacity: usize,
}

pub struct Zone {
    pub name: Arc<str>,
    /// Bytes, as configured when the zone was first created.
    pub size: usize,
    hasher: Hasher,
    shards: Box<[Mutex<Shard>]>,
}

fn cost(key: &[u8]) -> usize {
    key.len() + ENTRY_OVERHEAD
}

impl Shard {
    fn get(&mut self, hash: u64, key: &[u8]) -> Option<&mut State> {
        match self.map.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            RawEntryMut::Occupied(mut e) => {
                e.to_back();
                Some(e.into_mut())
            }
            RawEntryMut::Vacant(_) => None,
        }
    }

    /// Insert a new key, evicting least recently used entries that pin nothing to make room.
    fn insert(&mut self, hash: u64, key: &[u8], state: State) -> bool {
        let need = cost(key);
        let mut skipped = 0;
        while self.used + need > self.capacity {
            let Some((k, s)) = self.map.pop_front() else { return false };
            if matches!(s, State::Conn { count } if count > 0) {
                // In flight: keep it (at the back), look further; give up after a full turn.
                self.map.insert(k, s);
                skipped += 1;
                if skipped >= self.map.len() {
                    return false;
                }
                continue;
            }
            self.used -= cost(&k);
        }
        self.used += need;
        match self.map.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            RawEntryMut::Vacant(v) => {
                v.insert_hashed_nocheck(hash, key.into(), state);
            }
            RawEntryMut::Occupied(mut o) => {
                *o.get_mut() = state;
                self.used -= need;
            }
        }
        true
    }

    fn remove(&mut self, hash: u64, key: &[u8]) {
        if let RawEntryMut::Occupied(e) = self.map.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            let (k, _) = e.remove_entry();
            self.used -= cost(&k);
        }
    }
}

impl Zone {
    pub fn new(name: &str, size: usize) -> Self {
        let hasher = Hasher::default();
        let capacity = (size / SHARDS).max(ENTRY_OVERHEAD * 4);
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(Shard { map: LinkedHashMap::with_hasher(hasher), used: 0, capacity }))
            .collect();
        Self { name: Arc::from(name), size, hasher, shards }
    }

    fn shard(&self, key: &[u8]) -> (MutexGuard<'_, Shard>, u64) {
        let hash = self.hasher.hash_one(key);
        // Middle bits: hashbrown uses the low bits for the slot and the top 7 as a tag.
        let i = (hash >> 32) as usize & (SHARDS - 1);
        (self.shards[i].lock().unwrap_or_else(PoisonError::into_inner), hash)
    }

    /// Entries held now (tests, status).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A leaky-bucket decision for `key` at `now` (µs); `commit` records an admitted request.
    pub fn req(&self, key: &[u8], bucket: Bucket, commit: bool, now: u64) -> Result<ReqDecision, ZoneError> {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Req { excess, last }) => {
                let next = bucket.next_excess(*excess, *last, now);
                let admitted = next <= bucket.burst;
                if admitted && commit {
                    *excess = next;
                    // nginx keeps `last` on a same-millisecond request; with µs there is nothing to round away.
                    *last = now.max(*last);
                }
                Ok(ReqDecision { admitted, excess: next })
            }
            Some(_) => Err(ZoneError::WrongKind),
            None => {
                if commit && !shard.insert(hash, key, State::Req { excess: 0, last: now }) {
                    return Err(ZoneError::Full);
                }
                Ok(ReqDecision { admitted: true, excess: 0 })
            }
        }
    }

    /// Take back one committed request of `key` (lua-resty-limit-traffic's `uncommit`).
    pub fn req_uncommit(&self, key: &[u8]) -> Result<(), ZoneError> {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Req { excess, .. }) => {
                *excess = excess.saturating_sub(ONE);
                Ok(())
            }
            Some(_) => Err(ZoneError::WrongKind),
            None => Err(ZoneError::NotFound),
        }
    }

    /// One more request of `key` in flight, unless that makes more than `max`.
    /// Ok(count with this one) or Err(Ok(count without it)) when rejected.
    pub fn conn_acquire(&self, key: &[u8], max: u64, commit: bool) -> Result<Result<u64, u64>, ZoneError> {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Conn { count }) => {
                if *count + 1 > max {
                    return Ok(Err(*count));
                }
                if commit {
                    *count += 1;
                }
                Ok(Ok(*count + u64::from(!commit)))
            }
            Some(_) => Err(ZoneError::WrongKind),
            None if max == 0 => Ok(Err(0)),
            None => {
                if commit && !shard.insert(hash, key, State::Conn { count: 1 }) {
                    return Err(ZoneError::Full);
                }
                Ok(Ok(1))
            }
        }
    }

    /// One request of `key` left; the count left (the entry goes at 0, as nginx's).
    pub fn conn_release(&self, key: &[u8]) -> Result<u64, ZoneError> {
        let (mut shard, hash) = self.shard(key);
        let left = match shard.get(hash, key) {
            Some(State::Conn { count }) => {
                *count = count.saturating_sub(1);
                *count
            }
            Some(_) => return Err(ZoneError::WrongKind),
            None => return Err(ZoneError::NotFound),
        };
        if left == 0 {
            shard.remove(hash, key);
        }
        Ok(left)
    }

    /// Requests of `key` in flight now.
    pub fn conn_count(&self, key: &[u8]) -> u64 {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Conn { count }) => *count,
            _ => 0,
        }
    }

    /// Fixed window of `window` µs allowing `limit` requests: Ok(remaining) or
    /// Err(Ok(0)) when rejected. A rejected request is not counted.
    pub fn count(
        &self,
        key: &[u8],
        limit: i64,
        window: u64,
        commit: bool,
        now: u64,
    ) -> Result<Result<i64, i64>, ZoneError> {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Count { remaining, reset }) => {
                if *reset <= now {
                    *remaining = limit;
                    *reset = now.saturating_add(window);
                }
                let left = *remaining - 1;
                if left < 0 {
                    return Ok(Err(0));
                }
                if commit {
                    *remaining = left;
                }
                Ok(Ok(left))
            }
            Some(_) => Err(ZoneError::WrongKind),
            None if limit <= 0 => Ok(Err(0)),
            None => {
                let state = State::Count { remaining: limit - 1, reset: now.saturating_add(window) };
                if commit && !shard.insert(hash, key, state) {
                    return Err(ZoneError::Full);
                }
                Ok(Ok(limit - 1))
            }
        }
    }

    /// Give back one counted request of `key`; the requests left.
    pub fn count_uncommit(&self, key: &[u8]) -> Result<i64, ZoneError> {
        let (mut shard, hash) = self.shard(key);
        match shard.get(hash, key) {
            Some(State::Count { remaining, .. }) => {
                *remaining += 1;
                Ok(*remaining)
            }
            Some(_) => Err(ZoneError::WrongKind),
            None => Err(ZoneError::NotFound),
        }
    }
}

static ZONES: Mutex<Vec<Arc<Zone>>> = Mutex::new(Vec::new());

/// The zone named `name`: the same one for the life of the process, so a
/// reload keeps every key's state. As nginx's shared zones and luagate's
/// shared dicts, the size is fixed when the zone is first created.
pub fn registry(name: &str, size: usize) -> Arc<Zone> {
    let mut zones = ZONES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(z) = zones.iter().find(|z| &*z.name == name) {
        return Arc::clone(z);
    }
    let z = Arc::new(Zone::new(name, size));
    zones.push(Arc::clone(&z));
    z
}

/// A zone already created (by a config) under `name`.
pub fn lookup(name: &str) -> Option<Arc<Zone>> {
    ZONES.lock().unwrap_or_else(PoisonError::into_inner).iter().find(|z| &*z.name == name).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE_10: Bucket = Bucket { rate: 10 * ONE, burst: 0 };

    #[test]
    fn a_burst_of_zero_admits_one_request_per_interval() {
        let z = Zone::new("t", 1 << 20);
        let b = RATE_10;
        assert!(z.req(b"k", b, true, 1_000_000).unwrap().admitted);
        // 10 r/s: the next one is due 100 ms later.
        assert!(!z.req(b"k", b, true, 1_050_000).unwrap().admitted);
        assert!(!z.req(b"k", b, true, 1_099_000).unwrap().admitted);
        assert!(z.req(b"k", b, true, 1_100_000).unwrap().admitted);
        // Another key is another bucket.
        assert!(z.req(b"other", b, true, 1_100_000).unwrap().admitted);
    }

    #[test]
    fn burst_counts_excess_as_nginx_does() {
        let z = Zone::new("t", 1 << 20);
        let b = Bucket { rate: 10 * ONE, burst: 5 * ONE };
        // Seven at once: excess 0,1,..,5 pass, the seventh (6) is rejected and not recorded.
        let got: Vec<_> = (0..7).map(|_| z.req(b"k", b, true, 0).unwrap()).collect();
        assert_eq!(got.iter().map(|d| d.excess / ONE).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(got.iter().filter(|d| d.admitted).count(), 6);
        // 250 ms later 2.5 requests drained: 5 - 2.5 + 1 = 3.5.
        let d = z.req(b"k", b, true, 250_000).unwrap();
        assert_eq!((d.admitted, d.excess), (true, 3500));
        assert_eq!(b.wait_us(6000), 100_000);
    }

    #[test]
    fn uncommit_and_dry_checks() {
        let z = Zone::new("t", 1 << 20);
        let b = Bucket { rate: ONE, burst: ONE };
        assert!(z.req(b"k", b, true, 0).unwrap().admitted);
        assert!(z.req(b"k", b, true, 0).unwrap().admitted);
        // A check without commit changes nothing.
        assert!(!z.req(b"k", b, false, 0).unwrap().admitted);
        z.req_uncommit(b"k").unwrap();
        assert!(z.req(b"k", b, true, 0).unwrap().admitted);
        assert_eq!(z.req_uncommit(b"none"), Err(ZoneError::NotFound));
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_least_recently_used() {
        let z = Zone::new("t", MIN_SIZE);
        for i in 0..10_000u32 {
            z.req(&i.to_be_bytes(), RATE_10, true, 0).unwrap();
        }
        let per_shard = MIN_SIZE / SHARDS;
        assert!(z.len() <= SHARDS * per_shard / (4 + ENTRY_OVERHEAD) + SHARDS, "{}", z.len());
        assert!(z.len() > 50, "{}", z.len());
        // The most recent key is still known: a second request at once is over the rate.
        assert!(!z.req(&9_999u32.to_be_bytes(), RATE_10, true, 0).unwrap().admitted);
    }

    #[test]
    fn conn_entries_in_flight_are_never_evicted() {
        let z = Zone::new("t", MIN_SIZE);
        let mut held = 0;
        for i in 0..10_000u32 {
            match z.conn_acquire(&i.to_be_bytes(), 1, true) {
                Ok(Ok(1)) => held += 1,
                Err(ZoneError::Full) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(held > 50 && held < 10_000, "{held}");
        assert_eq!(z.len(), held);
        assert_eq!(z.conn_acquire(&0u32.to_be_bytes(), 1, true), Ok(Err(1)));
        assert_eq!(z.conn_release(&0u32.to_be_bytes()), Ok(0));
        assert_eq!(z.len(), held - 1);
        assert_eq!(z.conn_acquire(&0u32.to_be_bytes(), 1, true), Ok(Ok(1)));
    }

    #[test]
    fn count_windows_reset() {
        let z = Zone::new("t", 1 << 20);
        assert_eq!(z.count(b"k", 2, 1_000_000, true, 0), Ok(Ok(1)));
        assert_eq!(z.count(b"k", 2, 1_000_000, true, 10), Ok(Ok(0)));
        assert_eq!(z.count(b"k", 2, 1_000_000, true, 20), Ok(Err(0)));
        assert_eq!(z.count_uncommit(b"k"), Ok(1));
        assert_eq!(z.count(b"k", 2, 1_000_000, true, 30), Ok(Ok(0)));
        assert_eq!(z.count(b"k", 2, 1_000_000, true, 1_000_000), Ok(Ok(1)));
        assert_eq!(z.req(b"k", RATE_10, true, 0), Err(ZoneError::WrongKind));
    }
}
