//! The proxy's own error type: what went wrong, on which side, and whether
//! another peer may be tried. `phase::respond` turns it into the client's answer.

use std::time::Duration;

/// Where a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something we refuse.
    Downstream,
    /// The upstream peer failed or timed out.
    Upstream,
    /// luagate itself.
    Internal,
}

/// Every error a request can end with before its response starts.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The path cannot be normalised (`protocol::uri`): 400, as nginx.
    #[error("bad request path: {0}")]
    BadPath(#[from] crate::protocol::uri::UriError),
    /// A gRPC call whose path is not exactly `/service/method`: refused rather
    /// than normalised into another method.
    #[error("gRPC path {path:?} is not canonical (/package.Service/Method)")]
    GrpcPath { path: String },
    #[error("more than {limit} request header fields")]
    TooManyHeaders { limit: usize },
    #[error("method {0} not allowed")]
    MethodNotAllowed(String),
    #[error("client sent no request body data for {0:?}")]
    ClientBodyTimeout(Duration),
    #[error("no live peer in upstream {upstream}")]
    NoPeer { upstream: String },
    #[error("connect to {peer} failed: {source}")]
    Connect {
        peer: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {peer} timed out after {after:?}")]
    ConnectTimeout { peer: std::net::SocketAddr, after: Duration },
    #[error("upstream {peer} failed: {source}")]
    Upstream {
        peer: std::net::SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("upstream {peer} took no request data for {after:?} (send timeout)")]
    SendTimeout { peer: std::net::SocketAddr, after: Duration },
    #[error("no connection to {peer} within {after:?}: {why}")]
    Saturated { peer: std::net::SocketAddr, after: Duration, why: &'static str },
    #[error("upstream {peer} sent no response headers within {after:?}")]
    ReadTimeout { peer: std::net::SocketAddr, after: Duration },
    #[error("request deadline of {after:?} exceeded")]
    Deadline { after: Duration },
    #[error("client went away")]
    ClientGone,
    #[error("bad WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
    #[error("lua: {0}")]
    Lua(String),
}

impl ProxyError {
    /// Which side is to blame, for logs and metrics.
    pub fn side(&self) -> Side {
        match self {
            Self::NoRoute { .. }
            | Self::BodyTooLarge { .. }
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::GrpcPath { .. }
            | Self::MethodNotAllowed(_)
            | Self::TooManyHeaders { .. }
            | Self::ClientBodyTimeout(_)
            | Self::ClientGone => Side::Downstream,
            Self::NoPeer { .. }
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Saturated { .. }
            | Self::Upstream { .. }
            | Self::SendTimeout { .. }
            | Self::ReadTimeout { .. }
            | Self::BadUpgrade(_)
            | Self::Deadline { .. } => Side::Upstream,
            Self::Lua(_) => Side::Internal,
        }
    }

    /// True when nothing reached the peer, so the same request may go to another one.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectTimeout { .. })
    }
}

/// Whether an error reading the client's request body means the client went
/// away (closed or reset the connection, cancelled the HTTP/2 stream), as
/// opposed to sending something malformed (a bad chunk, a body longer or
/// shorter than declared), which is a 400.
pub fn client_went_away(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_io() || h2.reason() == Some(h2::Reason::CANCEL);
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// Boxed error used for body streams, where hyper wants `Into<Box<dyn Error>>`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
