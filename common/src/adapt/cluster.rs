//! One round's tasks on one cluster: the cores divided among them (see [`super::share`]), then
//! every task's workers packed onto the nodes together.
//!
//! Each task is first planned within everything it may have (its maximum, the cluster's cores
//! at most). When those best plans fit the cluster together, they are the round's: with a
//! separable objective and the cores the only thing the tasks share, nothing beats them, and
//! one task alone is planned exactly as it always was. Otherwise each task's claim is worked out
//! by solving its own problem at other budgets: the fewest cores that carry its load (a
//! bisection over budgets: carrying is monotone in them) and the staircase of its best plans
//! above that (one solve per step, from the best plan down), and the division decides.
//!
//! The workers of all tasks are then placed at once, largest first (see [`place`]). Cores that
//! are free in total may still be split over nodes; a task whose worker finds no node with room
//! is planned again with workers no larger than the largest free node, and a note says so.
//! A task that would get no worker for want of memory takes it from the least recently used
//! task that may be unloaded (`min_workers` 0, no request for a round). Short of memory, the
//! task whose largest worker takes the most memory for its weight is planned again with
//! smaller workers first, so that tasks give up accuracy before any goes without a worker.
//! While the nodes are short of memory, the tasks keep to the memory they were given (see
//! [`MemoryHolds`]): growing back into memory that a woken task takes again a round later is
//! two transitions for nothing.

use std::collections::{BTreeMap, HashMap};

use tidal_proto::v1::{Assignment, Plan};

use super::share::{self, Claim};
use super::{current_nodes, variant_name, AdaptConfig, Choice, RoundInput, TaskPlans, WorkerLimit};
use crate::plan::{place, Room};

/// The memory each task's workers are held to while the nodes are short of it: the largest
/// worker each had after the last round that was short (or, for a task unloaded since, when it
/// last had workers), until `scale_down_after` rounds pass without a shortage (the scale-down
/// stabiliser's rounds: the plan grows back into memory as late as it shrinks from cores).
/// Tasks never held (new) are planned as ever.
#[derive(Debug, Clone, Default)]
pub(super) struct MemoryHolds {
    pub by_task: BTreeMap<String, u64>,
    /// Rounds in a row without a shortage of memory.
    pub calm_rounds: u32,
}

impl MemoryHolds {
    /// After a round: `short` whether a worker found no node with its memory; `plan` the
    /// round's plan. `counts` whether it was a round (a reconsidered plan sets holds but does
    /// not count towards releasing them).
    pub fn after(&mut self, short: bool, plan: &Plan, counts: bool, release_after: u32) {
        // A deleted task's hold goes with it (a task of its name registered again starts free).
        self.by_task.retain(|task, _| plan.tasks.iter().any(|t| &t.name == task));
        if short {
            self.calm_rounds = 0;
            // A task without workers (unloaded) keeps its hold: woken, it comes back within it.
            let mut planned: BTreeMap<String, u64> = BTreeMap::new();
            for a in plan.assignments.iter().filter(|a| a.memory_bytes > 0) {
                let held = planned.entry(a.task.clone()).or_default();
                *held = (*held).max(a.memory_bytes);
            }
            self.by_task.extend(planned);
        } else if counts {
            self.calm_rounds += 1;
            if self.calm_rounds >= release_after.max(1) {
                self.by_task.clear();
            }
        }
    }

    fn limit(&self, task: &str) -> WorkerLimit {
        WorkerLimit { memory: self.by_task.get(task).copied(), ..WorkerLimit::ANY }
    }
}

/// Divides the cores of `free` (per node) among `tasks`, places their workers into `plan`
/// (with every note that explains them) and returns each task's choice, and whether the nodes
/// were short of memory.
pub(super) fn divide_and_place(
    cfg: &AdaptConfig,
    tasks: &mut [TaskPlans],
    free: &[u32],
    input: &RoundInput,
    plan: &mut Plan,
    holds: &MemoryHolds,
) -> (Vec<Choice>, bool) {
    // Per task, what the division and the placement say of it, before its plan's own notes.
    let mut said: Vec<Vec<String>> = vec![Vec::new(); tasks.len()];
    let held: Vec<WorkerLimit> = tasks.iter().map(|t| holds.limit(t.name())).collect();
    let mut choices = divide(cfg, tasks, free.iter().sum(), &held, &mut said);
    let short = !input.nodes.is_empty() && place_all(tasks, &mut choices, free, input, plan, &held, &mut said);
    for (said, choice) in said.iter().zip(&choices) {
        plan.notes.extend(said.iter().chain(&choice.notes).cloned());
    }
    (choices, short)
}

