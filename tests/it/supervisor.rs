//! The supervisor core with real processes: restarts, backoff, crash loops, stopping,
//! process groups, listeners, readiness, signals.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn a_killed_worker_is_replaced_in_its_slot() {
    let m = run(&["-i", "3", "--ready-after", "100ms", "--", FIXTURE]);
    let before = m.wait_ready(3);
    let victim = pids(&before)[1];
    kill(victim, libc::SIGKILL);
    let after = m.wait_status("a replacement for the killed worker", |s| {
        let p = pids(s);
        s["apps"][0]["ready"] == 3 && p.len() == 3 && !p.contains(&victim)
    });
    let slots: Vec<i64> = after["apps"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["slot"].as_i64().unwrap())
        .collect();
    let mut sorted = slots.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2], "slots are stable: {slots:?}");
    m.wait_log("was killed by SIGKILL");
}

#[test]
fn workers_get_their_environment_and_listeners() {
    let m = run(&[
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "envy",
        "--env",
        "GREETING=hi",
        "--",
        FIXTURE,
        "serve",
    ]);
    let port = m.port();
    m.wait_ready(2);
    let body = get(port).unwrap();
    assert!(body.starts_with("slot="), "{body}");
    // The fixture prints its env on request through /proc instead: check it directly.
    let status = m.status().unwrap();
    for (i, pid) in pids(&status).into_iter().enumerate() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env: Vec<String> = env
            .split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let has = |kv: &str| env.iter().any(|e| e == kv);
        let slot = status["apps"][0]["workers"][i]["slot"].as_i64().unwrap();
        assert!(has("PROCESSES_APP=envy"), "{env:?}");
        assert!(has(&format!("PROCESSES_WORKER_ID={slot}")), "{env:?}");
        assert!(has(&format!("PORT={port}")), "{env:?}");
        assert!(has("LISTEN_FDS=1"), "{env:?}");
        assert!(
            has(&format!("LISTEN_PID={pid}")),
            "LISTEN_PID must be the worker's own pid: {env:?}"
        );
        assert!(has(&format!("LISTEN_FDNAMES=tcp-{port}")), "{env:?}");
        assert!(has("GREETING=hi"), "{env:?}");
        assert!(
            env.iter().any(|e| e.starts_with("NOTIFY_SOCKET=@")),
            "{env:?}"
        );
        // Its own process group, and fd 3 is the listener.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(
            fields[2],
            pid.to_string(),
            "worker leads its own process group"
        );
        let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
        assert!(fd3.to_string_lossy().starts_with("socket:"), "{fd3:?}");
    }
}

/// Restart delays measured from outside: a worker that exits at once is restarted after
/// 50–100 ms, then 100–200, 200–400, 400–800 (jitter in [0.5, 1] of a doubling delay).
#[test]
fn restart_delays_grow_exponentially_with_jitter() {
    let m = run_config(
        r#"
        [apps.crashy]
        command = ["{fixture}", "exit=3@0"]
        [apps.crashy.backoff]
        initial = "100ms"
        max = "10s"
        crash_loop_restarts = 100
        "#,
        &[],
    );
    let started = m.wait_logs("started", 5);
    let exits = m.out.matching("exited with code 3");
    assert!(exits.len() >= 4, "{}", m.out.text());
    // delay i = start[i+1] - exit[i]
    let mut delays = Vec::new();
    for (exit_at, _) in exits.iter().take(4) {
        let exit_at = *exit_at;
        let next_start = started.iter().find(|(t, _)| *t > exit_at).unwrap().0;
        delays.push(next_start - exit_at);
    }
    for (i, d) in delays.iter().enumerate() {
        let nominal = Duration::from_millis(100 << i);
        // Half the nominal delay at least; a generous allowance above for a busy machine.
        assert!(
            *d >= nominal / 2 - Duration::from_millis(5),
            "delay {i} was {d:?}, nominal {nominal:?}: {delays:?}"
        );
        assert!(
            *d <= nominal + Duration::from_millis(250),
            "delay {i} was {d:?}, nominal {nominal:?}: {delays:?}"
        );
    }
}

