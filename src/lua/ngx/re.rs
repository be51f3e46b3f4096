//! `ngx.re`: `match`, `find`, `gmatch`, `sub` and `gsub` with PCRE semantics, as
//! lua-nginx-module 0.10.x and lua-resty-core provide them.
//!
//! Patterns are PCRE2 (vendored by `pcre2-sys`), so scripts get the regex dialect OpenResty has.
//! The option letters, `ctx.pos`, capture tables, empty-match stepping, the `$N` replacement
//! template and the error strings follow resty.core's `regex.lua`; exec error codes are reported
//! with PCRE1's numbers, as the reference build does. Compiled patterns are kept in a per-state
//! LRU cache whether or not `o` is given.

use std::cell::RefCell;
use std::ffi::c_int;
use std::ptr::{self, NonNull};
use std::rc::Rc;

use hashlink::LruCache;
use mlua::{Function, Lua, LuaString, MultiValue, Result, Table, Value};
use pcre2_sys::*;

use super::raise::{api_function, raise, rethrow};
use super::util::{arg, arg_error, number, one, tostring, type_error, type_name};

/// Compiled patterns kept per Lua state.
const CACHE_ENTRIES: usize = 1024;

/// `pcre2_dfa_match` workspace, in ints.
const DFA_WORKSPACE: usize = 1000;

/// A pattern compiled with its options.
struct Regex {
    code: NonNull<pcre2_code_8>,
    ncaptures: usize,
    /// Group number and name of each named group, in PCRE's name-table order.
    names: Vec<(usize, Vec<u8>)>,
}

impl Drop for Regex {
    fn drop(&mut self) {
        // SAFETY: allocated by pcre2_compile for this Regex and freed only here.
        unsafe { pcre2_code_free_8(self.code.as_ptr()) }
    }
}

/// Offsets of the whole match (index 0) and of each group; `None` for groups that did not take part.
type Spans = Vec<Option<(usize, usize)>>;

/// One PCRE2 match-data block per state, grown to the largest pattern seen, as OpenResty keeps
/// one per worker: matches never nest, since offsets are copied out before any Lua code runs.
struct MatchData {
    ptr: NonNull<pcre2_match_data_8>,
    pairs: usize,
}

impl MatchData {
    fn new(pairs: usize) -> Option<MatchData> {
        // SAFETY: a NULL general context selects malloc.
        let ptr = NonNull::new(unsafe { pcre2_match_data_create_8(pairs as u32, ptr::null_mut()) })?;
        Some(MatchData { ptr, pairs })
    }
}

impl Drop for MatchData {
    fn drop(&mut self) {
        // SAFETY: allocated by pcre2_match_data_create for this MatchData and freed only here.
        unsafe { pcre2_match_data_free_8(self.ptr.as_ptr()) }
    }
}

/// The per-state compiled-pattern cache and match data.
struct Engine {
    /// Keyed by the pattern followed by its compile options and JIT flag.
    cache: LruCache<Vec<u8>, Rc<Regex>>,
    /// Scratch space for building cache keys.
    key: Vec<u8>,
    match_data: Option<MatchData>,
}

type Shared = Rc<RefCell<Engine>>;

impl Regex {
    /// Compiles `pattern`; the error is the message resty.core returns.
    fn compile(pattern: &[u8], options: u32, jit: bool) -> std::result::Result<Regex, Vec<u8>> {
        let mut errcode: c_int = 0;
        let mut erroff: usize = 0;
        // SAFETY: the pattern pointer and length describe a live slice; PCRE2 copies what it keeps.
        let code = unsafe {
            pcre2_compile_8(pattern.as_ptr(), pattern.len(), options, &mut errcode, &mut erroff, ptr::null_mut())
        };
        let Some(code) = NonNull::new(code) else {
            let mut buf = [0u8; 256];
            // SAFETY: PCRE2 writes at most buf.len() bytes.
            let n = unsafe { pcre2_get_error_message_8(errcode, buf.as_mut_ptr(), buf.len()) };
            let mut err = b"pcre2_compile() failed: ".to_vec();
            err.extend_from_slice(&buf[..n.max(0) as usize]);
            err.extend_from_slice(b" in \"");
            err.extend_from_slice(pattern);
            err.push(b'"');
            if erroff < pattern.len() {
                err.extend_from_slice(b" at \"");
                err.extend_from_slice(&pattern[erroff..]);
                err.push(b'"');
            }
            return Err(err);
        };
        let info = |what: u32| {
            let mut v: u32 = 0;
            // SAFETY: the counts asked for here are all written as uint32_t.
            unsafe { pcre2_pattern_info_8(code.as_ptr(), what, &mut v as *mut u32 as *mut _) };
            v as usize
        };
        let (ncaptures, name_count, entry_size) =
            (info(PCRE2_INFO_CAPTURECOUNT), info(PCRE2_INFO_NAMECOUNT), info(PCRE2_INFO_NAMEENTRYSIZE));
        let mut names = Vec::with_capacity(name_count);
        if name_count > 0 {
            let mut table: *const u8 = ptr::null();
            // SAFETY: the name table is name_count entries of entry_size bytes, living as long as code.
            let table = unsafe {
                pcre2_pattern_info_8(code.as_ptr(), PCRE2_INFO_NAMETABLE, &mut table as *mut *const u8 as *mut _);
                std::slice::from_raw_parts(table, name_count * entry_size)
            };
            // Each entry: the group number (big-endian u16), then the NUL-terminated name.
            for entry in table.chunks(entry_size) {
                let name = &entry[2..];
                let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                names.push(((entry[0] as usize) << 8 | entry[1] as usize, name[..len].to_vec()));
            }
        }
        if jit {
            // A pattern the JIT cannot handle still runs in the interpreter, as in OpenResty.
            // SAFETY: code is a valid compiled pattern.
            unsafe { pcre2_jit_compile_8(code.as_ptr(), PCRE2_JIT_COMPLETE) };
        }
        Ok(Regex { code, ncaptures, names })
    }

