#!/usr/bin/env bash
# Instructions per request of the `claude-gateway` binary itself (its own tracing subscriber
# and log filter included), with the built-in mock as upstream (counted too).
#
#   benches/profile/callgrind-binary.sh [RUST_LOG]
#     RUST_LOG  the log filter to run with; `-` (default) leaves RUST_LOG unset, so the
#               binary's default filter applies
#
# Starts `claude-gateway --mock` under callgrind, sends 30 JSON requests with curl to warm up,
# zeroes the counters, sends 300 more (each body distinct: cache misses), dumps and prints
# the total per request. Needs a release build (`cargo build --release -p claude-gateway`),
# valgrind and curl. Takes about a minute.
set -euo pipefail
level=${1:--}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${CLAUDE_GATEWAY_BIN:-$root/target/release/claude-gateway}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp -d /tmp/callgrind-binary.XXXXXX)
if [ "$level" = "-" ]; then
  env -u RUST_LOG valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$out/cg.%p" \
    "$bin" --mock --listen "127.0.0.1:$port" >"$out/stdout" 2>"$out/stderr" &
else
  RUST_LOG=$level valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$out/cg.%p" \
    "$bin" --mock --listen "127.0.0.1:$port" >"$out/stdout" 2>"$out/stderr" &
fi
vg=$!
trap 'kill $vg 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
  sleep 1
done
send() {
  for i in $(seq 1 "$1"); do
    curl -s -o /dev/null -w '%{http_code}\n' -H 'content-type: application/json' \
      -d "{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":1024,\"messages\":[{\"role\":\"user\",\"content\":\"summarise quarter $2-$i\"}]}" \
      "http://127.0.0.1:$port/v1/messages"
  done
}
send 30 warm >/dev/null
callgrind_control -z "$vg" >/dev/null
codes=$(send 300 run | sort | uniq -c | tr -s ' ')
callgrind_control -d "$vg" >/dev/null
sleep 1
kill "$vg"; wait "$vg" 2>/dev/null || true
f=$(ls "$out"/cg.*.1 | head -1)
total=$(callgrind_annotate --threshold=100 "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done = 1}')
echo "# claude-gateway --mock, RUST_LOG=${level/#-/(unset)} (profile in $out)"
echo "status codes:$codes"
echo "instructions per request: $(( total / 300 ))"