#[test]
fn a_healthy_run_resets_the_backoff() {
    // Each worker lives 400 ms, longer than reset_after (300 ms): every restart is a first
    // restart again, so delays stay at 50–100 ms instead of growing.
    let m = run_config(
        r#"
        [apps.flaky]
        command = ["{fixture}", "exit=1@400"]
        ready_after = "50ms"
        [apps.flaky.backoff]
        initial = "100ms"
        reset_after = "300ms"
        "#,
        &[],
    );
    let restarts = m.wait_logs("restart 1 in", 4);
    assert!(
        m.out.matching("restart 2 in").is_empty(),
        "{}",
        m.out.text()
    );
    assert_eq!(restarts.len(), m.out.matching("restart ").len());
}

#[test]
fn a_crash_loop_is_detected_shown_and_still_retried() {
    let m = run_config(
        r#"
        [apps.loop]
        command = ["{fixture}", "exit=1@0"]
        [apps.loop.backoff]
        initial = "10ms"
        max = "200ms"
        crash_loop_restarts = 4
        crash_loop_window = "60s"
        "#,
        &[],
    );
    m.wait_log("crash-looping");
    m.wait_status("the slot as crash-looping", |s| {
        s["apps"][0]["slots"][0]["state"] == "crash-looping"
    });
    // Still retried, at the capped delay.
    let before = m.out.matching("started").len();
    m.wait_logs("started", before + 2);
}

#[test]
fn sigterm_stops_workers_and_kills_those_that_ignore_it_after_grace() {
    let mut m = run(&[
        "-i",
        "2",
        "--grace",
        "700ms",
        "--ready-after",
        "50ms",
        "--",
        FIXTURE,
        "ignore-term",
    ]);
    let s = m.wait_ready(2);
    let worker_pids = pids(&s);
    let t0 = Instant::now();
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= Duration::from_millis(650),
        "SIGKILL came too early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    m.wait_log("sending SIGKILL");
    for p in worker_pids {
        assert!(wait_dead(p, Duration::from_secs(2)), "worker {p} survived");
    }
}

#[test]
fn sigterm_stops_cooperative_workers_at_once() {
    let mut m = run(&["-i", "3", "--ready-after", "50ms", "--", FIXTURE]);
    m.wait_ready(3);
    let t0 = Instant::now();
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(Duration::from_secs(20)).success());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The master sent that SIGTERM: a stop, logged as one, not as a kill.
    assert_eq!(
        m.out.matching("stopped by SIGTERM").len(),
        3,
        "{}",
        m.out.text()
    );
    for (_, l) in m.out.matching("stopped by SIGTERM") {
        assert!(l.ends_with("(shutdown)"), "{l}");
    }
    assert!(
        m.out.matching("was killed by").is_empty(),
        "{}",
        m.out.text()
    );
    assert!(m.out.matching("SIGKILL").is_empty());
}

#[test]
fn a_second_sigint_kills_at_once() {
    let mut m = run(&[
        "-i",
        "1",
        "--grace",
        "60s",
        "--ready-after",
        "50ms",
        "--",
        FIXTURE,
        "ignore-term",
    ]);
    m.wait_ready(1);
    m.signal(libc::SIGINT);
    m.wait_log("SIGINT: stopping");
    let t0 = Instant::now();
    m.signal(libc::SIGINT);
    assert!(m.wait_exit(Duration::from_secs(10)).success());
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The master's own SIGKILL: a forced stop, not a kill by someone else.
    m.wait_log("stopped by SIGKILL");
    assert!(
        m.out.matching("was killed by").is_empty(),
        "{}",
        m.out.text()
    );
}

#[test]
fn a_grandchild_dies_with_its_workers_group() {
    let dir = tempfile::tempdir().unwrap();
    let gc_file = dir.path().join("grandchild.pid");
    let arg = format!("grandchild={}", gc_file.display());
    let m = run_in(
        dir,
        &["-i", "1", "--ready-after", "50ms", "--", FIXTURE, &arg],
    );
    let s = m.wait_ready(1);
    let worker = pids(&s)[0];
    let gc: i32 = loop {
        if let Ok(t) = std::fs::read_to_string(&gc_file)
            && let Ok(p) = t.trim().parse()
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!is_dead(gc));
    kill(worker, libc::SIGKILL);
    assert!(
        wait_dead(gc, Duration::from_secs(5)),
        "grandchild {gc} outlived its worker"
    );
}

