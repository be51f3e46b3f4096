//! The attack suite's fixtures: a luagate process with its own config and
//! open-file limit, measured from /proc (RSS, open descriptors); testbed
//! backends; an innocent client timing its requests; raw HTTP/2 frames.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test; `LUAGATE_ATTACK_BIN` runs the suite against another
/// build (an older commit, to see which attacks it falls to), and with
/// `LUAGATE_ATTACK_STRIP_NEW=1` the settings it does not know yet are left
/// out of the configs (so that it starts, with its defaults).
pub fn bin() -> String {
    std::env::var("LUAGATE_ATTACK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_luagate").to_string())
}

fn strip_new_settings(config: &str) -> String {
    if std::env::var_os("LUAGATE_ATTACK_STRIP_NEW").is_none() {
        return config.to_string();
    }
    let keys = r"\b(send_timeout|keepalive_timeout|worker_connections|max_conns|queue_timeout|http2_[a-z_]+): [^,}]+";
    let first = regex::Regex::new(&format!("{keys}, ?")).expect("regex");
    let rest = regex::Regex::new(&format!(",? ?{keys}")).expect("regex");
    rest.replace_all(&first.replace_all(config, ""), "").into_owned()
}

/// Attacks measure memory and latency: they run one at a time, and not
/// beside the limit tests (which share the lock for reading).
static EXCLUSIVE: RwLock<()> = RwLock::new(());

pub fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner())
}

pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