    /// Matches from byte offset `start`. With `dfa`, only the longest match is reported. The error
    /// is the exec code resty.core puts in "pcre_exec() failed: N".
    fn exec(
        &self,
        engine: &Shared,
        subject: &[u8],
        start: usize,
        dfa: bool,
    ) -> std::result::Result<Option<Spans>, i32> {
        let pairs = self.ncaptures + 1;
        let mut engine = engine.borrow_mut();
        if engine.match_data.as_ref().is_none_or(|md| md.pairs < pairs) {
            engine.match_data = None;
            engine.match_data = Some(MatchData::new(pairs).ok_or(-6)?);
        }
        let md = engine.match_data.as_ref().expect("allocated above").ptr.as_ptr();
        // SAFETY: subject is a live slice, md holds at least ncaptures + 1 pairs, and the DFA
        // workspace outlives the call. PCRE2 reports an offset past the end as an error.
        let rc = unsafe {
            if dfa {
                let mut workspace = [0 as c_int; DFA_WORKSPACE];
                let (ws, wslen) = (workspace.as_mut_ptr(), workspace.len());
                pcre2_dfa_match_8(
                    self.code.as_ptr(),
                    subject.as_ptr(),
                    subject.len(),
                    start,
                    0,
                    md,
                    ptr::null_mut(),
                    ws,
                    wslen,
                )
            } else {
                pcre2_match_8(self.code.as_ptr(), subject.as_ptr(), subject.len(), start, 0, md, ptr::null_mut())
            }
        };
        if rc == PCRE2_ERROR_NOMATCH {
            return Ok(None);
        }
        if rc < 0 {
            return Err(pcre1_error_code(rc));
        }
        // A DFA match puts the longest match first and reports no groups.
        let groups = if dfa { 1 } else { pairs };
        // SAFETY: the ovector has at least `pairs` pairs; PCRE2 set every one up to ncaptures.
        let ovector = unsafe { std::slice::from_raw_parts(pcre2_get_ovector_pointer_8(md), groups * 2) };
        let span = |pair: &[usize]| (pair[0] != PCRE2_UNSET && pair[1] != PCRE2_UNSET).then(|| (pair[0], pair[1]));
        Ok(Some(ovector.chunks(2).map(span).collect()))
    }
}

/// PCRE2 exec errors renumbered as the PCRE1 codes lua-nginx-module reports.
fn pcre1_error_code(rc: c_int) -> i32 {
    match rc {
        PCRE2_ERROR_UTF8_ERR21..=PCRE2_ERROR_UTF8_ERR1 => -10,
        PCRE2_ERROR_BADUTFOFFSET => -11,
        PCRE2_ERROR_BADOFFSET => -24,
        PCRE2_ERROR_NOMEMORY => -6,
        PCRE2_ERROR_MATCHLIMIT => -8,
        PCRE2_ERROR_DEPTHLIMIT => -21,
        PCRE2_ERROR_JIT_STACKLIMIT => -27,
        PCRE2_ERROR_DFA_UITEM => -16,
        PCRE2_ERROR_DFA_UCOND => -17,
        PCRE2_ERROR_DFA_WSSIZE => -19,
        PCRE2_ERROR_DFA_RECURSE => -20,
        rc => rc,
    }
}

/// The option string, decoded.
#[derive(Clone, Copy)]
struct Flags {
    compile: u32,
    jit: bool,
    dfa: bool,
    dupnames: bool,
}

