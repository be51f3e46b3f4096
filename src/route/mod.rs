//! Route matching with nginx's precedence.
//!
//! A [`RouteTable`] is compiled once per config snapshot; [`RouteTable::find`]
//! runs for every request and does not allocate: host groups are precomputed
//! per listener and looked up in hash maps, and each group keeps its path
//! candidates pre-sorted.
//!
//! # Precedence
//!
//! 1. **Listener.** A route with a `listener` matches only requests that
//!    arrive on the listener of that name. As with nginx's `listen` in a
//!    `server` block, a listener that some route names is served by those
//!    routes alone; routes without a listener serve the other listeners.
//! 2. **Host**, like nginx `server_name`. Among the routes left, one host
//!    group is chosen by the best match of the request's host:
//!    1. an exact name (`api.example.com`);
//!    2. the longest wildcard that starts with an asterisk (`*.example.com`,
//!       which matches `a.example.com` and `a.b.example.com` but not
//!       `example.com`); `.example.com` is such a wildcard that also matches
//!       `example.com` itself;
//!    3. the longest wildcard that ends with an asterisk (`www.example.*`);
//!    4. the routes without hosts (the default group).
//!
//!    Only routes of the chosen group are considered further. If none of them
//!    matches the rest of the request, no route matches, even where a route of
//!    the default group would have (nginx picks a server first, then a
//!    location). If no host matches and there is no default group, no route
//!    matches.
//! 3. **Conditions.** Within the group, routes whose methods, headers or gRPC
//!    service and method do not match the request are discarded.
//! 4. **Path**, like nginx `location`, among the routes left:
//!    1. an exact path (nginx `location = /x`) wins at once;
//!    2. otherwise the longest matching prefix is remembered (on a tie, the
//!       first in config order); if it is marked `stop_regex` (nginx `^~`),
//!       it wins;
//!    3. otherwise the regexes are tried in config order, and the first that
//!       matches wins;
//!    4. otherwise the remembered longest prefix wins.
//!
//!    A route without a path condition counts as a prefix of length 0, like
//!    `location /`.
//!
//! The path routes see is the normalised one (`protocol::uri::normalize`,
//! nginx's `$uri`): percent-decoded, dot segments resolved, slashes merged.
//! It is bytes, not always UTF-8 (`/%ff`): exact paths and prefixes compare
//! bytes, regexes run on bytes.
//!
//! Details: a prefix is compared byte for byte, so `/api` matches `/apix`, as
//! in nginx; a regex is unanchored unless it says `^` or `$`; a header
//! condition holds if any value of that header matches; a route with a gRPC
//! condition never matches a request that is not gRPC. Host names compare
//! without regard to case, and a trailing dot on the request's host is ignored.

use std::collections::{BTreeSet, HashMap};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

/// A host name pattern, like an nginx `server_name`. Names are stored
/// lowercase and without the wildcard part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`.
    Exact(String),
    /// `*.example.com`, stored as `example.com`: any name that ends in
    /// `.example.com`, but not `example.com` itself.
    SuffixWildcard(String),
    /// `www.example.*`, stored as `www.example`: any name that starts with
    /// `www.example.`.
    PrefixWildcard(String),
    /// `.example.com`, stored as `example.com`: `example.com` and any name
    /// that ends in `.example.com`. Ranks as a `*.example.com` wildcard.
    DomainWildcard(String),
}

impl HostPattern {
    /// Parses `api.example.com`, `*.example.com`, `.example.com` or
    /// `www.example.*`, lowercased. Labels may hold letters, digits, `-` and
    /// `_`; an asterisk is allowed only as the whole first or last label.
    pub fn parse(s: &str) -> Result<Self, String> {
        let name = s.to_ascii_lowercase();
        let err = |why: String| Err(format!("invalid host pattern {s:?}: {why}"));
        if name.starts_with('~') {
            return err("regex host names are not supported".into());
        }
        let (make, rest): (fn(String) -> Self, &str) = if let Some(rest) = name.strip_prefix("*.") {
            (Self::SuffixWildcard, rest)
        } else if let Some(rest) = name.strip_suffix(".*") {
            (Self::PrefixWildcard, rest)
        } else if let Some(rest) = name.strip_prefix('.') {
            (Self::DomainWildcard, rest)
        } else {
            (Self::Exact, name.as_str())
        };
        if rest.is_empty() {
            return err("no name".into());
        }
        for label in rest.split('.') {
            if label.is_empty() {
                return err("empty label".into());
            }
            for c in label.chars() {
                if c == '*' {
                    return err("`*` may only be the whole first or last label".into());
                }
                if !(c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    return err(format!("invalid character {c:?}"));
                }
            }
        }
        Ok(make(rest.to_owned()))
    }
}

