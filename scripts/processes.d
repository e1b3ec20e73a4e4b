#!/usr/sbin/dtrace -s
/*
 * processes.d - live event log + summaries for the `processes` cluster
 * master's USDT probes (DTrace: illumos, FreeBSD, macOS).
 * Same output as scripts/processes.bt (the Linux/bpftrace version).
 *
 * USAGE (as root; on macOS System Integrity Protection must allow dtrace):
 *   dtrace -s scripts/processes.d          # every process with the provider
 *   dtrace -s scripts/processes.d PID      # only the master with that pid
 *   ./scripts/processes.d [PID]            # same, after chmod +x
 *
 *   Ctrl-C ends tracing and prints the END summaries.
 *
 * The master must have called usdt::register_probes() (probes::register())
 * before the probes exist; check with: dtrace -l -n 'processes*:::'
 * The provider shows up as processes<PID> (one per process), hence
 * `processes*`. Probe names use dashes (worker-spawn); the double
 * underscores of the .d source (worker__spawn) are only the Rust macro names.
 *
 * Arguments arrive as raw 64-bit values: strings are user-space pointers
 * (copyinstr), signed 32-bit values are cast back with (int).
 *
 * Log columns: ms since tracing started, master pid, event, then key=value.
 */

#pragma D option quiet
#pragma D option defaultargs	/* $1 = 0 when no PID operand is given */
#pragma D option strsize=256	/* worker command lines */
#pragma D option switchrate=10hz

dtrace:::BEGIN
{
	start = timestamp;
	printf("tracing processes*:::* %s ... Ctrl-C to end\n",
	    $1 == 0 ? "in all processes" : "in one pid");
}

processes*:::worker-spawn
/$1 == 0 || pid == $1/
{
	printf("%8d %6d worker-spawn      app=%s slot=%u pid=%d command=\"%s\"\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, copyinstr(arg3));
	@events["worker-spawn"] = count();
}

processes*:::worker-ready
/$1 == 0 || pid == $1/
{
	printf("%8d %6d worker-ready      app=%s slot=%u pid=%d startup_us=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, (uint64_t)arg3);
	@startup_us[copyinstr(arg0)] = quantize(arg3);
	@events["worker-ready"] = count();
}

processes*:::worker-exit
/$1 == 0 || pid == $1/
{
	printf("%8d %6d worker-exit       app=%s slot=%u pid=%d exit_code=%d signal=%d uptime_ms=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, (int)arg3, (int)arg4, (uint64_t)arg5);
	@events["worker-exit"] = count();
}

processes*:::worker-crash
/$1 == 0 || pid == $1/
{
	printf("%8d %6d worker-crash      app=%s slot=%u pid=%d exit_code=%d signal=%d uptime_ms=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, (int)arg3, (int)arg4, (uint64_t)arg5);
	/* key: app, exit_code (-1 = killed by signal), signal (0 = normal exit) */
	@crashes[copyinstr(arg0), (int)arg3, (int)arg4] = count();
	@events["worker-crash"] = count();
}

processes*:::restart-scheduled
/$1 == 0 || pid == $1/
{
	printf("%8d %6d restart-scheduled app=%s slot=%u attempt=%u delay_ms=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (uint32_t)arg2, (uint64_t)arg3);
	@events["restart-scheduled"] = count();
}

processes*:::handle-pass
/$1 == 0 || pid == $1/
{
	printf("%8d %6d handle-pass       app=%s slot=%u pid=%d fd=%d kind=%s\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, (int)arg3, copyinstr(arg4));
	@handles[copyinstr(arg0), (uint32_t)arg1, copyinstr(arg4)] = count();
	@events["handle-pass"] = count();
}

processes*:::sample
/$1 == 0 || pid == $1/
{
	printf("%8d %6d sample            app=%s slot=%u pid=%d busy_permille=%u lag_us=%u rss_kb=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2, (uint32_t)arg3, (uint64_t)arg4, (uint64_t)arg5);
	@events["sample"] = count();
}

processes*:::scale
/$1 == 0 || pid == $1/
{
	printf("%8d %6d scale             app=%s from=%u to=%u reason=%s\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (uint32_t)arg2, copyinstr(arg3));
	@events["scale"] = count();
}

processes*:::reload-start
/$1 == 0 || pid == $1/
{
	printf("%8d %6d reload-start      app=%s workers=%u\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0), (uint32_t)arg1);
	@events["reload-start"] = count();
}

processes*:::reload-done
/$1 == 0 || pid == $1/
{
	printf("%8d %6d reload-done       app=%s replaced=%u ok=%d\n",
	    (timestamp - start) / 1000000, pid, copyinstr(arg0),
	    (uint32_t)arg1, (int)arg2);
	@events["reload-done"] = count();
}

dtrace:::END
{
	printf("\n=== events by probe ===\n");
	printa("  %-20s %@8u\n", @events);
	printf("\n=== handles passed [app, slot, kind] ===\n");
	printa("  %-20s slot=%-4u %-10s %@8u\n", @handles);
	printf("\n=== crashes [app, exit_code (-1 = by signal), signal (0 = normal exit)] ===\n");
	printa("  %-20s exit_code=%-4d signal=%-3d %@8u\n", @crashes);
	printf("\n=== spawn-to-ready latency, startup_us [app] ===\n");
	printa("  %s\n%@d\n", @startup_us);
}