/// Each task's choice within the cores it is given (and the memory it is held to, unless that
/// leaves it without a worker or overloaded where it need not be).
fn divide(
    cfg: &AdaptConfig,
    tasks: &mut [TaskPlans],
    total: u32,
    held: &[WorkerLimit],
    said: &mut [Vec<String>],
) -> Vec<Choice> {
    let fixed: u32 = tasks.iter().filter_map(|t| t.fixed.as_ref()).map(Choice::cores).sum();
    let divisible = total.saturating_sub(fixed);
    let best: u32 = tasks
        .iter_mut()
        .filter(|t| t.fixed.is_none())
        .map(|t| {
            let cap = t.cap;
            t.within(cap, WorkerLimit::ANY).map_or(0, |p| p.cores)
        })
        .sum();
    let budgets: Vec<u32> = if best <= divisible {
        tasks.iter().map(|t| t.cap).collect()
    } else {
        let claims: Vec<Claim> = tasks.iter_mut().map(claim).collect();
        let division = share::divide(divisible, &claims, cfg.share, |i, cores| tasks[i].carried_fraction(cores));
        for ((t, claim), (&cores, said)) in tasks.iter().zip(&claims).zip(division.cores.iter().zip(said.iter_mut())) {
            if t.fixed.is_none() && cores < claim.enough {
                said.push(format!(
                    "{}: SHORTAGE: {cores} of the {} cores its {:.1} req/s need ({} shares of {divisible} cores, weight {})",
                    t.name(),
                    claim.enough,
                    t.rate,
                    cfg.share,
                    t.weight()
                ));
            }
        }
        division.cores
    };
    tasks
        .iter_mut()
        .zip(budgets)
        .zip(held)
        .map(|((t, budget), &limit)| match &t.fixed {
            Some(fixed) => fixed.clone(),
            None if limit == WorkerLimit::ANY => within_or_nothing(t, budget, limit),
            None => {
                let kept = within_or_nothing(t, budget, limit);
                if kept.workers.is_empty() || kept.overloaded {
                    within_or_nothing(t, budget, WorkerLimit::ANY)
                } else {
                    kept
                }
            }
        })
        .collect()
}

/// The task's plan within `budget` (workers within `limit`), or no workers and a note that says
/// why.
fn within_or_nothing(t: &mut TaskPlans, budget: u32, limit: WorkerLimit) -> Choice {
    let name = t.name().to_string();
    if budget == 0 {
        return Choice { notes: vec![format!("{name}: no cores are left for it")], ..Choice::default() };
    }
    match t.within(budget, limit) {
        Ok(p) => p.choice.clone(),
        Err(e) => Choice { notes: vec![format!("{name}: no plan within {budget} cores ({e})")], ..Choice::default() },
    }
}

/// The fewest cores that carry the task's load, or the cores of its plan that carries the most
/// when no budget up to its cap does (0 for a task that cannot be planned).
fn claim_enough(t: &mut TaskPlans) -> u32 {
    let cap = t.cap;
    let Ok(best) = t.within(cap, WorkerLimit::ANY) else { return 0 };
    if best.choice.overloaded {
        return best.cores;
    }
    let (mut lo, mut hi) = (0, best.cores);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match t.within(mid, WorkerLimit::ANY) {
            Ok(p) if !p.choice.overloaded => hi = mid,
            _ => lo = mid,
        }
    }
    hi
}

/// The most plans a task's claim offers the division between its enough and its best.
const MAX_OPTIONS: u32 = 16;

