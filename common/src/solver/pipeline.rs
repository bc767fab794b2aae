//! From stage plans to a pipeline plan at one load.
//!
//! One stage: the stage search's best plan. Several: every stage's frontier of plans (latency,
//! cores, value), merged stage by stage; a partial plan that another beats on all three is
//! dropped, as is one that cannot fit the SLO or budget even with the cheapest rest. The
//! objective is a sum over stages, latency and cores add up, so nothing optimal is lost.

use super::options::{Shape, Shapes};
use super::stage::{dominates, Entry, StageInput, StageSearch};
use super::{objective, Choice, Problem, Solution, EPS};

/// Per stage, per variant: Pareto-optimal shapes (see `options::pareto`).
pub(crate) type Filtered = Shapes;

/// The best plan carrying `load`, or `None` when none does.
pub(crate) fn solve_at(
    problem: &Problem,
    shapes: &Filtered,
    max_variants: usize,
    slo: f64,
    load: f64,
) -> Option<Solution> {
    let s = problem.stages.len();
    let needed = trim_replicas(shapes, load);
    let inputs: Vec<StageInput> = (0..s)
        .map(|i| StageInput {
            shapes: &needed[i],
            accuracy: problem.stages[i].variants.iter().map(|v| v.accuracy).collect(),
            load_cost: problem.stages[i].variants.iter().map(|v| v.load_cost).collect(),
            load,
            acc_scale: problem.weights.alpha / (100.0 * s as f64 * load),
            lc_scale: problem.weights.gamma / s as f64,
            budget: problem.core_budget,
            latency_limit: slo,
            max_variants,
        })
        .collect();
    let stage_plans: Vec<Entry> = if s == 1 {
        StageSearch::run(&inputs[0]).into_iter().collect()
    } else {
        // First without the shared budget (each stage still within it): per stage only the
        // plans no faster one beats on value. If the best pipeline fits the budget, it is the
        // optimum; otherwise merge the full (latency, cores, value) frontiers.
        let fronts: Vec<Vec<Entry>> = inputs.iter().map(latency_frontier).collect();
        let relaxed = merge(&fronts, slo, None)?;
        if relaxed.iter().map(|e| e.cores).sum::<u32>() <= problem.core_budget {
            relaxed
        } else {
            let fronts: Vec<Vec<Entry>> = inputs.iter().map(frontier).collect();
            merge(&fronts, slo, Some(problem.core_budget))?
        }
    };
    if stage_plans.len() != s {
        return None;
    }
    Some(solution(problem, &stage_plans, load))
}

/// Drops shapes with more replicas than `load` needs: if n − 1 replicas of a point already
/// carry it all, n replicas carry no more at a higher cost, with the same latency.
fn trim_replicas(shapes: &Filtered, load: f64) -> Filtered {
    shapes
        .iter()
        .map(|stage| {
            stage
                .iter()
                .map(|v| {
                    v.iter().filter(|s| (s.replicas - 1) as f64 * s.point.capacity_rps < load - EPS).copied().collect()
                })
                .collect()
        })
        .collect()
}

/// A stage's best plan for every latency cap: the best plan within the SLO, then the best
/// strictly faster than it, and so on. Values fall along the list; for any cap, the first
/// entry within it is the best plan within it.
fn latency_frontier(input: &StageInput) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut cap = input.latency_limit;
    loop {
        // Within the cap latency no longer counts: keep only the shapes that are cheapest
        // for their capacity and cores, which the search walks much faster.
        let shapes: Vec<Vec<Shape>> = input
            .shapes
            .iter()
            .map(|v| {
                let within = v.iter().filter(|s| s.point.latency_bound_ms <= cap).copied().collect();
                super::options::pareto(within, false)
            })
            .collect();
        let capped = StageInput { shapes: &shapes, latency_limit: cap, ..input.clone() };
        let Some(e) = StageSearch::run(&capped) else { return out };
        cap = e.latency - 1e-6;
        out.push(e);
    }
}

/// A stage's plans that no other beats on latency, cores and value together: the best plan for
/// every latency cap (`latency_frontier`) under every core cap. Under a core cap the best plans
/// are those under any smaller cap down to the most cores they use, so the next cap to try is
/// one below that. Each step is a search for one best plan, which prunes far better than a
/// search for the whole frontier at once.
fn frontier(input: &StageInput) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    let mut cap = input.budget;
    loop {
        let capped = StageInput { budget: cap, ..input.clone() };
        let chain = latency_frontier(&capped);
        let Some(most) = chain.iter().map(|e| e.cores).max() else { return out };
        for e in chain {
            if !out.iter().any(|f| dominates(f, &e)) {
                out.retain(|f| !dominates(&e, f));
                out.push(e);
            }
        }
        if most == 0 {
            return out;
        }
        cap = most - 1;
    }
}

