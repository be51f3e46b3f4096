//! The gRPC `echo.v1.Echo` service, served over h2c by hyper directly (no tonic
//! transport server) so it shares the accept loop, connection counting and abort
//! semantics of the HTTP backend. A [`CallGuard`] per call tells completed calls from
//! ones the client dropped or reset before the server finished (or that the server
//! abandoned at their `grpc-timeout` deadline, which it enforces like a real server).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use http::{Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use tonic::codegen::Service as _;
use tonic::metadata::KeyAndValueRef;
use tonic::{Code, Status, Streaming};

use crate::pb::echo_server::{Echo, EchoServer};
use crate::pb::{EchoReply, EchoRequest};
use crate::Stats;

/// Largest message accepted or sent, each way.
const MAX_MESSAGE: usize = 64 << 20;

/// The HTTP/2 `:authority` of the call, kept for the reply's metadata (tonic's
/// metadata only holds real header fields).
#[derive(Clone)]
struct Authority(String);

/// hyper service wrapping the generated tonic `EchoServer`.
#[derive(Clone)]
pub(crate) struct GrpcEcho {
    inner: EchoServer<EchoImpl>,
    stats: Arc<Stats>,
}

impl GrpcEcho {
    pub(crate) fn new(name: Arc<str>, stats: Arc<Stats>) -> Self {
        let imp = EchoImpl { name, stats: stats.clone() };
        let inner = EchoServer::new(imp).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
        Self { inner, stats }
    }
}

impl hyper::service::Service<Request<Incoming>> for GrpcEcho {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(a) = req.uri().authority() {
            let a = Authority(a.as_str().to_owned());
            req.extensions_mut().insert(a);
        }
        let timeout = req.headers().get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.to_str().ok()?));
        // The generated server is always ready (`poll_ready` returns Ready(Ok)).
        let call = self.inner.clone().call(req);
        let Some(timeout) = timeout else {
            return call;
        };
        // Like a real gRPC server, give up at the caller's deadline, headers or stream.
        let deadline = tokio::time::Instant::now() + timeout;
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, call).await {
                Ok(resp) => Ok(resp?.map(|inner| {
                    tonic::body::Body::new(DeadlineBody {
                        inner,
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                        done: false,
                    })
                })),
                Err(_) => Ok(deadline_exceeded().into_http()),
            }
        })
    }
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded (testbed)")
}

/// `grpc-timeout` value (`1-8 digits` + unit `H M S m u n`) as a duration.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response body cut at the call's deadline: the rest of the stream is dropped
/// (so its [`CallGuard`] counts the call as cancelled) and the trailers carry
/// DEADLINE_EXCEEDED.
struct DeadlineBody {
    inner: tonic::body::Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.done = true;
            this.inner = tonic::body::Body::empty();
            let mut trailers = http::HeaderMap::new();
            let _ = deadline_exceeded().add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_data() => {}
            _ => this.done = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Counts a call as completed once marked done, or as cancelled if dropped before.
struct CallGuard {
    stats: Arc<Stats>,
    done: bool,
}

impl CallGuard {
    fn new(stats: &Arc<Stats>) -> Self {
        Self { stats: stats.clone(), done: false }
    }