/// What the task asks of the division: its weight, minimum, enough cores and the staircase of
/// its plans from there up to its best.
fn claim(t: &mut TaskPlans) -> Claim {
    let (weight, min_cores) = (t.weight(), t.min_cores());
    if t.fixed.is_some() {
        return Claim { weight, min_cores, enough: 0, options: vec![] };
    }
    let enough = claim_enough(t);
    let mut options = Vec::new();
    let mut budget = t.cap;
    // Every plan from the best down when they are few; else one every `step` cores, so that a
    // task costs at most about MAX_OPTIONS solves (the division is then exact over these).
    let span = t.within(budget, WorkerLimit::ANY).map_or(0, |p| p.cores).saturating_sub(enough);
    let step = span.div_ceil(MAX_OPTIONS).max(1);
    while let Ok(p) = t.within(budget, WorkerLimit::ANY) {
        if p.choice.overloaded && !options.is_empty() {
            break;
        }
        let (cores, value) = (p.cores, p.value);
        options.push((cores, value));
        if cores <= enough || cores == 0 {
            break;
        }
        budget = cores.saturating_sub(step).max(enough);
    }
    options.reverse();
    // The fewest cores offered is what the task needs: a plan that keeps running variants (see
    // `price_transition`) may stop the staircase above the bisection's figure.
    let enough = options.first().map_or(enough, |o| o.0);
    Claim { weight, min_cores, enough, options }
}

