//! Prometheus metrics: every name and description in one place, the recorder, and a tiny
//! `/metrics` endpoint.
//!
//! Names follow `processes_<thing>_<unit>[_total]`. Labels come from small fixed sets only:
//! `app`, `state`, `reason`, `signal`, `direction`, `kind`, `bound`, the worker `slot`
//! (bounded by the app's `max`) and a listener's index — never a pid, path or address.
//! When `--metrics` is off no recorder is installed and every call here is a no-op.
//! Per-worker series that stop being updated (a slot removed by scaling down) expire after
//! a few sample ticks.

use std::io;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::warn;

pub const WORKERS: &str = "processes_workers";
pub const DESIRED: &str = "processes_desired_workers";
pub const MIN: &str = "processes_min_workers";
pub const MAX: &str = "processes_max_workers";
pub const UPPER_BOUND: &str = "processes_upper_bound_workers";
pub const BOUND_BINDING: &str = "processes_bound_binding";
pub const CRASH_LOOPING: &str = "processes_crash_looping_slots";
pub const RESTARTS: &str = "processes_restarts_total";
pub const EXITS: &str = "processes_worker_exits_total";
pub const UTILIZATION: &str = "processes_utilization_ratio";
pub const WORKER_UTILIZATION: &str = "processes_worker_utilization_ratio";
pub const SATURATION: &str = "processes_saturation_ratio";
pub const SETPOINT: &str = "processes_setpoint_ratio";
pub const REGISTRY_UP: &str = "processes_registry_up";
pub const LAG: &str = "processes_event_loop_lag_seconds";
pub const WORKER_RSS: &str = "processes_worker_resident_memory_bytes";
pub const HANDLES: &str = "processes_handles_passed_total";
pub const QUEUE: &str = "processes_dispatch_queue_length";
pub const BACKLOG: &str = "processes_accept_backlog_connections";
pub const SCALE_EVENTS: &str = "processes_scale_events_total";
pub const TICK: &str = "processes_sample_tick_seconds";
pub const VIOLATIONS: &str = "processes_channel_violations_total";
pub const OUTPUT_DROPPED: &str = "processes_output_dropped_lines_total";
/// Cumulative, but a gauge: the `metrics` crate's counters are integers.
pub const MASTER_CPU: &str = "processes_master_cpu_seconds";
pub const MASTER_RSS: &str = "processes_master_resident_memory_bytes";
pub const HOST_CPUS: &str = "processes_host_cpus";
pub const HOST_CPU_BUSY: &str = "processes_host_cpu_busy_ratio";
pub const HOST_MEM_HEADROOM: &str = "processes_host_memory_headroom_bytes";

/// What can hold an app's size, for `processes_bound_binding`: the controller's bounds,
/// with `cgroup` where the CPU or memory figure came from the cgroup's limits.
pub const BOUNDS: [&str; 9] = [
    "none",
    "min",
    "max",
    "cpu",
    "memory",
    "cgroup",
    "host_cpu_saturated",
    "spawns_in_flight",
    "doubling",
];

