#!/usr/bin/env bash
# The long versions of the reliability suite (tests/it/reliability.rs and tests/it/fuzz.rs):
# chaos for 60 s, a soak of a million connections, a minute of crash loop, 200 crashes
# timed next to an output flood, 10 000 fuzz cases per property. CI runs the same tests
# with short defaults. One test at a time (each measures the master's CPU, RSS and
# latencies); the RELIABILITY: lines are the figures for RELIABILITY.md.
#
#   scripts/reliability.sh                       # everything (about 15 minutes)
#   scripts/reliability.sh -E 'test(chaos)'      # one test; extra args go to nextest
set -euo pipefail
cd "$(dirname "$0")/.."

export PROCESSES_CHAOS_SECS="${PROCESSES_CHAOS_SECS:-60}"
export PROCESSES_SOAK_CONNECTIONS="${PROCESSES_SOAK_CONNECTIONS:-1000000}"
export PROCESSES_SOAK_RESTART_EVERY="${PROCESSES_SOAK_RESTART_EVERY:-5000}"
export PROCESSES_CRASHLOOP_SECS="${PROCESSES_CRASHLOOP_SECS:-60}"
export PROCESSES_FLOOD_KILLS="${PROCESSES_FLOOD_KILLS:-200}"
export PROCESSES_FUZZ_CASES="${PROCESSES_FUZZ_CASES:-10000}"

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo build --all-targets
filter=(-E 'test(/^reliability::/) | test(/^fuzz::/)')
[ $# -gt 0 ] && filter=("$@")
cargo nextest run --profile reliability --test it --no-capture "${filter[@]}" 2>&1 |
  tee target/reliability.log
echo
echo "figures:"
grep '^RELIABILITY:' target/reliability.log || true
