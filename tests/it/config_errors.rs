//! Every bad input gives one clear error naming the field, exits 2, and starts nothing.
//! The expected messages are snapshots: a change to one is a change users see.

use std::process::Command;

use crate::common::{BIN, FIXTURE};

/// Runs `processes ARGS` in `dir` and returns (exit code, stderr, stdout).
fn run_in(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("XDG_RUNTIME_DIR", dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

fn check(dir: &std::path::Path, args: &[&str], want: &str) {
    let (code, stderr, stdout) = run_in(dir, args);
    assert_eq!(stderr, want, "for `processes {}`", args.join(" "));
    assert_eq!(code, Some(2), "for `processes {}`", args.join(" "));
    assert!(
        !stdout.contains("fixture start"),
        "a worker started: {stdout}"
    );
    assert!(
        !dir.join("processes").exists(),
        "a control socket was created for `processes {}`",
        args.join(" ")
    );
}

#[test]
fn bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = FIXTURE;
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--"],
            "processes: command line: COMMAND: missing; give the program after `--` (e.g. `processes run -i 4 -- node server.js`) or a config file with -c",
        ),
        (
            &["run", "--autoscale", "min=4,max=2", "--", f],
            "processes: command line: --autoscale: min 4 is above max (2)",
        ),
        (
            &["run", "--autoscale", "min=0,max=2", "--", f],
            "processes: command line: --autoscale: min 0 must be at least 1",
        ),
        (
            &["run", "--autoscale", "3", "--", f],
            "processes: command line: --autoscale: `3` is not min=A,max=B",
        ),
        (
            &[
                "run",
                "--env",
                "PORT=8081",
                "--listen",
                "127.0.0.1:8080",
                "--",
                f,
            ],
            "processes: command line: --env: PORT=8081 is not the port of the first TCP listen address (127.0.0.1:8080): the master sets PORT to that port; leave PORT out",
        ),
        (
            &["run", "--autoscale", "min=1", "--", f],
            "processes: command line: --autoscale: max missing; use min=A,max=B",
        ),
        (
            &["run", "-i", "0", "--", f],
            "processes: command line: -i/--instances: 0 must be at least 1",
        ),
        (
            &["run", "-i", "5000", "--", f],
            "processes: command line: -i/--instances: 5000 is above the limit of 1024",
        ),
        (
            &["run", "-i", "many", "--", f],
            "processes: command line: -i/--instances: `many` is not a number of workers; give N, or max for one per CPU",
        ),
        (
            &["top"],
            "processes: top needs a terminal; in scripts use `processes status` (or `status --json`)",
        ),
        (
            &["scale", "web", "0"],
            "processes: command line: N: 0 is not a size; `processes stop web` stops the app",
        ),
        (
            &["run", "-i", "2", "--autoscale", "min=1,max=2", "--", f],
            "processes: command line: --autoscale: cannot be combined with -i/--instances; keep one",
        ),
        (
            &["run", "--grace", "10", "--", f],
            "processes: command line: --grace: `10` is not a duration; use a number with a unit, like 10s, 250ms or 2m",
        ),
        (
            &["run", "--ready-after", "soon", "--", f],
            "processes: command line: --ready-after: `soon` is not a duration; use a number with a unit, like 10s, 250ms or 2m",
        ),
        (
            &["run", "--listen", "nonsense", "--", f],
            "processes: command line: --listen: `nonsense` is not an address; use HOST:PORT, :PORT, [::]:PORT or a unix socket path",
        ),
        (
            &["run", "--listen", ":99999", "--", f],
            "processes: command line: --listen: `:99999` is not an address; use HOST:PORT, :PORT, [::]:PORT or a unix socket path",
        ),
        (
            &["run", "--listen", ":8080", "--listen", ":8080", "--", f],
            "processes: command line: --listen: `:8080` is given twice",
        ),
        (
            &["run", "--", "no-such-program-xyz"],
            "processes: command line: COMMAND: `no-such-program-xyz` is not found in PATH; give its full path or install it",
        ),
        (
            &["run", "--", "./nothing-here"],
            "processes: command line: COMMAND: `./nothing-here` is not an executable file",
        ),
        (
            &["run", "--restart", "sometimes", "--", f],
            "processes: command line: --restart: `sometimes` is not a restart policy; use always, on-failure or never",
        ),
        (
            &["run", "--dispatch", "random", "--", f],
            "processes: command line: --dispatch: `random` is not a dispatch mode; use round-robin, least-loaded or shared",
        ),
        (
            &["run", "--runtime", "java", "--", f],
            "processes: command line: --runtime: `java` is not a runtime; use node or generic",
        ),
        (
            &["run", "--env", "=x", "--", f],
            "processes: command line: --env: `=x` has no name before `=`",
        ),
        (
            &["run", "--env", "NOEQUALS", "--", f],
            "processes: command line: --env: `NOEQUALS` is not K=V",
        ),
        (
            &["run", "--cwd", "/etc/passwd", "--", f],
            "processes: command line: --cwd: `/etc/passwd` is not a directory",
        ),
        (
            &["run", "--name", "no spaces", "--", f],
            "processes: command line: --name: `no spaces` is not a usable name; use 1-64 letters, digits, `_`, `-` or `.`, starting with a letter or digit",
        ),
        (
            &["run", "-c", "missing.toml"],
            "processes: cannot read config file missing.toml: No such file or directory (os error 2)",
        ),
        (
            &["run", "-c", "x.toml", "-i", "2"],
            "processes: command line: -i/--instances: cannot be combined with -c/--config; set it for the app in the file",
        ),
        (
            &["run", "-c", "x.toml", "--", f],
            "processes: command line: COMMAND: cannot be combined with -c/--config; set it for the app in the file",
        ),
    ];
    for (args, want) in cases {
        check(d, args, want);
    }
}

