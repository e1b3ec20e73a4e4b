//! Security: workers as an unprivileged user while the master keeps a privileged port, and
//! the master's environment kept from workers unless configured. (The control socket's
//! refusal of other users is in `operations`.)

use std::time::Duration;

use crate::common::*;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A free TCP port below 1024 on loopback.
fn free_low_port() -> u16 {
    (700..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024")
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn environ(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A temporary directory that any user can enter (0755 under /var/tmp), for files a worker
/// running as `nobody` must reach.
fn dir_everyone_can_reach() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn workers_run_as_nobody_on_a_port_only_root_can_bind() {
    if !is_root() {
        eprintln!("SKIPPED workers_run_as_nobody_on_a_port_only_root_can_bind: needs root");
        return;
    }
    let port = free_low_port();
    // The fixture must be reachable by nobody, wherever the checkout is (under /root, or a
    // /tmp that is not world-traversable, it is not): a copy where everyone can reach.
    let dir = dir_everyone_can_reach();
    let fixture = dir.path().join("processes-fixture");
    std::fs::copy(FIXTURE, &fixture).unwrap();
    let m = run_config(
        &format!(
            r#"
            [apps.low]
            command = ["{}", "serve"]
            instances = 2
            listen = "127.0.0.1:{port}"
            user = "nobody"
            ready_after = "50ms"
            "#,
            fixture.display()
        ),
        &[],
    );
    let s = m.wait_ready(2);
    for pid in pids(&s) {
        assert_eq!(uid_of(pid), 65534, "worker {pid} is not nobody");
        let env = environ(pid);
        assert!(env.iter().any(|e| e == "USER=nobody"), "{env:?}");
    }
    assert_eq!(
        uid_of(m.pid()),
        0,
        "the master stays root to bind and to signal"
    );
    assert!(get(port).unwrap().starts_with("slot="));
}

#[test]
fn node_workers_as_nobody_still_get_the_preload() {
    if !is_root() {
        eprintln!("SKIPPED node_workers_as_nobody_still_get_the_preload: needs root");
        return;
    }
    // The app must be readable by nobody: put it where everyone can reach.
    let dir = dir_everyone_can_reach();
    use std::os::unix::fs::PermissionsExt;
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "require('http').createServer((q, s) => s.end('ok\\n')).listen(Number(process.env.PORT));\n",
    )
    .unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    let m = run_config(
        &format!(
            r#"
            sample_interval = "100ms"
            [apps.nodenobody]
            command = ["node", "{}"]
            listen = "127.0.0.1:0"
            user = "nobody"
            ready_after = "30s"
            "#,
            app.display()
        ),
        &[],
    );
    let port = m.port();
    let s = m.wait_ready(1);
    assert_eq!(uid_of(pids(&s)[0]), 65534);
    assert_eq!(get(port).unwrap(), "ok\n");
    // The preload loaded (its reports arrive): event-loop utilization is known.
    m.wait_status("the preload's report", |s| {
        s["apps"][0]["workers"][0]["elu"].is_number()
    });
}

/// A Node worker running as another user asks the (root) master to listen on a unix
/// socket path of its choosing: refused with EACCES, and nothing is made at that path.
#[test]
fn a_worker_of_another_user_cannot_have_the_master_bind_a_path() {
    if !is_root() {
        eprintln!(
            "SKIPPED a_worker_of_another_user_cannot_have_the_master_bind_a_path: needs root"
        );
        return;
    }
    let dir = dir_everyone_can_reach();
    use std::os::unix::fs::PermissionsExt;
    let app = dir.path().join("app.js");
    std::fs::write(
        &app,
        "const s = require('http').createServer((q, r) => r.end('ok'));\n\
         s.on('error', (e) => console.log('PIPE ' + e.code));\n\
         s.listen(process.env.PIPE_PATH);\n\
         setInterval(() => {}, 1000);\n",
    )
    .unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Somewhere only root may write.
    let root_only = tempfile::tempdir().unwrap();
    let planted = root_only.path().join("planted.sock");
    let m = run_config(
        &format!(
            r#"
            [apps.pipes]
            command = ["node", "{}"]
            user = "nobody"
            env = {{ PIPE_PATH = "{}" }}
            ready_after = "50ms"
            "#,
            app.display(),
            planted.display()
        ),
        &[],
    );
    m.wait_log("PIPE EACCES");
    m.wait_log("binds a unix socket a worker names only for workers of its own user");
    assert!(!planted.exists(), "the master made {}", planted.display());
}

#[test]
fn the_masters_secrets_stay_out_of_workers_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let m = run_with(
        dir,
        control,
        &[
            "-i",
            "1",
            "--ready-after",
            "50ms",
            "--env",
            "GIVEN=yes",
            "--",
            FIXTURE,
        ],
        |cmd| {
            cmd.env("DATABASE_PASSWORD", "hunter2")
                .env("AWS_SECRET_ACCESS_KEY", "xyz")
                .env("LC_TIME", "C");
        },
    );
    let env = environ(pids(&m.wait_ready(1))[0]);
    assert!(
        !env.iter()
            .any(|e| e.contains("hunter2") || e.contains("AWS_SECRET")),
        "a secret leaked: {env:?}"
    );
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert!(
        env.iter().any(|e| e == "LC_TIME=C"),
        "locale passes: {env:?}"
    );
    assert!(env.iter().any(|e| e == "GIVEN=yes"), "{env:?}");

    // Asked for by name (a prefix), it passes.
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let m = run_with(
        dir,
        control,
        &[
            "-i",
            "1",
            "--ready-after",
            "50ms",
            "--inherit-env",
            "PATH,AWS_*",
            "--",
            FIXTURE,
        ],
        |cmd| {
            cmd.env("DATABASE_PASSWORD", "hunter2")
                .env("AWS_SECRET_ACCESS_KEY", "xyz");
        },
    );
    let env = environ(pids(&m.wait_ready(1))[0]);
    assert!(
        env.iter().any(|e| e == "AWS_SECRET_ACCESS_KEY=xyz"),
        "{env:?}"
    );
    assert!(!env.iter().any(|e| e.contains("hunter2")), "{env:?}");
    assert!(
        !env.iter().any(|e| e.starts_with("HOME=")),
        "only what was listed: {env:?}"
    );
}

#[test]
fn a_user_that_does_not_exist_is_a_config_error() {
    let mut m = run_config(
        r#"
        [apps.x]
        command = ["{fixture}"]
        user = "no-such-user-xyz"
        "#,
        &[],
    );
    let status = m.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    let out = m.out.text();
    assert!(
        out.contains("apps.x.user: no user named `no-such-user-xyz` on this machine"),
        "{out}"
    );
    assert!(!out.contains("fixture start"), "{out}");
}
