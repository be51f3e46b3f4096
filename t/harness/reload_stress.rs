//! `reload/fifty_reloads_under_load`: 50 SIGHUP reloads alternating two configs
//! (everything to backends a/ga, or everything to b/gb) while HTTP/1.1 requests and
//! gRPC unary calls run in loops and one Bidi stream sends a message every 10 ms.
//! Asserts no request or call failed, the stream got every reply in order without a
//! break, and after each swap a fresh request reaches the backend the new config names.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use testbed::pb::EchoRequest;

use crate::case::{BackendKind, HttpVersion};
use crate::client::{echo_client, Echo, HttpClient, REQUEST_TIMEOUT};
use crate::process::{ExitExpect, Luagate, Reload};
use crate::runner::{free_ports, port_clash, runtime, spawn_backend, TempDir};

const TRIAL: &str = "reload/fifty_reloads_under_load";
const RELOADS: u64 = 50;

pub fn run() -> Result<(), String> {
    let rt = runtime()?;
    let mut result = rt.block_on(stress());
    if result.as_ref().is_err_and(|e| port_clash(e)) {
        result = rt.block_on(stress());
    }
    result
}

fn config(listen: SocketAddr, web: SocketAddr, rpc: SocketAddr) -> String {
    format!(
        r#"listen: [ {{ addr: "{listen}" }} ]
upstreams:
  web: {{ peers: [ {{ addr: "{web}" }} ] }}
  rpc: {{ protocol: h2c, peers: [ {{ addr: "{rpc}" }} ] }}
routes:
  - {{ name: rpc, match: {{ grpc_service: echo.v1.Echo }}, upstream: rpc }}
  - {{ name: web, match: {{ path_prefix: "/web/" }}, upstream: web }}
"#
    )
}

/// Failures seen by the load tasks.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<String, String> {
    let req = http::Request::get(path).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let resp = client.send(addr, HttpVersion::H1, req).await?;
    if resp.status != 200 {
        return Err(format!("status {}", resp.status));
    }
    Ok(resp.headers.get("x-backend").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default())
}

async fn unary(addr: SocketAddr, shared: Option<&mut Echo>) -> Result<String, String> {
    let req = EchoRequest { message: "u".into(), ..Default::default() };
    let mut own;
    let client = match shared {
        Some(c) => c,
        None => {
            own = echo_client(addr)?;
            &mut own
        }
    };
    let r = tokio::time::timeout(REQUEST_TIMEOUT, client.unary(req))
        .await
        .map_err(|_| "unary call hung".to_string())?
        .map_err(|s| format!("unary: {:?} {}", s.code(), s.message()))?;
    Ok(r.into_inner().backend)
}

async fn stress() -> Result<(), String> {
    let mut dir = TempDir::new(TRIAL)?;
    let a = spawn_backend("a", BackendKind::Http).await?;
    let b = spawn_backend("b", BackendKind::Http).await?;
    let ga = spawn_backend("ga", BackendKind::Grpc).await?;
    let gb = spawn_backend("gb", BackendKind::Grpc).await?;
    let listen = free_ports(1)?[0];
    let to_a = config(listen, a.addr(), ga.addr());
    let to_b = config(listen, b.addr(), gb.addr());
    std::fs::write(dir.path().join("config.yaml"), &to_a).map_err(|e| e.to_string())?;
    let luagate = Luagate::start(dir.path())?;
    let result = drive(&luagate, listen, &to_a, &to_b).await;
    let ending = luagate.finish(&ExitExpect::default(), false).await.map_err(|e| format!("after the reloads: {e}"));
    let result = match (result, ending) {
        (Ok(()), end) => end,
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(end)) => Err(format!("{e}\n{end}")),
    };
    let tail = luagate.stderr_tail(40);
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            dir.keep();
            Err(format!("{TRIAL}:\n{e}\n{tail}\n--- case dir kept: {} ---", dir.path().display()))
        }
    }
}

