//! Branch and bound over one stage's variants.
//!
//! Variants are visited from the most accurate down, so a branch knows exactly what each
//! chosen variant carries (the most accurate takes all it can). Each variant's shapes are its
//! Pareto-optimal ones sorted by cost. A branch is cut when the cores left cannot carry the
//! rest of the load, or when even the rest carried at the best gain per unit of load any
//! remaining variant offers (its accuracy's worth less its least cost per unit) could not beat
//! what was found. (A pipeline's frontier of stage plans is a series of such searches under
//! latency and core caps, `pipeline::frontier`.)

use super::options::Shape;
use super::EPS;

/// A complete stage plan.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub latency: f64,
    pub cores: u32,
    pub value: f64,
    /// Σ share·accuracy.
    pub acc_load: f64,
    /// Largest load cost among the chosen variants.
    pub lc: f64,
    pub batch: u32,
    pub picks: Vec<(Shape, f64)>,
}

/// What the search needs to know about one stage.
#[derive(Clone)]
pub(crate) struct StageInput<'a> {
    /// Per variant, Pareto-optimal shapes sorted by cost.
    pub shapes: &'a [Vec<Shape>],
    pub accuracy: Vec<f64>,
    pub load_cost: Vec<f64>,
    pub load: f64,
    /// α / (100 · stages · load): the value of one unit of share·accuracy.
    pub acc_scale: f64,
    /// γ / stages.
    pub lc_scale: f64,
    pub budget: u32,
    pub latency_limit: f64,
    pub max_variants: usize,
}

#[derive(Debug, Clone, Copy)]
struct State {
    remaining: f64,
    cores: u32,
    cost: f64,
    acc_load: f64,
    lc: f64,
    latency: f64,
    batch: u32,
    chosen: usize,
}

pub(crate) struct StageSearch<'a> {
    input: &'a StageInput<'a>,
    order: Vec<usize>,
    /// Over the variants from each depth of `order` on: the most a unit of load can add to
    /// the value (its accuracy's worth less the least any shape costs per unit it carries).
    gain_from: Vec<f64>,
    /// Likewise: the most load one core carries.
    per_core_from: Vec<f64>,
    best: Option<Entry>,
    stack: Vec<(Shape, f64)>,
}

impl<'a> StageSearch<'a> {
    /// The best plan carrying the stage's load within its budget and latency limit.
    pub fn run(input: &'a StageInput<'a>) -> Option<Entry> {
        let mut order: Vec<usize> = (0..input.shapes.len()).filter(|&v| !input.shapes[v].is_empty()).collect();
        order.sort_by(|&a, &b| input.accuracy[b].total_cmp(&input.accuracy[a]));
        let usable = |s: &&Shape| s.cores <= input.budget && s.point.latency_bound_ms <= input.latency_limit;
        let mut gain_from = vec![f64::NEG_INFINITY; order.len() + 1];
        let mut per_core_from = vec![0.0_f64; order.len() + 1];
        for (d, &v) in order.iter().enumerate().rev() {
            let shapes = || input.shapes[v].iter().filter(usable);
            let least_cost = shapes().map(|s| s.cost / s.capacity).fold(f64::INFINITY, f64::min);
            let most_per_core = shapes().map(|s| s.capacity / s.cores as f64).fold(0.0, f64::max);
            gain_from[d] = gain_from[d + 1].max(input.acc_scale * input.accuracy[v] - least_cost);
            per_core_from[d] = per_core_from[d + 1].max(most_per_core);
        }
        let mut search = StageSearch { input, order, gain_from, per_core_from, best: None, stack: Vec::new() };
        let start = State {
            remaining: input.load,
            cores: 0,
            cost: 0.0,
            acc_load: 0.0,
            lc: 0.0,
            latency: 0.0,
            batch: 0,
            chosen: 0,
        };
        search.visit(0, start);
        search.best
    }

    fn value(&self, acc_load: f64, cost: f64, lc: f64) -> f64 {
        self.input.acc_scale * acc_load - cost - self.input.lc_scale * lc
    }

    fn visit(&mut self, depth: usize, st: State) {
        if st.remaining <= EPS {
            self.record(&st);
            return;
        }
        if depth == self.order.len() || st.chosen >= self.input.max_variants {
            return; // this branch does not carry the load
        }
        // Whatever carries the rest takes its cores from what is left of the budget and adds
        // at most the best gain per unit of load (the load cost term only grows).
        let free = (self.input.budget - st.cores) as f64;
        if st.remaining > free * self.per_core_from[depth] * (1.0 + 1e-9) + EPS {
            return;
        }
        let bound = self.value(st.acc_load, st.cost, st.lc) + st.remaining * self.gain_from[depth];
        if self.best.as_ref().is_some_and(|b| bound <= b.value + EPS) {
            return;
        }
        let v = self.order[depth];
        let shapes = &self.input.shapes[v];
        for shape in shapes {
            if st.cores + shape.cores > self.input.budget || shape.point.latency_bound_ms > self.input.latency_limit {
                continue;
            }
            let share = shape.capacity.min(st.remaining);
            self.stack.push((*shape, share));
            let next = State {
                remaining: st.remaining - share,
                cores: st.cores + shape.cores,
                cost: st.cost + shape.cost,
                acc_load: st.acc_load + share * self.input.accuracy[v],
                lc: st.lc.max(self.input.load_cost[v]),
                latency: st.latency.max(shape.point.latency_bound_ms),
                batch: st.batch + shape.point.batch,
                chosen: st.chosen + 1,
            };
            self.visit(depth + 1, next);
            self.stack.pop();
            // Later shapes cost more; once one carries all that is left, they can only be
            // better on cores or latency, which the caps already bound.
            if shape.capacity >= st.remaining {
                break;
            }
        }
        self.visit(depth + 1, st);
    }

    fn record(&mut self, st: &State) {
        let entry = Entry {
            latency: st.latency,
            cores: st.cores,
            value: self.value(st.acc_load, st.cost, st.lc),
            acc_load: st.acc_load,
            lc: st.lc,
            batch: st.batch,
            picks: self.stack.clone(),
        };
        if self.best.as_ref().is_none_or(|b| entry.value > b.value + EPS) {
            self.best = Some(entry);
        }
    }
}

/// `a` is no slower, uses no more cores and is worth no less than `b`.
pub(crate) fn dominates(a: &Entry, b: &Entry) -> bool {
    a.latency <= b.latency + EPS && a.cores <= b.cores && a.value >= b.value - EPS
}
