//! W3C trace context: keep the caller's trace id, or start a trace when the
//! request has no valid `traceparent`; luagate's hop gets its own span id.

use http::{HeaderMap, HeaderValue};

/// The W3C header's name, parsed once (a `&str` lookup parses it every time).
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// luagate's own span id, sent upstream as the parent.
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Continue the trace in `traceparent`, or start one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let incoming = headers.get(&TRACEPARENT).and_then(|v| parse(v.as_bytes()));
        let (trace_id, flags) = incoming.unwrap_or_else(|| (random_nonzero::<16>(), 1));
        Self { trace_id, span_id: random_nonzero::<8>(), flags }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn header_value(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_into(&self.span_id, &mut out[36..52]);
        out[52] = b'-';
        hex_into(&[self.flags], &mut out[53..55]);
        HeaderValue::from_bytes(&out)
            .unwrap_or(HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00"))
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
fn parse(v: &[u8]) -> Option<([u8; 16], u8)> {
    if v.len() < 55 || &v[..3] != b"00-" || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace: [u8; 16] = unhex(&v[3..35])?.try_into().ok()?;
    let parent: [u8; 8] = unhex(&v[36..52])?.try_into().ok()?;
    let flags = unhex(&v[53..55])?[0];
    if trace == [0; 16] || parent == [0; 8] || (v.len() > 55) {
        return None;
    }
    Some((trace, flags))
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(*p.get(1)?)?)).collect()
}

/// Lower-case hex of `b` into `out` (twice as long): on the hot path, no formatter.
fn hex_into(b: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, x) in b.iter().enumerate() {
        out[2 * i] = DIGITS[(x >> 4) as usize];
        out[2 * i + 1] = DIGITS[(x & 15) as usize];
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut out = vec![0u8; b.len() * 2];
    hex_into(b, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    loop {
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes()[..chunk.len()]);
        }
        if out != [0; N] {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_incoming_trace_id() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = t.header_value();
        let out = out.to_str().unwrap();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!out.contains("00f067aa0ba902b7"), "luagate's hop has its own span id");
        assert!(out.ends_with("-01"));
    }

    #[test]
    fn starts_a_trace_when_absent_or_invalid() {
        let mut h = HeaderMap::new();
        let a = TraceContext::from_headers(&h);
        h.insert("traceparent", HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        let b = TraceContext::from_headers(&h);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(b.trace_id, [0; 16]);
        let v = a.header_value();
        assert_eq!(v.len(), 55);
        assert!(parse(v.as_bytes()).is_some());
    }
}
