//! `ngx.shared.DICT`: OpenResty-compatible shared dictionaries.
//!
//! In nginx a `lua_shared_dict` is a slab of shared memory that every worker process sees; scripts use
//! it for counters, rate limits, caches and locks that must be common to all workers. luagate runs one
//! LuaJIT state per worker *thread*, so the equivalent here is a plain Rust store ([`SharedDict`],
//! `Send + Sync`) behind one short mutex per dict, shared by all states through an `Arc`. No Lua value
//! ever crosses states: values are copied in and out as nil / booleans / numbers / byte strings, which
//! is also all OpenResty allows.
//!
//! * **Lifetime.** Dicts live in a process-wide registry keyed by name ([`dict`]). A config reload that
//!   keeps a name gets the same store back, data included. As in nginx, a dict's size is fixed when it
//!   is first created: a reload that changes `lua.shared_dicts.NAME` keeps the old capacity (and
//!   data) until the process restarts. A dict dropped from the config stays in the registry (unused)
//!   until restart, so re-adding it later finds the old data.
//! * **Lua API.** [`register`] installs `ngx.shared`, a plain table of the declared dicts (an undeclared
//!   name indexes to nil). Each dict is, as in OpenResty, a table `{ [1] = <zone userdata> }` whose
//!   metatable carries the methods `get get_stale set safe_set add safe_add replace delete incr lpush
//!   rpush lpop rpop llen ttl expire flush_all flush_expired get_keys capacity free_space`. Return
//!   tuples, error strings and argument checks follow lua-nginx-module 0.10.23 with lua-resty-core
//!   (checked against the real thing; see the tests). Errors that OpenResty *raises* (bad `self`, bad
//!   `exptime`, ...) are raised here too, as plain Lua strings (through the wrapper of [`super::raise`]
//!   around each Rust method, so `pcall` sees a string, not an mlua error userdata).
//! * **Memory.** Each item is charged what nginx's slab allocator would roughly charge: a 64-byte
//!   node header + key + value, rounded up to the slab size class (a power of two up to 2 KiB, then
//!   whole 4 KiB pages); list elements cost 24 bytes + value each. `capacity()` is the configured size
//!   and `free_space()` is capacity minus charged bytes (nginx additionally loses a few pages to slab
//!   bookkeeping and reports free space in whole pages only). When a store needs room, expired items
//!   are dropped first (soonest-expired first), then least-recently-used live items (the LRU order is
//!   refreshed by get and store, as nginx's queue), and `forcible` reports that a live item was evicted.
//!   The `safe_*` variants and list pushes never evict live items and fail with "no memory" instead.
//! * **Time.** Expiry uses a monotonic millisecond clock (nginx: cached wall-clock ms). Exptimes are
//!   truncated to whole milliseconds, so `0 < exptime < 0.001` means "never", as in nginx.
//!
//! Known differences from OpenResty: an item larger than the whole dict fails with "no memory" without
//! evicting anything first (nginx evicts up to 30 items trying, then fails with `forcible = true`);
//! `set` evicts as many LRU items as needed (nginx gives up after 30, possible with mixed sizes); expired
//! items are reclaimed soonest-expired-first when making room (nginx only looks at the LRU tail; its
//! side-reclaim of up to two expired LRU-tail items on every get/store/incr/list call, and of three
//! items on `flush_all`, is reproduced as is); error messages for
//! malformed arguments that OpenResty gets from LuaJIT's FFI ("cannot convert 'string' to 'int'") or
//! from `luaL_check*` ("bad argument #2 to '?'") are worded as ordinary bad-argument errors.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::c_int;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use mlua::{ffi, Lua, LuaString, MultiValue, Table, UserData, Value};

use super::cfn;
use super::raise::{api_function, raise};
use crate::lua::ceiling;

/// Longest key OpenResty accepts.
const MAX_KEY_LEN: usize = 65535;
/// `get_keys()` without a count returns at most this many keys.
const DEFAULT_MAX_KEYS: i64 = 1024;
/// nginx: rbtree node up to `color` (32) + `ngx_http_lua_shdict_node_t` header (32).
const NODE_OVERHEAD: usize = 64;
/// A list head also embeds the queue of its elements.
const LIST_OVERHEAD: usize = NODE_OVERHEAD + 16;
/// nginx: `ngx_http_lua_shdict_list_node_t` header (queue, length, type), padded.
const ELEM_OVERHEAD: usize = 24;
/// nginx slab: allocations up to half a page come from power-of-two size classes, bigger ones take pages.
const PAGE: usize = 4096;
const SLAB_MAX: usize = PAGE / 2;
/// "No node" in the LRU links.
const NONE: usize = usize::MAX;
/// `flush_all` marks every item as having expired at this instant (the clock starts well after it).
const LONG_AGO: u64 = 1;

/// What an item of `n` bytes costs in an nginx slab pool.
fn slab_size(n: usize) -> usize {
    if n <= SLAB_MAX {
        n.next_power_of_two().max(8)
    } else {
        n.div_ceil(PAGE) * PAGE
    }
}

/// Milliseconds on a process-wide monotonic clock; starts at 1000 so that 0 ("never") and [`LONG_AGO`]
/// are always in the past.
fn clock_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX) + 1000
}

/// A stored scalar; list elements are only ever `Num` or `Str`.
#[derive(Clone, Debug, PartialEq)]
enum Scalar {
    Bool(bool),
    Num(f64),
    Str(Arc<[u8]>),
}

impl Scalar {
    /// Bytes nginx stores for the value.
    fn len(&self) -> usize {
        match self {
            Scalar::Bool(_) => 1,
            Scalar::Num(_) => 8,
            Scalar::Str(s) => s.len(),
        }
    }
}

enum Val {
    One(Scalar),
    List(VecDeque<Scalar>),
}

struct Node {
    key: Arc<[u8]>,
    val: Val,
    flags: i32,
    /// Clock ms at which the item expires; 0 = never.
    expires: u64,
    /// Bytes charged against the capacity (for a list: head + all elements).
    cost: usize,
    /// LRU neighbours: `prev` is more recently used.
    prev: usize,
    next: usize,
}

/// One dict's items: a hash index, an LRU list threaded through a slab of nodes, and an index of the
/// items that have an expiry time.
struct Store {
    capacity: usize,
    used: usize,
    /// Keys are often client-controlled (rate limits by IP, by header):
    /// foldhash with a per-process random seed, not SipHash, which cost
    /// half of a `get` (~190 instructions for a short key).
    map: HashMap<Arc<[u8]>, usize, foldhash::quality::RandomState>,
    slots: Vec<Option<Node>>,
    vacant: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
    expiry: BTreeSet<(u64, usize)>,
}

enum Lookup {
    Missing,
    Live(usize),
    Expired(usize),
}

impl Store {
    fn new(capacity: usize) -> Self {
        Store {
            capacity,
            used: 0,
            map: HashMap::default(),
            slots: Vec::new(),
            vacant: Vec::new(),
            head: NONE,
            tail: NONE,
            expiry: BTreeSet::new(),
        }
    }

    fn node(&self, i: usize) -> &Node {
        self.slots[i].as_ref().expect("shared dict: dangling node index")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.slots[i].as_mut().expect("shared dict: dangling node index")
    }

    fn lookup(&self, key: &[u8], now: u64) -> Lookup {
        self.lookup_at(key, || now)
    }

    /// [`Store::lookup`], asking the clock only if the item has an expiry time.
    fn lookup_at(&self, key: &[u8], now: impl FnOnce() -> u64) -> Lookup {
        match self.map.get(key) {
            None => Lookup::Missing,
            Some(&i) => {
                let e = self.node(i).expires;
                if e == 0 || e > now() {
                    Lookup::Live(i)
                } else {
                    Lookup::Expired(i)
                }
            }
        }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        match prev {
            NONE => self.head = next,
            p => self.node_mut(p).next = next,
        }
        match next {
            NONE => self.tail = prev,
            n => self.node_mut(n).prev = prev,
        }
    }

    fn link_front(&mut self, i: usize) {
        let old = self.head;
        {
            let n = self.node_mut(i);
            n.prev = NONE;
            n.next = old;
        }
        match old {
            NONE => self.tail = i,
            o => self.node_mut(o).prev = i,
        }
        self.head = i;
    }

    /// Marks `i` most recently used.
    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    fn set_expires(&mut self, i: usize, expires: u64) {
        let old = std::mem::replace(&mut self.node_mut(i).expires, expires);
        if old != 0 {
            self.expiry.remove(&(old, i));
        }
        if expires != 0 {
            self.expiry.insert((expires, i));
        }
    }

    fn remove(&mut self, i: usize) -> Node {
        self.unlink(i);
        let node = self.slots[i].take().expect("shared dict: dangling node index");
        self.vacant.push(i);
        self.map.remove(&node.key);
        if node.expires != 0 {
            self.expiry.remove(&(node.expires, i));
        }
        self.used -= node.cost;
        node
    }

