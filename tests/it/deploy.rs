//! The deployment files in `scripts/systemd/` and `scripts/kubernetes/`, checked against
//! the real tools where they exist and against the binary and library they describe: the
//! units pass `systemd-analyze verify` (and it is shown to catch a bad key), every YAML
//! parses and the objects refer to each other consistently, every `processes` flag they
//! use exists, the configs they carry parse, a socket of the socket unit is taken by the
//! example app, and the scaling queries compute, on made-up series, what they claim.
//!
//! External tools, each skipped with a visible message when missing unless the variable
//! in brackets is set: `systemd-analyze` (`PROCESSES_REQUIRE_SYSTEMD`; Debian package
//! systemd), PyYAML for `python3` (`PROCESSES_REQUIRE_YAML`; Debian python3-yaml or pip
//! PyYAML), `promtool` (`PROCESSES_REQUIRE_PROMETHEUS`; Debian prometheus), and the
//! optional schema check `kubernetes_validate` (`PROCESSES_REQUIRE_KUBERNETES_VALIDATE`;
//! pip kubernetes-validate).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const UNIT: &str = include_str!("../../scripts/systemd/processes@.service");
const SOCKET: &str = include_str!("../../scripts/systemd/processes@.socket");
const EXAMPLE: &str = include_str!("../../scripts/systemd/example.toml");
const DEPLOYMENT: &str = include_str!("../../scripts/kubernetes/deployment.yaml");
const ADAPTER: &str = include_str!("../../scripts/kubernetes/prometheus-adapter-rules.yaml");
const KEDA: &str = include_str!("../../scripts/kubernetes/keda-scaledobject.yaml");
const METRICS_RS: &str = include_str!("../../src/metrics.rs");
/// The instance name the checks give the template units.
const INSTANCE: &str = "web";

// ---- helpers -------------------------------------------------------------------------------

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Says the test skipped, or fails it when `require` is set in the environment.
fn skip(test: &str, require: &str, why: &str) {
    if std::env::var_os(require).is_some() {
        panic!("{test} must run here ({require} is set) but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `KEY=value` lines of a unit file (comments skipped), in order.
fn unit_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect()
}

fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit_settings(unit)
        .into_iter()
        .rev()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A systemd time span: `30s`, `2min`, `1min 30s`, or plain seconds.
fn unit_seconds(v: &str) -> Duration {
    let mut total = 0.0;
    for part in v.split_whitespace() {
        let digits: String = part
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let n: f64 = digits.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
        total += n * match &part[digits.len()..] {
            "" | "s" | "sec" => 1.0,
            "ms" | "msec" => 0.001,
            "m" | "min" => 60.0,
            "h" | "hr" => 3600.0,
            unit => panic!("time span {v:?}: unit {unit:?}"),
        };
    }
    Duration::from_secs_f64(total)
}

/// The block scalar under `key: |` in a YAML text, dedented.
fn block_scalar(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines();
    let head = format!("{key}: |");
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let key_indent = lines
        .by_ref()
        .find(|l| l.trim_end().ends_with(&head) && l.trim_start().starts_with(&head))
        .map(indent_of)
        .unwrap_or_else(|| panic!("no `{head}` block"));
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || indent_of(l) > key_indent)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent_of(l))
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The largest `grace` of a config's apps.
fn max_grace(config: &processes::config::Config) -> Duration {
    config.apps.iter().map(|a| a.grace).max().unwrap()
}

// ---- `processes` invocations and their flags ----------------------------------------------

const SUBCOMMANDS: [&str; 8] = [
    "run", "status", "scale", "reload", "restart", "stop", "start", "top",
];

/// One `processes SUB --flag value …` found in a file (comments included).
#[derive(Debug)]
struct Invocation {
    line: usize,
    sub: String,
    /// Every option used, with the word after it (its value, if it takes one).
    flags: Vec<(String, Option<String>)>,
}

impl Invocation {
    fn value(&self, flag: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(f, _)| f == flag)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Every invocation of the binary in `text`: a word `processes` (or a path ending in
/// `/processes`) followed by a subcommand, on one line; YAML list punctuation and shell
/// quoting are ignored. The worker command after a lone `--` is not the master's.
fn invocations(text: &str) -> Vec<Invocation> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let clean: String = line
            .chars()
            .map(|c| if "\"'`,[]()".contains(c) { ' ' } else { c })
            .collect();
        let words: Vec<&str> = clean.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            let is_bin = *w == "processes" || w.ends_with("/processes");
            let Some(sub) = words.get(i + 1).filter(|s| SUBCOMMANDS.contains(s)) else {
                continue;
            };
            if !is_bin {
                continue;
            }
            let mut flags = Vec::new();
            let rest = &words[i + 2..];
            for (j, word) in rest.iter().enumerate() {
                if *word == "--" || *word == "#" {
                    break;
                }
                if word.starts_with('-') && word.len() > 1 {
                    let (flag, inline) = match word.split_once('=') {
                        Some((f, v)) => (f, Some(v.to_string())),
                        None => (*word, rest.get(j + 1).map(|v| v.to_string())),
                    };
                    flags.push((flag.to_string(), inline));
                }
            }
            out.push(Invocation {
                line: n + 1,
                sub: sub.to_string(),
                flags,
            });
        }
    }
    out
}

