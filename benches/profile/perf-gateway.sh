#!/usr/bin/env bash
# Where the CPU of a request goes on real hardware, by crate, in the gateway and in the bare
# proxy side by side (callgrind counts instructions, which weigh SIMD code and memory stalls
# wrongly; this samples time).
#
#   benches/profile/perf-gateway.sh [RATE] [SHAPE] [LAYERS]
#     RATE    offered requests per second (default 8000)
#     SHAPE   json (default) or sse
#     LAYERS  the gateway's layers (default: cost,cache,retry,rate-limit,api-key)
#
# For each of the proxy and the gateway, bench-gateway runs that scenario alone at RATE for
# 14 s; `perf record` (cpu-clock, 4,999 Hz) samples the server process for 8 s in the middle
# of it, and the samples are divided by the requests offered in those 8 s (the rate must be
# one both sustain). Prints µs of CPU per request by crate (kernel, allocator and libc
# apart), the gateway's, the proxy's and the difference. Needs a release build (`cargo build
# --release -p claude-benches --bin bench-gateway`), perf and python3. Takes about 40 s.
set -euo pipefail
rate=${1:-8000}
shape=${2:-json}
layers=${3:-cost,cache,retry,rate-limit,api-key}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BENCH_GATEWAY_BIN:-$root/target/release/bench-gateway}
out=$(mktemp -d /tmp/perf-gateway.XXXXXX)
secs=8
for kind in proxy gateway; do
  "$bin" --rates "$rate" --shapes "$shape" --scenarios "$kind" --step-secs 14 --warmup-secs 1 \
    --target-secs 0.2 --layers "$layers" >"$out/report.$kind.md" 2>"$out/stderr.$kind" &
  bench=$!
  pid=
  for _ in $(seq 1 60); do
    sleep 0.5
    pid=$(pgrep -f -- "--serve $kind" | head -1 || true)
    [ -n "$pid" ] && break
  done
  [ -n "$pid" ] || { echo "the $kind child did not start" >&2; kill $bench; exit 1; }
  # The smoke test and the warm-up second first, then the middle of the step.
  sleep 5
  perf record -F 4999 -e cpu-clock -p "$pid" -o "$out/perf.$kind.data" -- sleep "$secs" \
    >/dev/null 2>&1
  wait $bench || true
  perf report -i "$out/perf.$kind.data" --no-children --sort dso,sym 2>/dev/null \
    | grep -v '^#' | grep -v '^$' >"$out/syms.$kind"
  perf report -i "$out/perf.$kind.data" --no-children --sort dso 2>/dev/null \
    | sed -n 's/^# Samples: \([0-9.]*\)\([KM]\?\) of.*/\1 \2/p' >"$out/samples.$kind"
done
echo "# µs of CPU per request by crate at $rate $shape req/s (profiles in $out)"
python3 - "$out" "$rate" "$secs" <<'PY'
import collections, re, sys
out, rate, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])

def samples(kind):
    n, unit = (open(f"{out}/samples.{kind}").read().split() + [""])[:2]
    return float(n) * {"K": 1e3, "M": 1e6}.get(unit, 1)

def groups(kind):
    us = samples(kind) / 4999 * 1e6 / (rate * secs)
    g = collections.Counter()
    for line in open(f"{out}/syms.{kind}"):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, kind_, sym = float(m[1]), m[2], m[3], m[4].strip()
        if kind_ == "k":
            key = "kernel"
        elif dso.startswith("libc"):
            key = "libc memmove/memcpy" if "mem" in sym else "libc other"
        elif sym.startswith(("_mi", "mi_")):
            key = "mimalloc"
        elif "blake3" in sym:
            key = "blake3"
        else:
            s = re.sub(r"^(core::ptr::drop_in_place<|alloc::|core::)", "", sym.lstrip("<"))
            key = re.split(r"::|<| ", s)[0] or "?"
        g[key] += pct / 100 * us
    return g, us

gw, gw_total = groups("gateway")
px, px_total = groups("proxy")
print(f"total: gateway {gw_total:.1f} µs, proxy {px_total:.1f} µs per request\n")
print("| crate | gateway | proxy | gateway − proxy |")
print("|---|---:|---:|---:|")
keys = sorted(set(gw) | set(px), key=lambda k: -(gw.get(k, 0) - px.get(k, 0)))
for k in keys:
    a, b = gw.get(k, 0), px.get(k, 0)
    if max(a, b) >= 0.2:
        print(f"| {k} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
PY
