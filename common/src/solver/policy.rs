//! Policies: the research systems, Tidal's union and the baselines, each a restriction of the
//! one planning problem to a search space.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which variants of a stage a policy may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VariantSet {
    All,
    /// Only these (a name matches a variant whose name equals it or ends with it, so `18`
    /// names `resnet18`).
    Named(Vec<String>),
    LeastAccurate,
    MostAccurate,
}

/// Cores per replica.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum CoreSet {
    /// Any core count from `min` up to the most the profile measured.
    Range {
        min: u32,
    },
    /// The variant's base allocation: the fewest cores at which batch 1 meets the latency
    /// budget (IPA's R_s).
    Base,
    Fixed(u32),
}

/// Batch sizes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum BatchSet {
    Fixed(u32),
    PowersOfTwo {
        max: u32,
    },
    Range {
        max: u32,
    },
    /// Every size up to `dense`, then powers of two up to `max`.
    Dense {
        dense: u32,
        max: u32,
    },
}

impl BatchSet {
    pub fn sizes(&self) -> Vec<u32> {
        match *self {
            BatchSet::Fixed(b) => vec![b.max(1)],
            BatchSet::PowersOfTwo { max } => (0..16).map(|i| 1u32 << i).take_while(|&b| b <= max.max(1)).collect(),
            BatchSet::Range { max } => (1..=max.max(1)).collect(),
            BatchSet::Dense { dense, max } => {
                let mut sizes: Vec<u32> = (1..=dense.min(max).max(1)).collect();
                sizes.extend(BatchSet::PowersOfTwo { max }.sizes().into_iter().filter(|&b| b > dense));
                sizes
            }
        }
    }
}

/// What a policy may choose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    pub variants: VariantSet,
    /// At most this many variants per stage (usize::MAX: any mix).
    pub max_variants_per_stage: usize,
    pub cores: CoreSet,
    pub batches: BatchSet,
    pub max_replicas: u32,
    /// Plans for per-request deadlines: takes the largest communication latency from the SLO.
    pub deadline_aware: bool,
    /// Resizes and swaps workers in place (Tidal, Sponge) rather than blue-green: a new
    /// deployment, warm-up, switch and delete (InfAdapter, Kubernetes).
    pub in_place: bool,
    /// Re-plans at once when arrivals exceed the planned rate, between intervals (Tidal's
    /// controller; Sponge adapts every second).
    pub reacts_to_surges: bool,
    /// Weighs a plan change by the requests it would leave uncarried while new workers load,
    /// and keeps the running variants when that costs more than the change gains (Tidal).
    pub prices_transitions: bool,
}

/// The search limits shared by policies that scale horizontally or batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_batch: u32,
    pub max_replicas: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_batch: 64, max_replicas: 32 }
    }
}

/// A named policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// A variant mix per stage, vertical and horizontal scaling, batching, deadlines.
    Tidal,
    /// InfAdapter: a mix of variants, cores per variant (0 or ≥ 2), batch 1, one deployment each.
    InfAdapter,
    /// IPA: one variant per stage, replicas of its base allocation, batch a power of two.
    Ipa,
    /// Sponge: the most accurate variant, one worker resized in place, batch ≤ 16, deadlines.
    Sponge,
    /// Kubernetes VPA: one fixed variant, one worker whose cores follow the load.
    Vpa(String),
    /// Model switching: one variant at a time, chosen by the load, cores to match.
    MsPlus,
    /// IPA's FA2 baseline: the least accurate variant per stage, replicas and batch scaled.
    Fa2Low,
    /// FA2 with the most accurate variant per stage.
    Fa2High,
    /// A fixed worker: variant, cores and batch, whatever the load.
    Static { variant: String, cores: u32, batch: u32 },
}

impl PolicyKind {
    pub fn space(&self, limits: &Limits) -> SearchSpace {
        let one = |variants, cores, batches, deadline_aware, in_place| SearchSpace {
            variants,
            max_variants_per_stage: 1,
            cores,
            batches,
            max_replicas: 1,
            deadline_aware,
            in_place,
            reacts_to_surges: in_place,
            prices_transitions: false,
        };
        let powers = BatchSet::PowersOfTwo { max: limits.max_batch };
        match self {
            PolicyKind::Tidal => SearchSpace {
                variants: VariantSet::All,
                max_variants_per_stage: usize::MAX,
                cores: CoreSet::Range { min: 1 },
                // Sponge's sizes (all up to 16) and IPA's (powers of two) and nothing between
                // larger powers of two, which would only multiply the shapes.
                batches: BatchSet::Dense { dense: 16, max: limits.max_batch },
                max_replicas: limits.max_replicas,
                deadline_aware: true,
                in_place: true,
                reacts_to_surges: true,
                prices_transitions: true,
            },
            PolicyKind::InfAdapter => SearchSpace {
                max_variants_per_stage: usize::MAX,
                ..one(VariantSet::All, CoreSet::Range { min: 2 }, BatchSet::Fixed(1), false, false)
            },
            PolicyKind::Ipa => SearchSpace {
                max_replicas: limits.max_replicas,
                ..one(VariantSet::All, CoreSet::Base, powers, false, false)
            },
            PolicyKind::Sponge => one(
                VariantSet::MostAccurate,
                CoreSet::Range { min: 1 },
                BatchSet::Range { max: limits.max_batch.min(16) },
                true,
                true,
            ),
            PolicyKind::Vpa(v) => {
                one(VariantSet::Named(vec![v.clone()]), CoreSet::Range { min: 1 }, BatchSet::Fixed(1), false, false)
            }
            PolicyKind::MsPlus => one(VariantSet::All, CoreSet::Range { min: 1 }, BatchSet::Fixed(1), false, false),
            PolicyKind::Fa2Low | PolicyKind::Fa2High => SearchSpace {
                max_replicas: limits.max_replicas,
                ..one(
                    if *self == PolicyKind::Fa2Low { VariantSet::LeastAccurate } else { VariantSet::MostAccurate },
                    CoreSet::Base,
                    powers,
                    false,
                    false,
                )
            },
            PolicyKind::Static { variant, cores, batch } => one(
                VariantSet::Named(vec![variant.clone()]),
                CoreSet::Fixed(*cores),
                BatchSet::Fixed(*batch),
                false,
                false,
            ),
        }
    }

