#!/usr/bin/env bash
# A/B runs of the round-robin master against variants of itself and Node's cluster
# primary, alternating, for questions the full benchmark (benches/http.sh) is too coarse
# for: what the Node preload costs a worker, which scheduling policy suits the master.
# Each run starts the setup fresh, warms up 1 s, then loads it with
#   wrk -t2 -c32 -d<duration>s -H 'Connection: close' --latency
# and reports req/s, p99, and the CPU time per request of the manager and of the workers
# (from /proc/PID/stat over the measured seconds). The variants run in the order given, the
# whole list --rounds times; the summary gives each variant's medians.
#
# Usage: benches/ab.sh [--rounds N] [--duration SECONDS] VARIANT...
# Variants:
#   processes            processes run -i 2 --dispatch round-robin (as shipped)
#   bin=PATH             the same with another build of processes (e.g. an older commit's
#                        target/release/processes, from a git worktree)
#   no-preload           the same with `preload = false`
#   preload=FILE         `preload = false` and NODE_OPTIONS="--require FILE" instead
#                        (e.g. an older src/preload.js: git show REV:src/preload.js > FILE)
#   other | slice=NS     the master's loop thread set after start to SCHED_OTHER, or to
#                        SCHED_OTHER with an EEVDF custom slice of NS ns (Linux >= 6.12)
#   batch-slice=NS       SCHED_BATCH (as shipped) with a custom slice of NS ns
#   node                 Node's cluster module, 2 workers, NODE_CLUSTER_SCHED_POLICY=rr
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release/processes"
APP_DIR="$ROOT/benches/app"
ROUNDS=3
DURATION=5
VARIANTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    preload=?*) VARIANTS+=("preload=$(realpath -e "${1#preload=}" 2>/dev/null || echo "${1#preload=}")") ;;
    bin=?*) VARIANTS+=("bin=$(realpath -e "${1#bin=}" 2>/dev/null || echo "${1#bin=}")") ;;
    processes|no-preload|other|node|slice=[0-9]*|batch-slice=[0-9]*) VARIANTS+=("$1") ;;
    *) echo "ab.sh: unknown argument or variant: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#VARIANTS[@]} -gt 0 ] || { echo "ab.sh: name at least one variant (see --help)" >&2; exit 2; }
for v in "${VARIANTS[@]}"; do
  case "$v" in
    preload=*) [ -f "${v#preload=}" ] || { echo "ab.sh: no such file: ${v#preload=}" >&2; exit 2; } ;;
    bin=*) [ -x "${v#bin=}" ] || { echo "ab.sh: not an executable: ${v#bin=}" >&2; exit 2; } ;;
  esac
done
command -v wrk >/dev/null || { echo "ab.sh: needs wrk (apt-get install wrk)" >&2; exit 2; }

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
build_release "$ROOT"

TMP="$(mktemp -d /tmp/processes-ab.XXXXXX)"
PID=""
stop() {
  if [ -n "$PID" ]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=""
}
trap 'stop; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

cat >"$TMP/cluster.js" <<'EOF'
const cluster = require('cluster');
cluster.setupPrimary({ exec: process.argv[2] });
let listening = 0;
cluster.on('listening', () => { if (++listening === 2) console.log('ready'); });
for (let i = 0; i < 2; i++) cluster.fork();
process.on('SIGTERM', () => {
  for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
  cluster.on('exit', () => { if (Object.keys(cluster.workers).length === 0) process.exit(0); });
});
EOF

# sched_setattr(2) on one thread: policy 0 = SCHED_OTHER, 3 = SCHED_BATCH; runtime = the
# custom slice in ns (0: the default).
set_sched() { # tid policy runtime_ns
  python3 - "$1" "$2" "$3" <<'EOF'
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(struct.pack("IIQiIQQQII", 56, int(sys.argv[2]), 0, 0, 0, int(sys.argv[3]), 0, 0, 0, 0), 56)
if libc.syscall(314, int(sys.argv[1]), attr, 0) != 0:
    sys.exit("sched_setattr: " + os.strerror(ctypes.get_errno()))
EOF
}


start() { # variant port
  local v="$1" port="$2" preload=true extra="" bin="$BIN"
  case "$v" in
    node)
      (cd "$APP_DIR" && PORT="$port" NODE_CLUSTER_SCHED_POLICY=rr exec setsid node "$TMP/cluster.js" server.js) \
        >"$TMP/log" 2>&1 &
      PID=$!
      return ;;
    no-preload) preload=false ;;
    bin=*) bin="${v#bin=}" ;;
    preload=*) preload=false
      extra="env = { NODE_OPTIONS = \"--require ${v#preload=}\", PROCESSES_SAMPLE_MS = \"1000\" }" ;;
  esac
  cat >"$TMP/c.toml" <<EOF
