//! Criterion micro-benchmarks of luagate's per-request hot paths: route
//! match, balancer pick, header rewrite and a Lua hook call. Run with
//! `cargo bench --bench hot_paths`; the system benchmarks against nginx are
//! `benches/run`.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use luagate::lua::{self, Grants, LuaRequest, Phase, Script};
use luagate::phase::headers;
use luagate::protocol::uri;
use luagate::route::{HostPattern, MatchInput, PathMatch, RouteMatch, RouteTable};
use luagate::upstream::balancer::{Balancer, Peer, PeerStats, PickInput, Policy};

fn route_table(n: usize) -> RouteTable {
    let mut routes = Vec::new();
    for i in 0..n {
        routes.push(RouteMatch {
            hosts: vec![HostPattern::parse(&format!("svc{}.example.com", i % 10)).expect("host")],
            path: PathMatch::Prefix { prefix: format!("/api/v{}/items{i}/", i % 3), stop_regex: false },
            ..Default::default()
        });
    }
    routes.push(RouteMatch {
        path: PathMatch::Regex(regex::bytes::Regex::new("^/static/.*\\.css$").expect("re")),
        ..Default::default()
    });
    routes.push(RouteMatch::default());
    RouteTable::new(routes)
}

fn bench_route_match(c: &mut Criterion) {
    let table = route_table(100);
    let headers = HeaderMap::new();
    let method = Method::GET;
    c.bench_function("route_match_100_routes_host_and_prefix", |b| {
        b.iter(|| {
            let input = MatchInput {
                listener: "main",
                host: "svc7.example.com",
                path: black_box(b"/api/v1/items97/detail"),
                method: &method,
                headers: &headers,
                grpc: None,
            };
            black_box(table.find(&input))
        })
    });
    c.bench_function("route_match_100_routes_default_regex", |b| {
        b.iter(|| {
            let input = MatchInput {
                listener: "main",
                host: "other.example.org",
                path: black_box(b"/static/site.css"),
                method: &method,
                headers: &headers,
                grpc: None,
            };
            black_box(table.find(&input))
        })
    });
}

/// The path normaliser runs on every request before route match: the
/// canonical case must stay a borrow-only scan.
fn bench_uri_normalize(c: &mut Criterion) {
    c.bench_function("uri_normalize_canonical_22b", |b| {
        b.iter(|| black_box(uri::normalize(black_box(b"/api/v1/items97/detail"), true)).is_ok())
    });
    c.bench_function("uri_normalize_dot_segments_and_escapes_30b", |b| {
        b.iter(|| black_box(uri::normalize(black_box(b"/api/./v1//items97/../%64etail"), true)).is_ok())
    });
}

fn peers(n: usize) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            weight: 1 + (i % 3) as u32,
            stats: Arc::new(PeerStats::new()),
        })
        .collect()
}