#[test]
fn no_worker_outlives_a_sigkilled_master_and_the_port_frees_up() {
    let mut m = run(&[
        "-i",
        "3",
        "--listen",
        "127.0.0.1:0",
        "--ready-after",
        "50ms",
        "--",
        FIXTURE,
        "serve",
    ]);
    let port = m.port();
    let s = m.wait_ready(3);
    m.signal(libc::SIGKILL);
    m.wait_exit(Duration::from_secs(5));
    let t0 = Instant::now();
    for p in pids(&s) {
        assert!(
            wait_dead(p, Duration::from_secs(1)),
            "worker {p} outlived the master"
        );
    }
    // The port is free again within a second.
    loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => break,
            Err(e) if t0.elapsed() < Duration::from_secs(1) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("port {port} still held after {:?}: {e}", t0.elapsed()),
        }
    }
}

/// The listener belongs to the master: with a single worker killed again and again, every
/// request still gets an answer (it waits in the kernel's backlog for the replacement).
#[test]
fn the_listener_survives_worker_restarts() {
    let m = run_config(
        r#"
        [apps.one]
        command = ["{fixture}", "serve"]
        listen = "127.0.0.1:0"
        ready_after = "50ms"
        [apps.one.backoff]
        max = "1s"
        crash_loop_restarts = 100
        "#,
        &[],
    );
    let port = m.port();
    m.wait_ready(1);
    let mut served_by = std::collections::BTreeSet::new();
    for round in 0..5 {
        let body = get(port).unwrap_or_else(|e| m.fail(&format!("request {round} failed: {e}")));
        served_by.insert(body.clone());
        let pid: i32 = body.trim().rsplit("pid=").next().unwrap().parse().unwrap();
        kill(pid, libc::SIGKILL);
        // Reaped by the master: every thread of it is gone (a thread-group leader can
        // show as a zombie while its other threads still run, and accept).
        m.wait_log(&format!("pid {pid} was killed by SIGKILL"));
        // Ask at once: the replacement is not even started yet.
        let body = get(port)
            .unwrap_or_else(|e| m.fail(&format!("request after kill {round} failed: {e}")));
        assert_ne!(body, format!("slot=0 pid={pid}\n"));
    }
    assert!(served_by.len() >= 5, "{served_by:?}");
}

#[test]
fn ready_comes_from_sd_notify_before_ready_after() {
    let m = run(&[
        "-i",
        "2",
        "--ready-after",
        "60s",
        "--",
        FIXTURE,
        "notify=100",
    ]);
    m.wait_ready(2);
    assert_eq!(m.out.matching("(READY=1)").len(), 2, "{}", m.out.text());
}

#[test]
fn ttin_and_ttou_move_the_pool_within_its_bounds() {
    let m = run(&[
        "--autoscale",
        "min=1,max=3",
        "--ready-after",
        "50ms",
        "--",
        FIXTURE,
    ]);
    m.wait_ready(1);
    m.signal(libc::SIGTTIN);
    m.wait_ready(2);
    m.signal(libc::SIGTTIN);
    m.wait_ready(3);
    m.signal(libc::SIGTTIN);
    m.wait_log("stays at 3 workers");
    m.signal(libc::SIGTTOU);
    m.wait_ready(2);
    // Signals of one kind coalesce: send the next only once the last was seen.
    m.signal(libc::SIGTTOU);
    m.wait_ready(1);
    m.signal(libc::SIGTTOU);
    m.wait_log("stays at 1 workers");
}

