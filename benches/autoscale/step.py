"""Open-loop fixed-rate step load and per-second recorder for benches/autoscale.sh.

    step.py run --port P --phases 20:10,40:80,120:10 --system processes|uwsgi
                --control SOCK | --stats SOCK  --root-pid PID  --out DIR
    step.py report DIR... [--slo-ms 200] [--max-others PCT]

`run` sends GET / at exactly the rate of each phase (seconds:requests-per-second), evenly
spaced, each request on its own connection (`Connection: close`, as uWSGI's http-socket and
wsgiref answer), without waiting for earlier answers: an open loop. A request's latency runs
from the time it was *scheduled* to be sent to the end of its answer, so a request that the
generator itself sends late (because the machine is saturated) is charged for the delay, and
queueing is never hidden by coordinated omission.

Every 0.5 s (a quarter second off the load's grid) it records the pool size (processes: `processes status --json` → apps[0].size;
uWSGI: its stats socket, workers with a pid and a status other than "cheap"), and every
second the CPU used by the system under test (the root process and its children, including
reaped ones through cutime), by this generator (and the status commands it runs), and by
everything else on the machine ("others", from /proc/stat).

It writes DIR/requests.csv, DIR/seconds.csv, DIR/sizes.csv and DIR/summary.json.
`report` prints the markdown tables over several runs' summaries (medians).
"""
import argparse
import asyncio
import json
import math
import os
import resource
import statistics
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ CPU accounting

def proc_ticks(pid, with_children=True):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime is field 14 → index 11
    t = int(fields[11]) + int(fields[12])
    if with_children:
        t += int(fields[13]) + int(fields[14])
    return t


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree_ticks(root):
    """CPU ticks of root and its live children, plus its reaped children (cutime/cstime)."""
    return proc_ticks(root) + sum(proc_ticks(c) for c in children_of(root))


def host_busy_ticks():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                return v[0] + v[1] + v[2]  # user + nice + system, like benches/http.sh
    return 0


def self_ticks():
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime) * HZ


# ------------------------------------------------------------------ pool size

