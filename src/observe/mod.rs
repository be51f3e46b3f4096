//! Observability: the error log (tracing to stderr), the access log (one JSON
//! line per request, target `access`) and W3C trace context.

pub mod access_log;
pub mod trace;

use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Install the global subscriber: the error log at `level` (or `LUAGATE_LOG`,
/// an EnvFilter directive) on stderr, and the access log through
/// [`access_log::Writer`], whose target a reload may change.
pub fn init(level: tracing::Level) {
    let errors = EnvFilter::try_from_env("LUAGATE_LOG")
        .unwrap_or_else(|_| EnvFilter::default().add_directive(LevelFilter::from_level(level).into()));
    let error_log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(filter_fn(|m| m.target() != access_log::TARGET))
        .with_filter(errors);
    let access = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_level(false)
        .with_writer(access_log::Writer)
        .with_filter(filter_fn(|m| m.target() == access_log::TARGET));
    let _ = tracing_subscriber::registry().with(error_log).with(access).try_init();
}
