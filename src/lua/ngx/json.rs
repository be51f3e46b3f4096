//! `cjson` and `cjson.safe`: lua-cjson as bundled with OpenResty (2.1.0.x), ported to Rust.
//!
//! Scripts use it exactly as under OpenResty: `local cjson = require "cjson"` (errors are raised)
//! or `require "cjson.safe"` (errors come back as `nil, err`). The port follows OpenResty's
//! `lua_cjson.c` closely, quirks included:
//!
//! * numbers are written with `%.<precision>g` (precision 14 by default, 1..=16), so `1e+20`,
//!   `0.33333333333333` and `-0`; NaN/Infinity raise "Cannot serialise number: must not be NaN
//!   or Infinity" unless `encode_invalid_numbers` is `true` (`NaN`, `Infinity`) or `"null"`;
//! * `/` is written as `\/` (switchable with `encode_escape_forward_slash`, a setting that, as
//!   in C, applies to every instance in the Lua state), control bytes as `\u001f`, bytes >= 0x80
//!   are copied untouched (no UTF-8 validation);
//! * a table is an array when every key is a positive integer, unless it is "excessively sparse"
//!   (`encode_sparse_array`, defaults: convert off, ratio 2, safe 10); otherwise an object whose
//!   number keys are written as strings; `{}` is `{}` unless `encode_empty_table_as_object(false)`;
//!   `cjson.empty_array`, `cjson.array_mt` and `cjson.empty_array_mt` force arrays;
//! * decoding: JSON `null` is `cjson.null` (the same light userdata as `ngx.null`), numbers are
//!   Lua numbers (doubles), `\u` escapes (surrogate pairs included) become UTF-8, error messages
//!   are lua-cjson's ("Expected value but found invalid token at character 1");
//! * nesting limits (`encode_max_depth`/`decode_max_depth`, default 1000), and past them the
//!   LuaJIT stack limit lua-cjson runs into, give the same errors at the same depths.
//!
//! Like the C code, encoder and decoder work on the Lua stack through the raw API (one protected
//! call per `encode`/`decode`): open tables live on the stack rather than as mlua handles (of
//! which LuaJIT allows only about 8000 at a time), no allocation pays for its own protected call
//! under a memory limit, and both loops are iterative, so deep documents cannot exhaust the Rust
//! stack.
//!
//! Errors are raised as plain strings through the `ngx` API wrapper (`error(msg, 2)`, see
//! [`super::raise`]), so they carry the caller's `file:line:` prefix exactly when LuaJIT would add
//! one for a C function, and argument errors read "bad argument #1 to 'decode' (string expected,
//! got nil)".

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::rc::Rc;

use mlua::{ffi, LightUserData, Lua, LuaString, MultiValue, RegistryKey, Table, Value};

use super::raise::{api_function, raise};

/// `cjson._VERSION`.
const VERSION: &str = "2.1.0.11";
/// LuaJIT's `LUAI_MAXCSTACK`: `lua_checkstack` fails past this many slots in one C frame.
const MAX_C_STACK: usize = 8000;
/// Output buffer size of lua-cjson's `fpconv_g_fmt`.
const NUMBER_BUF: usize = 32;

/// Address behind `cjson.empty_array` (a light userdata that encodes as `[]`).
static EMPTY_ARRAY_TAG: u8 = 0;

fn empty_array() -> LightUserData {
    LightUserData(std::ptr::addr_of!(EMPTY_ARRAY_TAG) as *mut c_void)
}

/// Make `require "cjson"` and `require "cjson.safe"` work (package.preload or package.loaded),
/// sharing `null` with `ngx.null`.
pub fn register(lua: &mlua::Lua, null: mlua::Value) -> mlua::Result<()> {
    let (array_mt, empty_array_mt) = (lua.create_table()?, lua.create_table()?);
    let shared = Rc::new(Shared {
        null_key: lua.create_registry_value(null.clone())?,
        array_mt_key: lua.create_registry_value(array_mt.clone())?,
        empty_array_mt_key: lua.create_registry_value(empty_array_mt.clone())?,
        null,
        array_mt,
        empty_array_mt,
        escape_slash: Cell::new(true),
    });
    let package: Table = lua.globals().get("package")?;
    let preload: Table = package.get("preload")?;
    for (name, safe) in [("cjson", false), ("cjson.safe", true)] {
        let shared = shared.clone();
        let loader = lua.create_function(move |lua, _: MultiValue| new_instance(lua, &shared, safe))?;
        preload.set(name, loader)?;
    }
    Ok(())
}

/// State shared by every cjson instance of one Lua state.
struct Shared {
    null: Value,
    array_mt: Table,
    empty_array_mt: Table,
    /// The same three values, for the raw-API encoder and decoder.
    null_key: RegistryKey,
    array_mt_key: RegistryKey,
    empty_array_mt_key: RegistryKey,
    /// lua-cjson keeps the `/` escape in a process-wide table; every instance sees the last
    /// `encode_escape_forward_slash` call.
    escape_slash: Cell<bool>,
}

#[derive(Clone, Copy)]
struct Config {
    sparse_convert: u8,
    sparse_ratio: i32,
    sparse_safe: i32,
    encode_max_depth: i32,
    decode_max_depth: i32,
    /// 0: error, 1: `NaN`/`Infinity`, 2: `null`.
    encode_invalid_numbers: u8,
    decode_invalid_numbers: u8,
    keep_buffer: u8,
    precision: i32,
    empty_table_as_object: u8,
    decode_array_with_array_mt: u8,
    escape_forward_slash: u8,
    skip_unsupported: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sparse_convert: 0,
            sparse_ratio: 2,
            sparse_safe: 10,
            encode_max_depth: 1000,
            decode_max_depth: 1000,
            encode_invalid_numbers: 0,
            decode_invalid_numbers: 1,
            keep_buffer: 1,
            precision: 14,
            empty_table_as_object: 1,
            decode_array_with_array_mt: 0,
            escape_forward_slash: 1,
            skip_unsupported: 0,
        }
    }
}

/// One `cjson` module table's configuration (`cjson.new()` makes another).
struct Instance {
    cfg: Cell<Config>,
    /// Kept between calls when `encode_keep_buffer` is on (never borrowed across Lua calls).
    buf: RefCell<Vec<u8>>,
}

/// Why a call failed.
enum Fail {
    /// `luaL_error`: message without position.
    Run(String),
    /// `luaL_argerror(narg, msg)`.
    Arg(usize, String),
    /// An mlua error: memory errors become lua-cjson's strings, others pass through.
    Lua(mlua::Error),
}

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Self {
        Fail::Lua(e)
    }
}

type Res<T> = Result<T, Fail>;

/// The name LuaJIT's `luaL_argerror` would give the function running one level up (the wrapper).
fn arg_message(lua: &Lua, mut narg: usize, msg: &str) -> String {
    let (name, method) = lua
        .inspect_stack(1, |d| {
            let n = d.names();
            (n.name.map(|s| s.into_owned()), n.name_what == Some("method"))
        })
        .unwrap_or((None, false));
    let name = name.unwrap_or_else(|| "?".to_owned());
    if method {
        narg -= 1;
        if narg == 0 {
            return format!("calling '{name}' on bad self ({msg})");
        }
    }
    format!("bad argument #{narg} to '{name}' ({msg})")
}

/// Turns a result into what the API function returns or raises (see [`super::raise`]). `safe`:
/// errors are returned as `nil, err` (`cjson.safe`), and argument errors name the function `?` as
/// they do under lua-cjson's internal `pcall`.
fn finish(lua: &Lua, safe: bool, res: Res<Vec<Value>>) -> mlua::Result<MultiValue> {
    let soft = |msg: String| Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(msg)?)]));
    match res {
        Ok(vals) => Ok(MultiValue::from_vec(vals)),
        // What a C module would see: a string error (in `cjson.safe`, from its `lua_pcall`).
        Err(Fail::Lua(mlua::Error::MemoryError(_))) if safe => {
            raise(lua, "Memory allocation error in CJSON protected call")
        }
        Err(Fail::Lua(mlua::Error::MemoryError(_))) => raise(lua, "not enough memory"),
        Err(Fail::Lua(e)) => Err(e),
        Err(Fail::Run(msg)) if safe => soft(msg),
        Err(Fail::Run(msg)) => raise(lua, msg),
        Err(Fail::Arg(narg, msg)) if safe => soft(format!("bad argument #{narg} to '?' ({msg})")),
        Err(Fail::Arg(narg, msg)) => raise(lua, arg_message(lua, narg, &msg)),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) => "userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        Value::UserData(_) | Value::Error(_) => "userdata",
        _ => "cdata",
    }
}

// ===== module construction =====

