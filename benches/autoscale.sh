#!/usr/bin/env bash
# Autoscaling on a real step load: the same CPU-bound Python WSGI app (benches/autoscale/app.py,
# BURN_MS of CPU per request, default 20) under
#   processes  processes run --autoscale min=1,max=8 --dispatch shared -- python3 serve.py
#              (serve.py: one single-threaded wsgiref server per worker, on the inherited fd 3)
#   uwsgi      uwsgi --master --http-socket … --workers 8 --cheaper 1 --cheaper-algo busyness
#              (busyness with its defaults: overload 3 s, max 50 %, min 25 %, multiplier 10,
#              backlog alert 33)
# both starting at 1 worker with at most 8, listen backlog 1024 each, on 127.0.0.1.
#
# Load: benches/autoscale/step.py, an open-loop generator at a fixed rate per phase (default
# 20 s at 10 req/s, 40 s at 80 req/s, 150 s at 10 req/s: 0.2, 1.6 and 0.2 cores of work at
# 20 ms a request), a new connection per request, latency from each request's scheduled send
# time. It records per second the achieved rate, p50/p99 latency and the pool size
# (`processes status --json` → apps[0].size; uWSGI's stats socket → workers with a pid and a
# status other than "cheap"), and the CPU of the system, of the generator and of everything
# else on the machine ("others", from /proc/stat).
#
# Usage: benches/autoscale.sh [--quick] [--write] [--rounds N] [--phases S:RPS,S:RPS,...]
#                             [--burn-ms MS] [--only SYSTEM,...] [--nice N]
#                             [--max-others PCT] [--max-others-low PCT] [--tries N] [--slo-ms MS] [--port-base PORT]
#   --quick   1 round of a short step (10 s low, 20 s high, 40 s low)
#   --only    the systems to run, of processes, processes-250ms (the same with
#             --sample-interval 250ms instead of the default 1 s) and uwsgi; default processes,uwsgi
#   --write   also replace the generated block in BENCHMARKS.md
#   --nice N  run both systems and the generator at this nice level (default -5 when root, else
#             0), each in its own session with its scheduler autogroup set to N too (with
#             autogroups, the kernel shares the CPU between sessions first, so a task's own nice
#             alone would not count against other people's builds): their builds then take less
#             from the measurement, the same for both systems
#   --no-shield  do not put the systems and the generator in a cpu cgroup of their own with
#             a high weight (default when root: cgroup v1 cpu.shares 8192, v2 cpu.weight 800, 8×
#             the default), so that others' builds and tests, each a group of weight 1024 / 100,
#             cannot starve the measurement; the cgroup only takes the CPU the load needs
#   a run during which other processes used more than --max-others % of a core (default 25) on
#   average over the high phase and the 10 s after it, or more than --max-others-low % (default
#   100) over the rest, is taken again with a fresh system, up to --tries times in all (default
#   3); the quietest try is kept, marked noisy if it still is, and left out of the medians if the
#   same system has a quiet run
#
# Installs what it needs if missing: python3-venv (apt-get), uWSGI (pip, into
# target/bench-tools/venv, compiled once, ~3 min, never committed). Each system is started fresh
# for every run, the order alternates per round, and the table gives medians over the rounds.
# Results (per-second CSVs, summaries, logs, the report) go to target/bench-results/autoscale-<time>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$ROOT/benches/autoscale"
BIN="$ROOT/target/release/processes"
TOOLS="$ROOT/target/bench-tools"
VENV="$TOOLS/venv"
UWSGI="$VENV/bin/uwsgi"