    /// Every policy name `FromStr` accepts, for `--help` and errors.
    pub const NAMES: &'static str =
        "tidal, infadapter, ipa, sponge, vpa-VARIANT (e.g. vpa-18), ms+, fa2-low, fa2-high, static-VARIANT-CORES-BATCH";
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyKind::Tidal => write!(f, "tidal"),
            PolicyKind::InfAdapter => write!(f, "infadapter"),
            PolicyKind::Ipa => write!(f, "ipa"),
            PolicyKind::Sponge => write!(f, "sponge"),
            PolicyKind::Vpa(v) => write!(f, "vpa-{v}"),
            PolicyKind::MsPlus => write!(f, "ms+"),
            PolicyKind::Fa2Low => write!(f, "fa2-low"),
            PolicyKind::Fa2High => write!(f, "fa2-high"),
            PolicyKind::Static { variant, cores, batch } => write!(f, "static-{variant}-{cores}-{batch}"),
        }
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("unknown policy {s:?}; expected one of: {}", PolicyKind::NAMES);
        Ok(match s.to_ascii_lowercase().as_str() {
            "tidal" => PolicyKind::Tidal,
            "infadapter" => PolicyKind::InfAdapter,
            "ipa" => PolicyKind::Ipa,
            "sponge" => PolicyKind::Sponge,
            "ms+" | "msplus" | "ms" => PolicyKind::MsPlus,
            "fa2-low" => PolicyKind::Fa2Low,
            "fa2-high" => PolicyKind::Fa2High,
            other => {
                if let Some(v) = other.strip_prefix("vpa-").or_else(|| other.strip_prefix("vpa:")) {
                    if v.is_empty() {
                        return Err(bad());
                    }
                    PolicyKind::Vpa(v.to_string())
                } else if let Some(rest) = other.strip_prefix("static-") {
                    let mut parts = rest.rsplitn(3, '-');
                    let batch = parts.next().and_then(|b| b.parse().ok()).filter(|&b| b > 0).ok_or_else(bad)?;
                    let cores = parts.next().and_then(|c| c.parse().ok()).filter(|&c| c > 0).ok_or_else(bad)?;
                    let variant = parts.next().filter(|v| !v.is_empty()).ok_or_else(bad)?.to_string();
                    PolicyKind::Static { variant, cores, batch }
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

/// Whether a policy's variant name (`18`, `resnet18`) names `variant`.
pub fn names(wanted: &str, variant: &str) -> bool {
    let (w, v) = (wanted.to_ascii_lowercase(), variant.to_ascii_lowercase());
    v == w || v.ends_with(&w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_back() {
        for name in
            ["tidal", "infadapter", "ipa", "sponge", "vpa-18", "ms+", "fa2-low", "fa2-high", "static-resnet50-4-2"]
        {
            let p: PolicyKind = name.parse().unwrap();
            assert_eq!(p.to_string(), name);
        }
        assert_eq!(
            "static-resnet50-4-2".parse::<PolicyKind>(),
            Ok(PolicyKind::Static { variant: "resnet50".into(), cores: 4, batch: 2 })
        );
        for bad in ["", "vpa-", "static-x-0-1", "static-4-1", "greedy"] {
            assert!(bad.parse::<PolicyKind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn short_variant_names_match_by_suffix() {
        assert!(names("18", "resnet18"));
        assert!(names("ResNet18", "resnet18"));
        assert!(!names("18", "resnet180x"));
    }

    #[test]
    fn batch_sets_list_their_sizes() {
        assert_eq!(BatchSet::PowersOfTwo { max: 10 }.sizes(), vec![1, 2, 4, 8]);
        assert_eq!(BatchSet::Range { max: 3 }.sizes(), vec![1, 2, 3]);
        assert_eq!(BatchSet::Dense { dense: 3, max: 16 }.sizes(), vec![1, 2, 3, 4, 8, 16]);
        assert_eq!(BatchSet::Dense { dense: 16, max: 2 }.sizes(), vec![1, 2]);
        assert_eq!(BatchSet::Fixed(0).sizes(), vec![1]);
    }
}
