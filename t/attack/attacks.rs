//! The attacks of issue 10, replayed with bounded sizes and durations. Each
//! states its bounds as constants beside it; the figures are printed
//! (`--nocapture`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{alone, h2, innocent, report, runtime, Gate, Innocence, Sampler};

/// The innocent client asks every INNOCENT_EVERY; each answer must come in
/// full within INNOCENT_WITHIN. (Typically it takes under 150 ms with a debug
/// build; the bound leaves room for a shared machine's load.)
const INNOCENT_EVERY: Duration = Duration::from_millis(100);
const INNOCENT_WITHIN: Duration = Duration::from_secs(3);
/// How long after a timeout's deadline luagate may take to release what it held.
const RELEASE_WITHIN: Duration = Duration::from_secs(8);
const MIB: u64 = 1024;

/// A config with one worker (limits are per worker), `limits`, and the
/// routes: paths under `prefix` to the upstream `slow` (if given, with
/// `extra` settings), everything else to `app`.
fn config(limits: &str, app: SocketAddr, slow: Option<(SocketAddr, &str, &str)>) -> String {
    let mut upstreams = format!("  app: {{ peers: [ {{ addr: \"{app}\" }} ] }}\n");
    let mut routes = String::new();
    if let Some((addr, extra, prefix)) = slow {
        upstreams.push_str(&format!("  slow: {{ peers: [ {{ addr: \"{addr}\" }} ]{extra} }}\n"));
        routes.push_str(&format!("  - {{ match: {{ path_prefix: {prefix} }}, upstream: slow }}\n"));
    }
    routes.push_str("  - { match: { path_prefix: / }, upstream: app }\n");
    format!(
        "workers: 1\naccess_log: {{ path: off }}\nerror_log: {{ level: warn }}\nlimits: {{ {limits} }}\n\
         listen: [ {{ addr: \"${{listen}}\" }} ]\nupstreams:\n{upstreams}routes:\n{routes}"
    )
}

/// One request first, so that the baseline includes a served request.
async fn warm(gate: &Gate) -> (u64, usize) {
    let status = crate::support::get_close(gate.addr, "/").await;
    assert_eq!(status, Ok(200), "{}", gate.stderr());
    tokio::time::sleep(Duration::from_millis(200)).await;
    (gate.rss_kib(), gate.fds())
}

/// Every request of the innocent client was served in time, and it could
/// ask often enough: a quarter as often as it meant to at least (it waits
/// for each answer before the next), and ten times.
fn assert_innocent(name: &str, inn: &Innocence) {
    assert!(inn.failures.is_empty(), "{name}: the innocent client failed: {:?}", inn.failures);
    let min = (inn.slots / 4).max(10);
    assert!(
        inn.served >= min,
        "{name}: the innocent client was served {} times in {:?} (at least {min} expected)",
        inn.served,
        inn.ran
    );
}

fn assert_rss(name: &str, base: (u64, usize), peak: (u64, usize), max_growth_mib: u64) {
    let growth = peak.0.saturating_sub(base.0);
    assert!(growth <= max_growth_mib * MIB, "{name}: RSS grew by {} MiB (bound {max_growth_mib} MiB)", growth / MIB);
}

fn small_rcvbuf(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_recv_buffer_size(4096)?;
    s.connect(&addr.into())?;
    s.set_nonblocking(true)?;
    TcpStream::from_std(s.into())
}