/// The options `processes SUB --help` lists (`-i`, `--instances`, …).
fn help_flags(sub: &str) -> BTreeSet<String> {
    let out = run(Command::new(BIN).args([sub, "--help"]));
    assert!(
        out.status.success(),
        "processes {sub} --help: {}",
        text(&out)
    );
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags = BTreeSet::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        for word in line.split([' ', ',']).filter(|w| !w.is_empty()) {
            if !word.starts_with('-') {
                break;
            }
            flags.insert(word.to_string());
        }
    }
    assert!(
        flags.contains("--help") && flags.len() > 2,
        "no options parsed from `processes {sub} --help`:\n{help}"
    );
    flags
}

#[test]
fn every_flag_the_deployment_files_use_exists() {
    let files = deployment_files();
    let mut help: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut found = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let calls = invocations(&text);
        for call in &calls {
            let known = help
                .entry(call.sub.clone())
                .or_insert_with(|| help_flags(&call.sub));
            for (flag, _) in &call.flags {
                assert!(
                    known.contains(flag),
                    "{}:{}: `processes {} {flag}` is not an option of the binary; it has {known:?}",
                    path.display(),
                    call.line,
                    call.sub
                );
            }
        }
        found.insert(
            path.file_name().unwrap().to_str().unwrap().to_string(),
            calls,
        );
    }
    // The entry points are among what was checked, with the flags the README promises.
    let unit_run: Vec<_> = found["processes@.service"]
        .iter()
        .filter(|c| c.sub == "run")
        .collect();
    assert_eq!(unit_run.len(), 1, "{:?}", found["processes@.service"]);
    assert_eq!(unit_run[0].value("-c"), Some("/etc/processes/%i.toml"));
    assert!(unit_run[0].value("--control").is_some());
    let pod_run: Vec<_> = found["deployment.yaml"]
        .iter()
        .filter(|c| c.sub == "run")
        .collect();
    assert_eq!(pod_run.len(), 1, "{:?}", found["deployment.yaml"]);
    assert_eq!(pod_run[0].value("-c"), Some("/etc/processes/app.toml"));
    assert!(pod_run[0].value("--metrics").is_some());
    // Every client command in a file talks to the control socket its master was given.
    for (file, calls) in &found {
        let Some(master) = calls.iter().find(|c| c.sub == "run") else {
            continue;
        };
        let want = master.value("--control").map(|p| p.replace("%i", INSTANCE));
        let clients: Vec<_> = calls.iter().filter(|c| c.sub != "run").collect();
        assert!(!clients.is_empty(), "{file}: no client command to check");
        for c in clients {
            assert_eq!(
                c.value("--control").map(str::to_string),
                want,
                "{file}:{}: `processes {}` must use the master's --control",
                c.line,
                c.sub
            );
        }
    }
}

