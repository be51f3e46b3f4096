//! A worker's Lua state and how a phase runs on it.
//!
//! One state per worker thread, created on first use. Scripts compile into
//! functions once per worker and stay cached by script id (a reload
//! recompiles only changed scripts). Each phase call runs as a coroutine,
//! resumed directly until it first waits (`coroutine`), with its request
//! published so callbacks find it and the budget clock running only while
//! Lua does.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value};

use super::compile::lua_message;
use super::coroutine::{self, Coroutines};
use super::request::{InPhase, Shared};
use super::{budget, ngx, Phase, Script, Settings};

/// A phase once started: over, or the rest of its run (it waits).
pub enum Begun {
    Over(Outcome),
    Running(Pin<Box<dyn Future<Output = Outcome>>>),
}

/// How a phase ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The phase ran to its end (or `ngx.exit(ngx.OK)` in rewrite/access).
    Continue,
    /// `ngx.exit(code)` / `ngx.redirect` with a status ≥ 200 or ngx.ERROR; or a content phase that finished.
    Exit(i64),
    /// A Lua error, a stopped runaway script or memory exhaustion: already logged with file:line.
    Error(String),
}

pub struct Runtime {
    lua: Lua,
    /// init_worker of the current generation has finished (requests wait for it).
    init_done: Rc<Cell<bool>>,
    init_notify: Rc<tokio::sync::Notify>,
    functions: RefCell<HashMap<u64, Compiled, BuildHasherDefault<IdHasher>>>,
    coroutines: Coroutines,
    generation: Cell<u64>,
    /// Keeps alive the coroutine whose `lua_State` the budget watchdog hooks.
    _anchor: mlua::Thread,
}

thread_local! {
    static RUNTIME: RefCell<Option<Rc<Runtime>>> = const { RefCell::new(None) };
    static WORKER: Cell<(usize, usize)> = const { Cell::new((0, 1)) };
}

/// True once this worker's Lua state exists.
pub fn started() -> bool {
    RUNTIME.with(|r| r.borrow().is_some())
}

/// Tell this thread which worker it is (for `ngx.worker.id/count`).
pub fn set_worker(id: usize, count: usize) {
    WORKER.with(|w| w.set((id, count)));
}

pub fn worker() -> (usize, usize) {
    WORKER.with(|w| w.get())
}

/// This worker's runtime, created on first use and brought up to date with
/// the snapshot (`generation`, `settings`).
pub fn get(generation: u64, settings: &Settings) -> mlua::Result<Rc<Runtime>> {
    let rt = RUNTIME.with(|r| r.borrow().clone());
    let rt = match rt {
        Some(rt) => rt,
        None => {
            let rt = Rc::new(Runtime::new(settings)?);
            RUNTIME.with(|r| *r.borrow_mut() = Some(Rc::clone(&rt)));
            rt
        }
    };
    if rt.generation.get() != generation {
        rt.generation.set(generation);
        rt.apply(settings)?;
    }
    Ok(rt)
}

/// Lua code run once per state: `pcall`/`xpcall` that cannot swallow
/// `ngx.exit` or a stopped runaway script.
const PRELUDE: &str = r#"
local fatal, message = ...
local raw_pcall, raw_xpcall, error, select = pcall, xpcall, error, select
local function pass(ok, ...)
    if ok then return ok, ... end
    if fatal((...)) then error((...), 0) end
    -- Errors raised in Rust reach Lua as error objects: scripts see their message, as in OpenResty.
    return ok, message((...)), select(2, ...)
end
pcall = function(f, ...) return pass(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...)
    return pass(raw_xpcall(f, function(e) if fatal(e) then return e end return handler(message(e)) end, ...))
end
"#;