/// Installs the recorder; `sample_interval` sets how soon stale per-worker gauges expire.
pub fn install(sample_interval: Duration) -> Result<PrometheusHandle, String> {
    let lag_buckets = [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ];
    let tick_buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(LAG.into()), &lag_buckets)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(TICK.into()), &tick_buckets))
        .map_err(|e| e.to_string())?
        .idle_timeout(
            MetricKindMask::GAUGE,
            Some((sample_interval * 5).max(Duration::from_secs(5))),
        )
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        WORKERS,
        "Workers of an app by state (starting, ready, draining)."
    );
    describe_gauge!(DESIRED, "The number of workers the app should have now.");
    describe_gauge!(MIN, "The app's configured minimum size.");
    describe_gauge!(MAX, "The app's configured maximum size.");
    describe_gauge!(
        UPPER_BOUND,
        "The largest size allowed now: max, CPUs x factor, memory headroom."
    );
    describe_gauge!(
        BOUND_BINDING,
        "1 for the bound that holds the size now (none, min, max, cpu, memory, cgroup, host_cpu_saturated, spawns_in_flight, doubling), else 0."
    );
    describe_gauge!(CRASH_LOOPING, "Slots of an app marked crash-looping.");
    describe_gauge!(SETPOINT, "The utilization the controller steers an app to.");
    describe_gauge!(
        REGISTRY_UP,
        "1 while the endpoints are registered in etcd under a live lease, 0 while it retries."
    );
    describe_counter!(
        RESTARTS,
        "Workers started again, by reason (crash, memory, reload, restart)."
    );
    describe_counter!(
        EXITS,
        "Worker exits by reason (crash, exit, or why the master stopped it) and signal."
    );
    describe_gauge!(
        UTILIZATION,
        "Mean busy fraction of an app's ready workers (event-loop utilization or main-thread CPU)."
    );
    describe_gauge!(WORKER_UTILIZATION, "Busy fraction of one worker slot.");
    describe_gauge!(
        SATURATION,
        "0-1: how far past its setpoint an app runs while it cannot grow here (held at its upper bound: max, CPUs x factor, memory; a fixed pool at its size); what a cluster autoscaler should add machines or pods on."
    );
    describe_histogram!(
        LAG,
        metrics::Unit::Seconds,
        "Event-loop lag per worker per sample: reported delay p99 or ping round-trip, whichever is larger."
    );
    describe_gauge!(
        WORKER_RSS,
        metrics::Unit::Bytes,
        "Resident memory of one worker slot."
    );
    describe_counter!(
        HANDLES,
        "File descriptors passed to workers, by kind (listener, connection)."
    );
    describe_gauge!(
        QUEUE,
        "Connections accepted by the master and not yet passed to a worker."
    );
    describe_gauge!(
        BACKLOG,
        "Connections waiting in a listener's kernel accept queue."
    );
    describe_counter!(
        SCALE_EVENTS,
        "Pool size changes by direction (up, down) and reason."
    );
    describe_histogram!(
        TICK,
        metrics::Unit::Seconds,
        "Time one sample tick takes in the master."
    );
    describe_counter!(
        VIOLATIONS,
        "Worker channels cut off for breaking the protocol, by reason."
    );
    describe_counter!(
        OUTPUT_DROPPED,
        "Worker output lines dropped because the master's stdout could not keep up."
    );
    describe_gauge!(
        MASTER_CPU,
        metrics::Unit::Seconds,
        "CPU time used by the master process so far (cumulative; use rate())."
    );
    describe_gauge!(
        MASTER_RSS,
        metrics::Unit::Bytes,
        "Resident memory of the master process."
    );
    describe_gauge!(HOST_CPUS, "Effective CPUs (cgroup quota where set).");
    describe_gauge!(HOST_CPU_BUSY, "Host CPU busy fraction.");
    describe_gauge!(
        HOST_MEM_HEADROOM,
        metrics::Unit::Bytes,
        "Memory still usable (cgroup limit where set, else MemAvailable)."
    );
}

/// Scrapes served at once; a connection past these is closed at once. Each holds an fd
/// for up to 10 s, and anyone who can reach the port can open them.
pub const MAX_SCRAPES: usize = 32;

/// Serves `GET /metrics` (and nothing else) on an already bound listener.
pub fn serve(listener: std::net::TcpListener, handle: PrometheusHandle) {
    tokio::spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), respond(&mut stream, &handle))
                        .await;
                drop(slot);
            });
        }
    });
}

