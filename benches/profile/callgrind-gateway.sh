#!/usr/bin/env bash
# Instructions and heap allocations per request of one bench-gateway server (valgrind's
# callgrind: counts, not seconds, so repeatable whatever else the machine is doing).
#
#   benches/profile/callgrind-gateway.sh [KIND] [LAYERS] [SHAPE]
#     KIND    gateway (default) or proxy
#     LAYERS  the gateway's layers (default: cost,cache,retry,rate-limit,api-key)
#     SHAPE   json (default) or sse
#
# The server child runs under callgrind (the `BENCH_WRAP_<KIND>` hook of bench-gateway) and
# gets 40 req/s; the counters are zeroed once it is warm and dumped 10 s later, so start-up is
# not counted. Needs a release build (`cargo build --release -p claude-benches --bin
# bench-gateway`), valgrind and python3. Takes about 40 s.
set -euo pipefail
kind=${1:-gateway}
layers=${2:-cost,cache,retry,rate-limit,api-key}
shape=${3:-json}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BENCH_GATEWAY_BIN:-$root/target/release/bench-gateway}
out=$(mktemp -d /tmp/callgrind-gateway.XXXXXX)
wrap_var="BENCH_WRAP_$(echo "$kind" | tr '[:lower:]' '[:upper:]')"
export "$wrap_var"="valgrind --tool=callgrind --dump-instr=no --callgrind-out-file=$out/cg.%p"
"$bin" --rates 40 --shapes "$shape" --scenarios "$kind" --step-secs 30 --warmup-secs 2 \
  --target-secs 0.2 --layers "$layers" >"$out/report.md" 2>"$out/stderr" &
bench=$!
pid=
for _ in $(seq 1 60); do
  sleep 1
  pid=$(pgrep -f "valgrind.*--serve $kind" | head -1 || true)
  [ -n "$pid" ] && break
done
[ -n "$pid" ] || { echo "the $kind child did not start under valgrind" >&2; kill $bench; exit 1; }
sleep 12
callgrind_control -z "$pid" >/dev/null
sleep 10
callgrind_control -d "$pid" >/dev/null
sleep 1
# Only this run's servers (the children of its bench-gateway), then the bench itself.
pkill -P "$bench" 2>/dev/null || true
kill "$bench" 2>/dev/null || true
echo "# $kind, layers $layers, $shape (profile in $out)"
python3 "$root/benches/profile/callgrind_summary.py" "$out"/cg."$pid".1
