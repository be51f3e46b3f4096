//! Header rewriting between client and upstream: request headers whose
//! name has an underscore are dropped (nginx's `underscores_in_headers off`:
//! `X_Real_IP` would reach a CGI/WSGI backend as `HTTP_X_REAL_IP`),
//! hop-by-hop headers are removed (RFC 9110 §7.6.1), and X-Forwarded-For /
//! X-Real-IP / X-Forwarded-Proto are set so that a client cannot spoof them:
//! values that arrive are believed only from a trusted proxy, and only as
//! far as every hop parses.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::header::{CONNECTION, HOST, TE};
use http::{HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Remove the headers whose name has an `_`, as nginx ignores them by
/// default. One scan of the names (a few short ones, usually none matching);
/// only a request that has such a header pays for removing it.
pub fn drop_underscored(headers: &mut HeaderMap) {
    // A plain byte loop: `<[u8]>::contains` goes through `memchr`, whose setup
    // costs more than these names are long.
    let underscored = |n: &HeaderName| n.as_str().bytes().any(|b| b == b'_');
    if !headers.keys().any(underscored) {
        return;
    }
    let dropped: Vec<HeaderName> = headers.keys().filter(|n| underscored(n)).cloned().collect();
    for name in dropped {
        tracing::debug!(header = %name, "client sent a header with an underscore: ignored");
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // A string match compiles to a switch on the length: cheaper than comparing nine `HeaderName`s.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "te"
    )
}

/// Remove hop-by-hop headers and those the Connection header names — but
/// never Host, which is end to end by definition (RFC 9110 §7.2): a client
/// naming it must not make the upstream see another host than the route did.
/// `keep_te_trailers` keeps `te: trailers`, which gRPC needs end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none, gRPC requests only `te`: one pass over the names finds those
    // present and only they are removed (each removal hashes the name again).
    let present: Vec<HeaderName> = headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for name in present {
        if name == CONNECTION {
            let named: Vec<HeaderName> = headers
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect();
            for n in named {
                if !(keep_te_trailers && n == TE) && n != HOST {
                    headers.remove(n);
                }
            }
            headers.remove(CONNECTION);
        } else if name == TE {
            let te_trailers = headers.get(TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
            headers.remove(TE);
            if keep_te_trailers && te_trailers {
                headers.insert(TE, HeaderValue::from_static("trailers"));
            }
        } else {
            headers.remove(name);
        }
    }
}

/// One X-Forwarded-For entry as an address: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`. Anything else
/// (`unknown`, an obfuscated `_hidden`, an empty entry) is None.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches(|c| c == ' ' || c == '\t');
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let v6 = entry.strip_prefix('[')?.strip_suffix(']')?;
    v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The address of the real client: the connecting peer, or — when the peer
/// is a trusted proxy — the X-Forwarded-For hop found walking from the right
/// past trusted addresses: the first untrusted one. An entry that does not
/// parse (or a value that is not text) ends the walk too, at the last
/// trusted hop, which is the last address anyone trusted vouched for;
/// skipping it would let the client's own entries, further left, win.
pub fn real_client_ip(headers: &HeaderMap, peer: IpAddr, is_trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    if !is_trusted(peer) {
        return peer;
    }
    let mut last = peer;
    // Right to left over every header line and every entry, without collecting.
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else { return last };
        for entry in value.rsplit(',') {
            let Some(ip) = parse_hop(entry) else { return last };
            last = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    last
}

/// Set X-Forwarded-For, X-Real-IP and X-Forwarded-Proto for the upstream.
/// `peer` is the connecting address as a header value (formatted once per connection).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    trusted_peer: bool,
    real_ip: IpAddr,
    scheme: &'static str,
) {
    let prior: Vec<&str> = if trusted_peer {
        headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect()
    } else {
        Vec::new()
    };
    let xff = if prior.is_empty() {
        peer.clone()
    } else {
        let joined = format!("{}, {}", prior.join(", "), peer.to_str().unwrap_or(""));
        HeaderValue::from_str(&joined).unwrap_or_else(|_| peer.clone())
    };
    headers.insert(&X_FORWARDED_FOR, xff);
    // Only a trusted proxy can vouch for another client address than the peer's.
    let real = if trusted_peer {
        HeaderValue::from_str(&real_ip.to_string()).unwrap_or_else(|_| peer.clone())
    } else {
        peer.clone()
    };
    headers.insert(&X_REAL_IP, real);
    if !(trusted_peer && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "x-foo, keep-alive"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let mut h = map(&[("te", "trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "te",
        ] {
            let mut h = map(&[(name, "x"), ("x-keep", "yes")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
        let mut h = map(&[("x-keep", "yes"), ("content-type", "text/plain")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn forwarded_for_untrusted_client_is_replaced() {
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "1.2.3.4"), ("x-forwarded-proto", "https")]);
        let real = real_client_ip(&h, peer, |_| false);
        set_forwarded(&mut h, &HeaderValue::from_static("203.0.113.7"), false, real, "http");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "203.0.113.7");
        assert_eq!(h.get("x-real-ip").unwrap(), "203.0.113.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    }

    #[test]
    fn forwarded_for_trusted_proxy_is_appended() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        let mut h = map(&[("x-forwarded-for", "198.51.100.9, 10.0.0.5"), ("x-forwarded-proto", "https")]);
        let real = real_client_ip(&h, peer, trusted);
        assert_eq!(real.to_string(), "198.51.100.9");
        set_forwarded(&mut h, &HeaderValue::from_static("10.0.0.1"), true, real, "http");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "198.51.100.9, 10.0.0.5, 10.0.0.1");
        assert_eq!(h.get("x-real-ip").unwrap(), "198.51.100.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn every_forwarded_for_form_parses_and_the_walk_stops_at_what_does_not() {
        for (entry, ip) in [
            ("192.0.2.1", "192.0.2.1"),
            (" 192.0.2.1:4711", "192.0.2.1"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711 ", "2001:db8::1"),
        ] {
            assert_eq!(parse_hop(entry), Some(ip.parse().unwrap()), "{entry}");
        }
        for entry in ["unknown", "_hidden", "", "192.0.2.1:port", "[192.0.2.1]", "[::1", "1.2.3"] {
            assert_eq!(parse_hop(entry), None, "{entry}");
        }
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        let real = |xff: &[&str]| {
            let h = xff.iter().fold(HeaderMap::new(), |mut h, v| {
                h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
                h
            });
            real_client_ip(&h, peer, trusted).to_string()
        };
        // A trusted proxy that wrote the hop with a port, or as [v6]: still the client.
        assert_eq!(real(&["6.6.6.6, 203.0.113.7:5555"]), "203.0.113.7");
        assert_eq!(real(&["6.6.6.6, [2001:db8::7]:443, 10.0.0.2"]), "2001:db8::7");
        // An entry that does not parse is not skipped: the attacker's value left of it never wins.
        assert_eq!(real(&["6.6.6.6, unknown"]), "10.0.0.1");
        assert_eq!(real(&["6.6.6.6, 10.0.0.2, garbage, 10.0.0.3"]), "10.0.0.3");
        assert_eq!(real(&["6.6.6.6,"]), "10.0.0.1");
        // Several header lines are one list, read from the last line's end.
        assert_eq!(real(&["6.6.6.6", "10.0.0.5"]), "6.6.6.6");
        assert_eq!(real(&["10.0.0.5", "198.51.100.1, 10.0.0.6"]), "198.51.100.1");
    }

    #[test]
    fn connection_cannot_strip_host() {
        let mut h =
            map(&[("host", "a.example"), ("connection", "host, x-forwarded-for"), ("x-forwarded-for", "1.2.3.4")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("host").unwrap(), "a.example");
        assert!(h.get("x-forwarded-for").is_none());
    }

    #[test]
    fn underscored_headers_are_dropped() {
        let mut h = map(&[("x_real_ip", "6.6.6.6"), ("x-real-ip", "1.1.1.1"), ("x-a", "1"), ("a_b_c", "2")]);
        drop_underscored(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-real-ip") && h.contains_key("x-a"));
    }
}