async fn respond(stream: &mut tokio::net::TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == buf.len() {
            return stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        }
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let line = head.lines().next().unwrap_or("");
    let (status, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
        ("200 OK", handle.render())
    } else if line.starts_with("GET / ") {
        ("200 OK", "processes: metrics are at /metrics\n".to_string())
    } else {
        (
            "404 Not Found",
            "not found; metrics are at /metrics\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await
}

/// Binds the metrics address before anything starts.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

// ---- the events the master records ------------------------------------------------------

pub fn worker_exit(app: &str, reason: &'static str, signal: Option<i32>) {
    let signal = signal.map_or_else(|| "none".to_string(), crate::unix::signal_name);
    counter!(EXITS, "app" => app.to_string(), "reason" => reason, "signal" => signal).increment(1);
}

pub fn restart(app: &str, reason: &'static str) {
    counter!(RESTARTS, "app" => app.to_string(), "reason" => reason).increment(1);
}

pub fn handle_passed(app: &str, slot: u32, kind: &'static str) {
    counter!(HANDLES, "app" => app.to_string(), "slot" => slot.to_string(), "kind" => kind)
        .increment(1);
}

pub fn scale_event(app: &str, up: bool, reason: &'static str) {
    let direction = if up { "up" } else { "down" };
    counter!(SCALE_EVENTS, "app" => app.to_string(), "direction" => direction, "reason" => reason)
        .increment(1);
}

pub fn violation(app: &str, reason: &'static str) {
    counter!(VIOLATIONS, "app" => app.to_string(), "reason" => reason).increment(1);
}

/// One app's figures at a tick.
pub struct AppFigures<'a> {
    pub app: &'a str,
    pub starting: usize,
    pub ready: usize,
    pub draining: usize,
    pub desired: usize,
    pub min: usize,
    pub max: usize,
    pub upper: usize,
    pub bound: &'a str,
    pub crash_looping: usize,
    pub utilization: Option<f64>,
    pub saturation: f64,
    pub setpoint: f64,
    pub queue: usize,
}

pub fn app_tick(f: &AppFigures<'_>) {
    let app = f.app.to_string();
    for (state, n) in [
        ("starting", f.starting),
        ("ready", f.ready),
        ("draining", f.draining),
    ] {
        gauge!(WORKERS, "app" => app.clone(), "state" => state).set(n as f64);
    }
    gauge!(DESIRED, "app" => app.clone()).set(f.desired as f64);
    gauge!(MIN, "app" => app.clone()).set(f.min as f64);
    gauge!(MAX, "app" => app.clone()).set(f.max as f64);
    gauge!(UPPER_BOUND, "app" => app.clone()).set(f.upper as f64);
    for b in BOUNDS {
        gauge!(BOUND_BINDING, "app" => app.clone(), "bound" => b)
            .set(f64::from(u8::from(b == f.bound)));
    }
    gauge!(CRASH_LOOPING, "app" => app.clone()).set(f.crash_looping as f64);
    if let Some(u) = f.utilization {
        gauge!(UTILIZATION, "app" => app.clone()).set(u);
    }
    gauge!(SATURATION, "app" => app.clone()).set(f.saturation);
    gauge!(SETPOINT, "app" => app.clone()).set(f.setpoint);
    gauge!(QUEUE, "app" => app).set(f.queue as f64);
}

pub fn listener_tick(app: &str, listener: usize, backlog: u32) {
    gauge!(BACKLOG, "app" => app.to_string(), "listener" => listener.to_string())
        .set(f64::from(backlog));
}

pub fn worker_tick(app: &str, slot: u32, busy: Option<f64>, rss: u64, lag: Option<Duration>) {
    if let Some(b) = busy {
        gauge!(WORKER_UTILIZATION, "app" => app.to_string(), "slot" => slot.to_string()).set(b);
    }
    gauge!(WORKER_RSS, "app" => app.to_string(), "slot" => slot.to_string()).set(rss as f64);
    if let Some(l) = lag {
        histogram!(LAG, "app" => app.to_string()).record(l.as_secs_f64());
    }
}

/// The master's own figures and the tick's cost.
pub fn master_tick(tick: Duration, cpu_seconds: f64, rss: u64, dropped_lines: u64) {
    histogram!(TICK).record(tick.as_secs_f64());
    gauge!(MASTER_CPU).set(cpu_seconds);
    gauge!(MASTER_RSS).set(rss as f64);
    counter!(OUTPUT_DROPPED).absolute(dropped_lines);
}

pub fn registry_tick(connected: bool) {
    gauge!(REGISTRY_UP).set(f64::from(u8::from(connected)));
}

pub fn host_tick(cpus: f64, cpu_busy: Option<f64>, mem_headroom: Option<u64>) {
    gauge!(HOST_CPUS).set(cpus);
    if let Some(b) = cpu_busy {
        gauge!(HOST_CPU_BUSY).set(b);
    }
    if let Some(m) = mem_headroom {
        gauge!(HOST_MEM_HEADROOM).set(m as f64);
    }
}

/// Saturation of a pool for a cluster autoscaler: 0 unless the pool cannot grow here (it
/// is held at its upper bound — the configured `max`, CPUs × factor or memory headroom —
/// or is a fixed pool); then how far utilization runs past the setpoint, scaled so that 1
/// means fully busy. Pure.
pub fn saturation(at_machine_bound: bool, utilization: Option<f64>, setpoint: f64) -> f64 {
    match utilization {
        Some(u) if at_machine_bound && u > setpoint && setpoint < 1.0 => {
            ((u - setpoint) / (1.0 - setpoint)).clamp(0.0, 1.0)
        }
        _ => 0.0,
    }
}

pub fn report_bind_failure(addr: &str, e: &io::Error) {
    warn!("metrics: cannot listen on {addr}: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_is_zero_until_pinned_and_hot() {
        assert_eq!(saturation(false, Some(0.99), 0.6), 0.0);
        assert_eq!(saturation(true, Some(0.5), 0.6), 0.0);
        assert_eq!(saturation(true, None, 0.6), 0.0);
        assert!((saturation(true, Some(0.8), 0.6) - 0.5).abs() < 1e-9);
        assert_eq!(saturation(true, Some(1.0), 0.6), 1.0);
    }

    #[test]
    fn names_follow_the_convention() {
        let all = [
            WORKERS,
            DESIRED,
            MIN,
            MAX,
            UPPER_BOUND,
            BOUND_BINDING,
            CRASH_LOOPING,
            RESTARTS,
            EXITS,
            UTILIZATION,
            WORKER_UTILIZATION,
            SATURATION,
            LAG,
            WORKER_RSS,
            HANDLES,
            QUEUE,
            BACKLOG,
            SCALE_EVENTS,
            TICK,
            VIOLATIONS,
            OUTPUT_DROPPED,
            MASTER_CPU,
            MASTER_RSS,
            HOST_CPUS,
            SETPOINT,
            REGISTRY_UP,
            HOST_CPU_BUSY,
            HOST_MEM_HEADROOM,
        ];
        for n in all {
            assert!(n.starts_with("processes_"), "{n}");
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{n}");
            if n.contains("total") {
                assert!(n.ends_with("_total"), "{n}");
            }
        }
    }
}
