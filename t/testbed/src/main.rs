//! `testbed` binary: runs HTTP echo and gRPC Echo backends outside a test process,
//! for benchmarks and the demo, until SIGTERM/SIGINT.
//!
//! ```text
//! testbed [--name N] [--threads T] [--http [NAME=]ADDR]... [--grpc [NAME=]ADDR]...
//! ```
//! Prints one `listening KIND NAME ADDR` line per server on stderr, then `ready` on
//! stdout once every server listens.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

const USAGE: &str = "usage: testbed [--name N] [--threads T] [--http [NAME=]ADDR]... [--grpc [NAME=]ADDR]...";

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Grpc,
}

struct Args {
    name: String,
    threads: usize,
    servers: Vec<(Kind, Option<String>, SocketAddr)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { name: "testbed".to_owned(), threads: 1, servers: Vec::new() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (flag, None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = match inline.or_else(|| it.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value")),
        };
        match flag.as_str() {
            "--name" => args.name = value,
            "--threads" => {
                args.threads = value.parse().ok().filter(|&n| n > 0).ok_or_else(|| format!("bad --threads {value}"))?;
            }
            "--http" | "--grpc" => {
                let kind = if flag == "--http" { Kind::Http } else { Kind::Grpc };
                let (name, addr) = match value.split_once('=') {
                    Some((n, a)) => (Some(n.to_owned()), a),
                    None => (None, value.as_str()),
                };
                let addr: SocketAddr = addr.parse().map_err(|e| format!("bad address {addr:?}: {e}"))?;
                args.servers.push((kind, name, addr));
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.servers.is_empty() {
        return Err("nothing to serve: give --http and/or --grpc".to_owned());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("testbed: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testbed: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("testbed: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut backends = Vec::new();
    for (kind, name, addr) in &args.servers {
        let name = name.as_deref().unwrap_or(&args.name);
        let (label, res) = match kind {
            Kind::Http => ("http", testbed::spawn_http_at(name, *addr).await),
            Kind::Grpc => ("grpc", testbed::spawn_grpc_at(name, *addr).await),
        };
        match res {
            Ok(b) => {
                eprintln!("listening {label} {} {}", b.name(), b.addr());
                backends.push(b);
            }
            Err(e) => {
                eprintln!("testbed: {label} {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    for b in backends {
        b.shutdown().await;
    }
    ExitCode::SUCCESS
}
