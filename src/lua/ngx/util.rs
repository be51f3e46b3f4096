//! String helpers of the `ngx` API: base64, md5/sha1/hmac, crc32, URI escaping, query-string
//! encoding, SQL quoting and `ngx.null`.
//!
//! Each function reproduces lua-nginx-module 0.10.x with lua-resty-core (the pair OpenResty
//! ships), including its quirks: nginx's lenient base64 decoder, its exact escape sets, `+` as a
//! space when unescaping, `"truncated"` from `decode_args`. This file also holds small argument
//! helpers the sibling `ngx` modules share; errors are raised through [`super::raise`].

use mlua::{Function, IntoLua, LightUserData, Lua, LuaString, MultiValue, Result, Table, Value};

use super::raise::{api_function, raise};

/// Maximum number of pairs `ngx.decode_args` reads by default (NGX_HTTP_LUA_MAX_ARGS).
const MAX_ARGS: i64 = 100;

/// Raises `bad argument #n to 'fname' (msg)`.
pub(crate) fn arg_error(lua: &Lua, n: usize, fname: &str, msg: &str) -> Result<MultiValue> {
    raise(lua, format!("bad argument #{n} to '{fname}' ({msg})"))
}

/// Raises `bad argument #n to 'fname' (<expected> expected, got <type>)`.
pub(crate) fn type_error(lua: &Lua, n: usize, fname: &str, expected: &str, got: &Value) -> Result<MultiValue> {
    arg_error(lua, n, fname, &format!("{expected} expected, got {}", type_name(got)))
}

/// The type name Lua's `type()` reports.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) | Value::UserData(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        _ => "userdata",
    }
}

/// A Lua number as f64 (mlua hands integral numbers over as `Value::Integer`).
pub(crate) fn number(v: &Value) -> Option<f64> {
    match *v {
        Value::Integer(n) => Some(n as f64),
        Value::Number(n) => Some(n),
        _ => None,
    }
}

/// The `n`th (0-based) argument, nil when absent.
pub(crate) fn arg(args: &MultiValue, n: usize) -> &Value {
    const NIL: &Value = &Value::Nil;
    args.get(n).unwrap_or(NIL)
}

/// Lua's `tostring(v)`.
pub(crate) fn tostring(lua: &Lua, v: &Value) -> Result<LuaString> {
    match v {
        Value::String(s) => Ok(s.clone()),
        v => lua.globals().raw_get::<Function>("tostring")?.call(v),
    }
}

/// A string or number argument, as `luaL_checklstring` accepts.
fn check_string(lua: &Lua, v: &Value) -> Result<Option<LuaString>> {
    match v {
        Value::String(s) => Ok(Some(s.clone())),
        Value::Integer(_) | Value::Number(_) => lua.coerce_string(v.clone()),
        _ => Ok(None),
    }
}

/// resty.core's argument convention: nil and false become "", anything else goes through tostring.
fn string_or_empty(lua: &Lua, v: &Value) -> Result<LuaString> {
    match v {
        Value::Nil | Value::Boolean(false) => lua.create_string(""),
        v => tostring(lua, v),
    }
}

/// A single return value.
pub(crate) fn one(lua: &Lua, v: impl IntoLua) -> Result<MultiValue> {
    Ok(MultiValue::from_vec(vec![v.into_lua(lua)?]))
}

/// `ngx.null`: the NULL light userdata, shared with cjson's `cjson.null`.
pub fn null_value(_lua: &Lua) -> Value {
    Value::LightUserData(LightUserData(std::ptr::null_mut()))
}

