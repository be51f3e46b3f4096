//! Load-balancing policies for an upstream's peers.
//!
//! A [`Balancer`] is built once per config snapshot and shared by all worker threads, so
//! picking is lock-free except for smooth weighted round robin (a short `Mutex`, as nginx
//! keeps that state per worker). Live per-peer numbers ([`PeerStats`]: in-flight count and
//! latency EWMA) live outside the balancer so they survive config reloads. Every policy
//! honours the same exclusion rules (`tried` for retries, `down` from health checks).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which policy an upstream uses (parsed from config by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    WeightedRoundRobin,
    IpHash,
    ConsistentHash,
    LeastConn,
    P2cEwma,
}

/// Decay time of the latency EWMA.
const EWMA_DECAY_MICROS: f64 = 10_000_000.0;
/// Ketama-style virtual points per unit of weight (same as nginx `hash ... consistent`).
const RING_POINTS_PER_WEIGHT: u64 = 160;
/// Caps ring memory: a peer never gets more than 160 × 1000 points.
const RING_MAX_WEIGHT: u64 = 1000;
/// nginx `ip_hash` gives up rehashing after 20 tries and falls back to round robin.
const IP_HASH_MAX_TRIES: u32 = 20;

/// Live per-peer statistics, shared across workers and kept across config reloads
/// (the caller keeps the Arc for a peer address that stays configured).
#[derive(Debug, Default)]
pub struct PeerStats {
    in_flight: AtomicU64,
    /// f64 bits, microseconds; 0.0 means "no samples yet".
    ewma_bits: AtomicU64,
    /// When `ewma_bits` was last updated, in microseconds since [`epoch`].
    stamp_micros: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_micros() -> u64 {
    epoch().elapsed().as_micros() as u64
}

fn decay_factor(elapsed_micros: u64) -> f64 {
    (-(elapsed_micros as f64) / EWMA_DECAY_MICROS).exp()
}

impl PeerStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Call when a request to this peer starts; the guard decrements in_flight on drop.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats: Arc::clone(self) }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Record one observed latency (time to response headers).
    ///
    /// Peak EWMA as in Finagle/linkerd: a sample above the current value replaces it,
    /// otherwise it is blended in with weight `1 - exp(-elapsed / 10 s)`.
    pub fn observe(&self, latency: Duration) {
        self.observe_at(latency, now_micros());
    }

    /// Current latency estimate in microseconds (0.0 before the first sample).
    ///
    /// Like Finagle's `PeakEwma.get`, the value decays toward zero while no samples arrive,
    /// so a peer penalised by one slow response is eventually retried instead of being
    /// starved forever by P2C.
    pub fn ewma_micros(&self) -> f64 {
        self.ewma_at(now_micros())
    }

    fn ewma_at(&self, now: u64) -> f64 {
        let value = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let stamp = self.stamp_micros.load(Ordering::Relaxed);
        value * decay_factor(now.saturating_sub(stamp))
    }

    fn observe_at(&self, latency: Duration, now: u64) {
        // At least 1 µs so that "has samples" stays distinguishable from "no samples".
        let sample = (latency.as_secs_f64() * 1e6).max(1.0);
        // The stamp and the value are updated separately; under contention the elapsed time
        // may be slightly off, which only perturbs the weight of one sample.
        let prev = self.stamp_micros.fetch_max(now, Ordering::Relaxed);
        let w = decay_factor(now.saturating_sub(prev));
        let _ = self.ewma_bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let cur = f64::from_bits(bits) * w;
            let next = if sample > cur { sample } else { cur + sample * (1.0 - w) };
            Some(next.to_bits())
        });
    }
}

/// Guard for one in-flight request; decrements the peer's in-flight count on drop.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard is alive"]
pub struct InFlight {
    stats: Arc<PeerStats>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One peer as the balancer sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub weight: u32,
    pub stats: Arc<PeerStats>,
}

impl Peer {
    fn effective_weight(&self) -> u64 {
        u64::from(self.weight.max(1))
    }
}

