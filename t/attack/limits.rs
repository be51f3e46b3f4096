//! Each connection limit's behaviour on the wire, where the bytes matter
//! (raw HTTP/2 frames, many sockets, a process open-file limit): what the
//! data-driven cases in t/cases/limits cannot express.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{get_close, h2, runtime, shared, Gate};

fn config(limits: &str, app: SocketAddr) -> String {
    format!(
        "workers: 1\naccess_log: {{ path: off }}\nlimits: {{ {limits} }}\nlisten: [ {{ addr: \"${{listen}}\" }} ]\n\
         upstreams: {{ app: {{ peers: [ {{ addr: \"{app}\" }} ] }} }}\n\
         routes: [ {{ match: {{ path_prefix: / }}, upstream: app }} ]\n"
    )
}

/// Reads frames until one of type `ty` (answering SETTINGS and PING as a
/// client must); the frame, or None at the end of the connection.
async fn until_frame(s: &mut TcpStream, ty: u8, within: Duration) -> Option<h2::Frame> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let frame = tokio::time::timeout(left, h2::read_frame(s)).await.ok()?.ok()?;
        if frame.0 == ty {
            return Some(frame);
        }
        if frame.0 == h2::SETTINGS && frame.1 & h2::ACK == 0 {
            let _ = s.write_all(&h2::frame(h2::SETTINGS, h2::ACK, 0, &[])).await;
        }
    }
}

/// Whether the peer closes `s` within `within` (EOF or reset), reading past anything it sends.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// keepalive_timeout applies to HTTP/2 too: a connection with no stream
/// gets GOAWAY once it has been idle that long, and is closed soon after;
/// before its first stream, header_read_timeout is its deadline. Old code:
/// an idle HTTP/2 connection was never closed.
#[test]
fn idle_http2_connection_gets_goaway_then_is_closed() {
    let _shared = shared();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let gate =
            Gate::start("h2-idle", &config("keepalive_timeout: 1s, header_read_timeout: 2s", app.addr()), None).await;

        let mut s = TcpStream::connect(gate.addr).await.expect("connect");
        let mut out = h2::start(&[]);
        out.extend(h2::get(1, "/"));
        s.write_all(&out).await.expect("write");
        let answered = loop {
            let (ty, flags, stream, _) = until_frame(&mut s, h2::DATA, Duration::from_secs(5)).await.expect("answer");
            if stream == 1 && flags & h2::END_STREAM != 0 && ty == h2::DATA {
                break Instant::now();
            }
        };
        let goaway = until_frame(&mut s, h2::GOAWAY, Duration::from_secs(4)).await;
        let idle_for = answered.elapsed();
        assert!(goaway.is_some(), "no GOAWAY on an idle connection");
        assert!(
            (Duration::from_millis(900)..Duration::from_millis(3000)).contains(&idle_for),
            "GOAWAY after {idle_for:?} idle (keepalive_timeout 1s)"
        );
        // The client answers neither the PING that comes with it nor anything else.
        assert!(closed_within(&mut s, Duration::from_secs(3)).await, "not closed after GOAWAY");

        // No stream at all: header_read_timeout.
        let started = Instant::now();
        let mut s = TcpStream::connect(gate.addr).await.expect("connect");
        s.write_all(&h2::start(&[])).await.expect("write");
        assert!(until_frame(&mut s, h2::GOAWAY, Duration::from_secs(5)).await.is_some(), "no GOAWAY before a stream");
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(1900)..Duration::from_millis(4000)).contains(&waited),
            "GOAWAY after {waited:?} without a stream (header_read_timeout 2s)"
        );
    });
}

