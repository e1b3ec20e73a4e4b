//! Which worker gets the next accepted connection.
//!
//! Pure: a function of the candidates and the previous choice. The rule shared by every
//! mode is Node's: at most one connection in flight per worker (sent, not yet accepted),
//! so a worker whose event loop is stuck stops receiving after the first connection it
//! cannot take, and the master's queue — not the stuck worker — holds the rest.

use crate::config::Dispatch;
use crate::pool::WorkerId;

/// A worker that could take a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub worker: WorkerId,
    /// Connections sent and not yet acknowledged (0 or 1).
    pub in_flight: u32,
    /// Connections it reported open, if it reports them.
    pub open: u32,
    /// Its latest busy fraction.
    pub busy: f64,
}

/// Picks a worker for one connection, or `None` if every candidate has one in flight.
/// `last` is the previous pick for this listener (round-robin continues after it).
pub fn choose(
    mode: Dispatch,
    candidates: &[Candidate],
    last: Option<WorkerId>,
) -> Option<WorkerId> {
    let free = candidates.iter().filter(|c| c.in_flight == 0);
    match mode {
        Dispatch::RoundRobin | Dispatch::Shared => {
            let mut after = None;
            let mut first = None;
            for c in free {
                if first.is_none_or(|f: WorkerId| c.worker < f) {
                    first = Some(c.worker);
                }
                if last.is_none_or(|l| c.worker > l) && after.is_none_or(|a: WorkerId| c.worker < a)
                {
                    after = Some(c.worker);
                }
            }
            after.or(first)
        }
        Dispatch::LeastLoaded => free
            .min_by(|a, b| {
                (a.open, ordered(a.busy), a.worker).cmp(&(b.open, ordered(b.busy), b.worker))
            })
            .map(|c| c.worker),
    }
}

/// Busy fractions compared in thousandths, so near-equal loads tie and fall through to
/// the next key.
fn ordered(busy: f64) -> i64 {
    (busy.clamp(0.0, 1e6) * 1000.0).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(id: u64, in_flight: u32, open: u32, busy: f64) -> Candidate {
        Candidate {
            worker: WorkerId(id),
            in_flight,
            open,
            busy,
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_workers_with_one_in_flight() {
        let cands = [c(1, 0, 0, 0.0), c(2, 0, 0, 0.0), c(3, 0, 0, 0.0)];
        let mut last = None;
        let mut order = vec![];
        for _ in 0..6 {
            last = choose(Dispatch::RoundRobin, &cands, last);
            order.push(last.unwrap().0);
        }
        assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
        let busy = [c(1, 0, 0, 0.0), c(2, 1, 0, 0.0), c(3, 0, 0, 0.0)];
        assert_eq!(
            choose(Dispatch::RoundRobin, &busy, Some(WorkerId(1))),
            Some(WorkerId(3))
        );
        let all_busy = [c(1, 1, 0, 0.0), c(2, 1, 0, 0.0)];
        assert_eq!(choose(Dispatch::RoundRobin, &all_busy, None), None);
    }

    #[test]
    fn least_loaded_prefers_fewer_open_then_less_busy() {
        let cands = [
            c(1, 0, 5, 0.1),
            c(2, 0, 2, 0.9),
            c(3, 0, 2, 0.2),
            c(4, 1, 0, 0.0),
        ];
        assert_eq!(
            choose(Dispatch::LeastLoaded, &cands, None),
            Some(WorkerId(3))
        );
    }

    proptest! {
        #[test]
        fn never_picks_a_worker_with_a_connection_in_flight(
            flights in proptest::collection::vec(0u32..2, 0..20),
            last in proptest::option::of(0u64..25),
            least in any::<bool>(),
        ) {
            let cands: Vec<_> = flights.iter().enumerate().map(|(i, &f)| c(i as u64, f, (i % 3) as u32, 0.5)).collect();
            let mode = if least { Dispatch::LeastLoaded } else { Dispatch::RoundRobin };
            let got = choose(mode, &cands, last.map(WorkerId));
            match got {
                Some(w) => prop_assert_eq!(cands.iter().find(|c| c.worker == w).unwrap().in_flight, 0),
                None => prop_assert!(cands.iter().all(|c| c.in_flight > 0)),
            }
        }

        #[test]
        fn round_robin_is_even_over_many_picks(n in 1u64..12, rounds in 1usize..20) {
            let cands: Vec<_> = (0..n).map(|i| c(i, 0, 0, 0.0)).collect();
            let mut counts = vec![0usize; n as usize];
            let mut last = None;
            for _ in 0..(rounds * n as usize) {
                last = choose(Dispatch::RoundRobin, &cands, last);
                counts[last.unwrap().0 as usize] += 1;
            }
            prop_assert!(counts.iter().all(|&k| k == rounds));
        }
    }
}
