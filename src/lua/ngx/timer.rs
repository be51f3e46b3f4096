//! `ngx.timer.at`, `ngx.timer.every`, `ngx.timer.running_count` and
//! `ngx.timer.pending_count`.
//!
//! A timer is a `spawn_local` task on the worker that created it; when it
//! fires, its callback runs as its own coroutine with no request (like
//! OpenResty's fake timer request), through [`thread::scope`] so it may use
//! light threads and counts as running until they end. Arguments, limits
//! (`lua_max_pending_timers` 1024, `lua_max_running_timers` 256), return
//! values and error strings are lua-nginx-module's. Callback errors are
//! logged, never fatal to the worker.
//!
//! `premature`: when the worker begins a graceful shutdown
//! (`crate::server::stopping()`, noticed within [`WATCH_INTERVAL`], or
//! [`shutdown`]) every pending timer fires at once with `premature = true`
//! and `every` timers stop, as nginx does when a worker exits. [`abort_pending`]
//! does the same for a reload (the old worker's timers in nginx).

use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use mlua::{Function, Lua, MultiValue, Table, Value};
use tokio::sync::Notify;

use super::thread;
use crate::lua::budget;
use crate::lua::compile::lua_message;

/// `lua_max_pending_timers`' default.
pub const MAX_PENDING: usize = 1024;
/// `lua_max_running_timers`' default.
pub const MAX_RUNNING: usize = 256;
/// How often a worker with pending timers checks whether shutdown began.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Timers {
    pending: Cell<usize>,
    running: Cell<usize>,
    /// Bumped by [`abort_pending`]: timers created before fire prematurely.
    epoch: Cell<u64>,
    /// Shutdown began: pending timers fire prematurely, `every` stops, new
    /// timers with a delay are refused ("process exiting").
    exiting: Cell<bool>,
    /// Wakes pending timers to fire prematurely.
    early: Notify,
    /// Wakes [`shutdown`] when nothing is pending or running.
    idle: Notify,
    watching: Cell<bool>,
}

impl Timers {
    fn exiting(&self) -> bool {
        if !self.exiting.get() && crate::server::stopping() {
            self.begin_exit();
        }
        self.exiting.get()
    }

    fn begin_exit(&self) {
        self.exiting.set(true);
        self.early.notify_waiters();
    }

    fn premature(&self, epoch: u64) -> bool {
        self.exiting() || self.epoch.get() != epoch
    }

    /// Sleep `delay`; true when woken early (shutdown, reload).
    async fn sleep(&self, delay: Duration, epoch: u64) -> bool {
        let early = self.early.notified();
        tokio::pin!(early);
        early.as_mut().enable();
        if self.premature(epoch) {
            return true;
        }
        if delay.is_zero() {
            return false; // spawned: it already runs on a later loop iteration
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => self.premature(epoch),
            _ = early => true,
        }
    }

    fn check_idle(&self) {
        if self.pending.get() == 0 && self.running.get() == 0 {
            self.idle.notify_waiters();
        }
    }
}

/// One pending timer, counted while it lives.
struct Pending(Rc<Timers>);

impl Pending {
    fn new(t: &Rc<Timers>) -> Self {
        t.pending.set(t.pending.get() + 1);
        Self(Rc::clone(t))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.set(self.0.pending.get().saturating_sub(1));
        self.0.check_idle();
    }
}

/// One running callback, counted while it lives.
struct Running(Rc<Timers>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.set(self.0.running.get().saturating_sub(1));
        self.0.check_idle();
    }
}

thread_local! {
    /// This worker's timers, for [`shutdown`].
    static WORKER: std::cell::RefCell<Weak<Timers>> = const { std::cell::RefCell::new(Weak::new()) };
}

fn timers(lua: &Lua) -> mlua::Result<Rc<Timers>> {
    lua.app_data_ref::<Rc<Timers>>()
        .map(|t| Rc::clone(&t))
        .ok_or_else(|| mlua::Error::runtime("ngx.timer is not registered"))
}

pub fn register(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let state = Rc::new(Timers::default());
    WORKER.with(|w| *w.borrow_mut() = Rc::downgrade(&state));
    lua.set_app_data(state);
    let timer = lua.create_table()?;
    timer.set("at", lua.create_function(|lua, args: MultiValue| create(lua, false, args))?)?;
    timer.set("every", lua.create_function(|lua, args: MultiValue| create(lua, true, args))?)?;
    timer.set("running_count", lua.create_function(|lua, ()| Ok(timers(lua)?.running.get()))?)?;
    timer.set("pending_count", lua.create_function(|lua, ()| Ok(timers(lua)?.pending.get()))?)?;
    ngx.set("timer", timer)
}