/// Every file under scripts/systemd and scripts/kubernetes.
fn deployment_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["scripts/systemd", "scripts/kubernetes"] {
        for entry in std::fs::read_dir(Path::new(ROOT).join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    files
}

// ---- the configs they carry -------------------------------------------------------------

/// example.toml as parsed. The parser checks that an app's `cwd` exists, which it does on
/// the machine the example is for, not here: that one line points at a temp dir instead.
fn example_config() -> processes::config::Config {
    let here = tempfile::tempdir().unwrap();
    let line = "cwd = \"/srv/hello\"";
    assert_eq!(
        EXAMPLE.matches(line).count(),
        1,
        "example.toml changed its cwd"
    );
    let text = EXAMPLE.replace(line, &format!("cwd = {:?}", here.path()));
    processes::config::parse_str(&text, "scripts/systemd/example.toml", None)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn pod_config() -> processes::config::Config {
    let toml = block_scalar(DEPLOYMENT, "app.toml");
    processes::config::parse_str(&toml, "deployment.yaml app.toml", None)
        .unwrap_or_else(|e| panic!("the ConfigMap's app.toml in deployment.yaml: {e}\n{toml}"))
}

#[test]
fn the_example_configs_parse() {
    let c = example_config();
    assert_eq!(c.apps.len(), 1);
    assert!(c.metrics.is_some(), "the example exports metrics");
    assert!(!c.apps[0].listen.is_empty());
    let p = pod_config();
    assert_eq!(p.apps.len(), 1);
    assert_eq!(p.apps[0].name.to_string(), "web");
    // The pod's port must be what the Deployment exposes; metrics come from the flag.
    assert!(
        p.apps[0]
            .listen
            .iter()
            .any(|l| l.to_string().ends_with(":8080")),
        "{:?}",
        p.apps[0].listen
    );
    assert!(
        p.metrics.is_none(),
        "metrics are set by --metrics in the pod"
    );
}

/// The address systemd binds for a `ListenStream=` value (IPv6 any for a bare port, as on
/// a host with IPv6; IPv4 any on one without).
fn systemd_binds(listen_stream: &str) -> Vec<processes::config::ListenAddr> {
    use processes::config::ListenAddr;
    if let Ok(port) = listen_stream.parse::<u16>() {
        return vec![
            ListenAddr::Tcp(format!("[::]:{port}").parse().unwrap()),
            ListenAddr::Tcp(format!("0.0.0.0:{port}").parse().unwrap()),
        ];
    }
    vec![ListenAddr::parse(listen_stream).unwrap()]
}

#[test]
fn the_socket_unit_is_taken_by_the_example_app() {
    let streams: Vec<&str> = unit_settings(SOCKET)
        .into_iter()
        .filter(|(k, _)| *k == "ListenStream")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(unit_value(SOCKET, "Accept"), Some("no"));
    let app = &example_config().apps[0];
    for passed in systemd_binds(streams[0]) {
        // What the master does with the sockets systemd passes: each configured address
        // takes the one that serves it, or it binds the address itself (and fails, the
        // port being systemd's).
        for wanted in &app.listen {
            let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            let mut inherited = vec![(fd, passed.clone())];
            let took = processes::sockets::take_inherited(&mut inherited, wanted);
            assert!(
                took.is_some(),
                "example.toml listens on {wanted}, which the master would not match to the \
                 socket systemd binds for ListenStream={} ({passed})",
                streams[0]
            );
        }
    }
}

// ---- the service unit's choices ---------------------------------------------------------

#[test]
fn the_service_unit_fits_the_master() {
    let get = |k: &str| unit_value(UNIT, k).unwrap_or_else(|| panic!("no {k}= in the unit"));
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "main");
    assert_eq!(get("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(get("KillMode"), "mixed");
    assert_eq!(get("Restart"), "on-failure");
    assert!(get("ExecStart").starts_with("/usr/local/bin/processes run "));
    // The watchdog: the master pings at half of it, and a tick is far shorter.
    assert!(unit_seconds(get("WatchdogSec")) >= Duration::from_secs(2));
    // systemd must wait longer than the master's own graceful stop takes.
    let stop = unit_seconds(get("TimeoutStopSec"));
    let grace = max_grace(&example_config());
    assert!(
        stop >= grace + Duration::from_secs(5),
        "TimeoutStopSec={stop:?} leaves no room after the example's grace of {grace:?}"
    );
    // The control socket is inside the RuntimeDirectory= systemd creates.
    let control = invocations(get("ExecStart"))[0]
        .value("--control")
        .unwrap()
        .to_string();
    let runtime = get("RuntimeDirectory");
    assert!(
        control.starts_with(&format!("/run/{runtime}/")),
        "{control} not under /run/{runtime}"
    );
    // RestartPreventExitStatus= names the status a config error really exits with.
    let status: i32 = get("RestartPreventExitStatus").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[apps.web]\ncommand = [\"true\"]\ninstances = \"many\"\n",
    )
    .unwrap();
    let out = run(Command::new(BIN)
        .args(["run", "-c"])
        .arg(&bad)
        .arg("--control")
        .arg(dir.path().join("c.sock")));
    assert_eq!(out.status.code(), Some(status), "{}", text(&out));
}

// ---- systemd-analyze verify -----------------------------------------------------------------

/// The systemd version, from `systemctl --version` / `systemd-analyze --version`.
fn systemd_version(analyze: &Path) -> u32 {
    let out = run(Command::new(analyze).arg("--version"));
    let t = text(&out);
    t.split_whitespace()
        .nth(1)
        .and_then(|v| v.split(['.', '~', '-']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {t:?}"))
}

/// `systemd-analyze verify` on instance copies of the units in a temp dir, with ExecStart
/// pointing at the binary under test. Returns everything it printed.
fn verify(analyze: &Path, service: &str, socket: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join(format!("processes@{INSTANCE}.service"));
    let k = dir.path().join(format!("processes@{INSTANCE}.socket"));
    std::fs::write(&s, service.replace("/usr/local/bin/processes", BIN)).unwrap();
    std::fs::write(&k, socket).unwrap();
    let out = run(Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&s)
        .arg(&k)
        .env("SYSTEMD_LOG_COLOR", "0"));
    (out.status.success(), text(&out))
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    const TEST: &str = "the_units_pass_systemd_analyze_verify";
    let Some(analyze) = on_path("systemd-analyze") else {
        return skip(
            TEST,
            "PROCESSES_REQUIRE_SYSTEMD",
            "systemd-analyze is not on PATH (Debian: apt-get install systemd)",
        );
    };
    assert_eq!(UNIT.matches("/usr/local/bin/processes run").count(), 1);
    let (ok, said) = verify(&analyze, UNIT, SOCKET);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify complained about the units:\n{said}"
    );
    // The check is not a rubber stamp: the same run reports a key systemd does not know,
    // a missing program and a socket pointing at no service.
    let bogus = UNIT.replacen("NotifyAccess=main", "NotifyAccess=main\nNotifyAcess=all", 1);
    let (_, said) = verify(&analyze, &bogus, SOCKET);
    assert!(
        said.contains("NotifyAcess"),
        "a bad key went unnoticed:\n{said}"
    );
    let missing = UNIT.replace("/usr/local/bin/processes", "/nonexistent/processes");
    let (ok, said) = verify(&analyze, &missing, SOCKET);
    assert!(!ok && said.contains("/nonexistent/processes"), "{said}");
    let lost = SOCKET.replace("[Socket]", "[Socket]\nService=nothing-here.service");
    let (ok, said) = verify(&analyze, UNIT, &lost);
    assert!(
        !ok || !said.trim().is_empty(),
        "a socket for no service went unnoticed"
    );
    // Where systemd has Type=notify-reload (253), the variant the unit recommends holds too.
    let version = systemd_version(&analyze);
    if version >= 253 {
        let reload = UNIT
            .replace("\nType=notify\n", "\nType=notify-reload\n")
            .replace("\nExecReload=/bin/kill -HUP $MAINPID\n", "\n");
        let (ok, said) = verify(&analyze, &reload, SOCKET);
        assert!(
            ok && said.trim().is_empty(),
            "notify-reload variant:\n{said}"
        );
    } else {
        eprintln!("{TEST}: systemd {version} has no Type=notify-reload; checked Type=notify only");
    }
}

// ---- the Kubernetes objects -----------------------------------------------------------------

/// A Python that has PyYAML: `python3` on PATH, else Debian's.
fn python_with(module: &str) -> Option<PathBuf> {
    [on_path("python3"), Some(PathBuf::from("/usr/bin/python3"))]
        .into_iter()
        .flatten()
        .find(|py| {
            Command::new(py)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Every document of a YAML file as JSON, by PyYAML's safe loader. A ConfigMap's data
/// entries named `*.yaml` are parsed too, into `data_parsed`.
fn load_yaml(python: &Path, path: &Path) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
for d in docs:
    if isinstance(d, dict) and d.get("kind") == "ConfigMap":
        d["data_parsed"] = {k: yaml.safe_load(v) for k, v in (d.get("data") or {}).items()
                            if k.endswith((".yaml", ".yml"))}
json.dump(docs, sys.stdout)
"#;
    let out = run(Command::new(python).args(["-c", SCRIPT]).arg(path));
    assert!(
        out.status.success(),
        "{} is not valid YAML:\n{}",
        path.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml_files() -> Vec<PathBuf> {
    deployment_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect()
}

/// The metric names `src/metrics.rs` declares.
fn declared_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = METRICS_RS
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": &str = \"").map(|(_, v)| v))
        .filter_map(|v| v.strip_suffix("\";"))
        .filter(|v| v.starts_with("processes_"))
        .map(str::to_string)
        .collect();
    assert!(names.contains(processes::metrics::SATURATION), "{names:?}");
    names
}

/// Every `processes_[a-z_]+` word in a text.
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("processes_") {
        let before = rest[..at].chars().next_back();
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(word.trim_end_matches('_').to_string());
        }
        rest = &rest[at + word.len()..];
    }
    out
}

fn kinds(docs: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, Value> {
    let mut by_kind = BTreeMap::new();
    for (file, list) in docs {
        for d in list {
            for key in ["apiVersion", "kind"] {
                assert!(d[key].is_string(), "{file}: a document without {key}: {d}");
            }
            assert!(
                d["metadata"]["name"].is_string(),
                "{file}: {} without metadata.name",
                d["kind"]
            );
            let kind = d["kind"].as_str().unwrap().to_string();
            let name = d["metadata"]["name"].as_str().unwrap();
            assert!(
                by_kind
                    .insert(format!("{kind}/{name}"), d.clone())
                    .is_none(),
                "{kind}/{name} twice"
            );
        }
    }
    by_kind
}

fn subset(small: &Value, big: &Value) -> bool {
    small
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| big.get(k) == Some(v)))
}

fn quantity(v: &Value) -> f64 {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
        None => s
            .parse()
            .unwrap_or_else(|_| panic!("not a plain quantity: {s}")),
    }
}

