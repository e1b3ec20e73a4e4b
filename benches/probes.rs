//! What an untraced USDT probe costs per fire. Run it twice to compare with the probes
//! compiled out:
//!
//! ```text
//! cargo bench --bench probes
//! cargo bench --bench probes --no-default-features
//! ```
//!
//! Each line is the median of 9 runs of 20 million fires, with the arguments passed through
//! `black_box` so that nothing is folded away.

use std::hint::black_box;
use std::time::Instant;

fn time_per_fire(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut runs: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(black_box(i));
            }
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        })
        .collect();
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[runs.len() / 2]
}

fn main() {
    let n = 20_000_000;
    let enabled = cfg!(feature = "usdt-probes");
    let app = black_box("web");
    let baseline = time_per_fire(n, |i| {
        black_box((app, i as u32, i as i32));
    });
    let sample = time_per_fire(n, |i| {
        processes::probes::sample(app, i as u32, i as i32, 500, 1000, 4096);
    });
    let handle = time_per_fire(n, |i| {
        processes::probes::handle_pass(
            app,
            i as u32,
            i as i32,
            7,
            processes::probes::HandleKind::Connection,
        );
    });
    let spawn = time_per_fire(n, |i| {
        processes::probes::worker_spawn_with(app, i as u32, i as i32, || {
            String::from("node server.js")
        });
    });
    println!(
        "usdt-probes feature: {}",
        if enabled { "on" } else { "off" }
    );
    println!("| probe | ns per fire (median of 9 × {n}) |");
    println!("| --- | --- |");
    println!("| (loop alone) | {baseline:.2} |");
    println!("| sample (ints) | {sample:.2} |");
    println!("| handle-pass (string) | {handle:.2} |");
    println!("| worker-spawn (lazy string) | {spawn:.2} |");
}
