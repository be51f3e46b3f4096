//! The one place where a proxy-made error becomes the client's answer: an
//! HTTP status with a short text body, or for a gRPC call a trailers-only
//! response (HTTP 200, `grpc-status`, `grpc-message`) — never an HTML 502 to
//! a gRPC client. Either way the client learns the kind of failure only:
//! peer addresses, OS errors and script messages go to the log.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use crate::error::ProxyError;
use crate::observe::access_log::LogRecord;
use crate::protocol::grpc::{self, Code};

/// nginx's built-in error page for `status`, as `ngx.exit(status)` answers
/// without output; None for the statuses nginx has no page for (empty body).
pub fn error_page(status: StatusCode) -> Option<Bytes> {
    let title = match status.as_u16() {
        301 => "301 Moved Permanently",
        302 => "302 Found",
        303 => "303 See Other",
        307 => "307 Temporary Redirect",
        308 => "308 Permanent Redirect",
        400 => "400 Bad Request",
        401 => "401 Authorization Required",
        402 => "402 Payment Required",
        403 => "403 Forbidden",
        404 => "404 Not Found",
        405 => "405 Not Allowed",
        406 => "406 Not Acceptable",
        409 => "409 Conflict",
        410 => "410 Gone",
        411 => "411 Length Required",
        412 => "412 Precondition Failed",
        413 => "413 Request Entity Too Large",
        414 => "414 Request-URI Too Large",
        415 => "415 Unsupported Media Type",
        416 => "416 Requested Range Not Satisfiable",
        421 => "421 Misdirected Request",
        429 => "429 Too Many Requests",
        500 => "500 Internal Server Error",
        501 => "501 Not Implemented",
        502 => "502 Bad Gateway",
        503 => "503 Service Temporarily Unavailable",
        504 => "504 Gateway Time-out",
        505 => "505 HTTP Version Not Supported",
        507 => "507 Insufficient Storage",
        _ => return None,
    };
    Some(Bytes::from(format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>luagate</center>\r\n</body>\r\n</html>\r\n"
    )))
}

/// HTTP status and gRPC code for each error.
pub fn classify(err: &ProxyError) -> (StatusCode, Code) {
    match err {
        ProxyError::NoRoute { .. } => (StatusCode::NOT_FOUND, Code::Unimplemented),
        ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
        ProxyError::BadRequest(_) | ProxyError::BadPath(_) => (StatusCode::BAD_REQUEST, Code::Internal),
        // As a gRPC server answers a path that names no method of its.
        ProxyError::GrpcPath { .. } => (StatusCode::BAD_REQUEST, Code::Unimplemented),
        ProxyError::TooManyHeaders { .. } => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, Code::ResourceExhausted),
        ProxyError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, Code::Unimplemented),
        ProxyError::ClientBodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, Code::Cancelled),
        ProxyError::NoPeer { .. }
        | ProxyError::Connect { .. }
        | ProxyError::ConnectTimeout { .. }
        | ProxyError::Upstream { .. }
        | ProxyError::BadUpgrade(_) => (StatusCode::BAD_GATEWAY, Code::Unavailable),
        ProxyError::SendTimeout { .. } | ProxyError::ReadTimeout { .. } => {
            (StatusCode::GATEWAY_TIMEOUT, Code::Unavailable)
        }
        ProxyError::Saturated { .. } => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
        ProxyError::Deadline { .. } => (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded),
        ProxyError::Lua(_) => (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
        // nginx's 499: the client closed the request.
        ProxyError::ClientGone => (StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST), Code::Cancelled),
    }
}

/// The `grpc-message` for `err`: what kind of failure, as generic as the
/// HTTP status line an HTTP client gets.
pub fn client_message(err: &ProxyError) -> &'static str {
    match err {
        ProxyError::NoRoute { .. } => "no route for this method",
        ProxyError::BodyTooLarge { .. } => "request too large",
        ProxyError::BadRequest(_) => "bad request",
        ProxyError::BadPath(_) => "bad request path",
        ProxyError::GrpcPath { .. } => "method path not canonical",
        ProxyError::Saturated { .. } => "upstream busy",
        ProxyError::MethodNotAllowed(_) => "method not allowed",
        ProxyError::TooManyHeaders { .. } => "too many request header fields",
        ProxyError::ClientBodyTimeout(_) => "client sent no data in time",
        ProxyError::NoPeer { .. }
        | ProxyError::Connect { .. }
        | ProxyError::ConnectTimeout { .. }
        | ProxyError::Upstream { .. }
        | ProxyError::BadUpgrade(_) => "upstream unavailable",
        ProxyError::ReadTimeout { .. } | ProxyError::SendTimeout { .. } => "upstream timed out",
        ProxyError::Deadline { .. } => "deadline exceeded",
        ProxyError::ClientGone => "cancelled",
        ProxyError::Lua(_) => "internal error",
    }
}

/// The answer for `err`; `log` (if any) is completed and travels with the body.
pub fn error(err: &ProxyError, is_grpc: bool, mut log: Option<LogRecord>) -> Response<ResponseBody> {
    let (status, code) = classify(err);
    if let Some(log) = &mut log {
        log.error = Some(err.to_string());
    }
    if is_grpc {
        return grpc_status(code as u32, client_message(err), log);
    }
    if let Some(log) = &mut log {
        log.status = status.as_u16();
    }
    let text = format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(ResponseBody::full(Bytes::from(text), log))
        .unwrap_or_else(|_| Response::new(ResponseBody::full(Bytes::new(), None)))
}

/// A trailers-only gRPC answer.
pub fn grpc_status(code: u32, message: &str, mut log: Option<LogRecord>) -> Response<ResponseBody> {
    if let Some(log) = &mut log {
        log.status = 200;
        log.grpc_status = Some(code);
    }
    let mut resp = Response::new(ResponseBody::full(Bytes::new(), log));
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", grpc::encode_message(message));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_clients_get_trailers_only() {
        let r = error(&ProxyError::NoRoute { method: "POST".into(), path: "/x.Y/Z".into() }, true, None);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "12");
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }

    #[test]
    fn grpc_clients_learn_no_address() {
        let source = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let err = ProxyError::Connect { peer: "127.0.0.1:1".parse().unwrap(), source };
        let r = error(&err, true, None);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "upstream unavailable");
        let r = error(&ProxyError::Lua("/etc/luagate/auth.lua:3: secret table dump".into()), true, None);
        assert_eq!(r.headers()["grpc-message"], "internal error");
    }

    #[test]
    fn http_clients_get_status() {
        let r = error(&ProxyError::NoPeer { upstream: "u".into() }, false, None);
        assert_eq!(r.status(), 502);
        let r = error(&ProxyError::Deadline { after: std::time::Duration::from_secs(1) }, true, None);
        assert_eq!(r.headers()["grpc-status"], "4");
    }

    #[test]
    fn no_free_upstream_connection_is_503_or_unavailable() {
        let err = ProxyError::Saturated {
            peer: "127.0.0.1:1".parse().unwrap(),
            after: std::time::Duration::from_secs(1),
            why: "max_conns reached",
        };
        assert_eq!(error(&err, false, None).status(), 503);
        assert_eq!(error(&err, true, None).headers()["grpc-status"], "14");
    }
}
