/*
 * USDT provider for the `processes` cluster master.
 *
 * Parsed by the `usdt` crate (build.rs -> usdt::Builder). Its grammar is a
 * subset of D: argument TYPES only (no argument names), only C-style comments.
 * Supported types: (u)int{8,16,32,64}_t, pointers to those, char *.
 * At most 6 arguments per probe.
 *
 * A double underscore in a probe name becomes a dash in the probe that the
 * tracer sees: worker__spawn -> processes:::worker-spawn (dtrace) /
 * usdt:BIN:processes:worker-spawn (bpftrace). The Rust macro keeps the
 * underscores: processes::worker__spawn!(|| (...)).
 *
 * Common arguments:
 *   app  (char *)   application / cluster name as configured
 *   slot (uint32_t) stable worker slot index within the app, 0-based
 *   pid  (int32_t)  OS pid of the worker process
 */
provider processes {
	/*
	 * A worker process was spawned (fork/exec returned).
	 * arg0 app      char *    application name
	 * arg1 slot     uint32_t  worker slot index
	 * arg2 pid      int32_t   pid of the new worker
	 * arg3 command  char *    command line that was executed (space-joined argv)
	 */
	probe worker__spawn(char *, uint32_t, int32_t, char *);

	/*
	 * A worker reported ready (listening / accepted its handles).
	 * arg0 app         char *    application name
	 * arg1 slot        uint32_t  worker slot index
	 * arg2 pid         int32_t   pid of the worker
	 * arg3 startup_us  uint64_t  microseconds from spawn to ready
	 */
	probe worker__ready(char *, uint32_t, int32_t, uint64_t);

	/*
	 * A worker exited and the master had asked it to (stop, reload, scale down).
	 * arg0 app        char *    application name
	 * arg1 slot       uint32_t  worker slot index
	 * arg2 pid        int32_t   pid of the worker that exited
	 * arg3 exit_code  int32_t   exit status, or -1 when killed by a signal
	 * arg4 signal     int32_t   terminating signal number, or 0 when exited normally
	 * arg5 uptime_ms  uint64_t  milliseconds the worker was alive
	 */
	probe worker__exit(char *, uint32_t, int32_t, int32_t, int32_t, uint64_t);

	/*
	 * A worker exited WITHOUT the master asking (crash, OOM kill, exit(1), ...).
	 * Arguments exactly as worker-exit:
	 * arg0 app        char *    application name
	 * arg1 slot       uint32_t  worker slot index
	 * arg2 pid        int32_t   pid of the worker that exited
	 * arg3 exit_code  int32_t   exit status, or -1 when killed by a signal
	 * arg4 signal     int32_t   terminating signal number, or 0 when exited normally
	 * arg5 uptime_ms  uint64_t  milliseconds the worker was alive
	 */
	probe worker__crash(char *, uint32_t, int32_t, int32_t, int32_t, uint64_t);

	/*
	 * A restart of a slot was scheduled (after crash, with backoff).
	 * arg0 app       char *    application name
	 * arg1 slot      uint32_t  worker slot index
	 * arg2 attempt   uint32_t  restart attempt number for this slot, 1-based
	 * arg3 delay_ms  uint64_t  backoff delay before the respawn, milliseconds
	 */
	probe restart__scheduled(char *, uint32_t, uint32_t, uint64_t);

	/*
	 * The master passed a file descriptor to a worker (SCM_RIGHTS).
	 * arg0 app   char *    application name
	 * arg1 slot  uint32_t  worker slot index
	 * arg2 pid   int32_t   pid of the receiving worker
	 * arg3 fd    int32_t   fd number in the master that was sent
	 * arg4 kind  char *    "listener" or "connection"
	 */
	probe handle__pass(char *, uint32_t, int32_t, int32_t, char *);

	/*
	 * Periodic load sample for one worker.
	 * arg0 app            char *    application name
	 * arg1 slot           uint32_t  worker slot index
	 * arg2 pid            int32_t   pid of the worker
	 * arg3 busy_permille  uint32_t  busy fraction over the sample window, 0..1000
	 * arg4 lag_us         uint64_t  event-loop / heartbeat lag, microseconds
	 * arg5 rss_kb         uint64_t  resident set size, KiB
	 */
	probe sample(char *, uint32_t, int32_t, uint32_t, uint64_t, uint64_t);

	/*
	 * The worker count of an app changed (autoscale or operator).
	 * arg0 app     char *    application name
	 * arg1 from    uint32_t  worker count before
	 * arg2 to      uint32_t  worker count after
	 * arg3 reason  char *    short reason, e.g. "busy", "idle", "manual"
	 */
	probe scale(char *, uint32_t, uint32_t, char *);

	/*
	 * A rolling reload of an app started.
	 * arg0 app      char *    application name
	 * arg1 workers  uint32_t  number of workers to be replaced
	 */
	probe reload__start(char *, uint32_t);

	/*
	 * A rolling reload of an app finished.
	 * arg0 app       char *    application name
	 * arg1 replaced  uint32_t  number of workers actually replaced
	 * arg2 ok        int32_t   1 when the reload succeeded, 0 when it failed/rolled back
	 */
	probe reload__done(char *, uint32_t, int32_t);
};
