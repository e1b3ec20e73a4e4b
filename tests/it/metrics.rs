//! Observability: the Prometheus rules, example config and Grafana dashboard in `scripts/`
//! are checked with the real `promtool` and against the metric names in `src/metrics.rs`,
//! and a real Prometheus scrapes a real master while it scales and loses a worker.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`). Under CI
//! (`PROCESSES_REQUIRE_PROMETHEUS=1`) a missing one is a failure; elsewhere the tests say
//! they skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

const METRICS_RS: &str = include_str!("../../src/metrics.rs");
const DASHBOARD: &str = include_str!("../../scripts/grafana/processes.json");
const ALERTS: &str = include_str!("../../scripts/prometheus/alerts.yml");
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");

// ---- the names src/metrics.rs declares ---------------------------------------------------

struct Declared {
    /// Every metric name (the `pub const X: &str = "processes_…"` constants).
    names: BTreeSet<String>,
    /// The ones described as histograms, which Prometheus sees as `_bucket`, `_sum`, `_count`.
    histograms: BTreeSet<String>,
}

impl Declared {
    fn parse() -> Self {
        let mut consts = BTreeMap::new();
        for line in METRICS_RS.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const ") else {
                continue;
            };
            if let Some((ident, value)) = rest.split_once(": &str = \"")
                && let Some(name) = value.strip_suffix("\";")
                && name.starts_with("processes_")
            {
                consts.insert(ident.to_string(), name.to_string());
            }
        }
        let histograms = METRICS_RS
            .split("describe_histogram!(")
            .skip(1)
            .map(|rest| {
                let ident: String = rest
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                consts
                    .get(&ident)
                    .unwrap_or_else(|| panic!("describe_histogram!({ident}) is no name constant"))
                    .clone()
            })
            .collect::<BTreeSet<_>>();
        let names: BTreeSet<String> = consts.into_values().collect();
        assert!(names.len() >= 20, "too few names parsed: {names:?}");
        assert!(
            histograms.contains("processes_event_loop_lag_seconds"),
            "{histograms:?}"
        );
        Declared { names, histograms }
    }

    /// Whether Prometheus would have a series called `name`.
    fn knows(&self, name: &str) -> bool {
        self.names.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| self.histograms.contains(base))
            })
    }

    /// The declared name a referenced series belongs to.
    fn base<'a>(&self, name: &'a str) -> &'a str {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| self.histograms.contains(*base))
            })
            .unwrap_or(name)
    }
}

/// Every `processes_[a-z_]+` word in `text`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("processes_") {
        let start = from + at;
        let word_start = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let end = start
            + text[start..]
                .bytes()
                .take_while(|c| c.is_ascii_lowercase() || *c == b'_')
                .count();
        if word_start {
            out.insert(text[start..end].trim_end_matches('_').to_string());
        }
        from = end;
    }
    out
}

