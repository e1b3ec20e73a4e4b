//! Operating a running master: rolling reloads under load with zero failed requests (Rust
//! and Node workers, pass and shared mode), a reload to a broken version, memory-limit
//! replacement, restart of one slot, stopping one app, scaling to bounds, and a control
//! client of another user being refused.

use std::time::{Duration, Instant};

use crate::common::*;

fn has_node() -> bool {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Node server that is slow enough (20 ms per request) for requests to be in flight
/// when its worker is told to go.
const NODE_APP: &str = r#"
const http = require('http');
http.createServer((req, res) => {
  setTimeout(() => res.end(`pid=${process.pid}\n`), 20);
}).listen(Number(process.env.PORT));
"#;

/// Reloads the app under continuous load and checks that every request was answered and
/// every worker was replaced.
fn reload_under_load(m: &Master, port: u16, n: usize) {
    let before = pids(&m.wait_ready(n));
    let load = Load::start(port, 4);
    // Some traffic before, during and after.
    while load.ok() < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, stdout, stderr) = cli(m, &["reload", "--batch", "1"]);
    assert_eq!(code, Some(0), "reload failed: {stdout}{stderr}");
    assert!(stdout.contains(&format!("replaced {n}/{n}")), "{stdout}");
    let done_at = load.ok();
    while load.ok() < done_at + 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, failed) = load.stop_detailed();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the reload: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    let after = m.wait_ready(n);
    let now = pids(&after);
    assert!(
        now.iter().all(|p| !before.contains(p)),
        "{before:?} → {now:?}"
    );
    eprintln!("reload under load: {ok} requests, 0 failed");
}

#[test]
fn reload_rust_workers_in_pass_mode_without_failing_a_request() {
    let m = run(&[
        "-i",
        "4",
        "--listen",
        "127.0.0.1:0",
        "--dispatch",
        "round-robin",
        "--ready-after",
        "100ms",
        "--",
        FIXTURE,
        "serve",
        "graceful",
        "delay=5",
    ]);
    let port = m.port();
    reload_under_load(&m, port, 4);
}

#[test]
fn reload_rust_workers_in_shared_mode_without_failing_a_request() {
    let m = run(&[
        "-i",
        "4",
        "--listen",
        "127.0.0.1:0",
        "--dispatch",
        "shared",
        "--ready-after",
        "100ms",
        "--",
        FIXTURE,
        "serve",
        "graceful",
        "delay=5",
    ]);
    let port = m.port();
    reload_under_load(&m, port, 4);
}

#[test]
fn reload_node_workers_in_pass_mode_without_failing_a_request() {
    assert!(has_node(), "node is required (apt-get install nodejs)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.js"), NODE_APP).unwrap();
    let app = format!("{}/app.js", dir.path().display());
    let m = run_in(
        dir,
        &["-i", "4", "--listen", "127.0.0.1:0", "--", "node", &app],
    );
    let port = m.port();
    reload_under_load(&m, port, 4);
    assert!(m.out.matching("sent disconnect").len() >= 4);
}

#[test]
fn reload_node_workers_in_shared_mode_without_failing_a_request() {
    assert!(has_node(), "node is required (apt-get install nodejs)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.js"), NODE_APP).unwrap();
    let app = format!("{}/app.js", dir.path().display());
    let m = run_in(
        dir,
        &[
            "-i",
            "4",
            "--listen",
            "127.0.0.1:0",
            "--dispatch",
            "shared",
            "--",
            "node",
            &app,
        ],
    );
    let port = m.port();
    reload_under_load(&m, port, 4);
}