/// Installs the string helpers into `ngx`.
pub fn register(lua: &Lua, ngx: &Table) -> Result<()> {
    ngx.raw_set("null", null_value(lua))?;

    ngx.raw_set(
        "encode_base64",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            let no_padding = match arg(&args, 1) {
                Value::Nil | Value::Boolean(false) => false,
                Value::Boolean(true) => true,
                v => return raise(lua, format!("bad no_padding: boolean expected, got {}", type_name(v))),
            };
            one(lua, lua.create_string(encode_base64(&s.as_bytes(), no_padding))?)
        })?,
    )?;
    ngx.raw_set(
        "decode_base64",
        api_function(lua, |lua, args| match arg(&args, 0) {
            Value::String(s) => match decode_base64(&s.as_bytes()) {
                Some(d) => one(lua, lua.create_string(d)?),
                None => one(lua, Value::Nil),
            },
            _ => raise(lua, "string argument only"),
        })?,
    )?;

    ngx.raw_set(
        "md5",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            one(lua, lua.create_string(hex(&md5_digest(&s.as_bytes())))?)
        })?,
    )?;
    ngx.raw_set(
        "md5_bin",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            one(lua, lua.create_string(md5_digest(&s.as_bytes()))?)
        })?,
    )?;
    ngx.raw_set(
        "sha1_bin",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &s.as_bytes());
            one(lua, lua.create_string(d.as_ref())?)
        })?,
    )?;
    ngx.raw_set(
        "hmac_sha1",
        api_function(lua, |lua, args| {
            if args.len() != 2 {
                return raise(lua, format!("expecting 2 arguments, but got {}", args.len()));
            }
            let mut parts = Vec::with_capacity(2);
            for i in 0..2 {
                match check_string(lua, arg(&args, i))? {
                    Some(s) => parts.push(s),
                    None => return type_error(lua, i + 1, "hmac_sha1", "string", arg(&args, i)),
                }
            }
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &parts[0].as_bytes());
            one(lua, lua.create_string(ring::hmac::sign(&key, &parts[1].as_bytes()).as_ref())?)
        })?,
    )?;
    // nginx's short and long variants are the same CRC-32 computed with different tables.
    for name in ["crc32_short", "crc32_long"] {
        ngx.raw_set(
            name,
            api_function(lua, |lua, args| {
                let s = string_or_empty(lua, arg(&args, 0))?;
                one(lua, Value::Number(crc32fast::hash(&s.as_bytes()) as f64))
            })?,
        )?;
    }

    ngx.raw_set(
        "escape_uri",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            let kind = match arg(&args, 1) {
                Value::Nil => ESCAPE_URI_COMPONENT,
                v @ (Value::Integer(_) | Value::Number(_)) => {
                    let n = number(v).unwrap_or_default();
                    if !(0.0..=6.0).contains(&n) {
                        let shown = tostring(lua, v)?;
                        let shown = shown.to_string_lossy();
                        return raise(lua, format!("\"type\" {shown} out of range"));
                    }
                    n as usize
                }
                _ => return raise(lua, "\"type\" is not a number"),
            };
            let bytes = s.as_bytes();
            match escape_uri(&bytes, kind) {
                Some(escaped) => one(lua, lua.create_string(escaped)?),
                None => one(lua, s.clone()),
            }
        })?,
    )?;
    ngx.raw_set(
        "unescape_uri",
        api_function(lua, |lua, args| {
            let s = string_or_empty(lua, arg(&args, 0))?;
            one(lua, lua.create_string(unescape_uri(&s.as_bytes()))?)
        })?,
    )?;

    ngx.raw_set(
        "encode_args",
        api_function(lua, |lua, args| {
            if args.len() != 1 {
                return raise(lua, format!("expecting 1 argument but seen {}", args.len()));
            }
            let Value::Table(t) = arg(&args, 0) else {
                return type_error(lua, 1, "encode_args", "table", arg(&args, 0));
            };
            match encode_args(lua, t)? {
                Ok(s) => one(lua, lua.create_string(s)?),
                Err(msg) => raise(lua, msg),
            }
        })?,
    )?;
    ngx.raw_set("decode_args", api_function(lua, decode_args)?)?;

    ngx.raw_set(
        "quote_sql_str",
        api_function(lua, |lua, args| {
            if args.len() != 1 {
                return raise(lua, "expecting one argument");
            }
            let Some(s) = check_string(lua, arg(&args, 0))? else {
                return type_error(lua, 1, "quote_sql_str", "string", arg(&args, 0));
            };
            one(lua, lua.create_string(quote_sql_str(&s.as_bytes()))?)
        })?,
    )?;
    Ok(())
}

fn md5_digest(data: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

fn hex(data: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    data.iter().flat_map(|b| [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]]).collect()
}