/// Places every task's workers at once; a task whose worker finds no node with room is planned
/// again with smaller workers: within the most cores a node has free, or, when a node has the
/// cores but none the memory, within the most memory a node has free (a smaller batch or
/// another variant). Failing that it goes without, and the notes say why. Whether memory
/// moved between tasks (see the end).
#[allow(clippy::too_many_arguments)]
fn place_all(
    tasks: &mut [TaskPlans],
    choices: &mut [Choice],
    free: &[u32],
    input: &RoundInput,
    plan: &mut Plan,
    held: &[WorkerLimit],
    said: &mut [Vec<String>],
) -> bool {
    let free: Vec<Room> =
        free.iter().zip(&input.nodes).map(|(&cores, n)| Room { cores, memory_bytes: n.memory_free() }).collect();
    // A held task whose choice keeps to its hold starts from it (a tighter limit only shrinks).
    let mut limits: Vec<WorkerLimit> = held
        .iter()
        .zip(choices.iter())
        .map(|(&limit, c)| {
            let within = c.workers.iter().all(|w| limit.memory.is_none_or(|m| w.memory_bytes <= m));
            if within {
                limit
            } else {
                WorkerLimit::ANY
            }
        })
        .collect();
    let mut unloaded_for_memory = false;
    // Shrinks made so that tasks would not go without a worker, undone if one of those goes
    // without all the same: the choices, limits and note counts before the first of them, and
    // the tasks they were made for.
    let mut undo: Option<(Vec<Choice>, Vec<WorkerLimit>, Vec<usize>)> = None;
    let mut rescued = vec![false; tasks.len()];
    loop {
        let workers: Vec<(usize, &Assignment)> =
            choices.iter().enumerate().flat_map(|(i, c)| c.workers.iter().map(move |w| (i, w))).collect();
        let needs: Vec<Room> = workers
            .iter()
            .map(|(_, w)| Room { cores: w.millicores.div_ceil(1000), memory_bytes: w.memory_bytes })
            .collect();
        let groups: Vec<(&str, &str, &str)> =
            workers.iter().map(|(_, w)| (w.task.as_str(), w.stage.as_str(), variant_name(w))).collect();
        let current: Vec<Vec<usize>> =
            workers.iter().flat_map(|(_, w)| current_nodes(input, &w.task, std::slice::from_ref(*w))).collect();
        let e = match place(&needs, &groups, &current, &free) {
            Ok(nodes) => {
                // Replicas of a variant on a node are numbered apart.
                let mut replicas: HashMap<(&str, &str, &str, usize), u32> = HashMap::new();
                for ((_, w), n) in workers.iter().zip(nodes) {
                    let replica = replicas.entry((w.task.as_str(), w.stage.as_str(), variant_name(w), n)).or_default();
                    let node = input.nodes[n].name.to_string();
                    plan.assignments.push(Assignment { node, replica: *replica, ..(*w).clone() });
                    *replica += 1;
                }
                // Short of memory when memory moved between tasks and stayed moved: a task
                // unloaded for it, or workers kept smaller than this round began with. A worker
                // that fits nowhere, whatever the others give up, is not (holding the others
                // would not help it, and would hold them for as long as it is asked for).
                let smaller = (0..tasks.len()).any(|j| {
                    !choices[j].workers.is_empty() && limits[j].memory.is_some() && limits[j].memory != held[j].memory
                });
                return unloaded_for_memory || smaller;
            }
            Err(e) => e,
        };
        let i = workers[e.worker].0;
        let name = tasks[i].name().to_string();
        let budget = choices[i].cores();
        let fewer = budget.saturating_sub(e.needs.cores);
        let shrunk = smaller_workers(&e, limits[i])
            .filter(|_| tasks[i].fixed.is_none())
            .map(|(limit, what)| (limit, what, within_or_nothing(&mut tasks[i], budget, limit)));
        // A task that would go without a worker for want of memory takes it from the least
        // recently used task that may be unloaded (itself, when that is the one).
        let goes_without = match &shrunk {
            Some((_, _, choice)) => choice.workers.is_empty(),
            None => tasks[i].fixed.is_some() || fewer == 0,
        };
        // Only one whose unloading can make the room: its largest worker freed beside the
        // most memory a node has free.
        let most_free = e.free.iter().map(|f| f.memory_bytes).max().unwrap_or(0);
        let frees = |j: usize| choices[j].workers.iter().map(|w| w.memory_bytes).max().unwrap_or(0);
        let lru = (0..tasks.len())
            .filter(|&j| !choices[j].workers.is_empty() && tasks[j].evictable())
            .filter(|&j| j == i || frees(j).saturating_add(most_free) >= e.needs.memory_bytes)
            .max_by(|&a, &b| tasks[a].task.idle_s.total_cmp(&tasks[b].task.idle_s));
        if let Some(j) = lru.filter(|_| goes_without && e.short_of_memory()) {
            said[j].push(format!(
                "{}: unloaded to free memory for {} (the least recently used: {})",
                tasks[j].name(),
                if i == j { "the others".to_string() } else { name },
                super::idle_for(tasks[j].task.idle_s)
            ));
            choices[j].workers.clear();
            unloaded_for_memory = true;
            continue;
        }
        // Short of memory, the task whose largest worker takes the most memory for its weight
        // is planned again with smaller ones first: another's before this worker's when it is
        // larger for its weight, and any other's before this task goes without a worker (when
        // no idle task can be unloaded). Tasks give up accuracy before any loses its worker.
        if e.short_of_memory() {
            let own = Largest {
                per_weight: e.needs.memory_bytes as f64 / tasks[i].weight().max(1e-9),
                runs: runs_now(input, workers[e.worker].1),
            };
            let above = if goes_without { Largest { per_weight: 0.0, runs: true } } else { own };
            if let Some((j, limit, choice)) = shrink_largest(tasks, choices, &limits, i, above, input) {
                if goes_without {
                    rescued[i] = true;
                    if undo.is_none() {
                        undo = Some((choices.to_vec(), limits.clone(), said.iter().map(Vec::len).collect()));
                    }
                }
                said[j].push(format!(
                    "{}: planned again with workers of at most {} to leave memory for {name}",
                    tasks[j].name(),
                    crate::memory::human(limit.memory.unwrap_or(0))
                ));
                limits[j] = limit;
                choices[j] = choice;
                continue;
            }
        }
        match shrunk {
            Some((limit, what, choice)) => {
                limits[i] = limit;
                said[i].push(format!("{name}: planned again with workers of at most {what}: {e}"));
                choices[i] = choice;
            }
            // Workers no smaller fit, but fewer of them may (replicas that fill the memory).
            None if tasks[i].fixed.is_none() && fewer > 0 => {
                said[i].push(format!("{name}: planned again within {fewer} cores: {e}"));
                choices[i] = within_or_nothing(&mut tasks[i], fewer, limits[i]);
            }
            None => {
                said[i].push(format!("{name}: {e}"));
                choices[i].workers.clear();
            }
        }
        // It goes without all the same: the others that still have workers get back what they
        // had before the shrinks (one task fewer to place, for good: this ends).
        if choices[i].workers.is_empty() && rescued[i] {
            if let Some((before, was, notes)) = undo.take() {
                let kept: Vec<usize> = (0..tasks.len()).filter(|&j| j != i && !choices[j].workers.is_empty()).collect();
                for j in kept {
                    choices[j] = before[j].clone();
                    limits[j] = was[j];
                    said[j].truncate(notes[j]);
                }
            }
            rescued.iter_mut().for_each(|r| *r = false);
        }
    }
}