#[test]
fn a_reload_to_a_version_that_cannot_start_keeps_the_old_one_serving() {
    let config = |cmd: &str| {
        format!(
            r#"
            [apps.web]
            command = ["{FIXTURE}", "serve", "graceful", {cmd}]
            instances = 3
            listen = "127.0.0.1:0"
            dispatch = "round-robin"
            ready_after = "300ms"
            "#
        )
    };
    let m = run_config(&config("\"delay=1\""), &[]);
    let port = m.port();
    let before = pids(&m.wait_ready(3));
    let load = Load::start(port, 2);
    // The new version exits at once: it never becomes ready.
    std::fs::write(m.path().join("processes.toml"), config("\"exit=1@0\"")).unwrap();
    let (code, stdout, stderr) = cli(&m, &["reload"]);
    assert_ne!(
        code,
        Some(0),
        "a failed reload must fail the command: {stdout}"
    );
    assert!(
        stderr.contains("reload failed after replacing 0/3"),
        "{stderr}"
    );
    assert!(
        stderr.contains("keep running the previous version"),
        "{stderr}"
    );
    let ok_then = load.ok();
    while load.ok() < ok_then + 30 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, failed) = load.stop();
    assert_eq!(failed, 0, "{failed} of {ok} requests failed");
    let s = m.wait_ready(3);
    assert_eq!(pids(&s), before, "the old workers still serve");
    // No process was replaced: the attempt counts as no restart.
    let restarts = |s: &serde_json::Value| -> Vec<serde_json::Value> {
        s["apps"][0]["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|slot| slot["restarts"].clone())
            .collect()
    };
    assert_eq!(restarts(&s), vec![0, 0, 0], "{s}");
    // A crash of an old worker now restarts it with the old, working command.
    kill(before[0], libc::SIGKILL);
    let s = m.wait_status("the crashed old worker replaced", |s| {
        let p = pids(s);
        s["apps"][0]["ready"] == 3 && !p.contains(&before[0])
    });
    assert_eq!(s["apps"][0]["reloading"], false);
    assert_eq!(
        restarts(&s).iter().filter(|r| **r == 1).count(),
        1,
        "the crashed slot restarted once: {s}"
    );
    assert_eq!(restarts(&s).iter().filter(|r| **r == 0).count(), 2, "{s}");
}

#[test]
fn a_worker_past_max_memory_is_replaced_before_it_is_killed() {
    let m = run_config(
        &format!(
            r#"
            sample_interval = "100ms"
            [apps.leaky]
            command = ["{FIXTURE}", "serve", "graceful", "grow=20"]
            instances = 2
            listen = "127.0.0.1:0"
            dispatch = "round-robin"
            ready_after = "100ms"
            max_memory = "50MiB"
            "#
        ),
        &[],
    );
    let port = m.port();
    let first = pids(&m.wait_ready(2));
    let load = Load::start(port, 2);
    m.wait_log("above max_memory; starting its replacement");
    m.wait_log("stopping (memory)");
    m.wait_status("a replacement serving", |s| {
        s["apps"][0]["ready"] == 2 && pids(s).iter().any(|p| !first.contains(p))
    });
    let (ok, failed) = load.stop();
    assert_eq!(failed, 0, "{failed} of {ok} requests failed");
    assert!(
        m.out.matching("SIGKILL").is_empty(),
        "replaced, not killed: {}",
        m.out.text()
    );
}

#[test]
fn kill_memory_kills_at_once() {
    let m = run_config(
        &format!(
            r#"
            sample_interval = "100ms"
            [apps.leaky]
            command = ["{FIXTURE}", "grow=30"]
            ready_after = "100ms"
            kill_memory = "40MiB"
            "#
        ),
        &[],
    );
    m.wait_log("above kill_memory; killing it");
    // Its exit is told as the master's kill, not as a crash of unknown cause.
    m.wait_log("stopped by SIGKILL (it used");
    assert!(
        m.out.matching("was killed by SIGKILL").is_empty(),
        "{}",
        m.out.text()
    );
}