    fn insert(&mut self, key: Arc<[u8]>, val: Val, flags: i32, expires: u64, cost: usize) -> usize {
        let node = Node { key: key.clone(), val, flags, expires, cost, prev: NONE, next: NONE };
        let i = match self.vacant.pop() {
            Some(i) => {
                self.slots[i] = Some(node);
                i
            }
            None => {
                self.slots.push(Some(node));
                self.slots.len() - 1
            }
        };
        self.link_front(i);
        self.map.insert(key, i);
        if expires != 0 {
            self.expiry.insert((expires, i));
        }
        self.used += cost;
        i
    }

    /// Reclaims up to two expired items from the LRU tail, as nginx does (`ngx_http_lua_shdict_expire(ctx,
    /// 1)`) on every store, get, incr and list operation; this decides how long expired items stay
    /// visible to `get_stale` and `flush_expired`.
    fn reclaim(&mut self, now: u64) {
        self.reclaim_at(|| now);
    }

    /// [`Store::reclaim`], asking the clock only if the tail item has an expiry time.
    fn reclaim_at(&mut self, mut now: impl FnMut() -> u64) {
        for _ in 0..2 {
            match self.tail {
                NONE => return,
                t => {
                    let e = self.node(t).expires;
                    if e == 0 || e > now() {
                        return;
                    }
                    self.remove(t);
                }
            }
        }
    }

    /// Frees room for `need` more bytes: expired items first, then (if `evict_live`) LRU items.
    /// `None` when impossible; otherwise whether a live item was evicted.
    fn make_room(&mut self, need: usize, now: u64, evict_live: bool) -> Option<bool> {
        if need > self.capacity {
            return None;
        }
        let mut forcible = false;
        while self.capacity.saturating_sub(self.used) < need {
            match self.expiry.first() {
                Some(&(e, i)) if e <= now => {
                    self.remove(i);
                }
                _ if evict_live && self.tail != NONE => {
                    self.remove(self.tail);
                    forcible = true;
                }
                _ => return None,
            }
        }
        Some(forcible)
    }

    /// Removes the node for a key about to be re-created, keeping its key allocation.
    fn take_key(&mut self, found: &Lookup, key: &[u8]) -> Arc<[u8]> {
        match *found {
            Lookup::Live(i) | Lookup::Expired(i) => self.remove(i).key,
            Lookup::Missing => Arc::from(key),
        }
    }
}

/// How `store` treats an existing key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Set,
    Add,
    Replace,
}

/// Result of `get` / `get_stale`.
enum Got {
    Missing,
    List,
    Val { val: Scalar, flags: i32, stale: bool },
}

/// The process-wide store of one dict.
pub struct SharedDict {
    name: String,
    capacity: usize,
    store: Mutex<Store>,
    /// Test clock: when non-zero, the dict's "now" in ms.
    #[cfg(test)]
    manual_ms: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for SharedDict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedDict").field("name", &self.name).field("capacity", &self.capacity).finish()
    }
}

/// All dicts ever declared in this process, by name.
static REGISTRY: LazyLock<Mutex<HashMap<String, Arc<SharedDict>>>> = LazyLock::new(Default::default);

/// Get or create the dict `name` with `capacity` bytes (existing dicts keep their data and capacity).
///
/// Like nginx, a dict keeps the size it was created with for the life of the process: calling this
/// again (a config reload) with another `capacity` returns the existing dict unchanged and logs a
/// warning; the new size takes effect after a restart.
pub fn dict(name: &str, capacity: usize) -> Arc<SharedDict> {
    let mut reg = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(d) = reg.get(name) {
        if d.capacity != capacity {
            tracing::warn!(
                dict = name,
                old = d.capacity,
                new = capacity,
                "lua shared dict size changed; keeping the old size until restart"
            );
        }
        return d.clone();
    }
    let d = Arc::new(SharedDict::new(name, capacity));
    reg.insert(name.to_owned(), d.clone());
    d
}

impl SharedDict {
    fn new(name: &str, capacity: usize) -> Self {
        SharedDict {
            name: name.to_owned(),
            capacity,
            store: Mutex::new(Store::new(capacity)),
            #[cfg(test)]
            manual_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        #[cfg(test)]
        {
            let m = self.manual_ms.load(std::sync::atomic::Ordering::Relaxed);
            if m != 0 {
                return m;
            }
        }
        clock_ms()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `expires` for a relative time in ms (<= 0: never).
    fn deadline(now: u64, ms: i64) -> u64 {
        if ms > 0 {
            now.saturating_add(ms.unsigned_abs())
        } else {
            0
        }
    }

    /// set / safe_set / add / safe_add / replace / delete. `Ok(forcible)` or the error string.
    fn store(
        &self,
        op: Op,
        safe: bool,
        key: &[u8],
        val: Option<Scalar>,
        exptime_ms: i64,
        flags: i32,
    ) -> Result<bool, &'static str> {
        if val.is_none() && op != Op::Set {
            return Err("attempt to add or replace nil values");
        }
        let now = self.now();
        let mut s = self.lock();
        s.reclaim(now);
        let found = s.lookup(key, now);
        match (op, &found) {
            (Op::Replace, Lookup::Missing | Lookup::Expired(_)) => return Err("not found"),
            (Op::Add, Lookup::Live(_)) => return Err("exists"),
            _ => {}
        }
        let Some(val) = val else {
            if let Lookup::Live(i) | Lookup::Expired(i) = found {
                s.remove(i);
            }
            return Ok(false);
        };
        // As nginx: the old value is freed before the new one is allocated (and stays freed on failure).
        let key = s.take_key(&found, key);
        let cost = slab_size(NODE_OVERHEAD + key.len() + val.len());
        let forcible = s.make_room(cost, now, !safe).ok_or("no memory")?;
        s.insert(key, Val::One(val), flags, Self::deadline(now, exptime_ms), cost);
        Ok(forcible)
    }

    fn get(&self, key: &[u8], stale_ok: bool) -> Got {
        let mut s = self.lock();
        // The clock is read once, and only if an item looked at has an expiry time.
        let mut now = None;
        let mut now = || *now.get_or_insert_with(|| self.now());
        if !stale_ok {
            s.reclaim_at(&mut now);
        }
        let (i, stale) = match s.lookup_at(key, &mut now) {
            Lookup::Missing => return Got::Missing,
            Lookup::Live(i) => (i, false),
            Lookup::Expired(i) => (i, true),
        };
        s.touch(i);
        if stale && !stale_ok {
            return Got::Missing;
        }
        let n = s.node(i);
        match &n.val {
            Val::One(v) => Got::Val { val: v.clone(), flags: n.flags, stale },
            Val::List(_) => Got::List,
        }
    }

    /// `Ok((new value, forcible))`.
    fn incr(&self, key: &[u8], delta: f64, init: Option<f64>, init_ttl_ms: i64) -> Result<(f64, bool), &'static str> {
        let now = self.now();
        let mut s = self.lock();
        s.reclaim(now);
        let found = s.lookup(key, now);
        if let Lookup::Live(i) = found {
            let n = s.node_mut(i);
            let Val::One(Scalar::Num(v)) = &mut n.val else { return Err("not a number") };
            *v += delta;
            let v = *v;
            s.touch(i);
            return Ok((v, false));
        }
        let Some(init) = init else { return Err("not found") };
        let key = s.take_key(&found, key);
        let cost = slab_size(NODE_OVERHEAD + key.len() + 8);
        let forcible = s.make_room(cost, now, true).ok_or("no memory")?;
        let v = init + delta;
        s.insert(key, Val::One(Scalar::Num(v)), 0, Self::deadline(now, init_ttl_ms), cost);
        Ok((v, forcible))
    }

    /// Remaining ms (negative once expired but not yet reclaimed, as nginx), `Some(None)` for "never".
    fn ttl_ms(&self, key: &[u8]) -> Option<Option<i64>> {
        let now = self.now();
        let s = self.lock();
        let &i = s.map.get(key)?;
        match s.node(i).expires {
            0 => Some(None),
            e => Some(Some(i64::try_from(e).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(i64::MAX))),
        }
    }

    /// Like nginx, this also applies to (and so revives) expired items not reclaimed yet.
    fn expire(&self, key: &[u8], exptime_ms: i64) -> bool {
        let now = self.now();
        let mut s = self.lock();
        let Some(&i) = s.map.get(key) else { return false };
        s.set_expires(i, Self::deadline(now, exptime_ms));
        true
    }