async def size_processes(bin_path, control):
    p = await asyncio.create_subprocess_exec(
        bin_path, "status", "--control", control, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await p.communicate()
    app = json.loads(out)["apps"][0]
    return app["size"], app.get("ready")


async def size_uwsgi(stats):
    r, w = await asyncio.open_unix_connection(stats)
    data = await r.read()
    w.close()
    workers = json.loads(data)["workers"]
    alive = [x for x in workers if x.get("pid", 0) > 0 and x.get("status") != "cheap"]
    return len(alive), len(alive)


# ------------------------------------------------------------------ load

async def one_request(port, scheduled, results, timeout):
    status = 0
    try:
        async def go():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = await r.read()
            w.close()
            return data
        data = await asyncio.wait_for(go(), timeout)
        line = data.split(b"\r\n", 1)[0].split()
        status = int(line[1]) if len(line) > 1 else -1
    except asyncio.TimeoutError:
        status = -2
    except OSError:
        status = -1
    results.append((scheduled, time.monotonic() - scheduled, status))


async def run(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    phases = []
    for p in args.phases.split(","):
        d, r = p.split(":")
        phases.append((float(d), float(r)))
    total = sum(d for d, _ in phases)
    out = args.out
    os.makedirs(out, exist_ok=True)

    t0 = time.monotonic() + 1.0
    results = []
    sizes = []
    seconds = []
    tasks = set()

    async def sampler():
        get = (lambda: size_processes(args.bin, args.control)) if args.system.startswith("processes") \
            else (lambda: size_uwsgi(args.stats))
        # Off the load's grid by a quarter second: a status request wakes uWSGI's master, which
        # then also runs its busyness check; at the same instant as a phase's first request it
        # would see that worker busy with nothing finished in the cycle and call it 100 % busy.
        nxt = t0 - 0.75
        while True:
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            now = time.monotonic()
            try:
                size, ready = await get()
                sizes.append((now - t0, size, ready))
            except Exception as e:  # a failed sample is a gap, not a failure of the run
                sizes.append((now - t0, None, None))
                print(f"step.py: size sample failed: {e!r}", file=sys.stderr)
            nxt += args.size_interval
            while nxt < time.monotonic():
                nxt += args.size_interval

    async def cpu_meter():
        prev = (time.monotonic(), host_busy_ticks(), tree_ticks(args.root_pid), self_ticks())
        while True:
            await asyncio.sleep(1.0 - ((time.monotonic() - t0) % 1.0))
            cur = (time.monotonic(), host_busy_ticks(), tree_ticks(args.root_pid), self_ticks())
            dt = cur[0] - prev[0]
            host = (cur[1] - prev[1]) / HZ / dt * 100
            sut = (cur[2] - prev[2]) / HZ / dt * 100
            gen = (cur[3] - prev[3]) / HZ / dt * 100
            seconds.append((round(cur[0] - t0, 3), host, sut, gen, max(0.0, host - sut - gen)))
            prev = cur

    bg = [asyncio.create_task(sampler()), asyncio.create_task(cpu_meter())]
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))

    start = t0
    for dur, rate in phases:
        n = int(round(dur * rate))
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(one_request(args.port, scheduled, results, args.timeout))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        start += dur
    # let the tail drain (bounded by the request timeout), then a little more for the sizes
    while tasks and time.monotonic() < start + args.timeout + 1:
        await asyncio.sleep(0.1)
    await asyncio.sleep(max(0.0, start + 1.0 - time.monotonic()))
    for t in bg:
        t.cancel()

    with open(f"{out}/requests.csv", "w") as f:
        f.write("scheduled_s,latency_ms,status\n")
        for s, lat, st in sorted(results):
            f.write(f"{s - t0:.4f},{lat * 1000:.2f},{st}\n")
    with open(f"{out}/sizes.csv", "w") as f:
        f.write("t_s,size,ready\n")
        for t, s, r in sizes:
            f.write(f"{t:.3f},{'' if s is None else s},{'' if r is None else r}\n")
    with open(f"{out}/cpu.csv", "w") as f:
        f.write("t_s,host_pct,system_pct,generator_pct,others_pct\n")
        for row in seconds:
            f.write(",".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in row) + "\n")
    summary = summarize(phases, [(s - t0, lat, st) for s, lat, st in results], sizes, seconds, args)
    summary["system"] = args.system
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(f"{out}/seconds.csv", "w") as f:
        cols = ["t", "phase_rps", "sent", "done", "ok", "p50_ms", "p99_ms", "workers",
                "system_cpu", "others_cpu"]
        f.write(",".join(cols) + "\n")
        for row in summary.pop("per_second"):
            f.write(",".join("" if row[c] is None else str(row[c]) for c in cols) + "\n")
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}))


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    i = max(0, min(len(v) - 1, math.ceil(q * len(v)) - 1))
    return v[i]


