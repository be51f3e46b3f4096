//! The access log: one JSON line per request, emitted by the log phase through
//! tracing (target `access`) and written off the worker threads by a
//! non-blocking writer. Its destination can change on reload and is reopened
//! on SIGUSR1 (log rotation, as nginx does).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::snapshot::AccessLogTarget;

pub const TARGET: &str = "access";

/// What one request leaves in the log; filled in as the request goes and
/// emitted once, when the response has been sent (or abandoned).
#[derive(Debug)]
pub struct LogRecord {
    pub start: Instant,
    pub client: SocketAddr,
    pub method: http::Method,
    /// Path and query, as the client sent them (origin form for every protocol).
    pub uri: http::uri::PathAndQuery,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub upstream_time: Option<std::time::Duration>,
    /// Formatted only when the line is written.
    pub trace_id: [u8; 16],
    pub error: Option<String>,
}

impl LogRecord {
    pub fn emit(&self) {
        // With the access log off, skip formatting altogether (it costs more than the proxying).
        if !ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        tracing::info!(
            target: TARGET,
            client = %self.client.ip(),
            method = %self.method,
            uri = %self.uri,
            route = self.route.as_deref().unwrap_or(""),
            upstream = self.upstream.as_deref().unwrap_or(""),
            peer = %self.peer.map(|p| p.to_string()).unwrap_or_default(),
            status = self.status,
            grpc_status = self.grpc_status.map(i64::from).unwrap_or(-1),
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            request_time_ms = ms(self.start.elapsed()),
            upstream_time_ms = self.upstream_time.map(ms).unwrap_or(-1.0),
            trace_id = %super::trace::hex(&self.trace_id),
            error = self.error.as_deref().unwrap_or(""),
        );
    }
}

struct Sink {
    target: AccessLogTarget,
    writer: NonBlocking,
    _guard: WorkerGuard,
}

static SINK: ArcSwapOption<Sink> = ArcSwapOption::const_empty();
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SWAP: Mutex<()> = Mutex::new(());

/// Point the access log at `target` (no-op when it is already there, unless `reopen`).
pub fn configure(target: &AccessLogTarget, reopen: bool) -> io::Result<()> {
    let _one_at_a_time = SWAP.lock().unwrap_or_else(|e| e.into_inner());
    if !reopen && SINK.load().as_ref().is_some_and(|s| &s.target == target) {
        return Ok(());
    }
    let builder = || NonBlockingBuilder::default().lossy(false).buffered_lines_limit(64 * 1024);
    let (writer, guard) = match target {
        AccessLogTarget::Off => {
            ENABLED.store(false, std::sync::atomic::Ordering::Relaxed);
            SINK.store(None);
            return Ok(());
        }
        AccessLogTarget::Stdout => builder().finish(io::stdout()),
        AccessLogTarget::Stderr => builder().finish(io::stderr()),
        AccessLogTarget::File(path) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            builder().finish(file)
        }
    };
    SINK.store(Some(Arc::new(Sink { target: target.clone(), writer, _guard: guard })));
    ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Flush and close the access log (at exit).
pub fn close() {
    ENABLED.store(false, std::sync::atomic::Ordering::Relaxed);
    SINK.store(None);
}

/// The `MakeWriter` of the access-log layer.
pub struct Writer;

pub enum Out {
    On(NonBlocking),
    Off,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::On(w) => w.write(buf),
            Out::Off => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::On(w) => w.flush(),
            Out::Off => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Out;
    fn make_writer(&'a self) -> Out {
        match SINK.load().as_ref() {
            Some(s) => Out::On(s.writer.clone()),
            None => Out::Off,
        }
    }
}