#[test]
fn the_kubernetes_objects_parse_and_hang_together() {
    const TEST: &str = "the_kubernetes_objects_parse_and_hang_together";
    let Some(python) = python_with("yaml") else {
        return skip(
            TEST,
            "PROCESSES_REQUIRE_YAML",
            "no python3 with PyYAML (Debian: apt-get install python3-yaml; or pip install PyYAML)",
        );
    };
    let mut docs = BTreeMap::new();
    for path in yaml_files() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        docs.insert(name, load_yaml(&python, &path));
    }
    let all = kinds(&docs);
    let get = |k: &str| {
        all.get(k)
            .unwrap_or_else(|| panic!("no {k} in {:?}", all.keys()))
    };

    // The Deployment, its ConfigMap and its container.
    let deploy = get("Deployment/web");
    let spec = &deploy["spec"];
    let pod = &spec["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(
        subset(&spec["selector"]["matchLabels"], labels),
        "the selector does not match the pod's labels"
    );
    assert!(
        labels.get("app").is_none(),
        "a pod label `app` would clash with the metrics' own `app` label"
    );
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let argv: Vec<&str> = c["command"]
        .as_array()
        .expect("the container's command is the master")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&argv[..2], ["processes", "run"], "{argv:?}");
    let arg = |flag: &str| {
        let i = argv.iter().position(|a| *a == flag).unwrap();
        argv[i + 1]
    };
    let ports: BTreeMap<&str, i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    // Metrics: served on all interfaces at the port the scrape annotations name.
    let metrics_addr: std::net::SocketAddr = arg("--metrics").parse().unwrap();
    assert!(metrics_addr.ip().is_unspecified(), "{metrics_addr}");
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        metrics_addr.port().to_string()
    );
    assert_eq!(ports["metrics"], i64::from(metrics_addr.port()));
    // The config: mounted from the ConfigMap at the path -c names, and valid.
    let config_path = Path::new(arg("-c"));
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{} is on no volume", path.display()))
    };
    let volume = |name: &Value| {
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| &v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let m = mount_of(config_path);
    assert_eq!(
        m["mountPath"],
        config_path.parent().unwrap().to_str().unwrap()
    );
    let cm_name = volume(&m["name"])["configMap"]["name"].clone();
    let cm = get(&format!("ConfigMap/{}", cm_name.as_str().unwrap()));
    let toml = cm["data"][config_path.file_name().unwrap().to_str().unwrap()]
        .as_str()
        .expect("the ConfigMap holds the file -c names");
    let config = processes::config::parse_str(toml, "ConfigMap", None).unwrap();
    let app_port = match &config.apps[0].listen[0] {
        processes::config::ListenAddr::Tcp(a) => a.port(),
        other => panic!("the pod's app listens on {other:?}"),
    };
    assert_eq!(ports["http"], i64::from(app_port));
    // The control socket: on a writable volume when the root is read-only.
    let control = Path::new(arg("--control"));
    if c["securityContext"]["readOnlyRootFilesystem"] == true {
        let v = volume(&mount_of(control)["name"]);
        assert!(
            v.get("emptyDir").is_some(),
            "{} is not writable",
            control.display()
        );
    }
    // The CPU limit the master sizes its pool to, and a stop that outlasts the drain.
    assert!(quantity(&c["resources"]["limits"]["cpu"]) >= 1.0);
    let term = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    let grace = max_grace(&config);
    assert!(
        Duration::from_secs(term) >= grace + Duration::from_secs(pre_stop + 5),
        "terminationGracePeriodSeconds {term} leaves no room for preStop {pre_stop}s + grace {grace:?}"
    );
    // Probes aim at ports the container has.
    let ready_port = &c["readinessProbe"]["httpGet"]["port"];
    assert!(
        ports.contains_key(ready_port.as_str().unwrap_or_default()),
        "{ready_port}"
    );
    let live: Vec<&str> = c["livenessProbe"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&live[..2], ["processes", "status"]);

    // The Service selects the pods and targets the app port.
    let svc = get("Service/web");
    assert!(subset(&svc["spec"]["selector"], labels));
    for p in svc["spec"]["ports"].as_array().unwrap() {
        let t = &p["targetPort"];
        assert!(
            t.as_str().is_some_and(|n| ports.contains_key(n))
                || t.as_i64().is_some_and(|n| ports.values().any(|v| *v == n)),
            "Service targetPort {t} is no container port"
        );
    }

    // The adapter serves the metrics the HPA asks for, from declared series.
    let declared = declared_metrics();
    let adapter = get("ConfigMap/adapter-config");
    let rules = adapter["data_parsed"]["config.yaml"]["rules"]
        .as_array()
        .expect("adapter rules");
    let mut served = BTreeSet::new();
    for r in rules {
        for key in ["seriesQuery", "metricsQuery"] {
            assert!(r[key].is_string(), "adapter rule without {key}: {r}");
        }
        assert_eq!(r["resources"]["overrides"]["pod"]["resource"], "pod");
        assert_eq!(
            r["resources"]["overrides"]["namespace"]["resource"],
            "namespace"
        );
        served.insert(r["name"]["as"].as_str().unwrap().to_string());
    }
    let derived: BTreeSet<String> = served.difference(&declared).cloned().collect();
    let hpa = get("HorizontalPodAutoscaler/web");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["name"], deploy["metadata"]["name"]);
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap();
    assert!(min >= 1 && min <= hpa["spec"]["maxReplicas"].as_u64().unwrap());
    let mut asked = BTreeSet::new();
    for m in hpa["spec"]["metrics"].as_array().unwrap() {
        assert_eq!(m["type"], "Pods", "{m}");
        let name = m["pods"]["metric"]["name"].as_str().unwrap();
        assert!(
            served.contains(name),
            "the HPA asks for {name}, no adapter rule serves it"
        );
        assert!(quantity(&m["pods"]["target"]["averageValue"]) > 0.0);
        asked.insert(name.to_string());
    }
    assert!(asked.contains(processes::metrics::SATURATION), "{asked:?}");

    // KEDA: the same Deployment, prometheus triggers with the fields its scaler needs.
    let keda = get("ScaledObject/web");
    assert_eq!(keda["apiVersion"], "keda.sh/v1alpha1");
    let ks = keda["spec"].as_object().unwrap();
    let allowed = [
        "scaleTargetRef",
        "pollingInterval",
        "cooldownPeriod",
        "initialCooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "advanced",
        "fallback",
        "triggers",
    ];
    for k in ks.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "ScaledObject spec.{k} is not a field"
        );
    }
    assert_eq!(ks["scaleTargetRef"]["name"], deploy["metadata"]["name"]);
    assert!(ks["minReplicaCount"].as_u64().unwrap() <= ks["maxReplicaCount"].as_u64().unwrap());
    for t in ks["triggers"].as_array().unwrap() {
        assert_eq!(t["type"], "prometheus");
        let mt = t["metricType"].as_str().unwrap_or("AverageValue");
        assert!(
            ["AverageValue", "Value", "Utilization"].contains(&mt),
            "{mt}"
        );
        let md = &t["metadata"];
        for key in ["serverAddress", "query", "threshold"] {
            assert!(md[key].is_string(), "trigger without metadata.{key}: {t}");
        }
        assert!(md["threshold"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
    }

    // Every metric any of these files names is one a master exports, or one the adapter
    // computes from them.
    for path in yaml_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for name in metric_words(&text) {
            assert!(
                declared.contains(&name) || derived.contains(&name),
                "{} names {name}, which src/metrics.rs does not declare",
                path.display()
            );
        }
    }
}

