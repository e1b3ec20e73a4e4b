#!/usr/bin/env bash
# HTTP side by side: the same trivial Node app (benches/app/server.js) under
#   processes-rr      processes run -i 2 --dispatch round-robin   (the master accepts, passes fds)
#   processes-shared  processes run -i 2 --dispatch shared        (workers accept on the inherited socket)
#   node-cluster-rr   Node's cluster module, 2 workers, round-robin (NODE_CLUSTER_SCHED_POLICY=rr)
#   node-cluster-none Node's cluster module, 2 workers, NODE_CLUSTER_SCHED_POLICY=none
#   pm2               pm2 start server.js -i 2
#   single            one plain `node server.js`, the baseline
# each loaded by wrk twice: a new connection per request (-H 'Connection: close') and keep-alive.
# Every setup is started fresh for each measurement round, and the order of setups rotates per
# round to spread machine noise; the table gives medians over the rounds.
#
# Usage: benches/http.sh [--quick] [--write] [--rounds N] [--duration SECONDS]
#                        [--connections N] [--threads N] [--only a,b,...] [--port-base PORT]
#                        [--max-others PCT] [--tries N]
#   --quick   1 round of 2 s loads (default: 3 rounds of 5 s)
#   --write   also replace the generated block in BENCHMARKS.md
#   a measurement during which other processes used more than --max-others % of a core
#   (default 25) is taken again, up to --tries times in all (default 4); the last is kept, and
#   left out of the medians if the same setup and load has a quieter one
#
# Installs what it needs if missing: wrk (apt-get), PM2 (npm, into target/bench-tools/, never
# committed). PM2 runs with its own PM2_HOME in a temporary directory and its daemon is killed
# after each use. Results also go to target/bench-results/http-<time>.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
APP_DIR="$ROOT/benches/app"
BIN="$ROOT/target/release/processes"
TOOLS="$ROOT/target/bench-tools"
PM2="$TOOLS/node_modules/.bin/pm2"

ROUNDS=3
DURATION=5
CONNS=32
THREADS=2
WARMUP=1
WRITE=0
MAX_OTHERS=25     # % of one core that other processes may use during a measurement
TRIES=4           # measurements repeated while others are above that
NOISY=0; MEASURED=0; LAST=""; LAST_OTHERS=0
PORT_BASE=29100   # below the ephemeral range; a busy port moves the setup up by 100
ALL_SETUPS=(processes-rr processes-shared node-cluster-rr node-cluster-none pm2 single)
SETUPS=("${ALL_SETUPS[@]}")
ARGS="$*"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) ROUNDS=1; DURATION=2 ;;
    --write) WRITE=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --connections) CONNS="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    --port-base) PORT_BASE="$2"; shift ;;
    --max-others) MAX_OTHERS="$2"; shift ;;
    --tries) TRIES="$2"; shift ;;
    --only) IFS=, read -r -a SETUPS <<<"$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "http.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in "${SETUPS[@]}"; do
  case " ${ALL_SETUPS[*]} " in *" $s "*) ;; *) echo "http.sh: unknown setup: $s" >&2; exit 2 ;; esac
done

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"

# ---------------------------------------------------------------- tools
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
if [[ " ${SETUPS[*]} " == *" pm2 "* ]] && [ ! -x "$PM2" ]; then
  log "installing pm2 into $TOOLS"
  mkdir -p "$TOOLS"
  npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >&2
fi
build_release "$ROOT"

# ---------------------------------------------------------------- state and cleanup
TMP="$(mktemp -d /tmp/processes-bench.XXXXXX)"
export PM2_HOME="$TMP/pm2"
CUR_PID=""      # the setup's top process (master, primary, or the single node), our child
CUR_SETUP=""

