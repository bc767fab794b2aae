//! The worker shapes a policy may give each variant: replicas × (cores, batch), each a point of
//! the latency model within the latency budget and the core budget.

use super::policy::{names, CoreSet, VariantSet};
use super::{Problem, SearchSpace, SolveError};
use crate::latency::OperatingPoint;

/// `replicas` workers of `point` for one variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub variant: usize,
    pub replicas: u32,
    pub point: OperatingPoint,
    pub cores: u32,
    pub capacity: f64,
    /// β·cores/B + δ·batch: what the shape takes from the objective.
    pub cost: f64,
}

/// Per stage, per variant (indexed as in the problem; a variant outside the policy has none):
/// every shape the policy allows.
pub type Shapes = Vec<Vec<Vec<Shape>>>;

/// Every shape of every stage (not yet filtered to the Pareto-optimal ones).
pub(crate) fn build(problem: &Problem, space: &SearchSpace, slo_ms: f64) -> Result<Shapes, SolveError> {
    build_with(problem, space, slo_ms, |shapes| shapes)
}

/// Every Pareto-optimal shape of every stage (see [`pareto`]; latency counts in a pipeline),
/// each variant's filtered as soon as it is built, while its shapes are still in cache.
pub(crate) fn build_pareto(problem: &Problem, space: &SearchSpace, slo_ms: f64) -> Result<Shapes, SolveError> {
    let by_latency = problem.stages.len() > 1;
    build_with(problem, space, slo_ms, |shapes| pareto(shapes, by_latency))
}

fn build_with(
    problem: &Problem,
    space: &SearchSpace,
    slo_ms: f64,
    keep: impl Fn(Vec<Shape>) -> Vec<Shape>,
) -> Result<Shapes, SolveError> {
    let mut all = Vec::with_capacity(problem.stages.len());
    for stage in &problem.stages {
        let allowed = allowed_variants(stage, &space.variants)?;
        let per_variant: Vec<Vec<Shape>> = (0..stage.variants.len())
            .map(|v| if allowed.contains(&v) { keep(variant_shapes(problem, space, slo_ms, stage, v)) } else { vec![] })
            .collect();
        if per_variant.iter().all(Vec::is_empty) {
            return Err(SolveError::NoOperatingPoint(stage.name.clone()));
        }
        all.push(per_variant);
    }
    Ok(all)
}

fn allowed_variants(stage: &super::Stage, set: &VariantSet) -> Result<Vec<usize>, SolveError> {
    let by_accuracy = |most: bool| {
        let it = (0..stage.variants.len()).map(|i| (i, stage.variants[i].accuracy));
        let pick = if most { it.max_by(|a, b| a.1.total_cmp(&b.1)) } else { it.min_by(|a, b| a.1.total_cmp(&b.1)) };
        pick.map(|(i, _)| i).into_iter().collect()
    };
    Ok(match set {
        VariantSet::All => (0..stage.variants.len()).collect(),
        VariantSet::MostAccurate => by_accuracy(true),
        VariantSet::LeastAccurate => by_accuracy(false),
        VariantSet::Named(wanted) => {
            let found: Vec<usize> = (0..stage.variants.len())
                .filter(|&i| wanted.iter().any(|w| names(w, &stage.variants[i].name)))
                .collect();
            if found.is_empty() {
                return Err(SolveError::UnknownVariant(wanted.join(",")));
            }
            found
        }
    })
}

fn variant_shapes(problem: &Problem, space: &SearchSpace, slo_ms: f64, stage: &super::Stage, v: usize) -> Vec<Shape> {
    let grid = &stage.variants[v].grid;
    let measured = grid.cores();
    let (Some(&lo), Some(&hi)) = (measured.first(), measured.last()) else { return vec![] };
    // A pipeline stage may trade capacity for latency (every utilisation on the ladder); a
    // single stage only needs the highest utilisation within the SLO.
    let ladder = problem.stages.len() > 1;
    let cores: Vec<u32> = match space.cores {
        CoreSet::Range { min } => (lo.max(min)..=hi).collect(),
        CoreSet::Fixed(c) => vec![c],
        CoreSet::Base => {
            (lo..=hi).find(|&c| !problem.model.points(grid, c, 1, slo_ms, false).is_empty()).into_iter().collect()
        }
    };
    let cores: Vec<u32> = cores.into_iter().filter(|&c| problem.max_worker_cores.is_none_or(|m| c <= m)).collect();
    let batches = space.batches.sizes();
    let (budget, w) = (problem.core_budget, &problem.weights);
    let load = problem.load_rps.max(super::MIN_PLANNED_RPS);
    let mut shapes = Vec::new();
    let memory = &stage.variants[v].memory;
    let batches: Vec<u32> = batches
        .into_iter()
        .filter(|&b| problem.max_worker_memory.is_none_or(|m| memory.worker_bytes(b) <= m))
        .collect();
    for &c in &cores {
        for &b in &batches {
            for point in problem.model.points(grid, c, b, slo_ms, ladder) {
                // More replicas than the load needs carry no more of it (any lower load either).
                let needed = (load / point.capacity_rps).ceil().max(1.0) as u32;
                for replicas in 1..=space.max_replicas.max(1).min(needed) {
                    let total = c.saturating_mul(replicas);
                    if total > budget {
                        break;
                    }
                    shapes.push(Shape {
                        variant: v,
                        replicas,
                        point,
                        cores: total,
                        capacity: point.capacity_rps * replicas as f64,
                        cost: w.beta * total as f64 / budget as f64 + w.delta * b as f64,
                    });
                }
            }
        }
    }
    shapes
}