/// Fire every pending timer of `lua` now with `premature = true` (and stop
/// `every` timers), as nginx's old workers do on a reload. Timers created
/// afterwards are unaffected.
pub fn abort_pending(lua: &Lua) {
    if let Ok(t) = timers(lua) {
        t.epoch.set(t.epoch.get() + 1);
        t.early.notify_waiters();
    }
}

/// Graceful stop of this worker's timers: fire the pending ones now with
/// `premature = true`, refuse new delayed ones, and wait until no timer is
/// pending or running. Bound it with the shutdown grace period.
pub async fn shutdown() {
    let Some(t) = WORKER.with(|w| w.borrow().upgrade()) else { return };
    t.begin_exit();
    loop {
        let idle = t.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if t.pending.get() == 0 && t.running.get() == 0 {
            return;
        }
        idle.await;
    }
}

/// `ngx.timer.at` / `ngx.timer.every`.
fn create(lua: &Lua, every: bool, args: MultiValue) -> mlua::Result<MultiValue> {
    let name = if every { "every" } else { "at" };
    if args.len() < 2 {
        return Err(mlua::Error::RuntimeError(format!("expecting at least 2 arguments but got {}", args.len())));
    }
    let mut args = args.into_iter();
    let delay = args.next().unwrap_or(Value::Nil);
    let seconds = match &delay {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        Value::String(_) => lua.coerce_number(delay.clone())?,
        _ => None,
    };
    let Some(seconds) = seconds else {
        return Err(mlua::Error::RuntimeError(format!(
            "bad argument #1 to '{name}' (number expected, got {})",
            delay.type_name()
        )));
    };
    // nginx keeps whole milliseconds: 0.0004 s is 0 ms ("next iteration").
    let ms = if seconds.is_nan() || seconds <= 0.0 { 0 } else { (seconds * 1000.0) as u64 };
    if every {
        if seconds.is_nan() || seconds < 0.0 {
            return Err(mlua::Error::runtime("bad argument #1 to 'every' (interval must be positive)"));
        }
        if ms == 0 {
            return Err(mlua::Error::runtime("delay cannot be zero"));
        }
    }
    let callback = match args.next() {
        Some(Value::Function(f)) if f.info().what != "C" => f,
        _ => return Err(mlua::Error::RuntimeError(format!("bad argument #2 to '{name}' (Lua function expected)"))),
    };
    let t = timers(lua)?;
    let refuse = |msg: &str| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_vec(vec![Value::Nil, Value::String(lua.create_string(msg)?)]))
    };
    if t.exiting() && ms > 0 {
        return refuse("process exiting");
    }
    if t.pending.get() >= MAX_PENDING {
        return refuse("too many pending timers");
    }
    let delay = Duration::from_millis(ms);
    let pending = Pending::new(&t);
    let task = Task { timers: Rc::clone(&t), callback, args: args.collect(), every: every.then_some(delay) };
    tokio::task::spawn_local(task.run(pending, delay, t.epoch.get()));
    watch(&t);
    Ok(MultiValue::from_vec(vec![Value::Integer(1)]))
}

/// While timers are pending, notice a graceful shutdown and fire them early.
fn watch(t: &Rc<Timers>) {
    if t.watching.replace(true) || t.exiting.get() {
        return;
    }
    let weak = Rc::downgrade(t);
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let Some(t) = weak.upgrade() else { return };
            if t.exiting() || t.pending.get() == 0 {
                t.watching.set(false);
                return;
            }
        }
    });
}

struct Task {
    timers: Rc<Timers>,
    callback: Function,
    args: MultiValue,
    /// The interval of an `every` timer.
    every: Option<Duration>,
}

impl Task {
    async fn run(self, mut pending: Pending, mut delay: Duration, epoch: u64) {
        loop {
            let premature = self.timers.sleep(delay, epoch).await;
            match self.every {
                Some(interval) if !premature => {
                    // As nginx: the next run is scheduled before this one starts
                    // (runs may overlap when the callback outlasts the interval).
                    pending = Pending::new(&self.timers);
                    delay = interval;
                    tokio::task::spawn_local(fire(
                        Rc::clone(&self.timers),
                        self.callback.clone(),
                        self.args.clone(),
                        false,
                    ));
                }
                _ => {
                    drop(pending);
                    fire(Rc::clone(&self.timers), self.callback, self.args, premature).await;
                    return;
                }
            }
        }
    }
}