/// The command without `--` before it: clap's "unexpected argument" comes with the line
/// as it should have been typed; the command's own `-flags` stay after the `--`.
#[test]
fn a_command_without_the_separator_gets_the_corrected_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "-i", "2", "node", "server.js"],
            "tip: put `--` before the command: processes run -i 2 -- node server.js",
        ),
        (
            &["run", "--name", "node", "node", "--inspect", "my app.js"],
            "tip: put `--` before the command: processes run --name node -- node --inspect 'my app.js'",
        ),
        // PM2's order, flags after the script: they were most likely meant for processes.
        (
            &[
                "run",
                "node",
                "server.js",
                "--port",
                "3000",
                "-i",
                "2",
                "--listen=:8080",
            ],
            "tip: put `--` before the command, and the flags meant for processes before it: processes run -i 2 --listen=:8080 -- node server.js --port 3000 (or, if -i, --listen are the command's own: processes run -- node server.js --port 3000 -i 2 --listen=:8080)",
        ),
        (
            &["run", "node", "server.js", "-i4"],
            "tip: put `--` before the command, and the flags meant for processes before it: processes run -i4 -- node server.js (or, if -i is the command's own: processes run -- node server.js -i4)",
        ),
    ];
    for (args, want) in cases {
        let (code, stderr, stdout) = run_in(d, args);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.starts_with("error: unexpected argument 'node' found"),
            "{stderr}"
        );
        assert!(stderr.contains(want), "{stderr}");
        assert!(!stdout.contains("fixture start"), "{stdout}");
        assert!(
            !d.join("processes").exists(),
            "a control socket was created"
        );
    }
}

#[test]
fn a_port_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    check(
        dir.path(),
        &["run", "--listen", &addr, "--", FIXTURE],
        &format!(
            "processes: --listen: cannot listen on {addr}; something else is listening there: stop it or pick another address: Address already in use (os error 98)"
        ),
    );
    std::fs::write(
        dir.path().join("p.toml"),
        format!("[apps.web]\ncommand = [\"{FIXTURE}\"]\nlisten = [\"127.0.0.1:0\", \"{addr}\"]\n"),
    )
    .unwrap();
    check(
        dir.path(),
        &["run", "-c", "p.toml"],
        &format!(
            "processes: apps.web.listen[1]: cannot listen on {addr}; something else is listening there: stop it or pick another address: Address already in use (os error 98)"
        ),
    );
}

/// `--control` or `--listen` naming a file that is not a socket: an error, and the file
/// is left as it was (it used to be deleted to make room for the socket).
#[test]
fn a_file_where_a_socket_should_go_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("important.txt"), "precious").unwrap();
    let (code, stderr, _) = run_in(d, &["run", "--control", "important.txt", "--", FIXTURE]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "processes: control socket: important.txt: a file that is not a socket is in the way; remove it or give another --control"
    );
    check(
        d,
        &["run", "--listen", "./important.txt", "--", FIXTURE],
        "processes: --listen: cannot listen on unix:./important.txt; remove that file or pick another path: a file that is not a socket is in the way",
    );
    assert_eq!(
        std::fs::read_to_string(d.join("important.txt")).unwrap(),
        "precious"
    );
}