    fn done(mut self) {
        self.done = true;
        self.stats.grpc_completed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.done {
            self.stats.grpc_cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

pub(crate) struct EchoImpl {
    name: Arc<str>,
    stats: Arc<Stats>,
}

/// The request's ASCII metadata (repeated keys joined with `, `) plus `:authority`.
fn metadata_of<T>(req: &tonic::Request<T>) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = HashMap::new();
    for kv in req.metadata().iter() {
        if let KeyAndValueRef::Ascii(k, v) = kv {
            let Ok(v) = v.to_str() else { continue };
            m.entry(k.as_str().to_owned())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(v);
                })
                .or_insert_with(|| v.to_owned());
        }
    }
    if let Some(Authority(a)) = req.extensions().get::<Authority>() {
        m.entry(":authority".to_owned()).or_insert_with(|| a.clone());
    }
    m
}

fn status_of(r: &EchoRequest) -> Status {
    Status::new(Code::from(r.status_code as i32), r.message.clone())
}

fn payload_of(r: &EchoRequest) -> Vec<u8> {
    if r.reply_size != 0 {
        vec![b'a'; r.reply_size as usize]
    } else {
        r.payload.clone()
    }
}

async fn delay(ms: u32) {
    if ms != 0 {
        tokio::time::sleep(Duration::from_millis(ms.into())).await;
    }
}

/// State of a ServerStream call.
struct ServerStreamState {
    req: EchoRequest,
    metadata: HashMap<String, String>,
    name: Arc<str>,
    next: u32,
    guard: Option<CallGuard>,
}

/// State of a Bidi call.
struct BidiState {
    inbound: Streaming<EchoRequest>,
    metadata: HashMap<String, String>,
    name: Arc<str>,
    next: u32,
    guard: Option<CallGuard>,
}

#[tonic::async_trait]
impl Echo for EchoImpl {
    async fn unary(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let metadata = metadata_of(&req);
        let mut r = req.into_inner();
        delay(r.delay_ms).await;
        let res = if r.status_code != 0 {
            Err(status_of(&r))
        } else {
            let payload = if r.reply_size != 0 { payload_of(&r) } else { std::mem::take(&mut r.payload) };
            Ok(tonic::Response::new(EchoReply {
                message: r.message,
                payload,
                backend: self.name.to_string(),
                metadata,
                ..Default::default()
            }))
        };
        guard.done();
        res
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<ReplyStream>, Status> {
        let state = ServerStreamState {
            guard: Some(CallGuard::new(&self.stats)),
            metadata: metadata_of(&req),
            req: req.into_inner(),
            name: self.name.clone(),
            next: 0,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            let guard = st.guard.take()?;
            if st.next < st.req.count {
                delay(st.req.delay_ms).await;
                let reply = EchoReply {
                    message: st.req.message.clone(),
                    payload: payload_of(&st.req),
                    backend: st.name.to_string(),
                    metadata: st.metadata.clone(),
                    index: st.next,
                    ..Default::default()
                };
                st.next += 1;
                if st.next == st.req.count && st.req.status_code == 0 {
                    guard.done();
                } else {
                    st.guard = Some(guard);
                }
                return Some((Ok(reply), st));
            }
            guard.done();
            if st.req.status_code != 0 {
                let status = status_of(&st.req);
                Some((Err(status), st))
            } else {
                None
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn client_stream(
        &self,
        req: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let metadata = metadata_of(&req);
        let mut inbound = req.into_inner();
        let mut last = EchoRequest::default();
        let mut messages = 0u32;
        let mut bytes = 0u64;
        // An inbound error (client reset) drops `guard` undone: counted as cancelled.
        while let Some(m) = inbound.message().await? {
            messages += 1;
            bytes += m.payload.len() as u64;
            last = m;
        }
        guard.done();
        if last.status_code != 0 {
            return Err(status_of(&last));
        }
        Ok(tonic::Response::new(EchoReply {
            message: last.message,
            backend: self.name.to_string(),
            metadata,
            received_bytes: bytes,
            received_messages: messages,
            ..Default::default()
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(&self, req: tonic::Request<Streaming<EchoRequest>>) -> Result<tonic::Response<ReplyStream>, Status> {
        let state = BidiState {
            guard: Some(CallGuard::new(&self.stats)),
            metadata: metadata_of(&req),
            inbound: req.into_inner(),
            name: self.name.clone(),
            next: 0,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            let guard = st.guard.take()?;
            match st.inbound.message().await {
                Ok(Some(mut m)) => {
                    if m.status_code != 0 {
                        guard.done();
                        return Some((Err(status_of(&m)), st));
                    }
                    let received_bytes = m.payload.len() as u64;
                    let payload = if m.reply_size != 0 { payload_of(&m) } else { std::mem::take(&mut m.payload) };
                    let reply = EchoReply {
                        message: m.message,
                        payload,
                        backend: st.name.to_string(),
                        // Sent once, with the first reply.
                        metadata: std::mem::take(&mut st.metadata),
                        index: st.next,
                        received_bytes,
                        ..Default::default()
                    };
                    st.next += 1;
                    st.guard = Some(guard);
                    Some((Ok(reply), st))
                }
                Ok(None) => {
                    guard.done();
                    None
                }
                // The client went away mid-stream: `guard` drops undone (cancelled).
                Err(status) => Some((Err(status), st)),
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
