//! Autoscaling with real Node workers: a CPU-bound app grows under load to the machine's
//! CPU bound and no further, shrinks back to `min` when the load stops; a worker whose
//! event loop stalls makes the pool grow on lag alone.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn has_node() -> bool {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An app whose every request burns `ms` of CPU.
const BURN: &str = r#"
const http = require('http');
const ms = Number(process.env.BURN_MS || 10);
http.createServer((req, res) => {
  const end = Date.now() + ms;
  while (Date.now() < end) {}
  res.setHeader('content-length', 0);
  res.end();
}).listen(Number(process.env.PORT));
"#;

/// An app that is idle but stalls its event loop for 300 ms every 1.5 s.
const STALL: &str = r#"
const http = require('http');
http.createServer((req, res) => res.end('ok\n')).listen(Number(process.env.PORT));
setInterval(() => { const end = Date.now() + 300; while (Date.now() < end) {} }, 1500);
"#;

fn autoscale_config(app: &str, min: usize, max: usize) -> String {
    format!(
        r#"
        sample_interval = "200ms"
        [apps.auto]
        command = ["node", "{{dir}}/{app}"]
        listen = "127.0.0.1:0"
        autoscale = {{ min = {min}, max = {max}, down_window = "3s", down_interval = "1s" }}
        "#
    )
}

fn app_size(s: &Value) -> usize {
    s["apps"][0]["size"].as_u64().unwrap() as usize
}

#[test]
fn a_cpu_bound_app_grows_to_the_cpu_bound_and_back_to_min() {
    if !has_node() {
        panic!("node is required for this test (apt-get install nodejs)");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("burn.js"), BURN).unwrap();
    let text =
        autoscale_config("burn.js", 1, 8).replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("processes.toml"), text).unwrap();
    let m = run_in(dir, &["-c", "processes.toml"]);
    let port = m.port();
    m.wait_ready(1);
    let cpus = m.wait_status("host figures", |s| s["host"]["cpus"].is_number())["host"]["cpus"]
        .as_f64()
        .unwrap();
    let bound = (cpus.ceil() as usize).min(8);

    let load = Load::start(port, 6);
    let grown = m.wait_status("the pool at the CPU bound", |s| app_size(s) >= bound);
    // Keep the load on a while and watch that it never goes past the bound.
    let until = Instant::now() + Duration::from_secs(3);
    let mut largest = app_size(&grown);
    while Instant::now() < until {
        if let Some(s) = m.status() {
            largest = largest.max(app_size(&s));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, failures) = load.stop();
    assert_eq!(largest, bound, "grew to {largest} with {cpus} CPUs");
    assert_eq!(failures, 0, "requests failed while the pool grew");
    let change = &m.status().unwrap()["apps"][0]["autoscale"];
    assert!(
        change["decision"]["upper"].as_u64().unwrap() as usize <= bound,
        "{change}"
    );
    // The text status says the machine caps it below max.
    let upper = change["decision"]["upper"].as_u64().unwrap();
    if upper < 8 {
        let (_, stdout, _) = cli(&m, &["status"]);
        assert!(
            stdout.contains(&format!(
                "bounds 1..8 (at most {upper} here: machine bound)"
            )),
            "{stdout}"
        );
    }

    // Idle again: back to min, one worker at a time, most idle first.
    let s = m.wait_status("the pool back at min", |s| {
        app_size(s) == 1 && s["apps"][0]["workers"].as_array().unwrap().len() == 1
    });
    assert_eq!(s["apps"][0]["desired"], 1);
    m.wait_log("scale_down");
    assert!(m.out.matching("→ 1 workers").len() == 1, "{}", m.out.text());
}

#[test]
fn a_stalling_event_loop_scales_up_on_lag() {
    if !has_node() {
        panic!("node is required for this test (apt-get install nodejs)");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stall.js"), STALL).unwrap();
    let text =
        autoscale_config("stall.js", 1, 8).replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("processes.toml"), text).unwrap();
    let m = run_in(dir, &["-c", "processes.toml"]);
    m.wait_ready(1);
    let s = m.wait_status("a scale-up", |s| app_size(s) >= 2);
    let change = &s["apps"][0]["autoscale"]["last_change"];
    assert_eq!(change["reason"], "lag", "{change}");
    assert!(
        change["text"].as_str().unwrap().starts_with("lag p99"),
        "{change}"
    );
    // The loop is busy 300 ms in 1.5 s (20 %), well under the setpoint, so utilization
    // alone would never have grown it: the decision names lag.
}