cat >"$TMP/cluster.js" <<'EOF'
// Node cluster primary for the benchmark: forks 2 workers of server.js; the scheduling policy
// comes from NODE_CLUSTER_SCHED_POLICY. Prints "ready" once both workers are listening.
const cluster = require('cluster');
const n = Number(process.env.WORKERS || 2);
cluster.setupPrimary({ exec: process.argv[2] });
let listening = 0;
cluster.on('listening', () => { if (++listening === n) console.log('ready'); });
for (let i = 0; i < n; i++) cluster.fork();
process.on('SIGTERM', () => {
  for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
  cluster.on('exit', () => { if (Object.keys(cluster.workers).length === 0) process.exit(0); });
});
EOF

wait_port_free() { # port timeout_s
  local i
  for ((i = 0; i < $2 * 20; i++)); do port_free "$1" && return 0; sleep 0.05; done
  return 1
}

stop_setup() {
  local setup="$CUR_SETUP" pid="$CUR_PID" port="${1:-}"
  if [ "$setup" = pm2 ]; then
    "$PM2" kill >/dev/null 2>&1 || true
  fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
      log "WARNING: $setup (pid $pid) still running 10 s after SIGTERM: killing its process group"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  if [ -n "$pid" ]; then wait "$pid" 2>/dev/null || true; fi
  CUR_PID=""; CUR_SETUP=""
  if [ -n "$port" ] && ! wait_port_free "$port" 10; then
    log "WARNING: port $port still in use after stopping $setup:"; ss -Htlnp "sport = :$port" >&2 || true
  fi
}

cleanup() {
  set +e
  stop_setup
  if [ -x "$PM2" ] && [ -d "$PM2_HOME" ]; then "$PM2" kill >/dev/null 2>&1; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setups
start_setup() { # setup port
  local setup="$1" port="$2" log_file="$TMP/$1.log"
  CUR_SETUP="$setup"
  cd "$APP_DIR"
  case "$setup" in
    processes-rr | processes-shared)
      local mode=round-robin; [ "$setup" = processes-shared ] && mode=shared
      setsid "$BIN" run -i 2 --dispatch "$mode" --listen "127.0.0.1:$port" --name "bench-$setup" \
        --control "$TMP/$setup.sock" -- node server.js >>"$log_file" 2>&1 &
      CUR_PID=$! ;;
    node-cluster-rr | node-cluster-none)
      local policy=rr; [ "$setup" = node-cluster-none ] && policy=none
      PORT="$port" NODE_CLUSTER_SCHED_POLICY="$policy" setsid node "$TMP/cluster.js" server.js >>"$log_file" 2>&1 &
      CUR_PID=$! ;;
    pm2)
      PORT="$port" "$PM2" start server.js -i 2 --name bench-pm2 >>"$log_file" 2>&1
      CUR_PID="" ;;
    single)
      PORT="$port" setsid node server.js >>"$log_file" 2>&1 &
      CUR_PID=$! ;;
  esac
  cd - >/dev/null
  # readiness: every worker ready by the setup's own account, then the port answers
  local i ok=0
  for ((i = 0; i < 400; i++)); do
    case "$setup" in
      processes-*) "$BIN" status --control "$TMP/$setup.sock" --json 2>/dev/null | grep -Eq '"ready": *2,' && ok=1 ;;
      node-cluster-*) grep -q '^ready$' "$log_file" && ok=1 ;;
      pm2) [ "$("$PM2" jlist 2>/dev/null | grep -o '"status":"online"' | wc -l)" -ge 2 ] && ok=1 ;;
      single) ok=1 ;;
    esac
    if [ $ok = 1 ] && [ "$(curl -s --max-time 1 "http://127.0.0.1:$port/")" = hi ]; then return 0; fi
    ok=0
    if [ -n "$CUR_PID" ] && ! kill -0 "$CUR_PID" 2>/dev/null; then
      log "ERROR: $setup exited before it was ready; its log:"; tail -20 "$log_file" >&2; exit 1
    fi
    sleep 0.05
  done
  log "ERROR: $setup did not become ready on port $port in 20 s; its log:"; tail -20 "$log_file" >&2
  exit 1
}

manager_pid() { # the process that dispatches (none for single)
  case "$CUR_SETUP" in
    pm2) cat "$PM2_HOME/pm2.pid" 2>/dev/null || true ;;
    single) ;;
    *) echo "$CUR_PID" ;;
  esac
}