ROUNDS=3
PHASES="20:10,40:80,150:10"
BURN_MS=20
MAX=8
WRITE=0
MAX_OTHERS=25
MAX_OTHERS_LOW=100
TRIES=3
SLO_MS=200
PORT_BASE=29400
NICE=0; [ "$(id -u)" -eq 0 ] && NICE=-5
SHIELD=1
ALL_SYSTEMS=(processes processes-250ms uwsgi)
SYSTEMS=(processes uwsgi)
ARGS="$*"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) ROUNDS=1; PHASES="10:10,20:80,40:10" ;;
    --write) WRITE=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --phases) PHASES="$2"; shift ;;
    --burn-ms) BURN_MS="$2"; shift ;;
    --only) IFS=, read -r -a SYSTEMS <<<"$2"; shift ;;
    --nice) NICE="$2"; shift ;;
    --no-shield) SHIELD=0 ;;
    --max-others) MAX_OTHERS="$2"; shift ;;
    --max-others-low) MAX_OTHERS_LOW="$2"; shift ;;
    --tries) TRIES="$2"; shift ;;
    --slo-ms) SLO_MS="$2"; shift ;;
    --port-base) PORT_BASE="$2"; shift ;;
    -h|--help) sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "autoscale.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in "${SYSTEMS[@]}"; do
  case " ${ALL_SYSTEMS[*]} " in *" $s "*) ;; *) echo "autoscale.sh: unknown system: $s" >&2; exit 2 ;; esac
done

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"

# ---------------------------------------------------------------- tools
need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
python3 -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  >/dev/null 2>&1 || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
if [[ " ${SYSTEMS[*]} " == *" uwsgi "* ]] && [ ! -x "$UWSGI" ]; then
  log "installing uWSGI into $VENV (compiles, ~3 min; cached for the next runs)"
  mkdir -p "$TOOLS"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q uwsgi >&2
fi
build_release "$ROOT"

# ---------------------------------------------------------------- state and cleanup
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="$ROOT/target/bench-results/autoscale-$STAMP"
mkdir -p "$OUT"
TMP="$(mktemp -d /tmp/processes-autoscale.XXXXXX)"
CUR_PID=""
CUR_SYSTEM=""

# the shield: a cpu cgroup with a high weight for the systems and the generator
CGROUP=""
if [ "$SHIELD" = 1 ] && [ "$(id -u)" -eq 0 ]; then
  if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu/cgroup.procs ]; then
    CGROUP="/sys/fs/cgroup/cpu/processes-bench-$$"
    mkdir -p "$CGROUP" && echo 8192 >"$CGROUP/cpu.shares" || CGROUP=""
  elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
    CGROUP="/sys/fs/cgroup/processes-bench-$$"
    mkdir -p "$CGROUP" && echo 800 >"$CGROUP/cpu.weight" || CGROUP=""
  fi
  [ -n "$CGROUP" ] || log "no writable cpu cgroup: running without the shield"
fi
SHIELD_DESC="none"; [ -n "$CGROUP" ] && SHIELD_DESC="cgroup $(basename "$(dirname "$CGROUP")")/$(basename "$CGROUP") at $(cat "$CGROUP/cpu.shares" 2>/dev/null || echo "weight $(cat "$CGROUP/cpu.weight")")"
# prefix of a command to run it inside the shield cgroup (sh moves itself in, then execs: same pid)
IN_SHIELD=(env)
[ -n "$CGROUP" ] && IN_SHIELD=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CGROUP")

stop_system() {
  local pid="$CUR_PID" port="${1:-}"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
      log "WARNING: $CUR_SYSTEM (pid $pid) still running 10 s after SIGTERM: killing its process group"
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  if [ -n "$pid" ]; then wait "$pid" 2>/dev/null || true; fi
  CUR_PID=""; CUR_SYSTEM=""
  if [ -n "$port" ]; then
    local i
    for ((i = 0; i < 200; i++)); do port_free "$port" && break; sleep 0.05; done
  fi
}

cleanup() {
  set +e
  stop_system
  rm -rf "$TMP"
  if [ -n "$CGROUP" ]; then
    local i
    for ((i = 0; i < 50; i++)); do rmdir "$CGROUP" 2>/dev/null && break; sleep 0.1; done
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- systems
size_now() { # pool size by the system's own account
  case "$CUR_SYSTEM" in
    processes*) "$BIN" status --control "$TMP/processes.sock" --json 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["apps"][0]["ready"])' 2>/dev/null || echo 0 ;;
    uwsgi) python3 - "$TMP/uwsgi-stats.sock" <<'EOF' 2>/dev/null || echo 0
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); d = b""
while True:
    c = s.recv(65536)
    if not c: break
    d += c