/// The path condition of a route.
#[derive(Debug, Clone, Default)]
pub enum PathMatch {
    /// No condition: a prefix of length 0.
    #[default]
    Any,
    /// The whole path equals this.
    Exact(String),
    /// The path starts with `prefix`; `stop_regex` is nginx's `^~`.
    Prefix { prefix: String, stop_regex: bool },
    /// The regex matches somewhere in the path (on bytes: the path need not be UTF-8).
    Regex(regex::bytes::Regex),
}

/// A condition on one header; it holds if any value of the header matches.
#[derive(Debug, Clone)]
pub enum HeaderMatch {
    Present,
    Exact(HeaderValue),
    /// Matched against values that are valid UTF-8.
    Regex(Regex),
}

/// What a route matches; see the module doc for the precedence.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Only requests arriving on the listener with this name.
    pub listener: Option<String>,
    /// Empty: any host (the default group).
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    /// Empty: any method.
    pub methods: Vec<Method>,
    /// All must match.
    pub headers: Vec<(HeaderName, HeaderMatch)>,
    /// `echo.v1.Echo`; only gRPC requests match.
    pub grpc_service: Option<String>,
    /// `Unary`; only gRPC requests match.
    pub grpc_method: Option<String>,
}

/// The parts of a request that routing looks at.
pub struct MatchInput<'a> {
    pub listener: &'a str,
    /// Lowercase, without port.
    pub host: &'a str,
    /// The normalised path (`protocol::uri::normalize`), no query.
    pub path: &'a [u8],
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    /// (service, method) when the request is gRPC.
    pub grpc: Option<(&'a str, &'a str)>,
}

/// Compiled routes; indexes are those of the `Vec` given to [`RouteTable::new`].
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<RouteMatch>,
    /// For listeners that no route names: only routes without a listener.
    any_listener: HostIndex,
    /// For each listener some route names: only the routes naming it.
    by_listener: HashMap<String, HostIndex>,
}

impl RouteTable {
    pub fn new(routes: Vec<RouteMatch>) -> Self {
        let names: BTreeSet<&str> = routes.iter().filter_map(|r| r.listener.as_deref()).collect();
        let by_listener = names
            .into_iter()
            .map(|name| {
                let index = HostIndex::new(&routes, |r| r.listener.as_deref() == Some(name));
                (name.to_owned(), index)
            })
            .collect();
        let any_listener = HostIndex::new(&routes, |r| r.listener.is_none());
        Self { routes, any_listener, by_listener }
    }

