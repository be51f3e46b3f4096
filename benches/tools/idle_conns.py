#!/usr/bin/env python3
"""Open N HTTP/1.1 keep-alive connections to a proxy and leave them idle.

Each connection sends one `GET /` and reads the whole response (so the proxy
has set the connection up completely, as for a real client between two
requests), then stays open and silent. When all are done the script prints
one JSON line (`{"opened": N, "failed": M, "seconds": S}`) and waits until
its stdin closes, then closes every connection and exits. benches/bench.py
reads the proxy's RSS between those two moments.

    idle_conns.py --addr 127.0.0.1:18080 --count 10000 [--parallel 256]

Connections come from 127.0.0.2 .. 127.0.0.9 in turn, so repeated runs never
run short of ephemeral ports on one (source, destination) pair.
"""

import argparse
import asyncio
import json
import resource
import sys
import time


async def one(host, port, src, sem, req):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(src, 0)), 10)
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            w.write(req)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            fields = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip().lower()
            if "content-length" in fields:
                await asyncio.wait_for(r.readexactly(int(fields["content-length"])), 10)
            elif "chunked" in fields.get("transfer-encoding", ""):
                await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 10)
            if status // 100 != 2 or "close" in fields.get("connection", ""):
                w.close()
                return None
            return (r, w)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                asyncio.LimitOverrunError):
            w.close()
            return None


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=256)
    ap.add_argument("--path", default="/")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.count + 1024
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
        except (ValueError, OSError):
            print(f"idle_conns: cannot raise the open-file limit to {want} (it is {soft}); run `ulimit -n {want}`",
                  file=sys.stderr)
    host, port = a.addr.rsplit(":", 1)
    req = f"GET {a.path} HTTP/1.1\r\nHost: {a.addr}\r\n\r\n".encode()
    sem = asyncio.Semaphore(a.parallel)
    t0 = time.monotonic()
    conns = await asyncio.gather(*(one(host, int(port), f"127.0.0.{2 + i % 8}", sem, req) for i in range(a.count)))
    opened = [c for c in conns if c is not None]
    print(json.dumps({"opened": len(opened), "failed": a.count - len(opened),
                      "seconds": round(time.monotonic() - t0, 2)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for _, w in opened:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