#[test]
fn sighup_replaces_every_worker_one_at_a_time() {
    let m = run(&["-i", "3", "--ready-after", "100ms", "--", FIXTURE]);
    let before = pids(&m.wait_ready(3));
    m.signal(libc::SIGHUP);
    m.wait_log("reload done, 3/3");
    let after = m.wait_ready(3);
    let now = pids(&after);
    assert!(
        now.iter().all(|p| !before.contains(p)),
        "{before:?} → {now:?}"
    );
    assert!(
        after["apps"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["generation"] == 1)
    );
    // One at a time: each replacement started only after the previous old worker stopped
    // being needed (never more than one extra worker).
    let started = m.out.matching("(reload replacement)");
    let stopping = m.out.matching("stopping (reload)");
    assert_eq!(started.len(), 3);
    assert_eq!(stopping.len(), 3);
    for i in 1..3 {
        assert!(
            stopping[i - 1].0 <= started[i].0,
            "replacement {i} started before the previous swap"
        );
    }
}

#[test]
fn restart_never_lets_the_master_exit_when_everything_is_done() {
    let mut m = run(&["-i", "2", "--restart", "never", "--", FIXTURE, "exit=0@50"]);
    let status = m.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let mut m = run(&[
        "-i",
        "1",
        "--restart",
        "on-failure",
        "--",
        FIXTURE,
        "exit=0@50",
    ]);
    assert!(m.wait_exit(Duration::from_secs(10)).success());
    let mut m = run(&["-i", "1", "--restart", "never", "--", FIXTURE, "exit=4@50"]);
    assert_eq!(m.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn several_apps_run_in_one_master() {
    let m = run_config(
        r#"
        [apps.a]
        command = ["{fixture}", "serve"]
        instances = 2
        listen = "127.0.0.1:0"
        ready_after = "50ms"
        [apps.b]
        command = ["{fixture}", "exit=1@0"]
        ready_after = "50ms"
        [apps.b.backoff]
        initial = "10ms"
        max = "50ms"
        crash_loop_restarts = 3
        "#,
        &[],
    );
    let port = m.port();
    m.wait_log("[b:0]");
    m.wait_status("a ready while b crash-loops", |s| {
        s["apps"][0]["ready"] == 2 && s["apps"][1]["slots"][0]["state"] == "crash-looping"
    });
    assert!(get(port).unwrap().starts_with("slot="));
}

/// The master's loop runs under SCHED_BATCH (its wake-ups do not preempt the workers), and
/// the workers it starts under the ordinary policy, as if anyone else had started them.
#[test]
fn the_loop_runs_sched_batch_and_its_workers_the_ordinary_policy() {
    let m = run(&["-i", "1", "--ready-after", "50ms", "--", FIXTURE]);
    let s = m.wait_ready(1);
    // SAFETY: sched_getscheduler only reads another process's policy.
    let policy = |pid: i32| unsafe { libc::sched_getscheduler(pid) };
    assert_eq!(policy(m.pid()), libc::SCHED_BATCH);
    assert_eq!(policy(pids(&s)[0]), libc::SCHED_OTHER);
}

/// The master raises its own open-files limit to the hard limit (it holds an fd per
/// listener, worker channel and connection in flight), and each worker starts with the
/// limit the master was started with, as if started by anyone else — also once the master
/// holds more fds than that limit (12 workers, 3 fds each, against a limit of 32).
#[test]
fn the_master_raises_its_open_files_limit_and_workers_get_the_one_it_started_with() {
    let soft_and_hard = |pid: i32| -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols[3].to_string(), cols[4].to_string())
    };
    // Start the master below its hard limit (nextest runs each test in a process of its
    // own, so this changes nothing for the others).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_cur.min(32);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let ours = soft_and_hard(std::process::id() as i32);
    assert_eq!(ours.0, lim.rlim_cur.to_string());
    let m = run(&["-i", "12", "--ready-after", "50ms", "--", FIXTURE]);
    let s = m.wait_ready(12);
    for w in s["apps"][0]["workers"].as_array().unwrap() {
        assert_eq!(soft_and_hard(w["pid"].as_i64().unwrap() as i32), ours);
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
        .unwrap()
        .count();
    assert!(fds > 32, "the master holds only {fds} fds");
    let hard: u64 = ours.1.parse().unwrap_or(u64::MAX);
    let (master_soft, master_hard) = soft_and_hard(m.pid());
    assert_eq!(master_hard, ours.1);
    assert_eq!(master_soft, hard.min(1 << 20).to_string(), "ours: {ours:?}");
}
