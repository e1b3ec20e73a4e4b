//! A good citizen under systemd: `sd_notify` towards the master's own supervisor
//! (`READY=1` once every app has its minimum ready, `RELOADING=1`/`READY=1` around
//! reloads, `WATCHDOG=1`, `STOPPING=1`), and listeners taken from socket activation
//! (`LISTEN_FDS`) instead of bound.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use crate::common::*;

/// A fake `NOTIFY_SOCKET`: collects what the master sends.
struct Notifications {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind(dir: &std::path::Path) -> (Notifications, std::path::PathBuf) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        (
            Notifications {
                sock,
                seen: Vec::new(),
            },
            path,
        )
    }

    /// Receives one datagram into `seen`, or nothing within the read timeout (200 ms).
    fn recv_one(&mut self) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.sock.recv(&mut buf) {
            let s = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push((Instant::now(), s));
        }
    }

    /// Waits for a datagram containing `what`; returns it.
    fn wait(&mut self, what: &str) -> String {
        self.wait_count(what, 1, Duration::from_secs(30), "no notification");
        let (_, s) = self.seen.iter().find(|(_, s)| s.contains(what)).unwrap();
        s.clone()
    }

    /// Receives until `n` datagrams seen so far contain `what`; fails with `why` if that
    /// takes longer than `within`.
    fn wait_count(&mut self, what: &str, n: usize, within: Duration, why: &str) {
        let deadline = Instant::now() + within;
        while self.count(what) < n {
            assert!(
                Instant::now() < deadline,
                "{why}: {n} × {what:?} not seen within {within:?}; got {:?}",
                self.seen
            );
            self.recv_one();
        }
    }

    fn count(&self, what: &str) -> usize {
        self.seen.iter().filter(|(_, s)| s.contains(what)).count()
    }
}

#[test]
fn sd_notify_ready_reloading_watchdog_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (mut n, path) = Notifications::bind(dir.path());
    let control = dir.path().join("control.sock");
    let mut m = run_with(
        dir,
        control,
        &["-i", "2", "--ready-after", "300ms", "--", FIXTURE],
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &path)
                .env("WATCHDOG_USEC", "400000");
        },
    );
    let ready = n.wait("READY=1");
    assert!(ready.contains("STATUS=2 workers ready"), "{ready}");
    // It came only once both workers were ready.
    let s = m.status().unwrap();
    assert_eq!(s["apps"][0]["ready"], 2);
    // Watchdog pings at half of WATCHDOG_USEC.
    n.wait("WATCHDOG=1");
    n.wait_count(
        "WATCHDOG=1",
        3,
        Duration::from_secs(5),
        "watchdog pings too slow",
    );
    // A reload is bracketed by RELOADING=1 and READY=1.
    let readies_before = n.count("READY=1");
    m.signal(libc::SIGHUP);
    let reloading = n.wait("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    m.wait_log("reload done, 2/2");
    n.wait_count(
        "READY=1",
        readies_before + 1,
        Duration::from_secs(10),
        "no READY=1 after the reload",
    );
    m.signal(libc::SIGTERM);
    n.wait("STOPPING=1");
    assert!(m.wait_exit(Duration::from_secs(10)).success());
}

/// Runs the master with `listener` at fd 3 and `LISTEN_FDS=1`, `LISTEN_PID` its own pid,
/// as systemd's socket activation would: `sh` sets `LISTEN_PID=$$` and execs the master,
/// which keeps that pid.
fn socket_activated(listener: &std::net::TcpListener, args: &[&str]) -> Master {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let fd = listener.as_raw_fd();
    let mut full: Vec<String> = vec![
        "run".into(),
        "--control".into(),
        control.display().to_string(),
    ];
    full.extend(args.iter().map(|s| s.to_string()));
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(&full)
        .current_dir(dir.path())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only dup2 and fcntl, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself is a no-op that would leave close-on-exec set.
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_master(cmd, dir, control, full)
}

#[test]
fn listeners_come_from_socket_activation() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let m = socket_activated(
        &listener,
        &["-i", "2", "--ready-after", "50ms", "--", FIXTURE, "serve"],
    );
    m.wait_log(&format!("using 127.0.0.1:{port} from systemd (LISTEN_FDS)"));
    drop(listener);
    m.wait_ready(2);
    for _ in 0..4 {
        assert!(get(port).unwrap().starts_with("slot="));
    }
    assert_eq!(m.port(), port);
}

#[test]
fn a_configured_address_is_matched_to_the_socket_systemd_passed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let addr = format!(":{port}");
    let m = socket_activated(
        &listener,
        &[
            "-i",
            "1",
            "--listen",
            &addr,
            "--dispatch",
            "round-robin",
            "--ready-after",
            "50ms",
            "--",
            FIXTURE,
            "serve",
        ],
    );
    m.wait_log(&format!("using 127.0.0.1:{port} from systemd (LISTEN_FDS)"));
    drop(listener);
    m.wait_ready(1);
    assert!(get(port).unwrap().starts_with("slot=0"));
}
