//! The `processes` binary: parses the command line, runs the master or a client command,
//! prints any error once with its causes, and exits with a meaningful code.

use std::process::ExitCode;

use processes::cli::{Cli, Command};
use processes::control::{self, Request};
use processes::master::{self, error_chain};

fn main() -> ExitCode {
    // Before anything opens a file: fds 3.. may be systemd's sockets for us.
    let inherited = processes::sockets::inherited_from_systemd();
    processes::unix::cloexec_inherited_fds();
    let cli = Cli::parse_args(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    if !matches!(cli.command, Command::Run(_)) {
        // A client whose reader went away (`processes status | head -1`) ends quietly, as
        // other command-line tools do, instead of panicking on a failed print. The master
        // keeps Rust's default (ignored): it carries on without its output's reader.
        // SAFETY: signal(2) with SIG_DFL, before any thread starts; no handler runs.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    init_logging();
    match cli.command {
        Command::Run(args) => {
            let config = match args.to_config() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            // Still single-threaded here, as the reaper's fork needs.
            let reaper = match processes::reaper::Reaper::start() {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!(
                        "processes: warning: cannot start the reaper ({e}); if the master is killed, children of workers may outlive it"
                    );
                    None
                }
            };
            let name = args.master_name();
            let opts = master::Options {
                config,
                name,
                control: args.control.clone(),
                inherited,
                reaper,
            };
            match master::run(opts) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => fail(&e),
            }
        }
        Command::Status(a) => client(&a.target, &Request::Status { app: a.app.clone() }, |data| {
            if a.json {
                println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
            } else {
                print_status(data);
            }
        }),
        Command::Scale(a) => {
            let (n, min, max) = match a.parse_size() {
                Ok(v) => v,
                Err(e) => return fail(&e),
            };
            let req = Request::Scale {
                app: a.app.clone(),
                n,
                min,
                max,
            };
            client(&a.target, &req, |d| {
                println!(
                    "{}: {} → {} workers (bounds {}..{})",
                    a.app, d["from"], d["to"], d["min"], d["max"]
                );
                if d["autoscale_stopped"] == true {
                    println!(
                        "{0}: autoscaling is off now; `processes scale {0} min=A,max=B` turns it back on",
                        a.app
                    );
                }
            })
        }
        Command::Reload(a) => reload(&a.target, a.app.clone(), a.batch.map(|b| b as usize)),
        Command::Restart(a) => match a.slot {
            // Without a slot it restarts them all, as PM2 does: a rolling reload.
            None => reload(&a.target, Some(a.app.clone()), None),
            Some(slot) => client(
                &a.target,
                &Request::Restart {
                    app: a.app.clone(),
                    slot,
                },
                |_| {
                    println!(
                        "{} slot {slot}: replacement starting; the old worker drains once it is ready",
                        a.app
                    )
                },
            ),
        },
        Command::Top(_) if !std::io::IsTerminal::is_terminal(&std::io::stdout()) => {
            eprintln!(
                "processes: top needs a terminal; in scripts use `processes status` (or `status --json`)"
            );
            ExitCode::from(2)
        }
        Command::Top(t) => match t.resolve() {
            Ok(path) => match processes::top::run(&path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            },
            Err(e) => fail(&e),
        },
        Command::Stop(a) => stop(&a),
        Command::Start(a) => client(&a.target, &Request::Start { app: a.app.clone() }, |d| {
            let n = d["started"].as_u64().unwrap_or(0);
            if d["was_stopped"] == true {
                println!(
                    "starting {} ({n} worker{})",
                    a.app,
                    if n == 1 { "" } else { "s" }
                );
            } else {
                println!(
                    "{}: {n} slot{} waiting after crashes restart{} now",
                    a.app,
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "s" } else { "" }
                );
            }
        }),
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PROCESSES_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: not in files, pipes or journald.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        // A closed stderr (`processes run … | head`) must not stop the master: by default
        // a failed write is reported with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false)
        .init();
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("processes: {}", error_chain(e));
    ExitCode::from(2)
}

