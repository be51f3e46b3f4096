//! The `luagate` command: run, check, reload.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc: an idle keep-alive connection's
/// memory goes back to the system after a burst of connections (glibc keeps
/// the freed buffers of a burst resident, interleaved with the connections'
/// small long-lived allocations), and it costs fewer instructions per
/// request. See benches/NOTES.md, section 4.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: a background thread returns unused dirty pages to the
/// system over about a second (the default, 10 s and only when some thread
/// allocates, left a burst's memory resident).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(name = "luagate", version = luagate::VERSION, about = "A reverse proxy for RPC traffic with Lua phase hooks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given configuration.
    Run {
        #[arg(short, long, default_value = "conf/luagate.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration, like `nginx -t`: exit 0 when valid, else 1
    /// with FILE:LINE:COLUMN: message for each error.
    Check {
        #[arg(short, long, default_value = "conf/luagate.yaml")]
        config: PathBuf,
    },
    /// Tell a running luagate to reload (SIGHUP to the pid in its pid file).
    Reload {
        #[arg(short, long, default_value = "conf/luagate.yaml")]
        config: PathBuf,
        /// The pid file; default: `pid_file` of the configuration.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match luagate::server::run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("luagate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => match luagate::config::load(&config) {
            Ok(_) => {
                println!("luagate: configuration {} is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("luagate: configuration {} is invalid ({} error(s))", config.display(), errors.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Reload { config, pid_file } => match signal_reload(&config, pid_file) {
            Ok(pid) => {
                println!("luagate: sent SIGHUP to {pid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("luagate: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn signal_reload(config: &std::path::Path, pid_file: Option<PathBuf>) -> Result<i32, String> {
    let pid_file = match pid_file {
        Some(p) => p,
        None => luagate::config::load(config)
            .map_err(|e| format!("{e}"))?
            .pid_file
            .ok_or_else(|| format!("{} sets no pid_file; pass --pid-file", config.display()))?,
    };
    let text = std::fs::read_to_string(&pid_file).map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    let pid: i32 = text.trim().parse().map_err(|_| format!("{} holds no pid", pid_file.display()))?;
    // SAFETY: kill(2) with a pid read from our own pid file; no memory is shared.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(format!("cannot signal {pid}: {}", std::io::Error::last_os_error()));
    }
    Ok(pid)
}
