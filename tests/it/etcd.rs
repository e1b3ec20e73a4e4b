//! The etcd registry (`processes::registry`) against a real etcd on loopback: keys appear
//! within a second of an update and follow scaling, draining and reloads; they vanish on
//! shutdown, and at the lease TTL when the registry is dropped without one (a dead
//! master); the registry rides out etcd being killed and restarted, and replaces a lease
//! that was revoked under it.
//!
//! Needs `etcd` and `etcdctl` (Debian: `etcd-server`, `etcd-client`), installed here if
//! missing and possible (root or passwordless sudo). Under CI (`PROCESSES_REQUIRE_ETCD=1`,
//! set by `.ci/run`) a missing etcd is a failure; elsewhere the test says it skipped.
//!
//! [`Etcd`] is the harness — one single-member etcd per test, on free loopback ports, in
//! its own temp dir, killed on drop — and is `pub(crate)` for the master-level tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use processes::registry::{self, AppEndpoints, Registry, RegistryConfig, RegistryState};
use serde_json::Value;

use crate::common::{cli, get, run_config};

/// One key as etcd holds it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    /// The value, parsed as JSON (`Value::Null` if it is not JSON).
    pub value: Value,
    /// The lease the key is attached to; 0 for none.
    pub lease: i64,
}

pub(crate) type Keys = BTreeMap<String, Entry>;

/// A real single-member etcd on loopback.
pub(crate) struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
}

