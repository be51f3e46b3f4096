//! The `luagate` command: run, check, reload.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
