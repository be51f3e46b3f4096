//! The accept loop shared by both servers: binds, counts connections, serves each
//! connection with hyper-util's auto builder in a task owned by a `JoinSet`, so that
//! aborting the accept task also aborts (closes) every open connection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::{Backend, Stats};

/// Which protocol a backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Http,
    Grpc,
}

/// Large flow-control windows so multi-MiB bodies and messages are not throttled.
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 8 << 20;

fn builder(kind: Kind) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http2()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_concurrent_streams(1024);
    if kind == Kind::Grpc {
        b = b.http2_only();
    }
    b
}

pub(crate) async fn spawn(name: &str, addr: SocketAddr, kind: Kind) -> std::io::Result<Backend> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let name: Arc<str> = Arc::from(name);
    let stats = Arc::new(Stats::default());
    let task = match kind {
        Kind::Http => {
            let svc = crate::http::HttpEcho::new(name.clone(), stats.clone());
            tokio::spawn(accept_loop(listener, kind, svc, stats.clone()))
        }
        Kind::Grpc => {
            let svc = crate::grpc::GrpcEcho::new(name.clone(), stats.clone());
            tokio::spawn(accept_loop(listener, kind, svc, stats.clone()))
        }
    };
    Ok(Backend { addr, name, stats, task: Some(task) })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn accept_loop<S, B>(listener: TcpListener, kind: Kind, svc: S, stats: Arc<Stats>)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = builder(kind);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            Some(_) = conns.join_next() => continue,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let builder = builder.clone();
        let svc = svc.clone();
        conns.spawn(async move {
            // With upgrades: `/ws` switches to a byte echo.
            let _ = builder.serve_connection_with_upgrades(io, svc).await;
        });
    }
}
