//! nginx-style request variables (`$http_x_user`, `$cookie_id`, `$arg_page`,
//! `$remote_addr`, `$binary_remote_addr`, `$uri`, `$request_uri`,
//! `$grpc_service`, `$grpc_method`, and a variable scripts set, declared in
//! `lua.variables`), parsed once at compile time and evaluated against a
//! request without copying where the value is borrowed.

use std::borrow::Cow;
use std::net::IpAddr;

use http::request::Parts;
use http::HeaderName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variable {
    Header(HeaderName),
    Cookie(String),
    Arg(String),
    RemoteAddr,
    /// The client address as 4 or 16 bytes (nginx's `$binary_remote_addr`).
    BinaryRemoteAddr,
    Uri,
    RequestUri,
    /// `pkg.Service` of a gRPC call (unset for other requests).
    GrpcService,
    /// `Method` of a gRPC call (unset for other requests).
    GrpcMethod,
    /// A variable declared in `lua.variables` (nginx's `set $NAME`): its value
    /// lives with the request's Lua state, so [`Variable::eval`] leaves it to the caller.
    Declared(String),
}

impl Variable {
    pub fn parse(s: &str) -> Result<Self, String> {
        let name = s.strip_prefix('$').ok_or_else(|| format!("variable {s:?} must start with $"))?;
        let bad = || {
            format!(
                "unknown variable {s:?} (use $http_NAME, $cookie_NAME, $arg_NAME, $remote_addr, $binary_remote_addr, $uri, $request_uri, $grpc_service, $grpc_method or a name declared in lua.variables)"
            )
        };
        if let Some(h) = name.strip_prefix("http_") {
            let h = h.replace('_', "-").to_ascii_lowercase();
            return HeaderName::from_bytes(h.as_bytes()).map(Self::Header).map_err(|_| bad());
        }
        if let Some(c) = name.strip_prefix("cookie_").filter(|c| !c.is_empty()) {
            return Ok(Self::Cookie(c.to_string()));
        }
        if let Some(a) = name.strip_prefix("arg_").filter(|a| !a.is_empty()) {
            return Ok(Self::Arg(a.to_string()));
        }
        match name {
            "remote_addr" => Ok(Self::RemoteAddr),
            "binary_remote_addr" => Ok(Self::BinaryRemoteAddr),
            "uri" => Ok(Self::Uri),
            "request_uri" => Ok(Self::RequestUri),
            "grpc_service" => Ok(Self::GrpcService),
            "grpc_method" => Ok(Self::GrpcMethod),
            _ => Err(bad()),
        }
    }

    /// As [`parse`](Self::parse), and `$NAME` for a name `declared` in `lua.variables`.
    pub fn parse_with(s: &str, declared: impl Fn(&str) -> bool) -> Result<Self, String> {
        Self::parse(s).or_else(|e| match s.strip_prefix('$') {
            Some(name) if declared(name) => Ok(Self::Declared(name.to_string())),
            _ => Err(e),
        })
    }

