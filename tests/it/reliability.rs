//! The reliability suite: what the master survives, measured from outside through `/proc`.
//!
//! Chaos (a random worker SIGKILLed every 100 ms under load), a soak (connections passed
//! round-robin to workers restarted every few thousand), a crash-looping app beside a
//! healthy one, hostile workers (forking, ignoring SIGTERM, closing or abusing their
//! channel), an output flood next to a crash, and the master's own death. Each test states
//! its figures on stderr (`RELIABILITY:` lines) and fails when a promise does not hold;
//! `RELIABILITY.md` collects them. CI runs short versions; `scripts/reliability.sh` sets
//! the environment variables below for the long ones:
//!
//! * `PROCESSES_CHAOS_SECS` (default 8) — how long workers are killed;
//! * `PROCESSES_SOAK_CONNECTIONS` (default 20000), `PROCESSES_SOAK_RESTART_EVERY`
//!   (default 2000) — connections in the soak, and how many between restarts;
//! * `PROCESSES_CRASHLOOP_SECS` (default 5) — how long the master's CPU is measured while
//!   an app crash-loops;
//! * `PROCESSES_FLOOD_KILLS` (default 20) — crashes timed next to an output flood.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

// ---- measuring from /proc ----------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Open fds of a process (`/proc/PID/fd`).
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What the open fds of a process are, for a failure message.
fn fd_list(pid: i32) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{}→{target}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Resident set size in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Fields of `/proc/PID/stat` after the command name: `[0]` is the state, `[1]` the ppid.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .map(String::from)
            .collect(),
    )
}

/// CPU time a process used (utime + stime), its own threads only.
fn cpu_time(pid: i32) -> Duration {
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = stat_fields(pid)
        .map(|f| f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0))
        .unwrap_or(0);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// A process as `PID.STARTTIME` (start time in clock ticks since boot), the way the fixture
/// names itself: unique where a pid alone is reused.
fn worker_id(pid: i32) -> String {
    let start = stat_fields(pid)
        .and_then(|f| f.get(19).cloned())
        .unwrap_or_default();
    format!("{pid}.{start}")
}

/// Children of `pid` with their state letter.
fn children_of(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(f) = stat_fields(child)
            && f.get(1).map(String::as_str) == Some(pid.to_string().as_str())
        {
            out.push((child, f[0].clone()));
        }
    }
    out
}

fn zombies_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|(_, s)| s == "Z")
        .map(|(p, _)| p)
        .collect()
}

/// Whether `/proc/PID` is gone: the process exited and was reaped.
fn reaped(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `f` every few ms until it holds or `timeout` passes; returns whether it held.
fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A figure for RELIABILITY.md, on stderr (nextest shows it with `--no-capture`).
fn report(what: &str, figures: String) {
    eprintln!("RELIABILITY: {what}: {figures}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i]
}

/// A small deterministic generator; the seed is printed so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = env_u64(
            "PROCESSES_RELIABILITY_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        eprintln!("seed: PROCESSES_RELIABILITY_SEED={seed}");
        Rng(seed | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The master's RSS at a moment.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_kib: u64,
}

impl Footprint {
    fn of(pid: i32) -> Footprint {
        Footprint {
            rss_kib: rss_kib(pid),
        }
    }
}

/// The master's open fds at a quiet moment: every worker's `/proc/PID/task/PID/stat` is
/// open (the sampler opens it at its first tick after the worker started) and the list
/// holds still for 200 ms, so no connection or control client is passing through.
fn settled_fds(m: &Master) -> Vec<String> {
    let pid = m.pid();
    let mut last = Vec::new();
    let ok = poll(Duration::from_secs(15), || {
        let Some(s) = m.status() else { return false };
        let workers: Vec<i64> = s["apps"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|a| a["workers"].as_array().unwrap().iter())
            .map(|w| w["pid"].as_i64().unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let now = fd_list(pid);
        let sampled = workers.iter().all(|w| {
            now.iter()
                .any(|f| f.ends_with(&format!("/proc/{w}/task/{w}/stat")))
        });
        let still = now == last;
        last = now;
        sampled && still
    });
    if !ok {
        m.fail(&format!("the master's fds never settled: {last:?}"));
    }
    last
}

/// Waits until the master holds exactly as many fds as at `baseline`; fails with the fds
/// that came and went.
fn wait_fds_back(m: &Master, baseline: &[String]) -> Vec<String> {
    let mut now = Vec::new();
    let back = poll(Duration::from_secs(10), || {
        now = settled_fds(m);
        now.len() == baseline.len()
    });
    if !back {
        let new: Vec<&String> = now.iter().filter(|f| !baseline.contains(f)).collect();
        let gone: Vec<&String> = baseline.iter().filter(|f| !now.contains(f)).collect();
        m.fail(&format!(
            "the master holds {} fds, {} at the start; new: {new:?}; gone: {gone:?}",
            now.len(),
            baseline.len()
        ));
    }
    now
}

/// Fds of the master open on /dev/null, besides its stdin.
/// The master's fds open on `/dev/null` (what the hostile fixture sends), besides those it
/// already had when the test began (stdin, or fds its own parent left it).
fn dev_null_fds(pid: i32, before: &[String]) -> Vec<String> {
    fd_list(pid)
        .into_iter()
        .filter(|f| f.ends_with("→/dev/null") && !f.starts_with("0→") && !before.contains(f))
        .collect()
}

/// A config in a fresh temp dir, run with the master's default log level (`info`), for
/// tests that measure the master rather than read its debug log.
fn run_config_info(toml: &str) -> Master {
    let dir = tempfile::tempdir().unwrap();
    let text = toml
        .replace("{fixture}", FIXTURE)
        .replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("processes.toml"), text).unwrap();
    let control = dir.path().join("control.sock");
    run_with(dir, control, &["-c", "processes.toml"], |c| {
        c.env("PROCESSES_LOG", "info");
    })
}

fn wait_no_zombies(m: &Master) {
    let pid = m.pid();
    if !poll(Duration::from_secs(5), || zombies_of(pid).is_empty()) {
        m.fail(&format!("zombies left: {:?}", zombies_of(pid)));
    }
}

fn assert_up(m: &mut Master) {
    if let Ok(Some(status)) = m.child.try_wait() {
        m.fail(&format!("the master exited: {status:?}"));
    }
}

// ---- a client that knows which worker had its connection ---------------------------------

/// What became of one connection (workers run with `greet`). `worker` is the worker's
/// `PID.STARTTIME`: pids are reused within a long run (each connection is a thread).
#[derive(Debug, Clone)]
enum Outcome {
    Ok {
        worker: String,
    },
    /// The worker said hello, then the connection failed.
    #[allow(dead_code)] // read through `Debug` in failure messages
    FailedAfterHello {
        worker: String,
        error: String,
    },
    /// It failed before any worker said hello: it was in the kernel's backlog, in the
    /// master's queue, or just handed to a worker.
    #[allow(dead_code)] // read through `Debug` in failure messages
    FailedBeforeHello {
        error: String,
    },
}

/// Connects, reads the worker's hello, sends a GET and reads the whole answer. Closes with
/// a reset (linger 0) so that a million connections leave no TIME_WAIT behind.
fn greeted_request(port: u16) -> Outcome {
    let mut hello = None;
    let result = (|| -> std::io::Result<String> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let (pid, worker) = line
            .trim()
            .strip_prefix("hello pid=")
            .and_then(|rest| rest.split_once(" worker="))
            .and_then(|(p, w)| Some((p.parse::<i32>().ok()?, w.to_string())))
            .ok_or_else(|| std::io::Error::other(format!("no hello: {line:?}")))?;
        hello = Some(worker.clone());
        (&stream).write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")?;
        // The answer: a head with content-length, then `slot=N pid=P\n`.
        let mut head = String::new();
        let mut len = None;
        loop {
            head.clear();
            if reader.read_line(&mut head)? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            if head == "\r\n" {
                break;
            }
            if let Some(v) = head.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0u8; len.ok_or_else(|| std::io::Error::other("no length"))?];
        reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body);
        if !body.ends_with(&format!("pid={pid}\n")) {
            return Err(std::io::Error::other(format!(
                "answered by another worker than the one that said hello ({pid}): {body:?}"
            )));
        }
        // Anything more (a second hello) means a second worker had this connection.
        if !reader.buffer().is_empty() {
            return Err(std::io::Error::other(format!(
                "unexpected bytes after the answer: {:?}",
                String::from_utf8_lossy(reader.buffer())
            )));
        }
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        Ok(worker)
    })();
    match (result, hello) {
        (Ok(worker), _) => Outcome::Ok { worker },
        (Err(e), Some(worker)) => Outcome::FailedAfterHello {
            worker,
            error: e.to_string(),
        },
        (Err(e), None) => Outcome::FailedBeforeHello {
            error: e.to_string(),
        },
    }
}