/// A partial plan over the first stages: its totals, its pick in the last stage's frontier and
/// the partial plan over the stages before it (an index into the previous layer).
struct Partial {
    latency: f64,
    cores: u32,
    value: f64,
    parent: u32,
    pick: u32,
}

/// The best combination of one entry per stage within the SLO and, when given, the budget
/// (without it, core counts play no part in dominance).
fn merge(fronts: &[Vec<Entry>], slo: f64, budget: Option<u32>) -> Option<Vec<Entry>> {
    // The least latency and cores the stages after each one still need.
    let n = fronts.len();
    let mut rest_latency = vec![0.0; n + 1];
    let mut rest_cores = vec![0u32; n + 1];
    for i in (0..n).rev() {
        rest_latency[i] = rest_latency[i + 1] + fronts[i].iter().map(|e| e.latency).fold(f64::INFINITY, f64::min);
        rest_cores[i] = rest_cores[i + 1] + fronts[i].iter().map(|e| e.cores).min()?;
    }
    let mut rest_value = vec![0.0; n + 1];
    for i in (0..n).rev() {
        rest_value[i] = rest_value[i + 1] + fronts[i].iter().map(|e| e.value).fold(f64::NEG_INFINITY, f64::max);
    }
    // A partial plan that cannot reach a known complete plan's value even with every later
    // stage at its best is dropped.
    let known = greedy_value(fronts, slo, budget, &rest_latency, &rest_cores);
    let mut layers: Vec<Vec<Partial>> = Vec::with_capacity(n);
    let start = [Partial { latency: 0.0, cores: 0, value: 0.0, parent: 0, pick: 0 }];
    for (i, front) in fronts.iter().enumerate() {
        let before: &[Partial] = layers.last().map_or(&start, |l| l.as_slice());
        let mut next = Vec::with_capacity(before.len() * front.len());
        for (parent, p) in before.iter().enumerate() {
            for (k, e) in front.iter().enumerate() {
                let latency = p.latency + e.latency;
                let cores = p.cores + e.cores;
                let over_budget = budget.is_some_and(|b| cores + rest_cores[i + 1] > b);
                let value = p.value + e.value;
                if latency + rest_latency[i + 1] > slo + EPS || over_budget || value + rest_value[i + 1] < known - EPS {
                    continue;
                }
                next.push(Partial { latency, cores, value, parent: parent as u32, pick: k as u32 });
            }
        }
        let kept = non_dominated(next, budget);
        if kept.is_empty() {
            return None;
        }
        layers.push(kept);
    }
    // Back from the best complete plan, stage by stage.
    let last = layers.last()?;
    let mut at = (0..last.len()).max_by(|&a, &b| last[a].value.total_cmp(&last[b].value))?;
    let mut plan = Vec::with_capacity(n);
    for (i, layer) in layers.iter().enumerate().rev() {
        plan.push(fronts[i][layer[at].pick as usize].clone());
        at = layer[at].parent as usize;
    }
    plan.reverse();
    Some(plan)
}

/// The value of one complete plan within the SLO and budget (each stage the best entry within
/// its fastest latency plus an equal share of the slack the fastest plan leaves), or −∞.
fn greedy_value(fronts: &[Vec<Entry>], slo: f64, budget: Option<u32>, rest_latency: &[f64], rest_cores: &[u32]) -> f64 {
    let share = (slo - rest_latency[0]) / fronts.len() as f64;
    let (mut cores, mut value) = (0u32, 0.0);
    for (i, front) in fronts.iter().enumerate() {
        let fastest = rest_latency[i] - rest_latency[i + 1];
        let fits = |e: &&Entry| {
            e.latency <= fastest + share + EPS && budget.is_none_or(|b| cores + e.cores + rest_cores[i + 1] <= b)
        };
        let Some(e) = front.iter().filter(fits).max_by(|a, b| a.value.total_cmp(&b.value)) else {
            return f64::NEG_INFINITY;
        };
        cores += e.cores;
        value += e.value;
    }
    value
}