worker_pids() {
  case "$CUR_SETUP" in
    single) echo "$CUR_PID" ;;
    *) local m; m="$(manager_pid)"; [ -n "$m" ] && pgrep -P "$m" || true ;;
  esac
}


# ---------------------------------------------------------------- measuring
# results: lines "setup load rps p99_ms errors mgr_cpu workers_cpu wrk_cpu others_cpu noisy" in $TMP/results
to_ms() { # wrk duration like 812.00us, 8.10ms, 1.02s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) ; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}

run_wrk() { # setup load port
  local setup="$1" load="$2" port="$3" out="$TMP/wrk.out" hdr=()
  [ "$load" = close ] && hdr=(-H 'Connection: close')
  local mgr workers m0 w0 m1 w1 a0 a1 hz
  hz="$(getconf CLK_TCK)"
  mgr="$(manager_pid)"; workers="$(worker_pids | tr '\n' ' ')"
  m0="$(ticks $mgr)"; w0="$(ticks $workers)"; a0="$(cpu_busy)"
  # the subshell's `times` second line is wrk's own CPU (children of the subshell)
  ( wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${hdr[@]}" "http://127.0.0.1:$port/" >"$out"; times >"$TMP/times" )
  m1="$(ticks $mgr)"; w1="$(ticks $workers)"; a1="$(cpu_busy)"
  local rps p99 errs wrk_cpu
  rps="$(awk '/^Requests\/sec:/ { print $2 }' "$out")"
  p99="$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")"
  errs="$(awk '/Socket errors:/ { gsub(",", ""); n += $4 + $6 + $8 + $10 } /Non-2xx/ { n += $NF } END { print n + 0 }' "$out")"
  wrk_cpu="$(sed -n 2p "$TMP/times" | awk -v d="$DURATION" '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] } printf "%.0f", 100 * t / d }')"
  local mgr_cpu="-"
  [ -n "$mgr" ] && mgr_cpu="$(awk -v a="$m0" -v b="$m1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.0f", 100 * (b - a) / hz / d }')"
  local w_cpu; w_cpu="$(awk -v a="$w0" -v b="$w1" -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.0f", 100 * (b - a) / hz / d }')"
  # everything else that ran in user or system time meanwhile (other processes on the machine)
  local others; others="$(awk -v a="$a0" -v b="$a1" -v hz="$hz" -v d="$DURATION" -v m="${mgr_cpu/-/0}" -v w="$w_cpu" -v k="$wrk_cpu" \
    'BEGIN { o = 100 * (b - a) / hz / d - m - w - k; if (o < 0) o = 0; printf "%.0f", o }')"
  LAST="$setup $load ${rps:-0} ${p99:-0} $errs $mgr_cpu $w_cpu $wrk_cpu $others"
  LAST_OTHERS="$others"
  log "  $setup $load: ${rps:-0} req/s, p99 ${p99} ms, errors $errs, CPU% manager $mgr_cpu workers $w_cpu wrk $wrk_cpu others $others"
  if [ "$errs" != 0 ]; then grep -E 'Socket errors|Non-2xx' "$out" | sed 's/^/    /' >&2; fi
}

wait_quiet() { # up to 60 s for a second in which other processes use less than MAX_OTHERS % (our idle setup included)
  local i a b
  for ((i = 0; i < 60; i++)); do
    a="$(cpu_busy)"; sleep 1; b="$(cpu_busy)"
    [ $((100 * (b - a) / $(getconf CLK_TCK))) -lt "$MAX_OTHERS" ] && return 0
  done
  log "  the machine stayed busy for 60 s; measuring anyway"
}

