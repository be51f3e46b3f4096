//! The luagate process fixture: starts `luagate run -c DIR/config.yaml` in the case
//! directory with stdout and stderr captured to files, waits until its listeners
//! accept, signals it (SIGHUP reloads with the `generation=N` / `reload refused`
//! handshake, SIGTERM), reads its log, and stops it (SIGTERM, SIGKILL after 5 s),
//! checking how it ended: a non-zero exit, a stop that needed SIGKILL or a panic
//! fails the case unless the case expects it.
//! Also runs `luagate check -c FILE`.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Path of the binary under test, built by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_luagate");
/// Poll interval of every wait on the process or its log.
const POLL: Duration = Duration::from_millis(20);
/// How long luagate may take to accept on every listener.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload may take to be logged.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The signal number for `TERM`, `HUP`, … (with or without the `SIG` prefix).
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "TERM" => libc::SIGTERM,
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        _ => return None,
    })
}

/// How long luagate may take to exit after SIGTERM (and after SIGKILL).
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// How [`Luagate::stop`] found the process ending.
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    /// It had exited before the stop began.
    AlreadyExited(ExitStatus),
    /// It exited within [`STOP_WAIT`] of SIGTERM.
    AfterTerm(ExitStatus),
    /// It had to be killed.
    Killed,
}

/// How a case expects luagate to end (the case's `exit:`); the default is a clean
/// exit 0 on the final SIGTERM (or on a stopping signal a step sent), no panic.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitExpect {
    /// The exit code (default 0).
    #[serde(default)]
    pub code: i32,
    /// It may exit before any stopping signal.
    #[serde(default)]
    pub on_its_own: bool,
    /// It may ignore SIGTERM (needing SIGKILL) or die by a signal.
    #[serde(default)]
    pub killed: bool,
    /// `panicked at` may appear in its stderr.
    #[serde(default)]
    pub panic: bool,
}

/// How a reload ended.
#[derive(Debug)]
pub enum Reload {
    /// `snapshot swapped … generation=N` was logged.
    Swapped(u64),
    /// `reload refused` was logged; the text is everything logged since the SIGHUP.
    Refused(String),
}

