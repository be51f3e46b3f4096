//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` for
//! scripts: LuaJIT's semantics, on [`pattern`](super::pattern)'s matcher,
//! which the script budget can stop. LuaJIT's own are C functions no hook
//! reaches: a pathological pattern held a worker for seconds past the
//! budget. Plain searches (`find(s, p, i, true)`, or a pattern without
//! special characters) use a linear substring search (`memchr::memmem`)
//! where LuaJIT's is quadratic in the worst case.
//!
//! Written on the C API as `ngx::cfn`'s functions are (no mlua callback
//! costs). `gsub` with a string replacement runs whole in Rust; with a
//! function or table it runs in Lua (`GSUB`) on a one-match primitive, so
//! that the script's callback runs under the memory ceiling and the hook
//! like any other Lua code.

use std::ffi::c_int;

use mlua::{ffi, Function, Lua, Table};

use super::ngx::cfn;
use super::pattern::{self, Capture, Matcher};
use super::{budget, ceiling};

/// `gsub` with a function or table replacement, as LuaJIT's loop does it;
/// `step(s, p, init, first_only)` matches once at `init` (a leading `^`
/// skipped) and returns the position after the match and the captures (the
/// whole match if there are none; only the first for a table), or nothing. Errors name the caller of `gsub` (level 4:
/// `handle`, this function, the C `gsub`, the caller).
const GSUB: &str = r#"
local step, sub, byte, concat, type, error = ...
local function handle(repl, s, src, e, ...)
  if e == nil then return nil end
  local v
  if type(repl) == "table" then v = repl[(...)] else v = repl(...) end
  if not v then
    v = sub(s, src, e - 1)
  else
    local t = type(v)
    if t ~= "string" and t ~= "number" then
      error("invalid replacement value (a " .. t .. ")", 4)
    end
  end
  return e, v
end
return function(s, p, repl, max_n)
  local srcl = #s
  if max_n == nil then max_n = srcl + 1 end
  local anchor = byte(p, 1) == 94
  local by_key = type(repl) == "table"
  local out, k, n, src = {}, 0, 0, 1
  while n < max_n do
    local e, v = handle(repl, s, src, step(s, p, src, by_key))
    if e then
      n = n + 1
      k = k + 1
      out[k] = v
    end
    if e and e > src then
      src = e
    elseif src <= srcl then
      k = k + 1
      out[k] = sub(s, src, src)
      src = src + 1
    else
      break
    end
    if anchor then break end
  end
  k = k + 1
  out[k] = sub(s, src)
  return concat(out, "", 1, k), n
end
"#;

/// Replaces the four functions in the state's `string` table (which is also
/// what `("x"):find(...)` reaches).
pub fn register(lua: &Lua) -> mlua::Result<()> {
    let string: Table = lua.globals().get("string")?;
    // SAFETY: C functions following the C API's conventions (below).
    unsafe {
        string.set("find", lua.create_c_function(find)?)?;
        string.set("match", lua.create_c_function(str_match)?)?;
        string.set("gmatch", lua.create_c_function(gmatch)?)?;
        let step = lua.create_c_function(gsub_step)?;
        let general: Function = lua.load(GSUB).set_name("=luagate.gsub").call((
            step,
            string.get::<Function>("sub")?,
            string.get::<Function>("byte")?,
            lua.globals().get::<Table>("table")?.get::<Function>("concat")?,
            lua.globals().get::<Function>("type")?,
            lua.globals().get::<Function>("error")?,
        ))?;
        string.set("gsub", cfn::closure(lua, general, gsub)?)?;
    }
    Ok(())
}

/// Argument `i`, a string or a number (converted in place, as LuaJIT does);
/// raises "bad argument" otherwise.
///
/// # Safety
/// A C function's `state`, before anything that must be dropped exists
/// (this may raise). The bytes borrow slot `i`.
unsafe fn check_str<'a>(state: *mut ffi::lua_State, i: c_int) -> &'a [u8] {
    let mut len = 0;
    let p = ffi::luaL_checklstring(state, i, &mut len);
    std::slice::from_raw_parts(p.cast(), len)
}

/// The 0-based start of a search from Lua's `init` (negative: from the end),
/// clamped to the subject as LuaJIT clamps it.
fn start_of(init: ffi::lua_Integer, len: usize) -> usize {
    let len_i = len as i64;
    let start = if init < 0 { init + len_i } else { init - 1 };
    start.clamp(0, len_i) as usize
}

