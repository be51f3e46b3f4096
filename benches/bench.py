#!/usr/bin/env python3
"""luagate's benchmark suite: luagate against nginx, nginx + lua-nginx-module and
HAProxy on this machine, as ratios against nginx from the same run.

Run it through `benches/run` (which installs the tools, builds the binaries and
raises the open-file limit); this file only measures. Knobs are environment
variables, listed in `KNOBS` below and in benches/README.md.

For every round, every workload and every target (in an order rotated each
round, so slow drift of the machine hits all targets alike) it starts the proxy
fresh, pinned to PROXY_CPU, checks that it answers the workload's route
correctly, warms it up, measures, and stops it by its PID. The backend (the
workspace's `testbed`) and the load generators are pinned to LOAD_CPU. Each
figure is the median over the rounds; error counts are summed.

Writes benches/results/latest.json (every run plus the medians), then
benches/report.py turns it into latest.md and latest.png. Scratch files
(rendered configs, raw tool output, logs) go to benches/results/tmp/.
"""

import http.client
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benches"
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"
RAW = TMP / "raw"
BIN = ROOT / "target" / "release"
LOADGEN = ROOT / "target" / "loadgen" / "release" / "loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env(name, default, conv=str):
    v = os.environ.get(name, "")
    return conv(v) if v != "" else default


KNOBS = {
    "DURATION": env("DURATION", 15.0, float),  # seconds measured per run
    "ROUNDS": env("ROUNDS", 3, int),  # repetitions; the median is reported
    "WARMUP": env("WARMUP", 1.0, float),  # seconds of the same load before each measured run (0: none)
    "PROXY_CPU": env("PROXY_CPU", "0"),  # taskset -c list for the proxy
    "LOAD_CPU": env("LOAD_CPU", "1"),  # taskset -c list for backend and load generators
    "CONNS": env("CONNS", 50, int),  # HTTP/1.1 client connections (wrk -c, open-loop pool)
    "OPENLOOP_RATE": env("OPENLOOP_RATE", 0.0, float),  # req/s; 0: half of luagate's measured max
    "GRPC_STREAMS": env("GRPC_STREAMS", 100, int),  # h2load -m on one connection
    "BIDI_STREAMS": env("BIDI_STREAMS", 4, int),  # concurrent Bidi streams on one connection
    "BIDI_MSG_SIZE": env("BIDI_MSG_SIZE", 65536, int),  # payload bytes per Bidi message
    "IDLE_CONNS": env("IDLE_CONNS", 10000, int),  # idle keep-alive connections for the RSS test
    "TARGETS": env("TARGETS", "luagate,nginx,nginx-lua,haproxy"),
    "WORKLOADS": env("WORKLOADS", ""),  # comma list of workload names; empty: all
    "PORT_BASE": env("PORT_BASE", 18080, int),  # proxy ports BASE, BASE+1; backend BASE+10, BASE+11
}
DUR = KNOBS["DURATION"]
PORT_HTTP = KNOBS["PORT_BASE"]
PORT_GRPC = PORT_HTTP + 1
BACKEND_HTTP = PORT_HTTP + 10
BACKEND_GRPC = PORT_HTTP + 11
LUA_HEADERS = ["x-user: alice", "x-tenant: acme"]

TARGETS = {
    "luagate": "luagate",
    "nginx": "nginx",
    "nginx-lua": "nginx + lua-nginx-module",
    "haproxy": "HAProxy",
}
ALL = ["luagate", "nginx", "nginx-lua", "haproxy"]
GRPC = ["luagate", "nginx", "haproxy"]
LUA = ["luagate", "nginx-lua"]

