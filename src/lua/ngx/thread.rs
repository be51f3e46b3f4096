//! `ngx.thread.spawn`, `ngx.thread.wait` and `ngx.thread.kill`: OpenResty's
//! "light threads".
//!
//! A light thread is a Lua coroutine that runs concurrently with the handler
//! that spawned it (a request phase or a timer callback), on the same worker
//! and with the same request published (`request::Scoped`). As in
//! lua-nginx-module:
//!
//! - `spawn` runs the new thread at once, until it first yields (or ends),
//!   before it returns the thread. Here that first run is a nested poll of the
//!   thread's future inside `spawn`; after it the thread is driven by its own
//!   `spawn_local` task.
//! - A handler ([`scope`]) is not over until its entry thread *and* all its
//!   light threads have ended; it ends early, killing the others, when the
//!   entry thread fails or any thread calls `ngx.exit`. A light thread that
//!   fails is logged ("lua user thread aborted") and kills nothing.
//! - `wait` and `kill` only work from the thread's parent (the coroutine that
//!   spawned it) and return OpenResty's values and error strings.
//! - Like every waiting API in luagate, light threads work in every phase
//!   (OpenResty allows them in rewrite, access, content and timers only).
//!
//! Identity: the thread object Lua gets is the real coroutine running the
//! function. It runs a trampoline under `Function::call_async`, so that
//! dropping its future (kill, abort) promptly drops whatever Rust future it
//! was waiting in (a sleep, a socket, a semaphore wait); the trampoline ends
//! in an error so mlua never recycles the coroutine for another call while
//! scripts may still hold it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use mlua::{Function, Lua, MultiValue, Table, Thread, Value};

use crate::lua::budget;
use crate::lua::coroutine::Start;
use crate::lua::request::{self, Published, Scoped, Shared};

pub type LocalFuture = Pin<Box<dyn Future<Output = mlua::Result<()>>>>;

/// Lua side: the trampoline every light thread runs, and the `ngx.thread`
/// functions, which pass the calling coroutine (the would-be parent) along.
const LUA: &str = r##"
local spawn, wait, kill, running, pcall, select, error = ...
local function pack(...) return { n = select("#", ...), ... } end
local function settle(box, ...)
    box.r = pack(...)
    -- End in an error, not a return: mlua recycles coroutines that return,
    -- and this one stays the thread object scripts hold.
    error()
end
local function trampoline(box, f, ...)
    box.co = running()
    return settle(box, pcall(f, ...))
end
local thread = {
    spawn = function(...) return spawn(running(), ...) end,
    wait = function(...) return wait(running(), ...) end,
    kill = function(...) return kill(running(), ...) end,
}
return thread, trampoline
"##;

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let g = lua.globals();
    let coroutine: Table = g.get("coroutine")?;
    let running: Function = coroutine.get("running")?;
    // Placeholders, replaced once the trampoline exists (it is needed by spawn).
    let slot: Rc<RefCell<Option<Function>>> = Rc::new(RefCell::new(None));
    let tramp = Rc::clone(&slot);
    let spawn = lua.create_function(move |lua, (parent, f, args): (Value, Value, MultiValue)| {
        let trampoline = tramp.borrow().clone().ok_or_else(|| mlua::Error::runtime("ngx.thread not ready"))?;
        spawn(lua, &trampoline, &parent, f, args)
    })?;
    let wait = crate::lua::coroutine::async_function(lua, |lua, (parent, threads): (Value, MultiValue)| {
        let prepared = prepare_wait(&parent, threads);
        async move {
            match prepared? {
                Waited::Done(reply) => reply.into_lua(&lua),
                Waited::Pending(list) => wait_any(list).await.into_lua(&lua),
            }
        }
    })?;
    let kill = lua.create_function(|lua, (parent, t): (Value, Value)| kill(&parent, t)?.into_lua(lua))?;
    let (thread, trampoline): (Table, Function) = lua.load(LUA).set_name("=ngx.thread").call((
        spawn,
        wait,
        kill,
        running,
        g.get::<Function>("pcall")?,
        g.get::<Function>("select")?,
        g.get::<Function>("error")?,
    ))?;
    *slot.borrow_mut() = Some(trampoline);
    ngx.set("thread", thread)
}