def summarize(phases, results, sizes, seconds, args):
    """results: (scheduled offset s, latency s, status); sizes: (t, size, ready)."""
    total = sum(d for d, _ in phases)
    bounds = []  # (start, end, rate)
    s = 0.0
    for d, r in phases:
        bounds.append((s, s + d, r))
        s += d
    high = max(range(len(bounds)), key=lambda i: bounds[i][2])
    hs, he, _ = bounds[high]
    base = bounds[0][2]
    INF = float("inf")

    def lat(x):  # failed requests count as infinitely slow
        return x[1] * 1000 if x[2] == 200 else INF

    all_lat = [lat(x) for x in results]
    high_lat = [lat(x) for x in results if hs <= x[0] < he]
    # the high phase once the step's transient is over: what the pool size it settled on gives
    steady_lat = [lat(x) for x in results if hs + 10 <= x[0] < he]
    errors = sum(1 for x in results if x[2] != 200)

    # size as a step function over [0, total): the last sample at or before t
    samples = [(t, sz) for t, sz, _ in sizes if sz is not None]
    samples.sort()

    def size_at(t):
        cur = samples[0][1] if samples else 0
        for ts, sz in samples:
            if ts <= t:
                cur = sz
            else:
                break
        return cur

    in_run = [(t, sz) for t, sz in samples if 0 <= t < total]
    ws = 0.0
    prev_t, prev_s = 0.0, size_at(0.0)
    for t, sz in in_run:
        ws += prev_s * (t - prev_t)
        prev_t, prev_s = t, sz
    ws += prev_s * (total - prev_t)
    changes = 0
    last = size_at(0.0)
    for _, sz in in_run:
        if sz != last:
            changes += 1
            last = sz
    size0 = size_at(max(0.0, hs - 0.01))
    max_size = max([sz for _, sz in in_run] or [0])
    up = next((t - hs for t, sz in in_run if t >= hs and sz > size0), None)
    to_max = next((t - hs for t, sz in in_run if t >= hs and sz == max_size), None)
    down = next((t - he for t, sz in in_run if t >= he and sz <= size0), None)

    per_second = []
    by_sec = {}
    for x in results:
        by_sec.setdefault(int(x[0]), []).append(x)
    done_by_sec = {}
    for x in results:
        if x[2] == 200:
            k = int(x[0] + x[1])
            done_by_sec[k] = done_by_sec.get(k, 0) + 1
    cpu_by_sec = {int(round(r[0])) - 1: r for r in seconds}
    slo_secs = 0
    for sec in range(int(total)):
        xs = by_sec.get(sec, [])
        ls = [lat(x) for x in xs]
        p99 = pct(ls, 0.99)
        if p99 is not None and p99 > args.slo_ms:
            slo_secs += 1
        rate = next(r for a, b, r in bounds if a <= sec < b)
        cpu = cpu_by_sec.get(sec)
        per_second.append({
            "t": sec, "phase_rps": rate, "sent": len(xs), "done": done_by_sec.get(sec, 0),
            "ok": sum(1 for x in xs if x[2] == 200),
            "p50_ms": None if not ls else round(pct(ls, 0.5), 1),
            "p99_ms": None if p99 is None else round(p99, 1),
            "workers": size_at(sec + 0.999),
            "system_cpu": None if cpu is None else round(cpu[2]),
            "others_cpu": None if cpu is None else round(cpu[4]),
        })
    run_cpu = [r for r in seconds if 0 < r[0] <= total + 0.5]
    others = [r[4] for r in run_cpu]
    # the high phase and the 10 s after it, where noise would hurt the comparison most
    others_high = [r[4] for r in run_cpu if hs < r[0] <= he + 10]
    others_low = [r[4] for r in run_cpu if not hs < r[0] <= he + 10]

    def fin(v):
        return None if v is None or v == INF else round(v, 1)

    return {
        "phases": [{"seconds": d, "rps": r} for d, r in phases],
        "requests": len(results),
        "errors": errors,
        "p50_ms": fin(pct(all_lat, 0.5)),
        "p99_ms": fin(pct(all_lat, 0.99)),
        "high_p50_ms": fin(pct(high_lat, 0.5)),
        "high_p99_ms": fin(pct(high_lat, 0.99)),
        "high_max_ms": fin(max(high_lat) if high_lat else None),
        "steady_p50_ms": fin(pct(steady_lat, 0.5)),
        "steady_p99_ms": fin(pct(steady_lat, 0.99)),
        "slo_ms": args.slo_ms,
        "slo_seconds": slo_secs,
        "worker_seconds": round(ws, 1),
        "max_workers": max_size,
        "workers_before_step": size0,
        "scale_up_s": None if up is None else round(up, 1),
        "to_max_s": None if to_max is None else round(to_max, 1),
        "scale_down_s": None if down is None else round(down, 1),
        "tail_s": round(total - he, 1),
        "scale_changes": changes,
        "system_cpu_pct": round(statistics.mean(r[2] for r in run_cpu), 1) if run_cpu else None,
        "generator_cpu_pct": round(statistics.mean(r[3] for r in run_cpu), 1) if run_cpu else None,
        "others_cpu_pct": round(statistics.mean(others), 1) if others else None,
        "others_max_pct": round(max(others), 1) if others else None,
        "others_high_pct": round(statistics.mean(others_high), 1) if others_high else None,
        "others_low_pct": round(statistics.mean(others_low), 1) if others_low else None,
        "base_rps": base,
        "per_second": per_second,
    }


# ------------------------------------------------------------------ report