/// Pushes the captures of `m`'s last match (`whole`: the match, for the
/// whole-match capture when the pattern has none); the number pushed.
///
/// # Safety
/// Inside `cfn::call` (ceiling lifted).
unsafe fn push_captures(
    state: *mut ffi::lua_State,
    src: &[u8],
    m: &Matcher,
    whole: Option<(usize, usize)>,
) -> Result<c_int, String> {
    let n = m.capture_count(whole);
    if ffi::lua_checkstack(state, n as c_int + 2) == 0 {
        return Err("too many captures".into());
    }
    for i in 0..n {
        push_capture(state, src, m.capture_at(i, whole).map_err(failed)?);
    }
    Ok(n as c_int)
}

/// # Safety
/// Inside `cfn::call`, a stack slot free.
unsafe fn push_capture(state: *mut ffi::lua_State, src: &[u8], c: Capture) {
    match c {
        Capture::Text(a, b) => cfn::push(state, &src[a..b]),
        Capture::Position(n) => ffi::lua_pushinteger(state, n as ffi::lua_Integer),
    }
}

fn failed(e: pattern::Error) -> String {
    match e {
        pattern::Error::Pattern(msg) => msg.to_string(),
        pattern::Error::Stopped => {
            budget::trip();
            budget::EXCEEDED.to_string()
        }
    }
}

unsafe extern "C-unwind" fn find(state: *mut ffi::lua_State) -> c_int {
    find_aux(state, true)
}

unsafe extern "C-unwind" fn str_match(state: *mut ffi::lua_State) -> c_int {
    find_aux(state, false)
}

/// `str_find_aux`: `find` returns the match's bounds and its captures,
/// `match` the captures (or the whole match).
unsafe fn find_aux(state: *mut ffi::lua_State, find: bool) -> c_int {
    let s = check_str(state, 1);
    let p = check_str(state, 2);
    let st = start_of(ffi::luaL_optinteger(state, 3, 1), s.len());
    let plain = find && (ffi::lua_toboolean(state, 4) != 0 || !pattern::has_specials(p));
    cfn::call(state, || {
        if plain {
            return Ok(match memchr::memmem::find(&s[st..], p) {
                Some(i) => {
                    ffi::lua_pushinteger(state, (st + i + 1) as ffi::lua_Integer);
                    ffi::lua_pushinteger(state, (st + i + p.len()) as ffi::lua_Integer);
                    2
                }
                None => {
                    ffi::lua_pushnil(state);
                    1
                }
            });
        }
        let stop = budget::overran;
        let mut m = Matcher::new(s, p, &stop);
        let (pstart, anchor) = if m.pattern().first() == Some(&b'^') { (1, true) } else { (0, false) };
        let mut at = st;
        loop {
            if let Some(e) = m.match_at(at, pstart).map_err(failed)? {
                return if find {
                    ffi::lua_pushinteger(state, (at + 1) as ffi::lua_Integer);
                    ffi::lua_pushinteger(state, e as ffi::lua_Integer);
                    Ok(2 + push_captures(state, s, &m, None)?)
                } else {
                    push_captures(state, s, &m, Some((at, e)))
                };
            }
            if anchor || at >= s.len() {
                break;
            }
            at += 1;
        }
        ffi::lua_pushnil(state);
        Ok(1)
    })
}

/// `string.gmatch(s, p)`: an iterator closure over (s, p, position).
unsafe extern "C-unwind" fn gmatch(state: *mut ffi::lua_State) -> c_int {
    check_str(state, 1);
    check_str(state, 2);
    ffi::lua_settop(state, 2);
    ffi::lua_pushinteger(state, 0);
    ffi::lua_pushcclosure(state, gmatch_next, 3);
    1
}

/// The next match of a `gmatch` iterator; nothing once there is none. As
/// LuaJIT's, `^` is no anchor here, and an empty match moves on by one.
unsafe extern "C-unwind" fn gmatch_next(state: *mut ffi::lua_State) -> c_int {
    let s = cfn::string(state, ffi::lua_upvalueindex(1));
    let p = cfn::string(state, ffi::lua_upvalueindex(2));
    let from = ffi::lua_tointeger(state, ffi::lua_upvalueindex(3)).max(0) as usize;
    cfn::call(state, || {
        let stop = budget::overran;
        let mut m = Matcher::new(s, p, &stop);
        for at in from..=s.len() {
            if let Some(e) = m.match_at(at, 0).map_err(failed)? {
                let next = if e == at { e + 1 } else { e };
                ffi::lua_pushinteger(state, next as ffi::lua_Integer);
                ffi::lua_replace(state, ffi::lua_upvalueindex(3));
                return push_captures(state, s, &m, Some((at, e)));
            }
        }
        Ok(0)
    })
}