    /// The index of the route that takes the request, if any.
    pub fn find(&self, input: &MatchInput<'_>) -> Option<usize> {
        let index = self.by_listener.get(input.listener).unwrap_or(&self.any_listener);
        let host = input.host.strip_suffix('.').unwrap_or(input.host);
        index.group(host)?.find(&self.routes, input)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The host groups of the routes that one listener sees.
#[derive(Debug, Clone, Default)]
struct HostIndex {
    exact: HashMap<String, PathIndex>,
    /// `.d` routes, for the host `d` itself.
    domain_bare: HashMap<String, PathIndex>,
    /// `*.d` and `.d` routes, for hosts below `d`.
    suffix: HashMap<String, PathIndex>,
    /// `p.*` routes, by `p`.
    prefix: HashMap<String, PathIndex>,
    default: Option<PathIndex>,
}

impl HostIndex {
    fn new(routes: &[RouteMatch], sees: impl Fn(&RouteMatch) -> bool) -> Self {
        let mut exact = HashMap::new();
        let mut domain_bare = HashMap::new();
        let mut suffix = HashMap::new();
        let mut prefix = HashMap::new();
        let mut default = Vec::new();
        for (i, route) in routes.iter().enumerate().filter(|(_, r)| sees(r)) {
            if route.hosts.is_empty() {
                default.push(i);
            }
            for host in &route.hosts {
                match host {
                    HostPattern::Exact(h) => add(&mut exact, h.clone(), i),
                    HostPattern::SuffixWildcard(d) => add(&mut suffix, d.clone(), i),
                    HostPattern::PrefixWildcard(p) => add(&mut prefix, p.clone(), i),
                    HostPattern::DomainWildcard(d) => {
                        add(&mut domain_bare, d.clone(), i);
                        add(&mut suffix, d.clone(), i);
                    }
                }
            }
        }
        let build =
            |m: HashMap<String, Vec<usize>>| m.into_iter().map(|(k, ids)| (k, PathIndex::new(routes, ids))).collect();
        Self {
            exact: build(exact),
            domain_bare: build(domain_bare),
            suffix: build(suffix),
            prefix: build(prefix),
            default: (!default.is_empty()).then(|| PathIndex::new(routes, default)),
        }
    }

    fn group(&self, host: &str) -> Option<&PathIndex> {
        if let Some(g) = self.exact.get(host) {
            return Some(g);
        }
        if let Some(g) = self.domain_bare.get(host) {
            return Some(g);
        }
        // Dropping labels from the left, the first hit is the longest suffix.
        for (dot, _) in host.match_indices('.') {
            if dot > 0 {
                if let Some(g) = self.suffix.get(&host[dot + 1..]) {
                    return Some(g);
                }
            }
        }
        // Dropping labels from the right, the first hit is the longest prefix.
        for (dot, _) in host.rmatch_indices('.') {
            if dot > 0 && dot + 1 < host.len() {
                if let Some(g) = self.prefix.get(&host[..dot]) {
                    return Some(g);
                }
            }
        }
        self.default.as_ref()
    }
}

/// Adds route `i` under `key`, once even if the route lists the key twice.
fn add<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<usize>>, key: K, i: usize) {
    let ids = map.entry(key).or_default();
    if ids.last() != Some(&i) {
        ids.push(i);
    }
}

/// The routes of one host group, arranged for the path step.
#[derive(Debug, Clone, Default)]
struct PathIndex {
    /// Exact path -> routes in config order.
    exact: HashMap<Box<[u8]>, Vec<usize>>,
    /// `Prefix` and `Any` routes, longest prefix first, then config order.
    prefixes: Vec<usize>,
    /// `Regex` routes in config order.
    regexes: Vec<usize>,
}

impl PathIndex {
    fn new(routes: &[RouteMatch], ids: Vec<usize>) -> Self {
        let mut index = Self::default();
        for i in ids {
            match &routes[i].path {
                PathMatch::Exact(p) => add(&mut index.exact, p.as_bytes().into(), i),
                PathMatch::Any | PathMatch::Prefix { .. } => index.prefixes.push(i),
                PathMatch::Regex(_) => index.regexes.push(i),
            }
        }
        // Stable sort: config order stays among equal lengths.
        index.prefixes.sort_by_key(|&i| std::cmp::Reverse(prefix_of(&routes[i]).0.len()));
        index
    }