fn parse_flags(opts: &[u8]) -> std::result::Result<Flags, Vec<u8>> {
    let mut f = Flags { compile: 0, jit: false, dfa: false, dupnames: false };
    for &c in opts {
        match c {
            b'o' => {}
            b'j' => f.jit = true,
            b'i' => f.compile |= PCRE2_CASELESS,
            b's' => f.compile |= PCRE2_DOTALL,
            b'm' => f.compile |= PCRE2_MULTILINE,
            b'u' => f.compile |= PCRE2_UTF,
            // OpenResty skips the UTF-8 check, leaving invalid input undefined; PCRE2 can instead
            // treat invalid sequences as unmatchable, which is as fast and memory-safe.
            b'U' => f.compile |= PCRE2_UTF | PCRE2_MATCH_INVALID_UTF,
            b'x' => f.compile |= PCRE2_EXTENDED,
            b'd' => f.dfa = true,
            b'a' => f.compile |= PCRE2_ANCHORED,
            b'D' => {
                f.compile |= PCRE2_DUPNAMES;
                f.dupnames = true;
            }
            // What PCRE1's JAVASCRIPT_COMPAT did, per PCRE2's migration notes.
            b'J' => f.compile |= PCRE2_ALT_BSUX | PCRE2_ALLOW_EMPTY_CLASS | PCRE2_MATCH_UNSET_BACKREF,
            _ => {
                let mut msg = b"unknown flag \"".to_vec();
                msg.push(c);
                msg.extend_from_slice(b"\" (flags \"");
                msg.extend_from_slice(opts);
                msg.extend_from_slice(b"\")");
                return Err(msg);
            }
        }
    }
    Ok(f)
}

fn compile_cached(engine: &Shared, pattern: &[u8], flags: Flags) -> std::result::Result<Rc<Regex>, Vec<u8>> {
    let mut guard = engine.borrow_mut();
    let Engine { cache, key, .. } = &mut *guard;
    key.clear();
    key.extend_from_slice(pattern);
    key.extend_from_slice(&flags.compile.to_le_bytes());
    key.push(flags.jit as u8);
    if let Some(re) = cache.get(key.as_slice()) {
        return Ok(re.clone());
    }
    let re = Rc::new(Regex::compile(pattern, flags.compile, flags.jit)?);
    cache.insert(key.clone(), re.clone());
    Ok(re)
}

/// The subject, regex and options arguments shared by all five functions.
struct Call {
    engine: Shared,
    subject: LuaString,
    re: Rc<Regex>,
    flags: Flags,
}

impl Call {
    fn exec(&self, subject: &[u8], start: usize) -> std::result::Result<Option<Spans>, i32> {
        self.re.exec(&self.engine, subject, start, self.flags.dfa)
    }

    /// Groups reported: none besides the whole match in DFA mode.
    fn ncaptures(&self) -> usize {
        if self.flags.dfa {
            0
        } else {
            self.re.ncaptures
        }
    }
}

enum Prepared {
    Ready(Call),
    /// A caller mistake, to raise.
    Raise(Result<MultiValue>),
    /// The regex did not compile: `nil, err` (`nil, nil, err` from find, sub and gsub).
    Failed(Value),
}

fn prepare(lua: &Lua, engine: &Shared, fname: &str, args: &MultiValue, opts_arg: usize) -> Result<Prepared> {
    let pattern = match arg(args, 1) {
        Value::String(s) => s,
        v => return Ok(Prepared::Raise(type_error(lua, 2, fname, "string", v))),
    };
    let flags = match arg(args, opts_arg) {
        Value::Nil => parse_flags(b""),
        Value::String(s) => parse_flags(&s.as_bytes()),
        v => return Ok(Prepared::Raise(type_error(lua, opts_arg + 1, fname, "string", v))),
    };
    let flags = match flags {
        Ok(flags) => flags,
        Err(msg) => return Ok(Prepared::Raise(raise(lua, msg))),
    };
    let re = match compile_cached(engine, &pattern.as_bytes(), flags) {
        Ok(re) => re,
        Err(msg) => return Ok(Prepared::Failed(Value::String(lua.create_string(msg)?))),
    };
    let subject = tostring(lua, arg(args, 0))?;
    Ok(Prepared::Ready(Call { engine: engine.clone(), subject, re, flags }))
}

fn values<const N: usize>(vals: [Value; N]) -> Result<MultiValue> {
    Ok(MultiValue::from_vec(vals.into()))
}

fn exec_error(lua: &Lua, code: i32) -> Result<Value> {
    Ok(Value::String(lua.create_string(format!("pcre_exec() failed: {code}"))?))
}

