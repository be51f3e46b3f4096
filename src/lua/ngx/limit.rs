//! `luagate.limit`: the rate and concurrency limiters of `phase::limit` as
//! Lua objects, in the shape of lua-resty-limit-traffic, so an access script
//! can combine keys (`luagate.limit.combine`, after `resty.limit.traffic`).
//!
//! * `luagate.limit.req(zone, rate, burst)`: `incoming(key, commit)` →
//!   `delay, excess` (seconds, requests) or `nil, "rejected"`; `uncommit`,
//!   `set_rate`, `set_burst`.
//! * `luagate.limit.conn(zone, max, burst, default_conn_delay)`:
//!   `incoming(key, commit)` → `delay, conn` or `nil, "rejected"`;
//!   `leaving(key, req_latency)`, `uncommit`, `is_committed`, `set_conn`, `set_burst`.
//! * `luagate.limit.count(zone, limit, window)`: `incoming(key, commit)` →
//!   `0, remaining` or `nil, "rejected"`; `uncommit`.
//!
//! `zone` names a zone of `limit_zones` (state shared by all workers, kept
//! across reloads); an unknown one gives `nil, "zone not found"` (resty:
//! "shared dict not found"). `require "resty.limit.req"` (`.conn`,
//! `.count`, `.traffic`) gives the same objects under resty's names, with
//! the zone in place of the shared dict. Decisions are local (no Redis).

use std::sync::Arc;

use mlua::{Lua, LuaString, MultiValue, Table, UserData, UserDataRef, Value};

use crate::limit::{zone, Bucket, Zone, ZoneError};

const MODULE: &str = r#"
local zone_of, req_in, req_un, conn_in, conn_out, count_in, count_un = ...
local setmetatable, floor, error, type, tostring = setmetatable, math.floor, error, type, tostring

local M = {}

local function key_of(key)
    local t = type(key)
    if t == "string" then return key end
    if t == "number" then return tostring(key) end
    error("bad argument #1 to 'incoming' (string expected, got " .. t .. ")", 3)
end

local function number(v, what, ok)
    if type(v) ~= "number" or not ok(v) then
        error("bad " .. what .. ": " .. tostring(v), 3)
    end
    return v
end

local req = {}
req.__index = req

function M.req(zone, rate, burst)
    local z = zone_of(zone)
    if not z then return nil, "zone not found" end
    number(rate, "rate", function(v) return v > 0 end)
    number(burst, "burst", function(v) return v >= 0 end)
    return setmetatable({ zone = z, rate = rate * 1000, burst = burst * 1000 }, req)
end

function req.incoming(self, key, commit)
    local excess, err = req_in(self.zone, key_of(key), self.rate, self.burst, commit and true or false)
    if not excess then return nil, err end
    return excess / self.rate, excess / 1000
end

function req.uncommit(self, key)
    return req_un(self.zone, key_of(key))
end

function req.set_rate(self, rate)
    self.rate = number(rate, "rate", function(v) return v > 0 end) * 1000
end

function req.set_burst(self, burst)
    self.burst = number(burst, "burst", function(v) return v >= 0 end) * 1000
end

local conn = {}
conn.__index = conn

function M.conn(zone, max, burst, default_conn_delay)
    local z = zone_of(zone)
    if not z then return nil, "zone not found" end
    number(max, "max", function(v) return v > 0 end)
    number(burst, "burst", function(v) return v >= 0 end)
    number(default_conn_delay, "default_conn_delay", function(v) return v > 0 end)
    return setmetatable({ zone = z, max = max, burst = burst, unit_delay = default_conn_delay }, conn)
end

function conn.incoming(self, key, commit)
    self.committed = false
    local n, err = conn_in(self.zone, key_of(key), self.max + self.burst, commit and true or false)
    if not n then return nil, err end
    if commit then self.committed = true end
    if n > self.max then
        return self.unit_delay * floor((n - 1) / self.max), n
    end
    return 0, n
end

function conn.is_committed(self)
    return self.committed
end

function conn.leaving(self, key, req_latency)
    local n, err = conn_out(self.zone, key_of(key))
    if not n then return nil, err end
    if req_latency then
        self.unit_delay = (req_latency + self.unit_delay) / 2
    end
    return n
end

function conn.uncommit(self, key)
    return conn_out(self.zone, key_of(key))
end

function conn.set_conn(self, max)
    self.max = number(max, "max", function(v) return v > 0 end)
end

function conn.set_burst(self, burst)
    self.burst = number(burst, "burst", function(v) return v >= 0 end)
end

local count = {}
count.__index = count

function M.count(zone, limit, window)
    local z = zone_of(zone)
    if not z then return nil, "zone not found" end
    number(limit, "limit", function(v) return v > 0 end)
    number(window, "window", function(v) return v > 0 end)
    return setmetatable({ zone = z, limit = limit, window = window }, count)
end

function count.incoming(self, key, commit)
    local remaining, err = count_in(self.zone, key_of(key), self.limit, self.window, commit and true or false)
    if not remaining then return nil, err end
    return 0, remaining