#[test]
fn kubernetes_validate_accepts_the_manifests() {
    const TEST: &str = "kubernetes_validate_accepts_the_manifests";
    let Some(python) = python_with("kubernetes_validate") else {
        return skip(
            TEST,
            "PROCESSES_REQUIRE_KUBERNETES_VALIDATE",
            "no python3 with kubernetes_validate (pip install kubernetes-validate)",
        );
    };
    let Some(yaml_python) = python_with("yaml") else {
        return skip(TEST, "PROCESSES_REQUIRE_YAML", "no python3 with PyYAML");
    };
    // Core kinds against the published schemas, no unknown fields. KEDA's ScaledObject has
    // no schema there: its HPA behavior block is checked inside a stand-in HPA.
    let dir = tempfile::tempdir().unwrap();
    let keda = load_yaml(
        &yaml_python,
        &Path::new(ROOT).join("scripts/kubernetes/keda-scaledobject.yaml"),
    );
    let behavior = &keda[0]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"];
    let stand_in = dir.path().join("keda-behavior.yaml");
    let hpa = json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-behavior"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "maxReplicas": 2,
            "behavior": behavior,
        }
    });
    std::fs::write(&stand_in, hpa.to_string()).unwrap();
    let mut files: Vec<PathBuf> = yaml_files()
        .into_iter()
        .filter(|p| !p.ends_with("keda-scaledobject.yaml"))
        .collect();
    files.push(stand_in);
    let out = run(Command::new(&python)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files));
    let said = text(&out);
    assert!(out.status.success(), "kubernetes-validate:\n{said}");
    assert!(
        said.matches("passed").count() >= 6,
        "fewer objects validated than there are:\n{said}"
    );
}