/// The capture table `match`, `gmatch` and replacement functions receive: `[0]` the whole match,
/// `[n]` each group (false when unset), and named groups by name (a list of the set ones with `D`).
fn capture_table(lua: &Lua, call: &Call, subject: &[u8], spans: &Spans, res: Option<Table>) -> Result<Table> {
    let ncaptures = call.ncaptures();
    let t = match res {
        Some(t) => t,
        None => lua.create_table_with_capacity(ncaptures, call.re.names.len())?,
    };
    let capture = |i: usize| -> Result<Value> {
        if i > ncaptures {
            return Ok(Value::Nil);
        }
        match spans[i] {
            Some((s, e)) => Ok(Value::String(lua.create_string(&subject[s..e.max(s)])?)),
            None => Ok(Value::Boolean(false)),
        }
    };
    for i in 0..=ncaptures {
        t.raw_set(i, capture(i)?)?;
    }
    for (group, name) in &call.re.names {
        let cap = capture(*group)?;
        let name = lua.create_string(name)?;
        if !call.flags.dupnames {
            t.raw_set(name, cap)?;
        } else if let Value::String(_) = cap {
            match t.raw_get::<Value>(&name)? {
                Value::Table(list) => list.raw_set(list.raw_len() + 1, cap)?,
                _ => t.raw_set(name, lua.create_sequence_from([cap])?)?,
            }
        }
    }
    Ok(t)
}

/// The start offset `ctx.pos` asks for (1-based in Lua), or the error to raise.
fn ctx_start(lua: &Lua, fname: &str, ctx: Option<&Table>) -> Result<std::result::Result<usize, MultiValue>> {
    let Some(ctx) = ctx else { return Ok(Ok(0)) };
    let pos = ctx.get::<Value>("pos")?;
    if pos.is_nil() {
        return Ok(Ok(0));
    }
    match number(&pos) {
        Some(pos) if pos <= 0.0 => Ok(Ok(0)),
        Some(pos) => Ok(Ok((pos - 1.0) as usize)),
        None => {
            let msg = format!("bad pos field type in the ctx table argument: {}", type_name(&pos));
            Ok(Err(arg_error(lua, 4, fname, &msg)?))
        }
    }
}

fn match_or_find(lua: &Lua, engine: &Shared, args: MultiValue, want_caps: bool) -> Result<MultiValue> {
    let fname = if want_caps { "match" } else { "find" };
    let call = match prepare(lua, engine, fname, &args, 2)? {
        Prepared::Ready(call) => call,
        Prepared::Raise(raised) => return raised,
        Prepared::Failed(err) if want_caps => return values([Value::Nil, err]),
        Prepared::Failed(err) => return values([Value::Nil, Value::Nil, err]),
    };
    let ctx = match arg(&args, 3) {
        Value::Nil => None,
        Value::Table(t) => Some(t.clone()),
        v => return type_error(lua, 4, fname, "table", v),
    };
    let (mut res, mut nth) = (None, 0usize);
    match arg(&args, 4) {
        Value::Nil => {}
        Value::Table(t) if want_caps => res = Some(t.clone()),
        v @ (Value::Integer(_) | Value::Number(_)) if !want_caps => {
            nth = number(v).unwrap_or_default().max(0.0) as usize;
        }
        v => return type_error(lua, 5, fname, if want_caps { "table" } else { "number" }, v),
    }
    let start = match ctx_start(lua, fname, ctx.as_ref())? {
        Ok(start) => start,
        Err(raised) => return Ok(raised),
    };
    let subject = call.subject.as_bytes();
    let spans = match call.exec(&subject, start) {
        Ok(Some(spans)) => spans,
        Ok(None) => return values([Value::Nil]),
        Err(code) if want_caps => return values([Value::Nil, exec_error(lua, code)?]),
        Err(code) => return values([Value::Nil, Value::Nil, exec_error(lua, code)?]),
    };
    let (_, end) = spans[0].expect("a match sets group 0");
    if let Some(ctx) = &ctx {
        ctx.set("pos", end + 1)?;
    }
    if want_caps {
        return one(lua, capture_table(lua, &call, &subject, &spans, res)?);
    }
    if nth > call.ncaptures() {
        return values([Value::Nil, Value::Nil, Value::String(lua.create_string("nth out of bound")?)]);
    }
    match spans[nth] {
        Some((s, e)) => values([Value::Integer(s as i64 + 1), Value::Integer(e as i64)]),
        None => values([Value::Nil, Value::Nil]),
    }
}