/// Waits up to `within` for luagate's descriptors to fall to `at_most`; the count seen last.
async fn fds_fall(gate: &Gate, at_most: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = gate.fds();
        if n <= at_most || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- silent connections past the fd limit -----------------------------------

/// luagate's open-file limit in this attack, and the silent connections kept open against it.
const SILENT_NOFILE: u64 = 256;
const SILENT_CONNS: usize = 600;
/// How soon an attacker's connection that luagate closed is opened again.
const SILENT_RECONNECT: Duration = Duration::from_millis(500);

/// Old code: on the default listener (http1 + h2c) a connection that sends
/// nothing had no deadline: 256 of them took every descriptor, accept failed
/// (EMFILE) and the innocent client was never answered.
#[test]
fn silent_connections_past_the_fd_limit() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("header_read_timeout: 3s", app.addr(), None);
        let mut gate = Gate::start("silent", &cfg, Some(SILENT_NOFILE)).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let closed = Arc::new(AtomicUsize::new(0));
        let until = Instant::now() + Duration::from_secs(4);
        let mut tasks = Vec::new();
        for _ in 0..SILENT_CONNS {
            let (addr, closed) = (gate.addr, Arc::clone(&closed));
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
                    else {
                        continue;
                    };
                    let mut b = [0u8; 16];
                    let left = until.saturating_duration_since(Instant::now());
                    if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, s.read(&mut b)).await {
                        closed.fetch_add(1, Ordering::Relaxed);
                        // It keeps its count up, not a connection rate (that is a SYN flood).
                        tokio::time::sleep(SILENT_RECONNECT).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (silent connections closed by luagate: {})",
            report("silent_connections", base, peak, &inn),
            closed.load(Ordering::Relaxed)
        );
        assert_innocent("silent", &inn);
        assert_rss("silent", base, peak, 32);
        // The reserve kept: luagate itself never ran out of descriptors.
        assert!(peak.1 < SILENT_NOFILE as usize, "{} descriptors: the limit was reached", peak.1);
        // Connections past the limit were shed (those under it stay until header_read_timeout).
        assert!(closed.load(Ordering::Relaxed) >= SILENT_CONNS - SILENT_NOFILE as usize, "luagate shed too few");
    });
}

// --- HTTP/2 client that opens its windows and never reads ---------------------

const NO_READ_CONNS: usize = 2;
const NO_READ_STREAMS: u32 = 300;
const NO_READ_BODY: &str = "/bytes/524288";

/// Old code: 1024 streams per connection, each buffered up to ~0.8 MB for a
/// client that never reads, and kept forever: 2 × 300 streams took hundreds
/// of MiB and 600 upstream connections stayed open.
#[test]
fn http2_client_that_never_reads() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("send_timeout: 3s", app.addr(), None);
        let mut gate = Gate::start("no-read", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let started = Instant::now();
        let mut held = Vec::new();
        for _ in 0..NO_READ_CONNS {
            let mut s = small_rcvbuf(gate.addr).expect("connect");
            let mut out = h2::start(&[(h2::SETTINGS_INITIAL_WINDOW_SIZE, (1 << 31) - 1)]);
            out.extend(h2::window_update(0, (1 << 31) - 1 - 65535));
            for i in 0..NO_READ_STREAMS {
                out.extend(h2::get(1 + 2 * i, NO_READ_BODY));
            }
            s.write_all(&out).await.expect("write");
            held.push(s);
        }
        // Before send_timeout: what the streams buffer.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let during = gate.fds();
        // After it, the connections (and their upstream requests) are gone.
        let after = fds_fall(&gate, base.1 + 2, RELEASE_WITHIN).await;
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (fds while held {during}, {:?} later {after})",
            report("http2_no_read", base, peak, &inn),
            started.elapsed()
        );
        drop(held);
        assert_innocent("no-read", &inn);
        assert_rss("no-read", base, peak, 64);
        // 128 streams a connection, one upstream connection each.
        assert!(peak.1 <= base.1 + NO_READ_CONNS * 130, "{} descriptors at the peak", peak.1);
        assert!(after <= base.1 + 2, "{after} descriptors still open after send_timeout (baseline {})", base.1);
    });
}

// --- HTTP/2 client that gives no window ----------------------------------------

const ZERO_WINDOW_CONNS: usize = 2;
const ZERO_WINDOW_STREAMS: u32 = 100;

