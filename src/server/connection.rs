//! One client connection: TLS (when the listener has it), then HTTP/1.1 or
//! HTTP/2 (by ALPN, or by the prior-knowledge preface on cleartext) through
//! hyper's auto server, each request handed to the pipeline. On shutdown the
//! connection is told to finish gracefully (HTTP/2 GOAWAY, HTTP/1.1 close
//! after the current response).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::LocalExec;
use crate::config::reload;
use crate::config::snapshot::{Limits, Listener};
use crate::phase::pipeline::{self, ConnInfo, Worker};

/// Counts a worker's open connections, so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    open: Cell<usize>,
    idle: Notify,
}

pub struct Entered(Rc<Tracker>);

impl Tracker {
    pub fn enter(self: &Rc<Self>) -> Entered {
        self.open.set(self.open.get() + 1);
        Entered(Rc::clone(self))
    }

    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Resolves when no connection is open.
    pub async fn drained(&self) {
        while self.open.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        let t = &self.0;
        t.open.set(t.open.get() - 1);
        if t.open.get() == 0 {
            t.idle.notify_waiters();
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Auto,
    Http1,
    Http2,
}

pub async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    worker: Rc<Worker>,
    _entered: Entered,
    stop: watch::Receiver<bool>,
) {
    let (listener, limits) = {
        let snap = reload::current();
        match snap.listener(local) {
            Some(l) => (l.clone(), snap.limits.clone()),
            None => return, // the listener was removed by a reload
        }
    };
    let Some(tls) = listener.tls.clone() else {
        let mode = match (listener.http1, listener.h2c) {
            (true, false) => Mode::Http1,
            (false, true) => Mode::Http2,
            _ => Mode::Auto,
        };
        let info = Rc::new(ConnInfo::new(client, listener, false));
        return serve_http(TokioIo::new(stream), info, mode, &limits, worker, stop).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls_stream = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "TLS handshake timed out");
            return;
        }
    };
    let mode = if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") { Mode::Http2 } else { Mode::Http1 };
    let info = Rc::new(ConnInfo::new(client, listener, true));
    serve_http(TokioIo::new(tls_stream), info, mode, &limits, worker, stop).await
}

async fn serve_http<I>(
    io: TokioIo<I>,
    info: Rc<ConnInfo>,
    mode: Mode,
    limits: &Limits,
    worker: Rc<Worker>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let builder = builder(&info.listener, limits, mode);
    let service = service_fn(move |req| pipeline::handle(req, Rc::clone(&info), Rc::clone(&worker)));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn builder(_listener: &Listener, limits: &Limits, mode: Mode) -> auto::Builder<LocalExec> {
    let mut b = auto::Builder::new(LocalExec);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
        .adaptive_window(true)
        .max_concurrent_streams(1024);
    match mode {
        Mode::Auto => b,
        Mode::Http1 => b.http1_only(),
        Mode::Http2 => b.http2_only(),
    }
}