#[test]
fn restart_replaces_one_slot_new_first() {
    let m = run(&["-i", "2", "--ready-after", "100ms", "--", FIXTURE]);
    let s = m.wait_ready(2);
    let slot1 = s["apps"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == 1)
        .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    let (code, stdout, stderr) = cli(&m, &["restart", "processes-fixture", "1"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    m.wait_log("stopping (restart)");
    let s = m.wait_ready(2);
    let new = s["apps"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == 1)
        .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_ne!(new, slot1);
    let started = m.out.matching("(reload replacement)").len() + m.out.matching("started").len();
    assert!(started >= 3);
    let (code, _, stderr) = cli(&m, &["restart", "processes-fixture", "7"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("has no slot 7"), "{stderr}");
}

#[test]
fn stop_one_app_leaves_the_others_running() {
    let mut m = run_config(
        &format!(
            r#"
            [apps.a]
            command = ["{FIXTURE}"]
            ready_after = "50ms"
            [apps.b]
            command = ["{FIXTURE}"]
            instances = 2
            ready_after = "50ms"
            "#
        ),
        &[],
    );
    m.wait_status("both apps ready", |s| {
        s["apps"][0]["ready"] == 1 && s["apps"][1]["ready"] == 2
    });
    let (code, stdout, _) = cli(&m, &["stop", "a"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("stopping a\nstopped a"), "{stdout}");
    // `stop` returned once a's workers were gone, like `systemctl stop`.
    let s = m.status().unwrap();
    assert!(
        s["apps"][0]["workers"].as_array().unwrap().is_empty(),
        "{s}"
    );
    assert_eq!(s["apps"][1]["ready"], 2, "{s}");
    // It shows as stopped, not as waiting to restart.
    assert_eq!(s["apps"][0]["stopped"], true, "{s}");
    assert_eq!(s["apps"][0]["desired"], 0, "{s}");
    assert_eq!(s["apps"][0]["slots"][0]["state"], "stopped", "{s}");
    assert_eq!(s["apps"][1]["stopped"], false, "{s}");
    let (_, text, _) = cli(&m, &["status", "a"]);
    assert!(
        text.contains("desired 0  fixed  dispatch shared  (stopped)"),
        "{text}"
    );
    assert!(
        text.contains("stopped by `processes stop`; `processes start a` starts it"),
        "{text}"
    );
    // A stopped app is not scaled or reloaded behind the user's back: they are told how
    // to run it again, and `start` does.
    for args in [
        &["scale", "a", "2"][..],
        &["reload", "a"],
        &["restart", "a", "0"],
    ] {
        let (code, _, stderr) = cli(&m, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("a is stopped; `processes start a` runs it again"),
            "{args:?}: {stderr}"
        );
    }
    let (code, stdout, stderr) = cli(&m, &["start", "a"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "starting a (1 worker)");
    m.wait_status("a running again", |s| {
        s["apps"][0]["ready"] == 1 && s["apps"][1]["ready"] == 2
    });
    let (code, stdout, stderr) = cli(&m, &["stop"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("stopped all"), "{stdout}");
    // It returned once the master was gone: its control socket with it.
    assert!(!m.control.exists());
    assert!(m.wait_exit(Duration::from_secs(10)).success());
}

/// A reload still waiting for a replacement when its app is stopped ends there: the
/// client waiting for it is told and exits non-zero instead of waiting for good, and the
/// app starts again with the new settings.
#[test]
fn stopping_an_app_ends_its_reload() {
    let config = |ready_after: &str| {
        format!(
            r#"
            [apps.web]
            command = ["{FIXTURE}"]
            instances = 2
            ready_after = "{ready_after}"
            "#
        )
    };
    let m = run_config(&config("50ms"), &[]);
    m.wait_ready(2);
    // The new version's workers get ready only after an hour: the reload waits on them.
    std::fs::write(m.path().join("processes.toml"), config("1h")).unwrap();
    let reload = std::thread::scope(|scope| {
        let reload = scope.spawn(|| cli(&m, &["reload", "web"]));
        m.wait_status("the reload under way", |s| {
            s["apps"][0]["reloading"] == true && s["apps"][0]["size"].as_u64() > Some(2)
        });
        let (code, stdout, stderr) = cli(&m, &["stop", "web"]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        reload.join().unwrap()
    });
    let (code, stdout, stderr) = reload;
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("web: reload stopped after replacing 0/2: the app was stopped"),
        "{stderr}"
    );
    let s = m.status().unwrap();
    assert_eq!(s["apps"][0]["reloading"], false, "{s}");
    // Started again, it runs the new settings: not ready before its hour is up.
    let (code, _, stderr) = cli(&m, &["start", "web"]);
    assert_eq!(code, Some(0), "{stderr}");
    let s = m.wait_status("two new workers started", |s| s["apps"][0]["size"] == 2);
    assert_eq!(s["apps"][0]["ready"], 0, "{s}");
}

/// Stopping the only app leaves the master running, like stopping a PM2 app leaves its
/// daemon: the app can be started again.
#[test]
fn stopping_the_only_app_keeps_the_master_for_start() {
    let m = run(&["-i", "2", "--ready-after", "50ms", "--", FIXTURE]);
    m.wait_ready(2);
    let (code, stdout, stderr) = cli(&m, &["stop", "processes-fixture"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("stopped processes-fixture"), "{stdout}");
    let s = m
        .status()
        .unwrap_or_else(|| m.fail("no status after stopping the only app"));
    assert!(
        s["apps"][0]["workers"].as_array().unwrap().is_empty(),
        "{s}"
    );
    assert_eq!(s["apps"][0]["stopped"], true, "{s}");
    let (code, _, stderr) = cli(&m, &["start", "processes-fixture"]);
    assert_eq!(code, Some(0), "{stderr}");
    let s = m.wait_ready(2);
    assert_eq!(s["apps"][0]["stopped"], false, "{s}");
    assert_eq!(s["apps"][0]["desired"], 2, "{s}");
}

/// An app that crashes at start until it is fixed waits a minute between tries (its
/// backoff); once fixed, `processes start APP` or `processes reload APP` starts it at once.
#[test]
fn a_fixed_crash_looping_app_starts_at_once_on_start_or_reload() {
    for how in ["start", "reload"] {
        let m = run_config(
            r#"
            [apps.flaky]
            command = ["sh", "-c", "test -e {dir}/fixed || exit 3; exec {fixture}"]
            ready_after = "50ms"
            [apps.flaky.backoff]
            initial = "60s"
            max = "60s"
            "#,
            &[],
        );
        m.wait_log("exited with code 3 after");
        m.wait_log("; restart 1 in");
        std::fs::write(m.path().join("fixed"), "").unwrap();
        let asked = Instant::now();
        let (code, stdout, stderr) = cli(&m, &[how, "flaky"]);
        assert_eq!(code, Some(0), "{how}: {stdout}{stderr}");
        m.wait_status("flaky running", |s| s["apps"][0]["ready"] == 1);
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "{how}: flaky took {:?} to run after it was fixed",
            asked.elapsed()
        );
    }
}

#[test]
fn scale_sets_a_size_or_bounds() {
    let m = run(&["-i", "1", "--ready-after", "50ms", "--", FIXTURE]);
    m.wait_ready(1);
    let (code, stdout, _) = cli(&m, &["scale", "processes-fixture", "3"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("1 → 3 workers"), "{stdout}");
    assert!(!stdout.contains("autoscaling"), "{stdout}");
    m.wait_ready(3);
    let (code, stdout, _) = cli(&m, &["scale", "processes-fixture", "min=1,max=2"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("(bounds 1..2)"), "{stdout}");
    m.wait_ready(2);
    // A fixed size on an autoscaled app says that autoscaling stops, and how to resume it.
    let (code, stdout, _) = cli(&m, &["scale", "processes-fixture", "2"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("autoscaling is off now; `processes scale processes-fixture min=A,max=B`"),
        "{stdout}"
    );
    let s = m.status().unwrap();
    assert!(s["apps"][0]["autoscale"].is_null(), "{s}");
    let (code, _, stderr) = cli(&m, &["scale", "processes-fixture", "min=3,max=2"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("min 3 is above max (2)"), "{stderr}");
    let (code, _, stderr) = cli(&m, &["scale", "nope", "2"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no app named nope"), "{stderr}");
}

#[test]
fn status_reads_as_a_table_and_as_json() {
    let m = run(&[
        "-i",
        "2",
        "--ready-after",
        "50ms",
        "--name",
        "tbl",
        "--",
        FIXTURE,
    ]);
    m.wait_ready(2);
    let (code, stdout, _) = cli(&m, &["status"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("tbl  size 2 (ready 2)  desired 2"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(" ready ").count(), 2, "{stdout}");
    let (code, stdout, _) = cli(&m, &["status", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["apps"][0]["name"], "tbl");
    let (code, _, stderr) = cli(&m, &["status", "nope"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no app named nope"), "{stderr}");
}

/// The control socket serves only its owner: another uid cannot even reach it (0700
/// directory, 0600 socket), and if the permissions are opened up, the master's own
/// peer-credential check still refuses it.
#[test]
fn a_control_client_of_another_user_is_refused() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED a_control_client_of_another_user_is_refused: needs root to switch uid");
        return;
    }
    // The socket's directory must be reachable by another user for the second half; the
    // system's temp dir may not be (it is 0700 on some machines), /var/tmp is 1777.
    let sock_dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let m = run_with_control(
        tempfile::tempdir().unwrap(),
        sock_dir.path().join("control.sock"),
        &["-i", "1", "--ready-after", "50ms", "--", FIXTURE],
    );
    m.wait_ready(1);
    let as_nobody = |m: &Master| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "status",
                "--control",
            ])
            .arg(&m.control)
            .output()
            .expect("setpriv (util-linux)")
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&m.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = as_nobody(&m);
    assert_eq!(out.status.code(), Some(2));
    // Open the socket's directory and the socket itself for everyone.
    std::fs::set_permissions(sock_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&m.control, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = as_nobody(&m);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("permission denied: this master serves only its own user"),
        "{stderr}"
    );
    m.wait_log("control: refused a client running as uid 65534");
}

/// Editing the config file rolls the change out by itself, like `processes reload`, for
/// the apps whose settings changed; the others keep their workers.
#[test]
fn a_config_file_change_reloads_what_changed() {
    let config = |version: &str| {
        format!(
            r#"
            sample_interval = "100ms"
            [apps.changing]
            command = ["{FIXTURE}"]
            instances = 2
            env = {{ VERSION = "{version}" }}
            ready_after = "100ms"
            [apps.steady]
            command = ["{FIXTURE}"]
            ready_after = "100ms"
            "#
        )
    };
    let m = run_config(&config("1"), &[]);
    let before = m.wait_status("both apps ready", |s| {
        s["apps"][0]["ready"] == 2 && s["apps"][1]["ready"] == 1
    });
    let steady_before = before["apps"][1]["workers"][0]["pid"].clone();
    std::fs::write(m.path().join("processes.toml"), config("2")).unwrap();
    m.wait_log("changed: rolling reload of changing");
    m.wait_log("changing: reload done, 2/2");
    let after = m.wait_status("the new version ready", |s| {
        s["apps"][0]["ready"] == 2
            && s["apps"][0]["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["generation"] == 1)
    });
    for w in after["apps"][0]["workers"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            env.split(|&b| b == 0).any(|e| e == b"VERSION=2"),
            "worker {pid} runs the old environment"
        );
    }
    assert_eq!(
        after["apps"][1]["workers"][0]["pid"], steady_before,
        "an unchanged app keeps its worker"
    );
}

/// A changed `instances` in the config file resizes the app with the reload, and an app
/// added to the file starts.
#[test]
fn a_config_file_change_of_instances_resizes_the_app() {
    let config = |n: usize, extra: &str| {
        format!(
            r#"
            [apps.sized]
            command = ["{FIXTURE}"]
            instances = {n}
            ready_after = "1500ms"
            {extra}
            "#
        )
    };
    let m = run_config(&config(2, ""), &[]);
    m.wait_ready(2);
    let added = format!("[apps.extra]\ncommand = [\"{FIXTURE}\"]");
    std::fs::write(m.path().join("processes.toml"), config(3, &added)).unwrap();
    m.wait_log("sized: 2 → 3 workers (config reload)");
    m.wait_log("extra: new in the config file; starting 1 worker");
    // Changed again while that reload still runs: applied once it is done, not lost.
    std::fs::write(m.path().join("processes.toml"), config(1, &added)).unwrap();
    m.wait_log("sized: 3 → 1 workers (config reload)");
    let s = m.wait_status("sized at 1, extra running", |s| {
        s["apps"][0]["ready"] == 1 && s["apps"][1]["ready"] == 1
    });
    assert_eq!(s["apps"][1]["name"], "extra", "{s}");
    // Started once: the second edit, which kept it, did not start it again.
    assert_eq!(m.out.matching("extra: new in").len(), 1, "{}", m.out.text());
    let starts = m.out.matching("[extra:0] pid");
    let starts = starts.iter().filter(|(_, l)| l.ends_with(" started"));
    assert_eq!(starts.count(), 1, "{}", m.out.text());
}

/// Apps come and go with the config file, as with `supervisorctl update`: one removed
/// from it stops (and SIGHUP and `processes reload` go on working for the others), one
/// added starts, and the removed one starts again when it comes back.
#[test]
fn apps_added_to_or_removed_from_the_config_file_start_and_stop() {
    let config = |apps: &[&str]| {
        apps.iter()
            .map(|a| format!("[apps.{a}]\ncommand = [\"{FIXTURE}\"]\nready_after = \"50ms\"\n"))
            .collect::<String>()
    };
    let file = |m: &Master, apps: &[&str]| {
        std::fs::write(m.path().join("processes.toml"), config(apps)).unwrap()
    };
    let m = run_config(&config(&["a", "b"]), &[]);
    m.wait_status("a and b ready", |s| {
        s["apps"][0]["ready"] == 1 && s["apps"][1]["ready"] == 1
    });
    // Gone from the file: `processes reload` of everything stops b and reloads a.
    file(&m, &["a"]);
    let (code, stdout, stderr) = cli(&m, &["reload"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("b: gone from the config file; stopped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("reload done: 1 worker replaced"),
        "{stdout}"
    );
    let s = m.wait_status("b stopped", |s| {
        s["apps"][1]["stopped"] == true && s["apps"][1]["workers"].as_array().unwrap().is_empty()
    });
    assert_eq!(s["apps"][0]["ready"], 1, "{s}");
    assert_eq!(s["apps"][1]["removed"], true, "{s}");
    let (_, text, _) = cli(&m, &["status", "b"]);
    assert!(
        text.contains("gone from the config file; back in it"),
        "{text}"
    );
    // Gone means gone: it is not started by hand, only by coming back to the file.
    let (code, _, stderr) = cli(&m, &["start", "b"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("b is gone from the config file and stopped"),
        "{stderr}"
    );
    // SIGHUP works too.
    kill(m.pid(), libc::SIGHUP);
    m.wait_logs("a: reload done, 1/1", 2);
    // New in the file: c starts; back in the file: b starts again.
    file(&m, &["a", "b", "c"]);
    let (code, stdout, stderr) = cli(&m, &["reload"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("c: new in the config file; starting 1 worker"),
        "{stdout}"
    );
    assert!(
        stdout.contains("b: back in the config file; starting it"),
        "{stdout}"
    );
    // Only a is reloaded: the apps just started are not reloaded too.
    assert!(!stdout.contains("c: replacing"), "{stdout}");
    assert!(!stdout.contains("b: replacing"), "{stdout}");
    let s = m.wait_status("a, b and c ready", |s| {
        (0..3).all(|i| s["apps"][i]["ready"] == 1)
    });
    assert_eq!(s["apps"][2]["name"], "c", "{s}");
    assert_eq!(s["apps"][1]["stopped"], false, "{s}");
}

/// `-i max`, as in PM2: one worker per CPU the master may use.
#[test]
fn instances_max_runs_one_worker_per_cpu() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let m = run(&["-i", "max", "--ready-after", "50ms", "--", FIXTURE]);
    m.wait_ready(cpus);
}

/// `processes restart APP` without a slot restarts every worker of the app one at a time,
/// as PM2's `restart` does (a rolling reload).
#[test]
fn restart_without_a_slot_restarts_every_worker() {
    let m = run(&["-i", "2", "--ready-after", "50ms", "--", FIXTURE]);
    let before = pids(&m.wait_ready(2));
    let (code, stdout, stderr) = cli(&m, &["restart", "processes-fixture"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("reload done: 2 workers replaced"),
        "{stdout}"
    );
    let after = pids(&m.wait_ready(2));
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} → {after:?}"
    );
}

/// A slot waiting out its backoff shows, in `processes status`, how often it restarted
/// and when it starts again, where its worker's uptime and counts would be.
#[test]
fn status_shows_a_waiting_slots_restarts_and_when_it_starts_again() {
    let m = run_config(
        r#"
        [apps.crashy]
        command = ["{fixture}", "exit=1@0"]
        [apps.crashy.backoff]
        initial = "20ms"
        max = "60s"
        crash_loop_restarts = 3
        "#,
        &[],
    );
    let s = m.wait_status("the slot crash-looping, waiting", |s| {
        let slot = &s["apps"][0]["slots"][0];
        slot["state"] == "crash-looping" && slot["restart_in_ms"].as_u64() > Some(5_000)
    });
    let restarts = s["apps"][0]["slots"][0]["restarts"].as_u64().unwrap();
    assert!(restarts >= 2, "{s}");
    let (code, stdout, stderr) = cli(&m, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains("crash-looping"))
        .unwrap_or_else(|| panic!("no crash-looping slot in:\n{stdout}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    // slot, pid, state, uptime, restarts, passed, then the note.
    assert_eq!(&cols[..3], ["0", "-", "crash-looping"], "{line}");
    assert_eq!(cols[4], restarts.to_string(), "{line}");
    assert!(
        line.contains("restarts in ") && line.contains("crashes in a row"),
        "{line}"
    );
}

/// While a crash-looping slot's retry runs (for a second here), `status` gives the slot one
/// row, the worker's, not a second row for the slot as well.
#[test]
fn a_crash_looping_slots_running_retry_has_one_row() {
    let m = run_config(
        r#"
        [apps.crashy]
        command = ["{fixture}", "exit=1@1000"]
        [apps.crashy.backoff]
        initial = "20ms"
        max = "100ms"
        crash_loop_restarts = 2
        "#,
        &[],
    );
    let s = m.wait_status("a retry running after 2 crashes in a row", |s| {
        let app = &s["apps"][0];
        app["slots"][0]["consecutive_crashes"].as_u64() >= Some(2)
            && app["workers"].as_array().is_some_and(|w| w.len() == 1)
    });
    assert_eq!(s["apps"][0]["slots"][0]["state"], "crash-looping", "{s}");
    let (code, stdout, stderr) = cli(&m, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("0"))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
}

/// `--name` finds a master that was started with its own `--control` (and no `--name`:
/// its name comes from the command), and a name no master has gets an error that says
/// where it looked and how to reach such a master.
#[test]
fn name_finds_a_master_with_its_own_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("ux-find-me-{}", std::process::id());
    std::os::unix::fs::symlink(FIXTURE, dir.path().join(&name)).unwrap();
    let m = run_in(dir, &["--", &format!("{{dir}}/{name}")]);
    m.wait_ready(1);
    // A runtime dir of its own: the master's socket is not at the default path.
    let runtime = tempfile::tempdir().unwrap();
    let client = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = client(&["status", "--name", &name]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with(&format!("{name}  size 1")), "{stdout}");

    let (code, _, stderr) = client(&["status", "--name", "ux-no-such-master"]);
    assert_eq!(code, Some(2));
    let default = runtime.path().join("processes/ux-no-such-master.sock");
    assert!(
        stderr.contains(&default.display().to_string()) && stderr.contains("`--control PATH`"),
        "{stderr}"
    );
}

/// A client whose reader has gone (`processes status | head -1`) ends quietly, by
/// SIGPIPE as other command-line tools do, instead of panicking on a failed print.
#[test]
fn a_client_whose_reader_went_away_ends_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let m = run(&["-i", "1", "--ready-after", "50ms", "--", FIXTURE]);
    m.wait_ready(1);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let control = m.control.display().to_string();
    let out = std::process::Command::new(BIN)
        .args(["status", "--control", &control])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

/// A fixed size shrinks from its highest slots, so its workers stay slots 0…N−1
/// (`PROCESSES_WORKER_ID`), even when a low slot is the cheapest to drop: here slot 0 waits
/// out a crash's backoff, with no worker to stop.
#[test]
fn a_fixed_size_shrinks_from_its_highest_slots() {
    let m = run_config(
        &format!(
            r#"
            [apps.web]
            command = ["{FIXTURE}"]
            instances = 5
            ready_after = "50ms"
            [apps.web.backoff]
            initial = "60s"
            max = "60s"
            "#
        ),
        &[],
    );
    let s = m.wait_ready(5);
    kill(pid_of_slot(&s, 0), libc::SIGKILL);
    m.wait_status("slot 0 waiting to restart", |s| {
        s["apps"][0]["ready"] == 4 && s["apps"][0]["slots"][0]["restart_in_ms"].is_number()
    });
    let (code, _, stderr) = cli(&m, &["scale", "web", "2"]);
    assert_eq!(code, Some(0), "{stderr}");
    let s = m.wait_status("three slots gone", |s| {
        s["apps"][0]["slots"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    let slots: Vec<&serde_json::Value> = s["apps"][0]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["slot"])
        .collect();
    assert_eq!(slots, [0, 1], "{s}");
    // `start` runs the waiting slot at once: two workers, slots 0 and 1.
    let (code, _, stderr) = cli(&m, &["start", "web"]);
    assert_eq!(code, Some(0), "{stderr}");
    let s = m.wait_ready(2);
    pid_of_slot(&s, 0);
    pid_of_slot(&s, 1);
}

/// A reload cannot change what a listener is bound as: a new `listen`, or a `dispatch`
/// that turns passing into sharing, is refused with one error and the app runs on as it
/// was.
#[test]
fn a_reload_that_would_change_a_listener_is_refused() {
    let config = |dispatch: &str, listen: &str| {
        format!(
            "sample_interval = \"60s\"\n[apps.web]\ncommand = [\"{FIXTURE}\", \"serve\"]\n\
             instances = 2\nready_after = \"50ms\"\nlisten = \"{listen}\"\ndispatch = \"{dispatch}\"\n"
        )
    };
    let m = run_config(&config("round-robin", "127.0.0.1:0"), &[]);
    let before = pids(&m.wait_ready(2));
    for (dispatch, listen, why) in [
        ("shared", "127.0.0.1:0", "dispatch round-robin → shared"),
        ("round-robin", "127.0.0.2:0", "apps.web.listen changed"),
    ] {
        std::fs::write(m.path().join("processes.toml"), config(dispatch, listen)).unwrap();
        let (code, stdout, stderr) = cli(&m, &["reload"]);
        assert_eq!(code, Some(2), "{stdout}{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert!(stderr.contains("needs a restart"), "{stderr}");
    }
    let after = m.status().unwrap();
    assert_eq!(pids(&after), before, "{after}");
    assert_eq!(after["apps"][0]["generation"], 0, "{after}");
}