// ---- the scaling queries ----------------------------------------------------------------

/// The single-line value of every `key:` in a YAML text, unquoted.
fn yaml_values(yaml: &str, key: &str) -> Vec<String> {
    let head = format!("{key}: ");
    yaml.lines()
        .map(|l| l.trim().trim_start_matches("- "))
        .filter_map(|l| l.strip_prefix(&head))
        .map(|v| {
            let v = v.trim();
            match (v.chars().next(), v.chars().last()) {
                (Some('\''), Some('\'')) => v[1..v.len() - 1].replace("''", "'"),
                (Some('"'), Some('"')) => v[1..v.len() - 1].to_string(),
                _ => v.to_string(),
            }
        })
        .collect()
}

#[test]
fn the_scaling_queries_compute_what_they_claim() {
    const TEST: &str = "the_scaling_queries_compute_what_they_claim";
    let Some(promtool) = on_path("promtool") else {
        return skip(
            TEST,
            "PROCESSES_REQUIRE_PROMETHEUS",
            "promtool is not on PATH (Debian: apt-get install prometheus)",
        );
    };
    // The adapter's queries as it would run them for an HPA on pods web-a and web-b that
    // selects app="web"; KEDA's as they are.
    let series = yaml_values(ADAPTER, "seriesQuery");
    let adapter = yaml_values(ADAPTER, "metricsQuery");
    let served = yaml_values(ADAPTER, "as");
    assert_eq!((series.len(), adapter.len(), served.len()), (2, 2, 2));
    let keda = yaml_values(KEDA, "query");
    assert_eq!(keda.len(), 2, "{keda:?}");
    let expand = |q: &str, series: &str| {
        q.replace("<<.Series>>", series.split('{').next().unwrap())
            .replace(
                "<<.LabelMatchers>>",
                r#"namespace="default",pod=~"web-a|web-b",app="web""#,
            )
            .replace("<<.GroupBy>>", "pod")
    };

    // Two pods of app web in namespace default; an `admin` app beside it in web-a and a
    // staging copy must not count.
    let mut input = Vec::new();
    let mut add = |name: &str, labels: &str, value: f64| {
        input.push(json!({
            "series": format!("{name}{{job=\"kubernetes-pods\",instance=\"x:9464\",{labels}}}"),
            "values": format!("{value}x10"),
        }));
    };
    let web_a = r#"namespace="default",pod="web-a",app="web""#;
    let web_b = r#"namespace="default",pod="web-b",app="web""#;
    let admin = r#"namespace="default",pod="web-a",app="admin""#;
    let staging = r#"namespace="staging",pod="web-a",app="web""#;
    for (labels, saturation, utilization, ready, starting, upper) in [
        (web_a, 0.5, 0.75, 2.0, 1.0, 2.0),
        (web_b, 0.25, 0.5, 1.0, 0.0, 2.0),
        (admin, 1.0, 1.0, 4.0, 0.0, 4.0),
        (staging, 1.0, 1.0, 8.0, 0.0, 8.0),
    ] {
        add(processes::metrics::SATURATION, labels, saturation);
        add(processes::metrics::UTILIZATION, labels, utilization);
        add(processes::metrics::UPPER_BOUND, labels, upper);
        for (state, n) in [("ready", ready), ("starting", starting), ("draining", 0.0)] {
            add(
                processes::metrics::WORKERS,
                &format!("{labels},state=\"{state}\""),
                n,
            );
        }
    }
    let exp = |expr: String, samples: Value| json!({"expr": expr, "eval_time": "2m", "exp_samples": samples});
    let per_pod = |a: f64, b: f64| {
        json!([
            {"labels": "{pod=\"web-a\"}", "value": a},
            {"labels": "{pod=\"web-b\"}", "value": b},
        ])
    };
    let mut tests = Vec::new();
    for ((q, s), name) in adapter.iter().zip(&series).zip(&served) {
        let expr = expand(q, s);
        tests.push(match name.as_str() {
            // Per pod, the selected app's own figure.
            "processes_saturation_ratio" => exp(expr, per_pod(0.5, 0.25)),
            // utilization × ready ÷ upper bound: 0.75 × 2 ÷ 2 and 0.5 × 1 ÷ 2.
            "processes_capacity_used_ratio" => exp(expr, per_pod(0.75, 0.25)),
            other => panic!("no expectation for adapter metric {other}"),
        });
    }
    // KEDA: the pods' average saturation; the pods' worth of work in total.
    tests.push(exp(
        keda[0].clone(),
        json!([{"labels": "{}", "value": 0.375}]),
    ));
    tests.push(exp(
        keda[1].clone(),
        json!([{"labels": "{}", "value": 1.0}]),
    ));
    assert!(keda[0].contains("saturation") && keda[1].contains("utilization"));

    let doc = json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "15s", "input_series": input, "promql_expr_test": tests}],
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queries_test.yml");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = run(Command::new(&promtool).args(["test", "rules"]).arg(&file));
    assert!(
        out.status.success(),
        "the scaling queries do not compute what they should:\n{}\n{}",
        text(&out),
        serde_json::to_string_pretty(&tests).unwrap()
    );
}