[apps.bench]
command = ["node", "server.js"]
cwd = "$APP_DIR"
instances = 2
listen = ["127.0.0.1:$port"]
dispatch = "round-robin"
preload = $preload
$extra
EOF
  setsid "$bin" run -c "$TMP/c.toml" --control "$TMP/ctl.sock" >"$TMP/log" 2>&1 &
  PID=$!
}

port=29700
RESULTS="$TMP/results"
log "variants: ${VARIANTS[*]}; $ROUNDS round(s) of ${DURATION}s, wrk -t2 -c32 -H 'Connection: close'"
for ((r = 1; r <= ROUNDS; r++)); do
  for v in "${VARIANTS[@]}"; do
    port=$((port + 1)); while ! port_free "$port"; do port=$((port + 1)); done
    start "$v" "$port"
    ok=0
    for ((i = 0; i < 400; i++)); do
      [ "$(curl -s --max-time 1 "http://127.0.0.1:$port/")" = hi ] && { ok=1; break; }
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.05
    done
    [ $ok = 1 ] || { log "ERROR: $v did not answer on port $port; its log:"; tail -20 "$TMP/log" >&2; exit 1; }
    case "$v" in
      other) set_sched "$PID" 0 0 ;;
      slice=*) set_sched "$PID" 0 "${v#slice=}" ;;
      batch-slice=*) set_sched "$PID" 3 "${v#batch-slice=}" ;;
    esac
    wrk -t2 -c32 -d1s -H 'Connection: close' "http://127.0.0.1:$port/" >/dev/null
    workers="$(pgrep -P "$PID" -x node | tr '\n' ' ')"
    [ -n "$workers" ] || { log "ERROR: no workers under $v (pid $PID)"; exit 1; }
    m0="$(ticks "$PID")"; w0="$(ticks $workers)"
    out="$(wrk -t2 -c32 -d"${DURATION}s" -H 'Connection: close' --latency "http://127.0.0.1:$port/")"
    m1="$(ticks "$PID")"; w1="$(ticks $workers)"
    rps="$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")"
    p99="$(awk '$1 == "99%" { v = $2; n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /[0-9]s$/ && v !~ /ms$/) n *= 1000; print n }' <<<"$out")"
    errs="$(awk '/Socket errors:/ { gsub(",", ""); n += $4 + $6 + $8 + $10 } /Non-2xx/ { n += $NF } END { print n + 0 }' <<<"$out")"
    line="$(awk -v v="$v" -v r="$rps" -v p="$p99" -v e="$errs" -v m=$((m1 - m0)) -v w=$((w1 - w0)) \
      -v hz="$(getconf CLK_TCK)" -v d="$DURATION" 'BEGIN { n = r * d; us = 1e6 / hz;
      printf "%s %.0f %.2f %.1f %.1f %d\n", v, r, p, m * us / n, w * us / n, e }')"
    echo "$line" >>"$RESULTS"
    log "  round $r: $line"
    stop
  done
done

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -v v="$1" -v c="$2" '$1 == v { print $c }' "$RESULTS" | median; }
range() { awk -v v="$1" -v c="$2" '$1 == v { if (min == "" || $c < min) min = $c; if ($c > max) max = $c } END { printf "%g–%g", min, max }' "$RESULTS"; }
echo
echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit $BUILT_AT, $(nproc) cores, Linux $(uname -r), Node $(node --version):"
echo
echo '```'
echo "benches/ab.sh --rounds $ROUNDS --duration $DURATION ${VARIANTS[*]}"
echo '```'
echo
echo "| variant | req/s (median, range) | p99 ms (median, range) | manager µs/req | workers µs/req | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
seen=" "
for v in "${VARIANTS[@]}"; do
  case "$seen" in *" $v "*) continue ;; esac
  seen="$seen$v "
  printf '| %s | %.0f (%s) | %.2f (%s) | %.1f | %.1f | %d |\n' "$v" "$(col "$v" 2)" "$(range "$v" 2)" \
    "$(col "$v" 3)" "$(range "$v" 3)" "$(col "$v" 4)" "$(col "$v" 5)" \
    "$(awk -v v="$v" '$1 == v { n += $6 } END { print n + 0 }' "$RESULTS")"
done
