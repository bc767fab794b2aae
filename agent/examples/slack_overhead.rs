//! Benchmark: what choosing by slack adds to a request's way into a worker's queue.
//!
//! Routing by slack asks the picked worker's queue for an offer (`DeadlineQueue::offer`: one
//! lock, the count of requests due earlier) before queueing; only when the pick would refuse
//! are the stage's other workers asked too. Measured against queueing alone, on queues holding
//! `DEPTH` requests with a fresh estimate, interleaved: in each round a block of requests goes
//! each way (the order alternating), the round's ratio is the per-request time with the offer
//! over without; the report gives the median ratio, its spread (p10–p90), and the time of a
//! refused pick's full choice among four workers.
//!
//! `cargo run --release -p tidal-agent --example slack_overhead -- [ROUNDS] [BLOCK]`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tidal_agent::queue::DeadlineQueue;
use tidal_common::slack::{choose, Offer};
use tidal_common::tensor::NamedTensor;

const DEPTH: usize = 16;
const WORKERS: usize = 4;

struct Queued {
    queue: DeadlineQueue,
    /// The callers' ends, kept so that the queued requests stay live.
    waiting:
        VecDeque<tokio::sync::oneshot::Receiver<Result<tidal_agent::queue::Served, tidal_agent::error::ServeError>>>,
}

impl Queued {
    fn new() -> Self {
        let queue = DeadlineQueue::new(1024);
        // A batch of 4 took 8 ms just now: the estimate is fresh.
        queue.record_batch(4, Duration::from_millis(8), Instant::now());
        let mut q = Self { queue, waiting: VecDeque::new() };
        for _ in 0..DEPTH {
            q.push(Instant::now() + Duration::from_secs(60));
        }
        q
    }

    fn push(&mut self, deadline: Instant) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let input = vec![NamedTensor::f32("input", vec![1, 4], &[0.0, 1.0, 2.0, 3.0])];
        if self.queue.push(deadline, vec![1, 4], input, tx).is_ok() {
            self.waiting.push_back(rx);
        }
    }

    /// One request in and the oldest out, so the depth stays the same.
    fn cycle(&mut self, offer_first: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        if offer_first {
            std::hint::black_box(self.queue.offer(deadline, 76.0));
        }
        self.push(deadline);
        drop(self.queue.pop_batch(1, Instant::now()));
        self.waiting.pop_front();
    }
}

fn per_request(q: &mut Queued, offer_first: bool, block: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..block {
        q.cycle(offer_first);
    }
    start.elapsed().as_secs_f64() * 1e9 / block as f64
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let block: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let mut q = Queued::new();
    let (mut ratios, mut plain_ns, mut offered_ns) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = per_request(&mut q, false, block);
            (a, per_request(&mut q, true, block))
        } else {
            let b = per_request(&mut q, true, block);
            (per_request(&mut q, false, block), b)
        };
        ratios.push(b / a);
        plain_ns.push(a);
        offered_ns.push(b);
    }
    // A refused pick: every worker of the stage asked, then the choice.
    let others: Vec<Queued> = (0..WORKERS).map(|_| Queued::new()).collect();
    let mut refused_ns = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..block {
            let deadline = Instant::now() + Duration::from_millis(1);
            let offers: Vec<Offer> = others.iter().map(|w| w.queue.offer(deadline, 70.0)).collect();
            std::hint::black_box(choose(0, &offers));
        }
        refused_ns.push(start.elapsed().as_secs_f64() * 1e9 / block as f64);
    }
    for v in [&mut ratios, &mut plain_ns, &mut offered_ns, &mut refused_ns] {
        v.sort_by(f64::total_cmp);
    }
    println!("{rounds} rounds of {block} requests each way, queues {DEPTH} deep, interleaved");
    println!(
        "queueing alone: median {:.0} ns a request; with the pick's offer first: {:.0} ns",
        quantile(&plain_ns, 0.5),
        quantile(&offered_ns, 0.5)
    );
    println!(
        "ratio with / without the offer: median {:.3} (p10 {:.3}, p90 {:.3})",
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.1),
        quantile(&ratios, 0.9)
    );
    println!(
        "a refused pick, {WORKERS} workers asked and the choice: median {:.0} ns (p10 {:.0}, p90 {:.0})",
        quantile(&refused_ns, 0.5),
        quantile(&refused_ns, 0.1),
        quantile(&refused_ns, 0.9)
    );
}