    fn push(&self, key: &[u8], val: Scalar, front: bool) -> Result<usize, &'static str> {
        let now = self.now();
        let mut s = self.lock();
        s.reclaim(now);
        let elem = slab_size(ELEM_OVERHEAD + val.len());
        let found = s.lookup(key, now);
        let i = match found {
            Lookup::Live(i) => {
                if !matches!(s.node(i).val, Val::List(_)) {
                    return Err("value not a list");
                }
                s.touch(i);
                s.make_room(elem, now, false).ok_or("no memory")?;
                i
            }
            Lookup::Missing | Lookup::Expired(_) => {
                let key = s.take_key(&found, key);
                let head = slab_size(LIST_OVERHEAD + key.len());
                s.make_room(head + elem, now, false).ok_or("no memory")?;
                s.insert(key, Val::List(VecDeque::new()), 0, 0, head)
            }
        };
        s.used += elem;
        let n = s.node_mut(i);
        n.cost += elem;
        let Val::List(l) = &mut n.val else { unreachable!("checked above") };
        if front {
            l.push_front(val);
        } else {
            l.push_back(val);
        }
        Ok(l.len())
    }

    fn pop(&self, key: &[u8], front: bool) -> Result<Option<Scalar>, &'static str> {
        let now = self.now();
        let mut s = self.lock();
        s.reclaim(now);
        let Lookup::Live(i) = s.lookup(key, now) else { return Ok(None) };
        let n = s.node_mut(i);
        let Val::List(l) = &mut n.val else { return Err("value not a list") };
        let v = if front { l.pop_front() } else { l.pop_back() };
        let empty = l.is_empty();
        let freed = v.as_ref().map_or(0, |v| slab_size(ELEM_OVERHEAD + v.len()));
        n.cost -= freed;
        s.used -= freed;
        if empty {
            s.remove(i);
        } else {
            s.touch(i);
        }
        Ok(v)
    }

    fn llen(&self, key: &[u8]) -> Result<usize, &'static str> {
        let now = self.now();
        let mut s = self.lock();
        s.reclaim(now);
        let Lookup::Live(i) = s.lookup(key, now) else { return Ok(0) };
        let Val::List(l) = &s.node(i).val else { return Err("value not a list") };
        let len = l.len();
        s.touch(i);
        Ok(len)
    }

    /// Marks every item expired (they stay readable by `get_stale` until reclaimed) and, as nginx,
    /// reclaims the three least recently used ones right away.
    fn flush_all(&self) {
        let mut s = self.lock();
        s.expiry.clear();
        let mut i = s.head;
        while i != NONE {
            let n = s.node_mut(i);
            n.expires = LONG_AGO;
            let next = n.next;
            s.expiry.insert((LONG_AGO, i));
            i = next;
        }
        for _ in 0..3 {
            match s.tail {
                NONE => break,
                t => {
                    s.remove(t);
                }
            }
        }
    }

    /// Reclaims up to `max` expired items (`max <= 0`: all); returns how many.
    fn flush_expired(&self, max: i64) -> i64 {
        let now = self.now();
        let mut s = self.lock();
        let mut n = 0;
        while let Some(&(e, i)) = s.expiry.first() {
            if e > now || (max > 0 && n >= max) {
                break;
            }
            s.remove(i);
            n += 1;
        }
        n
    }

    /// Up to `max` live keys (`max <= 0`: all), most recently used first.
    fn keys(&self, max: i64) -> Vec<Arc<[u8]>> {
        let now = self.now();
        let s = self.lock();
        let limit = usize::try_from(max).ok().filter(|&m| m > 0).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut i = s.head;
        while i != NONE && out.len() < limit {
            let n = s.node(i);
            if n.expires == 0 || n.expires > now {
                out.push(n.key.clone());
            }
            i = n.next;
        }
        out
    }

    fn free_space(&self) -> usize {
        self.capacity.saturating_sub(self.lock().used)
    }
}

// ---------------------------------------------------------------------------------------------------
// Lua binding
// ---------------------------------------------------------------------------------------------------

/// The userdata in `ngx.shared.NAME[1]`.
struct Zone(Arc<SharedDict>);

impl UserData for Zone {}

/// What a method returns: its results, or a [`raise`] value.
type Ret = MultiValue;

fn lstr(lua: &Lua, s: impl AsRef<[u8]>) -> mlua::Result<Value> {
    lua.create_string(s).map(Value::String)
}

fn r0() -> Ret {
    MultiValue::new()
}

fn r1(a: Value) -> Ret {
    MultiValue::from_vec(vec![a])
}

fn r2(a: Value, b: Value) -> Ret {
    MultiValue::from_vec(vec![a, b])
}

fn r3(a: Value, b: Value, c: Value) -> Ret {
    MultiValue::from_vec(vec![a, b, c])
}

/// `nil, msg`.
fn fail(lua: &Lua, msg: &str) -> mlua::Result<Ret> {
    Ok(r2(Value::Nil, lstr(lua, msg)?))
}

/// The first `N` arguments (missing ones nil) and how many were passed.
fn take<const N: usize>(args: MultiValue) -> (usize, [Value; N]) {
    let n = args.len();
    let mut it = args.into_iter();
    (n, std::array::from_fn(|_| it.next().unwrap_or(Value::Nil)))
}

/// The dict behind `self`, as OpenResty's `check_zone`.
fn zone(this: &Value) -> Option<Arc<SharedDict>> {
    let Value::Table(t) = this else { return None };
    let Ok(Value::UserData(ud)) = t.raw_get::<Value>(1) else { return None };
    ud.borrow::<Zone>().ok().map(|z| z.0.clone())
}

fn num(v: &Value) -> Option<f64> {
    match *v {
        Value::Integer(i) => Some(i as f64),
        Value::Number(n) => Some(n),
        _ => None,
    }
}

/// `tonumber(v)`.
fn to_number(lua: &Lua, v: &Value) -> mlua::Result<Option<f64>> {
    match v {
        Value::String(_) => lua.coerce_number(v.clone()),
        v => Ok(num(v)),
    }
}

/// Seconds to whole ms, as nginx's `(long) (exptime * 1000)`.
fn to_ms(secs: f64) -> i64 {
    (secs * 1000.0) as i64
}

/// Why a key was refused: a soft error (`nil, msg`) or one to raise.
enum KeyErr {
    Soft(&'static str),
    Raise(String),
}

/// A key argument. The FFI methods (`list_method` `None`) take any value through `tostring`; the list
/// methods take strings and numbers only (`luaL_checklstring`) and raise for anything else.
fn dict_key(lua: &Lua, v: &Value, list_method: Option<&str>) -> mlua::Result<Result<LuaString, KeyErr>> {
    let s = match (v, list_method) {
        (Value::Nil, _) => return Ok(Err(KeyErr::Soft("nil key"))),
        (Value::String(s), _) => s.clone(),
        (Value::Integer(_) | Value::Number(_), _) => match lua.coerce_string(v.clone())? {
            Some(s) => s,
            None => lua.create_string(v.to_string()?)?,
        },
        (v, None) => lua.create_string(v.to_string()?)?,
        (v, Some(method)) => {
            let msg = format!("bad argument #2 to '{method}' (string expected, got {})", v.type_name());
            return Ok(Err(KeyErr::Raise(msg)));
        }
    };
    Ok(match s.as_bytes().len() {
        0 => Err(KeyErr::Soft("empty key")),
        n if n > MAX_KEY_LEN => Err(KeyErr::Soft("key too long")),
        _ => Ok(s),
    })
}

/// A storable value: `Ok(None)` for nil, `Err` for a type that cannot be stored.
fn scalar(v: &Value) -> Result<Option<Scalar>, ()> {
    Ok(Some(match v {
        Value::Nil => return Ok(None),
        Value::Boolean(b) => Scalar::Bool(*b),
        Value::Integer(_) | Value::Number(_) => Scalar::Num(num(v).unwrap_or_default()),
        Value::String(s) => Scalar::Str(Arc::from(&*s.as_bytes())),
        _ => return Err(()),
    }))
}

fn to_lua(lua: &Lua, v: Scalar) -> mlua::Result<Value> {
    Ok(match v {
        Scalar::Bool(b) => Value::Boolean(b),
        Scalar::Num(n) => Value::Number(n),
        Scalar::Str(s) => lstr(lua, &*s)?,
    })
}

/// Expands to a `fail`/`raise` return when a key check does not pass.
macro_rules! try_key {
    ($lua:expr, $e:expr) => {
        match $e? {
            Ok(k) => k,
            Err(KeyErr::Soft(msg)) => return fail($lua, msg),
            Err(KeyErr::Raise(msg)) => return raise($lua, msg),
        }
    };
}

/// Expands to a `raise` unless `self` is a dict.
macro_rules! try_zone {
    ($lua:expr, $this:expr) => {
        match zone(&$this) {
            Some(d) => d,
            None => return raise($lua, "bad \"zone\" argument"),
        }
    };
}

fn store_method(op: Op, safe: bool) -> impl Fn(&Lua, MultiValue) -> mlua::Result<Ret> {
    move |lua, args| {
        let (_, [this, key, value, exptime, flags]) = take::<5>(args);
        let d = try_zone!(lua, this);
        let exptime_ms = match exptime {
            Value::Nil | Value::Boolean(false) => 0,
            ref v => match num(v) {
                Some(e) if e >= 0.0 || e.is_nan() => to_ms(e),
                _ => return raise(lua, "bad \"exptime\" argument"),
            },
        };
        let key = try_key!(lua, dict_key(lua, &key, None));
        let Ok(value) = scalar(&value) else { return fail(lua, "bad value type") };
        let flags = match flags {
            Value::Nil | Value::Boolean(false) => 0,
            ref v => match num(v) {
                Some(f) => f as i32,
                None => return raise(lua, "bad \"flags\" argument"),
            },
        };
        match d.store(op, safe, &key.as_bytes(), value, exptime_ms, flags) {
            Ok(forcible) => Ok(r3(Value::Boolean(true), Value::Nil, Value::Boolean(forcible))),
            Err(msg) => Ok(r3(Value::Boolean(false), lstr(lua, msg)?, Value::Boolean(false))),
        }
    }
}

/// `delete(key)`: `set(key, nil)`, as lua-resty-core.
fn delete(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this, key]) = take::<2>(args);
    let d = try_zone!(lua, this);
    let key = try_key!(lua, dict_key(lua, &key, None));
    d.store(Op::Set, false, &key.as_bytes(), None, 0, 0).map_err(mlua::Error::runtime)?;
    Ok(r3(Value::Boolean(true), Value::Nil, Value::Boolean(false)))
}