fn bench_balancer(c: &mut Criterion) {
    let ps = peers(8);
    let client: IpAddr = "203.0.113.9".parse().expect("ip");
    for (name, policy) in [
        ("balancer_pick_round_robin_8_peers", Policy::RoundRobin),
        ("balancer_pick_smooth_wrr_8_peers", Policy::WeightedRoundRobin),
        ("balancer_pick_ip_hash_8_peers", Policy::IpHash),
        ("balancer_pick_consistent_hash_8_peers", Policy::ConsistentHash),
        ("balancer_pick_least_conn_8_peers", Policy::LeastConn),
        ("balancer_pick_p2c_ewma_8_peers", Policy::P2cEwma),
    ] {
        let b_ = Balancer::new(policy, &ps);
        c.bench_function(name, |b| {
            b.iter(|| {
                let input = PickInput { client_ip: client, hash_key: Some(b"user-42"), tried: &[], down: &[] };
                black_box(b_.pick(&ps, &input))
            })
        });
    }
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "198.51.100.1"),
        ("x-request-id", "abc123"),
        ("authorization", "Bearer token"),
        ("content-type", "application/json"),
    ] {
        h.insert(http::HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn bench_header_rewrite(c: &mut Criterion) {
    let base = request_headers();
    let peer = HeaderValue::from_static("10.0.0.7");
    let real: IpAddr = "10.0.0.7".parse().expect("ip");
    c.bench_function("header_rewrite_8_headers_hop_by_hop_and_forwarded", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, false);
                headers::set_forwarded(&mut h, &peer, false, real, "http");
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn bench_lua_hook(c: &mut Criterion) {
    // As a worker runs: a current-thread LocalRuntime.
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build_local(Default::default()).expect("runtime");
    let settings = lua::Settings {
        package_path: String::new(),
        shared_dicts: Vec::new(),
        init_worker: None,
        time_budget: Duration::from_secs(1),
        memory_limit: 256 << 20,
        grants: Grants::default(),
        variables: Vec::new(),
        prefix: "./".into(),
    };
    let script = |name: &str, src: &str| {
        Arc::new(Script { name: Arc::from(name), source: Arc::from(src.as_bytes()), id: name.len() as u64 })
    };
    let empty = script("empty", "");
    let realistic = script(
        "realistic",
        "local h = ngx.req.get_headers() local a, b = h['x-api-key'], h['user-agent'] ngx.req.set_header('x-plan', a and 'pro' or 'free')",
    );
    rt.block_on(async {
        let runtime = lua::runtime::get(1, &settings).expect("lua state");
        for (name, s) in [("lua_hook_empty_access", &empty), ("lua_hook_two_headers_set_header", &realistic)] {
            c.bench_function(name, |b| {
                b.iter(|| {
                    let parts = http::Request::builder()
                        .uri("/api/x?y=1")
                        .header("x-api-key", "k")
                        .header("user-agent", "bench")
                        .body(())
                        .expect("request")
                        .into_parts()
                        .0;
                    let client = SocketAddr::from(([127, 0, 0, 1], 5000));
                    let req = Rc::new(RefCell::new(LuaRequest::new(
                        parts,
                        client,
                        client,
                        false,
                        Arc::from("r"),
                        false,
                        std::time::Instant::now(),
                    )));
                    futures_executor(runtime.run(Phase::Access, s, &req))
                })
            });
        }
    });
}

/// Lua pattern functions: LuaJIT's own (C, out of the budget's reach) against
/// luagate's (`lua::string`, stoppable), 1000 calls per iteration from a Lua
/// loop, on the kind of strings access scripts look at.
fn bench_lua_patterns(c: &mut Criterion) {
    let ops: [(&str, &str); 6] = [
        ("find_plain", "local n = 0 for i = 1, 1000 do if s:find('/api/', 1, true) then n = n + 1 end end return n"),
        (
            "find_prefix_pattern",
            "local n = 0 for i = 1, 1000 do if s:find('^/api/v%d+/') then n = n + 1 end end return n",
        ),
        (
            "match_bearer",
            "local n = 0 for i = 1, 1000 do if auth:match('^Bearer%s+(.+)$') then n = n + 1 end end return n",
        ),
        (
            "match_trim",
            "local n = 0 for i = 1, 1000 do if padded:match('^%s*(.-)%s*$') then n = n + 1 end end return n",
        ),
        ("gsub_string", "local n = 0 for i = 1, 1000 do local _, k = csv:gsub(',', ';') n = n + k end return n"),
        (
            "gmatch_pairs",
            "local n = 0 for i = 1, 1000 do for k, v in query:gmatch('([^&=]+)=([^&]*)') do n = n + 1 end end return n",
        ),
    ];
    let stop = || false;
    let auth = b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc";
    c.bench_function("lua_pattern_matcher_only_bearer", |b| {
        b.iter(|| {
            let mut m = lua::pattern::Matcher::new(black_box(auth), b"^Bearer%s+(.+)$", &stop);
            black_box(m.match_at(0, 1).expect("matches"))
        })
    });
    for (which, ours) in [("luajit", false), ("luagate", true)] {
        let lua = mlua::Lua::new();
        if ours {
            lua::string::register(&lua).expect("string functions");
        }
        let g = lua.globals();
        g.set("s", "/api/v1/users/42/orders?limit=10").expect("s");
        g.set("auth", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc").expect("auth");
        g.set("padded", "   hello world   ").expect("padded");
        g.set("csv", "a,b,c,d,e,f").expect("csv");
        g.set("query", "a=1&b=two&c=3&d=").expect("query");
        for (name, code) in ops {
            let f: mlua::Function = lua.load(code).into_function().expect("compiles");
            c.bench_function(&format!("lua_pattern_{name}_x1000_{which}"), |b| {
                b.iter(|| black_box(f.call::<i64>(()).expect("runs")))
            });
        }
    }
}

/// Polls a future that never waits (these scripts don't) to completion.
fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The preaccess phase with one local rate limit keyed by the client address
/// (the common `limit_req zone=... ` setup), the request admitted: key
/// formatting, one shard lock, one map lookup. 1000 client addresses.
fn bench_rate_limit(c: &mut Criterion) {
    use luagate::limit::{Bucket, ReqLimit, RouteLimits, Zone, ONE};
    use luagate::phase::limit::{decide, Decision, KeySource};
    use luagate::phase::variable::Variable;
    let zone = Arc::new(Zone::new("bench", 10 << 20));
    let limits = RouteLimits {
        req: vec![ReqLimit {
            zone,
            key: Variable::parse("$remote_addr").expect("var"),
            bucket: Bucket { rate: 1_000_000 * ONE, burst: 100 * ONE },
            delay: 100 * ONE,
            status: http::StatusCode::TOO_MANY_REQUESTS,
            dry_run: false,
            cluster: None,
        }],
        conn: vec![],
    };
    let parts = http::Request::builder().uri("/api").body(()).expect("req").into_parts().0;
    let clients: Vec<IpAddr> = (0..1000u32).map(|i| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes())).collect();
    let mut i = 0;
    c.bench_function("rate_limit_local_one_limit_admitted", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            let src = KeySource { parts: &parts, client: clients[i], vars: None, declared: &[] };
            black_box(matches!(decide(&limits, &src, "bench"), Decision::Pass(_)))
        })
    });
}

criterion_group!(
    hot_paths,
    bench_rate_limit,
    bench_uri_normalize,
    bench_route_match,
    bench_balancer,
    bench_header_rewrite,
    bench_lua_hook,
    bench_lua_patterns
);
criterion_main!(hot_paths);