/// `string.gsub(s, p, repl, n)`. A function or table `repl` goes to the Lua
/// loop (upvalue 1) once the arguments are checked.
unsafe extern "C-unwind" fn gsub(state: *mut ffi::lua_State) -> c_int {
    let s = check_str(state, 1);
    let p = check_str(state, 2);
    let kind = ffi::lua_type(state, 3);
    let max = ffi::luaL_optinteger(state, 4, s.len() as ffi::lua_Integer + 1);
    match kind {
        ffi::LUA_TNUMBER | ffi::LUA_TSTRING => {}
        ffi::LUA_TFUNCTION | ffi::LUA_TTABLE => {
            ffi::lua_settop(state, 3);
            ffi::lua_pushinteger(state, max);
            return cfn::delegate(state);
        }
        _ => return ffi::luaL_argerror(state, 3, c"string/function/table expected".as_ptr()),
    }
    let repl = check_str(state, 3);
    cfn::call(state, || {
        let stop = budget::overran;
        let mut m = Matcher::new(s, p, &stop);
        let (pstart, anchor) = if m.pattern().first() == Some(&b'^') { (1, true) } else { (0, false) };
        let mut out = Vec::with_capacity(s.len());
        let (mut src, mut n) = (0usize, 0 as ffi::lua_Integer);
        while n < max {
            let e = m.match_at(src, pstart).map_err(failed)?;
            if let Some(e) = e {
                n += 1;
                add_replacement(&mut out, &m, s, repl, src, e).map_err(failed)?;
            }
            match e {
                Some(e) if e > src => src = e,
                _ if src < s.len() => {
                    out.push(s[src]);
                    src += 1;
                }
                _ => break,
            }
            if ceiling::exceeds(out.len()) {
                return Err("not enough memory".into());
            }
            if anchor {
                break;
            }
        }
        out.extend_from_slice(&s[src..]);
        cfn::push(state, &out);
        ffi::lua_pushinteger(state, n);
        Ok(2)
    })
}

/// `add_s`: the replacement string with `%0`–`%9` expanded; `%x` is `x`,
/// a `%` at the very end a NUL (LuaJIT reads the string's terminator).
fn add_replacement(
    out: &mut Vec<u8>,
    m: &Matcher,
    s: &[u8],
    repl: &[u8],
    start: usize,
    end: usize,
) -> pattern::Result<()> {
    let mut i = 0;
    while i < repl.len() {
        let c = repl[i];
        i += 1;
        if c != b'%' {
            out.push(c);
            continue;
        }
        let d = repl.get(i).copied().unwrap_or(0);
        i += 1;
        if !d.is_ascii_digit() {
            out.push(d);
        } else if d == b'0' {
            out.extend_from_slice(&s[start..end]);
        } else {
            match m.capture_at(usize::from(d - b'1'), Some((start, end)))? {
                Capture::Text(a, b) => out.extend_from_slice(&s[a..b]),
                Capture::Position(n) => out.extend_from_slice(n.to_string().as_bytes()),
            }
        }
    }
    Ok(())
}