fn gmatch(lua: &Lua, engine: &Shared, args: MultiValue) -> Result<MultiValue> {
    let call = match prepare(lua, engine, "gmatch", &args, 2)? {
        Prepared::Ready(call) => call,
        Prepared::Raise(raised) => return raised,
        Prepared::Failed(err) => return values([Value::Nil, err]),
    };
    // The next start offset; None once exhausted.
    let mut pos = Some(0usize);
    let iter = lua.create_function_mut(move |lua, ()| {
        let Some(start) = pos else { return values([Value::Nil]) };
        let subject = call.subject.as_bytes();
        let spans = match call.exec(&subject, start) {
            Ok(Some(spans)) => spans,
            Ok(None) => {
                pos = None;
                return values([Value::Nil]);
            }
            Err(code) => {
                pos = None;
                return values([Value::Nil, exec_error(lua, code)?]);
            }
        };
        let (s, e) = spans[0].expect("a match sets group 0");
        // An empty match steps one byte on, and one at the very end is the last.
        pos = if e != s { Some(e) } else { Some(e + 1).filter(|&p| p <= subject.len()) };
        one(lua, capture_table(lua, &call, &subject, &spans, None)?)
    })?;
    one(lua, iter)
}

/// A parsed `sub`/`gsub` replacement string.
enum Piece {
    Literal(Vec<u8>),
    Group(usize),
    /// `${name}` / `$name`: the groups bearing that name (several with `D`), first set one wins.
    Named(Vec<usize>),
}

/// Parses `$N`, `${N}` and `$$` as ngx_http_lua_script.c does. Named references, which
/// OpenResty rejects, are accepted when the pattern has a group of that name.
fn parse_template(tpl: &[u8], re: &Regex) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < tpl.len() {
        if tpl[i] != b'$' {
            let end = tpl[i..].iter().position(|&b| b == b'$').map_or(tpl.len(), |n| i + n);
            pieces.push(Piece::Literal(tpl[i..end].to_vec()));
            i = end;
            continue;
        }
        i += 1;
        let c = *tpl.get(i)?;
        if c == b'$' {
            pieces.push(Piece::Literal(b"$".to_vec()));
            i += 1;
            continue;
        }
        let mut bracket = c == b'{';
        if bracket {
            i += 1;
            tpl.get(i)?;
        }
        let numeric = tpl[i].is_ascii_digit();
        let (start, mut n) = (i, 0usize);
        let mut len = 0;
        while i < tpl.len() {
            let ch = tpl[i];
            if ch == b'}' && bracket {
                i += 1;
                bracket = false;
                break;
            }
            if numeric {
                if !ch.is_ascii_digit() {
                    break;
                }
                n = n.saturating_mul(10).saturating_add(usize::from(ch - b'0'));
            } else if !(ch.is_ascii_alphanumeric() || ch == b'_') {
                break;
            }
            i += 1;
            len += 1;
        }
        if bracket || len == 0 {
            return None;
        }
        if numeric {
            pieces.push(Piece::Group(n));
        } else {
            let name = &tpl[start..start + len];
            let groups: Vec<usize> = re.names.iter().filter(|(_, nm)| nm == name).map(|(g, _)| *g).collect();
            if groups.is_empty() {
                return None;
            }
            pieces.push(Piece::Named(groups));
        }
    }
    Some(pieces)
}

fn expand(out: &mut Vec<u8>, pieces: &[Piece], subject: &[u8], spans: &Spans) {
    let group = |out: &mut Vec<u8>, n: usize| match spans.get(n).copied().flatten() {
        Some((s, e)) => {
            out.extend_from_slice(&subject[s..e.max(s)]);
            true
        }
        None => false,
    };
    for piece in pieces {
        match piece {
            Piece::Literal(lit) => out.extend_from_slice(lit),
            Piece::Group(n) => {
                group(out, *n);
            }
            Piece::Named(groups) => {
                groups.iter().any(|&n| group(out, n));
            }
        }
    }
}

enum Replace {
    Template(Vec<Piece>),
    Callback(Function),
}