const BASE64_CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn encode_base64(src: &[u8], no_padding: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len().div_ceil(3) * 4);
    for chunk in src.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        let sextets = [n >> 18, n >> 12, n >> 6, n].map(|x| BASE64_CHARS[(x & 63) as usize]);
        let keep = chunk.len() + 1;
        out.extend_from_slice(&sextets[..keep]);
        if !no_padding {
            out.extend(std::iter::repeat_n(b'=', 4 - keep));
        }
    }
    out
}

/// nginx's `ngx_decode_base64`: input ends at the first `=` (anything after it is ignored),
/// missing padding is fine, and leftover bits are dropped; only a stray character or a length
/// of 4n+1 fails.
fn decode_base64(src: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        BASE64_CHARS.iter().position(|&x| x == c).map(|v| v as u32)
    }
    let len = src.iter().position(|&c| c == b'=').unwrap_or(src.len());
    let vals = src[..len].iter().map(|&c| value(c)).collect::<Option<Vec<u32>>>()?;
    if vals.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(vals.len() / 4 * 3 + 2);
    for q in vals.chunks(4) {
        out.push((q[0] << 2 | q[1] >> 4) as u8);
        if q.len() > 2 {
            out.push((q[1] << 4 | q[2] >> 2) as u8);
        }
        if q.len() > 3 {
            out.push((q[2] << 6 | q[3]) as u8);
        }
    }
    Some(out)
}

const ESCAPE_URI_COMPONENT: usize = 2;

/// Bytes each escape type of `ngx.escape_uri` leaves alone, as observed from lua-nginx-module:
/// 0 URI, 1 ARGS, 2 URI_COMPONENT, 3 HTML, 4 REFRESH, 5 MEMCACHED, 6 MAIL_AUTH.
const UNESCAPED: [[bool; 256]; 7] = [
    byte_set(&[(33, 34), (36, 36), (38, 62), (64, 126)]),
    byte_set(&[(33, 34), (36, 36), (38, 42), (44, 62), (64, 126)]),
    byte_set(&[(33, 33), (39, 42), (45, 46), (48, 57), (65, 90), (95, 95), (97, 122), (126, 126)]),
    byte_set(&[(33, 33), (36, 36), (38, 38), (40, 126)]),
    byte_set(&[(33, 33), (35, 38), (40, 126)]),
    byte_set(&[(33, 36), (38, 255)]),
    byte_set(&[(33, 36), (38, 255)]),
];

const fn byte_set(ranges: &[(u8, u8)]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < ranges.len() {
        let mut b = ranges[i].0 as usize;
        while b <= ranges[i].1 as usize {
            set[b] = true;
            b += 1;
        }
        i += 1;
    }
    set
}

/// `None` when nothing needs escaping.
fn escape_uri(src: &[u8], kind: usize) -> Option<Vec<u8>> {
    let keep = &UNESCAPED[kind];
    let n = src.iter().filter(|&&b| !keep[b as usize]).count();
    if n == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(src.len() + 2 * n);
    escape_into(&mut out, src, keep);
    Some(out)
}

fn escape_into(out: &mut Vec<u8>, src: &[u8], keep: &[bool; 256]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for &b in src {
        if keep[b as usize] {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]]);
        }
    }
}