fn new_instance(lua: &Lua, shared: &Rc<Shared>, safe: bool) -> mlua::Result<Table> {
    let inst = Rc::new(Instance { cfg: Cell::new(Config::default()), buf: RefCell::new(Vec::new()) });
    let m = lua.create_table()?;

    let (sh, ins) = (shared.clone(), inst.clone());
    let encode = api_function(lua, move |lua, args| {
        if args.len() != 1 {
            return raise(lua, arg_message(lua, 1, "expected 1 argument"));
        }
        let v = args.into_iter().next().unwrap_or(Value::Nil);
        let res = encode_value(lua, &sh, &ins, v).map(|s| vec![Value::String(s)]);
        finish(lua, safe, res)
    })?;
    m.raw_set("encode", encode)?;

    let (sh, ins) = (shared.clone(), inst.clone());
    let decode = api_function(lua, move |lua, args| {
        if args.len() != 1 {
            return raise(lua, arg_message(lua, 1, "expected 1 argument"));
        }
        let v = args.into_iter().next().unwrap_or(Value::Nil);
        let res = decode_value(lua, &sh, &ins, v).map(|v| vec![v]);
        finish(lua, safe, res)
    })?;
    m.raw_set("decode", decode)?;

    type CfgFn = fn(&Lua, &Shared, &mut Config, &[Value]) -> Res<Vec<Value>>;
    let cfg_fns: [(&str, usize, CfgFn); 11] = [
        ("encode_empty_table_as_object", 1, |l, _, c, a| bool_opt(l, &a[0], &mut c.empty_table_as_object)),
        ("decode_array_with_array_mt", 1, |l, _, c, a| bool_opt(l, &a[0], &mut c.decode_array_with_array_mt)),
        ("encode_sparse_array", 3, |l, _, c, a| {
            let mut out = bool_opt(l, &a[0], &mut c.sparse_convert)?;
            out.extend(int_opt(l, &a[1], 2, &mut c.sparse_ratio, 0, i32::MAX)?);
            out.extend(int_opt(l, &a[2], 3, &mut c.sparse_safe, 0, i32::MAX)?);
            Ok(out)
        }),
        ("encode_max_depth", 1, |l, _, c, a| int_opt(l, &a[0], 1, &mut c.encode_max_depth, 1, i32::MAX)),
        ("decode_max_depth", 1, |l, _, c, a| int_opt(l, &a[0], 1, &mut c.decode_max_depth, 1, i32::MAX)),
        ("encode_number_precision", 1, |l, _, c, a| int_opt(l, &a[0], 1, &mut c.precision, 1, 16)),
        ("encode_keep_buffer", 1, |l, _, c, a| bool_opt(l, &a[0], &mut c.keep_buffer)),
        ("encode_invalid_numbers", 1, |l, _, c, a| {
            enum_opt(l, &a[0], &mut c.encode_invalid_numbers, &["off", "on", "null"])
        }),
        ("decode_invalid_numbers", 1, |l, _, c, a| bool_opt(l, &a[0], &mut c.decode_invalid_numbers)),
        ("encode_escape_forward_slash", 1, |l, sh, c, a| {
            let out = bool_opt(l, &a[0], &mut c.escape_forward_slash)?;
            // The C code edits a global escape table, so this reaches every instance.
            sh.escape_slash.set(c.escape_forward_slash != 0);
            Ok(out)
        }),
        ("encode_skip_unsupported_value_types", 1, |l, _, c, a| bool_opt(l, &a[0], &mut c.skip_unsupported)),
    ];
    for (name, nargs, f) in cfg_fns {
        let (sh, ins) = (shared.clone(), inst.clone());
        let f = api_function(lua, move |lua, args| {
            let res = if args.len() > nargs {
                Err(Fail::Arg(nargs + 1, "found too many arguments".into()))
            } else {
                let mut a: Vec<Value> = args.into_iter().collect();
                a.resize(nargs, Value::Nil);
                let mut cfg = ins.cfg.get();
                let out = f(lua, &sh, &mut cfg, &a);
                // As in C, options parsed before a failing argument stay set.
                ins.cfg.set(cfg);
                out
            };
            finish(lua, false, res)
        })?;
        m.raw_set(name, f)?;
    }

    let sh = shared.clone();
    m.raw_set("new", lua.create_function(move |lua, _: MultiValue| new_instance(lua, &sh, safe))?)?;
    m.raw_set("null", shared.null.clone())?;
    m.raw_set("empty_array_mt", shared.empty_array_mt.clone())?;
    m.raw_set("array_mt", shared.array_mt.clone())?;
    m.raw_set("empty_array", empty_array())?;
    m.raw_set("_NAME", "cjson")?;
    m.raw_set("_VERSION", VERSION)?;
    Ok(m)
}

// ===== configuration helpers (json_enum_option / json_integer_option) =====

/// `luaL_checkinteger` as LuaJIT does it, narrowed to C `int` like lua-cjson's `int value`.
fn check_int(lua: &Lua, v: &Value, narg: usize) -> Res<i32> {
    let n = match v {
        Value::Integer(_) | Value::Number(_) | Value::String(_) => lua.coerce_number(v.clone())?,
        _ => None,
    };
    let Some(n) = n else {
        return Err(Fail::Arg(narg, format!("number expected, got {}", type_name(v))));
    };
    // (lua_Integer)n on x86-64 yields INT64_MIN when out of range; then truncated to int.
    let i = if (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&n) { n as i64 } else { i64::MIN };
    Ok(i as i32)
}

fn int_opt(lua: &Lua, v: &Value, narg: usize, setting: &mut i32, min: i32, max: i32) -> Res<Vec<Value>> {
    if !v.is_nil() {
        let value = check_int(lua, v, narg)?;
        if !(min <= value && value <= max) {
            // lua-cjson always reports argument #1 for the range check.
            return Err(Fail::Arg(1, format!("expected integer between {min} and {max}")));
        }
        *setting = value;
    }
    Ok(vec![Value::Integer(i64::from(*setting))])
}

/// `json_enum_option` for on/off settings.
fn bool_opt(lua: &Lua, v: &Value, setting: &mut u8) -> Res<Vec<Value>> {
    enum_opt(lua, v, setting, &["off", "on"])
}

/// `json_enum_option` (`bool_true == 1`): a boolean or an option name (`luaL_checkoption`, which
/// takes numbers as strings); the argument is always #1 where lua-cjson uses it.
fn enum_opt(lua: &Lua, v: &Value, setting: &mut u8, options: &[&str]) -> Res<Vec<Value>> {
    match v {
        Value::Nil => {}
        Value::Boolean(b) => *setting = u8::from(*b),
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            let s = lua.coerce_string(v.clone())?.map(|s| s.as_bytes().to_vec()).unwrap_or_default();
            match options.iter().position(|o| o.as_bytes() == s.as_slice()) {
                Some(i) => *setting = i as u8,
                None => return Err(Fail::Arg(1, format!("invalid option '{}'", String::from_utf8_lossy(&s)))),
            }
        }
        other => return Err(Fail::Arg(1, format!("string expected, got {}", type_name(other)))),
    }
    if *setting <= 1 {
        return Ok(vec![Value::Boolean(*setting == 1)]);
    }
    // Settings other than off/on are returned by name.
    Ok(vec![Value::String(lua.create_string(options[usize::from(*setting)])?)])
}

// ===== encoding =====

/// `printf("%.*g", precision, n)`, as lua-cjson's `fpconv_g_fmt` does.
fn format_number(buf: &mut Vec<u8>, n: f64, precision: i32) {
    // Integers with at most `precision` digits print as plain integers under %g.
    if n.floor() == n && n.abs() < 1e15 && n.abs() < 10f64.powi(precision) && (n != 0.0 || n.is_sign_positive()) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = (n as i64).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0.0 {
            buf.push(b'-');
        }
        buf.extend_from_slice(&digits[i..]);
        return;
    }
    let mut tmp = [0u8; NUMBER_BUF];
    // SAFETY: the format string is NUL-terminated and takes exactly an int and a double; the
    // output is bounded by the buffer length passed in.
    let len = unsafe {
        libc::snprintf(
            tmp.as_mut_ptr().cast::<libc::c_char>(),
            NUMBER_BUF,
            c"%.*g".as_ptr(),
            precision as libc::c_int,
            n,
        )
    };
    let len = usize::try_from(len).unwrap_or(0).min(NUMBER_BUF - 1);
    buf.extend_from_slice(&tmp[..len]);
}

