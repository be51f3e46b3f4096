#!/usr/bin/env bash
# Instructions per proxied request, as benches/NOTES.md §9 measures them:
# luagate with one worker under callgrind, N1 then N2 HTTP/1.1 requests
# (h2load --h1 -c 4) to a testbed backend; the slope (total(N2) - total(N1)) /
# (N2 - N1) cancels start-up and shutdown. Independent of machine load.
#
#   benches/tools/callgrind_slope.sh LUAGATE_BIN TESTBED_BIN [PATH] [N1] [N2]
#
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client). Prints one line:
#   path=/ n1=3000 n2=6000 per_request=41873
# KEEP=DIR keeps the two callgrind outputs there (for callgrind_annotate).
set -euo pipefail
bin=$1; testbed=$2; path=${3:-/}; n1=${4:-3000}; n2=${5:-6000}
tmp=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
bport=$(port); lport=$(port)
"$testbed" --http "app=127.0.0.1:$bport" > "$tmp/testbed.out" 2>/dev/null &
for _ in $(seq 100); do grep -q ready "$tmp/testbed.out" 2>/dev/null && break; sleep 0.05; done
cat > "$tmp/luagate.yaml" <<YAML
workers: 1
error_log: { level: warn }
access_log: { path: "off" }
shutdown: { grace: 1s }
listen: [ { addr: "127.0.0.1:$lport", protocols: [http1] } ]
upstreams: { app: { peers: [ { addr: "127.0.0.1:$bport" } ], keepalive: { max_idle: 64, idle_timeout: 300s } } }
routes: [ { match: { path_prefix: / }, upstream: app } ]
YAML
total() {
  local n=$1 out="$tmp/cg.$1"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run -c "$tmp/luagate.yaml" 2>"$tmp/vg.$n" &
  local pid=$!
  for _ in $(seq 400); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$lport),0.2)" 2>/dev/null && break; sleep 0.1
  done
  h2load --h1 -n "$n" -c 4 "http://127.0.0.1:$lport$path" > "$tmp/h2load.$n" 2>&1
  grep -q "succeeded, 0 failed, 0 errored" "$tmp/h2load.$n" || { cat "$tmp/h2load.$n" >&2; exit 1; }
  kill -TERM "$pid"; wait "$pid" || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }' > "$tmp/total.$n"
}
# (not $(total …): a command substitution's subshell would run the EXIT trap)
total "$n1"; total "$n2"
t1=$(cat "$tmp/total.$n1"); t2=$(cat "$tmp/total.$n2")
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$tmp/cg.$n1" "$tmp/cg.$n2" "$KEEP/"; fi
echo "path=$path n1=$n1 n2=$n2 per_request=$(( (t2 - t1) / (n2 - n1) ))"