/// nginx's NGX_UNESCAPE_URI_COMPONENT: `+` is a space, and a `%` not followed by two hex digits
/// is kept literally, the bytes after it being read afresh.
fn unescape_uri(src: &[u8]) -> Vec<u8> {
    fn hex_value(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        match src[i] {
            b'%' => match (src.get(i + 1).and_then(|&c| hex_value(c)), src.get(i + 2).and_then(|&c| hex_value(c))) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                (Some(_), None) => {
                    out.extend_from_slice(&src[i..i + 2]);
                    i += 2;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// `Ok(Err(msg))` for a table `ngx.encode_args` refuses.
fn encode_args(lua: &Lua, t: &Table) -> Result<std::result::Result<Vec<u8>, String>> {
    let keep = &UNESCAPED[ESCAPE_URI_COMPONENT];
    let mut out = Vec::new();
    let pair = |out: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>| {
        if !out.is_empty() {
            out.push(b'&');
        }
        escape_into(out, key, keep);
        if let Some(value) = value {
            out.push(b'=');
            escape_into(out, value, keep);
        }
    };
    for entry in t.pairs::<Value, Value>() {
        let (key, value) = entry?;
        let Value::String(key) = key else {
            return Ok(Err("attempt to use a non-string key in the \"args\" option table".into()));
        };
        let key = key.as_bytes();
        match value {
            Value::Boolean(true) => pair(&mut out, &key, None),
            Value::Boolean(false) => {}
            v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
                let v = lua.coerce_string(v)?.expect("string or number");
                pair(&mut out, &key, Some(&v.as_bytes()));
            }
            Value::Table(values) => {
                for v in values.pairs::<Value, Value>() {
                    match v?.1 {
                        Value::Boolean(true) => pair(&mut out, &key, None),
                        Value::Boolean(false) => {}
                        v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
                            let v = lua.coerce_string(v)?.expect("string or number");
                            pair(&mut out, &key, Some(&v.as_bytes()));
                        }
                        v => return Ok(Err(format!("attempt to use {} as query arg value", type_name(&v)))),
                    }
                }
            }
            v => return Ok(Err(format!("attempt to use {} as query arg value", type_name(&v)))),
        }
    }
    Ok(Ok(out))
}

fn decode_args(lua: &Lua, args: MultiValue) -> Result<MultiValue> {
    if args.is_empty() || args.len() > 2 {
        return raise(lua, format!("expecting 1 or 2 arguments but seen {}", args.len()));
    }
    let Some(s) = check_string(lua, arg(&args, 0))? else {
        return type_error(lua, 1, "decode_args", "string", arg(&args, 0));
    };
    let max = if args.len() == 2 {
        match lua.coerce_number(arg(&args, 1).clone())? {
            Some(n) => n as i64,
            None => return type_error(lua, 2, "decode_args", "number", arg(&args, 1)),
        }
    } else {
        MAX_ARGS
    };
    let t = lua.create_table_with_capacity(0, 4)?;
    let bytes = s.as_bytes();
    let add = |key: &[u8], value: Option<&[u8]>| -> Result<()> {
        let key = unescape_uri(key);
        if key.is_empty() {
            return Ok(());
        }
        let value = match value {
            Some(v) => Value::String(lua.create_string(unescape_uri(v))?),
            None => Value::Boolean(true),
        };
        let key = lua.create_string(key)?;
        match t.raw_get::<Value>(&key)? {
            Value::Nil => t.raw_set(key, value),
            Value::Table(list) => list.raw_set(list.raw_len() + 1, value),
            old => t.raw_set(key, lua.create_sequence_from([old, value])?),
        }
    };
    let mut count = 0;
    let mut pairs = bytes.split(|&b| b == b'&').peekable();
    while let Some(pair) = pairs.next() {
        let last = pairs.peek().is_none();
        if last && pair.is_empty() {
            break;
        }
        match pair.iter().position(|&b| b == b'=') {
            Some(eq) => add(&pair[..eq], Some(&pair[eq + 1..]))?,
            None => add(pair, None)?,
        }
        if !last {
            count += 1;
            if max > 0 && count == max {
                return Ok(MultiValue::from_vec(vec![Value::Table(t), Value::String(lua.create_string("truncated")?)]));
            }
        }
    }
    one(lua, t)
}

/// MySQL-style escaping of ASCII specials inside single quotes, as `ngx.quote_sql_str` does.
fn quote_sql_str(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + 2);
    out.push(b'\'');
    for &b in src {
        let escaped = match b {
            0 => b'0',
            b'\x08' => b'b',
            b'\t' => b't',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\x1a' => b'Z',
            b'\\' | b'\'' | b'"' => b,
            _ => {
                out.push(b);
                continue;
            }
        };
        out.extend_from_slice(&[b'\\', escaped]);
    }
    out.push(b'\'');
    out
}

/// Test support shared by the `ngx` modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use mlua::{Lua, Result, Table};

    /// `show(...)` renders values as one line: tables as `{k=v ...}` with sorted keys (nested
    /// lists as `{a,b}`), several values joined by ` | `, as the probes run in nginx printed them.
    const SHOW: &str = r##"
        local function fmt(v)
            if type(v) ~= "table" then return tostring(v) end
            local keys = {}
            for k in pairs(v) do keys[#keys + 1] = k end
            table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
            local parts = {}
            for _, k in ipairs(keys) do
                local x = v[k]
                if type(x) == "table" then
                    local q = {}
                    for i, y in ipairs(x) do q[i] = tostring(y) end
                    x = "{" .. table.concat(q, ",") .. "}"
                end
                parts[#parts + 1] = tostring(k) .. "=" .. tostring(x)
            end
            return "{" .. table.concat(parts, " ") .. "}"
        end
        function show(...)
            local t = {}
            for i = 1, select("#", ...) do t[i] = fmt((select(i, ...))) end
            return table.concat(t, " | ")
        end
    "##;

    /// A LuaJIT state with `ngx` holding what `register` installs, plus `show`.
    pub(crate) fn state(register: fn(&Lua, &Table) -> Result<()>) -> Lua {
        let lua = Lua::new();
        let ngx = lua.create_table().unwrap();
        register(&lua, &ngx).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        lua.load(SHOW).exec().unwrap();
        lua
    }

    /// Evaluates a Lua expression that yields a string; error positions read `t:LINE:`.
    pub(crate) fn eval(lua: &Lua, expr: &str) -> String {
        lua.load(format!("return {expr}")).set_name("=t").eval::<mlua::LuaString>().unwrap().to_string_lossy()
    }

    /// Evaluates a Lua expression that yields a byte string.
    pub(crate) fn eval_bytes(lua: &Lua, expr: &str) -> Vec<u8> {
        lua.load(format!("return {expr}")).eval::<mlua::LuaString>().unwrap().as_bytes().to_vec()
    }
}

/// Expected values below were printed by nginx 1.22 with lua-nginx-module 0.10.23 and
/// lua-resty-core 0.1.25 running the same expressions.
#[cfg(test)]
mod tests {
    use super::testing::{eval, eval_bytes, state};

    #[test]
    fn escape_uri_sets_per_type() {
        let lua = state(super::register);
        let kept = |t: u32| {
            eval(
                &lua,
                &format!(
                    r#"(function()
                        local keep = {{}}
                        for b = 0, 255 do
                            local c = string.char(b)
                            if ngx.escape_uri(c, {t}) == c then keep[#keep + 1] = b end
                        end
                        local out, i = {{}}, 1
                        while i <= #keep do
                            local j = i
                            while j < #keep and keep[j + 1] == keep[j] + 1 do j = j + 1 end
                            out[#out + 1] = keep[i] == keep[j] and tostring(keep[i]) or (keep[i] .. "-" .. keep[j])
                            i = j + 1
                        end
                        return table.concat(out, ",")
                    end)()"#
                ),
            )
        };
        assert_eq!(kept(0), "33-34,36,38-62,64-126");
        assert_eq!(kept(1), "33-34,36,38-42,44-62,64-126");
        assert_eq!(kept(2), "33,39-42,45-46,48-57,65-90,95,97-122,126");
        assert_eq!(kept(3), "33,36,38,40-126");
        assert_eq!(kept(4), "33,35-38,40-126");
        assert_eq!(kept(5), "33-36,38-255");
        assert_eq!(kept(6), "33-36,38-255");
    }

    #[test]
    fn escape_and_unescape_uri() {
        let lua = state(super::register);
        assert_eq!(eval(&lua, r#"ngx.escape_uri("a b/ü~")"#), "a%20b%2F%C3%BC~");
        assert_eq!(eval(&lua, r#"ngx.escape_uri("a b/ü~", 0)"#), "a%20b/%C3%BC~");
        assert_eq!(
            eval(&lua, r#"ngx.escape_uri(nil) .. "|" .. ngx.escape_uri(12) .. "|" .. ngx.escape_uri(false)"#),
            "|12|"
        );
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.escape_uri, "x", 7))"#), "\"type\" 7 out of range");
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.escape_uri, "x", "2"))"#), "\"type\" is not a number");
        let cases: [(&str, &[u8]); 19] = [
            ("%%41", b"%A"),
            ("%4%41", b"%4A"),
            ("%4z", b"%4z"),
            ("%z4", b"%z4"),
            ("%%", b"%%"),
            ("%%%", b"%%%"),
            ("%4", b"%4"),
            ("%", b"%"),
            ("%g1", b"%g1"),
            ("%1g", b"%1g"),
            ("%%4", b"%%4"),
            ("%a%41", b"%aA"),
            ("%0041", b"\x0041"),
            ("%+", b"% "),
            ("%4+", b"%4 "),
            ("a%2", b"a%2"),
            ("%FF%fF%ff", b"\xff\xff\xff"),
            ("%%%41%", b"%%A%"),
            ("a+b%20c%zz%4", b"a b c%zz%4"),
        ];
        for (input, expected) in cases {
            assert_eq!(eval_bytes(&lua, &format!("ngx.unescape_uri({input:?})")), expected, "{input}");
        }
        assert_eq!(eval(&lua, r#"ngx.unescape_uri(nil) .. "|" .. ngx.unescape_uri(1.5)"#), "|1.5");
    }

    #[test]
    fn encode_args() {
        let lua = state(super::register);
        assert_eq!(eval(&lua, r#"ngx.encode_args({foo = "a b&c=d/é"})"#), "foo=a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            eval(&lua, r#"show(ngx.encode_args({foo = true}), ngx.encode_args({foo = false}), ngx.encode_args({}))"#),
            "foo |  | "
        );
        assert_eq!(eval(&lua, r#"ngx.encode_args({foo = {1, "x y", true, false}})"#), "foo=1&foo=x%20y&foo");
        assert_eq!(
            eval(
                &lua,
                r#"show(ngx.encode_args({foo = 3.5}), ngx.encode_args({foo = 1e100}), ngx.encode_args({["a b"] = 1}))"#
            ),
            "foo=3.5 | foo=1e%2B100 | a%20b=1"
        );
        assert_eq!(eval(&lua, r#"ngx.encode_args({a = {}}) .. "|" .. ngx.encode_args({a = ""})"#), "|a=");
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.encode_args, {[1] = "x"}))"#),
            r#"attempt to use a non-string key in the "args" option table"#
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.encode_args, {a = function() end}))"#),
            "attempt to use function as query arg value"
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.encode_args, {a = {"x", {}}}))"#),
            "attempt to use table as query arg value"
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.encode_args, "x"))"#),
            "bad argument #1 to 'encode_args' (table expected, got string)"
        );
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.encode_args))"#), "expecting 1 argument but seen 0");
    }

    #[test]
    fn decode_args() {
        let lua = state(super::register);
        assert_eq!(
            eval(&lua, r#"show(ngx.decode_args("a=1&b=2&a=3&c&d=&=e&&f=x%20y+z&g=%ZZ"))"#),
            "{a={1,3} b=2 c=true d= f=x y z g=%ZZ}"
        );
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1&b=2&c=3", 2))"#), "{a=1 b=2} | truncated");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1&b=2&c=3", 0))"#), "{a=1 b=2 c=3}");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1&b=2", 2))"#), "{a=1 b=2}");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1&b=2&", 2))"#), "{a=1 b=2} | truncated");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("&&&a=1", 2))"#), "{} | truncated");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1=2&b"))"#), "{a=1=2 b=true}");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a&a&a=1"))"#), "{a={true,true,1}}");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a+b=c+d&%61=x"))"#), "{a=x a b=c d}");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args("a=1&b=2&c=3", 2.9))"#), "{a=1 b=2} | truncated");
        assert_eq!(eval(&lua, r#"show(ngx.decode_args(12))"#), "{12=true}");
        assert_eq!(
            eval(
                &lua,
                r#"(function() local t = {} for i = 1, 120 do t[i] = "k" .. i .. "=" .. i end
                local n = 0 for _ in pairs(ngx.decode_args(table.concat(t, "&"))) do n = n + 1 end
                return tostring(n) end)()"#
            ),
            "100"
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.decode_args, "a=1", nil))"#),
            "bad argument #2 to 'decode_args' (number expected, got nil)"
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.decode_args, "a=1", 1, 2))"#),
            "expecting 1 or 2 arguments but seen 3"
        );
    }

    #[test]
    fn base64() {
        let lua = state(super::register);
        assert_eq!(
            eval(
                &lua,
                r#"show(ngx.encode_base64("hello"), ngx.encode_base64("hello", true), ngx.encode_base64(""), ngx.encode_base64(nil), ngx.encode_base64(12))"#
            ),
            "aGVsbG8= | aGVsbG8 |  |  | MTI="
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.encode_base64, "x", 1))"#),
            "bad no_padding: boolean expected, got number"
        );
        assert_eq!(
            eval(
                &lua,
                r#"show(ngx.decode_base64("aGVsbG8="), ngx.decode_base64("aGVsbG8"), ngx.decode_base64("aGVsbG8=="), ngx.decode_base64("a"), ngx.decode_base64(""))"#
            ),
            "hello | hello | hello | nil | "
        );
        assert_eq!(
            eval(
                &lua,
                r#"show(ngx.decode_base64("aGVs bG8="), ngx.decode_base64("aGV*bG8="), ngx.decode_base64("aGVsbG8=x"), ngx.decode_base64("YQ"), ngx.decode_base64("YR=="), ngx.decode_base64("_-8"))"#
            ),
            "nil | nil | hello | a | a | nil"
        );
        assert_eq!(eval(&lua, r#"show(ngx.decode_base64("YWJj\n"), ngx.decode_base64("YW=j"))"#), "nil | a");
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.decode_base64, 12))"#), "string argument only");
    }

    #[test]
    fn digests_and_checksums() {
        let lua = state(super::register);
        assert_eq!(
            eval(&lua, r#"show(ngx.md5("hello"), ngx.md5(nil), ngx.md5(12), #ngx.md5_bin("x"))"#),
            "5d41402abc4b2a76b9719d911017c592 | d41d8cd98f00b204e9800998ecf8427e | c20ad4d76fe97759aa27a0c99bff6710 | 16"
        );
        assert_eq!(
            eval(&lua, r#"show(ngx.encode_base64(ngx.sha1_bin("hello")), ngx.encode_base64(ngx.sha1_bin(nil)))"#),
            "qvTGHdzF6KLavt4PO0gs2a6pQ00= | 2jmj7l5rSw0yVb/vlWAYkK/YBwk="
        );
        assert_eq!(
            eval(&lua, r#"ngx.encode_base64(ngx.hmac_sha1("key", "The quick brown fox jumps over the lazy dog"))"#),
            "3nybhbi3iqa8ino29wqQcBydtNk="
        );
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.hmac_sha1, "key"))"#), "expecting 2 arguments, but got 1");
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.hmac_sha1, "key", nil))"#),
            "bad argument #2 to 'hmac_sha1' (string expected, got nil)"
        );
        assert_eq!(
            eval(
                &lua,
                r#"show(ngx.crc32_short("hello"), ngx.crc32_long("hello"), ngx.crc32_short(""), ngx.crc32_long(nil), ngx.crc32_short(12))"#
            ),
            "907060870 | 907060870 | 0 | 0 | 1330857165"
        );
    }

    #[test]
    fn quote_sql_str_and_null() {
        let lua = state(super::register);
        assert_eq!(
            eval_bytes(&lua, r#"ngx.quote_sql_str("\0\b\t\n\r\026\\'\"%_\127")"#),
            b"'\\0\\b\\t\\n\\r\\Z\\\\\\'\\\"%_\x7f'"
        );
        assert_eq!(
            eval(&lua, r#"show(ngx.quote_sql_str(""), ngx.quote_sql_str(12), ngx.quote_sql_str("é'"))"#),
            "'' | '12' | 'é\\''"
        );
        assert_eq!(
            eval(&lua, r#"select(2, pcall(ngx.quote_sql_str, nil))"#),
            "bad argument #1 to 'quote_sql_str' (string expected, got nil)"
        );
        assert_eq!(
            eval(&lua, r#"show(ngx.null, type(ngx.null), ngx.null == nil)"#),
            "userdata: NULL | userdata | false"
        );
    }
}
