#!/usr/bin/env bash
# What the USDT probes cost on the hot path when nobody traces them: round-robin dispatch
# (every connection fires `handle-pass`) with the probes compiled in (the default) against a
# build with them compiled out (--no-default-features), same app, same load, alternating,
# several rounds; prints medians and their ratio.
#
#   benches/probe_cost.sh [ROUNDS]      (default 5 rounds of 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet --bin processes
CARGO_TARGET_DIR=target/noprobes cargo build --release --quiet --bin processes --no-default-features
with=target/release/processes
without=target/noprobes/release/processes
port=29400

run_one() { # binary → req/s
  local bin=$1 dir; dir=$(mktemp -d)
  "$bin" run -i 2 --listen "127.0.0.1:$port" --control "$dir/c.sock" -- node benches/app/server.js >"$dir/log" 2>&1 &
  local master=$!
  until "$bin" status --control "$dir/c.sock" --json 2>/dev/null | grep -q '"ready": 2'; do sleep 0.1; done
  # Round-robin only counts workers that asked for the port: wait for both `listening`.
  until [ "$(grep -c '(listening)' "$dir/log")" -ge 2 ]; do sleep 0.1; done
  wrk -t2 -c32 -d5s -H 'Connection: close' "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}'
  kill -TERM "$master"; wait "$master" || true
  rm -rf "$dir"
}

declare -a a b
for r in $(seq "$rounds"); do
  if (( r % 2 )); then a+=("$(run_one $with)"); b+=("$(run_one $without)");
  else b+=("$(run_one $without)"); a+=("$(run_one $with)"); fi
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2)? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
ma=$(median "${a[@]}"); mb=$(median "${b[@]}")
echo "| build | new-connection req/s, median of $rounds (each run) |"
echo "| --- | --- |"
echo "| probes compiled in, untraced | $ma (${a[*]}) |"
echo "| probes compiled out | $mb (${b[*]}) |"
awk -v a="$ma" -v b="$mb" 'BEGIN { printf "\nratio in/out: %.3f\n", a/b }'
