//! Which worker gets the next accepted connection.
//!
//! Pure: a function of the candidates. The rule shared by every mode is Node's: at most
//! one connection in flight per worker (sent, not yet accepted), so a worker whose event
//! loop is stuck stops receiving after the first connection it cannot take, and the
//! master's queue — not the stuck worker — holds the rest.
//!
//! Round-robin picks the free worker that has been given the fewest connections (ties in
//! worker order). With every worker free that is plain rotation; a worker skipped because
//! it was still busy catches up as soon as it is free again, so shares stay even under
//! concurrent load instead of drifting towards whichever worker the scheduler favours. A
//! worker that joins starts level with the least-served of the others (the master sets
//! that), so a fresh worker is not flooded to "catch up".
//!
//! In every mode a worker that has just refused a connection (answered `accepted: false`,
//! or refused its handle until the master gave up) is passed over for [`REFUSAL_PAUSE`]
//! while another worker can take connections: each connection offered to it would only
//! come back after one or more round trips.

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
    /// Connections given to it, counted from the level it joined at.
    pub served: u64,
    /// Its event loop's lag as last seen (a ping still unanswered counts).
    pub lag_ms: u64,
    /// It refused a connection less than [`REFUSAL_PAUSE`] ago.
    pub refusing: bool,
}

/// How long a worker that refused a connection is passed over while others can take them.
/// After that it is offered connections again, so one that got over it (a server at its
/// `maxConnections`, a worker out of fds) is not left idle.
pub const REFUSAL_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Least-loaded treats a worker whose loop lags more than this as stuck and sends it
/// nothing while another can take the connection: its reported figures are stale.
pub const STUCK_LAG_MS: u64 = 250;

/// Picks a worker for one connection, or `None` if every candidate it would use has one in
/// flight.
///
/// Two preferences narrow the candidates first, each only if it leaves someone: under
/// least-loaded, a worker whose loop is not stuck; then a worker that has not just refused a
/// connection. Both count workers with a connection in flight: waiting a moment for a
/// preferred worker beats a connection that hangs in a stuck loop or comes back refused.
/// The stuck preference comes first, because a stuck worker costs the connection more.
pub fn choose(mode: Dispatch, candidates: &[Candidate]) -> Option<WorkerId> {
    let least = mode == Dispatch::LeastLoaded;
    let any_healthy = least && candidates.iter().any(|c| c.lag_ms <= STUCK_LAG_MS);
    let healthy = |c: &&Candidate| !any_healthy || c.lag_ms <= STUCK_LAG_MS;
    let any_taking = candidates.iter().filter(healthy).any(|c| !c.refusing);
    let free = candidates
        .iter()
        .filter(healthy)
        .filter(|c| !any_taking || !c.refusing)
        .filter(|c| c.in_flight == 0);
    if least {
        free.min_by_key(|c| (c.open, ordered(c.busy), c.served, c.worker))
            .map(|c| c.worker)
    } else {
        free.min_by_key(|c| (c.served, c.worker)).map(|c| c.worker)
    }
}