/// `processes reload [APP]`: prints the master's progress lines, then the outcome.
fn reload(target: &processes::cli::Target, app: Option<String>, batch: Option<usize>) -> ExitCode {
    let path = match target.resolve() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let req = Request::Reload { app, batch };
    match control::request_with_progress(&path, &req, |line| println!("{line}")) {
        Ok(d) => {
            let n = d["replaced"].as_u64().unwrap_or(0);
            println!(
                "reload done: {n} worker{} replaced",
                if n == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `processes stop [APP]`: asks, then waits (like `systemctl stop`) until the app's
/// workers, or the whole master, are gone, so that `stop && run` works.
fn stop(a: &processes::cli::StopArgs) -> ExitCode {
    let path = match a.target.resolve() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let what = a.app.clone().unwrap_or_else(|| "all".into());
    if let Err(e) = control::request(&path, &Request::Stop { app: a.app.clone() }) {
        return fail(&e);
    }
    println!("stopping {what}");
    if a.no_wait {
        return ExitCode::SUCCESS;
    }
    let gone = || match &a.app {
        // The master removes its control socket as it exits.
        None => std::os::unix::net::UnixStream::connect(&path).is_err(),
        Some(app) => control::request(
            &path,
            &Request::Status {
                app: Some(app.clone()),
            },
        )
        .map(|d| {
            d["apps"][0]["workers"]
                .as_array()
                .is_none_or(|w| w.is_empty())
        })
        .unwrap_or(true),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !gone() {
        if std::time::Instant::now() > deadline {
            eprintln!(
                "processes: {what} is still stopping after 5 minutes; `processes status` shows what is left"
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!("stopped {what}");
    ExitCode::SUCCESS
}

fn client(
    target: &processes::cli::Target,
    req: &Request,
    print: impl FnOnce(&serde_json::Value),
) -> ExitCode {
    let path = match target.resolve() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    match control::request(&path, req) {
        Ok(data) => {
            print(&data);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn print_status(data: &serde_json::Value) {
    let empty = vec![];
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for app in data["apps"].as_array().unwrap_or(&empty) {
        // An autoscaled pool capped below its max by the machine says so.
        let upper = app["autoscale"]["decision"]["upper"].as_u64();
        let cap = match (upper, app["max"].as_u64()) {
            (Some(u), Some(max)) if u < max => format!(" (at most {u} here: machine bound)"),
            _ => String::new(),
        };
        // A fixed-size pool has no bounds to show: `min`/`max` are only what `scale` takes.
        let sizing = if app["autoscale"].is_null() {
            "fixed".to_string()
        } else {
            format!("bounds {}..{}{cap}", app["min"], app["max"])
        };
        let stopped = app["stopped"].as_bool() == Some(true);
        println!(
            "{}  size {} (ready {})  desired {}  {sizing}  dispatch {}{}",
            text(&app["name"]),
            app["size"],
            app["ready"],
            app["desired"],
            text(&app["dispatch"]),
            if stopped {
                "  (stopped)"
            } else if app["reloading"].as_bool() == Some(true) {
                "  (reloading)"
            } else {
                ""
            }
        );
        println!(
            "  {:>4}  {:>8}  {:<13}  {:>9}  {:>8}  {:>8}",
            "slot", "pid", "state", "uptime", "restarts", "passed"
        );
        for w in app["workers"].as_array().unwrap_or(&empty) {
            let up = w["uptime_ms"].as_u64().unwrap_or(0);
            println!(
                "  {:>4}  {:>8}  {:<13}  {:>8.1}s  {:>8}  {:>8}",
                text(&w["slot"]),
                text(&w["pid"]),
                text(&w["state"]),
                up as f64 / 1000.0,
                text(&w["restarts"]),
                text(&w["passed"])
            );
        }
        // Slots without a worker: their restart count, and when they start again. (A
        // crash-looping slot whose retry is running has its worker's row already.)
        let workers = app["workers"].as_array().unwrap_or(&empty);
        for s in app["slots"].as_array().unwrap_or(&empty) {
            let state = text(&s["state"]);
            if state == "running" || workers.iter().any(|w| w["slot"] == s["slot"]) {
                continue;
            }
            let crashes = s["consecutive_crashes"].as_u64().unwrap_or(0);
            let after = match crashes {
                0 => String::new(),
                1 => " after a crash".into(),
                n => format!(" after {n} crashes in a row"),
            };
            let note = match s["restart_in_ms"].as_u64() {
                Some(ms) => format!("restarts in {:.1}s{after}", ms as f64 / 1000.0),
                None if app["removed"].as_bool() == Some(true) => {
                    "gone from the config file; back in it, `processes reload` starts it".into()
                }
                None if stopped => format!(
                    "stopped by `processes stop`; `processes start {}` starts it",
                    text(&app["name"])
                ),
                None if state == "stopped" => format!(
                    "kept down by its restart policy; `processes start {}` starts it",
                    text(&app["name"])
                ),
                None => format!("restarting{after}"),
            };
            println!(
                "  {:>4}  {:>8}  {:<13}  {:>9}  {:>8}  {:>8}  {note}",
                text(&s["slot"]),
                "-",
                state,
                "-",
                text(&s["restarts"]),
                "-"
            );
        }
    }
}