/// Old code: a stream the client gives no window never polled its body, so
/// neither the upstream read timeout nor anything else ended it: each held
/// its upstream connection as long as the client liked.
#[test]
fn http2_client_with_zero_window() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("send_timeout: 2s", app.addr(), None);
        let mut gate = Gate::start("zero-window", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let resets = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        let started = Instant::now();
        for _ in 0..ZERO_WINDOW_CONNS {
            let mut s = TcpStream::connect(gate.addr).await.expect("connect");
            let mut out = h2::start(&[(h2::SETTINGS_INITIAL_WINDOW_SIZE, 0)]);
            for i in 0..ZERO_WINDOW_STREAMS {
                out.extend(h2::get(1 + 2 * i, "/bytes/262144"));
            }
            s.write_all(&out).await.expect("write");
            let resets = Arc::clone(&resets);
            // It reads (and acknowledges nothing, opens no window).
            readers.push(tokio::spawn(async move {
                while let Ok(Ok((ty, _, _, _))) =
                    tokio::time::timeout(Duration::from_secs(20), h2::read_frame(&mut s)).await
                {
                    if ty == h2::RST_STREAM {
                        resets.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = gate.fds();
        let after = fds_fall(&gate, base.1 + ZERO_WINDOW_CONNS, RELEASE_WITHIN).await;
        let all_reset = started.elapsed();
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        for r in readers {
            r.abort();
        }
        let resets = resets.load(Ordering::Relaxed);
        println!(
            "{} (fds while stalled {during}, after send_timeout {after}; {resets} streams reset by {all_reset:?})",
            report("http2_zero_window", base, peak, &inn)
        );
        assert_innocent("zero-window", &inn);
        assert_rss("zero-window", base, peak, 48);
        assert!(
            after <= base.1 + ZERO_WINDOW_CONNS,
            "{after} descriptors still open after send_timeout: the stalled streams' upstream connections were kept (baseline {})",
            base.1
        );
        assert_eq!(resets, ZERO_WINDOW_CONNS * ZERO_WINDOW_STREAMS as usize, "streams reset after send_timeout");
    });
}

// --- stream amplification ------------------------------------------------------

const AMP_NOFILE: u64 = 512;
const AMP_CONNS: usize = 4;
const AMP_STREAMS: u32 = 1000;
const AMP_MAX_CONNS: usize = 32;

/// Old code: 1024 streams per connection, each proxied on its own upstream
/// connection with no cap: 4 × 1000 streams to a slow endpoint ran luagate
/// out of descriptors and the innocent client was refused.
#[test]
fn stream_amplification() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let slow = testbed::spawn_http("slow").await.expect("backend");
        let extra = format!(", max_conns: {AMP_MAX_CONNS}, queue_timeout: 1s");
        let cfg = config("", app.addr(), Some((slow.addr(), &extra, "/delay/")));
        let mut gate = Gate::start("amplification", &cfg, Some(AMP_NOFILE)).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let refused = Arc::new(AtomicUsize::new(0));
        let mut conns = Vec::new();
        for _ in 0..AMP_CONNS {
            let mut s = TcpStream::connect(gate.addr).await.expect("connect");
            let mut out = h2::start(&[]);
            for i in 0..AMP_STREAMS {
                out.extend(h2::get(1 + 2 * i, "/delay/3000"));
            }
            let refused = Arc::clone(&refused);
            conns.push(tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let write = w.write_all(&out);
                let read = async {
                    while let Ok(Ok((ty, _, _, payload))) =
                        tokio::time::timeout(Duration::from_secs(5), h2::read_frame(&mut r)).await
                    {
                        if ty == h2::RST_STREAM && h2::code(&payload) == h2::REFUSED_STREAM {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                };
                let _ = tokio::join!(write, read);
            }));
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        for c in conns {
            c.abort();
        }
        let refused = refused.load(Ordering::Relaxed);
        let slow_conns = slow.stats().connections.load(Ordering::Relaxed);
        println!(
            "{} (streams refused {refused}, connections to the slow backend {slow_conns})",
            report("stream_amplification", base, peak, &inn)
        );
        assert_innocent("amplification", &inn);
        assert_rss("amplification", base, peak, 64);
        assert!(peak.1 <= base.1 + AMP_CONNS + AMP_MAX_CONNS + 16, "{} descriptors at the peak", peak.1);
        assert!(slow_conns as usize <= AMP_MAX_CONNS, "{slow_conns} connections to the slow peer");
        assert!(refused >= AMP_CONNS * (AMP_STREAMS as usize - 128), "only {refused} streams refused");
    });
}

// --- slowloris ------------------------------------------------------------------

const LORIS_HTTP1: usize = 200;
const LORIS_PREFACE: usize = 100;
const LORIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Old code: the HTTP/1.1 head trickle was cut at header_read_timeout, but
/// one trickling the HTTP/2 preface ("P", "R", "I", …) on the default
/// listener had no deadline until its bytes told the protocol apart.
#[test]
fn slowloris() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("header_read_timeout: 2s", app.addr(), None);
        let mut gate = Gate::start("slowloris", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let mut tasks = Vec::new();
        for i in 0..LORIS_HTTP1 + LORIS_PREFACE {
            let addr = gate.addr;
            tasks.push(tokio::spawn(async move {
                let bytes: Vec<u8> = if i < LORIS_HTTP1 {
                    let mut b = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
                    b.extend(std::iter::repeat_n(b'a', 64));
                    b
                } else {
                    h2::PREFACE.to_vec()
                };
                let s = TcpStream::connect(addr).await.ok()?;
                let start = Instant::now();
                let (mut r, mut w) = s.into_split();
                let trickle = async move {
                    for b in bytes {
                        if w.write_all(&[b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    std::future::pending::<()>().await;
                };
                let closed = async move {
                    let mut buf = [0u8; 512];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                };
                match tokio::time::timeout(Duration::from_secs(6), async {
                    tokio::select! { () = trickle => {}, () = closed => {} }
                })
                .await
                {
                    Ok(()) => Some(start.elapsed()),
                    Err(_) => None,
                }
            }));
        }
        let mut slowest = Duration::ZERO;
        let mut kept = 0;
        for t in tasks {
            match t.await.ok().flatten() {
                Some(d) => slowest = slowest.max(d),
                None => kept += 1,
            }
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (trickling connections never closed: {kept}; slowest close {slowest:?})",
            report("slowloris", base, peak, &inn)
        );
        assert_innocent("slowloris", &inn);
        assert_rss("slowloris", base, peak, 32);
        assert_eq!(kept, 0, "trickling connections luagate never closed");
        assert!(slowest <= LORIS_TIMEOUT + Duration::from_millis(1500), "closed after {slowest:?}");
    });
}

// --- slow upload ----------------------------------------------------------------

const UPLOAD_NOFILE: u64 = 256;
const UPLOAD_H2_CONNS: usize = 2;
const UPLOAD_H2_STREAMS: u32 = 200;
const UPLOAD_H1_CONNS: usize = 100;
const UPLOAD_MAX_CONNS: usize = 32;

/// Request bodies trickled a byte every 500 ms, over HTTP/1.1 and HTTP/2
/// (many streams a connection). Old code: every upload held its own upstream
/// connection while its body crawled (h2 itself ended the HTTP/2 part with
/// GOAWAY ENHANCE_YOUR_CALM: too many small DATA frames on 200 open streams).
#[test]
fn slow_upload() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let slow = testbed::spawn_http("slow").await.expect("backend");
        let extra = format!(", max_conns: {UPLOAD_MAX_CONNS}, queue_timeout: 1s");
        let cfg = config("", app.addr(), Some((slow.addr(), &extra, "/echo")));
        let mut gate = Gate::start("slow-upload", &cfg, Some(UPLOAD_NOFILE)).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let until = Instant::now() + Duration::from_secs(4);
        let mut tasks = Vec::new();
        for _ in 0..UPLOAD_H2_CONNS {
            let addr = gate.addr;
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(addr).await else { return };
                let mut out = h2::start(&[]);
                let mut block = h2::request_block("POST", "/echo");
                h2::int(&mut block, 0, 4, 28); // content-length (static index 28)
                h2::string(&mut block, b"1000");
                for i in 0..UPLOAD_H2_STREAMS {
                    out.extend(h2::frame(h2::HEADERS, h2::END_HEADERS, 1 + 2 * i, &block));
                }
                if s.write_all(&out).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let drain = async {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                let trickle = async {
                    while Instant::now() < until {
                        let mut tick = Vec::new();
                        for i in 0..UPLOAD_H2_STREAMS {
                            tick.extend(h2::frame(h2::DATA, 0, 1 + 2 * i, b"x"));
                        }
                        if w.write_all(&tick).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                };
                let _ = tokio::time::timeout_at(until.into(), async { tokio::join!(drain, trickle) }).await;
            }));
        }
        for _ in 0..UPLOAD_H1_CONNS {
            let addr = gate.addr;
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(addr).await else { return };
                let head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                while Instant::now() < until {
                    if s.write_all(b"x").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        let slow_conns = slow.stats().connections.load(Ordering::Relaxed);
        println!("{} (connections to the upload backend {slow_conns})", report("slow_upload", base, peak, &inn));
        assert_innocent("slow-upload", &inn);
        assert_rss("slow-upload", base, peak, 48);
        let clients = UPLOAD_H2_CONNS + UPLOAD_H1_CONNS;
        assert!(peak.1 <= base.1 + clients + UPLOAD_MAX_CONNS + 16, "{} descriptors at the peak", peak.1);
        assert!(slow_conns as usize <= UPLOAD_MAX_CONNS, "{slow_conns} connections to the upload peer");
    });
}

// --- HTTP/1.1 slow reader -------------------------------------------------------

const READER_CONNS: usize = 100;

/// Clients that ask for a large body and read nothing. Old code: no
/// send_timeout: each held its client and upstream connections for good.
#[test]
fn http1_slow_reader() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("send_timeout: 2s", app.addr(), None);
        let mut gate = Gate::start("slow-reader", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let mut held = Vec::new();
        for _ in 0..READER_CONNS {
            let mut s = small_rcvbuf(gate.addr).expect("connect");
            s.write_all(b"GET /bytes/16777216 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let during = gate.fds();
        let after = fds_fall(&gate, base.1 + 2, RELEASE_WITHIN).await;
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (fds while held {during}, after send_timeout {after})",
            report("http1_slow_reader", base, peak, &inn)
        );
        drop(held);
        assert_innocent("slow-reader", &inn);
        assert_rss("slow-reader", base, peak, 48);
        assert!(during >= base.1 + READER_CONNS, "the readers were not all being served ({during} descriptors)");
        assert!(after <= base.1 + 2, "{after} descriptors open after send_timeout (baseline {})", base.1);
    });
}