/// What a pick may look at.
pub struct PickInput<'a> {
    pub client_ip: IpAddr,
    /// The evaluated hash key for ConsistentHash (e.g. a header value); None or empty → fall back to round robin.
    pub hash_key: Option<&'a [u8]>,
    /// Indexes of peers already tried for this request (retry to the next peer): never pick these
    /// unless every peer is excluded, then return None.
    pub tried: &'a [usize],
    /// Indexes of peers currently marked down by health checks: skipped like `tried`.
    pub down: &'a [usize],
}

impl PickInput<'_> {
    fn excluded(&self, i: usize) -> bool {
        self.tried.contains(&i) || self.down.contains(&i)
    }

    fn excludes_any(&self) -> bool {
        !self.tried.is_empty() || !self.down.is_empty()
    }
}

/// Load balancer for one upstream, built once per config snapshot.
pub struct Balancer {
    policy: Policy,
    /// Number of peers given to `new`; `pick` must get the same slice.
    len: usize,
    /// Rotation counter: RoundRobin, LeastConn tie-breaking and the hash fallbacks.
    next: AtomicUsize,
    /// Smooth WRR `current_weight` per peer (WeightedRoundRobin only).
    wrr_current: Mutex<Vec<i64>>,
    /// Cumulative effective weights (IpHash only).
    cumulative: Vec<u64>,
    /// Sorted (point, peer index) pairs (ConsistentHash only).
    ring: Vec<(u64, usize)>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("policy", &self.policy)
            .field("peers", &self.len)
            .field("ring_points", &self.ring.len())
            .finish()
    }
}

impl Balancer {
    /// Peers with weight 0 are treated as weight 1.
    pub fn new(policy: Policy, peers: &[Peer]) -> Self {
        let wrr_current = match policy {
            Policy::WeightedRoundRobin => vec![0; peers.len()],
            _ => Vec::new(),
        };
        let cumulative = match policy {
            Policy::IpHash => peers
                .iter()
                .scan(0u64, |acc, p| {
                    *acc += p.effective_weight();
                    Some(*acc)
                })
                .collect(),
            _ => Vec::new(),
        };
        let ring = match policy {
            Policy::ConsistentHash => build_ring(peers),
            _ => Vec::new(),
        };
        Self {
            policy,
            len: peers.len(),
            next: AtomicUsize::new(0),
            wrr_current: Mutex::new(wrr_current),
            cumulative,
            ring,
        }
    }