end

function count.uncommit(self, key)
    return count_un(self.zone, key_of(key))
end

-- All limiters must admit: each is checked, and counted only when none rejects.
function M.combine(limiters, keys, states)
    local n = #limiters
    local max_delay = 0
    for i = 1, n do
        local delay, err = limiters[i]:incoming(keys[i], i == n)
        if not delay then return nil, err end
        if i == n then
            if states then states[i] = err end
            max_delay = delay
        end
    end
    for i = 1, n - 1 do
        local delay, err = limiters[i]:incoming(keys[i], true)
        if not delay then
            for j = 1, i - 1 do limiters[j]:uncommit(keys[j]) end
            limiters[n]:uncommit(keys[n])
            return nil, err
        end
        if states then states[i] = err end
        if delay > max_delay then max_delay = delay end
    end
    return max_delay
end

return M
"#;

/// A zone as Lua holds it.
struct ZoneRef(Arc<Zone>);

impl UserData for ZoneRef {}

fn fail(lua: &Lua, e: ZoneError) -> mlua::Result<MultiValue> {
    let msg = match e {
        ZoneError::Full => "zone full".to_string(),
        ZoneError::WrongKind => "zone abused by other users".to_string(),
        ZoneError::NotFound => "not found".to_string(),
    };
    Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(msg)?)]))
}

fn rejected(lua: &Lua) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string("rejected")?)]))
}

fn one(v: impl mlua::IntoLua, lua: &Lua) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![v.into_lua(lua)?]))
}

pub fn register(lua: &Lua, luagate: &Table) -> mlua::Result<()> {
    let zone_of = lua.create_function(|_, name: String| Ok(zone::lookup(&name).map(ZoneRef)))?;
    let req_in = lua.create_function(
        |lua, (z, key, rate, burst, commit): (UserDataRef<ZoneRef>, LuaString, f64, f64, bool)| {
            let bucket = Bucket { rate: rate.max(1.0) as u64, burst: burst.max(0.0) as u64 };
            match z.0.req(&key.as_bytes(), bucket, commit, crate::limit::now_us()) {
                Ok(d) if d.admitted => one(d.excess as f64, lua),
                Ok(_) => rejected(lua),
                Err(e) => fail(lua, e),
            }
        },
    )?;
    let req_un = lua.create_function(|lua, (z, key): (UserDataRef<ZoneRef>, LuaString)| {
        match z.0.req_uncommit(&key.as_bytes()) {
            Ok(()) => one(true, lua),
            Err(e) => fail(lua, e),
        }
    })?;
    let conn_in =
        lua.create_function(|lua, (z, key, most, commit): (UserDataRef<ZoneRef>, LuaString, f64, bool)| {
            match z.0.conn_acquire(&key.as_bytes(), most.max(0.0) as u64, commit) {
                Ok(Ok(n)) => one(n as f64, lua),
                Ok(Err(_)) => rejected(lua),
                Err(e) => fail(lua, e),
            }
        })?;
    let conn_out = lua.create_function(|lua, (z, key): (UserDataRef<ZoneRef>, LuaString)| {
        match z.0.conn_release(&key.as_bytes()) {
            Ok(n) => one(n as f64, lua),
            Err(e) => fail(lua, e),
        }
    })?;
    let count_in = lua.create_function(
        |lua, (z, key, limit, window, commit): (UserDataRef<ZoneRef>, LuaString, f64, f64, bool)| {
            let window_us = (window * 1_000_000.0).max(1.0) as u64;
            match z.0.count(&key.as_bytes(), limit as i64, window_us, commit, crate::limit::now_us()) {
                Ok(Ok(left)) => one(left as f64, lua),
                Ok(Err(_)) => rejected(lua),
                Err(e) => fail(lua, e),
            }
        },
    )?;
    let count_un = lua.create_function(|lua, (z, key): (UserDataRef<ZoneRef>, LuaString)| {
        match z.0.count_uncommit(&key.as_bytes()) {
            Ok(left) => one(left as f64, lua),
            Err(e) => fail(lua, e),
        }
    })?;
    let module: Table = lua
        .load(MODULE)
        .set_name("=luagate.limit")
        .call((zone_of, req_in, req_un, conn_in, conn_out, count_in, count_un))?;
    luagate.set("limit", module.clone())?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("luagate.limit", module.clone())?;
    // lua-resty-limit-traffic's module names: `new(zone, ...)` builds the same objects.
    for (name, ctor) in [("req", "req"), ("conn", "conn"), ("count", "count")] {
        let m = lua.create_table()?;
        m.set("new", module.get::<mlua::Function>(ctor)?)?;
        m.set("_VERSION", "0.09")?;
        loaded.set(format!("resty.limit.{name}"), m)?;
    }
    let traffic = lua.create_table()?;
    traffic.set("combine", module.get::<mlua::Function>("combine")?)?;
    loaded.set("resty.limit.traffic", traffic)?;
    Ok(())
}