impl Etcd {
    /// Starts a fresh etcd, or returns `None` after saying the test skipped because etcd
    /// is not there and cannot be installed. Under `PROCESSES_REQUIRE_ETCD` that panics.
    pub(crate) fn start_or_skip(test: &str) -> Option<Etcd> {
        if let Err(why) = ensure_installed() {
            if std::env::var_os("PROCESSES_REQUIRE_ETCD").is_some() {
                panic!("the etcd tests must run here (PROCESSES_REQUIRE_ETCD is set) but {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        Some(Etcd::start())
    }

    /// Starts a fresh etcd and waits until it answers; panics with its log if it does not.
    pub(crate) fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        // Both ports held at once so they differ; released just before etcd binds them.
        let (client_port, peer_port) = {
            let a = TcpListener::bind("127.0.0.1:0").expect("bind");
            let b = TcpListener::bind("127.0.0.1:0").expect("bind");
            (
                a.local_addr().expect("addr").port(),
                b.local_addr().expect("addr").port(),
            )
        };
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port,
            peer_port,
        };
        etcd.spawn();
        etcd
    }

    /// `127.0.0.1:PORT`, as [`RegistryConfig::endpoints`] wants it.
    pub(crate) fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT`, as `--registry` wants it.
    pub(crate) fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    fn client_url(&self) -> String {
        format!("http://{}", self.endpoint())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Everything etcd logged, across restarts.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new("etcd")
            .args(["--name", "it", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("it={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20));
    }

    /// Waits until `/health` says so; panics with the log if etcd exits or never does.
    pub(crate) fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.healthy() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("etcd exited ({status}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /health` answers `{"health":"true"}`.
    pub(crate) fn healthy(&self) -> bool {
        let t = Duration::from_millis(500);
        let Ok(mut s) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", self.client_port)
                .parse()
                .expect("addr"),
            t,
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(t));
        let _ = s.set_write_timeout(Some(t));
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.starts_with("HTTP/1.1 200") && resp.contains(r#""health":"true""#)
    }

    /// SIGKILL, as a crash would; the data dir stays.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports; waits until it answers.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `etcdctl ARGS` against this etcd; panics with its stderr if it fails.
    pub(crate) fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.client_url(), "--command-timeout", "3s"])
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key under `prefix`, read by etcdctl (independently of the code under test).
    pub(crate) fn keys(&self, prefix: &str) -> Keys {
        let out = self.etcdctl(&["get", "--prefix", prefix, "-w", "json"]);
        let v: Value = serde_json::from_str(&out).expect("etcdctl json");
        let mut keys = Keys::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let text = |f: &str| {
                let raw = registry::base64::decode(kv[f].as_str().unwrap_or_default())
                    .expect("etcdctl base64");
                String::from_utf8(raw).expect("utf-8")
            };
            let value = serde_json::from_str(&text("value")).unwrap_or(Value::Null);
            let lease = kv["lease"].as_i64().unwrap_or(0);
            keys.insert(text("key"), Entry { value, lease });
        }
        keys
    }

    /// Polls [`Etcd::keys`] until `done` holds; returns the keys and how long it took.
    /// Panics, saying `what` and showing the keys, after `timeout`.
    pub(crate) fn wait_keys(
        &self,
        prefix: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Keys) -> bool,
    ) -> (Keys, Duration) {
        let start = Instant::now();
        loop {
            let keys = self.keys(prefix);
            if done(&keys) {
                return (keys, start.elapsed());
            }
            assert!(
                start.elapsed() < timeout,
                "etcd never had {what} within {timeout:?}; keys now: {keys:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The ids of the leases etcd holds.
    pub(crate) fn leases(&self) -> Vec<i64> {
        let v: Value =
            serde_json::from_str(&self.etcdctl(&["lease", "list", "-w", "json"])).expect("json");
        v["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["id"].as_i64())
            .collect()
    }

    /// Revokes a lease, deleting its keys.
    pub(crate) fn revoke(&self, lease: i64) {
        self.etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes sure `etcd` and `etcdctl` run, installing the Debian packages if it can. One
/// test process installs at a time (a file lock), the others then find them there.
fn ensure_installed() -> Result<(), String> {
    let have = || {
        let ok = |cmd: &str, arg: &str| {
            Command::new(cmd)
                .arg(arg)
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        ok("etcd", "--version") && ok("etcdctl", "version")
    };
    if have() {
        return Ok(());
    }
    let lock_path = std::env::temp_dir().join("processes-etcd-install.lock");
    // Opened read-only if another user created it: flock works either way.
    let lock = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .or_else(|_| File::open(&lock_path))
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", lock_path.display()))?;
    if have() {
        return Ok(());
    }
    let prefix: &[&str] = if nix::unistd::geteuid().is_root() {
        &[]
    } else if Command::new("sudo")
        .args(["-n", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        &["sudo", "-n"]
    } else {
        return Err(
            "etcd is not installed (apt-get install etcd-server etcd-client) and installing it \
             needs root"
                .into(),
        );
    };
    let apt = |args: &[&str]| -> Result<(), String> {
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        argv.extend(args);
        eprintln!("etcd tests: running {}", argv.join(" "));
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("etcd is not installed, and running apt-get failed: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            Err(format!(
                "etcd is not installed, and apt-get {} failed: {}",
                args.join(" "),
                tail.join(" / ")
            ))
        }
    };
    let install = [
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "etcd-server",
        "etcd-client",
    ];
    if apt(&install).is_err() {
        apt(&["update", "-q"])?;
        apt(&install)?;
    }
    if have() {
        Ok(())
    } else {
        Err("etcd-server and etcd-client were installed but etcd or etcdctl does not run".into())
    }
}

const PREFIX: &str = "/processes/";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn start(rt: &tokio::runtime::Runtime, cfg: RegistryConfig) -> Registry {
    let _guard = rt.enter();
    Registry::start(cfg)
}

fn config(endpoints: Vec<String>, ttl: Duration) -> RegistryConfig {
    RegistryConfig {
        endpoints,
        prefix: PREFIX.to_string(),
        ttl,
        node: "node-a".to_string(),
    }
}

fn app(name: &str, ready: usize, version: u64) -> AppEndpoints {
    AppEndpoints {
        app: name.to_string(),
        endpoints: vec![format!("10.1.2.3:{}", 8000 + name.len())],
        ready,
        version,
    }
}

fn key(app: &str) -> String {
    format!("{PREFIX}{app}/node-a")
}

/// `ready` of `app`'s key, if it is there.
fn ready(keys: &Keys, app: &str) -> Option<u64> {
    keys.get(&key(app)).and_then(|e| e.value["ready"].as_u64())
}

/// A loopback port that nothing listens on.
fn closed_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Polls the registry's state until `done` holds.
fn wait_state(
    reg: &Registry,
    what: &str,
    timeout: Duration,
    done: impl Fn(&RegistryState) -> bool,
) -> (RegistryState, Duration) {
    let start = Instant::now();
    loop {
        let s = reg.state();
        if done(&s) {
            return (s, start.elapsed());
        }
        assert!(
            start.elapsed() < timeout,
            "registry never {what} within {timeout:?}; state: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const WITHIN: Duration = Duration::from_secs(1);

#[test]
fn registry_follows_updates_and_shutdown_removes_keys() {
    let Some(etcd) = Etcd::start_or_skip("registry_follows_updates_and_shutdown_removes_keys")
    else {
        return;
    };
    let rt = runtime();
    // A dead endpoint first: the registry must move on to the live one.
    let reg = start(
        &rt,
        config(
            vec![closed_endpoint(), etcd.endpoint()],
            Duration::from_secs(5),
        ),
    );
    let (state, took) = wait_state(&reg, "connected", Duration::from_secs(5), |s| {
        matches!(s, RegistryState::Connected { .. })
    });
    let RegistryState::Connected { endpoint, .. } = state else {
        unreachable!()
    };
    assert_eq!(endpoint, etcd.endpoint());
    eprintln!("connected (past a dead endpoint) after {took:?}");

    // Appears within a second, with every field; an app with no ready worker has no key.
    reg.update(vec![app("web", 2, 1), app("api", 0, 1)]);
    let (keys, took) = etcd.wait_keys(PREFIX, "web registered", WITHIN, |k| {
        ready(k, "web") == Some(2)
    });
    eprintln!("web registered after {took:?}");
    assert_eq!(keys.len(), 1, "{keys:#?}");
    let web = &keys[&key("web")];
    let v = &web.value;
    assert_eq!(v["app"], "web");
    assert_eq!(v["node"], "node-a");
    assert_eq!(v["endpoints"], serde_json::json!(["10.1.2.3:8003"]));
    assert_eq!(v["version"], 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let updated = v["updated_unix_ms"].as_u64().expect("updated_unix_ms");
    assert!(now_ms.abs_diff(updated) < 5_000, "{updated} vs {now_ms}");
    let lease = web.lease;
    assert_ne!(lease, 0, "the key must be under the lease");
    assert!(etcd.leases().contains(&lease));

    // Scaled up: ready follows.
    reg.update(vec![app("web", 3, 1), app("api", 0, 1)]);
    let (_, took) = etcd.wait_keys(PREFIX, "web ready 3", WITHIN, |k| {
        ready(k, "web") == Some(3)
    });
    eprintln!("scale seen after {took:?}");

    // Reloaded: the version follows.
    reg.update(vec![app("web", 3, 2), app("api", 0, 1)]);
    let (_, took) = etcd.wait_keys(PREFIX, "web version 2", WITHIN, |k| {
        k.get(&key("web")).is_some_and(|e| e.value["version"] == 2)
    });
    eprintln!("reload seen after {took:?}");

    // web drained to zero, api became ready: web's key goes, api's comes.
    reg.update(vec![app("web", 0, 2), app("api", 1, 1)]);
    let (keys, took) = etcd.wait_keys(PREFIX, "web gone and api registered", WITHIN, |k| {
        ready(k, "web").is_none() && ready(k, "api") == Some(1)
    });
    eprintln!("drain to zero seen after {took:?}");
    assert_eq!(keys[&key("api")].lease, lease, "one lease for every key");

    // A new app; the registry's own reader sees what etcdctl sees.
    reg.update(vec![app("api", 1, 1), app("jobs", 2, 5)]);
    let (keys, _) = etcd.wait_keys(PREFIX, "jobs registered", WITHIN, |k| {
        ready(k, "jobs") == Some(2)
    });
    let listed = rt
        .block_on(registry::list(
            &[etcd.endpoint()],
            PREFIX,
            Duration::from_secs(2),
        ))
        .expect("list");
    let listed: BTreeMap<String, Value> = listed
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).expect("json value")))
        .collect();
    let seen: BTreeMap<String, Value> = keys.into_iter().map(|(k, e)| (k, e.value)).collect();
    assert_eq!(listed, seen);

    // An identical snapshot writes nothing (the revision stays).
    let revision = |etcd: &Etcd| {
        let v: Value =
            serde_json::from_str(&etcd.etcdctl(&["get", "x", "-w", "json"])).expect("json");
        v["header"]["revision"].as_i64().expect("revision")
    };
    let before = revision(&etcd);
    reg.update(vec![app("api", 1, 1), app("jobs", 2, 5)]);
    std::thread::sleep(Duration::from_millis(300)); // nothing to poll for: absence of writes
    assert_eq!(revision(&etcd), before, "an unchanged snapshot was written");

    // Graceful stop: the lease is revoked and every key gone when shutdown returns.
    let t = Instant::now();
    rt.block_on(reg.shutdown(Duration::from_secs(3)));
    eprintln!("shutdown took {:?}", t.elapsed());
    assert_eq!(etcd.keys(PREFIX), Keys::new());
    assert!(!etcd.leases().contains(&lease));
}

#[test]
fn dropped_registry_keys_expire_with_the_lease() {
    let Some(etcd) = Etcd::start_or_skip("dropped_registry_keys_expire_with_the_lease") else {
        return;
    };
    let rt = runtime();
    let ttl = Duration::from_secs(2);
    let reg = start(&rt, config(vec![etcd.endpoint()], ttl));
    reg.update(vec![app("web", 1, 1)]);
    let (keys, _) = etcd.wait_keys(PREFIX, "web registered", WITHIN, |k| {
        ready(k, "web") == Some(1)
    });
    let lease = keys[&key("web")].lease;
    // Let at least one keepalive go by, so the expiry below is the lease's doing.
    std::thread::sleep(ttl);
    assert!(
        ready(&etcd.keys(PREFIX), "web").is_some(),
        "keepalives must hold the key past the ttl"
    );

    // A master that dies says nothing: dropping stops the keepalives and deletes nothing.
    drop(reg);
    let dropped = Instant::now();
    assert!(ready(&etcd.keys(PREFIX), "web").is_some());
    let (_, took) = etcd.wait_keys(
        PREFIX,
        "the key expired",
        ttl + Duration::from_secs(3),
        |k| k.is_empty(),
    );
    eprintln!("key expired {took:?} after the drop (ttl {ttl:?})");
    assert!(
        dropped.elapsed() >= Duration::from_secs(1),
        "gone after {took:?}: deleted, not expired"
    );
    assert!(!etcd.leases().contains(&lease));
}

#[test]
fn registry_rides_out_an_etcd_outage() {
    let Some(mut etcd) = Etcd::start_or_skip("registry_rides_out_an_etcd_outage") else {
        return;
    };
    let rt = runtime();
    let reg = start(&rt, config(vec![etcd.endpoint()], Duration::from_secs(2)));
    reg.update(vec![app("web", 2, 1)]);
    etcd.wait_keys(PREFIX, "web registered", WITHIN, |k| {
        ready(k, "web") == Some(2)
    });

    // etcd dies: the next keepalive fails and the state says so, with the error.
    etcd.kill();
    let (state, took) = wait_state(&reg, "down", Duration::from_secs(3), |s| {
        matches!(s, RegistryState::Down { .. })
    });
    eprintln!("down after {took:?}: {state:?}");
    let RegistryState::Down { error, retry_in } = state else {
        unreachable!()
    };
    assert!(error.contains(&etcd.endpoint()), "{error}");
    assert!(error.contains("connection refused"), "{error}");
    assert!(retry_in <= registry::BACKOFF_MAX);

    // The master goes on: updates return at once while etcd is away.
    let t = Instant::now();
    reg.update(vec![app("web", 4, 1), app("api", 1, 1)]);
    assert!(t.elapsed() < Duration::from_millis(50));
    // Stay away long enough for the backoff to grow past its first steps.
    wait_state(
        &reg,
        "backing off 350 ms or more",
        Duration::from_secs(5),
        |s| matches!(s, RegistryState::Down { retry_in, .. } if *retry_in >= Duration::from_millis(350)),
    );
    assert_eq!(reg.state().label(), "down");

    // etcd comes back on the same data and ports: the newest snapshot is registered.
    etcd.restart();
    let (_, took) = etcd.wait_keys(
        PREFIX,
        "the newest snapshot after the restart",
        registry::BACKOFF_MAX + Duration::from_secs(3),
        |k| ready(k, "web") == Some(4) && ready(k, "api") == Some(1),
    );
    eprintln!("re-registered {took:?} after etcd answered again");
    wait_state(&reg, "connected", Duration::from_secs(2), |s| {
        matches!(s, RegistryState::Connected { .. })
    });
    let keys = etcd.keys(PREFIX);
    let leases = etcd.leases();
    for (k, e) in &keys {
        assert!(leases.contains(&e.lease), "{k} is not under a live lease");
    }
    rt.block_on(reg.shutdown(Duration::from_secs(3)));
    assert_eq!(etcd.keys(PREFIX), Keys::new());
}

#[test]
fn registry_replaces_a_revoked_lease() {
    let Some(etcd) = Etcd::start_or_skip("registry_replaces_a_revoked_lease") else {
        return;
    };
    let rt = runtime();
    let ttl = Duration::from_secs(3);
    let reg = start(&rt, config(vec![etcd.endpoint()], ttl));
    reg.update(vec![app("web", 2, 1), app("api", 1, 1)]);
    let (keys, _) = etcd.wait_keys(PREFIX, "both apps registered", WITHIN, |k| k.len() == 2);
    let old = keys[&key("web")].lease;

    // The lease is lost under the registry (as when etcd loses its data): keys go with it.
    etcd.revoke(old);
    assert_eq!(etcd.keys(PREFIX), Keys::new());

    // The next keepalive finds out; a new lease, every key put again.
    let (keys, took) = etcd.wait_keys(
        PREFIX,
        "both apps under a new lease",
        ttl / 3 + Duration::from_secs(2),
        |k| k.len() == 2 && k.values().all(|e| e.lease != old && e.lease != 0),
    );
    eprintln!("re-registered {took:?} after the revoke");
    let new = keys[&key("web")].lease;
    assert_eq!(keys[&key("api")].lease, new);
    assert!(etcd.leases().contains(&new));
    assert!(matches!(reg.state(), RegistryState::Connected { .. }));
    rt.block_on(reg.shutdown(Duration::from_secs(3)));
    assert!(!etcd.leases().contains(&new));
}

// ---- a whole master against a real etcd ---------------------------------------------------

fn master_config(etcd: &Etcd, ttl: &str) -> String {
    format!(
        r#"
        [registry]
        url = "{}"
        ttl = "{ttl}"
        advertise = "node-a"
        [apps.web]
        command = ["{{fixture}}", "serve", "graceful"]
        instances = 2
        listen = "127.0.0.1:0"
        dispatch = "round-robin"
        ready_after = "50ms"
        "#,
        etcd.url()
    )
}

const WEB: &str = "/processes/web/node-a";

fn ready_of(keys: &Keys) -> Option<u64> {
    keys.get(WEB).and_then(|e| e.value["ready"].as_u64())
}

/// The master registers its app, follows scaling and draining within a second, keeps
/// serving through an etcd outage and registers again when it is back, and removes its
/// keys when it stops.
#[test]
fn a_master_registers_follows_rides_out_etcd_and_cleans_up() {
    let Some(mut etcd) =
        Etcd::start_or_skip("a_master_registers_follows_rides_out_etcd_and_cleans_up")
    else {
        return;
    };
    let mut m = run_config(&master_config(&etcd, "3s"), &[]);
    let port = m.port();
    let (keys, took) = etcd.wait_keys(
        "/processes/",
        "web with 2 ready",
        Duration::from_secs(10),
        |k| ready_of(k) == Some(2),
    );
    let v = &keys[WEB].value;
    assert_eq!(
        v["endpoints"],
        serde_json::json!([format!("127.0.0.1:{port}")]),
        "{v}"
    );
    assert_eq!(v["node"], "node-a");
    assert_eq!(v["version"], 0);
    assert_ne!(keys[WEB].lease, 0, "the key lives under the master's lease");
    eprintln!("registered {took:?} after start");

    // Scale up, then down: the key follows the ready count.
    let (code, _, _) = cli(&m, &["scale", "web", "3"]);
    assert_eq!(code, Some(0));
    m.wait_ready(3);
    let (_, took) = etcd.wait_keys(
        "/processes/",
        "web with 3 ready",
        Duration::from_secs(5),
        |k| ready_of(k) == Some(3),
    );
    assert!(
        took < Duration::from_secs(1),
        "the registry lagged {took:?} behind the pool"
    );
    let (code, _, _) = cli(&m, &["scale", "web", "1"]);
    assert_eq!(code, Some(0));
    m.wait_ready(1);
    let (_, took) = etcd.wait_keys(
        "/processes/",
        "web with 1 ready",
        Duration::from_secs(5),
        |k| ready_of(k) == Some(1),
    );
    assert!(
        took < Duration::from_secs(1),
        "the registry lagged {took:?} behind the drain"
    );

    // etcd goes away: the master keeps serving and says so in status.
    etcd.kill();
    for _ in 0..5 {
        assert!(get(port).unwrap().starts_with("slot="));
    }
    m.wait_status("the registry down", |s| s["registry"]["state"] == "down");
    assert!(get(port).is_ok());
    // A change while etcd is down is written once it is back.
    let (code, _, _) = cli(&m, &["scale", "web", "2"]);
    assert_eq!(code, Some(0));
    m.wait_ready(2);
    etcd.restart();
    etcd.wait_keys(
        "/processes/",
        "web registered again with 2 ready",
        Duration::from_secs(15),
        |k| ready_of(k) == Some(2),
    );
    m.wait_status("the registry connected", |s| {
        s["registry"]["state"] == "connected"
    });

    // A graceful stop removes the keys at once, not after the TTL.
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(Duration::from_secs(15)).success());
    let keys = etcd.keys("/processes/");
    assert!(
        keys.is_empty(),
        "keys left after a graceful stop: {keys:#?}"
    );
}

/// A master that dies without a word leaves its keys only until its lease expires.
#[test]
fn a_killed_masters_keys_vanish_with_its_lease() {
    let Some(etcd) = Etcd::start_or_skip("a_killed_masters_keys_vanish_with_its_lease") else {
        return;
    };
    let mut m = run_config(&master_config(&etcd, "2s"), &[]);
    etcd.wait_keys(
        "/processes/",
        "web with 2 ready",
        Duration::from_secs(10),
        |k| ready_of(k) == Some(2),
    );
    m.signal(libc::SIGKILL);
    m.wait_exit(Duration::from_secs(5));
    let (_, took) = etcd.wait_keys("/processes/", "no keys", Duration::from_secs(10), |k| {
        k.is_empty()
    });
    eprintln!("keys gone {took:?} after the master was killed (ttl 2s)");
    assert!(
        took <= Duration::from_secs(4),
        "keys outlived the 2s lease by too much: {took:?}"
    );
}
