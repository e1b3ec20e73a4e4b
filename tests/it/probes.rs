//! USDT probes, read by a real bpftrace attached to a running master: a worker spawns,
//! gets a connection, crashes, is scheduled for restart and comes back, and every probe
//! fires with the right arguments.
//!
//! Needs root and bpftrace. Under CI (`PROCESSES_REQUIRE_BPFTRACE=1`, set by `.ci/run`) a
//! missing tracer is a failure; elsewhere the test says it skipped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

fn skip_reason() -> Option<String> {
    if nix::unistd::geteuid().as_raw() != 0 {
        return Some("not running as root".into());
    }
    match Command::new("bpftrace").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("bpftrace is not installed (apt-get install bpftrace)".into()),
    }
}

struct Tracer {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Tracer {
    fn attach(master_pid: i32, script: &str) -> Tracer {
        let mut child = Command::new("bpftrace")
            .args(["-p", &master_pid.to_string(), "-e", script])
            .env("BPFTRACE_STRLEN", "120")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bpftrace");
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Tracer {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; returns it.
    fn wait(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "bpftrace never printed {prefix:?} ({e}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bpftrace_sees_spawn_pass_crash_restart_and_ready() {
    if let Some(why) = skip_reason() {
        if std::env::var_os("PROCESSES_REQUIRE_BPFTRACE").is_some() {
            panic!("the bpftrace test must run here (PROCESSES_REQUIRE_BPFTRACE is set) but {why}");
        }
        eprintln!("SKIPPED bpftrace_sees_spawn_pass_crash_restart_and_ready: {why}");
        return;
    }
    let m = run_config(
        r#"
        [apps.traced]
        command = ["{fixture}", "serve"]
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "50ms"
        "#,
        &[],
    );
    let port = m.port();
    let first = pids(&m.wait_ready(1))[0];
    let p = m.pid();
    let script = format!(
        r#"BEGIN {{ printf("READY\n"); }}
usdt:/proc/{p}/exe:processes:worker-spawn {{ printf("SPAWN app=%s slot=%u pid=%d cmd=%s\n", str(arg0), arg1, arg2, str(arg3)); }}
usdt:/proc/{p}/exe:processes:worker-ready {{ printf("WREADY app=%s slot=%u pid=%d us=%lu\n", str(arg0), arg1, arg2, arg3); }}
usdt:/proc/{p}/exe:processes:worker-crash {{ printf("CRASH app=%s slot=%u pid=%d code=%d signal=%d\n", str(arg0), arg1, arg2, arg3, arg4); }}
usdt:/proc/{p}/exe:processes:worker-exit {{ printf("EXIT app=%s slot=%u pid=%d\n", str(arg0), arg1, arg2); }}
usdt:/proc/{p}/exe:processes:restart-scheduled {{ printf("RESTART app=%s slot=%u attempt=%u delay_ms=%lu\n", str(arg0), arg1, arg2, arg3); }}
usdt:/proc/{p}/exe:processes:handle-pass {{ printf("PASS app=%s slot=%u pid=%d kind=%s\n", str(arg0), arg1, arg2, str(arg4)); }}"#
    );
    let mut t = Tracer::attach(p, &script);
    t.wait("READY");

    // A connection passed to the worker.
    let body = get(port).unwrap();
    assert!(body.contains(&format!("pid={first}")), "{body}");
    assert_eq!(
        t.wait("PASS "),
        format!("PASS app=traced slot=0 pid={first} kind=connection")
    );

    // A crash, its restart, the new worker.
    kill(first, libc::SIGKILL);
    assert_eq!(
        t.wait("CRASH "),
        format!("CRASH app=traced slot=0 pid={first} code=-1 signal=9")
    );
    let restart = t.wait("RESTART ");
    assert!(
        restart.starts_with("RESTART app=traced slot=0 attempt=1 delay_ms="),
        "{restart}"
    );
    let delay: u64 = restart.rsplit('=').next().unwrap().parse().unwrap();
    assert!((50..=100).contains(&delay), "{restart}");
    let spawn = t.wait("SPAWN ");
    let second: i32 = spawn
        .split("pid=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(second, first);
    assert_eq!(
        spawn,
        format!("SPAWN app=traced slot=0 pid={second} cmd={FIXTURE} serve")
    );
    let ready = t.wait("WREADY ");
    assert!(
        ready.starts_with(&format!("WREADY app=traced slot=0 pid={second} us=")),
        "{ready}"
    );
    let us: u64 = ready.rsplit('=').next().unwrap().parse().unwrap();
    assert!(us >= 50_000, "ready_after is 50ms but startup_us was {us}");
    assert!(
        t.seen.iter().all(|l| !l.starts_with("EXIT ")),
        "a crash is not an asked-for exit: {:?}",
        t.seen
    );
}
