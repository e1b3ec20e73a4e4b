//! Replays the standard traces (step, ramp, spike, sine, slow leak) through the simulator in
//! paused time and holds the controller to numbers: settling time, overshoot, worker-seconds
//! against an oracle, saturation, and the CPU and memory bounds. Each check is a function
//! returning `Err` with the numbers when the bar is missed, so the last tests can show that
//! a broken controller (no integral gain, no lag and backlog signals, no CPU bound) misses
//! at least one bar: the checks can fail. (Without the floor or the down window the
//! controller flaps; `controller_props.rs` shows that.)

use std::time::Instant;

use processes::controller::sim::{ControllerPolicy, Run, Scenario, run, scenarios};
use processes::controller::{Bound, Decision, Params};

fn scenario(name: &str) -> Scenario {
    scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("standard scenario")
}

fn replay(s: &Scenario, params: &Params) -> (Run, Vec<Decision>) {
    let mut policy = ControllerPolicy::new(params.clone());
    let r = run(s, &mut policy, Instant::now());
    (r, policy.decisions)
}

/// The sizes the controller may rest at for a load `l` (busy-worker equivalents): no worker
/// above the deadband, and not so many that one fewer would still sit at or below it.
fn band(l: f64, p: &Params) -> (usize, usize) {
    let top = p.setpoint * (1.0 + p.deadband);
    let lo = (l / top).ceil().max(1.0) as usize;
    let hi = ((l / (p.setpoint / (1.0 + p.deadband))).floor() as usize).max(lo);
    (lo, hi)
}

/// Ticks after `from` until the size enters `[lo, hi]` and stays there until `to`.
fn settling(r: &Run, from: u32, to: u32, (lo, hi): (usize, usize)) -> Option<u32> {
    let sizes: Vec<usize> = r.ticks[from as usize..to as usize]
        .iter()
        .map(|t| t.size)
        .collect();
    let last_out = sizes.iter().rposition(|s| !(lo..=hi).contains(s));
    match last_out {
        None => Some(0),
        Some(i) if i + 1 < sizes.len() => Some(i as u32 + 1),
        Some(_) => None,
    }
}

fn max_size(r: &Run, from: u32, to: u32) -> usize {
    r.ticks[from as usize..to as usize]
        .iter()
        .map(|t| t.size)
        .max()
        .unwrap_or(0)
}

/// Worker-seconds of a clairvoyant pool that always has exactly the lowest size in band for
/// the noiseless load.
fn oracle_worker_seconds(s: &Scenario, p: &Params) -> f64 {
    (0..s.ticks)
        .map(|t| {
            let (lo, _) = band(s.shape.load(t), p);
            lo.clamp(s.config.min, s.config.max) as f64
        })
        .sum()
}

/// Bounds every scenario must keep: never above the CPU bound or the memory headroom,
/// never outside `[min, upper]`, and no worker spawned that did not fit.
fn check_bounds(s: &Scenario, r: &Run, ds: &[Decision], p: &Params) -> Result<(), String> {
    let cpu_cap = (p.cpu_factor * s.config.machine.cores).ceil() as usize;
    for (t, d) in ds.iter().enumerate() {
        if d.desired < s.config.min || d.desired > d.upper || d.desired > cpu_cap {
            return Err(format!(
                "t={t}: {d} outside [{}, {}]",
                s.config.min, d.upper
            ));
        }
    }
    if r.summary.memory_overcommits > 0 || r.summary.oom_ticks > 0 {
        return Err(format!("memory: {:?}", r.summary));
    }
    Ok(())
}

fn check(cond: bool, what: &str, value: impl std::fmt::Debug) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("{what}: {value:?}"))
    }
}

/// Load 1.0 → 4.0 at 300 s → 1.0 at 900 s.
fn check_step(p: &Params) -> Result<(), String> {
    let s = scenario("step");
    let (r, ds) = replay(&s, p);
    check_bounds(&s, &r, &ds, p)?;
    let up = band(4.0, p);
    let settle_up = settling(&r, 300, 900, up);
    check(
        settle_up.is_some_and(|t| t <= 50),
        "settling after step up",
        settle_up,
    )?;
    let over = max_size(&r, 300, 900).saturating_sub(up.1);
    check(over <= 1, "overshoot after step up", over)?;
    let settle_down = settling(&r, 900, 1200, band(1.0, p));
    check(
        settle_down.is_some_and(|t| t <= 75),
        "settling after step down",
        settle_down,
    )?;
    check(
        r.summary.saturated_secs <= 10,
        "saturated seconds",
        r.summary.saturated_secs,
    )?;
    let ratio = r.summary.worker_seconds / oracle_worker_seconds(&s, p);
    check(ratio <= 1.12, "worker-seconds over oracle", ratio)?;
    check(r.summary.changes <= 10, "scale changes", r.summary.changes)
}

/// Load 0.5 → 4.5 over 600 s, held, then back.
fn check_ramp(p: &Params) -> Result<(), String> {
    let s = scenario("ramp");
    let (r, ds) = replay(&s, p);
    check_bounds(&s, &r, &ds, p)?;
    check(
        r.summary.saturated_secs == 0,
        "saturated seconds",
        r.summary.saturated_secs,
    )?;
    // Following the ramp: never more than one worker short of the band.
    let behind = r
        .ticks
        .iter()
        .filter(|t| t.size + 1 < band(s.shape.load(t.t), p).0)
        .count();
    check(
        behind == 0,
        "ticks more than one worker behind the ramp",
        behind,
    )?;
    let hot = r
        .ticks
        .iter()
        .filter(|t| t.utilization.is_some_and(|u| u > 0.75))
        .count();
    check(hot <= 5, "ticks above 0.75 utilization", hot)?;
    let settle = settling(&r, 600, 780, band(4.5, p));
    check(
        settle.is_some_and(|t| t <= 30),
        "settling at the top",
        settle,
    )?;
    let ratio = r.summary.worker_seconds / oracle_worker_seconds(&s, p);
    check(ratio <= 1.15, "worker-seconds over oracle", ratio)?;
    check(r.summary.changes <= 16, "scale changes", r.summary.changes)
}