fn append_string(buf: &mut Vec<u8>, s: &[u8], escape_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'/' if escape_slash => b"\\/",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0..=0x1f | 0x7f => {
                buf.extend_from_slice(&s[start..i]);
                buf.extend_from_slice(b"\\u00");
                buf.push(HEX[usize::from(c >> 4)]);
                buf.push(HEX[usize::from(c & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        buf.extend_from_slice(&s[start..i]);
        buf.extend_from_slice(esc);
        start = i + 1;
    }
    buf.extend_from_slice(&s[start..]);
    buf.push(b'"');
}

/// A table being written (the table itself, and for an object the current key, sit on the Lua
/// stack as in lua-cjson).
struct Frame {
    /// Array length, or `None` for an object.
    len: Option<i64>,
    /// Next array index.
    index: i64,
    depth: i32,
    /// Elements written so far (lua-cjson's `comma`).
    count: u32,
}

/// What writing the value on top of the stack did.
enum Step {
    Done,
    /// An unsupported value skipped under `encode_skip_unsupported_value_types`.
    Skipped,
    /// A table was opened (bracket written, frame pushed).
    Open,
}

/// Encoder state living outside the raw Lua call (so a Lua error unwinding through that call
/// skips no destructor).
struct Encoder<'a> {
    cfg: Config,
    escape_slash: bool,
    buf: &'a mut Vec<u8>,
    frames: &'a mut Vec<Frame>,
    array_mt: c_int,
    empty_array_mt: c_int,
}

/// `lua_typename` of the value at `idx`.
///
/// # Safety
/// `state` is a valid Lua state and `idx` a valid index.
unsafe fn type_at(state: *mut ffi::lua_State, idx: c_int) -> String {
    let name = ffi::lua_typename(state, ffi::lua_type(state, idx));
    std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
}

/// The bytes of the string at `idx` (which must be a string, so nothing is converted).
///
/// # Safety
/// `state` is a valid Lua state and the value at `idx` a string, alive while the slice is used.
unsafe fn str_at<'s>(state: *mut ffi::lua_State, idx: c_int) -> &'s [u8] {
    let mut len = 0;
    let p = ffi::lua_tolstring(state, idx, &mut len);
    std::slice::from_raw_parts(p.cast(), len)
}

impl Encoder<'_> {
    fn number(&mut self, n: f64) -> Res<()> {
        if !n.is_finite() {
            let s: &[u8] = match self.cfg.encode_invalid_numbers {
                0 => return Err(Fail::Run("Cannot serialise number: must not be NaN or Infinity".into())),
                1 if n.is_nan() => b"NaN",
                1 if n < 0.0 => b"-Infinity",
                1 => b"Infinity",
                _ => b"null",
            };
            self.buf.extend_from_slice(s);
            return Ok(());
        }
        format_number(self.buf, n, self.cfg.precision);
        Ok(())
    }

    /// Whether the metatable on top of the stack is the registry value `id`.
    ///
    /// # Safety
    /// `state` is the running state with a free stack slot.
    unsafe fn is_registry_value(&self, state: *mut ffi::lua_State, id: c_int) -> bool {
        ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, id.into());
        let equal = ffi::lua_rawequal(state, -1, -2) != 0;
        ffi::lua_pop(state, 1);
        equal
    }

    /// `json_append_data` for the value on top of the stack.
    ///
    /// # Safety
    /// `state` is the running Lua state, inside a protected call.
    unsafe fn value(&mut self, state: *mut ffi::lua_State, depth: i32) -> Res<Step> {
        match ffi::lua_type(state, -1) {
            ffi::LUA_TSTRING => append_string(self.buf, str_at(state, -1), self.escape_slash),
            ffi::LUA_TNUMBER => self.number(ffi::lua_tonumber(state, -1))?,
            ffi::LUA_TBOOLEAN => {
                let b = ffi::lua_toboolean(state, -1) != 0;
                self.buf.extend_from_slice(if b { b"true" } else { b"false" });
            }
            ffi::LUA_TTABLE => return self.table(state, depth + 1),
            ffi::LUA_TNIL => self.buf.extend_from_slice(b"null"),
            ffi::LUA_TLIGHTUSERDATA => {
                let p = ffi::lua_touserdata(state, -1);
                if p.is_null() {
                    self.buf.extend_from_slice(b"null");
                } else if p == empty_array().0 {
                    self.buf.extend_from_slice(b"[]");
                }
                // Any other light userdata writes nothing, as in lua-cjson.
            }
            _ => {
                if self.cfg.skip_unsupported != 0 {
                    return Ok(Step::Skipped);
                }
                return Err(Fail::Run(format!("Cannot serialise {}: type not supported", type_at(state, -1))));
            }
        }
        Ok(Step::Done)
    }

    /// The table part of `json_append_data`, table on top of the stack.
    ///
    /// # Safety
    /// `state` is the running Lua state, inside a protected call.
    unsafe fn table(&mut self, state: *mut ffi::lua_State, depth: i32) -> Res<Step> {
        // lua-cjson's json_check_encode_depth: key, value and an error message must fit.
        if depth > self.cfg.encode_max_depth || ffi::lua_checkstack(state, 3) == 0 {
            return Err(Fail::Run(format!("Cannot serialise, excessive nesting ({depth})")));
        }
        let has_mt = ffi::lua_getmetatable(state, -1) != 0;
        let mut empty_mt = false;
        let forced = has_mt && self.is_registry_value(state, self.array_mt);
        if has_mt {
            empty_mt = self.is_registry_value(state, self.empty_array_mt);
            ffi::lua_pop(state, 1);
        }
        let len = if forced { ffi::lua_objlen(state, -1) as i64 } else { self.array_length(state)? };
        if forced || len > 0 || (len == 0 && self.cfg.empty_table_as_object == 0) {
            if len <= 0 {
                self.buf.extend_from_slice(b"[]");
                return Ok(Step::Done);
            }
            self.buf.push(b'[');
            self.frames.push(Frame { len: Some(len), index: 1, depth, count: 0 });
            return Ok(Step::Open);
        }
        if empty_mt {
            self.buf.extend_from_slice(b"[]");
            return Ok(Step::Done);
        }
        self.buf.push(b'{');
        ffi::lua_pushnil(state);
        self.frames.push(Frame { len: None, index: 0, depth, count: 0 });
        Ok(Step::Open)
    }

    /// `lua_array_length` for the table on top: its array size, or -1 for an object. Mirrors
    /// the C `int` arithmetic.
    ///
    /// # Safety
    /// `state` is the running Lua state with two free stack slots.
    unsafe fn array_length(&mut self, state: *mut ffi::lua_State) -> Res<i64> {
        let (mut max, mut items) = (0i32, 0i32);
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, -2) != 0 {
            let k = ffi::lua_tonumber(state, -2);
            if ffi::lua_type(state, -2) == ffi::LUA_TNUMBER && k != 0.0 && k.floor() == k && k >= 1.0 {
                if k > f64::from(max) {
                    // (int)k: x86-64 gives INT_MIN when out of range.
                    max = if k < 2_147_483_648.0 { k as i32 } else { i32::MIN };
                }
                items = items.wrapping_add(1);
                ffi::lua_pop(state, 1);
                continue;
            }
            ffi::lua_pop(state, 2);
            return Ok(-1);
        }
        let cfg = &self.cfg;
        if cfg.sparse_ratio > 0 && max > items.wrapping_mul(cfg.sparse_ratio) && max > cfg.sparse_safe {
            if cfg.sparse_convert == 0 {
                return Err(Fail::Run("Cannot serialise table: excessively sparse array".into()));
            }
            return Ok(-1);
        }
        Ok(i64::from(max))
    }

    /// Writes the key at -2 of an object entry (`json_append_object`).
    ///
    /// # Safety
    /// `state` is the running Lua state with a key at -2.
    unsafe fn key(&mut self, state: *mut ffi::lua_State) -> Res<()> {
        match ffi::lua_type(state, -2) {
            ffi::LUA_TNUMBER => {
                self.buf.push(b'"');
                self.number(ffi::lua_tonumber(state, -2))?;
                self.buf.extend_from_slice(b"\":");
            }
            ffi::LUA_TSTRING => {
                append_string(self.buf, str_at(state, -2), self.escape_slash);
                self.buf.push(b':');
            }
            _ => {
                let ty = type_at(state, -2);
                return Err(Fail::Run(format!("Cannot serialise {ty}: table key must be a number or string")));
            }
        }
        Ok(())
    }

    /// Writes the value on top of the stack. An iterative `json_append_data`: the stack holds
    /// what lua-cjson's recursion holds, so `lua_checkstack` gives up at the same depth.
    ///
    /// # Safety
    /// `state` is the running Lua state, inside a protected call.
    unsafe fn run(&mut self, state: *mut ffi::lua_State) -> Res<()> {
        if !matches!(self.value(state, 0)?, Step::Open) {
            return Ok(());
        }
        while let Some(frame) = self.frames.last_mut() {
            let pos = self.buf.len();
            let more = match frame.len {
                Some(len) if frame.index <= len => {
                    ffi::lua_rawgeti(state, -1, frame.index);
                    frame.index += 1;
                    true
                }
                Some(_) => false,
                None => ffi::lua_next(state, -2) != 0,
            };
            if !more {
                self.buf.push(if frame.len.is_some() { b']' } else { b'}' });
                self.frames.pop();
                if !self.frames.is_empty() {
                    ffi::lua_pop(state, 1);
                }
                continue;
            }
            if frame.count > 0 {
                self.buf.push(b',');
            }
            frame.count += 1;
            let (first, depth, object) = (frame.count == 1, frame.depth, frame.len.is_none());
            if object {
                self.key(state)?;
            }
            match self.value(state, depth)? {
                Step::Open => continue,
                Step::Done => {}
                Step::Skipped => {
                    self.buf.truncate(pos);
                    if first {
                        if let Some(frame) = self.frames.last_mut() {
                            frame.count = 0;
                        }
                    }
                }
            }
            ffi::lua_pop(state, 1);
        }
        Ok(())
    }
}

fn encode_value(lua: &Lua, shared: &Shared, inst: &Instance, v: Value) -> Res<LuaString> {
    let cfg = inst.cfg.get();
    let mut buf = if cfg.keep_buffer != 0 { std::mem::take(&mut *inst.buf.borrow_mut()) } else { Vec::new() };
    buf.clear();
    let mut frames = Vec::new();
    let mut enc = Encoder {
        cfg,
        escape_slash: shared.escape_slash.get(),
        buf: &mut buf,
        frames: &mut frames,
        array_mt: shared.array_mt_key.id(),
        empty_array_mt: shared.empty_array_mt_key.id(),
    };
    let mut outcome = Ok(());
    // SAFETY: `exec_raw` runs the closure in a protected call on the running state, with `v` as
    // the only value in the frame, as lua-cjson's `json_encode` has it; the closure only borrows
    // (a Lua error unwinding through it skips no destructor). `Encoder::run` only reads tables
    // (no Lua code runs) and keeps the stack within what `lua_checkstack` granted.
    unsafe {
        lua.exec_raw::<()>(v, |state| {
            outcome = enc.run(state);
            ffi::lua_settop(state, 0);
        })?;
    }
    let out = outcome.and_then(|()| Ok(lua.create_string(&buf)?));
    if cfg.keep_buffer != 0 {
        *inst.buf.borrow_mut() = buf;
    }
    out
}