def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def is_noisy(r, max_high, max_low):
    """Other processes took more than max_high % of a core during the high phase and the 10 s
    after it (where the load needs most of the machine), or more than max_low % elsewhere."""
    return (r.get("others_high_pct") or 0.0) > max_high or (r.get("others_low_pct") or 0.0) > max_low


def resummarize(d, slo_ms):
    """Recomputes DIR/summary.json from the run's CSVs (after a change to the summary)."""
    with open(os.path.join(d, "summary.json")) as f:
        old = json.load(f)
    phases = [(p["seconds"], p["rps"]) for p in old["phases"]]
    results, sizes, seconds = [], [], []
    with open(os.path.join(d, "requests.csv")) as f:
        next(f)
        for line in f:
            a, b, c = line.strip().split(",")
            results.append((float(a), float(b) / 1000, int(c)))
    with open(os.path.join(d, "sizes.csv")) as f:
        next(f)
        for line in f:
            a, b, c = line.strip().split(",")
            sizes.append((float(a), int(b) if b else None, int(c) if c else None))
    with open(os.path.join(d, "cpu.csv")) as f:
        next(f)
        for line in f:
            seconds.append(tuple(float(x) for x in line.strip().split(",")))
    summary = summarize(phases, results, sizes, seconds, argparse.Namespace(slo_ms=slo_ms))
    summary["system"] = old["system"]
    summary.pop("per_second")
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def report(args):
    runs = []
    for d in args.dirs:
        try:
            with open(os.path.join(d, "summary.json")) as f:
                s = json.load(f)
        except OSError:
            continue
        s["dir"] = d
        s["noisy"] = is_noisy(s, args.max_others, args.max_others_low)
        runs.append(s)
    systems = []
    for s in runs:
        if s["system"] not in systems:
            systems.append(s["system"])
    label = {"processes": "`processes` (PI controller)",
             "processes-250ms": "`processes`, `--sample-interval 250ms`",
             "uwsgi": "uWSGI `cheaper-algo = busyness`"}

    def fmt(v, nd=0):
        if v is None:
            return "–"
        return f"{v:.{nd}f}"

    def kept(sys_):
        rs = [r for r in runs if r["system"] == sys_]
        quiet = [r for r in rs if not r["noisy"]]
        return quiet or rs

    def med(sys_, key, nd=0):
        rs = kept(sys_)
        vals = [r.get(key) for r in rs]
        if key in ("scale_up_s", "scale_down_s", "to_max_s"):
            # a run that never got there counts as later than any run that did
            vals = [math.inf if v is None else v for v in vals]
            m = statistics.median(vals) if vals else None
            if m is None or m == math.inf:
                return f"> {fmt(rs[0]['tail_s'])}" if key == "scale_down_s" else "never"
            return fmt(m, nd)
        return fmt(median(vals), nd)

    print("| system | p99 ms, high phase | p99 ms, high phase from +10 s | p50 ms, high phase from +10 s | "
          f"p99 ms, whole run | seconds with p99 > {args.slo_ms:.0f} ms | worker-seconds | max workers | "
          "s to first scale-up | s to max workers | s to scale back down | scale changes | errors | runs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sys_ in systems:
        n = len(kept(sys_))
        print(f"| {label.get(sys_, sys_)} | {med(sys_, 'high_p99_ms')} | {med(sys_, 'steady_p99_ms')} | "
              f"{med(sys_, 'steady_p50_ms')} | "
              f"{med(sys_, 'p99_ms')} | {med(sys_, 'slo_seconds')} | {med(sys_, 'worker_seconds')} | "
              f"{med(sys_, 'max_workers')} | {med(sys_, 'scale_up_s', 1)} | {med(sys_, 'to_max_s', 1)} | "
              f"{med(sys_, 'scale_down_s', 1)} | {med(sys_, 'scale_changes')} | {med(sys_, 'errors')} | {n} |")
    # every other system against uWSGI (or, without it, the first against the second)
    pairs = [(a, "uwsgi") for a in systems if a != "uwsgi"] if "uwsgi" in systems else \
        ([tuple(systems[:2])] if len(systems) >= 2 else [])
    for a, b in pairs:

        def ratio(key):
            x = median([r.get(key) for r in kept(a)])
            y = median([r.get(key) for r in kept(b)])
            return "–" if not x or not y else f"{x / y:.2f}×"
        print(f"| ratio {a} / {b} | {ratio('high_p99_ms')} | {ratio('steady_p99_ms')} | {ratio('steady_p50_ms')} | "
              f"{ratio('p99_ms')} | {ratio('slo_seconds')} | {ratio('worker_seconds')} | {ratio('max_workers')} | "
              f"{ratio('scale_up_s')} | {ratio('to_max_s')} | {ratio('scale_down_s')} | {ratio('scale_changes')} | | |")
    print()
    noisy = sum(1 for r in runs if r["noisy"])
    print(f"Every run, in the order run. \"others\" is the CPU used by everything else on the machine, "
          f"in % of one core: the mean over the high phase and the 10 s after it / over the rest of the "
          f"run / the highest second. {noisy} of {len(runs)} kept runs had others above "
          f"{args.max_others:.0f} % in the high phase or {args.max_others_low:.0f} % in the rest "
          f"(marked *noisy*; left out of the medians above where the same system has a quieter run).")
    print()
    print("| run | system | p99 ms, high | from +10 s | p99 ms, all | SLO s | worker-s | max | up s | max s | down s | "
          "changes | errors | CPU %: system | generator | others |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        down = "> " + fmt(r["tail_s"]) if r["scale_down_s"] is None else fmt(r["scale_down_s"], 1)
        print(f"| {os.path.basename(r['dir'].rstrip('/'))}{' *noisy*' if r['noisy'] else ''} | {r['system']} | "
              f"{fmt(r['high_p99_ms'])} | {fmt(r.get('steady_p99_ms'))} | {fmt(r['p99_ms'])} | {r['slo_seconds']} | {fmt(r['worker_seconds'])} | "
              f"{r['max_workers']} | {fmt(r['scale_up_s'], 1)} | {fmt(r['to_max_s'], 1)} | {down} | "
              f"{r['scale_changes']} | {r['errors']} | {fmt(r['system_cpu_pct'])} | {fmt(r['generator_cpu_pct'])} | "
              f"{fmt(r.get('others_high_pct'))} / {fmt(r.get('others_low_pct'))} / {fmt(r['others_max_pct'])} |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--phases", required=True)
    r.add_argument("--system", choices=["processes", "processes-250ms", "uwsgi"], required=True)
    r.add_argument("--bin")
    r.add_argument("--control")
    r.add_argument("--stats")
    r.add_argument("--root-pid", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=float, default=30.0)
    r.add_argument("--slo-ms", type=float, default=200.0)
    r.add_argument("--size-interval", type=float, default=0.5)
    r.add_argument("--autogroup-nice", type=int, default=0)
    p = sub.add_parser("report")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--slo-ms", type=float, default=200.0)
    p.add_argument("--max-others", type=float, default=25.0)
    p.add_argument("--max-others-low", type=float, default=100.0)
    q = sub.add_parser("noisy", help="exit 0 if the run in DIR was quiet, 1 if noisy; print its high-phase others")
    q.add_argument("dir")
    q.add_argument("--max-others", type=float, default=25.0)
    q.add_argument("--max-others-low", type=float, default=100.0)
    z = sub.add_parser("resummarize")
    z.add_argument("dirs", nargs="+")
    z.add_argument("--slo-ms", type=float, default=200.0)
    args = ap.parse_args()
    if args.cmd == "run":
        if args.autogroup_nice:
            # own session, so that its scheduler autogroup is its own, at this nice
            try:
                os.setsid()
            except OSError:
                pass
            try:
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(args.autogroup_nice))
            except OSError as e:
                print(f"step.py: could not set the autogroup nice: {e}", file=sys.stderr)
        asyncio.run(run(args))
    elif args.cmd == "noisy":
        with open(os.path.join(args.dir, "summary.json")) as f:
            r = json.load(f)
        print(round(r.get("others_high_pct") or 0.0), round(r.get("others_low_pct") or 0.0))
        sys.exit(1 if is_noisy(r, args.max_others, args.max_others_low) else 0)
    elif args.cmd == "resummarize":
        for d in args.dirs:
            resummarize(d, args.slo_ms)
    else:
        report(args)


if __name__ == "__main__":
    main()
