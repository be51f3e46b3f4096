//! Real backends for luagate's integration tests and benchmarks: an HTTP echo server
//! (HTTP/1.1 and h2c prior knowledge on one port) and a gRPC `echo.v1.Echo` server
//! (h2c), each listening on 127.0.0.1 and counting what it saw in [`Stats`].
//!
//! Servers run as tokio tasks in the caller's runtime; a [`Backend`] handle stops its
//! server (listener and every open connection) on [`Backend::shutdown`] or drop.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

mod grpc;
mod http;
mod server;

/// Code generated from `proto/echo.proto` (package `echo.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("echo.v1");
}

/// Encoded `FileDescriptorSet` of `proto/echo.proto` (for JSON <-> protobuf transcoding).
pub const ECHO_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));

/// Counters of one backend, updated live while it serves.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP requests, or gRPC calls, started.
    pub requests: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// gRPC calls dropped (client cancel / RST_STREAM / disconnect) before the server finished.
    pub grpc_cancelled: AtomicU64,
    /// gRPC calls the server finished (with any status).
    pub grpc_completed: AtomicU64,
}

/// A running server. Dropping it aborts the server and closes its connections.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    name: Arc<str>,
    stats: Arc<Stats>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend's name (sent as `x-backend` / `EchoReply.backend`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shared handle on the live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Stops accepting, closes every connection and waits until the listening socket
    /// is released (so the address can be bound again).
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// HTTP echo server on 127.0.0.1 (ephemeral port), HTTP/1.1 and h2c prior knowledge.
///
/// Every response carries `x-backend: NAME`. Paths (matched on the first segment):
/// - anything else: 200 JSON `{backend, method, uri, authority, version, headers, body_len}`
///   (`headers` values are strings, or arrays when repeated; the body is read fully);
/// - `/status/{code}`, `/delay/{ms}`, chainable (`/delay/100/status/503/...`): same JSON;
/// - `/bytes/{n}` (content-length) and `/chunked/{n}` (no length): n bytes `a`, 16 KiB chunks;
/// - `/echo...`: the request body streamed back frame by frame, same content-type;
/// - `/slow/{ms}`: headers at once, body `slow` after ms;
/// - `/trailers`: body `ok`, trailer `x-trailer: yes` (HTTP/1.1 only with `te: trailers`);
/// - `/close`: JSON with `connection: close`, then the HTTP/1.1 connection closes;
/// - `/noread/{ms}`: never reads the request body (a peer that stops taking it: the
///   sender's writes stall once the socket buffers are full), answers `{"noread":true}`
///   after ms with `connection: close`;
/// - `/set-header?k=v&...`: JSON plus each (percent-decoded) pair appended as a response
///   header, except `content-length` and `transfer-encoding`.
pub async fn spawn_http(name: &str) -> std::io::Result<Backend> {
    spawn_http_at(name, localhost()).await
}

/// HTTP echo server on `addr`, HTTP/1.1 and h2c prior knowledge on the same port.
pub async fn spawn_http_at(name: &str, addr: SocketAddr) -> std::io::Result<Backend> {
    server::spawn(name, addr, server::Kind::Http).await
}

/// gRPC `echo.v1.Echo` server (h2c) on 127.0.0.1 (ephemeral port); see
/// `proto/echo.proto` for the behaviour of each method. Messages up to 64 MiB each way.
pub async fn spawn_grpc(name: &str) -> std::io::Result<Backend> {
    spawn_grpc_at(name, localhost()).await
}

/// gRPC `echo.v1.Echo` server (h2c) on `addr`.
pub async fn spawn_grpc_at(name: &str, addr: SocketAddr) -> std::io::Result<Backend> {
    server::spawn(name, addr, server::Kind::Grpc).await
}
