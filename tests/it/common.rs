//! The harness: runs a real `processes` master in its own temp dir, captures its output,
//! and waits for events (a log line, a status condition, an exit) instead of sleeping.
//! On failure it prints the command and everything the master wrote.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_processes");
pub const FIXTURE: &str = env!("CARGO_BIN_EXE_processes-fixture");

/// Everything a master printed, with a condvar to wait on.
#[derive(Default)]
pub struct Output {
    lines: Mutex<Vec<(Instant, String)>>,
    changed: Condvar,
}

impl Output {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push((Instant::now(), line));
        self.changed.notify_all();
    }
    pub fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
    /// Lines containing `pat`, with the instant each arrived.
    pub fn matching(&self, pat: &str) -> Vec<(Instant, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.contains(pat))
            .cloned()
            .collect()
    }
    /// Waits until at least `n` lines contain `pat`; returns them.
    pub fn wait_for(
        &self,
        pat: &str,
        n: usize,
        timeout: Duration,
    ) -> Option<Vec<(Instant, String)>> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            let found: Vec<_> = lines
                .iter()
                .filter(|(_, l)| l.contains(pat))
                .cloned()
                .collect();
            if found.len() >= n {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

pub struct Master {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    pub out: Arc<Output>,
    pub args: Vec<String>,
    exited: Option<ExitStatus>,
}

/// Starts `processes run ARGS` with a control socket in a fresh temp dir.
pub fn run(args: &[&str]) -> Master {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir, args)
}

pub fn run_in(dir: tempfile::TempDir, args: &[&str]) -> Master {
    let control = dir.path().join("control.sock");
    run_with_control(dir, control, args)
}

/// Like [`run_in`], with the control socket at `control`.
pub fn run_with_control(dir: tempfile::TempDir, control: PathBuf, args: &[&str]) -> Master {
    run_with(dir, control, args, |_| {})
}

/// The general form: `setup` may add environment or fds to the master's command.
pub fn run_with(
    dir: tempfile::TempDir,
    control: PathBuf,
    args: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Master {
    let mut full: Vec<String> = vec![
        "run".into(),
        "--control".into(),
        control.display().to_string(),
    ];
    full.extend(
        args.iter()
            .map(|s| s.replace("{dir}", &dir.path().display().to_string())),
    );
    let mut cmd = Command::new(BIN);
    cmd.args(&full)
        .current_dir(dir.path())
        .env("PROCESSES_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    spawn_master(cmd, dir, control, full)
}

/// Starts a prepared command (the master, possibly behind a wrapper) and captures its
/// output.
pub fn spawn_master(
    mut cmd: Command,
    dir: tempfile::TempDir,
    control: PathBuf,
    full: Vec<String>,
) -> Master {
    let mut child = cmd.spawn().expect("start processes");
    let out = Arc::new(Output::default());
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let out = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                match line {
                    Ok(l) => out.push(strip_ansi(&l)),
                    Err(_) => break,
                }
            }
        });
    }
    Master {
        child,
        dir,
        control,
        out,
        args: full,
        exited: None,
    }
}

/// Writes a `processes.toml` into a temp dir and runs it.
pub fn run_config(toml: &str, extra: &[&str]) -> Master {
    let dir = tempfile::tempdir().unwrap();
    let text = toml
        .replace("{fixture}", FIXTURE)
        .replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("processes.toml"), text).unwrap();
    let mut args = vec!["-c", "processes.toml"];
    args.extend_from_slice(extra);
    run_in(dir, &args)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Master {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails the test with the master's output.
    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\n--- command: {BIN} {}\n--- output:\n{}\n---",
            self.args.join(" "),
            self.out.text()
        );
    }

    pub fn wait_log(&self, pat: &str) -> String {
        self.wait_logs(pat, 1).pop().unwrap().1
    }

    pub fn wait_logs(&self, pat: &str, n: usize) -> Vec<(Instant, String)> {
        self.out
            .wait_for(pat, n, Duration::from_secs(30))
            .unwrap_or_else(|| self.fail(&format!("no {n} lines containing {pat:?} within 30s")))
    }

    /// The first TCP port the master says it listens on.
    pub fn port(&self) -> u16 {
        let line = self.wait_log("listening on ");
        let addr = line
            .rsplit("listening on ")
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        addr.rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| self.fail("no port in log"))
    }

    pub fn status(&self) -> Option<Value> {
        processes::control::request(
            &self.control,
            &processes::control::Request::Status { app: None },
        )
        .ok()
    }

    /// Polls status until `f` holds (the condition is the event we wait for).
    pub fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.status()
                && f(&s)
            {
                return s;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "status never showed {what}; last: {:?}",
                    self.status()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until app 0 has `n` ready workers and nothing else running.
    pub fn wait_ready(&self, n: usize) -> Value {
        self.wait_status(&format!("{n} ready workers"), |s| {
            let a = &s["apps"][0];
            a["ready"] == n && a["workers"].as_array().map(|w| w.len()) == Some(n)
        })
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.exited = Some(s);
                // Let the reader threads drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return s;
            }
            if Instant::now() > deadline {
                self.fail("the master did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if self.exited.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- master output:\n{}\n---", self.out.text());
        }
    }
}

/// The app named `name` in a status value.
pub fn app_named<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no app {name} in {s}"))
}

/// Worker pids of app 0 from a status value.
pub fn pids(status: &Value) -> Vec<i32> {
    status["apps"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// Whether a process is gone (or a zombie nobody reaped yet).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

pub fn wait_dead(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    is_dead(pid)
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2); the tests only signal processes they started.
    unsafe { libc::kill(pid, sig) };
}

/// One HTTP/1.1 GET on a fresh connection; returns the body.
pub fn get(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut resp = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        resp.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(head_end) = resp.find("\r\n\r\n") {
            let len = resp[..head_end].lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if let Some(len) = len
                && resp.len() >= head_end + 4 + len
            {
                break;
            }
        }
    }
    if !resp.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad response: {resp:?}")));
    }
    Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Client threads making requests (a new connection each) until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, clients: usize) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the clients; returns (answered, failed).
    pub fn stop(self) -> (u64, u64) {
        let (ok, failed) = self.stop_detailed();
        (ok, failed.len() as u64)
    }

    /// Stops the clients; returns the answered count and each failure's message.
    pub fn stop_detailed(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(std::sync::atomic::Ordering::Relaxed), failures)
    }
}

/// Runs the `processes` CLI against a master; returns (exit code, stdout, stderr).
pub fn cli(master: &Master, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full: Vec<&str> = args.to_vec();
    let control = master.control.display().to_string();
    full.push("--control");
    full.push(&control);
    let out = Command::new(BIN).args(&full).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The pid of the first app's worker in `slot`.
pub fn pid_of_slot(status: &Value, slot: u64) -> i32 {
    status["apps"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == slot)
        .and_then(|w| w["pid"].as_i64())
        .unwrap_or_else(|| panic!("no worker in slot {slot}: {status}")) as i32
}