/// 128 concurrent streams by default (nginx's http2_max_concurrent_streams):
/// advertised in SETTINGS, and streams past it refused with RST_STREAM
/// REFUSED_STREAM. Old code: 1024 allowed.
#[test]
fn streams_past_the_limit_are_refused() {
    let _shared = shared();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let gate = Gate::start("h2-streams", &config("", app.addr()), None).await;
        let mut s = TcpStream::connect(gate.addr).await.expect("connect");
        let mut out = h2::start(&[]);
        for i in 0..140 {
            out.extend(h2::get(1 + 2 * i, "/delay/1000"));
        }
        s.write_all(&out).await.expect("write");
        let (mut advertised, mut refused, mut done) = (None, 0, 0);
        while refused + done < 140 {
            let Ok(Ok((ty, flags, _, payload))) =
                tokio::time::timeout(Duration::from_secs(5), h2::read_frame(&mut s)).await
            else {
                break;
            };
            match ty {
                h2::SETTINGS if flags & h2::ACK == 0 => {
                    for pair in payload.chunks(6) {
                        if u16::from_be_bytes([pair[0], pair[1]]) == h2::SETTINGS_MAX_CONCURRENT_STREAMS {
                            advertised = Some(h2::code(&pair[2..]));
                        }
                    }
                }
                h2::RST_STREAM if h2::code(&payload) == h2::REFUSED_STREAM => refused += 1,
                h2::DATA | h2::HEADERS if flags & h2::END_STREAM != 0 => done += 1,
                _ => {}
            }
        }
        assert_eq!(advertised, Some(128), "SETTINGS_MAX_CONCURRENT_STREAMS");
        assert_eq!((refused, done), (12, 128), "(refused, answered) streams");
    });
}

/// Past worker_connections a new connection sheds the worker's newest idle
/// one; with none idle, it is closed at once and that is logged.
#[test]
fn worker_connections_sheds_the_newest_idle_then_refuses() {
    let _shared = shared();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let gate = Gate::start("worker-conns", &config("worker_connections: 8", app.addr()), None).await;
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(TcpStream::connect(gate.addr).await.expect("connect"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let served = tokio::time::timeout(Duration::from_secs(5), get_close(gate.addr, "/")).await;
        assert_eq!(served, Ok(Ok(200)), "a ninth connection is served");
        let mut newest = idle.pop().expect("eight");
        assert!(
            closed_within(&mut newest, Duration::from_millis(500)).await,
            "the newest idle connection was not shed"
        );
        for s in &mut idle {
            assert!(!closed_within(s, Duration::from_millis(50)).await, "an older idle connection was shed");
        }
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Eight connections busy reading a request head: none to shed.
        let mut busy = Vec::new();
        for _ in 0..8 {
            let mut s = TcpStream::connect(gate.addr).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
            busy.push(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut refused = TcpStream::connect(gate.addr).await.expect("connect");
        let _ = refused.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let got = tokio::time::timeout(Duration::from_millis(500), refused.read_to_end(&mut buf)).await;
        assert!(
            matches!(got, Ok(Ok(0)) | Ok(Err(_))),
            "not closed at once: {got:?} {:?}",
            String::from_utf8_lossy(&buf)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let log = gate.stderr();
        assert!(log.contains("worker_connections reached"), "not logged:\n{log}");
    });
}

/// Near the open-file limit, accepting goes on: each new connection sheds
/// the newest idle one, so a flood of silent connections sheds itself while
/// the older connections and a new client are kept.
#[test]
fn near_the_fd_limit_the_newest_idle_are_shed() {
    let _shared = shared();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let gate = Gate::start("fd-limit", &config("", app.addr()), Some(128)).await;
        let mut conns = Vec::new();
        for _ in 0..120 {
            conns.push(TcpStream::connect(gate.addr).await.expect("connect"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let served = tokio::time::timeout(Duration::from_secs(5), get_close(gate.addr, "/")).await;
        assert_eq!(served, Ok(Ok(200)), "a new client is served at the limit");
        let mut open = Vec::new();
        for s in &mut conns {
            open.push(!closed_within(s, Duration::from_millis(20)).await);
        }
        let first_shed = open.iter().position(|o| !o).expect("some connections were shed");
        assert!(first_shed >= 50, "connection {first_shed} of 120 was shed, before newer ones");
        assert!(open[..first_shed].iter().all(|o| *o));
        assert!(gate.fds() <= 128);
    });
}

/// send_timeout: a client that takes nothing for that long is dropped (and
/// its upstream request with it). Old code: kept as long as it stayed.
#[test]
fn send_timeout_drops_a_client_that_reads_nothing() {
    let _shared = shared();
    runtime().block_on(async {
        let app = testbed::spawn_http("app").await.expect("backend");
        let gate = Gate::start("send-timeout", &config("send_timeout: 1s", app.addr()), None).await;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        sock.connect(&gate.addr.into()).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        let mut s = TcpStream::from_std(sock.into()).expect("tokio");
        s.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Ok(Ok(0)) => break "closed",
                Ok(Err(_)) => break "reset",
                Ok(Ok(n)) => total += n,
                Err(_) => break "still open",
            }
        };
        assert_ne!(end, "still open", "the connection was kept ({total} bytes read)");
        assert!(total < 64 << 20, "the whole body came: not cut");
    });
}
