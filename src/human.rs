//! Durations as people read them in log lines and status: `850µs`, `12.3ms`, `312ms`,
//! `1.25s`, `42.1s`, `4m12s`, `2h05m`, `3d04h` — not Rust's nanosecond-exact `Debug` form.

use std::time::Duration;

/// A duration with about three significant figures below a minute (no trailing zeros:
/// `10ms`, `1s`), whole units above.
pub fn duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    let s = d.as_secs();
    match s {
        _ if ms < 1.0 => format!("{}µs", d.as_micros()),
        _ if ms < 99.95 => format!("{}ms", trim(format!("{ms:.1}"))),
        _ if ms < 999.5 => format!("{ms:.0}ms"),
        _ if ms < 1000.0 => "1s".to_string(),
        0..10 => format!("{}s", trim(format!("{:.2}", d.as_secs_f64()))),
        10..60 => format!("{}s", trim(format!("{:.1}", d.as_secs_f64()))),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

/// `1.50` → `1.5`, `10.0` → `10`.
fn trim(mut n: String) -> String {
    if n.contains('.') {
        let kept = n.trim_end_matches('0').trim_end_matches('.').len();
        n.truncate(kept);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (Duration::from_micros(850), "850µs"),
            (Duration::from_micros(12_345), "12.3ms"),
            (Duration::from_micros(312_400), "312ms"),
            (Duration::from_millis(1_250), "1.25s"),
            (Duration::from_nanos(6_335_690_293), "6.34s"),
            (Duration::from_millis(42_140), "42.1s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_micros(999_600), "1s"),
            (Duration::from_micros(99_960), "100ms"),
            (Duration::from_secs(252), "4m12s"),
            (Duration::from_secs(2 * 3600 + 5 * 60 + 7), "2h05m"),
            (Duration::from_secs(3 * 86400 + 4 * 3600), "3d04h"),
        ];
        for (d, want) in cases {
            assert_eq!(duration(d), want, "{d:?}");
        }
    }
}