/// Client threads making greeted requests until stopped (or until `limit` in total).
struct GreetLoad {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<Outcome>>>,
    /// Answered connections per worker pid.
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl GreetLoad {
    fn start(port: u16, clients: usize, limit: Option<u64>) -> GreetLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, started, ok, failures, served) = (
                    stop.clone(),
                    started.clone(),
                    ok.clone(),
                    failures.clone(),
                    served.clone(),
                );
                std::thread::spawn(move || {
                    let mut mine: BTreeMap<String, u64> = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        let n = started.fetch_add(1, Ordering::Relaxed);
                        if limit.is_some_and(|l| n >= l) {
                            started.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                        match greeted_request(port) {
                            Outcome::Ok { worker } => {
                                *mine.entry(worker).or_default() += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.lock().unwrap().push(other),
                        }
                    }
                    let mut all = served.lock().unwrap();
                    for (pid, n) in mine {
                        *all.entry(pid).or_default() += n;
                    }
                })
            })
            .collect();
        GreetLoad {
            stop,
            started,
            ok,
            failures,
            served,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().len()
    }

    fn finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Stops the clients: (connections made, failures, answered per pid).
    fn stop(self) -> (u64, Vec<Outcome>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let served = self.served.lock().unwrap().clone();
        (self.started.load(Ordering::Relaxed), failures, served)
    }
}