// ===== decoding =====

#[derive(Clone, Copy, PartialEq)]
enum Tok {
    ObjBegin,
    ObjEnd,
    ArrBegin,
    ArrEnd,
    Str,
    Number(f64),
    Integer(f64),
    Boolean(bool),
    Null,
    Colon,
    Comma,
    End,
    Error(&'static str),
}

impl Tok {
    fn name(self) -> &'static str {
        match self {
            Tok::ObjBegin => "T_OBJ_BEGIN",
            Tok::ObjEnd => "T_OBJ_END",
            Tok::ArrBegin => "T_ARR_BEGIN",
            Tok::ArrEnd => "T_ARR_END",
            Tok::Str => "T_STRING",
            Tok::Number(_) => "T_NUMBER",
            Tok::Integer(_) => "T_INTEGER",
            Tok::Boolean(_) => "T_BOOLEAN",
            Tok::Null => "T_NULL",
            Tok::Colon => "T_COLON",
            Tok::Comma => "T_COMMA",
            Tok::End => "T_END",
            Tok::Error(what) => what,
        }
    }
}

struct Token {
    tok: Tok,
    /// 0-based offset reported (+1) in error messages.
    index: usize,
}

struct Parser<'a> {
    data: &'a [u8],
    ptr: usize,
    cfg: Config,
    /// Decoded text of the last `T_STRING` token.
    tmp: Vec<u8>,
}

fn hex_digit(c: u8) -> Option<u32> {
    (c as char).to_digit(16)
}

impl Parser<'_> {
    /// The byte at `i`; NUL past the end, like the C string terminator.
    fn at(&self, i: usize) -> u8 {
        self.data.get(i).copied().unwrap_or(0)
    }

    fn starts_with(&self, s: &[u8]) -> bool {
        self.data.get(self.ptr..).is_some_and(|d| d.starts_with(s))
    }

    fn hex4(&self, i: usize) -> Option<u32> {
        let mut v = 0;
        for j in 0..4 {
            v = (v << 4) | hex_digit(self.at(i + j))?;
        }
        Some(v)
    }

    /// `json_append_unicode_escape`, with `ptr` at the backslash.
    fn unicode_escape(&mut self) -> bool {
        let Some(mut cp) = self.hex4(self.ptr + 2) else { return false };
        let mut len = 6;
        if cp & 0xF800 == 0xD800 {
            if cp & 0x400 != 0 || self.at(self.ptr + 6) != b'\\' || self.at(self.ptr + 7) != b'u' {
                return false;
            }
            let Some(low) = self.hex4(self.ptr + 8) else { return false };
            if low & 0xFC00 != 0xDC00 {
                return false;
            }
            cp = (((cp & 0x3FF) << 10) | (low & 0x3FF)) + 0x10000;
            len = 12;
        }
        let mut utf8 = [0u8; 4];
        let n = if cp <= 0x7F {
            utf8[0] = cp as u8;
            1
        } else if cp <= 0x7FF {
            utf8[0] = ((cp >> 6) | 0xC0) as u8;
            utf8[1] = ((cp & 0x3F) | 0x80) as u8;
            2
        } else if cp <= 0xFFFF {
            utf8[0] = ((cp >> 12) | 0xE0) as u8;
            utf8[1] = (((cp >> 6) & 0x3F) | 0x80) as u8;
            utf8[2] = ((cp & 0x3F) | 0x80) as u8;
            3
        } else {
            utf8[0] = ((cp >> 18) | 0xF0) as u8;
            utf8[1] = (((cp >> 12) & 0x3F) | 0x80) as u8;
            utf8[2] = (((cp >> 6) & 0x3F) | 0x80) as u8;
            utf8[3] = ((cp & 0x3F) | 0x80) as u8;
            4
        };
        self.tmp.extend_from_slice(&utf8[..n]);
        self.ptr += len;
        true
    }

    fn string_token(&mut self) -> Token {
        self.ptr += 1;
        self.tmp.clear();
        loop {
            let start = self.ptr;
            while !matches!(self.at(self.ptr), b'"' | b'\\' | 0) {
                self.ptr += 1;
            }
            self.tmp.extend_from_slice(&self.data[start..self.ptr]);
            match self.at(self.ptr) {
                b'"' => break,
                0 => return Token { tok: Tok::Error("unexpected end of string"), index: self.ptr },
                _ => {
                    let ch = match self.at(self.ptr + 1) {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b't' => b'\t',
                        b'n' => b'\n',
                        b'f' => 0x0c,
                        b'r' => b'\r',
                        b'u' => {
                            if self.unicode_escape() {
                                continue;
                            }
                            return Token { tok: Tok::Error("invalid unicode escape code"), index: self.ptr };
                        }
                        _ => return Token { tok: Tok::Error("invalid escape code"), index: self.ptr },
                    };
                    self.tmp.push(ch);
                    self.ptr += 2;
                }
            }
        }
        self.ptr += 1;
        Token { tok: Tok::Str, index: 0 }
    }

    /// `json_is_invalid_number`: forms `strtod` takes but strict JSON does not.
    fn is_invalid_number(&self) -> bool {
        let mut p = self.ptr;
        match self.at(p) {
            b'+' => return true,
            b'-' => p += 1,
            _ => {}
        }
        let c = self.at(p);
        if c == b'0' {
            let c2 = self.at(p + 1);
            return c2 | 0x20 == b'x' || c2.is_ascii_digit();
        }
        if c <= b'9' {
            return false;
        }
        let rest = self.data.get(p..p + 3).unwrap_or(&[]);
        rest.eq_ignore_ascii_case(b"inf") || rest.eq_ignore_ascii_case(b"nan")
    }

    /// `json_next_number_token`: a plain decimal integer is a `T_INTEGER` (pushed with
    /// `lua_pushinteger`, so `-0` is `0`); anything else is read the way `strtod` would.
    fn number_token(&mut self) -> Token {
        let start = self.ptr;
        let mut p = start;
        if matches!(self.at(p), b'+' | b'-') {
            p += 1;
        }
        let digits = p;
        while self.at(p).is_ascii_digit() {
            p += 1;
        }
        if p > digits && !matches!(self.at(p), b'.' | b'e' | b'E' | b'x' | b'X') {
            let text = std::str::from_utf8(&self.data[start..p]).unwrap_or("0");
            let n = match text.parse::<i64>() {
                Ok(i) => i as f64,
                // Outside int64: read as a double (lua-cjson would saturate strtoll here).
                Err(_) => text.parse::<f64>().unwrap_or(0.0),
            };
            self.ptr = p;
            return Token { tok: Tok::Integer(n), index: start };
        }
        match strtod(self.data, start) {
            Some((n, end)) => {
                self.ptr = end;
                Token { tok: Tok::Number(n), index: start }
            }
            None => Token { tok: Tok::Error("invalid number"), index: start },
        }
    }

    fn next_token(&mut self) -> Token {
        while matches!(self.at(self.ptr), b' ' | b'\t' | b'\n' | b'\r') {
            self.ptr += 1;
        }
        let index = self.ptr;
        let single = |tok| Token { tok, index };
        let c = self.at(self.ptr);
        let tok = match c {
            b'{' => Tok::ObjBegin,
            b'}' => Tok::ObjEnd,
            b'[' => Tok::ArrBegin,
            b']' => Tok::ArrEnd,
            b',' => Tok::Comma,
            b':' => Tok::Colon,
            0 => return single(Tok::End),
            b'"' => {
                let mut t = self.string_token();
                if t.tok == Tok::Str {
                    t.index = index;
                }
                return t;
            }
            b'-' | b'0'..=b'9' => {
                if self.cfg.decode_invalid_numbers == 0 && self.is_invalid_number() {
                    return single(Tok::Error("invalid number"));
                }
                return self.number_token();
            }
            b'f' | b'i' | b'I' | b'n' | b'N' | b't' | b'+' => {
                for (word, tok) in
                    [(&b"true"[..], Tok::Boolean(true)), (b"false", Tok::Boolean(false)), (b"null", Tok::Null)]
                {
                    if self.starts_with(word) {
                        self.ptr += word.len();
                        return single(tok);
                    }
                }
                if self.cfg.decode_invalid_numbers != 0 && self.is_invalid_number() {
                    return self.number_token();
                }
                return single(Tok::Error("invalid token"));
            }
            _ => return single(Tok::Error("invalid token")),
        };
        self.ptr += 1;
        single(tok)
    }
}