# name, kind, title, targets, reference target, extra
WORKLOADS = [
    dict(name="http-small", kind="wrk", path="/", targets=ALL, ref="nginx",
         title="HTTP/1.1 keep-alive, small JSON response",
         load="wrk -t1 -c{CONNS} (closed loop, as fast as the proxy answers)"),
    dict(name="http-openloop", kind="openloop", path="/", targets=ALL, ref="nginx",
         title="HTTP/1.1 keep-alive at a fixed rate (open loop)",
         load="loadgen openloop: {rate} req/s over {CONNS} connections; latency from each request's due time"),
    dict(name="http-64k", kind="wrk", path="/bytes/65536", targets=ALL, ref="nginx",
         title="HTTP/1.1 keep-alive, 64 KiB response",
         load="wrk -t1 -c{CONNS}"),
    dict(name="grpc-unary", kind="h2load", targets=GRPC, ref="nginx",
         title="gRPC unary over h2c (echo.v1.Echo/Unary)",
         load="h2load -c1 -m{GRPC_STREAMS}: one connection, {GRPC_STREAMS} concurrent streams"),
    # The Lua hooks' baseline: the same request (path length, headers) to a route without a hook.
    dict(name="lua-none", kind="wrk", path="/lua/none", headers=LUA_HEADERS, targets=LUA, ref="nginx-lua",
         title="HTTP/1.1 small response, the Lua workloads' request on a route without a hook",
         load="wrk -t1 -c{CONNS}; the baseline of the two Lua hook workloads"),
    dict(name="lua-empty", kind="wrk", path="/lua/empty", headers=LUA_HEADERS, targets=LUA, ref="nginx-lua",
         title="HTTP/1.1 small response through an empty Lua access hook",
         load="wrk -t1 -c{CONNS}; benches/lua/empty.lua as luagate lua.access / nginx access_by_lua_file"),
    dict(name="lua-realistic", kind="wrk", path="/lua/realistic", headers=LUA_HEADERS, targets=LUA,
         ref="nginx-lua", title="HTTP/1.1 small response through a realistic Lua access hook",
         load="wrk -t1 -c{CONNS}; benches/lua/realistic.lua (2 header reads, shared-dict get, set header)"),
    dict(name="grpc-bidi", kind="bidi", targets=GRPC, ref="nginx",
         title="gRPC bidi stream throughput (echo.v1.Echo/Bidi)",
         load="loadgen bidi: {BIDI_STREAMS} streams on one h2c connection, {BIDI_MSG_SIZE}-byte messages"),
    dict(name="idle-conns", kind="idle", targets=ALL, ref="nginx",
         title="Memory per idle HTTP/1.1 keep-alive connection",
         load="{IDLE_CONNS} connections, one GET each, then idle; (RSS after - RSS before) / connections"),
]