fn substitute(lua: &Lua, engine: &Shared, pcall: &Function, args: MultiValue, global: bool) -> Result<MultiValue> {
    let fname = if global { "gsub" } else { "sub" };
    let call = match prepare(lua, engine, fname, &args, 3)? {
        Prepared::Ready(call) => call,
        Prepared::Raise(raised) => return raised,
        Prepared::Failed(err) => return values([Value::Nil, Value::Nil, err]),
    };
    let replace = match arg(&args, 2) {
        Value::Function(f) => Replace::Callback(f.clone()),
        v => match parse_template(&tostring(lua, v)?.as_bytes(), &call.re) {
            Some(pieces) => Replace::Template(pieces),
            None => {
                let err = lua.create_string("failed to compile the replacement template")?;
                return values([Value::Nil, Value::Nil, Value::String(err)]);
            }
        },
    };
    let subject = call.subject.as_bytes();
    let mut out = Vec::new();
    let (mut count, mut pos, mut copied) = (0i64, 0usize, 0usize);
    loop {
        let spans = match call.exec(&subject, pos) {
            Ok(Some(spans)) => spans,
            Ok(None) => break,
            Err(code) => return values([Value::Nil, Value::Nil, exec_error(lua, code)?]),
        };
        let (s, e) = spans[0].expect("a match sets group 0");
        count += 1;
        if s > copied {
            out.extend_from_slice(&subject[copied..s]);
        }
        match &replace {
            Replace::Template(pieces) => expand(&mut out, pieces, &subject, &spans),
            Replace::Callback(f) => {
                let caps = capture_table(lua, &call, &subject, &spans, None)?;
                let mut ret = pcall.call::<MultiValue>((f, caps))?;
                let ok = matches!(ret.pop_front(), Some(Value::Boolean(true)));
                let first = ret.pop_front().unwrap_or(Value::Nil);
                if !ok {
                    return rethrow(first);
                }
                out.extend_from_slice(&tostring(lua, &first)?.as_bytes());
            }
        }
        copied = e;
        pos = e;
        if e == s {
            pos += 1;
            if pos > subject.len() {
                break;
            }
        }
        if !global {
            break;
        }
    }
    if count == 0 {
        return values([Value::String(call.subject.clone()), Value::Integer(0)]);
    }
    if copied < subject.len() {
        out.extend_from_slice(&subject[copied..]);
    }
    values([Value::String(lua.create_string(out)?), Value::Integer(count)])
}

/// Installs `ngx.re` into `ngx`.
pub fn register(lua: &Lua, ngx: &Table) -> Result<()> {
    let engine: Shared =
        Rc::new(RefCell::new(Engine { cache: LruCache::new(CACHE_ENTRIES), key: Vec::new(), match_data: None }));
    let pcall: Function = lua.globals().raw_get("pcall")?;
    let re = lua.create_table_with_capacity(0, 5)?;

    let e = engine.clone();
    re.raw_set("match", api_function(lua, move |lua, args| match_or_find(lua, &e, args, true))?)?;
    let e = engine.clone();
    re.raw_set("find", api_function(lua, move |lua, args| match_or_find(lua, &e, args, false))?)?;
    let e = engine.clone();
    re.raw_set("gmatch", api_function(lua, move |lua, args| gmatch(lua, &e, args))?)?;
    let (e, p) = (engine.clone(), pcall.clone());
    re.raw_set("sub", api_function(lua, move |lua, args| substitute(lua, &e, &p, args, false))?)?;
    re.raw_set("gsub", api_function(lua, move |lua, args| substitute(lua, &engine, &pcall, args, true))?)?;

    ngx.raw_set("re", re)?;
    Ok(())
}

/// Expected values below were printed by nginx 1.22 with lua-nginx-module 0.10.23 and
/// lua-resty-core 0.1.25 running the same expressions, except where a comment says otherwise.
#[cfg(test)]
mod tests {
    use super::super::util::testing::{eval, state};