/// `step(s, p, init, first_only)` of the Lua `gsub` loop: one match attempt at `init`.
unsafe extern "C-unwind" fn gsub_step(state: *mut ffi::lua_State) -> c_int {
    let s = cfn::string(state, 1);
    let p = cfn::string(state, 2);
    let at = (ffi::lua_tointeger(state, 3) - 1).max(0) as usize;
    let first_only = ffi::lua_toboolean(state, 4) != 0;
    // Errors name the caller of `gsub`: above the Lua loop and the C `gsub`.
    cfn::call_where(state, 3, || {
        let stop = budget::overran;
        let mut m = Matcher::new(s, p, &stop);
        let pstart = usize::from(m.pattern().first() == Some(&b'^'));
        let Some(e) = m.match_at(at.min(s.len()), pstart).map_err(failed)? else { return Ok(0) };
        ffi::lua_pushinteger(state, (e + 1) as ffi::lua_Integer);
        // A table replacement is indexed with the first capture only: the others are
        // never looked at (an unfinished one is no error then, as in LuaJIT).
        if first_only {
            push_capture(state, s, m.capture_at(0, Some((at, e))).map_err(failed)?);
            return Ok(2);
        }
        Ok(1 + push_captures(state, s, &m, Some((at, e)))?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one operation on a state and describes what it returned (types and values) or raised.
    const PROBE: &str = r#"
local function ser(...)
  local t = {}
  for i = 1, select('#', ...) do local v = select(i, ...) t[#t + 1] = type(v) .. ":" .. tostring(v) end
  return table.concat(t, ",")
end
return function(op, s, p, a, b)
  local ok, r = pcall(function()
    if op == "find" then return ser(string.find(s, p, a, b))
    elseif op == "match" then return ser(s:match(p, a))
    elseif op == "gmatch" then
      local out, n = {}, 0
      for x, y in string.gmatch(s, p) do
        n = n + 1
        if n > 40 then break end
        out[#out + 1] = ser(x, y)
      end
      return table.concat(out, ";")
    elseif op == "gsub" then return ser(string.gsub(s, p, a, b))
    elseif op == "gsubf" then return ser(s:gsub(p, function(...) return "<" .. ser(...) .. ">" end, b))
    elseif op == "gsubt" then return ser(string.gsub(s, p, { a = "A", b = false, [1] = 1.5, c = {} }, b))
    end
  end)
  return (ok and "ok " or "error ") .. tostring(r)
end
"#;

    fn probe(lua: &Lua) -> Function {
        lua.load(PROBE).set_name("=probe").eval().unwrap()
    }

    /// A plain LuaJIT state and one with these functions, each with its probe.
    fn states() -> (Lua, Function, Lua, Function) {
        let native = Lua::new();
        let ours = Lua::new();
        register(&ours).unwrap();
        let (pn, po) = (probe(&native), probe(&ours));
        (native, pn, ours, po)
    }

    fn same(native: &Function, ours: &Function, op: &str, s: &[u8], p: &[u8], a: mlua::Value, b: mlua::Value) {
        let args = || (op, mlua::BString::from(s), mlua::BString::from(p), a.clone(), b.clone());
        let want: String = native.call(args()).unwrap();
        let got: String = ours.call(args()).unwrap();
        assert_eq!(got, want, "{op}({:?}, {:?})", String::from_utf8_lossy(s), String::from_utf8_lossy(p));
    }

    /// `gsub` with a string replacement (a Lua string value is tied to its state).
    fn same_gsub(native: &Function, ours: &Function, s: &[u8], p: &[u8], repl: &str) {
        let args =
            || ("gsub", mlua::BString::from(s), mlua::BString::from(p), mlua::BString::from(repl), mlua::Value::Nil);
        let want: String = native.call(args()).unwrap();
        let got: String = ours.call(args()).unwrap();
        assert_eq!(got, want, "gsub({:?}, {:?}, {repl:?})", String::from_utf8_lossy(s), String::from_utf8_lossy(p));
    }

    #[test]
    fn hand_picked_cases_agree_with_luajit() {
        let (_n, native, _o, ours) = states();
        let n = |i: i64| mlua::Value::Integer(i);
        let nil = mlua::Value::Nil;
        let cases: &[(&str, &str)] = &[
            ("hello world", "o w"),
            ("hello world", "(o)(r)"),
            ("hello world", "^(h)"),
            ("hello world", "l+"),
            ("hello world", "l-o"),
            ("hello world", "()ll()"),
            ("  trim me  ", "^%s*(.-)%s*$"),
            ("key = value", "(%w+)%s*=%s*(%w+)"),
            ("THE (quick) fox", "%f[%a]%a+"),
            ("THE (quick) fox", "%b()"),
            ("abcabc", "(abc)%1"),
            ("a.b.c", "%."),
            ("a+b", "a+b"),
            ("x", "[%a-]"),
            ("x-y", "[a-%%]"),
            ("\0a\0", "%z"),
            ("\0a\0", "%Z+"),
            ("abc", "a\0c"),
            ("abc", ""),
            ("", ""),
            ("abc", "$"),
            ("a$b", "$b"),
            ("aaa", "a?a?a?aaa"),
            ("[x]", "[]]"),
            ("[x]", "[^]]+"),
            ("abc", "[a"),
            ("abc", "%"),
            ("abc", "(a"),
            ("abc", "a)"),
            ("abc", "%1"),
            ("abc", "%b"),
            ("abc", "%fx"),
            ("abc", "(()"),
            ("Bearer abc.def", "^Bearer%s+(.+)$"),
            ("/api/v1/users/42", "^/api/v(%d+)/(%a+)/(%d+)$"),
        ];
        for (s, p) in cases {
            let (s, p) = (s.as_bytes(), p.as_bytes());
            same(&native, &ours, "find", s, p, nil.clone(), nil.clone());
            same(&native, &ours, "find", s, p, n(2), nil.clone());
            same(&native, &ours, "find", s, p, n(-3), mlua::Value::Boolean(true));
            same(&native, &ours, "find", s, p, n(100), nil.clone());
            same(&native, &ours, "match", s, p, nil.clone(), nil.clone());
            same(&native, &ours, "match", s, p, n(2), nil.clone());
            same(&native, &ours, "gmatch", s, p, nil.clone(), nil.clone());
            for repl in ["<%0>", "%1-%2", "%%", "x%", "%a"] {
                same_gsub(&native, &ours, s, p, repl);
            }
            same(&native, &ours, "gsubf", s, p, nil.clone(), nil.clone());
            same(&native, &ours, "gsubf", s, p, nil.clone(), n(1));
            same(&native, &ours, "gsubt", s, p, nil.clone(), nil.clone());
        }
        same(&native, &ours, "gsubt", b"cab", b"%a", nil.clone(), nil.clone());
        same(&native, &ours, "gsub", b"abc", b"b", mlua::Value::Boolean(true), nil.clone());
        same(&native, &ours, "gsub", b"abc", b"b", n(7), n(-1));
        same(&native, &ours, "find", b"abc", b"b", mlua::Value::Boolean(true), nil.clone());
    }

    #[test]
    fn generated_patterns_agree_with_luajit() {
        let (_n, native, _o, ours) = states();
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let atoms: &[&str] = &[
            "a", "b", ".", "%a", "%d", "%s", "%w", "%A", "[ab]", "[^a]", "[a-c]", "%%", "(", ")", "()", "%1", "%b()",
            "%f[%w]", "^", "$", "*", "+", "-", "?", "[", "]", "%", "x",
        ];
        let subject_bytes = b"aab b(a)1 2x%";
        for _ in 0..20000 {
            let p: String = (0..rng.usize(1..7)).map(|_| atoms[rng.usize(..atoms.len())]).collect();
            let s: Vec<u8> = (0..rng.usize(0..12)).map(|_| subject_bytes[rng.usize(..subject_bytes.len())]).collect();
            let init = mlua::Value::Integer(rng.i64(-4..6));
            same(&native, &ours, "find", &s, p.as_bytes(), init.clone(), mlua::Value::Nil);
            same(&native, &ours, "match", &s, p.as_bytes(), init, mlua::Value::Nil);
            same(&native, &ours, "gmatch", &s, p.as_bytes(), mlua::Value::Nil, mlua::Value::Nil);
            same_gsub(&native, &ours, &s, p.as_bytes(), "[%0%1]");
            same(&native, &ours, "gsubf", &s, p.as_bytes(), mlua::Value::Nil, mlua::Value::Nil);
            same(&native, &ours, "gsubt", &s, p.as_bytes(), mlua::Value::Nil, mlua::Value::Integer(2));
        }
    }

    #[test]
    fn a_runaway_match_is_stopped_when_the_budget_says_so() {
        use std::cell::Cell;
        let asked = Cell::new(0u32);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() > 3
        };
        let subject = vec![b'a'; 40];
        let mut m = Matcher::new(&subject, b".-.-.-.-.-b", &stop);
        assert_eq!(m.match_at(0, 0), Err(pattern::Error::Stopped));
        assert_eq!(asked.get(), 4);
    }

    #[test]
    fn plain_find_is_linear() {
        let lua = Lua::new();
        register(&lua).unwrap();
        let started = std::time::Instant::now();
        let found: Option<i64> = lua
            .load(r#"local s = ("a"):rep(4000000) return (s:find(("a"):rep(2000000) .. "b", 1, true))"#)
            .eval()
            .unwrap();
        assert_eq!(found, None);
        // LuaJIT's memchr + memcmp search takes seconds here (each of 2M starts compares up to 2M bytes).
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