async fn drive(luagate: &Luagate, listen: SocketAddr, to_a: &str, to_b: &str) -> Result<(), String> {
    luagate.wait_ready(&[listen]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let http_tally = Arc::new(Tally::default());
    let grpc_tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (halt, tally) = (stop.clone(), http_tally.clone());
        tasks.push(tokio::spawn(async move {
            let client = match HttpClient::new(None) {
                Ok(c) => c,
                Err(e) => return tally.fail(e),
            };
            while !halt.load(Ordering::SeqCst) {
                match get(&client, listen, "/web/load").await {
                    Ok(_) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.fail(format!("HTTP GET /web/load: {e}")),
                }
            }
        }));
        let (halt, tally) = (stop.clone(), grpc_tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = match echo_client(listen) {
                Ok(c) => c,
                Err(e) => return tally.fail(e),
            };
            while !halt.load(Ordering::SeqCst) {
                match unary(listen, Some(&mut client)).await {
                    Ok(_) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.fail(e),
                }
            }
        }));
    }
    let bidi = tokio::spawn(bidi_stream(listen, stop.clone()));

    let mut errors = Vec::new();
    for i in 0..RELOADS {
        let (config, web, rpc) = if i % 2 == 0 { (to_b, "b", "gb") } else { (to_a, "a", "ga") };
        match luagate.reload(Some(config)).await {
            Ok(Reload::Swapped(_)) => {}
            Ok(Reload::Refused(text)) => {
                errors.push(format!("reload {}: refused: {text}", i + 1));
                break;
            }
            Err(e) => {
                errors.push(format!("reload {}: {e}", i + 1));
                break;
            }
        }
        let fresh = HttpClient::new(None)?;
        match get(&fresh, listen, "/web/fresh").await {
            Ok(got) if got == web => {}
            Ok(got) => errors.push(format!(
                "after reload {} (generation {}): HTTP went to {got:?}, config names {web}",
                i + 1,
                luagate.generation()
            )),
            Err(e) => errors.push(format!("after reload {}: fresh HTTP request: {e}", i + 1)),
        }
        match unary(listen, None).await {
            Ok(got) if got == rpc => {}
            Ok(got) => errors.push(format!(
                "after reload {} (generation {}): gRPC went to {got:?}, config names {rpc}",
                i + 1,
                luagate.generation()
            )),
            Err(e) => errors.push(format!("after reload {}: fresh gRPC call: {e}", i + 1)),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = t.await;
    }
    match bidi.await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => errors.push("bidi stream: no message went through".into()),
        Ok(Err(e)) => errors.push(format!("bidi stream: {e}")),
        Err(e) => errors.push(format!("bidi task: {e}")),
    }
    for (what, tally) in [("HTTP", &http_tally), ("gRPC", &grpc_tally)] {
        let failures = tally.failures();
        if !failures.is_empty() {
            errors.push(format!("{what} load failures (first {}): {failures:#?}", failures.len()));
        }
        if tally.ok.load(Ordering::SeqCst) == 0 {
            errors.push(format!("{what} load: no request succeeded"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// One Bidi stream sending a numbered message every 10 ms until `stop`; checks each
/// reply echoes the next number. Returns the number of replies.
async fn bidi_stream(listen: SocketAddr, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(64);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let m = EchoRequest { message: i.to_string(), ..Default::default() };
                if tx.send(m).await.is_err() {
                    break;
                }
                i += 1;
                sent.store(i, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut client = echo_client(listen)?;
    let resp = client.bidi(outbound).await.map_err(|s| format!("opening: {:?} {}", s.code(), s.message()))?;
    let mut inbound = resp.into_inner();
    let mut got = 0u64;
    loop {
        let next = tokio::time::timeout(REQUEST_TIMEOUT, inbound.message())
            .await
            .map_err(|_| format!("no reply for {REQUEST_TIMEOUT:?} after {got} replies"))?;
        match next {
            Ok(Some(r)) => {
                if r.message != got.to_string() {
                    return Err(format!("reply {got} echoes {:?}", r.message));
                }
                got += 1;
            }
            Ok(None) => break,
            Err(s) => return Err(format!("broken after {got} replies: {:?} {}", s.code(), s.message())),
        }
    }
    let _ = sender.await;
    let sent = sent.load(Ordering::SeqCst);
    if got != sent {
        return Err(format!("sent {sent} messages, got {got} replies"));
    }
    Ok(got)
}