/// Keeps the shapes no other shape beats: one that costs no more, carries no less and needs no
/// more cores (and, when `by_latency`, is no slower) makes it useless. Sorted by cost.
pub(crate) fn pareto(mut shapes: Vec<Shape>, by_latency: bool) -> Vec<Shape> {
    shapes.sort_unstable_by(|a, b| {
        a.cost
            .total_cmp(&b.cost)
            .then(b.capacity.total_cmp(&a.capacity))
            .then(a.cores.cmp(&b.cores))
            .then(a.point.latency_bound_ms.total_cmp(&b.point.latency_bound_ms))
    });
    let latency = |s: &Shape| if by_latency { s.point.latency_bound_ms } else { 0.0 };
    let max_cores = shapes.iter().map(|s| s.cores as usize).max().unwrap_or(0);
    let mut kept_so_far = Dominance::new(max_cores);
    let mut kept: Vec<Shape> = Vec::new();
    for s in shapes {
        let l = latency(&s);
        if kept_so_far.most_capacity(s.cores as usize, l) < s.capacity {
            kept_so_far.insert(s.cores as usize, l, s.capacity);
            kept.push(s);
        }
    }
    kept
}

/// The kept shapes, to ask: of those with at most `cores` cores and no slower than `latency`,
/// which carries the most? A Fenwick tree over core counts whose nodes are staircases
/// (latency up, capacity strictly up), so both the question and an insertion take
/// O(log cores · log steps).
struct Dominance {
    tree: Vec<Vec<(f64, f64)>>,
}

impl Dominance {
    fn new(max_cores: usize) -> Self {
        Self { tree: vec![Vec::new(); max_cores + 2] }
    }

    fn most_capacity(&self, cores: usize, latency: f64) -> f64 {
        let mut k = cores + 1;
        let mut most = f64::NEG_INFINITY;
        while k > 0 {
            most = most.max(best_within(&self.tree[k], latency));
            k -= k & k.wrapping_neg();
        }
        most
    }

    fn insert(&mut self, cores: usize, latency: f64, capacity: f64) {
        let mut k = cores + 1;
        while k < self.tree.len() {
            raise(&mut self.tree[k], latency, capacity);
            k += k & k.wrapping_neg();
        }
    }
}

/// The most capacity among the steps no slower than `latency`.
fn best_within(stair: &[(f64, f64)], latency: f64) -> f64 {
    let n = stair.partition_point(|&(l, _)| l <= latency);
    if n == 0 {
        f64::NEG_INFINITY
    } else {
        stair[n - 1].1
    }
}

/// Adds a step unless a step no slower carries as much, dropping the slower steps it beats.
fn raise(stair: &mut Vec<(f64, f64)>, latency: f64, capacity: f64) {
    if best_within(stair, latency) >= capacity {
        return;
    }
    let at = stair.partition_point(|&(l, _)| l < latency);
    let mut end = at;
    while end < stair.len() && stair[end].1 <= capacity {
        end += 1;
    }
    stair.splice(at..end, [(latency, capacity)]);
}

/// The fewest cores, and the least latency, that any plan needs (each stage's cheapest shape),
/// to say why nothing fits.
pub(crate) fn cheapest(shapes: &Shapes) -> (u32, f64) {
    shapes
        .iter()
        .map(|stage| stage_cheapest(stage))
        .fold((0u32, 0.0f64), |(c, l), (sc, sl)| (c + sc, l + if sl.is_finite() { sl } else { 0.0 }))
}

/// One stage's fewest cores and least latency among its shapes (∞ latency when it has none).
pub(crate) fn stage_cheapest(stage: &[Vec<Shape>]) -> (u32, f64) {
    let all = stage.iter().flatten();
    let cores = all.clone().map(|s| s.cores).min().unwrap_or(0);
    let latency = all.map(|s| s.point.latency_bound_ms).fold(f64::INFINITY, f64::min);
    (cores, latency)
}

/// One replica of a worker of `cores` cores for `variant`, for the solver's unit tests.
#[cfg(test)]
pub(crate) fn test_shape(variant: usize, cost: f64, capacity: f64, cores: u32, latency: f64) -> Shape {
    Shape {
        variant,
        replicas: 1,
        point: OperatingPoint {
            cores,
            batch: 1,
            max_delay_ms: 0,
            capacity_rps: capacity,
            latency_bound_ms: latency,
            utilisation: 0.8,
            interpolated: false,
        },
        cores,
        capacity,
        cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(cost: f64, capacity: f64, cores: u32, latency: f64) -> Shape {
        test_shape(0, cost, capacity, cores, latency)
    }

    #[test]
    fn the_pareto_filter_drops_shapes_that_are_worse_in_every_way() {
        let shapes = vec![
            shape(1.0, 10.0, 1, 50.0),
            shape(2.0, 10.0, 2, 40.0), // dominated unless latency counts
            shape(2.0, 20.0, 2, 50.0),
            shape(3.0, 15.0, 3, 60.0), // dominated
        ];
        let kept = pareto(shapes.clone(), false);
        assert_eq!(kept.iter().map(|s| s.capacity).collect::<Vec<_>>(), vec![10.0, 20.0]);
        let kept = pareto(shapes, true);
        assert_eq!(kept.len(), 3);
    }
}
