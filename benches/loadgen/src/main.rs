//! `loadgen`: the load generators of luagate's benchmark suite that no Debian
//! package provides. Single-threaded (benches/run pins it to one core); every
//! subcommand prints one JSON object on stdout.
//!
//! ```text
//! loadgen openloop   --addr HOST:PORT [--path /] [--rate N] [--duration S] [--conns C] [--header 'k: v']...
//! loadgen bidi       --addr HOST:PORT [--duration S] [--streams K] [--msg-size BYTES]
//! loadgen grpc-unary --addr HOST:PORT
//! ```
//!
//! `openloop` is a fixed-rate (open-loop) HTTP/1.1 keep-alive client, the role
//! wrk2 plays elsewhere: request i is due at `start + i / rate` whether or not
//! earlier ones have been answered, a free connection takes it, and its latency
//! is measured from the time it was *due*, so queueing behind a slow response
//! counts (no coordinated omission). A separate thread paces the due times
//! with nanosleep (tens of µs late at worst on an idle core).
//!
//! `bidi` opens one h2c connection with K `echo.v1.Echo/Bidi` streams, each
//! sending `msg-size`-byte payloads as fast as HTTP/2 flow control lets it,
//! and counts the echoed bytes that come back during the run.
//!
//! `grpc-unary` makes one `echo.v1.Echo/Unary` call and exits 0 if it returned
//! grpc-status 0 (a preflight check of a proxy's gRPC route).

use std::future::poll_fn;
use std::io;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const USAGE: &str = "usage: loadgen openloop|bidi|grpc-unary --addr HOST:PORT [options] (see the source header)";