/// Run a handler's entry thread (`entry`: a `call_async` of the phase script
/// or timer callback) with `req` published, then wait for the light threads
/// it spawned, the way lua-nginx-module finishes a handler: it ends when the
/// entry thread and every light thread have ended, or as soon as the entry
/// thread fails or any thread calls `ngx.exit` (the remaining threads are
/// killed then). Dropping the returned future kills them too.
pub async fn scope<F>(req: Option<Shared>, entry: F) -> mlua::Result<()>
where
    F: Future<Output = mlua::Result<()>>,
{
    let group = Rc::new(Group::new(false));
    let _abort = AbortOnDrop(Rc::clone(&group));
    let out = Scoped::new(req, InGroup { group: Rc::clone(&group), entry: true, inner: entry }).await;
    settle(&group, out).await
}

/// [`scope`] for a phase script, started here: its first run (`start`, a
/// direct resume) happens now, with the request and the group published.
/// A script that ends without waiting, and leaves no light thread running,
/// is over (`Ok`); otherwise the rest is a future.
pub fn scope_begin(req: Option<Shared>, start: impl FnOnce() -> Start) -> Result<mlua::Result<()>, LocalFuture> {
    let (first, group) = {
        let _published = Published::new(req.clone());
        // The group is made only if the script spawns a light thread.
        let lazy = GroupPublished::new(Slot::Lazy);
        let first = start();
        (first, lazy.end())
    };
    match first {
        Start::Done(out) if out.is_err() || group.as_ref().is_none_or(|g| g.running.get() == 0) => {
            if let Some(group) = group {
                group.abort_all();
            }
            Ok(out)
        }
        first => {
            let group = group.unwrap_or_else(|| Rc::new(Group::new(false)));
            let abort = AbortOnDrop(Rc::clone(&group));
            Err(Box::pin(async move {
                let _abort = abort;
                let out = match first {
                    Start::Done(out) => out,
                    Start::Waiting(rest) => {
                        Scoped::new(req, InGroup { group: Rc::clone(&group), entry: true, inner: rest }).await
                    }
                };
                settle(&group, out).await
            }))
        }
    }
}

/// A handler's entry thread ended with `out`: unless it failed, wait for its
/// light threads (or for one of them to call `ngx.exit`).
async fn settle(group: &Group, out: mlua::Result<()>) -> mlua::Result<()> {
    if out.is_ok() && group.running.get() != 0 {
        std::future::poll_fn(|cx| {
            if group.running.get() == 0 || group.exited.get() {
                return Poll::Ready(());
            }
            set_waker(&group.idle_waker, cx.waker());
            Poll::Pending
        })
        .await;
    }
    out
}

/// The light threads of one handler run.
struct Group {
    threads: RefCell<HashMap<usize, Rc<UThread>>>,
    /// Threads still running.
    running: Cell<usize>,
    /// A thread called `ngx.exit`: the handler is over.
    exited: Cell<bool>,
    /// Threads spawned outside any [`scope`] (nobody waits for them or kills them).
    detached: bool,
    entry_waker: RefCell<Option<Waker>>,
    idle_waker: RefCell<Option<Waker>>,
}

impl Group {
    fn new(detached: bool) -> Self {
        Self {
            threads: RefCell::new(HashMap::new()),
            running: Cell::new(0),
            exited: Cell::new(false),
            detached,
            entry_waker: RefCell::new(None),
            idle_waker: RefCell::new(None),
        }
    }

    fn get(&self, t: &Thread) -> Option<Rc<UThread>> {
        self.threads.borrow().get(&(t.to_pointer() as usize)).cloned()
    }

    /// A thread of this group stopped running.
    fn stopped(&self) {
        self.running.set(self.running.get().saturating_sub(1));
        if self.running.get() == 0 {
            wake(&self.idle_waker);
        }
    }

    /// `ngx.exit` in a light thread: kill the others and end the entry thread.
    fn exit(&self) {
        if self.detached || self.exited.replace(true) {
            return;
        }
        self.abort_all();
        wake(&self.entry_waker);
        wake(&self.idle_waker);
    }

    /// Kill every thread still running.
    fn abort_all(&self) {
        if self.running.get() == 0 {
            return;
        }
        let running: Vec<Rc<UThread>> =
            self.threads.borrow().values().filter(|t| matches!(*t.state.borrow(), State::Running)).cloned().collect();
        for t in running {
            t.kill(self);
        }
    }

    /// Forget a thread that was waited for or killed (detached group only:
    /// a scope's group keeps it, so a second wait says "already waited").
    fn reaped(&self, t: &UThread) {
        if self.detached {
            self.threads.borrow_mut().remove(&t.key);
        }
    }
}

struct AbortOnDrop(Rc<Group>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort_all();
    }
}

