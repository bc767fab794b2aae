//! Fuzzing, proptest-driven and bounded so that it runs in `make test`: whatever bytes or
//! numbers arrive — a request's tensor, a task, a plan, a profile, a variant's TOML, a
//! protobuf message off the wire — the checks answer without panicking, and what they let
//! through holds the bounds the rest of the code relies on.

use proptest::prelude::*;
use prost::Message;
use tidal_common::plan::{validate_for_node, validate_node, MAX_WORKERS_PER_NODE, MIN_WORKER_MILLICORES};
use tidal_common::profile::{validate_profile, ProfileGrid, MAX_PROFILE_CORES};
use tidal_common::task::{input_shape, normalise, validate_task};
use tidal_common::tensor::{NamedTensor, StageIo};
use tidal_common::variant::{validate_variant, VariantConfig, MAX_INPUT_ELEMENTS};
use tidal_proto::v1::{
    Assignment, Command, Connector, DataType, Plan, ProfilePoint, RegisterNodeRequest, StageSpec, TaskSpec, Tensor,
    VariantProfile, VariantSpec,
};

fn cases() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

/// Names from a small alphabet, mostly valid, sometimes what names may not hold.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![6 => "[a-c]{1,3}", 1 => Just(String::new()), 1 => "[a-c./ ]{1,6}", 1 => Just("x".repeat(70))]
}

/// Mostly small, sometimes anything: numbers that pass a bound and numbers that do not.
fn small_or_any(small: std::ops::Range<u32>) -> impl Strategy<Value = u32> {
    prop_oneof![4 => small, 1 => any::<u32>()]
}

/// Dimensions around the interesting edges: zero, negative, small, huge.
fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![8 => 1i64..8, 1 => Just(0i64), 1 => Just(-1), 1 => Just(1 << 31), 1 => Just(1 << 40), 1 => Just(i64::MAX)]
}

fn variant() -> impl Strategy<Value = VariantSpec> {
    let file = prop_oneof![
        6 => Just("m.onnx".to_string()),
        1 => Just("/etc/shadow".into()),
        1 => Just("../m.onnx".into()),
        1 => "[a-c/.]{0,6}"
    ];
    let accuracy = prop_oneof![6 => 0.0f64..100.0, 1 => -10.0f64..120.0, 1 => Just(f64::NAN)];
    // Variants of one task mostly take one input, as a valid stage's must.
    let shape = prop_oneof![6 => Just(vec![3i64, 4, 4]), 2 => prop::collection::vec(dim(), 0..5)];
    (name(), file, accuracy, shape).prop_map(|(name, model_file, accuracy, input_shape)| VariantSpec {
        name,
        model_file,
        accuracy,
        input_shape,
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    })
}

fn task() -> impl Strategy<Value = TaskSpec> {
    let stage = (
        name(),
        prop::collection::vec(variant(), 0..4),
        prop_oneof![4 => Just(0i32), 1 => 0i32..3],
        small_or_any(0..20),
    )
        .prop_map(|(name, variants, connector, crops)| StageSpec {
            name,
            variants,
            connector,
            crops,
            ..Default::default()
        });
    (name(), small_or_any(1..1000), prop::collection::vec(variant(), 0..3), prop::collection::vec(stage, 0..4))
        .prop_map(|(name, slo_ms, variants, stages)| TaskSpec { name, slo_ms, variants, stages, ..Default::default() })
}

/// A valid two-stage task, for plans whose numbers are what varies.
fn two_stages() -> TaskSpec {
    let v = |name: &str| VariantSpec {
        name: name.into(),
        model_file: "m.onnx".into(),
        accuracy: 70.0,
        input_shape: vec![3],
        tensor_names: Default::default(),
        tokenizer_file: String::new(),
        io: None,
        model_sha256: String::new(),
    };
    let stage =
        |name: &str, variants| StageSpec { name: name.into(), variants, connector: 0, crops: 0, ..Default::default() };
    TaskSpec {
        name: "t".into(),
        slo_ms: 100,
        variants: vec![],
        stages: vec![stage("a", vec![v("x")]), stage("b", vec![v("y"), v("z")])],
        ..Default::default()
    }
}

fn elements(shape: &[i64]) -> Option<i64> {
    shape.iter().try_fold(1i64, |n, &d| if d > 0 { n.checked_mul(d) } else { None })
}