fn get_method(stale_ok: bool) -> impl Fn(&Lua, MultiValue) -> mlua::Result<Ret> {
    move |lua, args| {
        let (_, [this, key]) = take::<2>(args);
        let d = try_zone!(lua, this);
        let key = try_key!(lua, dict_key(lua, &key, None));
        match d.get(&key.as_bytes(), stale_ok) {
            Got::Missing => Ok(r1(Value::Nil)),
            Got::List => fail(lua, "value is a list"),
            Got::Val { val, flags, stale } => {
                let val = to_lua(lua, val)?;
                let flags = if flags != 0 { Value::Number(flags.into()) } else { Value::Nil };
                Ok(match (stale_ok, flags) {
                    (true, flags) => r3(val, flags, Value::Boolean(stale)),
                    (false, Value::Nil) => r1(val),
                    (false, flags) => r2(val, flags),
                })
            }
        }
    }
}

fn incr(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this, key, value, init, init_ttl]) = take::<5>(args);
    let d = try_zone!(lua, this);
    let key = try_key!(lua, dict_key(lua, &key, None));
    let Some(delta) = to_number(lua, &value)? else {
        return raise(lua, format!("bad argument #3 to 'incr' (number expected, got {})", value.type_name()));
    };
    let init = match init {
        Value::Nil | Value::Boolean(false) => None,
        ref v => match to_number(lua, v)? {
            Some(n) => Some(n),
            None => return raise(lua, format!("bad init arg: number expected, got {}", v.type_name())),
        },
    };
    let init_ttl_ms = match init_ttl {
        Value::Nil => 0,
        ref v => match to_number(lua, v)? {
            None => return raise(lua, format!("bad init_ttl arg: number expected, got {}", v.type_name())),
            Some(t) if t < 0.0 => return raise(lua, "bad \"init_ttl\" argument"),
            Some(_) if init.is_none() => return raise(lua, "must provide \"init\" when providing \"init_ttl\""),
            Some(t) => to_ms(t),
        },
    };
    match d.incr(&key.as_bytes(), delta, init, init_ttl_ms) {
        Ok((v, _)) if init.is_none() => Ok(r1(Value::Number(v))),
        Ok((v, forcible)) => Ok(r3(Value::Number(v), Value::Nil, Value::Boolean(forcible))),
        Err(msg) => fail(lua, msg),
    }
}

fn ttl(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this, key]) = take::<2>(args);
    let d = try_zone!(lua, this);
    let key = try_key!(lua, dict_key(lua, &key, None));
    match d.ttl_ms(&key.as_bytes()) {
        None => fail(lua, "not found"),
        Some(None) => Ok(r1(Value::Number(0.0))),
        Some(Some(ms)) => Ok(r1(Value::Number(ms as f64 / 1000.0))),
    }
}

fn expire(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this, key, exptime]) = take::<3>(args);
    let d = try_zone!(lua, this);
    if matches!(exptime, Value::Nil | Value::Boolean(false)) {
        return raise(lua, "bad \"exptime\" argument");
    }
    let key = try_key!(lua, dict_key(lua, &key, None));
    let Some(exptime) = to_number(lua, &exptime)? else { return raise(lua, "bad \"exptime\" argument") };
    if d.expire(&key.as_bytes(), to_ms(exptime)) {
        Ok(r1(Value::Boolean(true)))
    } else {
        fail(lua, "not found")
    }
}

fn arg_count(lua: &Lua, n: usize, want: usize) -> Option<mlua::Result<Ret>> {
    (n != want).then(|| raise(lua, format!("expecting {want} arguments, but only seen {n}")))
}

fn push_method(front: bool) -> impl Fn(&Lua, MultiValue) -> mlua::Result<Ret> {
    let name = if front { "lpush" } else { "rpush" };
    move |lua, args| {
        let (n, [this, key, value]) = take::<3>(args);
        if let Some(r) = arg_count(lua, n, 3) {
            return r;
        }
        let d = try_zone!(lua, this);
        let key = try_key!(lua, dict_key(lua, &key, Some(name)));
        let value = match scalar(&value) {
            Ok(Some(v @ (Scalar::Num(_) | Scalar::Str(_)))) => v,
            _ => return fail(lua, "bad value type"),
        };
        match d.push(&key.as_bytes(), value, front) {
            Ok(len) => Ok(r1(Value::Number(len as f64))),
            Err(msg) => fail(lua, msg),
        }
    }
}

fn pop_method(front: bool) -> impl Fn(&Lua, MultiValue) -> mlua::Result<Ret> {
    let name = if front { "lpop" } else { "rpop" };
    move |lua, args| {
        let (n, [this, key]) = take::<2>(args);
        if let Some(r) = arg_count(lua, n, 2) {
            return r;
        }
        let d = try_zone!(lua, this);
        let key = try_key!(lua, dict_key(lua, &key, Some(name)));
        match d.pop(&key.as_bytes(), front) {
            Ok(Some(v)) => Ok(r1(to_lua(lua, v)?)),
            Ok(None) => Ok(r1(Value::Nil)),
            Err(msg) => fail(lua, msg),
        }
    }
}

fn llen(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (n, [this, key]) = take::<2>(args);
    if let Some(r) = arg_count(lua, n, 2) {
        return r;
    }
    let d = try_zone!(lua, this);
    let key = try_key!(lua, dict_key(lua, &key, Some("llen")));
    match d.llen(&key.as_bytes()) {
        Ok(len) => Ok(r1(Value::Number(len as f64))),
        Err(msg) => fail(lua, msg),
    }
}

/// `self` and the optional count of `get_keys` / `flush_expired` (`luaL_checkint` semantics).
fn zone_and_count(
    lua: &Lua,
    args: MultiValue,
    method: &str,
    default: i64,
) -> mlua::Result<Result<(Arc<SharedDict>, i64), Ret>> {
    let (n, [this, count]) = take::<2>(args);
    if !(1..=2).contains(&n) {
        return raise(lua, format!("expecting 1 or 2 argument(s), but saw {n}")).map(Err);
    }
    let Some(d) = zone(&this) else { return raise(lua, "bad \"zone\" argument").map(Err) };
    if n == 1 {
        return Ok(Ok((d, default)));
    }
    match to_number(lua, &count)? {
        Some(c) => Ok(Ok((d, c as i64))),
        None => {
            let msg = format!("bad argument #2 to '{method}' (number expected, got {})", count.type_name());
            raise(lua, msg).map(Err)
        }
    }
}

fn get_keys(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (d, max) = match zone_and_count(lua, args, "get_keys", DEFAULT_MAX_KEYS)? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    let keys = d.keys(max);
    let t = lua.create_table_with_capacity(keys.len(), 0)?;
    for (i, k) in keys.iter().enumerate() {
        t.raw_set(i + 1, lua.create_string(&**k)?)?;
    }
    Ok(r1(Value::Table(t)))
}

fn flush_expired(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (d, max) = match zone_and_count(lua, args, "flush_expired", 0)? {
        Ok(v) => v,
        Err(r) => return Ok(r),
    };
    Ok(r1(Value::Number(d.flush_expired(max) as f64)))
}

fn flush_all(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this]) = take::<1>(args);
    try_zone!(lua, this).flush_all();
    Ok(r0())
}