    /// Index into `peers` (same slice as given to new) of the chosen peer, or None if all are excluded/empty.
    pub fn pick(&self, peers: &[Peer], input: &PickInput<'_>) -> Option<usize> {
        let n = peers.len();
        if n == 0 || (input.excludes_any() && (0..n).all(|i| input.excluded(i))) {
            return None;
        }
        debug_assert_eq!(n, self.len, "pick() must get the peers given to new()");
        if n != self.len {
            return self.pick_round_robin(n, input);
        }
        match self.policy {
            Policy::RoundRobin => self.pick_round_robin(n, input),
            Policy::WeightedRoundRobin => self.pick_smooth_wrr(peers, input),
            Policy::IpHash => self.pick_ip_hash(n, input),
            Policy::ConsistentHash => self.pick_consistent(n, input),
            Policy::LeastConn => self.pick_least_conn(peers, input),
            Policy::P2cEwma => pick_p2c(peers, input),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// First non-excluded peer at or after the rotating counter.
    fn pick_round_robin(&self, n: usize, input: &PickInput<'_>) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).find(|&i| !input.excluded(i))
    }

    /// nginx `ngx_http_upstream_get_peer`: every eligible peer gains its weight, the
    /// largest `current_weight` wins and pays back the total. Excluded peers sit out.
    fn pick_smooth_wrr(&self, peers: &[Peer], input: &PickInput<'_>) -> Option<usize> {
        let mut current = self.wrr_current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, peer) in peers.iter().enumerate() {
            if input.excluded(i) {
                continue;
            }
            let w = peer.effective_weight() as i64;
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// Hashes the whole client address (not nginx's first three IPv4 octets), so clients of
    /// one /24 spread over peers. Weighted like nginx: the hash selects a slot in the
    /// cumulative weight range. An excluded peer triggers a deterministic rehash.
    fn pick_ip_hash(&self, n: usize, input: &PickInput<'_>) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let mut h = hash_ip(input.client_ip);
        for _ in 0..=IP_HASH_MAX_TRIES {
            let slot = h % total;
            let i = self.cumulative.partition_point(|&c| c <= slot);
            if i < n && !input.excluded(i) {
                return Some(i);
            }
            h = mix64(h.wrapping_add(0x9e37_79b9_7f4a_7c15));
        }
        self.pick_round_robin(n, input)
    }

    fn pick_consistent(&self, n: usize, input: &PickInput<'_>) -> Option<usize> {
        let key = match input.hash_key {
            Some(k) if !k.is_empty() => k,
            _ => return self.pick_round_robin(n, input),
        };
        let h = hash64(key);
        let len = self.ring.len();
        let start = self.ring.partition_point(|&(point, _)| point < h);
        (0..len).map(|k| self.ring[(start + k) % len].1).find(|&i| i < n && !input.excluded(i))
    }

    /// Fewest in-flight requests per unit of weight (compared as `a.conns * b.weight <
    /// b.conns * a.weight`, like nginx). The scan starts at a rotating index, so ties rotate.
    fn pick_least_conn(&self, peers: &[Peer], input: &PickInput<'_>) -> Option<usize> {
        let n = peers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u128, u128)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if input.excluded(i) {
                continue;
            }
            let conns = u128::from(peers[i].stats.in_flight());
            let weight = u128::from(peers[i].effective_weight());
            if best.is_none_or(|(_, bc, bw)| conns * bw < bc * weight) {
                best = Some((i, conns, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// Power of two choices over non-excluded peers, cost = ewma × (in_flight + 1).
/// Weights are ignored. A peer without samples costs 0, so new peers get tried.
fn pick_p2c(peers: &[Peer], input: &PickInput<'_>) -> Option<usize> {
    let n = peers.len();
    let filtered = input.excludes_any();
    let m = if filtered { (0..n).filter(|&i| !input.excluded(i)).count() } else { n };
    // k-th eligible peer, without allocating a candidate list.
    let nth = |k: usize| -> usize {
        if filtered {
            (0..n).filter(|&i| !input.excluded(i)).nth(k).unwrap_or(0)
        } else {
            k
        }
    };
    match m {
        0 => None,
        1 => Some(nth(0)),
        _ => {
            let a = fastrand::usize(..m);
            let mut b = fastrand::usize(..m - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a), nth(b));
            let now = now_micros();
            let cost = |i: usize| {
                let stats = &peers[i].stats;
                let in_flight = stats.in_flight();
                (stats.ewma_at(now) * (in_flight as f64 + 1.0), in_flight)
            };
            let (ca, fa) = cost(a);
            let (cb, fb) = cost(b);
            // Equal costs (e.g. two unsampled peers) go to the one with fewer requests.
            if cb < ca || (cb == ca && fb < fa) {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

fn build_ring(peers: &[Peer]) -> Vec<(u64, usize)> {
    let points_of = |p: &Peer| RING_POINTS_PER_WEIGHT * p.effective_weight().min(RING_MAX_WEIGHT);
    let mut ring = Vec::with_capacity(peers.iter().map(points_of).sum::<u64>() as usize);
    let mut name = String::new();
    for (i, peer) in peers.iter().enumerate() {
        for j in 0..points_of(peer) {
            name.clear();
            let _ = write!(name, "{}-{}", peer.addr, j);
            ring.push((hash64(name.as_bytes()), i));
        }
    }
    // Tie-break on the address, not the index, so a collision resolves the same way
    // whatever the peer's position in the list.
    ring.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| peers[a.1].addr.cmp(&peers[b.1].addr)).then_with(|| a.1.cmp(&b.1))
    });
    ring
}

/// FNV-1a 64 followed by a murmur3 finaliser: stable across processes and platforms, and
/// the finaliser spreads short or similar inputs (addresses, "addr-i") over all 64 bits.
fn hash64(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(bytes))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// murmur3 `fmix64`.
fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// IPv4-mapped IPv6 addresses hash like the IPv4 address they carry.
fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash64(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash64(&v4.octets()),
            None => hash64(&v6.octets()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    const ALL: [Policy; 6] = [
        Policy::RoundRobin,
        Policy::WeightedRoundRobin,
        Policy::IpHash,
        Policy::ConsistentHash,
        Policy::LeastConn,
        Policy::P2cEwma,
    ];

    fn peers(weights: &[u32]) -> Vec<Peer> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Peer {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                weight,
                stats: Arc::new(PeerStats::new()),
            })
            .collect()
    }

    fn input() -> PickInput<'static> {
        PickInput { client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), hash_key: None, tried: &[], down: &[] }
    }

    fn with_ip(ip: IpAddr) -> PickInput<'static> {
        PickInput { client_ip: ip, ..input() }
    }

    fn with_key(key: &[u8]) -> PickInput<'_> {
        PickInput { hash_key: Some(key), ..input() }
    }

    fn counts(b: &Balancer, ps: &[Peer], picks: usize) -> Vec<usize> {
        let mut c = vec![0; ps.len()];
        for _ in 0..picks {
            c[b.pick(ps, &input()).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_rotates_evenly() {
        let ps = peers(&[1, 5, 1]);
        let b = Balancer::new(Policy::RoundRobin, &ps);
        assert_eq!(b.policy(), Policy::RoundRobin);
        let seq: Vec<usize> = (0..300).map(|_| b.pick(&ps, &input()).unwrap()).collect();
        for (k, &i) in seq.iter().enumerate() {
            assert_eq!(i, k % 3, "pick {k}");
        }
        let mut c = [0; 3];
        seq.iter().for_each(|&i| c[i] += 1);
        assert_eq!(c, [100, 100, 100]);
    }

    #[test]
    fn smooth_wrr_matches_nginx_sequence() {
        let ps = peers(&[5, 1, 1]);
        let b = Balancer::new(Policy::WeightedRoundRobin, &ps);
        let first: Vec<usize> = (0..7).map(|_| b.pick(&ps, &input()).unwrap()).collect();
        assert_eq!(first, [0, 0, 1, 0, 2, 0, 0]);

        let b = Balancer::new(Policy::WeightedRoundRobin, &ps);
        assert_eq!(counts(&b, &ps, 700), [500, 100, 100]);

        let ps = peers(&[3, 2]);
        let b = Balancer::new(Policy::WeightedRoundRobin, &ps);
        assert_eq!(counts(&b, &ps, 500), [300, 200]);
    }

    #[test]
    fn smooth_wrr_zero_weight_is_one_and_skips_excluded() {
        let ps = peers(&[0, 0]);
        let b = Balancer::new(Policy::WeightedRoundRobin, &ps);
        assert_eq!(counts(&b, &ps, 10), [5, 5]);

        let ps = peers(&[5, 1, 1]);
        let b = Balancer::new(Policy::WeightedRoundRobin, &ps);
        let down = [0];
        let inp = PickInput { down: &down, ..input() };
        let seq: Vec<usize> = (0..4).map(|_| b.pick(&ps, &inp).unwrap()).collect();
        assert_eq!(seq, [1, 2, 1, 2]);
    }

    #[test]
    fn ip_hash_is_sticky_and_spreads() {
        let ps = peers(&[1, 1, 1]);
        let b = Balancer::new(Policy::IpHash, &ps);
        let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let first = b.pick(&ps, &with_ip(ip)).unwrap();
        for _ in 0..100 {
            assert_eq!(b.pick(&ps, &with_ip(ip)), Some(first));
        }
        // The IPv4-mapped IPv6 form is the same client.
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert_eq!(b.pick(&ps, &with_ip(mapped)), Some(first));

        let mut c = [0; 3];
        for k in 0..1000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k));
            c[b.pick(&ps, &with_ip(ip)).unwrap()] += 1;
        }
        for n in c {
            assert!((200..=470).contains(&n), "{c:?}");
        }
    }

    #[test]
    fn ip_hash_rehashes_away_from_excluded_peer() {
        let ps = peers(&[1, 1, 1]);
        let b = Balancer::new(Policy::IpHash, &ps);
        for k in 0..200u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0xc000_0200 + k));
            let home = b.pick(&ps, &with_ip(ip)).unwrap();
            let tried = [home];
            let inp = PickInput { tried: &tried, ..with_ip(ip) };
            let other = b.pick(&ps, &inp).unwrap();
            assert_ne!(other, home);
            // Deterministic: the same client fails over to the same peer.
            assert_eq!(b.pick(&ps, &inp), Some(other));
        }
    }

    #[test]
    fn ip_hash_honours_weights() {
        let ps = peers(&[3, 1]);
        let b = Balancer::new(Policy::IpHash, &ps);
        let mut c = [0; 2];
        for k in 0..4000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k));
            c[b.pick(&ps, &with_ip(ip)).unwrap()] += 1;
        }
        let ratio = c[0] as f64 / c[1] as f64;
        assert!((2.5..3.6).contains(&ratio), "{c:?}");
    }

    fn key_owners(b: &Balancer, ps: &[Peer], keys: &[String]) -> Vec<SocketAddr> {
        keys.iter().map(|k| ps[b.pick(ps, &with_key(k.as_bytes())).unwrap()].addr).collect()
    }

    #[test]
    fn consistent_hash_spreads_and_is_stable_on_removal() {
        let ps = peers(&[1, 1, 1, 1, 1]);
        let b = Balancer::new(Policy::ConsistentHash, &ps);
        let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i}")).collect();
        let before = key_owners(&b, &ps, &keys);
        for p in &ps {
            let n = before.iter().filter(|&&a| a == p.addr).count();
            assert!((1000..=3000).contains(&n), "{} got {n}", p.addr);
        }

        let removed = ps[2].addr;
        let remaining: Vec<Peer> = ps.iter().filter(|p| p.addr != removed).cloned().collect();
        let b2 = Balancer::new(Policy::ConsistentHash, &remaining);
        let after = key_owners(&b2, &remaining, &keys);
        let mut moved_to: HashMap<SocketAddr, usize> = HashMap::new();
        for (old, new) in before.iter().zip(&after) {
            if *old == removed {
                *moved_to.entry(*new).or_default() += 1;
            } else {
                assert_eq!(old, new, "a key not on the removed peer moved");
            }
        }
        assert!(moved_to.len() >= 3, "removed peer's keys did not spread: {moved_to:?}");
    }

    #[test]
    fn consistent_hash_weights_and_stickiness() {
        let ps = peers(&[2, 1, 1]);
        let b = Balancer::new(Policy::ConsistentHash, &ps);
        let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i}")).collect();
        let owners = key_owners(&b, &ps, &keys);
        let count = |a: SocketAddr| owners.iter().filter(|&&o| o == a).count() as f64;
        for light in [ps[1].addr, ps[2].addr] {
            let ratio = count(ps[0].addr) / count(light);
            assert!((1.5..=2.6).contains(&ratio), "ratio {ratio}");
        }
        for _ in 0..100 {
            assert_eq!(b.pick(&ps, &with_key(b"user:42")), b.pick(&ps, &with_key(b"user:42")));
        }
        // Same ring in a fresh balancer (nothing process- or instance-seeded).
        let b2 = Balancer::new(Policy::ConsistentHash, &ps);
        assert_eq!(key_owners(&b2, &ps, &keys), owners);
    }

    #[test]
    fn consistent_hash_excluded_peer_moves_only_its_keys() {
        let ps = peers(&[1, 1, 1, 1]);
        let b = Balancer::new(Policy::ConsistentHash, &ps);
        let down = [1];
        for i in 0..2000 {
            let key = format!("k{i}");
            let home = b.pick(&ps, &with_key(key.as_bytes())).unwrap();
            let inp = PickInput { down: &down, ..with_key(key.as_bytes()) };
            let now = b.pick(&ps, &inp).unwrap();
            assert_ne!(now, 1);
            if home != 1 {
                assert_eq!(now, home);
            }
        }
    }

    #[test]
    fn consistent_hash_without_key_round_robins() {
        let ps = peers(&[1, 1, 1]);
        let b = Balancer::new(Policy::ConsistentHash, &ps);
        let seq: Vec<usize> = (0..6).map(|_| b.pick(&ps, &input()).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        let seq: Vec<usize> = (0..3).map(|_| b.pick(&ps, &with_key(b"")).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2]);
    }

    #[test]
    fn hash_is_fnv1a_based_and_fixed() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash64(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
    }

    #[test]
    fn least_conn_picks_fewest_in_flight() {
        let ps = peers(&[1, 1, 1]);
        let b = Balancer::new(Policy::LeastConn, &ps);
        let mut guards = Vec::new();
        for (i, n) in [3, 0, 1].into_iter().enumerate() {
            guards.extend((0..n).map(|_| ps[i].stats.start()));
        }
        for _ in 0..10 {
            assert_eq!(b.pick(&ps, &input()), Some(1));
        }
        guards.extend((0..2).map(|_| ps[1].stats.start()));
        // Now 3, 2, 1.
        assert_eq!(b.pick(&ps, &input()), Some(2));
        drop(guards);
        assert_eq!(ps.iter().map(|p| p.stats.in_flight()).sum::<u64>(), 0);
    }

    #[test]
    fn least_conn_divides_by_weight() {
        let ps = peers(&[4, 1]);
        let b = Balancer::new(Policy::LeastConn, &ps);
        let _g: Vec<InFlight> =
            (0..3).map(|_| ps[0].stats.start()).chain(std::iter::once(ps[1].stats.start())).collect();
        // 3/4 < 1/1 although peer 0 has more connections.
        for _ in 0..10 {
            assert_eq!(b.pick(&ps, &input()), Some(0));
        }
    }

    #[test]
    fn least_conn_ties_rotate() {
        let ps = peers(&[1, 1, 1]);
        let b = Balancer::new(Policy::LeastConn, &ps);
        assert_eq!(counts(&b, &ps, 300), [100, 100, 100]);
        let first: Vec<usize> = (0..3).map(|_| b.pick(&ps, &input()).unwrap()).collect();
        assert_eq!(first, [0, 1, 2]);
    }

    #[test]
    fn p2c_avoids_slow_peer() {
        let ps = peers(&[1, 1, 1]);
        ps[0].stats.observe(Duration::from_millis(100));
        ps[1].stats.observe(Duration::from_millis(1));
        ps[2].stats.observe(Duration::from_millis(1));
        let b = Balancer::new(Policy::P2cEwma, &ps);
        let c = counts(&b, &ps, 1000);
        assert!(c[0] < 100, "{c:?}");
        // Peers 1 and 2 each win every pairing with peer 0 (~1/3 of picks); between themselves the
        // one sampled a few µs earlier has decayed a little more and wins: ~2:1, never starved.
        assert!(c[1] > 200 && c[2] > 200, "{c:?}");
    }

    #[test]
    fn p2c_in_flight_pushes_traffic_away() {
        let ps = peers(&[1, 1, 1]);
        ps[0].stats.observe(Duration::from_millis(5));
        ps[1].stats.observe(Duration::from_millis(5));
        // Faster, but 4 requests in flight: cost 4 ms × 5 > 5 ms × 1.
        ps[2].stats.observe(Duration::from_millis(4));
        let _busy: Vec<InFlight> = (0..4).map(|_| ps[2].stats.start()).collect();
        let b = Balancer::new(Policy::P2cEwma, &ps);
        let c = counts(&b, &ps, 1000);
        assert!(c[2] < 50, "{c:?}");
        // Peers 0 and 1 share the rest; which wins their pairing depends on
        // microseconds of EWMA decay between their samples (~2:1 at worst).
        assert!(c[0] > 200 && c[1] > 200, "{c:?}");
    }

    #[test]
    fn p2c_tries_unsampled_peer() {
        let ps = peers(&[1, 1]);
        ps[0].stats.observe(Duration::from_millis(1));
        let b = Balancer::new(Policy::P2cEwma, &ps);
        assert_eq!(counts(&b, &ps, 20), [0, 20]);
    }

    #[test]
    fn exclusion_for_every_policy() {
        let ps = peers(&[2, 1, 3, 1]);
        for policy in ALL {
            let b = Balancer::new(policy, &ps);
            for keep in 0..ps.len() {
                let others: Vec<usize> = (0..ps.len()).filter(|&i| i != keep).collect();
                let (tried, down) = others.split_at(1);
                for round in 0..20 {
                    let key = format!("key{round}");
                    let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, round));
                    for inp in [
                        PickInput { tried: &others, ..with_ip(ip) },
                        PickInput { tried, down, hash_key: Some(key.as_bytes()), client_ip: ip },
                    ] {
                        assert_eq!(b.pick(&ps, &inp), Some(keep), "{policy:?} keep {keep}");
                    }
                }
            }
            let all: Vec<usize> = (0..ps.len()).collect();
            let none_left = PickInput { tried: &all[..2], down: &all[2..], hash_key: Some(b"k"), ..input() };
            assert_eq!(b.pick(&ps, &none_left), None, "{policy:?}");
            let empty = Balancer::new(policy, &[]);
            assert_eq!(empty.pick(&[], &with_key(b"k")), None, "{policy:?}");
            assert_eq!(empty.pick(&[], &input()), None, "{policy:?}");
        }
    }

    #[test]
    fn every_policy_uses_all_peers_and_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Balancer>();
        assert_send_sync::<Peer>();
        assert_send_sync::<InFlight>();

        let ps = peers(&[1, 1, 1]);
        for policy in ALL {
            let b = Balancer::new(policy, &ps);
            let mut seen = [false; 3];
            for k in 0..300u32 {
                let key = k.to_string();
                let inp = PickInput {
                    client_ip: IpAddr::V4(Ipv4Addr::from(k)),
                    hash_key: Some(key.as_bytes()),
                    tried: &[],
                    down: &[],
                };
                seen[b.pick(&ps, &inp).unwrap()] = true;
            }
            assert_eq!(seen, [true; 3], "{policy:?}");
        }
    }

    #[test]
    fn in_flight_guard_counts() {
        let stats = Arc::new(PeerStats::new());
        assert_eq!(stats.in_flight(), 0);
        let a = stats.start();
        let b = stats.start();
        assert_eq!(stats.in_flight(), 2);
        drop(a);
        assert_eq!(stats.in_flight(), 1);
        drop(b);
        assert_eq!(stats.in_flight(), 0);
    }

    #[test]
    fn ewma_moves_toward_samples() {
        let stats = PeerStats::new();
        assert_eq!(stats.ewma_micros(), 0.0);
        stats.observe(Duration::from_millis(5));
        let v = stats.ewma_micros();
        assert!((4900.0..=5000.0).contains(&v), "{v}");

        // Deterministic clock from here on.
        let s = PeerStats::new();
        let t0 = 1_000_000;
        s.observe_at(Duration::from_millis(10), t0);
        assert_eq!(s.ewma_at(t0), 10_000.0);
        // One decay time later a 1 ms sample blends in: 10000/e + 1000(1 - 1/e).
        let t1 = t0 + 10_000_000;
        s.observe_at(Duration::from_millis(1), t1);
        let v = s.ewma_at(t1);
        let expected = 10_000.0 / std::f64::consts::E + 1000.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((v - expected).abs() < 1e-6, "{v} vs {expected}");
        // Repeated fast samples converge toward 1 ms.
        let mut t = t1;
        for _ in 0..20 {
            t += 10_000_000;
            s.observe_at(Duration::from_millis(1), t);
        }
        let v = s.ewma_at(t);
        assert!((1000.0..1001.0).contains(&v), "{v}");
        // A sample above the current value replaces it (peak EWMA).
        s.observe_at(Duration::from_millis(50), t + 1);
        assert_eq!(s.ewma_at(t + 1), 50_000.0);
        // Without samples the estimate decays toward zero.
        assert!(s.ewma_at(t + 1 + 30_000_000) < 50_000.0 * 0.06);
    }
}