print(sum(1 for w in json.loads(d)["workers"] if w["pid"] > 0 and w["status"] != "cheap"))
EOF
      ;;
  esac
}

start_system() { # system port log
  local system="$1" port="$2" log_file="$3"
  CUR_SYSTEM="$system"
  rm -f "$TMP/processes.sock" "$TMP/uwsgi-stats.sock"
  cd "$DIR"
  case "$system" in
    processes*)
      local tick=1s
      [ "$system" = processes-250ms ] && tick=250ms
      "${IN_SHIELD[@]}" nice -n "$NICE" setsid "$BIN" run --name bench-autoscale --control "$TMP/processes.sock" \
        --sample-interval "$tick" \
        --autoscale "min=1,max=$MAX" --dispatch shared --listen "127.0.0.1:$port" --env "BURN_MS=$BURN_MS" \
        -- python3 serve.py >"$log_file" 2>&1 &
      CUR_PID=$! ;;
    uwsgi)
      BURN_MS="$BURN_MS" "${IN_SHIELD[@]}" nice -n "$NICE" setsid "$UWSGI" --master --http-socket "127.0.0.1:$port" \
        --wsgi-file app.py --need-app --workers "$MAX" --cheaper 1 --cheaper-initial 1 \
        --cheaper-algo busyness --listen 1024 --stats "$TMP/uwsgi-stats.sock" \
        --die-on-term --disable-logging >"$log_file" 2>&1 &
      CUR_PID=$! ;;
  esac
  cd - >/dev/null
  set_autogroup "$CUR_PID"
  local i
  for ((i = 0; i < 400; i++)); do
    if [ "$(size_now)" = 1 ] && [ "$(curl -s --max-time 2 "http://127.0.0.1:$port/")" = ok ]; then return 0; fi
    if ! kill -0 "$CUR_PID" 2>/dev/null; then
      log "ERROR: $system exited before it was ready; its log:"; tail -20 "$log_file" >&2; exit 1
    fi
    sleep 0.05
  done
  log "ERROR: $system did not become ready on port $port in 20 s; its log:"; tail -20 "$log_file" >&2
  exit 1
}

set_autogroup() { # pid: the nice of its session's scheduler autogroup, once it leads its own session
  [ "$NICE" = 0 ] && return 0
  [ -w "/proc/$1/autogroup" ] || return 0
  local i
  for ((i = 0; i < 100; i++)); do
    [ "$(ps -o sid= -p "$1" 2>/dev/null | tr -d ' ')" = "$1" ] && break
    sleep 0.02
  done
  [ "$(ps -o sid= -p "$1" 2>/dev/null | tr -d ' ')" = "$1" ] || { log "WARNING: pid $1 does not lead a session: autogroup left alone"; return 0; }
  echo "$NICE" >"/proc/$1/autogroup" 2>/dev/null || log "WARNING: could not set the autogroup nice of pid $1"
}


wait_quiet() { # up to 120 s for 3 s in a row in which the machine uses less than MAX_OTHERS % (our idle system included)
  local i a b quiet=0
  for ((i = 0; i < 120; i++)); do
    a="$(cpu_busy)"; sleep 1; b="$(cpu_busy)"
    if [ $((100 * (b - a) / $(getconf CLK_TCK))) -lt "$MAX_OTHERS" ]; then
      quiet=$((quiet + 1)); [ "$quiet" -ge 3 ] && return 0
    else
      quiet=0
    fi
  done
  log "  the machine stayed busy for 120 s; measuring anyway"
}