fn ready_pids(s: &Value, app: usize) -> Vec<i32> {
    s["apps"][app]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

// ---- chaos ------------------------------------------------------------------------------

/// A random worker SIGKILLed every 100 ms under continuous load. The master stays up, the
/// pool is back at its size after each kill, no connection a surviving worker said hello
/// on fails, and at the end the master holds exactly the fds it held at the start, its
/// RSS is within 5 MiB of the start, and no zombie is left.
#[test]
fn chaos_a_worker_killed_every_100ms_under_load() {
    const WORKERS: usize = 4;
    let secs = env_u64("PROCESSES_CHAOS_SECS", 8);
    let mut m = run_config(
        r#"
        [apps.web]
        command = ["{fixture}", "serve", "greet", "delay=5"]
        instances = 4
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "20ms"
        [apps.web.backoff]
        initial = "10ms"
        max = "20ms"
        reset_after = "50ms"
        crash_loop_restarts = 1000
        crash_loop_window = "1s"
        "#,
        &[],
    );
    // The master's log at debug level is part of what it does; keep it, it is cheap.
    let port = m.port();
    let pid = m.pid();
    let mut rng = Rng::from_env();
    // Killed workers by `PID.STARTTIME`, as they say hello.
    let mut killed: BTreeSet<String> = BTreeSet::new();

    // One round: kill a random ready worker, wait for the pool to be whole again.
    let mut kill_one = |m: &Master, killed: &mut BTreeSet<String>| -> Duration {
        let s = m.wait_status("a whole pool", |s| {
            ready_pids(s, 0).len() == WORKERS
                && s["apps"][0]["workers"].as_array().unwrap().len() == WORKERS
        });
        let live = ready_pids(&s, 0);
        let victim = live[rng.below(live.len())];
        // Named before the kill: once reaped, its /proc entry is gone.
        killed.insert(worker_id(victim));
        let t0 = Instant::now();
        kill(victim, libc::SIGKILL);
        m.wait_status("the pool back at its size", |s| {
            let p = ready_pids(s, 0);
            p.len() == WORKERS && !p.contains(&victim)
        });
        t0.elapsed()
    };

    // Warm up (allocator arenas, tokio's pools, the first restarts), then take the
    // baseline at a quiet moment.
    m.wait_ready(WORKERS);
    let warm = GreetLoad::start(port, 4, None);
    for _ in 0..10 {
        kill_one(&m, &mut killed);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, warm_failures, _) = warm.stop();
    m.wait_ready(WORKERS);
    wait_no_zombies(&m);
    let baseline_fds = settled_fds(&m);
    let base = Footprint::of(pid);

    let load = GreetLoad::start(port, 4, None);
    let cpu0 = cpu_time(pid);
    let t_start = Instant::now();
    let mut recoveries = Vec::new();
    let mut next = Instant::now();
    while t_start.elapsed() < Duration::from_secs(secs) {
        assert_up(&mut m);
        recoveries.push(kill_one(&m, &mut killed));
        next += Duration::from_millis(100);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    let wall = t_start.elapsed();
    let cpu = cpu_time(pid) - cpu0;
    let (made, failures, _) = load.stop();
    assert_up(&mut m);

    m.wait_ready(WORKERS);
    wait_no_zombies(&m);
    let end_fds = wait_fds_back(&m, &baseline_fds);
    let end = Footprint::of(pid);

    let mut after_hello_killed = 0;
    let mut after_hello_survivor = Vec::new();
    let mut before_hello = Vec::new();
    for f in failures.iter().chain(&warm_failures) {
        match f {
            Outcome::FailedAfterHello { worker, .. } if killed.contains(worker) => {
                after_hello_killed += 1
            }
            Outcome::FailedAfterHello { .. } => after_hello_survivor.push(f.clone()),
            Outcome::FailedBeforeHello { .. } => before_hello.push(f.clone()),
            Outcome::Ok { .. } => {}
        }
    }
    recoveries.sort();
    let kills = recoveries.len();
    if !before_hello.is_empty() {
        eprintln!("failed before a hello: {before_hello:?}");
    }
    report(
        "chaos",
        format!(
            "{secs}s, {kills} kills, {made} connections, lost with a killed worker {after_hello_killed}, \
             failed on a survivor {}, failed before a hello {}, recovery p50 {:?} p99 {:?} max {:?}, \
             fds {} → {}, RSS {} → {} KiB, master CPU {:.1}% of a core",
            after_hello_survivor.len(),
            before_hello.len(),
            percentile(&recoveries, 50.0),
            percentile(&recoveries, 99.0),
            recoveries.last().unwrap(),
            baseline_fds.len(),
            end_fds.len(),
            base.rss_kib,
            end.rss_kib,
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
        ),
    );
    assert!(
        after_hello_survivor.is_empty(),
        "connections of surviving workers failed: {after_hello_survivor:?}"
    );
    // A connection can only be lost with the worker that held it: before its hello, that
    // is the moment between the worker taking it off the channel and writing the hello.
    assert!(
        before_hello.len() <= kills / 20 + 1,
        "{} connections failed before any worker said hello ({kills} kills): {:?}",
        before_hello.len(),
        &before_hello[..before_hello.len().min(5)]
    );
    assert!(
        end.rss_kib <= base.rss_kib + 5 * 1024,
        "the master's RSS grew from {} to {} KiB over {kills} restarts",
        base.rss_kib,
        end.rss_kib
    );
}

// ---- soak -------------------------------------------------------------------------------

/// Connections passed round-robin to workers that are replaced every few thousand: every
/// connection answered, exactly once (the workers' own counts add up to the number of
/// connections), the master's fds back to the start and its RSS flat.
#[test]
fn soak_connections_passed_round_robin_across_restarts() {
    const WORKERS: u32 = 4;
    let total = env_u64("PROCESSES_SOAK_CONNECTIONS", 20_000);
    let every = env_u64("PROCESSES_SOAK_RESTART_EVERY", 2_000);
    let dir = tempfile::tempdir().unwrap();
    let tally = dir.path().join("tally");
    std::fs::create_dir(&tally).unwrap();
    let config = format!(
        r#"
        [apps.web]
        command = ["{FIXTURE}", "serve", "greet", "graceful", "tally={}"]
        instances = {WORKERS}
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "20ms"
        grace = "30s"
        "#,
        tally.display()
    );
    std::fs::write(dir.path().join("processes.toml"), config).unwrap();
    // The soak is about the master, not its debug log: run it at its default level.
    let control = dir.path().join("control.sock");
    let mut m = run_with(dir, control, &["-c", "processes.toml"], |c| {
        c.env("PROCESSES_LOG", "info");
    });
    let port = m.port();
    let pid = m.pid();
    m.wait_ready(WORKERS as usize);

    // Warm up, then take the baseline at a quiet moment.
    let warm = GreetLoad::start(port, 4, Some(2_000));
    while !warm.finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (warm_made, warm_failures, warm_served) = warm.stop();
    assert!(warm_failures.is_empty(), "{warm_failures:?}");
    let baseline_fds = settled_fds(&m);
    let base = Footprint::of(pid);

    let load = GreetLoad::start(port, 4, Some(total));
    let t0 = Instant::now();
    let cpu0 = cpu_time(pid);
    let mut restarts = 0u64;
    let mut rss_seen = Vec::new();
    let mut fds_seen = Vec::new();
    while !load.finished() {
        let done = load.ok() + load.failed() as u64;
        if done >= (restarts + 1) * every && done < total {
            let slot = (restarts % u64::from(WORKERS)) as u32;
            let s = m.status().unwrap();
            let old = s["apps"][0]["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["slot"] == slot)
                .map(|w| w["pid"].as_i64().unwrap())
                .unwrap();
            processes::control::request(
                &m.control,
                &processes::control::Request::Restart {
                    app: "web".into(),
                    slot,
                },
            )
            .unwrap_or_else(|e| m.fail(&format!("restart slot {slot}: {e}")));
            m.wait_status("the slot replaced", |s| {
                let w = s["apps"][0]["workers"].as_array().unwrap();
                w.len() == WORKERS as usize
                    && s["apps"][0]["ready"] == WORKERS
                    && w.iter().all(|w| w["pid"] != old)
            });
            restarts += 1;
            rss_seen.push(rss_kib(pid));
            fds_seen.push(fd_count(pid));
            assert_up(&mut m);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed();
    let cpu = cpu_time(pid) - cpu0;
    let (made, failures, served) = load.stop();
    m.wait_ready(WORKERS as usize);
    let end_fds = wait_fds_back(&m, &baseline_fds);
    wait_no_zombies(&m);
    let end = Footprint::of(pid);

    // Stop gracefully: every worker writes how many connections it received.
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(Duration::from_secs(30)).success());
    let mut tallied = 0u64;
    let mut tallies = BTreeMap::new();
    for e in std::fs::read_dir(&tally).unwrap().flatten() {
        let n: u64 = std::fs::read_to_string(e.path())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let p = e.file_name().to_string_lossy().into_owned();
        tallies.insert(p, n);
        tallied += n;
    }
    let mut answered: BTreeMap<String, u64> = warm_served;
    for (p, n) in served {
        *answered.entry(p).or_default() += n;
    }
    let rss_max = rss_seen.iter().copied().max().unwrap_or(0);
    let fds_max = fds_seen.iter().copied().max().unwrap_or(0);
    report(
        "soak",
        format!(
            "{made} connections (+{warm_made} warm-up) in {:.1}s ({:.0}/s), {restarts} restarts, \
             {} workers, failed {}, received by workers {tallied}, fds {} → {} (max {fds_max} \
             after a restart), RSS {} → {} KiB (after the first restart {}, the middle one {}, the \
             last {}, max {rss_max}), master CPU {:.0}% of a core",
            wall.as_secs_f64(),
            made as f64 / wall.as_secs_f64(),
            tallies.len(),
            failures.len(),
            baseline_fds.len(),
            end_fds.len(),
            base.rss_kib,
            end.rss_kib,
            rss_seen.first().copied().unwrap_or(0),
            rss_seen.get(rss_seen.len() / 2).copied().unwrap_or(0),
            rss_seen.last().copied().unwrap_or(0),
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
        ),
    );
    assert!(
        failures.is_empty(),
        "{} of {made} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(made, total);
    // Each worker's count of connections received matches what clients saw it answer:
    // none lost on the way, none passed twice.
    for (p, n) in &answered {
        assert_eq!(
            tallies.get(p),
            Some(n),
            "worker {p} answered {n} connections but counted {:?} received",
            tallies.get(p)
        );
    }
    assert_eq!(tallied, made + warm_made, "{tallies:?}");
    assert!(
        end.rss_kib <= base.rss_kib + 5 * 1024,
        "the master's RSS grew from {} to {} KiB over {made} connections",
        base.rss_kib,
        end.rss_kib
    );
}

// ---- a crash-looping app beside a healthy one ------------------------------------------

/// A `Duration`'s `Debug` form as the master logs it: `312.5ms`, `1.2s`, `850µs`.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim_end_matches([';', ',', ')']);
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "µs" | "us" => v / 1e6,
        "ns" => v / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// The time of day a master's log line was written (`2026-01-02T10:11:12.345678Z …`).
fn log_time(line: &str) -> Option<Duration> {
    let t = line
        .split_whitespace()
        .next()?
        .split('T')
        .nth(1)?
        .strip_suffix('Z')?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(h * 3600.0 + m * 60.0 + s))
}

/// An app whose workers exit at once, for ever: every restart waits what the backoff says
/// (logged delay, and the measured gap from exit to the next start), the slots show
/// crash-looping, the master uses under 5 % of a core, and the other app in the same master
/// keeps its workers and answers every request.
#[test]
fn a_crash_looping_app_costs_the_master_little_and_spares_the_others() {
    let secs = env_u64("PROCESSES_CRASHLOOP_SECS", 5);
    let m = run_config_info(
        r#"
        [apps.crashy]
        command = ["{fixture}", "exit=1@0"]
        instances = 4
        [apps.crashy.backoff]
        initial = "20ms"
        max = "500ms"
        crash_loop_restarts = 5
        crash_loop_window = "60s"
        [apps.web]
        command = ["{fixture}", "serve"]
        instances = 2
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "20ms"
        "#,
    );
    let port = m.port();
    let pid = m.pid();
    let s = m.wait_status("web ready and every crashy slot crash-looping", |s| {
        app_named(s, "web")["ready"] == 2
            && app_named(s, "crashy")["slots"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] == "crash-looping")
    });
    let web_before: BTreeSet<i64> = app_named(&s, "web")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let crashy_starts = || {
        m.out
            .matching("[crashy:")
            .iter()
            .filter(|(_, l)| l.contains(" started"))
            .count()
    };
    let starts0 = crashy_starts();

    // The window: one request to web every 100 ms, the master's CPU time around it.
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let mut requests = 0;
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(secs) {
        let r0 = Instant::now();
        get(port).unwrap_or_else(|e| m.fail(&format!("web failed while crashy loops: {e}")));
        slowest = slowest.max(r0.elapsed());
        requests += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let wall = t0.elapsed();
    let cpu = cpu_time(pid) - cpu0;
    let restarts = crashy_starts() - starts0;
    let s = m.status().unwrap();
    let web_after: BTreeSet<i64> = app_named(&s, "web")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(web_before, web_after, "web's workers changed");
    assert!(
        app_named(&s, "crashy")["slots"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "crash-looping"),
        "{s}"
    );

    // Backoff: each logged delay is within [½, 1] of min(20 ms · 2^(n-1), 500 ms) (500 ms
    // once the slot is crash-looping), and the
    // next start of that slot comes that long after the exit (by the master's own log
    // timestamps, which the test's reading of the log does not blur).
    let mut checked = 0;
    let mut worst_late = Duration::ZERO;
    for slot in 0..4 {
        let tag = format!("[crashy:{slot}]");
        let starts: Vec<Duration> = m
            .out
            .matching(&tag)
            .into_iter()
            .filter(|(_, l)| l.contains(" started"))
            .filter_map(|(_, l)| log_time(&l))
            .collect();
        for (_, line) in m.out.matching(&tag) {
            let Some(at) = log_time(&line) else { continue };
            let Some(rest) = line.split("; ").find_map(|p| {
                p.strip_prefix("restart ")
                    .or_else(|| p.strip_prefix("crash-looping, restart "))
            }) else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let attempt: u32 = words.next().unwrap().parse().unwrap();
            let delay = parse_debug_duration(words.nth(1).unwrap()).unwrap();
            // A crash-looping slot waits the longest delay.
            let nominal = if line.contains("crash-looping") {
                Duration::from_millis(500)
            } else {
                (Duration::from_millis(20) * 2u32.pow((attempt - 1).min(10)))
                    .min(Duration::from_millis(500))
            };
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{line}: nominal {nominal:?}"
            );
            if let Some(next) = starts.iter().find(|t| **t > at) {
                let gap = *next - at;
                // The delay counts from when the master reaped the exit; the exit's log line
                // is written after that, later still for the second of several exits reaped
                // together (a clean-clone run saw one logged 1.9 ms late on a loaded
                // machine). 5 ms covers that, the log's timestamps and the delay as logged
                // (`312ms` is 311.5–312.5 ms); a restart that ignored its delay would be
                // tens of ms early.
                assert!(
                    gap + Duration::from_millis(5) >= delay,
                    "{line}: restarted after {gap:?}"
                );
                worst_late = worst_late.max(gap.saturating_sub(delay));
                assert!(
                    gap <= delay + Duration::from_millis(250),
                    "{line}: restarted only after {gap:?}"
                );
                checked += 1;
            }
        }
    }
    let cpu_pct = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    report(
        "crash loop",
        format!(
            "{:.1}s, 4 slots crash-looping, {restarts} restarts ({:.1}/s), {checked} delays checked \
             (latest start {worst_late:?} after its delay), master CPU {cpu_pct:.2}% of a core, \
             web: {requests} requests, 0 failed, slowest {slowest:?}, workers unchanged",
            wall.as_secs_f64(),
            restarts as f64 / wall.as_secs_f64(),
        ),
    );
    assert!(checked >= 20, "only {checked} restarts seen");
    assert!(cpu_pct < 5.0, "the master used {cpu_pct:.2}% of a core");
}

// ---- hostile workers --------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of one series in the master's `/metrics` (0 when absent).
fn metric(port: u16, series: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// A master running `good` (two workers behind a round-robin listener, under load the
/// whole time) and `bad`, one worker in the given mode with a listener of its own.
struct Hostile {
    m: Master,
    metrics: u16,
    good_port: u16,
    load: Option<Load>,
    base: Footprint,
    /// The master's `/dev/null` fds before the bad worker did anything.
    null_before: Vec<String>,
}

impl Hostile {
    fn start(bad_args: &[&str], bad_extra: &str) -> Hostile {
        let metrics = free_port();
        let args: Vec<String> = bad_args.iter().map(|a| format!("{a:?}")).collect();
        let m = run_config(
            &format!(
                r#"
                metrics = "127.0.0.1:{metrics}"
                [apps.good]
                command = ["{{fixture}}", "serve"]
                instances = 2
                listen = "127.0.0.1:0"
                dispatch = "round-robin"
                ready_after = "20ms"
                [apps.good.backoff]
                initial = "10ms"
                max = "20ms"
                [apps.bad]
                command = ["{{fixture}}", {}]
                listen = "127.0.0.1:0"
                dispatch = "round-robin"
                ready_after = "20ms"
                {bad_extra}
                "#,
                args.join(", ")
            ),
            &[],
        );
        let good_port = m
            .wait_log("good: listening on ")
            .rsplit(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        m.wait_status("good ready", |s| app_named(s, "good")["ready"] == 2);
        let base = Footprint::of(m.pid());
        let null_before = dev_null_fds(m.pid(), &[]);
        let load = Some(Load::start(good_port, 2));
        Hostile {
            m,
            metrics,
            good_port,
            load,
            base,
            null_before,
        }
    }

    fn bad_port(&self) -> u16 {
        self.m
            .wait_log("bad: listening on ")
            .rsplit(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn violations(&self, reason: &str) -> f64 {
        metric(
            self.metrics,
            &format!("processes_channel_violations_total{{app=\"bad\",reason=\"{reason}\"}}"),
        )
    }

    /// The good app answered every request, some after the hostile act, and the master is
    /// up and answers status.
    fn good_carried_on(&mut self, what: &str) -> (u64, Footprint) {
        let load = self.load.take().unwrap();
        let at = load.ok();
        if !poll(Duration::from_secs(10), || load.ok() >= at + 50) {
            self.m.fail("good stopped answering");
        }
        let (ok, failed) = load.stop_detailed();
        assert!(failed.is_empty(), "{what}: good failed: {failed:?}");
        assert_up(&mut self.m);
        assert!(get(self.good_port).is_ok());
        let now = Footprint::of(self.m.pid());
        (ok, now)
    }

    /// The master grew by less than 8 MiB since the start: whatever the worker did was
    /// not buffered or leaked.
    fn assert_rss_within_8_mib(&self, now: &Footprint) {
        assert!(
            now.rss_kib < self.base.rss_kib + 8 * 1024,
            "the master's RSS went from {} to {} KiB",
            self.base.rss_kib,
            now.rss_kib
        );
    }
}

/// A line of 100 MB without a newline: cut off at 1 MiB (the channel closes, a violation
/// is logged and counted), the master does not buffer it, the others carry on.
#[test]
fn a_worker_sending_a_100mb_line_is_cut_off() {
    let mut h = Hostile::start(&["send-line=100000000", "park"], "");
    h.m.wait_log("sent a line longer than");
    h.m.wait_log("fixture: channel closed after");
    assert!(poll(Duration::from_secs(10), || h
        .violations("line_too_long")
        == 1.0));
    let (ok, now) = h.good_carried_on("100 MB line");
    report(
        "hostile: 100 MB line",
        format!(
            "cut off, 1 violation counted, good answered {ok} requests, 0 failed, master RSS {} → {} KiB",
            h.base.rss_kib, now.rss_kib
        ),
    );
    h.assert_rss_within_8_mib(&now);
}

#[test]
fn a_worker_sending_invalid_json_is_cut_off() {
    let mut h = Hostile::start(&["send-garbage", "park"], "");
    h.m.wait_log("sent invalid JSON");
    assert!(poll(Duration::from_secs(10), || h
        .violations("invalid_json")
        == 1.0));
    let (ok, _) = h.good_carried_on("invalid JSON");
    report(
        "hostile: invalid JSON",
        format!("cut off, 1 violation counted, good answered {ok} requests, 0 failed"),
    );
}

/// Fds with no message to carry them: cut off after 4, every fd closed by the master.
#[test]
fn a_worker_sending_fds_without_messages_is_cut_off_and_the_fds_closed() {
    let mut h = Hostile::start(&["send-fds-only=50", "park"], "");
    h.m.wait_log("sent file descriptors without a NODE_HANDLE message");
    assert!(poll(Duration::from_secs(10), || h
        .violations("unexpected_fds")
        == 1.0));
    let (ok, _) = h.good_carried_on("fds without messages");
    let pid = h.m.pid();
    assert!(
        poll(Duration::from_secs(5), || dev_null_fds(pid, &h.null_before)
            .is_empty()),
        "the master kept the fds it was sent: {:?}",
        dev_null_fds(pid, &h.null_before)
    );
    report(
        "hostile: 50 fds without a message",
        format!(
            "cut off, 1 violation counted, the master holds none of them, good answered {ok} requests, 0 failed"
        ),
    );
}

/// 16 fds in one message, 300 times. The master read with room for 8: the kernel
/// truncated the rest (`MSG_CTRUNC`), and the 8 that did arrive were never taken, so each
/// message leaked them. Now there is room for the kernel's most (253): more fds than a
/// message may carry is cut off like any other fds without a message, and every fd
/// received is closed.
#[test]
fn a_worker_sending_16_fds_in_one_message_is_cut_off_and_the_fds_closed() {
    let mut h = Hostile::start(&["send-many-fds=16x300", "go-when={dir}/go", "park"], "");
    let pid = h.m.pid();
    std::fs::write(h.m.path().join("go"), "").unwrap();
    let cut_off =
        h.m.out
            .wait_for(
                "sent file descriptors without a NODE_HANDLE message",
                1,
                Duration::from_secs(10),
            )
            .is_some();
    let mut held = dev_null_fds(pid, &h.null_before);
    if !cut_off
        || !poll(Duration::from_secs(5), || {
            held = dev_null_fds(pid, &h.null_before);
            held.is_empty()
        })
    {
        h.m.fail(&format!(
            "cut off: {cut_off}; the master holds {} fds it was sent",
            held.len()
        ));
    }
    let sent = h.m.wait_log("fixture: sent ");
    assert!(poll(Duration::from_secs(10), || h
        .violations("unexpected_fds")
        == 1.0));
    let (ok, _) = h.good_carried_on("16 fds in one message");
    report(
        "hostile: 16 fds in each of 300 messages",
        format!(
            "cut off at the first message read (the worker had {}), 1 violation counted, the \
             master holds none of the fds, good answered {ok}, 0 failed",
            sent.rsplit("fixture: ").next().unwrap()
        ),
    );
}

/// A worker sends a socket set to linger 30 s on close with data it cannot send, and then
/// closes its own copy: the master's close is the last one. Done on the loop it would stop
/// the master for 30 s; the master answers status at once and the others carry on.
#[test]
fn a_lingering_socket_from_a_worker_does_not_block_the_master() {
    let mut h = Hostile::start(&["send-lingering-fd=30", "park"], "");
    h.m.wait_status("bad running", |s| app_named(s, "bad")["size"] == 1);
    // Long enough for the master to have read and answered the handle.
    let t0 = Instant::now();
    let (ok, _) = h.good_carried_on("a lingering socket");
    let took = t0.elapsed();
    report(
        "hostile: SO_LINGER 30 s socket",
        format!("good answered {ok}; the whole check took {took:?}"),
    );
    assert!(
        took < Duration::from_secs(25),
        "the master was blocked: {took:?}"
    );
}

/// A worker sends a socket set to linger an hour with data it cannot send, then 2000
/// `/dev/null` fds, each with its `NODE_HANDLE`. The master closed a worker's fds on one
/// thread, in order: the lingering close held that thread for the hour, and every fd sent
/// after it waited behind it, open in the master, until the master ran out of fds. The
/// master now clears `SO_LINGER` first, so the socket's close does not wait and the fds
/// after it close at once; its fd count comes back to where it was.
#[test]
fn a_lingering_socket_does_not_hold_up_the_closing_of_the_fds_after_it() {
    let mut h = Hostile::start(&["linger-then-fds=2000", "go-when={dir}/go", "park"], "");
    let pid = h.m.pid();
    let base = fd_count(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                most = most.max(fd_count(pid));
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        })
    };
    std::fs::write(h.m.path().join("go"), "").unwrap();
    let sent = h.m.wait_log("fixture: sent a lingering socket and ");
    let mut held = Vec::new();
    let closed = poll(Duration::from_secs(10), || {
        held = dev_null_fds(pid, &h.null_before);
        held.is_empty()
    });
    stop.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    if !closed {
        h.m.fail(&format!(
            "{}: the master still holds {} of them (at most {most} fds, {base} before)",
            sent.rsplit("fixture: ").next().unwrap(),
            held.len()
        ));
    }
    let (ok, _) = h.good_carried_on("a lingering socket, then fds");
    let after = fd_count(pid);
    report(
        "hostile: a lingering socket, then 2000 /dev/null fds",
        format!(
            "the master holds none of them; its fds {base} before, at most {most} while they \
             came, {after} after; good answered {ok}, 0 failed"
        ),
    );
    assert!(
        after <= base + 4,
        "the master has {after} fds, {base} before: {:?}",
        fd_list(pid)
    );
}

/// Workers send sd_notify datagrams that carry an fd, then `READY=1`. The master's notify
/// socket had room for credentials only: an fd made the datagram's control data too long,
/// the read failed, and the task that received notices ended, closing the socket: no
/// worker's `READY=1` was heard again (with `ready_after = "1h"`, none became ready). Such
/// a datagram is now dropped, its fd closed, and logged at the 1st, 2nd, 4th… time; the
/// socket carries on. Two workers, then a third replacing one, each send 5.
#[test]
fn a_notify_datagram_carrying_an_fd_is_dropped_and_readiness_still_heard() {
    let m = run_config(
        r#"
        [apps.n]
        command = ["{fixture}", "notify-fd=5", "go-when={dir}/go", "park"]
        instances = 2
        ready_after = "1h"
        "#,
        &[],
    );
    let pid = m.pid();
    m.wait_status("2 workers started", |s| s["apps"][0]["size"] == 2);
    // The master's own (it keeps one open for workers' stdin).
    let null_before = dev_null_fds(pid, &[]);
    std::fs::write(m.path().join("go"), "").unwrap();
    let s = m.wait_ready(2);
    m.wait_logs("fixture: sent 5 datagrams with an fd, then READY=1: Ok", 2);
    let victim = pids(&s)[0];
    kill(victim, libc::SIGKILL);
    let t = Instant::now();
    let s = m.wait_status("a replacement ready", |s| {
        let p = pids(s);
        s["apps"][0]["ready"] == 2 && p.len() == 2 && !p.contains(&victim)
    });
    let replaced = t.elapsed();
    m.wait_logs("fixture: sent 5 datagrams with an fd, then READY=1: Ok", 3);
    let mut held = Vec::new();
    if !poll(Duration::from_secs(5), || {
        held = dev_null_fds(pid, &null_before);
        held.is_empty()
    }) {
        m.fail(&format!("the master holds the fds it was sent: {held:?}"));
    }
    // 15 dropped: logged at the 1st, 2nd, 4th and 8th.
    let logged = m.wait_logs("notify socket: dropped a datagram", 4);
    assert!(
        logged[3].1.contains("(8 dropped so far)"),
        "{}",
        logged[3].1
    );
    assert_eq!(
        m.out.matching("notify socket: dropped a datagram").len(),
        4,
        "{}",
        m.out.text()
    );
    assert_eq!(pids(&s).len(), 2);
    report(
        "hostile: sd_notify datagrams carrying an fd",
        format!(
            "15 dropped (4 log lines), the master holds none of the fds, every worker's \
             READY=1 heard (a replacement ready {replaced:?} after the kill)"
        ),
    );
}

/// A worker that sends 20 000 `NODE_HANDLE`s without an fd and never reads its channel:
/// the master's answers (a NACK each) pile up for it. Past 4096 waiting, the channel is cut
/// off as a violation instead of the master holding them all; the others carry on.
#[test]
fn a_worker_that_never_reads_its_channel_is_cut_off() {
    let mut h = Hostile::start(&["send-handle-without-fd=20000", "park"], "");
    h.m.wait_log("does not read its channel (4096 lines waiting for it)");
    assert!(h.violations("not_reading") >= 1.0);
    let (ok, _) = h.good_carried_on("a worker that does not read");
    report(
        "hostile: 20 000 NACKs unread",
        format!("cut off at 4096 queued lines, good answered {ok}"),
    );
}

/// A worker that takes a connection and never acknowledges it, then asks for 100 000
/// answers (`NODE_HANDLE`s without an fd, each answered with a NACK) while reading its
/// channel. Nothing may overtake an unacknowledged handle, so the master holds the answers
/// instead of sending them — at most 4096: past that the worker is cut off as not reading
/// (its channel's own queue stays empty, so it is the held messages' cap that trips), the
/// master's memory stays flat, and the others carry on.
#[test]
fn a_worker_holding_a_handle_while_asking_for_answers_is_cut_off() {
    let mut h = Hostile::start(&["hold-handle-then-ask=100000", "park"], "");
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    // A connection for it to hold; the client only keeps it open.
    let _client = TcpStream::connect(("127.0.0.1", bad_port)).unwrap();
    h.m.wait_log("fixture: holding a handle unacknowledged");
    h.m.wait_log("does not read its channel (4096 lines waiting for it)");
    let closed = h.m.wait_log("fixture: channel closed after asking");
    assert!(poll(Duration::from_secs(10), || h
        .violations("not_reading")
        >= 1.0));
    let (ok, now) = h.good_carried_on("a worker holding a handle");
    report(
        "hostile: 100 000 answers asked for behind an unacknowledged handle",
        format!(
            "cut off at 4096 held ({}), good answered {ok}, 0 failed, master RSS {} → {} KiB",
            closed.rsplit("fixture: ").next().unwrap(),
            h.base.rss_kib,
            now.rss_kib
        ),
    );
    h.assert_rss_within_8_mib(&now);
}

/// A worker that, for every connection passed to it, fills it (its client never reads),
/// sets `SO_LINGER` of 30 s, closes its own copy and only then acknowledges it: the
/// master's close of its copy is the last one, and would wait out the linger on the loop.
/// The master clears `SO_LINGER` first: three such connections one after another each
/// reach the worker as soon as the one before is acknowledged (a worker has one in
/// flight), status answers at once, and the others carry on.
#[test]
fn a_passed_connection_the_worker_set_to_linger_does_not_block_the_master() {
    let mut h = Hostile::start(&["linger-acked=30", "park"], "");
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    let t0 = Instant::now();
    let clients: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", bad_port)).unwrap())
        .collect();
    // The third reaches the worker only after the master handled the second's ACK, which
    // it handles only after it closed its copy of the first.
    if h.m
        .out
        .wait_for(
            "fixture: closed lingering connection 3,",
            1,
            Duration::from_secs(10),
        )
        .is_none()
    {
        h.m.fail(&format!(
            "the worker got {} of 3 connections in {:?}: the master's close waited for the linger",
            h.m.out
                .matching("fixture: closed lingering connection")
                .len(),
            t0.elapsed()
        ));
    }
    let passed = t0.elapsed();
    let s0 = Instant::now();
    let status = h.m.status();
    let status_took = s0.elapsed();
    assert!(status.is_some(), "no status");
    assert!(
        status_took < Duration::from_secs(2),
        "status took {status_took:?}"
    );
    let (ok, _) = h.good_carried_on("connections set to linger");
    drop(clients);
    report(
        "hostile: passed connections set to linger 30 s, closed, then acknowledged",
        format!("3 passed in {passed:?}, status in {status_took:?}, good answered {ok}"),
    );
}

/// Two workers behind one listener, the one in slot 0 refusing every handle with a NACK
/// (after asking a question of its own, which the master answers behind that handle).
/// Sets the soft `RLIMIT_NOFILE` of `pid`; returns the old limits.
fn set_nofile(pid: i32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reading pid's limit into `old`; no new limit.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) },
        0
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: both pointers are to live rlimit values.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) },
        0
    );
    old
}

/// The master out of fds (its soft limit lowered under the fds it has) cannot accept: it
/// logs that, without a line every 10 ms, and tries again; a connection waiting meanwhile
/// is served once fds are there again.
#[test]
fn accepting_resumes_when_the_master_has_fds_again() {
    let m = run_config(
        r#"
        [apps.web]
        command = ["{fixture}", "serve"]
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "20ms"
        "#,
        &[],
    );
    let port = m.port();
    m.wait_ready(1);
    get(port).unwrap_or_else(|e| m.fail(&format!("before: {e}")));
    // A limit under every fd it has (allowed: it only stops new ones) leaves the master no
    // fd to open, whatever it opens and closes meanwhile.
    let old = set_nofile(m.pid(), 3);
    let client = std::thread::spawn(move || get(port));
    let failed = m.wait_log("accept failed");
    assert!(failed.contains("Too many open files"), "{failed}");
    m.wait_log("(4 so far;");
    // Tried again every 10 ms, not at the next tick (1 s): the 4th failure comes soon.
    let times: Vec<Instant> = m
        .out
        .matching("accept failed")
        .iter()
        .map(|l| l.0)
        .collect();
    let first_to_fourth = times[times.len() - 1] - times[0];
    assert!(
        first_to_fourth < Duration::from_secs(2),
        "{first_to_fourth:?} from the 1st failure to the 4th"
    );
    let t = Instant::now();
    set_nofile(m.pid(), old.rlim_cur);
    let body = client.join().unwrap();
    body.unwrap_or_else(|e| m.fail(&format!("the waiting connection: {e}")));
    let logged = m.out.matching("accept failed").len();
    assert!(
        logged <= 12,
        "{logged} lines for the failures: {}",
        m.out.text()
    );
    report(
        "the master out of fds",
        format!(
            "accepting resumed; the waiting connection answered {:?} after the limit was raised, {logged} log lines",
            t.elapsed()
        ),
    );
}

/// A refusing worker's pause ends by itself. Slot 0 refuses every handle and slot 1 holds
/// the one it takes without ever acknowledging it: once slot 1 has a connection, the next
/// one can only go to slot 0, and it must be offered there again when the pause is over,
/// not wait for slot 1 for ever.
#[test]
fn a_refusing_worker_is_offered_connections_again_after_its_pause() {
    let mut h = Hostile::start(&["serve", "nack-slot=0", "hold-slot=1"], "instances = 2");
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 2);
    let started = Instant::now();
    // The first goes to slot 1 after slot 0 refused it; the second has only slot 0.
    let _held = std::net::TcpStream::connect(("127.0.0.1", bad_port)).unwrap();
    h.m.wait_log("fixture: holding 1 handles");
    let _waiting = std::net::TcpStream::connect(("127.0.0.1", bad_port)).unwrap();
    h.m.wait_logs("refused a handle 4 times; giving up on it", 3);
    assert!(
        started.elapsed() >= processes::dispatch::REFUSAL_PAUSE,
        "offered again before its pause was over: {}",
        h.m.out.text()
    );
    let (ok, now) = h.good_carried_on("a refusing worker beside one holding its handle");
    report(
        "hostile: a refusing worker beside one that holds its handle",
        format!(
            "the refuser was offered the waiting connection again after its pause ({:?} \
             for 3 give-ups), good answered {ok}, master RSS {} → {} KiB",
            started.elapsed(),
            h.base.rss_kib,
            now.rss_kib
        ),
    );
}

/// A port above 65 535 is refused (`EINVAL`), not wrapped round onto the app's own port.
#[test]
fn a_query_for_a_port_out_of_range_is_refused() {
    let h = Hostile::start(&["query-port-wrap", "park"], "runtime = \"node\"");
    let line = h.m.wait_log("is out of range");
    let port = h.bad_port();
    assert!(
        line.contains(&format!(
            "port {} is out of range",
            u32::from(port) + 65_536
        )),
        "{line}"
    );
    let s = h.m.status().unwrap();
    assert_eq!(
        app_named(&s, "bad")["listeners"].as_array().unwrap().len(),
        1,
        "{s}"
    );
}

/// A Node worker that answers `accepted: false` for a connection before settling its
/// handle, then refuses the handle (NACK): its answer shows it had the handle, so the NACK
/// must not send that same `newconn` to it again — before, each NACK did, up to 3 times,
/// while the connection was also being offered anew. Here it is the only worker, so the
/// connection is offered until the master gives up on it and closes it.
#[test]
fn a_newconn_refused_before_its_handle_is_settled_is_not_sent_again() {
    let h = Hostile::start(&["refuse-then-nack-slot=0"], "runtime = \"node\"");
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    // Nobody takes it: the client's connection is closed in the end.
    let _ = get(bad_port);
    h.m.wait_log("closed a connection its workers refused");
    let offers = h.m.out.matching("fixture: refused ");
    assert!(offers.len() >= 2, "{offers:?}");
    let again = h.m.out.matching("again in newconn");
    assert!(again.is_empty(), "{again:?}");
}

/// The master sends a refused handle 3 times more, then gives up on it: that connection
/// goes to the other worker, the answers held behind the handle are released, and nothing
/// is lost — each of 40 requests one after another is answered by slot 1, the refuser
/// keeps its channel, and the master does not grow. Having refused, the worker is passed
/// over for a second (`dispatch::REFUSAL_PAUSE`): it is not offered every other connection.
#[test]
fn a_worker_refusing_every_handle_is_given_up_on_and_its_connections_served_by_another() {
    let mut h = Hostile::start(&["serve", "nack-slot=0"], "instances = 2");
    let bad_port = h.bad_port();
    let before =
        h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 2);
    let mut workers = BTreeMap::new();
    for w in app_named(&before, "bad")["workers"].as_array().unwrap() {
        workers.insert(w["slot"].as_u64().unwrap(), w["pid"].as_i64().unwrap());
    }
    let started = Instant::now();
    for i in 0..40 {
        let t = Instant::now();
        match get(bad_port) {
            Ok(body) => assert_eq!(
                body,
                format!("slot=1 pid={}\n", workers[&1]),
                "request {i} was answered by another worker"
            ),
            Err(e) => h.m.fail(&format!(
                "request {i} failed after {:?}: {e}; status {}",
                t.elapsed(),
                h.m.status().unwrap()
            )),
        }
    }
    let s = h.m.status().unwrap();
    let bad = app_named(&s, "bad");
    let refuser = bad["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == 0)
        .unwrap();
    assert_eq!(refuser["pid"], workers[&0], "the refuser was replaced: {s}");
    // Offered the first connection, then once more per pause at most.
    let pauses = started.elapsed().as_secs_f64() / processes::dispatch::REFUSAL_PAUSE.as_secs_f64();
    let offered = refuser["passed"].as_u64().unwrap();
    assert!(
        offered >= 1 && offered as f64 <= 1.0 + pauses.ceil(),
        "the refuser was offered {offered} of 40 in {:?}: {s}",
        started.elapsed()
    );
    assert_eq!(bad["listeners"][0]["queued"], 0, "{s}");
    let gave_up = h.m.wait_logs(
        "refused a handle 4 times; giving up on it",
        offered as usize,
    );
    assert_eq!(gave_up.len() as u64, offered, "{s}");
    // Each time sent again as it was, never in a second envelope.
    assert!(
        h.m.out.matching("second envelope").is_empty(),
        "{}",
        h.m.out.text()
    );
    // A question for each time it was sent a handle (once and 3 times again), each
    // answered once the master gave up on that handle.
    let asked = 4 * offered;
    h.m.wait_log(&format!("fixture: answered {asked} of {asked} questions;"));
    let (ok, now) = h.good_carried_on("a worker refusing every handle");
    report(
        "hostile: a worker refusing every handle",
        format!(
            "40/40 answered by the other worker, the refuser offered {offered} (4 tries each), \
             {asked} held answers released, good answered {ok}, master RSS {} → {} KiB",
            h.base.rss_kib, now.rss_kib
        ),
    );
    h.assert_rss_within_8_mib(&now);
}

/// Found beside the test above: an app whose only worker NACKs every handle. The master
/// gives up on a handle after sending it 3 times more and requeues its connection — to the
/// same worker, the only one. A given-up handle used not to count as a refusal the way a
/// Node worker's `accepted: false` does, so the connection went round for ever (measured:
/// passed about 900 times a second, each give-up logged as a warning). Now it is closed
/// after `MAX_CONN_REFUSALS` (8) tries.
#[test]
fn a_connection_every_worker_nacks_is_closed_after_eight_tries() {
    let h = Hostile::start(&["nack-slot=0"], "");
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    let mut client = TcpStream::connect(("127.0.0.1", bad_port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = match client.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let s = h.m.status().unwrap();
    let offered = app_named(&s, "bad")["workers"][0]["passed"].clone();
    let gave_up = h.m.out.matching("giving up on it").len();
    assert!(
        closed,
        "the connection was not closed in 10 s: offered {offered} times, {gave_up} give-ups logged"
    );
    assert!(
        offered.as_u64().is_some_and(|n| n <= 8),
        "offered {offered} times"
    );
}

/// `NODE_HANDLE` messages with no fd, then with an fd that is no socket (`/dev/null`): the
/// master acknowledges and ignores them (a worker has no business sending handles), closes
/// every fd it was given, and the worker's channel stays usable: it is still passed
/// connections afterwards.
#[test]
fn handles_without_an_fd_or_with_a_non_socket_fd_are_ignored_and_closed() {
    let mut h = Hostile::start(
        &[
            "send-handle-without-fd=1000",
            "send-non-socket-fd=1000",
            "serve",
            "greet",
        ],
        "",
    );
    let pid = h.m.pid();
    let bad_port = h.bad_port();
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    // Still served over its channel after 2000 handles of its own.
    for _ in 0..20 {
        match greeted_request(bad_port) {
            Outcome::Ok { .. } => {}
            other => h.m.fail(&format!("bad's connection failed: {other:?}")),
        }
    }
    let (ok, _) = h.good_carried_on("handles without fds");
    assert_eq!(
        h.violations("invalid_json") + h.violations("unexpected_fds"),
        0.0
    );
    assert!(
        poll(Duration::from_secs(5), || dev_null_fds(pid, &h.null_before)
            .is_empty()),
        "the master kept the fds it was sent: {:?}",
        dev_null_fds(pid, &h.null_before)
    );
    report(
        "hostile: 1000 handles without fd + 1000 /dev/null fds",
        format!(
            "ignored, channel kept, the master holds none of the fds, bad still served 20/20, good answered {ok}, 0 failed"
        ),
    );
}

/// A worker that sends messages as fast as it can: the master keeps up without letting it
/// crowd out the rest — status answers promptly, the other app is served, and a crash of
/// another worker is handled at once.
#[test]
fn a_worker_flooding_its_channel_does_not_crowd_out_the_rest() {
    let mut h = Hostile::start(&["message-flood=0", "park"], "");
    let pid = h.m.pid();
    h.m.wait_status("bad running", |s| app_named(s, "bad")["size"] == 1);
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let mut status_times = Vec::new();
    let mut reaps = Vec::new();
    for _ in 0..10 {
        let s0 = Instant::now();
        let s = h.m.status().unwrap();
        status_times.push(s0.elapsed());
        let victim = app_named(&s, "good")["workers"][0]["pid"].as_i64().unwrap() as i32;
        let k0 = Instant::now();
        kill(victim, libc::SIGKILL);
        assert!(poll(Duration::from_secs(5), || reaped(victim)));
        reaps.push(k0.elapsed());
        h.m.wait_status("good whole again", |s| app_named(s, "good")["ready"] == 2);
    }
    let wall = t0.elapsed();
    let cpu = cpu_time(pid) - cpu0;
    let load = h.load.take().unwrap();
    let (ok, failed) = load.stop_detailed();
    status_times.sort();
    reaps.sort();
    let cpu_pct = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    report(
        "hostile: message flood",
        format!(
            "{:.1}s, master CPU {cpu_pct:.0}% of a core, status p50 {:?} max {:?}, crash reaped p50 {:?} max {:?}, \
             good answered {ok}, failed {} (each killed good worker may take its connection)",
            wall.as_secs_f64(),
            percentile(&status_times, 50.0),
            status_times.last().unwrap(),
            percentile(&reaps, 50.0),
            reaps.last().unwrap(),
            failed.len()
        ),
    );
    assert!(*status_times.last().unwrap() < Duration::from_millis(500));
    assert!(*reaps.last().unwrap() < Duration::from_millis(100));
    assert!(failed.len() <= 10, "{failed:?}");
    assert_up(&mut h.m);
}

/// A worker that asks for thousands of listeners (`queryServer` for port 0, each with its
/// own index): the master must not open a socket for each, or one worker exhausts the
/// master's fds and every app with it.
#[test]
fn a_worker_asking_for_thousands_of_listeners_cannot_exhaust_the_masters_fds() {
    let mut h = Hostile::start(&["query-flood=5000", "park"], "");
    let pid = h.m.pid();
    h.m.wait_status("bad running", |s| app_named(s, "bad")["size"] == 1);
    // Let the master read everything the worker sent.
    let settled = poll(Duration::from_secs(10), || {
        let a = fd_count(pid);
        std::thread::sleep(Duration::from_millis(200));
        a == fd_count(pid)
    });
    assert!(settled);
    let fds = fd_count(pid);
    // Each refusal is counted, but only the 1st, 2nd, 4th … 4096th is logged: 13 lines
    // for 5000 requests.
    let why = "asked for a listener; refused";
    let lines = h.m.wait_logs(why, 13);
    assert!(
        lines[12].1.contains("(4096 refusals to pid "),
        "{}",
        lines[12].1
    );
    let (ok, _) = h.good_carried_on("queryServer flood");
    // The worker does not read the 5000 refusals sent back; where the kernel buffers fewer
    // than 5000 - 4096 of them it is cut off for not reading and replaced, and the next
    // one floods again: at most 13 lines per worker started.
    let starts =
        h.m.out
            .matching("[bad:0] pid")
            .iter()
            .filter(|(_, l)| l.ends_with(" started"))
            .count();
    let logged = h.m.out.matching(why).len();
    assert!(
        logged <= 13 * starts,
        "{logged} refusal lines for {starts} workers"
    );
    report(
        "hostile: 5000 queryServer",
        format!("master fds {fds}, good answered {ok}"),
    );
    // Three workers, a few listeners, the control and metrics sockets: some 40 fds.
    assert!(fds < 150, "one worker made the master open {fds} fds");
}

/// A Node worker asks for a unix listener at a path where a live socket's accept queue is
/// full. The master checks whether a socket file there is stale by connecting to it; a
/// blocking connect to a full queue waits for ever, and the master has one loop. It must
/// answer at once that the address is in use (`EADDRINUSE`), and still replace a stale
/// socket file nobody listens on.
#[test]
fn a_unix_listener_with_a_full_queue_does_not_block_the_master() {
    let mut h = Hostile::start(
        &["query-full-unix={dir}/full.sock", "park"],
        "runtime = \"node\"\npreload = false",
    );
    h.m.wait_log("has a full accept queue");
    std::fs::write(h.m.path().join("full.sock.go"), "").unwrap();
    let full = h.m.wait_log("full.sock answered in ");
    // `… answered in TIME: {json}`, timed by the worker from its send to the answer.
    let took = full
        .split(" answered in ")
        .nth(1)
        .unwrap()
        .split(": ")
        .next()
        .unwrap();
    let answer = |line: &str| -> Value {
        serde_json::from_str(&line[line.find(": {").unwrap() + 2..]).unwrap()
    };
    assert_eq!(
        answer(&full)["errno"],
        -libc::EADDRINUSE,
        "the worker was told {full}"
    );
    let stale = answer(&h.m.wait_log("full.sock.stale answered in "));
    assert!(stale["errno"].is_null(), "the stale socket: {stale}");
    h.m.wait_log("full.sock.stale (asked by a worker)");
    let s0 = Instant::now();
    assert!(h.m.status().is_some(), "no status");
    let status_took = s0.elapsed();
    let (ok, _) = h.good_carried_on("a unix listener with a full queue");
    report(
        "hostile: queryServer for a unix socket whose accept queue is full",
        format!(
            "answered EADDRINUSE in {took} (the worker's round trip); the stale file beside it \
             replaced and bound; status in {status_took:?}; good answered {ok}, 0 failed"
        ),
    );
}

/// A worker that forks children (each with a grandchild) and exits: its whole process
/// group goes with it.
#[test]
fn a_worker_that_forks_children_and_exits_takes_its_group_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pids_file = dir.path().join("children");
    let arg = format!("fork-children=20:{}", pids_file.display());
    let mut h = Hostile::start(
        &[&arg, "exit=3@300"],
        "[apps.bad.backoff]\ninitial = \"10s\"\nmax = \"10s\"",
    );
    let line = h.m.wait_log("[bad:0] pid");
    let worker: i32 = line
        .split("pid ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    h.m.wait_log(&format!("pid {worker} exited with code 3"));
    let t0 = Instant::now();
    let listed = |p: &std::path::Path| -> Vec<i32> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    };
    assert!(poll(Duration::from_secs(5), || listed(&pids_file).len() == 40));
    let forked = listed(&pids_file);
    for p in &forked {
        assert!(
            wait_dead(*p, Duration::from_secs(1)),
            "pid {p}, forked by the worker, outlived it"
        );
    }
    let took = t0.elapsed();
    let (ok, _) = h.good_carried_on("fork children");
    report(
        "hostile: 20 children + 20 grandchildren, then exit",
        format!("all 40 gone {took:?} after the exit was logged, good answered {ok}, 0 failed"),
    );
}

/// A worker that ignores SIGTERM, replaced with `processes restart`: it is killed at the
/// grace period while the master and the other app carry on. (Stopping the whole master
/// with such workers: `supervisor::sigterm_stops_workers_and_kills_those_that_ignore_it_after_grace`.)
#[test]
fn a_worker_that_ignores_sigterm_is_killed_at_grace() {
    let mut h = Hostile::start(&["ignore-term"], "grace = \"600ms\"");
    let s =
        h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    let old = app_named(&s, "bad")["workers"][0]["pid"].as_i64().unwrap() as i32;
    processes::control::request(
        &h.m.control,
        &processes::control::Request::Restart {
            app: "bad".into(),
            slot: 0,
        },
    )
    .unwrap();
    // By the master's own log timestamps.
    let sent = log_time(&h.m.wait_log(&format!("pid {old} stopping"))).unwrap();
    let killed = log_time(&h.m.wait_log(&format!("pid {old} still running"))).unwrap();
    assert!(wait_dead(old, Duration::from_secs(2)));
    let after = killed - sent;
    assert!(
        // The "stopping" line is written after the SIGTERM went, and the deadline counts
        // from the loop's clock reading before it: on a busy machine a few ms apart.
        after >= Duration::from_millis(580) && after < Duration::from_millis(1500),
        "SIGKILL {after:?} after SIGTERM"
    );
    // The master's SIGKILL at the grace: a forced stop.
    h.m.wait_log(&format!("pid {old} stopped by SIGKILL"));
    let (ok, _) = h.good_carried_on("ignore-term");
    report(
        "hostile: ignores SIGTERM",
        format!("SIGKILL {after:?} after SIGTERM (grace 600ms), good answered {ok}, 0 failed"),
    );
}

/// A worker that closes its channel and carries on: the master and the other app carry
/// on.
#[test]
fn a_worker_that_closes_its_channel_does_not_disturb_the_master() {
    let mut h = Hostile::start(&["close-channel", "park"], "");
    h.m.wait_status("bad ready", |s| app_named(s, "bad")["ready"] == 1);
    let (ok, _) = h.good_carried_on("close-channel");
    report(
        "hostile: closes its channel",
        format!("master and good carry on: good answered {ok}, 0 failed"),
    );
}

/// A pass-mode worker whose channel is gone (it closed it, or was cut off for breaking the
/// protocol) can take no more connections: unless it exits by itself, the master stops it
/// and starts a new one, with backoff like after a crash, so a worker that does this at
/// every start does not spin. The other app carries on.
#[test]
fn a_worker_whose_channel_is_gone_is_replaced_with_backoff() {
    for (mode, why) in [
        ("close-channel", "closed its channel"),
        ("send-garbage", "sent invalid JSON"),
    ] {
        let mut h = Hostile::start(
            &[mode, "park"],
            "[apps.bad.backoff]\ninitial = \"400ms\"\nmax = \"2s\"",
        );
        let first = h.m.wait_log(why);
        // The fourth stop follows the fourth start, so the third gap is complete.
        let stops = h.m.wait_logs("stopping (channel_lost)", 4);
        let starts: Vec<Instant> =
            h.m.out
                .matching("[bad:0] pid")
                .into_iter()
                .filter(|(_, l)| l.ends_with(" started"))
                .map(|(t, _)| t)
                .collect();
        assert!(starts.len() >= 4, "{mode}: {}", h.m.out.text());
        // The delay between a stop and the next start grows (backoff, not a spin). Each
        // delay is jittered into [0.5, 1.0] of its nominal 400 ms, 800 ms, 1.6 s, so only
        // the first and the third are certain to be apart.
        let gap = |k: usize| {
            let stop = stops[k].0;
            starts.iter().find(|t| **t > stop).map(|t| *t - stop)
        };
        let (g0, g1, g2) = (gap(0).unwrap(), gap(1).unwrap(), gap(2).unwrap());
        assert!(
            g2 > g0 + Duration::from_millis(300),
            "{mode}: restart delays {g0:?}, {g1:?}, {g2:?} do not grow"
        );
        let (ok, _) = h.good_carried_on(mode);
        report(
            &format!("hostile: {mode}"),
            format!(
                "noticed ({first:?}), replaced with growing delays {g0:?} → {g1:?} → {g2:?}, good answered {ok}, 0 failed"
            ),
        );
    }
}

// ---- an output flood next to a crash ----------------------------------------------------

/// How long the master takes to reap a SIGKILLed worker of `app` (from the kill to
/// `/proc/PID` gone), `n` times.
fn reap_latencies(m: &Master, app: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = m.wait_status("the victim ready", |s| app_named(s, app)["ready"] == 1);
        let victim = app_named(&s, app)["workers"][0]["pid"].as_i64().unwrap() as i32;
        let t0 = Instant::now();
        kill(victim, libc::SIGKILL);
        while !reaped(victim) {
            if t0.elapsed() > Duration::from_secs(5) {
                m.fail(&format!("pid {victim} not reaped in 5s"));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        out.push(t0.elapsed());
    }
    out.sort();
    out
}

/// Starts a master on `toml` with its stdout and stderr on /dev/null (an output flood
/// would otherwise be the test's to read).
fn run_quiet(toml: &str) -> Master {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("processes.toml"),
        toml.replace("{fixture}", FIXTURE),
    )
    .unwrap();
    let control = dir.path().join("control.sock");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\" \"$@\" >/dev/null 2>&1")
        .arg(BIN)
        .args(["run", "--control"])
        .arg(&control)
        .args(["-c", "processes.toml"])
        .current_dir(dir.path())
        .env("PROCESSES_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let full = vec!["run -c processes.toml (output to /dev/null)".to_string()];
    spawn_master(cmd, dir, control, full)
}

/// Two workers writing to stdout and stderr as fast as they can do not delay the master's
/// handling of another worker's crash by more than a few ms: the time from SIGKILL to the
/// worker reaped, beside the flood and in a master without it.
#[test]
fn an_output_flood_does_not_delay_crash_handling() {
    let kills = env_u64("PROCESSES_FLOOD_KILLS", 20) as usize;
    let victim = r#"
        [apps.victim]
        command = ["{fixture}"]
        ready_after = "10ms"
        [apps.victim.backoff]
        initial = "1ms"
        max = "2ms"
        crash_loop_restarts = 1000
        reset_after = "5ms"
    "#;
    let quiet = {
        let m = run_quiet(victim);
        reap_latencies(&m, "victim", kills)
    };
    let mut m = run_quiet(&format!(
        r#"
        [apps.noisy]
        command = ["{{fixture}}", "flood"]
        instances = 2
        {victim}
        "#
    ));
    m.wait_status("noisy flooding", |s| app_named(s, "noisy")["size"] == 2);
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_time(m.pid());
    let t0 = Instant::now();
    let flooded = reap_latencies(&m, "victim", kills);
    let cpu_pct = 100.0 * (cpu_time(m.pid()) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    assert_up(&mut m);
    report(
        "output flood",
        format!(
            "{kills} crashes each: reaped p50 {:?} p90 {:?} max {:?} quiet; p50 {:?} p90 {:?} max {:?} \
             beside 2 flooding workers (master CPU {cpu_pct:.0}% of a core)",
            percentile(&quiet, 50.0),
            percentile(&quiet, 90.0),
            quiet.last().unwrap(),
            percentile(&flooded, 50.0),
            percentile(&flooded, 90.0),
            flooded.last().unwrap(),
        ),
    );
    let p50 = percentile(&flooded, 50.0);
    let p90 = percentile(&flooded, 90.0);
    assert!(
        p50 <= percentile(&quiet, 50.0) + Duration::from_millis(5),
        "median {p50:?} under the flood"
    );
    assert!(
        p90 <= Duration::from_millis(25),
        "p90 {p90:?} under the flood"
    );
}

// ---- the master's death -----------------------------------------------------------------

/// The master SIGKILLed while a worker has a child (a shell wrapper, `npm start`, a
/// pre-fork server): the child must not outlive it holding the listening socket. (A
/// worker without children: `supervisor::no_worker_outlives_a_sigkilled_master_and_the_port_frees_up`.)
#[test]
fn no_child_of_a_worker_outlives_a_sigkilled_master() {
    let dir = tempfile::tempdir().unwrap();
    let gc_file = dir.path().join("grandchild.pid");
    let arg = format!("grandchild={}", gc_file.display());
    let mut m = run_in(
        dir,
        &[
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--dispatch",
            "shared",
            "--ready-after",
            "50ms",
            "--",
            FIXTURE,
            "serve",
            &arg,
        ],
    );
    let port = m.port();
    let s = m.wait_ready(1);
    let gc: i32 = loop {
        if let Ok(t) = std::fs::read_to_string(&gc_file)
            && let Ok(p) = t.trim().parse()
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    m.signal(libc::SIGKILL);
    m.wait_exit(Duration::from_secs(5));
    let t0 = Instant::now();
    for p in pids(&s) {
        assert!(
            wait_dead(p, Duration::from_secs(1)),
            "worker {p} outlived the master"
        );
    }
    let gone = wait_dead(gc, Duration::from_secs(1));
    let bindable = poll(Duration::from_secs(1), || {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    });
    if !gone {
        // Clean up what the master left behind: the worker's whole group.
        // SAFETY: kill(2) on a process group this test created.
        unsafe { libc::kill(-pids(&s)[0], libc::SIGKILL) };
        kill(gc, libc::SIGKILL);
    }
    assert!(
        gone && bindable,
        "the worker's child {gc} outlived the master: {}; port {port} bindable {:?} after: {bindable}",
        !gone,
        t0.elapsed()
    );
}

// ---- the control socket -----------------------------------------------------------------

/// Garbage, oversize requests and clients that connect and say nothing: each gets an
/// error or is dropped after the timeout, and while they hang `processes status` still
/// answers at once. At the end the master holds no fd more than before.
#[test]
fn the_control_socket_survives_garbage_oversize_and_slow_clients() {
    use std::os::unix::net::UnixStream;
    let m = run(&["-i", "1", "--ready-after", "20ms", "--", FIXTURE]);
    m.wait_ready(1);
    std::thread::sleep(Duration::from_millis(200));
    let pid = m.pid();
    let baseline = fd_list(pid);
    let reply_of = |mut s: UnixStream| -> String {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let connect = || UnixStream::connect(&m.control).unwrap();

    // Slow clients first: they hang while everything else happens.
    let slow_started = Instant::now();
    let silent: Vec<UnixStream> = (0..50).map(|_| connect()).collect();
    let drip = connect();
    let dripper = {
        let mut drip = drip.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in br#"{"v":1,"cmd":"status"}"# {
                if drip.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };

    // Garbage.
    let mut rng = Rng::from_env();
    for _ in 0..20 {
        let mut s = connect();
        let bytes: Vec<u8> = (0..200)
            .map(|_| rng.below(256) as u8)
            .filter(|b| *b != b'\n')
            .collect();
        s.write_all(&bytes).unwrap();
        s.write_all(b"\n").unwrap();
        let r = reply_of(s);
        assert!(
            r.contains("\"ok\":false") && r.contains("not a request"),
            "{r}"
        );
    }
    // Oversize, with and without a newline.
    for newline in [true, false] {
        let mut s = connect();
        let mut big = vec![b'x'; 100 * 1024];
        if newline {
            big.push(b'\n');
        }
        let _ = s.write_all(&big);
        let r = reply_of(s);
        assert!(r.contains("larger than 65536 bytes"), "{r}");
    }
    // Status answers promptly while the slow ones hang.
    let mut answers = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let (code, out, err) = cli(&m, &["status", "--json"]);
        answers.push(t0.elapsed());
        assert_eq!(code, Some(0), "{out}{err}");
    }
    answers.sort();
    // The slow ones are dropped after the timeout, with an error.
    let mut dropped_after = Vec::new();
    for s in silent.into_iter().chain([drip]) {
        let r = reply_of(s);
        dropped_after.push(slow_started.elapsed());
        assert!(r.contains("timed out"), "{r}");
    }
    dripper.join().unwrap();
    wait_fds_back(&m, &baseline);
    report(
        "control socket",
        format!(
            "20 garbage + 2 oversize answered with an error; 51 slow clients dropped after {:?}–{:?}; \
             status meanwhile p50 {:?} max {:?}; fds back to {}",
            dropped_after.first().unwrap(),
            dropped_after.last().unwrap(),
            percentile(&answers, 50.0),
            answers.last().unwrap(),
            baseline.len()
        ),
    );
    assert!(*answers.last().unwrap() < Duration::from_millis(500));
    assert!(*dropped_after.last().unwrap() < Duration::from_secs(8));
    assert!(*dropped_after.first().unwrap() >= Duration::from_millis(4900));
}

// ---- whoever reads the master's output goes away ----------------------------------------

/// `processes run … 2>&1 | head -1`: once the reader of its stdout and stderr is gone, the
/// master goes on supervising (it used to panic on the first log line it could not write).
#[test]
fn the_master_outlives_the_reader_of_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("c.sock");
    let mut child = Command::new(BIN)
        .args(["run", "-i", "1", "--ready-after", "50ms", "--control"])
        .arg(&control)
        .args(["--", FIXTURE])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains(" ready") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no ready line");
    }
    drop(err);
    drop(child.stdout.take());
    let ctl = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let worker_pid = |s: &str| -> Option<i32> {
        let v: Value = serde_json::from_str(s).ok()?;
        let w = &v["apps"][0]["workers"][0];
        (w["state"] == "ready")
            .then(|| w["pid"].as_i64())?
            .map(|p| p as i32)
    };
    let mut victim = None;
    poll(Duration::from_secs(10), || {
        victim = worker_pid(&ctl(&["status", "--json"]).1);
        victim.is_some()
    });
    let victim = victim.expect("a ready worker");
    // Its crash and restart are log lines nobody reads now.
    kill(victim, libc::SIGKILL);
    let replaced = poll(Duration::from_secs(10), || {
        worker_pid(&ctl(&["status", "--json"]).1).is_some_and(|p| p != victim)
    });
    assert!(replaced, "the crashed worker was not replaced");
    assert!(child.try_wait().unwrap().is_none(), "the master exited");
    assert!(ctl(&["stop"]).0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the master did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
