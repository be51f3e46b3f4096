//! A real `redis-server` as a case backend (`backends: { r: redis }`): started on an
//! ephemeral loopback port with persistence off and its files in the case directory,
//! ready once it answers PING, stopped by PID (SIGTERM, SIGKILL after 5 s).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs it.
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running redis-server, stopped on [`RedisServer::stop`] or drop.
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
}

impl RedisServer {
    /// Starts `redis-server` for backend `name`, its working files under `dir/redis-NAME`.
    /// A port taken between allocation and bind is retried with a fresh one.
    pub fn start(name: &str, dir: &Path) -> Result<Self, String> {
        let work = dir.join(format!("redis-{name}"));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let mut last = String::new();
        for _ in 0..3 {
            let addr = crate::runner::free_ports(1)?[0];
            match Self::try_start(addr, &work) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(format!("starting redis backend {name}: {last}"))
    }

    fn try_start(addr: SocketAddr, work: &Path) -> Result<Self, String> {
        let log = std::fs::File::create(work.join("redis.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(work)
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {REDIS_SERVER}: {e}"))?;
        let mut server = Self { child, addr };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(st)) = server.child.try_wait() {
                let log = std::fs::read_to_string(work.join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server exited ({st}): {}", log.trim_end()));
            }
            if ping(addr) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                server.stop();
                return Err(format!("redis-server not answering PING on {addr} after {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGTERM to its PID, SIGKILL after 5 s; reaps it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a redis server on `addr` answers `PING` with `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}