/// A running luagate.
pub struct Luagate {
    child: Mutex<Child>,
    exit: Mutex<Option<ExitStatus>>,
    pid: i32,
    pub config: PathBuf,
    stderr: PathBuf,
    generation: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Luagate {
    /// Starts `luagate run -c DIR/config.yaml` (the file must exist) with DIR as cwd.
    pub fn start(dir: &Path) -> Result<Self, String> {
        Self::start_wrapped(dir, None)
    }

    /// Like [`Luagate::start`], but through `sh WRAPPER BIN run -c …` when a wrapper
    /// script is given: the harness self-tests use one to play a broken luagate.
    pub fn start_wrapped(dir: &Path, wrapper: Option<&Path>) -> Result<Self, String> {
        let config = dir.join("config.yaml");
        let stderr = dir.join("stderr.log");
        let out = File::create(dir.join("stdout.log")).map_err(|e| e.to_string())?;
        let err = File::create(&stderr).map_err(|e| e.to_string())?;
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new("/bin/sh");
                c.arg(w).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("LUAGATE_LOG");
        // LUAGATE_T_RUST_LOG=debug passes a log filter through (luagate's LUAGATE_LOG),
        // for debugging a case.
        if let Ok(filter) = std::env::var("LUAGATE_T_RUST_LOG") {
            cmd.env("LUAGATE_LOG", filter);
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
            // luagate gets SIGKILL if the harness thread that started it dies
            // (a killed test run), so no server outlives its test.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {BIN}: {e}"))?;
        Ok(Self {
            pid: child.id() as i32,
            child: Mutex::new(child),
            exit: Mutex::new(None),
            config,
            stderr,
            generation: AtomicU64::new(1),
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Waits until every address accepts a TCP connection.
    /// On Linux the listening socket must also be luagate's own: a port allocated and
    /// released may have been taken by another process, which would answer instead.
    pub async fn wait_ready(&self, addrs: &[SocketAddr]) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        for addr in addrs {
            loop {
                if let Some(st) = self.exited() {
                    return Err(format!("luagate exited before accepting on {addr}: {st}\n{}", self.stderr_tail(40)));
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() && listens_on(self.pid, *addr) {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let owner = if listens_on(self.pid, *addr) { "" } else { " (or another process holds the port)" };
                    return Err(format!(
                        "luagate not accepting on {addr}{owner} after {READY_TIMEOUT:?}\n{}",
                        self.stderr_tail(40)
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// The exit status, if the process has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        let mut exit = lock(&self.exit);
        if exit.is_none() {
            *exit = lock(&self.child).try_wait().ok().flatten();
        }
        *exit
    }

    /// Sends a signal (by number) to the process.
    pub fn signal(&self, sig: i32) -> Result<(), String> {
        if let Some(st) = self.exited() {
            return Err(format!("luagate already exited ({st})"));
        }
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
        let rc = unsafe { libc::kill(self.pid, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("kill({}, {sig}): {}", self.pid, std::io::Error::last_os_error()))
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("luagate still running {timeout:?} after the signal"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then SIGKILL if still running after [`STOP_WAIT`]: how it ended.
    pub async fn stop(&self) -> Ending {
        if let Some(st) = self.exited() {
            return Ending::AlreadyExited(st);
        }
        let _ = self.signal(libc::SIGTERM);
        if let Ok(st) = self.wait_exit(STOP_WAIT).await {
            return Ending::AfterTerm(st);
        }
        let _ = lock(&self.child).kill();
        let _ = self.wait_exit(STOP_WAIT).await;
        Ending::Killed
    }

    /// Stops luagate and checks how it ended against `expect`: a non-zero exit, a
    /// death by signal, a stop that needed SIGKILL, an exit before any stopping
    /// signal (`signalled` false) or `panicked at` in stderr fail unless expected.
    pub async fn finish(&self, expect: &ExitExpect, signalled: bool) -> Result<(), String> {
        let ending = self.stop().await;
        let mut errors = Vec::new();
        match ending {
            Ending::AlreadyExited(st) if !signalled && !expect.on_its_own => {
                errors.push(format!("luagate exited on its own, with no stopping signal ({st})"))
            }
            Ending::Killed if !expect.killed => {
                errors.push(format!("luagate did not exit within {STOP_WAIT:?} of SIGTERM (stopped with SIGKILL)"))
            }
            _ => {}
        }
        if let Ending::AlreadyExited(st) | Ending::AfterTerm(st) = ending {
            match (st.code(), expect.code) {
                (Some(got), want) if got == want => {}
                (Some(got), want) => errors.push(format!("luagate exit code: expected {want}, got {got}")),
                (None, _) if expect.killed => {}
                (None, _) => errors.push(format!("luagate died: {st}")),
            }
        }
        if !expect.panic && self.stderr_text().contains("panicked at") {
            errors.push("luagate panicked (`panicked at` in its stderr)".into());
        }
        crate::expect::done(errors)
    }

    /// The config generation of the last swap seen (1 at start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Writes `config` (if given and not already the file's content) to the config
    /// file, sends SIGHUP and waits for a swap (`snapshot swapped … generation=N
    /// config=DIGEST`) or a refusal (`reload refused … (refused config=DIGEST)`) of
    /// exactly that content. luagate may also reload by itself when it sees the file
    /// change, so any swap logged after the write with a generation above all those
    /// logged before counts, but only if it read the new content: a reload begun
    /// before the write (the file watcher's, or a SIGHUP still queued from an earlier
    /// step) logs the old content's digest and is waited past.
    pub async fn reload(&self, config: Option<&str>) -> Result<Reload, String> {
        let _serial = self.reload_lock.lock().await;
        let before = self.stderr_bytes();
        let start = before.len();
        let baseline = max_generation(&strip_ansi(&String::from_utf8_lossy(&before)), None).max(self.generation());
        if let Some(text) = config {
            if std::fs::read_to_string(&self.config).ok().as_deref() != Some(text) {
                std::fs::write(&self.config, text).map_err(|e| e.to_string())?;
            }
        }
        let content = std::fs::read(&self.config).map_err(|e| e.to_string())?;
        let digest = config_digest(&content);
        self.signal(libc::SIGHUP)?;
        let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
        loop {
            let new = self.stderr_since(start);
            let swapped = max_generation(&new, Some(&digest));
            if swapped > baseline {
                self.generation.store(swapped, Ordering::SeqCst);
                return Ok(Reload::Swapped(swapped));
            }
            if new.contains(&format!("(refused config={digest})")) {
                // The error lines come before the refusal's last line: all there.
                return Ok(Reload::Refused(self.stderr_since(start)));
            }
            if let Some(st) = self.exited() {
                return Err(format!("luagate exited during reload ({st})"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "neither `snapshot swapped … generation=N config={digest}` (N > {baseline}) nor a refusal of config={digest} logged within {RELOAD_TIMEOUT:?} of SIGHUP; logged since: {:?}",
                    crate::expect::preview(new.as_bytes(), 2000)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn stderr_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.stderr).unwrap_or_default()
    }

    /// stderr from byte `start` on, lossily decoded, ANSI colours removed.
    fn stderr_since(&self, start: usize) -> String {
        let b = self.stderr_bytes();
        strip_ansi(&String::from_utf8_lossy(b.get(start..).unwrap_or_default()))
    }

    /// All of stderr so far, ANSI colours removed.
    pub fn stderr_text(&self) -> String {
        self.stderr_since(0)
    }

    /// The last `n` lines of stderr, framed for a failure message.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail("luagate stderr", &self.stderr_text(), n)
    }
}

impl Drop for Luagate {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = lock(&self.child).kill();
            let _ = lock(&self.child).wait();
        }
    }
}

/// The last `n` lines of `text` under a header line.
pub fn tail(what: &str, text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!("--- {what} (last {} of {} lines) ---\n{}", lines.len() - from, lines.len(), lines[from..].join("\n"))
}

/// Whether process `pid` or one of its descendants holds a socket listening on
/// `addr`'s port (Linux: their `/proc/PID/fd` links against `/proc/net/tcp*`);
/// true where /proc is not there.
fn listens_on(pid: i32, addr: SocketAddr) -> bool {
    if std::fs::read_dir(format!("/proc/{pid}/fd")).is_err() {
        return true;
    }
    let mut own = std::collections::HashSet::new();
    let mut pids = vec![pid];
    while let Some(p) = pids.pop() {
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) {
            own.extend(
                fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned)),
            );
        }
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        pids.extend(children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    let port = format!(":{:04X}", addr.port());
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).unwrap_or_default().lines().skip(1).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st … inode: state 0A is LISTEN.
            f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A" && own.contains(f[9])
        })
    })
}

/// The highest N of the `snapshot swapped … generation=N config=D` lines of `log`
/// (0 if none); with `digest`, only of the lines with that config digest.
fn max_generation(log: &str, digest: Option<&str>) -> u64 {
    let re = regex::Regex::new(r#"generation="?(\d+)"?( config=([0-9a-f]+))?"#).unwrap_or_else(|_| unreachable!());
    log.lines()
        .filter(|l| l.contains("snapshot swapped"))
        .flat_map(|l| {
            re.captures_iter(l)
                .filter(|c| digest.is_none() || c.get(3).map(|m| m.as_str()) == digest)
                .filter_map(|c| c[1].parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// What luagate logs as a config's digest: the first 16 hex digits of its SHA-256.
fn config_digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes ANSI escape sequences (colours) from log text.
pub fn strip_ansi(s: &str) -> String {
    if !s.contains('\x1b') {
        return s.to_string();
    }
    let re = regex::Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").unwrap_or_else(|_| unreachable!());
    re.replace_all(s, "").into_owned()
}

/// Runs `luagate check -c FILE`; returns the exit code and stderr.
pub async fn check(file: &Path) -> Result<(i32, String), String> {
    let cwd = file.parent().unwrap_or(Path::new("."));
    let child = tokio::process::Command::new(BIN)
        .arg("check")
        .arg("-c")
        .arg(file)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {BIN} check: {e}"))?;
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| "luagate check did not finish within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(code) => Ok((code, stderr)),
        None => Err(format!("luagate check died: {}\n{stderr}", out.status)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