thread_local! {
    /// The group of the handler whose coroutine is being resumed.
    static CURRENT: RefCell<Slot> = const { RefCell::new(Slot::Detached) };
    /// Where threads spawned outside any scope go.
    static DETACHED: Rc<Group> = Rc::new(Group::new(true));
}

/// Where light threads spawned now go.
enum Slot {
    /// Outside any handler: the detached group.
    Detached,
    /// A handler's first run: its group, made when first needed.
    Lazy,
    Group(Rc<Group>),
}

fn current_group() -> Rc<Group> {
    CURRENT.with(|c| {
        let mut slot = c.borrow_mut();
        match &*slot {
            Slot::Group(g) => Rc::clone(g),
            Slot::Lazy => {
                let g = Rc::new(Group::new(false));
                *slot = Slot::Group(Rc::clone(&g));
                g
            }
            Slot::Detached => DETACHED.with(Rc::clone),
        }
    })
}

enum State {
    Running,
    /// Ended, not waited for yet: `true, results...` or `false, err`.
    Zombie(Reply),
    /// Waited for or killed.
    Dead,
}

struct UThread {
    /// The coroutine's address: its key in the group.
    key: usize,
    /// The coroutine that spawned it.
    parent: usize,
    state: RefCell<State>,
    /// Where the trampoline leaves `co` and the results `r`.
    results: Table,
    /// The thread's future while it runs (None before its task takes over, or once done).
    future: RefCell<Option<LocalFuture>>,
    relay: Arc<Relay>,
    waiters: RefCell<Vec<Waker>>,
    req: Option<Shared>,
    group: Weak<Group>,
}

impl UThread {
    /// Stop it now: drop its future (which drops what it waits in).
    fn kill(&self, group: &Group) {
        if !matches!(std::mem::replace(&mut *self.state.borrow_mut(), State::Dead), State::Running) {
            return;
        }
        group.stopped();
        // A thread being polled right now (it triggered this) is dropped by
        // its driver once the poll returns; see `drive`.
        let future = self.future.try_borrow_mut().ok().and_then(|mut f| f.take());
        drop(future);
        self.relay.wake_by_ref();
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        for w in self.waiters.take() {
            w.wake();
        }
    }

    /// The thread's future finished with `res`: it becomes a zombie.
    fn complete(&self, res: mlua::Result<()>) {
        if !matches!(*self.state.borrow(), State::Running) {
            return; // killed meanwhile
        }
        // ngx.exit was called (here or by another thread of the request).
        let exited = self.req.as_ref().is_some_and(|r| r.try_borrow().is_ok_and(|r| r.exit.is_some()));
        let reply = match self.results.raw_get::<Option<Table>>("r") {
            Ok(Some(r)) => {
                let n: usize = r.raw_get("n").unwrap_or(0);
                let values: Vec<Value> = (1..=n).map(|i| r.raw_get(i).unwrap_or(Value::Nil)).collect();
                if let (Some(Value::Boolean(false)), err) = (values.first(), values.get(1)) {
                    let msg = match err {
                        Some(Value::String(s)) => s.to_string_lossy(),
                        Some(Value::Integer(i)) => i.to_string(),
                        Some(Value::Number(n)) => super::format_number(*n),
                        _ => "unknown reason".into(),
                    };
                    tracing::error!(target: "lua", "lua user thread aborted: runtime error: {msg}");
                }
                Reply::Values(MultiValue::from_vec(values))
            }
            // The error got past the trampoline's pcall: ngx.exit, a stopped
            // runaway script, memory exhaustion.
            _ => {
                let msg = if budget::take_tripped() {
                    "light thread stopped: time budget exceeded".to_string()
                } else {
                    res.err().map(|e| crate::lua::compile::lua_message(&e)).unwrap_or_default()
                };
                if !exited {
                    tracing::error!(target: "lua", "lua user thread aborted: {msg}");
                }
                Reply::Failed(msg)
            }
        };
        *self.state.borrow_mut() = State::Zombie(reply);
        if let Some(group) = self.group.upgrade() {
            group.stopped();
            if exited {
                group.exit();
            }
        }
        self.wake_waiters();
    }
}

/// A waker that forwards to the task driving a thread: the first run of a
/// thread happens inside `spawn`, before that task exists.
#[derive(Default)]
struct Relay(Mutex<Option<Waker>>);

