//! Lua phase hooks with an OpenResty-compatible `ngx` API.
//!
//! Scripts are read and syntax-checked when a config compiles (`compile`),
//! and compiled into functions once per worker (`runtime`): each worker
//! thread has one LuaJIT state, and each phase of a request runs as a
//! coroutine on it, so Lua calls that wait (sleep, sockets, shared-dict
//! locks) yield to the worker's event loop instead of blocking it. The
//! request a callback acts on is the one whose coroutine is being resumed
//! (`request::current`). Runaway scripts are stopped by `budget`.

pub mod budget;
pub mod ceiling;
pub mod compile;
pub mod coroutine;
pub mod ngx;
pub mod pattern;
pub mod request;
pub mod runtime;
pub mod string;

use std::sync::Arc;
use std::time::Duration;

pub use request::LuaRequest;
pub use runtime::{Outcome, Runtime};

/// The phases a route may hook, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    InitWorker,
    Rewrite,
    Access,
    Content,
    Balancer,
    HeaderFilter,
    BodyFilter,
    Log,
    Timer,
}

impl Phase {
    /// Phases that run once the response head exists.
    pub fn is_after_headers(self) -> bool {
        matches!(self, Self::HeaderFilter | Self::BodyFilter | Self::Log)
    }

    /// The name `ngx.get_phase()` returns (OpenResty's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Self::InitWorker => "init_worker",
            Self::Rewrite => "rewrite",
            Self::Access => "access",
            Self::Content => "content",
            Self::Balancer => "balancer",
            Self::HeaderFilter => "header_filter",
            Self::BodyFilter => "body_filter",
            Self::Log => "log",
            Self::Timer => "timer",
        }
    }
}

/// One script: a file or inline code, read and syntax-checked at compile time.
#[derive(Debug)]
pub struct Script {
    /// Shown in errors and `ngx.log` lines: the file path, or `routes[0].lua.access`.
    pub name: Arc<str>,
    pub source: Arc<[u8]>,
    /// Identifies name + source: a worker recompiles only scripts whose id it has not seen.
    pub id: u64,
}

/// A route's phase scripts.
#[derive(Debug, Default)]
pub struct RouteLua {
    pub rewrite: Option<Arc<Script>>,
    pub access: Option<Arc<Script>>,
    pub content: Option<Arc<Script>>,
    pub balancer: Option<Arc<Script>>,
    pub header_filter: Option<Arc<Script>>,
    pub body_filter: Option<Arc<Script>>,
    pub log: Option<Arc<Script>>,
}

/// What scripts may do beyond the sandbox.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    pub os_execute: bool,
    pub io_popen: bool,
    pub native_modules: bool,
}

/// The global `lua:` settings of a snapshot.
#[derive(Debug, Clone)]
pub struct Settings {
    pub package_path: String,
    pub shared_dicts: Vec<(String, Arc<ngx::shared::SharedDict>)>,
    pub init_worker: Option<Arc<Script>>,
    pub time_budget: Duration,
    pub memory_limit: usize,
    pub grants: Grants,
    /// Declared variables (`ngx.var.NAME` settable) with initial values.
    pub variables: Vec<(String, String)>,
    /// Where `ngx.config.prefix()` points: the config file's directory.
    pub prefix: String,
}