impl Runtime {
    fn new(settings: &Settings) -> mlua::Result<Self> {
        // Finished phase coroutines go back to a pool: creating one per phase call
        // cost more than the call itself.
        let lua = Lua::new_with(StdLib::ALL_SAFE, LuaOptions::new().thread_pool_size(256))?;
        sandbox(&lua, settings)?;
        // Pattern matching the script budget can stop (LuaJIT's is out of the hook's reach).
        super::string::register(&lua)?;
        let fatal = lua
            .create_function(|_, _err: Value| Ok(budget::tripped() || ngx::resp::exiting() || coroutine::aborting()))?;
        let message = lua.create_function(|lua, err: Value| match err {
            Value::Error(e) => Ok(Value::String(lua.create_string(lua_message(&e))?)),
            other => Ok(other),
        })?;
        lua.load(PRELUDE).set_name("=luagate.prelude").call::<()>((fatal, message))?;
        ngx::register(&lua, settings)?;
        // What package.loaded holds now is luagate's; anything later came from scripts.
        let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
        let builtin = lua.create_table()?;
        for kv in loaded.pairs::<Value, Value>() {
            builtin.set(kv?.0, true)?;
        }
        for preloaded in lua.globals().get::<Table>("package")?.get::<Table>("preload")?.pairs::<Value, Value>() {
            builtin.set(preloaded?.0, true)?;
        }
        lua.set_named_registry_value("luagate.builtin_modules", builtin)?;
        let anchor = lua.create_thread(lua.create_function(|_, ()| Ok(()))?)?;
        // SAFETY: the anchor thread lives as long as this runtime, which lives
        // as long as the worker thread that registers it.
        unsafe { budget::register(anchor.state(), settings.time_budget) };
        super::ceiling::set(&lua, settings.memory_limit);
        let coroutines = Coroutines::new(&lua)?;
        Ok(Self {
            lua,
            init_done: Rc::new(Cell::new(true)),
            init_notify: Rc::new(tokio::sync::Notify::new()),
            functions: RefCell::new(HashMap::default()),
            coroutines,
            generation: Cell::new(0),
            _anchor: anchor,
        })
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Bring the state up to date after a reload: package.path, shared dicts,
    /// budget, memory ceiling; forget functions of scripts no longer used;
    /// run `init_worker`.
    fn apply(&self, settings: &Settings) -> mlua::Result<()> {
        sandbox(&self.lua, settings)?;
        let package: Table = self.lua.globals().get("package")?;
        package.set("path", settings.package_path.as_str())?;
        // Modules scripts loaded with require are reloaded too, as fresh nginx workers would.
        let loaded: Table = package.get("loaded")?;
        let builtin: Table = self.lua.named_registry_value("luagate.builtin_modules")?;
        let user: Vec<Value> = loaded
            .pairs::<Value, Value>()
            .filter_map(|kv| kv.ok().map(|(k, _)| k))
            .filter(|k| !builtin.contains_key(k.clone()).unwrap_or(true))
            .collect();
        for k in user {
            loaded.set(k, Value::Nil)?;
        }
        ngx::on_reload(&self.lua, settings)?;
        budget::set_budget(settings.time_budget);
        super::ceiling::set(&self.lua, settings.memory_limit);
        if self.functions.borrow().len() > 4096 {
            self.functions.borrow_mut().clear();
            self.lua.expire_registry_values();
        }
        if let Some(init) = settings.init_worker.clone() {
            let rt = self.function(&init);
            match rt {
                Ok(f) => {
                    let (done, notify) = (Rc::clone(&self.init_done), Rc::clone(&self.init_notify));
                    done.set(false);
                    tokio::task::spawn_local(async move {
                        let fut = InPhase::new(Phase::InitWorker, ngx::thread::scope(None, f.call_async::<()>(())));
                        if let Err(e) = fut.await {
                            tracing::error!(target: "lua", script = %init.name, "init_worker failed: {}", lua_message(&e));
                        }
                        done.set(true);
                        notify.notify_waiters();
                    });
                }
                Err(e) => tracing::error!(target: "lua", script = %init.name, "init_worker: {}", lua_message(&e)),
            }
        }
        Ok(())
    }

    /// init_worker has run (or there is none).
    pub fn is_ready(&self) -> bool {
        self.init_done.get()
    }

    /// Resolves once init_worker has run (requests wait for it, as nginx
    /// runs init_worker_by_lua before accepting).
    pub async fn ready(&self) {
        loop {
            let notified = self.init_notify.notified();
            if self.init_done.get() {
                return;
            }
            notified.await;
        }
    }

    /// The compiled function of `script` (cached per worker).
    pub fn function(&self, script: &Script) -> mlua::Result<Function> {
        self.compiled(script, |c| c.function.clone())
    }

    fn compiled<R>(&self, script: &Script, f: impl FnOnce(&Compiled) -> R) -> mlua::Result<R> {
        if let Some(c) = self.functions.borrow().get(&script.id) {
            return Ok(f(c));
        }
        let function = self.lua.load(&script.source[..]).set_name(format!("@{}", script.name)).into_function()?;
        let key = self.lua.create_registry_value(function.clone())?;
        let c = Compiled { function, key };
        let out = f(&c);
        self.functions.borrow_mut().insert(script.id, c);
        Ok(out)
    }

    /// Run `script` as `phase` of `req` to its end.
    pub async fn run(self: &Rc<Self>, phase: Phase, script: &Arc<Script>, req: &Shared) -> Outcome {
        match Self::begin(self, phase, script, req) {
            Begun::Over(outcome) => outcome,
            Begun::Running(rest) => rest.await,
        }
    }

    /// Start `script` as `phase` of `req`: a script that does not wait is
    /// over when this returns, with no future made for it.
    pub fn begin(rt: &Rc<Self>, phase: Phase, script: &Arc<Script>, req: &Shared) -> Begun {
        {
            let mut r = req.borrow_mut();
            r.phase = phase;
            r.exit = None;
        }
        let key = match rt.compiled(script, |c| c.key.id()) {
            Ok(k) => k,
            Err(e) => return Begun::Over(rt.failed(phase, script, &e)),
        };
        match ngx::thread::scope_begin(Some(Rc::clone(req)), || rt.coroutines.start(&rt.lua, key)) {
            Ok(result) => Begun::Over(rt.outcome(phase, script, req, result)),
            Err(rest) => {
                let (rt, script, req) = (Rc::clone(rt), Arc::clone(script), Rc::clone(req));
                Begun::Running(Box::pin(async move {
                    let result = rest.await;
                    rt.outcome(phase, &script, &req, result)
                }))
            }
        }
    }

    /// What a phase's run ending with `result` means for the request.
    fn outcome(&self, phase: Phase, script: &Script, req: &Shared, result: mlua::Result<()>) -> Outcome {
        let exit = req.borrow().exit;
        match result {
            Ok(()) => match exit {
                Some(code) if code != 0 || phase == Phase::Content => Outcome::Exit(code),
                _ if phase == Phase::Content => Outcome::Exit(0),
                _ => Outcome::Continue,
            },
            Err(e) => {
                if budget::take_tripped() {
                    let msg = format!("{}: {} phase stopped: time budget exceeded", script.name, phase.name());
                    tracing::error!(target: "lua", route = %req.borrow().route, "{msg}");
                    return Outcome::Error(msg);
                }
                match exit {
                    Some(0) if phase != Phase::Content => Outcome::Continue,
                    Some(code) => Outcome::Exit(code),
                    None => self.failed(phase, script, &e),
                }
            }
        }
    }

    fn failed(&self, phase: Phase, script: &Script, e: &mlua::Error) -> Outcome {
        let mut msg = lua_message(e);
        if matches!(e, mlua::Error::MemoryError(_)) || msg.contains("not enough memory") {
            // LuaJIT has no emergency collection: free what the failed script held now.
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        }
        if !msg.starts_with(&*script.name) {
            msg = format!("{}: {msg}", script.name);
        }
        tracing::error!(target: "lua", phase = phase.name(), "lua error: {msg}");
        Outcome::Error(msg)
    }
}

/// A script compiled on this worker: the function, and its registry
/// reference for direct resumes.
struct Compiled {
    function: Function,
    key: mlua::RegistryKey,
}

/// Script ids are already hashes (of name and source): the function cache
/// uses them as they are instead of hashing them again with SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id;
    }
}