// ---- the tools -----------------------------------------------------------------------------

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The tool's path, or `None` after saying the test skipped (a failure under CI).
fn need(tool: &str, test: &str) -> Option<PathBuf> {
    if let Some(p) = on_path(tool) {
        return Some(p);
    }
    let why = format!("{tool} is not on PATH (Debian: apt-get install prometheus)");
    if std::env::var_os("PROCESSES_REQUIRE_PROMETHEUS").is_some() {
        panic!("{test} must run here (PROCESSES_REQUIRE_PROMETHEUS is set) but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

fn run_tool(tool: &Path, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    if !out.status.success() {
        panic!(
            "{} {} failed ({}):\n{}{}",
            tool.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

// ---- static checks -------------------------------------------------------------------------

#[test]
fn promtool_accepts_the_rules_and_the_example_config() {
    let Some(promtool) = need(
        "promtool",
        "promtool_accepts_the_rules_and_the_example_config",
    ) else {
        return;
    };
    let out = run_tool(
        &promtool,
        &[
            "check",
            "rules",
            &format!("{SCRIPTS}/prometheus/alerts.yml"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
    // The example config loads alerts.yml from beside itself.
    let out = run_tool(
        &promtool,
        &[
            "check",
            "config",
            &format!("{SCRIPTS}/prometheus/prometheus.yml"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 rule files found"), "{text}");
}

/// promtool's rule unit tests: each alert fires on the series it is about, after its `for`,
/// and not on a healthy neighbour.
const RULE_TESTS: &str = r#"
rule_files:
  - alerts.yml
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'up{job="processes",instance="a:9464"}'
        values: '1 1 0x8'
      - series: 'up{job="processes",instance="b:9464"}'
        values: '1x10'
      - series: 'processes_crash_looping_slots{job="processes",instance="a:9464",app="web"}'
        values: '0 1x8'
      - series: 'processes_crash_looping_slots{job="processes",instance="a:9464",app="api"}'
        values: '0x9'
    alert_rule_test:
      - eval_time: 45s
        alertname: ProcessesMasterDown
        exp_alerts: []
      - eval_time: 90s
        alertname: ProcessesMasterDown
        exp_alerts:
          - exp_labels: {severity: critical, job: processes, instance: "a:9464"}
            exp_annotations:
              summary: "processes master a:9464 is down"
              description: "Prometheus could not scrape the processes master at a:9464 for 1 minute. Its workers die with it (parent-death signal), so every app it ran is down on this machine, or its metrics endpoint is unreachable."
      - eval_time: 60s
        alertname: ProcessesCrashLooping
        exp_alerts: []
      - eval_time: 90s
        alertname: ProcessesCrashLooping
        exp_alerts:
          - exp_labels: {severity: critical, job: processes, instance: "a:9464", app: web}
            exp_annotations:
              summary: "web on a:9464 is crash-looping"
              description: "1 worker slot(s) of web on a:9464 have been crash-looping for 1 minute: they keep exiting soon after starting and are retried at the longest backoff delay. Check the worker's output (`processes status`, the master's log) for why it exits."
  - interval: 1m
    input_series:
      # Hot and pinned, as saturation says.
      - series: 'processes_saturation_ratio{job="processes",instance="a:9464",app="sat"}'
        values: '0.5x10'
      # Hot and held by the CPU bound.
      - series: 'processes_saturation_ratio{job="processes",instance="a:9464",app="cpu"}'
        values: '0x10'
      - series: 'processes_utilization_ratio{job="processes",instance="a:9464",app="cpu"}'
        values: '0.8x10'
      - series: 'processes_bound_binding{job="processes",instance="a:9464",app="cpu",bound="cpu"}'
        values: '1x10'
      - series: 'processes_bound_binding{job="processes",instance="a:9464",app="cpu",bound="max"}'
        values: '0x10'
      # Hot but free to grow: no alert.
      - series: 'processes_utilization_ratio{job="processes",instance="a:9464",app="free"}'
        values: '0.8x10'
      - series: 'processes_bound_binding{job="processes",instance="a:9464",app="free",bound="none"}'
        values: '1x10'
      - series: 'processes_bound_binding{job="processes",instance="a:9464",app="free",bound="cpu"}'
        values: '0x10'
      # Late event loops (every sample between 50 and 100 ms) and punctual ones.
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="slow",le="0.05"}'
        values: '0x10'
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="slow",le="0.1"}'
        values: '0+60x10'
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="slow",le="+Inf"}'
        values: '0+60x10'
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="quick",le="0.01"}'
        values: '0+60x10'
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="quick",le="0.05"}'
        values: '0+60x10'
      - series: 'processes_event_loop_lag_seconds_bucket{job="processes",instance="a:9464",app="quick",le="+Inf"}'
        values: '0+60x10'
      # Six crashes a minute; reloads do not count.
      - series: 'processes_restarts_total{job="processes",instance="a:9464",app="sat",reason="crash"}'
        values: '0+6x20'
      - series: 'processes_restarts_total{job="processes",instance="a:9464",app="free",reason="reload"}'
        values: '0+60x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: ProcessesPoolSaturated
        exp_alerts: []
      - eval_time: 5m
        alertname: ProcessesPoolSaturated
        exp_alerts:
          - exp_labels: {severity: warning, job: processes, instance: "a:9464", app: sat}
            exp_annotations:
              summary: "sat on a:9464 is pinned at its machine bound while hot"
              description: "sat on a:9464 cannot grow on this machine (its size is held by CPUs, memory or a cgroup limit) and its workers run above the setpoint (saturation or utilization 50%) for 5 minutes. Add machines (scale the Deployment on processes_saturation_ratio) or give this one more CPU or memory."
          - exp_labels: {severity: warning, job: processes, instance: "a:9464", app: cpu}
            exp_annotations:
              summary: "cpu on a:9464 is pinned at its machine bound while hot"
              description: "cpu on a:9464 cannot grow on this machine (its size is held by CPUs, memory or a cgroup limit) and its workers run above the setpoint (saturation or utilization 80%) for 5 minutes. Add machines (scale the Deployment on processes_saturation_ratio) or give this one more CPU or memory."
      - eval_time: 10m
        alertname: ProcessesPoolAtMaxWhileHot
        exp_alerts: []
      - eval_time: 5m
        alertname: ProcessesEventLoopLagHigh
        exp_alerts: []
      - eval_time: 7m
        alertname: ProcessesEventLoopLagHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: processes, instance: "a:9464", app: slow}
            exp_annotations:
              summary: "slow on a:9464: event-loop lag p99 above 50 ms"
              description: "The 99th percentile of event-loop lag of slow's workers on a:9464 has been 99.5ms for 5 minutes (target: 50 ms). Requests wait behind blocked event loops: look for CPU-heavy handlers, or a pool that cannot grow (see ProcessesPoolSaturated)."
      - eval_time: 16m
        alertname: ProcessesRestartsHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: processes, instance: "a:9464", app: sat}
            exp_annotations:
              summary: "sat on a:9464 restarts workers often"
              description: "Workers of sat on a:9464 have been restarted after crashes or for exceeding max_memory 6.0 times a minute for 10 minutes. Each restart drops the connections that worker held."
"#;

#[test]
fn the_alerts_fire_when_they_should() {
    let Some(promtool) = need("promtool", "the_alerts_fire_when_they_should") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alerts.yml"), ALERTS).unwrap();
    let tests = dir.path().join("alerts_test.yml");
    std::fs::write(&tests, RULE_TESTS).unwrap();
    let out = run_tool(&promtool, &["test", "rules", tests.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_alerts_use_only_declared_metrics() {
    let declared = Declared::parse();
    let used = referenced(ALERTS);
    assert!(used.len() >= 5, "{used:?}");
    for name in &used {
        assert!(
            declared.knows(name),
            "alerts.yml uses {name}, which src/metrics.rs does not declare"
        );
    }
}

/// Every panel, rows' nested panels included.
fn all_panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Every PromQL expression in the dashboard: panel targets and annotations.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    let mut out: Vec<String> = all_panels(dash)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("a target without expr")
                .to_string()
        })
        .collect();
    for a in dash["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push(e.to_string());
        }
    }
    out
}

#[test]
fn the_dashboard_is_valid_and_uses_only_declared_metrics() {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("processes.json is not JSON");
    assert!(
        dash["schemaVersion"].as_i64().unwrap() >= 36,
        "schemaVersion"
    );
    assert!(!dash["title"].as_str().unwrap().is_empty());

    // Importable: a Prometheus data source input, a data source variable bound to it, and
    // the app variable.
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("datasource")["current"]["value"], "${DS_PROMETHEUS}");
    assert_eq!(
        var("app")["definition"],
        "label_values(processes_desired_workers, app)"
    );

    // Panels: unique ids, every query on the templated data source.
    let ds_ok = |d: &Value| d["type"] == "prometheus" && d["uid"] == "${datasource}";
    let mut ids = BTreeSet::new();
    for p in all_panels(&dash) {
        let id = p["id"].as_i64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(p["gridPos"]["w"].as_i64().is_some(), "{p}");
        if p["type"] == "row" {
            continue;
        }
        assert!(ds_ok(&p["datasource"]), "panel {:?}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {:?} has no query", p["title"]);
        for t in targets {
            assert!(ds_ok(&t["datasource"]), "panel {:?}: {t}", p["title"]);
        }
    }

    // Every name it uses is declared, and every declared metric is shown somewhere.
    let declared = Declared::parse();
    let used = referenced(DASHBOARD);
    for name in &used {
        assert!(
            declared.knows(name),
            "the dashboard uses {name}, which src/metrics.rs does not declare"
        );
    }
    let shown: BTreeSet<&str> = used.iter().map(|n| declared.base(n)).collect();
    let missing: Vec<&String> = declared
        .names
        .iter()
        .filter(|n| !shown.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "no panel in scripts/grafana/processes.json shows {missing:?}"
    );

    // The queries that must be written a particular way.
    let exprs = dashboard_exprs(&dash).join("\n");
    for must in [
        "rate(processes_master_cpu_seconds{", // a cumulative gauge
        "histogram_quantile(0.99, sum by (app, le) (rate(processes_event_loop_lag_seconds_bucket{",
        "rate(processes_restarts_total{",
        "rate(processes_worker_exits_total{",
        "sum by (app, slot, kind) (rate(processes_handles_passed_total{",
        "processes_sample_tick_seconds_bucket",
        "sum by (state) (processes_workers{",
    ] {
        assert!(exprs.contains(must), "no query contains {must:?}");
    }
}

// ---- a real Prometheus ---------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One blocking HTTP/1.1 GET; returns the status code and the body (de-chunked).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| std::io::Error::other(format!("GET {path}: {what}"));
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\naccept: application/json\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut body = &raw[split + 4..];
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        return Ok((status, String::from_utf8_lossy(body).into_owned()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| bad("bad chunk size"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok((status, String::from_utf8_lossy(&out).into_owned()));
        }
        if body.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A Prometheus server of the test's own, killed on drop.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second and evaluating alerts.yml.
    fn start(bin: &Path, target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(dir.path().join("alerts.yml"), ALERTS).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - alerts.yml\n\
                 scrape_configs:\n  - job_name: processes\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, dir, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An API call's `data`, or why there is none.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.port, path).map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {e}: {body:?}"))?;
        if v["status"] != "success" {
            return Err(format!("{status}: {v}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's samples: each series' labels and value.
    fn query(&self, q: &str) -> Result<Vec<(Value, f64)>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(q)))?;
        let result = data["result"]
            .as_array()
            .ok_or(format!("not a vector: {data}"))?;
        Ok(result
            .iter()
            .map(|r| {
                let v = r["value"][1].as_str().and_then(|s| s.parse().ok());
                (r["metric"].clone(), v.unwrap_or(f64::NAN))
            })
            .collect())
    }

    /// Polls until `ok` holds of `q`'s result; fails with both logs after 30 s.
    fn wait(&mut self, m: &Master, q: &str, ok: impl Fn(&[(Value, f64)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(q);
            if got.as_deref().is_ok_and(&ok) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                m.fail(&format!("prometheus exited ({status}):\n{}", self.log()));
            }
            if Instant::now() > deadline {
                m.fail(&format!(
                    "prometheus never showed the expected {q}; last: {got:?}\n--- prometheus log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log:\n{}\n---", self.log());
        }
    }
}

fn value(samples: &[(Value, f64)]) -> Option<f64> {
    match samples {
        [(_, v)] => Some(*v),
        _ => None,
    }
}

#[test]
fn a_real_prometheus_scrapes_the_master() {
    let Some(bin) = need("prometheus", "a_real_prometheus_scrapes_the_master") else {
        return;
    };
    let metrics = format!("127.0.0.1:{}", free_port());
    // A long down_window and a generous cpu_factor keep the controller from undoing the
    // signal's size on a small or busy machine.
    let m = run_config(
        r#"
        [apps.web]
        command = ["{fixture}", "serve"]
        listen = "127.0.0.1:0"
        ready_after = "50ms"
        autoscale = { min = 1, max = 4, cpu_factor = 8, down_window = "10m" }
        "#,
        &["--metrics", &metrics],
    );
    m.wait_ready(1);
    let mut prom = Prometheus::start(&bin, &metrics);

    prom.wait(&m, r#"up{job="processes"}"#, |r| value(r) == Some(1.0));
    prom.wait(&m, r#"processes_desired_workers{app="web"}"#, |r| {
        value(r) == Some(1.0)
    });

    // SIGTTIN moves desired to 2; the second worker becomes ready.
    m.signal(libc::SIGTTIN);
    prom.wait(&m, r#"processes_desired_workers{app="web"}"#, |r| {
        value(r) == Some(2.0)
    });
    prom.wait(&m, r#"processes_workers{app="web",state="ready"}"#, |r| {
        value(r) == Some(2.0)
    });
    prom.wait(
        &m,
        r#"processes_scale_events_total{app="web",direction="up",reason="signal"}"#,
        |r| value(r) == Some(1.0),
    );

    // A worker killed by SIGKILL is a crash, counted once, and restarted in its slot,
    // which gets the listener passed again.
    let status = m.wait_ready(2);
    let worker = &status["apps"][0]["workers"][0];
    let (victim, slot) = (
        worker["pid"].as_i64().unwrap() as i32,
        worker["slot"].as_i64().unwrap(),
    );
    kill(victim, libc::SIGKILL);
    prom.wait(
        &m,
        r#"processes_worker_exits_total{app="web",reason="crash",signal="SIGKILL"}"#,
        |r| value(r) == Some(1.0),
    );
    prom.wait(
        &m,
        r#"processes_restarts_total{app="web",reason="crash"}"#,
        |r| value(r).is_some_and(|v| v >= 1.0),
    );
    prom.wait(
        &m,
        &format!(r#"processes_handles_passed_total{{app="web",slot="{slot}",kind="listener"}}"#),
        |r| value(r) == Some(2.0),
    );
    prom.wait(
        &m,
        r#"sum(processes_workers{app="web",state="ready"})"#,
        |r| value(r) == Some(2.0),
    );

    // The dashboard's app variable lists the app, and every dashboard query is valid
    // PromQL here (with Grafana's variables filled in); the pool-size one has data.
    let apps = prom
        .api(&format!(
            "/api/v1/label/app/values?{}={}",
            urlencode("match[]"),
            urlencode("processes_desired_workers")
        ))
        .unwrap_or_else(|e| m.fail(&e));
    assert!(
        apps.as_array().unwrap().iter().any(|a| a == "web"),
        "{apps}"
    );
    let dash: Value = serde_json::from_str(DASHBOARD).unwrap();
    for expr in dashboard_exprs(&dash) {
        let q = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1s")
            .replace("\"$app\"", "\"web\"")
            .replace("\"$job\"", "\".*\"")
            .replace("\"$instance\"", "\".*\"");
        assert!(!q.contains('$'), "an unknown variable in {expr}");
        let r = prom
            .query(&q)
            .unwrap_or_else(|e| m.fail(&format!("dashboard query {q} failed: {e}")));
        if expr.starts_with("sum by (state) (processes_workers{") {
            assert_eq!(r.len(), 3, "{q}: {r:?}");
        }
    }

    // Every alerting rule evaluates without error against the real series.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = prom.api("/api/v1/rules").unwrap_or_else(|e| m.fail(&e));
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(rules.len(), ALERTS.matches("- alert:").count(), "{groups}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        if let Some(bad) = rules.iter().find(|r| r["health"] == "err") {
            m.fail(&format!("an alerting rule fails: {bad}"));
        }
        if Instant::now() > deadline {
            m.fail(&format!("the rules were never all evaluated: {groups}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A master of one fixture worker with `--metrics 127.0.0.1:0`, and where it says its
/// metrics endpoint is (`metrics on http://ADDR/metrics`).
fn run_with_metrics_on_port_zero() -> (Master, String) {
    let m = run(&[
        "-i",
        "1",
        "--ready-after",
        "50ms",
        "--metrics",
        "127.0.0.1:0",
        "--",
        FIXTURE,
    ]);
    let line = m.wait_log("metrics on http://127.0.0.1:");
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("an address in the log line")
        .to_string();
    (m, addr)
}

/// `--metrics 127.0.0.1:0`: the master says where the OS put the endpoint, and it answers
/// there.
#[test]
fn metrics_on_port_zero_are_logged_where_they_listen() {
    let (m, addr) = run_with_metrics_on_port_zero();
    m.wait_ready(1);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("processes_"), "{body}");
}

/// Whoever can reach the metrics port cannot take the master's fds: past
/// `MAX_SCRAPES` connections at once, more are closed at once; once the idle ones go,
/// scrapes are answered again.
#[test]
fn idle_connections_to_the_metrics_port_are_bounded() {
    let (m, addr) = run_with_metrics_on_port_zero();
    m.wait_ready(1);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", m.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    // Idle connections that never send a request.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // One more, to know the master has taken every one of them: its answer (closed at
    // once) comes after theirs.
    let mut last = TcpStream::connect(&addr).unwrap();
    last.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        last.read(&mut buf).unwrap_or(0),
        0,
        "the extra one was served"
    );
    let during = fds();
    assert!(
        during <= before + processes::metrics::MAX_SCRAPES,
        "{before} fds before, {during} with 200 idle clients"
    );
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        if body.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scrape answered after the idle ones went"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