    fn find(&self, routes: &[RouteMatch], input: &MatchInput<'_>) -> Option<usize> {
        if let Some(ids) = self.exact.get(input.path) {
            if let Some(&i) = ids.iter().find(|&&i| conditions_hold(&routes[i], input)) {
                return Some(i);
            }
        }
        let mut longest = None;
        for &i in &self.prefixes {
            let (prefix, stop_regex) = prefix_of(&routes[i]);
            if input.path.starts_with(prefix.as_bytes()) && conditions_hold(&routes[i], input) {
                if stop_regex {
                    return Some(i);
                }
                longest = Some(i);
                break;
            }
        }
        for &i in &self.regexes {
            if let PathMatch::Regex(re) = &routes[i].path {
                if re.is_match(input.path) && conditions_hold(&routes[i], input) {
                    return Some(i);
                }
            }
        }
        longest
    }
}

/// The prefix and `stop_regex` of a route in the prefix list.
fn prefix_of(route: &RouteMatch) -> (&str, bool) {
    match &route.path {
        PathMatch::Prefix { prefix, stop_regex } => (prefix, *stop_regex),
        PathMatch::Any | PathMatch::Exact(_) | PathMatch::Regex(_) => ("", false),
    }
}

/// Methods, headers and gRPC: everything but listener, host and path.
fn conditions_hold(route: &RouteMatch, input: &MatchInput<'_>) -> bool {
    if !route.methods.is_empty() && !route.methods.contains(input.method) {
        return false;
    }
    if route.grpc_service.is_some() || route.grpc_method.is_some() {
        let Some((service, method)) = input.grpc else {
            return false;
        };
        if route.grpc_service.as_deref().is_some_and(|s| s != service)
            || route.grpc_method.as_deref().is_some_and(|m| m != method)
        {
            return false;
        }
    }
    route.headers.iter().all(|(name, m)| header_matches(input.headers, name, m))
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, m: &HeaderMatch) -> bool {
    let mut values = headers.get_all(name).iter();
    match m {
        HeaderMatch::Present => values.next().is_some(),
        HeaderMatch::Exact(want) => values.any(|v| v == want),
        HeaderMatch::Regex(re) => values.any(|v| std::str::from_utf8(v.as_bytes()).is_ok_and(|s| re.is_match(s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Req {
        listener: &'static str,
        host: &'static str,
        path: &'static str,
        method: Method,
        headers: HeaderMap,
        grpc: Option<(&'static str, &'static str)>,
    }

    impl Req {
        fn new(host: &'static str, path: &'static str) -> Self {
            Self { listener: "main", host, path, method: Method::GET, headers: HeaderMap::new(), grpc: None }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            self
        }

        fn on(&self, table: &RouteTable) -> Option<usize> {
            table.find(&MatchInput {
                listener: self.listener,
                host: self.host,
                path: self.path.as_bytes(),
                method: &self.method,
                headers: &self.headers,
                grpc: self.grpc,
            })
        }
    }

    fn any() -> RouteMatch {
        RouteMatch::default()
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch { path: PathMatch::Prefix { prefix: p.into(), stop_regex: false }, ..any() }
    }

    fn stop_prefix(p: &str) -> RouteMatch {
        RouteMatch { path: PathMatch::Prefix { prefix: p.into(), stop_regex: true }, ..any() }
    }

    fn exact(p: &str) -> RouteMatch {
        RouteMatch { path: PathMatch::Exact(p.into()), ..any() }
    }

    fn regex(re: &str) -> RouteMatch {
        RouteMatch { path: PathMatch::Regex(regex::bytes::Regex::new(re).expect("test regex")), ..any() }
    }

    fn hosts(names: &[&str]) -> RouteMatch {
        RouteMatch { hosts: names.iter().map(|n| HostPattern::parse(n).expect("test host")).collect(), ..any() }
    }

    fn table(routes: Vec<RouteMatch>) -> RouteTable {
        RouteTable::new(routes)
    }

    fn at(t: &RouteTable, p: &'static str) -> Option<usize> {
        Req::new("example.com", p).on(t)
    }

    fn host(t: &RouteTable, h: &'static str) -> Option<usize> {
        Req::new(h, "/").on(t)
    }

    #[test]
    fn exact_path_beats_prefix_and_regex() {
        let t = table(vec![prefix("/a"), regex("^/a"), exact("/a"), prefix("/")]);
        assert_eq!(at(&t, "/a"), Some(2));
        assert_eq!(at(&t, "/ab"), Some(1));
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(vec![prefix("/"), prefix("/api/"), prefix("/api/v1/"), prefix("/api")]);
        assert_eq!(at(&t, "/api/v1/users"), Some(2));
        assert_eq!(at(&t, "/api/v2"), Some(1));
        assert_eq!(at(&t, "/apix"), Some(3));
        assert_eq!(at(&t, "/other"), Some(0));
    }

    #[test]
    fn equal_prefixes_go_by_config_order() {
        let t = table(vec![prefix("/b"), prefix("/a"), prefix("/a")]);
        assert_eq!(at(&t, "/a"), Some(1));
    }

    #[test]
    fn regex_beats_plain_prefix() {
        let t = table(vec![prefix("/img/"), regex(r"\.png$")]);
        assert_eq!(at(&t, "/img/a.png"), Some(1));
        assert_eq!(at(&t, "/img/a.gif"), Some(0));
    }

    #[test]
    fn stop_regex_prefix_beats_regex() {
        let t = table(vec![regex(r"\.png$"), stop_prefix("/img/")]);
        assert_eq!(at(&t, "/img/a.png"), Some(1));
        assert_eq!(at(&t, "/x/a.png"), Some(0));
    }

    #[test]
    fn stop_regex_counts_only_on_the_longest_prefix() {
        // nginx: `^~ /img/` does not stop regexes when `/img/raw/` is longer.
        let t = table(vec![stop_prefix("/img/"), prefix("/img/raw/"), regex(r"\.png$")]);
        assert_eq!(at(&t, "/img/raw/a.png"), Some(2));
        assert_eq!(at(&t, "/img/raw/a.gif"), Some(1));
    }

    #[test]
    fn regexes_go_by_config_order() {
        let t = table(vec![regex("^/a/b"), regex("^/a"), regex("^/a/b/c")]);
        assert_eq!(at(&t, "/a/b/c"), Some(0));
        assert_eq!(at(&t, "/a/x"), Some(1));
    }

    #[test]
    fn any_is_a_zero_length_prefix_fallback() {
        let t = table(vec![any(), prefix("/api"), regex("^/r"), any()]);
        assert_eq!(at(&t, "/api/x"), Some(1));
        assert_eq!(at(&t, "/r"), Some(2));
        assert_eq!(at(&t, "/else"), Some(0));
    }

    #[test]
    fn paths_are_bytes() {
        // A normalised path need not be UTF-8 (`/%ff` decodes to one byte 0xff).
        let t = table(vec![exact("/caf\u{e9}"), prefix("/admin"), prefix("/")]);
        let headers = HeaderMap::new();
        let find = |path: &[u8]| {
            t.find(&MatchInput {
                listener: "main",
                host: "x",
                path,
                method: &Method::GET,
                headers: &headers,
                grpc: None,
            })
        };
        assert_eq!(find(b"/admin/\xff"), Some(1));
        assert_eq!(find("/caf\u{e9}".as_bytes()), Some(0));
        assert_eq!(find(b"/caf\xe9"), Some(2), "Latin-1 bytes are not the UTF-8 path");
        assert_eq!(find(b"/\xff"), Some(2));
    }

    #[test]
    fn unmatched_path_gives_none() {
        let t = table(vec![prefix("/api"), exact("/x"), regex("^/r")]);
        assert_eq!(at(&t, "/other"), None);
        assert_eq!(at(&t, "/x/"), None);
    }

    #[test]
    fn host_exact_then_suffix_then_prefix_then_default() {
        let t = table(vec![any(), hosts(&["www.example.*"]), hosts(&["*.example.com"]), hosts(&["www.example.com"])]);
        assert_eq!(host(&t, "www.example.com"), Some(3));
        assert_eq!(host(&t, "api.example.com"), Some(2));
        assert_eq!(host(&t, "www.example.org"), Some(1));
        assert_eq!(host(&t, "other.org"), Some(0));
        assert_eq!(host(&t, ""), Some(0));
    }

    #[test]
    fn longest_suffix_wildcard_wins() {
        let t = table(vec![hosts(&["*.com"]), hosts(&["*.example.com"]), hosts(&["*.b.example.com"])]);
        assert_eq!(host(&t, "a.b.example.com"), Some(2));
        assert_eq!(host(&t, "a.c.example.com"), Some(1));
        assert_eq!(host(&t, "b.example.com"), Some(1));
        assert_eq!(host(&t, "example.com"), Some(0));
        assert_eq!(host(&t, "com"), None);
    }

    #[test]
    fn longest_prefix_wildcard_wins() {
        let t = table(vec![hosts(&["www.*"]), hosts(&["www.example.*"]), any()]);
        assert_eq!(host(&t, "www.example.co.uk"), Some(1));
        assert_eq!(host(&t, "www.other.com"), Some(0));
        assert_eq!(host(&t, "www"), Some(2));
        assert_eq!(host(&t, "www.example"), Some(0));
    }

    #[test]
    fn dot_domain_matches_bare_name_and_subdomains() {
        let t = table(vec![hosts(&[".example.com"]), hosts(&["*.com"]), any()]);
        assert_eq!(host(&t, "example.com"), Some(0));
        assert_eq!(host(&t, "a.b.example.com"), Some(0));
        assert_eq!(host(&t, "xexample.com"), Some(1));
        // An exact name still beats it.
        let t = table(vec![hosts(&[".example.com"]), hosts(&["example.com"])]);
        assert_eq!(host(&t, "example.com"), Some(1));
        assert_eq!(host(&t, "www.example.com"), Some(0));
    }

    #[test]
    fn suffix_wildcard_does_not_match_bare_name() {
        let t = table(vec![hosts(&["*.example.com"]), any()]);
        assert_eq!(host(&t, "example.com"), Some(1));
        assert_eq!(host(&t, "a.example.com"), Some(0));
    }

    #[test]
    fn chosen_host_group_has_no_fallback() {
        let t = table(vec![any(), {
            let mut r = hosts(&["api.example.com"]);
            r.path = PathMatch::Prefix { prefix: "/v1".into(), stop_regex: false };
            r
        }]);
        assert_eq!(Req::new("api.example.com", "/v1/x").on(&t), Some(1));
        assert_eq!(Req::new("api.example.com", "/v2/x").on(&t), None);
        assert_eq!(Req::new("web.example.com", "/v2/x").on(&t), Some(0));
    }

    #[test]
    fn no_host_match_and_no_default_gives_none() {
        let t = table(vec![hosts(&["a.example.com"]), hosts(&["*.b.example.com"])]);
        assert_eq!(host(&t, "c.example.com"), None);
        assert_eq!(host(&t, ""), None);
    }

    #[test]
    fn request_host_trailing_dot_is_ignored() {
        let t = table(vec![hosts(&["www.example.com"]), any()]);
        assert_eq!(host(&t, "www.example.com."), Some(0));
    }

    #[test]
    fn listener_filter() {
        let on = |name: &str, r: RouteMatch| RouteMatch { listener: Some(name.into()), ..r };
        let t = table(vec![on("admin", prefix("/")), prefix("/api"), on("public", prefix("/api/v1"))]);
        let mut req = Req::new("example.com", "/api/v1/x");
        req.listener = "admin";
        assert_eq!(req.on(&t), Some(0), "a named listener is served by its own routes only");
        req.listener = "public";
        assert_eq!(req.on(&t), Some(2));
        req.listener = "other";
        assert_eq!(req.on(&t), Some(1));
        req.path = "/x";
        assert_eq!(req.on(&t), None);
        req.listener = "admin";
        assert_eq!(req.on(&t), Some(0));
    }

    #[test]
    fn listener_routes_take_part_in_host_choice() {
        let t = table(vec![any(), RouteMatch { listener: Some("internal".into()), ..hosts(&["api.example.com"]) }]);
        let mut req = Req::new("api.example.com", "/");
        assert_eq!(req.on(&t), Some(0));
        req.listener = "internal";
        assert_eq!(req.on(&t), Some(1));
        let mut other = Req::new("other.example.com", "/");
        other.listener = "internal";
        assert_eq!(other.on(&t), None, "routes without a listener do not serve a named one");
    }

    #[test]
    fn methods() {
        let t = table(vec![RouteMatch { methods: vec![Method::POST, Method::PUT], ..prefix("/api") }, any()]);
        let mut req = Req::new("example.com", "/api/x");
        assert_eq!(req.on(&t), Some(1));
        req.method = Method::PUT;
        assert_eq!(req.on(&t), Some(0));
    }

    #[test]
    fn failed_conditions_discard_before_path_choice() {
        let post = |r: RouteMatch| RouteMatch { methods: vec![Method::POST], ..r };
        let t = table(vec![post(exact("/a")), post(stop_prefix("/a")), regex("^/a"), prefix("/")]);
        let mut req = Req::new("example.com", "/a");
        assert_eq!(req.on(&t), Some(2));
        req.method = Method::POST;
        assert_eq!(req.on(&t), Some(0));
        req.path = "/ab";
        assert_eq!(req.on(&t), Some(1));
    }

    fn with_header(name: &'static str, m: HeaderMatch) -> RouteMatch {
        RouteMatch { headers: vec![(HeaderName::from_static(name), m)], ..any() }
    }

    #[test]
    fn header_present() {
        let t = table(vec![with_header("x-canary", HeaderMatch::Present), prefix("")]);
        assert_eq!(Req::new("h", "/").on(&t), Some(1));
        assert_eq!(Req::new("h", "/").header("x-canary", "").on(&t), Some(0));
    }

    #[test]
    fn header_exact_is_case_sensitive_and_checks_every_value() {
        let t = table(vec![with_header("x-env", HeaderMatch::Exact(HeaderValue::from_static("beta"))), prefix("")]);
        assert_eq!(Req::new("h", "/").header("x-env", "Beta").on(&t), Some(1));
        assert_eq!(Req::new("h", "/").header("x-env", "prod").header("x-env", "beta").on(&t), Some(0));
    }

    #[test]
    fn header_regex() {
        let t = table(vec![
            with_header("user-agent", HeaderMatch::Regex(Regex::new("^curl/").expect("test regex"))),
            prefix(""),
        ]);
        assert_eq!(Req::new("h", "/").header("user-agent", "curl/8.5").on(&t), Some(0));
        assert_eq!(Req::new("h", "/").header("user-agent", "wget curl/").on(&t), Some(1));
        assert_eq!(Req::new("h", "/").on(&t), Some(1));
    }

    #[test]
    fn all_header_conditions_must_hold() {
        let t = table(vec![
            RouteMatch {
                headers: vec![
                    (HeaderName::from_static("a"), HeaderMatch::Present),
                    (HeaderName::from_static("b"), HeaderMatch::Present),
                ],
                ..any()
            },
            prefix(""),
        ]);
        assert_eq!(Req::new("h", "/").header("a", "1").on(&t), Some(1));
        assert_eq!(Req::new("h", "/").header("a", "1").header("b", "2").on(&t), Some(0));
    }

    #[test]
    fn grpc_service_and_method() {
        let t = table(vec![
            RouteMatch { grpc_service: Some("echo.v1.Echo".into()), grpc_method: Some("Unary".into()), ..any() },
            RouteMatch { grpc_service: Some("echo.v1.Echo".into()), ..any() },
            RouteMatch { grpc_method: Some("Check".into()), ..any() },
        ]);
        let mut req = Req::new("h", "/echo.v1.Echo/Unary");
        req.grpc = Some(("echo.v1.Echo", "Unary"));
        assert_eq!(req.on(&t), Some(0));
        req.grpc = Some(("echo.v1.Echo", "Stream"));
        assert_eq!(req.on(&t), Some(1));
        req.grpc = Some(("grpc.health.v1.Health", "Check"));
        assert_eq!(req.on(&t), Some(2));
        req.grpc = Some(("other.Svc", "Unary"));
        assert_eq!(req.on(&t), None);
    }

    #[test]
    fn grpc_route_never_matches_plain_request() {
        let t = table(vec![RouteMatch { grpc_service: Some("echo.v1.Echo".into()), ..any() }, regex("^/nothing")]);
        assert_eq!(Req::new("h", "/echo.v1.Echo/Unary").on(&t), None);
        // A route without gRPC conditions takes gRPC requests too.
        let t = table(vec![prefix("/echo.v1.Echo/")]);
        let mut req = Req::new("h", "/echo.v1.Echo/Unary");
        req.grpc = Some(("echo.v1.Echo", "Unary"));
        assert_eq!(req.on(&t), Some(0));
    }

    #[test]
    fn host_pattern_parse() {
        use HostPattern::*;
        let cases = [
            ("API.Example.com", Exact("api.example.com".into())),
            ("*.Example.com", SuffixWildcard("example.com".into())),
            (".example.com", DomainWildcard("example.com".into())),
            ("www.example.*", PrefixWildcard("www.example".into())),
            ("localhost", Exact("localhost".into())),
            ("10.0.0.1", Exact("10.0.0.1".into())),
            ("*.com", SuffixWildcard("com".into())),
            ("my_host-1.local", Exact("my_host-1.local".into())),
        ];
        for (s, want) in cases {
            assert_eq!(HostPattern::parse(s), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn host_pattern_parse_errors() {
        for s in [
            "",
            "*",
            ".",
            "*.",
            ".*",
            "a.*.b",
            "*.example.*",
            "*example.com",
            "www.example*",
            "example..com",
            "example.com.",
            "..example.com",
            "ex ample.com",
            "example.com:80",
            "~^api",
            "a/b",
            "*.*",
        ] {
            let err = HostPattern::parse(s).expect_err(s);
            assert!(err.contains(&format!("{s:?}")), "{err}");
        }
    }

    #[test]
    fn empty_table_and_len() {
        let t = table(Vec::new());
        assert!(t.is_empty());
        assert_eq!(t.len(), 0);
        assert_eq!(at(&t, "/"), None);
        let t = table(vec![any(), hosts(&["a.b"])]);
        assert!(!t.is_empty());
        assert_eq!(t.len(), 2);
    }
}
