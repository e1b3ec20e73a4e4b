//! The restart policy: when a slot whose worker exited unasked is started again, and
//! whether it is crash-looping.
//!
//! Pure: a plain function of the slot's history, the exit, `now` and a jitter draw in
//! `[0, 1)` that the caller supplies, so it is tested without processes or clocks. The
//! invariant: a slot is never forgotten — a crash-looping slot keeps being retried at the
//! longest delay, and one healthy run of `reset_after` clears its history.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{BackoffParams, RestartPolicy};

/// How a worker ended, as far as the restart policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitKind {
    pub fn is_success(&self) -> bool {
        matches!(self, ExitKind::Code(0))
    }
}

/// One slot's restart history.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backoff {
    /// Unasked exits since the last healthy run; the next delay grows with it.
    pub consecutive: u32,
    /// Times of recent unasked exits, oldest first, trimmed to the crash-loop window.
    recent: VecDeque<Instant>,
    pub crash_looping: bool,
}

/// What to do about an exit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Restart {
    /// Start the slot again after `delay`; `attempt` counts from 1.
    After {
        delay: Duration,
        attempt: u32,
        crash_looping: bool,
    },
    /// The policy says this slot stays down.
    No,
}

impl Backoff {
    /// Records an exit the master did not ask for and decides the restart.
    ///
    /// `jitter` is a uniform draw in `[0, 1)`; the delay is scaled into `[0.5, 1.0]` of
    /// its nominal value so that workers that crashed together do not restart in lockstep.
    pub fn on_unasked_exit(
        &mut self,
        params: &BackoffParams,
        policy: RestartPolicy,
        exit: ExitKind,
        uptime: Duration,
        now: Instant,
        jitter: f64,
    ) -> Restart {
        if uptime >= params.reset_after {
            self.consecutive = 0;
            self.recent.clear();
            self.crash_looping = false;
        }
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !exit.is_success(),
            RestartPolicy::Never => false,
        };
        if !restart {
            return Restart::No;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.recent.push_back(now);
        // Only the last `crash_loop_restarts` matter: a long window with a short backoff
        // must not make the list grow with every restart.
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) > params.crash_loop_window
                || self.recent.len() > params.crash_loop_restarts.max(1)
            {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= params.crash_loop_restarts {
            self.crash_looping = true;
        }
        let nominal = if self.crash_looping {
            params.max
        } else {
            nominal_delay(params, self.consecutive)
        };
        let factor = 0.5 + 0.5 * jitter.clamp(0.0, 1.0);
        Restart::After {
            delay: nominal.mul_f64(factor),
            attempt: self.consecutive,
            crash_looping: self.crash_looping,
        }
    }

    /// A worker in this slot has been up for `uptime`: once past `reset_after` the slot
    /// counts as healthy again.
    pub fn on_uptime(&mut self, params: &BackoffParams, uptime: Duration) {
        if uptime >= params.reset_after && (self.consecutive > 0 || self.crash_looping) {
            self.consecutive = 0;
            self.recent.clear();
            self.crash_looping = false;
        }
    }
}

