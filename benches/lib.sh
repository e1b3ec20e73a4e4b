# Helpers shared by the benchmark scripts (sourced by benches/http.sh and benches/autoscale.sh).

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

port_free() { [ -z "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }

# build_release ROOT: builds the release binary and sets BUILT_AT to what it was built from,
# for the report (taken now, not when the report is written: src may change during a run).
build_release() {
  log "building processes (cargo build --release)"
  BUILT_AT="\`$(cd "$1" && git rev-parse --short HEAD 2>/dev/null || echo '?')\`"
  (cd "$1" && git diff --quiet HEAD -- src 2>/dev/null) || BUILT_AT="$BUILT_AT (src/ with uncommitted changes)"
  (cd "$1" && cargo build --release --quiet) >&2
}

# ticks PID...: utime+stime clock ticks summed over the given processes (gone ones count 0)
ticks() {
  local t=0 p f
  for p in "$@"; do
    f="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    f="${f##*) }"
    # shellcheck disable=SC2086
    set -- $f
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}

# user+nice+system clock ticks of the whole machine, all CPUs
cpu_busy() { awk '$1 == "cpu" { print $2 + $3 + $4; exit }' /proc/stat; }

# write_block MARKDOWN NAME REPORT: replaces what lies between the lines
# `<!-- NAME: begin -->` and `<!-- NAME: end -->` of MARKDOWN with the file REPORT.
write_block() {
  local md="$1" name="$2" report="$3"
  local begin="<!-- $name: begin -->" end="<!-- $name: end -->"
  if grep -qF "$begin" "$md" 2>/dev/null && grep -qF "$end" "$md"; then
    awk -v b="$begin" -v e="$end" -v f="$report" '
      $0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
      $0 == e { skip = 0 }
      !skip { print }' "$md" >"$md.tmp.$$"
    mv "$md.tmp.$$" "$md"
    log "updated the generated block in $(basename "$md")"
  else
    log "$(basename "$md") has no '$begin' / '$end' block: not written"
  fi
}