/// A task's largest worker, as the order in which tasks give up memory sees it: one not
/// running now (its load is to come either way) before any that runs, so that a round does
/// not swap running workers for others of the same size (each swap a transition, and with
/// memory full one that breaks before it makes); then the most memory for its weight.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Largest {
    per_weight: f64,
    runs: bool,
}

impl Largest {
    /// `Less` when it gives up memory before `other`.
    fn order(&self, other: &Self) -> std::cmp::Ordering {
        self.runs.cmp(&other.runs).then(other.per_weight.total_cmp(&self.per_weight))
    }
}

/// Whether the plan in force runs a worker of `w`'s task and variant.
fn runs_now(input: &RoundInput, w: &Assignment) -> bool {
    input.current.is_some_and(|p| p.assignments.iter().any(|a| a.task == w.task && variant_name(a) == variant_name(w)))
}

/// The task (not `i`) whose largest worker gives up memory first (see [`Largest`]), before
/// `above`, and that can be planned within its cores with smaller workers: that task, its
/// tighter limit and its new choice. `None` when no other task can.
fn shrink_largest(
    tasks: &mut [TaskPlans],
    choices: &[Choice],
    limits: &[WorkerLimit],
    i: usize,
    above: Largest,
    input: &RoundInput,
) -> Option<(usize, WorkerLimit, Choice)> {
    let largest = |j: usize| choices[j].workers.iter().max_by_key(|w| w.memory_bytes).filter(|w| w.memory_bytes > 0);
    let mut candidates: Vec<(usize, Largest)> = (0..tasks.len())
        .filter(|&j| j != i && tasks[j].fixed.is_none())
        .filter_map(|j| {
            let w = largest(j)?;
            Some((
                j,
                Largest { per_weight: w.memory_bytes as f64 / tasks[j].weight().max(1e-9), runs: runs_now(input, w) },
            ))
        })
        .filter(|(_, l)| l.order(&above).is_lt())
        .collect();
    candidates.sort_by(|a, b| a.1.order(&b.1).then(a.0.cmp(&b.0)));
    let largest_of = |c: &Choice| c.workers.iter().map(|w| w.memory_bytes).max().unwrap_or(0);
    for (j, _) in candidates {
        // Smaller workers, within the cores it has, carrying its load if it did.
        let limit = WorkerLimit { memory: Some(largest_of(&choices[j]) - 1), ..limits[j] };
        let choice = within_or_nothing(&mut tasks[j], choices[j].cores(), limit);
        if !choice.workers.is_empty() && (choices[j].overloaded || !choice.overloaded) {
            return Some((j, limit, choice));
        }
    }
    None
}

/// A tighter limit on a task's workers after `e` (and what it says), or `None` when the free
/// room cannot be fitted by smaller workers than `limit` already asks for.
fn smaller_workers(e: &crate::plan::PlacementError, limit: WorkerLimit) -> Option<(WorkerLimit, String)> {
    if e.short_of_memory() {
        // The most memory free on a node with the worker's cores.
        let with_cores = e.free.iter().filter(|f| f.cores >= e.needs.cores);
        let memory = with_cores.map(|f| f.memory_bytes).max().unwrap_or(0);
        let tighter = memory > 0 && limit.memory.is_none_or(|m| memory < m);
        return tighter.then(|| (WorkerLimit { memory: Some(memory), ..limit }, crate::memory::human(memory)));
    }
    let cores = e.free.iter().map(|f| f.cores).max().unwrap_or(0);
    let tighter = cores > 0 && limit.cores.is_none_or(|c| cores < c);
    tighter.then(|| (WorkerLimit { cores: Some(cores), ..limit }, format!("{cores} cores")))
}

#[cfg(test)]
mod tests;