fn capacity(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this]) = take::<1>(args);
    Ok(r1(Value::Number(try_zone!(lua, this).capacity as f64)))
}

fn free_space(lua: &Lua, args: MultiValue) -> mlua::Result<Ret> {
    let (_, [this]) = take::<1>(args);
    Ok(r1(Value::Number(try_zone!(lua, this).free_space() as f64)))
}

/// The dict metatable: `{ __index = methods }`.
fn metatable(lua: &Lua) -> mlua::Result<Table> {
    let methods = lua.create_table()?;
    macro_rules! method {
        ($name:literal, $f:expr) => {
            // Values are bounded by the dict's capacity: made past the Lua memory ceiling.
            let f = $f;
            methods.raw_set($name, api_function(lua, move |lua, args| ceiling::lifted(lua, || f(lua, args)))?)?;
        };
    }
    // `get`, the method of nearly every request, takes its common case on the C API (`get_fast`),
    // and raises what the general method asks to itself (`delegate_raising`): the Lua wrapper the
    // others have cost ~350 instructions a call.
    let general_get = get_method(false);
    let general_get = lua.create_function(move |lua, args| ceiling::lifted(lua, || general_get(lua, args)))?;
    methods.raw_set("get", cfn::closure(lua, general_get, get_fast)?)?;
    method!("get_stale", get_method(true));
    method!("set", store_method(Op::Set, false));
    method!("safe_set", store_method(Op::Set, true));
    method!("add", store_method(Op::Add, false));
    method!("safe_add", store_method(Op::Add, true));
    method!("replace", store_method(Op::Replace, false));
    method!("incr", incr);
    method!("lpush", push_method(true));
    method!("rpush", push_method(false));
    method!("lpop", pop_method(true));
    method!("rpop", pop_method(false));
    method!("llen", llen);
    method!("ttl", ttl);
    method!("expire", expire);
    method!("flush_all", flush_all);
    method!("flush_expired", flush_expired);
    method!("get_keys", get_keys);
    method!("capacity", capacity);
    method!("free_space", free_space);
    method!("delete", delete);
    let mt = lua.create_table()?;
    mt.raw_set("__index", methods)?;
    Ok(mt)
}

/// Install `ngx.shared` into `ngx` for the given dicts: `ngx.shared.NAME` is bound to that dict;
/// indexing an undeclared name gives nil (as OpenResty).
///
/// As in OpenResty, `ngx.shared` is a plain table and `ngx.shared.NAME` a table `{ [1] = zone userdata
/// }` with the dict methods in its metatable. Calling this again on the same state (a reload) refills
/// the existing `ngx.shared` table in place, so scripts holding on to it see the new set of dicts; dict
/// tables they kept stay bound to the same stores.
pub fn register(lua: &Lua, ngx: &Table, dicts: &[(String, Arc<SharedDict>)]) -> mlua::Result<()> {
    let mt = metatable(lua)?;
    let shared = match ngx.raw_get::<Value>("shared")? {
        Value::Table(t) => {
            t.clear()?;
            t
        }
        _ => lua.create_table_with_capacity(0, dicts.len())?,
    };
    for (name, d) in dicts {
        let t = lua.create_table_with_capacity(2, 0)?;
        t.raw_set(1, lua.create_userdata(Zone(d.clone()))?)?;
        t.raw_set(2, fast_index(d))?;
        t.set_metatable(Some(mt.clone()))?;
        shared.raw_set(name.as_str(), t)?;
    }
    ngx.raw_set("shared", shared)
}

thread_local! {
    /// The dicts this thread's Lua state knows, for [`get_fast`]: a dict
    /// table's `[2]` is its position here plus one (its `[1]`, the `Zone`
    /// userdata, keeps it alive and serves every other method).
    static FAST_ZONES: RefCell<Vec<Arc<SharedDict>>> = const { RefCell::new(Vec::new()) };
}

fn fast_index(d: &Arc<SharedDict>) -> i64 {
    FAST_ZONES.with(|z| {
        let mut z = z.borrow_mut();
        let i = z.iter().position(|known| Arc::ptr_eq(known, d)).unwrap_or_else(|| {
            z.push(Arc::clone(d));
            z.len() - 1
        });
        i as i64 + 1
    })
}

/// `dict:get(key)` with a string key, on the C API (`cfn`); anything else —
/// another key type, a forged table, extra arguments — goes to the general
/// method (upvalue 1), which answers as resty.core does or returns an error
/// to raise at the script's line ([`delegate_raising`]).
unsafe extern "C-unwind" fn get_fast(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_gettop(state) != 2 || ffi::lua_type(state, 1) != ffi::LUA_TTABLE {
        return delegate_raising(state);
    }
    // LuaJIT's own `lua_rawgeti` and `lua_tonumber`: mlua-sys's wrappers
    // also read the type back / test for a number a second time.
    ffi::lua_rawgeti_(state, 1, 2);
    let index = match ffi::lua_type(state, -1) {
        // As `lua_tointeger` would: a number that is not an integer gives 0 (no dict).
        ffi::LUA_TNUMBER => {
            Some(ffi::lua_tonumber(state, -1)).filter(|&n| n == (n as i64) as f64).map_or(0, |n| n as i64)
        }
        _ => 0,
    };
    // `[2]` stays on the stack below the results (popped only to delegate).
    let dict = FAST_ZONES.with(|z| z.borrow().get((index as usize).wrapping_sub(1)).cloned());
    // The key's bytes stay valid while slot 2 holds it: through the call.
    let key = cfn::bytes(state, 2).filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN);
    // Nothing may be held when delegating (the general method may raise): the dict goes first.
    let dict = dict.filter(|_| key.is_some());
    let (Some(dict), Some(key)) = (dict, key) else {
        ffi::lua_pop(state, 1);
        return delegate_raising(state);
    };
    cfn::call(state, || {
        Ok(match dict.get(key, false) {
            Got::Missing => {
                ffi::lua_pushnil(state);
                1
            }
            Got::List => {
                ffi::lua_pushnil(state);
                cfn::push(state, b"value is a list");
                2
            }
            Got::Val { val, flags, .. } => {
                match val {
                    Scalar::Bool(b) => ffi::lua_pushboolean(state, c_int::from(b)),
                    Scalar::Num(n) => ffi::lua_pushnumber(state, n),
                    Scalar::Str(s) => cfn::push(state, &s),
                }
                if flags == 0 {
                    1
                } else {
                    ffi::lua_pushnumber(state, flags.into());
                    2
                }
            }
        })
    })
}

/// [`cfn::delegate`] to the general `get`, an API function outside the `raise`
/// wrapper: what it returns for the wrapper to raise (`raise_at`: the marker,
/// a level, the error; no value a dict holds is a light userdata) is raised
/// here as the wrapper's `error(err, level)` would. The wrapper's level 2 is
/// its caller, here level 1: `get_fast`'s caller.
///
/// # Safety
/// As [`cfn::delegate`].
unsafe fn delegate_raising(state: *mut ffi::lua_State) -> c_int {
    let n = cfn::delegate(state);
    if n != 3 || ffi::lua_type(state, 1) != ffi::LUA_TLIGHTUSERDATA {
        return n;
    }
    let level = ffi::lua_tonumber(state, 2) as c_int;
    if level > 0 && ffi::lua_isstring(state, 3) != 0 {
        ffi::luaL_where(state, level - 1);
        ffi::lua_pushvalue(state, 3);
        ffi::lua_concat(state, 2);
    } else {
        ffi::lua_pushvalue(state, 3);
    }
    ffi::lua_error(state)
}

#[cfg(test)]
mod tests {
    //! Expected strings are what nginx 1.22 + lua-nginx-module 0.10.23 + lua-resty-core printed for the
    //! same snippets (`show` formats a return list as `[count] v1, v2, ...`, strings `%q`-quoted).
    use super::*;
    use std::sync::atomic::Ordering;