/// `initial × multiplier^(attempt−1)`, capped at `max`.
pub fn nominal_delay(params: &BackoffParams, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(64) as i32;
    let secs = params.initial.as_secs_f64() * params.multiplier.powi(exp);
    if !secs.is_finite() || secs >= params.max.as_secs_f64() {
        params.max
    } else {
        Duration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> BackoffParams {
        BackoffParams::default()
    }

    fn delay(r: Restart) -> Duration {
        match r {
            Restart::After { delay, .. } => delay,
            Restart::No => panic!("expected a restart"),
        }
    }

    #[test]
    fn delays_double_from_100ms_and_cap_at_30s() {
        let p = params();
        let got: Vec<_> = (1..=12).map(|a| nominal_delay(&p, a).as_millis()).collect();
        assert_eq!(
            got,
            vec![
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn jitter_scales_into_half_to_full() {
        let p = params();
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let low = delay(b.on_unasked_exit(
            &p,
            RestartPolicy::Always,
            ExitKind::Code(1),
            Duration::ZERO,
            t0,
            0.0,
        ));
        assert_eq!(low, Duration::from_millis(50));
        let mut b = Backoff::default();
        let high = delay(b.on_unasked_exit(
            &p,
            RestartPolicy::Always,
            ExitKind::Code(1),
            Duration::ZERO,
            t0,
            0.999_999,
        ));
        assert!(high > Duration::from_millis(99) && high <= Duration::from_millis(100));
    }

    #[test]
    fn healthy_uptime_resets_the_delay() {
        let p = params();
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..4 {
            b.on_unasked_exit(
                &p,
                RestartPolicy::Always,
                ExitKind::Signal(9),
                Duration::from_millis(10),
                t0 + Duration::from_secs(i),
                0.999,
            );
        }
        assert_eq!(b.consecutive, 4);
        let r = b.on_unasked_exit(
            &p,
            RestartPolicy::Always,
            ExitKind::Signal(9),
            Duration::from_secs(31),
            t0 + Duration::from_secs(40),
            0.999,
        );
        assert_eq!(b.consecutive, 1);
        assert!(delay(r) <= Duration::from_millis(100));
    }

    #[test]
    fn five_crashes_in_a_minute_is_a_crash_loop_retried_at_max() {
        let p = params();
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let mut last = Restart::No;
        for i in 0..5 {
            last = b.on_unasked_exit(
                &p,
                RestartPolicy::Always,
                ExitKind::Code(1),
                Duration::ZERO,
                t0 + Duration::from_secs(i * 10),
                0.999_999,
            );
        }
        match last {
            Restart::After {
                crash_looping,
                delay,
                attempt,
            } => {
                assert!(crash_looping);
                assert_eq!(attempt, 5);
                assert!(delay > Duration::from_secs(29));
            }
            Restart::No => panic!("a crash-looping slot must still be retried"),
        }
    }

    #[test]
    fn a_long_window_keeps_only_the_crashes_that_count() {
        let p = BackoffParams {
            crash_loop_window: Duration::from_secs(365 * 86400),
            ..params()
        };
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..10_000 {
            b.on_unasked_exit(
                &p,
                RestartPolicy::Always,
                ExitKind::Code(1),
                Duration::ZERO,
                t0 + Duration::from_millis(i),
                0.5,
            );
        }
        assert!(b.crash_looping);
        assert_eq!(b.recent.len(), p.crash_loop_restarts);
    }

    #[test]
    fn crashes_spread_wider_than_the_window_are_not_a_loop() {
        let p = params();
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..10 {
            b.on_unasked_exit(
                &p,
                RestartPolicy::Always,
                ExitKind::Code(1),
                Duration::from_secs(20),
                t0 + Duration::from_secs(i * 20),
                0.5,
            );
        }
        assert!(!b.crash_looping);
    }

    #[test]
    fn policies() {
        let p = params();
        let t0 = Instant::now();
        let ok = ExitKind::Code(0);
        let fail = ExitKind::Code(3);
        assert_eq!(
            Backoff::default().on_unasked_exit(
                &p,
                RestartPolicy::Never,
                fail,
                Duration::ZERO,
                t0,
                0.5
            ),
            Restart::No
        );
        assert_eq!(
            Backoff::default().on_unasked_exit(
                &p,
                RestartPolicy::OnFailure,
                ok,
                Duration::ZERO,
                t0,
                0.5
            ),
            Restart::No
        );
        assert!(matches!(
            Backoff::default().on_unasked_exit(
                &p,
                RestartPolicy::OnFailure,
                ExitKind::Signal(11),
                Duration::ZERO,
                t0,
                0.5
            ),
            Restart::After { .. }
        ));
        assert!(matches!(
            Backoff::default().on_unasked_exit(
                &p,
                RestartPolicy::Always,
                ok,
                Duration::ZERO,
                t0,
                0.5
            ),
            Restart::After { .. }
        ));
    }

    proptest! {
        #[test]
        fn delay_is_always_within_half_and_full_of_the_cap(
            attempts in 1u32..200, jitter in 0.0f64..1.0, mult in 1.0f64..10.0,
        ) {
            let p = BackoffParams { multiplier: mult, ..params() };
            let t0 = Instant::now();
            let mut b = Backoff::default();
            let mut prev_nominal = Duration::ZERO;
            for i in 0..attempts {
                let r = b.on_unasked_exit(&p, RestartPolicy::Always, ExitKind::Code(1), Duration::ZERO, t0 + Duration::from_secs(u64::from(i) * 100), jitter);
                let d = delay(r);
                prop_assert!(d <= p.max);
                prop_assert!(d >= p.initial / 2);
                let n = nominal_delay(&p, b.consecutive);
                prop_assert!(n >= prev_nominal, "nominal delays never shrink between resets");
                prev_nominal = n;
            }
        }
    }
}