proptest! {
    #![proptest_config(cases())]

    /// A request's tensor: any dtype, shape and bytes against a task's (valid) input.
    #[test]
    fn tensors_are_checked_without_panicking(
        dtype in prop_oneof![3 => Just(DataType::Float32 as i32), 1 => -2i32..16],
        sample in prop::collection::vec(1i64..4, 1..4),
        shape_kind in 0u8..3,
        other_shape in prop::collection::vec(dim(), 0..6),
        data_kind in 0u8..3,
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        // The task's shape, with a batch of one, or anything; data of the right size, or not.
        let shape = match shape_kind {
            0 => sample.clone(),
            1 => std::iter::once(1).chain(sample.iter().copied()).collect(),
            _ => other_shape,
        };
        let want = elements(&sample).unwrap() as usize * 4;
        let data = match data_kind {
            0 | 1 => noise.iter().copied().cycle().take(if noise.is_empty() { 0 } else { want }).collect(),
            _ => noise,
        };
        let t = Tensor { dtype, shape, data, name: String::new() };
        let stage = StageSpec {
            variants: vec![VariantSpec { input_shape: sample.clone(), ..Default::default() }],
            ..Default::default()
        };
        let io = StageIo::of(&stage).unwrap();
        if let Ok(got) = NamedTensor::from_proto(t).map_err(|e| e.to_string()).and_then(|t| io.sample(vec![t]).map_err(|e| e.to_string())) {
            prop_assert_eq!(dtype, DataType::Float32 as i32);
            prop_assert_eq!(got[0].f32_values().unwrap().len() as i64, elements(&sample).unwrap());
        }
    }

    /// A task as RegisterTask, a plan or the log carries it.
    #[test]
    fn tasks_are_checked_without_panicking(t in task()) {
        let t = normalise(t);
        if validate_task(&t).is_ok() {
            prop_assert!((1..=16).contains(&t.stages.len()));
            for v in t.stages.iter().flat_map(|s| &s.variants) {
                prop_assert!(validate_variant(v).is_ok());
                prop_assert!(elements(&v.input_shape).is_some_and(|n| n <= MAX_INPUT_ELEMENTS));
            }
            // The task's input is its first stage's (empty: a scalar per sample).
            prop_assert_eq!(input_shape(&t), t.stages[0].variants[0].input_shape.as_slice());
            for s in &t.stages[1..] {
                if s.connector == Connector::Crops as i32 {
                    prop_assert!((1..=16).contains(&s.crops));
                }
            }
        }
    }

    /// A plan pushed to an agent: whatever its numbers, the check answers, and a plan it
    /// accepts has a bounded number of workers, each with a quota the kernel enforces, that
    /// fit the node.
    #[test]
    fn plans_are_checked_without_panicking(
        t in prop_oneof![task(), Just(two_stages())],
        workers in prop::collection::vec(
            (
                0u32..3,
                prop_oneof![4 => 50u32..1500, 1 => any::<u32>()],
                small_or_any(0..300),
                small_or_any(0..20_000),
                prop_oneof![4 => 0.0f64..1.0, 1 => Just(f64::NAN), 1 => -1.0f64..2.0],
                0u32..3,
            ),
            0..8,
        ),
        node_millicores in 0u32..10_000,
        epoch in any::<u64>(),
    ) {
        let t = normalise(t);
        let variants: Vec<(String, VariantSpec)> =
            t.stages.iter().flat_map(|s| s.variants.iter().map(move |v| (s.name.clone(), v.clone()))).collect();
        let assignments = workers
            .iter()
            .filter_map(|&(i, millicores, max_batch, max_delay_ms, weight, replica)| {
                let (stage, v) = variants.get(i as usize)?.clone();
                Some(Assignment {
                    task: t.name.clone(), stage, variant: Some(v), node: "n".into(),
                    millicores, max_batch, max_delay_ms, weight, replica, memory_bytes: 0,
                })
            })
            .collect();
        let plan = Plan { epoch, term: 1, tasks: vec![t], assignments, ..Default::default() };
        if validate_for_node(&plan, "n", node_millicores).is_ok() {
            prop_assert!(plan.assignments.len() <= MAX_WORKERS_PER_NODE);
            prop_assert!(plan.assignments.iter().all(|a| a.millicores >= MIN_WORKER_MILLICORES));
            let total: u64 = plan.assignments.iter().map(|a| a.millicores as u64).sum();
            prop_assert!(total <= node_millicores as u64);
        }
    }

    /// A profile from StoreProfile or the log: one that passes is small enough to plan with.
    #[test]
    fn profiles_are_checked_without_panicking(
        points in prop::collection::vec(
            (
                small_or_any(0..8),
                small_or_any(0..300),
                prop_oneof![4 => 0.0f64..1e4, 1 => Just(f64::NAN), 1 => Just(f64::INFINITY), 1 => -1.0f64..0.0],
                0.0f64..1e4,
                prop_oneof![1 => Just(0.0f64), 4 => 0.1f64..1e6],
            ),
            0..12,
        ),
    ) {
        let points: Vec<ProfilePoint> = points
            .into_iter()
            .map(|(cores, batch, p50, p99, tput)| ProfilePoint {
                cores, batch, latency_p50_ms: p50, latency_p99_ms: p99, throughput_rps: tput, size: 0,
                output_tokens: 0, resident_bytes: 0,
            })
            .collect();
        let p = VariantProfile { task: "t".into(), variant: "v".into(), node: String::new(), points, ..Default::default() };
        if validate_profile(&p).is_ok() {
            prop_assert!(p.points.iter().all(|q| q.cores <= MAX_PROFILE_CORES));
            let grid = ProfileGrid::new(&p.points);
            prop_assert!(grid.cores().iter().all(|&c| c <= MAX_PROFILE_CORES));
        }
    }

    /// A profile measured at sizes, asked for any mix: finite, positive figures or none.
    #[test]
    fn a_profile_at_any_size_mix_gives_finite_figures(
        points in proptest::collection::vec(
            (1u32..4, 1u32..4, 0.1f64..1e4, 0.1f64..1e4, 0u64..1_000_000),
            1..24,
        ),
        mix in proptest::collection::vec((0u64..10_000_000, 0.0f64..10.0), 0..6),
    ) {
        let points: Vec<ProfilePoint> = points
            .into_iter()
            .map(|(cores, batch, p99, tput, size)| ProfilePoint {
                cores, batch, latency_p50_ms: p99, latency_p99_ms: p99, throughput_rps: tput, size,
                output_tokens: 0, resident_bytes: 0,
            })
            .collect();
        let counts: std::collections::BTreeMap<u64, f64> =
            mix.into_iter().map(|(s, c)| (tidal_common::profile::size_bucket(s), c)).collect();
        let mix = tidal_common::profile::size_mix(&counts);
        let at = tidal_common::profile::points_at_mix(&points, 1000, &mix);
        for p in &at.points {
            prop_assert!(p.throughput_rps.is_finite() && p.throughput_rps > 0.0, "{p:?}");
            prop_assert!(p.latency_p99_ms.is_finite() && p.latency_p99_ms > 0.0, "{p:?}");
        }
    }

    /// A node's registration.
    #[test]
    fn registrations_are_checked_without_panicking(
        node in name(),
        address in prop_oneof![Just("127.0.0.1:7100".to_string()), "[0-9.:a-z]{0,20}"],
        control_address in prop_oneof![Just(String::new()), Just("127.0.0.1:7101".to_string()), "[0-9.:]{0,20}"],
        cores in small_or_any(0..4),
    ) {
        let n = RegisterNodeRequest { node, address, cores, control_address, ..Default::default() };
        if validate_node(&n).is_ok() {
            prop_assert!((1..=1024).contains(&n.cores));
        }
    }

    /// A variant's TOML as an operator (or anyone who can write the model directory) wrote it.
    #[test]
    fn variant_configs_are_parsed_without_panicking(
        text in prop_oneof![
            3 => (name(), "[a-c./]{0,8}", -10.0f64..120.0, prop::collection::vec(dim(), 0..4)).prop_map(|(n, f, a, s)| {
                format!("name = {n:?}\nmodel_file = {f:?}\naccuracy = {a}\ninput_shape = {s:?}\n")
            }),
            1 => "[a-z_=\"\\[\\]0-9., \\n-]{0,120}",
        ],
    ) {
        if let Ok(cfg) = toml::from_str::<VariantConfig>(&text) {
            let _ = validate_variant(&cfg.spec());
        }
    }

    /// Bytes off the wire, decoded as the messages the control plane accepts.
    #[test]
    fn wire_bytes_decode_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(cmd) = Command::decode(bytes.as_slice()) {
            let _ = cmd.encode_to_vec();
        }
        if let Ok(plan) = Plan::decode(bytes.as_slice()) {
            let mut plan = plan;
            tidal_common::plan::normalise(&mut plan);
            let _ = validate_for_node(&plan, "n", 2000);
        }
        if let Ok(t) = TaskSpec::decode(bytes.as_slice()) {
            let _ = validate_task(&normalise(t));
        }
    }
}