    #[test]
    fn match_captures_and_options() {
        let lua = state(super::register);
        let cases = [
            (r#"ngx.re.match("hello 123", [[(?<w>\w+) (\d+)]])"#, "{0=hello 123 1=hello 2=123 w=hello}"),
            (r#"ngx.re.match("hello", [[(x)?(h)(y)?]])"#, "{0=h 1=false 2=h 3=false}"),
            (r#"ngx.re.match("hello", "xyz")"#, "nil"),
            (r#"ngx.re.match("HELLO", "hello", "i")"#, "{0=HELLO}"),
            (r#"ngx.re.match("a\nb", "^b", "")"#, "nil"),
            (r#"ngx.re.match("a\nb", "^b", "m")"#, "{0=b}"),
            (r#"ngx.re.match("a\nb", "a.b", "s")"#, "{0=a\nb}"),
            (r#"ngx.re.match("xab", "ab", "a")"#, "nil"),
            (r#"ngx.re.match("ab", " a b ", "x")"#, "{0=ab}"),
            (r#"ngx.re.match("hello", "(l)(l)?", "d")"#, "{0=ll}"),
            (r#"ngx.re.match("aaa", "a|aa|aaa", "d")"#, "{0=aaa}"),
            (r#"ngx.re.match("ab", "(?<n>a)|(?<n>b)", "D")"#, "{0=a 1=a 2=false n={a}}"),
            (r#"ngx.re.match("abc", "(?<first>a)(?<second>z)?", "")"#, "{0=a 1=a 2=false first=a second=false}"),
            (r#"ngx.re.match("abc", "(?<first>a)(?<second>z)?", "D")"#, "{0=a 1=a 2=false first={a}}"),
            (r#"ngx.re.match("A", [[\u0041]], "J")"#, "{0=A}"),
            (r#"ngx.re.match("a", "[]a", "J")"#, "nil"),
            (r#"ngx.re.match("a", [[(x)?\1a]], "J")"#, "{0=a 1=false}"),
            (r#"ngx.re.match("é", "^.$", "u")"#, "{0=é}"),
            (r#"ngx.re.match("é", "^.$", "")"#, "nil"),
            (r#"ngx.re.match("\xff", "^.$", "u")"#, "nil | pcre_exec() failed: -10"),
            (r#"ngx.re.match(nil, "nil")"#, "{0=nil}"),
            (r#"ngx.re.match(123, "2")"#, "{0=2}"),
        ];
        for (expr, expected) in cases {
            assert_eq!(eval(&lua, &format!("show({expr})")), expected, "{expr}");
        }
        // The message is PCRE2's; nginx's PCRE1 build says "pcre_compile() failed: missing ) in ...".
        assert_eq!(
            eval(&lua, r#"show(ngx.re.match("hello", "(", "j"))"#),
            r#"nil | pcre2_compile() failed: missing closing parenthesis in "(""#
        );
        assert_eq!(
            eval(&lua, "select(2, pcall(function()\n local m = ngx.re.match('hello', 'a', 'z')\n end))"),
            r#"t:2: unknown flag "z" (flags "z")"#
        );
    }

    #[test]
    fn ctx_pos_and_res_table() {
        let lua = state(super::register);
        assert_eq!(
            eval(
                &lua,
                r#"(function()
                    local ctx, out = {}, {}
                    for i = 1, 3 do out[i] = show(ngx.re.match("1234, 5678", "[0-9]+", "", ctx), ctx.pos) end
                    return table.concat(out, " / ")
                end)()"#
            ),
            "{0=1234} | 5 / {0=5678} | 11 / nil | 11"
        );
        assert_eq!(
            eval(
                &lua,
                r#"(function() local c = {pos = 2}; return show(ngx.re.match("1234, 5678", "^[0-9]+", "a", c), c.pos) end)()"#
            ),
            "nil | 2"
        );
        assert_eq!(
            eval(
                &lua,
                r#"(function() local c = {pos = 5}; return show(ngx.re.match("1234", "x*", "", c), c.pos) end)()"#
            ),
            "{0=} | 5"
        );
        assert_eq!(eval(&lua, r#"show(ngx.re.match("1234", "x*", "", {pos = 6}))"#), "nil | pcre_exec() failed: -24");
        assert_eq!(
            eval(
                &lua,
                r#"(function() local c = {pos = -3}; return show(ngx.re.match("1234", "\\d", "", c), c.pos) end)()"#
            ),
            "{0=1} | 2"
        );
        assert_eq!(
            eval(
                &lua,
                r#"(function() local res = {"old1", "old2", "old3", foo = "bar"}; return show(ngx.re.match("ab", "(a)", "", nil, res), res[1]) end)()"#
            ),
            "{0=a 1=a 2=old2 3=old3 foo=bar} | a"
        );
    }

    #[test]
    fn find() {
        let lua = state(super::register);
        let cases = [
            (r#"ngx.re.find("hello, 1234", "([0-9])[0-9]+")"#, "8 | 11"),
            (r#"ngx.re.find("hello, 1234", "([0-9])([0-9]+)", "", nil, 2)"#, "9 | 11"),
            (r#"ngx.re.find("hello, 1234", "([0-9])([0-9]+)", "", nil, 3)"#, "nil | nil | nth out of bound"),
            (r#"ngx.re.find("hello, 1234", "([0-9])(x)?", "", nil, 2)"#, "nil | nil"),
            (r#"ngx.re.find("hello", "x")"#, "nil"),
            (r#"ngx.re.find("hello", "")"#, "1 | 0"),
            (r#"ngx.re.find("hello", "l+", "d")"#, "3 | 4"),
            (r#"ngx.re.find("hello", "(l)+", "d", nil, 1)"#, "nil | nil | nth out of bound"),
            (r#"ngx.re.find("hello", "l", "", {pos = 4})"#, "4 | 4"),
        ];
        for (expr, expected) in cases {
            assert_eq!(eval(&lua, &format!("show({expr})")), expected, "{expr}");
        }
    }

    #[test]
    fn sub_and_gsub() {
        let lua = state(super::register);
        let cases = [
            (r#"ngx.re.gsub("abc", "x*", "-")"#, "-a-b-c- | 4"),
            (r#"ngx.re.gsub("abc", "b*", "-")"#, "-a--c- | 4"),
            (r#"ngx.re.gsub("hello world", "o", "0")"#, "hell0 w0rld | 2"),
            (r#"ngx.re.sub("hello world", "o", "0")"#, "hell0 world | 1"),
            (r#"ngx.re.gsub("hello world", "(o)", "[$0$1$$]")"#, "hell[oo$] w[oo$]rld | 2"),
            (r#"ngx.re.gsub("hello world", "(o)", "${1}x$1x")"#, "helloxox woxoxrld | 2"),
            (r#"ngx.re.gsub("hello world", "(o)", "$12")"#, "hell wrld | 2"),
            (r#"ngx.re.gsub("hello world", "(o)(x)?", "<$2>")"#, "hell<> w<>rld | 2"),
            (r#"ngx.re.gsub("hello world", "o", function(m) return m[0]:upper() end)"#, "hellO wOrld | 2"),
            (r#"ngx.re.gsub("hello world", "o", function(m) return nil end)"#, "hellnil wnilrld | 2"),
            (r#"ngx.re.gsub("hello world", "o", 7)"#, "hell7 w7rld | 2"),
            (r#"ngx.re.gsub("hello", "x", "y")"#, "hello | 0"),
            (r#"ngx.re.gsub("", "", "y")"#, "y | 1"),
            (r#"ngx.re.gsub("ab", "", "-")"#, "-a-b- | 3"),
            (r#"ngx.re.sub("ab", "", "-")"#, "-ab | 1"),
            (r#"ngx.re.gsub("aaa", "a", "b", "a")"#, "bbb | 3"),
            (r#"ngx.re.gsub("aaa", "a*?", "-")"#, "-a-a-a- | 4"),
            (r#"ngx.re.gsub("abc", "a|", "-")"#, "--b-c- | 4"),
            (r#"ngx.re.gsub("abc", "\\b", "|")"#, "|abc| | 2"),
            (r#"ngx.re.sub("hello", "(l)(l)", "[$2$1$3]", "d")"#, "he[]o | 1"),
            (r#"ngx.re.gsub("é", "", "-", "u")"#, "nil | nil | pcre_exec() failed: -11"),
            (r#"ngx.re.gsub("hello world", "(o)", "$")"#, "nil | nil | failed to compile the replacement template"),
            (r#"ngx.re.gsub("hello world", "(o)", "${1")"#, "nil | nil | failed to compile the replacement template"),
            (r#"ngx.re.gsub("hello world", "(o)", "$-")"#, "nil | nil | failed to compile the replacement template"),
            (r#"ngx.re.gsub("hello world", "(o)", "${1a}")"#, "nil | nil | failed to compile the replacement template"),
            // OpenResty refuses named references in templates; they are an extension here.
            (r#"ngx.re.gsub("hello world", "(?<n>o)", "<${n}$n>")"#, "hell<oo> w<oo>rld | 2"),
        ];
        for (expr, expected) in cases {
            assert_eq!(eval(&lua, &format!("show({expr})")), expected, "{expr}");
        }
        assert_eq!(eval(&lua, r#"select(2, pcall(ngx.re.gsub, "a", "a", function() error("boom") end))"#), "t:1: boom");
        assert_eq!(eval(&lua, r#"type(select(2, pcall(ngx.re.gsub, "a", "a", function() error({}) end)))"#), "table");
    }

    #[test]
    fn gmatch() {
        let lua = state(super::register);
        let run = |expr: &str| {
            eval(
                &lua,
                &format!(
                    r#"(function()
                        local it, out = {expr}, {{}}
                        for i = 1, 10 do
                            local m, err = it()
                            if not m then out[#out + 1] = show(m, err) break end
                            out[#out + 1] = show(m)
                        end
                        out[#out + 1] = show(it())
                        return table.concat(out, " / ")
                    end)()"#
                ),
            )
        };
        assert_eq!(
            run(r#"ngx.re.gmatch("hello, world", "([a-z]+)")"#),
            "{0=hello 1=hello} / {0=world 1=world} / nil | nil / nil"
        );
        assert_eq!(run(r#"ngx.re.gmatch("ab", "b*")"#), "{0=} / {0=b} / {0=} / nil | nil / nil");
        assert_eq!(run(r#"ngx.re.gmatch("abc", "a|")"#), "{0=a} / {0=} / {0=} / {0=} / nil | nil / nil");
        assert_eq!(run(r#"ngx.re.gmatch("\xff\xfe", ".", "u")"#), "nil | pcre_exec() failed: -10 / nil");
        assert_eq!(
            eval(&lua, r#"show(ngx.re.gmatch("ab", "("))"#),
            r#"nil | pcre2_compile() failed: missing closing parenthesis in "(""#
        );
    }
}
