//! Replays the standard traces (`sim::scenarios`: step, ramp, spike, sine, slow leak; 20
//! simulated minutes each, 8 cores, pool 1..=16, 2 workers at the start) against four
//! policies and prints one markdown table:
//!
//! * `controller`: this crate's controller with `Params::default()`;
//! * `k8s-hpa`: the Kubernetes HPA rule at the same target (0.6), 15 s sync period, 10 %
//!   tolerance, the real 5-minute scale-down stabilization window (the traces are long
//!   enough that it plays out, so it is not scaled down);
//! * `uwsgi-busyness`: uWSGI's busyness cheaper algorithm with its defaults;
//! * `static`: one worker per core, as PM2's `-i max`.
//!
//! All policies see the same observation; its utilization is the wall-clock busy fraction
//! (what uWSGI's busyness and Node's event-loop utilization measure). A real HPA would scale
//! on CPU time instead.
//!
//! Columns: request-weighted p99 of the per-tick latency proxy; seconds with a backlog or
//! utilization above 0.95; worker-seconds (Σ size × 1 s, the cost); ticks where the size
//! changed; the largest size; seconds with the memory in use above the machine's (an OOM
//! kill in real life).
//!
//! `cargo bench --bench controller_compare` — a plain `main`, no harness; runs in
//! milliseconds.

use std::time::Instant;

use processes::controller::Params;
use processes::controller::sim::{
    ControllerPolicy, Hpa, Policy, StaticPool, UwsgiBusyness, run, scenarios,
};

fn main() {
    // The simulator never reads the clock; this is only the origin of its paused time.
    let origin = Instant::now();
    let params = Params::default();
    println!(
        "| trace | policy | p99 latency (ms) | saturated s | worker-seconds | scale changes | max size | OOM s |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for scenario in scenarios() {
        let cores = scenario.config.machine.cores as usize;
        let mut policies: Vec<Box<dyn Policy>> = vec![
            Box::new(ControllerPolicy::new(params.clone())),
            Box::new(Hpa::new(params.setpoint)),
            Box::new(UwsgiBusyness::default()),
            Box::new(StaticPool(cores)),
        ];
        for policy in &mut policies {
            let r = run(&scenario, policy.as_mut(), origin);
            let s = &r.summary;
            println!(
                "| {} | {} | {:.0} | {} | {:.0} | {} | {} | {} |",
                scenario.name,
                policy.name(),
                s.p99_latency.as_secs_f64() * 1000.0,
                s.saturated_secs,
                s.worker_seconds,
                s.changes,
                s.max_size,
                s.oom_ticks,
            );
        }
    }
}
