//! The most load any plan carries, to plan an overloaded task without searching blindly.
//!
//! For one stage it is exact: at most `max_variants` variants, one shape each, within the core
//! budget, their capacities summed — a small knapsack over cores. For a pipeline each stage
//! gets the budget and latency the other stages' cheapest and fastest shapes leave it, which
//! bounds the pipeline's capacity from above.

use super::options::{stage_cheapest, Shape};

/// The largest total capacity of at most `max_variants` of `variants` (one shape each) within
/// `budget` cores and `latency_limit`.
pub(crate) fn stage_capacity(variants: &[Vec<Shape>], budget: u32, latency_limit: f64, max_variants: usize) -> f64 {
    let picks = max_variants.min(variants.len());
    let b = budget as usize;
    // best[k][c]: the most capacity from k variants on exactly c cores (−∞: impossible).
    let mut best = vec![vec![f64::NEG_INFINITY; b + 1]; picks + 1];
    best[0][0] = 0.0;
    for shapes in variants {
        let usable: Vec<&Shape> =
            shapes.iter().filter(|s| s.cores <= budget && s.point.latency_bound_ms <= latency_limit).collect();
        if usable.is_empty() {
            continue;
        }
        // Downwards in k, so each variant is picked at most once.
        for k in (1..=picks).rev() {
            let (lower, upper) = best.split_at_mut(k);
            let (from, to) = (&lower[k - 1], &mut upper[0]);
            for s in &usable {
                let c = s.cores as usize;
                for used in (c..=b).rev() {
                    let with = from[used - c] + s.capacity;
                    if with > to[used] {
                        to[used] = with;
                    }
                }
            }
        }
    }
    best.iter().flatten().copied().fold(0.0, f64::max)
}

/// A quick upper bound on [`stage_capacity`]: the `max_variants` largest capacities any one
/// shape of a variant has within the budget, summed (shapes are within the SLO already).
pub(crate) fn loose_stage_bound(variants: &[Vec<Shape>], budget: u32, max_variants: usize) -> f64 {
    let mut most: Vec<f64> = variants
        .iter()
        .map(|shapes| shapes.iter().filter(|s| s.cores <= budget).map(|s| s.capacity).fold(0.0, f64::max))
        .collect();
    most.sort_by(|a, b| b.total_cmp(a));
    most.iter().take(max_variants).sum()
}

/// An upper bound on the load a pipeline of `stages` carries within `budget` cores and `slo`.
pub(crate) fn pipeline_capacity(stages: &[Vec<Vec<Shape>>], budget: u32, slo: f64, max_variants: usize) -> f64 {
    let cheapest: Vec<(u32, f64)> = stages.iter().map(|stage| stage_cheapest(stage)).collect();
    let (cores, latency): (u32, f64) = cheapest.iter().fold((0, 0.0), |(c, l), &(sc, sl)| (c + sc, l + sl));
    stages
        .iter()
        .zip(&cheapest)
        .map(|(stage, &(own_cores, own_latency))| {
            let left_cores = budget.saturating_sub(cores - own_cores);
            let left_latency = slo - (latency - own_latency);
            stage_capacity(stage, left_cores, left_latency, max_variants)
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(variant: usize, cores: u32, capacity: f64, latency: f64) -> Shape {
        crate::solver::options::test_shape(variant, cores as f64, capacity, cores, latency)
    }

    #[test]
    fn one_stage_packs_the_budget_with_one_shape_per_variant() {
        let variants = vec![
            vec![shape(0, 1, 10.0, 5.0), shape(0, 3, 25.0, 5.0)],
            vec![shape(1, 2, 30.0, 5.0), shape(1, 4, 50.0, 50.0)],
        ];
        // 1 + 4 cores: 10 + 50 (beats 3 + 2 cores: 25 + 30).
        assert_eq!(stage_capacity(&variants, 5, 100.0, 2), 60.0);
        // Within 10 ms the 4-core shape is out: 3 + 2 cores.
        assert_eq!(stage_capacity(&variants, 5, 10.0, 2), 55.0);
        // One variant only: the best single shape within 5 cores.
        assert_eq!(stage_capacity(&variants, 5, 100.0, 1), 50.0);
        // The 4-core shape is too slow for 10 ms.
        assert_eq!(stage_capacity(&variants, 5, 10.0, 1), 30.0);
        assert_eq!(stage_capacity(&variants, 0, 100.0, 2), 0.0);
        // The quick bound ignores that the two best shapes together exceed the budget.
        assert_eq!(loose_stage_bound(&variants, 5, 2), 75.0);
        assert_eq!(loose_stage_bound(&variants, 5, 1), 50.0);
    }

    #[test]
    fn a_pipeline_is_bounded_by_its_narrowest_stage() {
        let a = vec![vec![shape(0, 1, 10.0, 5.0), shape(0, 2, 20.0, 5.0)]];
        let b = vec![vec![shape(0, 1, 8.0, 5.0), shape(0, 3, 30.0, 5.0)]];
        // 4 cores: a keeps 3 when b takes its cheapest 1, b keeps 3 when a takes 1.
        let bound = pipeline_capacity(&[a, b], 4, 100.0, 1);
        assert_eq!(bound, 20.0);
    }
}