/// `strtod` (C locale) on `data[start..]`: the value and the end offset, or `None` when no
/// number could be read.
fn strtod(data: &[u8], start: usize) -> Option<(f64, usize)> {
    let at = |i: usize| data.get(i).copied().unwrap_or(0);
    let mut p = start;
    let neg = match at(p) {
        b'-' => {
            p += 1;
            true
        }
        b'+' => {
            p += 1;
            false
        }
        _ => false,
    };
    let sign = |v: f64| if neg { -v } else { v };
    let word = |p: usize, w: &[u8]| data.get(p..p + w.len()).is_some_and(|s| s.eq_ignore_ascii_case(w));
    if word(p, b"inf") {
        let end = if word(p, b"infinity") { p + 8 } else { p + 3 };
        return Some((sign(f64::INFINITY), end));
    }
    if word(p, b"nan") {
        let mut end = p + 3;
        if at(end) == b'(' {
            let mut q = end + 1;
            while at(q).is_ascii_alphanumeric() || at(q) == b'_' {
                q += 1;
            }
            if at(q) == b')' {
                end = q + 1;
            }
        }
        return Some((sign(f64::NAN), end));
    }
    if at(p) == b'0' && at(p + 1) | 0x20 == b'x' {
        if let Some((v, end)) = hex_float(data, p + 2) {
            return Some((sign(v), end));
        }
        // "0x" without digits: just the 0.
        return Some((sign(0.0), p + 1));
    }
    let mant = p;
    while at(p).is_ascii_digit() {
        p += 1;
    }
    let mut ndigits = p - mant;
    if at(p) == b'.' {
        let q = p + 1;
        let mut r = q;
        while at(r).is_ascii_digit() {
            r += 1;
        }
        ndigits += r - q;
        if ndigits > 0 {
            p = r;
        }
    }
    if ndigits == 0 {
        return None;
    }
    if at(p) | 0x20 == b'e' {
        let mut q = p + 1;
        if matches!(at(q), b'+' | b'-') {
            q += 1;
        }
        if at(q).is_ascii_digit() {
            while at(q).is_ascii_digit() {
                q += 1;
            }
            p = q;
        }
    }
    let text = std::str::from_utf8(&data[mant..p]).ok()?;
    let v: f64 = text.parse().ok()?;
    Some((sign(v), p))
}

/// The hexadecimal part of `strtod` ("1F", "1.8p3"), starting after "0x".
fn hex_float(data: &[u8], start: usize) -> Option<(f64, usize)> {
    let at = |i: usize| data.get(i).copied().unwrap_or(0);
    let mut p = start;
    let mut v = 0.0f64;
    let mut any = false;
    while let Some(d) = hex_digit(at(p)) {
        v = v * 16.0 + f64::from(d);
        any = true;
        p += 1;
    }
    let mut scale = 0i32;
    if at(p) == b'.' {
        let mut q = p + 1;
        let mut frac_any = false;
        while let Some(d) = hex_digit(at(q)) {
            v = v * 16.0 + f64::from(d);
            scale -= 4;
            frac_any = true;
            q += 1;
        }
        if any || frac_any {
            p = q;
            any = true;
        }
    }
    if !any {
        return None;
    }
    if at(p) | 0x20 == b'p' {
        let mut q = p + 1;
        let neg = match at(q) {
            b'-' => {
                q += 1;
                true
            }
            b'+' => {
                q += 1;
                false
            }
            _ => false,
        };
        if at(q).is_ascii_digit() {
            let mut e: i32 = 0;
            while at(q).is_ascii_digit() {
                e = e.saturating_mul(10).saturating_add(i32::from(at(q) - b'0'));
                q += 1;
            }
            scale = scale.saturating_add(if neg { -e } else { e });
            p = q;
        }
    }
    Some((v * 2f64.powi(scale), p))
}

/// An open container (its table, and for an object the pending key, sit on the Lua stack).
struct Open {
    object: bool,
    /// Next array index.
    next: i64,
}

/// Decoder state living outside the raw Lua call (so a Lua error unwinding through that call
/// skips no destructor).
struct Decoder<'a> {
    p: Parser<'a>,
    open: Vec<Open>,
    depth: i32,
    /// Lua stack slots lua-cjson would be using (for the `lua_checkstack` limit).
    slots: usize,
    array_mt: c_int,
    null: c_int,
}

impl Decoder<'_> {
    fn parse_error(&self, expected: &str, t: &Token) -> Fail {
        Fail::Run(format!("Expected {expected} but found {} at character {}", t.tok.name(), t.index + 1))
    }

    /// `json_decode_descend`; `need` is 3 for objects, 2 for arrays.
    fn descend(&mut self, need: usize) -> Res<()> {
        self.depth += 1;
        if self.depth <= self.p.cfg.decode_max_depth && self.slots + need <= MAX_C_STACK {
            return Ok(());
        }
        Err(Fail::Run(format!("Found too many nested data structures ({}) at character {}", self.depth, self.p.ptr)))
    }

    /// Checks `"key" :` starting at token `t`, pushes the key and leaves the value's first token
    /// in `t`.
    ///
    /// # Safety
    /// `state` is the running Lua state, inside a protected call, with a free stack slot.
    unsafe fn object_key(&mut self, state: *mut ffi::lua_State, t: &mut Token) -> Res<()> {
        if t.tok != Tok::Str {
            return Err(self.parse_error("object key string", t));
        }
        ffi::lua_pushlstring(state, self.p.tmp.as_ptr().cast(), self.p.tmp.len());
        *t = self.p.next_token();
        if t.tok != Tok::Colon {
            return Err(self.parse_error("colon", t));
        }
        *t = self.p.next_token();
        Ok(())
    }

    /// Parses the document, leaving its value on the stack. The port of `json_process_value`
    /// and the two `json_parse_*_context` functions, made iterative: open containers (and
    /// pending object keys) stay on the Lua stack exactly as in C.
    ///
    /// # Safety
    /// `state` is the running Lua state, inside a protected call (allocation failures raise Lua
    /// errors), with an empty stack frame.
    unsafe fn run(&mut self, state: *mut ffi::lua_State) -> Res<()> {
        if ffi::lua_checkstack(state, 3) == 0 {
            return Err(Fail::Run("stack overflow".into()));
        }
        let mut t = self.p.next_token();
        loop {
            // `t` is the first token of a value: push the value (or open a container).
            match t.tok {
                Tok::Str => {
                    ffi::lua_pushlstring(state, self.p.tmp.as_ptr().cast(), self.p.tmp.len());
                }
                Tok::Number(n) | Tok::Integer(n) => ffi::lua_pushnumber(state, n),
                Tok::Boolean(b) => ffi::lua_pushboolean(state, c_int::from(b)),
                Tok::Null => {
                    ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, self.null.into());
                }
                Tok::ObjBegin | Tok::ArrBegin => {
                    let object = t.tok == Tok::ObjBegin;
                    let need = if object { 3 } else { 2 };
                    self.descend(need)?;
                    // Our frame holds one slot less than C's (no argument), so this succeeds
                    // whenever lua-cjson's would.
                    if ffi::lua_checkstack(state, need as c_int + 1) == 0 {
                        return Err(Fail::Run(format!(
                            "Found too many nested data structures ({}) at character {}",
                            self.depth, self.p.ptr
                        )));
                    }
                    ffi::lua_createtable(state, 0, 0);
                    if !object && self.p.cfg.decode_array_with_array_mt != 0 {
                        ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, self.array_mt.into());
                        ffi::lua_setmetatable(state, -2);
                    }
                    t = self.p.next_token();
                    if t.tok == if object { Tok::ObjEnd } else { Tok::ArrEnd } {
                        self.depth -= 1;
                    } else {
                        if object {
                            self.object_key(state, &mut t)?;
                        }
                        self.slots += need - 1;
                        self.open.push(Open { object, next: 1 });
                        continue;
                    }
                }
                _ => return Err(self.parse_error("value", &t)),
            }
            // A finished value is on top: store it, closing every container it completes.
            loop {
                let Some(open) = self.open.last_mut() else { return Ok(()) };
                let object = open.object;
                if object {
                    ffi::lua_rawset(state, -3);
                } else {
                    ffi::lua_rawseti(state, -2, open.next);
                    open.next += 1;
                }
                t = self.p.next_token();
                if t.tok == if object { Tok::ObjEnd } else { Tok::ArrEnd } {
                    self.depth -= 1;
                    self.slots -= if object { 2 } else { 1 };
                    self.open.pop();
                    continue;
                }
                if t.tok != Tok::Comma {
                    let expected = if object { "comma or object end" } else { "comma or array end" };
                    return Err(self.parse_error(expected, &t));
                }
                t = self.p.next_token();
                if object {
                    self.object_key(state, &mut t)?;
                }
                break;
            }
        }
    }
}