struct Opts {
    addr: String,
    path: String,
    rate: f64,
    duration: f64,
    conns: usize,
    headers: Vec<String>,
    streams: usize,
    msg_size: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        addr: String::new(),
        path: "/".into(),
        rate: 1000.0,
        duration: 10.0,
        conns: 50,
        headers: Vec::new(),
        streams: 4,
        msg_size: 65536,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--addr" => o.addr = v.clone(),
            "--path" => o.path = v.clone(),
            "--rate" => o.rate = num(v)?,
            "--duration" => o.duration = num(v)?,
            "--conns" => o.conns = num(v)? as usize,
            "--header" => o.headers.push(v.clone()),
            "--streams" => o.streams = num(v)? as usize,
            "--msg-size" => o.msg_size = num(v)? as usize,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.addr.is_empty() {
        return Err("--addr is required".into());
    }
    if o.rate <= 0.0 || o.duration <= 0.0 || o.conns == 0 || o.streams == 0 {
        return Err("--rate, --duration, --conns and --streams must be positive".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let res = rt.block_on(async move {
        match cmd.as_str() {
            "openloop" => openloop(opts).await,
            "bidi" => bidi(opts).await,
            "grpc-unary" => grpc_unary(opts).await,
            _ => Err(format!("unknown command {cmd}\n{USAGE}")),
        }
    });
    match res {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- open loop

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    non2xx: AtomicU64,
    socket_errors: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    last_done: Mutex<Option<Instant>>,
}

async fn openloop(o: Opts) -> Result<String, String> {
    let host = o.addr.clone();
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n", o.path);
    for h in &o.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let req = Bytes::from(req);

    let mut conns = Vec::with_capacity(o.conns);
    for _ in 0..o.conns {
        conns.push(H1Conn::connect(&o.addr).await.map_err(|e| format!("connect {}: {e}", o.addr))?);
    }
    let total = (o.rate * o.duration).round() as u64;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for conn in conns {
        let mut conn = Some(conn);
        let (rx, tally, req, addr) = (rx.clone(), tally.clone(), req.clone(), o.addr.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { break };
                let res = match conn.as_mut() {
                    Some(c) => c.request(&req).await,
                    None => Err(io::Error::other("not connected")),
                };
                let now = Instant::now();
                match res {
                    Ok(status) => {
                        if (200..300).contains(&status) {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.non2xx.fetch_add(1, Ordering::Relaxed);
                        }
                        tally.latencies_us.lock().unwrap().push(now.saturating_duration_since(due).as_micros() as u64);
                        *tally.last_done.lock().unwrap() = Some(now);
                        if let Some(c) = &conn {
                            if c.closed {
                                conn = H1Conn::connect(&addr).await.ok();
                            }
                        }
                    }
                    Err(_) => {
                        tally.socket_errors.fetch_add(1, Ordering::Relaxed);
                        conn = H1Conn::connect(&addr).await.ok();
                        if conn.is_none() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }));
    }

    // A plain thread paces the requests (nanosleep wakes within tens of µs, where
    // tokio's timer wheel has 1 ms steps) and hands each due time to the workers.
    let interval = 1.0 / o.rate;
    let start = Instant::now() + Duration::from_millis(5);
    let due_at = move |i: u64| start + Duration::from_secs_f64(i as f64 * interval);
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = due_at(i);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = tx.send(due);
        }
    });
    let end = due_at(total);
    // Requests still unanswered 5 s after the last was due count as errors.
    let drain = tokio::time::sleep_until((end + Duration::from_secs(5)).into());
    tokio::pin!(drain);
    let all = futures_util::future::join_all(workers);
    tokio::select! {
        _ = all => {}
        _ = &mut drain => {}
    }
    let _ = pacer.join();
    let ok = tally.ok.load(Ordering::Relaxed);
    let non2xx = tally.non2xx.load(Ordering::Relaxed);
    let sock = tally.socket_errors.load(Ordering::Relaxed);
    let unanswered = total.saturating_sub(ok + non2xx + sock);
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let last = tally.last_done.lock().unwrap().unwrap_or(end);
    let secs = last.saturating_duration_since(start).as_secs_f64().max(1e-9);
    Ok(format!(
        concat!(
            "{{\"target_rate\":{:.1},\"scheduled\":{},\"requests\":{},\"rps\":{:.1},\"non2xx\":{},",
            "\"socket_errors\":{},\"unanswered\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}"
        ),
        o.rate,
        total,
        ok + non2xx,
        (ok + non2xx) as f64 / secs,
        non2xx,
        sock,
        unanswered,
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        pct(&lat, 99.9),
        lat.last().copied().unwrap_or(0)
    ))
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A minimal HTTP/1.1 keep-alive client connection: content-length and
/// chunked responses, bodies discarded.
struct H1Conn {
    stream: TcpStream,
    buf: BytesMut,
    closed: bool,
}

impl H1Conn {
    async fn connect(addr: &str) -> io::Result<H1Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(H1Conn { stream, buf: BytesMut::with_capacity(16 * 1024), closed: false })
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn line(&mut self) -> io::Result<Bytes> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = self.buf.split_to(i).freeze();
                self.buf.advance(2);
                return Ok(l);
            }
            self.fill().await?;
        }
    }

    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let k = n.min(self.buf.len());
            self.buf.advance(k);
            n -= k;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// Sends `req`, reads the whole response; returns its status.
    async fn request(&mut self, req: &[u8]) -> io::Result<u16> {
        self.stream.write_all(req).await?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad response");
        let status_line = self.line().await?;
        let status: u16 = std::str::from_utf8(&status_line)
            .ok()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let (mut len, mut chunked) = (None, false);
        loop {
            let l = self.line().await?;
            if l.is_empty() {
                break;
            }
            let l = String::from_utf8_lossy(&l).to_ascii_lowercase();
            if let Some((k, v)) = l.split_once(':') {
                match k.trim() {
                    "content-length" => len = v.trim().parse::<usize>().ok(),
                    "transfer-encoding" => chunked = v.contains("chunked"),
                    "connection" => self.closed |= v.contains("close"),
                    _ => {}
                }
            }
        }
        if chunked {
            loop {
                let l = self.line().await?;
                let hex = String::from_utf8_lossy(&l);
                let size = usize::from_str_radix(hex.split(';').next().unwrap_or("").trim(), 16).map_err(|_| bad())?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.skip(size + 2).await?;
            }
        } else if let Some(n) = len {
            self.skip(n).await?;
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            return Err(bad()); // body delimited by close: not a keep-alive response
        }
        Ok(status)
    }
}

// ---------------------------------------------------------------- gRPC

/// A gRPC-framed `echo.v1.EchoRequest { message, payload }`.
fn grpc_frame(message: &str, payload_len: usize) -> Bytes {
    let mut msg = Vec::with_capacity(payload_len + message.len() + 16);
    let mut field = |tag: u8, data: &[u8]| {
        msg.push(tag);
        let mut n = data.len() as u64;
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(data);
    };
    if !message.is_empty() {
        field(0x0a, message.as_bytes());
    }
    if payload_len > 0 {
        field(0x12, &vec![b'x'; payload_len]);
    }
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

async fn h2_connect(addr: &str) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.map_err(|e| e.to_string())
}

fn grpc_request(addr: &str, method: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/echo.v1.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("valid request")
}

