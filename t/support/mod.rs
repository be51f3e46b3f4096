//! The luagate process fixture of the Rust-written whole-process tests
//! (`t/cli.rs`, `t/wire.rs`): a config in a fresh directory under the
//! target's tmp dir, a free port, the process started and stopped by PID.

#![allow(dead_code)] // each test target uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_luagate");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A fresh directory for one test (`<target tmp>/<prefix>-<name>-<pid>`).
pub fn dir(prefix: &str, name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A luagate process, stopped by PID when dropped.
pub struct Luagate {
    pub child: Child,
    stderr: PathBuf,
}

impl Luagate {
    /// Writes `config` to DIR/luagate.yaml, starts luagate on it and waits until `port` accepts.
    pub fn start(dir: &Path, config: &str, port: u16) -> Self {
        let cfg = dir.join("luagate.yaml");
        std::fs::write(&cfg, config).expect("config");
        let stderr = dir.join("stderr.log");
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("luagate starts");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "luagate did not listen: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, stderr }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(5);
        while !self.log().contains(needle) {
            assert!(Instant::now() < until, "no {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Luagate {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