/// Run a timer's callback as its own handler (`callback(premature, ...)`).
async fn fire(t: Rc<Timers>, callback: Function, args: MultiValue, premature: bool) {
    if !premature && t.running.get() >= MAX_RUNNING {
        tracing::error!(target: "lua", context = "ngx.timer", "{MAX_RUNNING} lua_max_running_timers are not enough");
        return;
    }
    t.running.set(t.running.get() + 1);
    let _running = Running(Rc::clone(&t));
    let mut call = Vec::with_capacity(args.len() + 1);
    call.push(Value::Boolean(premature));
    call.extend(args);
    let result = thread::scope(None, callback.call_async::<()>(MultiValue::from_vec(call))).await;
    if let Err(e) = result {
        if budget::take_tripped() {
            tracing::error!(target: "lua", context = "ngx.timer", "timer callback stopped: time budget exceeded");
        } else {
            tracing::error!(target: "lua", context = "ngx.timer", "lua entry thread aborted: runtime error: {}", lua_message(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::lua::ngx::thread::testing::{block_on, eval, handler, lua, Logs};

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[test]
    fn at_fires_once_after_its_delay_with_its_arguments() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "fired = {}
                 local t0 = ngx.now()
                 ok = ngx.timer.at(0.05, function(premature, a, b)
                     fired[#fired + 1] = { premature = premature, a = a, b = b, after = ngx.now() - t0,
                         running = ngx.timer.running_count(), pending = ngx.timer.pending_count(),
                         phase = ngx.get_phase() }
                 end, 'x', 42)
                 pending_now = ngx.timer.pending_count()",
            )
            .await
            .unwrap();
            sleep_ms(20).await;
            assert_eq!(eval::<i64>(&lua, "#fired"), 0, "fired before its delay");
            sleep_ms(150).await;
        });
        assert_eq!(eval::<(i64, i64)>(&lua, "ok, pending_now"), (1, 1));
        assert_eq!(eval::<i64>(&lua, "#fired"), 1);
        assert_eq!(
            eval::<(bool, String, i64)>(&lua, "fired[1].premature, fired[1].a, fired[1].b"),
            (false, "x".into(), 42)
        );
        assert!(eval::<f64>(&lua, "fired[1].after") >= 0.045);
        assert_eq!(
            eval::<(i64, i64, String)>(&lua, "fired[1].running, fired[1].pending, fired[1].phase"),
            (1, 0, "timer".into())
        );
        assert_eq!(eval::<(i64, i64)>(&lua, "ngx.timer.running_count(), ngx.timer.pending_count()"), (0, 0));
    }

    #[test]
    fn every_repeats() {
        let lua = lua();
        block_on(async {
            handler(&lua, "n = 0 assert(ngx.timer.every(0.1, function(premature) n = n + 1 end))").await.unwrap();
            sleep_ms(350).await;
            assert_eq!(eval::<i64>(&lua, "ngx.timer.pending_count()"), 1);
        });
        let n = eval::<i64>(&lua, "n");
        assert!((3..=4).contains(&n), "fired {n} times in 350 ms");
    }

    #[test]
    fn a_failing_callback_is_logged_and_the_next_timer_runs() {
        let lua = lua();
        let (logs, _guard) = Logs::capture();
        block_on(async {
            handler(
                &lua,
                "ngx.timer.at(0, function() error('boom') end)
                 ngx.timer.at(0.01, function() second = true end)",
            )
            .await
            .unwrap();
            sleep_ms(50).await;
        });
        assert!(eval::<bool>(&lua, "second == true"));
        let text = logs.text();
        assert!(text.contains("lua entry thread aborted: runtime error: test.lua:1: boom"), "{text}");
        assert!(text.contains("ngx.timer"), "{text}");
    }

    #[test]
    fn pending_limit_then_premature_abort() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "premature_runs = 0
                 local function f(premature) if premature then premature_runs = premature_runs + 1 end end
                 for i = 1, 1024 do assert(ngx.timer.at(10, f)) end
                 ok, err = ngx.timer.at(10, f)
                 pending = ngx.timer.pending_count()",
            )
            .await
            .unwrap();
            abort_pending(&lua);
            sleep_ms(50).await;
        });
        assert_eq!(eval::<(bool, String)>(&lua, "ok == nil, err"), (true, "too many pending timers".into()));
        assert_eq!(eval::<i64>(&lua, "pending"), 1024);
        assert_eq!(eval::<i64>(&lua, "premature_runs"), 1024);
        assert_eq!(eval::<i64>(&lua, "ngx.timer.pending_count()"), 0);
    }

    #[test]
    fn running_limit_drops_callbacks_with_an_alert() {
        let lua = lua();
        let (logs, _guard) = Logs::capture();
        block_on(async {
            handler(
                &lua,
                "started, most = 0, 0
                 for i = 1, 300 do
                     ngx.timer.at(0, function()
                         started = started + 1
                         most = math.max(most, ngx.timer.running_count())
                         ngx.sleep(0.05)
                     end)
                 end",
            )
            .await
            .unwrap();
            sleep_ms(120).await;
        });
        assert_eq!(eval::<(i64, i64)>(&lua, "started, most"), (256, 256));
        assert!(logs.text().contains("256 lua_max_running_timers are not enough"));
    }

    #[test]
    fn argument_errors_as_lua_nginx_module() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "local f = function() end
                 local function err(...) local ok, e = pcall(...) return tostring(e) end
                 e_zero = err(ngx.timer.every, 0, f)
                 e_tiny = err(ngx.timer.every, 0.0004, f)
                 e_neg = err(ngx.timer.every, -1, f)
                 e_one = err(ngx.timer.at, 1)
                 e_cfn = err(ngx.timer.at, 0, print)
                 e_str = err(ngx.timer.at, 'x', f)
                 str_ok = ngx.timer.at('0.01', function() str_fired = true end)",
            )
            .await
            .unwrap();
            sleep_ms(40).await;
        });
        assert!(eval::<String>(&lua, "e_zero").contains("delay cannot be zero"));
        assert!(eval::<String>(&lua, "e_tiny").contains("delay cannot be zero"));
        assert!(eval::<String>(&lua, "e_neg").contains("bad argument #1 to 'every' (interval must be positive)"));
        assert!(eval::<String>(&lua, "e_one").contains("expecting at least 2 arguments but got 1"));
        assert!(eval::<String>(&lua, "e_cfn").contains("bad argument #2 to 'at' (Lua function expected)"));
        assert!(eval::<String>(&lua, "e_str").contains("bad argument #1 to 'at' (number expected, got string)"));
        assert_eq!(eval::<(i64, bool)>(&lua, "str_ok, str_fired"), (1, true));
    }

    #[test]
    fn shutdown_fires_pending_timers_prematurely_once() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "at_runs, every_runs = {}, {}
                 ngx.timer.at(10, function(p) at_runs[#at_runs + 1] = p end)
                 ngx.timer.every(10, function(p) every_runs[#every_runs + 1] = p end)
                 ngx.timer.at(10, function(p) ngx.sleep(0.03) slow_done = p end)",
            )
            .await
            .unwrap();
            tokio::time::timeout(Duration::from_secs(1), shutdown()).await.expect("shutdown did not finish");
            handler(
                &lua,
                "late_ok, late_err = ngx.timer.at(1, function() end)
                 ngx.timer.at(0, function(p) zero_premature = p end)",
            )
            .await
            .unwrap();
            sleep_ms(20).await;
        });
        assert_eq!(eval::<(i64, bool)>(&lua, "#at_runs, at_runs[1]"), (1, true));
        assert_eq!(eval::<(i64, bool)>(&lua, "#every_runs, every_runs[1]"), (1, true));
        assert!(eval::<bool>(&lua, "slow_done == true"), "shutdown returned before a running callback ended");
        assert_eq!(eval::<(bool, String)>(&lua, "late_ok == nil, late_err"), (true, "process exiting".into()));
        assert!(eval::<bool>(&lua, "zero_premature == true"));
    }

    #[test]
    fn a_timer_runs_until_its_light_threads_end() {
        let lua = lua();
        block_on(async {
            handler(
                &lua,
                "ngx.timer.at(0, function()
                     ngx.thread.spawn(function() ngx.sleep(0.04) thread_done = true end)
                 end)",
            )
            .await
            .unwrap();
            sleep_ms(15).await;
            assert_eq!(eval::<i64>(&lua, "ngx.timer.running_count()"), 1);
            sleep_ms(60).await;
        });
        assert!(eval::<bool>(&lua, "thread_done == true"));
        assert_eq!(eval::<i64>(&lua, "ngx.timer.running_count()"), 0);
    }
}
