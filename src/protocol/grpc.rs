//! gRPC over HTTP/2 as a proxy sees it: recognising a call and its
//! `/service/method`, `grpc-timeout` in both directions, and the status codes
//! and trailers-only answers luagate makes itself.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// gRPC status codes luagate produces (`grpc-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// The gRPC status for an HTTP status, as the gRPC spec maps them
/// (`doc/http-grpc-status-mapping.md`).
pub fn from_http_status(status: u16) -> u32 {
    match status {
        200 => 0,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// True for gRPC calls (`application/grpc`, `application/grpc+proto`, …), not gRPC-Web.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
    })
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// `grpc-timeout`: up to 8 digits and a unit (H M S m u n).
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The most precise unit whose value fits the 8 digits gRPC allows.
pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let candidates = [
        (d.as_nanos(), 'n'),
        (d.as_micros(), 'u'),
        (d.as_millis(), 'm'),
        (d.as_secs() as u128, 'S'),
        (d.as_secs() as u128 / 60, 'M'),
        (d.as_secs() as u128 / 3600, 'H'),
    ];
    let (n, unit) = candidates.into_iter().find(|(n, _)| *n <= MAX).unwrap_or((MAX, 'H'));
    HeaderValue::from_str(&format!("{n}{unit}")).unwrap_or(HeaderValue::from_static("99999999H"))
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec).
pub fn encode_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_grpc() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert("content-type", HeaderValue::from_static("application/grpc+proto"));
        assert!(is_grpc(&h));
        h.insert("content-type", HeaderValue::from_static("application/grpc-web"));
        assert!(!is_grpc(&h));
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path("/echo.v1.Echo/Unary"), Some(("echo.v1.Echo", "Unary")));
        assert_eq!(parse_path("/echo"), None);
        assert_eq!(parse_path("/a/b/c"), None);
        assert_eq!(parse_path("//x"), None);
    }

    #[test]
    fn timeouts_round_trip() {
        let v = |s: &'static str| parse_timeout(&HeaderValue::from_static(s));
        assert_eq!(v("200m"), Some(Duration::from_millis(200)));
        assert_eq!(v("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(v("5S"), Some(Duration::from_secs(5)));
        assert_eq!(v("123456789S"), None);
        assert_eq!(v("10x"), None);
        assert_eq!(v("m"), None);
        assert_eq!(format_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(format_timeout(Duration::from_secs(3600)), "3600000m");
        let d = Duration::from_secs(10 * 86400);
        assert_eq!(parse_timeout(&format_timeout(d)), Some(d));
    }

    #[test]
    fn message_encoding() {
        assert_eq!(encode_message("no peer: 100%"), "no peer: 100%25");
        assert_eq!(encode_message("é"), "%C3%A9");
    }
}