    /// The variable's value for this request, or None when it is not set.
    pub fn eval<'a>(&self, req: &'a Parts, client: IpAddr) -> Option<Cow<'a, [u8]>> {
        match self {
            Self::Header(h) => {
                // As nginx 1.22: repeated Cookie headers join with "; ", X-Forwarded-For with ", ";
                // for other headers the first one counts.
                let sep: &[u8] = match h.as_str() {
                    "cookie" => b"; ",
                    "x-forwarded-for" => b", ",
                    _ => return req.headers.get(h).map(|v| Cow::Borrowed(v.as_bytes())),
                };
                let mut values = req.headers.get_all(h).iter();
                let first = values.next()?;
                let rest: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
                if rest.is_empty() {
                    return Some(Cow::Borrowed(first.as_bytes()));
                }
                let mut joined = first.as_bytes().to_vec();
                for v in rest {
                    joined.extend_from_slice(sep);
                    joined.extend_from_slice(v);
                }
                Some(Cow::Owned(joined))
            }
            Self::Cookie(name) => req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| Cow::Borrowed(v.as_bytes())),
            // As nginx: names compare case-insensitively; a bare `?flag` sets no value.
            Self::Arg(name) => req
                .uri
                .query()?
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| Cow::Borrowed(v.as_bytes())),
            Self::RemoteAddr => Some(Cow::Owned(client.to_string().into_bytes())),
            Self::BinaryRemoteAddr => Some(Cow::Owned(match client {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            })),
            Self::GrpcService | Self::GrpcMethod => {
                if !crate::protocol::grpc::is_grpc(&req.headers) {
                    return None;
                }
                let (service, method) = crate::protocol::grpc::parse_path(req.uri.path())?;
                Some(Cow::Borrowed(if *self == Self::GrpcService { service } else { method }.as_bytes()))
            }
            Self::Declared(_) => None,
            // The path is canonical or luagate escaped it (`protocol::uri`): decoding gives `$uri`.
            Self::Uri => Some(crate::protocol::uri::decode(req.uri.path().as_bytes())),
            Self::RequestUri => Some(Cow::Borrowed(req.uri.path_and_query().map_or("/", |pq| pq.as_str()).as_bytes())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn evaluates_each_kind() {
        let p = parts("/a/b?x=1&page=7&flag", &[("x-user", "u1"), ("cookie", "a=1; sid=abc")]);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let v = |s: &str| Variable::parse(s).unwrap().eval(&p, ip).map(|c| c.into_owned());
        assert_eq!(v("$http_x_user"), Some(b"u1".to_vec()));
        let two = parts("/", &[("cookie", "a=1"), ("cookie", "b=2"), ("x-other", "1"), ("x-other", "2")]);
        let eval = |s: &str| Variable::parse(s).unwrap().eval(&two, ip).map(|c| c.into_owned());
        assert_eq!(eval("$http_cookie"), Some(b"a=1; b=2".to_vec()));
        assert_eq!(eval("$http_x_other"), Some(b"1".to_vec()));
        assert_eq!(v("$cookie_sid"), Some(b"abc".to_vec()));
        assert_eq!(v("$arg_page"), Some(b"7".to_vec()));
        assert_eq!(v("$arg_flag"), None);
        assert_eq!(v("$arg_PAGE"), Some(b"7".to_vec()));
        assert_eq!(v("$arg_none"), None);
        assert_eq!(v("$remote_addr"), Some(b"10.1.2.3".to_vec()));
        assert_eq!(v("$uri"), Some(b"/a/b".to_vec()));
        assert_eq!(v("$request_uri"), Some(b"/a/b?x=1&page=7&flag".to_vec()));
        assert_eq!(v("$binary_remote_addr"), Some(vec![10, 1, 2, 3]));
        assert_eq!(v("$grpc_method"), None);
        let g = parts("/echo.v1.Echo/Unary", &[("content-type", "application/grpc")]);
        let eval = |s: &str| Variable::parse(s).unwrap().eval(&g, ip).map(|c| c.into_owned());
        assert_eq!(eval("$grpc_service"), Some(b"echo.v1.Echo".to_vec()));
        assert_eq!(eval("$grpc_method"), Some(b"Unary".to_vec()));
    }

    #[test]
    fn declared_variables_need_a_declaration() {
        assert!(Variable::parse("$limit_key").is_err());
        let v = Variable::parse_with("$limit_key", |n| n == "limit_key").unwrap();
        assert_eq!(v, Variable::Declared("limit_key".into()));
        // Built-in names keep their meaning.
        assert_eq!(Variable::parse_with("$uri", |_| true).unwrap(), Variable::Uri);
        assert!(Variable::parse_with("$other", |n| n == "limit_key").is_err());
    }

    #[test]
    fn uri_is_decoded() {
        // luagate escapes a normalised path before it reaches the variable: `$uri` decodes it back.
        let p = parts("/a%20b%3Fc%25?x=%20", &[]);
        let v = Variable::parse("$uri").unwrap().eval(&p, "10.0.0.1".parse().unwrap());
        assert_eq!(v.as_deref(), Some(&b"/a b?c%"[..]));
        let v = Variable::parse("$request_uri").unwrap().eval(&p, "10.0.0.1".parse().unwrap());
        assert_eq!(v.as_deref(), Some(&b"/a%20b%3Fc%25?x=%20"[..]));
    }

    #[test]
    fn rejects_unknown() {
        assert!(Variable::parse("http_x").is_err());
        assert!(Variable::parse("$nope").is_err());
        assert!(Variable::parse("$cookie_").is_err());
    }
}