impl Relay {
    fn set(&self, waker: &Waker) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waker = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn set_waker(slot: &RefCell<Option<Waker>>, waker: &Waker) {
    let mut slot = slot.borrow_mut();
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

fn wake(slot: &RefCell<Option<Waker>>) {
    let waker = slot.borrow_mut().take();
    if let Some(w) = waker {
        w.wake();
    }
}

pin_project_lite::pin_project! {
    /// Publishes the group while a handler's coroutine or light thread is polled.
    struct InGroup<F> {
        group: Rc<Group>,
        entry: bool,
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = mlua::Result<()>>> Future for InGroup<F> {
    type Output = mlua::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if *this.entry {
            if this.group.exited.get() {
                // A light thread called ngx.exit: the entry thread is over.
                return Poll::Ready(Err(mlua::Error::runtime("ngx.exit")));
            }
            set_waker(&this.group.entry_waker, cx.waker());
        }
        let _published = GroupPublished::new(Slot::Group(Rc::clone(this.group)));
        this.inner.poll(cx)
    }
}

/// While alive: `slot` says where light threads spawned now go.
struct GroupPublished(Option<Slot>);

impl GroupPublished {
    fn new(slot: Slot) -> Self {
        Self(Some(CURRENT.with(|c| c.replace(slot))))
    }

    /// Ends it: the group published (made by now, for a lazy slot), if any.
    fn end(mut self) -> Option<Rc<Group>> {
        let previous = self.0.take()?;
        match CURRENT.with(|c| c.replace(previous)) {
            Slot::Group(g) => Some(g),
            _ => None,
        }
    }
}

impl Drop for GroupPublished {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
}

fn parent_key(parent: &Value) -> usize {
    match parent {
        Value::Thread(t) => t.to_pointer() as usize,
        _ => 0,
    }
}

fn spawn(lua: &Lua, trampoline: &Function, parent: &Value, f: Value, args: MultiValue) -> mlua::Result<Value> {
    let f = match f {
        Value::Function(f) if f.info().what != "C" => f,
        _ => return Err(mlua::Error::runtime("bad argument #1 to 'spawn' (Lua function expected)")),
    };
    let group = current_group();
    if group.exited.get() {
        // A light thread called ngx.exit: this handler is over.
        return Err(mlua::Error::runtime("ngx.exit"));
    }
    let results = lua.create_table()?;
    let mut call = Vec::with_capacity(args.len() + 2);
    call.push(Value::Table(results.clone()));
    call.push(Value::Function(f));
    call.extend(args);
    let req = request::current();
    let inner = trampoline.call_async::<()>(MultiValue::from_vec(call));
    let mut future: LocalFuture =
        Box::pin(Scoped::new(req.clone(), InGroup { group: Rc::clone(&group), entry: false, inner }));
    let relay = Arc::new(Relay::default());
    // Run it until it first yields, as OpenResty does before spawn returns.
    let first = future.as_mut().poll(&mut Context::from_waker(&Waker::from(Arc::clone(&relay))));
    let co: Thread = match results.raw_get::<Option<Thread>>("co")? {
        Some(co) => co,
        None => {
            return Err(match first {
                Poll::Ready(Err(e)) => e,
                _ => mlua::Error::runtime("ngx.thread.spawn: the thread did not start"),
            })
        }
    };
    let thread = Rc::new(UThread {
        key: co.to_pointer() as usize,
        parent: parent_key(parent),
        state: RefCell::new(State::Running),
        results,
        future: RefCell::new(None),
        relay,
        waiters: RefCell::new(Vec::new()),
        req,
        group: Rc::downgrade(&group),
    });
    group.threads.borrow_mut().insert(thread.key, Rc::clone(&thread));
    group.running.set(group.running.get() + 1);
    match first {
        Poll::Ready(res) => {
            drop(future);
            thread.complete(res);
        }
        Poll::Pending => {
            *thread.future.borrow_mut() = Some(future);
            tokio::task::spawn_local(drive(Rc::clone(&thread)));
        }
    }
    if group.exited.get() {
        // The new thread (or one it spawned) called ngx.exit: the spawner ends too.
        thread.kill(&group);
        return Err(mlua::Error::runtime("ngx.exit"));
    }
    Ok(Value::Thread(co))
}

/// The task that runs a light thread after its first run in `spawn`.
async fn drive(thread: Rc<UThread>) {
    std::future::poll_fn(|cx| {
        thread.relay.set(cx.waker());
        let res = {
            let Ok(mut slot) = thread.future.try_borrow_mut() else { return Poll::Pending };
            let Some(future) = slot.as_mut() else { return Poll::Ready(()) }; // killed
            let res = future.as_mut().poll(cx);
            if res.is_ready() || matches!(*thread.state.borrow(), State::Dead) {
                // Done, or killed while it ran (it spawned a thread that called ngx.exit).
                *slot = None;
            }
            res
        };
        match res {
            Poll::Ready(res) => {
                thread.complete(res);
                Poll::Ready(())
            }
            Poll::Pending if matches!(*thread.state.borrow(), State::Dead) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

enum Waited {
    Done(Reply),
    Pending(Vec<Rc<UThread>>),
}

/// What `wait` / `kill` return, made into Lua values where a `Lua` is at hand.
enum Reply {
    Values(MultiValue),
    /// `false, message`: the thread died of an error its pcall could not catch.
    Failed(String),
    /// `nil, message`.
    Nil(&'static str),
}

impl Reply {
    fn into_lua(self, lua: &Lua) -> mlua::Result<MultiValue> {
        Ok(match self {
            Reply::Values(v) => v,
            Reply::Failed(msg) => {
                MultiValue::from_vec(vec![Value::Boolean(false), Value::String(lua.create_string(msg)?)])
            }
            Reply::Nil(msg) => MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(msg)?)]),
        })
    }
}

/// The synchronous part of `wait`: argument checks and threads already done.
fn prepare_wait(parent: &Value, threads: MultiValue) -> mlua::Result<Waited> {
    if threads.is_empty() {
        return Err(mlua::Error::runtime("at least one coroutine should be specified"));
    }
    let group = current_group();
    let parent = parent_key(parent);
    let n = threads.len();
    let mut list = Vec::with_capacity(n);
    for (i, t) in threads.into_iter().enumerate() {
        let Value::Thread(t) = t else {
            return Err(mlua::Error::RuntimeError(format!("bad argument #{} to 'wait' (lua thread expected)", i + 1)));
        };
        let Some(thread) = group.get(&t) else {
            return Err(mlua::Error::runtime("attempt to wait on a coroutine that is not a user thread"));
        };
        if thread.parent != parent {
            return Err(mlua::Error::runtime("only the parent coroutine can wait on the thread"));
        }
        if let Some(values) = reap(&group, &thread) {
            return Ok(Waited::Done(values));
        }
        if matches!(*thread.state.borrow(), State::Dead) {
            if i + 1 < n {
                continue;
            }
            return Ok(Waited::Done(Reply::Nil("already waited or killed")));
        }
        list.push(thread);
    }
    Ok(Waited::Pending(list))
}

/// A zombie's results, leaving it dead.
fn reap(group: &Group, thread: &UThread) -> Option<Reply> {
    let mut state = thread.state.borrow_mut();
    if !matches!(*state, State::Zombie(_)) {
        return None;
    }
    let State::Zombie(values) = std::mem::replace(&mut *state, State::Dead) else { return None };
    drop(state);
    group.reaped(thread);
    Some(values)
}

/// Wait until the first of `list` ends and return its results.
async fn wait_any(list: Vec<Rc<UThread>>) -> Reply {
    std::future::poll_fn(|cx| {
        for thread in &list {
            if let Some(values) = thread.group.upgrade().and_then(|g| reap(&g, thread)) {
                return Poll::Ready(values);
            }
        }
        if list.iter().all(|t| matches!(*t.state.borrow(), State::Dead)) {
            return Poll::Ready(Reply::Nil("already waited or killed"));
        }
        for thread in &list {
            let mut waiters = thread.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
        }
        Poll::Pending
    })
    .await
}

fn kill(parent: &Value, t: Value) -> mlua::Result<Reply> {
    let Value::Thread(t) = t else {
        return Err(mlua::Error::runtime("bad argument #1 to 'kill' (lua thread expected)"));
    };
    let group = current_group();
    let Some(thread) = group.get(&t) else { return Ok(Reply::Nil("not user thread")) };
    if thread.parent != parent_key(parent) {
        return Ok(Reply::Nil("killer not parent"));
    }
    if reap(&group, &thread).is_some() {
        return Ok(Reply::Nil("already terminated"));
    }
    if matches!(*thread.state.borrow(), State::Dead) {
        return Ok(Reply::Nil("already waited or killed"));
    }
    thread.kill(&group);
    group.reaped(&thread);
    Ok(Reply::Values(MultiValue::from_vec(vec![Value::Integer(1)])))
}

/// Shared by the tests of `thread`, `timer` and `semaphore`.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::lua::{LuaRequest, Phase};

    /// A state with `ngx.timer`, `ngx.thread`, `ngx.semaphore`, plus
    /// `ngx.sleep`, `ngx.now` (seconds since the state was made),
    /// `ngx.get_phase` and `exit_now(code)` (what `ngx.exit` does to the request).
    pub fn lua() -> Lua {
        let lua = Lua::new();
        let ngx = lua.create_table().unwrap();
        super::super::timer::register(&lua, &ngx).unwrap();
        super::register(&lua, &ngx).unwrap();
        super::super::semaphore::register(&lua, &ngx).unwrap();
        let sleep = lua
            .create_async_function(|_, secs: f64| async move {
                if secs == 0.0 {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                }
                Ok(())
            })
            .unwrap();
        ngx.set("sleep", sleep).unwrap();
        let base = Instant::now();
        ngx.set("now", lua.create_function(move |_, ()| Ok(base.elapsed().as_secs_f64())).unwrap()).unwrap();
        let phase =
            lua.create_function(|_, ()| Ok(request::current().map_or("timer", |r| r.borrow().phase.name()))).unwrap();
        ngx.set("get_phase", phase).unwrap();
        let exit = lua
            .create_function(|_, code: i64| -> mlua::Result<()> {
                request::with("ngx.exit", |r| r.exit = Some(code))?;
                Err(mlua::Error::runtime("ngx.exit"))
            })
            .unwrap();
        lua.globals().set("exit_now", exit).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        lua
    }

    /// Run `f` on a current-thread `LocalRuntime`, as a worker does.
    pub fn block_on<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build_local(Default::default()).unwrap();
        rt.block_on(f)
    }

    /// Run `code` as a handler (entry thread plus its light threads), with `req` published.
    pub async fn handler_with(lua: &Lua, req: Option<Shared>, code: &str) -> mlua::Result<()> {
        let f = lua.load(code).set_name("@test.lua").into_function()?;
        scope(req, f.call_async::<()>(())).await
    }

    pub async fn handler(lua: &Lua, code: &str) -> mlua::Result<()> {
        handler_with(lua, None, code).await
    }

    pub fn eval<T: mlua::FromLuaMulti>(lua: &Lua, expr: &str) -> T {
        lua.load(format!("return {expr}")).eval().unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    pub fn request(phase: Phase) -> Shared {
        let (parts, ()) = http::Request::new(()).into_parts();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut r = LuaRequest::new(parts, addr, addr, false, Arc::from("test"), false, std::time::Instant::now());
        r.phase = phase;
        Rc::new(RefCell::new(r))
    }

    #[derive(Clone, Default)]
    pub struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        /// Capture this thread's log lines while the guard lives.
        pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let w = logs.clone();
            let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || w.clone()).finish();
            (logs, tracing::subscriber::set_default(sub))
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::testing::{block_on, eval, handler, handler_with, lua, request, Logs};
    use super::*;
    use crate::lua::Phase;

    const PACK: &str = "local function pack(...) return { n = select('#', ...), ... } end\n";

    #[test]
    fn spawn_runs_until_first_yield_and_wait_returns_results_in_order() {
        let lua = lua();
        block_on(async {
            let code = format!(
                "{PACK}
                log = {{}}
                local t = ngx.thread.spawn(function(a, b)
                    log[#log + 1] = 'child ' .. a
                    ngx.sleep(0.01)
                    log[#log + 1] = 'child end'
                    return a, nil, b
                end, 'x', 'y')
                log[#log + 1] = 'after spawn ' .. type(t)
                res = pack(ngx.thread.wait(t))
                again = pack(ngx.thread.wait(t))
                quick = pack(ngx.thread.wait(ngx.thread.spawn(function() return 1, 2 end)))"
            );
            handler(&lua, &code).await.unwrap();
        });
        assert_eq!(eval::<String>(&lua, "table.concat(log, '|')"), "child x|after spawn thread|child end");
        assert_eq!(eval::<i64>(&lua, "res.n"), 4);
        assert!(eval::<bool>(&lua, "res[1] == true"));
        assert_eq!(
            eval::<(String, bool, String)>(&lua, "res[2], res[3] == nil, res[4]"),
            ("x".into(), true, "y".into())
        );
        assert_eq!(
            eval::<(i64, bool, String)>(&lua, "again.n, again[1] == nil, again[2]"),
            (2, true, "already waited or killed".into())
        );
        assert_eq!(eval::<(i64, bool, i64, i64)>(&lua, "quick.n, quick[1], quick[2], quick[3]"), (3, true, 1, 2));
    }

    #[test]
    fn wait_on_two_threads_returns_the_first_to_finish() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "local slow = ngx.thread.spawn(function() ngx.sleep(0.08) return 'slow' end)
                 local fast = ngx.thread.spawn(function() ngx.sleep(0.01) return 'fast' end)
                 local t0 = ngx.now()
                 ok1, v1 = ngx.thread.wait(slow, fast)
                 first_after = ngx.now() - t0
                 -- fast is dead but not last: skipped; slow is waited for
                 ok2, v2 = ngx.thread.wait(fast, slow)
                 -- both dead, the last one decides
                 ok3, v3 = ngx.thread.wait(fast, slow)",
            )
            .await
            .unwrap();
        });
        assert_eq!(eval::<(bool, String)>(&lua, "ok1, v1"), (true, "fast".into()));
        assert!(eval::<f64>(&lua, "first_after") < 0.06, "wait returned only after the slow thread");
        assert_eq!(eval::<(bool, String)>(&lua, "ok2, v2"), (true, "slow".into()));
        assert_eq!(eval::<(bool, String)>(&lua, "ok3 == nil, v3"), (true, "already waited or killed".into()));
    }

    #[test]
    fn kill_stops_a_thread_and_reports_like_openresty() {
        let lua = lua();
        block_on(async {
            let code = format!(
                "{PACK}
                count = 0
                local t = ngx.thread.spawn(function()
                    while true do count = count + 1; ngx.sleep(0.01) end
                end)
                ngx.sleep(0.035)
                k1 = pack(ngx.thread.kill(t))
                at_kill = count
                ngx.sleep(0.05)
                after = count
                k2 = pack(ngx.thread.kill(t))
                w = pack(ngx.thread.wait(t))
                local z = ngx.thread.spawn(function() return 1 end)
                kz = pack(ngx.thread.kill(z))
                wz = pack(ngx.thread.wait(z))
                kn = pack(ngx.thread.kill(coroutine.create(function() end)))
                kb = pack(pcall(ngx.thread.kill, 1))"
            );
            handler(&lua, &code).await.unwrap();
        });
        assert_eq!(eval::<(i64, i64)>(&lua, "k1.n, k1[1]"), (1, 1));
        assert!(eval::<i64>(&lua, "at_kill") >= 2);
        assert_eq!(eval::<i64>(&lua, "after - at_kill"), 0, "a killed thread kept running");
        assert_eq!(eval::<(bool, String)>(&lua, "k2[1] == nil, k2[2]"), (true, "already waited or killed".into()));
        assert_eq!(eval::<(bool, String)>(&lua, "w[1] == nil, w[2]"), (true, "already waited or killed".into()));
        assert_eq!(eval::<(bool, String)>(&lua, "kz[1] == nil, kz[2]"), (true, "already terminated".into()));
        assert_eq!(eval::<String>(&lua, "wz[2]"), "already waited or killed");
        assert_eq!(eval::<(bool, String)>(&lua, "kn[1] == nil, kn[2]"), (true, "not user thread".into()));
        assert!(eval::<String>(&lua, "tostring(kb[2])").contains("bad argument #1 to 'kill' (lua thread expected)"));
    }

    #[test]
    fn thread_errors_and_misuse() {
        let lua = lua();
        let (logs, _guard) = Logs::capture();
        block_on(async {
            handler(
                &lua,
                "local e = ngx.thread.spawn(function() error({ code = 7 }) end)
                 ok1, err1 = ngx.thread.wait(e)
                 local e2 = ngx.thread.spawn(function() ngx.sleep(0.001) error('boom') end)
                 ok2, err2 = ngx.thread.wait(e2)
                 local p = ngx.thread.spawn(function() ngx.sleep(0.02) end)
                 local q = ngx.thread.spawn(function()
                     r1 = { pcall(ngx.thread.wait, p) }
                     r2 = { ngx.thread.kill(p) }
                 end)
                 ngx.thread.wait(q)
                 bad = { pcall(ngx.thread.wait, 1) }
                 none = { pcall(ngx.thread.wait) }
                 notuser = { pcall(ngx.thread.wait, coroutine.create(function() end)) }
                 spawn_c = { pcall(ngx.thread.spawn, print) }",
            )
            .await
            .unwrap();
        });
        assert_eq!(eval::<(bool, i64)>(&lua, "ok1, err1.code"), (false, 7));
        assert_eq!(eval::<(bool, String)>(&lua, "ok2, err2"), (false, "test.lua:3: boom".into()));
        assert!(logs.text().contains("lua user thread aborted: runtime error: test.lua:3: boom"), "{}", logs.text());
        assert!(eval::<String>(&lua, "tostring(r1[2])").contains("only the parent coroutine can wait on the thread"));
        assert_eq!(eval::<(bool, String)>(&lua, "r2[1] == nil, r2[2]"), (true, "killer not parent".into()));
        assert!(eval::<String>(&lua, "tostring(bad[2])").contains("bad argument #1 to 'wait' (lua thread expected)"));
        assert!(eval::<String>(&lua, "tostring(none[2])").contains("at least one coroutine should be specified"));
        assert!(eval::<String>(&lua, "tostring(notuser[2])")
            .contains("attempt to wait on a coroutine that is not a user thread"));
        assert!(
            eval::<String>(&lua, "tostring(spawn_c[2])").contains("bad argument #1 to 'spawn' (Lua function expected)")
        );
    }

    #[test]
    fn handler_ends_after_its_light_threads() {
        let lua = lua();
        let took = block_on(async {
            let start = Instant::now();
            handler(&lua, "ngx.thread.spawn(function() ngx.sleep(0.05) done = true end)").await.unwrap();
            start.elapsed()
        });
        assert!(eval::<bool>(&lua, "done == true"));
        assert!(took >= Duration::from_millis(45), "{took:?}");
    }

    #[test]
    fn entry_error_or_drop_kills_light_threads() {
        let lua = lua();
        block_on(async {
            let start = Instant::now();
            let r =
                handler(&lua, "ngx.thread.spawn(function() ngx.sleep(0.03) ran = true end) error('entry boom')").await;
            assert!(r.unwrap_err().to_string().contains("entry boom"));
            assert!(start.elapsed() < Duration::from_millis(25));
            // A handler dropped midway (the client went away) takes its threads along.
            let dropped = tokio::time::timeout(
                Duration::from_millis(10),
                handler(&lua, "ngx.thread.spawn(function() ngx.sleep(0.03) ran2 = true end) ngx.sleep(1)"),
            )
            .await;
            assert!(dropped.is_err());
            tokio::time::sleep(Duration::from_millis(60)).await;
        });
        assert!(eval::<bool>(&lua, "ran == nil"), "a light thread outlived its failed entry thread");
        assert!(eval::<bool>(&lua, "ran2 == nil"), "a light thread outlived its dropped handler");
    }

    #[test]
    fn light_threads_see_the_request_and_exit_ends_the_handler() {
        let lua = lua();
        let req = request(Phase::Content);
        block_on(async {
            let start = Instant::now();
            let r = handler_with(
                &lua,
                Some(Rc::clone(&req)),
                "ngx.thread.spawn(function()
                     phase1 = ngx.get_phase(); ngx.sleep(0.001); phase2 = ngx.get_phase()
                 end)
                 ngx.thread.spawn(function() ngx.sleep(0.05) other = true end)
                 ngx.thread.spawn(function() ngx.sleep(0.01) exit_now(201) end)
                 ngx.sleep(0.1)
                 entry_continued = true",
            )
            .await;
            assert!(r.is_err(), "the entry thread should have been ended by ngx.exit");
            assert!(start.elapsed() < Duration::from_millis(45), "{:?}", start.elapsed());
            tokio::time::sleep(Duration::from_millis(120)).await;
        });
        assert_eq!(eval::<(String, String)>(&lua, "phase1, phase2"), ("content".into(), "content".into()));
        assert_eq!(req.borrow().exit, Some(201));
        assert!(eval::<bool>(&lua, "other == nil and entry_continued == nil"));
    }

    #[test]
    fn usable_in_every_phase_like_other_waiting_apis() {
        // luagate lets every phase yield (docs/lua.md), so light threads and
        // semaphore waits work in log, header_filter... where OpenResty forbids them.
        let lua = lua();
        block_on(async {
            handler_with(
                &lua,
                Some(request(Phase::Log)),
                "local s = require('ngx.semaphore').new(0)
                 local t = ngx.thread.spawn(function() ngx.sleep(0.01) s:post() return ngx.get_phase() end)
                 ok, err = s:wait(1)
                 tok, phase = ngx.thread.wait(t)",
            )
            .await
            .unwrap();
        });
        assert_eq!(eval::<(bool, bool)>(&lua, "ok, err == nil"), (true, true));
        assert_eq!(eval::<(bool, String)>(&lua, "tok, phase"), (true, "log".into()));
    }
}