/// A running luagate, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Gate {
    child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Gate {
    /// Starts luagate on `config`, where `${listen}` is replaced with a free
    /// address; with `nofile`, under that open-file limit (soft and hard).
    pub async fn start(name: &str, config: &str, nofile: Option<u64>) -> Gate {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("attack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let addr = free_addr();
        let config = strip_new_settings(&config.replace("${listen}", &addr.to_string()));
        std::fs::write(dir.join("config.yaml"), config).expect("config");
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("-c")
            .arg(dir.join("config.yaml"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log")).expect("stdout"))
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("stderr"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl and setrlimit are async-signal-safe; nothing is allocated.
            unsafe {
                cmd.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if let Some(n) = nofile {
                        let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("luagate starts");
        let gate = Gate { pid: child.id() as i32, child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "luagate not listening on {addr}:\n{}", gate.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gate
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Open descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map(|d| d.count()).unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Peak RSS and descriptors of a luagate, sampled every 50 ms until stopped.
pub struct Sampler {
    peak: Arc<Mutex<(u64, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub fn start(gate: &Gate) -> Sampler {
        let pid = gate.pid;
        let peak = Arc::new(Mutex::new((0u64, 0usize)));
        let p = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            let probe = Gate::probe(pid);
            loop {
                let (rss, fds) = probe();
                {
                    let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                    p.0 = p.0.max(rss);
                    p.1 = p.1.max(fds);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler { peak, task }
    }

    /// (peak RSS KiB, peak descriptors)
    pub fn stop(self) -> (u64, usize) {
        self.task.abort();
        *self.peak.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Gate {
    fn probe(pid: i32) -> impl Fn() -> (u64, usize) {
        move || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
            (rss, fds)
        }
    }
}

/// What an innocent client saw.
#[derive(Debug, Default, Clone)]
pub struct Innocence {
    pub served: usize,
    pub failures: Vec<String>,
    pub slowest: Duration,
    /// How long it ran, and how many requests it could have made meanwhile.
    pub ran: Duration,
    pub slots: usize,
}

/// Every `every`, a fresh HTTP/1.1 connection asks `path` (`Connection:
/// close`) and must get a 200 in full within `within`, until `run` ends.
pub fn innocent(addr: SocketAddr, path: &'static str, every: Duration, within: Duration) -> InnocentRun {
    let seen = Arc::new(Mutex::new(Innocence::default()));
    let s = Arc::clone(&seen);
    let started = Instant::now();
    let task = tokio::spawn(async move {
        loop {
            let started = Instant::now();
            let res = tokio::time::timeout(within, get_close(addr, path)).await;
            let took = started.elapsed();
            {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                match res {
                    Ok(Ok(200)) => {
                        s.served += 1;
                        s.slowest = s.slowest.max(took);
                    }
                    Ok(Ok(status)) => s.failures.push(format!("status {status} after {took:?}")),
                    Ok(Err(e)) => s.failures.push(format!("{e} after {took:?}")),
                    Err(_) => s.failures.push(format!("no answer within {within:?}")),
                }
            }
            tokio::time::sleep(every.saturating_sub(took)).await;
        }
    });
    InnocentRun { seen, task, started, every }
}

pub struct InnocentRun {
    seen: Arc<Mutex<Innocence>>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
    every: Duration,
}

impl InnocentRun {
    pub fn stop(self) -> Innocence {
        self.task.abort();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        seen.ran = self.started.elapsed();
        seen.slots = (seen.ran.as_millis() / self.every.as_millis().max(1)) as usize;
        seen
    }
}

/// One `GET path` on a new connection; the status, once the whole answer came.
pub async fn get_close(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: innocent\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no answer: {text:?}"))?;
    Ok(status)
}

/// The report line of an attack: what was measured against the bounds.
pub fn report(name: &str, base: (u64, usize), peak: (u64, usize), inn: &Innocence) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{name}: RSS {} -> peak {} MiB, fds {} -> peak {}, innocent {} served (slowest {:?}), {} failed",
        base.0 / 1024,
        peak.0 / 1024,
        base.1,
        peak.1,
        inn.served,
        inn.slowest,
        inn.failures.len()
    );
    if let Some(f) = inn.failures.first() {
        let _ = write!(s, " (first: {f})");
    }
    s
}

/// Raw HTTP/2 frames, for clients that do what no well-behaved library would.
pub mod h2 {
    use tokio::io::{AsyncRead, AsyncReadExt};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;
    pub const ACK: u8 = 1;
    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
    pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;
    pub const REFUSED_STREAM: u32 = 7;
    pub const CANCEL: u32 = 8;

    pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
        let mut p = Vec::new();
        for (id, v) in pairs {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        frame(SETTINGS, 0, 0, &p)
    }

    pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
    }

    pub fn rst(stream: u32, code: u32) -> Vec<u8> {
        frame(RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    /// The preface and SETTINGS every connection starts with.
    pub fn start(settings_pairs: &[(u16, u32)]) -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend(settings(settings_pairs));
        b
    }

    /// An HPACK integer with an `n`-bit prefix, the first byte's high bits `high`.
    pub fn int(out: &mut Vec<u8>, high: u8, n: u32, mut v: usize) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(high | v as u8);
            return;
        }
        out.push(high | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A literal string (no Huffman).
    pub fn string(out: &mut Vec<u8>, s: &[u8]) {
        int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }

    /// A request header block: `:method` (GET or POST), `:scheme http`,
    /// `:path`, `:authority` (literals without indexing: no dynamic table).
    pub fn request_block(method: &str, path: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.push(0x80 | if method == "POST" { 3 } else { 2 });
        b.push(0x80 | 6);
        int(&mut b, 0, 4, 4);
        string(&mut b, path.as_bytes());
        int(&mut b, 0, 4, 1);
        string(&mut b, b"attack");
        b
    }

    pub fn get(stream: u32, path: &str) -> Vec<u8> {
        frame(HEADERS, END_HEADERS | END_STREAM, stream, &request_block("GET", path))
    }

    /// One frame as read: (type, flags, stream, payload).
    pub type Frame = (u8, u8, u32, Vec<u8>);

    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }

    /// The 32-bit value at the start of a payload (RST_STREAM's error code).
    pub fn code(payload: &[u8]) -> u32 {
        payload.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