NOISY=0; RUNS=0
KEPT=()
measure() { # round system port
  local round="$1" system="$2" port="$3" t run others quiet=0 best="" best_others=""
  local base="$OUT/r$round-$system"
  for ((t = 1; t <= TRIES; t++)); do
    run="$base-try$t"
    mkdir -p "$run"
    start_system "$system" "$port" "$run/system.log"
    wait_quiet
    sleep 2
    log "  $system: step load $PHASES (req/s), ${BURN_MS} ms of CPU per request, try $t"
    local extra=(--control "$TMP/processes.sock" --bin "$BIN")
    [ "$system" = uwsgi ] && extra=(--stats "$TMP/uwsgi-stats.sock")
    "${IN_SHIELD[@]}" nice -n "$NICE" python3 "$DIR/step.py" run --autogroup-nice "$NICE" --system "$system" --port "$port" --phases "$PHASES" \
      --root-pid "$CUR_PID" --slo-ms "$SLO_MS" --out "$run" "${extra[@]}" >"$run/step.out" 2>"$run/step.err" || {
      log "ERROR: step.py failed:"; cat "$run/step.err" >&2; exit 1; }
    stop_system "$port"
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))
print("  p99 high %s ms, all %s ms; %s s over SLO; %s worker-s; max %s workers; up %s s, down %s s; %s changes; %s errors; CPU%% system %s; others %s high, %s rest" % tuple(s[k] for k in
  ("high_p99_ms", "p99_ms", "slo_seconds", "worker_seconds", "max_workers", "scale_up_s", "scale_down_s", "scale_changes", "errors", "system_cpu_pct", "others_high_pct", "others_low_pct")))' \
      "$run/summary.json" >&2
    quiet=0
    others="$(python3 "$DIR/step.py" noisy "$run" --max-others "$MAX_OTHERS" --max-others-low "$MAX_OTHERS_LOW")" && quiet=1
    others="${others%% *}"
    if [ -z "$best" ] || [ "$quiet" = 1 ] || [ "$others" -lt "$best_others" ]; then best="$run"; best_others="$others"; fi
    [ "$quiet" = 1 ] && break
    [ "$t" -lt "$TRIES" ] && log "  others took too much CPU (${others} % of a core in the high phase): running again"
  done
  # the kept try: the quiet one, else the one with the least noise in the high phase
  mv "$best" "$base"
  python3 "$DIR/step.py" noisy "$base" --max-others "$MAX_OTHERS" --max-others-low "$MAX_OTHERS_LOW" >/dev/null || NOISY=$((NOISY + 1))
  RUNS=$((RUNS + 1))
  KEPT+=("$base")
}

n=${#SYSTEMS[@]}
log "systems: ${SYSTEMS[*]}; $ROUNDS round(s); phases $PHASES; nice $NICE; shield: $SHIELD_DESC; results in ${OUT#$ROOT/}"
for ((r = 0; r < ROUNDS; r++)); do
  log "round $((r + 1))/$ROUNDS"
  for ((k = 0; k < n; k++)); do
    system="${SYSTEMS[$(((k + r) % n))]}"
    port=$((PORT_BASE + k))
    while ! port_free "$port"; do port=$((port + 100)); done
    measure "$((r + 1))" "$system" "$port"
  done
done

# ---------------------------------------------------------------- report
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
REPORT="$OUT/report.md"
{
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit $BUILT_AT:"
  echo "$(nproc) cores ($CPU_MODEL), Linux $(uname -r), Python $(python3 -c 'import platform; print(platform.python_version())'), uWSGI $("$UWSGI" --version 2>/dev/null || echo '?')."
  echo
  echo '```'
  echo "benches/autoscale.sh${ARGS:+ $ARGS}"
  echo "# phases (seconds:req/s) $PHASES, ${BURN_MS} ms of CPU per request, pools 1..$MAX, nice $NICE, shield: $SHIELD_DESC"
  echo "# $ROUNDS round(s); each system started fresh for every run, order alternated; medians below"
  echo '```'
  echo
  python3 "$DIR/step.py" report --slo-ms "$SLO_MS" --max-others "$MAX_OTHERS" --max-others-low "$MAX_OTHERS_LOW" "${KEPT[@]}"
} >"$REPORT"
echo
cat "$REPORT"
echo
log "saved to ${OUT#$ROOT/} ($NOISY of $RUNS runs still noisy after $TRIES tries)"

if [ "$WRITE" = 1 ]; then
  write_block "$ROOT/BENCHMARKS.md" benches/autoscale.sh "$REPORT"
fi