/// Drops every partial plan another one beats on latency, cores and value together: in order
/// of latency, a plan survives only if every faster one with no more cores is worth less (a
/// prefix maximum over core counts answers that in log time).
fn non_dominated(mut all: Vec<Partial>, budget: Option<u32>) -> Vec<Partial> {
    all.sort_unstable_by(|a, b| {
        a.latency
            .total_cmp(&b.latency)
            .then(a.cores.cmp(&b.cores))
            .then(b.value.total_cmp(&a.value))
            .then((a.parent, a.pick).cmp(&(b.parent, b.pick)))
    });
    let slot = |p: &Partial| if budget.is_some() { p.cores as usize } else { 0 };
    let mut best = PrefixMax::new(budget.map_or(1, |b| b as usize + 1));
    let mut kept: Vec<Partial> = Vec::new();
    for p in all {
        if best.max_upto(slot(&p)) >= p.value - EPS {
            continue;
        }
        best.raise(slot(&p), p.value);
        kept.push(p);
    }
    kept
}

/// A Fenwick tree of maxima: raise a slot, ask for the maximum of slots 0..=i.
struct PrefixMax {
    tree: Vec<f64>,
}

impl PrefixMax {
    fn new(n: usize) -> Self {
        Self { tree: vec![f64::NEG_INFINITY; n + 1] }
    }

    fn raise(&mut self, i: usize, value: f64) {
        let mut k = i + 1;
        while k < self.tree.len() {
            self.tree[k] = self.tree[k].max(value);
            k += k & k.wrapping_neg();
        }
    }

    fn max_upto(&self, i: usize) -> f64 {
        let mut k = (i + 1).min(self.tree.len() - 1);
        let mut m = f64::NEG_INFINITY;
        while k > 0 {
            m = m.max(self.tree[k]);
            k -= k & k.wrapping_neg();
        }
        m
    }
}

fn solution(problem: &Problem, stage_plans: &[Entry], load: f64) -> Solution {
    let mut choices = Vec::new();
    for (stage, e) in stage_plans.iter().enumerate() {
        for &(shape, share) in &e.picks {
            choices.push(choice(stage, &shape, share));
        }
    }
    let acc_load: f64 = stage_plans.iter().map(|e| e.acc_load).sum();
    let lc_sum: f64 = stage_plans.iter().map(|e| e.lc).sum();
    let batch: u32 = stage_plans.iter().map(|e| e.batch).sum();
    let cores: u32 = stage_plans.iter().map(|e| e.cores).sum();
    let carried = stage_plans.iter().map(|e| e.picks.iter().map(|p| p.1).sum::<f64>()).fold(f64::INFINITY, f64::min);
    Solution {
        choices,
        objective: objective(problem, acc_load, load, cores, lc_sum, batch),
        accuracy: acc_load / (load * problem.stages.len() as f64),
        cores,
        latency_bound_ms: stage_plans.iter().map(|e| e.latency).sum(),
        carried_rps: carried,
        overloaded: false,
    }
}

fn choice(stage: usize, shape: &Shape, share: f64) -> Choice {
    Choice { stage, variant: shape.variant, replicas: shape.replicas, point: shape.point, share_rps: share }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_maximum_answers_for_every_prefix() {
        let mut m = PrefixMax::new(10);
        assert_eq!(m.max_upto(10), f64::NEG_INFINITY);
        m.raise(3, 1.0);
        m.raise(7, 5.0);
        m.raise(5, 2.0);
        assert_eq!(m.max_upto(2), f64::NEG_INFINITY);
        assert_eq!(m.max_upto(3), 1.0);
        assert_eq!(m.max_upto(6), 2.0);
        assert_eq!(m.max_upto(10), 5.0);
    }

    #[test]
    fn a_partial_plan_beaten_on_every_count_is_dropped() {
        let p = |latency, cores, value| Partial { latency, cores, value, parent: 0, pick: 0 };
        let kept = non_dominated(vec![p(10.0, 2, 1.0), p(12.0, 3, 0.5), p(12.0, 1, 0.5), p(20.0, 2, 2.0)], Some(4));
        let left: Vec<(f64, u32)> = kept.iter().map(|k| (k.latency, k.cores)).collect();
        assert_eq!(left, vec![(10.0, 2), (12.0, 1), (20.0, 2)]);
        let kept = non_dominated(vec![p(10.0, 2, 1.0), p(12.0, 1, 0.5), p(20.0, 2, 2.0)], None);
        assert_eq!(kept.len(), 2, "without a budget, fewer cores do not count");
    }
}