fn decode_value(lua: &Lua, shared: &Shared, inst: &Instance, v: Value) -> Res<Value> {
    let text = match &v {
        Value::String(s) => s.clone(),
        Value::Integer(_) | Value::Number(_) => match lua.coerce_string(v.clone())? {
            Some(s) => s,
            None => return Err(Fail::Arg(1, "string expected, got number".into())),
        },
        other => return Err(Fail::Arg(1, format!("string expected, got {}", type_name(other)))),
    };
    let bytes = text.as_bytes();
    let data: &[u8] = &bytes;
    if data.len() >= 2 && (data[0] == 0 || data[1] == 0) {
        return Err(Fail::Run("JSON parser does not support UTF-16 or UTF-32".into()));
    }
    let p = Parser { data, ptr: 0, cfg: inst.cfg.get(), tmp: Vec::new() };
    let (array_mt, null) = (shared.array_mt_key.id(), shared.null_key.id());
    let mut dec = Decoder { p, open: Vec::new(), depth: 0, slots: 1, array_mt, null };
    let mut outcome = Ok(());
    // SAFETY: `exec_raw` runs the closure in a protected call on the running state with an empty
    // frame; the closure only borrows (a Lua error unwinding through it skips no destructor).
    // `Decoder::run` keeps the stack within what it checked, and leaves either the decoded value
    // or, after an error it reports, anything (cleared here).
    let value = unsafe {
        lua.exec_raw::<Value>((), |state| {
            outcome = dec.run(state);
            if outcome.is_err() {
                ffi::lua_settop(state, 0);
            }
        })?
    };
    outcome?;
    let t = dec.p.next_token();
    if t.tok != Tok::End {
        return Err(dec.parse_error("the end", &t));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    //! Expected values are what lua-cjson printed under nginx + lua-nginx-module (Debian's
    //! lua-cjson 2.1.0), except where marked "OpenResty": there the fork's `lua_cjson.c` /
    //! README decide (Debian's build lacks those additions or predates those changes).

    use super::register;
    use mlua::{LightUserData, Lua, Value};

    fn state() -> Lua {
        let lua = Lua::new();
        let null = Value::LightUserData(LightUserData(std::ptr::null_mut()));
        register(&lua, null.clone()).unwrap();
        let ngx = lua.create_table().unwrap();
        ngx.set("null", null).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        lua.load(r#"cjson = require "cjson"; cjson_safe = require "cjson.safe""#).exec().unwrap();
        lua
    }

    /// Runs a chunk (named `t`) and returns its result as text.
    fn run(lua: &Lua, code: &str) -> String {
        let v: Value = lua.load(code).set_name("=t").eval().unwrap_or_else(|e| panic!("{code}: {e}"));
        match v {
            Value::String(s) => String::from_utf8_lossy(&s.as_bytes()).into_owned(),
            other => lua.coerce_string(other.clone()).unwrap().map_or_else(
                || format!("<{}>", other.type_name()),
                |s| String::from_utf8_lossy(&s.as_bytes()).into_owned(),
            ),
        }
    }

    /// The error `code` raises (through `pcall`, so without a position prefix).
    fn err(lua: &Lua, code: &str) -> String {
        run(lua, &format!("local ok, e = pcall(function() return {code} end) assert(not ok) return e"))
    }

    #[test]
    fn encodes_scalars_and_strings() {
        let lua = state();
        for (code, want) in [
            ("cjson.encode({a = 1.5})", r#"{"a":1.5}"#),
            ("cjson.encode({1, 2, 3})", "[1,2,3]"),
            ("cjson.encode('x/y')", r#""x\/y""#),
            ("cjson.encode(nil)", "null"),
            ("cjson.encode(true) .. cjson.encode(false)", "truefalse"),
            ("cjson.encode(cjson.null) .. cjson.encode({ngx.null, 1})", "null[null,1]"),
            (r#"cjson.encode("\1\2\31\127 \"\\ \b\f\n\r\t")"#, r#""\u0001\u0002\u001f\u007f \"\\ \b\f\n\r\t""#),
            (r#"cjson.encode({["a/b"] = "\0"})"#, r#"{"a\/b":"\u0000"}"#),
            (r#"tostring(cjson.encode("\255\254 caf\195\169") == '"\255\254 caf\195\169"')"#, "true"),
            (r#"cjson.encode("\226\128\168")"#, "\"\u{2028}\""),
        ] {
            assert_eq!(run(&lua, &format!("return {code}")), want, "{code}");
        }
    }

    #[test]
    fn formats_numbers_like_percent_14g() {
        let lua = state();
        for (num, want) in [
            ("1e20", "1e+20"),
            ("123456789012345", "1.2345678901234e+14"),
            ("12345678901234", "12345678901234"),
            ("0.1", "0.1"),
            ("1/3", "0.33333333333333"),
            ("-0.0", "-0"),
            ("1e-5", "1e-05"),
            ("0.0001", "0.0001"),
            ("2^53", "9.007199254741e+15"),
            ("100", "100"),
            ("-42", "-42"),
            ("1e15", "1e+15"),
            ("1e14", "1e+14"),
            ("100000000000000", "1e+14"),
            ("3.14159265358979", "3.1415926535898"),
            ("65536.5", "65536.5"),
            ("1.7976931348623157e308", "1.7976931348623e+308"),
            ("5e-324", "4.9406564584125e-324"),
            ("123456.789e3", "123456789"),
            ("0.000012345", "1.2345e-05"),
            ("2^63", "9.2233720368548e+18"),
            ("-1e-7", "-1e-07"),
            ("1234567890123456", "1.2345678901235e+15"),
            ("0.1 + 0.2", "0.3"),
        ] {
            assert_eq!(run(&lua, &format!("return cjson.encode({num})")), want, "{num}");
        }
        assert_eq!(run(&lua, r#"return cjson.encode({[2^31] = 1})"#), r#"{"2147483648":1}"#);
        assert_eq!(run(&lua, r#"return cjson.encode({[1e300] = 1})"#), r#"{"1e+300":1}"#);
        // Precision setting (OpenResty allows up to 16).
        assert_eq!(
            run(&lua, "cjson.encode_number_precision(3) local s = cjson.encode(3.14159) cjson.encode_number_precision(14) return s"),
            "3.14"
        );
        assert_eq!(
            run(&lua, "cjson.encode_number_precision(16) local s = cjson.encode(2^53) cjson.encode_number_precision(14) return s"),
            "9007199254740992"
        );
        assert_eq!(
            err(&lua, "cjson.encode_number_precision(17)"),
            "bad argument #1 to '?' (expected integer between 1 and 16)"
        );
    }

    #[test]
    fn invalid_numbers() {
        let lua = state();
        // OpenResty's message (Debian's older build says "NaN or Inf").
        let msg = "Cannot serialise number: must not be NaN or Infinity";
        assert_eq!(err(&lua, "cjson.encode(0/0)"), msg);
        assert_eq!(err(&lua, "cjson.encode({x = -math.huge})"), msg);
        assert_eq!(err(&lua, "cjson.encode({[math.huge] = 1})"), msg);
        // OpenResty writes JavaScript's spellings.
        assert_eq!(
            run(&lua, "local r = cjson.encode_invalid_numbers(true) local s = cjson.encode({0/0, math.huge, -math.huge}) cjson.encode_invalid_numbers(false) return tostring(r) .. s"),
            "true[NaN,Infinity,-Infinity]"
        );
        assert_eq!(
            run(
                &lua,
                r#"local r = cjson.encode_invalid_numbers("null") local s = cjson.encode({0/0, math.huge}) cjson.encode_invalid_numbers(false) return r .. s"#
            ),
            "null[null,null]"
        );
        assert_eq!(
            err(&lua, r#"cjson.encode_invalid_numbers("maybe")"#),
            "bad argument #1 to '?' (invalid option 'maybe')"
        );
        assert_eq!(err(&lua, "cjson.encode_invalid_numbers(1)"), "bad argument #1 to '?' (invalid option '1')");
    }

    #[test]
    fn tables_arrays_and_sparse_arrays() {
        let lua = state();
        for (code, want) in [
            ("{[1]=1,[2]=2,[4]=4}", "[1,2,null,4]"),
            ("{[10]=1}", "[null,null,null,null,null,null,null,null,null,1]"),
            ("{1, nil, 3}", "[1,null,3]"),
            ("{nil, nil, 3}", "[null,null,3]"),
            ("{[3] = 1, [2] = 1, [1] = 1}", "[1,1,1]"),
            ("{[1.5]=1}", r#"{"1.5":1}"#),
            ("{[-1]=1}", r#"{"-1":1}"#),
            ("{[0]=1}", r#"{"0":1}"#),
            ("{}", "{}"),
            ("{{},{}}", "[{},{}]"),
            ("setmetatable({1,2}, {__index = function() return 5 end})", "[1,2]"),
            ("setmetatable({}, {__index = {1}})", "{}"),
            (r#"{"a", {b = {1, {c = "d"}}}}"#, r#"["a",{"b":[1,{"c":"d"}]}]"#),
        ] {
            assert_eq!(run(&lua, &format!("return cjson.encode({code})")), want, "{code}");
        }
        let t = "local t = {} for i = 1, 20 do t[i] = i end t[15] = nil return cjson.encode(t)";
        assert_eq!(run(&lua, t), "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,null,16,17,18,19,20]");
        // Mixed keys: an object with the numbers as strings (order is the table's).
        assert_eq!(
            run(&lua, "local d = cjson.decode(cjson.encode({1, 2, a = 3})) return d['1'] .. d['2'] .. d.a"),
            "123"
        );
        let sparse = "Cannot serialise table: excessively sparse array";
        assert_eq!(err(&lua, "cjson.encode({[1]=1,[20]=2})"), sparse);
        assert_eq!(err(&lua, "cjson.encode({[11]=1})"), sparse);
        assert_eq!(err(&lua, "cjson.encode({[1]=1, [2]=2, [3]=3, [100]=1})"), sparse);
        assert_eq!(
            run(&lua, "local a, b, c = cjson.encode_sparse_array(true) local d = cjson.decode(cjson.encode({[1]=1,[20]=2})) cjson.encode_sparse_array(false) return tostring(a) .. b .. c .. d['1'] .. d['20']"),
            "true21012"
        );
        assert_eq!(
            run(&lua, "cjson.encode_sparse_array(false, 0) local s = cjson.encode({[1]=1,[5]=2}) cjson.encode_sparse_array(false, 2, 10) return s"),
            "[1,null,null,null,2]"
        );
        assert_eq!(
            err(&lua, "cjson.encode_sparse_array(nil, -1)"),
            "bad argument #1 to '?' (expected integer between 0 and 2147483647)"
        );
    }

    #[test]
    fn unsupported_values_and_keys() {
        let lua = state();
        assert_eq!(err(&lua, "cjson.encode(print)"), "Cannot serialise function: type not supported");
        assert_eq!(err(&lua, "cjson.encode({a = {b = {c = print}}})"), "Cannot serialise function: type not supported");
        assert_eq!(
            err(&lua, "cjson.encode(coroutine.create(function() end))"),
            "Cannot serialise thread: type not supported"
        );
        assert_eq!(
            err(&lua, "cjson.encode({[true] = 1})"),
            "Cannot serialise boolean: table key must be a number or string"
        );
        // OpenResty: encode_skip_unsupported_value_types drops the entry and its comma.
        assert_eq!(
            run(&lua, "cjson.encode_skip_unsupported_value_types(true) local s = cjson.encode({print, 1, print, 2}) .. cjson.encode({f = print}) cjson.encode_skip_unsupported_value_types(false) return s"),
            "[1,2]{}"
        );
    }

    #[test]
    fn openresty_array_additions() {
        // Expected values from OpenResty's README and tests/agentzh.t.
        let lua = state();
        for (code, want) in [
            ("cjson.encode({arr = cjson.empty_array})", r#"{"arr":[]}"#),
            ("cjson.encode({arr = setmetatable({}, cjson.empty_array_mt)})", r#"{"arr":[]}"#),
            (r#"cjson.encode(setmetatable({"hello", "world"}, cjson.empty_array_mt))"#, r#"["hello","world"]"#),
            ("cjson.encode(setmetatable({}, cjson.array_mt))", "[]"),
            (r#"cjson.encode(setmetatable({"foo", "bar"}, cjson.array_mt))"#, r#"["foo","bar"]"#),
            (
                r#"cjson.encode(setmetatable({"foo", "bar", nil, "last", foo = 1}, cjson.array_mt))"#,
                r#"["foo","bar",null,"last"]"#,
            ),
            // lua-cjson 2.1.0.11 looks for `__len` on the metatable's metatable: in effect ignored.
            ("cjson.encode(setmetatable({a = 1}, {__len = function() return 3 end}))", r#"{"a":1}"#),
            ("cjson.encode(cjson.empty_array)", "[]"),
        ] {
            assert_eq!(run(&lua, &format!("return {code}")), want, "{code}");
        }
        assert_eq!(
            run(&lua, "cjson.encode_empty_table_as_object(false) local s = cjson.encode({}) .. cjson.encode({dogs = {}}) cjson.encode_empty_table_as_object(true) return s"),
            r#"[]{"dogs":[]}"#
        );
        assert_eq!(run(&lua, r#"return cjson.encode(cjson.decode('{"my_array":[]}'))"#), r#"{"my_array":{}}"#);
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_array_with_array_mt(true) local t = cjson.decode('{"my_array":["hello","world"]}') cjson.decode_array_with_array_mt(false) t.my_array.hash_value = "x" t.my_array[1] = nil t.my_array[2] = nil return tostring(getmetatable(t.my_array) == cjson.array_mt) .. cjson.encode(t)"#
            ),
            r#"true{"my_array":[]}"#
        );
        // The `/` escape lives in a table shared by all instances, as in C.
        assert_eq!(
            run(
                &lua,
                r#"local c2 = cjson.new() c2.encode_escape_forward_slash(false) local s = cjson.encode("a/b") .. cjson_safe.encode("/") cjson.encode_escape_forward_slash(true) return s .. cjson.encode("/")"#
            ),
            r#""a/b""/""\/""#
        );
    }

    #[test]
    fn nesting_limits() {
        let lua = state();
        let deep = |n: u32| format!("local t = {{}} local c = t for i = 1, {n} do c[1] = {{}} c = c[1] end");
        assert_eq!(
            err(&lua, &format!("(function() {} return cjson.encode(t) end)()", deep(1000))),
            "Cannot serialise, excessive nesting (1001)"
        );
        assert_eq!(run(&lua, &format!("{} return #cjson.encode(t)", deep(999))), "2000");
        assert_eq!(
            err(&lua, "(function() local t = {} t.t = t return cjson.encode(t) end)()"),
            "Cannot serialise, excessive nesting (1001)"
        );
        assert_eq!(
            run(&lua, "cjson.encode_max_depth(3) local ok, e = pcall(cjson.encode, {{{{}}}}) cjson.encode_max_depth(1000) return e"),
            "Cannot serialise, excessive nesting (4)"
        );
        // Past the configured limits, lua-cjson stops where LuaJIT's lua_checkstack does.
        assert_eq!(
            run(&lua, &format!("cjson.encode_max_depth(100000) {} local ok, e = pcall(cjson.encode, t) cjson.encode_max_depth(1000) return e", deep(9000))),
            "Cannot serialise, excessive nesting (7998)"
        );
        assert_eq!(
            run(&lua, "cjson.encode_max_depth(100000) local t = {} local c = t for i = 1, 9000 do c.a = {} c = c.a end local ok, e = pcall(cjson.encode, t) cjson.encode_max_depth(1000) return e"),
            "Cannot serialise, excessive nesting (4000)"
        );
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_max_depth(2) local ok, e = pcall(cjson.decode, '  [ [ [1]]]') cjson.decode_max_depth(1000) return e"#
            ),
            "Found too many nested data structures (3) at character 7"
        );
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_max_depth(2) local ok, e = pcall(cjson.decode, '{"a":{"b":{}}}') cjson.decode_max_depth(1000) return e"#
            ),
            "Found too many nested data structures (3) at character 11"
        );
        assert_eq!(
            err(&lua, r#"cjson.decode(string.rep("[", 1001) .. string.rep("]", 1001))"#),
            "Found too many nested data structures (1001) at character 1001"
        );
        assert_eq!(run(&lua, r#"return #cjson.decode(string.rep("[", 1000) .. string.rep("]", 1000))"#), "1");
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_max_depth(100000) local ok, e = pcall(cjson.decode, string.rep("[", 9000)) cjson.decode_max_depth(1000) return e"#
            ),
            "Found too many nested data structures (7999) at character 7999"
        );
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_max_depth(100000) local ok, e = pcall(cjson.decode, string.rep('{"a":[', 9000)) cjson.decode_max_depth(1000) return e"#
            ),
            "Found too many nested data structures (5333) at character 15997"
        );
        // Deep but allowed.
        assert_eq!(
            run(
                &lua,
                r#"cjson.decode_max_depth(10000) cjson.encode_max_depth(10000) local s = string.rep('{"k":[', 2000) .. "1" .. string.rep("]}", 2000) local ok = cjson.encode(cjson.decode(s)) == s cjson.decode_max_depth(1000) cjson.encode_max_depth(1000) return tostring(ok)"#
            ),
            "true"
        );
    }

    #[test]
    fn inside_coroutines() {
        let lua = state();
        assert_eq!(
            run(
                &lua,
                r#"local co = coroutine.wrap(function() local a = cjson.decode('[1,{"a":[2,null]}]') coroutine.yield() return cjson.encode(a) end) co() return co()"#
            ),
            r#"[1,{"a":[2,null]}]"#
        );
        assert_eq!(
            run(
                &lua,
                r#"local co = coroutine.create(function(s) local ok, e = pcall(cjson.decode, s) coroutine.yield(e) return cjson_safe.decode(s) end) local _, e = coroutine.resume(co, "[1,") local _, v, e2 = coroutine.resume(co) return e .. "|" .. tostring(v) .. "|" .. e2"#
            ),
            "Expected value but found T_END at character 4|nil|Expected value but found T_END at character 4"
        );
    }

    #[test]
    fn memory_errors_are_strings() {
        let lua = state();
        let big = format!("[{}1]", "1.5,".repeat(300_000));
        lua.globals().set("big", big).unwrap();
        lua.set_memory_limit(lua.used_memory() + (1 << 20)).unwrap();
        assert_eq!(
            run(&lua, "local ok, e = pcall(cjson.decode, big) local ok2, e2 = pcall(cjson_safe.decode, big) return e .. '|' .. e2"),
            "not enough memory|Memory allocation error in CJSON protected call"
        );
        lua.set_memory_limit(0).unwrap();
        assert_eq!(run(&lua, "return #cjson.decode(big) .. cjson.encode({1})"), "300001[1]");
    }

    #[test]
    fn large_documents() {
        let lua = state();
        assert_eq!(
            run(
                &lua,
                r#"local t = {} for i = 1, 20000 do t["k"..i] = {v = "x"..i} end local s = cjson.encode(t) return #s .. cjson.decode(s).k777.v"#
            ),
            "457789x777"
        );
        assert_eq!(
            run(
                &lua,
                r#"local t = {} for i = 1, 20000 do t[i] = {i, "s"..i} end local s = cjson.encode(t) local d = cjson.decode(s) return #s .. " " .. #d .. d[20000][2]"#
            ),
            "317789 20000s20000"
        );
    }

    #[test]
    fn decodes_values() {
        let lua = state();
        for (code, want) in [
            (r#"tostring(cjson.decode('{"a":[1,2,{"b":null}]}').a[3].b == ngx.null)"#, "true"),
            (r#"string.format("%.17g", cjson.decode('[0.5e-1]')[1])"#, "0.050000000000000003"),
            (r#"string.format("%.17g", cjson.decode('12345678901234567890'))"#, "1.2345678901234567e+19"),
            (r#"string.format("%.17g", cjson.decode('9007199254740993'))"#, "9007199254740992"),
            (r#"cjson.encode(cjson.decode('[1.0, 2.50, 1e2, 100000000000000000000]'))"#, "[1,2.5,100,1e+20]"),
            (
                r#"tostring(cjson.decode('"\\u00e9\\ud83d\\ude00\\/\\b\\f\\n\\r\\t\\"\\\\"') == "\195\169\240\159\152\128/\b\f\n\r\t\"\\")"#,
                "true",
            ),
            (r#"tostring(cjson.decode('"\\u0000x"') == "\0x")"#, "true"),
            (r#"tostring(cjson.decode('"\\uDBFF\\uDFFF"') == "\244\143\191\191")"#, "true"),
            (r#"tostring(cjson.decode('"\255"') == "\255")"#, "true"),
            (r#"cjson.decode('"a\tb\1"')"#, "a\tb\u{1}"),
            (
                "cjson.decode('true') and cjson.decode('null') == cjson.null and not cjson.decode('false') and 'ok'",
                "ok",
            ),
            (r#"cjson.decode(' \t\r\n[ 1 , 2 ] \n')[2]"#, "2"),
            (r#"cjson.decode('{"a":1,"a":2}').a"#, "2"),
            (r#"cjson.decode('[1]\0garbage')[1]"#, "1"),
            ("cjson.decode(123)", "123"),
            (r#"cjson.decode('{"1":"a"}')["1"]"#, "a"),
            ("tostring(getmetatable(cjson.decode('[]')))", "nil"),
            // lua-cjson's strtod accepts these unless decode_invalid_numbers(false).
            ("tostring(cjson.decode('NaN') ~= cjson.decode('NaN'))", "true"),
            ("tostring(cjson.decode('-Infinity'))", "-inf"),
            ("cjson.decode('0x10') + cjson.decode('+1') + cjson.decode('1.')", "18"),
            // OpenResty decodes plain integers with strtoll + lua_pushinteger: -0 is 0.
            ("tostring(1/cjson.decode('-0'))", "inf"),
            ("tostring(1/cjson.decode('-0.0'))", "-inf"),
        ] {
            assert_eq!(run(&lua, &format!("return {code}")), want, "{code}");
        }
    }

    #[test]
    fn decode_errors() {
        let lua = state();
        for (json, want) in [
            ("", "Expected value but found T_END at character 1"),
            ("   ", "Expected value but found T_END at character 4"),
            ("x", "Expected value but found invalid token at character 1"),
            ("{", "Expected object key string but found T_END at character 2"),
            ("{\"a\" 1}", "Expected colon but found T_INTEGER at character 6"),
            ("{\"a\":1,}", "Expected object key string but found T_OBJ_END at character 8"),
            ("{\"a\":1 \"b\":2}", "Expected comma or object end but found T_STRING at character 8"),
            ("{\"a\",\"b\"}", "Expected colon but found T_COMMA at character 5"),
            ("[1,]", "Expected value but found T_ARR_END at character 4"),
            ("[1 2.5]", "Expected comma or array end but found T_NUMBER at character 4"),
            ("[\"a\":\"b\"]", "Expected comma or array end but found T_COLON at character 5"),
            ("[1] x", "Expected the end but found invalid token at character 5"),
            ("{\"a\":1} ]", "Expected the end but found T_ARR_END at character 9"),
            ("[1,2]\u{c}", "Expected the end but found invalid token at character 6"),
            ("tru", "Expected value but found invalid token at character 1"),
            ("truex", "Expected the end but found invalid token at character 5"),
            ("-", "Expected value but found invalid number at character 1"),
            (".5", "Expected value but found invalid token at character 1"),
            ("1e5e5", "Expected the end but found invalid token at character 4"),
            ("infinit", "Expected the end but found invalid token at character 4"),
            ("\"abc", "Expected value but found unexpected end of string at character 5"),
            ("\"\\x\"", "Expected value but found invalid escape code at character 2"),
            ("\"a\\", "Expected value but found invalid escape code at character 3"),
            ("\"\\ud83d\"", "Expected value but found invalid unicode escape code at character 2"),
            ("\"\\ude00\"", "Expected value but found invalid unicode escape code at character 2"),
            ("\"\\u0041\\u00\"", "Expected value but found invalid unicode escape code at character 8"),
            ("\u{feff}[1]", "Expected value but found invalid token at character 1"),
            ("\0[1]", "JSON parser does not support UTF-16 or UTF-32"),
        ] {
            let code = format!("local ok, e = pcall(cjson.decode, {json:?}) return e");
            let code = code.replace("\\u{c}", "\\12").replace("\\u{feff}", "\\239\\187\\191");
            assert_eq!(run(&lua, &code), want, "{json:?}");
        }
        assert_eq!(
            run(&lua, "cjson.decode_invalid_numbers(false) local r = {} for _, s in ipairs({'01', '0x1', '+1', '[1,-Infinity]', 'NaN'}) do r[#r + 1] = select(2, pcall(cjson.decode, s)) end cjson.decode_invalid_numbers(true) return table.concat(r, '|')"),
            "Expected value but found invalid number at character 1|Expected value but found invalid number at character 1|Expected value but found invalid token at character 1|Expected value but found invalid number at character 4|Expected value but found invalid token at character 1"
        );
    }

    #[test]
    fn argument_errors_and_positions() {
        let lua = state();
        for (code, want) in [
            // Called straight from pcall (or in a tail call): no position, no name.
            ("select(2, pcall(cjson.encode))", "bad argument #1 to '?' (expected 1 argument)"),
            ("select(2, pcall(cjson.decode, '1', 2))", "bad argument #1 to '?' (expected 1 argument)"),
            ("select(2, pcall(cjson.decode, {}))", "bad argument #1 to '?' (string expected, got table)"),
            ("select(2, pcall(cjson.encode_max_depth, 1, 2))", "bad argument #2 to '?' (found too many arguments)"),
            ("select(2, pcall(cjson.encode_number_precision, 'x'))", "bad argument #1 to '?' (number expected, got string)"),
            ("select(2, pcall(function() return cjson.decode('x') end))", "Expected value but found invalid token at character 1"),
            // Called from Lua code: the caller's position, and the name it used.
            ("select(2, pcall(function() local x = cjson.decode('x') return x end))", "t:1: Expected value but found invalid token at character 1"),
            ("select(2, pcall(function() local d = cjson.decode local x = d(nil) return x end))", "t:1: bad argument #1 to 'd' (string expected, got nil)"),
            ("select(2, pcall(function() return (cjson:decode()) end))", "t:1: calling 'decode' on bad self (string expected, got table)"),
            ("select(2, pcall(function() return (cjson:encode(1)) end))", "t:1: calling 'encode' on bad self (expected 1 argument)"),
            ("select(2, pcall(function() return (cjson.encode_sparse_array(nil, nil, 'x')) end))", "t:1: bad argument #3 to 'encode_sparse_array' (number expected, got string)"),
            ("select(2, pcall(function() return (cjson.encode_keep_buffer({})) end))", "t:1: bad argument #1 to 'encode_keep_buffer' (string expected, got table)"),
            ("select(2, coroutine.wrap(function() return pcall(function() local x = cjson.decode(nil) return x end) end)())", "t:1: bad argument #1 to 'decode' (string expected, got nil)"),
        ] {
            assert_eq!(run(&lua, &format!("return {code}")), want, "{code}");
        }
    }

    #[test]
    fn safe_module_new_and_fields() {
        let lua = state();
        for (code, want) in [
            ("select(2, cjson_safe.decode('x'))", "Expected value but found invalid token at character 1"),
            ("select(2, cjson_safe.encode(print))", "Cannot serialise function: type not supported"),
            ("select(2, cjson_safe.encode({[true] = 1}))", "Cannot serialise boolean: table key must be a number or string"),
            ("select(2, cjson_safe.decode(nil))", "bad argument #1 to '?' (string expected, got nil)"),
            ("tostring(cjson_safe.decode('x'))", "nil"),
            ("select('#', cjson_safe.decode('x')) .. select('#', cjson_safe.decode('[1]')) .. select('#', cjson.encode(1)) .. select('#', cjson.encode_sparse_array())", "2113"),
            ("select(2, pcall(function() local x = cjson_safe.decode() return x end))", "t:1: bad argument #1 to 'decode' (expected 1 argument)"),
            ("select(2, cjson_safe.new().decode('x'))", "Expected value but found invalid token at character 1"),
            ("cjson_safe.decode('[1]')[1] .. cjson_safe.encode({1})", "1[1]"),
            ("(function() local c2 = cjson.new() c2.encode_number_precision(3) return c2.encode(1/3) .. ' ' .. cjson.encode(1/3) end)()", "0.333 0.33333333333333"),
            ("tostring(select(2, pcall(cjson.new().decode, 'x')))", "Expected value but found invalid token at character 1"),
            ("tostring(require('cjson') == cjson and require('cjson.safe') == cjson_safe and cjson_safe ~= cjson)", "true"),
            ("tostring(cjson.null == ngx.null and cjson_safe.null == ngx.null and cjson.new().null == ngx.null)", "true"),
            ("tostring(cjson.array_mt == cjson_safe.new().array_mt and cjson.empty_array == cjson_safe.empty_array)", "true"),
            ("cjson._NAME .. ' ' .. cjson._VERSION", "cjson 2.1.0.11"),
            ("tostring(cjson.encode_keep_buffer()) .. tostring(cjson.encode_keep_buffer(false)) .. tostring(cjson.encode_keep_buffer('on'))", "truefalsetrue"),
            ("tostring(cjson.decode_invalid_numbers()) .. tostring(cjson.encode_invalid_numbers()) .. cjson.encode_max_depth() .. cjson.decode_max_depth()", "truefalse10001000"),
            ("cjson.encode_max_depth(5.7) .. cjson.encode_max_depth('7') .. cjson.encode_max_depth(1000)", "571000"),
            ("(function() package.loaded.cjson = nil local c = require('cjson') return c.encode(setmetatable({}, cjson.empty_array_mt)) end)()", "[]"),
        ] {
            assert_eq!(run(&lua, &format!("return {code}")), want, "{code}");
        }
    }
}