/// Busy fractions compared in hundredths, so near-equal loads tie and fall through to
/// the next key.
fn ordered(busy: f64) -> i64 {
    (busy.clamp(0.0, 1e6) * 100.0).round() as i64
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
            served: 0,
            lag_ms: 0,
            refusing: false,
        }
    }

    /// Runs `n` picks, marking each chosen worker served.
    fn picks(mode: Dispatch, cands: &mut [Candidate], n: usize) -> Vec<u64> {
        let mut out = vec![];
        for _ in 0..n {
            let Some(w) = choose(mode, cands) else { break };
            cands.iter_mut().find(|c| c.worker == w).unwrap().served += 1;
            out.push(w.0);
        }
        out
    }

    #[test]
    fn round_robin_cycles_and_skips_workers_with_one_in_flight() {
        let mut cands = [c(1, 0, 0, 0.0), c(2, 0, 0, 0.0), c(3, 0, 0, 0.0)];
        assert_eq!(
            picks(Dispatch::RoundRobin, &mut cands, 6),
            vec![1, 2, 3, 1, 2, 3]
        );
        cands[1].in_flight = 1;
        assert_eq!(picks(Dispatch::RoundRobin, &mut cands, 4), vec![1, 3, 1, 3]);
        // Worker 2, skipped twice while busy, catches up once free.
        cands[1].in_flight = 0;
        assert_eq!(
            picks(Dispatch::RoundRobin, &mut cands, 5),
            vec![2, 2, 1, 2, 3]
        );
        let all_busy = [c(1, 1, 0, 0.0), c(2, 1, 0, 0.0)];
        assert_eq!(choose(Dispatch::RoundRobin, &all_busy), None);
    }

    #[test]
    fn least_loaded_avoids_a_lagging_worker_whatever_it_last_reported() {
        let mut stuck = c(1, 0, 0, 0.0);
        stuck.lag_ms = 2_000;
        let cands = [stuck, c(2, 0, 5, 0.9)];
        assert_eq!(choose(Dispatch::LeastLoaded, &cands), Some(WorkerId(2)));
        // A healthy worker that is busy right now is waited for.
        let busy = [stuck, c(2, 1, 5, 0.9)];
        assert_eq!(choose(Dispatch::LeastLoaded, &busy), None);
        // All stuck: one of them still gets the connection rather than none being served.
        assert_eq!(
            choose(Dispatch::LeastLoaded, &cands[..1]),
            Some(WorkerId(1))
        );
    }

    #[test]
    fn a_refusing_worker_is_passed_over_while_another_takes_connections() {
        for mode in [Dispatch::RoundRobin, Dispatch::LeastLoaded] {
            let mut refuser = c(1, 0, 0, 0.0);
            refuser.refusing = true;
            let mut cands = [refuser, c(2, 0, 3, 0.9)];
            assert_eq!(picks(mode, &mut cands, 3), vec![2, 2, 2], "{mode:?}");
            // The other is busy: its turn is waited for.
            cands[1].in_flight = 1;
            assert_eq!(choose(mode, &cands), None, "{mode:?}");
            // Every worker refusing: one still gets it, rather than none.
            assert_eq!(choose(mode, &cands[..1]), Some(WorkerId(1)), "{mode:?}");
            cands[1].refusing = true;
            assert_eq!(choose(mode, &cands), Some(WorkerId(1)), "{mode:?}");
        }
    }

    #[test]
    fn a_stuck_worker_and_a_refusing_one_both_free_the_refuser_gets_it() {
        let mut refuser = c(1, 0, 0, 0.0);
        refuser.refusing = true;
        let mut stuck = c(2, 0, 0, 0.0);
        stuck.lag_ms = 2_000;
        assert_eq!(
            choose(Dispatch::LeastLoaded, &[refuser, stuck]),
            Some(WorkerId(1))
        );
        // Round-robin does not look at lag: the worker that takes connections gets it.
        assert_eq!(
            choose(Dispatch::RoundRobin, &[refuser, stuck]),
            Some(WorkerId(2))
        );
    }

    #[test]
    fn least_loaded_prefers_fewer_open_then_less_busy() {
        let cands = [
            c(1, 0, 5, 0.1),
            c(2, 0, 2, 0.9),
            c(3, 0, 2, 0.2),
            c(4, 1, 0, 0.0),
        ];
        assert_eq!(choose(Dispatch::LeastLoaded, &cands), Some(WorkerId(3)));
    }

    proptest! {
        #[test]
        fn never_picks_a_worker_with_a_connection_in_flight(
            flights in proptest::collection::vec(0u32..2, 0..20),
            served in proptest::collection::vec(0u64..50, 20),
            least in any::<bool>(),
        ) {
            let cands: Vec<_> = flights
                .iter()
                .enumerate()
                .map(|(i, &f)| Candidate { served: served[i], ..c(i as u64, f, (i % 3) as u32, 0.5) })
                .collect();
            let mode = if least { Dispatch::LeastLoaded } else { Dispatch::RoundRobin };
            match choose(mode, &cands) {
                Some(w) => prop_assert_eq!(cands.iter().find(|c| c.worker == w).unwrap().in_flight, 0),
                None => prop_assert!(cands.iter().all(|c| c.in_flight > 0)),
            }
        }

        /// Whatever lags and refusals the workers have, when every one is free, one of
        /// them is chosen.
        #[test]
        fn someone_is_chosen_when_everyone_is_free(
            workers in proptest::collection::vec((any::<bool>(), 0u64..1000), 1..10),
            least in any::<bool>(),
        ) {
            let cands: Vec<_> = workers
                .iter()
                .enumerate()
                .map(|(i, &(refusing, lag_ms))| Candidate { refusing, lag_ms, ..c(i as u64, 0, 0, 0.0) })
                .collect();
            let mode = if least { Dispatch::LeastLoaded } else { Dispatch::RoundRobin };
            prop_assert!(choose(mode, &cands).is_some(), "{:?}", cands);
        }

        /// Under random busyness round-robin never widens the gap between the most- and
        /// least-served worker while a least-served one is free to take the connection,
        /// and once everyone is free it levels the shares in exactly as many picks as the
        /// laggards are short.
        #[test]
        fn round_robin_levels_shares_whatever_the_busyness_before(
            n in 2u64..10,
            busy in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 10), 400),
        ) {
            let mut cands: Vec<_> = (0..n).map(|i| c(i, 0, 0, 0.0)).collect();
            let gap = |cands: &[Candidate]| {
                let served = cands.iter().map(|c| c.served);
                served.clone().max().unwrap() - served.min().unwrap()
            };
            for mask in &busy {
                for (i, cand) in cands.iter_mut().enumerate() {
                    cand.in_flight = u32::from(mask[i]);
                }
                let least = cands.iter().map(|c| c.served).min().unwrap();
                let least_free = cands.iter().any(|c| c.served == least && c.in_flight == 0);
                let before = gap(&cands);
                picks(Dispatch::RoundRobin, &mut cands, 1);
                if least_free {
                    prop_assert!(gap(&cands) <= before.max(1), "{cands:?}");
                }
            }
            for cand in &mut cands {
                cand.in_flight = 0;
            }
            let most = cands.iter().map(|c| c.served).max().unwrap();
            let short: u64 = cands.iter().map(|c| most - c.served).sum();
            picks(Dispatch::RoundRobin, &mut cands, short as usize);
            prop_assert_eq!(gap(&cands), 0, "{:?}", cands);
        }
    }
}