/// Registry key of what [`sandbox`] may take away, as the state was created.
const SANDBOXED: &str = "luagate.sandboxed";

/// Take away what scripts must not reach unless the config grants it; give
/// back what it grants. Run when the state is created and again on each
/// reload, so a grant the new config drops is taken away from the running
/// state (a reference a script kept in a global meanwhile stays, until restart).
fn sandbox(lua: &Lua, settings: &Settings) -> mlua::Result<()> {
    let g = lua.globals();
    let os: Table = g.get("os")?;
    let io: Table = g.get("io")?;
    let package: Table = g.get("package")?;
    let kept: Table = match lua.named_registry_value::<Option<Table>>(SANDBOXED)? {
        Some(kept) => kept,
        None => {
            let kept = lua.create_table()?;
            kept.set("execute", os.get::<Value>("execute")?)?;
            kept.set("popen", io.get::<Value>("popen")?)?;
            kept.set("loadlib", package.get::<Value>("loadlib")?)?;
            kept.set("cpath", package.get::<Value>("cpath")?)?;
            lua.set_named_registry_value(SANDBOXED, &kept)?;
            kept
        }
    };
    let granted = |yes: bool, name: &str| if yes { kept.get::<Value>(name) } else { Ok(Value::Nil) };
    os.set("exit", Value::Nil)?;
    os.set("execute", granted(settings.grants.os_execute, "execute")?)?;
    io.set("popen", granted(settings.grants.io_popen, "popen")?)?;
    package.set("loadlib", granted(settings.grants.native_modules, "loadlib")?)?;
    // The C loaders search package.cpath only: empty, they find nothing.
    match granted(settings.grants.native_modules, "cpath")? {
        Value::Nil => package.set("cpath", "")?,
        cpath => package.set("cpath", cpath)?,
    }
    Ok(())
}
