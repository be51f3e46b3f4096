//! `diff/uri_corpus`: the path normaliser against real nginx. A seeded
//! generator writes a few hundred request paths out of the pieces that
//! matter (`%XX` in both cases, bad escapes, `%00`, `.`, `..`, `//`, `+`, `;`,
//! escaped UTF-8, a query); each goes byte for byte over a raw TCP connection
//! to nginx and to luagate, whose catch-all location / route answers
//! `ngx.var.uri`. Status and, for a 200, `ngx.var.uri` must agree.
//!
//! Raw non-ASCII bytes are left out: hyper's request parser refuses them
//! (400) where nginx takes them, a difference of the HTTP/1.1 codec, not of
//! the normaliser (docs/security.md).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The catch-all script both servers run.
pub const SCRIPT: &str = "ngx.header['Content-Type'] = 'text/plain'\nngx.print(ngx.var.uri)\n";
/// The trial's name.
pub const NAME: &str = "uri_corpus";
/// Paths the generator writes, besides the fixed ones.
const GENERATED: usize = 400;
const SEED: u64 = 0x0ddba11_u64;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Pieces a generated path is made of, after its leading `/`.
const PIECES: &[&str] = &[
    "/", "/", "/", "//", ".", ".", "..", "..", "a", "b", "adm", "%2e", "%2E", "%2f", "%2F", "%25", "%3f", "%3F", "%23",
    "%00", "%zz", "%4", "%", "%g1", "+", ";", "%3b", "%41", "%61", "%7e", "%ff", "%c3%a9", "%20", "%0a", "%09", "~",
    "=", "@", ",", "!", "$", "&", "'", "(", ")", "*", ":", "%5c", "\\", "\"", "{", "}", "|", "^", "-", "_",
];

/// The fixed part of the corpus: the forms the issue names, and edges.
const FIXED: &[&str] = &[
    "/",
    "/admin",
    "/%61dmin",
    "/./admin",
    "//admin",
    "/public/../admin",
    "/%2e/admin",
    "/public/..%2fadmin",
    "/public/%2e%2e/admin",
    "/public/%252e%252e/admin",
    "/..",
    "/a/..",
    "/a/.",
    "/a/b/..",
    "/a/b/../",
    "/a/./../b",
    "/.%2e/x",
    "/a/..%2f..",
    "/a/..?x",
    "/a/.?x",
    "/a%3fb?c",
    "/a%23b",
    "/a%25",
    "/a%00b",
    "/a%zz",
    "/a%4",
    "/a%",
    "/a%4?x",
    "/...",
    "/a/.../b",
    "/.a/..b/c.",
    "/a;b/../c",
    "/a//b//",
    "///",
    "/a+b%2B",
    "/%C3%A9t%c3%A9",
    "/a%0d%0ab",
    "/?x=/../..",
];

/// The corpus: fixed paths, then generated ones (deterministic).
pub fn paths() -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut out: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
    for _ in 0..GENERATED {
        let mut p = String::from("/");
        for _ in 0..rng.usize(1..9) {
            p.push_str(PIECES[rng.usize(..PIECES.len())]);
        }
        match rng.u8(..10) {
            0 => p.push_str("?q=/../%2e%zz"),
            1 => p.push_str("#frag/.."),
            _ => {}
        }
        out.push(p);
    }
    out
}

/// One answer: status and body.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// `GET path` over a new connection, `Connection: close`, read to the end.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Answer, String> {
    let fut = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        // A server may reset after answering a bad request: what came before counts.
        let _ = tcp.read_to_end(&mut buf).await;
        parse(&buf)
    };
    tokio::time::timeout(TIMEOUT, fut).await.map_err(|_| format!("no answer within {TIMEOUT:?}"))?
}

fn parse(buf: &[u8]) -> Result<Answer, String> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
        format!("no complete response head: {:?}", String::from_utf8_lossy(&buf[..buf.len().min(200)]))
    })?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut body = buf[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    Ok(Answer { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").ok_or("chunk size line missing")?;
        let size = std::str::from_utf8(&b[..line]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let size = size.ok_or("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let data = b.get(line + 2..line + 2 + size).ok_or("chunk shorter than its size")?;
        out.extend_from_slice(data);
        b = b.get(line + 4 + size..).ok_or("chunk not ended")?;
    }
}

/// Runs the corpus against both servers; every disagreement is reported.
pub async fn run(nginx: SocketAddr, luagate: SocketAddr, host: &str) -> Result<(), String> {
    let paths = paths();
    let mut errors = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for p in &paths {
        let (ng, lg) = tokio::join!(get(nginx, host, p), get(luagate, host, p));
        let ng = ng.map_err(|e| format!("nginx, {p:?}: {e}"))?;
        let lg = lg.map_err(|e| format!("luagate, {p:?}: {e}"))?;
        match ng.status {
            200 => ok += 1,
            400 => refused += 1,
            _ => {}
        }
        let agree = ng.status == lg.status && (ng.status != 200 || ng.body == lg.body);
        if !agree {
            errors.push(format!(
                "{p:?}: nginx {} {:?} | luagate {} {:?}",
                ng.status,
                String::from_utf8_lossy(&ng.body[..ng.body.len().min(120)]),
                lg.status,
                String::from_utf8_lossy(&lg.body[..lg.body.len().min(120)]),
            ));
        }
    }
    // The corpus must exercise both outcomes, or it proves little.
    if ok < paths.len() / 4 || refused < paths.len() / 10 {
        errors.push(format!("corpus too one-sided: {ok} answered 200, {refused} answered 400 of {}", paths.len()));
    }
    if std::env::var_os("LUAGATE_T_DIFF_DUMP").is_some() {
        eprintln!("diff/{NAME}: {} paths, {ok} normalised, {refused} refused", paths.len());
    }
    if errors.is_empty() {
        return Ok(());
    }
    let shown: Vec<&String> = errors.iter().take(25).collect();
    Err(format!(
        "diff/{NAME}: nginx and luagate disagree on {} of {} paths:\n{}",
        errors.len(),
        paths.len(),
        shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    ))
}