# A measurement during which other processes on the machine used more than MAX_OTHERS % of a
# core is repeated (up to TRIES times in all); the last one is kept whatever it shows, and
# counted as noisy in the report.
measure() { # setup load port
  local t
  for ((t = 1; t <= TRIES; t++)); do
    wait_quiet
    run_wrk "$@"
    [ "$LAST_OTHERS" -le "$MAX_OTHERS" ] && break
    [ "$t" -lt "$TRIES" ] && log "  others used ${LAST_OTHERS} % of a core (over $MAX_OTHERS %): measuring again"
  done
  local noisy=0
  [ "$LAST_OTHERS" -le "$MAX_OTHERS" ] || { noisy=1; NOISY=$((NOISY + 1)); }
  echo "$LAST $noisy" >>"$TMP/results"
  MEASURED=$((MEASURED + 1))
}

n=${#SETUPS[@]}
log "setups: ${SETUPS[*]}; $ROUNDS round(s) of ${DURATION}s loads, wrk -t$THREADS -c$CONNS"
for ((r = 0; r < ROUNDS; r++)); do
  log "round $((r + 1))/$ROUNDS"
  for ((k = 0; k < n; k++)); do
    setup="${SETUPS[$(((k + r) % n))]}"
    idx=0; for ((j = 0; j < ${#ALL_SETUPS[@]}; j++)); do [ "${ALL_SETUPS[$j]}" = "$setup" ] && idx=$j; done
    port=$((PORT_BASE + idx))
    while ! port_free "$port"; do port=$((port + 100)); done
    start_setup "$setup" "$port"
    wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP}s" "http://127.0.0.1:$port/" >/dev/null
    measure "$setup" close "$port"
    measure "$setup" keepalive "$port"
    stop_setup "$port"
  done
done

# ---------------------------------------------------------------- report
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print "-"; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { # setup load column -> median over the quiet measurements (over all when none was quiet)
  awk -v s="$1" -v l="$2" -v c="$3" '$1 == s && $2 == l && $c != "-" { v[NR] = $c; q[NR] = !$10; nq += !$10 }
    END { for (i in v) if (q[i] || !nq) print v[i] }' "$TMP/results" | median
}
sumcol() { awk -v s="$1" -v l="$2" -v c="$3" '$1 == s && $2 == l { n += $c } END { print n + 0 }' "$TMP/results"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "–"; else printf "%.2f×", a / b }'; }
fmt_rps() { awk -v a="$1" 'BEGIN { if (a == "-") print "–"; else printf "%.0f", a }'; }
fmt_ms() { awk -v a="$1" 'BEGIN { if (a == "-") print "–"; else printf "%.2f", a }'; }
pct() { fmt_rps "$(col "$@")"; }
label() {
  case "$1" in
    processes-rr) echo "processes, round-robin (fd passing)" ;;
    processes-shared) echo "processes, \`--dispatch shared\`" ;;
    node-cluster-rr) echo "Node cluster, round-robin" ;;
    node-cluster-none) echo "Node cluster, \`SCHED_POLICY=none\`" ;;
    pm2) echo "PM2 \`-i 2\`" ;;
    single) echo "one Node process" ;;
  esac
}

CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
CMD="benches/http.sh${ARGS:+ $ARGS}"
REPORT="$TMP/report.md"
{
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit $BUILT_AT:"
  echo "$(nproc) cores ($CPU_MODEL), Linux $(uname -r), Node $(node --version), $(wrk --version 2>&1 | head -1 | awk '{ print $1, $2 }')$( [ -x "$PM2" ] && echo ", PM2 $("$PM2" --version 2>/dev/null | tail -1)")."
  echo
  echo '```'
  echo "$CMD"
  echo "# per setup and round: wrk -t$THREADS -c$CONNS -d${DURATION}s --latency [-H 'Connection: close'] http://127.0.0.1:PORT/"
  echo "# $ROUNDS round(s); setups restarted and order rotated every round; medians below"
  echo '```'
  echo
  echo "| setup (2 workers) | new conn/request req/s | p99 ms | vs Node RR | vs PM2 | keep-alive req/s | p99 ms | vs Node RR | vs PM2 | errors |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  nc_rr_c="$(col node-cluster-rr close 3)"; nc_rr_k="$(col node-cluster-rr keepalive 3)"
  pm2_c="$(col pm2 close 3)"; pm2_k="$(col pm2 keepalive 3)"
  for s in "${ALL_SETUPS[@]}"; do
    [[ " ${SETUPS[*]} " == *" $s "* ]] || continue
    c="$(col "$s" close 3)"; k="$(col "$s" keepalive 3)"
    errs=$(( $(sumcol "$s" close 5) + $(sumcol "$s" keepalive 5) ))
    echo "| $(label "$s") | $(fmt_rps "$c") | $(fmt_ms "$(col "$s" close 4)") | $(ratio "$c" "$nc_rr_c") | $(ratio "$c" "$pm2_c") | $(fmt_rps "$k") | $(fmt_ms "$(col "$s" keepalive 4)") | $(ratio "$k" "$nc_rr_k") | $(ratio "$k" "$pm2_k") | $errs |"
  done
  echo
  echo "CPU during the loads, median % of one core (2 cores = 200 %); \"manager\" is the process that"
  echo "owns the socket and dispatches: the \`processes\` master, the Node cluster primary, PM2's daemon."
  echo
  echo "\"others\" is user+system time of everything else on the machine meanwhile (noise). $NOISY of"
  echo "$MEASURED measurements still had others above $MAX_OTHERS % after $TRIES tries; the medians leave those out"
  echo "wherever a setup has a quieter measurement of the same load."
  echo
  echo "| setup | new conn: manager | workers | wrk | others | keep-alive: manager | workers | wrk | others |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for s in "${ALL_SETUPS[@]}"; do
    [[ " ${SETUPS[*]} " == *" $s "* ]] || continue
    echo "| $(label "$s") | $(pct "$s" close 6) | $(pct "$s" close 7) | $(pct "$s" close 8) | $(pct "$s" close 9) | $(pct "$s" keepalive 6) | $(pct "$s" keepalive 7) | $(pct "$s" keepalive 8) | $(pct "$s" keepalive 9) |"
  done
  echo
  echo "The same, new connection per request, as CPU time per request (µs; from the medians above)."
  echo "\"free manager\" is the req/s the setup would reach if its manager cost nothing and the rest"
  echo "used the CPU it uses now: an upper bound for any dispatcher that passes each connection."
  echo
  echo "| setup | manager µs/req | workers µs/req | wrk µs/req | total µs/req | req/s with a free manager | vs Node RR |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  for s in processes-rr node-cluster-rr pm2; do
    [[ " ${SETUPS[*]} " == *" $s "* ]] || continue
    awk -v l="$(label "$s")" -v r="$(col "$s" close 3)" -v m="$(col "$s" close 6)" -v w="$(col "$s" close 7)" \
        -v k="$(col "$s" close 8)" -v n="$nc_rr_c" 'BEGIN {
      if (r == "-" || r == 0 || m == "-") { print "| " l " | – | – | – | – | – | – |"; exit }
      us = 1e4 / r; t = m + w + k; free = r * t / (w + k)
      printf "| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %s |\n", l, m * us, w * us, k * us, t * us, free,
        (n == "-" || n == 0) ? "–" : sprintf("%.2f×", free / n) }'
  done
} >"$REPORT"

# master logs: anything above INFO is worth a look
for s in processes-rr processes-shared; do
  [ -f "$TMP/$s.log" ] || continue
  bad="$(grep -aE ' (WARN|ERROR) ' "$TMP/$s.log" | sed 's/\x1b\[[0-9;]*m//g' | grep -v 'stopping\|SIGTERM' || true)"
  if [ -n "$bad" ]; then
    log "$s: warnings or errors in the master's log ($(echo "$bad" | wc -l) lines), first ones:"
    echo "$bad" | head -5 >&2
  fi
done

mkdir -p "$ROOT/target/bench-results"
OUT="$ROOT/target/bench-results/http-$(date +%Y%m%d-%H%M%S).md"
cp "$REPORT" "$OUT"
echo
cat "$REPORT"
echo
log "saved to ${OUT#$ROOT/}"

if [ "$WRITE" = 1 ]; then
  write_block "$ROOT/BENCHMARKS.md" benches/http.sh "$REPORT"
fi
