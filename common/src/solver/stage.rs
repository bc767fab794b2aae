//! Branch and bound over one stage's variants.
//!
//! Variants are visited from the most accurate down, so a branch knows exactly what each
//! chosen variant carries (the most accurate takes all it can). Each variant's shapes are its
//! Pareto-optimal ones sorted by cost. A branch is cut when even sending everything left to
//! the current (most accurate remaining) variant at no extra cost could not beat what was
//! found: the best plan in `Best` mode, or a plan that is also no slower and uses no more
//! cores in `Frontier` mode (which collects, for a pipeline, every stage plan not beaten on
//! latency, cores and value together).

use super::options::Shape;
use super::EPS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Best,
    Frontier,
}

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
    mode: Mode,
    best: Option<Entry>,
    frontier: Vec<Entry>,
    stack: Vec<(Shape, f64)>,
}

impl<'a> StageSearch<'a> {
    pub fn run(input: &'a StageInput<'a>, mode: Mode) -> Vec<Entry> {
        let mut order: Vec<usize> = (0..input.shapes.len()).filter(|&v| !input.shapes[v].is_empty()).collect();
        order.sort_by(|&a, &b| input.accuracy[b].total_cmp(&input.accuracy[a]));
        let mut search = StageSearch { input, order, mode, best: None, frontier: Vec::new(), stack: Vec::new() };
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
        match mode {
            Mode::Best => search.best.into_iter().collect(),
            Mode::Frontier => search.frontier,
        }
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
        let v = self.order[depth];
        let bound = self.value(st.acc_load + st.remaining * self.input.accuracy[v], st.cost, st.lc);
        if self.beaten(&st, bound) {
            return;
        }
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
            // better on cores or latency, which only the frontier cares about.
            if self.mode == Mode::Best && shape.capacity >= st.remaining {
                break;
            }
        }
        self.visit(depth + 1, st);
    }

    fn beaten(&self, st: &State, bound: f64) -> bool {
        match self.mode {
            Mode::Best => self.best.as_ref().is_some_and(|b| bound <= b.value + EPS),
            Mode::Frontier => self
                .frontier
                .iter()
                .any(|f| f.latency <= st.latency + EPS && f.cores <= st.cores && f.value >= bound - EPS),
        }
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
        match self.mode {
            Mode::Best => {
                if self.best.as_ref().is_none_or(|b| entry.value > b.value + EPS) {
                    self.best = Some(entry);
                }
            }
            Mode::Frontier => {
                if self.frontier.iter().any(|f| dominates(f, &entry)) {
                    return;
                }
                self.frontier.retain(|f| !dominates(&entry, f));
                self.frontier.push(entry);
            }
        }
    }
}

/// `a` is no slower, uses no more cores and is worth no less than `b`.
pub(crate) fn dominates(a: &Entry, b: &Entry) -> bool {
    a.latency <= b.latency + EPS && a.cores <= b.cores && a.value >= b.value - EPS
}