#[test]
fn node_workers_report_load_through_the_preload() {
    if !has_node() {
        panic!("node is required for this test (apt-get install nodejs)");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("burn.js"), BURN).unwrap();
    let app = format!("{}/burn.js", dir.path().display());
    let m = run_in(
        dir,
        &[
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--sample-interval",
            "100ms",
            "--",
            "node",
            &app,
        ],
    );
    let port = m.port();
    m.wait_ready(2);
    let load = Load::start(port, 2);
    let s = m.wait_status("ELU, lag and RSS for both workers", |s| {
        s["apps"][0]["workers"].as_array().unwrap().iter().all(|w| {
            w["elu"].as_f64().is_some_and(|e| e > 0.2)
                && w["lag_ms"].is_number()
                && w["rss_bytes"].as_u64().unwrap_or(0) > 1 << 20
        })
    });
    assert_eq!(load.stop().1, 0);
    // The app's own message handlers never saw the internal traffic: nothing in its
    // output, and its environment still has the app's NODE_OPTIONS untouched otherwise.
    assert!(
        m.out.matching("NODE_PROCESSES").is_empty(),
        "{}",
        m.out.text()
    );
    assert!(s["sample"]["ticks"].as_u64().unwrap() > 0);
}

/// A worker of an autoscaled pool crashes and waits out its backoff: the controller, which
/// sizes from the workers alive, must not take the empty slot away (it used to "hold" at
/// the one left and shrink the pool); the slot restarts and the pool is whole again.
#[test]
fn a_crash_in_an_autoscaled_pool_is_restarted_not_scaled_away() {
    let mut m = run_config(
        r#"
        sample_interval = "100ms"
        [apps.web]
        command = ["{fixture}"]
        ready_after = "50ms"
        autoscale = { min = 1, max = 4, cpu_factor = 8, down_window = "10m" }
        [apps.web.backoff]
        initial = "2s"
        max = "2s"
        "#,
        &[],
    );
    m.wait_ready(1);
    m.signal(libc::SIGTTIN);
    // By hand on an autoscaled app: the log says the controller may change it again.
    m.wait_log("web: 1 → 2 workers (by hand); autoscaling sizes this app");
    let s = m.wait_ready(2);
    let victim = pids(&s)[0];
    kill(victim, libc::SIGKILL);
    m.wait_log("was killed by SIGKILL");
    // Ten ticks or more pass while the slot waits (1–2 s); then it is back.
    m.wait_status("the crashed slot back", |s| {
        s["apps"][0]["ready"] == 2 && !pids(s).contains(&victim)
    });
    assert!(
        m.out.matching("2 → 1 workers").is_empty(),
        "{}",
        m.out.text()
    );
    let (code, _, _) = cli(&m, &["stop"]);
    assert_eq!(code, Some(0));
    assert!(m.wait_exit(Duration::from_secs(10)).success());
}

/// A rolling reload of an idle autoscaled pool: while a slot's replacement starts, the slot
/// has two workers, but the pool is not bigger. The controller must not grow it (it used to
/// "hold" at the two it counted and keep a second worker until the down window passed).
#[test]
fn a_reload_does_not_grow_an_autoscaled_pool() {
    let m = run_config(
        r#"
        sample_interval = "100ms"
        [apps.web]
        command = ["{fixture}"]
        ready_after = "500ms"
        autoscale = { min = 1, max = 4, cpu_factor = 8, down_window = "10m" }
        "#,
        &[],
    );
    let before = pids(&m.wait_ready(1));
    let (code, stdout, stderr) = cli(&m, &["reload"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("reload done: 1 worker replaced"),
        "{stdout}"
    );
    let after = m.wait_ready(1);
    assert_ne!(pids(&after), before);
    assert_eq!(after["apps"][0]["desired"], 1, "{after}");
    assert!(
        m.out.matching("1 → 2 workers").is_empty(),
        "{}",
        m.out.text()
    );
}