/// One minute at 10.0 on 8 cores.
fn check_spike(p: &Params) -> Result<(), String> {
    let s = scenario("spike");
    let (r, ds) = replay(&s, p);
    check_bounds(&s, &r, &ds, p)?;
    // The CPU bound holds and binds: more workers than cores would not serve more.
    check(
        max_size(&r, 0, s.ticks) == 8,
        "max size",
        max_size(&r, 0, s.ticks),
    )?;
    let reached = r.ticks.iter().position(|t| t.t >= 300 && t.size == 8);
    check(
        reached.is_some_and(|t| t <= 303),
        "tick the pool reached 8",
        reached,
    )?;
    check(
        r.summary.saturated_secs <= 90,
        "saturated seconds",
        r.summary.saturated_secs,
    )?;
    // After the backlog drains the pool goes back to its base size.
    let drained = r
        .ticks
        .iter()
        .position(|t| t.t > 360 && t.backlog == 0)
        .expect("backlog drains") as u32;
    let settle = settling(&r, drained, s.ticks, band(1.0, p));
    check(
        settle.is_some_and(|t| t <= 75),
        "settling after the spike",
        settle,
    )?;
    check(r.summary.changes <= 10, "scale changes", r.summary.changes)
}

/// 2.5 ± 1.5, period 5 min, four periods.
fn check_sine(p: &Params) -> Result<(), String> {
    let s = scenario("sine");
    let (r, ds) = replay(&s, p);
    check_bounds(&s, &r, &ds, p)?;
    check(
        r.summary.saturated_secs <= 8,
        "saturated seconds",
        r.summary.saturated_secs,
    )?;
    check(
        r.summary.p99_latency.as_millis() <= 60,
        "p99 latency",
        r.summary.p99_latency,
    )?;
    // Following a 2 ↔ 7 swing takes about ten changes a period; more is flapping.
    check(r.summary.changes <= 48, "scale changes", r.summary.changes)?;
    let ratio = r.summary.worker_seconds / oracle_worker_seconds(&s, p);
    check(ratio <= 1.25, "worker-seconds over oracle", ratio)
}

/// Load rising while every worker leaks.
fn check_slow_leak(p: &Params) -> Result<(), String> {
    let s = scenario("slow_leak");
    let (r, ds) = replay(&s, p);
    check_bounds(&s, &r, &ds, p)?;
    let memory_bound = ds.iter().filter(|d| d.bound == Bound::Memory).count();
    check(
        memory_bound > 0,
        "ticks where the memory bound binds",
        memory_bound,
    )?;
    check(
        r.summary.saturated_secs == 0,
        "saturated seconds",
        r.summary.saturated_secs,
    )?;
    check(r.summary.changes <= 8, "scale changes", r.summary.changes)
}

fn check_all(p: &Params) -> Vec<Result<(), String>> {
    vec![
        check_step(p),
        check_ramp(p),
        check_spike(p),
        check_sine(p),
        check_slow_leak(p),
    ]
}

#[test]
fn step() {
    check_step(&Params::default()).unwrap();
}

#[test]
fn ramp() {
    check_ramp(&Params::default()).unwrap();
}

#[test]
fn spike() {
    check_spike(&Params::default()).unwrap();
}

#[test]
fn sine() {
    check_sine(&Params::default()).unwrap();
}

#[test]
fn slow_leak() {
    check_slow_leak(&Params::default()).unwrap();
}

#[test]
fn host_cpu_saturation_stops_growth_at_the_core_count() {
    // Two workers per core allowed, but the spike saturates all 8 cores: the pool stops at
    // 8, where uWSGI's rule would go on to 16.
    let p = Params {
        cpu_factor: 2.0,
        ..Params::default()
    };
    let s = scenario("spike");
    let (r, ds) = replay(&s, &p);
    assert!(ds.iter().any(|d| d.bound == Bound::HostCpuSaturated));
    assert!(
        max_size(&r, 0, s.ticks) <= 9,
        "{}",
        max_size(&r, 0, s.ticks)
    );
}

fn failures(p: &Params) -> Vec<String> {
    check_all(p).into_iter().filter_map(Result::err).collect()
}

#[test]
fn the_checks_fail_without_integral_gain() {
    let broken = Params {
        ki: 0.0,
        ..Params::default()
    };
    let failed = failures(&broken);
    assert!(failed.len() >= 3, "{failed:?}");
}

#[test]
fn the_checks_fail_without_lag_and_backlog() {
    // Utilization alone reads 1.0 however far behind a saturated pool is: the spike and the
    // step are answered late.
    let hour = std::time::Duration::from_secs(3600);
    let broken = Params {
        lag_p99_threshold: hour,
        backlog_threshold: u64::MAX,
        backlog_persist: hour,
        ..Params::default()
    };
    let failed = failures(&broken);
    assert!(failed.iter().any(|f| f.contains("reached 8")), "{failed:?}");
}

#[test]
fn the_checks_fail_without_the_cpu_bounds() {
    let broken = Params {
        cpu_factor: 100.0,
        host_cpu_saturated: f64::INFINITY,
        ..Params::default()
    };
    let failed = failures(&broken);
    assert!(failed.iter().any(|f| f.contains("max size")), "{failed:?}");
}
