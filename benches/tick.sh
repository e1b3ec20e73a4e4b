#!/usr/bin/env bash
# What one sample tick costs the master, and how it grows with the number of workers.
#
#   benches/tick.sh            # N = 16, 64, 256 workers
#   benches/tick.sh 8 32 128   # other sizes
#
# For each N: a master with N idle fixture workers sampled every 100 ms; once all are
# ready, the mean and max tick time over 50+ ticks (from `processes status --json`) and the
# master's CPU over 5 s (from /proc). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
bin=target/release/processes
fixture=target/release/processes-fixture
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(16 64 256)
hz=$(getconf CLK_TCK)

echo "| workers | mean tick (µs) | max tick (µs) | µs per worker | master CPU at 10 ticks/s |"
echo "| --- | --- | --- | --- | --- |"
for n in "${sizes[@]}"; do
  dir=$(mktemp -d)
  "$bin" run -i "$n" --ready-after 50ms --sample-interval 100ms --control "$dir/c.sock" -- "$fixture" \
    >"$dir/out.log" 2>&1 &
  master=$!
  status() { "$bin" status --control "$dir/c.sock" --json 2>/dev/null || true; }
  until status | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if s['apps'][0]['ready']==$n else 1)" 2>/dev/null; do sleep 0.2; done
  t0=$(status | python3 -c "import json,sys; print(json.load(sys.stdin)['sample']['ticks'])")
  cpu0=$(awk '{print $14+$15}' "/proc/$master/stat")
  sleep 5
  cpu1=$(awk '{print $14+$15}' "/proc/$master/stat")
  status | python3 -c "
import json,sys
s=json.load(sys.stdin)['sample']
n=$n
mean=s['mean_tick_us']; mx=s['max_tick_us']
cpu=($cpu1-$cpu0)/$hz/5*100
print(f'| {n} | {mean} | {mx} | {mean/n:.1f} | {cpu:.1f} % |')
"
  kill -TERM "$master"; wait "$master" || true
  rm -rf "$dir"
done
