//! Choice by slack: the one rule by which the agent's router and the simulated router bend the
//! plan's mix within the second, between plans.
//!
//! The plan's weights pick a worker for each request of a stage. When that worker would refuse
//! the request (the work queued ahead of it and its own batch would pass its deadline, by
//! [`crate::shed`]'s estimate), the request is offered to the stage's other ready workers: the
//! most accurate that would finish it in time takes it (among equals, the one that would finish
//! it soonest). When none would, it is refused at once with the pick's reason. So at a burst's
//! onset, before the next plan sizes the workers for it, the requests the accurate variant's
//! queue cannot finish in time go to a cheaper variant that can, instead of being shed; while
//! the pick has room, the plan's mix is followed as it is.
//!
//! Only the pick's refusal bends the mix: sending a request to a more accurate worker that has
//! room would take the room the plan gave it for its own share, and its queue would run at the
//! edge of the deadline, where an estimate's error is a violation.

/// What one worker says about a request it is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer {
    /// Of the worker's variant, percent.
    pub accuracy: f64,
    /// Whether it would queue the request (its queue not full, the shedding rule admits it).
    pub admits: bool,
    /// Seconds from now until it would finish the request (from now, not on a clock: each of
    /// an agent's queues keeps its own); `None`: it has no fresh estimate (no batch for a
    /// while: most likely idle).
    pub finish_s: Option<f64>,
}

/// The worker a request goes to: `picked` (the plan's pick) when it admits the request, else
/// the most accurate of `offers` that admits it, the soonest finish first among equals (an
/// unknown finish after known ones); `None` when no worker admits it: it is refused with the
/// pick's reason.
pub fn choose(picked: usize, offers: &[Offer]) -> Option<usize> {
    if offers.get(picked)?.admits {
        return Some(picked);
    }
    let finish = |o: &Offer| o.finish_s.unwrap_or(f64::INFINITY);
    offers
        .iter()
        .enumerate()
        .filter(|(_, o)| o.admits)
        .max_by(|(_, a), (_, b)| a.accuracy.total_cmp(&b.accuracy).then_with(|| finish(b).total_cmp(&finish(a))))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(accuracy: f64, admits: bool, finish_s: Option<f64>) -> Offer {
        Offer { accuracy, admits, finish_s }
    }

    #[test]
    fn the_pick_keeps_a_request_it_admits_even_beside_a_more_accurate_worker_with_room() {
        let offers = [offer(70.0, true, Some(0.1)), offer(76.0, true, Some(0.01))];
        assert_eq!(choose(0, &offers), Some(0));
    }

    #[test]
    fn a_refused_request_goes_to_the_most_accurate_worker_that_admits_it() {
        let offers = [
            offer(78.0, false, Some(0.5)),
            offer(70.0, true, Some(0.02)),
            offer(73.0, true, Some(0.2)),
            offer(80.0, false, Some(0.4)),
        ];
        assert_eq!(choose(0, &offers), Some(2));
    }

    #[test]
    fn among_workers_of_one_accuracy_the_soonest_finish_wins_and_an_unknown_one_comes_last() {
        let offers = [offer(76.0, false, Some(0.5)), offer(73.0, true, None), offer(73.0, true, Some(0.3))];
        assert_eq!(choose(0, &offers), Some(2));
        let offers = [offer(76.0, false, Some(0.5)), offer(73.0, true, None)];
        assert_eq!(choose(0, &offers), Some(1), "an idle worker takes it");
    }

    #[test]
    fn when_no_worker_admits_it_the_request_is_refused() {
        let offers = [offer(76.0, false, Some(0.5)), offer(70.0, false, Some(0.4))];
        assert_eq!(choose(0, &offers), None);
        assert_eq!(choose(3, &offers), None, "a pick out of range is no pick");
    }
}