_procs = []  # every process started, stopped by PID at exit


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ /proc


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rfind(")") + 2:].split()  # fields from 3 (state) on


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(stat_fields(d)[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        f = stat_fields(p)
        total += int(f[11]) + int(f[12])  # utime, stime
    return total


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm(pids):
    """Resets VmHWM to the current RSS (writing 5 to clear_refs), so a peak is per workload."""
    ok = True
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


# ------------------------------------------------------------------ processes


def taskset(cpu):
    return ["taskset", "-c", cpu] if shutil.which("taskset") and cpu else []


def start(argv, name, cpu, stdin=None, stdout=None):
    logf = open(TMP / f"{name}.log", "ab")
    p = subprocess.Popen(taskset(cpu) + argv, stdout=stdout or logf, stderr=logf, stdin=stdin,
                         cwd=TMP, start_new_session=True)
    p.name = name
    _procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, grace=10):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _procs:
        _procs.remove(p)


def cleanup():
    for p in list(_procs):
        stop(p, grace=5)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_ports(p, ports, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if p.poll() is not None:
            raise RuntimeError(f"{p.name} exited with {p.returncode} (see {TMP / (p.name + '.log')})")
        if all(port_open(x) for x in ports):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{p.name}: ports {ports} not open after {timeout}s")


def check_ports_free():
    for port in (PORT_HTTP, PORT_GRPC, BACKEND_HTTP, BACKEND_GRPC):
        if port_open(port):
            sys.exit(f"bench: port {port} is already in use; stop what listens there or set PORT_BASE")


# ------------------------------------------------------------------ proxies


def render(template, out, lua=False):
    text = (BENCH / "conf" / template).read_text()
    if template.startswith("nginx"):
        lines = []
        for line in text.splitlines():
            if line.startswith("#lua# "):
                if lua:
                    lines.append(line[len("#lua# "):])
            else:
                lines.append(line)
        text = "\n".join(lines) + "\n"
    subst = {
        "TMP": str(TMP), "BENCH": str(BENCH), "HTTP_PORT": PORT_HTTP, "GRPC_PORT": PORT_GRPC,
        "HTTP_BACKEND": BACKEND_HTTP, "GRPC_BACKEND": BACKEND_GRPC, "MAXCONN": KNOBS["IDLE_CONNS"] + 2048,
        "NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    for k, v in subst.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{template}: unknown placeholders {left}")
    path = TMP / out
    path.write_text(text)
    return path


class Proxy:
    def __init__(self, target):
        self.target = target
        if target == "luagate":
            cfg = render("luagate.yaml.in", "luagate.yaml")
            argv = [str(BIN / "luagate"), "run", "-c", str(cfg)]
        elif target in ("nginx", "nginx-lua"):
            cfg = render("nginx.conf.in", f"{target}.conf", lua=target == "nginx-lua")
            for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (TMP / "nginx-tmp" / d).mkdir(parents=True, exist_ok=True)
            argv = [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(TMP) + "/", "-e",
                    str(TMP / "nginx-error.log"), "-c", str(cfg)]
        elif target == "haproxy":
            cfg = render("haproxy.cfg.in", "haproxy.cfg")
            argv = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", str(cfg), "-db"]
        else:
            raise ValueError(target)
        self.p = start(argv, target, KNOBS["PROXY_CPU"])
        wait_ports(self.p, [PORT_HTTP, PORT_GRPC])
        # nginx: the master forks the worker; the worker is what serves (and is measured)
        end = time.time() + 5
        while target.startswith("nginx") and not children(self.p.pid) and time.time() < end:
            time.sleep(0.05)

    def pids(self):
        """The processes that serve traffic: nginx's worker, the process itself for the others."""
        return children(self.p.pid) or [self.p.pid]

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        stop(self.p)


# ------------------------------------------------------------------ checks


def http_get(path, headers=(), conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", PORT_HTTP, timeout=5)
    c.request("GET", path, headers=dict(h.split(": ", 1) for h in headers))
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r.status, body


def preflight(w):
    """None if the proxy answers the workload's route as expected, else what went wrong."""
    try:
        if w["kind"] in ("h2load", "bidi"):
            r = subprocess.run([str(LOADGEN), "grpc-unary", "--addr", f"127.0.0.1:{PORT_GRPC}"],
                               capture_output=True, text=True, timeout=15)
            return None if r.returncode == 0 else f"gRPC unary probe: {r.stderr.strip()}"
        path, headers = w.get("path", "/"), w.get("headers", ())
        status, body = http_get(path, headers)
        if status != 200:
            return f"GET {path}: status {status}: {body[:200]!r}"
        if path.startswith("/bytes/") and len(body) != int(path.rsplit("/", 1)[1]):
            return f"GET {path}: {len(body)} bytes"
        if path == "/lua/realistic":
            status, body = http_get(path, headers)  # the first request filled the dict
            seen = json.loads(body).get("headers", {}).get("x-plan")
            if status != 200 or seen != "pro":
                return f"GET {path}: status {status}, x-plan upstream {seen!r} (want 'pro'): the Lua hook did not run"
        if path == "/" and not json.loads(body).get("backend"):
            return f"GET /: not the backend's answer: {body[:200]!r}"
        return None
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------ load generators


def run_tool(argv, rawname, timeout):
    r = subprocess.run(taskset(KNOBS["LOAD_CPU"]) + argv, capture_output=True, text=True, timeout=timeout)
    if rawname:
        (RAW / f"{rawname}.txt").write_text(f"$ {' '.join(argv)}\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


def secs(d):
    return max(1, int(round(d)))


def wrk(w, duration, rawname=None):
    argv = ["wrk", "-t1", f"-c{KNOBS['CONNS']}", f"-d{secs(duration)}s", "--timeout", "5s", "--latency",
            "-s", str(BENCH / "tools" / "wrk_report.lua")]
    for h in w.get("headers", ()):
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{PORT_HTTP}{w['path']}")
    r = run_tool(argv, rawname, duration + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result: {r.stdout[-300:]} {r.stderr[-300:]}")
    j = json.loads(m.group(1))
    sock = j["connect_errors"] + j["read_errors"] + j["write_errors"] + j["timeouts"]
    return {
        "requests": j["requests"], "rps": j["requests"] / (j["duration_us"] / 1e6),
        "p50_us": j["p50_us"], "p99_us": j["p99_us"], "p999_us": j["p999_us"], "max_us": j["max_us"],
        "non2xx": j["status_errors"], "socket_errors": sock, "errors": j["status_errors"] + sock,
    }


def openloop(w, duration, rate, rawname=None):
    argv = [str(LOADGEN), "openloop", "--addr", f"127.0.0.1:{PORT_HTTP}", "--path", w["path"], "--rate",
            str(rate), "--duration", str(duration), "--conns", str(KNOBS["CONNS"])]
    r = run_tool(argv, rawname, duration + 60)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen openloop: {r.stderr.strip()}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    sock = j["socket_errors"] + j["unanswered"]
    return {
        "requests": j["requests"], "rps": j["rps"], "target_rate": j["target_rate"],
        "p50_us": j["p50_us"], "p99_us": j["p99_us"], "p999_us": j["p999_us"], "max_us": j["max_us"],
        "non2xx": j["non2xx"], "socket_errors": sock, "errors": j["non2xx"] + sock,
    }


def grpc_body():
    path = TMP / "grpc-unary.bin"
    msg = b"\x0a\x05bench" + b"\x12\x40" + b"x" * 64  # EchoRequest{message: "bench", payload: 64 bytes}
    path.write_bytes(b"\x00" + len(msg).to_bytes(4, "big") + msg)
    return path


def h2load(w, duration, rawname=None):
    logfile = TMP / "h2load-requests.tsv"
    argv = ["h2load", "-c1", "-t1", f"-m{KNOBS['GRPC_STREAMS']}", "-D", str(secs(duration)), "-d",
            str(grpc_body()), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    if rawname:
        argv += ["--log-file", str(logfile)]
    argv.append(f"http://127.0.0.1:{PORT_GRPC}/echo.v1.Echo/Unary")
    r = run_tool(argv, rawname, duration + 60)
    out = r.stdout
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (fin and req and codes):
        raise RuntimeError(f"h2load gave no result: {out[-400:]} {r.stderr[-300:]}")
    failed, errored, timeouts = (int(req.group(i)) for i in (5, 6, 7))
    non2xx = sum(int(codes.group(i)) for i in (2, 3, 4))
    res = {"requests": int(req.group(3)), "rps": float(fin.group(3)), "non2xx": non2xx,
           "socket_errors": errored + timeouts, "errors": max(failed, non2xx + errored + timeouts)}
    if rawname and logfile.exists():
        lat = []
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1].startswith("2"):
                    lat.append(int(parts[2]))
        logfile.unlink()
        lat.sort()
        for key, p in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9)):
            res[key] = percentile(lat, p)
        res["max_us"] = lat[-1] if lat else 0
    return res


def bidi(w, duration, rawname=None):
    argv = [str(LOADGEN), "bidi", "--addr", f"127.0.0.1:{PORT_GRPC}", "--duration", str(duration), "--streams",
            str(KNOBS["BIDI_STREAMS"]), "--msg-size", str(KNOBS["BIDI_MSG_SIZE"])]
    r = run_tool(argv, rawname, duration + 60)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen bidi: {r.stderr.strip()}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return {"mb_per_s": j["mb_per_s"], "bytes": j["bytes_received"], "messages": j["messages_sent"],
            "errors": j["errors"], "error_detail": j["error_detail"]}


def percentile(sorted_vals, p):
    if not sorted_vals:
        return 0
    k = max(1, min(len(sorted_vals), int(-(-p * len(sorted_vals) // 100))))
    return sorted_vals[k - 1]


LOADS = {"wrk": wrk, "h2load": h2load, "bidi": bidi}


def measure(proxy, w, rawname, rate):
    """Warm-up, then one measured run with the proxy's CPU time and peak RSS around it."""
    run = (lambda d, raw=None: openloop(w, d, rate, raw)) if w["kind"] == "openloop" else \
        (lambda d, raw=None: LOADS[w["kind"]](w, d, raw))
    if KNOBS["WARMUP"] > 0:
        run(KNOBS["WARMUP"])
    pids = proxy.pids()
    hwm_reset = reset_hwm(pids)
    t0, w0 = cpu_ticks(pids), time.monotonic()
    res = run(DUR, rawname)
    cpu_s, wall = (cpu_ticks(pids) - t0) / CLK_TCK, time.monotonic() - w0
    if not proxy.alive():
        raise RuntimeError("the proxy died during the run")
    res["cpu_s"] = cpu_s
    res["cpu_pct"] = 100 * cpu_s / wall  # near 100: the proxy's core was the bottleneck
    res["peak_rss_kb"] = sum(status_kb(p, "VmHWM") for p in pids)
    res["peak_rss_is_lifetime"] = not hwm_reset
    if res.get("requests"):
        res["cpu_us_per_req"] = cpu_s * 1e6 / res["requests"]
    if res.get("bytes"):
        res["cpu_us_per_mb"] = cpu_s * 1e6 / (res["bytes"] / 1e6)
    return res


def idle_test(proxy):
    n = KNOBS["IDLE_CONNS"]
    c = http.client.HTTPConnection("127.0.0.1", PORT_HTTP, timeout=5)
    for _ in range(200):  # warm the proxy up (and its upstream pool) before the baseline
        http_get("/", conn=c)
    c.close()
    time.sleep(0.5)
    pids = proxy.pids()
    before = sum(status_kb(p, "VmRSS") for p in pids)
    p = start([sys.executable, str(BENCH / "tools" / "idle_conns.py"), "--addr", f"127.0.0.1:{PORT_HTTP}",
               "--count", str(n)], "idle_conns", KNOBS["LOAD_CPU"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 300)
        if not ready:
            raise RuntimeError("idle_conns.py did not finish opening connections in 300 s")
        line = p.stdout.readline().decode()
        if not line:
            raise RuntimeError("idle_conns.py exited early (see results/tmp/idle_conns.log)")
        j = json.loads(line)
        time.sleep(1.0)
        if not proxy.alive():
            raise RuntimeError("the proxy died holding the idle connections")
        after = sum(status_kb(x, "VmRSS") for x in pids)
        peak = sum(status_kb(x, "VmHWM") for x in pids)
    finally:
        if p.stdin:
            p.stdin.close()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop(p)
    opened = j["opened"]
    return {
        "opened": opened, "errors": j["failed"], "open_seconds": j["seconds"], "rss_before_kb": before,
        "rss_after_kb": after, "peak_rss_kb": peak,
        "bytes_per_conn": (after - before) * 1024 / opened if opened else None,
    }


# ------------------------------------------------------------------ driver


def versions():
    def first(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    git = first(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "luagate": f"{first([str(BIN / 'luagate'), '--version'])} ({git})",
        "nginx": first(["nginx", "-v"]), "haproxy": first(["haproxy", "-v"]), "wrk": first(["wrk", "-v"]),
        "h2load": first(["h2load", "--version"]),
        "lua-nginx-module": first(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-http-lua"]),
        "kernel": os.uname().release,
    }


def summarize(runs, workloads, targets):
    summary = {}
    for w in workloads:
        s = summary.setdefault(w["name"], {})
        for t in targets:
            if t not in w["targets"]:
                continue
            rs = [r for r in runs if r["workload"] == w["name"] and r["target"] == t]
            ok = [r["result"] for r in rs if "result" in r]
            if not ok:
                errs = [r["error"] for r in rs if "error" in r]
                s[t] = {"error": errs[0] if errs else "not run"}
                continue
            keys = {k for r in ok for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            med = {k: statistics.median([r[k] for r in ok if isinstance(r.get(k), (int, float))]) for k in keys}
            med["errors"] = sum(r.get("errors", 0) for r in ok)
            med["rounds"] = len(ok)
            med["failed_rounds"] = len(rs) - len(ok)
            summary[w["name"]][t] = med
    return summary


def main():
    for d in (RESULTS, TMP, RAW):
        d.mkdir(parents=True, exist_ok=True)
    for f in RAW.iterdir():
        f.unlink()
    check_ports_free()
    targets = [t.strip() for t in KNOBS["TARGETS"].split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            sys.exit(f"bench: unknown target {t}; known: {', '.join(TARGETS)}")
    wanted = [x.strip() for x in KNOBS["WORKLOADS"].split(",") if x.strip()]
    names = [w["name"] for w in WORKLOADS]
    for x in wanted:
        if x not in names:
            sys.exit(f"bench: unknown workload {x}; known: {', '.join(names)}")
    workloads = [w for w in WORKLOADS if not wanted or w["name"] in wanted]

    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "knobs": KNOBS, "versions": versions(),
    }
    log(f"knobs: {json.dumps(KNOBS)}")
    log(f"load average at start: {meta['loadavg_start']}")

    backend = start([str(BIN / "testbed"), "--name", "backend", "--threads", "1", "--http",
                     f"127.0.0.1:{BACKEND_HTTP}", "--grpc", f"127.0.0.1:{BACKEND_GRPC}"], "testbed",
                    KNOBS["LOAD_CPU"])
    wait_ports(backend, [BACKEND_HTTP, BACKEND_GRPC])

    rate = KNOBS["OPENLOOP_RATE"]
    if any(w["kind"] == "openloop" for w in workloads) and rate <= 0:
        cal = "luagate" if "luagate" in targets else targets[0]
        log(f"open loop: measuring {cal}'s max req/s to run at half of it")
        proxy = Proxy(cal)
        try:
            w = WORKLOADS[0]
            if KNOBS["WARMUP"] > 0:
                wrk(w, KNOBS["WARMUP"])
            rate = round(wrk(w, DUR, "calibration-" + cal)["rps"] / 2)
        finally:
            proxy.stop()
        meta["openloop_rate_from"] = cal
    meta["openloop_rate"] = rate
    log(f"open-loop rate: {rate} req/s")

    runs = []
    total = sum(len([t for t in targets if t in w["targets"]]) for w in workloads) * KNOBS["ROUNDS"]
    done = 0
    for rnd in range(KNOBS["ROUNDS"]):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for w in workloads:
            for t in order:
                if t not in w["targets"]:
                    continue
                done += 1
                tag = f"r{rnd + 1}-{w['name']}-{t}"
                entry = {"round": rnd + 1, "workload": w["name"], "target": t}
                proxy = None
                try:
                    proxy = Proxy(t)
                    err = preflight(w)
                    if err:
                        raise RuntimeError(f"preflight: {err}")
                    if w["kind"] == "idle":
                        entry["result"] = idle_test(proxy)
                    else:
                        entry["result"] = measure(proxy, w, tag, rate)
                except Exception as e:  # noqa: BLE001 - one failed run must not end the suite
                    entry["error"] = f"{type(e).__name__}: {e}"
                finally:
                    if proxy:
                        proxy.stop()
                runs.append(entry)
                res = entry.get("result", {})
                brief = entry.get("error") or ", ".join(
                    f"{k}={res[k]:.0f}" if isinstance(res[k], float) else f"{k}={res[k]}"
                    for k in ("rps", "mb_per_s", "p99_us", "errors", "bytes_per_conn") if k in res and res[k] is not None)
                log(f"[{done}/{total}] round {rnd + 1} {w['name']:<14} {t:<10} {brief}")
    stop(backend)

    meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["loadavg_end"] = os.getloadavg()
    doc = {
        "meta": meta,
        "targets": {t: TARGETS[t] for t in targets},
        "workloads": [{**w, "load": w["load"].format(rate=rate, **KNOBS)} for w in workloads],
        "summary": summarize(runs, workloads, targets),
        "runs": runs,
    }
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out.relative_to(ROOT)}")
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out)])
    return r.returncode


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        cleanup()