fn grpc_status(h: Option<&http::HeaderMap>) -> Option<String> {
    h?.get("grpc-status").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

async fn grpc_unary(o: Opts) -> Result<String, String> {
    let call = async {
        let mut client = h2_connect(&o.addr).await?;
        let (resp, mut send) = client.send_request(grpc_request(&o.addr, "Unary"), false).map_err(|e| e.to_string())?;
        send.send_data(grpc_frame("bench", 64), true).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| format!("response: {e}"))?;
        let status = resp.status();
        if let Some(s) = grpc_status(Some(resp.headers())) {
            return Ok::<_, String>((status, 0usize, Some(s)));
        }
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(c) = body.data().await {
            let c = c.map_err(|e| format!("body: {e}"))?;
            n += c.len();
            let _ = body.flow_control().release_capacity(c.len());
        }
        let trailers = body.trailers().await.map_err(|e| format!("trailers: {e}"))?;
        Ok((status, n, grpc_status(trailers.as_ref())))
    };
    let (status, n, gs) = tokio::time::timeout(Duration::from_secs(5), call).await.map_err(|_| "timed out")??;
    let gs = gs.unwrap_or_else(|| "missing".into());
    if status != 200 || gs != "0" || n == 0 {
        return Err(format!("unary call failed: http {status}, grpc-status {gs}, {n} body bytes"));
    }
    Ok(format!("{{\"http_status\":{},\"grpc_status\":0,\"body_bytes\":{n}}}", status.as_u16()))
}

async fn bidi(o: Opts) -> Result<String, String> {
    let client = h2_connect(&o.addr).await?;
    let msg = grpc_frame("", o.msg_size);
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.duration);
    let mut tasks = Vec::new();
    for _ in 0..o.streams {
        let mut client = client.clone().ready().await.map_err(|e| e.to_string())?;
        let (resp, mut send) = client.send_request(grpc_request(&o.addr, "Bidi"), false).map_err(|e| e.to_string())?;
        let msg = msg.clone();
        let sender = tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                send.reserve_capacity(msg.len());
                let mut off = 0;
                while off < msg.len() {
                    let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) => c,
                        Some(Err(e)) => return Err(format!("send stream: {e}")),
                        None => return Err("send stream closed by the peer".to_string()),
                    };
                    if cap == 0 {
                        continue;
                    }
                    let n = cap.min(msg.len() - off);
                    send.send_data(msg.slice(off..off + n), false).map_err(|e| e.to_string())?;
                    off += n;
                }
                sent += 1;
            }
            send.send_data(Bytes::new(), true).map_err(|e| e.to_string())?;
            Ok(sent)
        });
        let received = received.clone();
        let receiver = tokio::spawn(async move {
            let resp = resp.await.map_err(|e| format!("response: {e}"))?;
            if let Some(s) = grpc_status(Some(resp.headers())) {
                return Err(format!("trailers-only response, grpc-status {s}"));
            }
            let mut body = resp.into_body();
            while let Some(c) = body.data().await {
                let c = c.map_err(|e| format!("body: {e}"))?;
                if Instant::now() <= deadline {
                    received.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                let _ = body.flow_control().release_capacity(c.len());
            }
            let t = body.trailers().await.map_err(|e| format!("trailers: {e}"))?;
            match grpc_status(t.as_ref()).as_deref() {
                Some("0") => Ok(()),
                s => Err(format!("grpc-status {s:?}")),
            }
        });
        tasks.push((sender, receiver));
    }
    let mut errors = 0u64;
    let mut messages = 0u64;
    let mut errs = Vec::new();
    for (s, r) in tasks {
        let grace = deadline + Duration::from_secs(10);
        match tokio::time::timeout_at(grace.into(), s).await {
            Ok(Ok(Ok(n))) => messages += n,
            other => {
                errors += 1;
                errs.push(format!("sender: {other:?}"));
            }
        }
        match tokio::time::timeout_at(grace.into(), r).await {
            Ok(Ok(Ok(()))) => {}
            other => {
                errors += 1;
                errs.push(format!("receiver: {other:?}"));
            }
        }
    }
    let bytes = received.load(Ordering::Relaxed);
    let secs = o.duration;
    Ok(format!(
        concat!(
            "{{\"streams\":{},\"msg_size\":{},\"messages_sent\":{},\"bytes_received\":{},",
            "\"mb_per_s\":{:.2},\"errors\":{},\"error_detail\":{:?}}}"
        ),
        o.streams,
        o.msg_size,
        messages,
        bytes,
        bytes as f64 / secs / 1e6,
        errors,
        errs.join("; ")
    ))
}