#[test]
fn bad_config_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = FIXTURE;
    let cases: Vec<(String, String)> = vec![
        (format!("[apps.web]\ncommand = [\"{f}\"]\ninstnaces = 2\n"), "apps.web.instnaces: unknown key; check the spelling against the config reference in README.md".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\nautoscale = {{ min = 4, max = 2 }}\n"), "apps.web.autoscale.min: 4 is above max (2)".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\nautoscale = {{ min = 1 }}\n"), "apps.web.autoscale.max: missing; set autoscale = { min = A, max = B }".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\nautoscale = \"min=3,max=2\"\n"), "apps.web.autoscale.min: 3 is above max (2)".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\ninstances = 2\nautoscale = {{ min = 1, max = 2 }}\n"), "apps.web.autoscale: cannot be set together with instances; keep one".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\ngrace = 10\n"), "apps.web.grace: expected a duration string like \"10s\" or \"250ms\", found integer".into()),
        (format!("[apps.web]\ncommand = [\"{f}\"]\ngrace = \"10 parsecs\"\n"), "apps.web.grace: `10 parsecs` is not a duration; use a number with a unit, like 10s, 250ms or 2m".into()),
        ("[apps.web]\ncwd = \"/tmp\"\n".into(), "apps.web.command: missing; give the program and its arguments, e.g. [\"node\", \"server.js\"]".into()),
        ("[apps.web]\ncommand = \"node x.js\"\n".into(), "apps.web.command: expected an array of strings, like [\"node\", \"server.js\"], found string".into()),
        ("[apps.web]\ncommand = []\n".into(), "apps.web.command: missing; give the program and its arguments, e.g. [\"node\", \"server.js\"]".into()),
        ("[apps.web\ncommand = 1".into(), "(file): not valid TOML at line 1, column 10: invalid table header; expected `.`, `]`".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nlisten = \":18999\"\n[apps.b]\ncommand = [\"{f}\"]\nlisten = \":18999\"\n"), "apps.b.listen: 0.0.0.0:18999 is also used by apps.a; give each app its own address".into()),
        (format!("metrix = 1\n[apps.a]\ncommand = [\"{f}\"]\n"), "metrix: unknown key; check the spelling against the config reference in README.md".into()),
        (format!("[apps.\"bad name\"]\ncommand = [\"{f}\"]\n"), "apps.bad name: `bad name` is not a usable name; use 1-64 letters, digits, `_`, `-` or `.`, starting with a letter or digit".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\n[apps.a.backoff]\ninitial = \"1s\"\nmax = \"10ms\"\n"), "apps.a.backoff.max: 10ms is below initial (1s)".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nautoscale = {{ min = 1, max = 2, down_window = \"2h\" }}\n"), "apps.a.autoscale.down_window: 2h00m is above the maximum of 1h".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\n[apps.a.backoff]\njitter = 1\n"), "apps.a.backoff.jitter: unknown key; check the spelling against the config reference in README.md".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nlisten = [\"127.0.0.1:1\", \"x\"]\n"), "apps.a.listen[1]: `x` is not an address; use HOST:PORT, :PORT, [::]:PORT or a unix socket path".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nenv = {{ A = [1] }}\n"), "apps.a.env.A: expected a string, found array".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nrestart = \"sometimes\"\n"), "apps.a.restart: `sometimes` is not a restart policy; use always, on-failure or never".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\nlisten = \"127.0.0.1:0\"\nenv = {{ PORT = \"3000\" }}\n"), "apps.a.env: PORT=3000 is not the port of the first TCP listen address (127.0.0.1:0): the master sets PORT to that port; leave PORT out".into()),
        (format!("[apps.a]\ncommand = [\"{f}\"]\ncwd = \"does-not-exist\"\n"), format!("apps.a.cwd: `{}/does-not-exist` cannot be used: No such file or directory (os error 2)", d.display())),
        ("".into(), "apps: missing; add at least one [apps.NAME] table with a command".into()),
        ("[apps]\n".into(), "apps: is empty; add at least one [apps.NAME] table with a command".into()),
        ("apps = 3\n".into(), "apps: expected a table, found integer".into()),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let name = format!("case{i}.toml");
        std::fs::write(d.join(&name), text).unwrap();
        check(
            d,
            &["run", "-c", &name],
            &format!("processes: config {name}: {want}"),
        );
    }
}