// --- rapid reset ------------------------------------------------------------------

const RESET_CONNS: usize = 4;

/// HEADERS then RST_STREAM at once, in batches, for 3 s (CVE-2023-44487).
/// h2's own accounting answers GOAWAY ENHANCE_YOUR_CALM; luagate must stay
/// within bounds meanwhile (the old code did too: see the report).
#[test]
fn rapid_reset() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("", app.addr(), None);
        let mut gate = Gate::start("rapid-reset", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let until = Instant::now() + Duration::from_secs(3);
        let sent = Arc::new(AtomicUsize::new(0));
        let goaways = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..RESET_CONNS {
            let (addr, sent, goaways) = (gate.addr, Arc::clone(&sent), Arc::clone(&goaways));
            tasks.push(tokio::spawn(async move {
                // A connection ended by GOAWAY is replaced by a new one.
                while Instant::now() < until {
                    let Ok(mut s) = TcpStream::connect(addr).await else { return };
                    let (mut r, mut w) = s.split();
                    let attack = async {
                        if w.write_all(&h2::start(&[])).await.is_err() {
                            return;
                        }
                        let mut id = 1u32;
                        while Instant::now() < until {
                            let mut batch = Vec::new();
                            for _ in 0..100 {
                                batch.extend(h2::get(id, "/delay/1000"));
                                batch.extend(h2::rst(id, h2::CANCEL));
                                id += 2;
                            }
                            if w.write_all(&batch).await.is_err() {
                                return;
                            }
                            sent.fetch_add(100, Ordering::Relaxed);
                            tokio::task::yield_now().await;
                        }
                    };
                    let watch = async {
                        while let Ok((ty, ..)) = h2::read_frame(&mut r).await {
                            if ty == h2::GOAWAY {
                                goaways.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    };
                    tokio::select! { () = attack => {}, () = watch => {} }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (streams opened and reset {}, GOAWAYs {})",
            report("rapid_reset", base, peak, &inn),
            sent.load(Ordering::Relaxed),
            goaways.load(Ordering::Relaxed)
        );
        assert_innocent("rapid-reset", &inn);
        assert_rss("rapid-reset", base, peak, 64);
        assert!(peak.1 <= base.1 + 600, "{} descriptors at the peak", peak.1);
    });
}

// --- CONTINUATION flood -----------------------------------------------------------

const CONTINUATION_CONNS: usize = 8;
const FLOOD_FOR: Duration = Duration::from_millis(2500);

/// HEADERS without END_HEADERS, then CONTINUATION frames without end, on 8
/// connections at a time (each replaced when luagate ends it) for 2.5 s.
/// h2 bounds the header block (max_header_size) and ends the connection
/// with GOAWAY at once.
#[test]
fn continuation_flood() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("", app.addr(), None);
        let mut gate = Gate::start("continuation", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let until = Instant::now() + FLOOD_FOR;
        let mut tasks = Vec::new();
        for _ in 0..CONTINUATION_CONNS {
            let addr = gate.addr;
            tasks.push(tokio::spawn(async move {
                // (connections ended by GOAWAY, longest flood before it, floods not ended)
                let (mut ended, mut longest, mut not_ended) = (0usize, Duration::ZERO, 0usize);
                while Instant::now() < until {
                    let Ok(mut s) = TcpStream::connect(addr).await else { break };
                    let start = Instant::now();
                    let mut out = h2::start(&[]);
                    out.extend(h2::frame(h2::HEADERS, 0, 1, &h2::request_block("GET", "/")));
                    let mut field = Vec::new();
                    h2::int(&mut field, 0, 4, 0);
                    h2::string(&mut field, b"x-flood");
                    h2::string(&mut field, &[b'a'; 4000]);
                    let cont = h2::frame(h2::CONTINUATION, 0, 1, &field.repeat(4));
                    let (mut r, mut w) = s.split();
                    let flood = async {
                        w.write_all(&out).await?;
                        while start.elapsed() < Duration::from_secs(2) {
                            w.write_all(&cont).await?;
                        }
                        Ok::<(), std::io::Error>(())
                    };
                    let closed = async {
                        while let Ok((ty, ..)) = h2::read_frame(&mut r).await {
                            if ty == h2::GOAWAY {
                                return;
                            }
                        }
                    };
                    // Ended: GOAWAY read, or the socket closed under the writes.
                    let was_ended = tokio::select! {
                        sent = flood => sent.is_err(),
                        () = closed => true,
                    };
                    if was_ended {
                        ended += 1;
                        longest = longest.max(start.elapsed());
                    } else {
                        not_ended += 1;
                    }
                }
                (ended, longest, not_ended)
            }));
        }
        let (mut ended, mut longest, mut not_ended) = (0, Duration::ZERO, 0);
        for t in tasks {
            let (e, l, n) = t.await.expect("flood task");
            ended += e;
            longest = longest.max(l);
            not_ended += n;
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!(
            "{} (flooding connections ended by GOAWAY {ended}, not ended {not_ended}, longest {longest:?})",
            report("continuation_flood", base, peak, &inn)
        );
        assert_innocent("continuation", &inn);
        assert_rss("continuation", base, peak, 32);
        assert_eq!(not_ended, 0, "CONTINUATION floods luagate did not end");
        assert!(ended >= CONTINUATION_CONNS, "only {ended} floods");
        assert!(longest < Duration::from_secs(1), "a flood went on for {longest:?}");
    });
}

// --- HPACK bomb ---------------------------------------------------------------------

const BOMB_CONNS: usize = 4;

/// A 4000-byte header put in the dynamic table, then referenced 4000 times
/// in the same header block (16 MB decoded from 8 KB sent), on 4 connections
/// at a time (each replaced when luagate ends it) for 2.5 s. h2 stops at
/// max_header_size: GOAWAY (ENHANCE_YOUR_CALM) or a refused stream.
#[test]
fn hpack_bomb() {
    let _alone = alone();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let cfg = config("", app.addr(), None);
        let mut gate = Gate::start("hpack-bomb", &cfg, None).await;
        let base = warm(&gate).await;
        let sampler = Sampler::start(&gate);
        let inn = innocent(gate.addr, "/", INNOCENT_EVERY, INNOCENT_WITHIN);
        let until = Instant::now() + FLOOD_FOR;
        let mut block = h2::request_block("GET", "/");
        // Literal with incremental indexing, new name: enters the table as index 62.
        block.push(0x40);
        h2::string(&mut block, b"x-bomb");
        h2::string(&mut block, &[b'b'; 4000]);
        block.extend(std::iter::repeat_n(0x80 | 62, 4000));
        let mut bomb = h2::start(&[]);
        // In frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE).
        let chunks: Vec<&[u8]> = block.chunks(16000).collect();
        for (j, c) in chunks.iter().enumerate() {
            let end = if j + 1 == chunks.len() { h2::END_HEADERS } else { 0 };
            let (ty, flags) = if j == 0 { (h2::HEADERS, h2::END_STREAM) } else { (h2::CONTINUATION, 0) };
            bomb.extend(h2::frame(ty, flags | end, 1, c));
        }
        let bomb = Arc::new(bomb);
        let mut tasks = Vec::new();
        for _ in 0..BOMB_CONNS {
            let (addr, bomb) = (gate.addr, Arc::clone(&bomb));
            tasks.push(tokio::spawn(async move {
                // (bombs refused, bombs answered otherwise)
                let (mut refused, mut other) = (0usize, 0usize);
                while Instant::now() < until {
                    let Ok(mut s) = TcpStream::connect(addr).await else { break };
                    let _ = s.write_all(&bomb).await;
                    let outcome = loop {
                        match tokio::time::timeout(Duration::from_secs(2), h2::read_frame(&mut s)).await {
                            Ok(Ok((h2::GOAWAY | h2::RST_STREAM, ..))) => break true,
                            Ok(Ok((h2::HEADERS, _, 1, _))) => break false,
                            Ok(Ok(_)) => {}
                            Ok(Err(_)) => break true,
                            Err(_) => break false,
                        }
                    };
                    if outcome {
                        refused += 1;
                    } else {
                        other += 1;
                    }
                }
                (refused, other)
            }));
        }
        let (mut refused, mut other) = (0, 0);
        for t in tasks {
            let (r, o) = t.await.expect("bomb task");
            refused += r;
            other += o;
        }
        let inn = inn.stop();
        let peak = sampler.stop();
        assert!(gate.alive(), "luagate died:\n{}", gate.stderr());
        println!("{} (bombs refused {refused}, answered otherwise {other})", report("hpack_bomb", base, peak, &inn));
        assert_innocent("hpack-bomb", &inn);
        assert_rss("hpack-bomb", base, peak, 32);
        assert_eq!(other, 0, "bombs not refused");
        assert!(refused >= BOMB_CONNS, "only {refused} bombs");
    });
}