    const HELPERS: &str = r#"
        function show(...)
            local t = {}
            for i = 1, select('#', ...) do
                local v = select(i, ...)
                t[#t + 1] = type(v) == "string" and ("%q"):format(v) or tostring(v)
            end
            return "[" .. select('#', ...) .. "] " .. table.concat(t, ", ")
        end
        function pshow(f, ...) return show(pcall(f, ...)) end
    "#;

    /// An unregistered dict, on a manual clock.
    fn fresh(capacity: usize) -> Arc<SharedDict> {
        let d = Arc::new(SharedDict::new("test", capacity));
        d.manual_ms.store(1_000_000, Ordering::Relaxed);
        d
    }

    fn advance(d: &SharedDict, ms: u64) {
        d.manual_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// A Lua state with `ngx.shared.<name>` for each dict, `d` = the first one, and the helpers.
    fn state(dicts: &[(&str, &Arc<SharedDict>)]) -> Lua {
        let lua = Lua::new();
        let ngx = lua.create_table().unwrap();
        let list: Vec<(String, Arc<SharedDict>)> = dicts.iter().map(|(n, d)| (n.to_string(), Arc::clone(d))).collect();
        register(&lua, &ngx, &list).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        lua.load(HELPERS).exec().unwrap();
        lua.load(format!("d = ngx.shared.{}", dicts[0].0)).exec().unwrap();
        lua
    }

    fn run(lua: &Lua, code: &str) -> String {
        lua.load(code).eval::<String>().unwrap_or_else(|e| panic!("{code}: {e}"))
    }

    /// Runs each `show(...)` expression and compares its output.
    fn check(lua: &Lua, cases: &[(&str, &str)]) {
        for (code, want) in cases {
            let got = run(lua, &format!("return {code}"));
            assert_eq!(&got, want, "{code}");
        }
    }

    #[test]
    fn slab_sizes() {
        assert_eq!(slab_size(1), 8);
        assert_eq!(slab_size(65), 128);
        assert_eq!(slab_size(169), 256);
        assert_eq!(slab_size(2048), 2048);
        assert_eq!(slab_size(2049), 4096);
        assert_eq!(slab_size(9000), 12288);
    }

    #[test]
    fn store_and_get_match_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        check(
            &lua,
            &[
                (r#"show(d:add("a", 1))"#, "[3] true, nil, false"),
                (r#"show(d:add("a", 2))"#, r#"[3] false, "exists", false"#),
                (r#"show(d:get("a"))"#, "[1] 1"),
                (r#"show(d:get("zz"))"#, "[1] nil"),
                (r#"show(d:set("f", true, 0, 7))"#, "[3] true, nil, false"),
                (r#"show(d:get("f"))"#, "[2] true, 7"),
                (r#"show(d:get_stale("f"))"#, "[3] true, 7, false"),
                (r#"show(d:set("fl", false), d:get("fl"))"#, "[2] true, false"),
                (r#"show(d:set("num", 1.5), d:get("num"))"#, "[2] true, 1.5"),
                (r#"show(d:set("inf", math.huge), d:get("inf"))"#, "[2] true, inf"),
                (r#"pshow(d.set, d, "t", {})"#, r#"[3] true, nil, "bad value type""#),
                (r#"pshow(d.set, d, "t", print)"#, r#"[3] true, nil, "bad value type""#),
                (r#"show(d:set("", 1))"#, r#"[2] nil, "empty key""#),
                (r#"show(d:get(""))"#, r#"[2] nil, "empty key""#),
                (r#"pshow(d.get, d, nil)"#, r#"[3] true, nil, "nil key""#),
                (r#"pshow(d.set, d, nil, 1)"#, r#"[3] true, nil, "nil key""#),
                (r#"show(d:set(5, "five"), d:get("5"))"#, r#"[2] true, "five""#),
                (r#"show(d:set("a", nil))"#, "[3] true, nil, false"),
                (r#"show(d:get("a"))"#, "[1] nil"),
                (r#"show(d:replace("zz", 1))"#, r#"[3] false, "not found", false"#),
                (r#"show(d:set("s", "str"), d:replace("s", 2))"#, "[4] true, true, nil, false"),
                (r#"show(d:delete("s"))"#, "[3] true, nil, false"),
                (r#"show(d:delete("zz"))"#, "[3] true, nil, false"),
                (r#"show(d:add("new", nil))"#, r#"[3] false, "attempt to add or replace nil values", false"#),
                (r#"show(d:replace("f", nil))"#, r#"[3] false, "attempt to add or replace nil values", false"#),
                (r#"show(d:get("f"))"#, "[2] true, 7"),
                (r#"show(d:safe_add("sa", 1))"#, "[3] true, nil, false"),
                (r#"show(d:safe_add("sa", 1))"#, r#"[3] false, "exists", false"#),
                (r#"show(d:safe_set("ss", 1))"#, "[3] true, nil, false"),
                (r#"show(d:set("fx", 1, 0, nil), d:get("fx"))"#, "[2] true, 1"),
                (r#"show(d:set("fx", 1, 0, 3.7), d:get("fx"))"#, "[3] true, 1, 3"),
                (r#"show(d:set("fx", 1, 0, -1), d:get("fx"))"#, "[3] true, 1, -1"),
                (r#"show(d:set("bin", "a\0b"), #d:get("bin"))"#, "[2] true, 3"),
                (r#"show(d:set("es", ""), d:get("es"))"#, r#"[2] true, """#),
                (r#"pshow(d.set, d, ("k"):rep(65536), 1)"#, r#"[3] true, nil, "key too long""#),
                (r#"pshow(d.get, d, ("k"):rep(65536))"#, r#"[3] true, nil, "key too long""#),
                (r#"pshow(d.set, d, ("k"):rep(65535), 1)"#, "[4] true, true, nil, false"),
                (r#"pshow(d.set, d, "neg", 1, -1)"#, r#"[2] false, "bad \"exptime\" argument""#),
                (r#"pshow(d.set, d, "w", 1, false)"#, "[4] true, true, nil, false"),
                (r#"show(d:capacity())"#, "[1] 1048576"),
                (r#"show(ngx.shared.nope, type(d), type(d[1]))"#, r#"[3] nil, "table", "userdata""#),
            ],
        );
    }

    #[test]
    fn bad_self_and_arguments_raise() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        check(
            &lua,
            &[
                (r#"pshow(d.get, "a")"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.set, "a", 1)"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.get, {}, "a")"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.flush_all)"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.capacity)"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.lpush, "a", 1)"#, r#"[2] false, "expecting 3 arguments, but only seen 2""#),
                (r#"pshow(d.lpush, d, "a")"#, r#"[2] false, "expecting 3 arguments, but only seen 2""#),
                (r#"pshow(d.lpush, d, "a", 1, 2)"#, r#"[2] false, "expecting 3 arguments, but only seen 4""#),
                (r#"pshow(d.lpush, "a", "k", 1)"#, r#"[2] false, "bad \"zone\" argument""#),
                (r#"pshow(d.llen, "a")"#, r#"[2] false, "expecting 2 arguments, but only seen 1""#),
                (r#"pshow(d.lpop, d, "a", 1)"#, r#"[2] false, "expecting 2 arguments, but only seen 3""#),
                (r#"pshow(d.get_keys)"#, r#"[2] false, "expecting 1 or 2 argument(s), but saw 0""#),
                (r#"pshow(d.flush_expired)"#, r#"[2] false, "expecting 1 or 2 argument(s), but saw 0""#),
                (r#"pshow(d.expire, d, "t0")"#, r#"[2] false, "bad \"exptime\" argument""#),
                (r#"pshow(d.incr, d, "zzz", 1, "x")"#, r#"[2] false, "bad init arg: number expected, got string""#),
                (r#"pshow(d.incr, d, "zzz", 1, 0, -1)"#, r#"[2] false, "bad \"init_ttl\" argument""#),
                (
                    r#"pshow(d.incr, d, "it2", 1, nil, 5)"#,
                    r#"[2] false, "must provide \"init\" when providing \"init_ttl\"""#,
                ),
                // Raised at the caller's level, as a plain string.
                (r#"(select(2, pcall(function() d.get("a") end)):match(":1: (.*)$"))"#, r#"bad "zone" argument"#),
                // `get` raises on its own, the others through the Lua wrapper: the same message at the same line.
                (
                    r#"tostring(select(2, pcall(function() d.get({}, "a") end)) == select(2, pcall(function() d.set({}, "a") end)))"#,
                    "true",
                ),
                (
                    r#"(select(2, pcall(function()
                    local x = 1
                    d.get(x)
                end)):match(":3: (.*)$"))"#,
                    r#"bad "zone" argument"#,
                ),
            ],
        );
        // Messages differ from OpenResty's FFI/luaL_check* wording, but these still raise.
        for code in [
            r#"d:incr("n", "x")"#,
            r#"d:set("n", 1, 0, "x")"#,
            r#"d:set("n", 1, "x")"#,
            r#"d:rpush({}, 1)"#,
            r#"d:get_keys(nil)"#,
        ] {
            assert!(lua.load(code).exec().is_err(), "{code}");
        }
    }

    #[test]
    fn incr_matches_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        check(
            &lua,
            &[
                (r#"show(d:incr("n", 1))"#, r#"[2] nil, "not found""#),
                (r#"show(d:incr("n", 1, 0))"#, "[3] 1, nil, false"),
                (r#"show(d:incr("n", 1.5))"#, "[1] 2.5"),
                (r#"show(d:get("n"))"#, "[1] 2.5"),
                (r#"show(d:incr("n", "5"))"#, "[1] 7.5"),
                (r#"show(d:set("s", "12"), d:incr("s", 1))"#, r#"[3] true, nil, "not a number""#),
                (r#"show(d:set("bo", true), d:incr("bo", 1, 0))"#, r#"[3] true, nil, "not a number""#),
                (r#"show(d:incr("it", 1, 10, 5))"#, "[3] 11, nil, false"),
                (r#"show(d:ttl("it"))"#, "[1] 5"),
                (r#"show(d:incr("it", 1, 10, 100))"#, "[3] 12, nil, false"),
                (r#"show(d:ttl("it"))"#, "[1] 5"),
                (r#"show(d:incr("fi", 0.5, 0.25))"#, "[3] 0.75, nil, false"),
                (r#"show(d:set("w", 10, 5, 9), d:incr("w", -3))"#, "[2] true, 7"),
                (r#"show(d:get("w"))"#, "[2] 7, 9"),
                (r#"show(d:incr("w", 1, "5"))"#, "[3] 8, nil, false"),
                (r#"show(d:incr("", 1))"#, r#"[2] nil, "empty key""#),
            ],
        );
    }

    #[test]
    fn ttl_and_expiry_match_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        check(
            &lua,
            &[
                (r#"show(d:ttl("zz"))"#, r#"[2] nil, "not found""#),
                (r#"show(d:set("t1", 1, 2.5), d:ttl("t1"))"#, "[2] true, 2.5"),
                (r#"show(d:set("t0", 1), d:ttl("t0"))"#, "[2] true, 0"),
                (r#"show(d:expire("t0", 10), d:ttl("t0"))"#, "[2] true, 10"),
                (r#"show(d:expire("zz", 10))"#, r#"[2] nil, "not found""#),
                (r#"show(d:expire("t0", 0), d:ttl("t0"))"#, "[2] true, 0"),
                (r#"show(d:expire("t0", -1), d:ttl("t0"))"#, "[2] true, 0"),
                (r#"show(d:set("ms", 1, 0.0004), d:ttl("ms"))"#, "[2] true, 0"),
                (r#"show(d:set("ms2", 1, 1.2345678), d:ttl("ms2"))"#, "[2] true, 1.234"),
                (
                    r#"show(d:set("e", "old", 0.1, 5), d:set("e2", 7, 0.1), d:rpush("el", 1), d:expire("el", 0.1))"#,
                    "[4] true, true, 1, true",
                ),
            ],
        );
        advance(&d, 250);
        check(
            &lua,
            &[
                (r#"show(d:ttl("ms2"))"#, "[1] 0.984"),
                (r#"show(d:ttl("e"))"#, "[1] -0.15"),
                (r#"show(d:get("e"))"#, "[1] nil"),
                (r#"show(d:get_stale("e"))"#, r#"[3] "old", 5, true"#),
                (r#"show(d:get_stale("e2"))"#, "[3] 7, nil, true"),
                (r#"show(d:get_stale("ms2"))"#, "[3] 1, nil, false"),
                (r#"show(d:llen("el"), d:lpop("el"))"#, "[2] 0, nil"),
                (r#"show(d:replace("e", 1))"#, r#"[3] false, "not found", false"#),
                (r#"show(d:incr("e2", 1))"#, r#"[2] nil, "not found""#),
                (r#"show(#d:get_keys(0))"#, "[1] 4"),
                // expire() revives an expired item that was not reclaimed yet, as nginx.
                (r#"show(d:expire("e", 0), d:get("e"))"#, r#"[3] true, "old", 5"#),
                (r#"show(d:add("e2", 2))"#, "[3] true, nil, false"),
                (r#"show(d:ttl("e2"))"#, "[1] 0"),
                (r#"show(d:set("y", 10, 0.1), d:set("z", 10, 0.1))"#, "[4] true, true, nil, false"),
            ],
        );
        advance(&d, 150);
        check(
            &lua,
            &[
                (r#"show(d:incr("y", 1, 100))"#, "[3] 101, nil, false"),
                (r#"show(d:ttl("y"))"#, "[1] 0"),
                (r#"show(d:incr("z", 1, 100, 3))"#, "[3] 101, nil, false"),
                (r#"show(d:ttl("z"))"#, "[1] 3"),
                (r#"show(d:rpush("le", 1), d:expire("le", 0.05))"#, "[2] 1, true"),
            ],
        );
        advance(&d, 100);
        check(
            &lua,
            &[
                (r#"show(d:rpush("le", 3), d:ttl("le"), d:lpop("le"))"#, "[3] 1, 0, 3"),
                (r#"show(d:set("le", "s", 0.05))"#, "[3] true, nil, false"),
            ],
        );
        advance(&d, 100);
        check(&lua, &[(r#"show(d:rpush("le", 3), d:ttl("le"))"#, "[2] 1, 0")]);
    }

    #[test]
    fn real_clock_expiry() {
        let d = Arc::new(SharedDict::new("test", 1 << 20));
        let lua = state(&[("d", &d)]);
        check(&lua, &[(r#"show(d:set("k", "v", 0.05), d:get("k"))"#, r#"[2] true, "v""#)]);
        std::thread::sleep(std::time::Duration::from_millis(80));
        check(&lua, &[(r#"show(d:get_stale("k"), d:flush_expired(), d:get("k"))"#, r#"[3] "v", 1, nil"#)]);
    }

    /// Which operations reclaim expired items from the LRU tail on the side (nginx output: 2 for those
    /// that do, 0 for those that don't; flush_all reclaims 3 of its 5 now-expired items).
    #[test]
    fn opportunistic_reclaim_matches_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        let setup = r#"
            d:flush_all() d:flush_expired()
            for i = 1, 3 do d:set("e" .. i, 1, 0.01) end
            d:set("live", 1) d:rpush("list", 1) d:rpush("list", 2)
            return ""
        "#;
        for (op, want) in [
            (r#"d:add("live", 2)"#, "[2] 2, 2"),
            (r#"d:free_space()"#, "[2] 0, 2"),
            (r#"d:delete("nope")"#, "[2] 2, 2"),
            (r#"d:expire("live", 0)"#, "[2] 0, 2"),
            (r#"d:flush_all()"#, "[2] 3, 0"),
            (r#"d:get("live")"#, "[2] 2, 2"),
            (r#"d:get_keys()"#, "[2] 0, 2"),
            (r#"d:get("nope")"#, "[2] 2, 2"),
            (r#"d:get_stale("live")"#, "[2] 0, 2"),
            (r#"d:incr("live", 1)"#, "[2] 2, 2"),
            (r#"d:llen("list")"#, "[2] 2, 2"),
            (r#"d:lpop("list")"#, "[2] 2, 2"),
            (r#"d:lpush("list", 1)"#, "[2] 2, 2"),
            (r#"d:safe_set("live", 2)"#, "[2] 2, 2"),
            (r#"d:set("live", 2)"#, "[2] 2, 2"),
            (r#"d:ttl("live")"#, "[2] 0, 2"),
        ] {
            run(&lua, setup);
            advance(&d, 20);
            let code = format!(
                "local total = #d:get_keys(0) + 3 {op} local left = d:flush_expired() \
                 return show(total - left - #d:get_keys(0), #d:get_keys(0))"
            );
            assert_eq!(run(&lua, &code), want, "{op}");
        }
    }

    #[test]
    fn lists_match_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        check(
            &lua,
            &[
                (r#"show(d:lpush("l", "x"))"#, "[1] 1"),
                (r#"show(d:lpush("l", 2))"#, "[1] 2"),
                (r#"show(d:rpush("l", true))"#, r#"[2] nil, "bad value type""#),
                (r#"pshow(d.rpush, d, "l", nil)"#, r#"[3] true, nil, "bad value type""#),
                (r#"show(d:llen("l"), d:llen("zz"))"#, "[2] 2, 0"),
                (r#"show(d:get("l"))"#, r#"[2] nil, "value is a list""#),
                (r#"show(d:get_stale("l"))"#, r#"[2] nil, "value is a list""#),
                (r#"show(d:ttl("l"))"#, "[1] 0"),
                (r#"show(d:add("l", 1))"#, r#"[3] false, "exists", false"#),
                (r#"show(d:incr("l", 1))"#, r#"[2] nil, "not a number""#),
                (r#"show(d:lpop("l"))"#, "[1] 2"),
                (r#"show(d:rpop("l"))"#, r#"[1] "x""#),
                (r#"show(d:rpop("l"), d:llen("l"), d:lpop("zz"))"#, "[3] nil, 0, nil"),
                (r#"show(#d:get_keys(0))"#, "[1] 0"),
                (r#"show(d:set("n", 1), d:lpush("n", 1))"#, r#"[3] true, nil, "value not a list""#),
                (r#"show(d:lpop("n"))"#, r#"[2] nil, "value not a list""#),
                (r#"show(d:llen("n"))"#, r#"[2] nil, "value not a list""#),
                (r#"show(d:rpush("L", 1), d:set("L", 3), d:get("L"))"#, "[3] 1, true, 3"),
                (r#"show(d:rpush("R", 1), d:replace("R", "s"), d:get("R"))"#, r#"[3] 1, true, "s""#),
                (r#"pshow(d.lpush, d, nil, 1)"#, r#"[3] true, nil, "nil key""#),
                (r#"pshow(d.lpush, d, "", 1)"#, r#"[3] true, nil, "empty key""#),
                (r#"show(d:rpush(("x"):rep(65536), 1))"#, r#"[2] nil, "key too long""#),
                (r#"show(d:lpush(12, 1), d:llen("12"))"#, "[2] 1, 1"),
                (r#"show(d:lpush("lf", 1/3), d:lpop("lf") == 1/3)"#, "[2] 1, true"),
                (r#"show(d:lpush("lb", "a\0b"), #d:lpop("lb"))"#, "[2] 1, 3"),
                (
                    r#"show(d:rpush("o", 1), d:rpush("o", 2), d:lpush("o", 0), d:lpop("o"), d:rpop("o"))"#,
                    "[5] 1, 2, 3, 0, 2",
                ),
            ],
        );
    }

    #[test]
    fn flush_and_keys_match_openresty() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        run(&lua, r#"for i = 1, 1100 do d:set("many" .. i, i) end return """#);
        check(
            &lua,
            &[
                (r#"show(#d:get_keys())"#, "[1] 1024"),
                (r#"show(#d:get_keys(0))"#, "[1] 1100"),
                (r#"show(#d:get_keys(-1))"#, "[1] 1100"),
                (r#"show(#d:get_keys(2.7), #d:get_keys("2"))"#, "[2] 2, 2"),
                (
                    r#"show(d:set("q", 1, 0.1), d:set("q2", 1, 0.1), d:rpush("q3", 1), d:expire("q3", 0.1))"#,
                    "[4] true, true, 1, true",
                ),
            ],
        );
        advance(&d, 150);
        check(
            &lua,
            &[
                (r#"show(#d:get_keys(0))"#, "[1] 1100"),
                (r#"show(d:flush_expired(1))"#, "[1] 1"),
                (r#"show(d:flush_expired())"#, "[1] 2"),
                (r#"show(d:flush_expired(-1))"#, "[1] 0"),
                (r#"show(d:set("k1", "v1", 0, 3), d:flush_all())"#, "[1] true"),
                (r#"show(d:flush_all())"#, "[0] "),
                (r#"show(d:get("k1"), #d:get_keys(0))"#, "[2] nil, 0"),
                (r#"show(d:get_stale("k1"))"#, r#"[3] "v1", 3, true"#),
                (r#"show(d:ttl("k1") < 0)"#, "[1] true"),
                (r#"show(d:free_space() < d:capacity())"#, "[1] true"),
                (r#"show(d:flush_expired("5"))"#, "[1] 5"),
                (r#"show(d:flush_expired())"#, "[1] 1088"),
                (r#"show(d:free_space() == d:capacity(), #d:get_keys(0))"#, "[2] true, 0"),
            ],
        );
    }

    #[test]
    fn capacity_and_eviction() {
        let d = fresh(1 << 20);
        let lua = state(&[("d", &d)]);
        // Each item costs slab(64 + key + 100) = 256 bytes: 4096 fit in 1 MiB (nginx: 4032, it keeps 4
        // pages of the zone for its own bookkeeping).
        let fill = r#"
            local first
            for i = 1, 5000 do
                local ok, err, forcible = d:set("k" .. i, ("v"):rep(100))
                assert(ok, err)
                if forcible and not first then first = i end
            end
            return show(first)
        "#;
        assert_eq!(run(&lua, fill), "[1] 4097");
        check(
            &lua,
            &[
                (
                    r#"show(d:get("k1"), d:get("k904"), d:get("k905") == ("v"):rep(100), d:free_space())"#,
                    "[4] nil, nil, true, 0",
                ),
                (r#"show(d:safe_set("new", ("v"):rep(100)))"#, r#"[3] false, "no memory", false"#),
                (r#"show(d:safe_set("new", ("v"):rep(5000)))"#, r#"[3] false, "no memory", false"#),
                (r#"show(d:safe_add("new2", ("v"):rep(100)))"#, r#"[3] false, "no memory", false"#),
                (r#"show(d:safe_set("k5000", ("w"):rep(100)))"#, "[3] true, nil, false"),
                (r#"show(d:lpush("lst", "x"))"#, r#"[2] nil, "no memory""#),
                (r#"show(d:set("huge", ("v"):rep(2 * 1024 * 1024)))"#, r#"[3] false, "no memory", false"#),
                (r#"show(#d:get_keys(0))"#, "[1] 4096"),
                (r#"show(d:incr("cnt", 1, 0))"#, "[3] 1, nil, true"),
                (r#"show(d:set("big", ("v"):rep(10000)))"#, "[3] true, nil, true"),
                (r#"show(d:flush_all(), d:flush_expired(), d:free_space())"#, "[3] nil, 4046, 1048576"),
            ],
        );
        // get refreshes the LRU position.
        let lru = r#"
            d:set("old", "x")
            for i = 1, 20000 do
                if i % 100 == 0 then d:get("old") end
                d:set("k" .. i, ("v"):rep(100))
            end
            return show(d:get("old"))
        "#;
        assert_eq!(run(&lua, lru), r#"[1] "x""#);
        run(&lua, r#"d:flush_all() d:flush_expired() return """#);
        // Expired items go first, and evicting them is not "forcible".
        run(&lua, r#"d:set("valid", ("v"):rep(100)) d:set("exp", ("v"):rep(100), 0.01) return """#);
        advance(&d, 50);
        let fill = r#"
            for i = 1, 5000 do
                local ok, err, forcible = d:set("k" .. i, ("v"):rep(100))
                if forcible then return show(i, d:get_stale("exp"), d:get("valid")) end
            end
        "#;
        assert_eq!(run(&lua, fill), "[3] 4096, nil, nil");

        // A tiny dict.
        let s = fresh(12 * 1024);
        let lua = state(&[("small", &s)]);
        let fill = r#"
            for i = 1, 200 do
                local ok, err, forcible = d:set("k" .. i, "v")
                if not ok or forcible then return show(i, ok, err, forcible) end
            end
        "#;
        // 12 KiB / slab(64 + 3 + 1) = 96 items (nginx: 31, its bookkeeping eats most of such a zone).
        assert_eq!(run(&lua, fill), "[4] 97, true, nil, true");
        check(&lua, &[(r#"show(d:capacity())"#, "[1] 12288")]);
    }

    #[test]
    fn two_threads_share_a_dict() {
        let d = dict("shdict-test-threads", 1 << 20);
        let workers: Vec<_> = (0..2)
            .map(|id| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let lua = state(&[("counters", &d)]);
                    let code = format!(
                        r#"for i = 1, 2000 do assert(d:incr("hits", 1, 0)) end
                           d:set("from{id}", {id})
                           return show(d:capacity())"#
                    );
                    run(&lua, &code)
                })
            })
            .collect();
        for w in workers {
            assert_eq!(w.join().unwrap(), "[1] 1048576");
        }
        let lua = state(&[("counters", &d)]);
        check(&lua, &[(r#"show(d:get("hits"), d:get("from0"), d:get("from1"))"#, "[3] 4000, 0, 1")]);
    }

    #[test]
    fn dicts_survive_reload() {
        let old = dict("shdict-test-reload", 1 << 20);
        let lua = state(&[("sessions", &old)]);
        check(&lua, &[(r#"show(d:set("user", "alice", 0, 2))"#, "[3] true, nil, false")]);
        drop(lua);
        // "Reload": same name (with a new size), fresh Lua state.
        let new = dict("shdict-test-reload", 2 << 20);
        assert!(Arc::ptr_eq(&old, &new));
        let lua = state(&[("sessions", &new), ("other", &dict("shdict-test-reload-other", 8192))]);
        check(
            &lua,
            &[
                (r#"show(d:get("user"))"#, r#"[2] "alice", 2"#),
                (r#"show(d:capacity())"#, "[1] 1048576"),
                (r#"show(ngx.shared.other:get("user"), ngx.shared.other:capacity())"#, "[2] nil, 8192"),
            ],
        );
        // Re-registering on the same state (reload) updates the `ngx.shared` table scripts may hold.
        run(&lua, r#"held, held_d = ngx.shared, ngx.shared.sessions return """#);
        let ngx: Table = lua.globals().get("ngx").unwrap();
        register(&lua, &ngx, &[("sessions2".to_string(), new.clone())]).unwrap();
        check(
            &lua,
            &[
                (r#"show(held == ngx.shared, held.other, held.sessions)"#, "[3] true, nil, nil"),
                (r#"show(held.sessions2:get("user"), held_d:get("user"))"#, r#"[3] "alice", "alice", 2"#),
            ],
        );
    }
}
