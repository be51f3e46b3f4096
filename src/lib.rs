//! luagate: a reverse proxy for RPC traffic.
//!
//! The request pipeline (see `phase::pipeline`) walks route match → upstream →
//! log for every request; configuration is compiled into an immutable
//! [`config::Snapshot`] that is swapped atomically on reload.

pub mod config;
pub mod error;
pub mod limit;
pub mod observe;
pub mod phase;
pub mod protocol;
pub mod route;
pub mod server;
pub mod upstream;

/// The version printed by `luagate --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub mod lua;
